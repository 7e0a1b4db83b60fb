"""The aggregation strategies (run config `strategy`, server.aggregation): each one's server step
against a hand computation of its documented formula, FedProx's mu reaching the sites' training,
FedAvg unchanged, and a resumed FedAdam study taking exactly the steps of an uninterrupted one."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clinfed.common import protocol
from clinfed.common.config import ConfigError, resolve
from clinfed.common.data import list_sites
from clinfed.server.aggregation import (
    aggregate,
    load_strategy_state,
    make_strategy,
    strategy_state,
    train_config,
)
from clinfed.server.checkpoint import _load_npz
from clinfed.server.study import Study
from clinfed.simulations.app import app as client_app
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes

KEYS = ("a.lora_A.weight", "a.lora_B.weight")


def _rec(state):
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in state.items()})


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are made outside a Flower runtime here: give them the ids a runtime would."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _reply(state, n=10, node=1):
    content = RecordDict({protocol.ARRAYS: _rec(state),
                          protocol.METRICS: MetricRecord({"num-examples": n, "train-steps": 3})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=protocol.TRAIN))


def _toy(seed):
    rng = np.random.default_rng(seed)
    start = {KEYS[0]: rng.normal(size=(2, 3)), KEYS[1]: rng.normal(size=(3, 2))}
    sites = [{k: v + rng.normal(scale=0.1, size=v.shape) for k, v in start.items()} for _ in range(3)]
    return ({k: v.astype(np.float32) for k, v in start.items()},
            [{k: v.astype(np.float32) for k, v in s.items()} for s in sites])


def _mean(sites, weights):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, sites)) for k in sites[0]}


def test_fedadam_step_matches_the_hand_computation_over_two_rounds():
    """m = b1 m + (1-b1) delta, v = b2 v + (1-b2) delta^2, w += eta_t m / (sqrt(v) + tau), with Flower's
    bias-corrected eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)); delta = FedAvg(updates) - w."""
    cfg = resolve({"strategy": "fedadam", "server-learning-rate": 0.05, "server-beta-1": 0.8,
                   "server-beta-2": 0.95, "server-tau": 1e-2})
    strat = make_strategy(cfg, 3)
    start, sites = _toy(0)
    weights = [10, 20, 30]
    w = {k: v.astype(np.float64) for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for rnd in (1, 2):
        replies = [_reply(s, n) for s, n in zip(sites, weights)]
        new, _ = aggregate(strat, rnd, replies, _rec(w))
        avg = _mean(sites, weights)
        eta_t = 0.05 * np.sqrt(1 - 0.95 ** (rnd + 1)) / (1 - 0.8 ** (rnd + 1))
        for k in w:
            delta = avg[k] - w[k].astype(np.float32).astype(np.float64)
            m[k] = 0.8 * m[k] + 0.2 * delta
            v[k] = 0.95 * v[k] + 0.05 * delta ** 2
            w[k] = w[k].astype(np.float32).astype(np.float64) + eta_t * m[k] / (np.sqrt(v[k]) + 1e-2)
            got = new[k].numpy()
            assert got.dtype == np.float32  # sent as the adapter's dtype, not float64
            np.testing.assert_allclose(got, w[k], rtol=1e-5, atol=1e-6)
        # the step moved the adapter by about eta_t per coordinate (Adam's sign-like step), not by delta
        assert not np.allclose(new[KEYS[0]].numpy(), avg[KEYS[0]], atol=1e-3)
        w = {k: new[k].numpy().astype(np.float64) for k in w}
    state = strategy_state(strat)
    assert set(state) == {f"{p}/{k}" for p in ("m", "v") for k in KEYS}
    np.testing.assert_allclose(state[f"m/{KEYS[0]}"], m[KEYS[0]], rtol=1e-4, atol=1e-7)


def test_fedavgm_momentum_matches_the_hand_computation():
    """pseudo-gradient g = w - FedAvg(updates); momentum u = beta u + g (u = g in round 1); w -= lr u."""
    cfg = resolve({"strategy": "fedavgm", "server-momentum": 0.7, "server-learning-rate": 0.5})
    strat = make_strategy(cfg, 3)
    start, sites = _toy(1)
    w = {k: v.astype(np.float64) for k, v in start.items()}
    u = None
    for rnd in (1, 2, 3):
        new, _ = aggregate(strat, rnd, [_reply(s, 10) for s in sites], _rec(w))
        avg = _mean(sites, [1, 1, 1])
        g = {k: w[k] - avg[k] for k in w}
        u = g if u is None else {k: 0.7 * u[k] + g[k] for k in w}
        w = {k: w[k] - 0.5 * u[k] for k in w}
        for k in w:
            np.testing.assert_allclose(new[k].numpy(), w[k], rtol=1e-5, atol=1e-6)
        w = {k: new[k].numpy().astype(np.float64) for k in w}
    assert set(strategy_state(strat)) == {f"momentum/{k}" for k in KEYS}


def test_fedmedian_takes_the_coordinatewise_median_and_leaves_the_replies_whole():
    start, sites = _toy(2)
    sites[2] = {k: v + 100.0 for k, v in sites[2].items()}  # one wild site: the median ignores it
    replies = [_reply(s, n) for s, n in zip(sites, (5, 5, 500))]
    new, used = aggregate(make_strategy(resolve({"strategy": "fedmedian"}), 3), 1, replies, _rec(start))
    for k in KEYS:
        np.testing.assert_array_equal(new[k].numpy(), np.median(np.stack([s[k] for s in sites]), axis=0))
    # Flower's FedMedian pops the arrays it aggregates: the study's own replies keep theirs
    assert all(len(r.content[protocol.ARRAYS]) == len(KEYS) for r in replies)


def test_fedtrimmedavg_cuts_the_extremes():
    rng = np.random.default_rng(3)
    sites = [{k: rng.normal(size=(2, 3) if "A" in k else (3, 2)).astype(np.float32) for k in KEYS} for _ in range(5)]
    start = {k: np.zeros_like(v) for k, v in sites[0].items()}
    new, _ = aggregate(make_strategy(resolve({"strategy": "fedtrimmedavg", "trim-beta": 0.2}), 5), 1,
                       [_reply(s) for s in sites], _rec(start))
    for k in KEYS:
        stacked = np.sort(np.stack([s[k] for s in sites]), axis=0)
        np.testing.assert_allclose(new[k].numpy(), stacked[1:4].mean(axis=0), rtol=1e-6)


def test_fedavg_is_the_default_and_untouched():
    strat = make_strategy(resolve({}), 3)
    assert type(strat) is FedAvg and strat.weighted_by_key == "num-examples"
    start, sites = _toy(4)
    replies = [_reply(s, n) for s, n in zip(sites, (10, 20, 30))]
    new, used = aggregate(strat, 1, replies, _rec(start))
    assert all(u is r for u, r in zip(used, replies))  # the sites' own replies, as before the strategies
    assert strategy_state(strat) == {} and train_config(strat) == {}
    for k in KEYS:
        np.testing.assert_allclose(new[k].numpy(), _mean(sites, (10, 20, 30))[k], rtol=1e-6)


def test_fedprox_sends_mu_and_refuses_dp():
    assert train_config(make_strategy(resolve({"strategy": "fedprox", "proximal-mu": 0.3}), 2)) == {"proximal-mu": 0.3}
    assert train_config(make_strategy(resolve({"strategy": "fedprox", "proximal-mu": 0.3,
                                               "update-dp-noise": 0.1}), 2)) == {"proximal-mu": 0.3}
    with pytest.raises(ConfigError, match="fedprox"):
        resolve({"strategy": "fedprox", "dp": True})
    with pytest.raises(ConfigError, match="strategy"):
        resolve({"strategy": "scaffold"})


def test_server_optimizer_state_round_trips():
    start, sites = _toy(5)
    for name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        a = make_strategy(resolve({"strategy": name}), 3)
        aggregate(a, 1, [_reply(s) for s in sites], _rec(start))
        saved = strategy_state(a)
        assert saved, name
        b = make_strategy(resolve({"strategy": name}), 3)
        load_strategy_state(b, saved, list(KEYS))
        nxt = {k: v + 0.05 for k, v in start.items()}
        ra, _ = aggregate(a, 2, [_reply(s) for s in sites], _rec(nxt))
        rb, _ = aggregate(b, 2, [_reply(s) for s in sites], _rec(nxt))
        for k in KEYS:
            np.testing.assert_array_equal(ra[k].numpy(), rb[k].numpy())


# ------------------------------------------------------------------------ in-process studies
def _cfg(data, **extra):
    return resolve({"model": "tiny-bert", "data-dir": str(data), "num-server-rounds": 2, "local-steps": 3,
                    "personalize-steps": 2, "bootstrap": 20, "min-cell-size": 5, "batch-size": 8,
                    "subgroups": False, "regimes": "global", "report": False, **extra})


def _run(data, run_dir, grid_cls=LocalGrid, **extra):
    cfg = _cfg(data, **extra)
    grid = grid_cls(client_app, simulated_nodes(len(list_sites(data))), cfg)
    Study(grid, cfg, run_dir).execute()
    return json.loads((run_dir / "run.json").read_text()), grid


def _assert_costs(run):
    """Bytes and training seconds per site in every round, whatever the strategy."""
    for rnd in run["rounds"]:
        assert set(rnd["site_bytes"]) == set(rnd["site_costs"]) == {"h01", "h02", "h03"}
        assert all(b["sent"] > 0 and b["received"] > 0 for b in rnd["site_bytes"].values())
        assert all(c["train_seconds"] > 0 for c in rnd["site_costs"].values())


def test_fedprox_mu_reaches_the_sites_and_keeps_their_updates_small(small_federation, tmp_path):
    """With a large mu the sites' round-1 updates (from the same initial adapter) stay far
    closer to it than with mu = 0; the train messages carried the strategy's mu."""
    from clinfed.common.model_cache import LoadedModel, model_key

    init = LoadedModel(model_key(_cfg(small_federation))).init_state

    def round1_distance(mu, name):
        run, grid = _run(small_federation, tmp_path / name, strategy="fedprox", **{"proximal-mu": mu,
                                                                                   "num-server-rounds": 1})
        sent = [m for m in grid.sent if m.metadata.message_type == protocol.TRAIN]
        assert sent and all(float(m.content[protocol.CONFIG]["proximal-mu"]) == mu for m in sent)
        assert run["status"] == "completed"
        _assert_costs(run)
        last = {p.stem: _load_npz(p) for p in (tmp_path / name / "checkpoint" / "global" / "last").glob("*.npz")}
        assert len(last) == 3
        return {s: float(np.sqrt(sum(((st[k] - init[k]) ** 2).sum() for k in st))) for s, st in last.items()}

    free, pulled = round1_distance(0.0, "mu0"), round1_distance(50.0, "mu50")
    for site in free:
        assert pulled[site] < 0.7 * free[site], (site, pulled[site], free[site])


class CrashAfterRound(LocalGrid):
    """Dies (like a killed ServerApp) when sending the `crash_at`-th train message batch."""

    def __init__(self, *a, crash_at: int, **kw):
        super().__init__(*a, **kw)
        self.crash_at, self.seen = crash_at, 0

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == protocol.TRAIN for m in messages):
            self.seen += 1
            if self.seen == self.crash_at:
                raise RuntimeError("server killed")
        return super().push_messages(messages)


def test_a_resumed_fedadam_study_takes_the_same_steps(small_federation, tmp_path):
    """Killed after round 1, resumed: the moments come back from the checkpoint, so rounds 2-3
    give the adapters of the uninterrupted study, byte for byte (without them round 2 would
    start FedAdam's moments from zero and differ)."""
    extra = {"strategy": "fedadam", "num-server-rounds": 3, "regimes": "global"}
    whole, _ = _run(small_federation, tmp_path / "whole", **extra)
    cfg = _cfg(small_federation, **extra)
    grid = CrashAfterRound(client_app, simulated_nodes(3), cfg, crash_at=2)
    with pytest.raises(RuntimeError, match="server killed"):
        Study(grid, cfg, tmp_path / "cut").execute()
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["phases"]["global"]["round"] == 1 and state["phases"]["global"]["strategy"] == ["global"]
    resumed, _ = _run(small_federation, tmp_path / "cut", resume=True, **extra)
    assert resumed["status"] == "completed"
    assert [r["adapter_hash"] for r in resumed["rounds"]] == [r["adapter_hash"] for r in whole["rounds"]]
    _assert_costs(whole)
    # the bytes on the wire are the adapter's float32, not FedAdam's float64 arithmetic
    assert len({b["sent"] for r in whole["rounds"] for b in r["site_bytes"].values()}) == 1


@pytest.mark.parametrize("name", ["fedavgm", "fedmedian", "fedtrimmedavg"])
def test_the_other_strategies_run_a_study_with_costs_recorded(small_federation, tmp_path, name):
    run, _ = _run(small_federation, tmp_path, strategy=name, **{"num-server-rounds": 1})
    assert run["status"] == "completed", run["errors"]
    assert len(run["rounds"]) == 1
    _assert_costs(run)
