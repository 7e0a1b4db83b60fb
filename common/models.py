"""Which weights a model trains: the LoRA classifier, head-only and full fine-tuning, and their shapes.

Everything that decides *which* weights exist lives here, so the client, the
server (which saves PEFT folders) and the egress guard agree on the adapter's
keys and shapes. Where weights come from is `common.model_source`; moving them
between models, files and the wire is `common.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass


from clinfed.common.hardware import prepare_quantized, quantized_load_kwargs
from clinfed.common.model_source import (
    LOCK,
    SMOLLM2_ALIASES,
    TINY_MODELS,
    ModelError,
    from_config_quantized,
    load_tokenizer,
    resolve_model,
    seeded,
    tiny_config,
)

# LoRA target modules per architecture (attention query/value projections; ModernBERT fuses
# query, key and value into one `Wqkv` projection). Each family clinfed names in its docs
# (BERT, ModernBERT, Llama, Qwen2, Gemma, Mistral) is tested on a tiny random config.
LORA_TARGETS = {
    "bert": ["query", "value"],
    "modernbert": ["Wqkv"],
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

# The decoder's default targets (SmolLM2 and other Llama-like models), for instruction tuning.
DEFAULT_DECODER_TARGETS = ["q_proj", "v_proj"]


# Float layers of a classifier that are never quantized: the head (trained in full) and the pooler.
# transformers matches these from the start of a module's full name or as its suffix (5.x), or as a
# substring (4.x): the `.*` forms catch `bert.pooler.dense` in 5.x, the bare ones in 4.x.
HEAD_NAMES = ["classifier", "score", "pooler", ".*classifier", ".*score", ".*pooler"]


def load_classifier(name: str, seed: int, num_labels: int = 2, quantization: str = "none",
                    device: str = "auto"):
    """Base encoder/decoder with a sequence-classification head initialised from `seed`.

    The head is new; seeding right before construction makes it identical at
    every site and at the server, so `base` and round-1 `global` start equal.
    With `quantization` (4bit/8bit) the frozen base is loaded through bitsandbytes onto
    the site's device and prepared for k-bit training; the head stays fp32.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(name)
    tok = load_tokenizer(name)
    qkw = quantized_load_kwargs(quantization, device, skip_modules=HEAD_NAMES)
    with LOCK:
        seeded(seed)
        if resolved in TINY_MODELS:
            model = from_config_quantized(AutoModelForSequenceClassification,
                                          tiny_config(resolved, len(tok), num_labels), qkw)
        else:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    resolved, num_labels=num_labels, dtype=torch.float32, **qkw
                )
            except (OSError, ValueError) as err:
                raise ModelError(
                    f"cannot load model '{name}' for sequence classification: {err}"
                ) from None
        if qkw:
            model = prepare_quantized(model)
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


def decoder_targets(model) -> list[str]:
    """A decoder's LoRA targets: its architecture's (`lora_targets`), q_proj/v_proj when unknown."""
    try:
        return lora_targets(model)
    except ModelError:
        return DEFAULT_DECODER_TARGETS


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
    alpha: int | float = 16  # a float only at a rank-capped site (common.ranks.site_alpha)
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    study_rank: int = 0  # the study's rank when a site's policy caps this one below it; 0 = not capped


def make_lora_model(name: str, seed: int, lora: LoraSettings, quantization: str = "none",
                    device: str = "auto"):
    """Base classifier wrapped with a fresh LoRA adapter (A random from `seed`, B zero)."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, tok = load_classifier(name, seed, quantization=quantization, device=device)
    targets = list(lora.targets) or lora_targets(model)
    cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, target_modules=targets,
        modules_to_save=head_modules(model),
    )
    with LOCK:
        seeded(seed + 1)
        peft_model = get_peft_model(model, cfg)
    return peft_model, tok


def _unquantized_only(method: str, quantization: str) -> None:
    if (quantization or "none") != "none":
        raise ModelError(f"quantization {quantization!r} applies to LoRA (QLoRA); the {method} method trains "
                         "base weights, which cannot be held in 4 or 8 bits: set quantization = none")


def make_head_only_model(name: str, seed: int, lora: LoraSettings | None = None, quantization: str = "none",
                         device: str = "auto"):
    """Base classifier with every weight frozen but the head (`head_modules`: the classifier
    and, for BERT-like encoders, the pooler). Not a PEFT model: PEFT refuses an adapter
    without target modules, so its trainable state is the plain named parameters."""
    _unquantized_only("head-only", quantization)
    model, tok = load_classifier(name, seed)
    heads = head_modules(model) or []
    if not heads:
        raise ModelError(f"model '{name}' has no classification head (classifier/score) to train alone")
    for pname, param in model.named_parameters():
        param.requires_grad = any(pname == h or pname.startswith(h + ".") or f".{h}." in f".{pname}"
                                  for h in heads)
    return model, tok


def make_full_model(name: str, seed: int, lora: LoraSettings | None = None, quantization: str = "none",
                    device: str = "auto"):
    """Base classifier with every weight trainable (full fine-tuning: the whole model travels)."""
    _unquantized_only("full", quantization)
    model, tok = load_classifier(name, seed)
    for param in model.parameters():
        param.requires_grad = True
    return model, tok

def is_decoder_model(name: str) -> bool:
    """A causal (decoder-only) language model? Read from its config, without loading weights."""
    name = (name or "").strip()
    if name in TINY_MODELS:
        return name == "tiny-llama"
    if name in SMOLLM2_ALIASES:  # the default decoder
        return True
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the configuration of model '{name}': {err}") from None
    archs = getattr(cfg, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or getattr(cfg, "model_type", "") in LLAMA_LIKE


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox")
