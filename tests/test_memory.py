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


# --------------------------------------------------------------------------
# gradient checkpointing when micro-batch 1 still runs out of memory
# --------------------------------------------------------------------------
class CheckpointingCard(SimulatedCard):
    """A card where gradient checkpointing (activations recomputed, not kept) cuts the memory per
    example by `saving`: one example fits only with it."""

    def __init__(self, model, saving=4, **kw):
        super().__init__(model, **kw)
        self.model, self.saving = model, saving

    def _hook(self, module, args, kwargs):
        n = int(kwargs["input_ids"].shape[0])
        per = self.per_example / (self.saving if self.model.is_gradient_checkpointing else 1)
        self.forwards.append((n, bool(self.model.is_gradient_checkpointing)))
        if self.base + n * per > self.limit:
            raise OOM("CUDA out of memory (simulated)")


def test_out_of_memory_at_micro_batch_one_turns_gradient_checkpointing_on():
    model, tok, enc = _setup()
    assert not model.is_gradient_checkpointing
    card = CheckpointingCard(model, saving=4, budget=260, base=200, per_example=100)  # 1 example fits only checkpointed
    info = train_classifier(model, enc, LABELS, TrainSettings(steps=2, batch_size=4, lr=1e-2, memory=card),
                            tok.pad_token_id)
    assert info["gradient_checkpointing"] == 1 and model.is_gradient_checkpointing
    assert info["micro_batch"] == 1 and info["accumulation"] == 4
    assert info["oom_retries"] == 3  # 4 -> 2 -> 1 -> checkpointing
    assert card.forwards[:4] == [(4, False), (2, False), (1, False), (1, True)]
    assert np.isfinite(info["train_loss"]) and info["steps"] == 2


def test_checkpointing_is_tried_once_then_the_site_fails():
    model, tok, enc = _setup()
    card = CheckpointingCard(model, saving=2, budget=230, base=200, per_example=100)  # never fits
    with pytest.raises(OOM):
        train_classifier(model, enc, LABELS, TrainSettings(steps=1, batch_size=2, memory=card), tok.pad_token_id)
    assert [f for f in card.forwards] == [(2, False), (1, False), (1, True)]


# --------------------------------------------------------------------------
# before loading: quantization from the model's size and the site's budget
# --------------------------------------------------------------------------
GIB = 2**30


def test_quantization_is_the_least_lossy_mode_that_fits_with_fabricated_sizes():
    from clinfed.common.memory import WEIGHT_SHARE, MemoryPlanError, ModelSize, plan_quantization

    # an 8B-parameter Llama's counts: 7.0 B in quantizable Linears, 1.05 B in embeddings and LM head
    size = ModelSize(params=8_030_000_000, quantizable=6_980_000_000)
    none, q8, q4 = (size.weight_bytes(q) for q in ("none", "8bit", "4bit"))
    assert q4 < q8 < none
    at = lambda need: int(need / WEIGHT_SHARE)  # noqa: E731 - the smallest budget a base of `need` bytes fits
    assert plan_quantization(size, at(none)).quantization == "none"
    assert plan_quantization(size, at(none) - 1).quantization == "8bit"
    assert plan_quantization(size, at(q8)).quantization == "8bit"
    assert plan_quantization(size, at(q8) - 1).quantization == "4bit"
    assert plan_quantization(size, at(q4)).quantization == "4bit"
    with pytest.raises(MemoryPlanError, match=r"8\.03 B parameters.*budget of 4\.0 GiB"):
        plan_quantization(size, at(q4) - 1 if at(q4) - 1 < 4 * GIB else 4 * GIB, name="llama-8b")
    with pytest.raises(MemoryPlanError, match="not available with dp"):  # dp: only `none` may be used
        plan_quantization(size, at(q8), allowed=("none",))
    # a 24 GiB card: the 8B model's base fits in 8 bits, not unquantized
    assert plan_quantization(size, 24 * GIB).quantization == "8bit"


def test_model_size_is_read_without_loading_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from clinfed.common.memory import count_from_config, count_from_safetensors, model_size
    from clinfed.common.tiny_models import family_config

    cfg = family_config("llama", 100)
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    counted = count_from_config(cfg, causal=True)
    assert (counted.params, counted.quantizable) == (real, linears)
    model.save_pretrained(tmp_path)
    headers = count_from_safetensors(tmp_path)
    assert not cfg.tie_word_embeddings and headers.params == real
    assert headers.quantizable == linears
    tiny = model_size("tiny-bert")
    assert 0 < tiny.quantizable < tiny.params


def test_auto_is_none_on_cpu_and_planned_against_the_stated_budget_on_a_gpu(monkeypatch):
    import clinfed.common.hardware as hardware
    import clinfed.common.memory as memory
    from clinfed.common.config import resolve
    from clinfed.common.memory import MemoryPlanError, model_size, resolve_quantization

    cfg = resolve({"model": "tiny-bert", "quantization": "auto"})
    assert resolve_quantization(cfg) == "none"  # this machine: no GPU, nothing to fit
    assert resolve_quantization(resolve({"model": "tiny-bert", "quantization": "8bit"})) == "8bit"
    # a fake GPU of 80 GiB (no CUDA call is made): the tiny model fits unquantized
    monkeypatch.setattr(hardware, "pick_device", lambda prefer="auto": "cuda")
    monkeypatch.setattr(memory, "card_bytes", lambda: 80 * GIB)
    assert resolve_quantization(cfg) == "none"
    size = model_size("tiny-bert")
    between = (size.weight_bytes("8bit") + size.weight_bytes("none")) / 2 / memory.WEIGHT_SHARE
    stated = resolve({"model": "tiny-bert", "quantization": "auto", "gpu-memory-gb": between / GIB})
    assert resolve_quantization(stated) == "8bit"
    tight = resolve({"model": "tiny-bert", "quantization": "auto", "gpu-memory-gb": 1e-9})
    with pytest.raises(MemoryPlanError, match="tiny-bert"):
        resolve_quantization(tight)
    with_dp = resolve({"model": "tiny-bert", "quantization": "auto", "dp": True, "gpu-memory-gb": between / GIB})
    with pytest.raises(MemoryPlanError, match="not available with dp"):
        resolve_quantization(with_dp)
