"""Fitting the card: micro-batches planned from a measured peak, and out-of-memory steps retried
with a smaller micro-batch, checked on CPU with a simulated card (a hook that counts memory per
example and raises CUDA's out-of-memory error above a limit)."""

import numpy as np
import pytest
import torch

from clinfed.common.adapters import adapter_state
from clinfed.common.memory import divisor_at_most, micro_batches, plan_micro_batch, retry_on_oom
from clinfed.common.models import LoraSettings, make_lora_model
from clinfed.common.training import TrainSettings, encode_texts, train_classifier

NOTES = ["patient admitted with chf", "stable discharged home", "copd shortness breath readmitted",
         "lives alone follow-up scheduled"] * 8
LABELS = np.array([1, 0, 1, 0] * 8)
OOM = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


class SimulatedCard:
    """A card of `budget` bytes: weights take `base`, each example of a forward `per_example`.
    A forward over more examples than fit raises CUDA's out-of-memory error."""

    def __init__(self, model, budget=1000, base=200, per_example=100):
        self.budget, self.base, self.per_example = budget, base, per_example
        self.limit = budget  # what the card holds; `budget` is what the plan may use
        self.largest = 0
        self.forwards = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        n = int(kwargs["input_ids"].shape[0])
        self.forwards.append(n)
        if self.base + n * self.per_example > self.limit:
            raise OOM("CUDA out of memory (simulated)")
        self.largest = max(self.largest, n)

    def reset_peak(self):
        self.largest = 0

    def current(self):
        return self.base

    def peak(self):
        return self.base + self.largest * self.per_example


def _setup():
    model, tok = make_lora_model("tiny-bert", 0, LoraSettings(rank=4))
    for m in model.modules():  # no dropout: micro-batches would draw other masks than the whole batch
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, tok, encode_texts(tok, NOTES, 32)


def test_micro_batches_give_the_same_update_as_the_whole_batch():
    model, tok, enc = _setup()
    start = adapter_state(model)
    whole = train_classifier(model, enc, LABELS, TrainSettings(steps=3, batch_size=16, lr=1e-2, precision="fp32"), tok.pad_token_id)
    a = adapter_state(model)
    from clinfed.common.adapters import load_adapter_state

    load_adapter_state(model, start)
    split = train_classifier(model, enc, LABELS, TrainSettings(steps=3, batch_size=16, lr=1e-2, micro_batch=5, precision="fp32"),
                             tok.pad_token_id)
    b = adapter_state(model)
    assert split["micro_batch"] == 5 and split["accumulation"] == 4 and whole["accumulation"] == 1
    assert any(not np.allclose(a[k], start[k]) for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)


def test_an_out_of_memory_step_is_retried_and_the_plan_fits_the_card():
    model, tok, enc = _setup()
    card = SimulatedCard(model, budget=1000, base=200, per_example=100)  # 8 examples fit, 16 do not
    info = train_classifier(model, enc, LABELS, TrainSettings(steps=4, batch_size=16, lr=1e-2, memory=card),
                            tok.pad_token_id)
    assert info["oom_retries"] == 1, info  # 16 failed once, 8 fit
    # planned from the measured peak of the first step: within 85% of 1000 bytes, 6 examples
    assert info["micro_batch"] == plan_micro_batch(16, 8, 200, 1000, 1000) == 6
    assert info["accumulation"] == 3
    assert card.forwards[:3] == [16, 8, 8]  # the whole batch failed; the first step ran in two halves
    assert max(card.forwards[3:]) <= 6  # after the first step every forward fits the plan
    assert np.isfinite(info["train_loss"]) and info["steps"] == 4


def test_a_stated_budget_shrinks_the_micro_batch_without_any_failure():
    model, tok, enc = _setup()
    card = SimulatedCard(model, budget=10_000, base=200, per_example=100)  # the card itself fits everything
    card.budget = 700  # but the site states that its training may use only this much
    info = train_classifier(model, enc, LABELS, TrainSettings(steps=2, batch_size=16, lr=1e-2, memory=card),
                            tok.pad_token_id)
    assert info["oom_retries"] == 0 and card.forwards[0] == 16
    assert info["micro_batch"] == plan_micro_batch(16, 16, 200, 1800, 700) == 3
    assert max(card.forwards[1:]) <= 3


def test_the_choice_may_leave_the_site_and_nothing_else_new():
    from clinfed.client.classifier_handlers import fit_metrics
    from clinfed.common.privacy import ALLOWED_METRIC_KEYS

    got = fit_metrics({"micro_batch": 6, "accumulation": 3, "oom_retries": 1, "planned_peak_bytes": 10**9})
    assert got == {"train-micro-batch": 6, "train-accumulation": 3, "train-oom-retries": 1}
    assert all(any(p.fullmatch(k) for p in ALLOWED_METRIC_KEYS) for k in got)
    assert not any(p.fullmatch("train-planned-peak-bytes") for p in ALLOWED_METRIC_KEYS)


def test_out_of_memory_at_micro_batch_one_and_other_errors_are_not_swallowed():
    model, tok, enc = _setup()
    card = SimulatedCard(model, budget=100, base=200, per_example=100)  # nothing fits
    with pytest.raises(OOM):
        train_classifier(model, enc, LABELS, TrainSettings(steps=1, batch_size=4, memory=card), tok.pad_token_id)

    def broken(micro, accumulation):
        raise ValueError("not a memory problem")
    with pytest.raises(ValueError):
        retry_on_oom(broken, 8)


def test_retry_keeps_equal_micro_batches_and_restores_the_start():
    calls, restored = [], []

    def run(micro, accumulation):
        calls.append((micro, accumulation))
        if micro > 3:
            raise OOM("CUDA out of memory (simulated)")
        return "done"

    result, fit = retry_on_oom(run, 12, restore=lambda: restored.append(1))
    assert result == "done" and calls == [(12, 1), (6, 2), (3, 4)] and len(restored) == 2
    assert fit.micro_batch * fit.accumulation == 12 and fit.oom_retries == 2
    assert divisor_at_most(12, 5) == 4 and divisor_at_most(7, 6) == 1
    assert [len(c) for c in micro_batches(np.arange(16), 6)] == [6, 5, 5]


def test_sft_out_of_memory_is_retried_with_accumulation():
    from clinfed.common.instruct import InstructSettings, make_lora_causal_lm, sft_train

    model, tok = make_lora_causal_lm("tiny-llama", 0, LoraSettings(rank=4))
    card = SimulatedCard(model.get_base_model(), budget=400, base=200, per_example=100)  # 2 fit, 4 do not
    exs = [{"prompt": [{"role": "user", "content": f"patient {w} readmitted ?"}],
            "completion": [{"role": "assistant", "content": a}]} for w, a in [("chf", "yes"), ("stable", "no")] * 4]
    info = sft_train(model, tok, exs, InstructSettings(steps=2, batch_size=4, lr=1e-2))
    assert info["micro_batch"] == 2 and info["accumulation"] == 2 and info["oom_retries"] == 1
    assert max(card.forwards[1:]) <= 2
