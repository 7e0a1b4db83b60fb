"""Instruction tuning of a decoder with LoRA at one site: SFT and DPO through TRL.

The adapter is swapped in and out of one cached PeftModel, as for the
classifier. DPO is handed that PeftModel with the stage's starting adapter
(the SFT or global one) loaded as `default` and no reference model: TRL then
copies `default` into a frozen `ref` adapter, so the reference policy is the
model the DPO stage starts from, not the bare base. The `ref` copy is
deleted afterwards so it never reaches a saved folder or the wire.

With DP-SGD (run config `dp`), SFT runs as a plain loop through Opacus
(`sft_train_dp`) instead of TRL. DPO has no DP path: its loss couples each
pair with the reference policy's log-probabilities, which TRL computes inside
the trainer, and Opacus would need the pair's whole two-sequence forward to be
one "example" of a plain loop; not built, so `dp` requires `dpo-rounds = 0`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np

from clinfed.common.adapters import adapter_state
from clinfed.common.model_source import LOCK, load_causal_lm, seeded
from clinfed.common.models import LoraSettings, decoder_targets
from clinfed.common.training import pick_device


def make_lora_causal_lm(name: str, seed: int, lora: LoraSettings, quantization: str = "none",
                        device: str = "auto"):
    """A causal LM wrapped with a fresh LoRA adapter (B zero: starts equal to the base); with
    `quantization` the frozen base is held in 4 or 8 bits (QLoRA)."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, tok = load_causal_lm(name, seed, quantization=quantization, device=device)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.rank, lora_alpha=lora.alpha,
                     lora_dropout=lora.dropout, target_modules=list(lora.targets) or decoder_targets(model))
    with LOCK:
        seeded(seed + 1)
        peft_model = get_peft_model(model, cfg)
    return peft_model, tok


@dataclass
class InstructSettings:
    steps: int = 20
    batch_size: int = 4
    lr: float = 2e-4
    max_length: int = 256
    beta: float = 0.1
    seed: int = 0
    device: str = "auto"
    micro_batch: int = 0  # 0 = batch_size; less: micro-batches with gradient accumulation (same effective batch)


def _common_args(settings: InstructSettings, out: str, micro: int | None = None) -> dict:
    """TRL's arguments: `micro` examples per forward, accumulated to the study's batch size (the
    number of optimizer steps, `max_steps`, does not change)."""
    import torch

    device = pick_device(settings.device)
    micro = int(micro or settings.batch_size)
    # on a GPU the trainer's own mixed precision: bf16 autocast, else fp16 with loss scaling
    # (not run yet: no GPU was available); on CPU fp32, as measured
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    fp16 = device == "cuda" and not bf16
    return dict(output_dir=out, max_steps=int(settings.steps), per_device_train_batch_size=micro,
                gradient_accumulation_steps=max(1, int(settings.batch_size) // micro),
                learning_rate=float(settings.lr), lr_scheduler_type="cosine", warmup_steps=max(1, settings.steps // 10),
                logging_steps=max(1, settings.steps // 4) if settings.steps > 1 else 1, save_strategy="no", report_to=[],
                seed=int(settings.seed), use_cpu=device == "cpu", bf16=bf16, fp16=fp16, disable_tqdm=True,
                max_length=int(settings.max_length), remove_unused_columns=True,
                # real (non-padding) tokens the trainer fed: the site's tokens/s in run.json
                include_num_input_tokens_seen="non_padding")


def _throughput(trainer, seconds: float) -> dict:
    """Non-padding tokens the trainer saw, and per second of its training call."""
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    return {"tokens": tokens, "tokens_per_s": tokens / seconds} if tokens and seconds > 0 else {}


def _quiet(trainer):
    """With tqdm off, transformers prints every log dict; the study reports its own progress."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _no_bars():
    """TRL's dataset passes (tokenize, label, truncate) print a bar per site and round."""
    import datasets

    datasets.disable_progress_bars()


def _losses(trainer) -> float:
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(np.mean(logs[-2:])) if logs else float("nan")


def sft_train(peft_model, tok, examples: list[dict], settings: InstructSettings, restore=None) -> dict:
    """Supervised fine-tuning on prompt/completion chat examples (loss on the completion only).

    Out of memory: `restore()` puts the starting adapter back and the stage runs again with
    half the micro-batch (`common.memory.retry_on_oom`)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from clinfed.common.memory import retry_on_oom

    _no_bars()

    def run(micro, _accumulation):
        with tempfile.TemporaryDirectory() as out:
            args = SFTConfig(**_common_args(settings, out, micro))
            trainer = _quiet(SFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(examples),
                                        processing_class=tok))
            t = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t
            return {"train_loss": _losses(trainer), "seconds": seconds, "steps": settings.steps,
                    **_throughput(trainer, seconds)}

    info, fit = retry_on_oom(run, int(settings.batch_size), settings.micro_batch or None, restore, "SFT")
    return {**info, **fit.as_info()}


def sft_token_lists(tok, examples: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per prompt/completion example, cut
    to `max_length`; the answer is the tokens the chat template adds after the prompt."""
    out = []
    for ex in examples:
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True, return_dict=False)
        if list(full[:len(prompt)]) != list(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + answer")
        full = list(full)[:max_length]
        if len(full) <= len(prompt):  # the answer was cut off entirely: nothing to learn from
            continue
        out.append((full, len(prompt)))
    return out


def _undo_trl_training_setup(peft_model):
    """TRL's trainers leave the shared model with gradient checkpointing on and a hook
    that makes the embeddings' output require grad; per-example gradients need neither
    (recomputed forwards fire Opacus' hooks again, so sample counts stop matching)."""
    base = peft_model.get_base_model()
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    for m in (peft_model, base):
        if getattr(m, "_require_grads_hook", None) is not None:
            m.disable_input_require_grads()


def sft_train_dp(peft_model, tok, examples: list[dict], settings: InstructSettings, dp) -> dict:
    """SFT as DP-SGD (common.dp.train_dp): a plain loop, because TRL's trainers have no
    per-example clipping. Each example's loss is the mean over its own answer tokens
    and the batch loss the mean over examples, so the gradient Opacus clips is one
    example's (the built-in LM loss averages tokens across the batch, which would not be)."""
    import torch

    from clinfed.common.dp import train_dp

    seqs = sft_token_lists(tok, examples, int(settings.max_length))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batch_loss(gsm, idx, device):
        rows = [seqs[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        answer = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (x, start) in enumerate(rows):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
            answer[r, start:len(x)] = True
        ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
        logits = gsm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, weight = ids[:, 1:], answer[:, 1:].float()
        tok_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        per_example = (tok_loss * weight).sum(1) / weight.sum(1).clamp(min=1)
        return per_example.mean(), mask.sum(), mask.numel()

    torch.manual_seed(int(settings.seed))
    _undo_trl_training_setup(peft_model)
    info = train_dp(peft_model, len(seqs), batch_loss, settings, dp)
    info["examples"] = len(seqs)
    return info


def dpo_train(peft_model, tok, pairs: list[dict], settings: InstructSettings, restore=None) -> dict:
    """DPO on {prompt, chosen, rejected} chat pairs; the reference is the starting adapter.
    Out of memory: retried like `sft_train`, with half the micro-batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from clinfed.common.memory import retry_on_oom

    _no_bars()

    def run(micro, _accumulation):
        with tempfile.TemporaryDirectory() as out:
            args = DPOConfig(**_common_args(settings, out, micro), beta=float(settings.beta))
            trainer = _quiet(DPOTrainer(model=peft_model, ref_model=None, args=args,
                                        train_dataset=Dataset.from_list(pairs), processing_class=tok))
            t = time.perf_counter()
            try:
                trainer.train()
                margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
                seconds = time.perf_counter() - t
                return {"train_loss": _losses(trainer), "seconds": seconds, "steps": settings.steps,
                        **_throughput(trainer, seconds),
                        "reward_margin": float(margins[-1]) if margins else float("nan"),
                        "reference_adapter": "ref" in peft_model.peft_config,
                        "log": list(trainer.state.log_history)}
            finally:
                if "ref" in peft_model.peft_config:
                    peft_model.delete_adapter("ref")
                peft_model.set_adapter("default")

    info, fit = retry_on_oom(run, int(settings.batch_size), settings.micro_batch or None, restore, "DPO")
    return {**info, **fit.as_info()}


def decoder_adapter_state(peft_model) -> dict[str, np.ndarray]:
    """Only the trainable `default` adapter (never TRL's `ref` copy)."""
    return {k: v for k, v in adapter_state(peft_model).items() if ".ref." not in k}


def _prompt_ids(tok, messages_list):
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
            for m in messages_list]


def generate(peft_model, tok, prompts: list[list[dict]], max_new_tokens: int = 48, batch_size: int = 8,
             device: str = "auto") -> list[str]:
    """Greedy answers to chat prompts (left-padded batches with the KV cache, no gradients)."""
    import torch

    from clinfed.common.hardware import place

    device = pick_device(device)
    place(peft_model, device).eval()
    ids = _prompt_ids(tok, prompts)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            width = max(len(x) for x in chunk)
            inp = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(inp)
            for r, x in enumerate(chunk):
                inp[r, width - len(x):] = torch.tensor(x)
                mask[r, width - len(x):] = 1
            gen = peft_model.generate(input_ids=inp.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            outs.extend(tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen)
    return outs


def answer_probability(peft_model, tok, prompts: list[list[dict]], yes: str = "yes", no: str = "no",
                       device: str = "auto") -> np.ndarray:
    """P(yes) / (P(yes) + P(no)) from the first answer token: a score for ROC AUC."""
    import torch

    from clinfed.common.hardware import place

    device = pick_device(device)
    place(peft_model, device).eval()
    yes_id = tok.encode(yes, add_special_tokens=False)[0]
    no_id = tok.encode(no, add_special_tokens=False)[0]
    out = []
    with torch.inference_mode():
        for x in _prompt_ids(tok, prompts):
            logits = peft_model(input_ids=torch.tensor([x], device=device)).logits[0, -1].float()
            two = torch.softmax(logits[[yes_id, no_id]], dim=-1)
            out.append(float(two[0]))
    return np.array(out)
