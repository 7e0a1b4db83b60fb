"""LoRA adapters of different ranks in one federation (a hospital whose card holds less).

A site's policy may cap its LoRA rank (`max-lora-rank`); it then trains at
r_site = min(study rank, cap). Both sides need the same three operations:

- `site_lora`: the site's LoRA settings. Its alpha is scaled with the rank
  (alpha_site = alpha x r_site / r), so the factor alpha/r that multiplies B·A is
  the same at every site: a rank-r_site adapter is then exactly the first r_site
  components of a rank-r one, and truncating or padding changes no component's size;
- `truncate`: what a capped site receives: the first r_site rows of each lora_A and
  the first r_site columns of each lora_B (the pooler and head are whole);
- `pad_update`: what the server aggregates: a capped site's adapter widened to the
  study's rank with its *update* zero-padded, i.e. the components it does not hold
  keep the values of the adapter the round started from. With every site at the same
  rank nothing is padded and the aggregation is exactly the strategy's own (FedAvg
  stays FedAvg). Padding the weights themselves with zeros instead would make every
  capped site vote, each round, for components it never held to shrink to zero.

Keys are PEFT's: `...lora_A.weight` (r x in) and `...lora_B.weight` (out x r).
"""

from __future__ import annotations

import numpy as np

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def is_lora_a(key: str) -> bool:
    return LORA_A in key


def is_lora_b(key: str) -> bool:
    return LORA_B in key


def site_rank(study_rank: int, cap: int) -> int:
    """The rank a site trains at: the study's, or the site's cap when smaller (0 = no cap)."""
    return min(int(study_rank), int(cap)) if cap and int(cap) > 0 else int(study_rank)


def site_alpha(alpha, study_rank: int, rank: int):
    """LoRA alpha at `rank`, keeping alpha/rank (the scale of B·A) the study's; the study's own
    value (an int) when the rank is the study's."""
    if int(rank) == int(study_rank):
        return alpha
    return float(alpha) * int(rank) / int(study_rank)


def state_rank(state: dict) -> int | None:
    """The LoRA rank of an adapter state (None: no LoRA arrays, e.g. a head-only arm)."""
    ranks = {int(np.shape(v)[0]) for k, v in state.items() if is_lora_a(k)}
    return max(ranks) if ranks else None


def rank_shapes(shapes: dict[str, tuple], rank: int) -> dict[str, tuple]:
    """The keys and shapes of the same adapter at `rank`."""
    out = {}
    for k, s in shapes.items():
        s = tuple(s)
        if is_lora_a(k):
            s = (int(rank),) + s[1:]
        elif is_lora_b(k):
            s = s[:1] + (int(rank),) + s[2:]
        out[k] = s
    return out


def truncate(state: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The adapter at a smaller rank: its first `rank` components (arrays of other keys as they are)."""
    out = {}
    for k, v in state.items():
        if is_lora_a(k) and v.shape[0] > rank:
            v = np.ascontiguousarray(v[:rank])
        elif is_lora_b(k) and v.shape[1] > rank:
            v = np.ascontiguousarray(v[:, :rank])
        out[k] = v
    return out


def pad_update(state: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` (a site's adapter, maybe at a smaller rank) at `start`'s rank: the components the
    site holds are its own, the others are `start`'s (its update there is zero). An adapter at
    `start`'s rank is returned as it is."""
    out = {}
    for k, v in state.items():
        ref = start[k]
        if v.shape == ref.shape:
            out[k] = v
            continue
        full = np.array(ref, dtype=v.dtype, copy=True)
        if is_lora_a(k):
            full[: v.shape[0]] = v
        elif is_lora_b(k):
            full[:, : v.shape[1]] = v
        else:  # only LoRA arrays change with the rank; anything else is a mismatch to reject upstream
            raise ValueError(f"{k}: shape {v.shape} differs from {ref.shape} and is not a LoRA A/B array")
        out[k] = full
    return out


def fit(state: dict[str, np.ndarray], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """A received adapter at this model's rank, if it comes at a larger one (the global adapter
    at a capped site); anything else is returned unchanged for the usual shape checks."""
    rank = next((s[0] for k, s in shapes.items() if is_lora_a(k)), None)
    got = state_rank(state)
    if rank is None or got is None or got <= rank:
        return state
    return truncate(state, rank)


__all__ = ["fit", "is_lora_a", "is_lora_b", "pad_update", "rank_shapes", "site_alpha", "site_rank",
           "state_rank", "truncate"]
