"""How the server aggregates the sites' updates: Flower's strategies, configured for the study.

The study addresses the sites itself (one message per site, per-site metrics kept),
so it calls a strategy's `aggregate_train` with the round's replies; anything a
strategy would otherwise learn in its own `configure_train` is told here.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg


def make_strategy(cfg: dict, n_sites: int):
    """FedAvg, wrapped in Flower's server-side fixed-clipping DP when `update-dp-noise` > 0.
    The wrapper sizes its noise (noise x clip / m) for equally weighted sites, so under it
    FedAvg weights by `train-steps`, which is the same at every site."""
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_sites,
              min_available_nodes=n_sites, min_evaluate_nodes=0)
    noise = float(cfg.get("update-dp-noise", 0.0))
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # "federated evaluation will be skipped": the study evaluates itself
    try:
        if noise <= 0:
            return FedAvg(**kw)
        return DifferentialPrivacyServerSideFixedClipping(
            FedAvg(**kw, weighted_by_key="train-steps"), noise_multiplier=noise,
            clipping_norm=cfg.update_dp_clip, num_sampled_clients=max(1, n_sites))
    finally:
        flwr_logger.setLevel(level)


def prime_update_dp(strategy, start: ArrayRecord, n_replies: int):
    """The wrapper clips each update against the arrays sent this round, which it learns in
    its `configure_train`; this study addresses sites itself, so it is told here, with the
    number of updates actually averaged (the noise is sized for them)."""
    if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        strategy.current_arrays = start
        strategy.num_sampled_clients = max(1, n_replies)
