"""Instruction tasks: formats, parsers on good and malformed generations, metrics, public data."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from clinfed.common.public_data import DATA_DIR, FILES, MAX_FILE_BYTES, convert_from, load_public
from clinfed.common.tasks import (
    TASKS,
    entity_prf,
    get_task,
    lcs_length,
    macro_f1,
    readmission_metrics,
    rouge_l,
    truncate_words,
)

RECORDS = {
    "triage": {"id": "t1", "message": "My chest hurts since this morning and my left arm is numb.",
               "urgency": "urgent", "personnel": "physician"},
    "extraction": {"id": "e1", "note": "Pt with CHF on furosemide; BNP elevated.",
                   "problems": ["CHF"], "medications": ["furosemide"], "tests": ["BNP"]},
    "readmission": {"id": "r1", "note_text": "Discharged home after CHF exacerbation.", "readmitted_30d": 1},
    "pubmedqa": {"id": "p1", "question": "Does aspirin reduce stroke risk?",
                 "context": "We studied aspirin in 1000 patients. Strokes fell by half.", "decision": "yes"},
    "meqsum": {"id": "m1", "question": "hi my mom takes warfarin can she eat spinach? thanks",
               "summary": "Can people taking warfarin eat spinach?"},
}


def gold_answer(name):
    return TASKS[name].build_example(RECORDS[name])["completion"][0]["content"]


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("name", list(TASKS))
def test_example_is_trl_prompt_completion_with_system_message(name):
    task = TASKS[name]
    ex = task.build_example(RECORDS[name])
    assert set(ex) == {"prompt", "completion"}
    assert [m["role"] for m in ex["prompt"]] == ["system", "user"]
    assert ex["prompt"][0]["content"].strip()
    assert [m["role"] for m in ex["completion"]] == ["assistant"]
    answer = ex["completion"][0]["content"]
    assert answer.strip()
    # the answer is taught only in the completion, and it parses back to the gold answer
    assert answer not in ex["prompt"][1]["content"]
    assert task.parse(answer) is not None
    assert task.instruction["system"] == ex["prompt"][0]["content"]
    assert "{" in task.instruction["user"]


def test_long_inputs_are_cut_by_words():
    long = " ".join(f"w{i}" for i in range(1000))
    rec = dict(RECORDS["readmission"], note_text=long)
    user = TASKS["readmission"].build_example(rec, max_words=50)["prompt"][1]["content"]
    assert "w49" in user and "w50" not in user and "…" in user
    assert truncate_words("a b c d e", 3, tail=1) == "a b … e"
    assert truncate_words("a  b\nc", 10) == "a b c"
    # PubMedQA keeps the abstract's end (results)
    rec = dict(RECORDS["pubmedqa"], context=long)
    user = TASKS["pubmedqa"].build_example(rec, max_words=30)["prompt"][1]["content"]
    assert "w999" in user and "w500" not in user


def test_get_task_names_the_choices():
    assert get_task("meqsum") is TASKS["meqsum"]
    with pytest.raises(KeyError, match="triage"):
        get_task("nope")


# ------------------------------------------------------------------ parsers


def test_triage_parser():
    p = TASKS["triage"].parse
    assert p("urgency: urgent\npersonnel: physician") == {"urgency": "urgent", "personnel": "physician"}
    assert p("**Urgency:** Soon.  Personnel - Nurse. Hope this helps!") == {"urgency": "soon", "personnel": "nurse"}
    assert p("Routine, scheduler") == {"urgency": "routine", "personnel": "scheduler"}
    assert p("urgency: urgent") == {"urgency": "urgent", "personnel": None}  # one axis: scored on it alone
    assert p("nothing useful here") is None
    assert p("urgency: critical\npersonnel: nurse") == {"urgency": None, "personnel": "nurse"}  # not a label
    assert p("Either urgent or routine") is None  # hedged, and no personnel
    assert p("") is None and p(None) is None


def test_extraction_parser():
    p = TASKS["extraction"].parse
    gold = {"problems": ["CHF"], "medications": ["furosemide"], "tests": ["BNP"]}
    assert p(json.dumps(gold)) == gold
    assert p("```json\n" + json.dumps(gold) + "\n```") == gold
    assert p("Here you go: " + json.dumps(gold) + " Let me know if you need more.") == gold
    assert p(json.dumps(gold) + "\n{\"extra\": 1}") == gold
    assert p("Format {problems, ...}:\n" + json.dumps(gold) + "\n```") == gold  # braces before, stray fence after
    assert p(json.dumps(gold).replace('"tests"', '"Tests"')) is None  # wrong key
    assert p('```\n{"problems": ["CHF"], "medications": []') is None  # truncated in a fence
    assert p('{"problems": ["CHF"], "medications": ["furosemide"], "tests": [') is None  # truncated
    assert p("{'problems': ['CHF'], 'medications': [], 'tests': []}") is None  # not JSON
    assert p('{"problems": ["CHF"], "medications": []}') is None  # a list missing
    assert p('{"problems": "CHF", "medications": [], "tests": []}') is None  # not a list
    assert p('["CHF"]') is None and p("no concepts") is None and p("") is None


@pytest.mark.parametrize("name", ["readmission", "pubmedqa"])
def test_yes_no_parsers(name):
    p = TASKS[name].parse
    assert p("yes") == "yes"
    assert p("No.") == "no"
    assert p("  YES, the patient is at high risk") == "yes"
    assert p("Answer: no") == "no"
    assert p("I think the answer is yes.") == "yes"
    assert p("Probably not") is None
    assert p("either yes or no") is None  # hedged
    assert p("") is None and p(None) is None


def test_pubmedqa_parser_reads_maybe_and_readmission_does_not():
    assert TASKS["pubmedqa"].parse("Maybe; the evidence is mixed") == "maybe"
    assert TASKS["readmission"].parse("maybe") is None


def test_meqsum_parser():
    p = TASKS["meqsum"].parse
    assert p("Summary: Can people taking warfarin eat spinach?\nExplanation: ...") == \
        "Can people taking warfarin eat spinach?"
    assert p('  "What is warfarin?"  ') == "What is warfarin?"
    assert p("\n\n  ?? \n") is None and p("") is None and p(None) is None


# ------------------------------------------------------------------ metrics


def test_rouge_l_known_pair():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/5, R = 5/6, F = 10/11
    assert lcs_length("a b c d".split(), "b d a".split()) == 2
    assert rouge_l("The cat on the mat.", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("x y", "a b") == 0.0
    s = TASKS["meqsum"].score(
        [{"summary": "the cat sat on the mat"}, {"summary": "a b"}],
        ["The cat on the mat.", ""])
    assert s["rouge_l"] == pytest.approx((10 / 11 + 0) / 2)
    assert s["n"] == 2 and s["unparseable_share"] == 0.5


def test_entity_prf_hand_computed():
    gold = [{"problems": ["CHF", "Diabetes"], "medications": ["furosemide"], "tests": []},
            {"problems": ["copd"], "medications": [], "tests": ["CXR"]}]
    pred = [{"problems": [" chf ", "asthma"], "medications": ["Furosemide"], "tests": ["BNP"]},
            None]
    # tp: chf, furosemide = 2; fp: asthma, BNP = 2; fn: diabetes, copd, CXR = 3
    m = entity_prf(gold, pred)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 3))
    assert m["f1_medications"] == pytest.approx(1.0)
    gens = [json.dumps(p) if p else "sorry, I cannot" for p in pred]
    s = TASKS["extraction"].score(gold, gens)
    assert s["f1"] == pytest.approx(m["f1"]) and s["unparseable_share"] == 0.5 and s["n"] == 2


def test_triage_macro_f1_per_axis():
    recs = [{"urgency": u, "personnel": p} for u, p in
            [("urgent", "physician"), ("routine", "nurse"), ("routine", "scheduler"), ("soon", "nurse")]]
    gens = ["urgency: urgent\npersonnel: physician",
            "urgency: routine\npersonnel: physician",
            "urgency: soon\npersonnel: scheduler",
            "garbage"]
    s = TASKS["triage"].score(recs, gens)
    # urgency: urgent 1.0, routine tp1 fn1 -> 2/3, soon tp0 fp1 fn1 -> 0  => (1 + 2/3 + 0) / 3
    assert s["urgency_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # personnel: physician tp1 fp1 -> 2/3, nurse tp0 fn2 -> 0, scheduler 1.0; pharmacist absent
    assert s["personnel_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert s["unparseable_share"] == 0.25 and s["urgency_accuracy"] == 0.5
    assert macro_f1(["a", "b"], ["a", "b"], ["a", "b", "c"]) == 1.0


def test_readmission_metrics_with_auc_from_p_yes():
    labels = [1, 0, 1, 0, "0.0"]
    answers = ["yes", "no", None, "yes", "no"]
    p_yes = [0.9, 0.2, 0.6, 0.7, 0.1]
    m = readmission_metrics(labels, answers, p_yes)
    # positives 0.9, 0.6 vs negatives 0.2, 0.7, 0.1: pairs won 3 + 2 = 5 of 6
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert m["unparseable_share"] == pytest.approx(1 / 5)
    assert "auc" not in readmission_metrics(labels, answers)
    recs = [{"readmitted_30d": v} for v in labels]
    s = TASKS["readmission"].score(recs, ["Yes", "no", "hmm", "yes", "No."], p_yes=p_yes)
    assert s == pytest.approx(m)
    with pytest.raises(ValueError):
        readmission_metrics([1, 0], ["yes"])


def test_pubmedqa_score():
    recs = [{"decision": d} for d in ["yes", "no", "maybe", "yes"]]
    s = TASKS["pubmedqa"].score(recs, ["yes", "no", "yes", "I cannot tell"])
    assert s["accuracy"] == pytest.approx(0.5)
    # yes tp1 fp1 fn1 -> 0.5, no 1.0, maybe 0  => 0.5
    assert s["macro_f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        TASKS["pubmedqa"].score(recs, ["yes"])


# ------------------------------------------------------------------ DPO rejected answers


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)], ids=["random", "numpy"])
def test_rejected_differs_from_gold(name, rng):
    task = TASKS[name]
    gold = gold_answer(name)
    for _ in range(20):
        bad = task.rejected(RECORDS[name], rng)
        assert isinstance(bad, str) and bad.strip() and bad != gold
        if name != "meqsum":  # a plausible answer: it parses, to something else
            assert task.parse(bad) is not None and task.parse(bad) != task.parse(gold)


def test_rejected_extraction_without_entities_still_differs():
    rec = {"id": "e0", "note": "Unremarkable.", "problems": [], "medications": [], "tests": []}
    task = TASKS["extraction"]
    gold = task.parse(task.build_example(rec)["completion"][0]["content"])
    assert task.parse(task.rejected(rec, random.Random(1))) != gold


# ------------------------------------------------------------------ public data


def test_public_data_counts_and_schema():
    pq = load_public("pubmedqa", None)
    assert len(pq) == 1000 and len(load_public("pubmedqa", "test")) == 500
    assert {r["decision"] for r in pq} == {"yes", "no", "maybe"}
    assert len({r["id"] for r in pq}) == 1000
    assert all(len(r["context"].split()) <= 71 and r["question"] and r["long_answer"] for r in pq)
    mq = load_public("meqsum", None)
    assert len(mq) == 1000 and len(load_public("meqsum", "test")) == 200
    assert [r["split"] for r in mq[-200:]] == ["test"] * 200
    assert all(r["question"] and r["summary"] for r in mq)
    assert len(load_public("meqsum", "train", limit=5)) == 5
    # public records feed the tasks directly
    for name in ("pubmedqa", "meqsum"):
        r = load_public(name, "test", limit=1)[0]
        assert TASKS[name].parse(TASKS[name].build_example(r)["completion"][0]["content"]) is not None


def test_public_data_files_small_and_licensed():
    for rel in FILES.values():
        assert (DATA_DIR / rel).stat().st_size < MAX_FILE_BYTES
    assert "MIT License" in (DATA_DIR / "pubmedqa" / "LICENSE").read_text()
    assert (DATA_DIR / "pubmedqa" / "README.upstream.md").is_file()
    meq = (DATA_DIR / "meqsum" / "LICENSE").read_text()
    assert "CC BY 4.0" in meq and "Ben Abacha" in meq and "ACL 2019" in meq
    assert (DATA_DIR / "meqsum" / "README.upstream.md").is_file()
    assert (DATA_DIR / "README.md").is_file()
    assert not (DATA_DIR / "mts-dialog").exists()


def test_load_public_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data/"):
        load_public("pubmedqa", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="pubmedqa"):
        load_public("triage", "test")
    with pytest.raises(ValueError):
        load_public("meqsum", "validation")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "pubmedqa").is_dir(), reason="upstream files not beside the repo")
def test_conversion_reproduces_shipped_files(tmp_path):
    pytest.importorskip("openpyxl")
    convert_from(SHARED, tmp_path)
    for rel in FILES.values():
        assert (tmp_path / rel).read_bytes() == (DATA_DIR / rel).read_bytes()


def test_extraction_as_seen_drops_concepts_the_cut_removed():
    rec = {"id": "x", "note": "Seen for asthma and gout today. Later in the visit: continues metoprolol 50 mg.",
           "problems": ["asthma", "gout"], "medications": ["metoprolol 50 mg"], "tests": []}
    seen = TASKS["extraction"].as_seen(rec, 6)
    assert seen["problems"] == ["asthma", "gout"] and seen["medications"] == []
    assert seen["note"].endswith("…") and "metoprolol" not in seen["note"]
    assert TASKS["extraction"].as_seen(rec, 100) is rec  # nothing cut: untouched
    assert TASKS["triage"].as_seen({"message": "a " * 500}, 5)["message"] == "a " * 500  # answer does not quote


def test_is_correct_per_task():
    tri = {"urgency": "soon", "personnel": "nurse"}
    assert TASKS["triage"].is_correct(tri, "urgency: soon\npersonnel: nurse")
    assert not TASKS["triage"].is_correct(tri, "urgency: soon")  # one axis missing
    assert not TASKS["triage"].is_correct(tri, None)
    ext = {"problems": ["Asthma"], "medications": [], "tests": ["troponin"]}
    assert TASKS["extraction"].is_correct(ext, '{"problems": ["asthma"], "medications": [], "tests": ["Troponin"]}')
    assert not TASKS["extraction"].is_correct(ext, '{"problems": ["asthma"], "medications": [], "tests": []}')
    assert not TASKS["extraction"].is_correct(ext, '{"problems": ["asthma"]')  # truncated JSON
    assert TASKS["readmission"].is_correct({"readmitted_30d": 0}, "No.")
    assert not TASKS["readmission"].is_correct({"readmitted_30d": 0}, "yes")
    assert TASKS["meqsum"].is_correct({"summary": "What causes gout?"}, "What causes gout?")
    assert not TASKS["meqsum"].is_correct({"summary": "What causes gout?"}, "How is asthma treated?")
