"""Decoder instruction tuning with TRL on a tiny Llama: SFT learns, DPO's reference is its start."""

import numpy as np
import torch

from clinfed.common.instruct import (
    InstructSettings,
    answer_probability,
    decoder_adapter_state,
    dpo_train,
    make_lora_causal_lm,
    sft_train,
)
from clinfed.common.models import LoraSettings
from clinfed.common.adapters import load_adapter_state, save_adapter

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

    from clinfed.common.model_source import load_causal_lm

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


def test_dpo_pairs_reject_the_models_own_wrong_answers(small_federation):
    """An untrained tiny model answers wrongly, so with dpo-self-rejected its own outputs
    become `rejected`; without it, the plausible wrong answers are used."""
    from clinfed.client.generative_site import GenSite
    from clinfed.common.model_cache import get_decoder
    from clinfed.common.config import resolve
    from clinfed.common.data import list_sites

    name, folder = list_sites(small_federation)[0]
    for own in (True, False):
        cfg = resolve({"task": "generative", "decoder": "tiny-llama", "gen-tasks": "triage,extraction",
                       "gen-max-new-tokens": 6, "dpo-self-rejected": own})
        site = GenSite(name, folder, folder / "encounters.csv", cfg)
        dec = get_decoder(cfg)
        dec.use(dec.init_state)
        pairs, n_own = site.dpo_pairs(dec, 6, offset=1)
        assert len(pairs) == 6
        assert all(p["rejected"][0]["content"] != p["chosen"][0]["content"] for p in pairs)
        assert (n_own == 6) if own else (n_own == 0)


def test_holdout_task_has_no_training_items(small_federation):
    import pytest

    from clinfed.client.generative_site import GenSite
    from clinfed.common.config import ConfigError, resolve
    from clinfed.common.data import list_sites

    name, folder = list_sites(small_federation)[0]
    cfg = resolve({"task": "generative", "gen-holdout-task": "extraction"})
    site = GenSite(name, folder, folder / "encounters.csv", cfg)
    assert site.items["extraction"]["train"] == [] and len(site.items["extraction"]["test"]) > 0
    assert len(site.items["triage"]["train"]) > 0
    assert all(e["completion"][0]["content"][0] != "{" for e in site.sft_examples())  # no extraction JSON
    with pytest.raises(ConfigError, match="not one of gen-tasks"):
        resolve({"gen-tasks": "triage,readmission", "gen-holdout-task": "extraction"})
    with pytest.raises(ConfigError, match="nothing to train"):
        resolve({"gen-tasks": "triage", "gen-holdout-task": "triage"})
    with pytest.raises(ConfigError, match="unknown task"):
        resolve({"gen-tasks": "triage,summaries"})
