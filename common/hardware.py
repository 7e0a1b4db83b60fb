"""The site's hardware: which device trains, and whether the frozen base is quantized.

A hospital's card decides both, so a site's policy file may override the study's
`device` and `quantization` (`common.policy`: the site's setting wins). Quantized
LoRA (QLoRA) goes through bitsandbytes: NF4 with double quantization and bf16
compute for 4-bit, LLM.int8 for 8-bit. Only the frozen base is quantized; the LoRA
matrices and the classification head stay fp32, so what a site trains and sends
is a plain PEFT adapter that loads on the unquantized base.

Verified on CPU only (bitsandbytes 0.50 runs both 4- and 8-bit forward and
backward on CPU, slowly); nothing here has run on a GPU yet.
"""

from __future__ import annotations

from clinfed.common.errors import ClinfedError

QUANTIZATIONS = ("none", "4bit", "8bit")
DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ClinfedError, ValueError):
    """A device or quantization the machine cannot provide (user-facing, said at start)."""


def pick_device(prefer: str = "auto") -> str:
    """'cuda' or 'cpu'. `auto` takes the GPU when there is one; `cuda` without one is an error
    the user reads at start, not a stack trace from inside a training step."""
    import torch

    prefer = (prefer or "auto").strip().lower()
    if prefer not in DEVICES:
        raise DeviceError(f"device {prefer!r}: expected one of {', '.join(DEVICES)}")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for (run config `device`, --device or the site's policy) "
                          "but this machine has no CUDA device torch can use: use device = auto or cpu")
    if prefer in ("cpu", "cuda"):
        return prefer
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str):
    """bf16 where the device does it (CPU, Ampere and later GPUs), else fp16 (older GPUs)."""
    import torch

    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def bitsandbytes_config(quantization: str, skip_modules: list[str] | None = None, device: str = "cpu"):
    """The `BitsAndBytesConfig` of a quantization mode (None for `none`).

    4-bit: NF4, double quantization, bf16 compute (the QLoRA recipe; fp16 on a GPU without
    bf16). `skip_modules` stay unquantized: a classifier's head is trained in full and must
    stay a float layer."""

    quantization = (quantization or "none").strip().lower()
    if quantization not in QUANTIZATIONS:
        raise DeviceError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DeviceError(f"quantization {quantization!r} needs bitsandbytes: `pip install bitsandbytes`") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(device), llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def quantized_load_kwargs(quantization: str, device: str = "auto", skip_modules: list[str] | None = None) -> dict:
    """Keyword arguments of `from_pretrained` that load the base quantized onto the site's device
    ({} without quantization: the base loads in fp32 and the training loop moves it)."""
    if (quantization or "none").strip().lower() == "none":
        bitsandbytes_config(quantization)  # still refuses an unknown mode
        return {}
    where = pick_device(device)
    cfg = bitsandbytes_config(quantization, skip_modules, where)
    return {"quantization_config": cfg, "device_map": {"": 0 if where == "cuda" else "cpu"}}


def is_quantized(model) -> bool:
    """Is the frozen base held in 4 or 8 bits? (Such a model is placed at load time and never moved.)"""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized(model):
    """`prepare_model_for_kbit_training` with gradient checkpointing (non-reentrant, so LoRA's
    gradients flow through the frozen quantized layers); float layers are kept in fp32."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_cpu_4bit_trainable(model)
    return model


def keep_cpu_4bit_trainable(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a faster
    inference kernel the first time it scores without gradients, and later training forwards
    then run through a kernel without autograd (torch warns: "silently incorrect" gradients
    through the frozen layer). A site alternates training and scoring, so the repacking is
    turned off; GPUs are not concerned."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def place(model, device: str):
    """Move a model to `device`, except a quantized one, which stays where it was loaded."""
    if is_quantized(model):
        return model
    return model.to(device)
