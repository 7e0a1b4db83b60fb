"""The hospital data contract: finding, reading and validating one table per site, and splitting it.

A hospital hands clinfed one table (CSV, Parquet or JSONL) with one row per discharge. The
people who prepare that file are usually not the people who run the study, so every problem
is reported the way they would look for it (file, line or row, column, what was expected and
what was found), and all problems are reported at once instead of one per attempt.

Required columns: ``encounter_id``, ``note_text``, ``readmitted_30d`` (0/1), ``discharge_date``.
Optional columns: ``age``, ``sex``, ``insurance``, ``n_comorbidities``, ``region``, ``died``;
an empty optional value means "unknown". Any other column is dropped with a warning, because
extra columns are where identifiers (MRN, names) tend to hide and clinfed never needs them.

Everything is read as text first so identifiers such as ``007`` survive, then converted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from clinfed.common.errors import ClinfedError

__all__ = [
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "CONTRACT_COLUMNS",
    "INSURANCE_VALUES",
    "SEX_VALUES",
    "TABLE_SUFFIXES",
    "MAX_LISTED_PROBLEMS",
    "MAX_NOTE_CHARS",
    "Problem",
    "DataValidationError",
    "DataContractWarning",
    "SiteReport",
    "ValidationReport",
    "find_table",
    "read_site_table",
    "validate_path",
    "list_sites",
    "split_site",
    "stable_uniform",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("encounter_id", "note_text", "readmitted_30d", "discharge_date")
OPTIONAL_COLUMNS: tuple[str, ...] = ("age", "sex", "insurance", "n_comorbidities", "region", "died")
CONTRACT_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
INSURANCE_VALUES: tuple[str, ...] = ("commercial", "government", "self_pay", "unspecified", "other")
SEX_VALUES: tuple[str, ...] = ("F", "M", "other", "unknown")
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".jsonl")
MAX_LISTED_PROBLEMS = 50
# A discharge note runs to a few thousand characters (MIMIC-IV's longest are ~60,000); a cell far
# beyond that is almost always several records merged by a broken export, or a whole document.
# Only the first `max-length` tokens are ever used, so refusing it loses nothing real.
MAX_NOTE_CHARS = 100_000
# Formats people export by mistake, with what to do instead.
_WRONG_FORMAT_HINTS = {
    ".xlsx": "a spreadsheet is not read: export it as CSV (UTF-8)",
    ".xls": "a spreadsheet is not read: export it as CSV (UTF-8)",
    ".ods": "a spreadsheet is not read: export it as CSV (UTF-8)",
    ".tsv": "export it comma-separated, as .csv",
    ".txt": "export it comma-separated, as .csv",
    ".json": "write one JSON object per line, as .jsonl",
}

# Spellings that exports (pandas, R, SQL dumps) use for "no value". Optional columns treat them
# as missing; required columns report them, because a label or id of "nan" is an export bug.
_MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "<na>", "nat"})
_AGE_RANGE = (0.0, 120.0)
_DATE_YEARS = (1900, 2100)  # outside this a date is a typo, and datetime64[ns] cannot hold it anyway


# --------------------------------------------------------------------------------------------
# Problems and errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding, located the way the data owner would look for it.

    ``row`` is what a human sees: the physical line in a CSV (header = line 1) or JSONL file,
    the 1-based row index in a Parquet file; ``None`` for file-level findings.
    """

    file: str
    row: int | None
    column: str | None
    message: str
    unit: str = "line"  # "line" for CSV/JSONL, "row" for Parquet

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"{self.unit} {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.message}"


class DataValidationError(ClinfedError, ValueError):
    """A table (or path) does not meet the contract; ``.problems`` lists every finding."""

    def __init__(self, problems: list[Problem] | Problem, summary: str | None = None):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(_format_problems(self.problems, summary))


class DataContractWarning(UserWarning):
    """Something in the data is usable but worth a human look (extra columns, few positives...)."""


def _format_problems(problems: list[Problem], summary: str | None) -> str:
    n = len(problems)
    if summary is None:
        files = sorted({p.file for p in problems})
        target = files[0] if len(files) == 1 else f"{len(files)} files"
        summary = f"Data check failed for {target} ({n} problem{'s' if n != 1 else ''}):"
    paragraphs = [summary] + [str(p) for p in problems[:MAX_LISTED_PROBLEMS]]
    if n > MAX_LISTED_PROBLEMS:
        more = n - MAX_LISTED_PROBLEMS
        by_col: dict[str, int] = {}
        for p in problems[MAX_LISTED_PROBLEMS:]:
            key = p.column or "(file)"
            by_col[key] = by_col.get(key, 0) + 1
        detail = ", ".join(f"{k}: {v}" for k, v in by_col.items())
        paragraphs.append(f"... and {more} more problem{'s' if more != 1 else ''} not listed ({detail}).")
    return "\n\n".join(paragraphs)


def _show(value: str, limit: int = 40) -> str:
    """Quote a found value for a message, shortened so a whole note never floods the output."""
    value = str(value)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return repr(value)


def _display_name(path: Path) -> str:
    """``h03/encounters.csv``: the hospital folder is what tells a reader which site is meant."""
    path = Path(path)
    parent = path.resolve().parent.name
    return f"{parent}/{path.name}" if parent else path.name


# --------------------------------------------------------------------------------------------
# Finding tables
# --------------------------------------------------------------------------------------------


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name.startswith("~$")


def _table_candidates(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if not _is_hidden(p) and p.suffix.lower() in TABLE_SUFFIXES
    )


def find_table(path: str | Path) -> Path:
    """Resolve a table file, or a hospital folder holding exactly one table, to the table's path.

    Raises DataValidationError with a file-level problem saying what was found instead, so a
    misplaced or duplicated export is obvious rather than silently picked.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            near = [p.name for p in _table_candidates(path.parent)]
            if near:
                hint = f"; tables next to it: {', '.join(near)}"
        raise DataValidationError(Problem(name, None, None, f"path does not exist{hint}"))
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            hint = _WRONG_FORMAT_HINTS.get(path.suffix.lower())
            raise DataValidationError(
                Problem(
                    _display_name(path),
                    None,
                    None,
                    f"unsupported file type {path.suffix or '(no extension)'!r}; "
                    f"a hospital table must be one of {', '.join(TABLE_SUFFIXES)}"
                    + (f" ({hint})" if hint else ""),
                )
            )
        return path
    if not path.is_dir():
        raise DataValidationError(Problem(name, None, None, "not a regular file or folder"))
    if path.suffix.lower() in TABLE_SUFFIXES:  # named like a table: the user meant a file
        raise DataValidationError(
            Problem(_display_name(path), None, None, "is a directory, but a table file is needed here")
        )

    candidates = _table_candidates(path)
    folders = [p for p in candidates if p.is_dir()]
    if folders:
        raise DataValidationError(
            Problem(
                f"{path.name}/{folders[0].name}",
                None,
                None,
                "is a directory, but a table file is needed here",
            )
        )
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise DataValidationError(
            Problem(
                name,
                None,
                None,
                "the hospital folder holds several tables ("
                + ", ".join(p.name for p in candidates)
                + "); keep exactly one so it is unambiguous which data is used",
            )
        )
    subsites = [p.name for p in sorted(path.iterdir()) if p.is_dir() and not _is_hidden(p) and _table_candidates(p)]
    if subsites:
        msg = (
            "no table file here, but sub-folders with tables ("
            + ", ".join(subsites[:10])
            + (", ..." if len(subsites) > 10 else "")
            + "): this looks like a federation folder; give one hospital folder instead"
        )
    else:
        others = [p.name for p in sorted(path.iterdir()) if not _is_hidden(p)]
        found = f"found: {', '.join(others[:10])}" if others else "the folder is empty"
        msg = f"no table file ({', '.join('*' + s for s in TABLE_SUFFIXES)}) in the hospital folder; {found}"
        hints = sorted({_WRONG_FORMAT_HINTS[s] for s in (Path(o).suffix.lower() for o in others)
                        if s in _WRONG_FORMAT_HINTS})
        if hints:
            msg += f" ({'; '.join(hints)})"
    raise DataValidationError(Problem(name, None, None, msg))


def list_sites(federation_dir: str | Path) -> list[tuple[str, Path]]:
    """Sorted ``(site_name, hospital_folder)`` for every sub-folder that holds a table file.

    The site name is the folder name, so renaming a folder renames the site everywhere.
    """
    root = Path(federation_dir)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataValidationError(Problem(str(root), None, None, f"federation folder {what}"))
    return [
        (p.name, p)
        for p in sorted(root.iterdir(), key=lambda q: q.name)
        if p.is_dir() and not _is_hidden(p) and _table_candidates(p)
    ]


# --------------------------------------------------------------------------------------------
# Raw reading: every format becomes columns of strings plus the human row number of each record
# --------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    file: str
    unit: str
    columns: list[str] = field(default_factory=list)
    values: dict[str, list[str]] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    fatal: bool = False  # structure broken: value checks would only add noise

    def fail(self, message: str, row: int | None = None, column: str | None = None) -> None:
        self.problems.append(Problem(self.file, row, column, message, self.unit))

    def warn(self, message: str, row: int | None = None, column: str | None = None) -> None:
        self.warnings.append(Problem(self.file, row, column, message, self.unit))


def _decode_text(raw: _Raw, data: bytes) -> str | None:
    """Decode UTF-8 (BOM allowed), naming every line that is not, instead of a codec traceback."""
    if data[:4] == b"PAR1":
        raw.fail("this is a Parquet file with a text extension; rename it to .parquet")
        return None
    if b"\x00" in data[:65536]:
        raw.fail("does not look like a text table (it contains binary data); expected UTF-8 text")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for i, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = line[e.start : e.start + 1].hex()
            raw.fail(
                f"text is not valid UTF-8 (byte 0x{bad} at character {e.start + 1} of the line); "
                "re-save the file with UTF-8 encoding",
                row=i,
            )
    if not raw.problems:  # a multi-byte sequence split across lines; should not happen
        raw.fail("text is not valid UTF-8; re-save the file with UTF-8 encoding")
    return None


def _read_csv(raw: _Raw, data: bytes) -> None:
    text = _decode_text(raw, data)
    if text is None:
        raw.fatal = True
        return
    csv.field_size_limit(max(csv.field_size_limit(), 2**30))  # clinical notes can be long
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[list[str]] = []
    start = 1
    try:
        for rec in reader:
            this_start, start = start, reader.line_num + 1
            if not rec or (len(rec) == 1 and rec[0].strip() == ""):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in rec]
                header_line = this_start
                continue
            if len(rec) != len(header):
                raw.fail(
                    f"has {len(rec)} fields but the header has {len(header)}; a field containing "
                    "commas, quotes or line breaks must be enclosed in double quotes",
                    row=this_start,
                )
                continue
            records.append(rec)
            raw.rows.append(this_start)
    except csv.Error as e:
        raw.fail(
            f"cannot be parsed as CSV ({e}); check for an unmatched double quote in the record "
            "starting on this line",
            row=start,
        )
        raw.fatal = True
    if header is None:
        raw.fail("file has no header row (it is empty or blank)")
        raw.fatal = True
        return
    if len(header) == 1 and any(sep in header[0] for sep in (";", "\t", "|")):
        sep = next(s for s in (";", "\t", "|") if s in header[0])
        raw.fail(
            f"the header looks {('tab' if sep == chr(9) else repr(sep))}-separated; "
            "clinfed reads comma-separated CSV",
            row=header_line,
        )
        raw.fatal = True
        return  # no columns: "missing every required column" would only repeat this
    raw.columns = header
    for j, col in enumerate(header):
        raw.values.setdefault(col, [r[j] for r in records])


def _read_jsonl(raw: _Raw, data: bytes) -> None:
    text = _decode_text(raw, data)
    if text is None:
        raw.fatal = True
        return
    records: list[dict] = []
    bad_lines = 0
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad_lines += 1
            raw.fail(f"not valid JSON ({e.msg} at character {e.colno}); each line must be one JSON object", row=i)
            continue
        if not isinstance(obj, dict):
            bad_lines += 1
            raw.fail(f"expected a JSON object per line, got {type(obj).__name__}", row=i)
            continue
        records.append(obj)
        raw.rows.append(i)
    if bad_lines and not records:
        raw.fatal = True
    cols: dict[str, None] = {}
    for obj in records:
        for k in obj:
            cols.setdefault(str(k).strip(), None)
    raw.columns = list(cols)
    for col in raw.columns:
        out = []
        for obj, row in zip(records, raw.rows):
            v = obj.get(col)
            if isinstance(v, (dict, list)):
                raw.fail(f"expected a single value, got a JSON {type(v).__name__}", row=row, column=col)
                out.append("")
            else:
                out.append(_to_text(v))
        raw.values[col] = out


def _to_text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return repr(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def _read_parquet(raw: _Raw, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raw.fail(f"not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        raw.fatal = True
        return
    raw.columns = [str(c).strip() for c in table.column_names]
    raw.rows = list(range(1, table.num_rows + 1))
    for name, col in zip(raw.columns, table.columns):
        if pa.types.is_nested(col.type):
            raw.fail(f"column has nested values ({col.type}); expected plain values", column=name)
            raw.values.setdefault(name, [""] * table.num_rows)
            continue
        raw.values.setdefault(name, [_to_text(v) for v in col.to_pylist()])


def _read_raw(path: Path) -> _Raw:
    suffix = path.suffix.lower()
    raw = _Raw(file=_display_name(path), unit="row" if suffix == ".parquet" else "line")
    try:
        size = path.stat().st_size
    except OSError as e:
        raw.fail(f"cannot be read ({e.strerror or e})")
        raw.fatal = True
        return raw
    if size == 0:
        raw.fail("file is empty (0 bytes)")
        raw.fatal = True
        return raw
    if suffix == ".parquet":
        _read_parquet(raw, path)
        return raw
    try:
        data = path.read_bytes()
    except OSError as e:
        raw.fail(f"cannot be read ({e.strerror or e})")
        raw.fatal = True
        return raw
    if not data.strip():
        raw.fail("file is empty (only blank space)")
        raw.fatal = True
        return raw
    (_read_csv if suffix == ".csv" else _read_jsonl)(raw, data)
    return raw


# --------------------------------------------------------------------------------------------
# Validation and conversion
# --------------------------------------------------------------------------------------------


def _as_binary(s: str) -> int | None:
    """0/1, also written 0.0/1.0 by exports of float columns; anything else is not a label."""
    t = s.strip()
    if t in ("0", "1"):
        return int(t)
    try:
        f = float(t)
    except ValueError:
        return None
    return int(f) if f in (0.0, 1.0) else None


def _check_columns(raw: _Raw) -> None:
    seen: dict[str, int] = {}
    for c in raw.columns:
        seen[c] = seen.get(c, 0) + 1
    for c, k in seen.items():
        if k > 1 and c:
            raw.fail(f"column '{c}' appears {k} times in the header; each column must appear once")
    if "" in seen:
        raw.warn("a column has no name in the header; it is ignored")
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        lower = {c.lower(): c for c in raw.columns}
        hints = [f"'{lower[m]}' for '{m}'" for m in missing if m in lower]
        found = ", ".join(f"'{c}'" for c in raw.columns if c) or "(none)"
        msg = (
            f"missing required column{'s' if len(missing) > 1 else ''} "
            + ", ".join(f"'{m}'" for m in missing)
            + f"; columns found: {found}"
        )
        if hints:
            msg += f" (column names are case-sensitive: found {', '.join(hints)})"
        raw.fail(msg)
    extra = [c for c in raw.columns if c and c not in CONTRACT_COLUMNS]
    if extra:
        raw.warn(
            "extra column"
            + ("s " if len(extra) > 1 else " ")
            + ", ".join(f"'{c}'" for c in extra)
            + " not in the contract: dropped and never used (if they hold identifiers, remove them "
            "from the export)"
        )


def _validate(raw: _Raw) -> pd.DataFrame | None:
    """Check every contract column present and build the typed frame (None if anything failed)."""
    if raw.fatal and not raw.columns:
        return None  # unreadable: "missing every required column" would only repeat the cause
    _check_columns(raw)
    n = len(raw.rows)
    if n == 0 and not raw.fatal:
        raw.fail("the table has no data rows (only a header, or nothing)")
    if raw.fatal or n == 0:
        return None

    rows = raw.rows
    out: dict[str, object] = {}
    present = [c for c in CONTRACT_COLUMNS if c in raw.values]

    def bad(i: int, col: str, msg: str) -> None:
        raw.problems.append(Problem(raw.file, rows[i], col, msg, raw.unit))

    # encounter_id: the key every split, metric and audit refers to.
    if "encounter_id" in present:
        ids = [v.strip() for v in raw.values["encounter_id"]]
        first: dict[str, int] = {}
        for i, v in enumerate(ids):
            if v.lower() in _MISSING_TOKENS:
                bad(i, "encounter_id", "encounter_id is empty" if not v else f"encounter_id is missing (got {_show(v)})")
                continue
            if v in first:
                bad(i, "encounter_id", f"duplicate encounter_id {_show(v)}, also on {raw.unit} {rows[first[v]]}")
            else:
                first[v] = i
        out["encounter_id"] = ids

    if "note_text" in present:
        notes = raw.values["note_text"]
        for i, v in enumerate(notes):
            t = v.strip()
            if not t:
                bad(i, "note_text", "note is empty" if not v else "note is only whitespace")
            elif t.lower() in _MISSING_TOKENS:
                bad(i, "note_text", f"note is missing (got {_show(t)})")
            elif len(v) > MAX_NOTE_CHARS:
                bad(
                    i,
                    "note_text",
                    f"note is {len(v):,} characters long, over the limit of {MAX_NOTE_CHARS:,}: usually "
                    "several records merged by a broken export (an unclosed quote) or a whole document",
                )
        out["note_text"] = notes

    for col, required in (("readmitted_30d", True), ("died", False)):
        if col not in present:
            continue
        vals = np.full(n, np.nan)
        for i, v in enumerate(raw.values[col]):
            t = v.strip()
            if not required and t.lower() in _MISSING_TOKENS:
                continue
            b = _as_binary(t)
            if b is None:
                got = "an empty value" if not t else _show(t)
                bad(i, col, f"expected 0 or 1, got {got}")
            else:
                vals[i] = b
        out[col] = vals
    labels = out.get("readmitted_30d")
    if labels is not None and not np.isnan(labels).any() and len(np.unique(labels)) == 1:
        # A file-level finding, not a row's: no single line is wrong, the site as a whole is.
        raw.fail(
            f"every label is {int(labels[0])} ({n} encounter{'s' if n != 1 else ''}): a site needs "
            "both readmitted (1) and not-readmitted (0) encounters to train and score a classifier "
            "(AUC is undefined with one class)",
            column="readmitted_30d",
        )

    if "discharge_date" in present:
        out["discharge_date"] = _parse_dates(raw, raw.values["discharge_date"], bad)

    if "age" in present:
        ages = np.full(n, np.nan)
        lo, hi = _AGE_RANGE
        for i, v in enumerate(raw.values["age"]):
            t = v.strip()
            if t.lower() in _MISSING_TOKENS:
                continue
            try:
                a = float(t)
            except ValueError:
                bad(i, "age", f"expected a number of years (0-120) or empty, got {_show(t)}")
                continue
            if not (lo <= a <= hi):
                bad(i, "age", f"age {_show(t)} is outside 0-120")
            else:
                ages[i] = a
        out["age"] = ages

    if "n_comorbidities" in present:
        k = np.full(n, np.nan)
        for i, v in enumerate(raw.values["n_comorbidities"]):
            t = v.strip()
            if t.lower() in _MISSING_TOKENS:
                continue
            try:
                f = float(t)
            except ValueError:
                f = float("nan")
            if not (math.isfinite(f) and f >= 0 and f == int(f)):
                bad(i, "n_comorbidities", f"expected a whole number >= 0 or empty, got {_show(t)}")
            else:
                k[i] = f
        out["n_comorbidities"] = k

    for col, allowed in (("sex", SEX_VALUES), ("insurance", INSURANCE_VALUES)):
        if col not in present:
            continue
        canon = {a.lower(): a for a in allowed}
        vals_s: list[str | None] = []
        for i, v in enumerate(raw.values[col]):
            t = v.strip()
            if t.lower() in _MISSING_TOKENS:
                vals_s.append(None)
            elif t.lower() in canon:
                vals_s.append(canon[t.lower()])
            else:
                vals_s.append(None)
                bad(i, col, f"expected one of {', '.join(allowed)} (or empty), got {_show(t)}")
        out[col] = vals_s

    if "region" in present:
        out["region"] = [None if v.strip().lower() in _MISSING_TOKENS else v.strip() for v in raw.values["region"]]

    if raw.problems:
        order = {c: j for j, c in enumerate(CONTRACT_COLUMNS)}
        raw.problems.sort(key=lambda p: (p.row is not None, p.row or 0, order.get(p.column or "", -1)))
        return None

    df = pd.DataFrame({c: out[c] for c in CONTRACT_COLUMNS if c in out})
    # Text columns keep pandas' inferred text dtype ("str" in pandas 3, object in pandas 2); no
    # astype("str"), which in pandas 2 would turn a missing value into the string "None".
    df["readmitted_30d"] = df["readmitted_30d"].astype("int64")
    for c in ("age", "n_comorbidities", "died"):
        if c in df:
            df[c] = df[c].astype("float64")
    _add_soft_warnings(raw, df)
    return df.reset_index(drop=True)


def _parse_dates(raw: _Raw, values: list[str], bad) -> np.ndarray:
    s = pd.Series([v.strip() for v in values], dtype=object)
    parsed = pd.to_datetime(s, format="ISO8601", errors="coerce", utc=True)
    non_iso: list[int] = []
    for i in np.flatnonzero(parsed.isna().to_numpy()):
        t = s.iat[i]
        if t.lower() in _MISSING_TOKENS:
            bad(i, "discharge_date", "discharge_date is empty" if not t else f"discharge_date is missing (got {_show(t)})")
            continue
        try:
            if not any(ch.isdigit() for ch in t):  # pandas reads 'today'/'now' as dates
                raise ValueError(t)
            ts = pd.Timestamp(t)
            parsed.iat[i] = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
            non_iso.append(i)
        except (ValueError, TypeError, OverflowError):
            bad(i, "discharge_date", f"cannot read {_show(t)} as a date; use YYYY-MM-DD")
    years = parsed.dt.year
    lo, hi = _DATE_YEARS
    for i in np.flatnonzero(((years < lo) | (years > hi)).to_numpy()):
        bad(i, "discharge_date", f"date {_show(s.iat[i])} is implausible (year outside {lo}-{hi})")
        parsed.iat[i] = pd.NaT
    if non_iso:
        ex = s.iat[non_iso[0]]
        raw.warn(
            f"{len(non_iso)} date(s) not in ISO format (e.g. {_show(ex)} on {raw.unit} {raw.rows[non_iso[0]]}) "
            "were read month-first; use YYYY-MM-DD to avoid day/month ambiguity",
            column="discharge_date",
        )
    return parsed.dt.tz_localize(None).astype("datetime64[ns]").to_numpy()


def _add_soft_warnings(raw: _Raw, df: pd.DataFrame) -> None:
    pos = int(df["readmitted_30d"].sum())
    if 0 < pos < len(df) and min(pos, len(df) - pos) < 10:  # one class only is an error (_validate)
        m = min(pos, len(df) - pos)
        raw.warn(
            f"only {m} encounter{'s' if m != 1 else ''} in the rarer class: per-site metrics will be unreliable",
            column="readmitted_30d",
        )


@dataclass
class _Loaded:
    table: Path | None
    frame: pd.DataFrame | None
    problems: list[Problem]
    warnings: list[Problem]
    columns: list[str]


def _load(path: str | Path) -> _Loaded:
    try:
        table = find_table(path)
    except DataValidationError as e:
        return _Loaded(None, None, e.problems, [], [])
    raw = _read_raw(table)
    frame = _validate(raw)
    return _Loaded(table, frame, raw.problems, raw.warnings, raw.columns)


def read_site_table(path: str | Path, *, warn: bool = True) -> pd.DataFrame:
    """Find, read and validate one hospital table; return it with normalized dtypes.

    Raises DataValidationError listing every problem found. Warnings (extra columns, non-ISO
    dates, very few positives) are issued as DataContractWarning unless ``warn=False``.
    Columns: the required ones plus the optional ones present, in contract order; text columns
    use pandas' text dtype (missing optional values are NaN under pandas 3, None under pandas 2:
    test with ``isna()``), age/n_comorbidities/died are float64 with NaN for missing.
    """
    loaded = _load(path)
    if loaded.problems or loaded.frame is None:
        raise DataValidationError(loaded.problems or [Problem(str(path), None, None, "could not be read")])
    if warn:
        for w in loaded.warnings:
            warnings.warn(str(w), DataContractWarning, stacklevel=2)
    return loaded.frame


# --------------------------------------------------------------------------------------------
# validate_path: the `clinfed validate` backend
# --------------------------------------------------------------------------------------------


@dataclass
class SiteReport:
    """What `clinfed validate` knows about one hospital table."""

    name: str
    path: Path | None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    n_rows: int = 0
    n_positive: int = 0
    date_min: pd.Timestamp | None = None
    date_max: pd.Timestamp | None = None
    columns: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if not self.ok:
            n = len(self.problems)
            return f"{self.name}: FAILED ({n} problem{'s' if n != 1 else ''})"
        rate = self.n_positive / self.n_rows if self.n_rows else 0.0
        dates = f"{self.date_min:%Y-%m-%d} to {self.date_max:%Y-%m-%d}" if self.date_min is not None else "n/a"
        return (
            f"{self.name}: OK, {self.n_rows} rows, {self.n_positive} readmitted ({rate:.1%}), "
            f"discharges {dates}, columns: {', '.join(self.columns)}"
        )


@dataclass
class ValidationReport:
    """Outcome of validating a file, a hospital folder or a federation folder."""

    path: Path
    kind: str  # "file", "hospital", "federation" or "unknown"
    sites: list[SiteReport] = field(default_factory=list)
    extra_problems: list[Problem] = field(default_factory=list)
    extra_warnings: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return self.extra_problems + [p for s in self.sites for p in s.problems]

    @property
    def warnings(self) -> list[Problem]:
        return self.extra_warnings + [w for s in self.sites for w in s.warnings]

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.sites)

    def summary(self) -> str:
        """Plain-text report for a terminal: one line per hospital, then problems and warnings."""
        n_ok = sum(s.ok for s in self.sites)
        head = f"{self.kind} {self.path}: "
        if self.kind == "federation":
            head += f"{len(self.sites)} hospital(s), {n_ok} OK, {len(self.sites) - n_ok} with problems"
        else:
            head += "OK" if self.ok else "FAILED"
        lines = [head]
        lines += ["  " + s.line() for s in self.sites]
        probs = self.problems
        if probs:
            lines.append("")
            lines.append(f"Problems ({len(probs)}):")
            lines += [f"  - {p}" for p in probs[:MAX_LISTED_PROBLEMS]]
            if len(probs) > MAX_LISTED_PROBLEMS:
                lines.append(f"  ... and {len(probs) - MAX_LISTED_PROBLEMS} more not listed")
        warns = self.warnings
        if warns:
            lines.append("")
            lines.append(f"Warnings ({len(warns)}):")
            lines += [f"  - {w}" for w in warns]
        lines.append("")
        lines.append("Result: " + ("all data meets the contract" if self.ok else "the data does NOT meet the contract"))
        return "\n".join(lines)


def _site_report(name: str, path: Path) -> SiteReport:
    try:
        loaded = _load(path)
    except Exception as e:  # never a traceback from `clinfed validate`
        return SiteReport(name, None, [Problem(str(path), None, None, f"unexpected error while reading: {type(e).__name__}: {e}")])
    rep = SiteReport(name, loaded.table, loaded.problems, loaded.warnings)
    rep.columns = [c for c in CONTRACT_COLUMNS if c in loaded.columns]
    df = loaded.frame
    if df is not None:
        rep.n_rows = len(df)
        rep.n_positive = int(df["readmitted_30d"].sum())
        rep.date_min = df["discharge_date"].min()
        rep.date_max = df["discharge_date"].max()
    return rep


def validate_path(path: str | Path) -> ValidationReport:
    """Validate a table file, a hospital folder or a federation folder; report, never raise.

    A folder holding table files directly is a hospital; otherwise its sub-folders with tables
    are hospitals of a federation. Sub-folders without a table are reported as warnings.
    """
    path = Path(path)
    try:
        if path.is_dir() and not _table_candidates(path):
            subdirs = [p for p in sorted(path.iterdir(), key=lambda q: q.name) if p.is_dir() and not _is_hidden(p)]
            sites = [(p.name, p) for p in subdirs if _table_candidates(p)]
            if sites:
                rep = ValidationReport(path, "federation")
                for p in subdirs:
                    if not _table_candidates(p):
                        rep.extra_warnings.append(
                            Problem(f"{path.name}/{p.name}", None, None, "sub-folder has no table file; skipped")
                        )
                rep.sites = [_site_report(n, p) for n, p in sites]
                _federation_warnings(rep)
                return rep
            rep = ValidationReport(path, "unknown")
            try:
                find_table(path)
            except DataValidationError as e:
                rep.extra_problems = e.problems
            return rep
        kind = "hospital" if path.is_dir() else ("file" if path.exists() else "unknown")
        rep = ValidationReport(path, kind)
        name = path.name if path.is_dir() else (path.resolve().parent.name or path.stem)
        rep.sites = [_site_report(name, path)]
        if kind == "unknown":
            rep.extra_problems, rep.sites = rep.sites[0].problems, []
        return rep
    except Exception as e:  # filesystem oddities (permissions, races): report, do not crash
        return ValidationReport(
            path, "unknown", extra_problems=[Problem(str(path), None, None, f"cannot be validated: {type(e).__name__}: {e}")]
        )


def _federation_warnings(rep: ValidationReport) -> None:
    good = [s for s in rep.sites if s.ok]
    if not good:
        return
    union = [c for c in OPTIONAL_COLUMNS if any(c in s.columns for s in good)]
    for s in good:
        lacking = [c for c in union if c not in s.columns]
        if lacking:
            rep.extra_warnings.append(
                Problem(
                    s.name,
                    None,
                    None,
                    f"lacks optional column(s) {', '.join(lacking)} that other hospitals provide; "
                    "subgroup results by them will exclude this site",
                )
            )


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def stable_uniform(seed: int, keys) -> np.ndarray:
    """Uniform [0, 1) per key from sha256(seed, key): independent of row order and of other rows."""
    out = np.empty(len(keys), dtype=np.float64)
    prefix = f"{int(seed)}\x1f".encode()
    for i, k in enumerate(keys):
        h = hashlib.sha256(prefix + str(k).encode("utf-8")).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64
    return out


def split_site(
    df: pd.DataFrame,
    seed: int,
    temporal_frac: float = 0.2,
    test_frac: float = 0.25,
    val_frac: float = 0.10,
) -> dict[str, pd.DataFrame]:
    """Split one site into ``train``, ``val``, ``test`` and ``temporal`` (most recent encounters).

    ``temporal`` is the latest ``temporal_frac`` by (discharge_date, encounter_id), mirroring the
    study's temporal test. The remaining rows go to test/val/train by a hash of
    (seed, encounter_id), so a row keeps its split when rows are added or the file is reordered.
    ``test_frac`` and ``val_frac`` are fractions of the non-temporal rows. Rows keep their
    original order within each split; indexes are reset.
    """
    for name, v in (("temporal_frac", temporal_frac), ("test_frac", test_frac), ("val_frac", val_frac)):
        if not (0.0 <= v < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if test_frac + val_frac > 1.0:
        raise ValueError(f"test_frac + val_frac must be <= 1, got {test_frac + val_frac}")
    missing = [c for c in ("encounter_id", "discharge_date") if c not in df.columns]
    if missing:
        raise ValueError(f"split_site needs column(s) {', '.join(missing)}")

    n = len(df)
    ids = df["encounter_id"].astype(str).to_numpy()
    dates = pd.to_datetime(df["discharge_date"]).to_numpy()
    n_temporal = int(math.floor(n * temporal_frac + 0.5)) if temporal_frac > 0 else 0
    is_temporal = np.zeros(n, dtype=bool)
    if n_temporal:
        order = np.lexsort((ids, dates))  # last key is primary: date, then id
        is_temporal[order[n - n_temporal :]] = True

    u = stable_uniform(seed, ids)
    label = np.where(u < test_frac, "test", np.where(u < test_frac + val_frac, "val", "train"))
    label = np.where(is_temporal, "temporal", label)
    return {k: df[label == k].reset_index(drop=True) for k in ("train", "val", "test", "temporal")}
