"""Sites of different LoRA ranks (site policy `max-lora-rank`, common.ranks): the global adapter
truncated to a site's rank, its update zero-padded back, exact FedAvg when every rank is the
study's, the update checks still strict, and a study with a capped site end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clinfed.common import protocol
from clinfed.common.config import resolve
from clinfed.common.model_cache import LoadedModel, model_key
from clinfed.common.policy import PolicyError, effective, load_site_policy, site_policy_from_dict
from clinfed.common.privacy import ALLOWED_METRIC_KEYS
from clinfed.common.ranks import pad_update, rank_shapes, site_alpha, state_rank, truncate
from clinfed.server.aggregation import aggregate, make_strategy
from clinfed.server.messaging import SiteMessaging

A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight"


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _state(rank, seed, d=6):
    rng = np.random.default_rng(seed)
    return {A: rng.normal(size=(rank, d)).astype(np.float32), B: rng.normal(size=(d, rank)).astype(np.float32),
            HEAD: rng.normal(size=(2, d)).astype(np.float32)}


def _reply(state, n=10, node=1):
    content = RecordDict({protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
                          protocol.METRICS: MetricRecord({"num-examples": n})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=protocol.TRAIN))


def _rec(state):
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def test_equal_ranks_aggregate_exactly_as_fedavg():
    start = _state(8, 0)
    sites = [_state(8, s) for s in (1, 2, 3)]
    ours, _ = aggregate(make_strategy(resolve({}), 3), 1, [_reply(s, n) for s, n in zip(sites, (5, 7, 11))],
                        _rec(start))
    plain, _ = FedAvg().aggregate_train(1, [_reply(s, n) for s, n in zip(sites, (5, 7, 11))])
    for k in start:
        np.testing.assert_array_equal(ours[k].numpy(), plain[k].numpy())


def test_truncation_and_padding_shapes_and_values():
    full = _state(8, 0)
    small = truncate(full, 2)
    assert small[A].shape == (2, 6) and small[B].shape == (6, 2) and small[HEAD].shape == (2, 6)
    np.testing.assert_array_equal(small[A], full[A][:2])
    np.testing.assert_array_equal(small[B], full[B][:, :2])
    assert rank_shapes({k: v.shape for k, v in full.items()}, 2) == {k: v.shape for k, v in small.items()}
    assert state_rank(small) == 2 and state_rank(full) == 8
    # a rank-2 site's update, widened from the round's start: its 2 components, the start's others
    update = {k: v + 1.0 for k, v in small.items()}
    wide = pad_update(update, full)
    assert {k: v.shape for k, v in wide.items()} == {k: v.shape for k, v in full.items()}
    np.testing.assert_array_equal(wide[A][:2], update[A])
    np.testing.assert_array_equal(wide[A][2:], full[A][2:])
    np.testing.assert_array_equal(wide[B][:, 2:], full[B][:, 2:])
    np.testing.assert_array_equal(truncate(wide, 2)[B], update[B])
    with pytest.raises(ValueError, match="not a LoRA"):
        pad_update({**update, HEAD: np.zeros((3, 6), np.float32)}, full)


def test_mixed_ranks_aggregate_componentwise():
    """Components every site holds are FedAvg of all; the others move only by the full-rank sites'
    updates (the capped site's update there is zero), diluted by its weight."""
    start = _state(4, 0)
    full_site = {k: v + 1.0 for k, v in start.items()}
    capped = {k: v - 1.0 for k, v in truncate(start, 1).items()}
    new, used = aggregate(make_strategy(resolve({}), 2), 1, [_reply(full_site, 30), _reply(capped, 10)],
                          _rec(start))
    assert used[1].content[protocol.ARRAYS][A].numpy().shape == (4, 6)
    a = new[A].numpy()
    np.testing.assert_allclose(a[:1], start[A][:1] + 0.75 * 1.0 + 0.25 * -1.0, rtol=1e-6)
    np.testing.assert_allclose(a[1:], start[A][1:] + 0.75 * 1.0, rtol=1e-6)
    np.testing.assert_allclose(new[HEAD].numpy(), start[HEAD] + 0.5, rtol=1e-6)


def test_a_capped_model_is_the_truncated_adapter_exactly():
    """alpha scales with the rank (alpha/r is the study's), so a rank-8 adapter whose components
    beyond 2 are zero scores the same at a site capped at rank 2 as at a rank-8 site."""
    cfg = resolve({"model": "tiny-bert"})
    key = model_key(cfg, max_lora_rank=2)
    assert key.lora.rank == 2 and key.lora.alpha == site_alpha(16, 8, 2) == 4.0 and key.lora.study_rank == 8
    assert model_key(cfg, max_lora_rank=64) == model_key(cfg)  # a cap above the study's changes nothing
    full, capped = LoadedModel(model_key(cfg)), LoadedModel(key)
    rng = np.random.default_rng(0)
    state = {k: v + rng.normal(scale=0.5, size=v.shape).astype(np.float32) for k, v in full.init_state.items()}
    for k in state:
        if ".lora_B." in k:
            state[k][:, 2:] = 0.0
    ids = full.tokenizer(["patient discharged home after three days"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = full.use(state).eval()(input_ids=ids).logits.numpy()
        b = capped.use(state).eval()(input_ids=ids).logits.numpy()  # arrives at rank 8, used at rank 2
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # the check can fail: with the study's alpha kept at rank 2 (scale alpha/2, not alpha/8) they differ
        for m in capped.model.modules():
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling:
                m.scaling["default"] *= 4
        c = capped.model(input_ids=ids).logits.numpy()
    assert not np.allclose(a, c, rtol=1e-3)


def test_policy_key_and_describe_allow_list(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("max-lora-rank = 2\n")
    pol = effective(resolve({}), load_site_policy(path))
    assert pol.max_lora_rank == 2 and pol.to_metrics()["policy/max-lora-rank"] == 2
    assert effective(resolve({})).max_lora_rank == 0
    with pytest.raises(PolicyError, match="max-lora-rank"):
        site_policy_from_dict({"max-lora-rank": 0})
    assert any(p.fullmatch("policy/max-lora-rank") for p in ALLOWED_METRIC_KEYS)


class _Checker(SiteMessaging):
    def __init__(self):
        self.errors, self.phase_failures = [], {}


def test_update_checks_accept_the_declared_rank_only():
    ref = _state(8, 0)
    ok = {"big": _reply(_state(8, 1)), "small": _reply(truncate(_state(8, 2), 2)),
          "liar": _reply(truncate(_state(8, 3), 4)), "sneaky": _reply(truncate(_state(8, 4), 2))}
    kept = _Checker()._checked(ok, ref, "global round 1", ranks={"small": 2, "liar": 2})
    assert set(kept) == {"big", "small"}
    # a site at rank 4 that declared 2, and a site that declared no cap but sent rank 2, are rejected
    c = _Checker()
    c._checked(ok, ref, "r", ranks={"small": 2, "liar": 2})
    assert set(c.phase_failures["r"]) == {"liar", "sneaky"}
    # a capped site still cannot change the head's shape
    bad = truncate(_state(8, 5), 2)
    bad[HEAD] = np.zeros((3, 6), np.float32)
    assert _Checker()._checked({"small": _reply(bad)}, ref, "r", ranks={"small": 2}) == {}


def test_a_study_with_a_rank_capped_site(small_federation, tmp_path):
    """One hospital's policy caps its rank at 2 (the study's is 8): the study completes, the site
    is sent and sends fewer bytes, and every adapter it and the server saved loads with PEFT."""
    from peft import PeftModel

    from clinfed.common.data import list_sites
    from clinfed.common.models import load_classifier
    from clinfed.server.study import Study
    from clinfed.simulations.app import app as client_app
    from clinfed.simulations.inprocess import LocalGrid, simulated_nodes

    data = tmp_path / "fed"
    shutil.copytree(small_federation, data, ignore=shutil.ignore_patterns("clinfed-out"))
    capped = list_sites(data)[2][0]
    with open(data / capped / "clinfed-policy.toml", "a") as fh:
        fh.write("max-lora-rank = 2\n")
    cfg = resolve({"model": "tiny-bert", "data-dir": str(data), "num-server-rounds": 2, "local-steps": 3,
                   "personalize-steps": 2, "bootstrap": 20, "min-cell-size": 5, "batch-size": 8,
                   "subgroups": False, "regimes": "global,local,personalized,similarity-weighted",
                   "report": False, "strategy": "fedadam"})
    run_dir = tmp_path / "run"
    Study(LocalGrid(client_app, simulated_nodes(3), cfg), cfg, run_dir).execute()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and not run["errors"], run["errors"]
    assert run["lora_ranks"]["sites"] == {capped: 2} and run["site_policies"][capped]["max_lora_rank"] == 2
    for rnd in run["rounds"]:
        b = rnd["site_bytes"]
        others = [s for s in b if s != capped]
        assert all(b[capped][d] < b[s][d] for s in others for d in ("sent", "received")), b
        assert set(rnd["site_costs"]) == set(b) and capped in rnd["sites"]
    base, _ = load_classifier("tiny-bert", 0)
    folders = {"global": run_dir / "adapters" / "global" / "final"}
    folders.update({r: run_dir / "sites" / capped / "adapters" / r for r in ("local", "personalized",
                                                                           "similarity-weighted")})
    ranks = {}
    for name, folder in folders.items():
        model = PeftModel.from_pretrained(base, folder)
        ranks[name] = {m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and m.r}
        base = model.unload()
    assert ranks == {"global": {8}, "local": {2}, "personalized": {2}, "similarity-weighted": {2}}
    df = __import__("pandas").read_csv(run_dir / "metrics.csv")
    assert {"global", "local", "personalized"} <= set(df[(df.site == capped) & (df.metric == "auc")]["regime"])
