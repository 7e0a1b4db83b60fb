"""A federated SFT round and a DPO round end to end with a tiny Llama, in process,
and an audit of what the sites sent (adapters and aggregate scores only)."""

import json

import pandas as pd
from flwr.common.serde import message_to_proto

from client.app import app as client_app
from common.config import resolve
from common.data import list_sites
from inprocess_grid import LocalGrid
from server.study import Study


def test_generative_study_sft_then_dpo(small_federation, tmp_path):
    sites = list_sites(small_federation)
    cfg = resolve({"task": "generative", "decoder": "tiny-llama", "data-dir": str(small_federation),
                   "num-server-rounds": 1, "sft-steps": 2, "dpo-rounds": 1, "dpo-steps": 1,
                   "gen-eval-items": 10, "min-cell-size": 5, "gen-batch-size": 4, "gen-max-new-tokens": 8,
                   "gen-max-words": 30})
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))], cfg)
    Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "completed", run["errors"]
    assert [r["phase"] for r in run["rounds"]] == ["sft", "dpo"]
    assert run["rounds"][0]["adapter_hash"]["global-sft"] != run["rounds"][1]["adapter_hash"]["global-dpo"]
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert {"task", "stage"} <= set(df.columns)
    assert set(df["task"]) == {"triage", "extraction", "readmission", "pubmedqa", "meqsum"}
    public = df[df["site"] == "public"]
    assert set(public["task"]) == {"pubmedqa", "meqsum"} and {"rouge_l", "macro_f1"} <= set(public["metric"])
    df = df[df["site"] != "public"]
    cells = set(zip(df["stage"], df["regime"]))
    assert cells == {("base", "base"), ("sft", "global"), ("dpo", "global"), ("sft", "local"), ("dpo", "local"),
                     ("dpo", "personalized")}
    assert {"urgency_f1", "personnel_f1", "f1", "unparseable_share", "auc"} <= set(df["metric"])
    # the adapters load with plain PEFT from the run folder
    assert (tmp_path / "adapters" / "global-dpo" / "final" / "adapter_config.json").exists()
    for name, _ in sites:
        assert (tmp_path / "sites" / name / "adapters" / "local-dpo" / "adapter_config.json").exists()
    report = (tmp_path / "report.html").read_text()
    assert "triage" in report and "dpo: personalized" in report and "pubmedqa" in report
    assert (tmp_path / "tables" / "generative_triage_urgency_f1.csv").exists()
    # audit: only adapters (in SFT/DPO replies) and aggregate numbers left the sites
    for rep in grid.replies:
        assert not rep.has_error(), rep.error.reason
        mtype = rep.metadata.message_type
        if rep.content.array_records:
            assert mtype in ("train.sft", "train.dpo")
        for key, val in (rep.content["metrics"].items() if "metrics" in rep.content.metric_records else []):
            assert isinstance(val, (int, float)), key
        raw = message_to_proto(rep).SerializeToString()
        assert b"h01-" not in raw and b"h02-" not in raw, "an item id left a site"
