"""Site policies in a whole study (in process): a metrics-only site sends nothing
adapter-shaped yet is trained at home and evaluated; a site that requires DP refuses a
study without it, and the refusal reaches the report; Flower's DP wrapper is wired."""

import json

import numpy as np
import pandas as pd
import pytest

from clinfed.simulations.app import app as client_app
from clinfed.common.config import resolve
from clinfed.common.data import list_sites
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from clinfed.server.study import Study

BASE = {"model": "tiny-bert", "num-server-rounds": 2, "local-steps": 3, "personalize-steps": 2, "bootstrap": 10,
        "min-cell-size": 5, "batch-size": 8, "regimes": "base,global,local,personalized,similarity-weighted",
        "subgroups": False}


@pytest.fixture(scope="module")
def metrics_only(small_federation, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mo")
    sites = list_sites(small_federation)
    policy = tmp / "policy.toml"
    policy.write_text("allow-adapters = false\nmin-cell-size = 7\n")
    nodes = simulated_nodes(len(sites))
    nodes[1]["policy-path"] = str(policy)
    # the study asks for shared local adapters and noised updates; the site's policy still wins
    cfg = resolve({**BASE, "data-dir": str(small_federation), "share-local-adapters": True,
                   "update-dp-noise": 0.01, "update-dp-clip": 1e-3})
    grid = LocalGrid(client_app, nodes, cfg)
    Study(grid, cfg, tmp / "run").execute()
    return {"grid": grid, "run_dir": tmp / "run", "site": sites[1][0], "node": 1001, "sites": [s for s, _ in sites]}


def test_a_metrics_only_site_sends_nothing_adapter_shaped(metrics_only):
    grid, node = metrics_only["grid"], metrics_only["node"]
    assert not [m for m in grid.sent if m.metadata.dst_node_id == node and m.metadata.message_type == "train"]
    mine = [r for r in grid.replies if r.metadata.src_node_id == node]
    assert [r.metadata.message_type for r in mine] == ["query.describe", "train.personalize", "evaluate"]
    for rep in grid.replies:  # audit every reply of every site
        assert not rep.has_error(), rep.error.reason
        if rep.metadata.src_node_id == node:
            assert not rep.content.array_records, rep.metadata.message_type
        elif rep.content.array_records:
            assert rep.metadata.message_type in ("train", "train.personalize")
    describe = next(r for r in mine if r.metadata.message_type == "query.describe")
    released = dict(describe.content["metrics"])
    assert released["policy/allow-adapters"] == 0 and released["policy/share-local-adapters"] == 0
    assert released["policy/min-cell-size"] == 7 and released["policy/site-file"] == 1


def test_a_metrics_only_site_is_trained_at_home_and_evaluated(metrics_only):
    run_dir, site = metrics_only["run_dir"], metrics_only["site"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and not run["errors"]
    assert run["metrics_only"] == {"global": [site]}
    for r in run["rounds"]:  # left out of aggregation, and not as a failure
        assert site not in r["sites"] and site not in r["failures"]
    assert run["site_policies"][site]["allow_adapters"] is False
    assert run["site_policies"][site]["min_cell_size"] == 7
    others = [s for s in metrics_only["sites"] if s != site]
    assert all(run["site_policies"][s]["allow_adapters"] for s in others)
    for regime in ("local", "personalized", "similarity-weighted"):
        assert (run_dir / "sites" / site / "adapters" / regime / "adapter_config.json").exists()
    df = pd.read_csv(run_dir / "metrics.csv")
    auc = df[(df.site == site) & (df.metric == "auc") & (df.subgroup == "all")]
    assert {"base", "global", "local", "personalized", "similarity-weighted"} <= set(auc["regime"])
    # its local adapter never left, so nobody scores it; the others' shared ones are scored there
    assert f"local@{site}" not in set(df["regime"])
    assert {f"local@{s}" for s in others} <= set(auc["regime"])
    html = (run_dir / "report.html").read_text()
    assert "<h2>Privacy</h2>" in html and f"Metrics-only sites (no adapter leaves; trained at home, evaluated): {site}" in html


def test_update_dp_clips_what_the_server_averages(metrics_only):
    """With update-dp-clip = 1e-3 each round's global adapter moves at most ~1e-3 from the last."""
    from clinfed.common.models import LoraSettings, make_lora_model
    from clinfed.common.adapters import adapter_state, read_adapter

    run_dir = metrics_only["run_dir"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["update_dp"]["global"]["clipping_norm"] == 1e-3 and run["update_dp"]["global"]["epsilon"] > 0
    model = make_lora_model("tiny-bert", 0, LoraSettings())[0]
    prev = adapter_state(model)
    for rnd in (1, 2):
        cur = read_adapter(model, run_dir / "adapters" / "global" / f"round-{rnd:03d}")
        step = np.sqrt(sum(float(((cur[k] - prev[k]) ** 2).sum()) for k in cur))
        assert 0 < step < 1.5e-3, (rnd, step)
        prev = cur


def test_the_site_refuses_a_train_message_its_policy_forbids(metrics_only):
    """A server that ignores the reported policy gets an error without data, never arrays."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from clinfed.common.models import LoraSettings, make_lora_model
    from clinfed.common.adapters import adapter_state

    grid, node = metrics_only["grid"], metrics_only["node"]
    init = adapter_state(make_lora_model("tiny-bert", 0, LoraSettings())[0])
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in init.items()}),
                              "config": ConfigRecord({"run-dir": str(metrics_only["run_dir"].resolve()),
                                                      "server-round": 9})}),
                  dst_node_id=node, message_type="train")
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error()  # an error reply carries no content at all
    assert "metrics-only (allow-adapters = false)" in reply.error.reason


def test_a_site_requiring_dp_refuses_a_study_without_it(small_federation, tmp_path):
    sites = list_sites(small_federation)
    policy = tmp_path / "policy.toml"
    policy.write_text("dp-required = true\nmin-cell-size = 5\n")
    nodes = simulated_nodes(len(sites))
    nodes[0]["policy-path"] = str(policy)
    cfg = resolve({**BASE, "data-dir": str(small_federation), "num-server-rounds": 1,
                   "regimes": "base,global,local"})
    grid = LocalGrid(client_app, nodes, cfg)
    Study(grid, cfg, tmp_path / "run").execute()
    site = sites[0][0]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed"
    assert "requires DP-SGD" in run["rounds"][0]["failures"][site]
    assert "requires DP-SGD" in run["failures"]["personalize"][site]
    assert run["site_policies"][site]["dp_required"] is True
    for rep in grid.replies:
        if rep.metadata.src_node_id == 1000 and rep.metadata.message_type.startswith("train"):
            assert rep.has_error()
    df = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(df[df.site == site]["regime"]) == {"base", "global"}  # still evaluated, nothing trained there
    html = (tmp_path / "run" / "report.html").read_text()
    assert "the site&#x27;s policy requires DP-SGD" in html and site in html
