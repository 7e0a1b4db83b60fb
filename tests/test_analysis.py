"""Analysis on a planted 5-site RUN_DIR: drivers, site-level correlations, suppression, missing files."""

import csv
import json
import math

import pytest

from clinfed.server.analysis import analyze

FIELDS = ["site", "regime", "split", "subgroup", "metric", "value", "n", "status", "note"]
N_TRAIN = {"h01": 2000, "h02": 1000, "h03": 500, "h04": 250, "h05": 120}
SITES = list(N_TRAIN)
# Global AUC per split: h05 (smallest) worst on both.
GLOBAL = {"test": [0.80, 0.76, 0.72, 0.66, 0.60], "temporal": [0.78, 0.73, 0.69, 0.62, 0.55]}
# Gains over global per regime, split, site: local's gain falls with n_train (rho = -1);
# augmented helps on the random test and hurts on the temporal one (sign flip).
GAINS = {
    "local": {"test": [-0.02, 0.01, 0.03, 0.06, 0.10], "temporal": [-0.03, 0.00, 0.02, 0.05, 0.08]},
    "personalized": {"test": [0.01, 0.02, 0.02, 0.03, 0.04], "temporal": [0.00, 0.01, 0.01, 0.02, 0.03]},
    "cluster": {"test": [-0.01, 0.00, -0.01, 0.01, 0.00], "temporal": [-0.02, -0.01, 0.00, 0.00, -0.01]},
    "augmented": {"test": [0.02, 0.03, 0.03, 0.04, 0.05], "temporal": [-0.01, -0.02, -0.02, -0.03, -0.04]},
}
AGE_BANDS = ["<45", "45-64", "65-79", "80+"]
# Global AUC offset per age band (80+ worst); personalized adds +0.06 for 80+, local +0.02.
AGE_OFFSET = {"<45": 0.05, "45-64": 0.02, "65-79": -0.03, "80+": -0.12}
INSURANCE = ["commercial", "government", "self_pay"]
# Planted in suppressed cells and descriptors: must never be printed anywhere.
LEAK_AUC = "0.913579"
LEAK_N = "7777"
LEAK_DESC = "0.246813"
# Patient-level importances (site -> driver -> importance) and n per site. The big site's order is
# n_comorbidities > age > insurance > words_per_note > region; the small sites rank insurance first,
# so the unweighted mean puts insurance first and only n-weighting gives the big site's order.
IMPORTANCES = {
    "h01": {"n_comorbidities": 0.080, "age": 0.050, "insurance": 0.030, "words_per_note": 0.020, "region": 0.005},
    "h02": {"n_comorbidities": 0.060, "age": 0.020, "insurance": 0.090, "words_per_note": 0.010, "region": -0.002},
    "h03": {"n_comorbidities": 0.060, "age": 0.020, "insurance": 0.090, "words_per_note": 0.010, "region": 0.000},
    "h04": {"n_comorbidities": 0.060, "age": 0.020, "insurance": 0.090, "words_per_note": 0.010, "region": 0.001},
}
IMP_N = {"h01": 2000, "h02": 100, "h03": 100, "h04": 100}  # h05 could not fit it: absent
WEIGHTED_ORDER = ["n_comorbidities", "age", "insurance", "words_per_note", "region"]


def _auc_rows(site, regime, split, subgroup, auc, n, positives=40):
    return [[site, regime, split, subgroup, m, f"{v:.4f}", n, "ok", ""]
            for m, v in [("auc", auc), ("auc_lo", auc - 0.05), ("auc_hi", auc + 0.05)]] + \
        [[site, regime, split, subgroup, "positives", positives, n, "ok", ""]]


def _supp_rows(site, regime, split, subgroup):
    return [[site, regime, split, subgroup, m, LEAK_AUC, LEAK_N, "suppressed", ""] for m in ("auc", "auc_lo", "auc_hi")]


def metrics_rows(cross_site=True):
    rows = []
    for i, site in enumerate(SITES):
        n_eval = max(60, N_TRAIN[site] // 3)
        for split in ("test", "temporal"):
            g = GLOBAL[split][i]
            rows += _auc_rows(site, "base", split, "all", 0.52, n_eval)
            rows += _auc_rows(site, "global", split, "all", g, n_eval)
            for regime, gains in GAINS.items():
                rows += _auc_rows(site, regime, split, "all", g + gains[split][i], n_eval)
            for band in AGE_BANDS:
                sub = f"age={band}"
                if site == "h05" and band == "<45":  # small cell: suppressed with planted numbers
                    for regime in ("global", "local", "personalized"):
                        rows += _supp_rows(site, regime, split, sub)
                    continue
                ga = g + AGE_OFFSET[band]
                rows += _auc_rows(site, "global", split, sub, ga, 30 + 10 * i)
                rows += _auc_rows(site, "local", split, sub, ga + (0.02 if band == "80+" else 0.0), 30 + 10 * i)
                rows += _auc_rows(site, "personalized", split, sub, ga + (0.06 if band == "80+" else 0.01), 30 + 10 * i)
            for j, ins in enumerate(INSURANCE):
                rows += _auc_rows(site, "global", split, f"insurance={ins}", g - 0.01 * j, 40)
            for q in ("q1", "q2", "q3", "q4"):
                rows += _auc_rows(site, "global", split, f"words={q}", g + 0.005 * int(q[1]), 25)
            if cross_site:
                for origin in SITES:
                    auc = g + (GAINS["local"][split][i] if origin == site else -0.05)
                    if origin == "h05" and site == "h01" and split == "temporal":
                        rows += _supp_rows(site, f"local@{origin}", split, "all")
                    else:
                        rows += _auc_rows(site, f"local@{origin}", split, "all", auc, n_eval)
    return rows


def descriptor_rows():
    rows = []
    for i, site in enumerate(SITES):
        n = N_TRAIN[site] * 2
        vals = {"n": n, "readmission_rate": 0.12 + 0.03 * i, "mortality_rate": 0.02 + 0.001 * ((i * 3) % 5),
                "words_mean": 180 - 20 * i, "words_q1": 100, "words_median": 150 - 10 * i, "words_q3": 210,
                "age=80+": 0.10 + 0.05 * i, "comorbidity=5+": 0.05 + 0.02 * ((i * 2) % 5),
                "insurance=government": 0.3 + 0.02 * ((i * 4) % 5)}
        for d, v in vals.items():
            rows.append([site, d, v, "ok"])
        # A withheld descriptor that carries a number anyway (a buggy writer): must be ignored.
        rows.append([site, "insurance=self_pay", LEAK_DESC if site == "h05" else 0.01 * (i + 1),
                     "suppressed" if site == "h05" else "ok"])
    return rows


def write_rich_run(run_dir, *, cross_site=True, clusters=True, drop=()):
    """A 5-site RUN_DIR with every file the analysis reads; `drop` lists files to leave out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics.csv": (FIELDS, metrics_rows(cross_site)),
        "sites.csv": (["site", "n_train", "n_val", "n_test", "n_temporal"],
                      [[s, n, n // 10, n // 3, n // 3] for s, n in N_TRAIN.items()]),
        "descriptors.csv": (["site", "descriptor", "value", "status"], descriptor_rows()),
        "driver_importances.csv": (["site", "driver", "importance", "n"],
                                   [[s, d, v, IMP_N[s]] for s, imp in IMPORTANCES.items() for d, v in imp.items()]),
    }
    for name, (header, rows) in files.items():
        if name in drop:
            continue
        with open(run_dir / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    run = {
        "status": "completed", "model": "tiny-bert",
        "config": {"min-cell-size": 10, "num-server-rounds": 2, "share-local-adapters": cross_site,
                   "clusters": 2, "augment-k": 5, "augment-space": "embedding",
                   "regimes": "base,global,local,personalized,cluster,augmented"},
        "timings": {"total": 60.0}, "rounds": [],
    }
    if clusters:
        run["clusters"] = {"method": "kmeans", "k": 2, "features": ["age=80+", "readmission_rate"],
                           "assignment": {"h01": 0, "h02": 0, "h03": 1, "h04": 1, "h05": 1}}
    if "run.json" not in drop:
        (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def analyzed(tmp_path):
    run_dir = write_rich_run(tmp_path / "run")
    return run_dir, analyze(run_dir)


def test_writes_files_with_columns(analyzed):
    run_dir, _ = analyzed
    drivers = _read(run_dir / "drivers.csv")
    assert {"level", "driver", "importance", "rank", "n", "n_sites", "method", "target", "split"} <= set(drivers[0])
    reg = _read(run_dir / "site_analysis.csv")
    assert {"target", "split", "term", "coef", "n_sites", "r2"} <= set(reg[0])


def test_patient_drivers_are_n_weighted(analyzed):
    run_dir, summary = analyzed
    rows = [r for r in _read(run_dir / "drivers.csv") if r["level"] == "patient"]
    by_rank = sorted(rows, key=lambda r: int(r["rank"]))
    assert [r["driver"] for r in by_rank] == WEIGHTED_ORDER
    assert [d["driver"] for d in summary["top_drivers"]][:3] == WEIGHTED_ORDER[:3]
    # The planted case really needs the weights: the unweighted mean ranks insurance first.
    unweighted = sorted(rows, key=lambda r: -float(r["importance_unweighted"]))
    assert unweighted[0]["driver"] == "insurance"
    top = by_rank[0]
    expected = (0.080 * 2000 + 0.060 * 300) / 2300
    assert math.isclose(float(top["importance"]), expected, rel_tol=1e-4)
    assert top["n"] == "2300" and top["n_sites"] == "4"
    from clinfed.server.analysis import PATIENT_METHOD

    assert top["method"] == PATIENT_METHOD and "within-band AUC" in PATIENT_METHOD
    region = next(r for r in rows if r["driver"] == "region")
    assert float(region["importance"]) > 0  # a slightly negative site value is averaged, not dropped


def test_local_gain_falls_with_site_size(analyzed):
    run_dir, summary = analyzed
    rows = _read(run_dir / "drivers.csv")
    for split in ("test", "temporal"):
        row = next(r for r in rows if r["level"] == "site" and r["target"] == "gain:local"
                   and r["split"] == split and r["driver"] == "n_train")
        assert math.isclose(float(row["importance"]), -1.0) and row["n_sites"] == "5"
        assert row["rank"] == "1"  # |rho| = 1: tied first at most
    loc = [g for g in summary["gain_vs_n_train"] if g["regime"] == "local"]
    assert {g["split"] for g in loc} == {"test", "temporal"} and all(g["rho"] < -0.99 for g in loc)
    # Targets: one per gain regime present plus global_gap, per split.
    targets = {(r["target"], r["split"]) for r in rows if r["level"] == "site"}
    for t in ("gain:local", "gain:personalized", "gain:cluster", "gain:augmented", "global_gap"):
        assert (t, "test") in targets and (t, "temporal") in targets
    assert not any("@" in t for t, _ in targets)
    gap = next(r for r in rows if r["target"] == "global_gap" and r["driver"] == "n_train" and r["split"] == "test")
    assert float(gap["importance"]) == pytest.approx(1.0)  # global AUC rises with size
    assert "n-weighted mean" in gap["method"]


def test_regression_rows(analyzed):
    run_dir, _ = analyzed
    reg = [r for r in _read(run_dir / "site_analysis.csv") if r["target"] == "gain:local" and r["split"] == "test"]
    terms = [r["term"] for r in reg]
    assert terms[0] == "intercept" and terms[1] == "z:log10_n_train" and len(terms) == 4
    assert "z:n" not in terms  # site size again: excluded
    assert all(r["n_sites"] == "5" for r in reg)
    assert 0.9 <= float(reg[0]["r2"]) <= 1.0000001
    intercept = float(reg[0]["coef"])
    assert intercept == pytest.approx(sum(GAINS["local"]["test"]) / 5, abs=1e-9)  # centered regressors


def test_worst_served_and_best_regime(analyzed):
    _, summary = analyzed
    for split in ("test", "temporal"):
        w = summary["worst"][split]
        assert w["site"]["site"] == "h05"
        assert w["site"]["best_regime"] == "local"
        assert w["site"]["gain"] == pytest.approx(GAINS["local"][split][4])
        assert w["subgroup"]["subgroup"] == "age=80+"
        assert w["subgroup"]["best_regime"] == "personalized"
        assert w["subgroup"]["gain"] == pytest.approx(0.06)
        assert w["by_grouping"]["age"]["subgroup"] == "age=80+"
    flips = {f["regime"]: f for f in summary["sign_flips"]}
    assert flips["augmented"]["mean_flips"] and flips["augmented"]["mean_gain_test"] > 0
    assert sorted(flips["augmented"]["sites_helps_test_hurts_temporal"]) == SITES
    assert "personalized" not in flips
    assert summary["clusters"]["assignment"]["h05"] == 1


def test_suppressed_values_never_used(analyzed):
    run_dir, summary = analyzed
    for name in ("drivers.csv", "site_analysis.csv"):
        text = (run_dir / name).read_text()
        for leak in (LEAK_AUC, LEAK_N, LEAK_DESC, "0.9136", "0.2468"):
            assert leak not in text
    # Suppressed age=<45 at h05: the pooled cell uses the other 4 sites only and counts the suppressed one.
    pooled = summary["tables"]["subgroups"]
    cell = pooled[(pooled["subgroup"] == "age=<45") & (pooled["regime"] == "global") & (pooled["split"] == "test")]
    assert int(cell["n_sites"].iloc[0]) == 4 and int(cell["n_suppressed"].iloc[0]) == 1
    assert cell["auc"].iloc[0] < 0.9
    by_site = summary["tables"]["subgroups_by_site"]
    supp = by_site[by_site["status"] == "suppressed"]
    assert len(supp) and supp["auc"].isna().all() and supp["n"].isna().all()
    # The withheld descriptor is missing at h05, so its rho is over 4 sites, never 5.
    rows = _read(run_dir / "drivers.csv")
    sp = [r for r in rows if r["driver"] == "insurance=self_pay" and r["target"] == "gain:local"]
    assert sp and all(r["n_sites"] == "4" for r in sp)


def test_too_few_sites_skips_with_note(tmp_path):
    run_dir = write_rich_run(tmp_path / "run")
    rows = [r for r in metrics_rows() if r[0] not in ("h04", "h05")]
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        w.writerows(rows)
    summary = analyze(run_dir)
    site = [r for r in _read(run_dir / "drivers.csv") if r["level"] == "site"]
    assert site and all(r["importance"] == "" and "need at least 4" in r["note"] for r in site)
    reg = _read(run_dir / "site_analysis.csv")
    assert reg and all(r["coef"] == "" and r["note"].startswith("skipped") for r in reg)
    loc = [g for g in summary["gain_vs_n_train"] if g["regime"] == "local"]
    assert loc and all(math.isnan(g["rho"]) for g in loc)


@pytest.mark.parametrize("drop", [
    ("descriptors.csv",), ("driver_importances.csv",), ("run.json",), ("sites.csv",),
    ("metrics.csv", "sites.csv", "descriptors.csv", "driver_importances.csv", "run.json"),
])
def test_missing_files_tolerated(tmp_path, drop):
    run_dir = write_rich_run(tmp_path / "run", drop=drop)
    summary = analyze(run_dir)
    assert (run_dir / "drivers.csv").exists() and (run_dir / "site_analysis.csv").exists()
    assert any(d in n for d in drop for n in summary["notes"])
    drivers = _read(run_dir / "drivers.csv")
    if "driver_importances.csv" in drop:
        assert not any(r["level"] == "patient" for r in drivers) and summary["top_drivers"] == []
    if drop == ("descriptors.csv",):  # n_train (sites.csv) is still a site-level driver
        assert {r["driver"] for r in drivers if r["level"] == "site"} == {"n_train"}
    if "sites.csv" in drop and "metrics.csv" not in drop:
        assert not any(r["driver"] == "n_train" and r["importance"] for r in drivers)


def test_missing_regimes_tolerated(tmp_path):
    run_dir = write_rich_run(tmp_path / "run", cross_site=False)
    rows = [r for r in metrics_rows(False) if r[1] in ("base", "global")]
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        w.writerows(rows)
    summary = analyze(run_dir)
    targets = {r["target"] for r in _read(run_dir / "drivers.csv") if r["level"] == "site"}
    assert targets == {"global_gap"}
    assert summary["worst"]["test"]["site"]["best_regime"] is None
    assert summary["sign_flips"] == [] and summary["gain_vs_n_train"] == []
