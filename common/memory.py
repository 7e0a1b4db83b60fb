"""Fit a training step to the site's card: micro-batches, gradient accumulation, out-of-memory retry.

The study fixes the effective batch size and the number of optimizer steps; a site
with a small card splits each batch into micro-batches whose gradients accumulate
before the one optimizer step, so the update is the one the study asked for. The
micro-batch is planned from the peak memory measured on the first step (peak grows
about linearly with the micro-batch: fixed weights and optimizer state, plus
activations per example) against the card's memory, stated by the site (policy
`gpu-memory-gb`, node config `gpu-memory-gb`) or detected. A step that still runs
out of memory is retried on the same examples with half the micro-batch instead of
failing the site.

On CPU there is no card to fit: nothing is planned unless a meter is given (tests
give a simulated one). Verified on CPU with simulated limits only; not yet on a GPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from clinfed.common.errors import ClinfedError

log = logging.getLogger("clinfed.memory")

HEADROOM = 0.85  # plan for this share of the card: the allocator fragments, lengths vary between batches
# a simulated site's share of one GPU (`clinfed simulate --gpus-per-site`, set in the environment
# its Ray workers inherit): the share of the card's memory it plans with when it states none
GPU_SHARE = "CLINFED_GPU_SHARE"


def gpu_share() -> float:
    """This process's share of its GPU (1 outside a simulation that shares one)."""
    import os

    try:
        share = float(os.environ.get(GPU_SHARE, "1") or 1)
    except ValueError:
        return 1.0
    return share if 0 < share <= 1 else 1.0


def site_budget(stated_gb: float, card_bytes: int) -> int:
    """The bytes a site's training may use: what it states (policy or node config `gpu-memory-gb`),
    else its share of the card (all of it unless simulated sites share one GPU)."""
    if stated_gb and stated_gb > 0:
        return int(stated_gb * 2**30)
    return int(card_bytes * gpu_share())


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or simulated) out-of-memory error, which a smaller micro-batch may avoid."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cached() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CudaMeter:
    """Peak and current allocated bytes of the CUDA device; `budget` the bytes a step may use
    (the site's stated memory, else the card's total)."""

    def __init__(self, stated_gb: float = 0.0):
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        self.budget = site_budget(stated_gb, int(total))

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def current(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated())

    def peak(self) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated())


def meter_for(device: str, stated_gb: float = 0.0, given=None):
    """The meter a training call plans with: the one given (tests), the CUDA device's, or None
    (CPU: nothing to fit)."""
    if given is not None:
        return given
    if device == "cuda":
        return CudaMeter(stated_gb)
    return None


def plan_micro_batch(batch_size: int, micro: int, base_bytes: int, peak_bytes: int, budget_bytes: int,
                     headroom: float = HEADROOM) -> int:
    """The largest micro-batch (1..batch_size) whose step should fit `headroom` of the budget,
    from one measured step: `base_bytes` before it (weights, optimizer state), `peak_bytes`
    during it with `micro` examples per forward."""
    per_example = max(1.0, (peak_bytes - base_bytes) / max(1, micro))
    room = budget_bytes * headroom - base_bytes
    fit = int(room // per_example)
    return max(1, min(int(batch_size), fit))


def micro_batches(idx: np.ndarray, micro: int) -> list[np.ndarray]:
    """A batch split into near-equal micro-batches of at most `micro` examples."""
    n = max(1, math.ceil(len(idx) / max(1, micro)))
    return [c for c in np.array_split(idx, n) if len(c)]


def divisor_at_most(batch_size: int, target: int) -> int:
    """The largest divisor of `batch_size` not above `target`: trainers with a fixed per-device
    batch keep the effective batch exact only with equal micro-batches."""
    target = max(1, min(int(batch_size), int(target)))
    return max(d for d in range(1, target + 1) if batch_size % d == 0)


@dataclass
class FitReport:
    """What a training call chose to fit the card; the site reports it with the call's metrics."""

    micro_batch: int
    accumulation: int
    oom_retries: int = 0
    planned_from_peak: int = 0  # bytes of the measured peak the plan used (0: not planned)
    gradient_checkpointing: bool = False  # on from the start (a quantized base) or after an OOM at micro-batch 1
    quantization_bits: int = 0  # 4 or 8: the frozen base in bitsandbytes; 0: not quantized

    def as_info(self) -> dict:
        return {"micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "oom_retries": self.oom_retries, "planned_peak_bytes": self.planned_from_peak,
                "gradient_checkpointing": int(self.gradient_checkpointing),
                "quantization_bits": self.quantization_bits}

    def shrink(self, model) -> None:
        """After an out-of-memory step: half the micro-batch; at micro-batch 1, gradient checkpointing
        (activations recomputed in the backward pass instead of kept), once. Raises when neither is left."""
        if self.micro_batch > 1:
            self.micro_batch = max(1, self.micro_batch // 2)
        elif not self.gradient_checkpointing and enable_checkpointing(model):
            self.gradient_checkpointing = True
            log.warning("out of memory at micro-batch 1: retrying with gradient checkpointing")
        else:
            raise MemoryError("out of memory at micro-batch 1 with gradient checkpointing")
        self.oom_retries += 1


def checkpointing_on(model) -> bool:
    return bool(getattr(model, "is_gradient_checkpointing", False))


def enable_checkpointing(model) -> bool:
    """Gradient checkpointing on a transformers model (also under PEFT), non-reentrant so LoRA's
    gradients flow through frozen layers; False when the model has none."""
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        return False
    try:
        fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError:  # an architecture without checkpointing support
        return False
    return checkpointing_on(model)


def quantization_bits(model) -> int:
    """4 or 8 when the frozen base is held by bitsandbytes, else 0."""
    if getattr(model, "is_loaded_in_4bit", False):
        return 4
    if getattr(model, "is_loaded_in_8bit", False):
        return 8
    return 0


def retry_on_oom(run, batch_size: int, micro: int | None = None, restore=None, what: str = "training"):
    """Call `run(micro, accumulation)`; on out-of-memory, `restore()` the starting state and
    call it again with half the micro-batch (equal micro-batches, so the effective batch and
    the optimizer steps stay), down to 1. Returns (result, FitReport)."""
    micro = divisor_at_most(batch_size, micro or batch_size)
    retries = 0
    while True:
        try:
            result = run(micro, batch_size // micro)
            return result, FitReport(micro, batch_size // micro, retries)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc) or micro == 1:
                raise
            free_cached()
            if restore is not None:
                restore()
            retries += 1
            new = divisor_at_most(batch_size, micro // 2)
            log.warning("%s ran out of memory with micro-batch %d: retrying with %d (x%d accumulation)",
                        what, micro, new, batch_size // new)
            micro = new


# --------------------------------------------------------------------------
# before loading: quantization from the model's size and the site's budget
# --------------------------------------------------------------------------
# Bytes per parameter of the frozen base while training, as clinfed holds it (not a model
# card's "bf16 weights" figure): `none` loads fp32 weights, and bf16/fp16 autocast holds a
# half-precision copy of each frozen Linear for the call (`common.training.frozen_linears_in`);
# 8-bit holds quantized Linears in 1 byte; 4-bit NF4 in half a byte plus its double-quantized
# block statistics (~0.127 bits). Layers bitsandbytes leaves alone (embeddings, norms, an LM
# head, a classifier head) stay fp32 (`prepare_model_for_kbit_training`).
LINEAR_BYTES = {"none": 6.0, "8bit": 1.0, "4bit": 0.5 + 0.127 / 8}
OTHER_BYTES = 4.0
WEIGHT_SHARE = 0.5  # the frozen base may take this share of the budget: the rest is activations,
# LoRA gradients and optimizer state, the CUDA context and the allocator's fragmentation
AUTO_ORDER = ("none", "8bit", "4bit")  # least lossy first


class MemoryPlanError(ClinfedError, ValueError):
    """A model that fits the site's memory in no mode (said before loading it)."""


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a base model, read without its weights."""

    params: int  # every parameter
    quantizable: int  # in Linear layers bitsandbytes would hold in 4 or 8 bits (not heads, not an LM head)
    source: str = ""  # where the counts came from

    def weight_bytes(self, quantization: str) -> int:
        return int(self.quantizable * LINEAR_BYTES[quantization] + (self.params - self.quantizable) * OTHER_BYTES)


_NOT_QUANTIZED = ("lm_head", "classifier", "score", "pooler")


def count_from_config(config, causal: bool) -> ModelSize:
    """Exact counts from a model config: the model is built on torch's `meta` device (shapes, no
    memory), with the head clinfed puts on it (an LM head for a decoder, 2 labels otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if causal:
            model = AutoModelForCausalLM.from_config(config)
        else:
            config.num_labels = 2
            model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    quantizable = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not any(part in _NOT_QUANTIZED for part in name.split(".")))
    return ModelSize(int(params), int(quantizable), "config")


def count_from_safetensors(folder) -> ModelSize:
    """Counts from the safetensors headers of a folder (the 8-byte length and the JSON header of each
    file: no tensor is read). Every 2-D weight outside embeddings and heads counts as quantizable."""
    import json
    import struct
    from pathlib import Path

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise MemoryPlanError(f"{folder}: no safetensors file to read the model's size from")
    params = quantizable = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(t["shape"]) if t["shape"] else 1
            params += count
            if (len(t["shape"]) == 2 and name.endswith(".weight") and "embed" not in name
                    and not any(part in _NOT_QUANTIZED for part in name.split("."))):
                quantizable += count
    return ModelSize(int(params), int(quantizable), "safetensors")


def model_size(name: str, causal: bool = False) -> ModelSize:
    """Parameter counts of a model clinfed would load as `name` (alias, folder or cached id), from its
    config (meta device) or, failing that, its safetensors headers; no weights are loaded."""
    from pathlib import Path

    from clinfed.common.model_source import TINY_MODELS, load_tokenizer, resolve_decoder, resolve_model, tiny_config

    resolved = resolve_decoder(name) if causal else resolve_model(name)
    if resolved in TINY_MODELS:
        return count_from_config(tiny_config(resolved, len(load_tokenizer(resolved)), 2), causal)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolved)
        return count_from_config(config, causal)
    except Exception as err:  # noqa: BLE001 - an architecture transformers cannot build: read the headers
        if Path(resolved).is_dir() and list(Path(resolved).glob("*.safetensors")):
            return count_from_safetensors(resolved)
        raise MemoryPlanError(f"cannot read the size of model {name!r} to choose its quantization: {err}; "
                              "set quantization = none, 8bit or 4bit") from None


@dataclass(frozen=True)
class QuantizationPlan:
    quantization: str
    reason: str


def plan_quantization(size: ModelSize, budget_bytes: int, allowed=AUTO_ORDER, share: float = WEIGHT_SHARE,
                      name: str = "the model") -> QuantizationPlan:
    """The least lossy mode in `allowed` whose frozen base takes at most `share` of the budget;
    a clear error naming the model's size and the budget when none does."""
    gib = 2**30
    for q in allowed:
        need = size.weight_bytes(q)
        if need <= share * budget_bytes:
            return QuantizationPlan(q, f"{name}: {size.params / 1e9:.2f} B parameters, base {need / gib:.1f} GiB in "
                                       f"{q} <= {share:.0%} of the {budget_bytes / gib:.1f} GiB budget")
    modes = ", ".join(f"{q} {size.weight_bytes(q) / gib:.1f} GiB" for q in allowed)
    raise MemoryPlanError(
        f"{name} ({size.params / 1e9:.2f} B parameters) does not fit the site's GPU memory budget of "
        f"{budget_bytes / gib:.1f} GiB in any mode clinfed may use here (frozen base: {modes}; at most "
        f"{share:.0%} of the budget, the rest is for activations and optimizer state): use a smaller model, a "
        "larger card, or state more memory (gpu-memory-gb)" + ("" if "4bit" in allowed else
                                                              "; quantization is not available with dp, "
                                                              "head-only/full arms or a comparison"))


def card_bytes() -> int:
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def resolve_quantization(cfg, name: str | None = None, causal: bool = False) -> str:
    """The quantization a site loads its base with. Anything but `auto` is taken as given. `auto`:
    on CPU `none` (no card to fit); on a GPU the least lossy of none, 8bit, 4bit whose frozen base
    fits the site's budget (`gpu-memory-gb`, else its share of the card), from the model's size
    read without loading it. With dp or a non-LoRA arm only `none` is possible."""
    from clinfed.common.hardware import pick_device

    wanted = str(cfg.get("quantization", "none"))
    if wanted != "auto":
        return wanted
    if pick_device(str(cfg.get("device", "auto"))) != "cuda":
        log.info("quantization auto: none on CPU (nothing to fit)")
        return "none"
    name = name or str(cfg.get("model"))
    lora_only = not cfg.get("dp") and str(cfg.get("arm-method", "lora")) == "lora" and not str(cfg.get("arms", "")).strip()
    plan = plan_quantization(model_size(name, causal), site_budget(float(cfg.get("gpu-memory-gb", 0.0) or 0.0), card_bytes()),
                             AUTO_ORDER if lora_only else ("none",), name=name)
    log.warning("quantization auto: %s (%s)", plan.quantization, plan.reason)
    return plan.quantization
