"""The classifier study at a site: the handler of each message the server sends.

- `query.describe`: the site's name, split sizes and descriptors (disclosure-controlled);
- `train`: one federated round from the global adapter; replies with arrays;
- `train.ifca`: one IFCA round: scores the k cluster adapters on the site's validation
  split, trains the best one, replies with it and the chosen index (no loss);
- `train.personalize`: trains the site-held regimes (`local`, `personalized`,
  `similarity-weighted`, `fedrep`, `ditto`, `interpolated`, and in simulation
  `augmented`), which stay at the site;
- `evaluate`: scores every regime on the site's test splits; aggregates only;
- `evaluate.compare`: paired differences between a comparison's arms.
The work itself is `client.classifier_site`; the ClientApp (`client.app`) puts the
egress guard in front of every reply.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from clinfed.client.classifier_site import site_seed
from clinfed.client.generative_handlers import describe_generative
from clinfed.client.handling import (
    dp_metrics,
    guarded,
    may_send_state,
    may_train,
    msg_config,
    prepare,
    site_ledger,
    to_arrays,
    to_state,
)
from clinfed.client.locate import SimulationSupport, in_simulation, locate_site, simulated_federation
from clinfed.common import privacy
from clinfed.common.adapters import check_base_identity, wire_hash
from clinfed.common.config import from_run_config, regimes
from clinfed.common.policy import PolicyRefusal
from clinfed.common.protocol import (
    ARRAYS,
    CLUSTER,
    COMPARE_ARMS,
    CONFIG,
    CROSS_PREFIX,
    FEDREP,
    GLOBAL,
    IFCA,
    IFCA_CHOICE,
    IFCA_PREFIX,
    INTERPOLATION_WEIGHT,
    METRICS,
    PHASE,
    RUN_DIR,
    SEED_AUGMENTED,
    SEED_DITTO,
    SEED_FEDREP,
    SEED_IFCA_ROUND,
    SEED_LOCAL,
    SEED_PERSONALIZED,
    SEED_SIMILARITY,
    SERVER_ROUND,
    SIMILARITY_START,
    SITE,
    SITE_HELD,
)

log = logging.getLogger("clinfed.client")


@guarded("describe")
def describe(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """Name the site, its split sizes and descriptors (common.metrics.describe_release:
    small and complementary suppression, no value from the table in any key)."""
    if from_run_config(context.run_config).task == "generative":
        return describe_generative(msg, context, sim)
    site, cfg, policy, lm = prepare(msg, context, sim)
    counts = site.describe_metrics(policy.min_cell_size)
    counts.update(policy.to_metrics())
    content = RecordDict({SITE: ConfigRecord({"name": site.name}), METRICS: MetricRecord(counts)})
    return Message(content, reply_to=msg)


@guarded("federated round")
def train(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """One federated round: start from the server's adapter, train, send it back."""
    site, cfg, policy, lm = prepare(msg, context, sim)
    may_train(cfg, policy, sends_adapter=True, what="the federated round")
    may_send_state(cfg, policy, lm, "the federated round")
    check_base_identity(msg.content[CONFIG], lm.identity)
    rnd = int(msg.content[CONFIG].get(SERVER_ROUND, 1))
    start = to_state(msg.content[ARRAYS])
    if msg.content[CONFIG].get(PHASE) == "fedrep":
        return _round_reply(msg, context, site, policy, lm, start, rnd, SEED_FEDREP + 2 * rnd, fedrep=True)
    reply = _round_reply(msg, context, site, policy, lm, start, rnd, rnd)
    if (msg.content[CONFIG].get(PHASE) == "global" and "ditto" in regimes(cfg)
            and ARRAYS in reply.content.array_records):  # not a DP decline
        reply.content[METRICS].update(ditto_round(site, policy, lm, start, rnd))
    return reply


def ditto_round(site, policy, lm, global_state: dict, rnd: int) -> dict:
    """Ditto (Li et al. 2021) alongside a global round: the site's personal adapter, from where
    its previous round left it (the round's global adapter, i.e. the start, in round 1), trains
    `local-steps` steps with the pull lambda/2 * ||v - w_t||^2 toward this round's global adapter
    w_t (lambda = `ditto-lambda`), and stays here. Each round's personal adapter is kept, so a
    study resumed at round r starts round r + 1 from round r's, as an uninterrupted one does.
    Returns the round's training figures for the reply (site-level, like the round's own)."""
    if site.dp_settings(policy) is not None:
        log.warning("site %s: regime 'ditto' is not trained under DP-SGD (its pull is not in the DP "
                    "trainer)", site.name)
        return {}
    prev = None
    for r in range(rnd - 1, 0, -1):
        prev = site.load_private(lm, f"ditto-round-{r:03d}")
        if prev is not None:
            break
    state, info = site.train(lm, prev if prev is not None else global_state, site.cfg.local_steps,
                             seed_offset=SEED_DITTO + rnd, label=f"ditto round {rnd}",
                             proximal_mu=site.cfg.ditto_lambda, anchor=global_state)
    site.save_private(lm, f"ditto-round-{rnd:03d}", state)
    site.save_private(lm, "ditto", state)  # the one evaluation scores: the last round's
    return {"ditto-train-loss": info["train_loss"], "ditto-train-seconds": info["seconds"],
            "ditto-train-peak-rss": info["peak_rss_mb"],
            **{k: v for k, v in fit_metrics(info, prefix="ditto-").items()
               if k.endswith(("-tokens-per-s", "-peak-gpu-mb"))}}


@guarded("IFCA round")
def train_ifca(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """One IFCA round (Ghosh et al. 2020): score each of the k cluster adapters (`ifca.<j>`) on
    the site's validation split, train the one with the lowest loss and send it back with its
    index. The losses stay here; the index is a site-level choice, as `cluster` membership is."""
    from clinfed.client.personal_regimes import choose_cluster

    site, cfg, policy, lm = prepare(msg, context, sim)
    may_train(cfg, policy, sends_adapter=True, what="the IFCA round")
    may_send_state(cfg, policy, lm, "the IFCA round")
    check_base_identity(msg.content[CONFIG], lm.identity)
    rnd = int(msg.content[CONFIG].get(SERVER_ROUND, 1))
    names = sorted((n for n in msg.content.array_records if n.startswith(IFCA_PREFIX)),
                   key=lambda n: int(n[len(IFCA_PREFIX):]))
    if not names:
        raise ValueError("an IFCA round without cluster adapters")
    states = [to_state(msg.content[n]) for n in names]
    best, _losses = choose_cluster(lambda st: site.choice_loss(lm, st), states)
    chosen = int(names[best][len(IFCA_PREFIX):])
    return _round_reply(msg, context, site, policy, lm, states[best], rnd, SEED_IFCA_ROUND + rnd,
                        extra={IFCA_CHOICE: chosen})


def fedrep_round(site, lm, received: dict, rnd: int, seed_offset: int) -> tuple[dict, dict]:
    """One FedRep round (Collins et al. 2021) at the site: the round's backbone (the LoRA weights
    received) under the site's own head (the one its previous round left; round 1: the received,
    common initial head), first the head trained `local-steps` / 2 steps with the backbone frozen,
    then the backbone the rest with the head frozen. The site keeps its head (each round's whole
    adapter is saved, so a resumed study continues exactly); the reply carries the trained
    backbone and the head exactly as it arrived, so the head never leaves. Returns (the state to
    send, the round's training figures)."""
    from clinfed.client.personal_regimes import head_keys

    heads = head_keys(received)
    if not heads or len(heads) == len(received):
        raise ValueError("regime 'fedrep' needs a LoRA adapter with a separate head (method lora, "
                         "classifier form)")
    own = None
    for r in range(rnd - 1, 0, -1):
        own = site.load_private(lm, f"fedrep-round-{r:03d}")
        if own is not None:
            break
    start = {**received, **({k: own[k] for k in heads} if own is not None else {})}
    head_steps = max(1, site.cfg.local_steps // 2)
    body_steps = max(1, site.cfg.local_steps - head_steps)
    mid, first = site.train(lm, start, head_steps, seed_offset=seed_offset, label=f"fedrep round {rnd} head",
                            head_only=True)
    state, info = site.train(lm, mid, body_steps, seed_offset=seed_offset + 1, label=f"fedrep round {rnd} body",
                             body_only=True)
    site.save_private(lm, f"fedrep-round-{rnd:03d}", state)
    info = {**info, "steps": first["steps"] + info["steps"], "seconds": first["seconds"] + info["seconds"],
            "tokens": first["tokens"] + info["tokens"],
            "peak_rss_mb": max(first["peak_rss_mb"], info["peak_rss_mb"])}
    if "tokens_per_s" in info:
        info["tokens_per_s"] = info["tokens"] / max(info["seconds"], 1e-9)
    return {**state, **{k: received[k] for k in heads}}, info


def _round_reply(msg: Message, context: Context, site, policy, lm, start, rnd: int, seed_offset: int,
                 extra: dict | None = None, fedrep: bool = False) -> Message:
    """Train one round from `start` (a FedRep round with `fedrep`) and reply with the update and
    its costs (or a DP decline)."""
    from clinfed.common.dp import DPBudgetExhausted

    dp = site.dp_settings(policy)
    ledger = site_ledger(context, site.name, site.table) if dp is not None else None
    # FedProx: Flower's strategy sends only `proximal-mu`; the pull toward `start` is added here
    mu = float(msg.content[CONFIG].get("proximal-mu", 0.0) or 0.0)
    try:
        if fedrep:
            if dp is not None:
                raise ValueError("regime 'fedrep' is not built into DP-SGD's accounting (two training phases "
                                 "per round)")
            state, info = fedrep_round(site, lm, start, rnd, seed_offset)
        else:
            state, info = site.train(lm, start, site.cfg.local_steps, seed_offset=seed_offset, label=f"round {rnd}",
                                     dp=dp, ledger=ledger, proximal_mu=mu)
    except DPBudgetExhausted as err:
        # Declined, not failed: no arrays; the server leaves the site out of this round's average.
        log.warning("site %s: %s", site.name, err)
        return Message(RecordDict({METRICS: MetricRecord({
            "dp-budget-exhausted": 1, "dp-epsilon-total": ledger.epsilon(dp.delta),
            "dp-epsilon-budget": float(dp.budget)})}), reply_to=msg)
    metrics = MetricRecord({
        "num-examples": len(site.splits["train"]),
        "train-loss": info["train_loss"],
        "train-steps": info["steps"],
        "train-seconds": info["seconds"],
        "train-tokens": info["tokens"],
        "train-peak-rss": info["peak_rss_mb"],
        **fit_metrics(info),
        "adapter-hash": wire_hash(state),
        **dp_metrics(info, len(site.splits["train"]), policy),
        **(extra or {}),
    })
    return Message(RecordDict({ARRAYS: to_arrays(state), "metrics": metrics}), reply_to=msg)


def fit_metrics(info: dict, prefix: str = "") -> dict:
    """What the training call chose to fit the site's card (micro-batch, accumulation, OOM retries,
    quantization bits, gradient checkpointing) and its throughput (tokens/s, peak GPU memory on CUDA)."""
    out = {f"{prefix}train-{k.replace('_', '-')}": int(info[k])
           for k in ("micro_batch", "accumulation", "oom_retries", "quantization_bits", "gradient_checkpointing")
           if k in info}
    out.update({f"{prefix}train-{k.replace('_', '-')}": float(info[k]) for k in ("tokens_per_s", "peak_gpu_mb")
                if k in info})
    return out


@guarded("local and personalized training")
def personalize(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """Train the site-held regimes: `local` (from the base), `personalized` (from the
    global adapter), `similarity-weighted` (from the server's similarity-weighted
    mix of other sites' adapters) and, in simulation only, `augmented`. All stay here;
    the local adapter leaves only when the study shares local adapters."""
    from clinfed.common.dp import DPBudgetExhausted

    site, cfg, policy, lm = prepare(msg, context, sim)
    may_train(cfg, policy, sends_adapter=False, what="local and personalized training")
    regs = regimes(cfg)
    local_steps = cfg.local_regime_steps or cfg.num_server_rounds * cfg.local_steps
    pers_steps = cfg.personalize_steps
    metrics = {"num-examples": len(site.splits["train"])}
    content = RecordDict()
    dp = site.dp_settings(policy)
    ledger = site_ledger(context, site.name, site.table) if dp is not None else None

    def run(regime, start, steps, offset, extra=None, **how):
        try:
            state, info = site.train(lm, start, steps, seed_offset=offset, label=regime, extra=extra,
                                     dp=dp, ledger=ledger, **how)
        except DPBudgetExhausted as err:  # the regime is not trained (nor scored) at this site
            log.warning("site %s: %s", site.name, err)
            metrics[f"{regime}-dp-budget-exhausted"] = 1
            metrics["dp-epsilon-total"] = ledger.epsilon(dp.delta)
            return None
        site.save_private(lm, regime, state)
        metrics[f"{regime}-train-loss"] = info["train_loss"]
        metrics[f"{regime}-train-seconds"] = info["seconds"]
        metrics[f"{regime}-train-peak-rss"] = info["peak_rss_mb"]
        metrics.update({k: v for k, v in fit_metrics(info, prefix=f"{regime}-").items()
                        if k.endswith(("-tokens-per-s", "-peak-gpu-mb"))})
        metrics.update(dp_metrics(info, len(site.splits["train"]), policy, prefix=f"{regime}-"))
        return state

    local_state = None
    if "local" in regs or "interpolated" in regs or policy.share_local_adapters:
        local_state = run("local", lm.init_state, local_steps, SEED_LOCAL)
        if policy.share_local_adapters and local_state is not None:
            try:
                may_send_state(cfg, policy, lm, "sharing its local adapter")
                content[ARRAYS] = to_arrays(local_state)
            except PolicyRefusal as err:  # the local adapter stays; the site still trains and is scored
                log.warning("site %s: %s", site.name, err)
    if "personalized" in regs and pers_steps > 0:
        run("personalized", to_state(msg.content[GLOBAL]), pers_steps, SEED_PERSONALIZED)
    if "similarity-weighted" in regs and SIMILARITY_START in msg.content.array_records and pers_steps > 0:
        run("similarity-weighted", to_state(msg.content[SIMILARITY_START]), pers_steps, SEED_SIMILARITY)
    personal_regimes(site, cfg, lm, regs, to_state(msg.content[GLOBAL]), local_state, run, metrics, dp)
    if "augmented" in regs:
        simulated = in_simulation(context) and sim is not None and sim.borrow is not None
        if not simulated or policy.refuse_instance_moving:
            log.warning("regime 'augmented' moves patient records between sites: refused "
                        + ("outside simulation" if not simulated else "by the site's policy"))
        else:
            data_dir = simulated_federation(cfg, sim)
            extra = sim.borrow(site, data_dir, lm, cfg.augment_k, cfg.augment_space, cfg.seed)
            enc = site.encode_notes(extra["note_text"].tolist(), lm.tokenizer)
            run("augmented", lm.init_state, local_steps, SEED_AUGMENTED,
                extra=(enc, extra["readmitted_30d"].to_numpy(dtype="int64")))
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def personal_regimes(site, cfg, lm, regs, global_state, local_state, run, metrics, dp) -> None:
    """`interpolated` from the final global adapter (client.personal_regimes): kept here like
    `personalized`; only the interpolation weight is released. (`ditto` trains alongside the global
    rounds, `ditto_round`; `fedrep` in rounds of its own, `fedrep_round`.)"""
    from clinfed.client.personal_regimes import choose_interpolation, head_keys

    if "interpolated" in regs and local_state is not None:
        a, state, _losses = choose_interpolation(lambda st: site.choice_loss(lm, st), global_state, local_state)
        site.save_private(lm, "interpolated", state)
        metrics[INTERPOLATION_WEIGHT] = a


def fedrep_model(site, lm, backbone: dict) -> dict:
    """The site's FedRep model: the final federated backbone under the head its last FedRep round
    left here (saved as the site's `fedrep` adapter, PEFT format)."""
    from clinfed.client.personal_regimes import head_keys

    rounds = sorted(p.name for p in (site.out_dir / "adapters").glob("fedrep-round-*"))
    own = site.load_private(lm, rounds[-1]) if rounds else None
    state = {**backbone, **({k: own[k] for k in head_keys(backbone)} if own is not None else {})}
    site.save_private(lm, "fedrep", state)
    return state


@guarded("evaluation")
def evaluate(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """Score every regime on the same test items; adapters from other sites or
    clusters (records named `x.<regime>`) are scored for the cross-site matrix."""
    site, cfg, policy, lm = prepare(msg, context, sim)
    regs = regimes(cfg)
    states = {"base": lm.init_state, "global": to_state(msg.content[GLOBAL])}
    if "cluster" in regs and CLUSTER in msg.content.array_records:
        states["cluster"] = to_state(msg.content[CLUSTER])
    if "ifca" in regs and IFCA in msg.content.array_records:
        states["ifca"] = to_state(msg.content[IFCA])
    if "fedrep" in regs and FEDREP in msg.content.array_records:
        states["fedrep"] = fedrep_model(site, lm, to_state(msg.content[FEDREP]))
    for regime in SITE_HELD:
        state = site.load_private(lm, regime) if regime in regs else None
        if state is not None:
            states[regime] = state
    cross = {name[len(CROSS_PREFIX):]: to_state(rec) for name, rec in msg.content.array_records.items()
             if name.startswith(CROSS_PREFIX)}
    metrics = site.evaluate(lm, states, k=policy.min_cell_size, subgroups=cfg.subgroups, cross=cross)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


@guarded("comparison of arms")
def evaluate_compare(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """Paired differences between the arms of a comparison, from the per-item scores each arm
    left in this site's folder at its evaluation (common.arm_differences): per pair of arms, regime and
    split, the AUC difference and its paired-bootstrap interval, with small-cell suppression."""
    from clinfed.common.arms import parse_arms
    from clinfed.common.arm_differences import compare_metrics

    run_dir = msg_config(msg, RUN_DIR)
    name, _, _, root_out, cfg, policy = locate_site(context, run_dir, sim=sim)
    arms = parse_arms(msg_config(msg, COMPARE_ARMS))
    listed = [a.name for a in parse_arms(cfg.get("arms", ""))]
    unknown = [a.name for a in arms if a.name not in listed]
    if unknown:
        from clinfed.common.config import ConfigError

        raise ConfigError(f"arm(s) {', '.join(unknown)} are not among the study's arms (run config 'arms')")
    dirs = [Path(root_out) / "arms" / a.safe_name for a in arms]
    privacy.declare(name, {}, policy.allow_adapters, policy.min_cell_size)
    metrics = compare_metrics(dirs, k=policy.min_cell_size, n_boot=cfg.bootstrap,
                              seed=site_seed(cfg, name))
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
