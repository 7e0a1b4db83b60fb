"""Adapter state: from a model to wire arrays and back, into PEFT folders and out, checked both ways.

What travels is a dict of numpy arrays keyed by PEFT's state-dict names; every
conversion here checks keys, shapes and values against what the model expects,
and every adapter written to disk carries a manifest (keys, shapes, dtype,
SHA-256 of the weights, base model identity) that reading it back checks, so an
adapter can neither load silently inactive nor onto the wrong base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from clinfed.common.errors import ClinfedError

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


class AdapterMismatch(ClinfedError, ValueError):
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
