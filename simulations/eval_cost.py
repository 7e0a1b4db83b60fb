"""What a site's evaluation costs in statistics: per-cell bootstrap intervals against analytic ones.

Before issue 19 every released cell (regime x split x subgroup band) got a
percentile bootstrap interval of its AUC: `bootstrap` (default 500) resampled
AUCs per cell. Now the interval is DeLong's on the logit scale, and the site
also computes what the bootstrap never gave: paired differences of every
regime against its reference and calibration. This measures both side by
side on the same scores (interleaved repeats, same process), for a site the
size of the default study's largest and smallest, so the ratio is fair: the
baseline runs with its own default of 500 resamples. Model scoring, which
both share, is left out: `clinfed bench overhead` and a study's run.json time
the whole evaluation.

`clinfed bench evaluation [--sizes 250,25] [--repeats 5] [--bootstrap 500]`
"""

from __future__ import annotations

import time

import numpy as np

from clinfed.common.findings_release import release_calibration, release_differences
from clinfed.common.metrics import (
    CellResult,
    auc_roc,
    bootstrap_auc_ci,
    eval_plan,
    flatten_cell,
    flatten_split,
    subgroup_key,
)

REGIMES = ("base", "global", "local", "personalized", "cluster", "similarity-weighted", "augmented")


def _site(n: int, seed: int):
    """Labels, subgroup bands and per-regime scores of one synthetic test split."""
    import pandas as pd

    from clinfed.common.metrics import subgroup_labels

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    df = pd.DataFrame({
        "age": rng.integers(20, 95, n), "n_comorbidities": rng.integers(0, 8, n),
        "insurance": rng.choice(["private", "government", "self-pay", "unknown"], n),
        "region": rng.choice(["north", "south"], n),
        "note_text": [" ".join(["w"] * int(k)) for k in rng.integers(40, 300, n)],
    })
    labels = subgroup_labels(df, [80, 160, 240], ["north", "south"])
    preds = {r: 1 / (1 + np.exp(-(rng.normal(0, 1, n) + (0.4 + 0.1 * i) * y))) for i, r in enumerate(REGIMES)}
    return y, labels, preds


def _bootstrap_cells(y, labels, preds, plan, n_boot, seed):
    """The evaluation's statistics as they were: every released cell with a bootstrap interval."""
    from sklearn.metrics import average_precision_score, f1_score

    out = {}
    for regime, p in preds.items():
        for (group, band), released in plan.items():
            if not released:
                continue
            mask = slice(None) if group == "all" else labels[group] == band
            yy, pp = y[mask], p[mask]
            lo, hi = bootstrap_auc_ci(yy, pp, seed=seed, n_boot=n_boot)
            values = {"auc": auc_roc(yy, pp), "auc_lo": lo, "auc_hi": hi,
                      "pr_auc": float(average_precision_score(yy, pp)),
                      "f1": float(f1_score(yy, (pp >= 0.5).astype(int), zero_division=0)),
                      "brier": float(np.mean((pp - yy) ** 2)), "positives": int(yy.sum())}
            sub = "all" if group == "all" else subgroup_key(group, band, ["north", "south"])
            out.update(flatten_cell(regime, "test", sub, CellResult("ok", n=len(yy), values=values)))
    return out


def _analytic_cells(y, labels, preds, plan, n_boot, seed, k):
    out = {}
    for regime, p in preds.items():
        out.update(flatten_split(regime, "test", y, p, 0.5, labels, plan, seed, n_boot, ["north", "south"]))
        out.update(release_calibration(regime, "test", y, p, plan[("all", "")], k))
    out.update(release_differences("test", y, preds, labels, plan, seed, n_boot, ["north", "south"]))
    return out


def evaluation(sizes=(250, 25), repeats=5, bootstrap=500, k=5, seed=0, work=None) -> dict:
    rows, ratios = [], {}
    for n in sizes:
        y, labels, preds = _site(int(n), seed)
        plan = eval_plan(y, labels, k, [80, 160, 240], ["north", "south"])
        times = {"bootstrap": [], "analytic": []}
        cells = sum(plan.values()) * len(REGIMES)
        for _ in range(int(repeats)):
            for name, fn in (("bootstrap", _bootstrap_cells), ("analytic", None)):
                t = time.perf_counter()
                if fn is None:
                    _analytic_cells(y, labels, preds, plan, bootstrap, seed, k)
                else:
                    fn(y, labels, preds, plan, bootstrap, seed)
                times[name].append(time.perf_counter() - t)
        b, a = float(np.median(times["bootstrap"])), float(np.median(times["analytic"]))
        ratios[int(n)] = b / a
        rows.append({"test patients": int(n), "released cells": int(cells),
                     f"bootstrap {bootstrap} s (median)": round(b, 4),
                     "analytic + differences + calibration s (median)": round(a, 4),
                     "speed-up": round(b / a, 1)})
    return {"speedup": ratios, "settings": {"sizes": list(sizes), "repeats": repeats, "bootstrap": bootstrap,
                                            "k": k, "regimes": len(REGIMES)},
            "_tables": [("statistics of one site's evaluation (scores given; model scoring not included)", rows)]}
