"""Tiny random models of each family a hospital may bring, written as a model folder.

A hospital mirrors its model (Bio_ClinicalBERT, BioClinical-ModernBERT, Llama-3.1-8B,
Qwen, Gemma, Mistral) into a local folder; clinfed's tests and `clinfed bench gpu
--smoke` check the same loading path (config.json, weights, tokenizer, chat template)
with random models of the same architecture a few hundred kilobytes in size. Hidden
size 64, because 4-bit NF4 quantizes in blocks of 64 weights (bitsandbytes' CPU
inference kernel refuses narrower layers).
"""

from __future__ import annotations

from pathlib import Path

ENCODERS = ("bert", "modernbert")
DECODERS = ("llama", "qwen2", "gemma", "mistral")
FAMILIES = ENCODERS + DECODERS


def family_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                  pad_token_id: int = 0, bos_token_id: int = 2, eos_token_id: int = 3):
    """A small random config of `family` (transformers' own config class of that architecture)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=pad_token_id,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "bert":
        return tf.BertConfig(**common)
    if family == "modernbert":
        return tf.ModernBertConfig(**common, global_attn_every_n_layers=1, local_attention=64,
                                   cls_token_id=bos_token_id, sep_token_id=eos_token_id)
    decoder = dict(common, num_key_value_heads=heads, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**decoder)
    if family == "qwen2":
        return tf.Qwen2Config(**decoder)
    if family == "gemma":
        return tf.GemmaConfig(**decoder, head_dim=hidden // heads)
    if family == "mistral":
        return tf.MistralConfig(**decoder, sliding_window=None)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def write_tiny_model(folder: str | Path, family: str, kind: str = "causal", hidden: int = 64, layers: int = 2,
                     seed: int = 0, chat_template: bool = True) -> Path:
    """Write a random `family` model with a tokenizer to `folder`, as a hospital's mirror would hold it.

    `kind`: `causal` (a decoder's language model) or `cls` (a sequence classifier, 2 labels).
    The tokenizer is clinfed's word-level test tokenizer with ChatML markers; with
    `chat_template=False` the folder has none (a base model, not an instruction one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from clinfed.common.model_source import tiny_chat_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_chat_tokenizer()
    if not chat_template:
        tok.chat_template = None
    cfg = family_config(family, len(tok), hidden=hidden, layers=layers, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if kind == "cls":
        cfg.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
