"""Report built from fixture RUN_DIRs: files exist, suppression holds, findings follow the numbers."""

import csv
import json
import re

import pytest

from clinfed.server.reports import build_report

SITES = {"h01": 5000, "h02": 1200, "h03": 150}
REGIMES = ["base", "global", "local", "personalized"]
# AUC per (site, regime, split); h03 is suppressed everywhere, so h02 has the lowest global AUC.
AUC = {
    ("h01", "test"): {"base": 0.601, "global": 0.781, "local": 0.772, "personalized": 0.795},
    ("h01", "temporal"): {"base": 0.590, "global": 0.752, "local": 0.748, "personalized": 0.768},
    ("h02", "test"): {"base": 0.552, "global": 0.612, "local": 0.689, "personalized": 0.701},
    ("h02", "temporal"): {"base": 0.541, "global": 0.598, "local": 0.655, "personalized": 0.662},
}
# Numbers that must never be printed: planted in suppressed rows (a buggy writer could leak them).
LEAK_VALUE = "0.987654"
LEAK_N = "4321"
NC_NOTE = "only one class in test set"
FIELDS = ["site", "regime", "split", "subgroup", "metric", "value", "n", "status", "note"]


def _rows(extra_regime=None):
    rows = []
    for site in SITES:
        for split in ("test", "temporal"):
            for regime in REGIMES + ([extra_regime] if extra_regime else []):
                if site == "h03":
                    for m in ("auc", "auc_lo", "auc_hi", "pr_auc", "f1", "brier", "positives"):
                        rows.append([site, regime, split, "all", m, LEAK_VALUE, LEAK_N, "suppressed", ""])
                    continue
                if (site, regime, split) == ("h02", "base", "temporal"):
                    for m in ("auc", "auc_lo", "auc_hi", "pr_auc"):
                        rows.append([site, regime, split, "all", m, "", 300, "not_computable", NC_NOTE])
                    continue
                auc = AUC[(site, split)].get(regime, 0.700)
                n = 800 if site == "h01" else 300
                for m, v in [("auc", auc), ("auc_lo", auc - 0.04), ("auc_hi", auc + 0.04), ("pr_auc", 0.31),
                             ("f1", 0.42), ("brier", 0.087), ("positives", 61 if site == "h01" else 27)]:
                    rows.append([site, regime, split, "all", m, f"{v:.4f}" if m != "positives" else v, n, "ok", ""])
    # A subgroup row the tables do not show yet: must not crash.
    rows.append(["h01", "global", "test", "age=80+", "auc", "0.6400", 120, "ok", ""])
    return rows


def _write_run(run_dir, status="completed", errors=None, extra_regime=None, rounds=3):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        w.writerows(_rows(extra_regime))
    with open(run_dir / "sites.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["site", "n_train", "n_val", "n_test", "n_temporal"])
        w.writerow(["h01", SITES["h01"], 600, 800, 800])
        w.writerow(["h02", SITES["h02"], 150, 300, 300])
        w.writerow(["h03", SITES["h03"], 20, "", ""])
    run = {
        "config": {"min-cell-size": 25, "num-server-rounds": 3, "study-name": "fixture-study"},
        "versions": {"flwr": "1.42.0", "torch": "2.13.0"},
        "status": status,
        "timings": {"global": 120.5, "local": 60.0, "total": 3725.0},
        "rounds": [
            {"round": r + 1, "bytes_sent": 2_500_000, "bytes_received": 7_400_000,
             "sites": ["h01", "h02"] if r == 1 else ["h01", "h02", "h03"],
             "failures": {"h03": "timeout after 9 s"} if r == 1 else {},
             "train_loss": {"h01": 0.5 - 0.1 * r, "h02": 0.6 - 0.1 * r}}
            for r in range(rounds)
        ],
        "model": "tiny-bert",
        "started": "2025-01-02T10:00:00",
        "finished": "2025-01-02T11:02:05",
    }
    if errors:
        run["errors"] = errors
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


def _visible(html_text):
    """The HTML without embedded PNG payloads (base64 can spell any short digit string)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,", html_text)


def _findings(html_text):
    m = re.search(r'<section id="findings">(.*?)</section>', html_text, re.S)
    assert m, "findings section missing"
    return m.group(1)


@pytest.fixture
def built(tmp_path):
    run_dir = _write_run(tmp_path / "run")
    path = build_report(run_dir)
    return run_dir, path, path.read_text(encoding="utf-8")


def test_outputs_exist_and_are_self_contained(built):
    run_dir, path, text = built
    assert path == run_dir / "report.html" and path.exists()
    for name in ("auc_by_regime.png", "gain_vs_size.png"):
        png = run_dir / "figures" / name
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    for name in ("overview.csv", "training.csv", "timings.csv", "config.csv", "versions.csv", "mean_auc.csv"):
        assert (run_dir / "tables" / name).exists()
    # Every figure written is embedded once (auc, gain, subgroups, cross-site; no drivers without importances).
    pngs = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert pngs == ["auc_by_regime.png", "cross_site.png", "gain_vs_size.png", "subgroups.png"]
    assert text.count("data:image/png;base64,") == len(pngs)
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    for site in SITES:
        assert site in text
    for regime in REGIMES:
        assert regime in text
    assert "<details>" in text and "1.42.0" in text
    assert "1 h 02 min" in text  # total wall time, human-readable
    assert "7.4 MB" in text and "timeout after 9 s" in text


def test_suppressed_cells_never_print_numbers(built):
    run_dir, _, text = built
    text = _visible(text)
    assert "suppressed" in text
    overview = (run_dir / "tables" / "overview.csv").read_text()
    for leak in (LEAK_VALUE, LEAK_N, "0.988", "0.98765"):
        assert leak not in text
        assert leak not in overview
        for csv_path in (run_dir / "tables").glob("*.csv"):
            assert leak not in csv_path.read_text()
    h03_rows = [r for r in csv.DictReader(overview.splitlines()) if r["site"] == "h03"]
    assert len(h03_rows) == 2
    for r in h03_rows:
        assert r["n evaluated"] == "suppressed" and r["positives"] == "suppressed"
        assert r["global AUC [95% CI]"] == "suppressed"
    # k comes from the config, not the default.
    assert "k = 25" in text


def test_not_computable_shows_reason(built):
    run_dir, _, text = built
    assert "n/c" in text and NC_NOTE in text
    assert f'title="{NC_NOTE}"' in text
    overview = list(csv.DictReader((run_dir / "tables" / "overview.csv").read_text().splitlines()))
    cell = next(r for r in overview if r["site"] == "h02" and r["split"] == "temporal")
    assert cell["base AUC [95% CI]"].startswith("n/c")
    assert cell["global AUC [95% CI]"] == "0.598 [0.558, 0.638]"


def test_findings_follow_the_numbers(built):
    _, _, text = built
    f = _findings(text)
    # h02 is where the global model is worst on both splits.
    test_part, temporal_part = f.split("<h3>Temporal")
    assert "serves <strong>h02</strong> worst: AUC 0.612 [0.572, 0.652]" in test_part
    assert "serves <strong>h02</strong> worst: AUC 0.598" in temporal_part
    # Local's point AUC is higher at h02 only (h01: 0.772 < 0.781); mean difference (−0.009 + 0.077) / 2.
    # No differences.csv in this folder: stated as an untested point estimate, never as "beats".
    assert ("Local has the higher point AUC than global at <strong>1 of 2</strong> sites (mean AUC difference "
            "+0.034") in test_part
    assert "untested point estimates" in test_part and "beats" not in f
    assert "Too few sites with a known training size (2)" in f  # h03 suppressed: no rho from 2 points
    assert "h03" in f  # the all-suppressed site is called out


def test_spearman_reported_with_three_sites(tmp_path):
    run_dir = _write_run(tmp_path / "run")
    # Un-suppress h03 with a big local gain: gain is largest at the smallest site -> rho = -1.
    rows = [r for r in _rows() if r[0] != "h03"]
    for split in ("test", "temporal"):
        for regime, auc in {"base": 0.5, "global": 0.55, "local": 0.70, "personalized": 0.72}.items():
            for m, v in [("auc", auc), ("auc_lo", auc - 0.05), ("auc_hi", auc + 0.05)]:
                rows.append(["h03", regime, split, "all", m, f"{v:.4f}", 40, "ok", ""])
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        w.writerows(rows)
    f = _findings(build_report(run_dir).read_text())
    assert "serves <strong>h03</strong> worst" in f
    assert "Spearman ρ = <strong>-1.00</strong> over n = 3 sites" in f
    assert "larger at smaller sites" in f
    assert "not distinguishable from chance" in f  # h03 global CI [0.50, 0.60] includes 0.5


def test_failed_run_shows_banner(tmp_path):
    run_dir = _write_run(tmp_path / "run", status="failed", errors=["round 2: h02 crashed (CUDA OOM)"], rounds=1)
    text = build_report(run_dir).read_text()
    assert 'class="banner failed"' in text and "RUN FAILED" in text
    assert "h02 crashed (CUDA OOM)" in text
    assert "1 of 3 (global)" in text


def test_the_header_counts_rounds_per_phase():
    """Six rounds recorded in two phases of three are "3 of 3" each, not "6 of 3 configured"."""
    from clinfed.server.reports.classifier import rounds_summary

    rounds = [{"phase": p, "round": r} for p in ("global", "cluster") for r in (1, 2, 3)]
    assert rounds_summary(rounds, {"num-server-rounds": 3}) == "3 of 3 (global), 3 of 3 (cluster)"
    assert rounds_summary([{"phase": "sft", "round": 2}, {"phase": "dpo", "round": 1}],
                          {"num-server-rounds": 2, "dpo-rounds": 1}) == "2 of 2 (sft), 1 of 1 (dpo)"


def test_completed_run_has_no_failure_banner(built):
    assert "banner failed" not in built[2]


def test_unknown_regime_handled(tmp_path):
    run_dir = _write_run(tmp_path / "run", extra_regime="zeta")
    text = build_report(run_dir).read_text()
    assert "zeta" in text
    header = (run_dir / "tables" / "overview.csv").read_text().splitlines()[0]
    cols = header.split(",")
    # Known regimes first in canonical order, unknown after.
    firsts = [next(i for i, c in enumerate(cols) if c.startswith(r + " ")) for r in REGIMES + ["zeta"]]
    assert firsts == sorted(firsts)


def test_cross_site_regime_goes_to_matrix_not_overview(tmp_path):
    run_dir = _write_run(tmp_path / "run", extra_regime="local@h03")
    text = build_report(run_dir).read_text()
    assert "local@h03" in text
    assert "local@h03" not in (run_dir / "tables" / "overview.csv").read_text().splitlines()[0]
    rows = list(csv.DictReader((run_dir / "tables" / "cross_site.csv").read_text().splitlines()))
    assert [(r["split"], r["adapter"]) for r in rows] == [("test", "global"), ("test", "local@h03"),
                                                         ("temporal", "global"), ("temporal", "local@h03")]
    assert rows[1]["h01"] == "0.700" and rows[1]["h03"] == "suppressed"


def test_global_only_cross_site_says_why(built):
    run_dir, _, text = built
    rows = list(csv.DictReader((run_dir / "tables" / "cross_site.csv").read_text().splitlines()))
    assert [r["adapter"] for r in rows] == ["global", "global"]
    assert list(rows[0]) == ["split", "adapter", "h01", "h02", "h03"]
    assert rows[0]["h01"] == "0.781" and rows[0]["h03"] == "suppressed"
    assert "local adapters were not shared by policy" in text
    assert "augmented" not in _findings(text)  # no simulation-only note without that regime


def test_minimal_run_dir_does_not_crash(tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "failed"}))
    text = build_report(run_dir).read_text()
    assert "RUN FAILED" in text
    assert (run_dir / "figures" / "auc_by_regime.png").exists()


def test_missing_regime_and_empty_values(tmp_path):
    run_dir = _write_run(tmp_path / "run", status="running")
    rows = [r for r in _rows() if not (r[0] == "h02" and r[1] == "personalized")]
    rows.append(["h01", "global", "test", "all", "f1", "", "", "ok", ""])  # ok but empty: shown as a dash
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        w.writerows(rows)
    text = build_report(run_dir).read_text()
    assert "Missing results: h02 (no personalized)" in text
    assert "banner running" in text and "banner failed" not in text
    overview = list(csv.DictReader((run_dir / "tables" / "overview.csv").read_text().splitlines()))
    h01 = next(r for r in overview if r["site"] == "h01" and r["split"] == "test")
    assert h01["global F1"] == "" and h01["global AUC [95% CI]"].startswith("0.781")
    assert next(r for r in overview if r["site"] == "h02")["personalized AUC [95% CI]"] == ""


# --------------------------------------------------------------------------- analysis sections (rich run)

from test_analysis import LEAK_AUC, LEAK_DESC, LEAK_N, SITES as RICH_SITES, metrics_rows, write_rich_run  # noqa: E402

ALL_SUPP_LEAK = "0.864209"  # a subgroup suppressed at every site, with a planted number


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Built once per module: the tests below only read it."""
    run_dir = write_rich_run(tmp_path_factory.mktemp("rich") / "run")
    rows = metrics_rows()
    for site in RICH_SITES:
        for split in ("test", "temporal"):
            for regime in ("global", "local"):
                rows.append([site, regime, split, "comorbidity=5+", "auc", ALL_SUPP_LEAK, "3", "suppressed", ""])
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        w.writerows(rows)
    path = build_report(run_dir)
    return run_dir, path.read_text(encoding="utf-8")


def test_rich_sections_and_files(rich):
    run_dir, text = rich
    for name in ("subgroups.png", "cross_site.png", "drivers.png", "auc_by_regime.png", "gain_vs_size.png"):
        assert (run_dir / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("subgroups.csv", "subgroups_by_site.csv", "cross_site.csv", "drivers_patient.csv",
                 "drivers_site.csv", "site_regression.csv", "clusters.csv", "overview.csv"):
        assert (run_dir / "tables" / name).exists(), name
    assert (run_dir / "drivers.csv").exists() and (run_dir / "site_analysis.csv").exists()
    for heading in ("AUC by patient subgroup", "Cross-site matrix", "Drivers", "Clusters",
                    "Gain over global vs site size"):
        assert f"<h2>{heading}</h2>" in text
    assert text.count("data:image/png;base64,") == 5
    # Overview: every non-cross-site regime, both splits; no `@` columns.
    header = (run_dir / "tables" / "overview.csv").read_text().splitlines()[0]
    for r in ("base", "global", "local", "personalized", "cluster", "augmented"):
        assert f"{r} AUC [95% CI]" in header
    assert "@" not in header
    # Gain vs size covers every non-base regime.
    gains = list(csv.DictReader((run_dir / "tables" / "gains.csv").read_text().splitlines()))
    assert {g["regime"] for g in gains} == {"local", "personalized", "cluster", "augmented"}
    # Clusters: assignment and features from run.json.
    clusters = list(csv.DictReader((run_dir / "tables" / "clusters.csv").read_text().splitlines()))
    assert {c["site"]: c["cluster"] for c in clusters} == {"h01": "0", "h02": "0", "h03": "1", "h04": "1", "h05": "1"}
    assert "kmeans" in text and "readmission_rate" in text and "h03, h04, h05" in text


def test_cross_site_heatmap_shape(rich):
    run_dir, _ = rich
    rows = list(csv.DictReader((run_dir / "tables" / "cross_site.csv").read_text().splitlines()))
    origins = ["global", "cluster"] + [f"local@{s}" for s in RICH_SITES]
    assert [(r["split"], r["adapter"]) for r in rows] == [(sp, o) for sp in ("test", "temporal") for o in origins]
    assert list(rows[0]) == ["split", "adapter"] + RICH_SITES  # sites ordered by n_train, largest first
    supp = next(r for r in rows if r["split"] == "temporal" and r["adapter"] == "local@h05")
    assert supp["h01"] == "suppressed"
    own = next(r for r in rows if r["split"] == "test" and r["adapter"] == "local@h05")
    assert own["h05"] == "0.700"  # 0.60 global + 0.10 local gain at its own site


def test_subgroup_table_pools_and_suppresses(rich):
    run_dir, text = rich
    sub = list(csv.DictReader((run_dir / "tables" / "subgroups.csv").read_text().splitlines()))
    age = [r for r in sub if r["grouping"] == "age"]
    assert [r["subgroup"] for r in age] == ["age=<45", "age=45-64", "age=65-79", "age=80+"]
    young = age[0]
    assert young["global test sites"] == "4"  # h05 suppressed
    assert float(young["global test AUC"]) > 0.7
    all_supp = next(r for r in sub if r["subgroup"] == "comorbidity=5+")
    assert all_supp["global test AUC"] == "suppressed" and all_supp["local temporal AUC"] == "suppressed"
    detail = list(csv.DictReader((run_dir / "tables" / "subgroups_by_site.csv").read_text().splitlines()))
    cell = next(r for r in detail if r["site"] == "h05" and r["subgroup"] == "age=<45" and r["regime"] == "global")
    assert cell["auc"] == "suppressed" and cell["n"] == "suppressed"
    assert "By comorbidity" in text and '<span class="supp">suppressed</span>' in text


def test_rich_never_prints_suppressed_numbers(rich):
    run_dir, text = rich
    outputs = [_visible(text)] + [p.read_text() for p in (run_dir / "tables").glob("*.csv")] + \
        [(run_dir / n).read_text() for n in ("drivers.csv", "site_analysis.csv")]
    for leak in (LEAK_AUC, LEAK_N, LEAK_DESC, ALL_SUPP_LEAK, "0.914", "0.864", "0.247"):
        for out in outputs:
            assert leak not in out


def test_rich_findings(rich):
    _, text = rich
    f = _findings(text)
    assert "the subgroup served worst is <strong>age=80+</strong>" in f
    # No differences.csv or size_effects.csv here: every comparison is an untested point estimate.
    assert "largest point gain there: <strong>personalized</strong> (+0.060 AUC" in f
    assert ("serves site <strong>h05</strong> worst (AUC 0.550); largest point gain there: <strong>local</strong> "
            "(+0.080") in f
    assert ("<strong>augmented</strong> is above global on the random test but below it on the temporal test "
            "(untested point estimates)") in f
    assert "local point gains are largest at the smallest sites" in f and "ρ = <strong>-1.00</strong>" in f
    assert "helps most" not in f and "beats" not in f
    assert "1. <strong>n_comorbidities</strong>" in f and "2. <strong>age</strong>" in f
    assert "simulation" in f and "augment-k = 5" in f
    # Drivers tables in the body.
    assert "rho gain:local test" in text and "z:log10_n_train" in text


def test_regime_costs_add_what_a_regime_builds_on():
    """Each regime's cost from run.json's rounds and site-held figures: a federated regime its own
    rounds' bytes and seconds, a site-held one its own seconds plus those of the adapters it starts
    from or mixes, Ditto's personal training (riding on the global rounds) no bytes of its own."""
    import pandas as pd

    from clinfed.server.reports.classifier import regime_costs

    def rnd(phase, sent, received, secs, ditto=None):
        return {"phase": phase, "site_bytes": {s: {"sent": sent, "received": received} for s in ("a", "b")},
                "site_costs": {s: {"train_seconds": secs, **({"ditto_train_seconds": ditto} if ditto else {})}
                               for s in ("a", "b")}}

    run = {"rounds": [rnd("global", 1000, 1000, 2.0, ditto=3.0), rnd("global", 1000, 1000, 4.0, ditto=1.0),
                      rnd("ifca", 3000, 1000, 5.0)],
           "site_held": {"a": {"local-train-seconds": 7.0, "personalized-train-seconds": 1.0},
                         "b": {"local-train-seconds": 9.0, "personalized-train-seconds": 3.0}}}
    auc = pd.DataFrame([{"split": "test", "regime": "global", "mean AUC": "0.700", "sites with AUC": 2}])
    df = regime_costs(run, ["base", "global", "local", "personalized", "ditto", "ifca", "interpolated"], auc)
    row = df.set_index("regime")
    assert "base" not in row.index
    assert row.loc["global", "mean AUC (test)"] == "0.700"
    assert row.loc["global", "federated rounds"] == 2 and row.loc["ifca", "federated rounds"] == 1
    assert row.loc["global", "bytes per site per round (sent + received)"] == "2.0 KB"
    assert row.loc["ifca", "bytes per site per round (sent + received)"] == "4.0 KB"
    assert row.loc["local", "bytes per site, whole study"] == "none"
    assert row.loc["global", "own training s per site"] == "6.0"
    assert row.loc["local", "own training s per site"] == "8.0"
    assert row.loc["personalized", "training s per site, with what it builds on"] == "8.0"  # 6 + 2
    assert row.loc["ditto", "own training s per site"] == "4.0"
    assert row.loc["ditto", "training s per site, with what it builds on"] == "10.0"
    assert row.loc["ditto", "bytes per site, whole study"] == "4.0 KB"  # the global rounds', none of its own
    assert row.loc["interpolated", "training s per site, with what it builds on"] == "14.0"  # global 6 + local 8
