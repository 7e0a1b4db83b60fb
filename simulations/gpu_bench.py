"""`clinfed bench gpu`: SFT and DPO steps with LoRA and 4-bit QLoRA on random Llama-shaped models.

No weights are downloaded or written: the model is built on torch's `meta` device and
each linear layer is then materialised on the target device one at a time, either as
a random bf16/fp32 `nn.Linear` or directly as a bitsandbytes NF4 `Linear4bit` (the
random bf16 weight of one layer exists only while it is quantized). So an 8B-shaped
model in 4 bits never needs its ~16 GB of full-precision weights anywhere.

The steps are plain loops with the same losses as TRL's trainers (next-token
cross-entropy for SFT; DPO's sigmoid loss against the same model with its adapters
disabled as the reference), so the figures are the model's, not the trainer's.

Full form (`clinfed bench gpu`): needs a CUDA GPU; 1B-shaped Llama (Llama-3.2-1B's
dimensions, untied head): SFT and DPO with bf16 LoRA and 4-bit QLoRA, one fp32 LoRA SFT
block as reference; 8B-shaped Llama (Llama-3.1-8B's dimensions): 4-bit QLoRA SFT only; then
the default classifier study end to end with `clinfed simulate --device cuda` (its wall time and
mean AUCs; stopped after STUDY_TIMEOUT_S so the whole benchmark stays under ten minutes).
`--smoke`: a tiny shape on CPU (fp32 LoRA vs 4-bit QLoRA), seconds, for CI; its
figures say the code runs, not how fast a GPU is. The full form has not yet run:
no GPU was available when it was written (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import time

SHAPES = {
    # name: LlamaConfig dimensions (untied output head in every shape)
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
    "1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, rope_theta=500000.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
}
TARGETS = ["q_proj", "v_proj"]  # clinfed's default decoder targets


def random_llama(shape: str, mode: str, device: str):
    """A random Llama of `shape` on `device`, its linear layers in `mode` (fp32, bf16 or 4bit), built
    layer by layer from the meta device (no full-precision copy of a quantized model ever exists)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    std = cfg.initializer_range
    for module in list(model.modules()):
        for cname, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or cname == "lm_head":
                continue
            weight = torch.randn(child.out_features, child.in_features, dtype=dtype, device=device) * std
            if mode == "4bit":
                import bitsandbytes as bnb

                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(weight.cpu() if device != "cpu" else weight, requires_grad=False,
                                               quant_type="nf4", compress_statistics=True).to(device)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(torch.zeros(child.out_features, device=device), requires_grad=False)
            else:
                new = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device="meta", dtype=dtype)
                new.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device),
                                                  requires_grad=False)
            del weight
            setattr(module, cname, new)
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                norm = "norm" in type(module).__name__.lower()
                value = (torch.ones(param.shape, dtype=dtype, device=device) if norm
                         else torch.randn(param.shape, dtype=dtype, device=device) * std)
                module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    if mode == "4bit":
        model.is_loaded_in_4bit = True  # so PEFT wraps the Linear4bit layers with its 4-bit LoRA layer
    model.config.use_cache = False
    return model


def lora_model(shape: str, mode: str, device: str, rank: int = 16):
    from peft import LoraConfig, get_peft_model

    model = random_llama(shape, mode, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                                            target_modules=TARGETS))
    for name, p in peft.named_parameters():  # LoRA weights in fp32, as clinfed trains them
        if p.requires_grad:
            p.data = p.data.float()
    return peft


def _seq_logps(model, ids):
    """Sum of next-token log-probabilities of each sequence (DPO's policy/reference score)."""
    import torch

    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def sft_step(model, ids, opt):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ids.numel()


def dpo_step(model, ids, opt, beta: float = 0.1):
    """DPO's sigmoid loss on (chosen, rejected) = the two halves of the batch; the reference is
    the same model with its adapters disabled (what TRL does with a PEFT model)."""
    import torch

    half = ids.shape[0] // 2
    with torch.no_grad(), model.disable_adapter():
        ref = _seq_logps(model, ids)
    pol = _seq_logps(model, ids)
    margin = (pol[:half] - ref[:half]) - (pol[half:] - ref[half:])
    loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ids.numel()


def _peak(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(shape: str, mode: str, stage: str, device: str, steps: int, batch: int, seq: int, seed: int = 0) -> dict:
    """Tokens/s and peak memory of `steps` steps after one warm-up step."""
    import torch

    from clinfed.common.training import PeakRSS, autocast_dtype

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    t_build = time.perf_counter()
    model = lora_model(shape, mode, device)
    build_s = time.perf_counter() - t_build
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device == "cuda" else {}))
    amp = None if mode == "fp32" else (torch.bfloat16 if device == "cuda" else autocast_dtype(device, "auto"))
    rows = batch * 2 if stage == "dpo" else batch
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (rows, seq), device=device)
    step = dpo_step if stage == "dpo" else sft_step
    with PeakRSS() as rss:
        with torch.autocast(device_type=device, dtype=amp or torch.float32, enabled=amp is not None):
            step(model, ids, opt)  # warm-up (kernels, allocator)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            tokens = sum(step(model, ids, opt) for _ in range(steps))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
    peak = _peak(device) if device == "cuda" else rss.peak_mb
    del model, opt, params
    gc.collect()
    return {"shape": shape, "stage": stage, "mode": "qlora-4bit" if mode == "4bit" else f"lora-{mode}",
            "batch": rows, "seq": seq, "steps": steps, "step_s": round(seconds / steps, 4),
            "tokens_per_s": round(tokens / seconds, 1), "peak_mb": round(peak, 1), "build_s": round(build_s, 2)}


def gpu_machine() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(0)
    out = {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
           "cuda": torch.version.cuda, "bf16": bool(torch.cuda.is_bf16_supported())}
    try:
        import subprocess

        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out


STUDY_TIMEOUT_S = 360  # the study's share of the ten minutes; it is stopped (and said so) past it


def study_mean_aucs(run_dir) -> dict:
    """Mean ROC AUC over the sites per regime and test split, from a study's metrics.csv."""
    import csv
    from collections import defaultdict
    from pathlib import Path

    got = defaultdict(list)
    with open(Path(run_dir) / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["subgroup"] == "all" and row["metric"] == "auc" and row["status"] == "ok" and row["value"]:
                got[(row["regime"], row["split"])].append(float(row["value"]))
    return {f"{regime}/{split}": round(sum(v) / len(v), 3) for (regime, split), v in sorted(got.items())}


def classifier_study(work, device: str = "cuda", timeout: float = STUDY_TIMEOUT_S) -> dict:
    """The default classifier study end to end (`clinfed simulate --device cuda`: six generated
    hospitals, MiniLM, its default rounds, steps and evaluation; the sites share the GPU through
    Ray, `--gpus-per-site` left at its default) in the bench's work folder: wall time and the
    mean AUCs. Past `timeout` it is interrupted like a Ctrl-C (clinfed stops its run in order)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = Path(work) / "classifier-study"
    cmd = [sys.executable, "-m", "clinfed.cli", "simulate", "--out", str(out), "--device", device]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # clinfed stops its SuperLink and sites on an interrupt
        try:
            text, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
        return {"stage": "classifier study", "command": " ".join(cmd[1:]), "completed": False,
                "wall_s": round(time.perf_counter() - t0, 1),
                "note": f"stopped after {timeout:.0f}s", "tail": text[-2000:]}
    wall = time.perf_counter() - t0
    row = {"stage": "classifier study", "command": " ".join(cmd[1:]), "completed": proc.returncode == 0,
           "wall_s": round(wall, 1)}
    if proc.returncode == 0:
        row["mean_auc"] = study_mean_aucs(out)
    else:
        row["tail"] = text[-2000:]
    return row


def gpu(work=None, shapes=("1b", "8b"), steps: int = 5, batch: int = 4, seq: int = 512, device: str = "cuda",
        seed: int = 0, study: bool = True) -> dict:
    """The benchmark: rows per (shape, stage, mode) and QLoRA's ratios to LoRA."""
    import importlib.metadata as md

    import torch

    from clinfed.common.hardware import pick_device

    device = pick_device(device)
    if device != "cuda" and any(s != "tiny" for s in shapes):
        raise RuntimeError("clinfed bench gpu needs a CUDA GPU for the 1B and 8B shapes; "
                           "`clinfed bench gpu --smoke` runs the tiny shape on CPU")
    lora_mode = "bf16" if device == "cuda" else "fp32"  # bf16 weights on CPU are slower, not faster
    plan = []
    for shape in shapes:
        if shape == "8b":
            plan.append((shape, "4bit", "sft"))
            continue
        for stage in ("sft", "dpo"):
            plan += [(shape, lora_mode, stage), (shape, "4bit", stage)]
        if device == "cuda":
            plan.append((shape, "fp32", "sft"))
    rows = [measure(shape, mode, stage, device, steps, batch, seq, seed) for shape, mode, stage in plan]

    def row(shape, mode, stage):
        want = "qlora-4bit" if mode == "4bit" else f"lora-{mode}"
        return next((r for r in rows if (r["shape"], r["mode"], r["stage"]) == (shape, want, stage)), None)

    ratios = []
    for shape in shapes:
        for stage in ("sft", "dpo"):
            q, lo = row(shape, "4bit", stage), row(shape, lora_mode, stage)
            if q and lo:
                ratios.append({"shape": shape, "stage": stage, "qlora_over_lora_tokens_per_s":
                               round(q["tokens_per_s"] / lo["tokens_per_s"], 3),
                               "qlora_over_lora_peak_memory": round(q["peak_mb"] / lo["peak_mb"], 3)})
    vers = {}
    for pkg in ("bitsandbytes", "peft", "transformers", "torch"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    first = ratios[0]["qlora_over_lora_tokens_per_s"] if ratios else None
    gpu_info = gpu_machine()
    # the full form only: the smoke form (CPU, CI) must stay seconds
    run_study = study and device == "cuda" and work is not None
    study_row = classifier_study(work, device) if run_study else None
    study_table = []
    if study_row is not None:
        study_table = [("classifier study (clinfed simulate --device cuda): wall time, mean AUC over the sites",
                        [{"completed": study_row["completed"], "wall_s": study_row["wall_s"],
                          **study_row.get("mean_auc", {})}])]
    return {"qlora_lora_tokens_ratio": first, "rows": rows, "ratios": ratios,
            **({"classifier_study": study_row} if study_row is not None else {}),
            "settings": {**{k: v for k, v in gpu_info.items()}, **{f"{k}_version": v for k, v in vers.items()},
                         "device": device, "shapes": ",".join(shapes), "steps": steps, "batch": batch, "seq": seq,
                         "lora": f"r16 {'+'.join(TARGETS)}, fp32 weights", "torch_threads": torch.get_num_threads(),
                         "peak_memory": "torch.cuda.max_memory_allocated" if device == "cuda"
                         else "process RSS (CPU: includes everything the process holds)"},
            "gpu_machine": gpu_info, "quantization_versions": vers,
            "_tables": [("steps", rows), ("QLoRA / LoRA", ratios), *study_table]}
