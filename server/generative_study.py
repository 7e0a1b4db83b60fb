"""The generative study protocol: instruction tuning of a decoder (SFT, then DPO) across sites.

Federated SFT rounds, then DPO rounds from the global SFT adapter; then the
site-held regimes (`local`: SFT then DPO at the site only; `personalized`: the
global DPO adapter fine-tuned at the site); then every site scores every task
per stage and regime on its own test items (aggregates only). The server itself
scores base and global adapters on public PubMedQA and MeQSum items, and in
simulation writes example generations on items of a made-up hospital.
Messaging, checkpoints, privacy accounting and outputs are the classifier
study's (`server.study.Study`); only the phases differ.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Message, RecordDict

from clinfed.common import protocol
from clinfed.common.config import gen_tasks
from clinfed.common.console import progress_line
from clinfed.common.model_cache import get_decoder
from clinfed.common.adapters import state_nbytes
from clinfed.server.messaging import StudyError, exchange, say
from clinfed.server.study import Study


class GenerativeStudy(Study):
    """A study with `task = "generative"`."""

    def protocol(self):
        """SFT rounds, then DPO rounds from the global SFT adapter, then the site-held
        regimes, then every site scores every task per stage and regime."""
        dec = self._timed("load-model", get_decoder, self.cfg)
        self.run["adapter"] = {"keys": len(dec.init_state), "bytes": state_nbytes(dec.init_state),
                               "parameters": int(sum(v.size for v in dec.init_state.values())),
                               "base_model": dec.identity}
        nodes = list(self.sites)
        sft = self._timed("sft", self.federated_rounds, dec, {protocol.GLOBAL_SFT: nodes}, "sft", protocol.SFT)[protocol.GLOBAL_SFT]
        dpo = sft
        if self.cfg.dpo_rounds > 0:
            dpo = self._timed("dpo", self.federated_rounds, dec, {protocol.GLOBAL_DPO: nodes}, "dpo", protocol.DPO, sft,
                              self.cfg.dpo_rounds)[protocol.GLOBAL_DPO]
        t = time.time()
        if not self.ckpt.is_done("gen_local"):
            msgs = [Message(RecordDict({protocol.GLOBAL: dpo, protocol.CONFIG: self._config()}), dst_node_id=n,
                            message_type=protocol.GEN_LOCAL) for n in nodes]
            done = self._collect(nodes, list(exchange(self.grid,
                msgs, timeout=self.cfg.round_timeout)), "local and personalized")
            for site, rep in done.items():
                if protocol.METRICS in rep.content.metric_records:
                    self._note_dp(site, dict(rep.content[protocol.METRICS]), "gen_local")
            self.ckpt.save_done("gen_local", self._ckpt_state())
        self.timings["personalize"] = round(time.time() - t, 2)
        t = time.time()
        msgs = [Message(RecordDict({protocol.GLOBAL_SFT: sft, protocol.GLOBAL_DPO: dpo, protocol.CONFIG: self._config()}), dst_node_id=n,
                        message_type=protocol.EVALUATE_GEN) for n in nodes]
        ok = self._collect(nodes, list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout)),
                           "evaluate")
        _, held_out = gen_tasks(self.cfg)
        for site, rep in ok.items():
            released = dict(rep.content[protocol.METRICS])
            for key, val in released.items():
                _, task, stage, regime, metric = key.split("/")
                n = released.get(f"gen/{task}/{stage}/{regime}/n")
                note = "held out of training: zero-shot" if task in held_out else ""
                self.rows.append({"site": site, "regime": regime, "split": "test", "subgroup": "all",
                                  "metric": metric, "value": float(val), "n": n, "status": "ok", "note": note,
                                  "task": task, "stage": stage})
        self.timings["evaluate"] = round(time.time() - t, 2)
        say(progress_line("evaluation", 1, 1, f"{len(ok)} sites reported"))
        if not ok:
            raise StudyError("no site returned evaluation metrics")
        cells = {("base", "base"): dec.init_state, ("sft", "global"): {k: v.numpy() for k, v in sft.items()},
                 ("dpo", "global"): {k: v.numpy() for k, v in dpo.items()}}
        if self.cfg.public_eval:
            t = time.time()
            self.public_eval(dec, cells)
            self.timings["public-eval"] = round(time.time() - t, 2)
        if self.cfg.gen_examples > 0:
            t = time.time()
            self.probe_examples(dec, cells)
            self.timings["examples"] = round(time.time() - t, 2)

    def probe_examples(self, dec, cells: dict):
        """Example generations for the report, on items of a made-up hospital that the
        server generates itself: a site's own outputs never leave it."""
        from clinfed.common.instruct import generate
        from clinfed.common.tasks import TASKS
        trained, held_out = gen_tasks(self.cfg)
        if self.probe_items is None:
            self.run["examples"] = "not made: example generations need synthetic items (simulation only)"
            return
        items = self.probe_items(self.cfg.seed, self.cfg.gen_examples)
        out = []
        for task, recs in items.items():
            if task not in trained + held_out:
                continue
            mw = self.cfg.gen_max_words
            recs = [TASKS[task].as_seen(r, mw) for r in recs]
            prompts = [TASKS[task].prompt(r, max_words=mw) for r in recs]
            gens = {f"{stage}: {regime}": generate(dec.use(state), dec.tokenizer, prompts,
                                                   max_new_tokens=self.cfg.gen_max_new_tokens)
                    for (stage, regime), state in cells.items()}
            for i, (r, p) in enumerate(zip(recs, prompts)):
                out.append({"task": task, "held_out": task in held_out, "input": p[-1]["content"],
                            "expected": TASKS[task].answer(r),
                            "outputs": {cell: {"text": g[i], "correct": TASKS[task].is_correct(r, g[i])}
                                        for cell, g in gens.items()}})
        (self.run_dir / "examples.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
        say(f"example generations on {len(out)} synthetic probe items written to examples.json")

    def public_eval(self, dec, cells: dict):
        """Score adapters on public PubMedQA and MeQSum test items, at the server: public
        text needs no privacy, and these tasks are unseen by the sites' tuning."""
        from clinfed.common.instruct import generate
        from clinfed.common.public_data import load_public
        from clinfed.common.tasks import TASKS

        n = self.cfg.gen_eval_items
        for task in ("pubmedqa", "meqsum"):
            recs = load_public(task, "test", limit=n)
            prompts = [TASKS[task].prompt(r, max_words=self.cfg.gen_max_words * 2) for r in recs]
            for (stage, regime), state in cells.items():
                gens = generate(dec.use(state), dec.tokenizer, prompts,
                                max_new_tokens=self.cfg.gen_max_new_tokens)
                for metric, value in TASKS[task].score(recs, gens).items():
                    if value is None or not np.isfinite(value):
                        continue
                    self.rows.append({"site": "public", "regime": regime, "split": "test", "subgroup": "all",
                                      "metric": metric, "value": float(value), "n": len(recs), "status": "ok",
                                      "note": "public data, scored at the server", "task": task, "stage": stage})
        say(f"public PubMedQA and MeQSum scored on {n} items each")
