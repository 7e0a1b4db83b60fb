"""The base model each process keeps loaded, with its trainable state swapped in per site and message.

In simulation a Ray actor serves many sites and many messages, and the server
needs the same model to save PEFT folders and score public items: the model is
loaded once per process and key, and states (adapters, heads) are swapped in.
Both sides use this module, so the site and the server build the same model from
the same key (model, seed, LoRA settings, method, form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinfed.common.adapters import adapter_state, load_adapter_state
from clinfed.common.instruct import make_lora_causal_lm
from clinfed.common.memory import resolve_quantization
from clinfed.common.ranks import fit as fit_rank, site_alpha, site_rank
from clinfed.common.model_source import LOCK, TINY_MODELS, ModelError, model_identity, resolve_model
from clinfed.common.models import (
    LoraSettings,
    decoder_targets,
    head_modules,
    lora_targets,
    make_full_model,
    make_head_only_model,
    make_lora_model,
)


def builder(method: str = "lora", form: str = "cls"):
    """The function that builds an arm's model: (name, seed, LoraSettings) -> (model, tokenizer)."""
    if form == "prompt":
        if method != "lora":
            raise ModelError(f"the prompt form tunes LoRA adapters; method {method!r} is not available for it")
        return make_lora_causal_lm
    return {"lora": make_lora_model, "head-only": make_head_only_model, "full": make_full_model}[method]


@dataclass(frozen=True)
class ModelKey:
    model: str
    seed: int
    lora: LoraSettings
    method: str = "lora"  # lora | head-only | full (an arm of a comparison)
    form: str = "cls"  # cls | prompt
    quantization: str = "none"  # none | 4bit | 8bit: the frozen base in bitsandbytes (QLoRA)
    device: str = "auto"  # where a quantized base is loaded (others are moved by the training loop)


class LoadedModel:
    """A base model with its trainable state (LoRA adapter + head, the head alone, or every
    weight), loaded once per process; states are swapped in.

    `build` makes the model; by default the one the key's method and form call for (the
    LoRA classifier unless an arm says otherwise); the causal LM for instruction tuning
    (`get_decoder`) passes its own."""

    def __init__(self, key: ModelKey, build=None):
        self.key = key
        build = build or builder(key.method, key.form)
        self.model, self.tokenizer = build(key.model, key.seed, key.lora,
                                           **({"quantization": key.quantization, "device": key.device}
                                              if key.quantization != "none" else {}))
        self.init_state = adapter_state(self.model)
        self.shapes = {k: tuple(v.shape) for k, v in self.init_state.items()}
        self.identity = model_identity(key.model)
        self.answer_ids = None
        if key.form == "prompt":  # the first token of "yes" and of "no": the prompt form's score
            self.answer_ids = (self.tokenizer.encode("yes", add_special_tokens=False)[0],
                               self.tokenizer.encode("no", add_special_tokens=False)[0])

    @property
    def parameters(self) -> int:
        """Trainable parameters: what one update carries."""
        return int(sum(v.size for v in self.init_state.values()))

    def use(self, state: dict[str, np.ndarray]):
        if self.key.lora.study_rank:  # a rank-capped site: the study's adapters arrive at the study's rank
            state = fit_rank(state, self.shapes)
        load_adapter_state(self.model, state, reference=self.init_state)
        return self.model


_MODELS: dict[ModelKey, LoadedModel] = {}


def get_model(key: ModelKey) -> LoadedModel:
    if key not in _MODELS:
        _MODELS.clear()  # one base model per process: a new study replaces the old one
        _MODELS[key] = LoadedModel(key)
    return _MODELS[key]


def model_key(cfg: dict, causal: bool = False, max_lora_rank: int = 0) -> ModelKey:
    """The model a study (or one site of it) builds. `quantization = auto` is decided here, before
    loading (`common.memory.resolve_quantization`: from the model's size and the site's memory).
    `max_lora_rank`: the site's policy cap; the site's LoRA then has rank min(study rank, cap), with
    alpha scaled alike (common.ranks)."""
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    rank = site_rank(cfg.lora_rank, max_lora_rank)
    lora = LoraSettings(rank, site_alpha(cfg.lora_alpha, cfg.lora_rank, rank), cfg.lora_dropout, targets,
                        study_rank=cfg.lora_rank if rank != cfg.lora_rank else 0)
    form = str(cfg.get("arm-form", "cls"))
    quantization = resolve_quantization(cfg, name=cfg.model, causal=causal or form == "prompt")
    return ModelKey(cfg.model, cfg.seed, lora, str(cfg.get("arm-method", "lora")), form, quantization,
                    str(cfg.get("device", "auto")))


_DECODERS: dict[ModelKey, LoadedModel] = {}


def get_decoder(cfg: dict) -> LoadedModel:
    """The decoder with its LoRA adapter, loaded once per process (like the classifier)."""
    key = model_key(cfg.override({"model": cfg.decoder}), causal=True)
    if key not in _DECODERS:
        _DECODERS.clear()
        _DECODERS[key] = LoadedModel(key, build=make_lora_causal_lm)
    return _DECODERS[key]


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
    with LOCK, torch.device("meta"):
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
        pcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.rank, lora_alpha=lora.alpha,
                          target_modules=list(lora.targets) or decoder_targets(model))
    else:
        pcfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha,
                          target_modules=list(lora.targets) or lora_targets(model),
                          modules_to_save=head_modules(model))
    with LOCK:
        peft_model = get_peft_model(model, pcfg)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def shapes_nbytes(shapes: dict[str, tuple[int, ...]], itemsize: int = 4) -> int:
    """Bytes of the fp32 arrays with these shapes (the wire format is fp32)."""
    return int(sum(int(np.prod(s)) if len(s) else 1 for s in shapes.values()) * itemsize)
