"""Benchmarks' smoke configurations: they run and write their headline figures.

Not timed tests: nothing here asserts a speed, only that each benchmark still
runs end to end (tiny random models, few steps, 2 sites) and that the JSON's
headline keys exist and are finite, so the benchmarks do not rot.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bench(name: str, tmp_path) -> dict:
    from clinfed.simulations.bench import SMOKE, run

    out = tmp_path / f"{name}.json"
    doc = run(name, dict(SMOKE[name]), str(out), smoke=True)
    on_disk = json.loads(out.read_text())
    assert on_disk["benchmark"] == name and on_disk["smoke"] is True
    assert on_disk["machine"]["cores"] >= 1 and on_disk["versions"]["torch"]
    assert len(on_disk["machine"]["load_average"]) == 3
    return doc


def test_throughput_smoke(tmp_path):
    doc = _bench("throughput", tmp_path)
    for key in ("ratio", "samples_ratio", "tokens_per_s", "naive_tokens_per_s", "trainer_best_tokens_per_s", "ratio_vs_naive_trainer", "ratio_bf16_vs_fp32_loop"):
        assert _finite(doc[key]) and doc[key] > 0, key
    # every arm counted only real tokens; the naive Trainer padded more than the Trainer at its best
    arms = doc["arms"]
    assert all(arms[a][0]["tokens"] > 0 for a in ("clinfed", "trainer-best", "trainer-naive"))
    assert arms["trainer-naive"][0]["slots"] >= arms["trainer-best"][0]["slots"]
    assert _finite(doc["scoring"]["ratio"])
    # the levers asked for ran as arms of their own, measured against clinfed's loop
    assert set(doc["lever_ratios"]) == {"nodrop", "fused"}
    assert all(_finite(v) and v > 0 for v in doc["lever_ratios"].values())
    assert arms["clinfed-fused"][0]["tokens"] > 0
    roof = doc["roofline"]  # counted operations, not a constant: a tiny model does far fewer per token
    assert roof["flops_per_token"] > 0 and 0 < roof["fraction_of_matmul_rate"] and roof["matmul_gflops"] > 0


def test_comm_smoke(tmp_path):
    doc = _bench("comm", tmp_path)
    assert _finite(doc["fraction_of_full_model"]) and 0 < doc["fraction_of_full_model"] < 1
    assert doc["fraction_of_full_model_fp16"] < doc["fraction_of_full_model"]
    ranks = {v["rank"] for v in doc["per_rank"].values()}
    assert len(ranks) == 3 and doc["default_rank"] in ranks  # the default and two others
    assert _finite(doc["fp16_round_trip"]["auc difference"])


def test_generative_smoke(tmp_path):
    doc = _bench("generative", tmp_path)
    for key in ("sft_tokens_per_s", "sft_step_s", "dpo_tokens_per_s", "dpo_step_s"):
        assert _finite(doc[key]) and doc[key] > 0, key


def test_evaluation_smoke(tmp_path):
    doc = _bench("evaluation", tmp_path)
    assert set(doc["speedup"]) == {"60"} and _finite(doc["speedup"]["60"]) and doc["speedup"]["60"] > 0


@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    doc = _bench("overhead", tmp_path)
    assert _finite(doc["ratio"]) and doc["ratio"] > 0
    assert _finite(doc["simulated_wall_s"]) and _finite(doc["inprocess_wall_s"])
    assert doc["breakdown"][-1]["part"] == "total"
    # the fair baseline ran the two sites side by side, one thread each, as the simulation does;
    # the old baseline (one site at a time with every core) ran too, for the lever's ratio
    assert doc["settings"]["sites_side_by_side"] == 2 and doc["settings"]["threads_per_site"] == 1
    assert _finite(doc["side_by_side_speedup"]) and doc["serial_inprocess_s"] > 0


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    from clinfed.simulations.bench import SMOKE, run

    fig = tmp_path / "scale.png"
    doc = run("scale", {**SMOKE["scale"], "figure": str(fig)}, str(tmp_path / "scale.json"), smoke=True)
    assert set(doc["peak_rss_mb"]) == {"2"}
    assert all(_finite(v) and v > 0 for v in doc["peak_rss_mb"].values())
    assert doc["rows"][0]["processes"] >= 2  # the study's tree, not just the launcher
    # the grid: every number of sites with every notes factor, the local adapters shared
    assert sorted((r["sites"], r["notes per site"]) for r in doc["rows"]) == [(2, 60), (2, 120)]
    assert doc["settings"]["share-local-adapters"] is True
    assert _finite(doc["growth_exponents"]["wall ~ notes per site (2 sites)"])
    assert fig.stat().st_size > 1000 and fig.read_bytes()[:4] == b"\x89PNG"


def test_growth_exponents_read_the_slope_on_log_log_axes():
    from clinfed.simulations.bench import growth_exponents

    rows = [{"sites": n, "notes per site": 60 * f, "notes x": f, "wall s": 3.0 * n * n * f,
             "evaluate s": 0.5 * n * n * f, "peak RSS MB": 1000.0 + 0 * n} for n in (5, 20, 50) for f in (1, 4)]
    got = growth_exponents(rows)
    assert got["wall ~ sites (notes x1)"] == pytest.approx(2.0)
    assert got["wall ~ notes per site (20 sites)"] == pytest.approx(1.0)
    assert got["peak ~ sites (notes x4)"] == pytest.approx(0.0)


def test_clinfed_bench_command_parses_and_refuses_unknown_names():
    from clinfed.cli.main import build_parser

    args = build_parser().parse_args(["bench", "comm", "--smoke", "--json", "x.json", "--ranks", "2,4"])
    assert args.name == "comm" and args.smoke and args.ranks == (2, 4)
    res = subprocess.run([sys.executable, "-m", "clinfed.cli", "bench", "nope"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_contention_smoke(small_federation, capsys):
    """The contention measurement behind the overhead's profile runs and reports both arms."""
    from clinfed.simulations.contention import main, measure

    name = sorted(p.name for p in small_federation.iterdir() if p.is_dir())[0]
    got = measure(threads=1, steps=2, repeats=1, site=name, model="tiny-bert", data_dir=str(small_federation))
    assert got["quiet_s"] > 0 and got["loaded_s"] > 0 and _finite(got["slowdown"])
    assert len(got["runs_s"]["quiet"]) == len(got["runs_s"]["loaded"]) == 1
    assert main(["--model", "tiny-bert", "--data", str(small_federation), "--site", name, "--steps", "2",
                 "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "slowdown" in out and "quiet" in out and "loaded" in out and "cores" in out


def test_gpu_smoke_runs_lora_and_qlora_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    doc = _bench("gpu", tmp_path)
    modes = {(r["stage"], r["mode"]) for r in doc["rows"]}
    assert modes == {("sft", "lora-fp32"), ("sft", "qlora-4bit"), ("dpo", "lora-fp32"), ("dpo", "qlora-4bit")}
    for r in doc["rows"]:
        assert _finite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and r["peak_mb"] > 0
    assert _finite(doc["qlora_lora_tokens_ratio"]) and len(doc["ratios"]) == 2
    assert "bitsandbytes" in doc["quantization_versions"]


def test_gpu_bench_builds_4bit_layers_without_a_full_precision_model():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    from clinfed.simulations.gpu_bench import gpu, random_llama

    model = random_llama("tiny", "4bit", "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of both blocks, quantized as built
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == 512
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            gpu(shapes=("1b",), device="auto")
