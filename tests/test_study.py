"""End to end with a tiny model, in process: every site x regime row, and an audit
of every message the sites sent (adapter arrays and aggregate metrics only)."""

import json

import pandas as pd
import pytest
from flwr.common.serde import message_to_proto

from clinfed.simulations.app import app as client_app
from clinfed.common.config import resolve
from clinfed.common.data import list_sites, read_site_table
from clinfed.common.metrics import PREFIX
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from helpers import canary_federation
from clinfed.server.study import Study

REGIMES = {"base", "global", "local", "personalized", "cluster", "similarity-weighted", "augmented"}


@pytest.fixture(scope="module")
def study(small_federation, tmp_path_factory):
    data = canary_federation(small_federation, tmp_path_factory.mktemp("canary") / "fed")
    run_dir = tmp_path_factory.mktemp("run")
    cfg = resolve({"model": "tiny-bert", "data-dir": str(data), "num-server-rounds": 2, "local-steps": 4,
                   "personalize-steps": 2, "bootstrap": 30, "min-cell-size": 5, "batch-size": 8,
                   "share-local-adapters": True, "augment-k": 30})
    sites = list_sites(data)
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    Study(grid, cfg, run_dir).execute()
    return {"grid": grid, "run_dir": run_dir, "data": data, "sites": [s for s, _ in sites], "cfg": cfg}


def test_every_site_and_regime_has_rows(study):
    df = pd.read_csv(study["run_dir"] / "metrics.csv")
    assert set(df["site"]) == set(study["sites"])
    for site in study["sites"]:
        for split in ("test", "temporal"):
            got = set(df[(df.site == site) & (df.split == split) & (df.metric == "auc")]["regime"])
            cross = {f"local@{s}" for s in study["sites"]} | {"cluster@c0", "cluster@c1"}
            assert got == REGIMES | cross, (site, split, got)
    # subgroup cells exist for the main regimes, not for cross-site ones
    sub = df[df.subgroup != "all"]
    assert {"age=80+", "comorbidity=5+", "insurance=government", "words=q2"} <= set(sub["subgroup"])
    assert not sub["regime"].str.contains("@").any()
    ok = df[(df.status == "ok") & (df.metric == "auc")]
    assert len(ok) > 0 and ok["value"].between(0, 1).all()
    assert (df[df.status == "suppressed"]["value"].isna()).all()
    assert (df[df.status == "suppressed"]["n"].isna()).all()


def test_outputs_written(study):
    run_dir = study["run_dir"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    assert [r["phase"] for r in run["rounds"]] == ["global", "global", "cluster", "cluster"]
    assert set(run["clusters"]["assignment"]) == set(study["sites"])
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in run["rounds"])
    assert (run_dir / "report.html").exists() and (run_dir / "sites.csv").exists()
    for rnd in (1, 2):
        assert (run_dir / "adapters" / "global" / f"round-{rnd:03d}" / "adapter_model.safetensors").exists()
    for site in study["sites"]:  # local adapters stay in the site's own folder
        for regime in ("local", "personalized"):
            assert (run_dir / "sites" / site / "adapters" / regime / "adapter_config.json").exists()


def test_sites_sent_adapter_arrays_and_aggregates_only(study):
    grid = study["grid"]
    replies = grid.replies
    # describe, 2 global rounds, 2 cluster rounds, personalize, evaluate
    assert len(replies) == len(study["sites"]) * (1 + 2 + 2 + 1 + 1)
    ids, dates = set(), set()
    for _, folder in list_sites(study["data"]):
        df = read_site_table(folder, warn=False)
        ids.update(df["encounter_id"])
        dates.update(df["discharge_date"].dt.strftime("%Y-%m-%d"))
    from clinfed.common.models import LoraSettings, make_lora_model
    from clinfed.common.adapters import adapter_state

    adapter_keys = set(adapter_state(make_lora_model("tiny-bert", 0, LoraSettings())[0]))
    for rep in replies:
        assert not rep.has_error(), rep.error.reason
        raw = message_to_proto(rep).SerializeToString()
        assert b"CANARY" not in raw, "note text left a site"
        for ident in list(ids)[:200]:
            assert ident.encode() not in raw, f"encounter id {ident} left a site"
        for d in list(dates)[:100]:
            assert d.encode() not in raw, "a discharge date left a site"
        content = rep.content
        mtype = rep.metadata.message_type
        assert set(content.array_records) <= {"arrays"}
        if content.array_records:
            assert mtype in ("train", "train.personalize")
            assert set(content["arrays"].keys()) == adapter_keys, "only the adapter + head may leave"
        assert set(content.metric_records) <= {"metrics"}
        for key, val in content["metrics"].items() if "metrics" in content.metric_records else []:
            assert isinstance(val, (int, float)), f"{key} is not a scalar"
        assert set(content.config_records) <= ({"site"} if mtype == "query.describe" else set())


def test_suppressed_cells_release_nothing(study):
    k = study["cfg"]["min-cell-size"]
    for rep in study["grid"].replies:
        if rep.metadata.message_type != "evaluate":
            continue
        m = dict(rep.content["metrics"])
        cells = {}
        for key, v in m.items():
            if key.startswith(PREFIX):
                cell, metric = key.rsplit("/", 1)
                cells.setdefault(cell, {})[metric] = v
        for cell, vals in cells.items():
            if "suppressed" in vals:
                assert vals == {"suppressed": 1}
            else:
                assert vals["n"] >= k and vals.get("positives", k) >= k


def test_a_failing_site_does_not_stop_the_study(small_federation, tmp_path):
    sites = list_sites(small_federation)
    cfg = resolve({"model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 2,
                   "local-steps": 2, "personalize-steps": 1, "bootstrap": 10, "min-cell-size": 5})
    drop = lambda node, msg: node == 1002 and msg.metadata.message_type == "train"  # noqa: E731
    grid = LocalGrid(client_app, simulated_nodes(len(sites)),
                     cfg, fail=drop)
    Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "completed"
    missing = sites[2][0]
    assert all(missing in r["failures"] and missing not in r["sites"] for r in run["rounds"])
    assert any(missing in e for e in run["errors"])


def test_a_tampered_update_is_rejected_and_the_site_named(small_federation, tmp_path):
    """A site whose update has a NaN is left out of aggregation, and the run says which."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    sites = list_sites(small_federation)
    cfg = resolve({"model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 1,
                   "local-steps": 2, "personalize-steps": 1, "bootstrap": 10, "min-cell-size": 5,
                   "regimes": "base,global,local"})

    def tamper(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 1:
            arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
            key = next(iter(arrays))
            arrays[key][...] = np.nan
            content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  "metrics": reply.content["metrics"]})
            return Message(content, reply_to=msg)
        return reply


    class Tampered:
        def __call__(self, msg, ctx):
            return tamper(msg, ctx, client_app)

    grid = LocalGrid(Tampered(), simulated_nodes(len(sites)), cfg)
    Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    bad = sites[1][0]
    assert bad not in run["rounds"][0]["sites"]
    assert "non-finite" in run["rounds"][0]["failures"][bad]
    assert run["status"] == "completed"


def test_deployment_nodes_read_data_path_and_refuse_augmented(small_federation, tmp_path):
    """A node configured like a hospital's SuperNode (data-path, site, output-path) keeps its
    adapters in its own folder and never runs the record-moving `augmented` regime."""
    sites = list_sites(small_federation)
    cfg = resolve({"model": "tiny-bert", "num-server-rounds": 1, "local-steps": 2, "personalize-steps": 1,
                   "bootstrap": 10, "min-cell-size": 5, "regimes": "base,global,local,augmented"})
    nodes = [{"data-path": str(folder), "site": name, "output-path": str(tmp_path / "hosp" / name),
              "policy-path": str(folder / "clinfed-policy.toml")}  # each hospital's file: k = 5
             for name, folder in sites]
    grid = LocalGrid(client_app, nodes, cfg)
    Study(grid, cfg, tmp_path / "run").execute()
    df = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(df["regime"]) == {"base", "global", "local"}
    for name, _ in sites:
        assert (tmp_path / "hosp" / name / "adapters" / "local" / "adapter_config.json").exists()
        assert not (tmp_path / "hosp" / name / "adapters" / "augmented").exists()
    assert not (tmp_path / "run" / "sites").exists(), "a deployed site's files must stay at the site"


def test_an_outsized_update_is_rejected_and_the_site_named(small_federation, tmp_path):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from clinfed.common.adapters import wire_hash

    sites = list_sites(small_federation)
    cfg = resolve({"model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 1,
                   "local-steps": 2, "personalize-steps": 1, "bootstrap": 10, "min-cell-size": 5,
                   "regimes": "base,global,local"})

    class Scaled:
        def __call__(self, msg, ctx):
            reply = client_app(msg, ctx)
            if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0:
                arrays = {k: v.numpy() * 1000.0 for k, v in reply.content["arrays"].items()}
                # a hostile site signs what it sends: only the size check can catch it
                metrics = MetricRecord({**dict(reply.content["metrics"]), "adapter-hash": wire_hash(arrays)})
                return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                           "metrics": metrics}), reply_to=msg)
            return reply

    grid = LocalGrid(Scaled(), simulated_nodes(len(sites)), cfg)
    Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    big = sites[0][0]
    assert big not in run["rounds"][0]["sites"]
    assert "far outside" in run["rounds"][0]["failures"][big]


def test_an_update_changed_in_transit_or_for_another_base_is_rejected(small_federation, tmp_path):
    """The site hashes what it sends; arrays that arrive different (here: one value nudged
    after hashing) are refused, naming the site. A site whose base model differs from the
    server's refuses the round."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    sites = list_sites(small_federation)
    cfg = resolve({"model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 1,
                   "local-steps": 2, "personalize-steps": 1, "bootstrap": 10, "min-cell-size": 5,
                   "regimes": "base,global,local", "min-sites": 1})

    class InTransit:
        def __call__(self, msg, ctx):
            pid = ctx.node_config["partition-id"]
            if msg.metadata.message_type == "train" and pid == 2:
                msg.content["config"]["base-model"] = "some-other-model@0"
            reply = client_app(msg, ctx)
            if msg.metadata.message_type == "train" and pid == 1:
                arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
                key = next(iter(arrays))
                arrays[key].flat[0] += 1e-3
                return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                           "metrics": reply.content["metrics"]}), reply_to=msg)
            return reply

    grid = LocalGrid(InTransit(), simulated_nodes(len(sites)), cfg)
    Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    changed, other_base = sites[1][0], sites[2][0]
    assert run["rounds"][0]["sites"] == [sites[0][0]]
    assert "changed in transit" in run["rounds"][0]["failures"][changed]
    assert "base model" in run["rounds"][0]["failures"][other_base]


def test_differences_are_paired_on_the_released_cells(study):
    """differences.csv: each released site difference is AUC(regime) - AUC(reference) of the two
    metrics.csv cells of the same patients; suppressed cells give suppressed rows without numbers;
    Holm never lowers a p; pooled rows carry heterogeneity."""
    run_dir = study["run_dir"]
    diff = pd.read_csv(run_dir / "differences.csv")
    met = pd.read_csv(run_dir / "metrics.csv")
    auc = met[met.metric == "auc"].set_index(["site", "regime", "split", "subgroup"])["value"]
    sites = diff[diff.site != "pooled"]
    assert set(sites.site) == set(study["sites"])
    assert {("global", "base"), ("local", "global"), ("personalized", "global"), ("cluster", "global")} <= set(
        zip(diff.regime, diff.reference))
    ok = sites[sites.status == "ok"]
    assert len(ok) >= 10
    for r in ok.itertuples():
        expect = auc[(r.site, r.regime, r.split, r.subgroup)] - auc[(r.site, r.reference, r.split, r.subgroup)]
        assert abs(r.diff - expect) < 1e-9, r
        assert r.lo <= r.diff <= r.hi and 0 <= r.p <= 1 and r.p_adj >= r.p - 1e-12
    sup = diff[diff.status == "suppressed"]
    assert len(sup) > 0 and sup[["diff", "lo", "hi", "p", "n"]].isna().all().all()
    assert set(diff.family) == {"primary", "subgroup"}
    pooled = diff[(diff.site == "pooled") & (diff.status == "ok")]
    assert len(pooled) > 0 and pooled["tau2"].ge(0).all() and pooled["i2"].between(0, 1).all()
    assert (pooled["n_sites"] >= 2).all()
    cal = pd.read_csv(run_dir / "calibration.csv")
    assert {"ece", "bin0_n", "bin9_mean_p"} <= set(cal.metric) and "pooled" in set(cal.site)
    assert cal[cal.status == "suppressed"]["value"].isna().all()
    assert (run_dir / "size_effects.csv").exists() and (run_dir / "subgroup_gaps.csv").exists()
