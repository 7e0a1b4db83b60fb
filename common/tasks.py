"""Instruction tasks for the generative pipeline: one chat format, a parser and a metric each.

Every task turns a plain-dict record into TRL's conversational prompt/completion
example (``{"prompt": [system, user], "completion": [assistant]}``), so SFT puts
the loss on the answer only, and the same prompt serves generation at
evaluation time. A system message is always present: SmolLM2's chat template
otherwise inserts its own default persona. Inputs are cut by words
(``max_words``) so an example stays near 256 tokens for small models.

Record schemas (plain dicts):

- ``triage``: ``{"id", "message", "urgency", "personnel"}``; urgency in
  ``routine|soon|urgent``, personnel in ``nurse|physician|pharmacist|scheduler``.
- ``extraction``: ``{"id", "note", "problems", "medications", "tests"}``; the
  last three are lists of strings.
- ``readmission``: ``{"id", "note_text", "readmitted_30d"}``; label 0/1.
- ``pubmedqa``: ``{"id", "question", "context", "decision"}``; decision in
  ``yes|no|maybe``.
- ``meqsum``: ``{"id", "question", "summary"}``.

Parsers return ``None`` for anything they cannot read with confidence; the
metrics count ``None`` as wrong (never as a guessed label) and report the
``unparseable_share``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from clinfed.common.metrics import auc_roc

URGENCY = ("routine", "soon", "urgent")
PERSONNEL = ("nurse", "physician", "pharmacist", "scheduler")
YES_NO = ("yes", "no")
PUBMEDQA_LABELS = ("yes", "no", "maybe")
EXTRACTION_KEYS = ("problems", "medications", "tests")


# ---------------------------------------------------------------- helpers


def truncate_words(text: str, max_words: int | None, tail: int = 0) -> str:
    """Keep at most `max_words` words, the last `tail` of them from the end.

    Whitespace is collapsed; a cut is marked with "…" so the model is not taught
    that a note ends mid-sentence.
    """
    words = str(text or "").split()
    if max_words is None or len(words) <= max_words:
        return " ".join(words)
    tail = max(0, min(tail, max_words))
    head = max_words - tail
    kept = words[:head] + ["…"] + (words[-tail:] if tail else [])
    return " ".join(kept)


def _randint(rng: Any, n: int) -> int:
    """An index in [0, n) from either `random.Random` or a numpy Generator."""
    if hasattr(rng, "integers"):
        return int(rng.integers(n))
    return int(rng.randrange(n))


def _other_label(gold: str, labels: Sequence[str], rng: Any) -> str:
    choices = [label for label in labels if label != gold]
    return choices[_randint(rng, len(choices))]


def _norm(text: str) -> str:
    """Lowercase and collapse whitespace: the matching key for labels and entities."""
    return " ".join(str(text).lower().split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def parse_label(text: str | None, labels: Sequence[str], key: str | None = None) -> str | None:
    """A label from a free-form generation, or None when absent or ambiguous.

    Order of trust: ``key: label`` when a key is given; the first word; else the
    one label word the text contains. Two different labels and no clear first
    word means the model hedged, so it is not read as either.
    """
    if text is None:
        return None
    low = str(text).lower()
    alternatives = "|".join(re.escape(label) for label in labels)
    if key is not None:
        m = re.search(rf"\b{re.escape(key)}\b\W*({alternatives})\b", low)
        if m:
            return m.group(1)
    words = _words(low)
    if not words:
        return None
    if words[0] in labels:
        return words[0]
    found = {w for w in words if w in labels}
    return found.pop() if len(found) == 1 else None


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> float:
    """Mean F1 over the fixed label set; a None prediction is wrong for every label.

    A label absent from both gold and predictions has F1 0/0 and is skipped, so
    a small test set without, say, `maybe` is not penalised for it.
    """
    scores = []
    for label in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, pred) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, pred) if g == label and p != label)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def binary_f1(gold: Sequence[int], pred: Sequence[int | None]) -> float:
    tp = sum(1 for g, p in zip(gold, pred) if g == 1 and p == 1)
    fp = sum(1 for g, p in zip(gold, pred) if g == 0 and p == 1)
    fn = sum(1 for g, p in zip(gold, pred) if g == 1 and p != 1)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a)·len(b)) with one row of memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased alphanumeric word tokens (as rouge-score, without stemming)."""
    pred, ref = _words(prediction), _words(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def entity_prf(gold: Sequence[dict], pred: Sequence[dict | None],
               keys: Sequence[str] = EXTRACTION_KEYS) -> dict[str, float]:
    """Micro precision/recall/F1 over entities, matched exactly per list after normalisation.

    Duplicates within a list count once; an unparseable prediction (None)
    contributes only false negatives.
    """
    out: dict[str, float] = {}
    totals = [0, 0, 0]
    for key in keys:
        tp = fp = fn = 0
        for g, p in zip(gold, pred):
            gs = {_norm(e) for e in (g.get(key) or []) if _norm(e)}
            ps = {_norm(e) for e in ((p or {}).get(key) or []) if _norm(e)}
            tp += len(gs & ps)
            fp += len(ps - gs)
            fn += len(gs - ps)
        out[f"f1_{key}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    tp, fp, fn = totals
    out["precision"] = tp / (tp + fp) if tp + fp else 0.0
    out["recall"] = tp / (tp + fn) if tp + fn else 0.0
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return out


def readmission_metrics(labels: Sequence[Any], answers: Sequence[str | None],
                        p_yes: Sequence[float] | None = None) -> dict[str, float]:
    """Accuracy and F1 (positive = readmitted) of parsed yes/no answers; ROC AUC from p(yes).

    `p_yes` is the caller's probability of the answer token "yes" per item; the
    AUC uses it, not the hard answers, so it ranks even when every answer is "no".
    """
    y = [_as01(v) for v in labels]
    if len(y) != len(answers):
        raise ValueError(f"{len(y)} labels but {len(answers)} answers")
    pred = [None if a is None else int(a == "yes") for a in answers]
    n = len(y)
    out = {
        "n": float(n),
        "unparseable_share": sum(a is None for a in answers) / n if n else float("nan"),
        "accuracy": sum(1 for g, p in zip(y, pred) if g == p) / n if n else float("nan"),
        "f1": binary_f1(y, pred),
    }
    if p_yes is not None:
        p = np.asarray(p_yes, dtype=float)
        if len(p) != n:
            raise ValueError(f"{n} labels but {len(p)} p_yes values")
        out["auc"] = auc_roc(np.asarray(y), p)
    return out


def _as01(value: Any) -> int:
    """A 0/1 label from int, float, bool or their text forms ("1", "0.0")."""
    v = int(float(value))
    if v not in (0, 1):
        raise ValueError(f"expected a 0/1 label, got {value!r}")
    return v


def _first_json_object(text: str) -> dict | None:
    """The first `{...}` that decodes as a JSON object; text around it is ignored."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[m.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    """One instruction task. Subclasses define the prompt fields, answer, parser and metric."""

    name: str
    system: str
    user_template: str
    max_words: int
    labels: tuple[str, ...] = field(default=())

    @property
    def instruction(self) -> dict[str, str]:
        """The prompt template: a system message and a user message with {fields}."""
        return {"system": self.system, "user": self.user_template}

    # -- format
    def fields(self, record: dict, max_words: int) -> dict[str, str]:
        raise NotImplementedError

    def answer(self, record: dict) -> str:
        raise NotImplementedError

    def prompt(self, record: dict, max_words: int | None = None) -> list[dict[str, str]]:
        """Chat messages for generation: the prompt half of `build_example`."""
        user = self.user_template.format(**self.fields(record, max_words or self.max_words))
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def build_example(self, record: dict, max_words: int | None = None) -> dict[str, list]:
        """TRL conversational prompt/completion: the answer lives only in the completion."""
        return {
            "prompt": self.prompt(record, max_words),
            "completion": [{"role": "assistant", "content": self.answer(record)}],
        }

    # -- reading and scoring
    def parse(self, text: str | None) -> Any:
        raise NotImplementedError

    def score(self, records: Sequence[dict], generations: Sequence[str | None], **kw) -> dict[str, float]:
        raise NotImplementedError

    def rejected(self, record: dict, rng: Any) -> str:
        """A plausible wrong answer, for DPO preference pairs."""
        raise NotImplementedError

    def as_seen(self, record: dict, max_words: int | None) -> dict:
        """The record as the model sees it after `max_words` cuts its input.

        Only tasks whose answer quotes the input need more than the record
        itself (extraction drops gold concepts the cut removed).
        """
        return record

    def is_correct(self, record: dict, text: str | None) -> bool:
        """Whether one generation answers the record exactly (DPO takes the model's
        own wrong answers as `rejected`)."""
        return self.parse(text) == self.parse(self.answer(record))

    def _parsed(self, records: Sequence[dict], generations: Sequence[str | None]) -> list:
        if len(records) != len(generations):
            raise ValueError(f"{self.name}: {len(records)} records but {len(generations)} generations")
        return [self.parse(g) for g in generations]


def _base_scores(parsed: list) -> dict[str, float]:
    n = len(parsed)
    return {"n": float(n), "unparseable_share": sum(p is None for p in parsed) / n if n else float("nan")}


class TriageTask(Task):
    """Portal-message triage on two axes; answered as two `key: label` lines."""

    def fields(self, record, max_words):
        return {"message": truncate_words(record["message"], max_words)}

    def answer(self, record):
        return f"urgency: {_norm(record['urgency'])}\npersonnel: {_norm(record['personnel'])}"

    def parse(self, text):
        if text is None:
            return None
        urgency = parse_label(text, URGENCY, key="urgency")
        personnel = parse_label(text, PERSONNEL, key="personnel")
        if urgency is None and personnel is None:
            return None
        # an answer with one readable axis is scored on that axis (the other counts as wrong)
        return {"urgency": urgency, "personnel": personnel}

    def score(self, records, generations, **kw):
        parsed = self._parsed(records, generations)
        out = _base_scores(parsed)
        for axis, labels in (("urgency", URGENCY), ("personnel", PERSONNEL)):
            gold = [_norm(r[axis]) for r in records]
            pred = [None if p is None else p[axis] for p in parsed]
            out[f"{axis}_f1"] = macro_f1(gold, pred, labels)
            out[f"{axis}_accuracy"] = sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else float("nan")
        return out

    def rejected(self, record, rng):
        urgency, personnel = _norm(record["urgency"]), _norm(record["personnel"])
        which = _randint(rng, 3)  # 0: urgency wrong, 1: personnel wrong, 2: both
        if which in (0, 2):
            urgency = _other_label(urgency, URGENCY, rng)
        if which in (1, 2):
            personnel = _other_label(personnel, PERSONNEL, rng)
        return f"urgency: {urgency}\npersonnel: {personnel}"


class ExtractionTask(Task):
    """Concept extraction into a JSON object of three string lists."""

    def fields(self, record, max_words):
        return {"note": truncate_words(record["note"], max_words)}

    def answer(self, record):
        return json.dumps({k: [str(e) for e in (record.get(k) or [])] for k in EXTRACTION_KEYS},
                          ensure_ascii=False)

    def parse(self, text):
        """The first JSON object in the text (fences and trailing text tolerated).

        It must be an object holding the three keys, each a list of strings;
        anything else, including truncated JSON, is unparseable.
        """
        if not text:
            return None
        obj = _first_json_object(str(text))  # skips fences and any prose around the object
        if obj is None:
            return None
        out = {}
        for key in EXTRACTION_KEYS:
            items = obj.get(key)
            if not isinstance(items, list) or not all(isinstance(e, str) for e in items):
                return None
            out[key] = items
        return out

    def score(self, records, generations, **kw):
        parsed = self._parsed(records, generations)
        out = _base_scores(parsed)
        out.update(entity_prf(records, parsed))
        return out

    def as_seen(self, record, max_words):
        """Cut the note and keep only the gold concepts still written in what is left:
        a concept the model cannot see is not one it can copy."""
        note = truncate_words(record["note"], max_words or self.max_words)
        if note == " ".join(str(record["note"]).split()):
            return record
        low = _norm(note)
        kept = {k: [e for e in (record.get(k) or []) if _norm(e) in low] for k in EXTRACTION_KEYS}
        return {**record, "note": note, **kept}

    def is_correct(self, record, text):
        p = self.parse(text)
        if p is None:
            return False
        return all({_norm(e) for e in p[k]} == {_norm(e) for e in (record.get(k) or [])} for k in EXTRACTION_KEYS)

    def rejected(self, record, rng):
        lists = {k: [str(e) for e in (record.get(k) or [])] for k in EXTRACTION_KEYS}
        filled = [k for k in EXTRACTION_KEYS if lists[k]]
        if not filled:  # nothing to drop or swap: claim a finding the note does not hold
            lists["problems"] = ["hypertension"]
        elif _randint(rng, 2) == 0:  # drop an entity
            key = filled[_randint(rng, len(filled))]
            lists[key].pop(_randint(rng, len(lists[key])))
        else:  # move an entity into the wrong list
            key = filled[_randint(rng, len(filled))]
            entity = lists[key].pop(_randint(rng, len(lists[key])))
            others = [k for k in EXTRACTION_KEYS if k != key]
            lists[others[_randint(rng, len(others))]].append(entity)
        return json.dumps(lists, ensure_ascii=False)


class YesNoTask(Task):
    """30-day readmission as a yes/no answer; AUC needs the caller's p(yes)."""

    def fields(self, record, max_words):
        return {"note": truncate_words(record["note_text"], max_words)}

    def answer(self, record):
        return "yes" if _as01(record["readmitted_30d"]) == 1 else "no"

    def parse(self, text):
        return parse_label(text, YES_NO, key="answer")

    def score(self, records, generations, p_yes=None, **kw):
        parsed = self._parsed(records, generations)
        return readmission_metrics([r["readmitted_30d"] for r in records], parsed, p_yes)

    def rejected(self, record, rng):
        return "no" if self.answer(record) == "yes" else "yes"


class PubMedQATask(Task):
    """PubMedQA PQA-L: a yes/no/maybe decision from an abstract's contexts."""

    def fields(self, record, max_words):
        # results sit at the end of an abstract: keep more of the tail
        return {"question": str(record["question"]).strip(),
                "context": truncate_words(record["context"], max_words, tail=(2 * max_words) // 3)}

    def answer(self, record):
        return _norm(record["decision"])

    def parse(self, text):
        return parse_label(text, PUBMEDQA_LABELS, key="answer")

    def score(self, records, generations, **kw):
        parsed = self._parsed(records, generations)
        out = _base_scores(parsed)
        gold = [_norm(r["decision"]) for r in records]
        out["accuracy"] = sum(g == p for g, p in zip(gold, parsed)) / len(gold) if gold else float("nan")
        out["macro_f1"] = macro_f1(gold, parsed, PUBMEDQA_LABELS)
        return out

    def rejected(self, record, rng):
        return _other_label(self.answer(record), PUBMEDQA_LABELS, rng)


# off-topic summaries for DPO: fluent questions about something else
_OFF_TOPIC = (
    "What are the side effects of ibuprofen?",
    "How is type 2 diabetes diagnosed?",
    "Where can I find a support group for caregivers?",
    "What is the treatment for a sprained ankle?",
    "How long does the flu vaccine protect you?",
)


class SummaryTask(Task):
    """MeQSum: a one-sentence question summarising a consumer health question."""

    def fields(self, record, max_words):
        return {"question": truncate_words(record["question"], max_words)}

    def answer(self, record):
        return " ".join(str(record["summary"]).split())

    def parse(self, text):
        """The first non-empty line, minus a `Summary:` label; None if nothing is left."""
        if text is None:
            return None
        for line in str(text).strip().splitlines():
            line = re.sub(r"^\W*(summary|summarized question|question)\s*:\s*", "", line.strip(), flags=re.I)
            line = line.strip().strip('"').strip()
            if _words(line):
                return line
        return None

    def is_correct(self, record, text):
        p = self.parse(text)
        return p is not None and rouge_l(p, record["summary"]) >= 0.8

    def score(self, records, generations, **kw):
        parsed = self._parsed(records, generations)
        out = _base_scores(parsed)
        scores = [0.0 if p is None else rouge_l(p, r["summary"]) for r, p in zip(records, parsed)]
        out["rouge_l"] = float(np.mean(scores)) if scores else float("nan")
        return out

    def rejected(self, record, rng):
        gold = self.answer(record)
        words = gold.split()
        if len(words) >= 4 and _randint(rng, 2) == 0:
            return " ".join(words[: math.ceil(len(words) / 2)])
        choices = [s for s in _OFF_TOPIC if _norm(s) != _norm(gold)]
        return choices[_randint(rng, len(choices))]


_FORMAT = "Reply with the answer only."

TASKS: dict[str, Task] = {
    "triage": TriageTask(
        name="triage",
        system=("You triage patient portal messages for a clinic. Reply with exactly two lines: "
                "'urgency: routine|soon|urgent' and 'personnel: nurse|physician|pharmacist|scheduler'."),
        user_template="Message:\n{message}",
        max_words=100,
        labels=URGENCY + PERSONNEL,
    ),
    "extraction": ExtractionTask(
        name="extraction",
        system=("You extract clinical concepts from notes. Reply with JSON only: "
                '{"problems": [...], "medications": [...], "tests": [...]}, '
                "copying each concept as written in the note."),
        user_template="Note:\n{note}",
        max_words=80,
    ),
    "readmission": YesNoTask(
        name="readmission",
        system=("You assess discharge notes. Will the patient be readmitted within 30 days? "
                "Answer yes or no. " + _FORMAT),
        user_template="Discharge note:\n{note}",
        max_words=100,
        labels=YES_NO,
    ),
    "pubmedqa": PubMedQATask(
        name="pubmedqa",
        system=("You answer biomedical research questions from an abstract. "
                "Answer yes, no or maybe. " + _FORMAT),
        user_template="Question: {question}\nAbstract: {context}",
        max_words=120,
        labels=PUBMEDQA_LABELS,
    ),
    "meqsum": SummaryTask(
        name="meqsum",
        system=("You rewrite consumer health questions as one short question "
                "a medical expert could answer. " + _FORMAT),
        user_template="Question:\n{question}",
        max_words=100,
    ),
}


def get_task(name: str) -> Task:
    """The registered task, with the valid names in the error."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
