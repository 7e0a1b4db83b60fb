"""Issue 6: every bad input is answered with one clear error naming what and where, no traceback.

One table of malformed inputs, each run through the real `clinfed` entry point
(`clinfed.cli.main.main`, in-process for speed), plus a subset in a subprocess to prove that what
reaches the terminal carries no traceback. Each case asserts the exit code, the absence of a
traceback and of the catch-all "internal error" (so the answer comes from a deliberate check),
and specific substrings: the file and line/row/column for data, the key for run config, the
option for command-line arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from clinfed.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
HEADER = "encounter_id,note_text,readmitted_30d,discharge_date"
ROWS = ["a1,chf at home,1,2022-01-01", "a2,copd stable,0,2022-01-02", "a3,short note,0,2022-01-03"]


class FlowerStarted(BaseException):
    """Raised if a bad input got as far as starting the study (BaseException: no handler hides it)."""


def csv_text(rows=ROWS, header=HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def put(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def site_csv(tmp: Path, content: str | bytes, name: str = "encounters.csv") -> Path:
    return put(tmp / "h01" / name, content)


def jsonl(tmp: Path, lines: list) -> Path:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    return put(tmp / "h01" / "e.jsonl", text)


def parquet(tmp: Path, frame: pd.DataFrame) -> Path:
    (tmp / "h01").mkdir(parents=True, exist_ok=True)
    frame.to_parquet(tmp / "h01" / "t.parquet", index=False)
    return tmp / "h01" / "t.parquet"


def good_frame() -> pd.DataFrame:
    return pd.DataFrame({"encounter_id": ["a1", "a2", "a3"], "note_text": ["chf", "copd", "note"],
                         "readmitted_30d": [1, 0, 0], "discharge_date": ["2022-01-01", "2022-01-02", "2022-01-03"]})


def federation(tmp: Path, n: int = 2) -> Path:
    """A valid federation of `n` tiny hospitals (both classes at each)."""
    for i in range(1, n + 1):
        put(tmp / "fed" / f"h{i:02d}" / "encounters.csv", csv_text())
    return tmp / "fed"


def simulate(tmp: Path, run_config: str, *extra: str, data: Path | None = None) -> list[str]:
    data = data if data is not None else federation(tmp)
    return ["simulate", "--data", str(data), "--out", str(tmp / "run"), "--run-config", run_config, *extra]


@dataclass
class Case:
    id: str
    make: Callable[[Path], list[str]]  # writes its inputs into tmp_path, returns the CLI arguments
    expect: list[str]  # substrings of stdout + stderr, each required
    code: int = 1  # expected exit code (0: a warning, not an error)
    subprocess: bool = False  # also run through a real `python -m clinfed.cli` process
    absent: list[str] = field(default_factory=list)  # substrings that must not appear


def _v(make_path: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", str(make_path(tmp))]


# ----------------------------------------------------------------------------- data files
DATA_CASES = [
    Case("csv-missing-required-column",
         _v(lambda t: site_csv(t, csv_text(["a1,note,2022-01-01"], "encounter_id,note_text,discharge_date"))),
         ["h01/encounters.csv", "missing required column 'readmitted_30d'", "columns found: 'encounter_id'"]),
    Case("csv-extra-column-is-a-warning-not-an-error",
         _v(lambda t: site_csv(t, csv_text([r + ",MRN1" for r in ROWS], HEADER + ",mrn"))),
         ["h01: OK, 3 rows", "Warnings", "extra column 'mrn' not in the contract: dropped"], code=0),
    Case("csv-wrong-type-in-numeric-column",
         _v(lambda t: site_csv(t, csv_text([r + ",50" for r in ROWS[:1]] + [ROWS[1] + ",old", ROWS[2] + ","],
                                           HEADER + ",age"))),
         ["h01/encounters.csv, line 3, column 'age'", "expected a number of years", "got 'old'"]),
    Case("csv-label-outside-0-1",
         _v(lambda t: site_csv(t, csv_text(ROWS + ["a4,note,2,2022-01-04"]))),
         ["h01/encounters.csv, line 5, column 'readmitted_30d': expected 0 or 1, got '2'"], subprocess=True),
    Case("csv-label-missing",
         _v(lambda t: site_csv(t, csv_text(ROWS + ["a4,note,,2022-01-04"]))),
         ["line 5, column 'readmitted_30d'", "got an empty value"]),
    Case("csv-single-class-site",
         _v(lambda t: site_csv(t, csv_text([r.replace(",1,", ",0,") for r in ROWS]))),
         ["h01/encounters.csv, column 'readmitted_30d'", "every label is 0 (3 encounters)", "both"]),
    Case("csv-empty-note",
         _v(lambda t: site_csv(t, csv_text([ROWS[0], "a2,,0,2022-01-02", ROWS[2]]))),
         ["h01/encounters.csv, line 3, column 'note_text'", "note is empty"]),
    Case("csv-whitespace-note",
         _v(lambda t: site_csv(t, csv_text([ROWS[0], 'a2,"   ",0,2022-01-02', ROWS[2]]))),
         ["line 3, column 'note_text'", "only whitespace"]),
    Case("csv-huge-note",
         _v(lambda t: site_csv(t, csv_text([f"a1,{'word ' * 30_000},1,2022-01-01", *ROWS[1:]]))),
         ["h01/encounters.csv, line 2, column 'note_text'", "150,000 characters", "limit of 100,000"]),
    Case("csv-non-utf8-bytes",
         _v(lambda t: site_csv(t, csv_text().encode().replace(b"copd", b"caf\xe9"))),
         ["h01/encounters.csv, line 3", "not valid UTF-8", "0xe9", "re-save"], subprocess=True),
    Case("csv-utf8-bom-is-accepted",
         _v(lambda t: site_csv(t, b"\xef\xbb\xbf" + csv_text().encode())),
         ["h01: OK, 3 rows", "columns: encounter_id, note_text, readmitted_30d, discharge_date"], code=0,
         absent=["missing required"]),
    Case("csv-duplicate-ids",
         _v(lambda t: site_csv(t, csv_text(ROWS + ["a1,again,0,2022-01-05"]))),
         ["h01/encounters.csv, line 5, column 'encounter_id'", "duplicate encounter_id 'a1', also on line 2"]),
    Case("csv-unparseable-date",
         _v(lambda t: site_csv(t, csv_text([ROWS[0], "a2,note,0,next week", "a3,note,0,2022-13-45"]))),
         ["line 3, column 'discharge_date': cannot read 'next week' as a date",
          "line 4, column 'discharge_date': cannot read '2022-13-45'"]),
    Case("csv-implausible-date",
         _v(lambda t: site_csv(t, csv_text([ROWS[0], "a2,note,0,2999-01-01", ROWS[2]]))),
         ["line 3, column 'discharge_date'", "implausible (year outside 1900-2100)"]),
    Case("csv-empty-file-0-bytes",
         _v(lambda t: site_csv(t, b"")),
         ["h01/encounters.csv: file is empty (0 bytes)"], absent=["missing required"]),
    Case("csv-header-only",
         _v(lambda t: site_csv(t, HEADER + "\n")),
         ["h01/encounters.csv: the table has no data rows"]),
    Case("csv-ragged-rows",
         _v(lambda t: site_csv(t, csv_text([ROWS[0], "a2,copd, stable,0,2022-01-02", ROWS[2]]))),
         ["h01/encounters.csv, line 3", "has 5 fields but the header has 4", "double quotes"]),
    Case("csv-unmatched-quote",
         _v(lambda t: site_csv(t, csv_text([ROWS[0], 'a2,"unterminated note,0,2022-01-02', ROWS[2]]))),
         ["h01/encounters.csv, line 3", "cannot be parsed as CSV", "quote"]),
    Case("csv-semicolon-separated",
         _v(lambda t: site_csv(t, csv_text([r.replace(",", ";") for r in ROWS], HEADER.replace(",", ";")))),
         ["h01/encounters.csv, line 1", "';'-separated"], absent=["missing required"]),
    Case("csv-column-name-wrong-case",
         _v(lambda t: site_csv(t, csv_text(ROWS, HEADER.replace("readmitted_30d", "Readmitted_30d")))),
         ["missing required column 'readmitted_30d'", "case-sensitive: found 'Readmitted_30d'"]),
    Case("png-renamed-csv-is-not-a-table",
         _v(lambda t: site_csv(t, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))),
         ["h01/encounters.csv: does not look like a text table (it contains binary data)"],
         subprocess=True, absent=["missing required"]),
    Case("parquet-renamed-csv",
         _v(lambda t: site_csv(t, b"PAR1" + bytes(64) + b"PAR1")),
         ["h01/encounters.csv", "Parquet file with a text extension; rename it to .parquet"]),
    Case("directory-given-for-a-file",
         _v(lambda t: (t / "h01" / "encounters.csv").mkdir(parents=True) or t / "h01" / "encounters.csv"),
         ["h01/encounters.csv: is a directory, but a table file is needed here"]),
    Case("directory-inside-hospital-named-like-a-table",
         _v(lambda t: (t / "h01" / "x.csv").mkdir(parents=True) or t / "h01"),
         ["h01/x.csv: is a directory"]),
    Case("hospital-folder-with-two-tables",
         _v(lambda t: (site_csv(t, csv_text()), site_csv(t, csv_text(), "b.csv"))[0].parent),
         ["several tables (b.csv, encounters.csv)", "keep exactly one"]),
    Case("empty-folder",
         _v(lambda t: (t / "h01").mkdir() or t / "h01"),
         ["h01: no table file", "the folder is empty"]),
    Case("path-does-not-exist",
         _v(lambda t: t / "h09" / "encounters.csv"),
         ["h09/encounters.csv: path does not exist"]),
    Case("xlsx-corrupt",
         _v(lambda t: site_csv(t, b"PK\x03\x04 not really a workbook", "encounters.xlsx")),
         ["h01/encounters.xlsx", "unsupported file type '.xlsx'", "export it as CSV"]),
    Case("xlsx-only-in-hospital-folder",
         _v(lambda t: site_csv(t, b"PK\x03\x04", "encounters.xlsx").parent),
         ["no table file", "found: encounters.xlsx", "export it as CSV"]),
    Case("jsonl-line-not-json",
         _v(lambda t: jsonl(t, [good_frame().iloc[0].to_dict(), "{not json",
                                {**good_frame().iloc[1].to_dict()}])),
         ["h01/e.jsonl, line 2: not valid JSON", "one JSON object"]),
    Case("jsonl-array-instead-of-objects",
         _v(lambda t: jsonl(t, ['[{"encounter_id": "a1"}]'])),
         ["h01/e.jsonl, line 1: expected a JSON object per line, got list"], absent=["missing required"]),
    Case("jsonl-nested-value",
         _v(lambda t: jsonl(t, [{**good_frame().iloc[i].to_dict(), "age": [70] if i == 0 else 50}
                                for i in range(3)])),
         ["h01/e.jsonl, line 1, column 'age': expected a single value, got a JSON list"]),
    Case("jsonl-several-problems-all-listed",
         _v(lambda t: jsonl(t, [good_frame().iloc[0].to_dict(), good_frame().iloc[0].to_dict(),
                                {**good_frame().iloc[2].to_dict(), "readmitted_30d": "yes"}])),
         ["(2 problems)", "h01/e.jsonl, line 2, column 'encounter_id': duplicate encounter_id 'a1', also on line 1",
          "h01/e.jsonl, line 3, column 'readmitted_30d': expected 0 or 1, got 'yes'"]),
    Case("parquet-corrupt",
         _v(lambda t: put(t / "h01" / "t.parquet", b"PAR1 this is not parquet at all")),
         ["h01/t.parquet: not a readable Parquet file"], subprocess=True, absent=["missing required"]),
    Case("parquet-wrong-values",
         _v(lambda t: parquet(t, good_frame().assign(readmitted_30d=["yes", "0", "1"],
                                                     discharge_date=["2022-01-01", "x", "2022-01-03"]))),
         ["h01/t.parquet, row 1, column 'readmitted_30d': expected 0 or 1, got 'yes'",
          "h01/t.parquet, row 2, column 'discharge_date': cannot read 'x'"]),
    Case("parquet-missing-column",
         _v(lambda t: parquet(t, good_frame().drop(columns=["note_text"]))),
         ["h01/t.parquet", "missing required column 'note_text'"]),
    Case("federation-with-one-bad-hospital",
         _v(lambda t: (federation(t), put(t / "fed" / "h02" / "encounters.csv", csv_text(ROWS[:2] + ["a3,n,x,2022-01-03"])))[0]),
         ["2 hospital(s), 1 OK, 1 with problems", "h01: OK", "h02: FAILED",
          "h02/encounters.csv, line 4, column 'readmitted_30d'"]),
]

# ----------------------------------------------------------------------------- run config
CONFIG_CASES = [
    Case("config-unknown-key", lambda t: simulate(t, "num-rounds=3"),
         ["unknown run-config key 'num-rounds'", "did you mean num-server-rounds"], subprocess=True),
    Case("config-unknown-key-underscore", lambda t: simulate(t, "learning_rate=0.01"),
         ["unknown run-config key 'learning_rate'", "did you mean learning-rate"]),
    Case("config-out-of-range", lambda t: simulate(t, "local-steps=0"),
         ["run config 'local-steps': 0 is outside the allowed range [1, 100000]"]),
    Case("config-out-of-range-float", lambda t: simulate(t, "lora-dropout=1.5"),
         ["run config 'lora-dropout'", "outside the allowed range"]),
    Case("config-string-for-int", lambda t: simulate(t, "batch-size=many"),
         ["run config 'batch-size': expected an integer, got 'many'"]),
    Case("config-fraction-for-int", lambda t: simulate(t, "num-server-rounds=2.5"),
         ["run config 'num-server-rounds': expected an integer, got 2.5"]),
    Case("config-word-for-bool", lambda t: simulate(t, "report=yes"),
         ["run config 'report': expected true or false, got 'yes'"]),
    Case("config-unknown-choice", lambda t: simulate(t, "precision=fp8"),
         ["run config 'precision': expected one of auto, fp32, bf16, got 'fp8'"]),
    Case("config-model-path-does-not-exist", lambda t: simulate(t, 'model="/no/such/model"'),
         ["run config 'model'", "model path /no/such/model does not exist"], subprocess=True),
    Case("config-model-path-is-a-file",
         lambda t: simulate(t, f'model="{put(t / "weights.bin", b"x")}"'),
         ["run config 'model'", "weights.bin is a file"]),
    Case("config-model-folder-without-config", lambda t: simulate(t, f'model="{(t / "m").mkdir() or t / "m"}"'),
         ["run config 'model'", "is a folder without config.json"]),
    Case("config-model-not-an-id", lambda t: simulate(t, 'model="my model!"'),
         ["run config 'model'", "neither an existing local path nor a valid Hugging Face id"]),
    Case("config-decoder-path-does-not-exist", lambda t: simulate(t, 'task="generative" decoder="./nope/decoder"'),
         ["run config 'decoder'", "model path ./nope/decoder does not exist"]),
    Case("config-holdout-task-not-in-tasks", lambda t: simulate(t, 'gen-tasks="triage,extraction" gen-holdout-task="readmission"'),
         ["run config 'gen-holdout-task': 'readmission' is not one of gen-tasks (triage, extraction)"]),
    Case("config-unknown-gen-task", lambda t: simulate(t, 'gen-tasks="triage,poetry"'),
         ["run config 'gen-tasks'", "poetry"]),
    Case("config-unknown-regime", lambda t: simulate(t, 'regimes="base,global,fancy"'),
         ["run config 'regimes'", "'fancy'"]),
    Case("config-bad-word-bands", lambda t: simulate(t, 'word-bands="10,a"'),
         ["run config 'word-bands'"]),
    Case("config-fractions-leave-no-training", lambda t: simulate(t, "test-frac=0.6 val-frac=0.45"),
         ["run config 'test-frac' + 'val-frac' = 1.05 leaves no encounters for training"]),
    Case("config-min-sites-above-hospitals", lambda t: simulate(t, "min-sites=5"),
         ["run config 'min-sites': 5 but the federation has only 2 hospitals"]),
    Case("config-expected-sites-above-hospitals", lambda t: simulate(t, "expected-sites=3"),
         ["run config 'expected-sites': 3 but the federation has only 2 hospitals"]),
    Case("config-min-sites-above-hospitals-to-generate",
         lambda t: ["simulate", "--hospitals", "3", "--out", str(t / "run"), "--run-config", "min-sites=4"],
         ["run config 'min-sites': 4 but the federation has only 3 hospitals"]),
    Case("config-clusters-not-below-hospitals", lambda t: simulate(t, "clusters=2"),
         ["run config 'clusters': 2 cluster(s) of 2 hospitals", "drop 'cluster' from regimes"]),
    Case("config-item-without-equals", lambda t: simulate(t, "fast"),
         ["run-config item 'fast' is not of the form key=value"]),
    Case("config-unclosed-quote", lambda t: simulate(t, 'model="tiny-bert'),
         ["cannot be split into key=value items", "No closing quotation"], subprocess=True),
    Case("config-data-dir-disagrees-with-data",
         lambda t: simulate(t, f'data-dir="{t / "other"}"'),
         ["--data", "run config 'data-dir=", "disagree"]),
    Case("config-task-disagrees-with-option",
         lambda t: simulate(t, 'task="generative"', "--task", "classifier"),
         ["--task classifier and run config 'task=generative' disagree"]),
]

# ----------------------------------------------------------------------------- command line
CLI_CASES = [
    Case("cli-unknown-subcommand", lambda t: ["frobnicate"],
         ["argument COMMAND: invalid choice: 'frobnicate'"], code=2, subprocess=True),
    Case("cli-no-subcommand", lambda t: [], ["usage: clinfed", "generate", "validate"], code=2),
    Case("cli-missing-required-argument", lambda t: ["generate"],
         ["the following arguments are required: --out"], code=2),
    Case("cli-validate-without-path", lambda t: ["validate"],
         ["the following arguments are required: path"], code=2),
    Case("cli-generate-zero-hospitals", lambda t: ["generate", "--out", str(t / "g"), "--hospitals", "0"],
         ["argument --hospitals: 0 is outside the allowed range 1-500"], code=2, subprocess=True),
    Case("cli-generate-hospitals-not-a-number", lambda t: ["generate", "--out", str(t / "g"), "--hospitals", "six"],
         ["argument --hospitals: expected a whole number, got 'six'"], code=2),
    Case("cli-generate-sizes-not-numbers", lambda t: ["generate", "--out", str(t / "g"), "--sizes", "200,abc"],
         ["argument --sizes", "'abc' is not one"], code=2, subprocess=True),
    Case("cli-generate-size-zero", lambda t: ["generate", "--out", str(t / "g"), "--sizes", "200,0"],
         ["argument --sizes: every size must be at least 1 encounter"], code=2),
    Case("cli-generate-negative-seed", lambda t: ["generate", "--out", str(t / "g"), "--seed", "-1"],
         ["argument --seed: -1 is outside the allowed range"], code=2),
    Case("cli-generate-into-non-empty-folder",
         lambda t: ["generate", "--out", str(put(t / "g" / "keep.txt", "mine").parent), "--hospitals", "2"],
         ["exists and is not empty (use --force"]),
    Case("cli-generate-out-is-a-file", lambda t: ["generate", "--out", str(put(t / "g.txt", "mine"))],
         ["--out", "g.txt is a file"]),
    Case("cli-report-folder-not-a-run", lambda t: ["report", str((t / "r").mkdir() or t / "r")],
         ["has no metrics.csv: is it a clinfed RUN_DIR?"], subprocess=True),
    Case("cli-report-on-a-file", lambda t: ["report", str(put(t / "r.csv", "x"))], ["r.csv is a file"]),
    Case("cli-report-empty-metrics", lambda t: ["report", str(put(t / "r" / "metrics.csv", "").parent)],
         ["metrics.csv is empty"]),
    Case("cli-report-foreign-metrics",
         lambda t: ["report", str(put(t / "r" / "metrics.csv", "a,b\n1,2\n").parent)],
         ["metrics.csv lacks the column(s) site, regime", "found: a, b"]),
    Case("cli-simulate-folder-with-no-hospitals",
         lambda t: ["simulate", "--data", str((t / "empty").mkdir() or t / "empty"), "--out", str(t / "run")],
         ["--data", "holds no hospital folders", "one sub-folder per hospital"]),
    Case("cli-simulate-hospital-folder-instead-of-federation",
         lambda t: ["simulate", "--data", str(federation(t) / "h01"), "--out", str(t / "run")],
         ["holds encounters.csv directly", "give the folder above it"]),
    Case("cli-simulate-data-does-not-exist",
         lambda t: ["simulate", "--data", str(t / "nowhere"), "--out", str(t / "run")],
         ["--data", "nowhere does not exist"]),
    Case("cli-simulate-data-is-a-file",
         lambda t: ["simulate", "--data", str(federation(t) / "h01" / "encounters.csv"), "--out", str(t / "run")],
         ["--data", "encounters.csv is a file"]),
    Case("cli-simulate-one-hospital",
         lambda t: (federation(t, 2), __import__("shutil").rmtree(t / "fed" / "h02"),
                    ["simulate", "--data", str(t / "fed"), "--out", str(t / "run")])[2],
         ["holds 1 hospital folder(s); a federation needs at least 2"]),
    Case("cli-simulate-invalid-hospital-data",
         lambda t: (federation(t), put(t / "fed" / "h02" / "encounters.csv", csv_text(ROWS + ["a4,n,7,2022-01-04"])),
                    ["simulate", "--data", str(t / "fed"), "--out", str(t / "run")])[2],
         ["h02/encounters.csv, line 5, column 'readmitted_30d'", "is not valid (see above); nothing was run"]),
    Case("cli-simulate-one-hospital-to-generate",
         lambda t: ["simulate", "--hospitals", "1", "--out", str(t / "run")],
         ["argument --hospitals: 1 is outside the allowed range 2-500"], code=2),
    Case("cli-simulate-zero-cpus", lambda t: simulate(t, "", "--cpus-per-site", "0"),
         ["argument --cpus-per-site: must be a number above 0"], code=2),
    Case("cli-simulate-unknown-task", lambda t: simulate(t, "", "--task", "poetry"),
         ["argument --task: invalid choice: 'poetry'"], code=2),
]

CASES = DATA_CASES + CONFIG_CASES + CLI_CASES


def check(case: Case, code, text: str) -> None:
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}\n{text}"
    assert "Traceback" not in text, f"{case.id}: a traceback reached the user\n{text}"
    assert "internal error" not in text, f"{case.id}: only the catch-all answered\n{text}"
    for want in case.expect:
        assert want in text, f"{case.id}: {want!r} missing from\n{text}"
    for unwanted in case.absent:
        assert unwanted not in text, f"{case.id}: {unwanted!r} should not be reported\n{text}"


@pytest.fixture
def no_study(monkeypatch):
    """Any case that reaches the study (Flower, model loading) fails loudly: errors must come first."""

    def started(*a, **k):
        raise FlowerStarted("a malformed input got as far as starting the study")

    import clinfed.simulations.generate
    import clinfed.simulations.local

    monkeypatch.setattr(clinfed.simulations.local, "simulate", started)
    monkeypatch.setattr(clinfed.simulations.generate, "generate_federation", started)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_at_least_30_distinct_malformed_inputs():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sum(c.code != 0 for c in CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_malformed_input_in_process(case, tmp_path, capsys, no_study):
    args = case.make(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    check(case, code, out.out + out.err)
    if args and args[0] == "simulate":  # refused before anything was written
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.subprocess], ids=lambda c: c.id)
def test_malformed_input_in_a_real_process(case, tmp_path):
    """What the terminal shows: stderr carries the paragraph, nothing carries a traceback."""
    args = case.make(tmp_path)
    res = subprocess.run([sys.executable, "-m", "clinfed.cli", *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    check(case, res.returncode, res.stdout + res.stderr)
    if case.code != 0 and args[0] != "validate":  # validate prints its report on stdout
        assert res.stderr.strip(), case.id
        assert "error" in res.stderr


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    """CLINFED_DEBUG=1 is the documented way to get the traceback back."""
    from clinfed.common.config import ConfigError

    monkeypatch.setenv("CLINFED_DEBUG", "1")
    with pytest.raises(ConfigError, match="local-steps"):
        main(simulate(tmp_path, "local-steps=0"))


def test_unexpected_errors_are_one_paragraph_and_name_the_command(tmp_path, monkeypatch, capsys):
    """The last-resort handler: a bug still ends in one paragraph and leaves written files alone."""
    import clinfed.common.data

    def boom(path):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(clinfed.common.data, "validate_path", boom)
    kept = put(tmp_path / "h01" / "encounters.csv", csv_text())
    assert main(["validate", str(kept)]) == 1
    err = capsys.readouterr().err
    assert "internal error in 'clinfed validate': RuntimeError: simulated bug" in err
    assert "CLINFED_DEBUG=1" in err and "Traceback" not in err
    assert kept.read_text() == csv_text()


def test_single_class_test_set_auc_is_not_computable_in_metrics_csv(tmp_path):
    """A test set with one class is never released (fewer than k negatives): withheld, no number,
    no n. Scored anyway (as disclosure control never does), its AUC is written as not computable
    with the reason, never a number."""
    from clinfed.common.metrics import METRIC_COLUMNS, cell_metrics, cell_rows, flatten_cell, score_cell

    y = np.ones(40, dtype=int)
    withheld = cell_rows("h01", flatten_cell("global", "test", "all", cell_metrics(y, np.linspace(0, 1, 40),
                                                                                   threshold=0.5, k=10, seed=0)))
    assert all(r["value"] is None and r["n"] is None and r["status"] == "suppressed" for r in withheld)
    cell = score_cell(y, np.linspace(0, 1, 40), threshold=0.5, seed=0, n_boot=50)
    assert cell.status == "not_computable" and "auc" not in cell.values
    rows = cell_rows("h01", flatten_cell("global", "test", "all", cell))
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(path, index=False)
    df = pd.read_csv(path, keep_default_na=False)
    for metric in ("auc", "auc_lo", "auc_hi", "pr_auc"):
        row = df[df["metric"] == metric].iloc[0]
        assert row["value"] == "" and row["status"] == "not_computable", metric
        assert "only one class" in row["note"] and "undefined" in row["note"]
    assert float(df[df["metric"] == "positives"].iloc[0]["value"]) == 40
    assert int(df[df["metric"] == "auc"].iloc[0]["n"]) == 40


def test_single_class_all_negative_cell_is_withheld_not_scored():
    """No positives at all is below k positives: suppressed (no number, no n), never an AUC of 0.5."""
    from clinfed.common.metrics import cell_metrics, cell_rows, flatten_cell

    cell = cell_metrics(np.zeros(50, dtype=int), np.linspace(0, 1, 50), threshold=0.5, k=1, seed=0)
    assert cell.status == "suppressed"
    rows = cell_rows("h01", flatten_cell("global", "test", "all", cell))
    assert all(r["value"] is None and r["status"] == "suppressed" for r in rows)


def test_validate_runtime_stays_small(tmp_path):
    """A 20,000-row file is checked in seconds: the validator must not make big sites impractical."""
    rows = [f"e{i},note number {i},{i % 2},2022-01-{1 + i % 28:02d}" for i in range(20_000)]
    path = put(tmp_path / "h01" / "encounters.csv", csv_text(rows))
    t0 = time.perf_counter()
    assert main(["validate", str(path)]) == 0
    assert time.perf_counter() - t0 < 10
