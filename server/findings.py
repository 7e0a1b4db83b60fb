"""The study's tested findings, from what sites released: differences, pooling, size, calibration, gaps.

Sites release paired AUC differences of each regime against its reference with
DeLong intervals, calibration fits and reliability bins, and per-band AUCs with
analytic intervals (`common.findings_release`, `common.metrics`). Here the server
turns them into the files a reviewer reads (formats in docs/outputs.md):

- ``differences.csv``: every site's difference, and the random-effects pooled one
  (DerSimonian–Laird, Knapp–Hartung interval) with τ² and I², so a finding can
  say whether an effect is general or site-specific; p adjusted by Holm within two
  families: ``primary`` (every comparison at every site and pooled, both splits,
  subgroup ``all``) and ``subgroup``;
- ``size_effects.csv``: the meta-regression of a site's difference on log2 of its
  training notes ("helps small sites most" is a negative slope);
- ``calibration.csv``: ECE from the released bins, calibration slope and
  intercept per site and pooled, and the pooled reliability bins;
- ``subgroup_gaps.csv``: per grouping, the gap between the best- and the
  worst-served band with a simultaneous interval (`common.stats.band_gap`).

Everything is computed from aggregates; nothing here sees a patient.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from clinfed.common.findings_release import (
    CAL_EDGES,
    METHODS,
    NOT_COMPUTABLE,
    parse_calibration,
    parse_differences,
)
from clinfed.common.metrics import subgroup_name
from clinfed.common.stats import (
    CalibrationBins,
    auc_variance_from_interval,
    band_gap,
    calibration_from_bins,
    holm,
    meta_regression,
    random_effects,
)

POOLED = "pooled"
DIFF_COLUMNS = ["site", "regime", "reference", "split", "subgroup", "family", "diff", "lo", "hi", "p", "p_adj",
                "n", "positives", "method", "status", "replicates", "consistent", "tau2", "i2", "n_sites", "note"]
SIZE_COLUMNS = ["regime", "reference", "split", "covariate", "slope", "lo", "hi", "p", "p_adj", "n_sites", "note"]
CAL_COLUMNS = ["site", "regime", "split", "metric", "value", "status"]
GAP_COLUMNS = ["site", "regime", "split", "grouping", "best", "worst", "gap", "lo", "hi", "p", "p_adj", "status"]
SIZE_COVARIATE = "log2 training notes"
Z95 = float(norm.isf(0.025))
SUPPRESSED_NOTE = "withheld by disclosure control at the site"


def _cells(metrics: pd.DataFrame) -> dict[tuple, dict]:
    """{(site, regime, split, subgroup): {"status", "n", "positives", "auc", "auc_lo", "auc_hi"}} from metrics.csv rows."""
    out: dict[tuple, dict] = {}
    for r in metrics.itertuples(index=False):
        cell = out.setdefault((r.site, r.regime, r.split, r.subgroup), {"status": r.status, "n": r.n})
        if r.status == "suppressed":
            cell["status"] = "suppressed"
        elif r.metric in ("auc", "auc_lo", "auc_hi", "positives") and pd.notna(r.value):
            cell[r.metric] = float(r.value)
            if r.metric == "auc":
                cell["status"] = "ok"
    return out


def site_differences(released: dict[str, dict[str, float]], metrics: pd.DataFrame,
                     region_vocabulary="") -> list[dict]:
    """One row per site × comparison × split × subgroup the site could release, suppressed ones included."""
    cells = _cells(metrics)
    rows = []
    for site, m in sorted(released.items()):
        diffs = parse_differences(m)
        pairs = sorted({(r, ref) for r, ref, _, _ in diffs} | _expected_pairs(cells, site))
        subs = sorted({(sp, sub) for (s, _, sp, sub) in cells if s == site and sp in ("test", "temporal")})
        for regime, ref in pairs:
            for split, sub in subs:
                a, b = cells.get((site, regime, split, sub)), cells.get((site, ref, split, sub))
                if a is None or b is None:
                    continue
                row = {"site": site, "regime": regime, "reference": ref, "split": split, "subgroup": sub,
                       "family": "primary" if sub == "all" else "subgroup", "replicates": 1}
                vals = _find(diffs, regime, ref, split, sub, region_vocabulary)
                if a["status"] == "suppressed" or b["status"] == "suppressed":
                    rows.append({**row, "status": "suppressed", "note": SUPPRESSED_NOTE})
                elif vals is None:
                    continue  # not released at all (e.g. subgroups off): no row
                elif "diff" in vals and "se" in vals:
                    rows.append({**row, "diff": vals["diff"], "lo": vals["lo"], "hi": vals["hi"], "p": vals["p"],
                                 "se": vals["se"], "n": a.get("n"), "positives": a.get("positives"),
                                 "method": METHODS.get(int(vals.get("method", 1)), "delong"), "status": "ok"})
                else:
                    rows.append({**row, "n": a.get("n"), "positives": a.get("positives"),
                                 "status": "not_computable",
                                 "note": NOT_COMPUTABLE.get(int(vals.get("not_computable", 1)), "")})
    return rows


def _expected_pairs(cells, site) -> set[tuple[str, str]]:
    from clinfed.common.findings_release import comparisons

    regimes = {r for (s, r, _, _) in cells if s == site and "@" not in r}
    return set(comparisons(sorted(regimes)))


def _find(diffs, regime, ref, split, sub, region_vocabulary):
    for (r, f, sp, key), vals in diffs.items():
        if (r, f, sp) == (regime, ref, split) and subgroup_name(key, region_vocabulary) == sub:
            return vals
    return None


def pooled_differences(rows: list[dict]) -> list[dict]:
    """Random-effects pooling of the sites' differences per comparison, split and subgroup."""
    df = pd.DataFrame(rows)
    out = []
    if df.empty:
        return out
    for (regime, ref, split, sub), g in df.groupby(["regime", "reference", "split", "subgroup"], sort=True):
        ok = g[g["status"] == "ok"]
        base = {"site": POOLED, "regime": regime, "reference": ref, "split": split, "subgroup": sub,
                "family": "primary" if sub == "all" else "subgroup", "method": "random-effects",
                "replicates": int(g["replicates"].max())}
        if len(ok) < 2:
            out.append({**base, "status": "not_computable", "n_sites": len(ok),
                        "note": "fewer than 2 sites released this difference"})
            continue
        res = random_effects(ok["diff"].to_numpy(float), ok["se"].to_numpy(float) ** 2)
        if res["status"] != "ok":
            out.append({**base, "status": "not_computable", "n_sites": res["n_sites"],
                        "note": "sites' variances do not allow pooling"})
            continue
        out.append({**base, "diff": res["estimate"], "lo": res["lo"], "hi": res["hi"], "p": res["p"],
                    "se": res["se"], "n": int(ok["n"].sum()), "positives": int(ok["positives"].sum()),
                    "status": "ok", "tau2": res["tau2"], "i2": res["i2"], "n_sites": res["n_sites"]})
    return out


def adjust(rows: list[dict], key: str = "family") -> None:
    """Holm's adjustment within each family, in place (rows without p keep p_adj empty)."""
    fams: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        fams.setdefault(r.get(key, ""), []).append(i)
    for idx in fams.values():
        p = [rows[i].get("p", math.nan) for i in idx]
        p = [x if isinstance(x, (int, float)) and math.isfinite(x) else math.nan for x in p]
        for i, a in zip(idx, holm(p)):
            rows[i]["p_adj"] = float(a) if math.isfinite(a) else None


def size_effects(rows: list[dict], n_train: dict[str, int]) -> list[dict]:
    """Meta-regression of each comparison's site differences (subgroup all) on log2 training notes."""
    out = []
    df = pd.DataFrame([r for r in rows if r["site"] != POOLED and r["subgroup"] == "all" and r["status"] == "ok"])
    if df.empty:
        return out
    for (regime, ref, split), g in df.groupby(["regime", "reference", "split"], sort=True):
        g = g[g["site"].map(lambda s: n_train.get(s, 0) > 0)]
        x = np.log2(g["site"].map(n_train).to_numpy(float))
        res = meta_regression(g["diff"].to_numpy(float), g["se"].to_numpy(float) ** 2, x)
        row = {"regime": regime, "reference": ref, "split": split, "covariate": SIZE_COVARIATE,
               "n_sites": res["n_sites"], "family": "size"}
        if res["status"] == "ok":
            out.append({**row, "slope": res["slope"], "lo": res["lo"], "hi": res["hi"], "p": res["p"], "note": ""})
        else:
            out.append({**row, "note": {"too_few_sites": "fewer than 3 sites released this difference",
                                        "no_spread": "all sites have the same size"}.get(res["status"], "")})
    adjust(out)
    return out


def calibration_rows(released: dict[str, dict[str, float]], metrics: pd.DataFrame) -> list[dict]:
    """Per site, regime and split: ECE from its released bins, the recalibration fit, the bins;
    pooled: bins summed over the sites that released them, ECE from those, random-effects slope/intercept."""
    cells = _cells(metrics)
    rows: list[dict] = []
    nb = len(CAL_EDGES) - 1
    pooled_bins: dict[tuple, np.ndarray] = {}
    fits: dict[tuple, list[tuple[str, dict]]] = {}
    for site, m in sorted(released.items()):
        for (regime, split), parts in sorted(parse_calibration(m).items()):
            fit = parts.get("all", {})
            arr = np.full((nb, 3), np.nan)
            for i in range(nb):
                b = parts.get(f"bin{i}", {})
                if "n" in b:
                    arr[i] = (b["n"], b["positives"], b["sum_p"])
            rows.extend(_cal_site_rows(site, regime, split, fit, arr))
            acc = pooled_bins.setdefault((regime, split), np.zeros((nb, 3)))
            acc += np.nan_to_num(arr)
            fits.setdefault((regime, split), []).append((site, fit))
    for site, regime, split, sub in cells:  # a split whose whole cell is withheld releases no calibration
        if sub == "all" and cells[(site, regime, split, sub)]["status"] == "suppressed" and site in released \
                and "@" not in regime and split in ("test", "temporal"):
            rows.append({"site": site, "regime": regime, "split": split, "metric": "ece", "value": None,
                         "status": "suppressed"})
    for (regime, split), acc in sorted(pooled_bins.items()):
        rows.append(_ece_row(POOLED, regime, split, acc, empty="not_computable"))
        rows.extend(_bin_rows(POOLED, regime, split, acc))
        for name in ("slope", "intercept"):
            ok = [f for _, f in fits[(regime, split)] if name in f]
            est = [f[name] for f in ok]
            var = [((f[f"{name}_hi"] - f[f"{name}_lo"]) / (2 * Z95)) ** 2 for f in ok]
            res = random_effects(est, var) if len(ok) >= 2 else {"status": "too_few"}
            if res["status"] == "ok":
                rows += [{"site": POOLED, "regime": regime, "split": split, "metric": name, "value": res["estimate"],
                          "status": "ok"},
                         {"site": POOLED, "regime": regime, "split": split, "metric": f"{name}_lo",
                          "value": res["lo"], "status": "ok"},
                         {"site": POOLED, "regime": regime, "split": split, "metric": f"{name}_hi",
                          "value": res["hi"], "status": "ok"}]
    return rows


def _cal_site_rows(site, regime, split, fit, arr) -> list[dict]:
    rows = []
    if "not_computable" in fit:
        rows.append({"site": site, "regime": regime, "split": split, "metric": "slope", "value": None,
                     "status": "not_computable"})
    for name in ("slope", "slope_lo", "slope_hi", "intercept", "intercept_lo", "intercept_hi"):
        if name in fit:
            rows.append({"site": site, "regime": regime, "split": split, "metric": name, "value": fit[name],
                         "status": "ok"})
    rows.append(_ece_row(site, regime, split, arr, empty="suppressed"))
    rows.extend(_bin_rows(site, regime, split, arr))
    return rows


def _ece_row(site, regime, split, arr, empty: str) -> dict:
    """ECE from bin aggregates (n, positives, sum of p per bin; NaN where withheld); `empty`:
    the status when no bin holds anyone (a site's: all withheld; the pool's: nothing to pool)."""
    ece = calibration_from_bins(CalibrationBins(edges=tuple(CAL_EDGES), n=arr[:, 0], positives=arr[:, 1],
                                                sum_p=arr[:, 2]))
    none = ece["status"] == "empty"
    return {"site": site, "regime": regime, "split": split, "metric": "ece",
            "value": None if none else ece["ece"], "status": empty if none else "ok"}


def _bin_rows(site, regime, split, arr) -> list[dict]:
    rows = []
    for i in range(len(arr)):
        n, pos, sp = arr[i]
        status = "ok" if np.isfinite(n) else "suppressed"
        vals = {"lo": CAL_EDGES[i], "hi": CAL_EDGES[i + 1], "n": n, "positives": pos,
                "mean_p": sp / n if np.isfinite(n) and n > 0 else math.nan}
        for name, v in vals.items():
            shown = name in ("lo", "hi") or status == "ok"
            rows.append({"site": site, "regime": regime, "split": split, "metric": f"bin{i}_{name}",
                         "value": float(v) if shown and np.isfinite(v) else None,
                         "status": "ok" if name in ("lo", "hi") else status})
    return rows


def subgroup_gaps(metrics: pd.DataFrame) -> list[dict]:
    """Per site, regime, split and grouping: the best- minus the worst-served released band."""
    cells = _cells(metrics)
    groups: dict[tuple, dict[str, tuple[float, float]]] = {}
    for (site, regime, split, sub), c in cells.items():
        if sub == "all" or "=" not in sub or "@" in regime or split not in ("test", "temporal"):
            continue
        grouping = sub.split("=", 1)[0]
        g = groups.setdefault((site, regime, split, grouping), {})
        if c["status"] == "ok" and {"auc", "auc_lo", "auc_hi"} <= set(c):
            g[sub] = (c["auc"], auc_variance_from_interval(c["auc"], c["auc_lo"], c["auc_hi"]))
    rows = []
    for (site, regime, split, grouping), bands in sorted(groups.items()):
        res = band_gap(bands)
        row = {"site": site, "regime": regime, "split": split, "grouping": grouping, "family": "gap"}
        if res["status"] == "ok":
            rows.append({**row, "best": res["best"].split("=", 1)[1], "worst": res["worst"].split("=", 1)[1],
                         "gap": res["gap"], "lo": res["lo"], "hi": res["hi"], "p": res["p"], "se": res["se"],
                         "status": "ok"})
        else:
            rows.append({**row, "status": "not_computable"})
    rows += _pooled_gaps(rows)
    adjust(rows)
    return rows


def _pooled_gaps(rows: list[dict]) -> list[dict]:
    """The sites' best-minus-worst gaps pooled by random effects: how unevenly a regime serves a
    grouping's bands on average. Bands are named only where every site's best (worst) is the same."""
    out = []
    df = pd.DataFrame([r for r in rows if r["status"] == "ok"])
    if df.empty:
        return out
    for (regime, split, grouping), g in df.groupby(["regime", "split", "grouping"], sort=True):
        row = {"site": POOLED, "regime": regime, "split": split, "grouping": grouping, "family": "gap"}
        res = random_effects(g["gap"].to_numpy(float), g["se"].to_numpy(float) ** 2) if len(g) >= 2 else None
        if res is None or res["status"] != "ok":
            out.append({**row, "status": "not_computable"})
            continue
        same = lambda col: g[col].iloc[0] if g[col].nunique() == 1 else None  # noqa: E731
        out.append({**row, "best": same("best"), "worst": same("worst"), "gap": res["estimate"], "lo": res["lo"],
                    "hi": res["hi"], "p": res["p"], "status": "ok"})
    return out


def write_findings(run_dir: Path, released: dict[str, dict[str, float]], metrics: pd.DataFrame,
                   n_train: dict[str, int], region_vocabulary="") -> dict[str, pd.DataFrame]:
    """Write the four files; returns them as frames (differences.csv's site rows keep their se,
    which `combine_replicates` needs)."""
    run_dir = Path(run_dir)
    frames = _differences_frames(site_differences(released, metrics, region_vocabulary), n_train)
    frames["calibration"] = pd.DataFrame(calibration_rows(released, metrics), columns=CAL_COLUMNS)
    frames["subgroup_gaps"] = pd.DataFrame(subgroup_gaps(metrics), columns=GAP_COLUMNS)
    for name, df in frames.items():
        df.to_csv(run_dir / f"{name}.csv", index=False)
    return frames


def _differences_frames(site_rows: list[dict], n_train: dict[str, int]) -> dict[str, pd.DataFrame]:
    rows = site_rows + pooled_differences(site_rows)
    adjust(rows)
    return {"differences": pd.DataFrame(rows, columns=DIFF_COLUMNS + ["se"]),
            "size_effects": pd.DataFrame(size_effects(rows, n_train), columns=SIZE_COLUMNS)}


# ------------------------------------------------------------------ replicates
KEY = ["site", "regime", "reference", "split", "subgroup"]


def combine_replicates(run_dirs: list[Path], out: Path) -> dict[str, pd.DataFrame]:
    """Combine the differences of studies that differ only in their training seed (same splits).

    Each seed is one draw of the training's randomness on the same patients, so the per-seed
    differences are combined like multiple imputations (Rubin's rules): the mean difference,
    with variance = mean within-seed variance + (1 + 1/N) × between-seed variance. Pooling,
    Holm and the size meta-regression are then redone on the combined site rows.
    `consistent` counts the seeds whose own interval excludes 0 on the combined estimate's side.
    Per-seed rows go to replicates.csv; per site, regime and split, the AUC's mean and spread
    across seeds to replicate_aucs.csv."""
    out = Path(out)
    per = []
    for r, d in enumerate(run_dirs, start=1):
        df = pd.read_csv(Path(d) / "differences.csv")
        per.append(df[df["site"] != POOLED].assign(replicate=r))
    allrows = pd.concat(per, ignore_index=True)
    allrows[["replicate"] + DIFF_COLUMNS].to_csv(out / "replicates.csv", index=False)
    n = len(run_dirs)
    rows = []
    for key, g in allrows.groupby(KEY, sort=True, dropna=False):
        first = g.iloc[0].to_dict()
        base = {**dict(zip(KEY, key)), "family": first["family"], "replicates": n}
        ok = g[g["status"] == "ok"]
        if len(ok) < n:  # suppressed (the same in every seed: same splits) or not computable in some seed
            status = "suppressed" if (g["status"] == "suppressed").any() else "not_computable"
            rows.append({**base, "status": status, "replicates": len(ok),
                         "note": first.get("note") if isinstance(first.get("note"), str) else
                         f"computable in {len(ok)} of {n} replicates"})
            continue
        d, v = ok["diff"].to_numpy(float), ok["se"].to_numpy(float) ** 2
        est = float(d.mean())
        var = float(v.mean() + (1 + 1 / n) * (d.var(ddof=1) if n > 1 else 0.0))
        se = math.sqrt(var)
        p = float(2 * norm.sf(abs(est) / se)) if se > 0 else (1.0 if est == 0 else 0.0)
        side = np.sign(est)
        consistent = int(((ok["lo"] > 0) & (side > 0) | (ok["hi"] < 0) & (side < 0)).sum())
        rows.append({**base, "diff": est, "lo": est - Z95 * se, "hi": est + Z95 * se, "p": p, "se": se,
                     "n": first["n"], "positives": first["positives"], "method": first["method"],
                     "status": "ok", "consistent": consistent})
    sites = pd.read_csv(Path(run_dirs[0]) / "sites.csv")
    n_train = {r.site: int(r.n_train) for r in sites.itertuples() if pd.notna(r.n_train)}
    frames = _differences_frames(rows, n_train)
    aucs = []
    for r, d in enumerate(run_dirs, start=1):
        m = pd.read_csv(Path(d) / "metrics.csv")
        m = m[(m["metric"] == "auc") & (m["subgroup"] == "all") & (m["status"] == "ok")]
        aucs.append(m[["site", "regime", "split", "value"]].assign(replicate=r))
    a = pd.concat(aucs, ignore_index=True).groupby(["site", "regime", "split"])["value"]
    frames["replicate_aucs"] = a.agg(mean="mean", sd="std", min="min", max="max",
                                     replicates="count").reset_index()
    for name, df in frames.items():
        df.to_csv(out / f"{name}.csv", index=False)
    return frames
