"""The hospital node: which message does what. The work is in `client.site`.

Message types (server -> site):
- `query.describe`: the site's name and split sizes (counts below k withheld);
- `train`: one federated round from the global adapter; replies with arrays;
- `train.personalize`: trains `local` (from the base) and `personalized`
  (from the final global) and keeps both at the site; replies with losses only;
- `evaluate`: scores every regime on the site's test splits; replies with
  aggregate metrics only.
Every reply passes `common.privacy.egress_guard`, installed on the app itself.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict, Error
from flwr.clientapp import ClientApp

from common import privacy
from common.models import check_base_identity, wire_hash
from common.config import regimes, resolve
from common.policy import Policy, PolicyRefusal, effective, load_site_policy
from common.data import find_table, list_sites
from common.training import set_threads
from client.site import Site, get_model, model_key

log = logging.getLogger("clinfed.client")

app = ClientApp(mods=[privacy.egress_guard])


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_federation_dir(cfg: dict) -> Path:
    """Simulation without data-dir: the default synthetic federation, generated once."""
    from simulations.generate import ensure_federation

    root = Path(os.environ.get("CLINFED_CACHE", Path.home() / ".cache" / "clinfed"))
    return ensure_federation(root / f"federation-h{cfg['hospitals']}-s{cfg['seed']}",
                             n_hospitals=int(cfg["hospitals"]), seed=int(cfg["seed"]))


def _site_policy(node_config: dict, folder: Path):
    """The hospital's own policy file, checked; None without one. A deployed node names it
    (node config `policy-path`); a simulated hospital may keep one in its folder
    (`clinfed-policy.toml`), read the same way."""
    from common.policy import SIMULATED_POLICY_FILE

    path = node_config.get("policy-path")
    if not path and "data-path" not in node_config and (Path(folder) / SIMULATED_POLICY_FILE).is_file():
        path = Path(folder) / SIMULATED_POLICY_FILE
    if not path:
        return None
    return load_site_policy(str(path))


def site_home(node_config: dict, folder: Path) -> Path:
    """The site's own lasting folder: a deployed node's output folder (`output-path`, else
    `<data folder>/clinfed-out`); in simulation `<hospital folder>/clinfed-out`, beside the
    hospital's data, never in the server's run folder. The DP ledger lives here."""
    if "data-path" in node_config and node_config.get("output-path"):
        return Path(str(node_config["output-path"]))
    return Path(folder) / "clinfed-out"


def in_simulation(context: Context) -> bool:
    return "data-path" not in context.node_config and "partition-id" in context.node_config


def open_site(context: Context, run_dir: str = "", arm: str = "") -> tuple[Site, dict, Policy]:
    """The classifier study's view of this node's hospital (for one arm of a comparison)."""
    name, folder, table, out_dir, cfg, policy = locate_site(context, run_dir, arm)
    return Site.get(name, table, out_dir, cfg), cfg, policy


def arm_config(cfg: dict, arm: str) -> dict:
    """The run config with the arm's overrides applied. A site runs only arms its study's
    run config lists (the server cannot ask for another model or method)."""
    from common.arms import parse_arm, parse_arms

    wanted = parse_arm(arm)
    if wanted.name not in [a.name for a in parse_arms(cfg.get("arms", ""))]:
        from common.config import ConfigError

        raise ConfigError(f"arm {wanted.name} is not one of the study's arms (run config 'arms')")
    return wanted.config(cfg)


def locate_site(context: Context, run_dir: str = "", arm: str = ""):
    """Find this node's hospital: `data-path` (deployment) or partition id (simulation).
    With an arm, its run config and its own sub-folder (`<site folder>/arms/<arm>`)."""
    _quiet()
    cfg = resolve(dict(context.run_config))
    if arm:
        cfg = arm_config(cfg, arm)
    nc = dict(context.node_config)
    set_threads(int(cfg["client-threads"]) or None)
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"]))
        table = find_table(data_path)
        folder = data_path if data_path.is_dir() else data_path.parent
        name = str(nc.get("site") or folder.name)
        out_dir = site_home(nc, folder)
    elif "partition-id" in nc:
        data_dir = Path(cfg["data-dir"]) if cfg["data-dir"] else default_federation_dir(cfg)
        sites = list_sites(data_dir)
        pid, nparts = int(nc["partition-id"]), int(nc["num-partitions"])
        if nparts != len(sites):
            raise ValueError(
                f"the federation has {nparts} simulated nodes but {data_dir} holds {len(sites)} "
                f"hospitals: run with --federation-config \"num-supernodes={len(sites)}\" "
                "(clinfed simulate sets it for you)"
            )
        name, folder = sites[pid]
        table = find_table(folder)
        run_dir = run_dir or cfg["out-dir"]
        if not run_dir:
            raise ValueError("simulation needs the run folder (sent by the server as 'run-dir')")
        # In simulation a site's private folder lives inside RUN_DIR/sites/<name>.
        out_dir = Path(run_dir) / "sites" / name
    else:
        raise ValueError("node config has neither 'data-path' (deployment) nor 'partition-id' (simulation)")
    policy = effective(cfg, _site_policy(nc, folder), deployment="data-path" in nc)
    if arm:
        from common.arms import parse_arm

        out_dir = Path(out_dir) / "arms" / parse_arm(arm).safe_name
    return name, folder, table, out_dir, cfg, policy


def _may_send_state(cfg: dict, policy: Policy, lm, what: str):
    """Refuse, before training, an update the site's policy or the study's bytes budget forbids:
    full fine-tuning sends every weight of the model each round."""
    from common.models import state_nbytes

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


def _may_train(cfg: dict, policy: Policy, *, sends_adapter: bool, what: str):
    """Refuse, with a reason the server may read, training the site's policy forbids."""
    if policy.dp_required and not cfg["dp"]:
        raise PolicyRefusal(f"the site's policy requires DP-SGD (dp-required or a dp-epsilon budget) but the "
                            f"study runs without it (run config dp = false): the site declines {what}")
    if sends_adapter and not policy.allow_adapters:
        raise PolicyRefusal(f"the site's policy is metrics-only (allow-adapters = false): no adapter leaves, "
                            f"so the site declines {what}")


def _ledger(context: Context, name: str, table: Path):
    """The site's one DP ledger for its table, in its own lasting folder (`site_home`). Nothing
    the server sends (run folder, arm, seeds) keys it, so no new study resets the budget; the
    arms of a comparison and the generative study train on the same patients and add up here."""
    from common.dp import DPLedger

    nc = dict(context.node_config)
    folder = Path(table).parent
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"]))
        folder = data_path if data_path.is_dir() else data_path.parent
    return DPLedger.for_site(site_home(nc, folder), name, table)


def _dp_metrics(info: dict, n_train: int, policy: Policy, prefix: str = "") -> dict:
    """Epsilon of this training call and the site's total so far (aggregates of the site's own accounting)."""
    ev = info.get("dp")
    if not ev:
        return {}
    out = {f"{prefix}dp-epsilon": float(ev["epsilon"]), "dp-epsilon-total": float(ev["epsilon_total"])}
    # delta = 1/n_train would reveal n_train: released only if n_train may be released anyway
    if policy.dp_delta > 0 or n_train >= policy.min_cell_size:
        out["dp-delta"] = float(ev["delta"])
    return out


def _msg_config(msg: Message, key: str) -> str:
    if "config" in msg.content.config_records:
        return str(msg.content["config"].get(key, "") or "")
    return ""


def _prepare(msg: Message, context: Context):
    site, cfg, policy = open_site(context, _msg_config(msg, "run-dir"), _msg_config(msg, "arm"))
    lm = get_model(model_key(cfg))
    privacy.declare(site.name, lm.shapes, policy.allow_adapters, policy.min_cell_size)
    return site, cfg, policy, lm


def _guarded(phase: str):
    """Turn any exception into an error reply whose reason carries no data."""

    def wrap(fn):
        def handler(msg: Message, context: Context) -> Message:
            try:
                return fn(msg, context)
            except Exception as exc:  # noqa: BLE001 - a site must answer, not crash the node
                log.exception("site failed during %s", phase)
                return Message(Error(code=901, reason=privacy.public_reason(exc, phase)), reply_to=msg)

        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler

    return wrap


def _arrays_to_state(rec: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in rec.items()}


def _state_to_arrays(state: dict) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(v) for k, v in state.items()})


@app.query("describe")
@_guarded("describe")
def describe(msg: Message, context: Context) -> Message:
    """Name the site, its split sizes and descriptors (common.metrics.describe_release:
    small and complementary suppression, no value from the table in any key)."""
    if resolve(dict(context.run_config))["task"] == "generative":
        return _describe_generative(msg, context)
    site, cfg, policy, lm = _prepare(msg, context)
    counts = site.describe_metrics(policy.min_cell_size)
    counts.update(policy.to_metrics())
    content = RecordDict({"site": ConfigRecord({"name": site.name}), "metrics": MetricRecord(counts)})
    return Message(content, reply_to=msg)


@app.train()
@_guarded("federated round")
def train(msg: Message, context: Context) -> Message:
    """One federated round: start from the server's adapter, train, send it back."""
    from common.dp import DPBudgetExhausted

    site, cfg, policy, lm = _prepare(msg, context)
    _may_train(cfg, policy, sends_adapter=True, what="the federated round")
    _may_send_state(cfg, policy, lm, "the federated round")
    check_base_identity(msg.content["config"], lm.identity)
    rnd = int(msg.content["config"].get("server-round", 1))
    start = _arrays_to_state(msg.content["arrays"])
    dp = site.dp_settings(policy)
    ledger = _ledger(context, site.name, site.table) if dp is not None else None
    try:
        state, info = site.train(lm, start, int(cfg["local-steps"]), seed_offset=rnd, label=f"round {rnd}",
                                 dp=dp, ledger=ledger)
    except DPBudgetExhausted as err:
        # Declined, not failed: no arrays; the server leaves the site out of this round's average.
        log.warning("site %s: %s", site.name, err)
        return Message(RecordDict({"metrics": MetricRecord({
            "dp-budget-exhausted": 1, "dp-epsilon-total": ledger.epsilon(dp.delta),
            "dp-epsilon-budget": float(dp.budget)})}), reply_to=msg)
    metrics = MetricRecord({
        "num-examples": len(site.splits["train"]),
        "train-loss": info["train_loss"],
        "train-steps": info["steps"],
        "train-seconds": info["seconds"],
        "train-tokens": info["tokens"],
        "train-peak-rss": info["peak_rss_mb"],
        "adapter-hash": wire_hash(state),
        **_dp_metrics(info, len(site.splits["train"]), policy),
    })
    return Message(RecordDict({"arrays": _state_to_arrays(state), "metrics": metrics}), reply_to=msg)


@app.train("personalize")
@_guarded("local and personalized training")
def personalize(msg: Message, context: Context) -> Message:
    """Train the site-held regimes: `local` (from the base), `personalized` (from the
    global adapter), `similarity-weighted` (from the server's similarity-weighted
    mix of other sites' adapters) and, in simulation only, `augmented`. All stay here;
    the local adapter leaves only when the study shares local adapters."""
    from common.dp import DPBudgetExhausted

    site, cfg, policy, lm = _prepare(msg, context)
    _may_train(cfg, policy, sends_adapter=False, what="local and personalized training")
    regs = regimes(cfg)
    local_steps = int(cfg["local-regime-steps"]) or int(cfg["num-server-rounds"]) * int(cfg["local-steps"])
    pers_steps = int(cfg["personalize-steps"])
    metrics = {"num-examples": len(site.splits["train"])}
    content = RecordDict()
    dp = site.dp_settings(policy)
    ledger = _ledger(context, site.name, site.table) if dp is not None else None

    def run(regime, start, steps, offset, extra=None):
        try:
            state, info = site.train(lm, start, steps, seed_offset=offset, label=regime, extra=extra,
                                     dp=dp, ledger=ledger)
        except DPBudgetExhausted as err:  # the regime is not trained (nor scored) at this site
            log.warning("site %s: %s", site.name, err)
            metrics[f"{regime}-dp-budget-exhausted"] = 1
            metrics["dp-epsilon-total"] = ledger.epsilon(dp.delta)
            return None
        site.save_private(lm, regime, state)
        metrics[f"{regime}-train-loss"] = info["train_loss"]
        metrics[f"{regime}-train-seconds"] = info["seconds"]
        metrics[f"{regime}-train-peak-rss"] = info["peak_rss_mb"]
        metrics.update(_dp_metrics(info, len(site.splits["train"]), policy, prefix=f"{regime}-"))
        return state

    if "local" in regs or policy.share_local_adapters:
        local_state = run("local", lm.init_state, local_steps, 10_000)
        if policy.share_local_adapters and local_state is not None:
            try:
                _may_send_state(cfg, policy, lm, "sharing its local adapter")
                content["arrays"] = _state_to_arrays(local_state)
            except PolicyRefusal as err:  # the local adapter stays; the site still trains and is scored
                log.warning("site %s: %s", site.name, err)
    if "personalized" in regs and pers_steps > 0:
        run("personalized", _arrays_to_state(msg.content["global"]), pers_steps, 20_000)
    if "similarity-weighted" in regs and "simw" in msg.content.array_records and pers_steps > 0:
        run("similarity-weighted", _arrays_to_state(msg.content["simw"]), pers_steps, 30_000)
    if "augmented" in regs:
        if not in_simulation(context) or policy.refuse_instance_moving:
            log.warning("regime 'augmented' moves patient records between sites: refused "
                        + ("outside simulation" if not in_simulation(context) else "by the site's policy"))
        else:
            from simulations.augment import borrow

            data_dir = Path(cfg["data-dir"]) if cfg["data-dir"] else default_federation_dir(cfg)
            extra = borrow(site, data_dir, lm, int(cfg["augment-k"]), cfg["augment-space"], int(cfg["seed"]))
            enc = site.encode_notes(extra["note_text"].tolist(), lm.tokenizer)
            run("augmented", lm.init_state, local_steps, 40_000,
                extra=(enc, extra["readmitted_30d"].to_numpy(dtype="int64")))
    content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


SITE_HELD = ("local", "personalized", "similarity-weighted", "augmented")


@app.evaluate()
@_guarded("evaluation")
def evaluate(msg: Message, context: Context) -> Message:
    """Score every regime on the same test items; adapters from other sites or
    clusters (records named `x.<regime>`) are scored for the cross-site matrix."""
    site, cfg, policy, lm = _prepare(msg, context)
    regs = regimes(cfg)
    states = {"base": lm.init_state, "global": _arrays_to_state(msg.content["global"])}
    if "cluster" in regs and "cluster" in msg.content.array_records:
        states["cluster"] = _arrays_to_state(msg.content["cluster"])
    for regime in SITE_HELD:
        state = site.load_private(lm, regime) if regime in regs else None
        if state is not None:
            states[regime] = state
    cross = {name[2:]: _arrays_to_state(rec) for name, rec in msg.content.array_records.items()
             if name.startswith("x.")}
    metrics = site.evaluate(lm, states, k=policy.min_cell_size, subgroups=bool(cfg["subgroups"]), cross=cross)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate("compare")
@_guarded("comparison of arms")
def evaluate_compare(msg: Message, context: Context) -> Message:
    """Paired differences between the arms of a comparison, from the per-item scores each arm
    left in this site's folder at its evaluation (common.compare): per pair of arms, regime and
    split, the AUC difference and its paired-bootstrap interval, with small-cell suppression."""
    from common.arms import parse_arms
    from common.compare import compare_metrics
    from client.site import site_seed

    run_dir = _msg_config(msg, "run-dir")
    name, _, _, root_out, cfg, policy = locate_site(context, run_dir)
    arms = parse_arms(_msg_config(msg, "compare-arms"))
    listed = [a.name for a in parse_arms(cfg.get("arms", ""))]
    unknown = [a.name for a in arms if a.name not in listed]
    if unknown:
        from common.config import ConfigError

        raise ConfigError(f"arm(s) {', '.join(unknown)} are not among the study's arms (run config 'arms')")
    dirs = [Path(root_out) / "arms" / a.safe_name for a in arms]
    privacy.declare(name, {}, policy.allow_adapters, policy.min_cell_size)
    metrics = compare_metrics(dirs, k=policy.min_cell_size, n_boot=int(cfg["bootstrap"]),
                              seed=site_seed(cfg, name))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# ----------------------------------------------------------------- generative study
_GEN_SITES: dict = {}


def _prepare_gen(msg: Message, context: Context):
    from client.gensite import GenSite, get_decoder

    run_dir = str(msg.content["config"].get("run-dir", "")) if "config" in msg.content.config_records else ""
    name, folder, table, out_dir, cfg, policy = locate_site(context, run_dir)
    key = (name, str(folder)) + tuple(cfg[k] for k in ("seed", "gen-tasks", "gen-holdout-task", "gen-train-items",
                                                        "gen-eval-items", "gen-max-words"))
    if key not in _GEN_SITES:
        _GEN_SITES.clear()
        _GEN_SITES[key] = GenSite(name, folder, table, cfg)
    gsite = _GEN_SITES[key]
    dec = get_decoder(cfg)
    privacy.declare(name, dec.shapes, policy.allow_adapters, policy.min_cell_size)
    return gsite, cfg, policy, dec, out_dir


def _describe_generative(msg: Message, context: Context) -> Message:
    gsite, cfg, policy, dec, _ = _prepare_gen(msg, context)
    n = gsite.n_train()
    metrics = {"site-n-train": n} if n >= policy.min_cell_size else {}
    metrics.update(policy.to_metrics())
    return Message(RecordDict({"site": ConfigRecord({"name": gsite.name}), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _self_rejected_share(info: dict, k: int) -> dict:
    """The share of DPO pairs whose rejected answer was the model's own, released only
    when the stage used at least k pairs (an aggregate of training items)."""
    pairs = int(info.get("pairs", 0))
    return {"dpo-self-rejected-share": info["self_rejected"] / pairs} if "self_rejected" in info and pairs >= k else {}


def _gen_reply(msg, gsite, state, info, policy: Policy) -> Message:
    metrics = MetricRecord({"num-examples": gsite.n_train(), "train-loss": info["train_loss"],
                            "train-steps": info["steps"], "train-seconds": info["seconds"],
                            "adapter-hash": wire_hash(state),
                            **_self_rejected_share(info, policy.min_cell_size),
                            **_dp_metrics(info, gsite.n_train(), policy)})
    return Message(RecordDict({"arrays": _state_to_arrays(state), "metrics": metrics}), reply_to=msg)


def _budget_spent(msg, ledger, dp, name: str, err) -> Message:
    """Declined, not failed: no arrays; the server leaves the site out of this round's average."""
    log.warning("site %s: %s", name, err)
    return Message(RecordDict({"metrics": MetricRecord({
        "dp-budget-exhausted": 1, "dp-epsilon-total": ledger.epsilon(dp.delta),
        "dp-epsilon-budget": float(dp.budget)})}), reply_to=msg)


@app.train("sft")
@_guarded("federated SFT round")
def train_sft(msg: Message, context: Context) -> Message:
    """One federated SFT round on the site's instruction mixture (DP-SGD with `dp`)."""
    from common.dp import DPBudgetExhausted

    gsite, cfg, policy, dec, out_dir = _prepare_gen(msg, context)
    _may_train(cfg, policy, sends_adapter=True, what="the federated SFT round")
    check_base_identity(msg.content["config"], dec.identity)
    rnd = int(msg.content["config"].get("server-round", 1))
    dp = gsite.dp_settings(policy)
    ledger = _ledger(context, gsite.name, gsite.table) if dp is not None else None
    try:
        state, info = gsite.sft(dec, _arrays_to_state(msg.content["arrays"]), int(cfg["sft-steps"]), rnd,
                                dp=dp, ledger=ledger, label=f"sft round {rnd}")
    except DPBudgetExhausted as err:
        return _budget_spent(msg, ledger, dp, gsite.name, err)
    return _gen_reply(msg, gsite, state, info, policy)


@app.train("dpo")
@_guarded("federated DPO round")
def train_dpo(msg: Message, context: Context) -> Message:
    """One federated DPO round; the reference policy is the adapter received (see common.instruct)."""
    gsite, cfg, policy, dec, _ = _prepare_gen(msg, context)
    _may_train(cfg, policy, sends_adapter=True, what="the federated DPO round")
    check_base_identity(msg.content["config"], dec.identity)
    rnd = int(msg.content["config"].get("server-round", 1))
    state, info = gsite.dpo(dec, _arrays_to_state(msg.content["arrays"]), int(cfg["dpo-steps"]), 100 + rnd)
    return _gen_reply(msg, gsite, state, info, policy)


@app.train("gen_local")
@_guarded("local and personalized instruction tuning")
def train_gen_local(msg: Message, context: Context) -> Message:
    """`local`: SFT then DPO from the base, at the site only; `personalized`: the
    global DPO adapter fine-tuned with SFT at the site. All stay here."""
    from common.models import save_adapter

    from common.dp import DPBudgetExhausted

    gsite, cfg, policy, dec, out_dir = _prepare_gen(msg, context)
    _may_train(cfg, policy, sends_adapter=False, what="local and personalized instruction tuning")
    rounds = int(cfg["num-server-rounds"])
    dp = gsite.dp_settings(policy)
    ledger = _ledger(context, gsite.name, gsite.table) if dp is not None else None
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
        metrics.update(_dp_metrics(info, gsite.n_train(), policy, prefix=f"{regime}-"))
        return state, info

    local_sft, _ = sft("local", dec.init_state, rounds * int(cfg["sft-steps"]), 10_000)
    if local_sft is not None:
        adapters["local-sft"] = local_sft
        if dp is None:  # DPO has no DP path (common.instruct): with dp the local regime stops at SFT
            adapters["local-dpo"], i2 = gsite.dpo(dec, local_sft,
                                                  max(1, int(cfg["dpo-rounds"])) * int(cfg["dpo-steps"]), 20_000)
            metrics["local-train-loss"] = i2["train_loss"]
            metrics.update({f"local-{k}": v for k, v in _self_rejected_share(i2, policy.min_cell_size).items()})
    pers, i3 = sft("personalized", _arrays_to_state(msg.content["global"]), int(cfg["sft-steps"]), 30_000)
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
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate("gen")
@_guarded("generative evaluation")
def evaluate_gen(msg: Message, context: Context) -> Message:
    """Score each task per stage and regime on the site's test items (aggregates only)."""
    from common.models import read_adapter

    gsite, cfg, policy, dec, out_dir = _prepare_gen(msg, context)
    cells = {("base", "base"): dec.init_state,
             ("sft", "global"): _arrays_to_state(msg.content["global-sft"]),
             ("dpo", "global"): _arrays_to_state(msg.content["global-dpo"])}
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
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
