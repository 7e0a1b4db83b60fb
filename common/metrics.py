"""Every number a site may release, computed at the site, through disclosure control.

Metrics travel as a flat MetricRecord whose keys encode the cell:
``eval/<regime>/<split>/<subgroup>/<metric>``. Which cells are released is
decided by `common.disclosure` from counts alone (small-cell and complementary
suppression); a withheld cell carries only ``.../suppressed = 1``: no value and
no n, the same flag whatever withheld it. Every band of every grouping is sent,
present at the site or not, and no band is named by a value from the table
(region names come from the study's vocabulary and travel as codes). The
server turns the flat record into tidy `metrics.csv` rows with `cell_rows`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

# columns of RUN_DIR/metrics.csv: written by server.study, read by server.analysis
METRIC_COLUMNS = ["site", "regime", "split", "subgroup", "metric", "value", "n", "status", "note"]
CELL_METRICS = ("auc", "auc_lo", "auc_hi", "pr_auc", "f1", "brier", "positives")
COUNT_METRICS = ("n", "positives")
PREFIX = "eval"
SEP = "/"

# not-computable reasons travel as a numeric code (MetricRecords hold numbers only)
NOT_COMPUTABLE = {
    1: "only one class in this test set: AUC and PR AUC are undefined",
    2: "empty test set",
}


@dataclass
class CellResult:
    """Metrics for one (regime, split, subgroup) cell."""

    status: str  # ok | suppressed | not_computable
    n: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    reason_code: int = 0


def auc_roc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (vectorised, no sklearn overhead)."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(p)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, seed: int, n_boot: int = 500,
                     alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (resamples with one class are skipped)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        a = auc_roc(y[idx], p[idx])
        if not math.isnan(a):
            stats.append(a)
    if len(stats) < n_boot // 2:
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising F1 on a validation split (0.5 when it cannot be chosen)."""
    y = np.asarray(y).astype(int)
    if len(y) == 0 or y.sum() == 0 or y.sum() == len(y):
        return 0.5
    from sklearn.metrics import precision_recall_curve

    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thr) else 0
    return float(thr[best]) if len(thr) else 0.5


def cell_metrics(y: np.ndarray, p: np.ndarray, threshold: float, k: int, seed: int,
                 n_boot: int = 500) -> CellResult:
    """Metrics of one cell, or its suppression unless it holds k patients, k positives and
    k negatives (common.disclosure.releasable; a cell of one class is never released)."""
    from clinfed.common.disclosure import counts, releasable

    if not releasable(counts(y), k):
        return CellResult(status="suppressed")
    return score_cell(y, p, threshold, seed, n_boot)


def score_cell(y: np.ndarray, p: np.ndarray, threshold: float, seed: int, n_boot: int = 500) -> CellResult:
    """Metrics of one cell that disclosure control released (both classes present).

    `seed` and `n_boot` are kept for callers that still pass them; the AUC interval is analytic."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    n = len(y)
    pos = int(y.sum())
    if n == 0:
        return CellResult(status="not_computable", n=0, values={}, reason_code=2)
    if pos == n or pos == 0:  # one class: AUC undefined (disclosure control never releases such a cell)
        return CellResult(status="not_computable", n=n, values={"positives": pos}, reason_code=1)
    from sklearn.metrics import average_precision_score, f1_score

    from clinfed.common.stats import auc_interval

    auc = auc_roc(y, p)
    # DeLong's variance on the logit scale: one ranking instead of n_boot resampled AUCs, and the
    # variance the server needs to compare bands (common.stats.auc_variance_from_interval).
    # NaN (left out) where no analytic interval exists: AUC exactly 0 or 1.
    lo, hi = auc_interval(y, p)
    values = {
        "auc": auc,
        "auc_lo": lo,
        "auc_hi": hi,
        "pr_auc": float(average_precision_score(y, p)),
        "f1": float(f1_score(y, (p >= threshold).astype(int), zero_division=0)),
        "brier": float(np.mean((p - y) ** 2)),
        "positives": pos,
    }
    return CellResult(status="ok", n=n, values=values)


def cell_prefix(regime: str, split: str, subgroup: str = "all") -> str:
    for part in (regime, split, subgroup):
        if SEP in part:
            raise ValueError(f"'{SEP}' is not allowed in a cell name: {part!r}")
    return SEP.join((PREFIX, regime, split, subgroup))


def flatten_cell(regime: str, split: str, subgroup: str, cell: CellResult) -> dict[str, float]:
    """The MetricRecord entries for one cell (suppressed: a single flag, nothing else)."""
    pre = cell_prefix(regime, split, subgroup)
    if cell.status == "suppressed":
        return {f"{pre}{SEP}suppressed": 1}
    out: dict[str, float] = {f"{pre}{SEP}n": int(cell.n)}
    if cell.status == "not_computable":
        out[f"{pre}{SEP}not_computable"] = int(cell.reason_code)
    for name, val in cell.values.items():
        if isinstance(val, float) and math.isnan(val):
            continue  # e.g. no analytic interval at AUC 0 or 1: absent, not a number
        out[f"{pre}{SEP}{name}"] = int(val) if name in COUNT_METRICS else float(val)
    return out


def parse_cells(metrics: dict[str, float]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Group a flat MetricRecord's eval entries back into cells."""
    cells: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, val in metrics.items():
        parts = key.split(SEP)
        if len(parts) != 5 or parts[0] != PREFIX:
            continue
        _, regime, split, subgroup, metric = parts
        cells.setdefault((regime, split, subgroup), {})[metric] = val
    return cells


SUPPRESSED_NOTE = "withheld by disclosure control (fewer than k patients, positives or negatives, or protecting such a cell)"


def cell_rows(site: str, metrics: dict[str, float], region_vocabulary=()) -> list[dict]:
    """Tidy rows (site, regime, split, subgroup, metric, value, n, status, note); region bands
    travel as codes and are named here from the study's `region-vocabulary`."""
    rows = []
    for (regime, split, subgroup), vals in sorted(parse_cells(metrics).items()):
        base = {"site": site, "regime": regime, "split": split,
                "subgroup": subgroup_name(subgroup, region_vocabulary)}
        if vals.get("suppressed"):
            for m in CELL_METRICS:
                rows.append({**base, "metric": m, "value": None, "n": None,
                             "status": "suppressed", "note": SUPPRESSED_NOTE})
            continue
        n = int(vals["n"]) if "n" in vals else None
        code = int(vals.get("not_computable", 0))
        for m in CELL_METRICS:
            if m in vals:
                rows.append({**base, "metric": m, "value": float(vals[m]), "n": n,
                             "status": "ok", "note": ""})
            else:
                note = NOT_COMPUTABLE.get(code, "no analytic interval (AUC exactly 0 or 1)")
                rows.append({**base, "metric": m, "value": None, "n": n,
                             "status": "not_computable", "note": note})
    return rows


# --------------------------------------------------------------------------
# subgroups and site descriptors (all at the site; error drivers: common.error_drivers)
# --------------------------------------------------------------------------
AGE_BANDS = (("<45", 0, 45), ("45-64", 45, 65), ("65-79", 65, 80), ("80+", 80, 1000))
COMORBIDITY_BANDS = (("0", 0, 1), ("1-2", 1, 3), ("3-4", 3, 5), ("5+", 5, 10**6))
DRIVERS = ("age", "n_comorbidities", "insurance", "region", "words_per_note")
EVAL_SPLITS = ("test", "temporal")
# the band of patients whose value is missing (a band like any other for disclosure control),
# and the region band of every value outside the study's vocabulary
MISSING = "missing"
OTHER = "other"
MAX_REGIONS = 99
_REGION_CODE = re.compile(r"^r([0-9]{1,2})$")


def word_counts(texts) -> np.ndarray:
    return np.array([len(str(t).split()) for t in texts], dtype=float)


def parse_edges(text: str) -> list[float]:
    edges = [float(x) for x in str(text).split(",") if x.strip()]
    if edges != sorted(edges):
        raise ValueError(f"word-band edges must increase: {text!r}")
    return edges


def _norm(value) -> str:
    return " ".join(str(value).split()).casefold()


def parse_region_vocabulary(text) -> list[str]:
    """The study's region names (run config `region-vocabulary`, comma-separated).

    Region is free text in a hospital's table, so a value could be anything a
    person typed, a name or a record number included: a site never sends one.
    It maps each patient's region to one of these names (compared without case
    or repeated spaces) or to `other`, and sends band codes (`region=r1` for the
    first name); the server names them back from its own run config.
    """
    if not isinstance(text, str):
        text = ",".join(str(t) for t in (text or ()))
    names = [" ".join(t.split()) for t in text.split(",") if t.strip()]
    seen: set[str] = set()
    for name in names:
        if _norm(name) in (OTHER, MISSING):
            raise ValueError(f"{name!r} is a reserved band name (values outside the vocabulary are "
                             f"'{OTHER}', missing ones '{MISSING}')")
        if any(ch in name for ch in "/=\"") or any(ord(ch) < 32 for ch in name) or len(name) > 60:
            raise ValueError(f"region name {name!r}: at most 60 characters, without '/', '=', quotes or "
                             "control characters")
        if _norm(name) in seen:
            raise ValueError(f"region name {name!r} is listed twice")
        seen.add(_norm(name))
    if len(names) > MAX_REGIONS:
        raise ValueError(f"{len(names)} region names; at most {MAX_REGIONS}")
    return names


def _vocab(region_vocabulary) -> list[str]:
    if isinstance(region_vocabulary, str):
        return parse_region_vocabulary(region_vocabulary)
    return list(region_vocabulary or ())


def band_names(group: str, word_edges: list[float], region_vocabulary=()) -> list[str]:
    """Every band of a grouping, present at the site or not: the closed set a site always reports."""
    from clinfed.common.data import INSURANCE_VALUES

    if group == "age":
        return [b[0] for b in AGE_BANDS] + [MISSING]
    if group == "comorbidity":
        return [b[0] for b in COMORBIDITY_BANDS] + [MISSING]
    if group == "insurance":
        return list(INSURANCE_VALUES) + [MISSING]
    if group == "region":
        return _vocab(region_vocabulary) + [OTHER, MISSING]
    if group == "words":
        return [f"q{i}" for i in range(1, len(word_edges) + 2)]
    raise ValueError(f"unknown grouping {group!r}")


def subgroup_key(group: str, band: str, region_vocabulary=()) -> str:
    """The subgroup as it travels: region names become codes (`region=r2`), never text."""
    if group == "region" and band not in (OTHER, MISSING):
        return f"region=r{_vocab(region_vocabulary).index(band) + 1}"
    return f"{group}={band}"


def subgroup_name(key: str, region_vocabulary=()) -> str:
    """The server's reading of a subgroup key: `region=r2` -> `region=<second name>`."""
    group, _, band = key.partition("=")
    m = _REGION_CODE.match(band) if group == "region" else None
    vocab = _vocab(region_vocabulary) if m else []
    if m and 1 <= int(m.group(1)) <= len(vocab):
        return f"region={vocab[int(m.group(1)) - 1]}"
    return key


def _band(values: np.ndarray, bands) -> np.ndarray:
    out = np.full(len(values), MISSING, dtype=object)
    for name, lo, hi in bands:
        out[(values >= lo) & (values < hi)] = name
    return out


def _is_missing(v) -> bool:
    import pandas as pd

    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def subgroup_labels(df, word_edges: list[float], region_vocabulary=()) -> dict[str, np.ndarray]:
    """For each subgrouping, a band label per row (`missing` where the feature is missing).

    Region bands exist only when the study declares its region vocabulary; a
    value outside it is `other`. A grouping whose column the table lacks is absent.
    """
    from clinfed.common.data import INSURANCE_VALUES

    out: dict[str, np.ndarray] = {}
    if "age" in df:
        out["age"] = _band(df["age"].to_numpy(dtype=float), AGE_BANDS)
    if "n_comorbidities" in df:
        out["comorbidity"] = _band(df["n_comorbidities"].to_numpy(dtype=float), COMORBIDITY_BANDS)
    if "insurance" in df:
        known = set(INSURANCE_VALUES)
        out["insurance"] = np.array([MISSING if _is_missing(v) else (str(v) if str(v) in known else OTHER)
                                     for v in df["insurance"].to_numpy(dtype=object)], dtype=object)
    vocab = _vocab(region_vocabulary)
    if "region" in df and vocab:
        spelled = {_norm(v): v for v in vocab}
        out["region"] = np.array([MISSING if _is_missing(v) or not str(v).strip() else spelled.get(_norm(v), OTHER)
                                  for v in df["region"].to_numpy(dtype=object)], dtype=object)
    words = word_counts(df["note_text"])
    edges = [-np.inf] + list(word_edges) + [np.inf]
    out["words"] = np.array([f"q{int(np.searchsorted(edges, w, side='right'))}" for w in words], dtype=object)
    return out


def eval_plan(y: np.ndarray, labels: dict[str, np.ndarray], k: int, word_edges: list[float],
              region_vocabulary=()) -> dict[tuple[str, str], bool]:
    """Which cells of one test split may be released: {("all", ""): ..., (group, band): ...}.

    From the labels alone, so every regime scored on these patients releases the same
    cells: `all` by the primary rule, each grouping's bands by `common.disclosure.protect`
    (primary and complementary suppression against `all`)."""
    from clinfed.common.disclosure import counts, protect, releasable

    y = np.asarray(y).astype(int)
    plan = {("all", ""): releasable(counts(y), k)}
    for group, lab in labels.items():
        bands = {b: counts(y, lab == b) for b in band_names(group, word_edges, region_vocabulary)}
        released = protect(bands, k, whole_released=plan[("all", "")])
        plan.update({(group, b): b in released for b in bands})
    return plan


def flatten_split(regime: str, split: str, y: np.ndarray, p: np.ndarray, threshold: float,
                  labels: dict[str, np.ndarray], plan: dict[tuple[str, str], bool], seed: int, n_boot: int,
                  region_vocabulary=(), subgroups: bool = True) -> dict[str, float]:
    """The MetricRecord entries of one regime on one split: every cell of `plan`, scored where
    released, a bare `suppressed` flag where not (the same flag whatever withheld it)."""
    out: dict[str, float] = {}
    for (group, band), released in plan.items():
        if group != "all" and not subgroups:
            continue
        if group == "all":
            mask, sub = slice(None), "all"
        else:
            mask, sub = labels[group] == band, subgroup_key(group, band, region_vocabulary)
        cell = score_cell(y[mask], p[mask], threshold, seed, n_boot) if released else CellResult("suppressed")
        out.update(flatten_cell(regime, split, sub, cell))
    return out


def split_plan(splits: dict, k: int) -> dict:
    """What a site may say about its split sizes and its whole table.

    The splits (train, val, test, temporal) partition the table, whose size and
    readmission rate the descriptors release: a withheld split size could be read
    back as the total minus the released ones. So split sizes go through the same
    complementary rule (train's is kept: every training reply carries it; so are the
    test splits' whose `all` cell is released); where no choice of withheld sizes is
    safe, the table's size and every descriptor are withheld. The readmission rate
    is released only if the splits whose positives are not released (train, val, a
    suppressed test split) hold together k positives and k negatives."""
    from clinfed.common.disclosure import Counts, counts, protect, releasable, remainder_safe

    c = {s: counts(df["readmitted_30d"].to_numpy()) for s, df in splits.items()}
    eval_all = {s: releasable(c[s], k) for s in EVAL_SPLITS if s in c}
    sizes = {s: Counts(v.n) for s, v in c.items()}
    keep = {s for s in sizes if sizes[s].n >= k and (s == "train" or eval_all.get(s))}
    shown = protect(sizes, k, keep=keep)
    whole = remainder_safe([sizes[s] for s in sizes if s not in shown], k)
    unlabelled = [c[s] for s in c if not eval_all.get(s)]
    whole_counts = Counts(sum(v.n for v in c.values()), sum(v.pos for v in c.values()))
    rate = whole and releasable(whole_counts, k) and remainder_safe(unlabelled, k)
    return {"sizes": shown, "whole": whole, "readmission_rate": rate, "eval_all": eval_all, "counts": c}


def describe_release(splits: dict, k: int, word_edges: list[float], region_vocabulary=()) -> dict[str, float]:
    """Everything a site's `describe` reply says about its data: split sizes and descriptors."""
    import pandas as pd

    plan = split_plan(splits, k)
    out: dict[str, float] = {f"site-n-{s}": int(plan["counts"][s].n) for s in splits if s in plan["sizes"]}
    if plan["whole"]:
        df = pd.concat([splits[s] for s in ("train", "val", "test", "temporal") if s in splits])
        desc = site_descriptors(df, k, word_edges, region_vocabulary)
        if not plan["readmission_rate"]:
            desc.pop("readmission_rate", None)
        out.update({f"desc{SEP}{key}": v for key, v in desc.items()})
    return out


def site_descriptors(df, k: int, word_edges: list[float], region_vocabulary=()) -> dict[str, float]:
    """Aggregate descriptors of a site, through disclosure control: each band's share of all
    patients (a missing value is a band) is released only where `protect` releases the band;
    a rate needs k patients on each side of it (and k or no patients with it unknown)."""
    from clinfed.common.disclosure import Counts, protect, releasable, remainder_safe

    n = len(df)
    out: dict[str, float] = {}
    if n < k:
        return out
    out["n"] = n
    pos = int(df["readmitted_30d"].sum())
    if releasable(Counts(n, pos), k):
        out["readmission_rate"] = pos / n
    if "died" in df:
        died = df["died"].dropna()
        known = Counts(len(died), int(died.sum()))
        if releasable(known, k) and remainder_safe([Counts(n - known.n)], k):
            out["mortality_rate"] = float(died.mean())
    words = word_counts(df["note_text"])
    out["words_mean"] = float(words.mean())
    out["words_q1"], out["words_median"], out["words_q3"] = (float(q) for q in np.quantile(words, [.25, .5, .75]))
    for group, labels in subgroup_labels(df, word_edges, region_vocabulary).items():
        if group == "words":
            continue
        bands = {b: Counts(int((labels == b).sum())) for b in band_names(group, word_edges, region_vocabulary)}
        for band in sorted(protect(bands, k)):
            out[subgroup_key(group, band, region_vocabulary)] = bands[band].n / n
    return out
