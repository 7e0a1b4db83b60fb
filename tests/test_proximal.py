"""The proximal pull (FedProx's mu at a site, Ditto's lambda toward the global adapter): the
gradient gains exactly mu * (w - anchor), and a strong pull keeps the trained weights nearer
the anchor than no pull does."""

import numpy as np
import torch

from clinfed.common.models import LoraSettings, make_lora_model
from clinfed.common.training import (TrainSettings, add_proximal_grad, encode_texts, train_classifier,
                                     trainable_snapshot)

NOTES = ["patient admitted with chf", "stable discharged home", "copd shortness breath readmitted",
         "lives alone follow-up scheduled"] * 8
LABELS = np.array([1, 0, 1, 0] * 8)


def _model():
    model, tok = make_lora_model("tiny-bert", 0, LoraSettings(rank=4))
    return model, tok, encode_texts(tok, NOTES, 32)


def _distance(model, anchor):
    return float(sum(((p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor))


def test_the_pull_adds_the_gradient_of_the_proximal_term():
    model, tok, enc = _model()
    anchor = trainable_snapshot(model)
    with torch.no_grad():  # move away from the anchor, so that the pull is not zero
        for n, p in model.named_parameters():
            if n in anchor:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor(np.stack([e[:3] for e in enc[:8]]))
    y = torch.tensor(LABELS[:8])
    mu = 0.7

    def loss():
        return torch.nn.functional.cross_entropy(model(input_ids=ids).logits, y)

    model.eval()
    model.zero_grad()
    (loss() + mu / 2 * sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if n in anchor}
    model.zero_grad()
    loss().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if n in anchor}
    add_proximal_grad(model, anchor, mu)
    for n, p in model.named_parameters():
        if n in anchor:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(plain[n], expected[n]) for n in expected)  # the pull did something


def test_a_strong_pull_keeps_the_weights_near_the_anchor():
    far = {}
    for mu in (0.0, 50.0):
        model, tok, enc = _model()
        anchor = trainable_snapshot(model)
        train_classifier(model, enc, LABELS, TrainSettings(steps=15, batch_size=8, lr=1e-2, precision="fp32",
                                                           proximal_mu=mu), tok.pad_token_id)
        far[mu] = _distance(model, anchor)
    assert far[50.0] < 0.5 * far[0.0], far


def test_base_dropout_off_silences_the_pretrained_dropout_only_while_training():
    """base-dropout = false: every Dropout of the pretrained model has p = 0 in the training
    forwards (LoRA's own dropout keeps its p), and each is restored afterwards."""
    model, tok = make_lora_model("tiny-bert", 0, LoraSettings(rank=4, dropout=0.3))
    enc = encode_texts(tok, NOTES, 32)
    drops = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    base = {n: m.p for n, m in drops.items() if "lora_dropout" not in n}
    lora = {n: m.p for n, m in drops.items() if "lora_dropout" in n}
    assert base and lora and all(p > 0 for p in base.values()), (base, lora)
    seen: dict[str, list[float]] = {n: [] for n in drops}
    for n, m in drops.items():
        m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(mod.p))
    for off in (False, True):
        for v in seen.values():
            v.clear()
        train_classifier(model, enc, LABELS, TrainSettings(steps=2, batch_size=8, lr=1e-3, precision="fp32",
                                                           base_dropout=not off), pad_id=tok.pad_token_id)
        fired = [n for n in base if seen[n]]  # (attention's dropout is read as .p by the sdpa call, not run)
        assert len(fired) >= 3, seen
        assert all(set(seen[n]) == ({0.0} if off else {base[n]}) for n in fired), seen
        assert all(set(seen[n]) == {p} for n, p in lora.items()), seen
        assert {n: drops[n].p for n in base} == base  # restored
