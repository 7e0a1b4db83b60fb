"""The study protocol the ServerApp runs, phase by phase.

1. wait (bounded) for the sites and ask each for its name and split sizes;
2. R federated rounds: every site trains from the global adapter (and, with `ditto`, its
   personal adapter beside it); the strategy (Flower's FedAvg by default, weighted by
   training examples) aggregates the adapter + head arrays; the round's global adapter is
   saved in PEFT format; then the `cluster` rounds, the same within each cluster;
3. `ifca` rounds (with the `ifca` regime): every site is sent the k IFCA adapters, trains
   the one with the lowest loss on its validation split and names it; FedAvg per adapter;
   `fedrep` rounds (with the `fedrep` regime): the backbone federated, each head kept at its site;
4. `personalize`: each site trains its site-held adapters (`local`, `personalized`,
   `interpolated`, ...), which stay at the site;
5. `evaluate`: each site scores every regime on the same test items and
   returns aggregate metrics, kept per site (Flower would average them away).
Everything written goes to RUN_DIR: metrics.csv, sites.csv, run.json,
adapters/global/, report.html.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, Message, RecordDict

from clinfed.common import protocol
from clinfed.common.adapters import save_adapter, state_hash, state_nbytes
from clinfed.common.config import regimes
from clinfed.common.console import progress_line
from clinfed.common.findings_release import CAL, DIFF
from clinfed.common.metrics import METRIC_COLUMNS, cell_rows, subgroup_name
from clinfed.common.model_cache import LoadedModel, model_key
from clinfed.common.protocol import SITE_HELD
from clinfed.common.ranks import site_rank, truncate
from clinfed.server.aggregation import aggregate, load_strategy_state, make_strategy, strategy_state, train_config
from clinfed.server.checkpoint import Checkpoint, write_json
from clinfed.server.grouping import descriptor_matrix, ifca_inits, kmeans_assignment, similarity_mix
from clinfed.server.messaging import SiteMessaging, StudyError, exchange, say
from clinfed.server.privacy_accounting import PrivacyAccounting
from clinfed.server.findings import write_findings

log = logging.getLogger("clinfed.server")

__all__ = ["Study", "StudyError", "exchange", "versions"]


def versions() -> dict:
    """Versions from the installed packages' metadata: importing torch, transformers and peft only
    to read their version strings cost the server about 8 s of CPU per study."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), "flwr": installed("flwr"), "torch": installed("torch"),
            "transformers": installed("transformers"), "peft": installed("peft"),
            "scikit-learn": installed("scikit-learn"), "pandas": pd.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def _arrays_bytes(rec: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in rec.values()))


def _at_rank(rec: ArrayRecord, rank: int | None) -> ArrayRecord:
    """The adapter a site of LoRA rank `rank` is sent (None: the study's rank, as it is)."""
    if rank is None:
        return rec
    return ArrayRecord({k: Array(v) for k, v in truncate({k: a.numpy() for k, a in rec.items()}, rank).items()})


def _widened(rec: ArrayRecord, start: ArrayRecord) -> dict:
    from clinfed.common.ranks import pad_update

    return pad_update({k: v.numpy() for k, v in rec.items()}, {k: v.numpy() for k, v in start.items()})


class Study(SiteMessaging, PrivacyAccounting):
    def __init__(self, grid, cfg: dict, run_dir: Path, arm=None, site_run_dir: Path | None = None,
                 probe_items=None):
        """`arm` (common.arms.Arm): this study is one arm of a comparison; every message names it
        and `cfg` is the arm's run config. `site_run_dir`: the run folder the sites are told
        (a comparison's top RUN_DIR; each arm writes its own files to `run_dir`)."""
        self.grid = grid
        self.cfg = cfg
        self.arm = arm
        self.probe_items = probe_items  # (seed, n) -> example items of a made-up hospital; simulation only
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
            "config": dict(cfg), "model": cfg.model, "seed": cfg.seed, "versions": versions(),
        }
        self.regimes = regimes(cfg)
        self.descriptors: dict[str, dict[str, float]] = {}
        self.last_states: dict[str, dict[str, dict]] = {"global": {}, "cluster": {}}
        self.shared_local: dict[str, ArrayRecord] = {}
        self.driver_rows: list[dict] = []
        self.released: dict[str, dict[str, float]] = {}  # each site's paired differences and calibration keys
        self._lock_run_dir()  # before anything in RUN_DIR is touched
        self.ckpt = Checkpoint(self.run_dir, cfg)
        if not cfg.get("resume"):
            self.ckpt.clear()  # a new study in an old RUN_DIR must not resume the old one later

    # --------------------------------------------------------------- phases
    def describe(self, nodes):
        replies = self._send(nodes, protocol.DESCRIBE, None, "describe")
        by_node = {}
        for rep in replies.values():
            name = str(rep.content[protocol.SITE]["name"])
            by_node[rep.metadata.src_node_id] = name
            counts = dict(rep.content[protocol.METRICS])
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
        if len(self.sites) < self.cfg.min_sites:
            raise StudyError(f"only {len(self.sites)} site(s) could describe themselves; need min-sites="
                             f"{self.cfg['min-sites']}. Failures: {self.phase_failures.get('describe')}")
        say(f"{len(self.sites)} sites: " + ", ".join(
            f"{n} (train {self.site_counts[n]['train'] or '<k'})" for n in self.sites.values()))

    def federated_rounds(self, lm, groups: dict[str, list[int]], phase: str, message_type: str = protocol.TRAIN,
                         start: ArrayRecord | None = None, rounds: int | None = None) -> dict[str, ArrayRecord]:
        """R rounds of the run config's `strategy` (server.aggregation) within each group of
        sites (one group = the global adapter).

        Groups train side by side in the same rounds; each has its own Flower strategy
        instance, and its state (a server optimizer's moments) is checkpointed with the
        round. A site whose policy caps its LoRA rank is sent the group's adapter at its
        rank and its update is widened back before aggregation (common.ranks). Each
        round's adapter is saved in PEFT format.
        """
        init = start if start is not None else ArrayRecord({k: Array(v) for k, v in lm.init_state.items()})
        groups = self._adapter_groups(groups, phase)
        arrays = {g: init for g in groups}
        strategies = {g: make_strategy(self.cfg, len(n)) for g, n in groups.items()}
        group_of = {node: g for g, nodes in groups.items() for node in nodes}
        R = self.cfg.num_server_rounds if rounds is None else int(rounds)
        done, saved = self.ckpt.rounds_done(phase)
        for g, state in saved.items():
            if g in arrays:
                arrays[g] = ArrayRecord({k: Array(v) for k, v in state.items()})
        for g, state in self.ckpt.strategy_states(phase).items():
            if g in strategies:
                load_strategy_state(strategies[g], state, list(init.keys()))
        ranks = self._site_ranks(lm, message_type)
        if done:
            say(f"{phase}: rounds 1-{done} restored from the checkpoint")
        for rnd in range(done + 1, R + 1):
            t = time.time()
            arrays_sent = {node: _at_rank(arrays[group_of[node]], ranks.get(self.sites[node])) for node in group_of}
            msgs = [Message(RecordDict({protocol.ARRAYS: arrays_sent[node],
                                        protocol.CONFIG: self._config(**{protocol.SERVER_ROUND: rnd, protocol.BASE_MODEL: lm.identity,
                                                                         protocol.PHASE: phase},
                                                                      **train_config(strategies[group_of[node]]))}),
                            dst_node_id=node, message_type=message_type) for node in sorted(group_of)]
            sent = sum(_arrays_bytes(arrays_sent[n]) for n in group_of)
            replies = list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout))
            label = f"{phase} round {rnd}"
            starts = {self.sites[n]: arrays_sent[n] for n in group_of}
            ok, declined = self._declined(self._collect(sorted(group_of), replies, label), label)
            ok = self._checked(ok, lm.init_state, label, starts, ranks)
            if len(ok) + len(declined) < min(self.cfg.min_sites, len(group_of)):
                raise StudyError(f"{label}: {len(ok)} site(s) answered, fewer than min-sites={self.cfg['min-sites']}")
            for g, nodes in groups.items():
                names = [self.sites[n] for n in nodes]
                g_ok = [rep for site, rep in ok.items() if site in names]
                if not g_ok:
                    continue  # nobody in this group answered: its adapter stays as it was
                new, inputs = aggregate(strategies[g], rnd, g_ok, arrays[g])
                if new is None:
                    raise StudyError(f"{label}: aggregation of group {g} produced no adapter")
                for rep, used in zip(g_ok, inputs):
                    # the update at the study's rank (as clipped by update DP, if on): what
                    # similarity-weighted starts mix; the strategies that pop the arrays leave none
                    rec = used.content[protocol.ARRAYS] if len(used.content[protocol.ARRAYS]) else None
                    site = self.sites[rep.metadata.src_node_id]
                    self.last_states.setdefault(phase, {})[site] = (
                        {k: v.numpy() for k, v in rec.items()} if rec is not None
                        else _widened(rep.content[protocol.ARRAYS], arrays[g]))
                arrays[g] = new
                folder = self.run_dir / "adapters" / g / f"round-{rnd:03d}"
                save_adapter(lm.model, {k: v.numpy() for k, v in new.items()}, folder,
                             meta={"regime": phase, "group": g, "round": rnd, "base_model": lm.identity,
                                   "sites": [s for s in names if s in ok]})
            received = sum(_arrays_bytes(r.content[protocol.ARRAYS]) for r in ok.values())
            site_bytes = {self.sites[n]: {"sent": _arrays_bytes(arrays_sent[n]),
                                          "received": _arrays_bytes(ok[self.sites[n]].content[protocol.ARRAYS])
                                          if self.sites[n] in ok else 0} for n in group_of}
            costs = {s: {k: float(r.content[protocol.METRICS][m]) for k, m in (("train_seconds", "train-seconds"),
                                                                        ("peak_rss_mb", "train-peak-rss"),
                                                                        ("micro_batch", "train-micro-batch"),
                                                                        ("oom_retries", "train-oom-retries"),
                                                                        ("quantization_bits", "train-quantization-bits"),
                                                                        ("gradient_checkpointing",
                                                                         "train-gradient-checkpointing"),
                                                                        ("tokens_per_s", "train-tokens-per-s"),
                                                                        ("peak_gpu_mb", "train-peak-gpu-mb"),
                                                                        ("ditto_train_seconds",
                                                                         "ditto-train-seconds"))
                         if m in r.content[protocol.METRICS]} for s, r in ok.items()}
            losses = {s: float(r.content[protocol.METRICS]["train-loss"]) for s, r in ok.items()}
            own = {s: float(r.content[protocol.METRICS]["dpo-self-rejected-share"]) for s, r in ok.items()
                   if "dpo-self-rejected-share" in r.content[protocol.METRICS]}
            self.rounds.append({
                "phase": phase, "round": rnd, "sites": list(ok), "failures": self.phase_failures[label],
                "bytes_sent": sent, "bytes_received": received, "site_bytes": site_bytes, "site_costs": costs,
                "train_loss": losses,
                **({"dpo_self_rejected_share": own} if own else {}),
                **self._dp_round(ok, declined, label),
                "seconds": round(time.time() - t, 2),
                "adapter_hash": {g: state_hash({k: v.numpy() for k, v in a.items()}) for g, a in arrays.items()},
            })
            say(progress_line(f"{phase} round", rnd, R, f"{len(ok)} sites, mean loss "
                               f"{np.mean(list(losses.values())) if losses else float('nan'):.3f}, "
                               f"{time.time() - t:.0f}s"))
            self.ckpt.save_round(phase, rnd, {g: {k: v.numpy() for k, v in a.items()} for g, a in arrays.items()},
                                 {s: self.last_states[phase][s] for s in ok}, self._ckpt_state(),
                                 {g: strategy_state(st) for g, st in strategies.items()})
            self.write_run()
        for g, a in arrays.items():
            save_adapter(lm.model, {k: v.numpy() for k, v in a.items()}, self.run_dir / "adapters" / g / "final",
                         meta={"regime": phase, "group": g, "round": R, "base_model": lm.identity})
        self._note_update_dp(phase, R)
        return arrays

    def _site_ranks(self, lm, message_type: str) -> dict[str, int]:
        """The LoRA rank of each site whose policy caps it below the study's (describe reply's
        `policy/max-lora-rank`); classifier LoRA rounds only (the generative study's decoder
        trains at the study's rank everywhere)."""
        if message_type != protocol.TRAIN or lm.key.method != "lora":
            return {}
        pols = getattr(self, "site_policies", {})
        out = {s: site_rank(lm.key.lora.rank, p.max_lora_rank) for s, p in pols.items()}
        out = {s: r for s, r in out.items() if r != lm.key.lora.rank}
        if out:
            self.run["lora_ranks"] = {"study": lm.key.lora.rank, "sites": out,
                                      "aggregation": "updates zero-padded to the study's rank (common.ranks)"}
        return out

    # ------------------------------------------------------------------ IFCA
    def ifca_rounds(self, lm) -> dict[str, ArrayRecord]:
        """IFCA (Ghosh et al. 2020): k adapters (k = `clusters`, seeded different starts,
        server.grouping.ifca_inits); every round each site is sent all k, trains the one with the
        lowest loss on its own validation split and replies with it and its index (the losses stay
        at the site); each adapter is the FedAvg (the study's strategy) of the sites that chose it.
        The membership of the last round is the site's `ifca` adapter at evaluation."""
        k, phase = int(self.cfg.clusters), "ifca"
        if k < 2:
            self.errors.append(f"ifca regime skipped: needs clusters >= 2 (clusters={k})")
            return {}
        groups = [f"ifca-{j}" for j in range(k)]
        arrays = {g: ArrayRecord({key: Array(v) for key, v in st.items()})
                  for g, st in zip(groups, ifca_inits(lm.init_state, k, self.cfg.seed))}
        info = self.run.setdefault("ifca", {"k": k, "membership": {}, "history": []})
        strategies = {g: make_strategy(self.cfg, len(self.sites)) for g in groups}
        R = self.cfg.num_server_rounds
        done, saved = self.ckpt.rounds_done(phase)
        for g, state in saved.items():
            if g in arrays:
                arrays[g] = ArrayRecord({key: Array(v) for key, v in state.items()})
        for g, state in self.ckpt.strategy_states(phase).items():
            if g in strategies:
                load_strategy_state(strategies[g], state, list(lm.init_state.keys()))
        ranks = self._site_ranks(lm, protocol.TRAIN)
        if done:
            say(f"{phase}: rounds 1-{done} restored from the checkpoint")
        nodes = sorted(self.sites)
        for rnd in range(done + 1, R + 1):
            t = time.time()
            msgs = []
            for node in nodes:
                rank = ranks.get(self.sites[node])
                content = RecordDict({f"{protocol.IFCA_PREFIX}{j}": _at_rank(arrays[g], rank)
                                      for j, g in enumerate(groups)})
                content[protocol.CONFIG] = self._config(**{protocol.SERVER_ROUND: rnd, protocol.BASE_MODEL: lm.identity},
                                                        **train_config(strategies[groups[0]]))
                msgs.append(Message(content, dst_node_id=node, message_type=protocol.TRAIN_IFCA))
            each = sum(_arrays_bytes(a) for a in arrays.values())
            replies = list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout))
            label = f"{phase} round {rnd}"
            ok, declined = self._declined(self._collect(nodes, replies, label), label)
            chosen: dict[str, int] = {}
            for site, rep in list(ok.items()):
                m = rep.content[protocol.METRICS] if protocol.METRICS in rep.content.metric_records else {}
                j = m.get(protocol.IFCA_CHOICE)
                if j is None or not float(j).is_integer() or not 0 <= int(j) < k:
                    self._reject(label, site, f"IFCA reply from site {site} names no valid adapter index")
                    ok.pop(site)
                    continue
                chosen[site] = int(j)
            starts = {site: _at_rank(arrays[groups[j]], ranks.get(site)) for site, j in chosen.items()}
            ok = self._checked(ok, lm.init_state, label, starts, ranks)
            if len(ok) + len(declined) < min(self.cfg.min_sites, len(nodes)):
                raise StudyError(f"{label}: {len(ok)} site(s) answered, fewer than min-sites={self.cfg['min-sites']}")
            for j, g in enumerate(groups):
                g_ok = [rep for site, rep in ok.items() if chosen[site] == j]
                if not g_ok:
                    continue  # no site chose this adapter: it stays as it was
                new, _ = aggregate(strategies[g], rnd, g_ok, arrays[g])
                if new is None:
                    raise StudyError(f"{label}: aggregation of {g} produced no adapter")
                arrays[g] = new
                save_adapter(lm.model, {key: v.numpy() for key, v in new.items()},
                             self.run_dir / "adapters" / g / f"round-{rnd:03d}",
                             meta={"regime": phase, "group": g, "round": rnd, "base_model": lm.identity,
                                   "sites": sorted(s for s in ok if chosen[s] == j)})
            for site in ok:
                info["membership"][site] = chosen[site]
            info["history"].append({"round": rnd, "membership": {s: chosen[s] for s in ok}})
            losses = {s: float(r.content[protocol.METRICS]["train-loss"]) for s, r in ok.items()}
            self.rounds.append({
                "phase": phase, "round": rnd, "sites": list(ok), "failures": self.phase_failures[label],
                "bytes_sent": each * len(nodes),
                "bytes_received": sum(_arrays_bytes(r.content[protocol.ARRAYS]) for r in ok.values()),
                "site_bytes": {self.sites[n]: {"sent": each, "received": _arrays_bytes(
                    ok[self.sites[n]].content[protocol.ARRAYS]) if self.sites[n] in ok else 0} for n in nodes},
                "site_costs": {s: {"train_seconds": float(r.content[protocol.METRICS]["train-seconds"])}
                               for s, r in ok.items() if "train-seconds" in r.content[protocol.METRICS]},
                "train_loss": losses, "ifca_membership": {s: chosen[s] for s in ok},
                **self._dp_round(ok, declined, label),
                "seconds": round(time.time() - t, 2),
                "adapter_hash": {g: state_hash({key: v.numpy() for key, v in a.items()}) for g, a in arrays.items()},
            })
            say(progress_line(f"{phase} round", rnd, R, f"{len(ok)} sites, membership "
                               + ", ".join(f"{s}:{chosen[s]}" for s in ok) + f", {time.time() - t:.0f}s"))
            self.ckpt.save_round(phase, rnd, {g: {key: v.numpy() for key, v in a.items()} for g, a in arrays.items()},
                                 {}, self._ckpt_state(), {g: strategy_state(st) for g, st in strategies.items()})
            self.write_run()
        for g, a in arrays.items():
            save_adapter(lm.model, {key: v.numpy() for key, v in a.items()}, self.run_dir / "adapters" / g / "final",
                         meta={"regime": phase, "group": g, "round": R, "base_model": lm.identity})
        self._note_update_dp(phase, R)
        return arrays

    # ------------------------------------------------------- site similarity
    def descriptor_matrix(self) -> tuple[list[str], np.ndarray, list[str]]:
        """Standardized site descriptors (server.grouping), one row per site in `self.sites` order."""
        names = list(self.sites.values())
        X, feats = descriptor_matrix(names, self.descriptors)
        return names, X, feats

    def make_clusters(self) -> dict[str, list[int]] | None:
        names, X, feats = self.descriptor_matrix()
        k = self.cfg.clusters
        if not 2 <= k < len(names) or X.shape[1] == 0:
            self.errors.append(f"cluster regime skipped: needs 2 <= clusters < sites (clusters={k}, sites={len(names)})")
            return None
        assignment = kmeans_assignment(names, X, k, self.cfg.seed)
        self.run["clusters"] = {"method": "kmeans on standardized site descriptors", "k": k,
                                "features": feats, "assignment": assignment}
        node_of = {v: n for n, v in self.sites.items()}
        groups: dict[str, list[int]] = {}
        for s, c in assignment.items():
            groups.setdefault(f"cluster-{c}", []).append(node_of[s])
        say("clusters: " + "; ".join(f"{g}: {', '.join(self.sites[n] for n in ns)}" for g, ns in sorted(groups.items())))
        return groups

    def similarity_starts(self) -> dict[str, dict[str, np.ndarray]]:
        """Per site, the other sites' last-round adapters weighted by descriptor closeness
        (server.grouping.similarity_mix). Moves no record: it reuses adapters the sites already
        sent in the global rounds."""
        names, X, _ = self.descriptor_matrix()
        starts, weights = similarity_mix(names, X, self.last_states["global"])
        self.run["similarity_weights"] = weights
        return starts

    # --------------------------------------------------------------- phases
    def _ckpt_state(self) -> dict:
        return {"rounds": self.rounds, "errors": self.errors, "phase_failures": self.phase_failures,
                "clusters": self.run.get("clusters"), "similarity_weights": self.run.get("similarity_weights"),
                "ifca": self.run.get("ifca"), "interpolation": self.run.get("interpolation"),
                "site_held": self.run.get("site_held")}

    def restore(self):
        """Continue from RUN_DIR's checkpoint: the rounds, failures and adapters so far.
        Site-held adapters are on the sites' disks already."""
        saved = self.ckpt.load()
        self.rounds, self.errors = list(saved["rounds"]), list(saved["errors"])
        self.phase_failures.update(saved["phase_failures"])
        for key in ("clusters", "similarity_weights", "ifca", "interpolation", "site_held"):
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
        say(f"resuming {self.run_dir}: completed rounds {where}, steps done {saved['done'] or 'none'}")

    def personalize(self, global_arrays: ArrayRecord):
        if self.ckpt.is_done("personalize"):
            say("site-held adapters were trained before the restart; the sites keep them")
            return
        starts = self.similarity_starts() if "similarity-weighted" in self.regimes else {}
        msgs = []
        for node, site in self.sites.items():
            content = RecordDict({protocol.GLOBAL: global_arrays, protocol.CONFIG: self._config()})
            if site in starts:
                content[protocol.SIMILARITY_START] = ArrayRecord({k: Array(v) for k, v in starts[site].items()})
            msgs.append(Message(content, dst_node_id=node, message_type=protocol.PERSONALIZE))
        replies = list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout))
        ok = self._collect(list(self.sites), replies, "personalize")
        for site, rep in ok.items():
            if protocol.ARRAYS in rep.content.array_records:
                self.shared_local[site] = rep.content[protocol.ARRAYS]
            m = dict(rep.content[protocol.METRICS])
            self._note_dp(site, m, "personalize")
            self.run.setdefault("site_held", {})[site] = {
                k: float(v) for k, v in m.items() if k.endswith(("-train-seconds", "-train-peak-rss", "-train-tokens-per-s",
                                                        "-train-peak-gpu-mb"))}
            if protocol.INTERPOLATION_WEIGHT in m:  # the global adapter's weight in the site's mix
                self.run.setdefault("interpolation", {})[site] = float(m[protocol.INTERPOLATION_WEIGHT])
        self.ckpt.save_done("personalize", self._ckpt_state(),
                            {s: {k: v.numpy() for k, v in a.items()} for s, a in self.shared_local.items()})
        say(progress_line("site-held training", 1, 1, f"{', '.join(r for r in self.regimes if r in SITE_HELD)} "
                                                       f"at {len(ok)} sites"))

    def evaluate(self, global_arrays: ArrayRecord, clusters: dict[str, ArrayRecord],
                 ifca: dict[str, ArrayRecord] | None = None, fedrep: ArrayRecord | None = None):
        assignment = (self.run.get("clusters") or {}).get("assignment", {})
        membership = (self.run.get("ifca") or {}).get("membership", {})
        msgs = []
        for node, site in self.sites.items():
            content = RecordDict({protocol.GLOBAL: global_arrays, protocol.CONFIG: self._config()})
            if ifca and site in membership and f"ifca-{membership[site]}" in ifca:
                content[protocol.IFCA] = ifca[f"ifca-{membership[site]}"]
            if fedrep is not None:
                content[protocol.FEDREP] = fedrep
            if assignment.get(site) and f"cluster-{assignment[site]}" in clusters:
                content[protocol.CLUSTER] = clusters[f"cluster-{assignment[site]}"]
            # the site's own cluster and local adapters are already scored as `cluster` and `local`
            for g, arr in clusters.items():
                if g != f"cluster-{assignment.get(site)}":
                    content[protocol.cross_record(f"cluster@{g.removeprefix('cluster-')}")] = arr
            for origin, arr in self.shared_local.items():
                if origin != site:
                    content[protocol.cross_record(f"local@{origin}")] = arr
            msgs.append(Message(content, dst_node_id=node, message_type=protocol.EVALUATE))
        replies = list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout))
        ok = self._collect(list(self.sites), replies, "evaluate")
        for site, rep in ok.items():
            m = dict(rep.content[protocol.METRICS])
            self.released[site] = {k: v for k, v in m.items() if k.split("/", 1)[0] in (DIFF, CAL)}
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
        say(progress_line("evaluation", 1, 1, f"{len(ok)} sites reported"))
        if not ok:
            raise StudyError("no site returned evaluation metrics")

    # -------------------------------------------------------------- outputs
    def write_metrics(self):
        extra = ["task", "stage"] if self.cfg.task == "generative" else []
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
        if self.released:
            n_train = {s: int(c.get("train") or 0) for s, c in self.site_counts.items() if c}
            write_findings(self.run_dir, self.released, df, n_train, self.cfg.get("region-vocabulary", ""))

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

    def _start_model_load(self):
        """Load the server's copy of the model while the sites start and describe themselves: the
        first round cannot start before both, so the load leaves the critical path (issue 22;
        `timings["load-model"]` is then only the wait that remained)."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="clinfed-model-load")
        self._model_future = pool.submit(LoadedModel, model_key(self.cfg))
        pool.shutdown(wait=False)

    def _model(self) -> LoadedModel:
        future = getattr(self, "_model_future", None)
        return future.result() if future is not None else LoadedModel(model_key(self.cfg))

    def protocol(self):
        """The classifier study: global rounds (and cluster rounds), site-held training, evaluation."""
        lm = self._timed("load-model", self._model)
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
        ifca_arrays = self._timed("ifca", self.ifca_rounds, lm) if "ifca" in self.regimes else {}
        fedrep = None
        if "fedrep" in self.regimes:
            keys = list(lm.init_state)
            if not (any("lora_" in k for k in keys) and any("lora_" not in k for k in keys)):
                self.errors.append("fedrep regime skipped: it needs a LoRA adapter with a separate head "
                                   f"(method {lm.key.method}, form {lm.key.form})")
            elif self.cfg.dp:
                self.errors.append("fedrep regime skipped: its rounds are not built into DP-SGD's accounting")
            else:  # FedRep: the backbone federated in rounds of its own, every head kept at its site
                fedrep = self._timed("fedrep", self.federated_rounds, lm, {"fedrep": list(self.sites)},
                                     "fedrep").get("fedrep")
        self._timed("personalize", self.personalize, arrays)
        self._timed("evaluate", self.evaluate, arrays, cluster_arrays, ifca_arrays, fedrep)

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
        random.seed(self.cfg.seed)
        try:
            if not getattr(self, "_adopted", False):
                if type(self).protocol is Study.protocol:
                    self._start_model_load()
                nodes = self._timed("wait", self.wait_for_nodes)
                self._timed("describe", self.describe, nodes)
            if self.cfg.get("resume"):
                self.restore()
            self.protocol()
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
                    from clinfed.server.reports import build_report

                    path = build_report(self.run_dir)
                    say(f"report: {path}")
                except Exception as exc:  # the numbers are on disk even if a figure fails
                    log.error("report failed: %s", exc)
            self._lock.close()
        say(f"study completed in {self.timings['total']:.0f}s: {self.run_dir}")
        return self.run_dir
