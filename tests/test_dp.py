"""DP-SGD at a site (Opacus) and its ledger; Flower's DP wrapper on adapter updates."""

import json

import numpy as np
import pytest

from clinfed.common.dp import DPBudgetExhausted, DPLedger, DPSettings, plan, rdp_epsilon


def _easy_task(tok, n, rng):
    """Readmitted notes say `chf`, the others `stable`: learnable by a tiny random BERT + LoRA."""
    from clinfed.common.training import encode_texts

    words = "the patient was admitted with and discharged home on day history of lives alone normal".split()
    texts, y = [], []
    for _ in range(n):
        lab = int(rng.random() < 0.5)
        w = list(rng.choice(words, 8)) + [("chf" if lab else "stable")] * 4
        rng.shuffle(w)
        texts.append(" ".join(w))
        y.append(lab)
    return encode_texts(tok, texts, 32), np.array(y)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from clinfed.common.models import LoraSettings, make_lora_model
    from clinfed.common.adapters import adapter_state

    torch.set_num_threads(1)
    model, tok = make_lora_model("tiny-bert", 0, LoraSettings())
    rng = np.random.default_rng(0)
    train, test = _easy_task(tok, 400, rng), _easy_task(tok, 200, rng)
    return model, tok, train, test, adapter_state(model)


def _auc(model, tok, test):
    from sklearn.metrics import roc_auc_score

    from clinfed.common.training import predict_proba

    return roc_auc_score(test[1], predict_proba(model, test[0], tok.pad_token_id))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 1e-2)])
def test_dp_training_changes_the_adapter_and_learns(tiny, optimizer, lr):
    from clinfed.common.adapters import adapter_state, load_adapter_state
    from clinfed.common.dp import train_classifier_dp
    from clinfed.common.training import TrainSettings, train_classifier

    model, tok, train, test, init = tiny
    load_adapter_state(model, init)
    before = _auc(model, tok, test)
    settings = TrainSettings(steps=40, batch_size=32, lr=1e-2, precision="fp32")
    info = train_classifier_dp(model, *train, settings, tok.pad_token_id,
                               DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, secret_seed=1,
                                          optimizer=optimizer, lr=lr))
    after = adapter_state(model)
    moved = {k: float(np.abs(after[k] - init[k]).max()) for k in init}
    lora = [k for k in moved if "lora_" in k]
    assert lora and all(moved[k] > 0 for k in lora), "DP training left LoRA weights unchanged"
    assert all(v > 0 for v in moved.values()), [k for k, v in moved.items() if v == 0]
    auc = _auc(model, tok, test)
    assert before < 0.6 and auc > 0.7, (before, auc)
    assert 20 < info["mean_batch"] < 45  # Poisson batches around the expected 32
    # Opacus' hooks and per-example buffers are gone: the shared model trains normally afterwards
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    load_adapter_state(model, init)
    train_classifier(model, *train, TrainSettings(steps=20, batch_size=32, lr=1e-2, precision="fp32"),
                     tok.pad_token_id)
    assert _auc(model, tok, test) > 0.8


def test_dp_noise_is_not_the_public_seed(tiny):
    """Two runs with everything public equal (the same study seed) draw different noise."""
    from clinfed.common.adapters import adapter_state, load_adapter_state
    from clinfed.common.dp import train_classifier_dp
    from clinfed.common.training import TrainSettings

    model, tok, train, _, init = tiny
    settings = TrainSettings(steps=2, batch_size=32, lr=1e-2, seed=0, precision="fp32")
    outs = []
    for _ in range(2):
        load_adapter_state(model, init)
        train_classifier_dp(model, *train, settings, tok.pad_token_id, DPSettings(1.0, 1.0, 1e-3))
        outs.append(adapter_state(model))
    assert any(not np.array_equal(outs[0][k], outs[1][k]) for k in init)


def test_epsilon_composes_across_calls_and_persists(tmp_path):
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, budget=0.0)
    ledger = DPLedger.open(tmp_path, "/runs/study-a")
    events = [plan(ledger, dp, n_train=200, batch_size=16, steps=20, label=f"round {r}") for r in (1, 2, 3)]
    totals = [e["epsilon_total"] for e in events]
    assert totals[0] < totals[1] < totals[2]
    assert events[0]["epsilon"] == pytest.approx(events[2]["epsilon"]) == pytest.approx(totals[0])
    assert totals[2] < 3 * totals[0]  # RDP composition is sublinear
    again = DPLedger.open(tmp_path, "/runs/study-a")  # another process, the next round
    assert again.epsilon(1e-5) == pytest.approx(totals[2])
    assert DPLedger.open(tmp_path, "/runs/study-b").epsilon(1e-5) == 0.0
    assert rdp_epsilon([(1.0, 16 / 200, 60)], 1e-5) == pytest.approx(totals[2])


def test_training_stops_at_the_budget(tmp_path):
    one = rdp_epsilon([(1.0, 0.08, 20)], 1e-5)
    two = rdp_epsilon([(1.0, 0.08, 20)] * 2, 1e-5)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, budget=(one + two) / 2)
    ledger = DPLedger.open(tmp_path, "s")
    plan(ledger, dp, n_train=200, batch_size=16, steps=20, label="round 1")
    with pytest.raises(DPBudgetExhausted, match="past its budget"):
        plan(ledger, dp, n_train=200, batch_size=16, steps=20, label="round 2")
    assert len(ledger.history) == 1 and ledger.epsilon(1e-5) == pytest.approx(one)  # nothing charged
    plan(ledger, dp, n_train=200, batch_size=16, steps=5, label="a shorter call still fits")
    assert ledger.epsilon(1e-5) <= dp.budget


def test_update_dp_wrapper_clips_against_the_rounds_start():
    """Flower's server-side fixed clipping, primed as the study primes it: every update is
    clipped to the norm around the arrays sent this round, FedAvg weights are equal."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from clinfed.common.config import resolve
    from clinfed.server.aggregation import make_strategy, prime_update_dp

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    strat = make_strategy(resolve({"update-dp-noise": 1e-3, "update-dp-clip": 0.1}), 2)
    assert isinstance(strat, DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(strat.strategy, FedAvg) and strat.strategy.weighted_by_key == "train-steps"
    assert type(make_strategy(resolve({}), 2)) is FedAvg

    start = {"w": np.full(100, 5.0, dtype=np.float32)}
    rec = lambda a: ArrayRecord({"w": Array(a.astype(np.float32))})  # noqa: E731
    replies = []
    for shift, examples in ((10.0, 1000), (-3.0, 10)):
        content = RecordDict({"arrays": rec(start["w"] + shift),
                              "metrics": MetricRecord({"num-examples": examples, "train-steps": 20})})
        m = Message(content, dst_node_id=1, message_type="train")
        replies.append(Message(content, reply_to=m))
    prime_update_dp(strat, rec(start["w"]), len(replies))
    new, _ = strat.aggregate_train(1, replies)
    delta = new["w"].numpy() - start["w"]
    # each update clipped to norm 0.1 (direction kept), averaged with equal weights: +0.1 and -0.1 cancel
    assert np.linalg.norm(delta) < 0.01, np.linalg.norm(delta)
    assert strat.num_sampled_clients == 2


@pytest.fixture(scope="module")
def dp_study(small_federation, tmp_path_factory):
    import shutil

    from clinfed.simulations.app import app as client_app
    from clinfed.common.config import resolve
    from clinfed.common.data import list_sites
    from clinfed.simulations.inprocess import LocalGrid
    from clinfed.server.study import Study

    run_dir = tmp_path_factory.mktemp("dprun")
    # the sites' DP ledgers live beside their data and add up across studies: a private copy
    small_federation = shutil.copytree(small_federation, run_dir / "fed", ignore=shutil.ignore_patterns("clinfed-out"))
    base = {"model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 3, "local-steps": 4,
            "personalize-steps": 2, "bootstrap": 10, "min-cell-size": 5, "batch-size": 8,
            "regimes": "base,global,local,personalized", "dp": True, "dp-delta": 1e-5}
    sites = list_sites(small_federation)
    # the budget: every site affords one round; the largest site (smallest sampling rate) two
    from clinfed.common.data import read_site_table, split_site

    cfg0 = resolve(base)
    n_train = {}
    for name, folder in sites:
        sp = split_site(read_site_table(folder, warn=False), seed=0, temporal_frac=cfg0["temporal-frac"],
                        test_frac=cfg0["test-frac"], val_frac=cfg0["val-frac"])
        n_train[name] = len(sp["train"])
    step = lambda n: (1.0, min(1.0, 8 / n), 4)  # noqa: E731
    eps = {s: [rdp_epsilon([step(n)] * r, 1e-5) for r in (1, 2, 3)] for s, n in n_train.items()}
    # each hospital's own policy file sets its budget: the largest affords two of the three
    # rounds, the others one; the run config's budget is looser (the stricter wins)
    big = max(n_train, key=n_train.get)
    budget = {s: (e[1] + e[2]) / 2 if s == big else (e[0] + e[1]) / 2 for s, e in eps.items()}
    nodes = []
    for i, (name, _) in enumerate(sites):
        pol = run_dir / f"policy-{name}.toml"
        pol.write_text(f"min-cell-size = 5\ndp-epsilon = {budget[name]!r}\n")
        nodes.append({"partition-id": i, "num-partitions": len(sites), "policy-path": str(pol)})
    cfg = resolve({**base, "dp-epsilon": 50.0})
    grid = LocalGrid(client_app, nodes, cfg)
    Study(grid, cfg, run_dir / "run").execute()
    run_dir = run_dir / "run"
    return {"grid": grid, "run_dir": run_dir, "eps": eps, "budget": budget, "big": big, "n_train": n_train}


@pytest.mark.slow
def test_study_epsilon_grows_per_round_and_training_stops_at_the_budget(dp_study):
    run = json.loads((dp_study["run_dir"] / "run.json").read_text())
    assert run["status"] == "completed"
    eps, budgets, big = dp_study["eps"], dp_study["budget"], dp_study["big"]
    rounds = [r for r in run["rounds"] if r["phase"] == "global"]
    assert len(rounds) == 3
    for site, e in eps.items():
        budget = budgets[site]
        assert run["site_policies"][site]["dp_epsilon"] == pytest.approx(budget)
        affordable = sum(x <= budget for x in e)
        assert affordable == (2 if site == big else 1)
        trained = [r for r in rounds if site in r["sites"]]
        assert len(trained) == affordable, (site, [r["sites"] for r in rounds])
        totals = [r["dp"][site]["epsilon_total"] for r in trained]
        assert totals == pytest.approx(e[:affordable], rel=1e-6)  # grows round by round
        assert all(r["dp"][site]["epsilon"] == pytest.approx(e[0], rel=1e-6) for r in trained)
        for r in rounds[affordable:]:  # declined with a reason, not counted as a failure
            assert "DP budget exhausted" in r["declined"][site] and site not in r["failures"]
        assert run["dp"][site]["epsilon_total"] <= budget
    assert not [e for e in run["errors"] if "DP" in e]
    df = __import__("pandas").read_csv(dp_study["run_dir"] / "metrics.csv")
    for site in eps:
        # `local` (12 steps) no longer fits anywhere: not trained, not scored, and the run says so;
        # the 2 `personalized` steps are trained exactly where they still fit
        stopped = run["dp"][site]["stopped"]
        assert "personalize local" in stopped
        scored = ((df.site == site) & (df.regime == "personalized")).any()
        assert scored == ("personalize personalized" not in stopped), (site, stopped)
    assert "local" not in set(df["regime"])
    html = (dp_study["run_dir"] / "report.html").read_text()
    assert "<h2>Privacy</h2>" in html and "DP-SGD ε this round / total" in html


@pytest.mark.slow
def test_dp_replies_release_only_aggregates(dp_study):
    """Every reply passed the guard; DP replies carry epsilon numbers, declined rounds no arrays."""
    for rep in dp_study["grid"].replies:
        assert not rep.has_error(), rep.error.reason
        m = dict(rep.content["metrics"]) if "metrics" in rep.content.metric_records else {}
        if rep.metadata.message_type == "train":
            assert ("arrays" in rep.content.array_records) != bool(m.get("dp-budget-exhausted"))
            assert "dp-epsilon-total" in m
        # delta is 1e-5 from the run config here, not 1/n_train
        if "dp-delta" in m:
            assert m["dp-delta"] == pytest.approx(1e-5)


def test_dp_is_refused_where_it_is_not_built():
    """DPO has no DP path (common.instruct): a generative study with dp must skip DPO."""
    from clinfed.common.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="'dp'.*DPO has no DP path.*dpo-rounds = 0"):
        resolve({"dp": True, "task": "generative"})
    assert resolve({"dp": True, "task": "generative", "dpo-rounds": 0})["dp"] is True
    assert resolve({"dp": True})["dp"] is True


def _yes_no_records(n, rng):
    words = "the patient was admitted with and discharged home on day history of lives alone normal".split()
    out = []
    for i in range(n):
        lab = int(rng.random() < 0.5)
        w = list(rng.choice(words, 8)) + [("chf" if lab else "stable")] * 4
        rng.shuffle(w)
        out.append({"id": str(i), "note_text": " ".join(w), "readmitted_30d": lab})
    return out


def test_dp_sft_changes_the_decoder_adapter_and_learns():
    """DP-SGD SFT of a tiny Llama + LoRA on a yes/no answer: the adapter moves and the
    answer probability separates the classes (AUC) better than before."""
    import torch
    from sklearn.metrics import roc_auc_score

    from clinfed.common.instruct import (
        InstructSettings,
        answer_probability,
        make_lora_causal_lm,
        sft_train,
        sft_train_dp,
    )
    from clinfed.common.models import LoraSettings
    from clinfed.common.adapters import adapter_state
    from clinfed.common.tasks import TASKS

    torch.set_num_threads(1)
    model, tok = make_lora_causal_lm("tiny-llama", 0, LoraSettings())
    rng = np.random.default_rng(0)
    task = TASKS["readmission"]
    train, test = _yes_no_records(300, rng), _yes_no_records(100, rng)
    y = [r["readmitted_30d"] for r in test]
    # the shared model has been through TRL first (gradient checkpointing, input hook), as in a study
    sft_train(model, tok, [task.build_example(r) for r in train[:8]], InstructSettings(steps=1, batch_size=4))
    before = adapter_state(model)
    auc0 = roc_auc_score(y, answer_probability(model, tok, [task.prompt(r) for r in test]))
    info = sft_train_dp(model, tok, [task.build_example(r) for r in train],
                        InstructSettings(steps=60, batch_size=16, lr=1e-2, max_length=128, seed=0),
                        DPSettings(noise_multiplier=0.7, max_grad_norm=1.0, delta=1e-3, secret_seed=1,
                                   optimizer="adam"))
    auc1 = roc_auc_score(y, answer_probability(model, tok, [task.prompt(r) for r in test]))
    after = adapter_state(model)
    assert info["steps"] == 60 and info["examples"] == 300 and 10 < info["mean_batch"] < 22
    assert max(float(np.abs(after[k] - before[k]).max()) for k in before) > 1e-3
    assert auc1 > max(auc0, 0.97), (auc0, auc1)
    # the hooks are gone: the shared model trains and predicts normally afterwards
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.slow
def test_generative_study_with_dp_sft_reports_epsilon(fresh_federation, tmp_path):
    """SFT rounds and the site-held SFT run as DP-SGD; epsilon per call and in total reaches
    run.json and metrics.csv; the local regime stops at SFT (no DP path for DPO)."""
    import pandas as pd

    from clinfed.simulations.app import app as client_app
    from clinfed.common.config import resolve
    from clinfed.common.data import list_sites
    from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
    from clinfed.server.generative_study import GenerativeStudy

    sites = list_sites(fresh_federation)
    cfg = resolve({"task": "generative", "decoder": "tiny-llama", "data-dir": str(fresh_federation),
                   "num-server-rounds": 2, "sft-steps": 2, "dpo-rounds": 0, "dp": True, "dp-delta": 1e-4,
                   "gen-eval-items": 10, "min-cell-size": 5, "gen-batch-size": 4, "gen-max-new-tokens": 4,
                   "gen-max-words": 20, "gen-examples": 0, "public-eval": False})
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    GenerativeStudy(grid, cfg, tmp_path / "run").execute()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed", run["errors"]
    rounds = [r for r in run["rounds"] if r["phase"] == "sft"]
    assert len(rounds) == 2
    for name, _ in sites:
        totals = [r["dp"][name]["epsilon_total"] for r in rounds]
        assert 0 < totals[0] < totals[1]
        assert set(run["dp"][name]["by_phase"]) == {"sft round 1", "sft round 2", "gen_local local",
                                                    "gen_local personalized"}
        assert run["dp"][name]["epsilon_total"] > totals[1]  # the site-held SFT counts too
        assert not (tmp_path / "run" / "sites" / name / "adapters" / "local-dpo").exists()
    df = pd.read_csv(tmp_path / "run" / "metrics.csv")
    eps = df[df["metric"] == "dp_epsilon_total"].set_index("site")["value"]
    assert eps.to_dict() == pytest.approx({n: run["dp"][n]["epsilon_total"] for n, _ in sites})
    calls = df[df["metric"] == "dp_epsilon"]
    assert set(calls["note"]) == {"sft round 1", "sft round 2", "gen_local local", "gen_local personalized"}
    assert set(calls["regime"]) == {"global", "local", "personalized"}
    scored = df[~df["metric"].str.startswith("dp_")]
    assert ("dpo", "local") not in set(zip(scored["stage"], scored["regime"]))
    assert ("sft", "local") in set(zip(scored["stage"], scored["regime"]))
    assert (tmp_path / "run" / "report.html").exists()


@pytest.mark.slow
def test_dp_cost_command_runs(fresh_federation, tmp_path, capsys):
    import pandas as pd

    from clinfed.simulations.dp_cost import main

    assert main(["--out", str(tmp_path / "out"), "--data", str(fresh_federation), "--noise", "1.0", "--threads", "1",
                 "--run-config", "model=tiny-bert num-server-rounds=1 local-steps=2 bootstrap=10 min-cell-size=5 "
                                 "batch-size=8"]) == 0
    table = pd.read_csv(tmp_path / "out" / "dp_cost.csv")
    assert list(table["setting"]) == ["no DP", "DP-SGD σ=1"]
    assert np.isnan(table["ε total (max)"][0]) and table["ε total (max)"][1] > table["ε total (median)"][1] > 0
    assert table["global AUC test"].between(0, 1).all()
    out = capsys.readouterr().out
    assert "machine:" in out and "| DP-SGD σ=1 |" in out


def test_dp_rounds_reports_each_round_with_growing_epsilon(small_federation, tmp_path):
    """The round-by-round DP trajectory: one row per round, every site's epsilon growing."""
    from clinfed.simulations.dp_rounds import run

    rows = run(noise=1.0, rounds=2, steps=2, lr=0.5, data_dir=str(small_federation), model="tiny-bert",
               threads=1, out_dir=str(tmp_path), echo=lambda *_: None)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["mean_auc"] <= 1.0 for r in rows)
    assert rows[0]["epsilon"] == {} and set(rows[1]["epsilon"]) == set(rows[2]["epsilon"]) and rows[1]["epsilon"]
    assert all(0 < rows[1]["epsilon"][s] < rows[2]["epsilon"][s] for s in rows[1]["epsilon"])
