"""Generative tasks of the synthetic federation: deterministic, well-formed, site-specific, and labelled by rule."""

from __future__ import annotations

import json
import re
import time

import pytest

from clinfed.common.data import list_sites, read_site_table, validate_path
from clinfed.simulations.generate import generate_federation
from clinfed.simulations.generative import (EXTRACTION_FILE, PERSONNEL, TASK_DIR, TRIAGE_FILE, URGENCY, task_count,
                                    write_generative_tasks)

TRIAGE_KEYS = {"id", "message", "urgency", "personnel"}
EXTRACTION_KEYS = {"id", "note", "problems", "medications", "tests"}
# Negated / family / past frames: what they capture must never be extracted.
NEGATED = [re.compile(p) for p in (
    r"(?:Denies|No history of|Family history of|Negative for) ([^.]+)\.",
    r"Previously on ([^.]+), now stopped\.", r"Not currently taking ([^.]+)\.",
    r"Prior ([^.]+) last year was unremarkable\.", r"Declined ([^.]+)\.",
)]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("genfed")
    truth = generate_federation(out, seed=0, generative=True)
    return out, truth


def rows(out, site, name):
    lines = (out / site / TASK_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def task_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob(f"{TASK_DIR}/*.jsonl"))}


def test_deterministic_and_readmission_files_untouched(fed, tmp_path):
    out, truth = fed
    a = task_bytes(out)
    assert sorted(a) == [f"h{i:02d}/{TASK_DIR}/{f}" for i in range(1, 7) for f in (EXTRACTION_FILE, TRIAGE_FILE)]
    again = tmp_path / "again"
    generate_federation(again, seed=0, generative=True)
    assert task_bytes(again) == a
    assert (again / "truth.json").read_bytes() == (out / "truth.json").read_bytes()
    other = tmp_path / "other"
    generate_federation(other, seed=1, generative=True)
    b = task_bytes(other)
    assert all(a[k] != b[k] for k in a)
    # the readmission files do not depend on whether the tasks are written
    plain = tmp_path / "plain"
    plain_truth = generate_federation(plain, seed=0, generative=False)
    assert not list(plain.rglob("*.jsonl"))
    for i in range(1, 7):
        assert (plain / f"h{i:02d}/encounters.csv").read_bytes() == (out / f"h{i:02d}/encounters.csv").read_bytes()
    assert {k: v for k, v in truth.items() if k != "generative"} == plain_truth
    assert json.loads((out / "truth.json").read_text())["generative"] == truth["generative"]


def test_hospital_folders_still_hold_exactly_one_table(fed):
    out, truth = fed
    assert validate_path(out).ok
    for (name, folder), st in zip(list_sites(out), truth["sites"]):
        assert len(read_site_table(folder, warn=False)) == st["size"]


def test_every_line_has_the_schema(fed):
    out, truth = fed
    for st in truth["generative"]["sites"]:
        name = st["name"]
        tri, ext = rows(out, name, TRIAGE_FILE), rows(out, name, EXTRACTION_FILE)
        assert len(tri) == st["n_triage"] and len(ext) == st["n_extraction"]
        for r in tri:
            assert set(r) == TRIAGE_KEYS and re.fullmatch(rf"{name}-t\d{{5}}", r["id"])
            assert isinstance(r["message"], str) and len(r["message"].split()) >= 4
            assert r["urgency"] in URGENCY and r["personnel"] in PERSONNEL
        for r in ext:
            assert set(r) == EXTRACTION_KEYS and re.fullmatch(rf"{name}-e\d{{5}}", r["id"])
            assert 40 <= len(r["note"].split()) <= 90
            for key in ("problems", "medications", "tests"):
                assert isinstance(r[key], list) and len(r[key]) <= 4 and all(isinstance(x, str) for x in r[key])
                assert len(set(r[key])) == len(r[key])
        for rs in (tri, ext):
            ids = [r["id"] for r in rs]
            assert len(set(ids)) == len(ids) and ids != sorted(ids)  # random order


def test_extraction_is_exact_and_skips_negated_mentions(fed):
    out, truth = fed
    total_neg, reused = 0, 0
    for st in truth["generative"]["sites"]:
        ext = rows(out, st["name"], EXTRACTION_FILE)
        positives = {x for r in ext for k in ("problems", "medications", "tests") for x in r[k]}
        n_neg = 0
        for r in ext:
            listed = [x for k in ("problems", "medications", "tests") for x in r[k]]
            for x in listed:
                assert x in r["note"], (r["id"], x)
            for pat in NEGATED:
                for neg in pat.findall(r["note"]):
                    n_neg += 1
                    assert neg not in listed, (r["id"], neg)
                    assert not any(neg.lower() in x.lower() or x.lower() in neg.lower() for x in listed), (r["id"], neg)
                    reused += neg in positives
        assert n_neg == st["extraction_counts"]["negated_or_historical"]
        assert st["extraction_counts"]["problems"] == sum(len(r["problems"]) for r in ext)
        total_neg += n_neg
    assert total_neg > 100
    assert reused / total_neg > 0.3  # negated terms are real site terms, extracted elsewhere


def test_extraction_uses_site_vocabulary(fed):
    out, truth = fed
    hf_terms = set()
    for st, gst in zip(truth["sites"], truth["generative"]["sites"]):
        ext = rows(out, gst["name"], EXTRACTION_FILE)
        forms = gst["surface_forms"]
        problems = {x for r in ext for x in r["problems"]}
        assert problems <= set(forms["problems"].values())
        meds = {x for r in ext for x in r["medications"]}
        assert all(any(m.startswith(f + " ") for f in forms["medications"].values()) for m in meds)
        assert {x for r in ext for x in r["tests"]} <= set(forms["tests"].values())
        # the readmission notes' term for heart failure is the one the extraction notes use
        hf = st["vocabulary"]["heart_failure"][0]
        assert forms["problems"]["heart_failure"] == hf
        hf_terms.add(hf)
    assert len(hf_terms) >= 2
    styles = {gst["surface_forms"]["tests"]["chest x-ray"] for gst in truth["generative"]["sites"]}
    assert len(styles) >= 2


def test_label_mixes_differ_across_sites(fed):
    out, truth = fed
    sites = truth["generative"]["sites"]
    for st in sites:
        tri = rows(out, st["name"], TRIAGE_FILE)
        assert st["urgency_counts"] == {u: sum(r["urgency"] == u for r in tri) for u in URGENCY}
        assert st["personnel_counts"] == {p: sum(r["personnel"] == p for r in tri) for p in PERSONNEL}
    urgent = [st["urgency_mix"]["urgent"] for st in sites]
    routine = [st["urgency_mix"]["routine"] for st in sites]
    assert max(urgent) - min(urgent) > 0.2 and max(routine) - min(routine) > 0.2
    for p in PERSONNEL:
        shares = [st["personnel_mix"][p] for st in sites]
        assert max(shares) - min(shares) > 0.05, p
    assert {st["side_effect_route"] for st in sites} == {"pharmacist", "nurse"}


def test_counts_scale_with_site_size(fed, tmp_path):
    _, truth = fed
    sites = truth["generative"]["sites"]
    counts = [st["n_triage"] for st in sites]
    assert counts == [task_count(st["size"]) for st in sites] == [120, 84, 53, 40, 40, 40]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    g = write_generative_tasks(tmp_path, [3000, 900, 10], seed=3)
    assert [s["n_triage"] for s in g["sites"]] == [120, 60, 40]
    assert len(rows(tmp_path, "h02", EXTRACTION_FILE)) == 60


def _rule_label(msg: str, forms: dict, route: str) -> tuple[str, str]:
    """The documented rules, applied to the text alone (independent of the generator's code)."""
    red = ("not going away", "spreads to my left arm", "sweating a lot", "right now while just sitting",
           "can't finish a sentence", "even at rest", "lips look blue", "slurred since", "can't find my words",
           "numbness on my", "lips and tongue are swelling", "Hives all over")
    if any(s in msg for s in red):
        return "urgent", "physician"
    if any(s in msg for s in ("clear drainage", "edges look like", "staples at my")):
        return "soon", "nurse"
    if any(s in msg for s in ("Since starting", "normal with", "gives me")):
        return "soon", route
    if any(s in msg for s in ("climb the stairs", "on my walks", "with exertion", "at home for three days",
                              "readings over", "ankles are swollen")):
        return "soon", "nurse"
    if any(s in msg for s in ("completely out of", "Ran out of")):
        return "soon", "pharmacist"
    if any(s in msg for s in ("Could I get a", "Running low on", "needs a new", "days of", "renew my",
                              "Also I need a", "could you send a")):
        return "routine", "pharmacist"
    if any(s in msg for s in ("reschedule my", "move my", "cancel my", "book a follow-up")):
        return "routine", "scheduler"
    return "routine", "physician"


def test_labels_follow_rules_with_recorded_noise_and_distractors(fed):
    out, truth = fed
    g = truth["generative"]
    assert g["noise_rate"] == 0.1 and len(g["triage_rules"]) >= 7
    n, n_noisy, cp_not_urgent, appt_not_sched = 0, 0, 0, 0
    for st in g["sites"]:
        noisy = set(st["noisy_ids"])
        assert len(noisy) == st["n_noisy_labels"]
        words = st["surface_forms"]["triage"]
        for r in rows(out, st["name"], TRIAGE_FILE):
            rule = _rule_label(r["message"], words, st["side_effect_route"])
            assert ((r["urgency"], r["personnel"]) != rule) == (r["id"] in noisy), (r, rule)
            n += 1
            n_noisy += r["id"] in noisy
            cp_not_urgent += words["chest_pain"] in r["message"] and r["urgency"] != "urgent"
            appt_not_sched += words["appt"] in r["message"] and r["personnel"] != "scheduler"
    assert 0.05 < n_noisy / n < 0.16
    assert cp_not_urgent >= 10 and appt_not_sched >= 10  # keywords alone do not decide the label


def test_fast_enough(fed, tmp_path):
    _, truth = fed
    t0 = time.perf_counter()
    write_generative_tasks(tmp_path, truth, seed=0)
    assert time.perf_counter() - t0 < 1.0
    assert task_bytes(tmp_path) == task_bytes(fed[0])
