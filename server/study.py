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
import platform
import random
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.metrics import cell_rows
from common.models import save_adapter, state_hash, state_nbytes

log = logging.getLogger("clinfed.server")

METRIC_COLUMNS = ["site", "regime", "split", "subgroup", "metric", "value", "n", "status", "note"]


class StudyError(RuntimeError):
    """The study cannot go on (too few sites, a phase that failed everywhere)."""


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


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(1, total))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


class Study:
    def __init__(self, grid, cfg: dict, run_dir: Path):
        self.grid = grid
        self.cfg = cfg
        self.run_dir = Path(run_dir)
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
        self.steps_total = cfg["num-server-rounds"] + 2
        self.steps_done = 0

    # ------------------------------------------------------------ messaging
    def _config(self, **extra) -> ConfigRecord:
        return ConfigRecord({"run-dir": str(self.run_dir.resolve()), **extra})

    def _send(self, nodes, message_type: str, arrays: ArrayRecord | None, phase: str,
              **config) -> dict[str, Message]:
        """Send one message per node; return replies by site, recording failures."""
        msgs = []
        for node in nodes:
            content = RecordDict({"config": self._config(**config)})
            if arrays is not None:
                content["arrays"] = arrays
            msgs.append(Message(content=content, dst_node_id=node, message_type=message_type))
        replies = list(self.grid.send_and_receive(msgs, timeout=float(self.cfg["round-timeout"])))
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

    def wait_for_nodes(self) -> list[int]:
        need = int(self.cfg["min-sites"])
        deadline = time.time() + float(self.cfg["node-wait-timeout"])
        last = -1
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= need and (len(nodes) == last or time.time() > deadline):
                return nodes
            if time.time() > deadline:
                raise StudyError(
                    f"only {len(nodes)} site(s) connected within node-wait-timeout="
                    f"{self.cfg['node-wait-timeout']:.0f}s; the study needs min-sites={need}")
            if len(nodes) != last:
                _say(f"waiting for sites: {len(nodes)} connected (need {need})")
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

    def federated_rounds(self, lm, strategy) -> ArrayRecord:
        arrays = ArrayRecord({k: Array(v) for k, v in lm.init_state.items()})
        nodes = list(self.sites)
        R = int(self.cfg["num-server-rounds"])
        for rnd in range(1, R + 1):
            t = time.time()
            msgs = list(strategy.configure_train(rnd, arrays, self._config(), self.grid))
            msgs = [m for m in msgs if m.metadata.dst_node_id in self.sites]
            sent = _arrays_bytes(arrays) * len(msgs)
            replies = list(self.grid.send_and_receive(msgs, timeout=float(self.cfg["round-timeout"])))
            ok = self._collect([m.metadata.dst_node_id for m in msgs], replies, f"round {rnd}")
            if len(ok) < int(self.cfg["min-sites"]):
                raise StudyError(f"round {rnd}: {len(ok)} site(s) answered, fewer than min-sites="
                                 f"{self.cfg['min-sites']}")
            new_arrays, _ = strategy.aggregate_train(rnd, list(ok.values()))
            if new_arrays is None:
                raise StudyError(f"round {rnd}: aggregation produced no adapter")
            arrays = new_arrays
            state = {k: v.numpy() for k, v in arrays.items()}
            folder = save_adapter(lm.model, state, self.run_dir / "adapters" / "global" / f"round-{rnd:03d}",
                                  meta={"regime": "global", "round": rnd, "base_model": lm.identity,
                                        "sites": list(ok)})
            received = sum(_arrays_bytes(r.content["arrays"]) for r in ok.values())
            losses = {s: float(r.content["metrics"]["train-loss"]) for s, r in ok.items()}
            self.rounds.append({
                "round": rnd, "sites": list(ok), "failures": self.phase_failures[f"round {rnd}"],
                "bytes_sent": sent, "bytes_received": received, "train_loss": losses,
                "seconds": round(time.time() - t, 2), "adapter": str(folder.relative_to(self.run_dir)),
                "adapter_hash": state_hash(state),
            })
            self.steps_done += 1
            _say(f"round {rnd}/{R} {_bar(self.steps_done, self.steps_total)} {len(ok)} sites, "
                 f"mean loss {np.mean(list(losses.values())):.3f}, {time.time() - t:.0f}s")
            self.write_run()
        final = self.run_dir / "adapters" / "global" / "final"
        save_adapter(lm.model, {k: v.numpy() for k, v in arrays.items()}, final,
                     meta={"regime": "global", "round": R, "base_model": lm.identity})
        return arrays

    def personalize(self, arrays: ArrayRecord):
        replies = self._send(list(self.sites), "train.personalize", arrays, "personalize")
        self.steps_done += 1
        _say(f"local and personalized adapters trained at {len(replies)} sites "
             f"{_bar(self.steps_done, self.steps_total)}")
        return replies

    def evaluate(self, arrays: ArrayRecord):
        replies = self._send(list(self.sites), "evaluate", arrays, "evaluate")
        for site, rep in replies.items():
            self.rows.extend(cell_rows(site, dict(rep.content["metrics"])))
        self.steps_done += 1
        _say(f"evaluation: {len(replies)} sites reported {_bar(self.steps_done, self.steps_total)}")
        if not replies:
            raise StudyError("no site returned evaluation metrics")

    # -------------------------------------------------------------- outputs
    def write_metrics(self):
        df = pd.DataFrame(self.rows, columns=METRIC_COLUMNS)
        df.to_csv(self.run_dir / "metrics.csv", index=False)
        sites = pd.DataFrame([{"site": s, **{f"n_{k}": v for k, v in c.items()}}
                              for s, c in sorted(self.site_counts.items())],
                             columns=["site", "n_train", "n_val", "n_test", "n_temporal"])
        sites.to_csv(self.run_dir / "sites.csv", index=False)

    def write_run(self):
        self.run.update({
            "rounds": self.rounds, "errors": self.errors, "timings": self.timings,
            "sites": {s: {"counts": self.site_counts.get(s)} for s in self.sites.values()},
            "failures": self.phase_failures,
            "bytes": {"sent": sum(r["bytes_sent"] for r in self.rounds),
                      "received": sum(r["bytes_received"] for r in self.rounds)},
        })
        tmp = self.run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(self.run, indent=1, default=str))
        tmp.replace(self.run_dir / "run.json")

    def _timed(self, name, fn, *args):
        t = time.time()
        out = fn(*args)
        self.timings[name] = round(time.time() - t, 2)
        return out

    def execute(self):
        from client.site import LoadedModel, model_key

        random.seed(int(self.cfg["seed"]))
        try:
            nodes = self._timed("wait", self.wait_for_nodes)
            self._timed("describe", self.describe, nodes)
            lm = self._timed("load-model", LoadedModel, model_key(self.cfg))
            self.run["adapter"] = {"keys": len(lm.init_state), "bytes": state_nbytes(lm.init_state),
                                   "parameters": int(sum(v.size for v in lm.init_state.values())),
                                   "base_model": lm.identity}
            n = len(self.sites)
            strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                              min_available_nodes=n, min_evaluate_nodes=0)
            arrays = self._timed("federated", self.federated_rounds, lm, strategy)
            self._timed("personalize", self.personalize, arrays)
            self._timed("evaluate", self.evaluate, arrays)
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
                    from server.report import build_report

                    path = build_report(self.run_dir)
                    _say(f"report: {path}")
                except Exception as exc:  # the numbers are on disk even if a figure fails
                    log.error("report failed: %s", exc)
        _say(f"study completed in {self.timings['total']:.0f}s: {self.run_dir}")
        return self.run_dir
