"""How the server aggregates the sites' updates: Flower's strategies, configured for the study.

The study addresses the sites itself (one message per site, per-site metrics kept),
so it calls a strategy's `aggregate_train` with the round's replies; anything a
strategy would otherwise learn in its own `configure_train` is told here
(`prime`): the arrays the round started from, which the server optimizers
(FedAdam, FedYogi, FedAdagrad, FedAvgM) step from and the DP wrapper clips against.

Run config `strategy` picks one of Flower's own (`flwr.serverapp.strategy`):
`fedavg` (default), `fedprox` (FedAvg on the server; it only sends `proximal-mu`,
which each site adds to its loss: `proximal_mu`), `fedadam`, `fedyogi`,
`fedadagrad`, `fedavgm`, and the robust `fedmedian` and `fedtrimmedavg`. What a
server optimizer carries from round to round (first and second moments, the
momentum vector) is `strategy_state`, saved with each round's checkpoint and put
back by `load_strategy_state`, so a resumed study takes the same steps.

Sites of different LoRA ranks (a site's policy `max-lora-rank`): `aggregation_inputs`
widens each update to the study's rank first (common.ranks.pad_update), so every
strategy sees arrays of one shape; with equal ranks the replies go in untouched.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from clinfed.common import protocol
from clinfed.common.ranks import pad_update

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "fedtrimmedavg")
# Flower's own defaults of the server learning rate (run config server-learning-rate = 0 keeps them)
DEFAULT_SERVER_LR = {"fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1, "fedavgm": 1.0}
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx puts the site's proximal weight under this config key


def make_strategy(cfg: dict, n_sites: int):
    """The run config's strategy, wrapped in Flower's server-side fixed-clipping DP when
    `update-dp-noise` > 0. The wrapper sizes its noise (noise x clip / m) for equally weighted
    sites, so under it the average weights by `train-steps`, which is the same at every site."""
    name = str(cfg.get("strategy", "fedavg"))
    noise = float(cfg.get("update-dp-noise", 0.0))
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_sites,
              min_available_nodes=n_sites, min_evaluate_nodes=0)
    if noise > 0:
        kw["weighted_by_key"] = "train-steps"
    lr = float(cfg.get("server-learning-rate", 0.0)) or DEFAULT_SERVER_LR.get(name, 1.0)
    opt = dict(eta=lr, beta_1=float(cfg.get("server-beta-1", 0.9)), beta_2=float(cfg.get("server-beta-2", 0.99)),
               tau=float(cfg.get("server-tau", 1e-3)))
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # "federated evaluation will be skipped": the study evaluates itself
    try:
        if name == "fedavg":
            inner = FedAvg(**kw)
        elif name == "fedprox":
            inner = FedProx(**kw, proximal_mu=float(cfg.get("proximal-mu", 0.0)))
        elif name == "fedadam":
            inner = FedAdam(**kw, **opt)
        elif name == "fedyogi":
            inner = FedYogi(**kw, **opt)
        elif name == "fedadagrad":
            inner = FedAdagrad(**kw, eta=lr, tau=opt["tau"])
        elif name == "fedavgm":
            inner = FedAvgM(**kw, server_learning_rate=lr, server_momentum=float(cfg.get("server-momentum", 0.0)))
        elif name == "fedmedian":
            inner = FedMedian(**kw)
        elif name == "fedtrimmedavg":
            inner = FedTrimmedAvg(**kw, beta=float(cfg.get("trim-beta", 0.2)))
        else:
            raise ValueError(f"unknown aggregation strategy {name!r}; one of {', '.join(STRATEGIES)}")
        if noise <= 0:
            return inner
        return DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=noise, clipping_norm=cfg.update_dp_clip, num_sampled_clients=max(1, n_sites))
    finally:
        flwr_logger.setLevel(level)


def inner_strategy(strategy):
    """The aggregating strategy under a DP wrapper (the strategy itself when unwrapped)."""
    return strategy.strategy if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) else strategy


def train_config(strategy) -> dict:
    """What the strategy's `configure_train` would add to the sites' train config: FedProx's
    `proximal-mu` (the sites add the proximal term themselves)."""
    inner = inner_strategy(strategy)
    return {PROXIMAL_MU: float(inner.proximal_mu)} if isinstance(inner, FedProx) else {}


def prime(strategy, start: ArrayRecord, n_replies: int):
    """Tell the strategy what its `configure_train` would have learnt: the arrays this round
    started from. The server optimizers step from them (FedOpt's `current_arrays` as numpy,
    FedAvgM's as an ArrayRecord); the DP wrapper clips each update against them, with the
    number of updates actually averaged (the noise is sized for them)."""
    if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        strategy.current_arrays = start
        strategy.num_sampled_clients = max(1, n_replies)
    inner = inner_strategy(strategy)
    if isinstance(inner, FedOpt):
        inner.current_arrays = {k: v.numpy() for k, v in start.items()}
    elif isinstance(inner, FedAvgM):
        inner.current_arrays = start


prime_update_dp = prime  # the name server.study used before the server optimizers


def _mutates_replies(strategy) -> bool:
    """FedMedian and FedTrimmedAvg pop the arrays out of the replies they aggregate."""
    return isinstance(inner_strategy(strategy), (FedMedian, FedTrimmedAvg))


def aggregation_inputs(strategy, replies: list[Message], start: ArrayRecord) -> list[Message]:
    """The replies as the strategy should see them: an update at a smaller LoRA rank widened to
    the study's (common.ranks.pad_update, from `start`, the adapter the round began with), and
    copies for the strategies that take the arrays out of what they aggregate, so the study
    still reads every site's update afterwards. Replies at the study's rank go in as they are."""
    full = {k: v.numpy() for k, v in start.items()}
    out = []
    for rep in replies:
        rec = rep.content[protocol.ARRAYS]
        widen = any(tuple(v.shape) != full[k].shape for k, v in rec.items() if k in full)
        if not widen and not _mutates_replies(strategy):
            out.append(rep)
            continue
        if widen:
            state = pad_update({k: v.numpy() for k, v in rec.items()}, full)
            arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
        else:
            arrays = ArrayRecord({k: v for k, v in rec.items()})
        content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: rep.content[protocol.METRICS]})
        out.append(Message(content, dst_node_id=rep.metadata.src_node_id, message_type=rep.metadata.message_type))
    return out


def aggregate(strategy, rnd: int, replies: list[Message], start: ArrayRecord) -> tuple[ArrayRecord | None, list[Message]]:
    """One group's aggregation of a round: the strategy primed with the round's starting adapter,
    the replies widened to the study's rank, Flower's `aggregate_train`; the new adapter in the
    start's dtypes (the server optimizers compute in float64: sent as such, an update would
    double in bytes). Returns the adapter (None if the strategy produced none) and the
    messages the strategy aggregated."""
    prime(strategy, start, len(replies))
    inputs = aggregation_inputs(strategy, replies, start)
    new, _ = strategy.aggregate_train(rnd, inputs)
    if new is not None:
        dtypes = {k: v.numpy().dtype for k, v in start.items()}
        if any(new[k].numpy().dtype != dtypes[k] for k in new.keys() if k in dtypes):
            new = ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=dtypes.get(k))) for k, v in new.items()})
    return new, inputs


# ------------------------------------------------------------------ state between rounds
def strategy_state(strategy) -> dict[str, np.ndarray]:
    """What a server optimizer carries into the next round, as numpy arrays by name: FedAdam's,
    FedYogi's and FedAdagrad's moments (`m/<key>`, `v/<key>`), FedAvgM's momentum vector
    (`momentum/<key>`). Empty for the strategies that keep nothing but the adapter."""
    inner = inner_strategy(strategy)
    out: dict[str, np.ndarray] = {}
    if isinstance(inner, FedOpt):
        for prefix, moments in (("m", inner.m_t), ("v", inner.v_t)):
            for k, v in (moments or {}).items():
                out[f"{prefix}/{k}"] = np.asarray(v)
    elif isinstance(inner, FedAvgM) and inner.momentum_vector is not None:
        keys = list(inner.current_arrays.keys())
        out.update({f"momentum/{k}": np.asarray(v) for k, v in zip(keys, inner.momentum_vector, strict=True)})
    return out


def load_strategy_state(strategy, state: dict[str, np.ndarray], keys: list[str]):
    """Put back what `strategy_state` saved; `keys`: the adapter's keys in wire order (FedAvgM's
    momentum vector is a list in that order)."""
    inner = inner_strategy(strategy)
    if not state:
        return
    if isinstance(inner, FedOpt):
        m = {k[2:]: v for k, v in state.items() if k.startswith("m/")}
        v_ = {k[2:]: v for k, v in state.items() if k.startswith("v/")}
        inner.m_t = m or None
        inner.v_t = v_ or None
    elif isinstance(inner, FedAvgM):
        inner.momentum_vector = [state[f"momentum/{k}"] for k in keys]
