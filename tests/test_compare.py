"""Comparison studies (several arms in one federation), in process with tiny models:
arms and their configs, pairing (same items, same seeds), paired differences, cost
accounting counted on the messages, refusals of full fine-tuning, and an audit of every
message the sites sent."""

import json

import numpy as np
import pandas as pd
import pytest
from flwr.common.serde import message_to_proto

from clinfed.simulations.app import app as client_app
from clinfed.common.arms import DEFAULT_ARMS, DEFAULT_COMPARISON, parse_arm, parse_arms
from clinfed.common.arm_differences import compare_metrics, load_scores, paired_auc_difference, save_scores
from clinfed.common.config import ConfigError, for_arm, resolve
from clinfed.common.data import list_sites, read_site_table
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from helpers import canary_federation
from clinfed.server.comparison import Comparison, plan_costs

# tiny-bert:lora-r8 is tiny-bert:lora at the run's default rank 8 (alpha 16): the same model,
# the same seeds, so every paired difference between the two must be exactly zero
ARMS = "tiny-bert:lora,tiny-bert:lora-r8,tiny-bert:head-only,tiny-bert:full,tiny-llama:lora:prompt"
BASE = {"num-server-rounds": 2, "local-steps": 3, "bootstrap": 40, "min-cell-size": 5, "batch-size": 8,
        "regimes": "base,global,local", "subgroups": False, "eval-items": 40, "gen-eval-items": 2,
        "gen-max-new-tokens": 4, "share-local-adapters": True, "drivers": False}


@pytest.fixture(scope="module")
def comparison(small_federation, tmp_path_factory):
    data = canary_federation(small_federation, tmp_path_factory.mktemp("canary") / "fed")
    run_dir = tmp_path_factory.mktemp("cmp")
    cfg = resolve({**BASE, "arms": ARMS, "data-dir": str(data)})
    sites = list_sites(data)
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    Comparison(grid, cfg, run_dir).execute()
    return {"grid": grid, "run_dir": run_dir, "data": data, "sites": [s for s, _ in sites], "cfg": cfg,
            "arms": [a.name for a in parse_arms(ARMS)]}


def _arm_of(msg) -> str:
    return str(msg.content["config"].get("arm", "")) if "config" in msg.content.config_records else ""


# ----------------------------------------------------------------------------- arms
def test_default_arms_and_their_run_configs():
    assert [a.name for a in parse_arms("default")] == DEFAULT_ARMS.split(",")
    cfg = resolve({"arms": "default"})
    prompt = for_arm(cfg, parse_arm("smollm2:lora:prompt"))
    assert (prompt["model"], prompt["arm-method"], prompt["arm-form"]) == ("smollm2", "lora", "prompt")
    full = for_arm(cfg, parse_arm("minilm:full"))
    assert full["arm-method"] == "full" and full["learning-rate"] == cfg["full-learning-rate"]
    assert for_arm(cfg, parse_arm("minilm:lora"))["learning-rate"] == cfg["learning-rate"]
    assert for_arm(cfg, parse_arm("minilm:lora-r4"))["lora-rank"] == 4
    assert resolve(DEFAULT_COMPARISON)["eval-items"] == DEFAULT_COMPARISON["eval-items"]


@pytest.mark.parametrize("overrides,msg", [
    ({"arms": "tiny-bert:lora"}, "not a comparison"),
    ({"arms": "tiny-bert:lora,tiny-llama:lora:prompt", "dp": True}, "prompt form cannot train"),
    ({"arms": "tiny-bert:lora,tiny-bert:full", "task": "generative"}, "task = classifier"),
    ({"arms": "tiny-bert:lora,./no/such/model:lora"}, "does not exist"),
])
def test_bad_comparisons_are_refused_by_name(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(overrides)


def test_prompt_form_on_an_encoder_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="needs a decoder"):
        plan_costs(resolve({"arms": "tiny-bert:lora,tiny-bert:lora:prompt"}))


# ---------------------------------------------------------- the paired difference
def test_paired_difference_of_an_arm_with_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = rng.random(200)
    assert paired_auc_difference(y, p, p.copy(), seed=3, n_boot=200) == (0.0, 0.0, 0.0)
    better = p + 0.6 * y  # a model that ranks positives higher
    d, lo, hi = paired_auc_difference(y, p, better, seed=3, n_boot=200)
    assert d > 0.2 and lo <= d <= hi and lo > 0


def test_paired_interval_is_narrower_than_ignoring_the_pairing():
    """Two arms whose scores differ by a little noise: the paired interval of the difference
    is far narrower than the spread of the difference of two independent bootstraps."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    a = rng.random(300) + 0.5 * y
    b = a + rng.normal(0, 0.05, 300)
    d, lo, hi = paired_auc_difference(y, a, b, seed=0, n_boot=300)
    from clinfed.common.metrics import bootstrap_auc_ci

    la, ha = bootstrap_auc_ci(y, a, seed=0, n_boot=300)
    lb, hb = bootstrap_auc_ci(y, b, seed=1, n_boot=300)
    assert (hi - lo) < 0.5 * ((ha - la) + (hb - lb)) / 2


def test_compare_metrics_suppress_small_cells_and_flag_unpaired_items(tmp_path):
    rng = np.random.default_rng(2)
    ids = np.array([f"e{i}" for i in range(60)])
    y = (rng.random(60) < 0.3).astype(int)
    few = np.zeros(60, dtype=int)
    few[:3] = 1  # 3 positives: below k
    for arm, shift in (("a", 0.0), ("b", 0.3)):
        save_scores(tmp_path / arm, "global", {"test": (ids, y, rng.random(60) + shift * y),
                                               "temporal": (ids, few, rng.random(60))}, seed=5)
    save_scores(tmp_path / "c", "global", {"test": (ids[::-1], y[::-1], rng.random(60)),
                                           "temporal": (ids, few, rng.random(60))}, seed=5)
    out = compare_metrics([tmp_path / "a", tmp_path / "b", tmp_path / "c"], k=5, n_boot=50, seed=0)
    assert out["cmp/0-1/global/temporal/suppressed"] == 1
    assert not [k for k in out if k.startswith("cmp/0-1/global/temporal/") and not k.endswith("suppressed")]
    assert out["cmp/0-1/global/test/n"] == 60 and "cmp/0-1/global/test/diff" in out
    assert out["cmp/0-2/global/test/not_computable"] == 3 and "cmp/0-2/global/test/diff" not in out
    assert set(load_scores(tmp_path / "a")["global"]) == {"seed", "test", "temporal"}


# ------------------------------------------------------------- the whole comparison
def test_every_arm_has_its_rows_with_the_arm_column(comparison):
    df = pd.read_csv(comparison["run_dir"] / "metrics.csv")
    assert "arm" in df.columns and "task" in df.columns
    readm = df[df["task"] == "readmission"]
    assert set(readm["arm"]) == set(comparison["arms"])
    for arm in comparison["arms"]:
        a = readm[(readm["arm"] == arm) & (readm["metric"] == "auc")]
        assert set(a["site"]) == set(comparison["sites"]), arm
        for site in comparison["sites"]:
            for split in ("test", "temporal"):
                got = {r for r in a[(a["site"] == site) & (a["split"] == split)]["regime"] if "@" not in r}
                assert got == {"base", "global", "local"}, (arm, site, split, got)
        assert (comparison["run_dir"] / "arms" / parse_arm(arm).safe_name / "report.html").exists()
    run = json.loads((comparison["run_dir"] / "run.json").read_text())
    assert run["status"] == "completed" and run["arms_completed"] == comparison["arms"] and not run["errors"]
    html = (comparison["run_dir"] / "report.html").read_text()
    assert 'id="comparison"' in html and "Paired AUC difference" in html and "Accuracy against cost" in html


def test_arms_score_the_same_items_with_the_same_seeds(comparison):
    """Pairing, from the sites' own score files: for every site, regime and split, every arm
    scored the same encounter ids (the site's capped test split) with the same labels and seed."""
    from clinfed.common.data import split_site

    cfg = comparison["cfg"]
    for site in comparison["sites"]:
        root = comparison["run_dir"] / "sites" / site / "arms"
        scores = {arm: load_scores(root / parse_arm(arm).safe_name) for arm in comparison["arms"]}
        ref = scores[comparison["arms"][0]]
        assert set(ref) == {"base", "global", "local"}
        table = read_site_table(next(f for n, f in list_sites(comparison["data"]) if n == site), warn=False)
        splits = split_site(table, seed=cfg["seed"], temporal_frac=cfg["temporal-frac"],
                            test_frac=cfg["test-frac"], val_frac=cfg["val-frac"])
        for split in ("test", "temporal"):
            ids = ref["global"][split][0]
            assert len(ids) == min(cfg["eval-items"], len(splits[split]))
            assert set(ids) <= set(splits[split]["encounter_id"].astype(str))
        for arm, sc in scores.items():
            for regime in ("base", "global", "local"):
                assert sc[regime]["seed"] == ref[regime]["seed"], (site, arm)
                for split in ("test", "temporal"):
                    assert np.array_equal(sc[regime][split][0], ref[regime][split][0]), (site, arm, regime)
                    assert np.array_equal(sc[regime][split][1], ref[regime][split][1])


def test_identical_arms_differ_by_exactly_zero_and_different_arms_do_not(comparison):
    diffs = pd.read_csv(comparison["run_dir"] / "comparison.csv")
    same = diffs[(diffs["reference"] == "tiny-bert:lora") & (diffs["arm"] == "tiny-bert:lora-r8")
                 & (diffs["status"] == "ok")]
    # trained regimes included: the same seeds give the same training, so the same scores
    assert {"global", "local"} <= set(same["regime"]) and len(same[same["site"] != "overall"]) >= 4
    assert (same["diff"] == 0).all() and (same["diff_lo"] == 0).all() and (same["diff_hi"] == 0).all()
    other = diffs[(diffs["reference"] == "tiny-bert:lora") & (diffs["arm"] != "tiny-bert:lora-r8")
                  & (diffs["status"] == "ok") & (diffs["regime"] != "base") & (diffs["site"] != "overall")]
    assert len(other) and (other["diff"].abs() > 0).any()
    assert (other["diff_lo"] <= other["diff"]).all() and (other["diff"] <= other["diff_hi"]).all()
    # base: lora, head-only and full start from the same seeded head and untouched backbone
    base = diffs[(diffs["reference"] == "tiny-bert:lora") & (diffs["regime"] == "base") & (diffs["status"] == "ok")
                 & diffs["arm"].isin(["tiny-bert:head-only", "tiny-bert:full"])]
    assert len(base) and (base["diff"] == 0).all()
    overall = diffs[diffs["site"] == "overall"]
    assert len(overall) and overall["note"].str.contains("n-weighted mean").all()


def test_cost_accounting_matches_the_arrays_on_the_wire(comparison):
    grid = comparison["grid"]
    costs = pd.read_csv(comparison["run_dir"] / "costs.csv").set_index("arm")
    by_id = {}
    for msg in grid.sent:
        by_id[msg.metadata.message_id] = msg
    replies = {(r.metadata.src_node_id, r.metadata.reply_to_message_id): r for r in grid.replies}
    for arm in comparison["arms"]:
        sent = [m for m in grid.sent if m.metadata.message_type == "train" and _arm_of(m) == arm]
        assert len(sent) == 2 * len(comparison["sites"])  # 2 rounds x 3 sites
        params = {sum(int(np.prod(a.shape)) for a in m.content["arrays"].values()) for m in sent}
        assert params == {int(costs.loc[arm, "trainable_parameters"])}, arm
        per_round_site = []
        for m in sent:
            rep = replies[(m.metadata.dst_node_id, m.metadata.message_id)]
            out = sum(len(a.data) for a in m.content["arrays"].values())
            back = sum(len(a.data) for a in rep.content["arrays"].values())
            per_round_site.append(out + back)
        assert costs.loc[arm, "bytes_per_round_per_site"] == pytest.approx(np.mean(per_round_site))
        assert costs.loc[arm, "train_seconds_per_site"] > 0 and costs.loc[arm, "peak_rss_mb_per_site"] > 50
    p = costs["trainable_parameters"]
    b = costs["bytes_per_round_per_site"]
    assert p["tiny-bert:head-only"] < p["tiny-bert:lora"] < p["tiny-bert:full"]
    assert b["tiny-bert:head-only"] < b["tiny-bert:lora"] < b["tiny-bert:full"]
    # the plan made before anything ran agrees with what was sent (fp32, without array headers)
    assert (costs["bytes_per_round_per_site_planned"] == 8 * costs["trainable_parameters"]).all()
    assert costs.loc["tiny-bert:full", "trainable_share"] == 1.0


def test_unseen_tasks_scored_for_decoders_and_not_applicable_for_encoders(comparison):
    df = pd.read_csv(comparison["run_dir"] / "metrics.csv")
    pub = df[df["site"] == "public"]
    enc = pub[pub["arm"] == "tiny-bert:lora"]
    assert len(enc) and (enc["status"] == "not_applicable").all() and enc["value"].isna().all()
    dec = pub[(pub["arm"] == "tiny-llama:lora:prompt") & (pub["status"] == "ok")]
    assert {"pubmedqa", "meqsum"} == set(dec["task"]) and {"base", "global"} == set(dec["regime"])
    assert set(dec[dec["task"] == "pubmedqa"]["metric"]) >= {"accuracy"}
    assert "not applicable" in (comparison["run_dir"] / "report.html").read_text()


def test_every_message_of_the_comparison_passes_the_guard_and_holds_no_patient_data(comparison):
    from clinfed.common.privacy import check_reply

    grid = comparison["grid"]
    ids, dates = set(), set()
    for _, folder in list_sites(comparison["data"]):
        df = read_site_table(folder, warn=False)
        ids.update(df["encounter_id"])
        dates.update(df["discharge_date"].dt.strftime("%Y-%m-%d"))
    keys_of = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            keys_of.setdefault(_arm_of(m), set(m.content["arrays"].keys()))
    types = set()
    for rep in grid.replies:
        assert not rep.has_error(), rep.error.reason
        mtype = rep.metadata.message_type
        types.add(mtype)
        raw = message_to_proto(rep).SerializeToString()
        assert b"CANARY" not in raw
        assert not [i for i in ids if i.encode() in raw][:1], "an encounter id left a site"
        assert not [d for d in list(dates)[:200] if d.encode() in raw][:1], "a discharge date left a site"
        content = rep.content
        if content.array_records:
            assert mtype in ("train", "train.personalize")
        assert set(content.metric_records) <= {"metrics"}
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        assert all(isinstance(v, (int, float)) for v in metrics.values())
        # the guard's own check, again, on what actually travelled
        shapes = None
        if content.array_records:
            shapes = {k: tuple(a.shape) for k, a in content["arrays"].items()}
            assert set(shapes) in keys_of.values()
        name = str(content["site"]["name"]) if "site" in content.config_records else None
        assert check_reply(content, mtype, adapter_shapes=shapes, site_name=name, allow_adapters=True,
                           min_cell_size=comparison["cfg"]["min-cell-size"]) == []
        if mtype == "evaluate.compare":
            assert metrics and all(k.startswith("cmp/") for k in metrics)
    assert {"query.describe", "train", "train.personalize", "evaluate", "evaluate.compare"} <= types


# ----------------------------------------------------------------- refusing full FT
def test_full_fine_tuning_refused_by_the_bytes_budget_before_anything_runs(small_federation, tmp_path):
    plan = {p["arm"]: p for p in plan_costs(resolve({"arms": "tiny-bert:lora,tiny-bert:full"}))}
    budget = plan["tiny-bert:lora"]["round_bytes_per_site"] * 2  # lora fits, full (9x larger) does not
    cfg = resolve({**BASE, "arms": "tiny-bert:lora,tiny-bert:full", "data-dir": str(small_federation),
                   "max-bytes-per-round": budget})
    sites = list_sites(small_federation)
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    with pytest.raises(ConfigError, match=r"max-bytes-per-round.*tiny-bert:full moves [0-9,]+ bytes per site"):
        Comparison(grid, cfg, tmp_path / "run").execute()
    assert grid.sent == []  # refused before any message
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed" and "tiny-bert:full" in " ".join(run["errors"])


def test_clinfed_compare_refuses_the_budget_before_flower_starts(small_federation, tmp_path, capsys):
    from clinfed.cli.main import main

    code = main(["compare", "--arms", "tiny-bert:lora,tiny-bert:full", "--data", str(small_federation),
                 "--out", str(tmp_path / "run"), "--run-config", "max-bytes-per-round=40000"])
    err = capsys.readouterr().err
    assert code != 0 and "tiny-bert:full moves" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_site_policy_forbidding_full_weights_refuses_the_arm(small_federation, tmp_path):
    sites = list_sites(small_federation)
    policy = tmp_path / "policy.toml"
    policy.write_text("min-cell-size = 5\nallow-full-weights = false\n")
    nodes = simulated_nodes(len(sites))
    nodes[2]["policy-path"] = str(policy)
    cfg = resolve({**BASE, "arms": "tiny-bert:lora,tiny-bert:full,tiny-bert:head-only",
                   "data-dir": str(small_federation), "local-steps": 2, "num-server-rounds": 1})
    grid = LocalGrid(client_app, nodes, cfg)
    Comparison(grid, cfg, tmp_path / "run").execute()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed"
    why = run["refused"]["tiny-bert:full"]
    assert f"site {sites[2][0]}'s policy forbids sending the whole model (allow-full-weights = false)" in why
    assert run["arms_completed"] == ["tiny-bert:lora", "tiny-bert:head-only"]
    assert not [m for m in grid.sent if _arm_of(m) == "tiny-bert:full" and m.metadata.message_type != "query.describe"]
    costs = pd.read_csv(tmp_path / "run" / "costs.csv").set_index("arm")
    assert costs.loc["tiny-bert:full", "status"] == "refused"
    assert "Refused arms" in (tmp_path / "run" / "report.html").read_text()

    # and the site itself refuses, should a server ask anyway
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from clinfed.common.model_cache import LoadedModel, model_key

    full = parse_arm("tiny-bert:full")
    lm = LoadedModel(model_key(for_arm(cfg, full)))
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in lm.init_state.items()}),
                              "config": ConfigRecord({"run-dir": str(tmp_path / "run"), "arm": full.name,
                                                      "server-round": 1})}),
                  dst_node_id=1002, message_type="train")
    grid.push_messages([msg])
    rep = grid.replies[-1]
    assert rep.has_error() and "allow-full-weights = false" in rep.error.reason
    assert "declines the federated round" in rep.error.reason


def test_a_site_update_cap_refuses_larger_updates(small_federation, tmp_path):
    sites = list_sites(small_federation)
    plan = {p["arm"]: p for p in plan_costs(resolve({"arms": "tiny-bert:lora,tiny-bert:full"}))}
    policy = tmp_path / "policy.toml"
    policy.write_text(f"min-cell-size = 5\nmax-update-bytes = {plan['tiny-bert:lora']['update_bytes']}\n")  # lora fits, full not
    nodes = simulated_nodes(len(sites))
    nodes[0]["policy-path"] = str(policy)
    cfg = resolve({**BASE, "arms": "tiny-bert:head-only,tiny-bert:lora,tiny-bert:full",
                   "data-dir": str(small_federation), "local-steps": 2, "num-server-rounds": 1})
    grid = LocalGrid(client_app, nodes, cfg)
    Comparison(grid, cfg, tmp_path / "run").execute()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed" and run["arms_completed"] == ["tiny-bert:head-only", "tiny-bert:lora"]
    assert list(run["refused"]) == ["tiny-bert:full"]
    assert f"site {sites[0][0]}'s policy caps an update at" in run["refused"]["tiny-bert:full"]


def test_a_site_refuses_an_arm_its_study_does_not_list(comparison):
    from flwr.app import ConfigRecord, Message, RecordDict

    grid = comparison["grid"]
    msg = Message(RecordDict({"config": ConfigRecord({"run-dir": str(comparison["run_dir"]),
                                                      "arm": "tiny-llama:full"})}),
                  dst_node_id=1000, message_type="query.describe")
    grid.push_messages([msg])
    rep = grid.replies.pop()
    assert rep.has_error() and "not one of the study's arms" in rep.error.reason


# ------------------------------------------------------------ through Flower itself
@pytest.mark.slow
def test_clinfed_compare_runs_through_the_flower_simulation_engine(small_federation, tmp_path):
    """The documented command, with tiny models: every arm through Ray and Flower's messages,
    the comparison section in the report, a decoder classifier arm scored on the public tasks."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "compare", "--arms", "tiny-bert:lora,tiny-llama:lora,tiny-llama:lora:prompt",
         "--data", str(small_federation), "--out", str(out),
         "--run-config", "num-server-rounds=2 local-steps=2 bootstrap=30 min-cell-size=5 eval-items=40 "
                         "gen-eval-items=2 gen-max-new-tokens=4 drivers=false"],
        capture_output=True, text=True, cwd=root, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and len(run["arms_completed"]) == 3
    assert run["config"]["regimes"] == "base,global,local" and run["config"]["subgroups"] is False
    df = pd.read_csv(out / "metrics.csv")
    assert set(df[df["task"] == "readmission"]["arm"]) == set(run["arms_completed"])
    pub = df[(df["site"] == "public") & (df["arm"] == "tiny-llama:lora") & (df["regime"] == "global")]
    assert (pub["status"] == "ok").all() and pub["note"].str.contains("classifier arm's LoRA").all()
    diffs = pd.read_csv(out / "comparison.csv")
    assert (diffs["site"] == "overall").any() and set(diffs["reference"]) >= {"tiny-bert:lora"}
    costs = pd.read_csv(out / "costs.csv")
    assert (costs["status"] == "completed").all() and (costs["bytes_per_round_per_site"] > 0).all()
    assert 'id="comparison"' in (out / "report.html").read_text()
    # `clinfed report` rebuilds the comparison report from the files alone
    (out / "report.html").unlink()
    res = subprocess.run([sys.executable, "-m", "clinfed.cli", "report", str(out)], capture_output=True, text=True,
                         cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'id="comparison"' in (out / "report.html").read_text()


def test_dp_epsilon_adds_up_across_arms(fresh_federation, tmp_path):
    """Every arm trains on the same patients: with DP-SGD the site's one ledger composes the
    arms' training, so the second arm's running epsilon starts where the first arm's ended."""
    sites = list_sites(fresh_federation)
    cfg = resolve({**BASE, "arms": "tiny-bert:lora,tiny-bert:head-only", "data-dir": str(fresh_federation),
                   "num-server-rounds": 1, "local-steps": 2, "regimes": "base,global", "dp": True})
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    Comparison(grid, cfg, tmp_path / "run").execute()
    first, second = (json.loads((tmp_path / "run" / "arms" / parse_arm(a).safe_name / "run.json").read_text())
                     for a in ("tiny-bert:lora", "tiny-bert:head-only"))
    for site in (s for s, _ in sites):
        e1, e2 = first["dp"][site]["epsilon_total"], second["dp"][site]["epsilon_total"]
        assert 0 < e1 < e2, (site, e1, e2)
