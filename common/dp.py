"""DP-SGD for a site's LoRA classifier training, and the site's privacy ledger.

Why a plain loop around Opacus pieces rather than `PrivacyEngine.make_private`:
the study trains a fixed number of *steps* from length-grouped token lists,
not epochs over a DataLoader, so the loop draws its own Poisson batches
(each training example joins a step with probability q = batch-size / n_train,
which is what the RDP accountant's subsampled-Gaussian analysis assumes),
wraps the PEFT model in Opacus' `GradSampleModule` for per-example gradients
of the trainable LoRA + head weights, and lets Opacus' `DPOptimizer` clip each
example's gradient to `max_grad_norm`, add Gaussian noise and divide by the
expected batch size. The model is moved to its device *before* it is wrapped
(a PEFT model wrapped first and moved later trains the wrong tensors), and the
hooks are removed after every training call because one base model serves
many simulated sites in turn.

The noise and the batch sampling draw from the operating system's entropy,
never from the study's public seed: noise anyone can regenerate protects
nothing. DP runs are therefore not bit-reproducible, by design.

The ledger keeps every DP training call the site ever ran on its table (all
regimes, all studies: every adapter trained on the data shapes what the site
releases). It is keyed by what the site controls, its own name and its table,
never by anything the server sends (a run folder, an arm, a seed), and lives
with the site's own files (`for_site`): a server cannot reset it by starting
a new study, and the reported epsilon is the site's lifetime total. Epsilon is
counted at the smallest delta any call used (the server may make it stricter,
never looser). A hospital resets its budget deliberately by moving or deleting
its ledger file (`<site output>/dp/ledger-*.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from clinfed.common.errors import ClinfedError


class DPBudgetExhausted(ClinfedError, RuntimeError):
    """The next training call would take the site past its epsilon budget."""


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    budget: float = 0.0  # epsilon; 0 = none
    optimizer: str = "sgd"  # sgd | adam (AdamW)
    lr: float = 0.0  # peak learning rate of DP steps; 0 = the training settings' one
    secret_seed: int | None = None  # tests only; None = the OS's entropy (never the study's public seed)


def settings_for(cfg: dict, policy, n_train: int) -> "DPSettings | None":
    """A site's DP-SGD settings: noise, clipping and optimizer from the run config, delta and
    budget from the site's effective policy; None when the study runs without `dp`."""
    if not cfg.dp:
        return None
    return DPSettings(noise_multiplier=cfg.dp_noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
                      optimizer=cfg.dp_optimizer, lr=cfg.dp_learning_rate,
                      delta=policy.delta_for(n_train), budget=float(policy.dp_epsilon))


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of a sequence of subsampled-Gaussian steps (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=float(delta)))


LEDGER_FOLDER = "dp"


@dataclass
class DPLedger:
    """The site's cumulative DP accounting, kept in its own folder."""

    path: Path
    study: str = ""
    history: list[tuple[float, float, int]] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    @classmethod
    def for_site(cls, folder: Path, site: str, table: Path) -> "DPLedger":
        """The site's one ledger for its table (in deployment its output folder, in simulation
        beside the hospital's data): keyed by the site's name and its table's path only."""
        key = hashlib.sha256(f"{site}\0{Path(table).resolve()}".encode()).hexdigest()[:16]
        return cls._load(Path(folder) / LEDGER_FOLDER / f"ledger-{key}.json", f"{site}: {Path(table).name}")

    @classmethod
    def open(cls, out_dir: Path, study: str) -> "DPLedger":
        """A ledger of one experiment in `out_dir` (simulation harnesses that model a site's
        accounting themselves, e.g. `simulations.dp_rounds`)."""
        key = hashlib.sha256(study.encode()).hexdigest()[:16]
        return cls._load(Path(out_dir) / LEDGER_FOLDER / f"study-{key}.json", study)

    @classmethod
    def _load(cls, path: Path, study: str) -> "DPLedger":
        ledger = cls(path, study)
        ledger.reload()
        return ledger

    def reload(self):
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.study = data.get("study", self.study)
            self.history = [tuple(h) for h in data.get("history", [])]
            self.events = list(data.get("events", []))

    @contextlib.contextmanager
    def locked(self):
        """Exclusive use of the ledger file across processes (simulation workers, arms)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as fh:
            try:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            self.reload()
            yield self

    def delta(self, delta: float) -> float:
        """The delta epsilon is counted at: the smallest any call used, or `delta` if smaller."""
        return min([float(delta)] + [float(e["delta"]) for e in self.events if "delta" in e])

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] | None = None) -> float:
        return rdp_epsilon(self.history + list(extra or []), self.delta(delta))

    def spend(self, label: str, sigma: float, q: float, steps: int, delta: float) -> dict:
        """Record a training call before it runs (a crash mid-training still counts)."""
        step = (float(sigma), float(q), int(steps))
        d = self.delta(delta)
        event = {"label": label, "noise_multiplier": step[0], "sample_rate": step[1], "steps": step[2],
                 "delta": d, "epsilon": rdp_epsilon([step], d),
                 "epsilon_total": self.epsilon(d, [step]), "time": round(time.time(), 1)}
        self.history.append(step)
        self.events.append(event)
        self.save()
        return event

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"study": self.study, "history": self.history, "events": self.events}, indent=1))
        tmp.replace(self.path)


def plan(ledger: DPLedger, dp: DPSettings, n_train: int, batch_size: int, steps: int, label: str) -> dict:
    """Charge a training call to the ledger, or raise DPBudgetExhausted if it would
    take the site past its budget (nothing is charged then)."""
    q = min(1.0, batch_size / max(1, n_train))
    step = (dp.noise_multiplier, q, int(steps))
    with ledger.locked():
        total = ledger.epsilon(dp.delta, [step])
        if dp.budget > 0 and total > dp.budget:
            raise DPBudgetExhausted(
                f"DP budget: {label} ({steps} steps) would bring the site's epsilon to {total:.3g}, past its "
                f"budget {dp.budget:g} (spent so far {ledger.epsilon(dp.delta):.3g} at delta "
                f"{ledger.delta(dp.delta):.3g})")
        return ledger.spend(label, dp.noise_multiplier, q, steps, dp.delta)


def _secret_seed(dp: DPSettings) -> int:
    return dp.secret_seed if dp.secret_seed is not None else int.from_bytes(os.urandom(8), "little")


def train_dp(model, n: int, batch_loss, settings, dp: DPSettings, progress=None) -> dict:
    """`settings.steps` DP-SGD steps over `n` examples with Poisson batches of expected
    size `settings.batch_size`.

    `batch_loss(gsm, idx, device)` returns (loss averaged over the batch's examples,
    real tokens, padded tokens): each example's loss must be its own mean, so that
    per-example gradients are what gets clipped (the classifier's cross-entropy is;
    for a language model see `common.instruct.sft_train_dp`).
    """
    import torch
    from clinfed.common.training import pick_device
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if n == 0:
        raise ValueError("no training examples")
    device = pick_device(getattr(settings, "device", "auto"))
    model.to(device)  # before wrapping: Opacus' hooks must see the tensors that train
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    q = min(1.0, settings.batch_size / n)
    expected = q * n
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    noise_gen = torch.Generator(device=device)
    seed = _secret_seed(dp)
    noise_gen.manual_seed(seed & ((1 << 63) - 1))
    # Plain SGD by default: under DP noise AdamW's second moment is the noise's, and on the
    # default study AdamW drifted *below* the untrained model's AUC at every site while SGD
    # did not (docs/results/dp.md)
    lr = float(dp.lr or settings.lr)
    if dp.optimizer == "adam":
        inner = torch.optim.AdamW(params, lr=lr, weight_decay=getattr(settings, "weight_decay", 0.0))
    elif dp.optimizer == "sgd":
        inner = torch.optim.SGD(params, lr=lr)
    else:
        raise ValueError(f"DP optimizer {dp.optimizer!r}: expected 'sgd' or 'adam'")
    opt = DPOptimizer(inner, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=expected, loss_reduction="mean", generator=noise_gen)
    warm = max(1, int(settings.steps * getattr(settings, "warmup_frac", 0.1)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        inner, lambda s: min(1.0, (s + 1) / warm)
        * (0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, settings.steps)))) * 0.9 + 0.1))
    rng = np.random.default_rng([seed, 1])
    losses, tokens, padded, sizes = [], 0, 0, []
    t0 = time.perf_counter()
    try:
        for step in range(settings.steps):
            opt.zero_grad(set_to_none=True)
            idx = np.flatnonzero(rng.random(n) < q)
            sizes.append(len(idx))
            if len(idx) == 0:  # an empty Poisson batch still takes a (noise-only) step
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=device, dtype=p.dtype)
                opt.step()
                sched.step()
                continue
            # fp32: per-example gradients and their clipping are not trusted to bf16
            loss, real, pad = batch_loss(gsm, idx, device)
            with warnings.catch_warnings():  # Opacus' hooks on modules whose inputs need no grad: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            tokens += int(real)
            padded += int(pad)
            if progress is not None:
                progress(step + 1, settings.steps, losses[-1])
    finally:
        gsm._close()  # remove hooks and per-example buffers: the model is shared between sites
        for p in params:
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    seconds = time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 4):] if losses else [float("nan")]
    return {"train_loss": float(np.mean(tail)), "steps": settings.steps, "seconds": seconds,
            "tokens": tokens, "padded_tokens": padded, "mean_batch": float(np.mean(sizes)) if sizes else 0.0}


def train_classifier_dp(model, encoded: list[np.ndarray], labels: np.ndarray, settings, pad_id: int,
                        dp: DPSettings, progress=None) -> dict:
    """DP-SGD steps of the sequence classifier (cross-entropy is a mean over examples)."""
    import torch
    from clinfed.common.training import collate

    y_all = torch.as_tensor(np.array(labels, dtype=np.int64))

    def batch_loss(gsm, idx, device):
        ids, mask = collate(encoded, idx, pad_id, device)
        logits = gsm(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y_all[idx].to(device))
        return loss, mask.sum(), mask.numel()

    return train_dp(model, len(encoded), batch_loss, settings, dp, progress)
