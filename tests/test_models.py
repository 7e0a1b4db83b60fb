"""Adapters: deterministic init, exact round trip over the wire, real PEFT folders."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.serde import array_record_from_proto, array_record_to_proto

from clinfed.common.adapters import (
    AdapterMismatch,
    adapter_state,
    check_adapter_state,
    load_adapter_state,
    read_adapter,
    save_adapter,
)
from clinfed.common.models import LoraSettings, lora_targets, make_lora_model
from clinfed.common.model_source import resolve_model, ModelError


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_adapter_round_trips_exactly_through_flower_arrays(name):
    model, _ = make_lora_model(name, 3, LoraSettings(rank=4))
    state = adapter_state(model)
    # make B non-zero so the check is not trivially about zeros
    state = {k: v + np.random.default_rng(0).normal(size=v.shape).astype(np.float32) for k, v in state.items()}
    rec = ArrayRecord({k: Array(v) for k, v in state.items()})
    back = array_record_from_proto(array_record_to_proto(rec))
    got = {k: v.numpy() for k, v in back.items()}
    assert set(got) == set(state)
    for k in state:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], state[k])
    load_adapter_state(model, got)
    again = adapter_state(model)
    for k in state:
        np.testing.assert_array_equal(again[k], state[k])


def test_lora_targets_per_architecture():
    bert, _ = make_lora_model("tiny-bert", 0, LoraSettings())
    llama, _ = make_lora_model("tiny-llama", 0, LoraSettings())
    assert lora_targets(bert.base_model.model) == ["query", "value"]
    assert lora_targets(llama.base_model.model) == ["q_proj", "v_proj"]
    keys = adapter_state(bert)
    assert any("classifier" in k for k in keys), "the head must travel with the adapter"
    assert any("score" in k for k in adapter_state(llama))


def test_same_seed_same_initial_adapter_and_head():
    a, _ = make_lora_model("tiny-bert", 5, LoraSettings())
    b, _ = make_lora_model("tiny-bert", 5, LoraSettings())
    c, _ = make_lora_model("tiny-bert", 6, LoraSettings())
    sa, sb, sc = adapter_state(a), adapter_state(b), adapter_state(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not all(np.array_equal(sa[k], sc[k]) for k in sa)


def test_saved_adapter_loads_with_plain_peft_and_changes_outputs(tmp_path):
    from peft import PeftModel

    from clinfed.common.models import load_classifier

    model, tok = make_lora_model("tiny-bert", 1, LoraSettings(rank=4))
    state = {k: v + 0.5 for k, v in adapter_state(model).items()}
    save_adapter(model, state, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_config.json").exists()
    base, _ = load_classifier("tiny-bert", 1)
    ids = tok(["the patient was admitted with chf"], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits.clone()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    with torch.no_grad():
        ad_logits = loaded(**ids).logits
        model.eval()
        ours = model(**ids).logits
    assert not torch.allclose(base_logits, ad_logits), "adapter loaded as a no-op"
    torch.testing.assert_close(ad_logits, ours)
    back = read_adapter(model, tmp_path / "ad")
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_adapter_checks_refuse_bad_states():
    model, _ = make_lora_model("tiny-bert", 0, LoraSettings())
    ref = adapter_state(model)
    key = next(iter(ref))
    with pytest.raises(AdapterMismatch, match="keys"):
        check_adapter_state(ref, {**ref, "foreign.weight": np.zeros(3, np.float32)})
    with pytest.raises(AdapterMismatch, match="missing"):
        check_adapter_state(ref, {k: v for k, v in ref.items() if k != key})
    with pytest.raises(AdapterMismatch, match="shape"):
        check_adapter_state(ref, {**ref, key: np.zeros((1, 1), np.float32)})
    with pytest.raises(AdapterMismatch, match="non-finite"):
        check_adapter_state(ref, {**ref, key: np.full(ref[key].shape, np.nan, np.float32)})


def test_model_resolution(tmp_path):
    assert resolve_model("minilm").endswith("model")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./no/such/model")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path / "m"))


def _trained_state(model, scale=0.05):
    """The model's adapter with every LoRA B (and head) moved away from its start."""
    state = adapter_state(model)
    rng = np.random.default_rng(1)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


def test_an_inactive_adapter_is_caught_after_loading():
    """The silent failure: an adapter that loads but does not change outputs (here: LoRA
    scaling 0, as a wrong alpha or a disabled layer gives) is refused, naming why."""
    from clinfed.common.adapters import AdapterMismatch, load_adapter_state
    from clinfed.common.models import LoraSettings, make_lora_model

    model, _ = make_lora_model("tiny-bert", 0, LoraSettings(rank=4))
    fresh = adapter_state(model)  # head copies still equal the base head
    state = {k: (v + 0.05 if "lora_B" in k else v) for k, v in fresh.items()}
    load_adapter_state(model, state)  # active: fine
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: 0.0 for k in module.scaling}
    with pytest.raises(AdapterMismatch, match="not active"):
        load_adapter_state(model, state)


def test_a_changed_adapter_file_or_another_base_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from clinfed.common.adapters import AdapterMismatch, read_adapter, save_adapter
    from clinfed.common.models import LoraSettings, make_lora_model

    model, _ = make_lora_model("tiny-bert", 0, LoraSettings(rank=4))
    state = _trained_state(model)
    folder = save_adapter(model, state, tmp_path / "a", meta={"base_model": "tiny-bert@abc"})
    got = read_adapter(model, folder, expected_base="tiny-bert@abc")
    assert all(np.array_equal(got[k], state[k]) for k in state)
    with pytest.raises(AdapterMismatch, match="trained on base model 'tiny-bert@abc'"):
        read_adapter(model, folder, expected_base="minilm@def")
    raw = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in raw if "lora_B" in k)
    raw[key] = raw[key] + 1.0
    save_file(raw, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatch, match="do not match the hash"):
        read_adapter(model, folder)
    (folder / "clinfed_manifest.json").write_text("{not json")
    with pytest.raises(AdapterMismatch, match="unreadable"):
        read_adapter(model, folder)


def _fast_equals_plain(model, init, train_and_score):
    """Train and score from `init` with the bf16 frozen-base fast path and again with plain
    autocast: the adapters and scores must be bit-identical, and training must have moved."""
    import contextlib

    import clinfed.common.training as T
    from peft import set_peft_model_state_dict

    def run():
        set_peft_model_state_dict(model, {k: torch.tensor(v) for k, v in init.items()})
        return train_and_score()

    fast = run()
    real = T.frozen_linears_in
    T.frozen_linears_in = lambda m, d: contextlib.nullcontext()
    try:
        plain = run()
    finally:
        T.frozen_linears_in = real
    assert all(np.array_equal(fast[0][k], plain[0][k]) for k in fast[0])
    assert np.array_equal(fast[1], plain[1])
    assert any(not np.array_equal(fast[0][k], init[k]) for k in init)  # it did train


def _random_notes(tok, n: int, words_per_note: int, max_length: int):
    import clinfed.common.training as T

    rng = np.random.default_rng(0)
    words = "the patient was admitted with and discharged home on day history of lives alone".split()
    enc = T.encode_texts(tok, [" ".join(rng.choice(words, words_per_note)) for _ in range(n)], max_length)
    return enc, rng.integers(0, 2, len(enc))


def test_bf16_frozen_base_is_a_pure_speedup():
    """Holding the frozen Linear weights in bf16 during a bf16-autocast step gives exactly
    what autocast's per-call cast gives, and the fp32 base is intact afterwards."""
    import clinfed.common.training as T

    model, tok = make_lora_model("tiny-bert", 0, LoraSettings())
    enc, y = _random_notes(tok, 64, 40, 48)
    init = {k: v.copy() for k, v in adapter_state(model).items()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    with T.frozen_linears_in(model, torch.bfloat16):  # it does hold them in bf16 meanwhile
        assert {p.dtype for n, p in model.named_parameters() if "dense.weight" in n and not p.requires_grad} \
            == {torch.bfloat16}

    def train_and_score():
        T.train_classifier(model, enc, y, T.TrainSettings(steps=4, batch_size=8, seed=1, precision="bf16"),
                           tok.pad_token_id)
        return adapter_state(model), T.predict_proba(model, enc, tok.pad_token_id, precision="bf16")

    _fast_equals_plain(model, init, train_and_score)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
        if n in base:
            assert torch.equal(p, base[n]), n


def test_bf16_frozen_base_leaves_tied_embeddings_alone():
    """A decoder whose lm_head shares the token embedding (SmolLM2 does): the fast path must
    not cast that shared weight (the residual stream would turn bf16), so the prompt form's
    training and scoring equal plain autocast's exactly."""
    import clinfed.common.training as T
    from clinfed.common.instruct import make_lora_causal_lm

    model, tok = make_lora_causal_lm("tiny-llama", 0, LoraSettings())
    inner = model.get_base_model()
    inner.lm_head.weight = inner.model.embed_tokens.weight  # tie, as SmolLM2's config does
    enc, y = _random_notes(tok, 32, 30, 40)
    answer = (tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0])
    init = {k: v.copy() for k, v in adapter_state(model).items()}

    with T.frozen_linears_in(model, torch.bfloat16):
        assert inner.model.embed_tokens.weight.dtype == torch.float32
        assert any(p.dtype == torch.bfloat16 for p in inner.parameters())  # the rest is held in bf16

    def train_and_score():
        T.train_prompt_classifier(model, enc, y, T.TrainSettings(steps=3, batch_size=8, seed=1, precision="bf16"),
                                  tok.pad_token_id, answer)
        return adapter_state(model), T.predict_yes_proba(model, enc, tok.pad_token_id, answer, precision="bf16")

    _fast_equals_plain(model, init, train_and_score)


def test_an_empty_split_encodes_and_scores_to_nothing():
    """A study with temporal-frac = 0 has an empty temporal split; a fast tokenizer fails on []."""
    from clinfed.common.model_source import tiny_tokenizer
    from clinfed.common.training import encode_texts

    tok = tiny_tokenizer()
    assert encode_texts(tok, [], 96) == []
    assert len(encode_texts(tok, ["a short note"], 96)) == 1
