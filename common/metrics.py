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


# --------------------------------------------------------------------------
# subgroups, site descriptors, drivers of per-instance error (all at the site)
# --------------------------------------------------------------------------
AGE_BANDS = (("<45", 0, 45), ("45-64", 45, 65), ("65-79", 65, 80), ("80+", 80, 1000))
COMORBIDITY_BANDS = (("0", 0, 1), ("1-2", 1, 3), ("3-4", 3, 5), ("5+", 5, 10**6))
DRIVERS = ("age", "n_comorbidities", "insurance", "region", "words_per_note")


def word_counts(texts) -> np.ndarray:
    return np.array([len(str(t).split()) for t in texts], dtype=float)


def parse_edges(text: str) -> list[float]:
    edges = [float(x) for x in str(text).split(",") if x.strip()]
    if edges != sorted(edges):
        raise ValueError(f"word-band edges must increase: {text!r}")
    return edges


def _band(values: np.ndarray, bands) -> np.ndarray:
    out = np.full(len(values), None, dtype=object)
    for name, lo, hi in bands:
        out[(values >= lo) & (values < hi)] = name
    return out


def subgroup_labels(df, word_edges: list[float]) -> dict[str, np.ndarray]:
    """For each subgrouping, a band label per row (None where the feature is missing)."""
    out: dict[str, np.ndarray] = {}
    if "age" in df:
        out["age"] = _band(df["age"].to_numpy(dtype=float), AGE_BANDS)
    if "n_comorbidities" in df:
        out["comorbidity"] = _band(df["n_comorbidities"].to_numpy(dtype=float), COMORBIDITY_BANDS)
    for col in ("insurance", "region"):
        if col in df:
            vals = df[col].to_numpy(dtype=object)
            out[col] = np.array([None if (v is None or (isinstance(v, float) and math.isnan(v))) else
                                 str(v).replace(SEP, "_") for v in vals], dtype=object)
    words = word_counts(df["note_text"])
    edges = [-np.inf] + list(word_edges) + [np.inf]
    out["words"] = np.array([f"q{int(np.searchsorted(edges, w, side='right'))}" for w in words], dtype=object)
    return out


def site_descriptors(df, k: int, word_edges: list[float]) -> dict[str, float]:
    """Aggregate descriptors of a site; any share or rate resting on fewer than k is withheld."""
    n = len(df)
    out: dict[str, float] = {}
    if n < k:
        return out
    out["n"] = n
    pos = int(df["readmitted_30d"].sum())
    if min(pos, n - pos) >= k:
        out["readmission_rate"] = pos / n
    if "died" in df and df["died"].notna().sum() >= k:
        died = df["died"].dropna()
        if min(int(died.sum()), len(died) - int(died.sum())) >= k:
            out["mortality_rate"] = float(died.mean())
    words = word_counts(df["note_text"])
    out["words_mean"] = float(words.mean())
    out["words_q1"], out["words_median"], out["words_q3"] = (float(q) for q in np.quantile(words, [.25, .5, .75]))
    for group, labels in subgroup_labels(df, word_edges).items():
        if group == "words":
            continue
        known = np.array([lab is not None for lab in labels])
        total = int(known.sum())
        if total < k:
            continue
        for lab in sorted({lab for lab in labels if lab is not None}):
            count = int((labels == lab).sum())
            if count >= k:
                out[f"{group}={lab}"] = count / total
    return out


def _error_features(df, word_edges):
    """One-hot patient feature bands, grouped so importance is per driver.

    Bands rather than raw values: hardness is planted (and found in the
    literature) at thresholds such as age 80+ or 5+ comorbidities, and equal
    encodings keep the groups' importances comparable.
    """
    labels = subgroup_labels(df, word_edges)
    names = {"age": "age", "comorbidity": "n_comorbidities", "insurance": "insurance",
             "region": "region", "words": "words_per_note"}
    cols, groups = [], {}
    for key, driver in names.items():
        lab = labels.get(key)
        if lab is None or any(v is None for v in lab):
            continue
        levels = sorted(set(lab))
        if len(levels) < 2:
            continue
        start = sum(c.shape[1] for c in cols)
        cols.append(np.stack([(lab == lv).astype(float) for lv in levels], axis=1))
        groups[driver] = list(range(start, start + len(levels)))
    if not cols:
        return np.zeros((len(df), 0)), {}
    return np.concatenate(cols, axis=1), groups


def instance_errors(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """1 where an instance is misranked: a positive scored below the negatives' median
    score, or a negative above the positives' median (per-instance ranking error)."""
    y = np.asarray(y).astype(int)
    med_neg = np.median(p[y == 0]) if (y == 0).any() else 0.5
    med_pos = np.median(p[y == 1]) if (y == 1).any() else 0.5
    return np.where(y == 1, p < med_neg, p > med_pos).astype(int)


def error_driver_importance(df, y: np.ndarray, p: np.ndarray, seed: int, k: int,
                            word_edges: list[float], repeats: int = 10) -> tuple[dict[str, float], int]:
    """Which patient features predict this site's per-instance errors?

    A logistic classifier of the error indicator on patient feature bands,
    scored out of sample (2-fold cross-fitting, repeated) so that features with
    more levels do not win by overfitting; the importance of a feature group is
    the mean drop of the held-out ROC AUC when that group is permuted. Only the
    importances and n leave the site.
    """
    from sklearn.linear_model import LogisticRegression

    err = instance_errors(y, p)
    n = len(err)
    if n < 2 * k or min(int(err.sum()), n - int(err.sum())) < k:
        return {}, n
    X, groups = _error_features(df, word_edges)
    if not groups:
        return {}, n
    rng = np.random.default_rng(seed)
    drops: dict[str, list[float]] = {g: [] for g in groups}
    for rep in range(repeats):
        fold = rng.permutation(n) % 2
        for f in (0, 1):
            tr, te = fold != f, fold == f
            if len(set(err[tr])) < 2 or len(set(err[te])) < 2:
                continue
            clf = LogisticRegression(max_iter=1000, C=0.5).fit(X[tr], err[tr])
            base = auc_roc(err[te], clf.predict_proba(X[te])[:, 1])
            for group, idx in groups.items():
                Xp = X[te].copy()
                Xp[:, idx] = Xp[rng.permutation(len(Xp))][:, idx]
                drops[group].append(base - auc_roc(err[te], clf.predict_proba(Xp)[:, 1]))
    return {g: float(np.mean(v)) for g, v in drops.items() if v}, n
