"""Throughput per site in run.json: tokens per second of every training call (federated rounds and
the site-held regimes), and peak GPU memory only where a GPU trained (absent on CPU)."""

import json
import math

from clinfed.common.config import resolve
from clinfed.common.data import list_sites


def test_run_json_keeps_tokens_per_second_per_site_and_round(small_federation, tmp_path):
    from clinfed.server.study import Study
    from clinfed.simulations.app import app as client_app
    from clinfed.simulations.inprocess import LocalGrid, simulated_nodes

    sites = list_sites(small_federation)
    cfg = resolve({"report": False, "model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 2,
                   "local-steps": 2, "personalize-steps": 1, "local-regime-steps": 2, "bootstrap": 10,
                   "min-cell-size": 5, "batch-size": 8, "regimes": "base,global,local,personalized",
                   "subgroups": False, "drivers": False})
    Study(LocalGrid(client_app, simulated_nodes(len(sites)), cfg), cfg, tmp_path / "run").execute()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed" and not run["errors"]
    trained = [r for r in run["rounds"] if r["phase"] == "global"]
    assert len(trained) == 2
    for r in trained:
        assert len(r["site_costs"]) == len(sites)
        for costs in r["site_costs"].values():
            assert math.isfinite(costs["tokens_per_s"]) and costs["tokens_per_s"] > 0
            # tokens/s is the call's own tokens over its own seconds, not a made-up figure
            assert costs["tokens_per_s"] * costs["train_seconds"] > 8  # 2 steps x 8 notes, many tokens each
            assert "peak_gpu_mb" not in costs  # CPU: no GPU figure at all
            assert costs["quantization_bits"] == 0 and costs["gradient_checkpointing"] == 0
    held = run["site_held"]
    assert set(held) == {name for name, _ in sites}
    for figures in held.values():
        for regime in ("local", "personalized"):
            assert math.isfinite(figures[f"{regime}-train-tokens-per-s"]) and figures[f"{regime}-train-tokens-per-s"] > 0
        assert not any(k.endswith("peak-gpu-mb") for k in figures)


def test_a_training_call_reports_its_throughput():
    import numpy as np

    from clinfed.common.models import LoraSettings, make_lora_model
    from clinfed.common.training import TrainSettings, encode_texts, train_classifier

    model, tok = make_lora_model("tiny-bert", 0, LoraSettings(rank=4))
    enc = encode_texts(tok, ["patient admitted with chf", "stable discharged home"] * 8, 32)
    info = train_classifier(model, enc, np.array([1, 0] * 8), TrainSettings(steps=2, batch_size=4, device="cpu"),
                            tok.pad_token_id)
    assert info["tokens_per_s"] == info["tokens"] / info["seconds"] and info["tokens_per_s"] > 0
    assert "peak_gpu_mb" not in info


def test_throughput_may_leave_the_site():
    from clinfed.client.classifier_handlers import fit_metrics
    from clinfed.common.privacy import ALLOWED_METRIC_KEYS

    got = {**fit_metrics({"tokens_per_s": 1234.5, "peak_gpu_mb": 2048.0, "quantization_bits": 4,
                          "gradient_checkpointing": 1}),
           **fit_metrics({"tokens_per_s": 99.0, "peak_gpu_mb": 10.0}, prefix="personalized-")}
    assert got["train-tokens-per-s"] == 1234.5 and got["personalized-train-peak-gpu-mb"] == 10.0
    assert all(any(p.fullmatch(k) for p in ALLOWED_METRIC_KEYS) for k in got), got
    assert not any(p.fullmatch("train-tokens-per-patient") for p in ALLOWED_METRIC_KEYS)
