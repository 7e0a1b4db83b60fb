"""The statistics behind the study's findings: tests and intervals a reviewer accepts.

A study's headline ("local beats global at 4 of 6 sites") is a comparison of
AUCs on small test sets, made dozens of times. This module owns the methods
that turn those comparisons into tested findings, as pure functions of arrays
and numbers (no I/O, no run config, no disclosure rules: those are applied by
whoever releases the numbers):

- at a site, from per-patient labels and scores that never leave it:
  the AUC and its DeLong variance, an analytic AUC interval (replacing the
  percentile bootstrap per cell), the paired AUC difference of two models on
  the same patients, calibration bins and the calibration slope/intercept;
- at the server, from what sites release per cell: the gap between the best-
  and worst-served subgroup band, the random-effects pooling of per-site
  differences, the meta-regression of a difference on site size, the pooled
  reliability diagram and ECE from binned aggregates, and Holm's adjustment.

Well-kept packages do what they already do (statsmodels: random-effects
pooling, WLS, GLM, Holm; scipy: ranks and distributions). DeLong's variance is
in none of scipy, statsmodels or scikit-learn, so it is implemented here with
the O(n log n) mid-rank algorithm of Sun & Xu (2014).

Functions return NaN (and a ``status``) where a quantity is undefined, rather
than raising: a site with one class in a band must not stop a study. Bad input
(lengths that differ, labels that are not 0/1, non-finite scores) raises
ValueError; its text never quotes a data value, because error texts may leave
a site.

References
----------
DeLong, DeLong & Clarke-Pearson (1988). Biometrics 44:837-845.
Sun & Xu (2014). IEEE Signal Processing Letters 21(11):1389-1393.
DerSimonian & Laird (1986). Controlled Clinical Trials 7:177-188.
Higgins & Thompson (2002). Statistics in Medicine 21:1539-1558 (I²).
Knapp & Hartung (2003). Statistics in Medicine 22:2693-2710.
Röver, Knapp & Friede (2015). BMC Med Res Methodol 15:99 (modified HKSJ).
Holm (1979). Scandinavian Journal of Statistics 6:65-70.
Cox (1958). Biometrika 45:562-565 (logistic recalibration).
Van Calster et al. (2016). J Clin Epidemiol 74:167-176 (calibration hierarchy).
Naeini, Cooper & Hauskrecht (2015). AAAI (expected calibration error).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _st

# an estimated standard error below this is "zero": no real AUC difference has one this small
# (it would need ~1e17 patients), so it can only come from identical or degenerate components
_ZERO_SE = 1e-9
# probabilities are clipped this far from 0 and 1 before a logit
_LOGIT_EPS = 1e-6


# ----------------------------------------------------------------------------- input checks
def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError("labels must be a one-dimensional array")
    if y.dtype == bool:
        return y
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 (or booleans)")
    return y.astype(bool)


def _scores(p, n: int, name: str = "scores") -> np.ndarray:
    p = np.asarray(p, dtype=float)
    if p.ndim != 1 or len(p) != n:
        raise ValueError(f"{name} must be a one-dimensional array as long as the labels")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return p


# ----------------------------------------------------------------------------- DeLong
def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of one or more models scored on the same patients, and their DeLong covariance.

    ``scores`` is (n,) or (k, n). Returns (aucs of shape (k,), covariance (k, k)).
    The covariance is DeLong's structural-components (U-statistic) estimator,
    computed with Sun & Xu's (2014) mid-rank algorithm in O(k·n log n) instead of
    the O(k·m·n) pairwise comparisons: for a positive i, its placement
    V10_i = (rank among all − rank among positives) / n_neg is the share of
    negatives it outranks (ties count half); for a negative j,
    V01_j = 1 − (rank among all − rank among negatives) / n_pos.
    Then S = cov(V10)/n_pos + cov(V01)/n_neg (covariances over patients, ddof=1).
    Undefined (NaN) with fewer than 2 positives or 2 negatives, where a
    covariance over patients cannot be formed (the AUC itself needs one of each).
    """
    y = _labels(y)
    P = np.atleast_2d(np.asarray(scores, dtype=float))
    if P.ndim != 2 or P.shape[1] != len(y):
        raise ValueError("scores must be (n,) or (models, n), with n the number of labels")
    if not np.isfinite(P).all():
        raise ValueError("scores contain NaN or infinite values")
    k = P.shape[0]
    m, n = int(y.sum()), int((~y).sum())
    nan = (np.full(k, np.nan), np.full((k, k), np.nan))
    if m == 0 or n == 0:
        return nan
    X, Y = P[:, y], P[:, ~y]
    tz = _st.rankdata(P, axis=1)  # mid-ranks: ties share the average rank
    tx = _st.rankdata(X, axis=1)
    ty = _st.rankdata(Y, axis=1)
    tzx, tzy = tz[:, y], tz[:, ~y]
    aucs = (tzx.sum(axis=1) - m * (m + 1) / 2) / (m * n)
    if m < 2 or n < 2:
        return aucs, nan[1]
    v10 = (tzx - tx) / n
    v01 = 1.0 - (tzy - ty) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def auc_delong(y, p) -> tuple[float, float]:
    """(AUC, DeLong variance) of one model; (NaN, NaN) with one class.

    Ties in the scores count half (Mann-Whitney), as in `common.metrics.auc_roc`.
    """
    y = _labels(y)
    p = _scores(p, len(y))
    aucs, cov = delong_covariance(y, p)
    return float(aucs[0]), float(cov[0, 0])


def _logit(x):
    return np.log(x) - np.log1p(-x)


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def auc_interval_from_variance(auc: float, variance: float, alpha: float = 0.05) -> tuple[float, float]:
    """Wald interval on the logit scale, mapped back: expit(logit(A) ± z·se/(A(1−A))).

    Why the logit: a symmetric interval A ± z·se crosses 1 for the good models of
    small sites (AUC 0.9, se 0.06), and the AUC's sampling distribution is skewed
    near the bounds; the logit transform keeps the interval inside (0, 1) and has
    better coverage there (Pepe 2003, §5.2.3; Qin & Hotilovac 2008).
    Undefined (NaN, NaN) at AUC 0 or 1: there the DeLong variance is 0 and no
    analytic interval exists (a bootstrap would return the degenerate [1, 1]).
    """
    if not (math.isfinite(auc) and math.isfinite(variance)) or variance < 0 or not 0 < auc < 1:
        return float("nan"), float("nan")
    z = _st.norm.isf(alpha / 2)
    half = z * math.sqrt(variance) / (auc * (1 - auc))
    centre = float(_logit(auc))
    return float(_expit(centre - half)), float(_expit(centre + half))


def auc_interval(y, p, alpha: float = 0.05) -> tuple[float, float]:
    """Analytic (1 − alpha) interval of the AUC: DeLong variance, logit scale.

    Replaces the per-cell percentile bootstrap (500 AUCs per cell) with one
    ranking; see `auc_interval_from_variance` for the scale and when it is NaN
    (one class, fewer than 2 of either class, AUC exactly 0 or 1).
    """
    auc, var = auc_delong(y, p)
    return auc_interval_from_variance(auc, var, alpha)


def auc_variance_from_interval(auc: float, lo: float, hi: float, alpha: float = 0.05) -> float:
    """The DeLong variance back from a released logit-scale interval (inverse of
    `auc_interval_from_variance`), so the server can combine cells that released
    only (auc, lo, hi). NaN where the interval is NaN or not a logit-scale interval."""
    vals = (auc, lo, hi)
    if not all(math.isfinite(v) and 0 < v < 1 for v in vals) or not lo <= auc <= hi:
        return float("nan")
    z = _st.norm.isf(alpha / 2)
    se_logit = (float(_logit(hi)) - float(_logit(lo))) / (2 * z)
    return float((se_logit * auc * (1 - auc)) ** 2)


def _nan_diff(status: str, n: int, positives: int) -> dict:
    nan = float("nan")
    return {"diff": nan, "lo": nan, "hi": nan, "p": nan, "se": nan, "n": n,
            "positives": positives, "method": "none", "status": status}


def paired_auc_difference(y, p_a, p_b, alpha: float = 0.05, seed: int = 0,
                          n_boot: int = 2000) -> dict:
    """AUC(a) − AUC(b) on the same patients, with DeLong's paired variance.

    Two models scored on the same test patients are correlated (the same hard
    patients trip both), so the difference's variance is
    var(A_a) + var(A_b) − 2·cov(A_a, A_b), all from one DeLong covariance
    (DeLong et al. 1988). Ignoring the covariance makes the interval several
    times too wide for models that rank patients alike. The interval is
    diff ± z·se (clipped to [−1, 1]); p is the two-sided z-test of no difference.

    Returns dict(diff, lo, hi, p, se, n, positives, method, status):
    - method "delong", status "ok": the usual case. A model against itself (or
      against any monotone transform of its scores) gives diff 0, se 0, p 1,
      interval [0, 0]: the difference is identically 0 on any resample.
    - method "bootstrap": only where DeLong does not apply, namely its estimated
      variance is 0 while the difference is not (the patients' placement
      differences are constant although their pairwise comparisons are not).
      Then a paired bootstrap (both models scored on the same resampled
      patients, n_boot resamples, ``seed``) gives se (its standard deviation; p
      from the z-test) and the percentile interval. Status "ok".
    - method "none", status "degenerate": the bootstrap spread is 0 too (e.g. one
      model separates the classes perfectly and the other ties every patient):
      diff is reported, lo/hi/p/se are NaN, because no sampling variability is
      estimable and a p of 0 would overstate the evidence.
    - status "one_class" / "too_few": fewer than 1 / 2 patients of a class:
      everything NaN but n and positives.
    """
    y = _labels(y)
    n, pos = len(y), int(y.sum())
    p_a = _scores(p_a, n, "p_a")
    p_b = _scores(p_b, n, "p_b")
    if pos == 0 or pos == n:
        return _nan_diff("one_class", n, pos)
    if pos < 2 or n - pos < 2:
        return _nan_diff("too_few", n, pos)
    aucs, cov = delong_covariance(y, np.vstack([p_a, p_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    z = _st.norm.isf(alpha / 2)
    out = {"diff": diff, "n": n, "positives": pos, "method": "delong", "status": "ok"}
    if se > _ZERO_SE:
        p = float(2 * _st.norm.sf(abs(diff) / se))
        lo, hi = max(-1.0, float(diff - z * se)), min(1.0, float(diff + z * se))
        return {**out, "lo": lo, "hi": hi, "p": p, "se": se}
    if diff == 0.0:
        return {**out, "lo": 0.0, "hi": 0.0, "p": 1.0, "se": 0.0}
    boot = _paired_bootstrap_diffs(y, p_a, p_b, seed=seed, n_boot=n_boot)
    se_b = float(np.std(boot, ddof=1)) if len(boot) > 1 else 0.0
    if se_b <= _ZERO_SE:
        return {**_nan_diff("degenerate", n, pos), "diff": diff}
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p = float(2 * _st.norm.sf(abs(diff) / se_b))
    return {**out, "lo": float(lo), "hi": float(hi), "p": p, "se": se_b, "method": "bootstrap"}


def _paired_bootstrap_diffs(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, seed: int,
                            n_boot: int, chunk: int = 256) -> np.ndarray:
    """AUC(a) − AUC(b) over paired resamples (same patients for both), vectorised
    in chunks; resamples with one class are dropped."""
    rng = np.random.default_rng(seed)
    n = len(y)
    out = []
    for start in range(0, int(n_boot), chunk):
        idx = rng.integers(0, n, (min(chunk, int(n_boot) - start), n))
        yy = y[idx]
        m = yy.sum(axis=1)
        ok = (m > 0) & (m < n)
        if not ok.any():
            continue
        yy, idx, m = yy[ok], idx[ok], m[ok]
        k = n - m
        ra = _st.rankdata(p_a[idx], axis=1)
        rb = _st.rankdata(p_b[idx], axis=1)
        base = m * (m + 1) / 2
        auc_a = ((ra * yy).sum(axis=1) - base) / (m * k)
        auc_b = ((rb * yy).sum(axis=1) - base) / (m * k)
        out.append(auc_a - auc_b)
    return np.concatenate(out) if out else np.empty(0)


# ----------------------------------------------------------------------------- subgroup gaps
def band_gap(bands: Mapping[str, tuple[float, float]], alpha: float = 0.05,
             simultaneous: bool = True) -> dict:
    """Gap between the best- and worst-served band of one grouping, from per-band
    (AUC, variance) pairs, which is what a site releases per cell (or recover
    the variance from a released interval with `auc_variance_from_interval`).

    The bands of a grouping are disjoint sets of patients, so their AUCs are
    independent and the variance of a difference is the sum of the two
    variances. Picking the best and the worst band after seeing the data
    inflates the gap (the largest of several noisy differences), so by default
    the interval and p are simultaneous over all k(k−1)/2 pairwise band
    differences (Bonferroni): such an interval covers the selected pair's true
    difference whichever pair is selected. ``simultaneous=False`` gives the plain
    Wald interval (identical when there are two bands). ``p_heterogeneity`` is
    Cochran's Q test that all bands share one AUC (chi² with k−1 df), which
    needs no selection.

    Bands with a NaN AUC or variance (suppressed, one class) are left out and
    counted in ``n_bands_missing``. Returns dict(best, worst, gap, lo, hi, p, se,
    n_bands, n_bands_missing, p_heterogeneity, status); status "ok" or
    "too_few_bands" (fewer than 2 usable bands: numbers NaN).
    """
    usable = {k: (float(a), float(v)) for k, (a, v) in bands.items()
              if math.isfinite(a) and math.isfinite(v) and v >= 0}
    nan = float("nan")
    out = {"best": None, "worst": None, "gap": nan, "lo": nan, "hi": nan, "p": nan, "se": nan,
           "n_bands": len(usable), "n_bands_missing": len(bands) - len(usable),
           "p_heterogeneity": nan, "status": "too_few_bands"}
    if len(usable) < 2:
        return out
    names = sorted(usable, key=lambda k: usable[k][0])
    worst, best = names[0], names[-1]
    gap = usable[best][0] - usable[worst][0]
    se = math.sqrt(usable[best][1] + usable[worst][1])
    k = len(usable)
    pairs = k * (k - 1) // 2 if simultaneous else 1
    z = _st.norm.isf(alpha / (2 * pairs))
    if se > _ZERO_SE:
        p = min(1.0, float(2 * _st.norm.sf(gap / se)) * pairs)
    else:
        p = 1.0 if gap == 0 else nan
    a = np.array([usable[b][0] for b in names])
    v = np.array([usable[b][1] for b in names])
    p_het = nan
    if (v > 0).all():
        w = 1 / v
        q = float((w * (a - (w * a).sum() / w.sum()) ** 2).sum())
        p_het = float(_st.chi2.sf(q, k - 1))
    return {**out, "best": best, "worst": worst, "gap": gap, "lo": float(gap - z * se),
            "hi": float(gap + z * se), "p": p, "se": se, "p_heterogeneity": p_het, "status": "ok"}


def independent_auc_difference(auc_a: float, var_a: float, auc_b: float, var_b: float,
                               alpha: float = 0.05) -> dict:
    """AUC(a) − AUC(b) on disjoint patients (e.g. two bands, or two sites): the
    variances add. Returns dict(diff, lo, hi, p, se); NaN where an input is NaN."""
    nan = float("nan")
    vals = (auc_a, var_a, auc_b, var_b)
    if not all(math.isfinite(x) for x in vals) or var_a < 0 or var_b < 0:
        return {"diff": nan, "lo": nan, "hi": nan, "p": nan, "se": nan}
    diff = auc_a - auc_b
    se = math.sqrt(var_a + var_b)
    z = _st.norm.isf(alpha / 2)
    if se > _ZERO_SE:
        p = float(2 * _st.norm.sf(abs(diff) / se))
    else:
        p = 1.0 if diff == 0 else nan
    return {"diff": diff, "lo": float(diff - z * se), "hi": float(diff + z * se), "p": p, "se": se}


# ----------------------------------------------------------------------------- pooling
def _usable(diffs, variances, *extra) -> tuple[np.ndarray, ...]:
    arrays = [np.asarray(diffs, dtype=float), np.asarray(variances, dtype=float)]
    arrays += [np.asarray(e, dtype=float) for e in extra]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError("effects, variances (and covariates) must be one-dimensional and equally long")
    finite = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    positive = finite & (arrays[1] > 0)
    return positive, finite, arrays


def random_effects(diffs, variances, alpha: float = 0.05, knapp_hartung: bool = True) -> dict:
    """Random-effects pooling of per-site differences (DerSimonian–Laird τ²).

    Sites differ in case mix, so a regime's true effect may differ by site; the
    random-effects model estimates the mean effect and the between-site variance
    τ², with I² = (Q − df)/Q the share of the observed spread that is
    heterogeneity rather than sampling error (Higgins & Thompson 2002).
    Computed by ``statsmodels.stats.meta_analysis.combine_effects(method_re="dl")``,
    with one correction: statsmodels (0.15) does not truncate the DL moment
    estimate at 0, so with Q < df its τ² is negative and its random-effects
    standard error NaN; DerSimonian & Laird truncate, τ² = max(0, ·), and the
    random-effects estimate is then the fixed-effect one, which is used here.

    Interval and p: with ``knapp_hartung`` (default), the Hartung–Knapp–Sidik–
    Jonkman variance with t(k−1), its scale floored at 1 (Röver, Knapp & Friede
    2015) so it is never narrower than the z interval; with a handful of sites
    the plain z interval is too narrow (IntHout et al. 2014). Otherwise z.

    Sites whose difference is NaN are left out; sites with variance 0 cannot be
    inverse-variance weighted and are left out and counted in ``n_excluded``.
    Returns dict(estimate, se, lo, hi, p, tau2, i2, q, p_q, n_sites, n_excluded,
    pooled, method, status). One usable site: no pooling (``pooled`` False, status
    "single_site"), the site's own estimate with a z interval, heterogeneity NaN.
    """
    from statsmodels.stats.meta_analysis import combine_effects

    use, finite, (d, v) = _usable(diffs, variances)
    nan = float("nan")
    out = {"estimate": nan, "se": nan, "lo": nan, "hi": nan, "p": nan, "tau2": nan, "i2": nan,
           "q": nan, "p_q": nan, "n_sites": int(use.sum()), "n_excluded": int((finite & ~use).sum()),
           "pooled": False, "method": "dl+hksj" if knapp_hartung else "dl", "status": "no_sites"}
    d, v = d[use], v[use]
    k = len(d)
    if k == 0:
        return out
    if k == 1:
        se = math.sqrt(v[0])
        z = _st.norm.isf(alpha / 2)
        return {**out, "estimate": float(d[0]), "se": se, "lo": float(d[0] - z * se),
                "hi": float(d[0] + z * se), "p": float(2 * _st.norm.sf(abs(d[0]) / se)),
                "method": "single_site", "status": "single_site"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sqrt of a negative τ² before truncation
        res = combine_effects(d, v, method_re="dl", use_t=False, alpha=alpha)
    q = float(res.q)
    df = k - 1
    if res.tau2 > 0:
        tau2, estimate, se = float(res.tau2), float(res.mean_effect_re), float(res.sd_eff_w_re)
        weights_rel = np.asarray(res.weights_rel_re)
    else:  # truncated: the random-effects model is the fixed-effect one
        tau2, estimate, se = 0.0, float(res.mean_effect_fe), float(res.sd_eff_w_fe)
        weights_rel = np.asarray(res.weights_rel_fe)
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    if knapp_hartung:
        scale = float((weights_rel * (d - estimate) ** 2).sum() / df) / se ** 2
        se = se * math.sqrt(max(1.0, scale))
        dist = _st.t(df)
    else:
        dist = _st.norm
    crit = dist.isf(alpha / 2)
    return {**out, "estimate": estimate, "se": se, "lo": float(estimate - crit * se),
            "hi": float(estimate + crit * se), "p": float(2 * dist.sf(abs(estimate) / se)),
            "tau2": tau2, "i2": i2, "q": q, "p_q": float(_st.chi2.sf(q, df)),
            "pooled": True, "status": "ok"}


def _dl_tau2_regression(d: np.ndarray, v: np.ndarray, X: np.ndarray) -> float:
    """Method-of-moments (DerSimonian–Laird type) residual τ² of a meta-regression
    (Raudenbush 2009, eq. 16.44): max(0, (Q_E − (k − p)) / (Σw − tr((X'WX)⁻¹X'W²X)))."""
    w = 1 / v
    XtW = X.T * w
    inv = np.linalg.inv(XtW @ X)
    beta = inv @ (XtW @ d)
    q_e = float((w * (d - X @ beta) ** 2).sum())
    k, p = X.shape
    c = float(w.sum() - np.trace(inv @ ((X.T * w ** 2) @ X)))
    return max(0.0, (q_e - (k - p)) / c) if c > 0 else 0.0


def meta_regression(diffs, variances, x, tau2: float | None = None, alpha: float = 0.05,
                    knapp_hartung: bool = True) -> dict:
    """Mixed-effects meta-regression of per-site differences on a site covariate.

    "Helps small sites most" is a claim about a slope: regress each site's
    difference on its size (pass e.g. log n_train as ``x``) with weights
    1/(v_i + τ²), where τ² is the residual between-site variance (method of
    moments, DL type, unless given). Fitted by statsmodels WLS. Inference:
    Knapp–Hartung (default): the WLS residual scale, floored at 1 (Röver, Knapp &
    Friede 2015), with t(k − 2), which Higgins & Thompson (2004) recommend
    because the z test gives spurious slopes with few studies; otherwise the
    fixed scale 1 and z.

    Sites with a NaN input are left out; zero-variance sites too (counted in
    ``n_excluded``). Returns dict(slope, se, lo, hi, p, intercept, intercept_se,
    tau2, n_sites, n_excluded, df, method, status); status "too_few_sites" (fewer
    than 3 usable sites: a line through 2 points has no residual to test
    against) or "no_spread" (all x equal) with NaN numbers.
    """
    import statsmodels.api as sm

    use, finite, (d, v, xs) = _usable(diffs, variances, x)
    nan = float("nan")
    out = {"slope": nan, "se": nan, "lo": nan, "hi": nan, "p": nan, "intercept": nan,
           "intercept_se": nan, "tau2": nan, "n_sites": int(use.sum()),
           "n_excluded": int((finite & ~use).sum()), "df": nan,
           "method": "knapp-hartung" if knapp_hartung else "z", "status": "too_few_sites"}
    d, v, xs = d[use], v[use], xs[use]
    k = len(d)
    if k < 3:
        return out
    if np.ptp(xs) == 0:
        return {**out, "status": "no_spread"}
    X = sm.add_constant(xs, has_constant="add")
    t2 = _dl_tau2_regression(d, v, X) if tau2 is None else float(tau2)
    model = sm.WLS(d, X, weights=1 / (v + t2))
    if knapp_hartung:
        scale = max(1.0, float(model.fit().scale))
        fit = model.fit(cov_type="fixed scale", cov_kwds={"scale": scale}, use_t=True)
    else:
        fit = model.fit(cov_type="fixed scale", cov_kwds={"scale": 1.0}, use_t=False)
    lo, hi = fit.conf_int(alpha=alpha)[1]
    return {**out, "slope": float(fit.params[1]), "se": float(fit.bse[1]), "lo": float(lo),
            "hi": float(hi), "p": float(fit.pvalues[1]), "intercept": float(fit.params[0]),
            "intercept_se": float(fit.bse[0]), "tau2": t2, "df": k - 2, "status": "ok"}


# ----------------------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (statsmodels ``multipletests(method="holm")``),
    controlling the family-wise error rate under any dependence between tests,
    which the study's comparisons have (shared reference model, shared sites).
    NaN p-values (suppressed or undefined comparisons) pass through as NaN and
    are not counted in the family size."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float).ravel()
    ok = np.isfinite(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


# ----------------------------------------------------------------------------- calibration
DEFAULT_CALIBRATION_EDGES = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin aggregates of predicted probabilities: what a site may release for
    calibration (disclosure rules are applied by the releaser; a withheld bin is
    NaN in n, positives and sum_p). Bin i is [edges[i], edges[i+1]), the last one
    closed at 1. Sums, not means, so bins from several sites pool by addition."""

    edges: tuple[float, ...]
    n: np.ndarray
    positives: np.ndarray
    sum_p: np.ndarray

    def mean_predicted(self) -> np.ndarray:
        """x of the reliability diagram (NaN for empty or withheld bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.sum_p / self.n, np.nan)

    def observed_rate(self) -> np.ndarray:
        """y of the reliability diagram (NaN for empty or withheld bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.positives / self.n, np.nan)


def calibration_bins(y, p, edges: Sequence[float] = DEFAULT_CALIBRATION_EDGES) -> CalibrationBins:
    """Count patients, positives and the sum of predicted probabilities per bin
    of predicted probability (at the site)."""
    y = _labels(y)
    p = _scores(p, len(y), "probabilities")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    e = np.asarray(edges, dtype=float)
    if e.ndim != 1 or len(e) < 2 or np.any(np.diff(e) <= 0) or e[0] > 0 or e[-1] < 1:
        raise ValueError("edges must increase strictly from at most 0 to at least 1")
    idx = np.clip(np.searchsorted(e, p, side="right") - 1, 0, len(e) - 2)
    nb = len(e) - 1
    return CalibrationBins(
        edges=tuple(float(x) for x in e),
        n=np.bincount(idx, minlength=nb).astype(float),
        positives=np.bincount(idx, weights=y.astype(float), minlength=nb),
        sum_p=np.bincount(idx, weights=p, minlength=nb),
    )


def pool_bins(bins: Iterable[CalibrationBins]) -> CalibrationBins:
    """Sum per-bin aggregates across sites (a pooled reliability diagram). All
    must share the edges. A bin withheld (NaN) at any site is NaN in the pool:
    adding the other sites' counts would understate it silently."""
    bins = list(bins)
    if not bins:
        raise ValueError("no calibration bins to pool")
    edges = bins[0].edges
    if any(b.edges != edges for b in bins):
        raise ValueError("calibration bins with different edges cannot be pooled")
    return CalibrationBins(edges=edges, n=sum(b.n for b in bins),
                           positives=sum(b.positives for b in bins),
                           sum_p=sum(b.sum_p for b in bins))


def calibration_from_bins(bins: CalibrationBins) -> dict:
    """Expected calibration error from binned aggregates (at the server):
    ECE = Σ_b (n_b/N)·|observed_b − predicted_b| = Σ_b |positives_b − sum_p_b| / N
    (Naeini et al. 2015), the patient-weighted mean gap of the reliability
    diagram. Withheld (NaN) bins are left out, so the ECE is then over the
    released bins only; ``bins_withheld`` says how many. Returns dict(ece, n,
    bins_used, bins_withheld, status)."""
    n, pos, sp = (np.asarray(a, dtype=float) for a in (bins.n, bins.positives, bins.sum_p))
    released = np.isfinite(n) & np.isfinite(pos) & np.isfinite(sp)
    total = float(n[released].sum())
    withheld = int((~released).sum())
    used = int((released & (n > 0)).sum())
    if total <= 0:
        return {"ece": float("nan"), "n": 0, "bins_used": 0, "bins_withheld": withheld,
                "status": "empty"}
    ece = float(np.abs(pos[released] - sp[released]).sum() / total)
    return {"ece": ece, "n": int(total), "bins_used": used, "bins_withheld": withheld,
            "status": "ok" if withheld == 0 else "partial"}


def calibration_slope_intercept(y, p, alpha: float = 0.05) -> dict:
    """Calibration slope and intercept by logistic recalibration (Cox 1958), at the site.

    Slope b from logit P(y=1) = a + b·logit(p): 1 when the predicted risks are
    spread right, < 1 when too extreme (overfitting), > 1 when too timid.
    Intercept ("calibration-in-the-large") from logit P(y=1) = a + logit(p),
    i.e. with the slope fixed at 1 via an offset, the convention of Van Calster
    et al. (2016): 0 when the mean predicted risk matches the event rate.
    ``recal_intercept`` is a of the two-parameter fit. Fitted by statsmodels GLM
    (binomial, logit link); probabilities are clipped to [1e-6, 1 − 1e-6] before
    the logit. Returns dict(slope, slope_lo, slope_hi, intercept, intercept_lo,
    intercept_hi, recal_intercept, n, positives, status); NaNs with status
    "one_class", "no_spread" (all predictions equal: no slope) or "not_fitted"
    (perfect separation or no convergence).
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationError, PerfectSeparationWarning

    y = _labels(y)
    p = _scores(p, len(y), "probabilities")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    n, pos = len(y), int(y.sum())
    nan = float("nan")
    out = {"slope": nan, "slope_lo": nan, "slope_hi": nan, "intercept": nan, "intercept_lo": nan,
           "intercept_hi": nan, "recal_intercept": nan, "n": n, "positives": pos,
           "status": "one_class"}
    if pos == 0 or pos == n:
        return out
    lp = _logit(np.clip(p, _LOGIT_EPS, 1 - _LOGIT_EPS))
    if np.ptp(lp) == 0:
        return {**out, "status": "no_spread"}
    yy = y.astype(float)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PerfectSeparationWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            fam = sm.families.Binomial()
            full = sm.GLM(yy, sm.add_constant(lp, has_constant="add"), family=fam).fit()
            citl = sm.GLM(yy, np.ones((n, 1)), family=fam, offset=lp).fit()
    except (PerfectSeparationError, PerfectSeparationWarning, np.linalg.LinAlgError, ValueError):
        return {**out, "status": "not_fitted"}
    if not (full.converged and citl.converged):
        return {**out, "status": "not_fitted"}
    (a_lo, a_hi), (b_lo, b_hi) = full.conf_int(alpha=alpha)
    (i_lo, i_hi), = citl.conf_int(alpha=alpha)
    vals = {"slope": float(full.params[1]), "slope_lo": float(b_lo), "slope_hi": float(b_hi),
            "intercept": float(citl.params[0]), "intercept_lo": float(i_lo),
            "intercept_hi": float(i_hi), "recal_intercept": float(full.params[0])}
    if not all(math.isfinite(x) for x in vals.values()):
        return {**out, "status": "not_fitted"}
    return {**out, **vals, "status": "ok"}
