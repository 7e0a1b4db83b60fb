"""Every number a site may release, computed at the site, with small-cell suppression.

Metrics travel as a flat MetricRecord whose keys encode the cell:
``eval/<regime>/<split>/<subgroup>/<metric>``. A suppressed cell carries only
``.../suppressed = 1``: no value and no n, so nothing about it can be read
back. The server turns the flat record into tidy `metrics.csv` rows with
`cell_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

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
    """Metrics of one cell, or its suppression when n < k or positives < k."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    n = len(y)
    pos = int(y.sum())
    if n < k or pos < k:
        return CellResult(status="suppressed")
    if pos == n:  # only positives: AUC undefined, n and positives still releasable
        return CellResult(status="not_computable", n=n, values={"positives": pos}, reason_code=1)
    from sklearn.metrics import average_precision_score, f1_score

    auc = auc_roc(y, p)
    lo, hi = bootstrap_auc_ci(y, p, seed=seed, n_boot=n_boot)
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
            continue  # e.g. a CI that could not be bootstrapped: absent, not a number
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


def cell_rows(site: str, metrics: dict[str, float]) -> list[dict]:
    """Tidy rows (site, regime, split, subgroup, metric, value, n, status, note)."""
    rows = []
    for (regime, split, subgroup), vals in sorted(parse_cells(metrics).items()):
        base = {"site": site, "regime": regime, "split": split, "subgroup": subgroup}
        if vals.get("suppressed"):
            for m in CELL_METRICS:
                rows.append({**base, "metric": m, "value": None, "n": None,
                             "status": "suppressed", "note": "fewer than k patients or positives"})
            continue
        n = int(vals["n"]) if "n" in vals else None
        code = int(vals.get("not_computable", 0))
        for m in CELL_METRICS:
            if m in vals:
                rows.append({**base, "metric": m, "value": float(vals[m]), "n": n,
                             "status": "ok", "note": ""})
            else:
                note = NOT_COMPUTABLE.get(code, "could not be computed (too few distinct resamples)")
                rows.append({**base, "metric": m, "value": None, "n": n,
                             "status": "not_computable", "note": note})
    return rows
