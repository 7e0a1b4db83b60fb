"""Generative tasks for the synthetic federation: portal-message triage and note extraction.

Why: per-hospital fine-tuning of a generative model needs tasks whose answers depend on how a
site writes (its vocabulary and abbreviations) and how it routes work (its label mix and one
site-specific routing rule), with the rules and label noise known, so a regime can be scored
against planted truth. Written next to each hospital's table as

    <out>/<site>/generative/triage.jsonl      {"id", "message", "urgency", "personnel"}
    <out>/<site>/generative/extraction.jsonl  {"id", "note", "problems", "medications", "tests"}

A sub-folder, not the hospital folder itself, because ``.jsonl`` is a hospital table suffix
(common.data.TABLE_SUFFIXES): two extra tables next to ``encounters.csv`` would make every
hospital folder ambiguous.

Determinism: a Generator seeded from ``(seed, site index)`` on its own SeedSequence drives every
draw in a fixed order (no set/dict ordering, no ``hash()``), so the same seed gives identical
bytes and the readmission files written before are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clinfed.simulations.vocabulary import CONCEPTS, NEUTRAL_CONDITIONS, site_name

__all__ = [
    "GENERATIVE_VERSION",
    "TASK_DIR",
    "TRIAGE_FILE",
    "EXTRACTION_FILE",
    "NOISE_RATE",
    "URGENCY",
    "PERSONNEL",
    "task_count",
    "write_generative_tasks",
    "probe_items",
]

GENERATIVE_VERSION = "1.0.0"
TASK_DIR = "generative"
TRIAGE_FILE = "triage.jsonl"
EXTRACTION_FILE = "extraction.jsonl"
NOISE_RATE = 0.10
URGENCY = ("routine", "soon", "urgent")
PERSONNEL = ("nurse", "physician", "pharmacist", "scheduler")
ROWS_PER_ENCOUNTERS, MIN_ROWS, MAX_ROWS = 15, 40, 120
MIN_NOTE_WORDS, MAX_NOTE_WORDS = 40, 90
_SALT = 0x67656E  # separates these draws from generate.py's stream for the same seed
STYLES = ("formal", "abbrev", "local")


def task_count(size: int) -> int:
    """Rows per task at a site: size/15 clipped to 40-120, so bigger sites have more."""
    return int(min(MAX_ROWS, max(MIN_ROWS, int(size / ROWS_PER_ENCOUNTERS + 0.5))))


# --------------------------------------------------------------------------------------------
# Triage: intents, rules, wording
# --------------------------------------------------------------------------------------------

INTENTS = ("chest_pain", "dyspnea", "stroke", "side_effect", "wound", "monitoring", "refill",
           "appointment", "results")
# urgency tilt: +1 intents grow with a site's acuity, -1 shrink
INTENT_BASE = {"chest_pain": (0.07, 1), "dyspnea": (0.11, 1), "stroke": (0.04, 1), "side_effect": (0.12, 0),
               "wound": (0.10, 0), "monitoring": (0.10, 0), "refill": (0.18, -1), "appointment": (0.17, -1),
               "results": (0.11, -1)}
TRIAGE_RULES = [
    "R1 urgent/physician: current chest pain, severe shortness of breath (at rest, cannot finish a "
    "sentence, blue lips), stroke signs, or an allergic reaction with swelling or trouble breathing",
    "R2 soon/nurse: wound or incision concern (redness, drainage, staples)",
    "R3 soon/<site side_effect_route>: a non-severe medication side effect (pharmacist or nurse by site)",
    "R4 soon/nurse: mild shortness of breath on exertion, or home monitoring out of range (BP, blood sugar, "
    "weight gain with swelling)",
    "R5 pharmacist: refill request; soon when already out of a critical medication (insulin, anticoagulant, "
    "anti-seizure), routine otherwise (including running low on a critical one)",
    "R6 routine/scheduler: book, move or cancel an appointment",
    "R7 routine/physician: question about results or a letter/form",
    "several requests in one message: the first matching rule above wins (R1 before R2 ... before R7)",
    "distractors never change the label: negated symptoms ('no chest pain'), past ones ('had chest pain "
    "last year'), a relative's symptoms, mentions of appointments or refills that are not the request",
    f"label noise: with probability {NOISE_RATE} urgency and/or personnel replaced by another value",
]
CRITICAL_MEDS = ("insulin glargine", "apixaban", "warfarin", "levetiracetam")
ROUTINE_MEDS = ("atorvastatin", "lisinopril", "metformin", "omeprazole", "amlodipine", "levothyroxine",
                "sertraline", "metoprolol", "furosemide", "tamsulosin")
SIDE_EFFECTS = ("nausea", "a dry cough", "dizziness when I stand up", "ankle swelling", "muscle aches",
                "an itchy rash on my arms", "trouble sleeping", "a metallic taste")

# site wording (formal, abbrev, local) for the words patients and staff use in messages
TRIAGE_VOCAB = {
    "chest_pain": ("chest pain", "CP", "tightness in my chest"),
    "appt": ("appointment", "appt", "clinic visit"),
    "refill": ("refill", "Rx refill", "repeat prescription"),
    "wound": ("incision", "surgical site", "wound"),
    "bp": ("blood pressure", "BP", "pressure"),
    "sugar": ("blood sugar", "BG", "sugars"),
    "results": ("lab results", "labs", "blood test results"),
    "er": ("emergency room", "ED", "A&E"),
}
DYSPNEA_NOUNS = ("shortness of breath", "SOB", "breathlessness", "DOE", "dyspnea on exertion")
GREETINGS = {"formal": ("Hello.", "Good morning.", "Dear care team:"),
             "abbrev": ("Hi -", "Hi.", "Msg for clinic:"),
             "local": ("Hiya!", "Hello there.", "Morning all!")}
CLOSINGS = ("Thanks.", "Thank you!", "Please call me back.", "Sent from my phone.", "Appreciate it.",
            "Thanks so much for your help.")
RELATIVES = ("wife", "husband", "daughter", "son", "neighbor")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")

CORE = {
    "chest_pain": ("I've had {chest_pain} {since} and it is not going away.",
                   "{Chest_pain} started {ago}, it spreads to my left arm and jaw.",
                   "Woke up with {chest_pain} and I'm sweating a lot.",
                   "Having {chest_pain} right now while just sitting on the couch."),
    "dyspnea_severe": ("My {sob} is really bad today, I can't finish a sentence.",
                       "Severe {sob} even at rest, worse than it has ever been.",
                       "Couldn't lie flat all night, {sob} the whole time and my lips look blue."),
    "dyspnea_mild": ("A little more {sob} than usual when I climb the stairs.",
                     "Mild {sob} on my walks this week, fine when resting.",
                     "Noticing some {sob} with exertion, otherwise okay."),
    "stroke": ("My {rel} says my speech has been slurred since lunch and my face looks droopy.",
               "Sudden weakness in my {side} arm and I can't find my words.",
               "Woke up with numbness on my {side} side and blurry vision."),
    "side_effect_severe": ("My lips and tongue are swelling since I took the new {med}.",
                           "Hives all over and trouble breathing after my first dose of {med}."),
    "side_effect": ("Since starting {med} I've had {se}.",
                    "Is {se} normal with {med}? It started after the dose went up.",
                    "The new {med} gives me {se}, should I keep taking it?"),
    "wound": ("My {wound} is a bit red with some clear drainage.",
              "Can a nurse check my {wound}? The edges look like they are opening a little.",
              "When should the staples at my {wound} come out? It looks a little puffy."),
    "monitoring": ("My {bp} has been around {bphi} at home for three days.",
                   "{Sugar} readings over {bghi} all week even with my metformin.",
                   "Gained {lbs} pounds since Monday and my ankles are swollen, I have {hf}."),
    "refill": ("Could I get a {refill} for my {med}?",
               "Running low on {med}, about a week left, please send a {refill} to my pharmacy.",
               "Pharmacy says my {med} needs a new {refill} authorization."),
    "refill_low_critical": ("Have about 10 days of {crit} left, please send a {refill}.",
                            "Please renew my {crit}, I have a couple of weeks left."),
    "refill_out_critical": ("I'm completely out of my {crit} since yesterday and the pharmacy needs a new {refill}.",
                            "Ran out of {crit} this morning, can you send a {refill} as soon as possible?"),
    "appointment": ("I need to reschedule my {appt} on {day}.",
                    "Can I move my {appt} to an afternoon?",
                    "Please cancel my {appt} next {day}, I'll be out of town.",
                    "I'd like to book a follow-up {appt} in about a month."),
    "results": ("Have my {results} from last week come back?",
                "Could the doctor explain what my {results} mean?",
                "I need a letter for my employer about my {cond}."),
}
SECONDARY = {"appointment": ("Also, can I move my {appt} on {day}?", "Also need to reschedule my {appt}."),
             "refill": ("Also I need a {refill} of my {med}.", "And could you send a {refill} for {med}?")}
DISTRACTORS = {
    "negated_red_flag": ("No {chest_pain} or {sob}.", "No {chest_pain}, nothing like that.",
                         "Not having any {sob} or {chest_pain}."),
    "past_red_flag": ("I had {chest_pain} last year but the stress test was normal.",
                      "Years ago I had a mini stroke but I've been fine since."),
    "relative": ("My {rel} is in the hospital with {chest_pain} so I'm a bit stressed.",
                 "My {rel} had a stroke last spring, so I worry."),
    "context": ("I was seen in the {er} last month for my {cond}.", "My {cond} has been stable.",
                "I know my {appt} is next {day}, but I wanted to ask now."),
    "mention": ("The {refill} from last month went through fine.", "I have an {appt} next {day}."),
}


def _cap(t: str) -> str:
    return t[:1].upper() + t[1:]


class _Pick:
    """Python-speed choices from a buffer of the seeded Generator's uniforms."""

    __slots__ = ("rng", "buf", "i")

    def __init__(self, rng: np.random.Generator):
        self.rng, self.buf, self.i = rng, [], 0

    def u(self) -> float:
        if self.i >= len(self.buf):
            self.buf, self.i = self.rng.random(4096).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def chance(self, p: float) -> bool:
        return self.u() < p

    def one(self, seq):
        return seq[int(self.u() * len(seq))]

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        return lo + int(self.u() * (hi - lo + 1))

    def weighted(self, items, weights):
        x, acc = self.u() * sum(weights), 0.0
        for it, w in zip(items, weights):
            acc += w
            if x < acc:
                return it
        return items[-1]

    def shuffle(self, seq: list) -> list:
        for i in range(len(seq) - 1, 0, -1):
            j = int(self.u() * (i + 1))
            seq[i], seq[j] = seq[j], seq[i]
        return seq


def _style_pick(d: _Pick, style: str, variants: tuple) -> str:
    """The site's style 80 % of the time, else another style: mostly consistent, not uniform."""
    k = STYLES.index(style) if d.chance(0.8) else d.integer(0, 2)
    return variants[k]


def _site_term(site: dict, concept: str, style: str) -> str:
    """The site's own primary term from generate.py, or the style's first term if absent."""
    vocab = site.get("vocabulary") or {}
    if concept in vocab:
        return vocab[concept][0]
    for c in CONCEPTS:
        if c.name == concept:
            return c.pool(style)[0]
    for name, formal, abbrev, local in NEUTRAL_CONDITIONS:
        if name == concept:
            return {"formal": formal, "abbrev": abbrev, "local": local}[style][0]
    raise KeyError(concept)


def _triage_label(facts: dict, route: str) -> tuple[str, str]:
    """The rules in TRIAGE_RULES, first match wins: labels follow content, not keywords."""
    kinds = [facts["intent"]] + facts["secondary"]
    sev = facts["severe"]
    if any(k in ("chest_pain", "stroke") for k in kinds) or (facts["intent"] in ("dyspnea", "side_effect") and sev):
        return "urgent", "physician"
    if "wound" in kinds:
        return "soon", "nurse"
    if "side_effect" in kinds:
        return "soon", route
    if "dyspnea" in kinds or "monitoring" in kinds:
        return "soon", "nurse"
    if "refill" in kinds:
        return ("soon" if facts["out_of_critical"] else "routine"), "pharmacist"
    if "appointment" in kinds:
        return "routine", "scheduler"
    return "routine", "physician"


def _triage_message(d: _Pick, site: dict, words: dict, intent: str, severe_p: float) -> tuple[str, dict]:
    facts = {"intent": intent, "severe": False, "out_of_critical": False, "secondary": []}
    fill = dict(words)
    fill.update(
        since=d.one(("for the last hour", "since this morning", "for about 40 minutes")),
        ago=d.one(("an hour ago", "this morning", "20 minutes ago")),
        rel=d.one(RELATIVES), side=d.one(("left", "right")), day=d.one(DAYS),
        med=d.one(ROUTINE_MEDS), crit=d.one(CRITICAL_MEDS), se=d.one(SIDE_EFFECTS),
        bphi=f"{d.integer(165, 195)}/{d.integer(95, 110)}", bghi=str(d.integer(28, 40) * 10),
        lbs=str(d.integer(3, 6)), cond=d.one(words["conds"]), hf=words["hf"],
    )
    fill.update({k[:1].upper() + k[1:]: _cap(v) for k, v in list(fill.items()) if isinstance(v, str)})
    key = intent
    if intent in ("dyspnea", "side_effect"):
        facts["severe"] = d.chance(severe_p)
        key = intent + ("_severe" if facts["severe"] else ("_mild" if intent == "dyspnea" else ""))
    elif intent == "refill" and d.chance(0.35):
        facts["out_of_critical"] = d.chance(0.55)
        key = "refill_out_critical" if facts["out_of_critical"] else "refill_low_critical"
    body = [d.one(CORE[key]).format(**fill)]
    red = facts["severe"] or intent in ("chest_pain", "stroke")
    # distractors: never change the label, but share words with other rules
    kinds = [k for k in DISTRACTORS if not ((red or intent == "dyspnea") and k in ("negated_red_flag", "past_red_flag"))]
    n_dis = d.weighted((0, 1, 2), (0.25, 0.5, 0.25))
    for _ in range(n_dis):
        s = d.one(DISTRACTORS[d.one(kinds)]).format(**fill)
        if s not in body:
            body.insert(d.integer(0, len(body)), s)
    if intent not in ("appointment", "results") and d.chance(0.15):
        extra = d.one(("appointment", "refill"))
        if extra != intent:
            body.append(d.one(SECONDARY[extra]).format(**fill))
            facts["secondary"].append(extra)
    if red and d.chance(0.4):
        body.append(d.one(("Should I go to the {er}?", "What should I do?", "Is this serious?")).format(**fill))
    parts = ([d.one(words["greetings"])] if d.chance(0.7) else []) + body
    if d.chance(0.6):
        parts.append(d.one(CLOSINGS))
    return " ".join(parts), facts


# --------------------------------------------------------------------------------------------
# Extraction: pools, negated/historical frames
# --------------------------------------------------------------------------------------------

SITE_PROBLEM_CONCEPTS = ("heart_failure", "copd", "ckd", "diabetes", "dyspnea", "hypertension",
                         "hyperlipidemia", "atrial_fibrillation", "coronary_disease", "depression",
                         "obesity", "hypothyroidism", "osteoarthritis", "anemia", "gerd")
EXTRA_PROBLEMS = (("pneumonia", "PNA", "chest infection"), ("urinary tract infection", "UTI", "water infection"),
                  ("acute kidney injury", "AKI", "kidney injury"), ("cellulitis", "cellulitis", "skin infection"),
                  ("chest pain", "CP", "chest tightness"), ("dizziness", "dizziness", "lightheadedness"),
                  ("gout", "gout", "gouty arthritis"), ("stroke", "CVA", "stroke"),
                  ("deep vein thrombosis", "DVT", "clot in leg"), ("asthma", "asthma", "wheezy chest"),
                  ("obstructive sleep apnea", "OSA", "sleep apnoea"))
# (formal name, abbreviation, brand) and doses; surface string = "<name> <dose>"
MED_POOL = (("metoprolol", "metoprolol", "Toprol", ("25 mg", "50 mg")),
            ("lisinopril", "lisinopril", "Zestril", ("10 mg", "20 mg")),
            ("furosemide", "furosemide", "Lasix", ("20 mg", "40 mg")),
            ("apixaban", "apixaban", "Eliquis", ("5 mg",)),
            ("warfarin", "warfarin", "Coumadin", ("3 mg", "5 mg")),
            ("aspirin", "ASA", "aspirin", ("81 mg",)),
            ("atorvastatin", "atorvastatin", "Lipitor", ("40 mg", "80 mg")),
            ("metformin", "metformin", "Glucophage", ("500 mg", "1000 mg")),
            ("insulin glargine", "glargine", "Lantus", ("20 units", "30 units")),
            ("hydrochlorothiazide", "HCTZ", "hydrochlorothiazide", ("25 mg",)),
            ("potassium chloride", "KCl", "K-Dur", ("20 mEq",)),
            ("albuterol", "albuterol", "ProAir", ("90 mcg",)),
            ("tiotropium", "tiotropium", "Spiriva", ("18 mcg",)),
            ("prednisone", "prednisone", "prednisone", ("10 mg", "40 mg")),
            ("levothyroxine", "levothyroxine", "Synthroid", ("50 mcg", "75 mcg")),
            ("sertraline", "sertraline", "Zoloft", ("50 mg",)),
            ("amlodipine", "amlodipine", "Norvasc", ("5 mg", "10 mg")),
            ("spironolactone", "spironolactone", "Aldactone", ("25 mg",)),
            ("omeprazole", "omeprazole", "Prilosec", ("20 mg",)),
            ("gabapentin", "gabapentin", "Neurontin", ("300 mg",)))
TEST_POOL = (("chest x-ray", "CXR", "chest film"), ("BNP", "BNP", "pro-BNP"), ("hemoglobin A1c", "A1c", "HbA1c"),
             ("echocardiogram", "echo", "TTE"), ("complete blood count", "CBC", "full blood count"),
             ("basic metabolic panel", "BMP", "U&E"), ("electrocardiogram", "ECG", "EKG"),
             ("troponin", "trop", "cardiac enzymes"), ("urinalysis", "UA", "urine dip"),
             ("lipid panel", "lipids", "cholesterol check"), ("TSH", "TSH", "thyroid function tests"),
             ("blood cultures", "BCx", "blood cultures"), ("INR", "INR", "clotting screen"),
             ("CT head", "CTH", "head scan"), ("spirometry", "PFTs", "breathing test"),
             ("renal ultrasound", "renal US", "kidney scan"))
# Mentions that must NOT be extracted: each frame holds exactly one pool term and ends the sentence.
NEGATED_FRAMES = {
    "problems": ("Denies {x}.", "No history of {x}.", "Family history of {x}.", "Negative for {x}."),
    "medications": ("Previously on {x}, now stopped.", "Not currently taking {x}."),
    "tests": ("Prior {x} last year was unremarkable.", "Declined {x}."),
}
EXTRACTION_RULES = [
    "problems, medications, tests: the exact surface strings of current mentions, in order of first "
    "appearance; 0-4 per list; medications include the dose as written",
    "not extracted: negated, family-history or past mentions, i.e. the frames " + "; ".join(
        f"{k}: " + " | ".join(v) for k, v in NEGATED_FRAMES.items()),
    "each site writes every concept one way (its surface_forms) and draws items from its own skewed pool",
]
OPENINGS = {"formal": ("{age}-year-old {sexword} seen for follow-up of {plist}.",
                       "{age}-year-old {sexword} with {plist}, seen in clinic today."),
            "abbrev": ("{age} y/o {sexabbr} f/u {plist}.", "{age}{sexabbr} w/ {plist}, here for f/u."),
            "local": ("{age} yr old {sexword} reviewed in clinic re {plist}.",
                      "Saw this {age} yr old {sexword} today about {plist}.")}
OPENINGS_EMPTY = {"formal": "{age}-year-old {sexword} seen for a routine visit.",
                  "abbrev": "{age} y/o {sexabbr} here for routine visit.",
                  "local": "{age} yr old {sexword} in for a general check."}
MED_FRAMES = ("Meds: {xlist}.", "Continues {xlist}.", "Current medications include {xlist}.", "Started {xlist}.")
TEST_FRAMES = ("Ordered {xlist}.", "Plan: {xlist}.", "Will check {xlist}.", "Sent off {xlist} today.")
HEADERS = {"formal": ("Clinic Note.", "Outpatient Progress Note."), "abbrev": ("Clinic note:", "PN:"),
           "local": ("Visit summary -", "Surgery note.")}
FILLER = ("Feels well overall.", "Appetite is good.", "Sleeping better this month.",
          "Counseled on diet and exercise.", "Vital signs stable.", "Tolerating current regimen.",
          "Follow up in three months.", "All questions answered.", "Lives with spouse.", "Walks most days.",
          "Weight unchanged since last visit.", "No falls reported.", "Mood reported as good.",
          "Goals of care discussed briefly.", "Patient agrees with plan.", "Daughter present for visit.",
          "Will review at next visit.", "Education provided.", "Home exercises encouraged.",
          "Vaccinations up to date.")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _overlaps(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


def _weighted_sample(d: _Pick, items: list, weights: list, k: int, avoid: list[str]) -> list:
    """k distinct items by weight, skipping any that overlap (substring) an already used string."""
    out, pool = [], [(it, w) for it, w in zip(items, weights)]
    while len(out) < k and pool:
        it = d.weighted([p[0] for p in pool], [p[1] for p in pool])
        pool = [p for p in pool if p[0] != it]
        if not any(_overlaps(it, a) for a in avoid + out):
            out.append(it)
    return out


def _note(d: _Pick, site: dict, idx: int) -> dict:
    style, forms, pw = site["style"], site["forms"], site["pool_weights"]
    counts = {k: d.weighted((0, 1, 2, 3, 4), (0.10, 0.28, 0.30, 0.20, 0.12)) for k in ("problems", "medications", "tests")}
    chosen: dict[str, list[str]] = {}
    used: list[str] = []
    for key in ("problems", "medications", "tests"):
        names = list(forms[key])
        picks = _weighted_sample(d, names, [pw[key][n] for n in names], counts[key], used)
        surf = []
        for n in picks:
            s = forms[key][n]
            if key == "medications":
                s = f"{s} {d.one(site['doses'][n])}"
            surf.append(s)
        chosen[key] = surf
        used += surf
    # 1-3 negated/historical mentions from the same site forms, never overlapping a current one
    negs = []
    for _ in range(d.weighted((1, 2, 3), (0.45, 0.4, 0.15))):
        key = d.weighted(("problems", "medications", "tests"), (0.55, 0.25, 0.2))
        names = list(forms[key])
        cand = [n for n in names if not any(_overlaps(forms[key][n], u) for u in used)]
        if not cand:
            continue
        n = d.one(cand)
        x = forms[key][n] + (f" {d.one(site['doses'][n])}" if key == "medications" else "")
        used.append(x)
        negs.append(d.one(NEGATED_FRAMES[key]).format(x=x))
    age, sex = d.integer(24, 92), d.one(("F", "M"))
    fill = dict(age=age, sexword={"F": "woman", "M": "man"}[sex], sexabbr=sex)
    if chosen["problems"]:
        opening = d.one(OPENINGS[style]).format(plist=_join(chosen["problems"]), **fill)
    else:
        opening = OPENINGS_EMPTY[style].format(**fill)
    middle = list(negs)
    if chosen["medications"]:
        middle.append(d.one(MED_FRAMES).format(xlist=_join(chosen["medications"])))
    if chosen["tests"]:
        middle.append(d.one(TEST_FRAMES).format(xlist=_join(chosen["tests"])))
    d.shuffle(middle)
    head = d.one(HEADERS[style])
    target = d.integer(MIN_NOTE_WORDS + 5, MAX_NOTE_WORDS - 5)
    fillers = d.shuffle(list(FILLER))
    sentences = [head, opening] + middle
    n_words = sum(len(s.split()) for s in sentences)
    extra = []
    for f in fillers:
        if n_words >= target or n_words + len(f.split()) > MAX_NOTE_WORDS:
            break
        extra.append(f)
        n_words += len(f.split())
    for f in extra:  # fillers anywhere after the opening
        sentences.insert(d.integer(2, len(sentences)), f)
    note = " ".join(sentences)
    return {"id": f"{site['name']}-e{idx:05d}", "note": note, "problems": chosen["problems"],
            "medications": chosen["medications"], "tests": chosen["tests"], "_n_negated": len(negs)}


# --------------------------------------------------------------------------------------------
# Sites and entry point
# --------------------------------------------------------------------------------------------


def _normalize_sites(truth_or_sites) -> list[dict]:
    """Accept generate.py's truth, its ``sites`` list, or plain sizes."""
    sites = truth_or_sites["sites"] if isinstance(truth_or_sites, dict) else list(truth_or_sites)
    out = []
    for i, s in enumerate(sites):
        if not isinstance(s, dict):
            s = {"size": int(s)}
        style = s.get("vocab_style", "formal")
        if style not in STYLES:
            style = "formal"
        out.append(dict(name=s.get("name", site_name(i)), size=int(s["size"]), style=style,
                        vocabulary=s.get("vocabulary") or {}))
    return out


def _site_profile(rng: np.random.Generator, d: _Pick, s: dict, acuity: float, route: str) -> dict:
    """One site's planted wording, label mix and extraction pools."""
    style = s["style"]
    words = {k: _style_pick(d, style, v) for k, v in TRIAGE_VOCAB.items()}
    dys = _site_term(s, "dyspnea", style)
    words["sob"] = dys if dys in DYSPNEA_NOUNS else "breathlessness"
    words["hf"] = _site_term(s, "heart_failure", style)
    words["conds"] = tuple(_site_term(s, c, style) for c in ("heart_failure", "copd", "diabetes", "ckd", "hypertension"))
    g = GREETINGS[style]
    words["greetings"] = (g[d.integer(0, 2)], g[d.integer(0, 2)])
    jitter = rng.gamma(8.0, 1.0 / 8.0, len(INTENTS))
    w = np.array([INTENT_BASE[k][0] * np.exp(2.4 * (acuity - 0.5) * INTENT_BASE[k][1]) for k in INTENTS]) * jitter
    intent_w = dict(zip(INTENTS, (float(v) for v in w / w.sum())))

    forms = {"problems": {}, "medications": {}, "tests": {}}
    for c in SITE_PROBLEM_CONCEPTS:
        forms["problems"][c] = _site_term(s, c, style)
    for v in EXTRA_PROBLEMS:
        forms["problems"][v[0]] = _style_pick(d, style, v)
    doses = {}
    for formal, abbrev, brand, ds in MED_POOL:
        forms["medications"][formal] = _style_pick(d, style, (formal, abbrev, brand))
        doses[formal] = ds
    for v in TEST_POOL:
        forms["tests"][v[0]] = _style_pick(d, style, v)
    pool_weights = {k: dict(zip(forms[k], (float(x) for x in rng.gamma(0.8, 1.0, len(forms[k])) + 0.02)))
                    for k in forms}
    for k in pool_weights:
        tot = sum(pool_weights[k].values())
        pool_weights[k] = {n: v / tot for n, v in pool_weights[k].items()}
    return dict(s, words=words, intent_weights=intent_w, acuity=acuity, severe_p=0.2 + 0.5 * acuity,
                route=route, forms=forms, doses=doses, pool_weights=pool_weights)


def _flip(d: _Pick, value: str, options: tuple) -> str:
    return d.one([o for o in options if o != value])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_generative_tasks(out_dir, truth_or_sites, seed: int = 0) -> dict:
    """Write ``<out>/<site>/generative/{triage,extraction}.jsonl`` per site; return their truth.

    ``truth_or_sites`` is generate.py's truth (so the tasks reuse each site's vocabulary), its
    ``sites`` list, or a list of sizes. The returned dict is what generate.py stores under
    ``truth["generative"]``: per site the label mix, counts, noisy ids and surface forms, plus
    the rules and the noise rate.
    """
    sites = _normalize_sites(truth_or_sites)
    n = len(sites)
    out = Path(out_dir)
    meta = np.random.default_rng(np.random.SeedSequence([int(seed), _SALT]))
    # acuity spread evenly over sites (permuted) so label mixes differ by design, not by chance
    acuity = meta.permutation(np.linspace(0.1, 0.9, n)) if n > 1 else np.array([0.5])
    route_perm = meta.permutation(n)
    site_truth = []
    for i, s in enumerate(sites):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SALT, i]))
        d = _Pick(rng)
        route = ("pharmacist", "nurse")[int(route_perm[i]) % 2]
        prof = _site_profile(rng, d, s, float(acuity[i]), route)
        k = task_count(s["size"])

        triage, noisy = [], []
        for j in range(1, k + 1):
            intent = d.weighted(INTENTS, [prof["intent_weights"][x] for x in INTENTS])
            msg, facts = _triage_message(d, prof, prof["words"], intent, prof["severe_p"])
            urg, per = _triage_label(facts, route)
            rid = f"{s['name']}-t{j:05d}"
            if d.chance(NOISE_RATE):
                what = d.weighted(("urgency", "personnel", "both"), (0.5, 0.35, 0.15))
                if what in ("urgency", "both"):
                    urg = _flip(d, urg, URGENCY)
                if what in ("personnel", "both"):
                    per = _flip(d, per, PERSONNEL)
                noisy.append(rid)
            triage.append({"id": rid, "message": msg, "urgency": urg, "personnel": per, "_intent": intent})

        extraction = [_note(d, prof, j) for j in range(1, k + 1)]
        order_t, order_e = rng.permutation(k), rng.permutation(k)
        folder = out / s["name"] / TASK_DIR
        folder.mkdir(parents=True, exist_ok=True)
        _write_jsonl(folder / TRIAGE_FILE, [{c: triage[o][c] for c in ("id", "message", "urgency", "personnel")}
                                            for o in order_t])
        _write_jsonl(folder / EXTRACTION_FILE, [{c: extraction[o][c] for c in ("id", "note", "problems",
                                                                                 "medications", "tests")}
                                                for o in order_e])

        urg_counts = {u: sum(r["urgency"] == u for r in triage) for u in URGENCY}
        per_counts = {p: sum(r["personnel"] == p for r in triage) for p in PERSONNEL}
        site_truth.append(dict(
            name=s["name"], size=s["size"], n_triage=k, n_extraction=k, vocab_style=s["style"],
            acuity=prof["acuity"], side_effect_route=route, severe_probability=prof["severe_p"],
            intent_weights=prof["intent_weights"],
            intent_counts={x: sum(r["_intent"] == x for r in triage) for x in INTENTS},
            urgency_counts=urg_counts, personnel_counts=per_counts,
            urgency_mix={u: c / k for u, c in urg_counts.items()},
            personnel_mix={p: c / k for p, c in per_counts.items()},
            n_noisy_labels=len(noisy), noisy_ids=sorted(noisy),
            extraction_counts={key: sum(len(r[key]) for r in extraction) for key in ("problems", "medications", "tests")}
            | {"negated_or_historical": sum(r["_n_negated"] for r in extraction)},
            mean_note_words=float(np.mean([len(r["note"].split()) for r in extraction])),
            surface_forms={"triage": {key: v for key, v in prof["words"].items() if isinstance(v, str)},
                           **prof["forms"]},
            pool_weights=prof["pool_weights"],
        ))
    return {
        "generator": "simulations.generative",
        "version": GENERATIVE_VERSION,
        "seed": int(seed),
        "files": {st["name"]: {"triage": f"{st['name']}/{TASK_DIR}/{TRIAGE_FILE}",
                               "extraction": f"{st['name']}/{TASK_DIR}/{EXTRACTION_FILE}"} for st in site_truth},
        "count_rule": f"clip(round(size / {ROWS_PER_ENCOUNTERS}), {MIN_ROWS}, {MAX_ROWS}) rows per task and site",
        "noise_rate": NOISE_RATE,
        "triage_rules": TRIAGE_RULES,
        "critical_medications": list(CRITICAL_MEDS),
        "acuity_model": ("intent weight = base * exp(2.4*(acuity-0.5)*tilt) * Gamma(8,1/8) jitter, tilt +1 for "
                         "red-flag intents, -1 for routine ones; P(severe dyspnea/side effect) = 0.2 + 0.5*acuity"),
        "extraction_rules": EXTRACTION_RULES,
        "note_words": [MIN_NOTE_WORDS, MAX_NOTE_WORDS],
        "sites": site_truth,
    }


PROBE_SALT = 0x70726F  # the probe site's stream: no hospital of any federation shares it


def probe_items(seed: int, n: int) -> dict[str, list[dict]]:
    """`n` triage and extraction items of a made-up hospital, written by this generator.

    The server shows example generations on these only: a real site's outputs never
    leave it, so the report's examples must come from text nobody's patients wrote.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_generative_tasks(tmp, [600], seed=int(seed) + PROBE_SALT)
        folder = Path(tmp) / site_name(0) / TASK_DIR
        out = {}
        for task, fname in (("triage", TRIAGE_FILE), ("extraction", EXTRACTION_FILE)):
            rows = [json.loads(line) for line in (folder / fname).read_text(encoding="utf-8").splitlines()]
            out[task] = [{**r, "id": f"probe-{task[0]}{i:03d}"} for i, r in enumerate(rows[:n])]
    return out
