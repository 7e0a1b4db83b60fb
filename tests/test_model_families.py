"""Models from a hospital's own folder: each family clinfed names (BERT, ModernBERT, Llama, Qwen2,
Gemma, Mistral) as a tiny random model written to a folder, loaded offline through clinfed's
loader, with LoRA on its architecture's attention projections and one training step; a folder
that lacks something is refused with a message naming it."""

import numpy as np
import pytest

from clinfed.common.adapters import adapter_state
from clinfed.common.config import ConfigError, resolve
from clinfed.common.instruct import InstructSettings, decoder_adapter_state, make_lora_causal_lm, sft_train
from clinfed.common.model_source import ModelError, check_model_source, load_causal_lm, load_tokenizer
from clinfed.common.models import LoraSettings, make_lora_model
from clinfed.common.tiny_models import DECODERS, ENCODERS, write_tiny_model
from clinfed.common.training import TrainSettings, encode_texts, train_classifier

TARGETS = {"bert": {"query", "value"}, "modernbert": {"Wqkv"}, "llama": {"q_proj", "v_proj"},
           "qwen2": {"q_proj", "v_proj"}, "gemma": {"q_proj", "v_proj"}, "mistral": {"q_proj", "v_proj"}}
NOTES = ["patient admitted with chf", "stable discharged home", "copd shortness breath readmitted",
         "lives alone follow-up scheduled"]


def _changed(before, after):
    return any(not np.allclose(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_family_from_a_folder_trains_lora(family, tmp_path):
    folder = write_tiny_model(tmp_path / family, family, kind="cls")
    check_model_source(str(folder))
    model, tok = make_lora_model(str(folder), 0, LoraSettings(rank=4))
    assert set(model.peft_config["default"].target_modules) == TARGETS[family]
    start = adapter_state(model)
    assert any("lora_A" in k for k in start)
    enc = encode_texts(tok, NOTES * 2, 32)
    info = train_classifier(model, enc, np.array([1, 0, 1, 0] * 2), TrainSettings(steps=1, batch_size=8, lr=1e-2),
                            pad_id=tok.pad_token_id)
    assert np.isfinite(info["train_loss"]) and _changed(start, adapter_state(model))


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_family_from_a_folder_runs_an_sft_step(family, tmp_path):
    folder = write_tiny_model(tmp_path / family, family)
    check_model_source(str(folder), chat_template=True)
    model, tok = make_lora_causal_lm(str(folder), 0, LoraSettings(rank=4))
    assert set(model.peft_config["default"].target_modules) == TARGETS[family]
    start = decoder_adapter_state(model)
    exs = [{"prompt": [{"role": "user", "content": f"patient {w} readmitted ?"}],
            "completion": [{"role": "assistant", "content": a}]} for w, a in [("chf", "yes"), ("stable", "no")] * 2]
    info = sft_train(model, tok, exs, InstructSettings(steps=2, batch_size=4, lr=1e-2))
    assert np.isfinite(info["train_loss"]) and _changed(start, decoder_adapter_state(model))


def test_a_folder_that_lacks_something_is_refused_by_name(tmp_path):
    folder = write_tiny_model(tmp_path / "m", "llama", chat_template=False)
    # a base model without a chat template: fine for the classifier, refused for SFT/DPO
    check_model_source(str(folder))
    with pytest.raises(ModelError, match="chat template"):
        check_model_source(str(folder), chat_template=True)
    with pytest.raises(ModelError, match="chat template"):
        load_causal_lm(str(folder))
    with pytest.raises(ConfigError, match="chat template"):
        resolve({"task": "generative", "decoder": str(folder)})
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="lacks a tokenizer"):
        load_tokenizer(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="weights") as err:
        resolve({"model": str(folder)})
    assert "tokenizer" in str(err.value)  # everything missing is named at once
