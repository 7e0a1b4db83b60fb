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

log = logging.getLogger("clinfed.memory")

HEADROOM = 0.85  # plan for this share of the card: the allocator fragments, lengths vary between batches


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
        self.budget = int(stated_gb * 2**30) if stated_gb and stated_gb > 0 else int(total)

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

    def as_info(self) -> dict:
        return {"micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "oom_retries": self.oom_retries, "planned_peak_bytes": self.planned_from_peak}


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
