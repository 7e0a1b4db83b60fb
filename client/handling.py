"""What every handler of the site does around its work.

The site's refusals (its policy and the study's byte budget, checked before any
training), error replies whose reason carries no data, the site's one DP ledger,
the message's config values, and the conversion between wire arrays and adapter
state.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Error, Message

from clinfed.common import privacy
from clinfed.common.model_cache import get_model, model_key
from clinfed.common.policy import Policy, PolicyRefusal
from clinfed.client.locate import SimulationSupport, open_site, site_home

log = logging.getLogger("clinfed.client")


def may_send_state(cfg: dict, policy: Policy, lm, what: str):
    """Refuse, before training, an update the site's policy or the study's bytes budget forbids:
    full fine-tuning sends every weight of the model each round."""
    from clinfed.common.adapters import state_nbytes

    nbytes = state_nbytes(lm.init_state)
    method = cfg.get("arm-method", "lora")
    if method == "full" and not policy.allow_full_weights:
        raise PolicyRefusal(f"the site's policy forbids sending the whole model (allow-full-weights = false); "
                            f"full fine-tuning of {cfg['model']} would send {nbytes:,} bytes each round: "
                            f"the site declines {what}")
    if policy.max_update_bytes and nbytes > policy.max_update_bytes:
        raise PolicyRefusal(f"the site's policy caps an update at {policy.max_update_bytes:,} bytes "
                            f"(max-update-bytes) but this one ({method} of {cfg['model']}) is {nbytes:,} bytes: "
                            f"the site declines {what}")
    budget = int(cfg.get("max-bytes-per-round", 0) or 0)
    if budget and 2 * nbytes > budget:
        raise PolicyRefusal(f"the study's max-bytes-per-round = {budget:,} but a round of {method} on "
                            f"{cfg['model']} moves {2 * nbytes:,} bytes to and from the site: "
                            f"the site declines {what}")


def may_train(cfg: dict, policy: Policy, *, sends_adapter: bool, what: str):
    """Refuse, with a reason the server may read, training the site's policy forbids."""
    if policy.dp_required and not cfg.dp:
        raise PolicyRefusal(f"the site's policy requires DP-SGD (dp-required or a dp-epsilon budget) but the "
                            f"study runs without it (run config dp = false): the site declines {what}")
    if sends_adapter and not policy.allow_adapters:
        raise PolicyRefusal(f"the site's policy is metrics-only (allow-adapters = false): no adapter leaves, "
                            f"so the site declines {what}")


def site_ledger(context: Context, name: str, table: Path):
    """The site's one DP ledger for its table, in its own lasting folder (`site_home`). Nothing
    the server sends (run folder, arm, seeds) keys it, so no new study resets the budget; the
    arms of a comparison and the generative study train on the same patients and add up here."""
    from clinfed.common.dp import DPLedger

    nc = dict(context.node_config)
    folder = Path(table).parent
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"]))
        folder = data_path if data_path.is_dir() else data_path.parent
    return DPLedger.for_site(site_home(nc, folder), name, table)


def dp_metrics(info: dict, n_train: int, policy: Policy, prefix: str = "") -> dict:
    """Epsilon of this training call and the site's total so far (aggregates of the site's own accounting)."""
    ev = info.get("dp")
    if not ev:
        return {}
    out = {f"{prefix}dp-epsilon": float(ev["epsilon"]), "dp-epsilon-total": float(ev["epsilon_total"])}
    # delta = 1/n_train would reveal n_train: released only if n_train may be released anyway
    if policy.dp_delta > 0 or n_train >= policy.min_cell_size:
        out["dp-delta"] = float(ev["delta"])
    return out


def msg_config(msg: Message, key: str) -> str:
    if "config" in msg.content.config_records:
        return str(msg.content["config"].get(key, "") or "")
    return ""


def prepare(msg: Message, context: Context, sim: SimulationSupport | None = None):
    """The classifier site, its run config and policy, and the loaded model, for this message."""
    site, cfg, policy = open_site(context, msg_config(msg, "run-dir"), msg_config(msg, "arm"), sim)
    # a LoRA adapter at the site's own rank when its policy caps it (common.ranks)
    lm = get_model(model_key(cfg, max_lora_rank=policy.max_lora_rank if cfg.get("arm-method", "lora") == "lora" else 0))
    privacy.declare(site.name, lm.shapes, policy.allow_adapters, policy.min_cell_size)
    return site, cfg, policy, lm


def guarded(phase: str):
    """Turn any exception into an error reply whose reason carries no data."""

    def wrap(fn):
        def handler(msg: Message, context: Context, sim: SimulationSupport | None = None) -> Message:
            try:
                return fn(msg, context, sim)
            except Exception as exc:  # noqa: BLE001 - a site must answer, not crash the node
                log.exception("site failed during %s", phase)
                return Message(Error(code=901, reason=privacy.public_reason(exc, phase)), reply_to=msg)

        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler

    return wrap


def to_state(rec: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in rec.items()}


def to_arrays(state: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})
