"""Performance benchmarks: `clinfed bench NAME [--json FILE] [--smoke]`.

One function per benchmark (`throughput`, `overhead`, `comm`, `scale`,
`generative`). Each measures everything it prints in the same run, prints the
machine (cores, memory, device, load average), versions and settings with a
table of figures, and returns a dict whose top level holds the headline figure.
Comparisons are ratios measured side by side in one process, alternating,
because the machine these run on is shared and absolute times drift.
`--smoke` runs a tiny configuration (tiny random models, few steps, 2 sites)
so CI can check the benchmarks still run, never how fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from clinfed.simulations import gpu_bench
from clinfed.simulations.eval_cost import evaluation

BENCHES = ("throughput", "overhead", "comm", "scale", "generative", "evaluation", "gpu")
HEADLINE = {"throughput": "ratio", "overhead": "ratio", "comm": "fraction_of_full_model",
            "scale": "peak_rss_mb", "generative": "sft_tokens_per_s", "evaluation": "speedup",
            "gpu": "qlora_lora_tokens_ratio"}


# --------------------------------------------------------------------------
# machine, versions, printing
# --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on; the load average says how shared the machine was."""
    import psutil
    import torch

    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu (no GPU)"
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu": _cpu_model(), "device": device, "avx512_bf16": bool(bf16),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "flwr", "ray", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and abs(v) < 0.01:
            return f"{v:.3g}"
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def print_kv(title: str, d: dict, out=None):
    out = out or sys.stdout
    print(f"\n{title}", file=out)
    width = max((len(str(k)) for k in d), default=0)
    for k, v in d.items():
        print(f"  {str(k):<{width}}  {_fmt(v)}", file=out)


def print_table(title: str, rows: list[dict], out=None):
    out = out or sys.stdout
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}", file=out)
    print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    print("  " + "  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)), file=out)


def _median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def quiet():
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)


def _federation(folder: Path, sizes: list[int], seed: int) -> Path:
    from clinfed.simulations.generate import SYNTHETIC_SITE_POLICY, generate_federation

    if not (folder / "truth.json").exists():
        # benchmark hospitals are small: their own policy allows cells of 5 (a study asking for
        # min-cell-size = 5 gets it only where the site's file allows it)
        generate_federation(folder, n_hospitals=len(sizes), seed=seed, sizes=sizes,
                            site_policy=SYNTHETIC_SITE_POLICY + "min-cell-size = 5\n")
    return folder


class ForwardCounter:
    """Counts what a model really trains on, the same way for every arm: a forward
    pre-hook sees each training forward's input (real tokens = attention-mask ones,
    so padding never inflates a figure) and its start time (steady step time)."""

    def __init__(self, model):
        self.reset()
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def reset(self):
        self.samples = self.real = self.slots = 0
        self.starts: list[float] = []

    def _hook(self, module, args, kwargs):
        import torch

        if not torch.is_grad_enabled():
            return None  # scoring, adapter checks, DPO reference passes
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            return None
        self.samples += int(ids.shape[0])
        self.slots += int(ids.numel())
        self.real += int(mask.sum()) if mask is not None else int(ids.numel())
        self.starts.append(time.perf_counter())
        return None

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return _median(gaps)

    def close(self):
        self._h.remove()


# --------------------------------------------------------------------------
# 1. training throughput: clinfed's loop vs a naive HF Trainer
# --------------------------------------------------------------------------
def _trainer(model, dataset, steps: int, batch_size: int, lr: float, seed: int, out: str, best: bool,
             eval_batch_size: int = 8):
    """Hugging Face `Trainer` on `model` with the same steps and hyperparameters as clinfed's loop
    (AdamW, warm-up 10 %, cosine decay, clip 1.0). `best`: the Trainer at its own best documented
    CPU settings (bf16 autocast, length-grouped batches, padding per batch to the longest note, the
    eval batch size given); otherwise its defaults (fp32, every note padded to max-length): the
    baseline earlier versions of this benchmark compared against."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size if best else 8,
        learning_rate=lr, weight_decay=0.0, warmup_steps=max(1, int(steps * 0.1)), lr_scheduler_type="cosine",
        max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], seed=seed,
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not _cuda(), bf16=best and _bf16_ok(),
        train_sampling_strategy="group_by_length" if best else "random",
    )
    from transformers.trainer_callback import PrinterCallback

    collator = DataCollatorWithPadding(dataset.tokenizer) if best else None
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # its dict of runtime figures would land in the benchmark's table output
    return trainer


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_ok() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


class _Notes:
    """Tokenized notes for the Trainer arms: padded to max-length once (`pad=True`, the naive
    pipeline) or left at their own lengths for a per-batch padding collator (`pad=False`)."""

    def __init__(self, tok, texts, labels, max_length, pad: bool = True):
        enc = tok(list(texts), truncation=True, max_length=max_length, padding="max_length" if pad else False)
        self.tokenizer = tok
        self.ids, self.mask, self.labels = enc["input_ids"], enc["attention_mask"], list(labels)
        self.lengths = [int(sum(m)) for m in self.mask]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        import torch

        return {"input_ids": torch.tensor(self.ids[i]), "attention_mask": torch.tensor(self.mask[i]),
                "labels": torch.tensor(int(self.labels[i]))}


def _fresh(lm):
    """A deep copy of the model at its initial adapter: each arm trains a model no other arm
    touched (Accelerate's bf16 wrapper stays on a model after its Trainer is gone, and would make
    every later arm silently bf16)."""
    import copy

    lm.use(lm.init_state)
    return copy.deepcopy(lm.model)


TRAINER_ARMS = {"trainer-best": True, "trainer-naive": False}


LEVERS = {"nodrop": "the frozen base's dropout off", "fused": "fused AdamW",
          "compile": "torch.compile(dynamic=True) of the forward"}


def throughput(model="minilm", steps=20, repeats=3, size=800, threads=0, seed=0, work: Path | None = None,
               score=True, profile_steps=3, levers=("nodrop",), **_):
    """Tokens and samples per second of one site's local training, clinfed against Hugging Face's
    `Trainer` at its own best settings (and, for the record, at its defaults).

    Arms alternate within one process (clinfed, clinfed in fp32, the levers, Trainer best, Trainer
    naive) `repeats` times, the order rotated each block, each on a fresh copy of the model at the
    same initial adapter; the ratio is of the medians. The fp32 arm splits clinfed's gain into the loop + padding part and the bf16 part.
    """
    import torch

    from clinfed.common.model_cache import LoadedModel, model_key
    from clinfed.client.classifier_site import Site
    from clinfed.common.config import resolve
    from clinfed.common.data import find_table
    from clinfed.common.training import TrainSettings, autocast_dtype, set_threads, train_classifier

    quiet()
    cfg = resolve({"model": model, "seed": seed})
    n_threads = set_threads(threads or None)
    fed = _federation(work / "federation", [size, 100], seed)
    site = Site("h01", find_table(fed / "h01"), work / "site", cfg)
    t = time.perf_counter()
    lm = LoadedModel(model_key(cfg))
    load_s = time.perf_counter() - t
    tok = lm.tokenizer
    enc, y = site.encoded("train", tok), site.labels("train")
    bs, lr, max_len = cfg.batch_size, cfg.learning_rate, cfg.max_length
    texts = site.splits["train"]["note_text"].tolist()
    data = {True: _Notes(tok, texts, y, max_len, pad=False), False: _Notes(tok, texts, y, max_len, pad=True)}
    amp = autocast_dtype("cpu" if not torch.cuda.is_available() else "cuda", cfg.precision)
    # clinfed-nodrop: a lever under test (issue 22), the frozen base's dropout off during LoRA training
    # (the masks were 31 % of a step's CPU time); a modelling choice whose accuracy cost is measured
    # separately, on the default study's paired differences, before it could become a default
    # clinfed-fused, clinfed-compile: levers of issue 22 on the same loop (`levers`); compile's first
    # steps of every block (compilation) are timed apart, as "compile s", and not counted
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown lever(s) {', '.join(sorted(unknown))}; known: {', '.join(LEVERS)}")
    arms = {"clinfed": cfg.precision, "clinfed-fp32": "fp32",
            **{f"clinfed-{lv}": cfg.precision for lv in LEVERS if lv in levers},
            **{a: None for a in TRAINER_ARMS}}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(-1, repeats):  # rep -1: an untimed warm-up block of each arm (first-call costs)
        # the order rotates from block to block: on these machines a block's place in the order
        # moved its time by up to a quarter (back-to-back A/B checks), which a fixed order would
        # hand to some arms and not others
        names = list(arms)
        shift = (rep + 1) % len(names)
        for arm in names[shift:] + names[:shift]:
            precision = arms[arm]
            model_copy = _fresh(lm)
            if arm == "clinfed-nodrop":
                for module in model_copy.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = 0.0
            counter = ForwardCounter(model_copy)
            n_steps = steps if rep >= 0 else 2
            compile_s = None
            if precision is not None:
                settings = TrainSettings(steps=n_steps, batch_size=bs, lr=lr, seed=seed + rep + 1, precision=precision,
                                         fused_optimizer=True if arm == "clinfed-fused" else None)
                if arm == "clinfed-compile":
                    model_copy.forward = torch.compile(model_copy.forward, dynamic=True)
                    t = time.perf_counter()
                    train_classifier(model_copy, enc, y, TrainSettings(steps=2, batch_size=bs, lr=lr, seed=seed,
                                                                       precision=precision),
                                     pad_id=tok.pad_token_id)
                    compile_s = time.perf_counter() - t
                    counter.reset()
                t = time.perf_counter()
                info = train_classifier(model_copy, enc, y, settings, pad_id=tok.pad_token_id)
                wall = time.perf_counter() - t
                if info["tokens"] != counter.real:
                    raise RuntimeError(f"token count mismatch: loop {info['tokens']} vs hook {counter.real}")
            else:
                best = TRAINER_ARMS[arm]
                with tempfile.TemporaryDirectory() as out:
                    trainer = _trainer(model_copy, data[best], n_steps, bs, lr, seed + rep + 1, out, best)
                    t = time.perf_counter()
                    trainer.train()
                    wall = time.perf_counter() - t
                    del trainer
            counter.close()
            runs[arm].append({"seconds": wall, "tokens": counter.real, "slots": counter.slots,
                              "samples": counter.samples, "step_s": counter.step_seconds(),
                              **({"compile_s": compile_s} if compile_s is not None else {})})
            del model_copy
            if rep < 0:
                runs[arm].pop()
    rows = []
    med = {}
    described = {"clinfed": cfg.precision, "clinfed-fp32": "fp32",
                 **{f"clinfed-{lv}": f"{cfg.precision}, {what}" for lv, what in LEVERS.items()},
                 "trainer-best": "bf16=True, group_by_length, per-batch padding" if _bf16_ok()
                 else "group_by_length, per-batch padding (no bf16 on this CPU)",
                 "trainer-naive": "defaults: fp32, padded to max-length"}
    for arm, rs in runs.items():
        tps = [r["tokens"] / r["seconds"] for r in rs]
        sps = [r["samples"] / r["seconds"] for r in rs]
        med[arm] = {"tokens_per_s": _median(tps), "samples_per_s": _median(sps)}
        rows.append({"arm": arm, "settings": described[arm],
                     "real tok/s": med[arm]["tokens_per_s"], "samples/s": med[arm]["samples_per_s"],
                     "step s (median)": _median([r["step_s"] for r in rs]),
                     "padding share": 1 - sum(r["tokens"] for r in rs) / max(1, sum(r["slots"] for r in rs)),
                     "blocks": len(rs),
                     "compile s (per block)": _median([r["compile_s"] for r in rs]) if "compile_s" in rs[0] else ""})
    base, naive = med["trainer-best"], med["trainer-naive"]
    result = {
        "ratio": med["clinfed"]["tokens_per_s"] / base["tokens_per_s"],
        "samples_ratio": med["clinfed"]["samples_per_s"] / base["samples_per_s"],
        "ratio_vs_naive_trainer": med["clinfed"]["tokens_per_s"] / naive["tokens_per_s"],
        "ratio_fp32_loop_vs_naive": med["clinfed-fp32"]["tokens_per_s"] / naive["tokens_per_s"],
        "ratio_bf16_vs_fp32_loop": med["clinfed"]["tokens_per_s"] / med["clinfed-fp32"]["tokens_per_s"],
        "lever_ratios": {lv: med[f"clinfed-{lv}"]["tokens_per_s"] / med["clinfed"]["tokens_per_s"]
                         for lv in LEVERS if f"clinfed-{lv}" in med},
        "tokens_per_s": med["clinfed"]["tokens_per_s"], "samples_per_s": med["clinfed"]["samples_per_s"],
        "trainer_best_tokens_per_s": base["tokens_per_s"], "naive_tokens_per_s": naive["tokens_per_s"],
        "arms": runs, "model_load_s": load_s,
        "settings": {"model": model, "site": "h01", "n_train": len(enc), "steps_per_block": steps,
                     "repeats": repeats, "batch_size": bs, "learning_rate": lr, "max_length": max_len,
                     "threads": n_threads, "autocast": str(amp).replace("torch.", "") if amp else "none"},
    }
    tables = [("training, medians of alternating blocks (ratio = clinfed / trainer-best)", rows)]
    if profile_steps:
        result["profile"] = _profile(lm, enc, y, data, bs, lr, seed, cfg.precision, profile_steps)
        tables.append((f"where a training step's CPU time goes ({profile_steps} steps per arm, torch.profiler, "
                       "share of self CPU time)", result["profile"]))
    if not torch.cuda.is_available():
        result["roofline"] = _roofline(lm, enc, y, bs, lr, seed, cfg.precision, med["clinfed"]["tokens_per_s"])
        tables.append(("clinfed's step against this CPU's matrix-product rate (same threads and precision)",
                       [result["roofline"]]))
    if score:
        result["scoring"] = _scoring(lm, site, cfg, repeats, seed)
        tables.append(("scoring (test + temporal splits), notes per second", result["scoring"]["rows"]))
    result["_tables"] = tables
    return result


def _profile(lm, enc, y, data, bs, lr, seed, precision, steps) -> list[dict]:
    """Self CPU time by operator, clinfed's loop vs the Trainer at its best: what a step is made of."""
    from torch.profiler import ProfilerActivity, profile

    from clinfed.common.training import TrainSettings, train_classifier

    shares = {}
    for arm in ("clinfed", "trainer-best"):
        model_copy = _fresh(lm)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if arm == "clinfed":
                train_classifier(model_copy, enc, y, TrainSettings(steps=steps, batch_size=bs, lr=lr, seed=seed,
                                                                   precision=precision), pad_id=lm.tokenizer.pad_token_id)
            else:
                with tempfile.TemporaryDirectory() as out:
                    _trainer(model_copy, data[True], steps, bs, lr, seed, out, best=True).train()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) or 1
        shares[arm] = ({e.key: e.self_cpu_time_total / total for e in events}, total / 1e6 / steps)
    top = sorted(set().union(*(dict(sorted(d.items(), key=lambda kv: -kv[1])[:6]) for d, _ in shares.values())),
                 key=lambda k: -shares["trainer-best"][0].get(k, 0))
    rows = [{"operator": k, **{f"{arm} share": shares[arm][0].get(k, 0.0) for arm in shares}} for k in top]
    rows.append({"operator": "CPU s per step (all operators)", **{f"{arm} share": shares[arm][1] for arm in shares}})
    return rows


def _roofline(lm, enc, y, bs, lr, seed, precision, tokens_per_s: float) -> dict:
    """How close a step runs to what this CPU can do: the step's floating-point operations (counted
    by torch's FlopCounterMode over one training step, forward and backward, per real token) times
    the measured tokens/s, against the machine's own matrix-product rate at the same threads and
    precision (a 1024 x 1024 product, repeated for about a second). A step at a large fraction of
    that rate cannot be made much faster by the loop, only by doing fewer operations."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clinfed.common.training import TrainSettings, autocast_dtype, train_classifier

    model_copy = _fresh(lm)
    with FlopCounterMode(display=False) as fc:
        info = train_classifier(model_copy, enc, y, TrainSettings(steps=1, batch_size=bs, lr=lr, seed=seed,
                                                                  precision=precision),
                                pad_id=lm.tokenizer.pad_token_id)
    per_token = fc.get_total_flops() / max(1, info["tokens"])
    dtype = autocast_dtype("cpu", precision) or torch.float32

    def rate(m, k, n_):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n_, dtype=dtype)
        for _ in range(3):
            a @ b
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            a @ b
            n += 1
        return n * 2 * m * k * n_ / (time.perf_counter() - t)

    ceiling = rate(1024, 1024, 1024)
    # the step's own largest product: a batch's tokens through the feed-forward layer
    hidden = int(getattr(lm.model.config, "hidden_size", 0) or 0)
    rows_ = bs * int(np.mean([len(e) for e in enc]))
    shaped = rate(rows_, hidden, 4 * hidden) if hidden else float("nan")
    achieved = per_token * tokens_per_s
    return {"flops_per_token": per_token, "achieved_gflops": achieved / 1e9,
            "matmul_gflops": ceiling / 1e9, "fraction_of_matmul_rate": achieved / ceiling,
            "matmul_gflops_step_shape": shaped / 1e9, "fraction_of_step_shape_rate": achieved / shaped,
            "step_shape": f"{rows_}x{hidden} @ {hidden}x{4 * hidden}",
            "matmul_dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}


def _scoring(lm, site, cfg, repeats: int, seed: int) -> dict:
    """clinfed's scoring (no gradients, length-sorted batches) against `Trainer.predict` at the same
    batch size and precision with per-batch padding (its best), and at its defaults (batch 8, fp32,
    max-length padding: the old baseline). Each arm on a fresh copy of the model."""
    import numpy as np

    from clinfed.common.training import predict_proba

    tok = lm.tokenizer
    enc = site.encoded("test", tok) + site.encoded("temporal", tok)
    texts = site.splits["test"]["note_text"].tolist() + site.splits["temporal"]["note_text"].tolist()
    y = np.concatenate([site.labels("test"), site.labels("temporal")])
    data = {True: _Notes(tok, texts, y, cfg.max_length, pad=False), False: _Notes(tok, texts, y, cfg.max_length, pad=True)}
    times = {"clinfed": [], **{a: [] for a in TRAINER_ARMS}}
    probs = {}
    for _ in range(repeats):
        model_copy = _fresh(lm)
        t = time.perf_counter()
        probs["clinfed"] = predict_proba(model_copy, enc, tok.pad_token_id, batch_size=cfg.eval_batch_size,
                                         precision=cfg.precision)
        times["clinfed"].append(time.perf_counter() - t)
        for arm, best in TRAINER_ARMS.items():
            model_copy = _fresh(lm)
            with tempfile.TemporaryDirectory() as out:
                trainer = _trainer(model_copy, data[best], 1, 16, 1e-3, seed, out, best,
                                   eval_batch_size=cfg.eval_batch_size)
                t = time.perf_counter()
                pred = trainer.predict(data[best])
                times[arm].append(time.perf_counter() - t)
            logits = np.asarray(pred.predictions, dtype=np.float64)
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs[arm] = e[:, 1] / e.sum(1)
    batch = {"clinfed": cfg.eval_batch_size, "trainer-best": cfg.eval_batch_size, "trainer-naive": 8}
    rows = [{"arm": a, "batch": batch[a], "notes/s": len(enc) / _median(ts), "blocks": len(ts)} for a, ts in times.items()]
    rate = {r["arm"]: r["notes/s"] for r in rows}
    return {"rows": rows, "ratio": rate["clinfed"] / rate["trainer-best"],
            "ratio_vs_naive_trainer": rate["clinfed"] / rate["trainer-naive"], "n_notes": len(enc),
            "max_abs_prob_diff": float(np.max(np.abs(probs["clinfed"] - probs["trainer-naive"]))) if len(enc) else 0.0}


# --------------------------------------------------------------------------
# 2. federation overhead: a real simulated study vs the same work in-process
# --------------------------------------------------------------------------
STUDY_REGIMES = "base,global,local,personalized"


def _study_overrides(model, fed, rounds, local_steps, personalize_steps, threads, seed, bootstrap, extra=None):
    return {"model": model, "data-dir": str(fed), "seed": seed, "num-server-rounds": rounds,
            "local-steps": local_steps, "personalize-steps": personalize_steps, "regimes": STUDY_REGIMES,
            "share-local-adapters": False, "report": False, "client-threads": threads, "bootstrap": bootstrap,
            **(extra or {})}


_POOL: dict = {}


def _pool_init(overrides: dict, threads: int) -> None:
    """A baseline worker: what a Ray worker of the simulation holds (the model, loaded once;
    its sites, tokenized once, through the same `Site.get` cache), without Flower or Ray."""
    from clinfed.common.config import resolve
    from clinfed.common.model_cache import LoadedModel, model_key
    from clinfed.common.training import set_threads

    quiet()
    set_threads(threads)
    cfg = resolve(overrides)
    _POOL.update(cfg=cfg, lm=LoadedModel(model_key(cfg)))


def _pool_task(kind: str, name: str, table: str, out_dir: str, start=None, rnd: int = 0):
    """One site's share of one phase, as the client's handler does it (client.classifier_handlers)."""
    from clinfed.client.classifier_handlers import SEED_LOCAL, SEED_PERSONALIZED
    from clinfed.client.classifier_site import Site

    cfg, lm = _POOL["cfg"], _POOL["lm"]
    t = time.perf_counter()
    site = Site.get(name, Path(table), Path(out_dir), cfg)
    out = None
    if kind == "describe":
        site.descriptors(cfg.min_cell_size)
    elif kind == "train":
        state, _ = site.train(lm, start, cfg.local_steps, seed_offset=rnd, label=f"round {rnd}")
        out = (state, len(site.splits["train"]))
    elif kind == "personalize":
        steps = cfg.local_regime_steps or cfg.num_server_rounds * cfg.local_steps
        state, _ = site.train(lm, lm.init_state, steps, seed_offset=SEED_LOCAL, label="local")
        site.save_private(lm, "local", state)
        if cfg.personalize_steps > 0:
            state, _ = site.train(lm, start, cfg.personalize_steps, seed_offset=SEED_PERSONALIZED, label="personalized")
            site.save_private(lm, "personalized", state)
    elif kind == "evaluate":
        states = {"base": lm.init_state, "global": start}
        for regime in ("local", "personalized"):
            if (s := site.load_private(lm, regime)) is not None:
                states[regime] = s
        site.evaluate(lm, states, k=cfg.min_cell_size, subgroups=cfg.subgroups)
    return out, time.perf_counter() - t


def _inprocess_sites(fed: Path, overrides: dict, out: Path, workers: int, threads: int) -> dict:
    """The sites' own work of the study without Flower or Ray, run the way the simulation runs it:
    `workers` processes side by side (the simulation's Ray workers: cores / cpus-per-site), each
    with `threads` torch threads (client-threads), each loading the model once, the sites handed
    to whichever worker is free in node order, every phase waiting for all sites (the server's
    round barrier), FedAvg between rounds. Same sites, splits, seeds, steps and evaluation.
    Wall seconds per phase, with the pool's start (processes, imports, model loads) as its own
    part: the simulation pays for its own workers' start too."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import psutil

    from clinfed.common.config import resolve
    from clinfed.common.data import find_table, list_sites

    cfg = resolve(overrides)
    sites = [(name, str(find_table(folder)), str(out / "sites" / name)) for name, folder in list_sites(fed)]
    cpu0 = time.process_time()
    timer = {"start": 0.0, "describe": 0.0, "federated": 0.0, "personalize": 0.0, "evaluate": 0.0}
    site_s: dict[str, float] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_pool_init, initargs=(dict(overrides), threads)) as pool:
        list(pool.map(time.sleep, [0.0] * workers))  # every worker started and holds its model
        timer["start"] = time.perf_counter() - t0

        def phase(name, kind, start=None, rnd=0):
            t = time.perf_counter()
            got = list(pool.map(_pool_task, [kind] * len(sites), *zip(*sites), [start] * len(sites),
                                [rnd] * len(sites)))
            timer[name] += time.perf_counter() - t
            site_s[name] = site_s.get(name, 0.0) + sum(s for _, s in got)
            return [o for o, _ in got]

        from clinfed.common.model_cache import LoadedModel, model_key

        glob = LoadedModel(model_key(cfg)).init_state  # what the server starts from
        phase("describe", "describe")
        for rnd in range(1, cfg.num_server_rounds + 1):
            updates = phase("federated", "train", glob, rnd)
            total = sum(n for _, n in updates)
            glob = {key: sum(s[key] * (n / total) for s, n in updates).astype(np.float32) for key in glob}
        phase("personalize", "personalize", glob)
        phase("evaluate", "evaluate", glob)
        cpu = sum(sum(psutil.Process(p).cpu_times()[:2]) for p in list(pool._processes))
    timer["total"] = time.perf_counter() - t0
    timer["cpu"] = cpu + time.process_time() - cpu0
    timer["site_seconds"] = site_s
    return timer


MONITOR_S = 2.0  # the overhead benchmark's sampling interval: CPU time per process, not memory peaks


def overhead(model="minilm", sizes=(2000, 1262, 796, 502, 317, 200), rounds=3, local_steps=20, personalize_steps=20,
             cpus_per_site=1.0, threads=0, bootstrap=500, seed=0, bracket=True, serial=True,
             work: Path | None = None, **_):
    """Wall time of a real `flwr run` study divided by the same work's wall time without Flower.

    The fair baseline (issue 22) runs the sites exactly as the simulation does: as many sites
    side by side as Ray runs (cores / `cpus_per_site`), each with the same torch threads
    (`threads`, default the site's CPUs: the default study's one thread per site), each worker
    loading the model once. The ratio's rest is federation overhead: Flower/Ray start and stop,
    messaging, the server's per-round bookkeeping. The baseline runs before and (with `bracket`)
    after the simulation and the denominator is their mean, so a change of the machine's load
    shows and averages out. With `serial`, the old baseline runs once too (one site at a time
    with every core): its time against the side-by-side baseline is the lever "one thread per
    site, sites side by side".
    """
    from clinfed.simulations.local import ray_cpus, simulate

    quiet()
    cores = os.cpu_count() or 1
    threads = int(threads or max(1, int(cpus_per_site)))
    workers = max(1, int(ray_cpus(len(sizes), cpus_per_site) // cpus_per_site))
    fed = _federation(work / "federation", list(sizes), seed)
    overrides = _study_overrides(model, fed, rounds, local_steps, personalize_steps, threads, seed, bootstrap)
    phases = ("describe", "federated", "personalize", "evaluate")
    load = {"start": os.getloadavg()[0]}

    def baseline(folder: str, over: dict, n_workers: int, n_threads: int) -> dict:
        # the same sampler as the simulation's, at the same interval, over the pool's processes:
        # both arms pay for being watched (at 0.5 s it took 16 s of CPU from a 400 s simulated study)
        with TreeRSS(work / folder / ".no-flower", interval=MONITOR_S) as watch:
            got = _inprocess_sites(fed, over, work / folder, n_workers, n_threads)
        got["monitor_cpu"] = watch.own_cpu
        return got

    computes = [baseline("inprocess-1", overrides, workers, threads)]
    load["after_inprocess_1"] = os.getloadavg()[0]
    serial_run = None
    if serial:
        serial_run = baseline("inprocess-serial", {**overrides, "client-threads": cores}, 1, cores)
        load["after_inprocess_serial"] = os.getloadavg()[0]
    run_dir = work / "run"
    with TreeRSS(run_dir.resolve() / ".flwr", interval=MONITOR_S) as mon:
        t = time.perf_counter()
        run = simulate(run_dir, overrides, n_sites=len(sizes), cpus_per_site=cpus_per_site, echo=False)
        wall = time.perf_counter() - t
    load["after_simulation"] = os.getloadavg()[0]
    if bracket:
        computes.append(baseline("inprocess-2", overrides, workers, threads))
        load["after_inprocess_2"] = os.getloadavg()[0]
    compute = {k: statistics.fmean(c[k] for c in computes) for k in ("start", *phases, "total", "cpu")}
    baseline = compute["total"]
    timings = run.get("timings", {})
    n = len(sizes)
    msgs = {"describe": n, "federated": n * rounds, "personalize": n, "evaluate": n}
    rows = [{"part": "Flower/Ray start and stop (outside the ServerApp)", "simulated s": wall - timings.get("total", 0),
             "in-process s": 0.0},
            {"part": "start: wait for sites / worker processes and model loads", "simulated s": timings.get("wait", 0.0),
             "in-process s": compute["start"]},
            {"part": "server model load", "simulated s": timings.get("load-model", 0.0), "in-process s": 0.0}]
    for phase in phases:
        sim, comp = timings.get(phase, 0.0), compute[phase]
        rows.append({"part": phase + (" (incl. the worker's model load)" if phase == "describe" else ""),
                     "simulated s": sim, "in-process s": comp, "messages": msgs[phase],
                     "overhead per message s": (sim - comp) / msgs[phase]})
    accounted = sum(r["simulated s"] for r in rows)
    rows.append({"part": "other (checkpoints, metrics, run.json)", "simulated s": wall - accounted,
                 "in-process s": baseline - sum(r["in-process s"] for r in rows)})
    rows.append({"part": "total", "simulated s": wall, "in-process s": baseline})
    startup = rows[0]["simulated s"] + rows[1]["simulated s"]
    result = {
        "ratio": wall / baseline,
        "ratio_without_start": (wall - startup) / (baseline - compute["start"]),
        "cpu_ratio": mon.cpu_seconds / compute["cpu"] if compute["cpu"] > 0 else None,
        "simulated_wall_s": wall, "inprocess_wall_s": baseline,
        "inprocess_runs_s": [c["total"] for c in computes],
        "simulated_cpu_s": mon.cpu_seconds, "inprocess_cpu_s": compute["cpu"],
        "simulated_cpu_by_process_s": mon.cpu_by_role(),
        "monitor_cpu_s": {"simulated": mon.own_cpu, "in-process": [c["monitor_cpu"] for c in computes]},
        "round_seconds": [r["seconds"] for r in run.get("rounds", [])], "breakdown": rows,
        "load_average_1min": load, "simulation_processes": mon.peak_procs,
        "settings": {"model": model, "sites": n, "sizes": list(sizes), "num-server-rounds": rounds,
                     "local-steps": local_steps, "local-regime-steps": rounds * local_steps,
                     "personalize-steps": personalize_steps, "regimes": STUDY_REGIMES, "bootstrap": bootstrap,
                     "cpus_per_site": cpus_per_site, "threads_per_site": threads, "sites_side_by_side": workers,
                     "report": False, "inprocess_runs": len(computes)},
        "_tables": [("simulated study vs the same work in-process, sites side by side as the simulation runs "
                     "them (seconds; in-process = mean of the runs)", rows),
                    ("CPU seconds of the simulated study per process (in-process baseline: "
                     f"{compute['cpu']:.1f} s)",
                     [{"process": k, "cpu s": v} for k, v in mon.cpu_by_role().items()])],
    }
    if serial_run is not None:
        result["serial_inprocess_s"] = serial_run["total"]
        result["side_by_side_speedup"] = serial_run["total"] / baseline
        result["_tables"].append((
            f"the lever: {workers} sites side by side with {threads} thread(s) each vs one site at a time "
            f"with {cores} threads (in-process, seconds)",
            [{"phase": p, "side by side s": compute[p], "one at a time s": serial_run[p],
              "ratio": serial_run[p] / compute[p] if compute[p] > 0 else float("nan")}
             for p in ("start", *phases, "total")]))
    return result


# --------------------------------------------------------------------------
# 3. communication: serialized Flower message sizes vs the full model
# --------------------------------------------------------------------------
def wire_bytes(msg) -> dict:
    """Bytes of a message as Flower 1.41 moves it (its content-addressed objects, arrays in
    chunks) and as one protobuf (`message_to_proto`)."""
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(msg)
    return {"objects": int(sum(len(o.deflate()) for o in objects.values())),
            "proto": int(message_to_proto(msg).ByteSize()), "n_objects": len(objects)}


def _round_messages(state: dict, run_dir: str, n_train: int, base_model: str = ""):
    """The train message a site receives and the reply it sends, as server.study and
    client.app build them (same records and keys; the values' sizes do not depend on a run)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clinfed.common.adapters import wire_hash

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # outside a Flower runtime
    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    config = {"run-dir": run_dir, "server-round": 1, "base-model": base_model}
    down = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=1, message_type="train")
    up = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({
        "num-examples": n_train, "train-loss": 0.5, "train-steps": 20, "train-seconds": 10.0,
        "train-tokens": 20000, "adapter-hash": wire_hash(state)})}), reply_to=down)
    return down, up


def comm(model="minilm", ranks=(4, 8, 16), train_steps=60, size=800, seed=0, threads=0, adapter=None,
         site_data=None, work: Path | None = None, **_):
    """Bytes per client per round both ways for several LoRA ranks, vs a full-model message,
    and what fp16 transfer of a trained adapter costs in AUC (the adapter trained here for
    `train_steps`, or a study's adapter folder `adapter` scored on hospital folder `site_data`)."""
    import numpy as np

    from clinfed.common.model_cache import LoadedModel, ModelKey, model_key
    from clinfed.common.config import resolve
    from clinfed.common.models import LoraSettings, load_classifier
    from clinfed.common.model_source import model_identity
    from clinfed.common.training import set_threads

    quiet()
    cfg = resolve({"model": model, "seed": seed})
    set_threads(threads or None)
    run_dir = str(Path.cwd() / "runs" / "20250101-000000")  # a typical RUN_DIR path in the config record
    base, _ = load_classifier(model, seed)
    full_state = {k: v.detach().float().numpy() for k, v in base.named_parameters()}  # full fine-tuning FedAvg
    full_params = int(sum(p.numel() for p in base.parameters()))
    del base
    full_down, full_up = _round_messages(full_state, run_dir, 1000, model_identity(model))
    full = {"down": wire_bytes(full_down), "up": wire_bytes(full_up), "raw": int(sum(a.nbytes for a in full_state.values()))}
    del full_state, full_down, full_up
    default_rank = cfg.lora_rank
    ranks = sorted({int(r) for r in ranks} | {default_rank})
    rows, per_rank = [], {}
    fp16 = None
    rng = np.random.default_rng(seed)
    for rank in ranks:
        key = model_key(cfg)
        key = ModelKey(key.model, key.seed, LoraSettings(rank, key.lora.alpha, key.lora.dropout, key.lora.targets))
        lm = LoadedModel(key)
        if rank == default_rank:
            fp16, state = _fp16_round_trip(lm, cfg, train_steps, size, seed, work, adapter, site_data)
        else:
            # An untrained adapter's LoRA B is all zeros, and Flower stores identical chunks once:
            # give B trained-like values so the sizes are those of a real round, not of round 1.
            state = {k: (rng.normal(0, 1e-3, v.shape).astype(v.dtype) if "lora_B" in k else v)
                     for k, v in lm.init_state.items()}
        for dtype in ("float32", "float16"):
            st = {k: v.astype(dtype) for k, v in state.items()}
            down, up = _round_messages(st, run_dir, 1000, lm.identity)
            d, u = wire_bytes(down), wire_bytes(up)
            entry = {"rank": rank, "dtype": dtype, "adapter params": int(sum(v.size for v in st.values())),
                     "lora params": int(sum(v.size for k, v in st.items() if "lora_" in k)),
                     "raw bytes": int(sum(v.nbytes for v in st.values())),
                     "received by site": d["objects"], "sent by site": u["objects"],
                     "fraction of full": max(d["objects"], u["objects"]) / max(full["down"]["objects"], full["up"]["objects"]),
                     "proto bytes (down)": d["proto"]}
            rows.append(entry)
            per_rank[f"{rank}/{dtype}"] = entry
        del lm
    headline = per_rank[f"{default_rank}/float32"]["fraction of full"]
    return {
        "fraction_of_full_model": headline,
        "fraction_of_full_model_fp16": per_rank[f"{default_rank}/float16"]["fraction of full"],
        "default_rank": default_rank,
        "bytes_per_round_default": {"received": per_rank[f"{default_rank}/float32"]["received by site"],
                                    "sent": per_rank[f"{default_rank}/float32"]["sent by site"]},
        "full_model": {"parameters": full_params, "raw_bytes": full["raw"], "message_bytes": full["down"]["objects"],
                       "proto_bytes": full["down"]["proto"]},
        "per_rank": per_rank, "fp16_round_trip": fp16,
        "settings": {"model": model, "ranks": ranks, "lora-alpha": cfg.lora_alpha,
                     "targets": "per architecture" if not cfg.lora_targets else cfg.lora_targets,
                     "head_and_pooler_federated": True, "fp16_adapter": adapter or f"trained here, {train_steps} steps"},
        "_tables": [(f"bytes per client per round (full model: {full_params:,} parameters, "
                     f"{full['down']['objects']:,} bytes per message)", rows),
                    ("fp16 round trip of a trained adapter (test + temporal splits)", [fp16])],
    }


def _fp16_round_trip(lm, cfg, steps, size, seed, work, adapter=None, site_data=None):
    """Train an adapter at one site, score it as sent in fp32 and after an fp16 round trip;
    returns the figures and the trained adapter (whose message sizes are those of a real round)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from clinfed.client.classifier_site import Site
    from clinfed.common.data import find_table
    from clinfed.common.training import predict_proba

    from clinfed.common.adapters import read_adapter

    folder = Path(site_data) if site_data else _federation(work / "federation", [size, 100], seed) / "h01"
    site = Site(folder.name, find_table(folder), work / "site", cfg)
    if adapter:
        state, steps = read_adapter(lm.model, adapter, lm.identity), f"study adapter {Path(adapter).name}"
    else:
        state, _ = site.train(lm, lm.init_state, steps, seed_offset=1, label="fp16 check")
    half = {k: v.astype(np.float16).astype(np.float32) for k, v in state.items()}
    enc = site.encoded("test", lm.tokenizer) + site.encoded("temporal", lm.tokenizer)
    y = np.concatenate([site.labels("test"), site.labels("temporal")])
    p32 = predict_proba(lm.use(state), enc, lm.tokenizer.pad_token_id, precision="fp32")
    p16 = predict_proba(lm.use(half), enc, lm.tokenizer.pad_token_id, precision="fp32")
    auc = lambda p: float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan")  # noqa: E731
    rel = max(float(np.max(np.abs(state[k] - half[k])) / (np.max(np.abs(state[k])) or 1.0)) for k in state)
    return {"adapter": steps if adapter else f"trained here, {steps} steps", "site": folder.name, "n scored": len(y), "auc fp32": auc(p32), "auc fp16": auc(p16),
            "auc difference": auc(p16) - auc(p32), "max |prob diff|": float(np.max(np.abs(p16 - p32))),
            "max relative weight error": rel}, state


# --------------------------------------------------------------------------
# 4. scale: memory and time per round as the number of sites grows
# --------------------------------------------------------------------------
def process_role(cmdline: list[str]) -> str:
    """What a process of a simulated study is, from its command line."""
    text = " ".join(cmdline)
    exe = cmdline[0].rsplit("/", 1)[-1] if cmdline else ""
    if exe in ("raylet", "gcs_server"):
        return {"raylet": "Ray raylet", "gcs_server": "Ray GCS"}[exe]
    for needle, role in (("default_worker.py", "Ray worker (the sites' ClientApp)"),
                         ("ray::", "Ray worker (the sites' ClientApp)"),
                         ("log_monitor", "Ray log monitor"), ("dashboard", "Ray dashboard/agents"),
                         ("runtime_env", "Ray dashboard/agents"), ("flower-superlink", "SuperLink"),
                         ("flwr-serverapp", "ServerApp"), ("flwr-simulation", "ServerApp + simulation engine"),
                         ("flower-simulation", "ServerApp + simulation engine"), ("flwr run", "flwr CLI"),
                         ("bin/flwr ", "flwr CLI")):
        if needle in text:
            return role
    if exe.startswith("python") and len(cmdline) > 1:  # name it by its script
        return cmdline[1].rsplit("/", 1)[-1]
    return exe or "other"


class TreeRSS:
    """Samples the resident memory of every process of one simulated study: this
    process's children (the `flwr` CLI) and every process whose FLWR_HOME is the
    study's (the detached SuperLink, the ServerApp, Ray's raylet, GCS and workers).
    RSS counts shared pages once per process, so the sum is an upper bound; PSS,
    sampled less often, counts them once. Also keeps each process's CPU time, which a
    shared machine's load distorts far less than wall time."""

    def __init__(self, flwr_home: Path, interval: float = 0.5):
        self.home = str(flwr_home)
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self._cpu: dict[int, float] = {}
        self._role: dict[int, str] = {}
        self._foreign: set[int] = set()  # pids seen and not the study's: not read again
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self):
        import psutil

        me = psutil.Process()
        found = {p.pid: p for p in me.children(recursive=True)}
        for p in psutil.process_iter():
            if p.pid in found or p.pid == me.pid or p.pid in self._foreign:
                continue
            try:
                if p.environ().get("FLWR_HOME") == self.home:
                    found[p.pid] = p
                else:
                    self._foreign.add(p.pid)
            except (psutil.Error, OSError):
                continue
        return list(found.values())

    def _run(self):
        import psutil

        i = 0
        while not self._stop.is_set():
            procs = self._procs()
            rss = pss = 0
            for p in procs:
                try:
                    if i % 6 == 0:
                        full = p.memory_full_info()
                        rss += full.rss
                        pss += getattr(full, "pss", full.rss)
                    else:
                        rss += p.memory_info().rss
                    ct = p.cpu_times()
                    self._cpu[p.pid] = ct.user + ct.system
                    if p.pid not in self._role:
                        self._role[p.pid] = process_role(p.cmdline())
                except (psutil.Error, OSError):
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.samples += 1
            i += 1
            self.own_cpu = time.thread_time()
            self._stop.wait(self.interval)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the tree's processes as last seen (a process's last interval may be missed)."""
        return float(sum(self._cpu.values()))

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per kind of process (the profile of where a study's CPU goes), with
        this monitor's own sampling, which the in-process baseline does not pay."""
        out: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            role = self._role.get(pid, "other")
            out[role] = out.get(role, 0.0) + cpu
        out["benchmark's own sampling (this monitor)"] = self.own_cpu
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def scale(model="minilm", sites=(5, 20, 50), size=60, data_factors=(1, 4), rounds=2, local_steps=5,
          personalize_steps=2, bootstrap=50, threads=1, cpus_per_site=1.0, regimes="base,global,local",
          share_local=True, seed=0, work: Path | None = None, figure: str | None = None, **_):
    """How the study's wall time and peak memory grow with the number of sites and with the notes
    per site: every combination of `sites` and `data_factors` x `size` encounters per site, at a
    small per-site budget (steps per site are fixed, so more notes cost tokenization and
    evaluation, not training). The local adapters are shared as on generated data by default, so
    every site also scores every other site's local adapter: that cross-site evaluation grows with
    the square of the sites. Sites run as the default study runs them (one CPU and one thread
    each). Rows are written as they finish (`scale-rows.json`), cheapest first, so an interrupted
    run keeps what it measured; `figure` draws the log-log figure."""
    from clinfed.simulations.local import simulate

    quiet()
    factors = tuple(int(f) for f in (data_factors or (1,)))
    configs = sorted({(int(n), int(size) * f) for n in sites for f in factors}, key=lambda c: c[0] * c[0] * c[1])
    rows = []
    for n, sz in configs:
        tag = f"{n}x{sz}"
        fed = _federation(work / f"federation-{tag}", [sz] * n, seed)
        overrides = _study_overrides(model, fed, rounds, local_steps, personalize_steps, threads, seed, bootstrap,
                                     {"subgroups": False, "regimes": regimes, "min-cell-size": 5,
                                      "share-local-adapters": bool(share_local)})
        run_dir = work / f"run-{tag}"
        load0 = os.getloadavg()[0]
        with TreeRSS(run_dir.resolve() / ".flwr") as mem:
            t = time.perf_counter()
            run = simulate(run_dir, overrides, n_sites=n, cpus_per_site=cpus_per_site, echo=False)
            wall = time.perf_counter() - t
        timings = run.get("timings", {})
        per_round = [r["seconds"] for r in run.get("rounds", [])]
        row = {"sites": n, "notes per site": sz, "notes x": sz // int(size), "encounters": n * sz,
               "peak RSS MB": mem.peak_rss / 2**20, "peak PSS MB": mem.peak_pss / 2**20,
               "processes": mem.peak_procs, "wall s": wall, "CPU s": mem.cpu_seconds,
               "start/stop s": wall - timings.get("total", 0.0), "s per round": _median(per_round),
               "personalize s": timings.get("personalize", 0.0), "evaluate s": timings.get("evaluate", 0.0),
               "load avg": load0}
        rows.append(row)
        print(f"scale: {json.dumps(_finite_json(row))}", flush=True)  # a long run's rows survive an interruption
        (work / "scale-rows.json").write_text(json.dumps(_finite_json(rows), indent=1))
        shutil.rmtree(run_dir / "sites", ignore_errors=True)
    exponents = growth_exponents(rows)
    base_rows = [r for r in rows if r["notes x"] == min(factors)]
    result = {
        "peak_rss_mb": {str(r["sites"]): r["peak RSS MB"] for r in base_rows},
        "peak_pss_mb": {str(r["sites"]): r["peak PSS MB"] for r in base_rows},
        "wall_s": {f"{r['sites']}x{r['notes x']}": r["wall s"] for r in rows},
        "growth_exponents": exponents,
        "seconds_per_round": {str(r["sites"]): r["s per round"] for r in base_rows},
        "rows": rows,
        "settings": {"model": model, "notes_per_site": int(size), "data_factors": list(factors),
                     "num-server-rounds": rounds, "local-steps": local_steps,
                     "personalize-steps": personalize_steps, "regimes": regimes, "subgroups": False,
                     "share-local-adapters": bool(share_local), "bootstrap": bootstrap, "client-threads": threads,
                     "cpus_per_site": cpus_per_site, "sample_interval_s": 0.5},
        "_tables": [("simulated study per number of sites and notes per site (memory of the whole process tree)",
                     rows),
                    ("growth exponents (slope on log-log axes between the smallest and largest setting)",
                     [{"quantity": k, "exponent": v} for k, v in exponents.items()])],
    }
    if figure:
        scale_figure(rows, figure)
        result["figure"] = str(figure)
    return result


def growth_exponents(rows: list[dict]) -> dict[str, float]:
    """Slope on log-log axes of wall time, evaluation time and peak memory against the sites (at
    each notes factor) and against the notes per site (at each number of sites): 1 is linear,
    2 quadratic."""
    out = {}

    def slope(pts, x, y):
        pts = sorted((p for p in pts if p[x] > 0 and p[y] > 0), key=lambda p: p[x])
        if len(pts) < 2 or pts[0][x] == pts[-1][x]:
            return None
        return math.log(pts[-1][y] / pts[0][y]) / math.log(pts[-1][x] / pts[0][x])

    for f in sorted({r["notes x"] for r in rows}):
        for q in ("wall s", "evaluate s", "peak RSS MB"):
            if (v := slope([r for r in rows if r["notes x"] == f], "sites", q)) is not None:
                out[f"{q.split()[0]} ~ sites (notes x{f})"] = v
    for n in sorted({r["sites"] for r in rows}):
        for q in ("wall s", "evaluate s", "peak RSS MB"):
            if (v := slope([r for r in rows if r["sites"] == n], "notes per site", q)) is not None:
                out[f"{q.split()[0]} ~ notes per site ({n} sites)"] = v
    return out


def scale_figure(rows: list[dict], path: str | Path) -> Path:
    """Wall and evaluation time and peak memory against sites, one colour per notes factor, on
    log-log axes with the measured numbers of sites as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    sites = sorted({r["sites"] for r in rows})
    for i, f in enumerate(sorted({r["notes x"] for r in rows})):
        pts = sorted((r for r in rows if r["notes x"] == f), key=lambda r: r["sites"])
        xs, colour = [r["sites"] for r in pts], f"C{i}"
        axes[0].plot(xs, [r["wall s"] for r in pts], "o-", color=colour, label=f"wall, notes x{f}")
        axes[0].plot(xs, [r["evaluate s"] for r in pts], "s--", color=colour, label=f"evaluation, notes x{f}")
        axes[1].plot(xs, [r["peak RSS MB"] for r in pts], "o-", color=colour, label=f"notes x{f}")
    for ax, ylab in zip(axes, ("seconds", "peak RSS of the process tree (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sites))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter() if ax is axes[1] else matplotlib.ticker.NullFormatter())
        ax.set_xlabel("simulated sites")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("time")
    axes[1].set_title("memory")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# 5. generative: SFT and DPO on the default decoder
# --------------------------------------------------------------------------
def generative(decoder="smollm2", sft_steps=0, dpo_steps=0, threads=0, seed=0, compare_bf16=True,
               work: Path | None = None, **_):
    """SFT and DPO step time and trained tokens per second with the study's generative
    settings (gen-*, sft-*, dpo-* defaults), one site, through the same code the site runs."""
    import torch

    from clinfed.client.generative_site import GenSite
    from clinfed.common.model_cache import get_decoder
    from clinfed.common.config import resolve
    from clinfed.common.data import find_table
    from clinfed.common.model_source import ModelError
    from clinfed.common.training import set_threads

    quiet()
    cfg = resolve({"decoder": decoder, "seed": seed, "task": "generative"})
    sft_steps = int(sft_steps or cfg.sft_steps)
    dpo_steps = int(dpo_steps or cfg.dpo_steps)
    n_threads = set_threads(threads or None)
    fed = _federation(work / "federation", [300, 100], seed)
    t = time.perf_counter()
    try:
        dec = get_decoder(cfg)
    except ModelError as err:
        return {"sft_tokens_per_s": None, "unavailable": str(err), "_tables": []}
    load_s = time.perf_counter() - t
    gsite = GenSite("h01", fed / "h01", find_table(fed / "h01"), cfg)
    counter = ForwardCounter(dec.model)
    rows, res = [], {}

    def stage(name, fn, autocast=False):
        counter.reset()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        t = time.perf_counter()
        with ctx:
            state, info = fn()
        total = time.perf_counter() - t
        steps = int(info["steps"])
        row = {"stage": name, "steps": steps, "batch": cfg.gen_batch_size,
               "step s (median)": counter.step_seconds() if steps > 1 else info["seconds"],
               "step s (mean)": info["seconds"] / steps,
               "trained tok/s": counter.real / info["seconds"], "sequences/s": counter.samples / info["seconds"],
               "padding share": 1 - counter.real / max(1, counter.slots),
               "outside trainer s": total - info["seconds"], "loss": info["train_loss"]}
        rows.append(row)
        return state, row

    sft_state, res["sft"] = stage("SFT fp32", lambda: gsite.sft(dec, dec.init_state, sft_steps, 10_000))
    _, res["dpo"] = stage("DPO fp32", lambda: gsite.dpo(dec, sft_state, dpo_steps, 20_000))
    if compare_bf16 and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        _, res["sft_bf16"] = stage("SFT bf16 autocast", lambda: gsite.sft(dec, dec.init_state, sft_steps, 10_000),
                                   autocast=True)
    counter.close()
    n_params = int(sum(v.size for v in dec.init_state.values()))
    return {
        "sft_tokens_per_s": res["sft"]["trained tok/s"], "sft_step_s": res["sft"]["step s (median)"],
        "dpo_tokens_per_s": res["dpo"]["trained tok/s"], "dpo_step_s": res["dpo"]["step s (median)"],
        "sft_bf16_vs_fp32": (res["sft"]["step s (median)"] / res["sft_bf16"]["step s (median)"]
                             if "sft_bf16" in res else None),
        "stages": rows, "model_load_s": load_s, "adapter_parameters": n_params,
        "settings": {"decoder": decoder, "sft-steps": sft_steps, "dpo-steps": dpo_steps,
                     "gen-batch-size": cfg.gen_batch_size, "gen-max-length": cfg.gen_max_length,
                     "gen-max-words": cfg.gen_max_words, "gen-tasks": cfg.gen_tasks,
                     "gen-learning-rate": cfg.gen_learning_rate, "dpo-learning-rate": cfg.dpo_learning_rate,
                     "lora-rank": cfg.lora_rank, "threads": n_threads,
                     "dpo-self-rejected": cfg.dpo_self_rejected},
        "_tables": [("instruction tuning at one site (trained tokens = attention-mask ones of training forwards)",
                     rows)],
    }


# --------------------------------------------------------------------------
# configurations, command line
# --------------------------------------------------------------------------
SMOKE = {
    "throughput": dict(model="tiny-bert", steps=3, repeats=1, size=120, profile_steps=2,
                       levers=("nodrop", "fused")),
    "overhead": dict(model="tiny-bert", sizes=(120, 80), rounds=1, local_steps=2, personalize_steps=1, bootstrap=10,
                     bracket=False, serial=True),
    "comm": dict(model="tiny-bert", ranks=(2, 4), train_steps=3, size=120),
    "scale": dict(model="tiny-bert", sites=(2,), size=60, data_factors=(1, 2), rounds=1, local_steps=2,
                  personalize_steps=1, bootstrap=10),
    "generative": dict(decoder="tiny-llama", sft_steps=2, dpo_steps=1, compare_bf16=False),
    "evaluation": dict(sizes=(60,), repeats=1, bootstrap=20),
    "gpu": dict(shapes=("tiny",), steps=1, batch=2, seq=32, device="cpu"),
}
FUNCS = {"throughput": throughput, "overhead": overhead, "comm": comm, "scale": scale, "generative": generative,
         "evaluation": evaluation, "gpu": gpu_bench.gpu}


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers of at least 1, got {text!r}")
    return vals


def _names(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip() and t.strip() != "none")
    if set(names) - set(LEVERS):
        raise argparse.ArgumentTypeError(f"unknown lever(s) in {text!r}; known: {', '.join(LEVERS)}, or none")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `clinfed bench` options (also `python -m clinfed.simulations.bench`)."""
    p.add_argument("name", choices=BENCHES, help="which benchmark")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration that only checks the benchmark runs")
    p.add_argument("--work", help="keep working files (federations, runs) in this folder (default: a temporary one)")
    p.add_argument("--model", help="classifier base model (default: minilm; smoke: tiny-bert)")
    p.add_argument("--decoder", help="generative: decoder (default: smollm2; smoke: tiny-llama)")
    p.add_argument("--steps", type=int,
                   help="throughput: steps per block; comm: training steps of the fp16 check; generative: SFT steps; "
                        "gpu: timed steps per row")
    p.add_argument("--repeats", type=int, help="throughput: blocks per arm; evaluation: timed repeats per size")
    p.add_argument("--sites", type=_ints, help="scale: numbers of sites, e.g. 5,20,50")
    p.add_argument("--sizes", type=_ints, help="overhead: encounters per hospital, e.g. 600,400,250; "
                                                  "evaluation: test patients per site")
    p.add_argument("--size", type=int, help="throughput, comm: encounters at the measured site; scale: per site")
    p.add_argument("--ranks", type=_ints, help="comm: LoRA ranks besides the default, e.g. 4,16")
    p.add_argument("--rounds", type=int, help="overhead, scale: federated rounds")
    p.add_argument("--local-steps", type=int, help="overhead, scale: steps per site per round")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores; scale: 1 per site)")
    p.add_argument("--no-bf16-compare", action="store_true", help="generative: skip the bf16 autocast SFT block")
    p.add_argument("--data-factors", type=_ints,
                   help="scale: multiples of --size encounters per site, every one with every --sites (default 1,4)")
    p.add_argument("--no-data-row", action="store_true", help="scale: only --size encounters per site (factor 1)")
    p.add_argument("--no-share", action="store_true",
                   help="scale: keep the local adapters at their sites (no cross-site evaluation)")
    p.add_argument("--figure", help="scale: draw the log-log figure of time and memory to this file (PNG)")
    p.add_argument("--regimes", help="scale: the study's regimes (default base,global,local)")
    p.add_argument("--no-bracket", action="store_true",
                   help="overhead: run the in-process work once (before the simulation), not before and after")
    p.add_argument("--cpus-per-site", type=float,
                   help="overhead: each simulated site's CPUs (default 1, as `clinfed simulate`); the in-process "
                        "baseline runs as many sites side by side")
    p.add_argument("--no-serial", action="store_true",
                   help="overhead: skip the in-process run of one site at a time with every core")
    p.add_argument("--bootstrap", type=int, help="overhead, scale, evaluation: bootstrap resamples of the evaluation")
    p.add_argument("--personalize-steps", type=int, help="overhead, scale: personalized steps per site")
    p.add_argument("--no-score", action="store_true", help="throughput: skip the scoring comparison")
    p.add_argument("--levers", type=_names,
                   help="throughput: levers measured as arms of their own against clinfed's loop, of "
                        + ", ".join(LEVERS) + " (default: nodrop; 'none' for none)")
    p.add_argument("--profile-steps", type=int, help="throughput: steps per arm under torch.profiler (0 = none)")
    p.add_argument("--adapter", help="comm: a study's adapter folder for the fp16 check (default: train one)")
    p.add_argument("--site-data", help="comm: the hospital folder the fp16 check scores on (with --adapter)")
    p.add_argument("--seed", type=int, default=0)


def options(args) -> dict:
    opts = dict(SMOKE[args.name]) if args.smoke else {}
    for name in ("model", "decoder", "repeats", "sites", "sizes", "size", "ranks", "rounds", "local_steps",
                 "threads", "seed", "regimes", "adapter", "site_data", "profile_steps", "bootstrap",
                 "personalize_steps", "cpus_per_site", "data_factors", "figure", "levers"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    if getattr(args, "no_bf16_compare", False):
        opts["compare_bf16"] = False
    if getattr(args, "no_bracket", False):
        opts["bracket"] = False
    if getattr(args, "no_serial", False):
        opts["serial"] = False
    if getattr(args, "no_score", False):
        opts["score"] = False
    if getattr(args, "no_data_row", False):
        opts["data_factors"] = (1,)
    if getattr(args, "no_share", False):
        opts["share_local"] = False
    if args.steps is not None:
        opts[{"generative": "sft_steps", "comm": "train_steps"}.get(args.name, "steps")] = args.steps
    return opts


def _finite_json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    if hasattr(obj, "item"):
        return _finite_json(obj.item())
    return obj


def run(name: str, opts: dict, json_path: str | None = None, work: str | None = None, smoke: bool = False,
        out=None) -> dict:
    """Run one benchmark, print its tables, write JSON; returns the JSON's content."""
    out = out or sys.stdout  # looked up per call: pytest swaps sys.stdout per test
    if name not in FUNCS:
        raise ValueError(f"unknown benchmark {name!r}; one of {', '.join(BENCHES)}")
    folder = Path(work).resolve() if work else Path(tempfile.mkdtemp(prefix=f"clinfed-bench-{name}-"))
    folder.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "versions": versions()}
    t = time.perf_counter()
    try:
        res = FUNCS[name](work=folder, **opts)
    finally:
        if not work:
            shutil.rmtree(folder, ignore_errors=True)
    info["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    tables = res.pop("_tables", [])
    head = HEADLINE[name]
    doc = {head: res.pop(head, None), **res, "benchmark": name, "smoke": smoke,
           "seconds": time.perf_counter() - t, **info, "options": {k: v for k, v in opts.items()}}
    print(f"clinfed bench {name}", file=out)
    print_kv("machine", {**info["machine"]}, out)
    print_kv("versions", info["versions"], out)
    print_kv("settings", doc.get("settings", {}), out)
    for title, rows in tables:
        print_table(title, rows, out)
    heads = {k: v for k, v in doc.items() if not isinstance(v, (list, dict)) or k == head}
    heads = {k: v for k, v in heads.items() if k not in ("benchmark", "smoke")}
    print_kv("figures", {k: (json.dumps(_finite_json(v)) if isinstance(v, dict) else v) for k, v in heads.items()}, out)
    doc = _finite_json(doc)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=1, default=str))
        print(f"\nwrote {json_path}", file=out)
    return doc


def run_from_args(args) -> int:
    doc = run(args.name, options(args), args.json, args.work, smoke=bool(args.smoke))
    return 0 if doc.get(HEADLINE[args.name]) is not None else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinfed.simulations.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
