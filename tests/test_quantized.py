"""Quantized LoRA (QLoRA) on CPU with tiny random models: the base is really held in 4 or 8 bits,
LoRA trains on it (classifier, SFT, DPO), and the adapter is a plain PEFT adapter of the
unquantized base. Speed and memory figures need a GPU; these tests check the path only."""

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from clinfed.common.adapters import adapter_state, save_adapter  # noqa: E402
from clinfed.common.config import ConfigError, resolve  # noqa: E402
from clinfed.common.data import list_sites  # noqa: E402
from clinfed.common.hardware import DeviceError, is_quantized, pick_device  # noqa: E402
from clinfed.common.model_source import ModelError, load_causal_lm  # noqa: E402
from clinfed.common.models import LoraSettings, load_classifier, make_head_only_model, make_lora_model  # noqa: E402
from clinfed.common.tiny_models import write_tiny_model  # noqa: E402
from clinfed.common.training import TrainSettings, encode_texts, predict_proba, train_classifier  # noqa: E402

NOTES = ["patient admitted with chf", "stable discharged home", "copd shortness breath readmitted",
         "lives alone follow-up scheduled"] * 4
LABELS = np.array([1, 0, 1, 0] * 4)


def _bnb_layers(model, bits):
    import bitsandbytes as bnb

    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama in a folder, as a hospital's mirror holds it (hidden 64: NF4 blocks are 64 wide)."""
    return str(write_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama"))


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("m") / "bert", "bert", kind="cls"))


@pytest.mark.parametrize("bits,family", [("4bit", "llama"), ("8bit", "llama"), ("4bit", "bert")])
def test_quantized_classifier_trains_and_its_adapter_loads_on_the_plain_base(bits, family, llama_folder,
                                                                             bert_folder, tmp_path):
    from peft import PeftModel

    folder = llama_folder if family == "llama" else bert_folder
    lora = LoraSettings(rank=4)
    plain, _ = make_lora_model(folder, 0, lora)
    model, tok = make_lora_model(folder, 0, lora, quantization=bits)
    assert is_quantized(model) and _bnb_layers(model, bits), "the base is not held in bitsandbytes layers"
    # the head (and BERT's pooler) stay float layers: trained in full and sent
    assert not any(h in n for n in _bnb_layers(model, bits) for h in ("score", "classifier", "pooler"))
    start = adapter_state(model)
    # the same seed gives the same initial adapter whether or not the base is quantized (up to
    # bf16 rounding: PEFT draws LoRA A in the quantized layer's compute dtype, then casts it to fp32)
    ref = adapter_state(plain)
    assert set(start) == set(ref)
    assert all(np.allclose(start[k], ref[k], rtol=1e-2, atol=2e-3) for k in ref)

    enc = encode_texts(tok, NOTES, 32)
    info = train_classifier(model, enc, LABELS, TrainSettings(steps=3, batch_size=8, lr=5e-2, device="cpu"),
                            pad_id=tok.pad_token_id)
    assert np.isfinite(info["train_loss"])
    trained = adapter_state(model)
    assert any(not np.allclose(trained[k], start[k]) for k in start)
    assert all(v.dtype == np.float32 for v in trained.values())
    # scoring, then training again (a site's rounds alternate): bitsandbytes repacks 4-bit weights
    # for CPU inference; training must still work after it
    p = predict_proba(model, enc, tok.pad_token_id, device="cpu")
    assert np.all(np.isfinite(p))
    assert not any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                   for m in model.modules()), "4-bit weights were repacked into the CPU inference-only format"
    train_classifier(model, enc, LABELS, TrainSettings(steps=1, batch_size=8, lr=5e-2, device="cpu"),
                     pad_id=tok.pad_token_id)
    trained = adapter_state(model)

    save_adapter(model, trained, tmp_path / "ad")
    base, _ = load_classifier(folder, 0)  # unquantized
    assert not is_quantized(base)
    ids = torch.from_numpy(enc[0])[None]
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
        after = loaded(input_ids=ids).logits
    assert not torch.allclose(before, after), "the adapter did not apply to the plain base"
    got = adapter_state(loaded)
    assert set(got) == set(trained) and all(np.allclose(got[k], trained[k]) for k in trained)


def test_quantized_decoder_runs_sft_and_dpo_and_reloads_on_the_plain_base(llama_folder, tmp_path):
    from peft import PeftModel

    from clinfed.common.instruct import (
        InstructSettings,
        answer_probability,
        decoder_adapter_state,
        dpo_train,
        make_lora_causal_lm,
        sft_train,
    )

    model, tok = make_lora_causal_lm(llama_folder, 0, LoraSettings(rank=4), quantization="4bit")
    assert _bnb_layers(model, "4bit")
    sys = {"role": "system", "content": "You are a clinical assistant."}
    exs = [{"prompt": [sys, {"role": "user", "content": f"patient {w} readmitted ?"}],
            "completion": [{"role": "assistant", "content": a}]} for w, a in [("chf", "yes"), ("stable", "no")] * 4]
    start = decoder_adapter_state(model)
    sft = sft_train(model, tok, exs, InstructSettings(steps=2, batch_size=4, lr=1e-2, device="cpu"))
    pairs = [{"prompt": e["prompt"], "chosen": e["completion"],
              "rejected": [{"role": "assistant", "content": "maybe"}]} for e in exs]
    dpo = dpo_train(model, tok, pairs, InstructSettings(steps=2, batch_size=4, lr=1e-2, device="cpu"))
    assert np.isfinite(sft["train_loss"]) and np.isfinite(dpo["train_loss"])
    state = decoder_adapter_state(model)
    assert any(not np.allclose(state[k], start[k]) for k in start)
    save_adapter(model, state, tmp_path / "dec")
    base, _ = load_causal_lm(llama_folder, 0)
    prompts = [e["prompt"] for e in exs[:2]]
    p_base = answer_probability(base, tok, prompts)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "dec"))
    assert not np.allclose(answer_probability(loaded, tok, prompts), p_base)


def test_quantization_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="quantization"):
        resolve({"quantization": "4bit", "dp": True})
    with pytest.raises(ConfigError, match="quantization"):
        resolve({"quantization": "8bit", "arm-method": "full"})
    with pytest.raises(ConfigError, match="quantization"):
        resolve({"quantization": "2bit"})
    with pytest.raises(ModelError, match="LoRA"):
        make_head_only_model("tiny-bert", 0, quantization="4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA device"):
        pick_device("cuda")
    with pytest.raises(DeviceError):  # the training loop picks the device before anything else
        train_classifier(None, [np.array([1, 2])], np.array([1]), TrainSettings(steps=1, device="cuda"), pad_id=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_simulate_with_device_cuda_and_no_gpu_stops_at_start(tmp_path, capsys):
    from clinfed.cli.main import main

    rc = main(["simulate", "--device", "cuda", "--out", str(tmp_path / "run"), "--hospitals", "2"])
    err = capsys.readouterr().err
    assert rc != 0 and "no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_site_hardware_settings_win_over_the_study():
    from clinfed.common.policy import PolicyError, hardware_overrides, site_policy_from_dict

    study = resolve({"quantization": "none", "device": "auto"})
    site = site_policy_from_dict({"quantization": "4bit", "gpu-memory-gb": 24})
    got = hardware_overrides(site, {"device": "cpu", "gpu-memory-gb": "40"})
    assert got == {"quantization": "4bit", "device": "cpu", "gpu-memory-gb": 24.0}  # the file over the node config
    cfg = study.override(got)
    assert (cfg.quantization, cfg.device, cfg.gpu_memory_gb) == ("4bit", "cpu", 24.0)
    with pytest.raises(PolicyError, match="quantization"):
        site_policy_from_dict({"quantization": "3bit"})
    with pytest.raises(PolicyError, match="gpu-memory-gb"):
        hardware_overrides(None, {"gpu-memory-gb": "lots"})
    # a site's quantization cannot be combined with DP-SGD: the site refuses clearly
    with pytest.raises(ConfigError, match="quantization"):
        resolve({"dp": True}).override(got)


def test_a_site_policy_sets_its_own_quantization_and_memory(fresh_federation, tmp_path):
    """The hospital's policy file, read where the site is located, changes the site's run config
    (and so the model it loads), not the study's."""
    from flwr.app import Context, RecordDict

    from clinfed.client.locate import locate_site
    from clinfed.common.data import list_sites
    from clinfed.common.model_cache import model_key

    name, folder = list_sites(fresh_federation)[0]
    policy = folder / "clinfed-policy.toml"
    policy.write_text(policy.read_text() + 'quantization = "4bit"\ngpu-memory-gb = 16\n')
    run_config = {"data-dir": str(fresh_federation), "out-dir": str(tmp_path), "model": "tiny-bert"}
    n = len(list_sites(fresh_federation))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": n},
                  state=RecordDict(), run_config=run_config)
    *_, cfg, _pol = locate_site(ctx, str(tmp_path))
    assert (cfg.quantization, cfg.gpu_memory_gb) == ("4bit", 16.0)
    assert model_key(cfg).quantization == "4bit"
    other = Context(run_id=1, node_id=2, node_config={"partition-id": 1, "num-partitions": n},
                    state=RecordDict(), run_config=run_config)
    assert locate_site(other, str(tmp_path))[4].quantization == "none"  # the study's value elsewhere


def test_a_study_runs_with_one_site_on_a_4bit_base(small_federation, tmp_path, monkeypatch):
    """A whole (in-process) study where one hospital's policy puts its base in 4 bits and states its
    card's memory: the study completes, that site's adapters are aggregated like the others', and
    run.json records what each site chose to fit its card."""
    import json

    from conftest import small_cells_policy

    from clinfed.server.study import Study
    from clinfed.simulations.app import app as client_app
    from clinfed.simulations.inprocess import LocalGrid, simulated_nodes

    import clinfed.common.models as models

    loads, real = [], models.load_classifier

    def spy(*args, **kwargs):
        loads.append(kwargs.get("quantization", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_classifier", spy)
    sites = list_sites(small_federation)
    policy = tmp_path / "policy.toml"
    policy.write_text(small_cells_policy() + 'quantization = "4bit"\ngpu-memory-gb = 8\n')
    nodes = simulated_nodes(len(sites))
    nodes[1]["policy-path"] = str(policy)
    cfg = resolve({"report": False, "model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 2,
                   "local-steps": 2, "personalize-steps": 1, "bootstrap": 10, "min-cell-size": 5, "batch-size": 8,
                   "regimes": "base,global", "subgroups": False, "drivers": False})
    Study(LocalGrid(client_app, nodes, cfg), cfg, tmp_path / "run").execute()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed" and not run["errors"]
    trained = [r for r in run["rounds"] if r["phase"] == "global"]
    assert trained and all(len(r["sites"]) == len(sites) for r in trained)
    for r in trained:
        assert all(c["micro_batch"] == 8 and c["oom_retries"] == 0 for c in r["site_costs"].values())
        # what each site chose is in run.json: the policy's site holds its base in 4 bits, with
        # gradient checkpointing (prepare_model_for_kbit_training), the others neither
        bits = sorted(c["quantization_bits"] for c in r["site_costs"].values())
        assert bits == [0.0] * (len(sites) - 1) + [4.0]
        assert all(c["gradient_checkpointing"] == (c["quantization_bits"] == 4.0) for c in r["site_costs"].values())
    assert "4bit" in loads and "none" in loads  # that site's base was quantized, the others' not
