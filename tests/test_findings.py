"""Key findings from the tests (issue 19): a regime is called better or worse only where the
Holm-adjusted p says so, pooled results carry τ²/I², "helps small sites" comes from the size
meta-regression, and a run folder without the new files still builds, saying it is untested.

The run folder is the 5-site rich fixture of test_analysis, plus differences.csv, size_effects.csv,
calibration.csv and subgroup_gaps.csv written here by hand with known values.
"""

import csv
import re

import pytest

from clinfed.server.analysis import analyze, read_differences, verdict
from clinfed.server.reports import build_report
from test_analysis import write_rich_run

DIFF_FIELDS = ["site", "regime", "reference", "split", "subgroup", "family", "diff", "lo", "hi", "p", "p_adj", "n",
               "positives", "method", "status", "replicates", "consistent", "tau2", "i2", "n_sites", "note"]
# Planted in suppressed rows: must never be printed.
LEAK = "0.777131"
LEAK_N = "9191"


def _d(site, regime, split, diff, lo, hi, p, p_adj, *, ref="global", sub="all", n=300, pos=40, status="ok",
       reps=1, cons="", tau2="", i2="", k=""):
    method = "random-effects" if site == "pooled" else "delong"
    return [site, regime, ref, split, sub, "primary" if sub == "all" else "subgroup", diff, lo, hi, p, p_adj, n,
            pos, method, status, reps, cons, tau2, i2, k, ""]


def difference_rows(reps=1):
    """local vs global on the random test: h05 better, h04 worse, h01 a large diff that is NOT
    significant after Holm (raw p 0.01, p_adj 0.30), h03 withheld; pooled null but heterogeneous.
    personalized: no site significant, pooled significant and homogeneous."""
    c = (lambda v: v if reps > 1 else "")
    rows = [
        _d("h01", "local", "test", 0.150, -0.050, 0.350, 0.010, 0.300, reps=reps, cons=c(1)),
        _d("h02", "local", "test", -0.010, -0.060, 0.040, 0.700, 1.000, reps=reps, cons=c(0)),
        [*_d("h03", "local", "test", LEAK, LEAK, LEAK, LEAK, LEAK, n=LEAK_N, pos=LEAK_N, status="suppressed")],
        _d("h04", "local", "test", -0.090, -0.150, -0.030, 0.0004, 0.010, reps=reps, cons=c(2)),
        _d("h05", "local", "test", 0.120, 0.050, 0.190, 0.0002, 0.020, reps=reps, cons=c(3)),
        _d("pooled", "local", "test", 0.030, -0.020, 0.080, 0.200, 0.600, n=1200, reps=reps, tau2=0.0031,
           i2=0.72, k=4),
        _d("pooled", "local", "temporal", -0.040, -0.070, -0.010, 0.001, 0.030, n=1200, reps=reps, tau2=0.0,
           i2=0.10, k=4, cons=c(3)),
        _d("h05", "local", "temporal", -0.050, -0.120, 0.020, 0.200, 1.000, reps=reps),
    ]
    for i, site in enumerate(["h01", "h03", "h04", "h05"]):
        rows.append(_d(site, "personalized", "test", 0.02, -0.03 - 0.01 * i, 0.07 + 0.01 * i, 0.4, 1.0, reps=reps))
    # h02: its own interval excludes 0 (raw p 0.01) but Holm over the family leaves p_adj 0.08: no finding.
    rows.append(_d("h02", "personalized", "test", 0.050, 0.010, 0.090, 0.010, 0.080, reps=reps))
    rows.append(_d("pooled", "personalized", "test", 0.020, 0.010, 0.030, 0.0005, 0.004, n=1500, reps=reps,
                   tau2=0.0, i2=0.0, k=5, cons=c(3)))
    rows.append(_d("pooled", "global", "test", 0.210, 0.150, 0.270, 0.00001, 0.0002, ref="base", n=1500, reps=reps,
                   tau2=0.0005, i2=0.2, k=5, cons=c(3)))
    # the second family: the worst-served subgroup, pooled
    rows.append(_d("pooled", "personalized", "test", 0.060, 0.020, 0.100, 0.001, 0.010, sub="age=80+", k=4))
    rows.append(_d("pooled", "local", "test", 0.020, -0.030, 0.070, 0.400, 0.800, sub="age=80+", k=4))
    return rows


SIZE_ROWS = [
    ["local", "global", "test", "log2 training notes", -0.030, -0.050, -0.010, 0.001, 0.004, 5, ""],
    ["personalized", "global", "test", "log2 training notes", -0.020, -0.060, 0.020, 0.300, 0.600, 5, ""],
]


def calibration_rows():
    rows = []
    for site in ("h01", "h05", "pooled"):
        for regime, shift in (("global", 0.0), ("local", 0.04)):
            for m, v in (("ece", 0.021 + shift), ("slope", 0.93 - shift), ("slope_lo", 0.80 - shift),
                         ("slope_hi", 1.06 - shift), ("intercept", 0.05 + shift), ("intercept_lo", -0.10),
                         ("intercept_hi", 0.20 + shift)):
                rows.append([site, regime, "test", m, f"{v:.4f}", "ok"])
            for i in range(10):
                n = 200 - 15 * i
                mean_p = i / 10 + 0.05
                rows += [[site, regime, "test", f"bin{i}_lo", i / 10, "ok"],
                         [site, regime, "test", f"bin{i}_hi", (i + 1) / 10, "ok"],
                         [site, regime, "test", f"bin{i}_n", n, "ok"],
                         [site, regime, "test", f"bin{i}_positives", round(n * min(1.0, mean_p + shift)), "ok"],
                         [site, regime, "test", f"bin{i}_mean_p", mean_p, "ok"]]
    rows.append(["h03", "global", "test", "ece", LEAK, "suppressed"])
    return rows


GAP_ROWS = [
    ["pooled", "global", "test", "age", "<45", "80+", 0.170, 0.090, 0.250, 0.0001, 0.002, "ok"],
    ["pooled", "local", "test", "age", "<45", "80+", 0.120, 0.030, 0.210, 0.01, 0.080, "ok"],
    ["h05", "global", "test", "age", "45-64", "80+", 0.300, -0.050, 0.650, 0.09, 0.900, "ok"],
    ["h03", "global", "test", "age", "", "", LEAK, LEAK, LEAK, LEAK, LEAK, "suppressed"],
    ["pooled", "global", "test", "insurance", "commercial", "self_pay", 0.020, -0.040, 0.080, 0.5, 1.0, "ok"],
]


def _write(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def write_tested(run_dir, reps=1):
    _write(run_dir / "differences.csv", DIFF_FIELDS, difference_rows(reps))
    _write(run_dir / "size_effects.csv", ["regime", "reference", "split", "covariate", "slope", "lo", "hi", "p",
                                          "p_adj", "n_sites", "note"], SIZE_ROWS)
    _write(run_dir / "calibration.csv", ["site", "regime", "split", "metric", "value", "status"], calibration_rows())
    _write(run_dir / "subgroup_gaps.csv", ["site", "regime", "split", "grouping", "best", "worst", "gap", "lo", "hi",
                                           "p", "p_adj", "status"], GAP_ROWS)
    return run_dir


def _findings(text):
    m = re.search(r'<section id="findings">(.*?)</section>', text, re.S)
    assert m
    return m.group(1)


def _section(findings, heading):
    m = re.search(r"<h3>" + re.escape(heading) + r"[^<]*</h3><ul>(.*?)</ul>", findings, re.S)
    assert m, heading
    return m.group(1)


def _bullet(findings, start, heading="Random test split"):
    """The one bullet of a findings section that starts with `start`."""
    items = [b for b in re.findall(r"<li>(.*?)</li>", _section(findings, heading), re.S) if b.startswith(start)]
    assert len(items) == 1, (start, items)
    return items[0]


def _clause(bullet, head):
    """The clause of a comparison bullet from `head` up to the next ';' (e.g. 'no detectable difference at')."""
    m = re.search(re.escape(head) + r"(.*?)(;|\. Pooled)", bullet)
    return m.group(1) if m else ""


def _visible(text):
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    run_dir = write_tested(write_rich_run(tmp_path_factory.mktemp("tested") / "run"))
    text = build_report(run_dir).read_text(encoding="utf-8")
    return run_dir, text, _findings(text)


def test_verdict_follows_the_adjusted_p_only():
    assert verdict(0.15, 0.30) == "none"  # large difference, not significant after Holm
    assert verdict(0.02, 0.004) == "better" and verdict(-0.09, 0.01) == "worse"
    assert verdict(0.15, 0.049999) == "better" and verdict(0.15, 0.05) == "none"
    assert verdict(0.2, 0.001, "suppressed") == "suppressed"
    assert verdict(float("nan"), 0.01) == "not_computable"


def test_significant_site_rows_are_called_with_interval_and_p_adj(tested):
    _, _, f = tested
    local = _bullet(f, "<strong>local</strong> vs global")
    assert ("<strong>better</strong> than global at <strong>h05</strong> (+0.120 [+0.050, +0.190], "
            "p_adj = 0.020)") in local
    assert ("<strong>worse</strong> than global at <strong>h04</strong> (−0.090 [−0.150, −0.030], "
            "p_adj = 0.010)") in local


def test_large_but_not_significant_difference_is_not_called_better(tested):
    run_dir, _, f = tested
    local = _bullet(f, "<strong>local</strong> vs global")
    # h01: +0.150 with raw p 0.01 but p_adj 0.30: the largest point gain, and still no finding.
    assert "h01" not in _clause(local, "<strong>better</strong> than global at")
    nodiff = _clause(local, "no detectable difference at")
    assert "h01 (+0.150 [−0.050, +0.350], p_adj = 0.300)" in nodiff and "h02" in nodiff
    assert "withheld by disclosure control at h03" in local
    # The personalized sites are all non-significant: none is called better, though every point gain is > 0
    # and h02's own interval excludes 0 (raw p 0.01, p_adj 0.08).
    pers = _bullet(f, "<strong>personalized</strong> vs global")
    assert "than global at" not in pers.split("Pooled")[0]
    assert "h02 (+0.050 [+0.010, +0.090], p_adj = 0.080)" in _clause(pers, "no detectable difference at")
    # Nowhere in the findings is a point estimate called a win.
    assert "beats global" not in f and "helps most there" not in f
    s = analyze(run_dir)["tests"]
    h01 = next(e for c in s["comparisons"] if (c["regime"], c["split"]) == ("local", "test")
               for e in c["sites"] if e["site"] == "h01")
    assert h01["verdict"] == "none"


def test_pooled_sentences_carry_heterogeneity(tested):
    _, _, f = tested
    local = _bullet(f, "<strong>local</strong> vs global")
    assert ("Pooled over 4 sites (random effects): no detectable difference, +0.030 [−0.020, +0.080], "
            "p_adj = 0.600; τ² = 0.0031, I² = 72 %: no pooled effect, but the effect looks site-specific") in local
    pers = _bullet(f, "<strong>personalized</strong> vs global")
    assert ("Pooled over 5 sites (random effects): <strong>better</strong> than global, +0.020 [+0.010, +0.030], "
            "p_adj = 0.004; τ² = 0.0000, I² = 0 %: the effect looks general") in pers
    # the global-vs-base comparison is stated too; a tiny p_adj is written (HTML-escaped) as "< 0.001"
    assert "<strong>better</strong> than base, +0.210 [+0.150, +0.270], p_adj &lt; 0.001" in \
        _bullet(f, "<strong>global</strong> vs base")


def test_size_slope_decides_helps_small_sites(tested):
    _, _, f = tested
    assert ("<strong>local</strong> − global: <strong>helps small sites more</strong>: slope −0.030 AUC per "
            "doubling of training notes [−0.050, −0.010], p_adj = 0.004 (5 sites)") in f
    assert ("<strong>personalized</strong> − global: no detectable size dependence (slope −0.020 AUC per doubling "
            "of training notes [−0.060, +0.020], p_adj = 0.600") in f
    # The Spearman-based claim gives way to the slope in the drivers section.
    assert "Local − global vs site size (meta-regression slope" in f
    assert "point gains are largest" not in f and "Spearman ρ" not in f


def test_worst_site_flip_gap_and_calibration_findings(tested):
    _, _, f = tested
    # h05 is the global model's worst site; local is detectably better there, from the test.
    assert ("serves site <strong>h05</strong> worst (AUC 0.600); tested against global there: "
            "<strong>local</strong> is better (+0.120 [+0.050, +0.190], p_adj = 0.020)") in f
    assert ("the subgroup served worst is <strong>age=80+</strong>" in f
            and "tested against global pooled in this subgroup: <strong>personalized</strong> is better "
                "(+0.060 [+0.020, +0.100], p_adj = 0.010)" in f)
    # Pooled local: +0.030 (null) on the random test, −0.040 (significant) on the temporal: not a tested flip.
    assert "local's pooled difference to global changes sign" in f and "no tested sign flip" in f
    assert ("<strong>age</strong>, widest gap pooled over sites: global serves &lt;45 best and <strong>80+</strong> "
            "worst, gap +0.170 [+0.090, +0.250], p_adj = 0.002 (significant); at one site (h05)") in f
    assert "not significant" in _bullet(f, "Random test split: <strong>age</strong>", heading="Subgroup gaps")
    assert "Calibration pooled over sites (random test): global ECE 0.021, slope 0.93 [0.80, 1.06]" in f


def test_sections_figures_and_withheld_rows(tested):
    run_dir, text, _ = tested
    for heading in ("Differences", "Calibration", "Subgroup gaps"):
        assert f"<h2>{heading}</h2>" in text
    for name in ("differences_local_vs_global.png", "differences_personalized_vs_global.png",
                 "differences_global_vs_base.png", "reliability.png"):
        assert (run_dir / "figures" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"{name}" not in text  # embedded, not linked
    assert text.count("data:image/png;base64,") == 5 + 4
    rows = list(csv.DictReader((run_dir / "tables" / "differences_by_site.csv").read_text().splitlines()))
    h03 = next(r for r in rows if r["site"] == "h03" and r["regime"] == "local")
    assert h03["status"] == "withheld (disclosure control)" and h03["diff"] == h03["n"] == h03["p_adj"] == ""
    h01 = next(r for r in rows if r["site"] == "h01" and r["regime"] == "local")
    assert (h01["diff"], h01["95 % interval"], h01["p_adj"], h01["verdict"]) == \
        ("+0.150", "[−0.050, +0.350]", "0.300", "no detectable difference")
    cal = list(csv.DictReader((run_dir / "tables" / "calibration.csv").read_text().splitlines()))
    pooled = next(r for r in cal if r["site"] == "pooled" and r["regime"] == "local")
    assert pooled["ECE"] == "0.061" and pooled["slope [95 % CI]"] == "0.890 [0.760, 1.020]"
    assert next(r for r in cal if r["site"] == "h03")["status"] == "withheld (disclosure control)"
    bins = list(csv.DictReader((run_dir / "tables" / "reliability_bins.csv").read_text().splitlines()))
    b0 = next(r for r in bins if (r["regime"], r["bin"]) == ("global", "0"))
    assert (b0["n"], b0["positives"], b0["mean predicted"], b0["observed rate"]) == ("200", "10", "0.050", "0.050")
    assert len([r for r in bins if r["regime"] == "local"]) == 10
    assert "withheld (disclosure control)" in text
    outputs = [_visible(text)] + [p.read_text() for p in (run_dir / "tables").glob("*.csv")]
    for out in outputs:
        assert LEAK not in out and LEAK_N not in out and "0.777" not in out


def test_readers_blank_suppressed_numbers(tested):
    run_dir, _, _ = tested
    d = read_differences(run_dir)
    h03 = d[(d["site"] == "h03") & (d["regime"] == "local")]
    assert (h03["status"] == "suppressed").all() and h03[["diff", "n", "p_adj"]].isna().all().all()


def test_replicates_say_what_holds_in_every_seed(tmp_path):
    run_dir = write_tested(write_rich_run(tmp_path / "run"), reps=3)
    f = _findings(build_report(run_dir).read_text(encoding="utf-8"))
    assert "holds in every one of 3 replicates" in _clause(_bullet(f, "<strong>local</strong> vs global"),
                                                             "<strong>better</strong> than global at")
    assert "holds in 2 of 3 replicates only" in _clause(_bullet(f, "<strong>local</strong> vs global"),
                                                          "<strong>worse</strong> than global at")
    held = _bullet(f, "Findings that hold in every one of the 3 replicates", heading="Replicates")
    assert "local better than global at h05 (random test)" in held
    assert "local worse than global at h04" not in held
    assert "local worse than global at h04 (random test): 2 of 3" in _bullet(f, "Findings that do not hold",
                                                                              heading="Replicates")


def test_old_run_folder_builds_and_says_untested(tmp_path):
    run_dir = write_rich_run(tmp_path / "run")  # no differences.csv, size_effects.csv, calibration.csv, gaps
    text = build_report(run_dir).read_text(encoding="utf-8")
    f = _findings(text)
    assert "untested point estimates" in f and "differences.csv not found" in f
    assert "<strong>better</strong> than" not in f and "beats global" not in f
    assert "Local has the higher point AUC than global at <strong>4 of 5</strong> sites" in f
    assert "differences.csv not found: this run folder predates the paired tests" in text
    assert "<h2>Calibration</h2>" not in text and "<h2>Subgroup gaps</h2>" not in text
    assert not list((run_dir / "figures").glob("differences_*.png"))
    assert analyze(run_dir)["tests"]["comparisons"] == []
