"""Drivers of (mis)generalization and site-level analysis, rebuilt from RUN_DIR's files alone.

Why a separate module: the report only renders; every number it states about
drivers, subgroups and "who is served worst" is computed here, from the same
files, so the analysis can be rerun and tested on fixture files without a
model. Inputs (all optional; whatever is missing is skipped with a note):
``metrics.csv``, ``sites.csv``, ``descriptors.csv``, ``driver_importances.csv``,
``run.json`` and the study's tested comparisons (``differences.csv``,
``size_effects.csv``, ``calibration.csv``, ``subgroup_gaps.csv``). Outputs:
``drivers.csv`` and ``site_analysis.csv`` in RUN_DIR, plus a summary dict for
the report, whose verdicts call a regime better or worse only where the
Holm-adjusted p of differences.csv is below ALPHA (``verdict``).

Privacy rule enforced here, not trusted upstream: a cell or descriptor whose
status is ``suppressed`` is read as missing, even if the file carries a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from clinfed.common.config import REGIMES
from clinfed.common.metrics import METRIC_COLUMNS

KNOWN_REGIMES = list(REGIMES)
KNOWN_SPLITS = ["test", "temporal"]
SITE_COLUMNS = ["site", "n_train", "n_val", "n_test", "n_temporal"]
GROUPINGS = ["age", "comorbidity", "insurance", "region", "words"]
SUBGROUP_ORDER = {
    "age": ["<45", "45-64", "65-79", "80+"],
    "comorbidity": ["0", "1-2", "3-4", "5+"],
    "insurance": ["commercial", "government", "self_pay", "unspecified", "other"],
    "words": ["q1", "q2", "q3", "q4"],
}
MIN_SITES_RHO = 4
MAX_COLLINEAR_R = 0.95
# `n` (site size) is excluded from the regression's "other" descriptors: it is log n_train again.
SIZE_DESCRIPTORS = {"n", "n_train"}

PATIENT_METHOD = ("spread of the global model's within-band AUC around the site AUC, less DeLong variance "
                  "(common.error_drivers), n-weighted across sites")
SPEARMAN_METHOD = "Spearman rho across sites (target vs descriptor; n_train on log scale, rank-invariant)"
GAP_NOTE = ("global_gap = AUC(global at site) - pooled AUC, pooled = n-weighted mean of the sites' global AUC "
            "(best available aggregate proxy: a true pooled AUC needs patient-level scores)")
DRIVER_COLUMNS = ["level", "target", "split", "driver", "importance", "rank", "n", "n_sites",
                  "importance_unweighted", "method", "note"]
REGRESSION_COLUMNS = ["target", "split", "term", "coef", "n_sites", "r2", "note"]
TARGET_COLUMNS = ["site", "target", "split", "value", "n_train"]
POOLED_COLUMNS = ["grouping", "subgroup", "regime", "split", "auc", "n", "n_sites", "n_suppressed"]
BY_SITE_COLUMNS = ["site", "grouping", "subgroup", "regime", "split", "auc", "n", "status"]


# --------------------------------------------------------------------------- inputs


def read_csv(path: Path) -> pd.DataFrame | None:
    """Strings first so empty cells stay empty; None when the file is absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None


def read_metrics(run_dir) -> pd.DataFrame:
    """metrics.csv with numbers coerced and every suppressed value and n blanked."""
    df = read_csv(Path(run_dir) / "metrics.csv")
    if df is None:
        df = pd.DataFrame(columns=METRIC_COLUMNS)
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    for col in ["site", "regime", "split", "subgroup", "metric", "status", "note"]:
        df[col] = df[col].astype(str).str.strip()
    df["subgroup"] = df["subgroup"].replace("", "all")
    df["status"] = df["status"].str.lower()
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["n"] = pd.to_numeric(df["n"], errors="coerce")
    # Missing status: a number means ok, no number means nothing to show.
    df.loc[(df["status"] == "") & df["value"].notna(), "status"] = "ok"
    # Never carry a suppressed number past this point.
    supp = df["status"] == "suppressed"
    df.loc[supp, "value"] = np.nan
    df.loc[supp, "n"] = np.nan
    # DP accounting rows (dp_epsilon...) are not evaluation cells: the privacy section reads run.json
    keep = (df["site"] != "") & ~df["metric"].str.startswith("dp_")
    return df[keep].reset_index(drop=True)


def read_sites(run_dir, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """Sites from sites.csv plus any site seen only in metrics.csv (size unknown), largest first."""
    df = read_csv(Path(run_dir) / "sites.csv")
    if df is None:
        df = pd.DataFrame(columns=SITE_COLUMNS)
    for col in SITE_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df["site"] = df["site"].astype(str).str.strip()
    for col in SITE_COLUMNS[1:]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    if metrics is not None:
        extra = sorted(set(metrics["site"]) - set(df["site"]))
        if extra:
            df = pd.concat([df, pd.DataFrame({"site": extra})], ignore_index=True)
    df = df[df["site"] != ""].drop_duplicates("site")
    df = df.assign(_missing=df["n_train"].isna()).sort_values(
        ["_missing", "n_train", "site"], ascending=[True, False, True]
    )
    return df.drop(columns="_missing").reset_index(drop=True)


def read_run(run_dir) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"status": "unknown", "errors": [f"run.json could not be read: {exc}"]}
    return data if isinstance(data, dict) else {}


def read_descriptors(run_dir) -> pd.DataFrame:
    """Wide site × descriptor table (floats); suppressed or non-numeric descriptors are NaN."""
    df = read_csv(Path(run_dir) / "descriptors.csv")
    if df is None or not {"site", "descriptor", "value"} <= set(df.columns):
        return pd.DataFrame(dtype=float)
    if "status" not in df.columns:
        df["status"] = ""
    df["site"] = df["site"].astype(str).str.strip()
    df["descriptor"] = df["descriptor"].astype(str).str.strip()
    status = df["status"].astype(str).str.strip().str.lower()
    # Blank status: a number counts as ok (as in metrics.csv); anything else is withheld.
    val = pd.to_numeric(df["value"], errors="coerce").where(status.isin(["ok", ""]))
    long = pd.DataFrame({"site": df["site"], "descriptor": df["descriptor"], "value": val.astype(float)})
    long = long[(long["site"] != "") & (long["descriptor"] != "")]
    if long.empty:
        return pd.DataFrame(dtype=float)
    order = list(dict.fromkeys(long["descriptor"]))
    wide = long.groupby(["site", "descriptor"], sort=False)["value"].first().unstack("descriptor")
    return wide.reindex(columns=order).astype(float)


def read_driver_importances(run_dir) -> pd.DataFrame:
    cols = ["site", "driver", "importance", "n"]
    df = read_csv(Path(run_dir) / "driver_importances.csv")
    if df is None or not {"driver", "importance"} <= set(df.columns):
        return pd.DataFrame(columns=cols)
    for c in cols:
        if c not in df.columns:
            df[c] = ""
    df = df[cols].copy()
    df["site"] = df["site"].astype(str).str.strip()
    df["driver"] = df["driver"].astype(str).str.strip()
    df["importance"] = pd.to_numeric(df["importance"], errors="coerce")
    df["n"] = pd.to_numeric(df["n"], errors="coerce")
    return df[df["driver"] != ""].reset_index(drop=True)


def ordered(values, known: list[str]) -> list[str]:
    """Known names first in their canonical order, then the rest alphabetically."""
    present = [v for v in dict.fromkeys(values) if v != ""]
    return [k for k in known if k in present] + sorted(v for v in present if v not in known)


def gain_regimes(regimes) -> list[str]:
    """Regimes compared against global: all but base/global and cross-site (`x@site`) ones."""
    return [r for r in regimes if r not in ("base", "global") and "@" not in r]


def split_subgroup(sub: str) -> tuple[str, str]:
    """'age=80+' -> ('age', '80+'); anything without '=' is its own grouping."""
    if "=" in sub:
        g, v = sub.split("=", 1)
        return g.strip(), v.strip()
    return sub, ""


def subgroup_sort_key(sub: str) -> tuple:
    g, v = split_subgroup(sub)
    gi = GROUPINGS.index(g) if g in GROUPINGS else len(GROUPINGS)
    order = SUBGROUP_ORDER.get(g, [])
    vi = order.index(v) if v in order else len(order)
    return (gi, g, vi, v)


# --------------------------------------------------------------------------- cells


def auc_cells(metrics: pd.DataFrame, subgroup: str | None = "all") -> pd.DataFrame:
    """Usable AUC cells: status ok and a finite value (suppressed/not computable are dropped)."""
    m = metrics[(metrics["metric"] == "auc") & (metrics["status"] == "ok") & metrics["value"].notna()]
    if subgroup is not None:
        m = m[m["subgroup"] == subgroup]
    return m[["site", "regime", "split", "subgroup", "value", "n"]].rename(columns={"value": "auc"})


def _wmean(values, weights) -> float:
    v, w = np.asarray(values, float), np.asarray(weights, float)
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return math.nan
    return float(np.sum(v[ok] * w[ok]) / np.sum(w[ok]))


def pooled_global_auc(metrics: pd.DataFrame) -> dict[str, float]:
    """Per split: n-weighted mean of the sites' global AUC (the aggregate proxy for global_gap)."""
    cells = auc_cells(metrics)
    g = cells[cells["regime"] == "global"]
    return {sp: _wmean(d["auc"], d["n"]) for sp, d in g.groupby("split", sort=False)}


def site_targets(metrics: pd.DataFrame, sites_df: pd.DataFrame) -> pd.DataFrame:
    """Per site × split: `gain:R` = AUC(R) − AUC(global) and `global_gap`, subgroup all."""
    cells = auc_cells(metrics)
    n_train = dict(zip(sites_df["site"], sites_df["n_train"]))
    auc = {(r.site, r.regime, r.split): r.auc for r in cells.itertuples(index=False)}
    regimes = ordered(cells["regime"], KNOWN_REGIMES)
    splits = ordered(cells["split"], KNOWN_SPLITS)
    pooled = pooled_global_auc(metrics)
    rows = []
    for split in splits:
        for site in sites_df["site"]:
            g = auc.get((site, "global", split))
            if g is None:
                continue
            for r in gain_regimes(regimes):
                v = auc.get((site, r, split))
                if v is not None:
                    rows.append([site, f"gain:{r}", split, v - g, n_train.get(site, math.nan)])
            if np.isfinite(pooled.get(split, math.nan)):
                rows.append([site, "global_gap", split, g - pooled[split], n_train.get(site, math.nan)])
    return pd.DataFrame(rows, columns=TARGET_COLUMNS)


def subgroup_tables(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pooled, by_site) AUC per subgroup × regime × split, cross-site regimes excluded.

    Pooled = n-weighted mean of the sites' non-suppressed AUC cells, with the count of
    sites contributing and of sites whose cell was suppressed. by_site keeps each cell,
    with ``auc`` NaN (never a number) when it was suppressed.
    """
    m = metrics[(metrics["metric"] == "auc") & (metrics["subgroup"] != "all")
                & ~metrics["regime"].str.contains("@", regex=False)]
    if m.empty:
        return pd.DataFrame(columns=POOLED_COLUMNS), pd.DataFrame(columns=BY_SITE_COLUMNS)
    by_site = pd.DataFrame({
        "site": m["site"], "grouping": [split_subgroup(s)[0] for s in m["subgroup"]],
        "subgroup": m["subgroup"], "regime": m["regime"], "split": m["split"],
        "auc": m["value"].where(m["status"] == "ok"), "n": m["n"].where(m["status"] == "ok"),
        "status": m["status"],
    })
    rows = []
    for (sub, reg, sp), d in by_site.groupby(["subgroup", "regime", "split"], sort=False):
        ok = d[d["auc"].notna() & d["n"].notna() & (d["n"] > 0)]
        rows.append([split_subgroup(sub)[0], sub, reg, sp, _wmean(ok["auc"], ok["n"]),
                     float(ok["n"].sum()) if len(ok) else math.nan, int(len(ok)),
                     int((d["status"] == "suppressed").sum())])
    pooled = pd.DataFrame(rows, columns=POOLED_COLUMNS)
    reg_order = ordered(pooled["regime"], KNOWN_REGIMES)
    sp_order = ordered(pooled["split"], KNOWN_SPLITS)
    pooled = pooled.assign(
        _k=[subgroup_sort_key(s) for s in pooled["subgroup"]],
        _r=[reg_order.index(r) for r in pooled["regime"]],
        _s=[sp_order.index(s) for s in pooled["split"]],
    ).sort_values(["_k", "_r", "_s"]).drop(columns=["_k", "_r", "_s"]).reset_index(drop=True)
    by_site = by_site.assign(_k=[subgroup_sort_key(s) for s in by_site["subgroup"]]).sort_values(
        ["_k", "regime", "split", "site"]).drop(columns="_k").reset_index(drop=True)
    return pooled, by_site


# --------------------------------------------------------------------------- drivers


def patient_drivers(imp: pd.DataFrame) -> pd.DataFrame:
    """n-weighted mean of the sites' importances per feature group; rank 1 = most important."""
    rows = []
    for driver, d in imp.groupby("driver", sort=False):
        ok = d[d["importance"].notna() & d["n"].notna() & (d["n"] > 0)]
        dropped = len(d) - len(ok)
        note = f"{dropped} site row(s) without importance or n left out" if dropped else ""
        rows.append({"level": "patient", "target": "error:global", "split": "test", "driver": driver,
                     "importance": _wmean(ok["importance"], ok["n"]),
                     "n": float(ok["n"].sum()) if len(ok) else math.nan, "n_sites": int(ok["site"].nunique()),
                     "importance_unweighted": float(ok["importance"].mean()) if len(ok) else math.nan,
                     "method": PATIENT_METHOD, "note": note})
    df = pd.DataFrame(rows, columns=DRIVER_COLUMNS)
    if df.empty:
        return df
    df["rank"] = df["importance"].rank(ascending=False, method="min")
    return df.sort_values(["rank", "driver"], na_position="last").reset_index(drop=True)


def _spearman(x, y) -> tuple[float, int, str]:
    """(rho, n pairs, note); NaN pairs dropped, NaN rho with a reason below MIN_SITES_RHO or on ties."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < MIN_SITES_RHO:
        return math.nan, n, f"skipped: {n} site(s) with both values, need at least {MIN_SITES_RHO}"
    if np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, n, "rho undefined: constant across sites"
    return float(stats.spearmanr(x[ok], y[ok])[0]), n, ""


def _site_frame(targets: pd.DataFrame, descriptors: pd.DataFrame, sites_df: pd.DataFrame,
                target: str, split: str) -> pd.DataFrame:
    """One row per site: the target's value, log10 n_train and every descriptor."""
    t = targets[(targets["target"] == target) & (targets["split"] == split)].set_index("site")["value"]
    frame = pd.DataFrame({"target": t})
    ntr = sites_df.set_index("site")["n_train"].reindex(frame.index).astype(float)
    frame["n_train"] = np.log10(ntr.where(ntr > 0))
    if not descriptors.empty:
        for c in descriptors.columns:
            if c not in frame.columns:
                frame[c] = descriptors[c].reindex(frame.index)
    return frame


def site_drivers(targets: pd.DataFrame, descriptors: pd.DataFrame, sites_df: pd.DataFrame
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(drivers rows at site level, regression rows) for every target × split present."""
    drows, rrows = [], []
    for (target, split), _ in targets.groupby(["target", "split"], sort=False):
        frame = _site_frame(targets, descriptors, sites_df, target, split)
        rhos = {}
        method = SPEARMAN_METHOD + ("; " + GAP_NOTE if target == "global_gap" else "")
        block = []
        for d in frame.columns.drop("target"):
            rho, n, note = _spearman(frame[d], frame["target"])
            rhos[d] = rho
            block.append({"level": "site", "target": target, "split": split, "driver": d, "importance": rho,
                          "n": n, "n_sites": n, "importance_unweighted": math.nan, "method": method,
                          "note": note})
        bdf = pd.DataFrame(block, columns=DRIVER_COLUMNS)
        # Rounded so that floating-point noise does not split exact ties (e.g. several |rho| = 1).
        bdf["rank"] = bdf["importance"].abs().round(9).rank(ascending=False, method="min")
        drows.append(bdf.sort_values(["rank", "driver"], na_position="last"))
        rrows.extend(_regression(frame, rhos, target, split))
    drivers = pd.concat(drows, ignore_index=True) if drows else pd.DataFrame(columns=DRIVER_COLUMNS)
    return drivers, pd.DataFrame(rrows, columns=REGRESSION_COLUMNS)


def _regression(frame: pd.DataFrame, rhos: dict, target: str, split: str) -> list[dict]:
    """OLS of the target on standardized log n_train + the two descriptors with the largest |rho|.

    Descriptors are picked among those complete and non-constant on the sites used, skipping
    near-copies (|Pearson r| > MAX_COLLINEAR_R) of a chosen term; the number of terms is cut
    so that at least one residual degree of freedom remains.
    """
    base = frame[frame["target"].notna() & frame["n_train"].notna()]
    n = len(base)

    def row(term, coef=math.nan, r2=math.nan, note=""):
        return {"target": target, "split": split, "term": term, "coef": coef, "n_sites": n, "r2": r2, "note": note}

    if n < MIN_SITES_RHO:
        return [row("", note=f"skipped: {n} site(s) with the target and n_train, need at least {MIN_SITES_RHO}")]
    if np.ptp(base["n_train"]) == 0:
        return [row("", note="skipped: n_train is the same at every site")]
    candidates = [d for d in sorted((d for d in rhos if d not in SIZE_DESCRIPTORS and np.isfinite(rhos[d])),
                                    key=lambda d: (-abs(rhos[d]), d))
                  if base[d].notna().all() and np.ptp(base[d]) > 0]
    terms, collinear = ["n_train"], []
    for d in candidates:
        if len(terms) - 1 >= min(2, n - 3):
            break
        # A near-copy of a chosen term makes the split between them arbitrary: take the next one.
        if any(abs(np.corrcoef(base[d], base[t])[0, 1]) > MAX_COLLINEAR_R for t in terms):
            collinear.append(d)
            continue
        terms.append(d)
    X = np.column_stack([np.ones(n)] + [(base[t] - base[t].mean()) / base[t].std(ddof=0) for t in terms])
    y = base["target"].to_numpy(float)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - float(np.sum((y - X @ coef) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    note = f"{n - len(terms) - 1} residual df; descriptive only"
    if len(terms) < 3:
        note += "; fewer than 2 other descriptors (too few sites or usable descriptors)"
    if collinear:
        note += f"; skipped as collinear (|r| > {MAX_COLLINEAR_R}) with a chosen term: {', '.join(collinear)}"
    names = ["intercept"] + ["z:log10_n_train" if t == "n_train" else f"z:{t}" for t in terms]
    return [row(name, float(c), r2, note) for name, c in zip(names, coef)]


# --------------------------------------------------------------------------- tested comparisons (issue 19)

ALPHA = 0.05  # a regime is called better or worse only where its Holm-adjusted p is below this
I2_SITE_SPECIFIC = 0.5  # I² above this: the sites disagree more than sampling error explains
DIFF_COLUMNS = ["site", "regime", "reference", "split", "subgroup", "family", "diff", "lo", "hi", "p", "p_adj",
                "n", "positives", "method", "status", "replicates", "consistent", "tau2", "i2", "n_sites", "note"]
SIZE_COLUMNS = ["regime", "reference", "split", "covariate", "slope", "lo", "hi", "p", "p_adj", "n_sites", "note"]
CALIBRATION_COLUMNS = ["site", "regime", "split", "metric", "value", "status"]
GAP_COLUMNS = ["site", "regime", "split", "grouping", "best", "worst", "gap", "lo", "hi", "p", "p_adj", "status"]
_DIFF_NUMBERS = ["diff", "lo", "hi", "p", "p_adj", "n", "positives", "replicates", "consistent", "tau2", "i2",
                 "n_sites"]
_DIFF_STATS = ["diff", "lo", "hi", "p", "p_adj", "consistent", "tau2", "i2"]
POOLED = "pooled"


def _tested_frame(run_dir, name: str, columns: list[str], numbers: list[str], stats_cols: list[str]
                  ) -> pd.DataFrame | None:
    """One of issue 19's files, typed; None when the run folder predates it (or it is unreadable).

    The privacy rule of ``read_metrics`` holds here too: a suppressed row keeps no number at all,
    whatever the file carries; a not-computable row keeps its counts but no statistic.
    """
    df = read_csv(Path(run_dir) / name)
    if df is None:
        return None
    df = df.copy()
    for col in columns:
        if col not in df.columns:
            df[col] = ""
    df = df[columns]
    for col in columns:
        if col not in numbers:
            df[col] = df[col].astype(str).str.strip()
    for col in numbers:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    if "status" in df.columns:
        df["status"] = df["status"].str.lower()
        first = stats_cols[0]
        df.loc[(df["status"] == "") & df[first].notna(), "status"] = "ok"
        df.loc[(df["status"] == "") & df[first].isna(), "status"] = "not_computable"
        supp = df["status"] == "suppressed"
        df.loc[supp, numbers] = np.nan
        df.loc[df["status"] == "not_computable", stats_cols] = np.nan
    if "subgroup" in df.columns:
        df["subgroup"] = df["subgroup"].replace("", "all")
    return df.reset_index(drop=True)


def read_differences(run_dir) -> pd.DataFrame | None:
    """differences.csv (paired AUC differences per site and pooled); None when absent."""
    df = _tested_frame(run_dir, "differences.csv", DIFF_COLUMNS, _DIFF_NUMBERS, _DIFF_STATS)
    if df is not None:
        df = df[(df["site"] != "") & (df["regime"] != "")].reset_index(drop=True)
        df.loc[df["family"] == "", "family"] = np.where(df.loc[df["family"] == "", "subgroup"] == "all",
                                                        "primary", "subgroup")
    return df


def read_size_effects(run_dir) -> pd.DataFrame | None:
    """size_effects.csv (meta-regression of the site differences on site size); None when absent."""
    return _tested_frame(run_dir, "size_effects.csv", SIZE_COLUMNS,
                         ["slope", "lo", "hi", "p", "p_adj", "n_sites"], ["slope", "lo", "hi", "p", "p_adj"])


def read_calibration(run_dir) -> pd.DataFrame | None:
    """calibration.csv in its long form (site, regime, split, metric, value, status); None when absent."""
    return _tested_frame(run_dir, "calibration.csv", CALIBRATION_COLUMNS, ["value"], ["value"])


def read_subgroup_gaps(run_dir) -> pd.DataFrame | None:
    """subgroup_gaps.csv (best- vs worst-served band per grouping); None when absent."""
    return _tested_frame(run_dir, "subgroup_gaps.csv", GAP_COLUMNS, ["gap", "lo", "hi", "p", "p_adj"],
                         ["gap", "lo", "hi", "p", "p_adj"])


def verdict(diff: float, p_adj: float, status: str = "ok") -> str:
    """'better' | 'worse' | 'none' (no detectable difference) | 'suppressed' | 'not_computable'.

    The only place a direction is decided: by the Holm-adjusted p, never by the point estimate.
    """
    if status == "suppressed":
        return "suppressed"
    if status not in ("ok", "") or not (np.isfinite(diff) and np.isfinite(p_adj)):
        return "not_computable"
    if p_adj < ALPHA and diff != 0:
        return "better" if diff > 0 else "worse"
    return "none"


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _diff_entry(r) -> dict:
    reps = _num(r["replicates"])
    return {"site": r["site"], "verdict": verdict(_num(r["diff"]), _num(r["p_adj"]), r["status"]),
            **{c: _num(r[c]) for c in _DIFF_NUMBERS}, "method": r["method"], "status": r["status"],
            "family": r["family"], "note": r["note"], "replicates": int(reps) if np.isfinite(reps) else 1}


def _heterogeneity(pooled: dict | None, site_rows: list[dict]) -> str:
    """'general' | 'site-specific' | 'heterogeneous' | 'none' | 'unknown': how the sites' results relate.

    general: the pooled test is significant and the sites agree (I² ≤ 50 %, no significant site
    row against it); site-specific: the pooled test is null but some site is significant, or the
    sites disagree (I² > 50 % or significant rows in both directions); none: nothing detectable.
    """
    sig = {e["verdict"] for e in site_rows if e["verdict"] in ("better", "worse")}
    i2 = pooled["i2"] if pooled else math.nan
    pv = pooled["verdict"] if pooled else "not_computable"
    if pv in ("better", "worse"):
        against = ({"better", "worse"} - {pv}) & sig
        if (np.isfinite(i2) and i2 > I2_SITE_SPECIFIC) or against:
            return "heterogeneous"
        return "general"
    if sig or (np.isfinite(i2) and i2 > I2_SITE_SPECIFIC):
        return "site-specific"
    if pv == "none":
        return "none"
    return "unknown"


def tested_comparisons(diffs: pd.DataFrame | None, site_order: list[str]) -> list[dict]:
    """Per regime × reference × split (subgroup all): each site's verdict and the pooled one."""
    if diffs is None or diffs.empty:
        return []
    d = diffs[diffs["subgroup"] == "all"]
    rank = {s: i for i, s in enumerate(site_order)}
    regimes = ordered(d["regime"], KNOWN_REGIMES)
    # regimes against global first (the study's question), then global against base
    refs = sorted(ordered(d["reference"], KNOWN_REGIMES), key=lambda r: r != "global")
    splits = ordered(d["split"], KNOWN_SPLITS)
    out = []
    for split in splits:
        for ref in refs:
            for reg in regimes:
                c = d[(d["regime"] == reg) & (d["reference"] == ref) & (d["split"] == split)]
                if c.empty:
                    continue
                rows = [_diff_entry(r) for _, r in c.iterrows()]
                pooled = next((e for e in rows if e["site"] == POOLED), None)
                sites = sorted((e for e in rows if e["site"] != POOLED),
                               key=lambda e: (rank.get(e["site"], len(rank)), e["site"]))
                reps = max([e["replicates"] for e in rows] or [1])
                out.append({"regime": reg, "reference": ref, "split": split, "sites": sites, "pooled": pooled,
                            "heterogeneity": _heterogeneity(pooled, sites), "replicates": reps})
    return out


def tested_subgroup_differences(diffs: pd.DataFrame | None, subgroup: str, split: str,
                                reference: str = "global") -> list[dict]:
    """Pooled rows of one subgroup (the second Holm family) against `reference`, one per regime."""
    if diffs is None or diffs.empty:
        return []
    d = diffs[(diffs["subgroup"] == subgroup) & (diffs["split"] == split) & (diffs["reference"] == reference)
              & (diffs["site"] == POOLED)]
    return [{"regime": r["regime"], **_diff_entry(r)} for _, r in d.iterrows()]


def size_verdicts(size: pd.DataFrame | None) -> list[dict]:
    """Per regime × reference × split: does the difference depend on site size (Holm-adjusted slope)?

    'small': negative slope, p_adj < ALPHA (the regime helps small sites more); 'large': positive;
    'none': no detectable size dependence; 'not_computable': no slope (too few sites).
    """
    if size is None or size.empty:
        return []
    out = []
    for _, r in size.iterrows():
        slope, p_adj = _num(r["slope"]), _num(r["p_adj"])
        if not (np.isfinite(slope) and np.isfinite(p_adj)):
            v = "not_computable"
        elif p_adj < ALPHA and slope != 0:
            v = "small" if slope < 0 else "large"
        else:
            v = "none"
        out.append({"regime": r["regime"], "reference": r["reference"] or "global", "split": r["split"],
                    "covariate": r["covariate"], "slope": slope, "lo": _num(r["lo"]), "hi": _num(r["hi"]),
                    "p": _num(r["p"]), "p_adj": p_adj, "n_sites": _num(r["n_sites"]), "note": r["note"],
                    "verdict": v})
    # the study's order: regimes against global first, in the known order; global against base last
    reg_order = ordered([v["regime"] for v in out], KNOWN_REGIMES)
    sp_order = ordered([v["split"] for v in out], KNOWN_SPLITS)
    return sorted(out, key=lambda v: (sp_order.index(v["split"]), v["reference"] != "global",
                                      reg_order.index(v["regime"])))


def widest_gaps(gaps: pd.DataFrame | None) -> list[dict]:
    """Per split × grouping: the widest released gap pooled over sites (and the widest at one site)."""
    if gaps is None or gaps.empty:
        return []
    ok = gaps[(gaps["status"] == "ok") & gaps["gap"].notna()]
    out = []
    for split in ordered(ok["split"], KNOWN_SPLITS):
        for grouping in ordered(ok.loc[ok["split"] == split, "grouping"], GROUPINGS):
            g = ok[(ok["split"] == split) & (ok["grouping"] == grouping)]
            entry: dict[str, Any] = {"split": split, "grouping": grouping, "pooled": None, "site": None}
            for key, part in (("pooled", g[g["site"] == POOLED]), ("site", g[g["site"] != POOLED])):
                if part.empty:
                    continue
                r = part.loc[part["gap"].idxmax()]
                p_adj = _num(r["p_adj"])
                entry[key] = {"site": r["site"], "regime": r["regime"], "best": r["best"], "worst": r["worst"],
                              "gap": _num(r["gap"]), "lo": _num(r["lo"]), "hi": _num(r["hi"]), "p": _num(r["p"]),
                              "p_adj": p_adj, "significant": bool(np.isfinite(p_adj) and p_adj < ALPHA)}
            out.append(entry)
    return out


def calibration_table(calib: pd.DataFrame | None) -> pd.DataFrame:
    """Wide: one row per site × regime × split with every metric as a column; NaN where withheld."""
    if calib is None or calib.empty:
        return pd.DataFrame(columns=["site", "regime", "split", "status"])
    c = calib[(calib["site"] != "") & (calib["metric"] != "")]
    wide = c.pivot_table(index=["site", "regime", "split"], columns="metric", values="value",
                         aggfunc="first", dropna=False)
    status = c.groupby(["site", "regime", "split"])["status"].agg(
        lambda s: "suppressed" if (s == "suppressed").all() else "ok" if (s == "ok").any() else s.iloc[0])
    wide = wide.reindex(status.index)
    wide["status"] = status
    return wide.reset_index()


def replicate_findings(comparisons: list[dict]) -> list[dict]:
    """Every significant verdict (site or pooled) with the number of replicates it holds in."""
    out = []
    for c in comparisons:
        if c["replicates"] <= 1:
            continue
        for e in c["sites"] + ([c["pooled"]] if c["pooled"] else []):
            if e["verdict"] in ("better", "worse"):
                cons = e["consistent"]
                out.append({"regime": c["regime"], "reference": c["reference"], "split": c["split"],
                            "site": e["site"], "verdict": e["verdict"], "replicates": e["replicates"],
                            "consistent": int(cons) if np.isfinite(cons) else None,
                            "holds_in_all": bool(np.isfinite(cons) and cons >= e["replicates"])})
    return out


def tested_summary(run_dir, site_order: list[str]) -> dict:
    """Structured verdicts from issue 19's files; each part empty (and ``available`` False) without them."""
    diffs = read_differences(run_dir)
    size = read_size_effects(run_dir)
    calib = read_calibration(run_dir)
    gaps = read_subgroup_gaps(run_dir)
    comparisons = tested_comparisons(diffs, site_order)
    return {"available": {"differences": diffs is not None, "size_effects": size is not None,
                          "calibration": calib is not None, "subgroup_gaps": gaps is not None},
            "alpha": ALPHA, "comparisons": comparisons, "size": size_verdicts(size),
            "gaps": widest_gaps(gaps), "replicates": replicate_findings(comparisons),
            "max_replicates": max([c["replicates"] for c in comparisons] or [1]),
            "tables": {"differences": diffs, "size_effects": size, "calibration": calib,
                       "calibration_wide": calibration_table(calib), "subgroup_gaps": gaps}}


def site_verdict(tests: dict, site: str, split: str, reference: str = "global") -> list[dict]:
    """Every regime's tested entry against `reference` at one site and split (for 'who is served worst')."""
    out = []
    for c in tests.get("comparisons", []):
        if c["split"] != split or c["reference"] != reference:
            continue
        e = next((e for e in c["sites"] if e["site"] == site), None)
        if e is not None:
            out.append({"regime": c["regime"], **e})
    return out


# --------------------------------------------------------------------------- summary


def _paired_gain(by_site: pd.DataFrame, subgroup: str, regime: str, split: str) -> tuple[float, int]:
    """n-weighted mean over sites of AUC(regime) − AUC(global), same subgroup, both cells usable."""
    d = by_site[(by_site["subgroup"] == subgroup) & (by_site["split"] == split)]
    g = d[(d["regime"] == "global") & d["auc"].notna()].set_index("site")
    r = d[(d["regime"] == regime) & d["auc"].notna()].set_index("site")
    common = g.index.intersection(r.index)
    if not len(common):
        return math.nan, 0
    return _wmean(r.loc[common, "auc"] - g.loc[common, "auc"], g.loc[common, "n"]), len(common)


def _best_regime(gains: dict[str, float]) -> tuple[str | None, float]:
    gains = {r: v for r, v in gains.items() if np.isfinite(v)}
    if not gains:
        return None, math.nan
    best = max(gains, key=gains.get)
    return best, gains[best]


def _summary(metrics, sites_df, targets, pooled, by_site, patient, sdrivers, run) -> dict:
    cells = auc_cells(metrics)
    regimes = ordered(cells["regime"], KNOWN_REGIMES)
    splits = ordered(cells["split"], KNOWN_SPLITS)
    n_train = dict(zip(sites_df["site"], sites_df["n_train"]))
    worst: dict[str, dict] = {}
    for split in splits:
        entry: dict[str, Any] = {"site": None, "subgroup": None, "by_grouping": {}}
        g = cells[(cells["regime"] == "global") & (cells["split"] == split)]
        if len(g):
            w = g.loc[g["auc"].idxmin()]
            gains = {r: float(v) for r, v in targets[(targets["site"] == w["site"]) & (targets["split"] == split)
                                                      & targets["target"].str.startswith("gain:")]
                     .set_index("target")["value"].rename(lambda t: t[5:]).items()}
            best, gain = _best_regime(gains)
            entry["site"] = {"site": w["site"], "auc": float(w["auc"]), "n_train": n_train.get(w["site"], math.nan),
                             "best_regime": best, "gain": gain, "gains": gains}
        pg = pooled[(pooled["regime"] == "global") & (pooled["split"] == split) & pooled["auc"].notna()]
        if len(pg):
            for grouping, d in pg.groupby("grouping", sort=False):
                w = d.loc[d["auc"].idxmin()]
                entry["by_grouping"][grouping] = {"subgroup": w["subgroup"], "auc": float(w["auc"]),
                                                  "n_sites": int(w["n_sites"])}
            w = pg.loc[pg["auc"].idxmin()]
            gains, counts = {}, {}
            for r in gain_regimes(regimes):
                gains[r], counts[r] = _paired_gain(by_site, w["subgroup"], r, split)
            best, gain = _best_regime(gains)
            entry["subgroup"] = {"subgroup": w["subgroup"], "grouping": w["grouping"], "auc": float(w["auc"]),
                                 "n_sites": int(w["n_sites"]), "best_regime": best, "gain": gain,
                                 "gain_n_sites": counts.get(best, 0) if best else 0, "gains": gains}
        worst[split] = entry

    rho_n = []
    if len(sdrivers):
        d = sdrivers[(sdrivers["driver"] == "n_train") & sdrivers["target"].str.startswith("gain:")]
        for r in d.itertuples(index=False):
            rho_n.append({"regime": r.target[5:], "split": r.split, "rho": float(r.importance),
                          "n_sites": int(r.n_sites), "note": r.note})

    flips = []
    g = targets[targets["target"].str.startswith("gain:")]
    for target in dict.fromkeys(g["target"]):
        t = g[(g["target"] == target) & (g["split"] == "test")].set_index("site")["value"]
        tt = g[(g["target"] == target) & (g["split"] == "temporal")].set_index("site")["value"]
        if t.empty or tt.empty:
            continue
        mean_t, mean_tt = float(t.mean()), float(tt.mean())
        common = t.index.intersection(tt.index)
        helps_then_hurts = [s for s in common if t[s] > 0 > tt[s]]
        hurts_then_helps = [s for s in common if t[s] < 0 < tt[s]]
        if mean_t * mean_tt < 0 or helps_then_hurts or hurts_then_helps:
            flips.append({"regime": target[5:], "mean_gain_test": mean_t, "mean_gain_temporal": mean_tt,
                          "n_sites_test": int(len(t)), "n_sites_temporal": int(len(tt)),
                          "mean_flips": bool(mean_t * mean_tt < 0),
                          "sites_helps_test_hurts_temporal": helps_then_hurts,
                          "sites_hurts_test_helps_temporal": hurts_then_helps})

    top = [{"driver": r.driver, "importance": float(r.importance), "rank": int(r.rank), "n": float(r.n),
            "n_sites": int(r.n_sites)}
           for r in patient.itertuples(index=False) if np.isfinite(r.importance)]
    clusters = run.get("clusters") if isinstance(run.get("clusters"), dict) else None
    return {"regimes": regimes, "splits": splits, "pooled_global_auc": pooled_global_auc(metrics),
            "worst": worst, "gain_vs_n_train": rho_n, "sign_flips": flips, "top_drivers": top,
            "clusters": clusters}


# --------------------------------------------------------------------------- entry point


def analyze(run_dir) -> dict:
    """Write RUN_DIR/drivers.csv and RUN_DIR/site_analysis.csv; return a summary for the report.

    The summary is a dict: ``regimes``, ``splits``, ``pooled_global_auc`` {split: auc},
    ``worst`` {split: {site, subgroup, by_grouping}} (global model's lowest AUC and the regime
    that helps most there), ``gain_vs_n_train`` [{regime, split, rho, n_sites, note}],
    ``sign_flips``, ``top_drivers``, ``clusters``, ``notes``, ``tests`` (the verdicts read from
    differences.csv, size_effects.csv, calibration.csv and subgroup_gaps.csv: see
    ``tested_summary``; empty for a run folder that predates them) and ``tables`` (DataFrames:
    drivers, site_analysis, site_targets, subgroups, subgroups_by_site, descriptors).
    """
    run_dir = Path(run_dir)
    notes: list[str] = []
    for name in ("metrics.csv", "sites.csv", "descriptors.csv", "driver_importances.csv", "run.json"):
        if not (run_dir / name).exists():
            notes.append(f"{name} not found: the analysis that needs it is skipped.")
    metrics = read_metrics(run_dir)
    sites_df = read_sites(run_dir, metrics)
    run = read_run(run_dir)
    descriptors = read_descriptors(run_dir)
    imp = read_driver_importances(run_dir)

    targets = site_targets(metrics, sites_df)
    pooled, by_site = subgroup_tables(metrics)
    patient = patient_drivers(imp)
    sdrivers, regression = site_drivers(targets, descriptors, sites_df)
    drivers = pd.concat([d for d in (patient, sdrivers) if len(d)], ignore_index=True) \
        if len(patient) or len(sdrivers) else pd.DataFrame(columns=DRIVER_COLUMNS)
    drivers = drivers[DRIVER_COLUMNS]
    if len(sdrivers) and sdrivers["importance"].isna().all():
        notes.append(f"Site-level correlations need at least {MIN_SITES_RHO} sites with both values; none had.")

    out_drivers = drivers.copy()
    out_drivers["rank"] = out_drivers["rank"].map(lambda v: str(int(v)) if pd.notna(v) else "")
    out_drivers["n"] = out_drivers["n"].map(lambda v: str(int(v)) if pd.notna(v) else "")
    out_drivers.to_csv(run_dir / "drivers.csv", index=False, float_format="%.6g")
    regression.to_csv(run_dir / "site_analysis.csv", index=False, float_format="%.6g")

    summary = _summary(metrics, sites_df, targets, pooled, by_site, patient, sdrivers, run)
    tests = tested_summary(run_dir, list(sites_df["site"]))
    for split, w in summary["worst"].items():
        if w.get("site"):
            w["site"]["tested"] = site_verdict(tests, w["site"]["site"], split)
        if w.get("subgroup"):
            w["subgroup"]["tested"] = tested_subgroup_differences(tests["tables"]["differences"],
                                                                  w["subgroup"]["subgroup"], split)
    if not tests["available"]["differences"]:
        notes.append("differences.csv not found (a run from before paired tests): comparisons between regimes "
                     "are untested point estimates.")
    summary["tests"] = tests
    summary["notes"] = notes
    summary["tables"] = {"drivers": drivers, "site_analysis": regression, "site_targets": targets,
                         "subgroups": pooled, "subgroups_by_site": by_site, "descriptors": descriptors}
    return summary


if __name__ == "__main__":  # pragma: no cover - convenience: python -m server.analysis RUN_DIR
    import sys

    res = analyze(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(json.dumps({k: v for k, v in res.items() if k != "tables"}, indent=1, default=str))
