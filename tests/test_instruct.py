"""Decoder instruction tuning with TRL on a tiny Llama: SFT learns, DPO's reference is its start."""

import numpy as np
import torch

from common.instruct import (
    InstructSettings,
    answer_probability,
    decoder_adapter_state,
    dpo_train,
    make_lora_causal_lm,
    sft_train,
)
from common.models import LoraSettings, load_adapter_state, save_adapter

SYS = {"role": "system", "content": "You are a clinical assistant."}
ALL_LINEAR = LoraSettings(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def examples(n=16):
    out = []
    for i in range(n):
        word, ans = ("chf", "yes") if i % 2 == 0 else ("stable", "no")
        out.append({"prompt": [SYS, {"role": "user", "content": f"patient {word} readmitted ?"}],
                    "completion": [{"role": "assistant", "content": ans}]})
    return out


def pairs(exs):
    flip = {"yes": "no", "no": "yes"}
    return [{"prompt": e["prompt"], "chosen": e["completion"],
             "rejected": [{"role": "assistant", "content": flip[e["completion"][0]["content"]]}]} for e in exs]


def test_sft_changes_the_adapter_and_learns_the_answer():
    model, tok = make_lora_causal_lm("tiny-llama", 0, ALL_LINEAR)
    before = decoder_adapter_state(model)
    exs = examples()
    p0 = answer_probability(model, tok, [e["prompt"] for e in exs[:2]])
    info = sft_train(model, tok, exs, InstructSettings(steps=60, batch_size=8, lr=2e-2))
    after = decoder_adapter_state(model)
    assert set(after) == set(before)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    p1 = answer_probability(model, tok, [e["prompt"] for e in exs[:2]])
    # the "chf" item moved towards yes relative to the "stable" item
    assert (p1[0] - p1[1]) > (p0[0] - p0[1]) + 0.05, (p0, p1, info)


def test_dpo_reference_is_the_adapter_the_stage_starts_from():
    model, tok = make_lora_causal_lm("tiny-llama", 0, LoraSettings(rank=8))
    # a start adapter far from the bare base (as after SFT or from the global round)
    rng = np.random.default_rng(0)
    start = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in decoder_adapter_state(model).items()}
    load_adapter_state(model, start)
    info = dpo_train(model, tok, pairs(examples(8)), InstructSettings(steps=1, batch_size=8, lr=1e-9, beta=0.1))
    assert info["reference_adapter"], "TRL did not make a reference copy of the starting adapter"
    first = next(h for h in info["log"] if "rewards/chosen" in h)
    # reference == start: implicit rewards are zero at the first step; a bare-base reference would not be
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4, first
    with torch.no_grad(), model.disable_adapter():
        ids = tok.apply_chat_template(examples(1)[0]["prompt"], add_generation_prompt=True, return_dict=False)
        base_logits = model(input_ids=torch.tensor([ids])).logits
    start_logits = model(input_ids=torch.tensor([ids])).logits
    assert not torch.allclose(base_logits, start_logits), "the start adapter must differ from the base"
    assert list(model.peft_config) == ["default"], "TRL's ref adapter must not survive the stage"


def test_dpo_moves_towards_chosen_and_the_adapter_reloads_with_plain_peft(tmp_path):
    from peft import PeftModel

    from common.decoder import load_causal_lm

    model, tok = make_lora_causal_lm("tiny-llama", 0, LoraSettings(rank=8))
    exs = examples(16)
    info = dpo_train(model, tok, pairs(exs), InstructSettings(steps=20, batch_size=8, lr=5e-3, beta=0.1))
    assert info["reward_margin"] > 0, info
    state = decoder_adapter_state(model)
    save_adapter(model, state, tmp_path / "dpo")
    assert not (tmp_path / "dpo" / "ref").exists()
    base, _ = load_causal_lm("tiny-llama", 0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "dpo"))
    prompts = [e["prompt"] for e in exs[:4]]
    np.testing.assert_allclose(answer_probability(loaded, tok, prompts), answer_probability(model, tok, prompts),
                               rtol=1e-5)
