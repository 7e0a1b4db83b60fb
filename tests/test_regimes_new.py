"""The personalization methods of issue 21 as regimes: each mechanism on its own (IFCA's choice,
the interpolation weight, Ditto's pull, FedRep's site-held head), then one tiny study with all of
them on, scored against `global` like every regime, with the message audit of what left the sites."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto

from clinfed.client.classifier_site import Site
from clinfed.client.personal_regimes import choose_interpolation, head_keys, is_lora_key, log_loss, mix
from clinfed.common.adapters import read_adapter
from clinfed.common.config import STUDY_PRESETS, regimes, resolve
from clinfed.common.data import list_sites, read_site_table
from clinfed.common.model_cache import get_model, model_key
from clinfed.common.protocol import INTERPOLATION_GRID, SEED_DITTO
from clinfed.common.training import predict_proba
from clinfed.server.grouping import ifca_inits
from clinfed.server.study import Study
from clinfed.simulations.app import app as client_app
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from helpers import canary_federation

TINY = {"model": "tiny-bert", "num-server-rounds": 2, "local-steps": 4, "personalize-steps": 6, "bootstrap": 30,
        "min-cell-size": 5, "batch-size": 8, "precision": "fp32"}
NEW = ("fedrep", "ditto", "ifca", "interpolated")


@pytest.fixture(scope="module")
def site(small_federation, tmp_path_factory):
    cfg = resolve({**TINY, "data-dir": str(small_federation)})
    name, folder = list_sites(small_federation)[0]
    s = Site(name, folder, tmp_path_factory.mktemp("site"), cfg)
    return s, get_model(model_key(cfg)), cfg


def _independent_val_loss(site, lm, state):
    """The site's validation log loss computed here from the model's probabilities, with sklearn."""
    from sklearn.metrics import log_loss as sk_log_loss

    model = lm.use(state)
    p = predict_proba(model, site.encoded("val", lm.tokenizer), lm.tokenizer.pad_token_id, device="cpu",
                      precision="fp32")
    return sk_log_loss(site.labels("val"), np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])


def _distance(a, b, keys=None):
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in (keys or a))))


def test_ifca_chooses_the_adapter_with_the_lowest_validation_loss(site, small_federation, tmp_path):
    """The handler's index (through the real ClientApp and its guard) is the argmin of the k
    adapters' validation losses computed independently; the reply carries the index, not the losses."""
    s, lm, cfg = site
    states = ifca_inits(lm.init_state, 3, seed=11)
    assert _distance(states[0], states[1]) > 0 and _distance(states[1], states[2]) > 0  # seeded, different
    losses = [_independent_val_loss(s, lm, st) for st in states]
    assert len(set(np.round(losses, 6))) == 3, losses  # the choice is not a tie
    expect = int(np.argmin(losses))
    assert [s.choice_loss(lm, st) for st in states] == pytest.approx(losses, rel=1e-5)

    name, folder = list_sites(small_federation)[0]
    nodes = [{"data-path": str(folder), "site": name, "output-path": str(tmp_path / name)}]
    grid = LocalGrid(client_app, nodes, cfg)
    content = RecordDict({f"ifca.{j}": ArrayRecord({k: Array(v) for k, v in st.items()}) for j, st in enumerate(states)})
    content["config"] = ConfigRecord({"run-dir": str(tmp_path / "run"), "server-round": 1, "base-model": lm.identity})
    [rep] = grid.send_and_receive([Message(content, dst_node_id=1000, message_type="train.ifca")])
    assert not rep.has_error(), rep.error.reason
    m = dict(rep.content["metrics"])
    assert m["ifca-cluster"] == expect
    assert set(rep.content.array_records) == {"arrays"}
    # from the adversary's side: no key beyond a round's and the index; no validation loss as a value
    assert set(m) - {"ifca-cluster"} <= {"num-examples", "train-loss", "train-steps", "train-seconds", "train-tokens",
                                        "train-peak-rss", "train-micro-batch", "train-accumulation",
                                        "train-oom-retries", "train-quantization-bits",
                                        "train-gradient-checkpointing", "train-tokens-per-s", "adapter-hash"}
    for v in m.values():
        assert all(abs(float(v) - loss) > 1e-9 for loss in losses)
    raw = message_to_proto(rep).SerializeToString()
    for ident in read_site_table(folder, warn=False)["encounter_id"].head(100):
        assert ident.encode() not in raw


def test_interpolation_picks_the_validation_best_weight(site):
    """Between a trained local adapter and the initial adapter, the chosen a is the grid weight
    whose mix has the lowest validation loss, computed here independently; a = 1 is the global
    adapter and a = 0 the local one exactly."""
    s, lm, cfg = site
    local, _ = s.train(lm, lm.init_state, 12, seed_offset=3, label="test-local")
    glob = ifca_inits(lm.init_state, 2, seed=5)[1]  # a 'global' adapter unlike the local one
    a, state, losses = choose_interpolation(lambda st: s.choice_loss(lm, st), glob, local)
    indep = [_independent_val_loss(s, lm, mix(glob, local, w)) for w in INTERPOLATION_GRID]
    assert losses == pytest.approx(indep, rel=1e-5)
    assert a == INTERPOLATION_GRID[int(np.argmin(indep))]
    assert _distance(state, mix(glob, local, a)) == 0
    assert _distance(mix(glob, local, 1.0), glob) == 0 and _distance(mix(glob, local, 0.0), local) == 0
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_ditto_personal_adapter_is_pulled_toward_the_global_one(site):
    """Ditto's personal adapter starts from itself and is pulled toward the round's global
    adapter (the anchor, not the start): with a strong pull (lambda) it ends much nearer the
    global adapter than without one, and it still differs from it."""
    s, lm, cfg = site
    glob, _ = s.train(lm, lm.init_state, 8, seed_offset=1, label="test-global")
    # a personal adapter that drifted from the global one (trained on at the site without a pull)
    personal_start, _ = s.train(lm, glob, 8, seed_offset=2, label="test-drift")
    near = {}
    for lam in (0.0, 200.0):
        personal, _ = s.train(lm, personal_start, 10, seed_offset=SEED_DITTO, label="ditto", proximal_mu=lam,
                              anchor=glob)
        near[lam] = _distance(personal, glob)
    assert near[0.0] > 0 and near[200.0] > 0, near  # the personal adapter differs from the global one
    assert near[200.0] < 0.5 * near[0.0], near
    assert near[200.0] < _distance(personal_start, glob) < near[0.0], near


def test_ditto_trains_alongside_the_global_rounds_and_resumes_exactly(site, small_federation, tmp_path):
    """Through the real ClientApp: a `global` round trains the site's personal adapter too (its
    figures in the reply), round 2 continues from round 1's personal adapter, a repeated round 2
    (a resumed study) gives the same adapter, and `cluster` rounds train no personal adapter."""
    s, lm, _ = site
    cfg = resolve({**TINY, "data-dir": str(small_federation), "regimes": "base,global,ditto"})
    name, folder = list_sites(small_federation)[0]
    grid = LocalGrid(client_app, [{"data-path": str(folder), "site": name, "output-path": str(tmp_path / name)}], cfg)
    glob = ifca_inits(lm.init_state, 2, seed=7)[1]

    def round_(rnd, phase):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in glob.items()}),
                              "config": ConfigRecord({"run-dir": str(tmp_path / "run"), "server-round": rnd,
                                                      "base-model": lm.identity, "phase": phase})})
        [rep] = grid.send_and_receive([Message(content, dst_node_id=1000, message_type="train")])
        assert not rep.has_error(), rep.error.reason
        return dict(rep.content["metrics"])

    def personal(rnd):
        [folder_] = list(tmp_path.rglob(f"ditto-round-{rnd:03d}"))
        return read_adapter(lm.model, folder_, lm.identity)

    m1 = round_(1, "global")
    assert m1["ditto-train-seconds"] > 0 and np.isfinite(m1["ditto-train-loss"])
    p1 = personal(1)
    round_(2, "global")
    p2 = personal(2)
    round_(2, "global")  # the server resumed and sent round 2 again
    p2_again = personal(2)
    assert _distance(p2, p2_again) == 0
    assert _distance(p1, glob) > 0 and _distance(p2, p1) > 0
    m3 = round_(3, "cluster")
    assert not [k for k in m3 if k.startswith("ditto-")] and not list(tmp_path.rglob("ditto-round-003"))


def test_fedrep_trains_its_head_and_its_backbone_in_turn(site):
    """The two phases of a FedRep round: head only (the LoRA weights stay exactly), then backbone
    only (the head stays exactly); the freezes are undone afterwards."""
    s, lm, cfg = site
    glob, _ = s.train(lm, lm.init_state, 6, seed_offset=1, label="test-global")
    heads = head_keys(glob)
    lora = [k for k in glob if is_lora_key(k)]
    assert heads and lora
    rep, _ = s.train(lm, glob, 6, seed_offset=2, label="fedrep", head_only=True)
    for k in lora:
        np.testing.assert_array_equal(rep[k], glob[k])
    assert _distance(rep, glob, heads) > 0
    body, _ = s.train(lm, rep, 6, seed_offset=3, label="fedrep", body_only=True)
    for k in heads:
        np.testing.assert_array_equal(body[k], rep[k])
    assert _distance(body, rep, lora) > 0
    # and both train again afterwards (the freezes are undone)
    after, _ = s.train(lm, glob, 2, seed_offset=4, label="after")
    assert _distance(after, glob, lora) > 0 and _distance(after, glob, heads) > 0


def test_a_fedrep_round_sends_the_backbone_and_keeps_the_head(site, small_federation, tmp_path):
    """Through the real ClientApp, from the server's side: a `fedrep` round's reply carries the
    trained backbone and the head exactly as the server sent it (the site's head never leaves);
    the site's own head moved and carries into its next round; a repeated round (a resumed study)
    replies the same arrays."""
    s, lm, _ = site
    cfg = resolve({**TINY, "data-dir": str(small_federation), "regimes": "base,global,fedrep"})
    name, folder = list_sites(small_federation)[0]
    grid_of = [LocalGrid(client_app, [{"data-path": str(folder), "site": name, "output-path": str(tmp_path / name)}],
                         cfg)]
    sent = lm.init_state
    heads, lora = head_keys(sent), [k for k in sent if is_lora_key(k)]

    def round_(rnd):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              "config": ConfigRecord({"run-dir": str(tmp_path / "run"), "server-round": rnd,
                                                      "base-model": lm.identity, "phase": "fedrep"})})
        [rep] = grid_of[0].send_and_receive([Message(content, dst_node_id=1000, message_type="train")])
        assert not rep.has_error(), rep.error.reason
        return {k: v.numpy() for k, v in rep.content["arrays"].items()}

    def own(rnd):
        [f] = list((tmp_path / name).rglob(f"fedrep-round-{rnd:03d}"))
        return read_adapter(lm.model, f, lm.identity)

    r1 = round_(1)
    assert _distance(r1, sent, heads) == 0 and _distance(r1, sent, lora) > 0
    h1 = own(1)
    assert _distance(h1, sent, heads) > 0  # the site's head trained, and stayed
    r2 = round_(2)
    assert _distance(r2, sent, heads) == 0
    h2 = own(2)
    r2_again = round_(2)
    assert _distance(r2, r2_again) == 0 and _distance(own(2), h2) == 0
    # round 2 trained under round 1's head, not the server's: a site without round 1 behind it
    # (its own folder empty) sends a different backbone for the same round
    fresh = LocalGrid(client_app, [{"data-path": str(folder), "site": name,
                                    "output-path": str(tmp_path / "fresh" / name)}], cfg)
    grid_of[0] = fresh
    r2_fresh = round_(2)
    assert _distance(r2, r2_fresh, lora) > 0 and _distance(h2, h1, heads) > 0


def test_the_methods_preset_turns_the_new_regimes_on_and_the_default_does_not():
    assert set(NEW) <= set(regimes(resolve(STUDY_PRESETS["methods"])))
    assert not set(NEW) & set(regimes(resolve({})))


# ------------------------------------------------------------------ one study, every new regime on
@pytest.fixture(scope="module")
def study(small_federation, tmp_path_factory):
    data = canary_federation(small_federation, tmp_path_factory.mktemp("canary") / "fed")
    run_dir = tmp_path_factory.mktemp("run")
    cfg = resolve({**TINY, "data-dir": str(data), "personalize-steps": 2, **STUDY_PRESETS["methods"]})
    sites = list_sites(data)
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    Study(grid, cfg, run_dir).execute()
    return {"grid": grid, "run_dir": run_dir, "data": data, "sites": [s for s, _ in sites], "cfg": cfg}


def test_every_new_regime_is_scored_and_tested_against_global(study):
    df = pd.read_csv(study["run_dir"] / "metrics.csv")
    diff = pd.read_csv(study["run_dir"] / "differences.csv")
    expect = set(regimes(study["cfg"]))
    for site in study["sites"]:
        for split in ("test", "temporal"):
            got = set(df[(df.site == site) & (df.split == split) & (df.metric == "auc") & (df.subgroup == "all")].regime)
            assert expect <= got, (site, split, expect - got)
            for r in NEW:
                rows = diff[(diff.site == site) & (diff.regime == r) & (diff.reference == "global")
                            & (diff.split == split) & (diff.subgroup == "all")]
                assert len(rows) == 1, (site, r, split)
    pooled = diff[(diff.site == "pooled") & (diff.reference == "global") & (diff.subgroup == "all")]
    assert set(NEW) <= set(pooled.regime)


def test_the_run_records_ifca_membership_and_interpolation_weights(study):
    run = json.loads((study["run_dir"] / "run.json").read_text())
    assert run["status"] == "completed"
    phases = [r["phase"] for r in run["rounds"]]
    assert phases == ["global", "global", "ifca", "ifca", "fedrep", "fedrep"]
    k = study["cfg"].clusters
    assert set(run["ifca"]["membership"]) == set(study["sites"])
    assert all(0 <= j < k for j in run["ifca"]["membership"].values())
    assert set(run["interpolation"]) == set(study["sites"])
    assert all(a in INTERPOLATION_GRID for a in run["interpolation"].values())
    for site in study["sites"]:
        for regime in ("fedrep", "ditto", "interpolated"):
            assert (study["run_dir"] / "sites" / site / "adapters" / regime / "adapter_config.json").exists()
    for j in range(k):
        assert (study["run_dir"] / "adapters" / f"ifca-{j}" / "final" / "adapter_model.safetensors").exists()
    # Ditto's personal adapter trained alongside every global round, its seconds in the round's costs
    for rd in run["rounds"]:
        ditto = [c.get("ditto_train_seconds", 0) for c in rd["site_costs"].values()]
        assert all(d > 0 for d in ditto) if rd["phase"] == "global" else not any(ditto), rd
    costs = pd.read_csv(study["run_dir"] / "tables" / "costs.csv").set_index("regime")
    assert set(NEW) <= set(costs.index)
    assert costs.loc["ifca", "federated rounds"] == 2 and costs.loc["ditto", "builds on"] == "global"
    assert costs.loc["fedrep", "federated rounds"] == 2


def test_sites_sent_adapter_arrays_and_aggregates_only(study):
    """The audit of tests/test_study.py for the new messages: arrays only in training replies
    (rounds and IFCA rounds), exactly the adapter's keys; scalar metrics; no note, id or date."""
    replies = study["grid"].replies
    # describe, 2 global rounds, 2 IFCA rounds, 2 FedRep rounds, personalize, evaluate
    assert len(replies) == len(study["sites"]) * (1 + 2 + 2 + 2 + 1 + 1)
    ids, dates = set(), set()
    for _, folder in list_sites(study["data"]):
        df = read_site_table(folder, warn=False)
        ids.update(df["encounter_id"])
        dates.update(df["discharge_date"].dt.strftime("%Y-%m-%d"))
    adapter_keys = set(get_model(model_key(study["cfg"])).init_state)
    seen = set()
    for rep in replies:
        assert not rep.has_error(), rep.error.reason
        raw = message_to_proto(rep).SerializeToString()
        assert b"CANARY" not in raw, "note text left a site"
        for ident in list(ids)[:200]:
            assert ident.encode() not in raw, f"encounter id {ident} left a site"
        for d in list(dates)[:100]:
            assert d.encode() not in raw, "a discharge date left a site"
        content, mtype = rep.content, rep.metadata.message_type
        seen.add(mtype)
        assert set(content.array_records) <= {"arrays"}
        if content.array_records:
            assert mtype in ("train", "train.ifca")  # local adapters are not shared in this study
            assert set(content["arrays"].keys()) == adapter_keys
        assert set(content.metric_records) <= {"metrics"}
        m = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        for key, val in m.items():
            assert isinstance(val, (int, float)), f"{key} is not a scalar"
            assert "loss" not in key or key.endswith("train-loss"), f"{key}: a loss other than training's left a site"
        if mtype == "train.ifca":
            assert "ifca-cluster" in m
        if mtype == "train.personalize":
            assert m.get("interpolated-weight") in INTERPOLATION_GRID
        assert set(content.config_records) <= ({"site"} if mtype == "query.describe" else set())
    assert {"train", "train.ifca", "train.personalize", "evaluate"} <= seen


@pytest.mark.parametrize("crash_type,crash_at,personalize_resent", [
    ("train.ifca", 2, True),  # killed in IFCA round 2 (global rounds and IFCA round 1 done)
    # (killed at evaluation, site-held adapters kept: tests/test_resume.py, for the same phase code)
])
def test_a_killed_methods_study_resumes_to_the_same_results(study, tmp_path, crash_type, crash_at,
                                                            personalize_resent):
    from test_resume import CrashingGrid, ServerCrash

    cfg = study["cfg"].override({"report": False})  # the results are compared; the report is not
    nodes = simulated_nodes(len(study["sites"]))
    with pytest.raises(ServerCrash):
        Study(CrashingGrid(client_app, nodes, cfg, crash_type=crash_type, crash_at=crash_at), cfg, tmp_path).execute()
    resumed = cfg.override({"resume": True})
    grid = LocalGrid(client_app, simulated_nodes(len(study["sites"])), resumed)
    Study(grid, resumed, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    whole = json.loads((study["run_dir"] / "run.json").read_text())
    assert run["status"] == "completed", run["errors"]
    sent = [m.metadata.message_type for m in grid.sent]
    assert sent.count("train.ifca") == len(study["sites"]) * (1 if crash_type == "train.ifca" else 0)
    assert sent.count("train.personalize") == (len(study["sites"]) if personalize_resent else 0)
    assert run["ifca"]["membership"] == whole["ifca"]["membership"]
    assert run["interpolation"] == whole["interpolation"]

    def values(d):
        df = pd.read_csv(d / "metrics.csv")
        return df.set_index(["site", "regime", "split", "subgroup", "metric"])["value"].sort_index()

    a, b = values(study["run_dir"]), values(tmp_path)
    assert list(a.index) == list(b.index)
    pd.testing.assert_series_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-9)


def test_the_cli_study_option_puts_the_preset_under_the_users_run_config(monkeypatch, tmp_path):
    """`clinfed simulate --study methods`: the preset's regimes reach the study; a `regimes`
    given with --run-config wins over the preset."""
    from clinfed.cli import main as cli

    seen = []
    monkeypatch.setattr(cli, "_simulate", lambda out, overrides, n, c, g=None: seen.append(dict(overrides)) or {"timings": {"total": 0}})
    fed = tmp_path / "fed"
    from clinfed.simulations.generate import generate_federation

    generate_federation(fed, n_hospitals=3, seed=1, sizes=[120, 100, 90])
    assert cli.main(["simulate", "--data", str(fed), "--out", str(tmp_path / "a"), "--study", "methods"]) == 0
    assert seen[-1]["regimes"] == STUDY_PRESETS["methods"]["regimes"]
    assert cli.main(["simulate", "--data", str(fed), "--out", str(tmp_path / "b"), "--study", "methods",
                     "--run-config", 'regimes="base,global,ditto"']) == 0
    assert seen[-1]["regimes"] == "base,global,ditto"
    assert cli.main(["simulate", "--data", str(fed), "--out", str(tmp_path / "c")]) == 0
    assert "regimes" not in seen[-1]


def test_paired_runs_compares_two_runs_on_the_same_patients(study, tmp_path):
    """simulations.paired_runs (a lever's accuracy cost): run B = the study with one site's `local`
    adapter swapped for its `personalized` one; the difference there is the two regimes' AUC
    difference the study itself measured, every other comparison is exactly 0, and runs that do
    not score the same patients are refused."""
    import shutil

    from clinfed.common.data import find_table
    from clinfed.simulations.paired_runs import paired_runs

    a, b = study["run_dir"], tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("figures", "tables", "checkpoint"))
    m = pd.read_csv(a / "metrics.csv")
    m = m[(m.split == "test") & (m.subgroup == "all") & (m.metric == "auc") & m.regime.isin(["local", "personalized"])]
    released = m.dropna(subset=["value"]).groupby("site").regime.nunique()
    site = released[released == 2].index[0]  # a site whose two AUCs the study released (not suppressed)
    shutil.rmtree(b / "sites" / site / "adapters" / "local")
    shutil.copytree(a / "sites" / site / "adapters" / "personalized", b / "sites" / site / "adapters" / "local")
    by_site, pooled = paired_runs(a, b, ("global", "local"), splits=("test",))
    assert set(by_site.site) == set(study["sites"]) and set(by_site.regime) == {"global", "local"}
    auc = m[m.site == site].set_index("regime")
    swapped = by_site[(by_site.site == site) & (by_site.regime == "local")].iloc[0]
    assert swapped["diff"] == pytest.approx(auc.loc["personalized", "value"] - auc.loc["local", "value"], abs=1e-6)
    assert swapped["diff"] != 0
    others = by_site.drop(index=swapped.name)
    assert (others["diff"] == 0).all(), others
    assert set(pooled.regime) == {"global", "local"} and len(pooled) == 2
    # the same hospitals in another folder (two `simulate --out` runs generate their own) are the
    # same patients; one changed byte in one site's table is not
    cfg = json.loads((b / "run.json").read_text())
    data = Path(cfg["config"]["data-dir"])
    copy = shutil.copytree(data, tmp_path / "fed-copy", ignore=shutil.ignore_patterns("clinfed-out"))
    cfg["config"]["data-dir"] = str(copy)
    (b / "run.json").write_text(json.dumps(cfg))
    assert len(paired_runs(a, b, ("global",), splits=("test",))[0]) == len(study["sites"])
    table = find_table(copy / site)
    table.write_bytes(table.read_bytes().replace(b"1", b"2", 1))
    with pytest.raises(ValueError, match="differ in data-dir"):
        paired_runs(a, b, ("global",), splits=("test",))
    cfg["config"]["data-dir"] = str(data)
    cfg["config"]["seed"] = 99
    (b / "run.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not score the same patients: they differ in seed"):
        paired_runs(a, b)
