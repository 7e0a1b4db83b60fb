"""The personalization methods a site runs on its own data: FedRep's head, Ditto's personal
adapter, global-local interpolation, and IFCA's choice of cluster.

Each is a way the field answers "hospitals differ"; clinfed scores each one as a regime on the
same patients as `global` (client.classifier_site.evaluate), so what they need from the site
(validation losses, the chosen weights) stays here and only the choice leaves: IFCA's cluster
index and the interpolation weight, site-level numbers on the egress guard's allow-list.

- `fedrep` (FedRep, Collins et al. 2021; FedPer, Arivazhagan et al. 2019): rounds of their own in
  which the backbone (the LoRA weights) is federated and the head (PEFT's modules_to_save: the
  classifier and, for BERT-like encoders, the pooler) never leaves: each round the site trains its
  own head on the round's backbone, then the backbone under its head (`fedrep_round`).
- `ditto` (Li et al. 2021): a personal adapter trained alongside the global rounds with the
  proximal pull lambda/2 * ||v - w_t||^2 toward each round's global adapter (common.training;
  client.classifier_handlers.ditto_round).
- `interpolated` (global-local mixing, e.g. Mansour et al. 2020's model interpolation): the
  site's adapter a*global + (1-a)*local, a from INTERPOLATION_GRID by validation log loss.
- `ifca` (Ghosh et al. 2020): every round the site scores the k cluster adapters on its
  validation split and trains the one with the lowest loss (`choose_cluster`).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from clinfed.common.protocol import INTERPOLATION_GRID  # weight of the global adapter


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy; chosen over AUC to choose by because it is smooth on a small
    validation split (an AUC on 20 patients ties between many candidates)."""
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def is_lora_key(key: str) -> bool:
    return "lora_" in key


def head_keys(state: dict[str, np.ndarray]) -> list[str]:
    """The keys of the trainable state that are not LoRA: the head (and pooler) PEFT saves in full."""
    return [k for k in state if not is_lora_key(k)]


@contextmanager
def part_frozen(model, part: str | None):
    """Hold one part of the adapter fixed for the duration: `"lora"` (FedRep's head phase: only the
    head moves) or `"head"` (its body phase: only the LoRA weights move); None freezes nothing. The
    training loop optimizes only what requires grad."""
    saved = []
    try:
        if part is not None:
            for name, p in model.named_parameters():
                if p.requires_grad and is_lora_key(name) == (part == "lora"):
                    p.requires_grad_(False)
                    saved.append(p)
        yield
    finally:
        for p in saved:
            p.requires_grad_(True)


def mix(global_state: dict[str, np.ndarray], local_state: dict[str, np.ndarray], a: float) -> dict[str, np.ndarray]:
    """a * global + (1 - a) * local, array by array (LoRA A and B mixed separately, as FedAvg
    mixes them; a = 1 is the global adapter, a = 0 the local one exactly)."""
    return {k: (a * global_state[k].astype(np.float64) + (1 - a) * local_state[k].astype(np.float64)
                ).astype(global_state[k].dtype) for k in global_state}


def argmin_first(losses) -> int:
    """The index of the lowest loss; ties and NaNs go to the lowest index (a NaN never wins)."""
    vals = np.array([np.inf if not np.isfinite(v) else v for v in losses], dtype=float)
    return int(np.argmin(vals))


def choose_cluster(loss_of, states: list[dict[str, np.ndarray]]) -> tuple[int, list[float]]:
    """IFCA's membership step: the index of the cluster adapter with the lowest validation loss
    (`loss_of(state)`), and the losses, which stay at the site."""
    losses = [float(loss_of(s)) for s in states]
    return argmin_first(losses), losses


def choose_interpolation(loss_of, global_state, local_state, grid=INTERPOLATION_GRID
                         ) -> tuple[float, dict[str, np.ndarray], list[float]]:
    """The grid weight whose mix has the lowest validation loss; ties go to the larger global
    weight (the grid is searched from a = 1 down), so a site without a signal keeps the global adapter."""
    order = sorted(grid, reverse=True)
    losses = [float(loss_of(mix(global_state, local_state, a))) for a in order]
    best = order[argmin_first(losses)]
    return float(best), mix(global_state, local_state, best), [losses[order.index(a)] for a in grid]
