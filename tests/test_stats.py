"""The statistics core (common.stats): each method against an independent computation
(a slow textbook version, a bootstrap, a published example, a hand calculation or a
simulation with a known truth). Every random draw is seeded, so every test is
deterministic: a band stated for a simulated quantity is checked once, not sampled."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import chi2, norm, rankdata
from scipy.stats import t as t_dist
from sklearn.metrics import roc_auc_score

from clinfed.common.stats import (
    auc_delong,
    auc_interval,
    auc_interval_from_variance,
    auc_variance_from_interval,
    band_gap,
    calibration_bins,
    calibration_from_bins,
    calibration_slope_intercept,
    delong_covariance,
    holm,
    independent_auc_difference,
    meta_regression,
    paired_auc_difference,
    pool_bins,
    random_effects,
)


# ------------------------------------------------------------------ helpers
def slow_delong(y, scores):
    """DeLong et al. (1988) structural components by direct pairwise comparison, O(m·n)."""
    y = np.asarray(y).astype(bool)
    S = np.atleast_2d(scores)
    m, n = y.sum(), (~y).sum()
    v10, v01, aucs = [], [], []
    for s in S:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    cov = np.atleast_2d(np.cov(np.array(v10))) / m + np.atleast_2d(np.cov(np.array(v01))) / n
    return np.array(aucs), cov


def correlated_scores(seed, m=60, n=90, mu_a=1.2, mu_b=0.9, rho=0.8):
    """Binormal scores of two models on the same patients: noise correlated rho
    between the models, so the true AUCs are Phi(mu/sqrt(2))."""
    rng = np.random.default_rng(seed)
    cov = [[1, rho], [rho, 1]]
    pos = rng.multivariate_normal([mu_a, mu_b], cov, m)
    neg = rng.multivariate_normal([0, 0], cov, n)
    y = np.r_[np.ones(m), np.zeros(n)].astype(int)
    s = np.r_[pos, neg]
    return y, s[:, 0], s[:, 1]


# ------------------------------------------------------------------ DeLong
@pytest.mark.parametrize("seed", range(5))
def test_fast_delong_equals_slow_structural_components_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 80 + 20 * seed
    y = rng.integers(0, 2, n)
    # rounding to one decimal puts many ties within and across classes
    a = np.round(rng.normal(y * 0.8, 1.0), 1)
    b = np.round(0.5 * a + rng.normal(y * 0.3, 1.0), 1)
    c = np.round(rng.random(n), 1)
    fast_auc, fast_cov = delong_covariance(y, np.vstack([a, b, c]))
    slow_auc, slow_cov = slow_delong(y, np.vstack([a, b, c]))
    assert len(np.unique(a)) < n / 2  # ties really present
    np.testing.assert_allclose(fast_auc, slow_auc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast_cov, slow_cov, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(fast_auc, [roc_auc_score(y, s) for s in (a, b, c)], atol=1e-12)
    auc, var = auc_delong(y, a)
    assert auc == pytest.approx(slow_auc[0], abs=1e-12) and var == pytest.approx(slow_cov[0, 0])


def test_delong_variance_agrees_with_bootstrap_variance():
    """On 300 patients, DeLong's variance and the variance of 4000 bootstrap AUCs agree
    within 15 %: the Monte Carlo error of a 4000-resample variance is about
    sqrt(2/4000) = 2 %, and the two estimators differ by O(1/n) terms. The same for the
    paired difference's variance, which is what the interval of a difference uses."""
    y, a, b = correlated_scores(7, m=120, n=180)
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    rng = np.random.default_rng(11)
    idx = rng.integers(0, len(y), (4000, len(y)))
    yy = y[idx].astype(bool)
    m = yy.sum(axis=1)

    def mann_whitney(s):  # AUC of each resample (every resample has both classes here)
        r = rankdata(s[idx], axis=1)
        return ((r * yy).sum(axis=1) - m * (m + 1) / 2) / (m * (len(y) - m))

    boot_a = mann_whitney(a)
    assert roc_auc_score(y[idx[0]], a[idx[0]]) == pytest.approx(boot_a[0])
    var_a = np.var(boot_a, ddof=1)
    var_d = np.var(boot_a - mann_whitney(b), ddof=1)
    assert cov[0, 0] == pytest.approx(var_a, rel=0.15)
    assert cov[0, 0] + cov[1, 1] - 2 * cov[0, 1] == pytest.approx(var_d, rel=0.15)


def test_auc_interval_is_on_the_logit_scale_and_stays_inside_0_1():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(12), np.zeros(30)].astype(int)
    p = np.r_[rng.normal(2.5, 1, 12), rng.normal(0, 1, 30)]  # a strong model on a small site
    auc, var = auc_delong(y, p)
    lo, hi = auc_interval(y, p)
    assert 0 < lo < auc < hi < 1
    assert auc + 1.96 * math.sqrt(var) > hi  # narrower at the top than the symmetric Wald
    # logit(auc) is the interval's midpoint on the logit scale
    logit = lambda x: math.log(x / (1 - x))
    assert (logit(lo) + logit(hi)) / 2 == pytest.approx(logit(auc))
    assert (logit(hi) - logit(lo)) / 2 == pytest.approx(norm.isf(0.025) * math.sqrt(var) / (auc * (1 - auc)))
    # the server recovers the variance from a released interval
    assert auc_variance_from_interval(auc, lo, hi) == pytest.approx(var)


def test_auc_interval_is_nan_where_undefined():
    assert all(math.isnan(v) for v in auc_interval([1, 1, 1], [0.1, 0.5, 0.9]))
    assert all(math.isnan(v) for v in auc_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]))  # AUC 1
    assert all(math.isnan(v) for v in auc_interval_from_variance(float("nan"), 0.01))
    with pytest.raises(ValueError, match="0/1"):
        auc_interval([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="as long as"):
        auc_interval([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc_interval([0, 1, 1], [0.1, float("nan"), 0.3])


# ------------------------------------------------------------------ paired differences
def test_paired_difference_interval_covers_at_about_95_percent():
    """200 simulated sites (60 positives, 90 negatives, binormal scores, correlation 0.8
    between the models); the true difference is Phi(1.2/sqrt 2) − Phi(0.9/sqrt 2).
    Band 0.90–0.99: at a true 95 % the count of covering intervals is Binomial(200, 0.95),
    sd 1.5 points, so the band is about ±3 sd; it is evaluated once on fixed seeds, so it
    cannot flake. Ignoring the covariance between the models (adding the two variances)
    covers 100 % here and fails the upper bound; too narrow a variance fails the lower."""
    true = norm.cdf(1.2 / math.sqrt(2)) - norm.cdf(0.9 / math.sqrt(2))
    covered = 0
    for seed in range(200):
        r = paired_auc_difference(*correlated_scores(seed))
        assert r["method"] == "delong" and r["status"] == "ok"
        covered += r["lo"] <= true <= r["hi"]
    assert 0.90 <= covered / 200 <= 0.99


def test_paired_difference_matches_delong_formula_and_direction():
    y, a, b = correlated_scores(5)
    r = paired_auc_difference(y, a, b)
    aucs, cov = slow_delong(y, np.vstack([a, b]))
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert r["diff"] == pytest.approx(aucs[0] - aucs[1]) and r["diff"] > 0  # a − b
    assert r["se"] == pytest.approx(se)
    assert r["p"] == pytest.approx(2 * norm.sf(abs(r["diff"]) / se))
    assert r["lo"] == pytest.approx(r["diff"] - 1.959964 * se, abs=1e-6)
    assert (r["n"], r["positives"]) == (150, 60)
    flipped = paired_auc_difference(y, b, a)
    assert flipped["diff"] == pytest.approx(-r["diff"]) and flipped["p"] == pytest.approx(r["p"])


def test_model_against_itself_is_exactly_zero_with_p_one():
    y, a, _ = correlated_scores(2)
    for other in (a, a.copy(), np.exp(a)):  # the same ranking gives the same AUC on any resample
        r = paired_auc_difference(y, a, other)
        assert (r["diff"], r["se"], r["lo"], r["hi"], r["p"]) == (0.0, 0.0, 0.0, 0.0, 1.0)
        assert r["method"] == "delong"


def test_bootstrap_fallback_only_where_delong_variance_is_zero_but_difference_is_not():
    # found by search: the placement differences are constant (DeLong variance 0) although
    # the pairwise comparisons are not, so resamples do move the difference
    y = [1, 1, 0, 0]
    a, b = [4.0, 1.0, 1.0, 0.0], [1.0, 0.0, 3.0, 1.0]
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    assert cov[0, 0] + cov[1, 1] - 2 * cov[0, 1] == pytest.approx(0, abs=1e-15)
    r = paired_auc_difference(y, a, b, seed=1, n_boot=500)
    assert r["method"] == "bootstrap" and r["status"] == "ok"
    assert r["diff"] == pytest.approx(0.75) and r["se"] > 0 and r["lo"] <= r["hi"]
    assert r == paired_auc_difference(y, a, b, seed=1, n_boot=500)  # seeded
    # a perfect model against one that ties every patient: no spread anywhere
    d = paired_auc_difference([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], [0.5] * 4)
    assert d["status"] == "degenerate" and d["diff"] == 0.5 and math.isnan(d["p"])


def test_paired_difference_is_nan_with_one_class_or_too_few():
    r = paired_auc_difference([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert r["status"] == "one_class" and math.isnan(r["diff"]) and r["n"] == 3
    r = paired_auc_difference([1, 0, 0], [0.9, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert r["status"] == "too_few" and math.isnan(r["p"])
    with pytest.raises(ValueError, match="p_b"):
        paired_auc_difference([1, 0, 0], [0.9, 0.2, 0.3], [0.3, 0.2])


# ------------------------------------------------------------------ independent bands
def test_band_gap_from_released_aucs_and_variances():
    bands = {"<117": (0.70, 0.0025), "117-163": (0.80, 0.0016), "163+": (0.75, 0.0009),
             "suppressed": (float("nan"), float("nan"))}
    g = band_gap(bands)
    assert (g["best"], g["worst"]) == ("117-163", "<117")
    assert g["gap"] == pytest.approx(0.10)
    assert g["se"] == pytest.approx(math.sqrt(0.0025 + 0.0016))  # independent patients: variances add
    z3 = norm.isf(0.05 / 6)  # Bonferroni over the 3 pairs of the 3 usable bands
    assert g["lo"] == pytest.approx(0.10 - z3 * g["se"]) and g["hi"] == pytest.approx(0.10 + z3 * g["se"])
    assert g["p"] == pytest.approx(min(1, 3 * 2 * norm.sf(0.10 / g["se"])))
    assert (g["n_bands"], g["n_bands_missing"]) == (3, 1)
    plain = band_gap(bands, simultaneous=False)
    assert plain["hi"] - plain["lo"] < g["hi"] - g["lo"]
    assert plain["lo"] == pytest.approx(0.10 - 1.959964 * g["se"], abs=1e-6)
    w = 1 / np.array([0.0025, 0.0016, 0.0009])
    a = np.array([0.70, 0.80, 0.75])
    q = (w * (a - (w * a).sum() / w.sum()) ** 2).sum()
    assert g["p_heterogeneity"] == pytest.approx(1 - chi2.cdf(q, 2))
    one = band_gap({"a": (0.7, 0.01)})
    assert one["status"] == "too_few_bands" and math.isnan(one["gap"])


def test_independent_difference_adds_variances():
    r = independent_auc_difference(0.8, 0.0009, 0.7, 0.0016)
    assert r["diff"] == pytest.approx(0.1) and r["se"] == pytest.approx(0.05)
    assert r["p"] == pytest.approx(2 * norm.sf(2.0))
    assert math.isnan(independent_auc_difference(0.8, float("nan"), 0.7, 0.01)["p"])


# ------------------------------------------------------------------ pooling across sites
def bcg():
    """Colditz et al. (1994) BCG vaccine trials (metafor's dat.bcg): log risk ratios."""
    t = np.array([[4, 119, 11, 128], [6, 300, 29, 274], [3, 228, 11, 209], [62, 13536, 248, 12619],
                  [33, 5036, 47, 5761], [180, 1361, 372, 1079], [8, 2537, 10, 619],
                  [505, 87886, 499, 87892], [29, 7470, 45, 7232], [17, 1699, 65, 1600],
                  [186, 50448, 141, 27197], [5, 2493, 3, 2338], [27, 16886, 29, 17825]], float)
    ablat = np.array([44, 55, 42, 52, 13, 44, 19, 13, 27, 42, 18, 33, 33], float)
    a, b, c, d = t.T
    yi = np.log((a / (a + b)) / (c / (c + d)))
    vi = 1 / a - 1 / (a + b) + 1 / c - 1 / (c + d)
    return yi, vi, ablat


def test_random_effects_equals_hand_dersimonian_laird():
    d = np.array([0.10, -0.02, 0.05, 0.20])
    v = np.array([0.004, 0.002, 0.003, 0.006])
    w = 1 / v
    fe = (w * d).sum() / w.sum()
    q = (w * (d - fe) ** 2).sum()
    tau2 = max(0.0, (q - 3) / (w.sum() - (w ** 2).sum() / w.sum()))
    wr = 1 / (v + tau2)
    est = (wr * d).sum() / wr.sum()
    r = random_effects(d, v, knapp_hartung=False)
    assert tau2 > 0  # the example is heterogeneous, so truncation is not what is tested here
    assert r["tau2"] == pytest.approx(tau2) and r["q"] == pytest.approx(q)
    assert r["i2"] == pytest.approx((q - 3) / q)
    assert r["estimate"] == pytest.approx(est) and r["se"] == pytest.approx(math.sqrt(1 / wr.sum()))
    assert r["lo"] == pytest.approx(est - 1.959964 * r["se"], abs=1e-6)
    assert (r["n_sites"], r["pooled"], r["status"]) == (4, True, "ok")
    kh = random_effects(d, v)  # Knapp–Hartung: t(3), never narrower than z
    assert kh["estimate"] == pytest.approx(est) and kh["hi"] - kh["lo"] > r["hi"] - r["lo"]


def test_random_effects_reproduces_published_bcg_example():
    """metafor rma(yi, vi, data=dat.bcg, method="DL"): estimate −0.7141, se 0.1787,
    tau² 0.3088, I² 92.12 %, Q 152.23."""
    yi, vi, _ = bcg()
    r = random_effects(yi, vi, knapp_hartung=False)
    assert r["estimate"] == pytest.approx(-0.7141, abs=5e-5)
    assert r["se"] == pytest.approx(0.1787, abs=5e-5)
    assert r["tau2"] == pytest.approx(0.3088, abs=5e-5)
    assert r["i2"] == pytest.approx(0.9212, abs=5e-5)
    assert r["q"] == pytest.approx(152.2330, abs=5e-4)


def test_homogeneous_sites_give_tau2_zero_and_the_fixed_effect_estimate():
    d = np.array([0.05, 0.051, 0.049, 0.05])
    v = np.array([0.01, 0.02, 0.01, 0.015])
    r = random_effects(d, v, knapp_hartung=False)
    w = 1 / v
    assert r["tau2"] == 0.0 and r["i2"] == 0.0
    assert r["estimate"] == pytest.approx((w * d).sum() / w.sum())
    assert r["se"] == pytest.approx(math.sqrt(1 / w.sum()))  # finite, not NaN
    same = random_effects([0.1, 0.1, 0.1], [0.01, 0.01, 0.01])
    assert same["tau2"] == 0.0 and same["i2"] == 0.0 and same["estimate"] == pytest.approx(0.1)
    assert same["se"] == pytest.approx(math.sqrt(0.01 / 3))  # HKSJ scale 0 floored at 1


def test_random_effects_single_site_zero_variance_and_nan():
    one = random_effects([0.1, float("nan")], [0.0025, 0.001])
    assert one["pooled"] is False and one["status"] == "single_site" and one["n_sites"] == 1
    assert one["estimate"] == 0.1 and one["se"] == pytest.approx(0.05) and math.isnan(one["tau2"])
    zero = random_effects([0.0, 0.1, 0.12], [0.0, 0.001, 0.002])
    assert zero["n_excluded"] == 1 and zero["n_sites"] == 2 and zero["pooled"] is True
    none = random_effects([], [])
    assert none["status"] == "no_sites" and math.isnan(none["estimate"])


def test_meta_regression_recovers_a_planted_slope():
    """30 sites, difference = 0.02 − 0.04·x + site effect (tau 0.02) + sampling error:
    the fitted slope is near −0.04 and its interval covers it and excludes 0; with no
    planted slope, the interval covers 0."""
    rng = np.random.default_rng(4)
    x = rng.uniform(4, 8, 30)  # log n_train
    v = rng.uniform(0.0005, 0.003, 30)
    noise = rng.normal(0, 0.02, 30) + rng.normal(0, np.sqrt(v))
    r = meta_regression(0.02 - 0.04 * x + noise, v, x)
    assert r["status"] == "ok" and r["df"] == 28 and r["method"] == "knapp-hartung"
    assert r["slope"] == pytest.approx(-0.04, abs=0.01)
    assert r["lo"] < -0.04 < r["hi"] and r["hi"] < 0 and r["p"] < 0.001
    flat = meta_regression(0.02 + noise, v, x)
    assert flat["lo"] < 0 < flat["hi"]


def test_meta_regression_reproduces_published_bcg_slope():
    """metafor rma(yi, vi, mods=~ablat, data=dat.bcg) (REML tau² 0.0764): intercept 0.2515
    (se 0.2491), slope −0.0291 (se 0.0072), with the z test; given that tau², the fit
    must match."""
    yi, vi, ablat = bcg()
    r = meta_regression(yi, vi, ablat, tau2=0.0764, knapp_hartung=False)
    assert r["slope"] == pytest.approx(-0.0291, abs=5e-5)
    assert r["se"] == pytest.approx(0.0072, abs=5e-5)
    assert r["intercept"] == pytest.approx(0.2515, abs=5e-4)
    assert r["intercept_se"] == pytest.approx(0.2491, abs=5e-4)


def test_meta_regression_knapp_hartung_equals_hand_computation():
    """Knapp–Hartung: the weighted residual scale (floored at 1) times the model-based
    covariance, with t(k − 2); computed here by hand from the normal equations."""
    yi, vi, ablat = bcg()
    tau2 = 0.05
    w = 1 / (vi + tau2)
    X = np.column_stack([np.ones_like(ablat), ablat])
    inv = np.linalg.inv((X.T * w) @ X)
    beta = inv @ ((X.T * w) @ yi)
    scale = max(1.0, (w * (yi - X @ beta) ** 2).sum() / (len(yi) - 2))
    se = math.sqrt(scale * inv[1, 1])
    r = meta_regression(yi, vi, ablat, tau2=tau2)
    assert scale > 1  # so the adjustment is visible
    assert r["slope"] == pytest.approx(beta[1]) and r["se"] == pytest.approx(se)
    assert r["p"] == pytest.approx(2 * t_dist.sf(abs(beta[1]) / se, 11))
    assert r["hi"] == pytest.approx(beta[1] + t_dist.isf(0.025, 11) * se)
    z = meta_regression(yi, vi, ablat, tau2=tau2, knapp_hartung=False)
    assert z["se"] == pytest.approx(math.sqrt(inv[1, 1])) and z["method"] == "z"


def test_meta_regression_needs_three_sites_and_spread():
    assert meta_regression([0.1, 0.2], [0.01, 0.01], [1, 2])["status"] == "too_few_sites"
    assert meta_regression([0.1, 0.2, 0.3], [0.01, 0.01, 0.01], [1, 1, 1])["status"] == "no_spread"


# ------------------------------------------------------------------ multiplicity
def test_holm_equals_hand_computation_and_skips_nan():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, float("nan"), 0.04, 0.03, 0.005])  # the NaN is not a fifth test
    np.testing.assert_allclose(out[[0, 2, 3, 4]], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(out[1])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    with pytest.raises(ValueError):
        holm([0.5, 1.5])


# ------------------------------------------------------------------ calibration
def test_calibration_slope_and_intercept_of_calibrated_and_overconfident_models():
    rng = np.random.default_rng(8)
    p = 1 / (1 + np.exp(-rng.normal(-1, 1.5, 20000)))
    y = (rng.random(20000) < p).astype(int)  # outcomes drawn from the predicted risks
    r = calibration_slope_intercept(y, p)
    assert r["status"] == "ok"
    assert r["slope"] == pytest.approx(1.0, abs=0.06) and r["slope_lo"] < 1 < r["slope_hi"]
    assert r["intercept"] == pytest.approx(0.0, abs=0.06) and r["intercept_lo"] < 0 < r["intercept_hi"]
    lp = np.log(p / (1 - p))
    extreme = calibration_slope_intercept(y, 1 / (1 + np.exp(-2 * lp)))  # too extreme
    assert extreme["slope"] == pytest.approx(0.5, abs=0.03)
    # the intercept is calibration-in-the-large (slope fixed at 1 by an offset): it solves
    # sum(y) = sum(expit(a + logit p)); the two-parameter fit's own intercept is near 0 here
    a = brentq(lambda a: (1 / (1 + np.exp(-(a + 2 * lp)))).sum() - y.sum(), -5, 5)
    assert extreme["intercept"] == pytest.approx(a, abs=1e-5) and abs(a) > 0.2
    assert extreme["recal_intercept"] == pytest.approx(0.0, abs=0.06)
    high = calibration_slope_intercept(y, 1 / (1 + np.exp(-(lp + 0.5))))  # too high
    assert high["intercept"] == pytest.approx(-0.5, abs=0.06)
    assert high["slope"] == pytest.approx(1.0, abs=0.06)


def test_calibration_slope_is_nan_where_it_cannot_be_fitted():
    assert calibration_slope_intercept([1, 1, 1], [0.2, 0.5, 0.9])["status"] == "one_class"
    assert calibration_slope_intercept([0, 1, 0, 1], [0.3] * 4)["status"] == "no_spread"
    sep = calibration_slope_intercept([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert sep["status"] == "not_fitted" and math.isnan(sep["slope"])


def raw_ece(y, p, edges):
    total = 0.0
    for i in range(len(edges) - 1):
        last = i == len(edges) - 2
        inb = (p >= edges[i]) & ((p <= edges[i + 1]) if last else (p < edges[i + 1]))
        if inb.any():
            total += inb.sum() / len(p) * abs(y[inb].mean() - p[inb].mean())
    return total


def test_ece_from_bins_equals_ece_from_raw_data_and_bins_pool_by_addition():
    rng = np.random.default_rng(9)
    p = np.r_[rng.random(500) ** 2, [0.0, 1.0, 0.5]]  # the bounds and an edge included
    y = (rng.random(len(p)) < np.clip(p * 1.3, 0, 1)).astype(int)
    edges = [i / 10 for i in range(11)]
    bins = calibration_bins(y, p, edges)
    np.testing.assert_array_equal(bins.n, np.histogram(p, edges)[0])  # [a, b), the last [a, 1]
    assert bins.n.sum() == len(p) and bins.positives.sum() == y.sum()
    assert calibration_from_bins(bins)["ece"] == pytest.approx(raw_ece(y, p, np.array(edges)))
    # sites release bins; the pooled diagram is the sum, equal to the bins of all patients
    parts = [calibration_bins(y[s], p[s], edges) for s in (slice(0, 200), slice(200, None))]
    pooled = pool_bins(parts)
    np.testing.assert_allclose(pooled.n, bins.n)
    np.testing.assert_allclose(pooled.sum_p, bins.sum_p)
    np.testing.assert_allclose(pooled.observed_rate(), bins.observed_rate())
    assert calibration_from_bins(pooled)["ece"] == pytest.approx(calibration_from_bins(bins)["ece"])
    with pytest.raises(ValueError, match="edges"):
        pool_bins([bins, calibration_bins(y, p, [0, 0.5, 1])])


def test_ece_with_withheld_bins_says_so():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.8, 0.2, 0.85])
    b = calibration_bins(y, p, [0, 0.5, 1])
    withheld = type(b)(edges=b.edges, n=np.array([np.nan, 3.0]),
                       positives=np.array([np.nan, 3.0]), sum_p=np.array([np.nan, 2.55]))
    r = calibration_from_bins(withheld)
    assert r["status"] == "partial" and r["bins_withheld"] == 1
    assert r["ece"] == pytest.approx(abs(3 - 2.55) / 3)
    # a bin withheld at one site is withheld in the pool, not silently undercounted
    pooled = pool_bins([withheld, b])
    assert math.isnan(pooled.n[0]) and pooled.n[1] == 6
    assert calibration_from_bins(pooled)["bins_withheld"] == 1
