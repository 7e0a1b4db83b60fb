"""Local training and scoring of a LoRA classifier at one site.

A plain PyTorch loop rather than HF `Trainer`: notes vary several-fold in
length, so batches are grouped by length and padded only to their own longest
note, tokenization is done once per site, and evaluation runs without
gradients in larger batches. One place picks device, dtype and threads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from clinfed.common.hardware import pick_device, place
from clinfed.common.memory import (FitReport, checkpointing_on, free_cached, is_out_of_memory, meter_for, micro_batches,
                                   plan_micro_batch, quantization_bits)

__all__ = ["pick_device"]  # re-exported: callers pick the device here, with dtype and threads


# --------------------------------------------------------------------------
# device, dtype, threads
# --------------------------------------------------------------------------

def autocast_dtype(device: str, mode: str = "auto"):
    """bf16 autocast where the hardware does it natively, else None (fp32).

    On CPU bf16 only pays with AVX512-BF16/AMX; elsewhere it is slower than fp32. On a
    GPU without bf16 (before Ampere) fp16, whose gradients the training loop scales
    (GradScaler); that branch has not run yet (no GPU was available).
    """
    import torch

    if mode in ("no", "fp32", "false", False):
        return None
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if mode in ("bf16", "yes", True) or (fn is not None and fn()):
        return torch.bfloat16
    return None


def set_threads(n: int | None) -> int:
    """Cap intra-op threads: several simulated sites with 2 threads each collapse."""
    import torch

    n = int(n) if n else (os.cpu_count() or 1)
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextmanager
def frozen_linears_in(model, dtype):
    """Hold the frozen base's Linear weights in `dtype` (e.g. bf16) for the duration.

    Autocast re-casts a frozen fp32 weight on every call (its cast cache keeps
    only weights that require grad): on CPU that copying was a third of a bf16
    training step (`clinfed bench throughput`'s profile). The values autocast
    would have used are the same, so results do not change; the fp32 originals
    are put back afterwards, so nothing is lost for later fp32 use. Trainable
    weights (LoRA, head) and non-Linear layers are untouched.
    """
    import torch

    saved = []
    try:
        if dtype is not None:
            # a weight tied to a non-Linear module (a decoder's lm_head shares the token
            # embedding) stays: casting it would put the embeddings, and so the residual
            # stream, in bf16, which autocast never does
            tied = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear
                    for p in m.parameters(recurse=False)}
            with torch.no_grad():
                for module in model.modules():
                    if type(module) is not torch.nn.Linear:
                        continue
                    for param in module.parameters(recurse=False):
                        if (not param.requires_grad and param.is_floating_point() and param.dtype != dtype
                                and id(param) not in tied):
                            saved.append((param, param.data))
                            param.data = param.data.to(dtype)
        yield
    finally:
        for param, original in saved:
            param.data = original


# --------------------------------------------------------------------------
# tokenization and batching
# --------------------------------------------------------------------------
def encode_texts(tokenizer, texts, max_length: int) -> list[np.ndarray]:
    """Token ids per note, truncated, unpadded (padding happens per batch). An empty split (a
    study with `temporal-frac = 0` has no temporal test) encodes to nothing: fast tokenizers fail on []."""
    texts = list(texts)
    if not texts:
        return []
    out = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    return [np.asarray(ids, dtype=np.int64) for ids in out["input_ids"]]


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                           group: int = 50) -> list[np.ndarray]:
    """Shuffle, sort within mega-batches of `group` batches by length, shuffle batches.

    Keeps randomness of SGD while padding each batch only to similar lengths.
    """
    idx = rng.permutation(len(lengths))
    mega = batch_size * group
    batches = []
    for start in range(0, len(idx), mega):
        chunk = idx[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def collate(encoded: list[np.ndarray], idx: np.ndarray, pad_id: int, device: str):
    import torch

    seqs = [encoded[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
@dataclass
class TrainSettings:
    steps: int = 30
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    micro_batch: int = 0  # 0 = the whole batch at once (until a memory plan or an out-of-memory retry says less)
    gpu_memory_gb: float = 0.0  # the site's stated card memory; 0 = the card's total
    memory: object = None  # a meter (reset_peak/current/peak/budget) to plan with; None = the CUDA device's
    # proximal pull (FedProx's mu, Ditto's lambda): the loss gains mu/2 * ||w - anchor||^2 over the
    # trainable weights; anchor = {parameter name: tensor}, None = the weights the training starts from
    proximal_mu: float = 0.0
    anchor: dict | None = None
    # the pretrained model's own dropout during LoRA training (False: off, a speed lever of issue 22:
    # the frozen base's masks were a large share of a CPU step; LoRA's own dropout is unaffected)
    base_dropout: bool = True
    # AdamW's fused kernel: None = on CUDA only. On CPU it bought nothing measurable on a MiniLM
    # LoRA step (`clinfed bench throughput --levers fused`) and changes the last bits of the
    # weights, so it stays off there
    fused_optimizer: bool | None = None


@contextmanager
def base_dropout_off(model, off: bool = True):
    """Dropout off in the pretrained model (every torch Dropout but LoRA's own, `lora_dropout`) for
    the duration, restored after. The base is frozen: its dropout only perturbs the activations the
    adapter learns from, and drawing its masks is a large share of a CPU step."""
    import torch

    saved = []
    try:
        if off:
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name and module.p > 0:
                    saved.append((module, module.p))
                    module.p = 0.0
        yield
    finally:
        for module, p in saved:
            module.p = p


def trainable_snapshot(model) -> dict:
    """The trainable weights as they are now, by parameter name: the anchor of a proximal pull."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def add_proximal_grad(model, anchor: dict, mu: float) -> None:
    """Add the gradient of mu/2 * ||w - anchor||^2, mu * (w - anchor), to each anchored weight's
    gradient: the same update as the term in the loss, without a second graph through the weights."""
    import torch

    if mu <= 0:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name in anchor:
                pull = mu * (p.detach().float() - anchor[name].to(p.device).float())
                if p.grad is None:
                    p.grad = pull.to(p.dtype)
                else:
                    p.grad.add_(pull.to(p.grad.dtype))


def train_classifier(model, encoded: list[np.ndarray], labels: np.ndarray, settings: TrainSettings,
                     pad_id: int, progress=None) -> dict:
    """Run `settings.steps` optimizer steps of cross-entropy on the trainable weights.

    Steps, not epochs: a site's compute is bounded whatever its size, and
    sites of different sizes contribute the same number of updates per round.
    DP-SGD steps of the same classifier are `common.dp.train_classifier_dp` (Poisson
    batches, per-example clipping, noise).
    """
    import torch

    y_all = torch.as_tensor(np.array(labels, dtype=np.int64))

    def batch_loss(idx, device, amp):
        ids, mask = collate(encoded, idx, pad_id, device)
        with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits.float(), y_all[idx].to(device)), mask

    return _train_steps(model, encoded, settings, batch_loss, progress)


def _train_steps(model, encoded: list[np.ndarray], settings: TrainSettings, batch_loss, progress=None) -> dict:
    """The optimizer loop every non-DP training form shares: AdamW with warm-up and cosine
    decay, length-grouped batches, seeded batches and dropout, gradient clipping, the bf16
    frozen-base fast path. `batch_loss(idx, device, amp)` returns (mean loss, attention mask)."""
    import torch

    if len(encoded) == 0:
        raise ValueError("no training examples")
    device = pick_device(settings.device)
    place(model, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = settings.fused_optimizer if settings.fused_optimizer is not None else device == "cuda"
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                            **({"fused": True} if fused else {}))
    warm = max(1, int(settings.steps * settings.warmup_frac))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, settings.steps)))) * 0.9 + 0.1)
    )
    amp = autocast_dtype(device, settings.precision)
    # fp16 (a GPU without bf16) needs its gradients scaled; bf16 and fp32 do not
    scaler = torch.amp.GradScaler("cuda", enabled=device == "cuda" and amp is torch.float16)
    rng = np.random.default_rng(settings.seed)
    # dropout draws from torch's global generator: seed it too, or a result depends on
    # what the process trained before (a resumed study would not match an uninterrupted one)
    torch.manual_seed(settings.seed)
    lengths = np.array([len(e) for e in encoded])
    batches: list[np.ndarray] = []
    losses, tokens, padded = [], 0, 0
    meter = meter_for(device, settings.gpu_memory_gb, settings.memory)
    anchor = None
    if settings.proximal_mu > 0:
        anchor = settings.anchor if settings.anchor is not None else trainable_snapshot(model)
    fit = FitReport(micro_batch=min(settings.micro_batch or settings.batch_size, settings.batch_size), accumulation=1,
                    gradient_checkpointing=checkpointing_on(model), quantization_bits=quantization_bits(model))

    def step_on(idx):
        """One batch's gradients, micro-batch by micro-batch: each micro-batch's mean loss weighted
        by its share of the batch, so the accumulated gradient is the whole batch's mean."""
        opt.zero_grad(set_to_none=True)
        total, ntok, npad = 0.0, 0, 0
        for chunk in micro_batches(idx, fit.micro_batch):
            loss, mask = batch_loss(chunk, device, amp)
            scaler.scale(loss * (len(chunk) / len(idx))).backward()
            total += float(loss.detach()) * len(chunk) / len(idx)
            ntok, npad = ntok + int(mask.sum()), npad + int(mask.numel())
        return total, ntok, npad

    cuda_peak = 0  # the call's peak GPU memory (the planner's meter resets the counter every step)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with frozen_linears_in(model, amp), base_dropout_off(model, not settings.base_dropout):
        for step in range(settings.steps):
            if not batches:
                batches = length_grouped_batches(lengths, settings.batch_size, rng)
            idx = batches.pop()
            while True:
                try:
                    if meter is not None:
                        meter.reset_peak()
                        base = meter.current()
                    loss, ntok, npad = step_on(idx)
                    break
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                    if not is_out_of_memory(exc) or (fit.micro_batch == 1 and fit.gradient_checkpointing):
                        raise
                    opt.zero_grad(set_to_none=True)
                    free_cached()
                    try:
                        fit.shrink(model)  # half the micro-batch; at 1, gradient checkpointing once
                    except MemoryError:
                        raise exc from None
            if anchor is not None:
                # gradients are scaled (fp16 loss scaling): scale the pull by the same factor
                add_proximal_grad(model, anchor, settings.proximal_mu * float(scaler.get_scale() if scaler.is_enabled() else 1.0))
            if meter is not None and step == 0 and getattr(meter, "budget", None):
                peak = meter.peak()
                used = max(len(c) for c in micro_batches(idx, fit.micro_batch))
                fit.micro_batch = min(plan_micro_batch(settings.batch_size, used, base, peak, meter.budget),
                                      fit.micro_batch if fit.oom_retries else settings.batch_size)
                fit.planned_from_peak = int(peak)
            if settings.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if device == "cuda":
                cuda_peak = max(cuda_peak, int(torch.cuda.max_memory_allocated()))
            losses.append(loss)
            tokens += ntok
            padded += npad
            if progress is not None:
                progress(step + 1, settings.steps, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 4):]
    fit.accumulation = math.ceil(settings.batch_size / fit.micro_batch)
    return {"train_loss": float(np.mean(tail)), "steps": settings.steps, "seconds": seconds,
            "tokens": tokens, "padded_tokens": padded, **fit.as_info(),
            # throughput of the card: real (unpadded) tokens per second of the call, peak GPU memory
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            **({"peak_gpu_mb": cuda_peak / 2**20} if device == "cuda" else {})}


def predict_proba(model, encoded: list[np.ndarray], pad_id: int, batch_size: int = 64,
                  device: str = "auto", precision: str = "auto") -> np.ndarray:
    """P(readmitted) per item, in input order; no gradients, length-sorted batches."""
    import torch

    def score(idx, device, amp):
        ids, mask = collate(encoded, idx, pad_id, device)
        with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return torch.softmax(logits.float(), dim=-1)[:, 1]

    return _score_batches(model, encoded, score, batch_size, device, precision)


def _score_batches(model, encoded: list[np.ndarray], score, batch_size: int, device: str,
                   precision: str) -> np.ndarray:
    """Scoring every form shares: no gradients, length-sorted batches (little padding), the
    bf16 frozen-base fast path; `score(idx, device, amp)` gives the batch's scores."""
    import torch

    if len(encoded) == 0:
        return np.zeros(0)
    device = pick_device(device)
    place(model, device)
    model.eval()
    amp = autocast_dtype(device, precision)
    lengths = np.array([len(e) for e in encoded])
    order = np.argsort(-lengths, kind="stable")
    out = np.empty(len(encoded), dtype=np.float64)
    with frozen_linears_in(model, amp), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = score(idx, device, amp).cpu().numpy()
    return out


# --------------------------------------------------------------------------
# the readmission question as a prompt to a decoder (arm form `prompt`)
# --------------------------------------------------------------------------
def collate_left(encoded: list[np.ndarray], idx: np.ndarray, pad_id: int, device: str):
    """Left-padded batch with position ids that skip the padding, so the last position of
    every row is its prompt's last token (where the answer's first token is predicted)."""
    import torch

    seqs = [encoded[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return (torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
            torch.from_numpy(pos).to(device))


def _answer_logits(model, ids, mask, pos):
    """Next-token logits at each row's last prompt position only (not the whole sequence's
    vocabulary-sized logits, which would dominate memory and time)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1, :]


def train_prompt_classifier(model, encoded: list[np.ndarray], labels: np.ndarray, settings: TrainSettings,
                            pad_id: int, answer_ids: tuple[int, int], progress=None) -> dict:
    """`settings.steps` steps of the causal-LM loss on the answer: cross-entropy of the first
    answer token ("yes" for readmitted, "no" otherwise) over the whole vocabulary, given the
    prompt. The same batching, schedule and seeding as `train_classifier`."""
    import torch

    yes_id, no_id = answer_ids
    target_all = torch.as_tensor(np.where(np.asarray(labels, dtype=np.int64) == 1, yes_id, no_id))

    def batch_loss(idx, device, amp):
        ids, mask, pos = collate_left(encoded, idx, pad_id, device)
        with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
            logits = _answer_logits(model, ids, mask, pos)
        return torch.nn.functional.cross_entropy(logits.float(), target_all[idx].to(device)), mask

    return _train_steps(model, encoded, settings, batch_loss, progress)


def predict_yes_proba(model, encoded: list[np.ndarray], pad_id: int, answer_ids: tuple[int, int],
                      batch_size: int = 64, device: str = "auto", precision: str = "auto") -> np.ndarray:
    """P(yes) / (P(yes) + P(no)) of the first answer token per prompt, in input order (the
    score `common.instruct.answer_probability` computes one prompt at a time)."""
    import torch

    pair = list(answer_ids)

    def score(idx, device, amp):
        ids, mask, pos = collate_left(encoded, idx, pad_id, device)
        with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
            logits = _answer_logits(model, ids, mask, pos)
        return torch.softmax(logits.float()[:, pair], dim=-1)[:, 0]

    return _score_batches(model, encoded, score, batch_size, device, precision)


# --------------------------------------------------------------------------
# cost: peak memory of a training call
# --------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory (MB) of this process while the block runs, sampled every
    `interval` seconds by a background thread (the peak inside a backward pass included).
    In a simulation one worker process serves several sites and arms, so the figure is the
    process's, which may still hold memory from work done before the block."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        proc = psutil.Process()
        while True:
            self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
            if self._stop.wait(self.interval):
                break

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        import psutil

        self.peak_mb = max(self.peak_mb, psutil.Process().memory_info().rss / 2**20)
        return False
