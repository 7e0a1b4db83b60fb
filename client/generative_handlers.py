"""The generative (instruction-tuning) study at a site: the handler of each message the server sends.

- `train.sft`, `train.dpo`: one federated SFT or DPO round; replies with arrays;
- `train.gen_local`: `local` (SFT then DPO from the base) and `personalized`
  (the global DPO adapter fine-tuned with SFT), both kept at the site;
- `evaluate.gen`: every task scored per stage and regime; aggregates only.
The work itself is `client.generative_site`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from clinfed.client.generative_site import GenSite
from clinfed.client.handling import dp_metrics, guarded, may_train, site_ledger, to_arrays, to_state
from clinfed.client.locate import SimulationSupport, locate_site
from clinfed.common import privacy
from clinfed.common.adapters import check_base_identity, wire_hash
from clinfed.common.model_cache import get_decoder
from clinfed.common.policy import Policy
from clinfed.common.protocol import (
    ARRAYS,
    CONFIG,
    GLOBAL,
    GLOBAL_DPO,
    GLOBAL_SFT,
    METRICS,
    SEED_DPO_ROUND,
    SEED_GEN_LOCAL_DPO,
    SEED_GEN_LOCAL_SFT,
    SEED_GEN_PERSONALIZED,
    SERVER_ROUND,
    SITE,
)

log = logging.getLogger("clinfed.client")


_SITES: dict = {}


def prepare_generative(msg: Message, context: Context, sim: SimulationSupport | None = None):

    run_dir = str(msg.content["config"].get("run-dir", "")) if "config" in msg.content.config_records else ""
    name, folder, table, out_dir, cfg, policy = locate_site(context, run_dir, sim=sim)
    key = (name, str(folder)) + tuple(cfg[k] for k in ("seed", "gen-tasks", "gen-holdout-task", "gen-train-items",
                                                        "gen-eval-items", "gen-max-words"))
    if key not in _SITES:
        _SITES.clear()
        _SITES[key] = GenSite(name, folder, table, cfg)
    gsite = _SITES[key]
    dec = get_decoder(cfg)
    privacy.declare(name, dec.shapes, policy.allow_adapters, policy.min_cell_size)
    return gsite, cfg, policy, dec, out_dir


def describe_generative(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    gsite, cfg, policy, dec, _ = prepare_generative(msg, context, sim)
    n = gsite.n_train()
    metrics = {"site-n-train": n} if n >= policy.min_cell_size else {}
    metrics.update(policy.to_metrics())
    return Message(RecordDict({SITE: ConfigRecord({"name": gsite.name}), METRICS: MetricRecord(metrics)}),
                   reply_to=msg)


def self_rejected_share(info: dict, k: int) -> dict:
    """The share of DPO pairs whose rejected answer was the model's own, released only
    when the stage used at least k pairs (an aggregate of training items)."""
    pairs = int(info.get("pairs", 0))
    return {"dpo-self-rejected-share": info["self_rejected"] / pairs} if "self_rejected" in info and pairs >= k else {}


def generative_reply(msg, gsite, state, info, policy: Policy) -> Message:
    metrics = MetricRecord({"num-examples": gsite.n_train(), "train-loss": info["train_loss"],
                            "train-steps": info["steps"], "train-seconds": info["seconds"],
                            "adapter-hash": wire_hash(state),
                            **{f"train-{k.replace('_', '-')}": int(info[k])
                               for k in ("micro_batch", "accumulation", "oom_retries") if k in info},
                            **({"train-tokens-per-s": float(info["tokens_per_s"])} if "tokens_per_s" in info else {}),
                            **self_rejected_share(info, policy.min_cell_size),
                            **dp_metrics(info, gsite.n_train(), policy)})
    return Message(RecordDict({ARRAYS: to_arrays(state), "metrics": metrics}), reply_to=msg)


def budget_spent(msg, ledger, dp, name: str, err) -> Message:
    """Declined, not failed: no arrays; the server leaves the site out of this round's average."""
    log.warning("site %s: %s", name, err)
    return Message(RecordDict({METRICS: MetricRecord({
        "dp-budget-exhausted": 1, "dp-epsilon-total": ledger.epsilon(dp.delta),
        "dp-epsilon-budget": float(dp.budget)})}), reply_to=msg)


@guarded("federated SFT round")
def train_sft(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """One federated SFT round on the site's instruction mixture (DP-SGD with `dp`)."""
    from clinfed.common.dp import DPBudgetExhausted

    gsite, cfg, policy, dec, out_dir = prepare_generative(msg, context, sim)
    may_train(cfg, policy, sends_adapter=True, what="the federated SFT round")
    check_base_identity(msg.content[CONFIG], dec.identity)
    rnd = int(msg.content[CONFIG].get(SERVER_ROUND, 1))
    dp = gsite.dp_settings(policy)
    ledger = site_ledger(context, gsite.name, gsite.table) if dp is not None else None
    try:
        state, info = gsite.sft(dec, to_state(msg.content[ARRAYS]), cfg.sft_steps, rnd,
                                dp=dp, ledger=ledger, label=f"sft round {rnd}")
    except DPBudgetExhausted as err:
        return budget_spent(msg, ledger, dp, gsite.name, err)
    return generative_reply(msg, gsite, state, info, policy)


@guarded("federated DPO round")
def train_dpo(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """One federated DPO round; the reference policy is the adapter received (see common.instruct)."""
    gsite, cfg, policy, dec, _ = prepare_generative(msg, context, sim)
    may_train(cfg, policy, sends_adapter=True, what="the federated DPO round")
    check_base_identity(msg.content[CONFIG], dec.identity)
    rnd = int(msg.content[CONFIG].get(SERVER_ROUND, 1))
    state, info = gsite.dpo(dec, to_state(msg.content[ARRAYS]), cfg.dpo_steps, SEED_DPO_ROUND + rnd)
    return generative_reply(msg, gsite, state, info, policy)


@guarded("local and personalized instruction tuning")
def train_gen_local(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """`local`: SFT then DPO from the base, at the site only; `personalized`: the
    global DPO adapter fine-tuned with SFT at the site. All stay here."""
    from clinfed.common.adapters import save_adapter

    from clinfed.common.dp import DPBudgetExhausted

    gsite, cfg, policy, dec, out_dir = prepare_generative(msg, context, sim)
    may_train(cfg, policy, sends_adapter=False, what="local and personalized instruction tuning")
    rounds = cfg.num_server_rounds
    dp = gsite.dp_settings(policy)
    ledger = site_ledger(context, gsite.name, gsite.table) if dp is not None else None
    metrics: dict = {"num-examples": gsite.n_train()}
    adapters = {}

    def sft(regime, start, steps, offset):
        try:
            state, info = gsite.sft(dec, start, steps, offset, dp=dp, ledger=ledger, label=f"gen_local {regime}")
        except DPBudgetExhausted as err:  # this regime is not trained (nor scored) here
            log.warning("site %s: %s", gsite.name, err)
            metrics[f"{regime}-dp-budget-exhausted"] = 1
            metrics["dp-epsilon-total"] = ledger.epsilon(dp.delta)
            return None, None
        metrics.update(dp_metrics(info, gsite.n_train(), policy, prefix=f"{regime}-"))
        return state, info

    local_sft, _ = sft("local", dec.init_state, rounds * cfg.sft_steps, SEED_GEN_LOCAL_SFT)
    if local_sft is not None:
        adapters["local-sft"] = local_sft
        if dp is None:  # DPO has no DP path (common.instruct): with dp the local regime stops at SFT
            adapters["local-dpo"], i2 = gsite.dpo(dec, local_sft,
                                                  max(1, cfg.dpo_rounds) * cfg.dpo_steps, SEED_GEN_LOCAL_DPO)
            metrics["local-train-loss"] = i2["train_loss"]
            metrics.update({f"local-{k}": v for k, v in self_rejected_share(i2, policy.min_cell_size).items()})
    pers, i3 = sft("personalized", to_state(msg.content[GLOBAL]), cfg.sft_steps, SEED_GEN_PERSONALIZED)
    if pers is not None:
        adapters["personalized-dpo"] = pers
        metrics["personalized-train-loss"] = i3["train_loss"]
    for regime in ("local-sft", "local-dpo", "personalized-dpo"):
        folder = Path(out_dir) / "adapters" / regime
        if regime in adapters:
            save_adapter(dec.model, adapters[regime], folder,
                         meta={"site": gsite.name, "regime": regime, "base_model": dec.identity})
        elif folder.exists():  # an older study's adapter must not be scored as this one's
            shutil.rmtree(folder)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


@guarded("generative evaluation")
def evaluate_gen(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
    """Score each task per stage and regime on the site's test items (aggregates only)."""
    from clinfed.common.adapters import read_adapter

    gsite, cfg, policy, dec, out_dir = prepare_generative(msg, context, sim)
    cells = {("base", "base"): dec.init_state,
             ("sft", "global"): to_state(msg.content[GLOBAL_SFT]),
             ("dpo", "global"): to_state(msg.content[GLOBAL_DPO])}
    for stage, regime, folder in (("sft", "local", "local-sft"), ("dpo", "local", "local-dpo"),
                                  ("dpo", "personalized", "personalized-dpo")):
        path = Path(out_dir) / "adapters" / folder
        if (path / "adapter_model.safetensors").exists():
            cells[(stage, regime)] = read_adapter(dec.model, path, dec.identity)
    metrics = {}
    for (stage, regime), state in cells.items():
        for task, scores in gsite.evaluate(dec, state, policy.min_cell_size).items():
            for name, value in scores.items():
                metrics[f"gen/{task}/{stage}/{regime}/{name}"] = value
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
