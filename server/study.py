"""The study protocol the ServerApp runs, phase by phase.

1. wait (bounded) for the sites and ask each for its name and split sizes;
2. R federated rounds: every site trains from the global adapter; the
   strategy (Flower's FedAvg, weighted by training examples) aggregates the
   adapter + head arrays; the round's global adapter is saved in PEFT format;
3. `personalize`: each site trains its `local` and `personalized` adapters,
   which stay at the site;
4. `evaluate`: each site scores every regime on the same test items and
   returns aggregate metrics, kept per site (Flower would average them away).
Everything written goes to RUN_DIR: metrics.csv, sites.csv, run.json,
adapters/global/, report.html.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from common.config import gen_tasks, regimes
from common.console import progress_line
from common.metrics import METRIC_COLUMNS, cell_rows, subgroup_name
from common.models import save_adapter, state_hash, state_nbytes
from common.policy import Policy
from server.checkpoint import Checkpoint, write_json

log = logging.getLogger("clinfed.server")

SITE_HELD = ("local", "personalized", "similarity-weighted", "augmented")
OUTLIER_FACTOR = 10.0  # an update 10x the round's median size is treated as corrupt or hostile


class StudyError(RuntimeError):
    """The study cannot go on (too few sites, a phase that failed everywhere)."""


def exchange(grid, messages, timeout: float) -> list[Message]:
    """Send messages and collect the replies that arrive within `timeout` seconds.

    Flower's own `send_and_receive` (HttpGrid, flwr 1.41) sleeps 3 s between polls, so a
    phase whose sites answer in one second still waited 1.5 s on average, every round
    (`clinfed bench overhead`). The same public Grid calls, polled with a short back-off
    (50 ms growing to 0.5 s while nothing arrives) instead."""
    msgs = list(messages)
    if not msgs:
        return []
    pending = set(grid.push_messages(msgs))
    replies: list[Message] = []
    end = time.monotonic() + float(timeout)
    wait = 0.05
    while pending:
        got = list(grid.pull_messages(pending))
        if got:
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            wait = 0.05
            continue
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(0.5, wait * 1.5)
    return replies


def _impute_withheld_shares(X: np.ndarray, feats: list[str], col_mean: np.ndarray) -> np.ndarray:
    """Fill a site's withheld band shares from what it did release: the withheld bands of a
    grouping together hold 1 minus its released shares (disclosure control releases shares so
    that this remainder is nobody or at least k patients), split in proportion to the other
    sites' mean shares of those bands. A withheld complement (a band withheld only to protect
    a small one) thus stays near its true size instead of jumping to the federation's mean,
    which would move the site in descriptor space and regroup the clusters."""
    X = X.copy()
    groups: dict[str, list[int]] = {}
    for j, f in enumerate(feats):
        if "=" in f:
            groups.setdefault(f.split("=", 1)[0], []).append(j)
    for i in range(X.shape[0]):
        for cols in groups.values():
            missing = [j for j in cols if np.isnan(X[i, j])]
            if not missing or len(missing) == len(cols):
                continue
            rest = max(0.0, 1.0 - float(np.nansum(X[i, cols])))
            w = np.array([max(0.0, float(col_mean[j])) for j in missing])
            w = w / w.sum() if w.sum() > 0 else np.full(len(missing), 1.0 / len(missing))
            X[i, missing] = rest * w
    return X


def _say(text: str):
    """Progress the user sees in the streamed ServerApp log."""
    from flwr.supercore import log as flwr_log

    flwr_log(logging.INFO, "[clinfed] %s", text)


def versions() -> dict:
    import flwr
    import peft
    import sklearn
    import torch
    import transformers

    return {"python": platform.python_version(), "flwr": flwr.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "scikit-learn": sklearn.__version__, "pandas": pd.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def _arrays_bytes(rec: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in rec.values()))


class Study:
    def __init__(self, grid, cfg: dict, run_dir: Path, arm=None, site_run_dir: Path | None = None):
        """`arm` (common.arms.Arm): this study is one arm of a comparison; every message names it
        and `cfg` is the arm's run config. `site_run_dir`: the run folder the sites are told
        (a comparison's top RUN_DIR; each arm writes its own files to `run_dir`)."""
        self.grid = grid
        self.cfg = cfg
        self.arm = arm
        self.run_dir = Path(run_dir)
        self.site_run_dir = Path(site_run_dir) if site_run_dir is not None else self.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sites: dict[int, str] = {}
        self.site_counts: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.rounds: list[dict] = []
        self.errors: list[str] = []
        self.phase_failures: dict[str, dict[str, str]] = {}
        self.timings: dict[str, float] = {}
        self.t0 = time.time()
        self.run = {
            "status": "running", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": cfg, "model": cfg["model"], "seed": cfg["seed"], "versions": versions(),
        }
        self.regimes = regimes(cfg)
        self.descriptors: dict[str, dict[str, float]] = {}
        self.last_states: dict[str, dict[str, dict]] = {"global": {}, "cluster": {}}
        self.shared_local: dict[str, ArrayRecord] = {}
        self.driver_rows: list[dict] = []
        self._lock_run_dir()  # before anything in RUN_DIR is touched
        self.ckpt = Checkpoint(self.run_dir, cfg)
        if not cfg.get("resume"):
            self.ckpt.clear()  # a new study in an old RUN_DIR must not resume the old one later

    # ------------------------------------------------------------ messaging
    def _config(self, **extra) -> ConfigRecord:
        arm = {"arm": self.arm.name} if self.arm is not None else {}
        return ConfigRecord({"run-dir": str(self.site_run_dir.resolve()), **arm, **extra})

    def _send(self, nodes, message_type: str, arrays: ArrayRecord | None, phase: str,
              **config) -> dict[str, Message]:
        """Send one message per node; return replies by site, recording failures."""
        msgs = []
        for node in nodes:
            content = RecordDict({"config": self._config(**config)})
            if arrays is not None:
                content["arrays"] = arrays
            msgs.append(Message(content=content, dst_node_id=node, message_type=message_type))
        replies = list(exchange(self.grid, msgs, timeout=float(self.cfg["round-timeout"])))
        return self._collect(nodes, replies, phase)

    def _collect(self, nodes, replies, phase: str) -> dict[str, Message]:
        ok: dict[str, Message] = {}
        failures: dict[str, str] = {}
        answered = set()
        for rep in replies:
            node = rep.metadata.src_node_id
            answered.add(node)
            site = self.sites.get(node, f"node-{node}")
            if rep.has_error():
                failures[site] = rep.error.reason or f"error code {rep.error.code}"
            else:
                ok[site] = rep
        for node in nodes:
            if node not in answered:
                failures[self.sites.get(node, f"node-{node}")] = (
                    f"no reply within round-timeout={self.cfg['round-timeout']:.0f}s")
        for site, why in sorted(failures.items()):
            _say(f"{phase}: site {site} failed: {why}")
            self.errors.append(f"{phase}: site {site}: {why}")
        self.phase_failures[phase] = failures
        return dict(sorted(ok.items()))

    def _checked(self, ok: dict[str, Message], reference: dict, phase: str,
                 starts: dict[str, ArrayRecord] | None = None) -> dict[str, Message]:
        """Drop updates whose keys, shapes or values do not fit the adapter, or whose size
        (distance from the adapter the site started from) is far outside the round's, naming the site."""
        from common.models import AdapterMismatch, check_adapter_state, wire_hash

        kept, norms = {}, {}
        for site, rep in ok.items():
            try:
                if "arrays" not in rep.content.array_records:
                    raise AdapterMismatch(f"site {site} sent no adapter")
                state = {k: v.numpy() for k, v in rep.content["arrays"].items()}
                check_adapter_state(reference, state, who=f"update from site {site}")
                sent_hash = rep.content["metrics"].get("adapter-hash") if "metrics" in rep.content.metric_records else None
                if sent_hash is not None and int(sent_hash) != wire_hash(state):
                    raise AdapterMismatch(f"update from site {site}: the arrays that arrived do not match the "
                                          "hash the site computed before sending (changed in transit)")
                kept[site] = rep
                if starts and site in starts:
                    start = starts[site]
                    norms[site] = float(np.sqrt(sum(float(((state[k] - start[k].numpy()) ** 2).sum()) for k in state)))
            except AdapterMismatch as err:
                self._reject(phase, site, str(err))
        if len(norms) >= 3:
            values = np.array(list(norms.values()))
            med = float(np.median(values))
            mad = float(np.median(np.abs(values - med))) or med * 0.1
            for site, norm in norms.items():
                if norm > max(OUTLIER_FACTOR * med, med + 3 * OUTLIER_FACTOR * mad):
                    self._reject(phase, site, f"update from site {site}: norm {norm:.3g} is far outside this "
                                              f"round's (median {med:.3g}); left out of aggregation")
                    kept.pop(site, None)
        return kept

    def _reject(self, phase: str, site: str, why: str):
        self.phase_failures.setdefault(phase, {})[site] = f"rejected: {why}"
        self.errors.append(f"{phase}: {why}")
        _say(f"{phase}: {why}")

    def wait_for_nodes(self) -> list[int]:
        """Bounded wait for sites: never forever, and a clear message when too few came."""
        need = int(self.cfg["min-sites"])
        want = int(self.cfg["expected-sites"])
        deadline = time.time() + float(self.cfg["node-wait-timeout"])
        last = -1
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if want and len(nodes) >= want:
                return nodes
            if not want and len(nodes) >= need and len(nodes) == last:
                return nodes
            if time.time() > deadline:
                if len(nodes) >= need:
                    _say(f"node-wait-timeout: starting with {len(nodes)} of {want} expected sites")
                    self.errors.append(f"only {len(nodes)} of {want} expected sites connected")
                    return nodes
                raise StudyError(
                    f"only {len(nodes)} site(s) connected within node-wait-timeout="
                    f"{self.cfg['node-wait-timeout']:.0f}s; the study needs min-sites={need}")
            if len(nodes) != last:
                _say(f"waiting for sites: {len(nodes)} connected (need {max(need, want)})")
            last = len(nodes)
            time.sleep(1.0 if nodes else 0.5)

    # --------------------------------------------------------------- phases
    def describe(self, nodes):
        replies = self._send(nodes, "query.describe", None, "describe")
        by_node = {}
        for rep in replies.values():
            name = str(rep.content["site"]["name"])
            by_node[rep.metadata.src_node_id] = name
            counts = dict(rep.content["metrics"])
            self.site_counts[name] = {s: counts.get(f"site-n-{s}") for s in ("train", "val", "test", "temporal")}
            # region bands travel as codes; the study names them from its own vocabulary
            self.descriptors[name] = {subgroup_name(k[5:], self.cfg.get("region-vocabulary", "")): float(v)
                                      for k, v in counts.items() if k.startswith("desc/")}
            self._note_policy(name, counts)
        names = list(by_node.values())
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise StudyError(f"two nodes claim the same site name(s): {sorted(dup)}")
        self.sites = dict(sorted(by_node.items(), key=lambda kv: kv[1]))
        if len(self.sites) < int(self.cfg["min-sites"]):
            raise StudyError(f"only {len(self.sites)} site(s) could describe themselves; need min-sites="
                             f"{self.cfg['min-sites']}. Failures: {self.phase_failures.get('describe')}")
        _say(f"{len(self.sites)} sites: " + ", ".join(
            f"{n} (train {self.site_counts[n]['train'] or '<k'})" for n in self.sites.values()))

    def federated_rounds(self, lm, groups: dict[str, list[int]], phase: str, message_type: str = "train",
                         start: ArrayRecord | None = None, rounds: int | None = None) -> dict[str, ArrayRecord]:
        """R rounds of FedAvg within each group of sites (one group = the global adapter).

        Groups train side by side in the same rounds; each has its own Flower
        FedAvg instance. Each round's adapter is saved in PEFT format.
        """
        init = start if start is not None else ArrayRecord({k: Array(v) for k, v in lm.init_state.items()})
        groups = self._adapter_groups(groups, phase)
        arrays = {g: init for g in groups}
        strategies = {g: self._strategy(len(n)) for g, n in groups.items()}
        group_of = {node: g for g, nodes in groups.items() for node in nodes}
        R = int(self.cfg["num-server-rounds"]) if rounds is None else int(rounds)
        done, saved = self.ckpt.rounds_done(phase)
        for g, state in saved.items():
            if g in arrays:
                arrays[g] = ArrayRecord({k: Array(v) for k, v in state.items()})
        if done:
            _say(f"{phase}: rounds 1-{done} restored from the checkpoint")
        for rnd in range(done + 1, R + 1):
            t = time.time()
            arrays_sent = {node: arrays[group_of[node]] for node in group_of}
            msgs = [Message(RecordDict({"arrays": arrays[group_of[node]],
                                        "config": self._config(**{"server-round": rnd, "base-model": lm.identity})}),
                            dst_node_id=node, message_type=message_type) for node in sorted(group_of)]
            sent = sum(_arrays_bytes(arrays[group_of[n]]) for n in group_of)
            replies = list(exchange(self.grid, msgs, timeout=float(self.cfg["round-timeout"])))
            label = f"{phase} round {rnd}"
            starts = {self.sites[n]: arrays[group_of[n]] for n in group_of}
            ok, declined = self._declined(self._collect(sorted(group_of), replies, label), label)
            ok = self._checked(ok, lm.init_state, label, starts)
            if len(ok) + len(declined) < min(int(self.cfg["min-sites"]), len(group_of)):
                raise StudyError(f"{label}: {len(ok)} site(s) answered, fewer than min-sites={self.cfg['min-sites']}")
            for g, nodes in groups.items():
                names = [self.sites[n] for n in nodes]
                g_ok = [rep for site, rep in ok.items() if site in names]
                if not g_ok:
                    continue  # nobody in this group answered: its adapter stays as it was
                self._prime_update_dp(strategies[g], arrays[g], len(g_ok))
                new, _ = strategies[g].aggregate_train(rnd, g_ok)
                if new is None:
                    raise StudyError(f"{label}: aggregation of group {g} produced no adapter")
                arrays[g] = new
                folder = self.run_dir / "adapters" / g / f"round-{rnd:03d}"
                save_adapter(lm.model, {k: v.numpy() for k, v in new.items()}, folder,
                             meta={"regime": phase, "group": g, "round": rnd, "base_model": lm.identity,
                                   "sites": [s for s in names if s in ok]})
            for site, rep in ok.items():
                self.last_states.setdefault(phase, {})[site] = {k: v.numpy() for k, v in rep.content["arrays"].items()}
            received = sum(_arrays_bytes(r.content["arrays"]) for r in ok.values())
            site_bytes = {self.sites[n]: {"sent": _arrays_bytes(arrays_sent[n]),
                                          "received": _arrays_bytes(ok[self.sites[n]].content["arrays"])
                                          if self.sites[n] in ok else 0} for n in group_of}
            costs = {s: {k: float(r.content["metrics"][m]) for k, m in (("train_seconds", "train-seconds"),
                                                                        ("peak_rss_mb", "train-peak-rss"))
                         if m in r.content["metrics"]} for s, r in ok.items()}
            losses = {s: float(r.content["metrics"]["train-loss"]) for s, r in ok.items()}
            own = {s: float(r.content["metrics"]["dpo-self-rejected-share"]) for s, r in ok.items()
                   if "dpo-self-rejected-share" in r.content["metrics"]}
            self.rounds.append({
                "phase": phase, "round": rnd, "sites": list(ok), "failures": self.phase_failures[label],
                "bytes_sent": sent, "bytes_received": received, "site_bytes": site_bytes, "site_costs": costs,
                "train_loss": losses,
                **({"dpo_self_rejected_share": own} if own else {}),
                **self._dp_round(ok, declined, label),
                "seconds": round(time.time() - t, 2),
                "adapter_hash": {g: state_hash({k: v.numpy() for k, v in a.items()}) for g, a in arrays.items()},
            })
            _say(progress_line(f"{phase} round", rnd, R, f"{len(ok)} sites, mean loss "
                               f"{np.mean(list(losses.values())) if losses else float('nan'):.3f}, "
                               f"{time.time() - t:.0f}s"))
            self.ckpt.save_round(phase, rnd, {g: {k: v.numpy() for k, v in a.items()} for g, a in arrays.items()},
                                 {s: self.last_states[phase][s] for s in ok}, self._ckpt_state())
            self.write_run()
        for g, a in arrays.items():
            save_adapter(lm.model, {k: v.numpy() for k, v in a.items()}, self.run_dir / "adapters" / g / "final",
                         meta={"regime": phase, "group": g, "round": R, "base_model": lm.identity})
        self._note_update_dp(phase, R)
        return arrays

    # ------------------------------------------------------------- privacy
    def _note_policy(self, site: str, released: dict):
        """Each site's effective policy, as it reported it in `describe` (flags and numbers only)."""
        pol = Policy.from_metrics(released)
        if pol is None:
            return
        if not hasattr(self, "site_policies"):
            self.site_policies = {}
        self.site_policies[site] = pol
        self.run.setdefault("site_policies", {})[site] = asdict(pol)

    def _adapter_groups(self, groups: dict[str, list[int]], phase: str) -> dict[str, list[int]]:
        """Metrics-only sites (policy allow-adapters = false) are sent no train message: they
        train their site-held regimes at home and are evaluated like every other site."""
        pols = getattr(self, "site_policies", {})
        held = {n for n in self.sites if n in {m for ns in groups.values() for m in ns}
                and pols.get(self.sites[n]) is not None and not pols[self.sites[n]].allow_adapters}
        if not held:
            return groups
        names = sorted(self.sites[n] for n in held)
        self.run.setdefault("metrics_only", {})[phase] = names
        _say(f"{phase}: metrics-only site(s) {', '.join(names)} (policy allow-adapters = false) are not "
             "sent training rounds; they train at home and are evaluated")
        kept = {g: [n for n in nodes if n not in held] for g, nodes in groups.items()}
        for g in (g for g, nodes in kept.items() if not nodes):
            self.errors.append(f"{phase}: group {g} holds only metrics-only sites; its adapter stays untrained")
        return kept

    def _strategy(self, n_sites: int):
        """FedAvg, wrapped in Flower's server-side fixed-clipping DP when `update-dp-noise` > 0.
        The wrapper sizes its noise (noise x clip / m) for equally weighted sites, so under it
        FedAvg weights by `train-steps`, which is the same at every site."""
        kw = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_sites,
                  min_available_nodes=n_sites, min_evaluate_nodes=0)
        noise = float(self.cfg.get("update-dp-noise", 0.0))
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.ERROR)  # "federated evaluation will be skipped": the study evaluates itself
        try:
            if noise <= 0:
                return FedAvg(**kw)
            return DifferentialPrivacyServerSideFixedClipping(
                FedAvg(**kw, weighted_by_key="train-steps"), noise_multiplier=noise,
                clipping_norm=float(self.cfg["update-dp-clip"]), num_sampled_clients=max(1, n_sites))
        finally:
            flwr_logger.setLevel(level)

    @staticmethod
    def _prime_update_dp(strategy, start: ArrayRecord, n_replies: int):
        """The wrapper clips each update against the arrays sent this round, which it learns in
        its `configure_train`; this study addresses sites itself, so it is told here, with the
        number of updates actually averaged (the noise is sized for them)."""
        if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
            strategy.current_arrays = start
            strategy.num_sampled_clients = max(1, n_replies)

    def _note_update_dp(self, phase: str, rounds: int):
        noise = float(self.cfg.get("update-dp-noise", 0.0))
        if noise <= 0:
            return
        from common.dp import rdp_epsilon

        self.run.setdefault("update_dp", {})[phase] = {
            "noise_multiplier": noise, "clipping_norm": float(self.cfg["update-dp-clip"]), "rounds": rounds,
            "weighting": "equal (train-steps)", "delta": 1e-5,
            # site-level (one hospital's whole update), every site in every round: no sampling amplification
            "epsilon": rdp_epsilon([(noise, 1.0, rounds)], 1e-5),
        }

    def _declined(self, ok: dict[str, Message], label: str) -> tuple[dict[str, Message], dict[str, str]]:
        """Sites that answered without an update because their DP budget is spent: recorded
        with the reason, left out of the average, not counted as failures."""
        declined = {}
        for site, rep in list(ok.items()):
            m = dict(rep.content["metrics"]) if "metrics" in rep.content.metric_records else {}
            if m.get("dp-budget-exhausted") and "arrays" not in rep.content.array_records:
                declined[site] = (f"declined: DP budget exhausted (epsilon so far {float(m.get('dp-epsilon-total', 0)):.3g}"
                                  f", budget {float(m.get('dp-epsilon-budget', 0)):.3g})")
                ok.pop(site)
                self._note_dp(site, m, label)
                _say(f"{label}: site {site} {declined[site]}")
        return ok, declined

    def _note_dp(self, site: str, m: dict, phase: str):
        """A site's released DP accounting: epsilon per training call and its running total."""
        if "dp-epsilon-total" not in m:
            return
        d = self.run.setdefault("dp", {}).setdefault(site, {"epsilon_total": 0.0, "by_phase": {}, "stopped": []})
        d["epsilon_total"] = max(d["epsilon_total"], float(m["dp-epsilon-total"]))
        if "dp-delta" in m:
            d["delta"] = float(m["dp-delta"])
        for key, val in m.items():
            if key.endswith("dp-epsilon"):
                d["by_phase"][f"{phase}" + (f" {key[:-len('-dp-epsilon')]}" if key != "dp-epsilon" else "")] = float(val)
            elif key.endswith("dp-budget-exhausted"):
                d["stopped"].append(f"{phase}" + (f" {key[:-len('-dp-budget-exhausted')]}"
                                                   if key != "dp-budget-exhausted" else ""))

    def _dp_round(self, ok: dict[str, Message], declined: dict[str, str], label: str) -> dict:
        out: dict = {"declined": declined} if declined else {}
        eps = {}
        for site, rep in ok.items():
            m = dict(rep.content["metrics"])
            if "dp-epsilon" in m:
                eps[site] = {"epsilon": float(m["dp-epsilon"]), "epsilon_total": float(m["dp-epsilon-total"])}
                self._note_dp(site, m, label)
        if eps:
            out["dp"] = eps
        return out

    # ------------------------------------------------------- site similarity
    def descriptor_matrix(self) -> tuple[list[str], np.ndarray, list[str]]:
        """Standardized site descriptors (size excluded: similarity is about case mix)."""
        names = list(self.sites.values())
        feats = sorted({k for s in names for k in self.descriptors.get(s, {}) if k != "n"})
        X = np.array([[self.descriptors.get(s, {}).get(f, np.nan) for f in feats] for s in names], dtype=float)
        if X.size == 0:
            return names, np.zeros((len(names), 0)), []
        col_mean = np.nanmean(np.where(np.isnan(X), np.nan, X), axis=0)
        X = _impute_withheld_shares(X, feats, np.nan_to_num(col_mean))
        X = np.where(np.isnan(X), np.nan_to_num(col_mean), X)
        sd = X.std(axis=0)
        keep = sd > 1e-12
        X = (X[:, keep] - X[:, keep].mean(axis=0)) / sd[keep]
        return names, X, [f for f, k in zip(feats, keep) if k]

    def make_clusters(self) -> dict[str, list[int]] | None:
        from sklearn.cluster import KMeans

        names, X, feats = self.descriptor_matrix()
        k = int(self.cfg["clusters"])
        if not 2 <= k < len(names) or X.shape[1] == 0:
            self.errors.append(f"cluster regime skipped: needs 2 <= clusters < sites (clusters={k}, sites={len(names)})")
            return None
        labels = KMeans(n_clusters=k, n_init=10, random_state=int(self.cfg["seed"])).fit_predict(X)
        assignment = {s: f"c{int(c)}" for s, c in zip(names, labels)}
        self.run["clusters"] = {"method": "kmeans on standardized site descriptors", "k": k,
                                "features": feats, "assignment": assignment}
        node_of = {v: n for n, v in self.sites.items()}
        groups: dict[str, list[int]] = {}
        for s, c in assignment.items():
            groups.setdefault(f"cluster-{c}", []).append(node_of[s])
        _say("clusters: " + "; ".join(f"{g}: {', '.join(self.sites[n] for n in ns)}" for g, ns in sorted(groups.items())))
        return groups

    def similarity_starts(self) -> dict[str, dict[str, np.ndarray]]:
        """Per site, the other sites' last-round adapters averaged with weights that
        fall with descriptor distance (exp(-d / median d)). Moves no record: it reuses
        adapters the sites already sent in the global rounds."""
        names, X, _ = self.descriptor_matrix()
        states = self.last_states["global"]
        starts, weights = {}, {}
        D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)) if X.size else np.zeros((len(names),) * 2)
        off = D[~np.eye(len(names), dtype=bool)]
        tau = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
        for i, s in enumerate(names):
            others = [(j, o) for j, o in enumerate(names) if o != s and o in states]
            if not others:
                continue
            w = np.array([np.exp(-D[i, j] / tau) for j, _ in others])
            w = w / w.sum()
            weights[s] = {o: round(float(x), 4) for (_, o), x in zip(others, w)}
            keys = states[others[0][1]].keys()
            starts[s] = {k: sum(wi * states[o][k] for wi, (_, o) in zip(w, others)).astype(np.float32) for k in keys}
        self.run["similarity_weights"] = weights
        return starts

    # --------------------------------------------------------------- phases
    def _ckpt_state(self) -> dict:
        return {"rounds": self.rounds, "errors": self.errors, "phase_failures": self.phase_failures,
                "clusters": self.run.get("clusters"), "similarity_weights": self.run.get("similarity_weights")}

    def restore(self):
        """Continue from RUN_DIR's checkpoint: the rounds, failures and adapters so far.
        Site-held adapters are on the sites' disks already."""
        saved = self.ckpt.load()
        self.rounds, self.errors = list(saved["rounds"]), list(saved["errors"])
        self.phase_failures.update(saved["phase_failures"])
        for key in ("clusters", "similarity_weights"):
            if saved.get(key) is not None:
                self.run[key] = saved[key]
        for phase in saved["phases"]:
            self.last_states[phase] = self.ckpt.last_updates(phase)
        self.shared_local = {s: ArrayRecord({k: Array(v) for k, v in st.items()})
                             for s, st in self.ckpt.shared_local().items()}
        where = {p: i["round"] for p, i in saved["phases"].items()}
        self.run.setdefault("resumed", []).append(
            {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds_done": where,
             "steps_done": list(saved["done"])})
        _say(f"resuming {self.run_dir}: completed rounds {where}, steps done {saved['done'] or 'none'}")

    def personalize(self, global_arrays: ArrayRecord):
        if self.ckpt.is_done("personalize"):
            _say("site-held adapters were trained before the restart; the sites keep them")
            return
        starts = self.similarity_starts() if "similarity-weighted" in self.regimes else {}
        msgs = []
        for node, site in self.sites.items():
            content = RecordDict({"global": global_arrays, "config": self._config()})
            if site in starts:
                content["simw"] = ArrayRecord({k: Array(v) for k, v in starts[site].items()})
            msgs.append(Message(content, dst_node_id=node, message_type="train.personalize"))
        replies = list(exchange(self.grid, msgs, timeout=float(self.cfg["round-timeout"])))
        ok = self._collect(list(self.sites), replies, "personalize")
        for site, rep in ok.items():
            if "arrays" in rep.content.array_records:
                self.shared_local[site] = rep.content["arrays"]
            m = dict(rep.content["metrics"])
            self._note_dp(site, m, "personalize")
            self.run.setdefault("site_held", {})[site] = {
                k: float(v) for k, v in m.items() if k.endswith(("-train-seconds", "-train-peak-rss"))}
        self.ckpt.save_done("personalize", self._ckpt_state(),
                            {s: {k: v.numpy() for k, v in a.items()} for s, a in self.shared_local.items()})
        _say(progress_line("site-held training", 1, 1, f"{', '.join(r for r in self.regimes if r in SITE_HELD)} "
                                                       f"at {len(ok)} sites"))

    def evaluate(self, global_arrays: ArrayRecord, clusters: dict[str, ArrayRecord]):
        assignment = (self.run.get("clusters") or {}).get("assignment", {})
        msgs = []
        for node, site in self.sites.items():
            content = RecordDict({"global": global_arrays, "config": self._config()})
            if assignment.get(site) and f"cluster-{assignment[site]}" in clusters:
                content["cluster"] = clusters[f"cluster-{assignment[site]}"]
            # the site's own cluster and local adapters are already scored as `cluster` and `local`
            for g, arr in clusters.items():
                if g != f"cluster-{assignment.get(site)}":
                    content[f"x.cluster@{g.removeprefix('cluster-')}"] = arr
            for origin, arr in self.shared_local.items():
                if origin != site:
                    content[f"x.local@{origin}"] = arr
            msgs.append(Message(content, dst_node_id=node, message_type="evaluate"))
        replies = list(exchange(self.grid, msgs, timeout=float(self.cfg["round-timeout"])))
        ok = self._collect(list(self.sites), replies, "evaluate")
        for site, rep in ok.items():
            m = dict(rep.content["metrics"])
            rows = cell_rows(site, m, self.cfg.get("region-vocabulary", ""))
            self.rows.extend(rows)
            # diagonal of the cross-site matrix: the site's own local / cluster adapter
            alias = {}
            if site in self.shared_local:
                alias["local"] = f"local@{site}"
            if assignment.get(site) and clusters:
                alias["cluster"] = f"cluster@{assignment[site]}"
            self.rows.extend({**r, "regime": alias[r["regime"]]} for r in rows
                             if r["regime"] in alias and r["subgroup"] == "all")
            if "drv-n" in m:
                for key, val in m.items():
                    if key.startswith("drv/"):
                        self.driver_rows.append({"site": site, "driver": key[4:], "importance": val,
                                                 "n": int(m["drv-n"])})
        _say(progress_line("evaluation", 1, 1, f"{len(ok)} sites reported"))
        if not ok:
            raise StudyError("no site returned evaluation metrics")

    # -------------------------------------------------------------- outputs
    def dp_rows(self) -> list[dict]:
        """The sites' released DP accounting as metrics.csv rows (split `train`): epsilon of
        each training call (`dp_epsilon`, note = the call) and the running total."""
        rows = []
        for site, d in sorted(dict(self.run.get("dp") or {}).items()):
            base = {"site": site, "split": "train", "subgroup": "all", "n": None, "status": "ok"}
            for call, eps in d.get("by_phase", {}).items():
                regime = next((r for r in ("local", "personalized", "similarity-weighted", "augmented", "cluster")
                               if f" {r}" in f" {call}"), "global")
                rows.append({**base, "regime": regime, "metric": "dp_epsilon", "value": float(eps), "note": call})
            rows.append({**base, "regime": "all", "metric": "dp_epsilon_total", "value": float(d["epsilon_total"]),
                         "note": f"at delta {d['delta']:.3g}" if "delta" in d else "delta withheld (small site)"})
            for call in d.get("stopped", []):
                rows.append({**base, "regime": "all", "metric": "dp_budget_exhausted", "value": 1.0, "note": call})
        return rows

    def write_metrics(self):
        extra = ["task", "stage"] if self.cfg["task"] == "generative" else []
        df = pd.DataFrame(self.rows + self.dp_rows(), columns=METRIC_COLUMNS + extra)
        df.to_csv(self.run_dir / "metrics.csv", index=False)
        sites = pd.DataFrame([{"site": s, **{f"n_{k}": v for k, v in c.items()}}
                              for s, c in sorted(self.site_counts.items())],
                             columns=["site", "n_train", "n_val", "n_test", "n_temporal"])
        sites.to_csv(self.run_dir / "sites.csv", index=False)
        desc = [{"site": s, "descriptor": k, "value": v, "status": "ok"}
                for s, d in sorted(self.descriptors.items()) for k, v in sorted(d.items())]
        pd.DataFrame(desc, columns=["site", "descriptor", "value", "status"]).to_csv(
            self.run_dir / "descriptors.csv", index=False)
        pd.DataFrame(self.driver_rows, columns=["site", "driver", "importance", "n"]).to_csv(
            self.run_dir / "driver_importances.csv", index=False)

    def write_run(self):
        self.run.update({
            "rounds": self.rounds, "errors": self.errors, "timings": self.timings,
            "sites": {s: {"counts": self.site_counts.get(s)} for s in self.sites.values()},
            "failures": self.phase_failures,
            "bytes": {"sent": sum(r["bytes_sent"] for r in self.rounds),
                      "received": sum(r["bytes_received"] for r in self.rounds)},
        })
        write_json(self.run_dir / "run.json", self.run)

    def _timed(self, name, fn, *args):
        t = time.time()
        out = fn(*args)
        self.timings[name] = round(time.time() - t, 2)
        return out

    # ----------------------------------------------------------- generative
    def generative(self):
        """SFT rounds, then DPO rounds from the global SFT adapter, then the site-held
        regimes, then every site scores every task per stage and regime."""
        from client.gensite import get_decoder

        dec = self._timed("load-model", get_decoder, self.cfg)
        self.run["adapter"] = {"keys": len(dec.init_state), "bytes": state_nbytes(dec.init_state),
                               "parameters": int(sum(v.size for v in dec.init_state.values())),
                               "base_model": dec.identity}
        nodes = list(self.sites)
        sft = self._timed("sft", self.federated_rounds, dec, {"global-sft": nodes}, "sft", "train.sft")["global-sft"]
        dpo = sft
        if int(self.cfg["dpo-rounds"]) > 0:
            dpo = self._timed("dpo", self.federated_rounds, dec, {"global-dpo": nodes}, "dpo", "train.dpo", sft,
                              int(self.cfg["dpo-rounds"]))["global-dpo"]
        t = time.time()
        if not self.ckpt.is_done("gen_local"):
            msgs = [Message(RecordDict({"global": dpo, "config": self._config()}), dst_node_id=n,
                            message_type="train.gen_local") for n in nodes]
            done = self._collect(nodes, list(exchange(self.grid,
                msgs, timeout=float(self.cfg["round-timeout"]))), "local and personalized")
            for site, rep in done.items():
                if "metrics" in rep.content.metric_records:
                    self._note_dp(site, dict(rep.content["metrics"]), "gen_local")
            self.ckpt.save_done("gen_local", self._ckpt_state())
        self.timings["personalize"] = round(time.time() - t, 2)
        t = time.time()
        msgs = [Message(RecordDict({"global-sft": sft, "global-dpo": dpo, "config": self._config()}), dst_node_id=n,
                        message_type="evaluate.gen") for n in nodes]
        ok = self._collect(nodes, list(exchange(self.grid, msgs, timeout=float(self.cfg["round-timeout"]))),
                           "evaluate")
        _, held_out = gen_tasks(self.cfg)
        for site, rep in ok.items():
            released = dict(rep.content["metrics"])
            for key, val in released.items():
                _, task, stage, regime, metric = key.split("/")
                n = released.get(f"gen/{task}/{stage}/{regime}/n")
                note = "held out of training: zero-shot" if task in held_out else ""
                self.rows.append({"site": site, "regime": regime, "split": "test", "subgroup": "all",
                                  "metric": metric, "value": float(val), "n": n, "status": "ok", "note": note,
                                  "task": task, "stage": stage})
        self.timings["evaluate"] = round(time.time() - t, 2)
        _say(progress_line("evaluation", 1, 1, f"{len(ok)} sites reported"))
        if not ok:
            raise StudyError("no site returned evaluation metrics")
        cells = {("base", "base"): dec.init_state, ("sft", "global"): {k: v.numpy() for k, v in sft.items()},
                 ("dpo", "global"): {k: v.numpy() for k, v in dpo.items()}}
        if self.cfg["public-eval"]:
            t = time.time()
            self.public_eval(dec, cells)
            self.timings["public-eval"] = round(time.time() - t, 2)
        if int(self.cfg["gen-examples"]) > 0:
            t = time.time()
            self.probe_examples(dec, cells)
            self.timings["examples"] = round(time.time() - t, 2)

    def probe_examples(self, dec, cells: dict):
        """Example generations for the report, on items of a made-up hospital that the
        server generates itself: a site's own outputs never leave it."""
        from common.instruct import generate
        from common.tasks import TASKS
        from simulations.generative import probe_items

        trained, held_out = gen_tasks(self.cfg)
        items = probe_items(int(self.cfg["seed"]), int(self.cfg["gen-examples"]))
        out = []
        for task, recs in items.items():
            if task not in trained + held_out:
                continue
            mw = int(self.cfg["gen-max-words"])
            recs = [TASKS[task].as_seen(r, mw) for r in recs]
            prompts = [TASKS[task].prompt(r, max_words=mw) for r in recs]
            gens = {f"{stage}: {regime}": generate(dec.use(state), dec.tokenizer, prompts,
                                                   max_new_tokens=int(self.cfg["gen-max-new-tokens"]))
                    for (stage, regime), state in cells.items()}
            for i, (r, p) in enumerate(zip(recs, prompts)):
                out.append({"task": task, "held_out": task in held_out, "input": p[-1]["content"],
                            "expected": TASKS[task].answer(r),
                            "outputs": {cell: {"text": g[i], "correct": TASKS[task].is_correct(r, g[i])}
                                        for cell, g in gens.items()}})
        (self.run_dir / "examples.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
        _say(f"example generations on {len(out)} synthetic probe items written to examples.json")

    def public_eval(self, dec, cells: dict):
        """Score adapters on public PubMedQA and MeQSum test items, at the server: public
        text needs no privacy, and these tasks are unseen by the sites' tuning."""
        from common.instruct import generate
        from common.public_data import load_public
        from common.tasks import TASKS

        n = int(self.cfg["gen-eval-items"])
        for task in ("pubmedqa", "meqsum"):
            recs = load_public(task, "test", limit=n)
            prompts = [TASKS[task].prompt(r, max_words=int(self.cfg["gen-max-words"]) * 2) for r in recs]
            for (stage, regime), state in cells.items():
                gens = generate(dec.use(state), dec.tokenizer, prompts,
                                max_new_tokens=int(self.cfg["gen-max-new-tokens"]))
                for metric, value in TASKS[task].score(recs, gens).items():
                    if value is None or not np.isfinite(value):
                        continue
                    self.rows.append({"site": "public", "regime": regime, "split": "test", "subgroup": "all",
                                      "metric": metric, "value": float(value), "n": len(recs), "status": "ok",
                                      "note": "public data, scored at the server", "task": task, "stage": stage})
        _say(f"public PubMedQA and MeQSum scored on {n} items each")

    def adopt_sites(self, other: "Study"):
        """Take the sites another study (a comparison's first arm) already waited for and
        described: the same sites, names, counts, descriptors and policies for every arm."""
        self.sites = dict(other.sites)
        self.site_counts = dict(other.site_counts)
        self.descriptors = dict(other.descriptors)
        if hasattr(other, "site_policies"):
            self.site_policies = dict(other.site_policies)
            self.run["site_policies"] = dict(other.run.get("site_policies", {}))
        self._adopted = True

    def _lock_run_dir(self):
        """Refuse to run while another study writes this RUN_DIR (an orphan of an
        interrupted run, or a second `--resume`): two writers would corrupt the checkpoint.
        The lock dies with its process, so a crash never leaves a stale one."""
        import fcntl

        self._lock = open(self.run_dir / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise StudyError(f"{self.run_dir} is being written by another running study ({holder}); "
                             "stop it or wait for it before running or resuming here") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()

    def execute(self):
        from client.site import LoadedModel, model_key

        random.seed(int(self.cfg["seed"]))
        try:
            if not getattr(self, "_adopted", False):
                nodes = self._timed("wait", self.wait_for_nodes)
                self._timed("describe", self.describe, nodes)
            if self.cfg.get("resume"):
                self.restore()
            if self.cfg["task"] == "generative":
                self.generative()
                self.run["status"] = "completed"
                return self.run_dir
            lm = self._timed("load-model", LoadedModel, model_key(self.cfg))
            self.run["adapter"] = {"keys": len(lm.init_state), "bytes": state_nbytes(lm.init_state),
                                   "parameters": int(sum(v.size for v in lm.init_state.values())),
                                   "base_model": lm.identity,
                                   "total_parameters": int(sum(p.numel() for n, p in lm.model.named_parameters()
                                                               if "lora_" not in n and "modules_to_save" not in n)),
                                   "method": lm.key.method, "form": lm.key.form}
            if self.arm is not None:
                self.run["arm"] = self.arm.name
            self.lm = lm
            groups = {"global": list(self.sites)}
            clusters = self.make_clusters() if "cluster" in self.regimes else None
            arrays = self._timed("federated", self.federated_rounds, lm, groups, "global")["global"]
            self.final_global = arrays
            cluster_arrays = self._timed("cluster", self.federated_rounds, lm, clusters, "cluster") if clusters else {}
            self._timed("personalize", self.personalize, arrays)
            self._timed("evaluate", self.evaluate, arrays, cluster_arrays)
            self.run["status"] = "completed"
        except Exception as exc:
            self.run["status"] = "failed"
            self.errors.append(f"{type(exc).__name__}: {exc}")
            log.error("study failed: %s\n%s", exc, traceback.format_exc())
            raise
        finally:
            self.timings["total"] = round(time.time() - self.t0, 2)
            self.run["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.write_metrics()
            self.write_run()
            if self.cfg.get("report", True):
                try:
                    from server.genreport import build_generative_report
                    from server.report import build_report

                    build = build_generative_report if self.cfg["task"] == "generative" else build_report
                    path = build(self.run_dir)
                    _say(f"report: {path}")
                except Exception as exc:  # the numbers are on disk even if a figure fails
                    log.error("report failed: %s", exc)
            self._lock.close()
        _say(f"study completed in {self.timings['total']:.0f}s: {self.run_dir}")
        return self.run_dir
