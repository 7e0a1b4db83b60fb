"""The hospital data contract: every failure a data owner can make must be named precisely."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from clinfed.common.data import (
    INSURANCE_VALUES,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    DataContractWarning,
    DataValidationError,
    Problem,
    find_table,
    list_sites,
    read_site_table,
    split_site,
    validate_path,
)

# The tiny fixtures have one positive; that warning is tested once, below, and muted elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:.*rarer class")

HEADER = "encounter_id,note_text,readmitted_30d,discharge_date,age,sex,insurance,n_comorbidities,region,died"
GOOD_ROWS = [
    '007,"72 y/o F with CHF, SOB.",1,2022-03-01,72,F,government,3,north,0',
    '008,"55 y/o M, COPD; stable on RA.",0,2022-03-02,55,M,commercial,1,south,',
    '009,Short note,0,2022-03-05,,,,,,',
]


def write_csv(folder, rows, header=HEADER, name="encounters.csv"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    return path


def good_frame(n=3):
    return pd.DataFrame({
        "encounter_id": ["007", "008", "009"][:n],
        "note_text": ["72 y/o F with CHF, SOB.", "55 y/o M, COPD.", "Short note"][:n],
        "readmitted_30d": [1, 0, 0][:n],
        "discharge_date": ["2022-03-01", "2022-03-02", "2022-03-05"][:n],
        "age": [72.0, 55.0, None][:n],
        "sex": ["F", "M", None][:n],
        "insurance": ["government", "commercial", None][:n],
        "n_comorbidities": [3.0, 1.0, None][:n],
        "region": ["north", "south", None][:n],
        "died": [0.0, None, None][:n],
    })


def check_dtypes(df):
    assert list(df.columns) == list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS)
    assert df["encounter_id"].tolist() == ["007", "008", "009"]  # leading zeros survive
    assert pd.api.types.is_string_dtype(df["encounter_id"]) and pd.api.types.is_string_dtype(df["note_text"])
    assert df["readmitted_30d"].dtype == np.int64
    assert df["discharge_date"].dtype == "datetime64[ns]"
    assert df["age"].dtype == np.float64 and np.isnan(df["age"].iloc[2]) and df["age"].iloc[0] == 72
    assert df["n_comorbidities"].dtype == np.float64 and df["n_comorbidities"].iloc[0] == 3
    assert df["died"].dtype == np.float64 and df["died"].isna().tolist() == [False, True, True]
    assert df["sex"].iloc[0] == "F" and pd.isna(df["sex"].iloc[2])
    assert df["insurance"].iloc[1] == "commercial" and pd.isna(df["region"].iloc[2])
    assert df.index.tolist() == [0, 1, 2]


# ------------------------------------------------------------------ valid files, three formats


def test_valid_csv(tmp_path):
    path = write_csv(tmp_path / "h01", GOOD_ROWS)
    check_dtypes(read_site_table(path))
    check_dtypes(read_site_table(tmp_path / "h01"))  # the hospital folder works too


def test_valid_parquet(tmp_path):
    (tmp_path / "h02").mkdir()
    good_frame().to_parquet(tmp_path / "h02" / "data.parquet", index=False)
    check_dtypes(read_site_table(tmp_path / "h02"))


def test_valid_jsonl(tmp_path):
    (tmp_path / "h03").mkdir()
    recs = good_frame().astype(object).where(good_frame().notna(), None).to_dict("records")
    lines = [json.dumps(r) for r in recs]
    (tmp_path / "h03" / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_dtypes(read_site_table(tmp_path / "h03"))


def test_only_required_columns_and_multiline_note(tmp_path):
    path = write_csv(tmp_path / "h01", ['a1,"line one\nline two",0,2021-01-01', "a2,note,1,2021-01-02"],
                     header="encounter_id,note_text,readmitted_30d,discharge_date")
    df = read_site_table(path)
    assert list(df.columns) == list(REQUIRED_COLUMNS)
    assert df["note_text"].iloc[0] == "line one\nline two"


def test_extra_columns_dropped_with_warning(tmp_path):
    path = write_csv(tmp_path / "h01", [r + ",MRN123" for r in GOOD_ROWS], header=HEADER + ",mrn")
    with pytest.warns(DataContractWarning, match="mrn"):
        df = read_site_table(path)
    assert "mrn" not in df.columns


def test_few_positives_warns(tmp_path):
    with pytest.warns(DataContractWarning, match="only 1 encounter in the rarer class"):
        read_site_table(write_csv(tmp_path / "h01", GOOD_ROWS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_site_table(tmp_path / "h01", warn=False)


# ------------------------------------------------------------------ bad files: file, line, column


def error_for(path) -> DataValidationError:
    with pytest.raises(DataValidationError) as ei:
        read_site_table(path)
    return ei.value


@pytest.mark.parametrize(
    "bad_row, column, expect",
    [
        ('010,note,2,2022-01-01,50,F,commercial,1,north,0', "readmitted_30d", "expected 0 or 1, got '2'"),
        ('010,note,yes,2022-01-01,50,F,commercial,1,north,0', "readmitted_30d", "got 'yes'"),
        ('010,note,,2022-01-01,50,F,commercial,1,north,0', "readmitted_30d", "empty value"),
        ('010,note,NaN,2022-01-01,50,F,commercial,1,north,0', "readmitted_30d", "got 'NaN'"),
        ('010,note,0,31/31/2022,50,F,commercial,1,north,0', "discharge_date", "cannot read '31/31/2022'"),
        ('010,note,0,,50,F,commercial,1,north,0', "discharge_date", "empty"),
        ('010,"   ",0,2022-01-01,50,F,commercial,1,north,0', "note_text", "whitespace"),
        ('010,,0,2022-01-01,50,F,commercial,1,north,0', "note_text", "empty"),
        (',note,0,2022-01-01,50,F,commercial,1,north,0', "encounter_id", "empty"),
        ('010,note,0,2022-01-01,old,F,commercial,1,north,0', "age", "got 'old'"),
        ('010,note,0,2022-01-01,130,F,commercial,1,north,0', "age", "outside 0-120"),
        ('010,note,0,2022-01-01,50,female,commercial,1,north,0', "sex", "got 'female'"),
        ('010,note,0,2022-01-01,50,F,medicare,1,north,0', "insurance", "got 'medicare'"),
        ('010,note,0,2022-01-01,50,F,commercial,-1,north,0', "n_comorbidities", "got '-1'"),
        ('010,note,0,2022-01-01,50,F,commercial,2.5,north,0', "n_comorbidities", "got '2.5'"),
        ('010,note,0,2022-01-01,50,F,commercial,1,north,3', "died", "expected 0 or 1, got '3'"),
    ],
)
def test_bad_value_names_file_line_column(tmp_path, bad_row, column, expect):
    path = write_csv(tmp_path / "h03", GOOD_ROWS + [bad_row])
    err = error_for(path)
    assert len(err.problems) == 1
    msg = str(err)
    assert f"h03/encounters.csv, line 5, column '{column}'" in msg  # header = line 1, 4th data row = line 5
    assert expect in msg
    p = err.problems[0]
    assert (p.file, p.row, p.column) == ("h03/encounters.csv", 5, column)


def test_exact_message_style(tmp_path):
    rows = GOOD_ROWS + [f"x{i},note,0,2022-01-01" + ",,,,,," for i in range(12)] + ["z,note,2,2022-01-01,,,,,,"]
    err = error_for(write_csv(tmp_path / "h03", rows))
    assert str(err.problems[0]) == "h03/encounters.csv, line 17, column 'readmitted_30d': expected 0 or 1, got '2'"


def test_duplicate_encounter_id_names_both_lines(tmp_path):
    err = error_for(write_csv(tmp_path / "h01", GOOD_ROWS + ['008,again,0,2022-01-01,,,,,,']))
    msg = str(err)
    assert "line 5, column 'encounter_id'" in msg and "'008'" in msg and "line 3" in msg


def test_all_problems_reported_and_capped(tmp_path):
    rows = [f"e{i},note,maybe,2022-01-01,,,,,," for i in range(80)]
    err = error_for(write_csv(tmp_path / "h01", rows))
    assert len(err.problems) == 80
    msg = str(err)
    listed = msg.split("... and")[0]
    assert "line 51," in listed and "line 52," not in listed  # first 50 data rows = lines 2-51
    assert "and 30 more problems" in msg
    assert msg.count("\n\n") >= 50  # one paragraph per listed problem


def test_missing_required_columns_listed(tmp_path):
    path = write_csv(tmp_path / "h01", ["1,note,2022-01-01"], header="encounter_id,note_text,date")
    msg = str(error_for(path))
    assert "h01/encounters.csv" in msg
    assert "'readmitted_30d'" in msg and "'discharge_date'" in msg
    assert "columns found: 'encounter_id', 'note_text', 'date'" in msg


def test_zero_rows(tmp_path):
    assert "no data rows" in str(error_for(write_csv(tmp_path / "h01", [])))


def test_empty_file(tmp_path):
    (tmp_path / "h01").mkdir()
    (tmp_path / "h01" / "encounters.csv").write_bytes(b"")
    msg = str(error_for(tmp_path / "h01"))
    assert "h01/encounters.csv" in msg and "empty" in msg


def test_file_not_found(tmp_path):
    msg = str(error_for(tmp_path / "h01" / "encounters.csv"))
    assert "does not exist" in msg


def test_binary_garbage(tmp_path):
    (tmp_path / "h01").mkdir()
    (tmp_path / "h01" / "encounters.csv").write_bytes(bytes(range(256)) * 8)
    assert "binary" in str(error_for(tmp_path / "h01"))
    (tmp_path / "h02").mkdir()
    (tmp_path / "h02" / "data.parquet").write_bytes(b"this is not parquet at all" * 10)
    assert "not a readable Parquet file" in str(error_for(tmp_path / "h02"))


def test_non_utf8_names_line(tmp_path):
    path = write_csv(tmp_path / "h01", GOOD_ROWS)
    data = path.read_bytes().replace(b"Short note", b"Caf\xe9 note")  # latin-1 e-acute on line 4
    path.write_bytes(data)
    msg = str(error_for(path))
    assert "h01/encounters.csv, line 4" in msg and "UTF-8" in msg


def test_unparseable_csv_structure(tmp_path):
    err = error_for(write_csv(tmp_path / "h01", GOOD_ROWS + ['010,"unterminated note,0,2022-01-01,,,,,,']))
    assert "line 5" in str(err) and "quote" in str(err)
    err = error_for(write_csv(tmp_path / "h02", GOOD_ROWS + ["010,a, note with comma,0,2022-01-01,,,,,,"]))
    assert "line 5" in str(err) and "11 fields" in str(err)


def test_jsonl_bad_line_and_bad_label(tmp_path):
    (tmp_path / "h01").mkdir()
    rec = {"encounter_id": "a", "note_text": "n", "readmitted_30d": 1, "discharge_date": "2022-01-01"}
    lines = [json.dumps(rec), "{not json", json.dumps({**rec, "encounter_id": "b", "readmitted_30d": "yes"})]
    (tmp_path / "h01" / "e.jsonl").write_text("\n".join(lines), encoding="utf-8")
    msg = str(error_for(tmp_path / "h01"))
    assert "h01/e.jsonl, line 2" in msg and "not valid JSON" in msg
    assert "h01/e.jsonl, line 3, column 'readmitted_30d'" in msg


def test_parquet_row_numbers(tmp_path):
    (tmp_path / "h01").mkdir()
    df = good_frame()
    df.loc[1, "insurance"] = "medicaid"
    df.to_parquet(tmp_path / "h01" / "t.parquet", index=False)
    assert "h01/t.parquet, row 2, column 'insurance'" in str(error_for(tmp_path / "h01"))


def test_problem_str_file_level():
    assert str(Problem("h01/x.csv", None, None, "file is empty")) == "h01/x.csv: file is empty"
    assert set(INSURANCE_VALUES) == {"commercial", "government", "self_pay", "unspecified", "other"}


# ------------------------------------------------------------------ find_table


def test_find_table_cases(tmp_path):
    site = tmp_path / "h01"
    csv_path = write_csv(site, GOOD_ROWS)
    (site / "config.toml").write_text("x = 1")
    (site / "meta.json").write_text("{}")
    (site / ".hidden.csv").write_text("junk")
    assert find_table(site) == csv_path
    assert find_table(csv_path) == csv_path

    with pytest.raises(DataValidationError, match="does not exist"):
        find_table(tmp_path / "nope")
    with pytest.raises(DataValidationError, match="unsupported file type '.json'"):
        find_table(site / "meta.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataValidationError, match="no table file"):
        find_table(empty)
    write_csv(site, GOOD_ROWS, name="second.csv")
    with pytest.raises(DataValidationError, match="several tables.*encounters.csv.*second.csv"):
        find_table(site)
    (tmp_path / "h02" / "x.csv").mkdir(parents=True)
    with pytest.raises(DataValidationError, match="is a directory"):
        find_table(tmp_path / "h02")
    with pytest.raises(DataValidationError, match="federation folder"):
        find_table(tmp_path)


# ------------------------------------------------------------------ validate_path, list_sites


def test_validate_path_federation(tmp_path):
    write_csv(tmp_path / "h01", GOOD_ROWS)
    write_csv(tmp_path / "h02", GOOD_ROWS + ['010,note,2,2022-01-01,,,,,,'])
    (tmp_path / "docs").mkdir()
    assert [n for n, _ in list_sites(tmp_path)] == ["h01", "h02"]

    rep = validate_path(tmp_path)
    assert rep.kind == "federation" and not rep.ok
    assert [s.name for s in rep.sites] == ["h01", "h02"]
    assert rep.sites[0].ok and rep.sites[0].n_rows == 3 and rep.sites[0].n_positive == 1
    assert len(rep.problems) == 1 and rep.problems[0].file == "h02/encounters.csv"
    assert any("docs" in str(w) for w in rep.warnings)
    text = rep.summary()
    assert "h01: OK, 3 rows, 1 readmitted" in text and "2022-03-01 to 2022-03-05" in text
    assert "h02: FAILED" in text and "line 5, column 'readmitted_30d'" in text

    good = validate_path(tmp_path / "h01")
    assert good.ok and good.kind == "hospital" and not good.problems
    assert validate_path(tmp_path / "h01" / "encounters.csv").ok
    missing = validate_path(tmp_path / "nothing_here")
    assert not missing.ok and "does not exist" in missing.summary()


def test_validate_path_never_raises_on_garbage(tmp_path):
    (tmp_path / "h01").mkdir()
    (tmp_path / "h01" / "encounters.csv").write_bytes(b"\xff\xfe\x00garbage")
    rep = validate_path(tmp_path)
    assert not rep.ok and "Traceback" not in rep.summary()


# ------------------------------------------------------------------ split_site


def make_site(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "encounter_id": [f"e{i:05d}" for i in range(n)],
        "note_text": ["note"] * n,
        "readmitted_30d": rng.integers(0, 2, n),
        "discharge_date": pd.to_datetime("2021-01-01") + pd.to_timedelta(rng.integers(0, 60, n), unit="D"),
    })


def test_split_deterministic_disjoint_covering():
    df = make_site(1000)
    a, b = split_site(df, seed=3), split_site(df.sample(frac=1, random_state=1), seed=3)
    assert set(a) == {"train", "val", "test", "temporal"}
    ids = {k: set(v["encounter_id"]) for k, v in a.items()}
    assert sum(len(v) for v in ids.values()) == 1000 and set().union(*ids.values()) == set(df["encounter_id"])
    for k in ids:
        assert ids[k] == set(b[k]["encounter_id"])  # row order does not matter
    assert len(a["temporal"]) == 200
    rest = 800
    assert abs(len(a["test"]) - 0.25 * rest) < 45 and abs(len(a["val"]) - 0.10 * rest) < 30
    c = split_site(df, seed=4)
    assert set(c["test"]["encounter_id"]) != ids["test"]
    assert all(v.index.tolist() == list(range(len(v))) for v in a.values())


def test_split_temporal_is_most_recent_with_id_ties():
    df = make_site(500)
    s = split_site(df, seed=0)
    t_min = s["temporal"]["discharge_date"].min()
    others = pd.concat([s["train"], s["val"], s["test"]])
    assert (others["discharge_date"] <= t_min).all()
    tied_out = others.loc[others["discharge_date"] == t_min, "encounter_id"]
    tied_in = s["temporal"].loc[s["temporal"]["discharge_date"] == t_min, "encounter_id"]
    assert tied_out.max() < tied_in.min()  # ties at the boundary broken by encounter_id
    none = split_site(df, seed=0, temporal_frac=0)
    assert len(none["temporal"]) == 0 and sum(len(v) for v in none.values()) == 500


def test_split_stable_when_rows_added():
    small = make_site(400)
    # added rows are older than everything, so the temporal split keeps the same encounters
    extra = make_site(300, seed=9)
    extra["encounter_id"] = [f"new{i}" for i in range(300)]
    extra["discharge_date"] = pd.Timestamp("2020-01-01")
    s1 = split_site(small, seed=7, temporal_frac=0.1)
    s2 = split_site(pd.concat([small, extra], ignore_index=True), seed=7, temporal_frac=0.1 * 400 / 700)
    for k in ("train", "val", "test", "temporal"):
        assert set(s1[k]["encounter_id"]) <= set(s2[k]["encounter_id"])


def test_split_reads_back_from_file(tmp_path):
    df = read_site_table(write_csv(tmp_path / "h01", GOOD_ROWS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parts = split_site(df, seed=0, temporal_frac=0.34)
    assert parts["temporal"]["encounter_id"].tolist() == ["009"]
