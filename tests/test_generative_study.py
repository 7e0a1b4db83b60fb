"""A federated SFT round and a DPO round end to end with a tiny Llama, in process,
and an audit of what the sites sent (adapters and aggregate scores only)."""

import json

import pandas as pd
from flwr.common.serde import message_to_proto

from clinfed.simulations.app import app as client_app
from clinfed.common.config import resolve
from clinfed.common.data import list_sites
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from clinfed.server.generative_study import GenerativeStudy
from clinfed.simulations.generative import probe_items


def test_generative_study_sft_then_dpo(small_federation, tmp_path):
    sites = list_sites(small_federation)
    cfg = resolve({"task": "generative", "decoder": "tiny-llama", "data-dir": str(small_federation),
                   "num-server-rounds": 1, "sft-steps": 2, "dpo-rounds": 1, "dpo-steps": 1,
                   # 20 items: the readmission question is released only with k readmitted and k not
                   "gen-eval-items": 20, "min-cell-size": 5, "gen-batch-size": 4, "gen-max-new-tokens": 8,
                   "gen-max-words": 30, "gen-holdout-task": "readmission", "gen-examples": 2})
    grid = LocalGrid(client_app, simulated_nodes(len(sites)), cfg)
    GenerativeStudy(grid, cfg, tmp_path, probe_items=probe_items).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "completed", run["errors"]
    assert [r["phase"] for r in run["rounds"]] == ["sft", "dpo"]
    for rnd in run["rounds"]:  # each site's SFT and DPO throughput (real tokens per second)
        assert rnd["site_costs"] and all(c["tokens_per_s"] > 0 for c in rnd["site_costs"].values()), rnd["site_costs"]
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
    # leave-one-task-out: readmission was never trained on, and is scored zero-shot
    held = df[df["task"] == "readmission"]
    assert len(held) and (held["note"] == "held out of training: zero-shot").all()
    assert (df[df["task"] != "readmission"]["note"].fillna("") == "").all()
    _reload_with_plain_peft(cfg, tmp_path, sites, pd.read_csv(tmp_path / "metrics.csv"))
    # example generations come from the server's own probe items, never from a site's
    examples = json.loads((tmp_path / "examples.json").read_text())
    assert {e["task"] for e in examples} == {"triage", "extraction"} and len(examples) == 4
    assert all(set(e["outputs"]) == {"base: base", "sft: global", "dpo: global"} for e in examples)
    report = (tmp_path / "report.html").read_text()
    assert "Multi-task effect: readmission held out" in report and "Example generations" in report
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


def _reload_with_plain_peft(cfg, run_dir, sites, df):
    """SFT and DPO adapters saved by the study load with `PeftModel.from_pretrained` on
    the base and reproduce the scores the study reported (server-side and site-side)."""
    from peft import PeftModel

    from clinfed.client.generative_site import GenSite
    from clinfed.common.model_source import load_causal_lm
    from clinfed.common.instruct import generate
    from clinfed.common.public_data import load_public
    from clinfed.common.tasks import TASKS

    def plain(folder):
        base, tok = load_causal_lm("tiny-llama", int(cfg["seed"]))
        return PeftModel.from_pretrained(base, str(folder)).eval(), tok

    checked = 0
    for stage in ("sft", "dpo"):
        model, tok = plain(run_dir / "adapters" / f"global-{stage}" / "final")
        recs = load_public("meqsum", "test", limit=int(cfg["gen-eval-items"]))
        prompts = [TASKS["meqsum"].prompt(r, max_words=int(cfg["gen-max-words"]) * 2) for r in recs]
        gens = generate(model, tok, prompts, max_new_tokens=int(cfg["gen-max-new-tokens"]))
        got = TASKS["meqsum"].score(recs, gens)["rouge_l"]
        want = df[(df["site"] == "public") & (df["task"] == "meqsum") & (df["stage"] == stage)
                  & (df["regime"] == "global") & (df["metric"] == "rouge_l")]["value"]
        assert len(want) == 1 and abs(float(want.iloc[0]) - got) < 1e-9, (stage, got, want)
        checked += 1
    name, folder = sites[0]
    gsite = GenSite(name, folder, folder / "encounters.csv", cfg)
    model, tok = plain(run_dir / "sites" / name / "adapters" / "local-dpo")
    scores = gsite.score_model(model, tok, int(cfg["min-cell-size"]))
    assert scores, "the site scored no task"
    for task, vals in scores.items():
        for metric, value in vals.items():
            want = df[(df["site"] == name) & (df["task"] == task) & (df["stage"] == "dpo") & (df["regime"] == "local")
                      & (df["metric"] == metric)]["value"]
            assert len(want) == 1 and abs(float(want.iloc[0]) - value) < 1e-6, (task, metric, value, want)
            checked += 1
    assert checked > 5
