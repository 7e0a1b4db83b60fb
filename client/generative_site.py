"""One hospital's side of a generative (instruction-tuning) study.

The site's instruction data: its triage messages and extraction notes
(`<hospital>/generative/*.jsonl`) and yes/no readmission questions built from
its discharge notes. Items are split train/test by a stable hash of their id.
Only adapters and aggregate scores leave; generations never do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from clinfed.common.data import read_site_table, split_site, stable_uniform
from clinfed.common.instruct import (
    InstructSettings,
    answer_probability,
    decoder_adapter_state,
    dpo_train,
    generate,
    sft_train,
)
from clinfed.common.model_cache import LoadedModel
from clinfed.common.config import gen_tasks, split_seed
from clinfed.common.tasks import TASKS

GEN_SUBDIR = "generative"


class GenSite:
    def __init__(self, name: str, folder: Path, table: Path, cfg: dict):
        self.name, self.cfg, self.table = name, cfg, Path(table)
        seed, mw = cfg.seed, cfg.gen_max_words
        trained, self.held_out = gen_tasks(cfg)
        self.items: dict[str, dict[str, list[dict]]] = {}
        for task in trained + self.held_out:
            if task == "readmission":
                splits = split_site(read_site_table(table, warn=False), seed=split_seed(cfg), temporal_frac=0.0,
                                    test_frac=0.25, val_frac=0.0)
                conv = lambda df: [{"id": r.encounter_id, "note_text": r.note_text,  # noqa: E731
                                    "readmitted_30d": int(r.readmitted_30d)} for r in df.itertuples()]
                train, test = conv(splits["train"]), conv(splits["test"])
            else:
                path = folder / GEN_SUBDIR / f"{task}.jsonl"
                if not path.exists():
                    continue
                recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                u = stable_uniform(seed, [r["id"] for r in recs])
                train = [r for r, x in zip(recs, u) if x >= 0.25]
                test = [r for r, x in zip(recs, u) if x < 0.25]
            seen = lambda rs: [TASKS[task].as_seen(r, mw) for r in rs]  # noqa: E731
            # a held-out task is scored zero-shot: none of its items reach training
            keep = 0 if task in self.held_out else cfg.gen_train_items
            self.items[task] = {"train": seen(train[:keep]), "test": seen(test[:cfg.gen_eval_items])}

    def n_train(self) -> int:
        return sum(len(v["train"]) for v in self.items.values())

    def settings(self, steps: int, offset: int, lr_key: str = "gen-learning-rate") -> InstructSettings:
        c = self.cfg
        return InstructSettings(steps=int(steps), batch_size=int(c["gen-batch-size"]), lr=float(c[lr_key]),
                                max_length=int(c["gen-max-length"]), beta=float(c["dpo-beta"]),
                                seed=int(c["seed"]) + offset, device=str(c["device"]),
                                micro_batch=getattr(self, "micro_batch", 0))

    def sft_examples(self) -> list[dict]:
        mw = self.cfg.gen_max_words
        return [TASKS[t].build_example(r, max_words=mw) for t, v in self.items.items() for r in v["train"]]

    def dpo_pairs(self, dec: LoadedModel | None, n: int, offset: int) -> tuple[list[dict], int]:
        """`n` preference pairs drawn from the training items, and how many of them
        reject the model's own wrong answer.

        chosen = the gold answer; rejected = what the starting model (`dec`'s
        active adapter) generates for the prompt when that is wrong, else a
        plausible wrong answer (`Task.rejected`). Only the pairs a DPO stage
        will use are generated for, so self-rejection costs n generations.
        """
        mw = self.cfg.gen_max_words
        rng = random.Random(self.cfg.seed * 7919 + offset)
        pool = [(t, r) for t, v in self.items.items() for r in v["train"]]
        if not pool:
            return [], 0
        picked = [pool[i] for i in rng.sample(range(len(pool)), min(n, len(pool)))]
        own: list[str | None] = [None] * len(picked)
        if dec is not None and self.cfg.dpo_self_rejected:
            gen_idx = [i for i, (t, _) in enumerate(picked) if t != "readmission"]
            if gen_idx:
                texts = generate(dec.model, dec.tokenizer, [TASKS[picked[i][0]].prompt(picked[i][1], max_words=mw)
                                                            for i in gen_idx],
                                 max_new_tokens=self.cfg.gen_max_new_tokens, device=self.cfg.device)
                for i, text in zip(gen_idx, texts):
                    t, r = picked[i]
                    if text.strip() and not TASKS[t].is_correct(r, text):
                        own[i] = text.strip()
            # a yes/no answer has one wrong alternative: the plausible one is the model's own mistake
        pairs = []
        for (t, r), mine in zip(picked, own):
            ex = TASKS[t].build_example(r, max_words=mw)
            wrong = mine if mine is not None else TASKS[t].rejected(r, rng)
            pairs.append({"prompt": ex["prompt"], "chosen": ex["completion"],
                          "rejected": [{"role": "assistant", "content": wrong}]})
        return pairs, sum(m is not None for m in own)

    def dp_settings(self, policy):
        """DP-SGD settings when the study runs with `dp` (delta from the effective policy)."""
        from clinfed.common.dp import settings_for

        return settings_for(self.cfg, policy, self.n_train())

    def sft(self, dec: LoadedModel, start, steps: int, offset: int, dp=None, ledger=None, label: str = "sft"):
        """SFT from `start`; with `dp`, DP-SGD charged to the site's ledger first
        (common.dp.plan raises DPBudgetExhausted before any training past the budget)."""
        examples = self.sft_examples()
        settings = self.settings(steps, offset)
        if dp is None:
            model = dec.use(start)
            info = sft_train(model, dec.tokenizer, examples, settings, restore=lambda: dec.use(start))
            self.micro_batch = int(info.get("micro_batch", 0))
            return decoder_adapter_state(model), info
        from clinfed.common.dp import plan
        from clinfed.common.instruct import sft_train_dp

        event = plan(ledger, dp, len(examples), settings.batch_size, settings.steps, label)
        model = dec.use(start)
        info = sft_train_dp(model, dec.tokenizer, examples, settings, dp)
        info["dp"] = event
        return decoder_adapter_state(model), info

    def dpo(self, dec: LoadedModel, start, steps: int, offset: int):
        """DPO from `start`; TRL's reference is `start` itself (see common.instruct)."""
        model = dec.use(start)
        pairs, own = self.dpo_pairs(dec, int(steps) * self.cfg.gen_batch_size, offset)
        info = dpo_train(model, dec.tokenizer, pairs, self.settings(steps, offset, "dpo-learning-rate"),
                         restore=lambda: dec.use(start))
        self.micro_batch = int(info.get("micro_batch", 0))
        info.update(self_rejected=own, pairs=len(pairs))
        return decoder_adapter_state(model), info

    def evaluate(self, dec: LoadedModel, state, k: int) -> dict[str, dict[str, float]]:
        """Aggregate scores per task, through disclosure control (`released_tasks`)."""
        return self.score_model(dec.use(state), dec.tokenizer, k)

    def released_tasks(self, k: int) -> list[str]:
        """The tasks whose scores may leave: at least k test items, and for the readmission
        question k readmitted and k not (its accuracy and F1 would give the counts away)."""
        from clinfed.common.disclosure import Counts, releasable

        out = []
        for t, v in self.items.items():
            recs = v["test"]
            pos = sum(int(r["readmitted_30d"]) for r in recs) if t == "readmission" else None
            if releasable(Counts(len(recs), pos), k):
                out.append(t)
        return out

    def score_model(self, model, tok, k: int) -> dict[str, dict[str, float]]:
        """Scores of any causal LM (e.g. one loaded with plain PEFT) on the site's test items."""
        mw = self.cfg.gen_max_words
        out = {}
        released = self.released_tasks(k)
        for t, v in self.items.items():
            recs = v["test"]
            if t not in released:
                continue
            prompts = [TASKS[t].prompt(r, max_words=mw) for r in recs]
            if t == "readmission":
                p_yes = answer_probability(model, tok, prompts, device=self.cfg.device)
                answers = ["yes" if p >= 0.5 else "no" for p in p_yes]
                scores = TASKS[t].score(recs, answers, p_yes=p_yes)
            else:
                gens = generate(model, tok, prompts, max_new_tokens=self.cfg.gen_max_new_tokens,
                                device=self.cfg.device)
                scores = TASKS[t].score(recs, gens)
            out[t] = {m: float(x) for m, x in scores.items() if x is not None and np.isfinite(x)}
        return out
