"""The tested comparisons a site releases: paired regime differences and calibration aggregates.

A study's question is whether one regime serves a hospital better than another.
Two AUCs with their own intervals cannot answer it on a 40-patient test split:
the two models are scored on the same patients, so their errors are correlated,
and the difference has its own, much smaller, paired variance (DeLong). Only the
site holds the per-patient scores both need, so the site computes the paired
difference (`common.stats.paired_auc_difference`) and releases the difference,
its interval and p; per-patient scores never leave.

What is compared (`comparisons`): every regime the site scored against `global`,
and `global` against `base`. Where: every cell the split's disclosure plan
releases (`common.metrics.eval_plan`), so a difference is released exactly where
both regimes' own cells are, and carries no count of its own (its n and
positives are the eval cells'). Calibration: per regime and split, the
calibration slope and intercept (logistic recalibration, at the site) where the
split's `all` cell is released, and reliability bins (patients, positives and
the sum of predicted risks per decile of predicted risk) through the same
disclosure rules as subgroup bands: each bin needs k patients, positives and
negatives, and the withheld bins together hold none or k of each.

The keys, both sides read them (checked by `common.privacy` on the way out):
``diff/<regime>/<reference>/<split>/<subgroup>/<metric>`` and
``cal/<regime>/<split>/all/<metric>``, ``cal/<regime>/<split>/bin<i>/<metric>``.
"""

from __future__ import annotations

import numpy as np

from clinfed.common.disclosure import counts, protect
from clinfed.common.metrics import SEP, subgroup_key
from clinfed.common.stats import (
    DEFAULT_CALIBRATION_EDGES,
    calibration_bins,
    calibration_slope_intercept,
    paired_auc_difference,
)

DIFF = "diff"
CAL = "cal"
REFERENCE = "global"
BASE = "base"
DIFF_METRICS = ("diff", "lo", "hi", "p", "se", "method", "not_computable")
CAL_FIT_METRICS = ("slope", "slope_lo", "slope_hi", "intercept", "intercept_lo", "intercept_hi", "not_computable")
CAL_BIN_METRICS = ("n", "positives", "sum_p", "suppressed")
CAL_EDGES = DEFAULT_CALIBRATION_EDGES
# numbers, not strings, travel (MetricRecords hold numbers only)
METHODS = {1: "delong", 2: "bootstrap"}
METHOD_CODE = {v: k for k, v in METHODS.items()}
NOT_COMPUTABLE = {
    1: "only one class in these patients",
    4: "fewer than 2 patients of a class",
    5: "no sampling variability estimable (a model ties every patient)",
    6: "the calibration model could not be fitted (all predictions equal or perfect separation)",
}
_STATUS_CODE = {"one_class": 1, "too_few": 4, "degenerate": 5}


def comparisons(regimes) -> list[tuple[str, str]]:
    """(regime, reference) pairs a study tests: `global` against `base`, every other regime against `global`."""
    scored = list(regimes)
    out = []
    if REFERENCE in scored and BASE in scored:
        out.append((REFERENCE, BASE))
    if REFERENCE in scored:
        out += [(r, REFERENCE) for r in scored if r not in (BASE, REFERENCE)]
    return out


def diff_prefix(regime: str, reference: str, split: str, subgroup: str) -> str:
    return SEP.join((DIFF, regime, reference, split, subgroup))


def release_differences(split: str, y: np.ndarray, preds: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                        plan: dict[tuple[str, str], bool], seed: int, n_boot: int, region_vocabulary=(),
                        subgroups: bool = True) -> dict[str, float]:
    """Paired differences on one test split, for every released cell of its plan."""
    y = np.asarray(y).astype(int)
    out: dict[str, float] = {}
    pairs = comparisons(preds)
    for (group, band), released in plan.items():
        if not released or (group != "all" and not subgroups):
            continue
        if group == "all":
            mask, sub = np.ones(len(y), dtype=bool), "all"
        else:
            mask, sub = labels[group] == band, subgroup_key(group, band, region_vocabulary)
        for regime, ref in pairs:
            res = paired_auc_difference(y[mask], preds[regime][mask], preds[ref][mask], seed=seed,
                                        n_boot=max(200, int(n_boot)))
            pre = diff_prefix(regime, ref, split, sub)
            if res["status"] == "ok":
                for m in ("diff", "lo", "hi", "p", "se"):
                    out[f"{pre}{SEP}{m}"] = float(res[m])
                out[f"{pre}{SEP}method"] = METHOD_CODE[res["method"]]
            else:
                out[f"{pre}{SEP}not_computable"] = _STATUS_CODE.get(res["status"], 1)
    return out


def release_calibration(regime: str, split: str, y: np.ndarray, p: np.ndarray, all_released: bool,
                        k: int) -> dict[str, float]:
    """Calibration of one regime on one split: slope/intercept and reliability bins (see the module's text)."""
    if not all_released:
        return {}
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    out: dict[str, float] = {}
    pre = SEP.join((CAL, regime, split))
    fit = calibration_slope_intercept(y, p)
    if fit["status"] == "ok":
        for m in CAL_FIT_METRICS[:-1]:
            out[f"{pre}{SEP}all{SEP}{m}"] = float(fit[m])
    else:
        out[f"{pre}{SEP}all{SEP}not_computable"] = 1 if fit["status"] == "one_class" else 6
    bins = calibration_bins(y, p, CAL_EDGES)
    edges = np.asarray(CAL_EDGES)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    bands = {i: counts(y, idx == i) for i in range(len(edges) - 1)}
    shown = protect(bands, k, whole_released=True)
    for i in bands:
        key = f"{pre}{SEP}bin{i}"
        if i not in shown:
            out[f"{key}{SEP}suppressed"] = 1
            continue
        out[f"{key}{SEP}n"] = int(bins.n[i])
        out[f"{key}{SEP}positives"] = int(bins.positives[i])
        out[f"{key}{SEP}sum_p"] = float(bins.sum_p[i])
    return out


# ------------------------------------------------------------------ the server's reading of the keys
def parse_differences(metrics: dict[str, float]) -> dict[tuple[str, str, str, str], dict[str, float]]:
    """{(regime, reference, split, subgroup-key): {metric: value}} of one site's reply."""
    out: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for key, val in metrics.items():
        parts = key.split(SEP)
        if len(parts) == 6 and parts[0] == DIFF:
            out.setdefault(tuple(parts[1:5]), {})[parts[5]] = float(val)
    return out


def parse_calibration(metrics: dict[str, float]) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """{(regime, split): {"all" | "bin<i>": {metric: value}}} of one site's reply."""
    out: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for key, val in metrics.items():
        parts = key.split(SEP)
        if len(parts) == 5 and parts[0] == CAL:
            out.setdefault((parts[1], parts[2]), {}).setdefault(parts[3], {})[parts[4]] = float(val)
    return out

