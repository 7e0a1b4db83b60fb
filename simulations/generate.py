"""Synthetic multi-hospital federation with planted, recorded differences (STUDY.md section 3).

Real discharge notes cannot be shipped, so clinfed is checked against hospitals whose
differences are known: sizes, patient mix, vocabulary, templates, note length, base rates,
site-specific shifts of the label model, harder-to-predict patients and a temporal drift.
Each hospital is written in the same contract a real one provides
(``<out>/<site>/encounters.csv``) and everything planted goes to ``<out>/truth.json``, so an
analysis can be scored against the truth instead of against intuition.

Label model (per encounter)::

    eta   = intercept[site] + drift_intercept * after_cutoff
            + sum_c x_c * (weight[c] + shift[site, c] + drift_weight[c] * after_cutoff)
            + age_effect * (age - 65) / 10 + comorbidity_effect * (n_comorbidities - 2)
            + insurance_effect[insurance]
    y     ~ Bernoulli(sigmoid(eta + eps)),  eps ~ Normal(0, sd(age, n_comorbidities, insurance))

``eps`` is latent (not in the note), so the best any model can do is the Bayes probability
``p* = E_eps[sigmoid(eta + eps)]``; a larger ``sd`` flattens ``p*`` and makes those patients
harder to rank. "Bayes AUC" in the truth file is the AUC of ``p*``.

Determinism: one ``numpy.random.Generator`` seeded from ``seed`` drives every draw in a fixed
order; no dict/set ordering or ``hash()`` is involved, so the same seed gives identical bytes.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from clinfed.simulations.vocabulary import CONCEPTS, NEUTRAL_CONDITIONS, Concept, site_name  # noqa: F401

__all__ = [
    "GENERATOR_VERSION",
    "DEFAULT_N_HOSPITALS",
    "DEFAULT_LARGEST",
    "DEFAULT_SMALLEST",
    "default_sizes",
    "generate_federation",
    "site_name",
    "SCENARIOS",
]

GENERATOR_VERSION = "1.0.0"
DEFAULT_N_HOSPITALS = 6
DEFAULT_LARGEST = 2000
DEFAULT_SMALLEST = 200
REGIONS = ("north", "south", "east", "west", "central")
INSURANCE = ("commercial", "government", "self_pay", "unspecified", "other")
CSV_COLUMNS = (
    "encounter_id", "note_text", "readmitted_30d", "discharge_date", "age", "sex",
    "insurance", "n_comorbidities", "region", "died",
)

CONCEPT_INDEX = {c.name: i for i, c in enumerate(CONCEPTS)}
COMORBIDITY_CONCEPTS = ("heart_failure", "copd", "ckd", "diabetes")

# Relative chance each condition is among a patient's n_comorbidities (concepts first).
CONDITION_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.6, 2.2, 1.6, 0.8, 1.0, 0.8, 0.8, 0.5, 0.6, 0.6, 0.6])

# Presence model for non-condition concepts: logit = base + effects (see _concept_presence).
PREVALENCE_BASE = {
    "dyspnea": -1.6, "prior_admissions": -1.7, "med_nonadherence": -1.9, "polypharmacy": -2.0,
    "functional_decline": -2.1, "stable_room_air": -0.6, "independent_ambulation": -0.3,
    "lives_alone": -1.4, "substance_use": -2.3, "family_support": -0.5,
    "against_medical_advice": -3.2, "followup_scheduled": -0.2, "home_health": -1.6,
}

AGE_CENTER = 65.0
AGE_EFFECT_PER_DECADE = 0.20
COMORBIDITY_CENTER = 2.0
COMORBIDITY_EFFECT = 0.12
INSURANCE_EFFECT = {"commercial": 0.0, "government": 0.30, "self_pay": 0.15, "unspecified": 0.40, "other": 0.0}
# Latent noise SD: the planted error drivers, strongest first (n_comorbidities, age, insurance).
NOISE_MODEL = {
    "base_sd": 0.30,
    "per_comorbidity_above_2": 0.25,
    "comorbidities_5plus": 2.00,
    "per_decade_above_60": 0.15,
    "age_80plus": 1.60,
    "insurance_government_or_unspecified": 1.20,
}
PLANTED_ERROR_DRIVERS = ["n_comorbidities", "age", "insurance"]

# Known-answer scenarios (generate_federation(scenario=...)). `default` plants every site
# difference above; the other two remove them so that the answer is known exactly:
# `exchangeable`: every hospital is drawn from one population (one patient mix, vocabulary,
# template, note length, base rate and label model, no site-specific weight shifts and no
# site-specific template drift), only the sizes differ: no regime has a reason to beat
# `global` anywhere. `concept-shift`: the same single population, except that at the shifted
# hospitals the cues below mean the opposite (their weight is negated), written in the same
# words: only there does a site's own model have something to learn that `global` cannot.
SCENARIOS = ("default", "exchangeable", "concept-shift")
CONCEPT_SHIFT_CUES = tuple(c.name for c in CONCEPTS if abs(c.weight) >= 0.5)
# weight of a cue at a shifted site = -CONCEPT_SHIFT_FACTOR * its weight elsewhere (reversed, and
# 1.5 times as strong: a plain reversal costs a global model about 0.1 Bayes AUC there, too little
# for a local adapter trained on a few hundred notes to beat it on a 100-patient test split)
CONCEPT_SHIFT_FACTOR = 1.5
# default shifted sites: the smallest ones holding at most this share of all encounters (at
# least one), so that the pooled meaning of a cue stays the majority's (shifted share x factor
# below the unshifted share) and only the shifted sites have something a global model misses
CONCEPT_SHIFT_MAX_SHARE = 0.25

DRIFT_FRACTION = 0.80  # cutoff at 80 % of the period, so drift lands in the temporal test split
DRIFT_INTERCEPT = 0.25
DRIFT_WEIGHT_CHANGES = {"followup_scheduled": 0.45, "polypharmacy": 0.35, "lives_alone": 0.30}

# --------------------------------------------------------------------------------------------
# Note templates: section headers, their order and the opening line (demographics + reason).
# --------------------------------------------------------------------------------------------

TEMPLATES: dict[str, dict] = {
    "academic": dict(
        title="DISCHARGE SUMMARY", hpi="History of Present Illness:", pmh="Past Medical History:",
        course="Brief Hospital Course:", social="Social History:", dispo="Discharge Disposition:",
        order=("hpi", "pmh", "course", "social", "dispo"), demo="{age}-year-old {sexword} admitted with {reason}.",
        filler={"vitals": "Vital Signs:", "labs": "Pertinent Results:", "meds": "Discharge Medications:",
                "instr": "Discharge Instructions:", "exam": "Physical Exam at Discharge:", "code": "Code Status:"}),
    "terse": dict(
        title="D/C SUMMARY", hpi="HPI:", pmh="PMH:", course="Hosp course:", social="SH:", dispo="Dispo:",
        order=("hpi", "pmh", "course", "social", "dispo"), demo="{age} y/o {sexabbr} admitted with {reason}.",
        filler={"vitals": "VS:", "labs": "Labs:", "meds": "D/C meds:", "instr": "Instructions:",
                "exam": "PE:", "code": "Code:"}),
    "community": dict(
        title="Discharge Note", hpi="Reason for admission:", pmh="Medical history:",
        course="Course in hospital:", social="Home situation:", dispo="Plan at discharge:",
        order=("hpi", "course", "pmh", "social", "dispo"), demo="{age} yr old {sexword} admitted with {reason}.",
        filler={"vitals": "Observations:", "labs": "Blood results:", "meds": "Medicines on discharge:",
                "instr": "Advice given:", "exam": "Examination:", "code": "Resuscitation status:"}),
    "problem_oriented": dict(
        title="Hospital Discharge Record", hpi="Presentation:", pmh="Problem list:",
        course="Hospital stay:", social="Social:", dispo="Disposition:",
        order=("pmh", "hpi", "course", "social", "dispo"), demo="Pt is a {age}yo {sexabbr} admitted with {reason}.",
        filler={"vitals": "Vitals:", "labs": "Lab data:", "meds": "Medication reconciliation:",
                "instr": "Patient education:", "exam": "Exam:", "code": "Code status:"}),
    "soap": dict(
        title="Discharge Progress Note", hpi="S:", pmh="PMHx:", course="A/P:", social="Soc:",
        dispo="D/C plan:", order=("hpi", "social", "pmh", "course", "dispo"), demo="{age}{sexabbr} admitted w/ {reason}.",
        filler={"vitals": "O:", "labs": "Labs:", "meds": "Meds:", "instr": "Pt instructed:",
                "exam": "Exam:", "code": "Code:"}),
}
# The template drift sites switch to after the cutoff (an EHR migration).
POST_DRIFT_TEMPLATE = "ehr_v2"
TEMPLATES[POST_DRIFT_TEMPLATE] = dict(
    title="Encounter Summary (EHR v2)", hpi="Chief Complaint / HPI:", pmh="Active Problems:",
    course="Hospital Course Narrative:", social="Social Determinants:", dispo="Transition of Care:",
    order=("hpi", "pmh", "course", "social", "dispo"), demo="Age {age}, sex {sexabbr}. Admitted for {reason}.",
    filler={"vitals": "Last Vitals:", "labs": "Results Review:", "meds": "Discharge Med List:",
            "instr": "After Visit Summary:", "exam": "Discharge Exam:", "code": "Code Status:"})
PRE_DRIFT_TEMPLATES = ("academic", "terse", "community", "problem_oriented", "soap")
FILLER_TYPES = ("vitals", "labs", "meds", "instr", "exam", "code")

REASONS = ("pneumonia", "cellulitis", "urinary tract infection", "syncope", "GI bleed", "chest pain",
           "hyperglycemia", "acute kidney injury", "sepsis", "pancreatitis", "hip fracture", "dehydration")
FRAMES = {
    "hpi": ("{T}.", "Notable for {t}.", "Also with {t}."),
    "course": ("{T}.", "During stay, {t}.", "Noted {t}."),
    "social": ("{T}.",),
    "dispo": ("{T}.", "At discharge, {t}."),
}
NEGATABLE = {"dyspnea": 0.15, "substance_use": 0.20}
MEDS = ("metoprolol succinate 25 mg daily", "lisinopril 10 mg daily", "atorvastatin 40 mg nightly",
        "aspirin 81 mg daily", "metformin 500 mg BID", "furosemide 40 mg daily", "apixaban 5 mg BID",
        "omeprazole 20 mg daily", "sertraline 50 mg daily", "levothyroxine 75 mcg daily",
        "amlodipine 5 mg daily", "gabapentin 300 mg TID", "tamsulosin 0.4 mg daily",
        "insulin glargine 20 units nightly", "albuterol inhaler PRN", "acetaminophen 650 mg q6h PRN",
        "senna 8.6 mg nightly", "vitamin D 1000 units daily")
INSTRUCTIONS = (
    "Return to the emergency department for fever, chest pain or worsening symptoms.",
    "Resume your usual diet as tolerated.", "Weigh yourself every morning and write it down.",
    "Avoid heavy lifting for two weeks.", "Call the clinic with any questions about this hospitalization.",
    "Keep any wounds clean and dry.", "Drink plenty of fluids unless told otherwise.",
    "Take medications exactly as listed on this summary.", "Do not drive while taking sedating medicines.",
    "Bring this summary to your next appointment.", "Low sodium diet, less than 2 grams per day.",
    "Check blood sugar before meals and at bedtime.", "Walk a little more each day as tolerated.",
    "Stop smoking; resources were provided.", "Wear compression stockings during the day.",
    "Use the incentive spirometer ten times an hour while awake.",
)
EXAM = ("alert and oriented", "lungs clear bilaterally", "regular rate and rhythm", "abdomen soft, nontender",
        "no peripheral edema", "moves all extremities", "skin warm and dry")
LABS = (("Na", 133, 145, 0), ("K", 3.4, 5.1, 1), ("Cl", 96, 108, 0), ("HCO3", 20, 29, 0), ("BUN", 8, 30, 0),
        ("glucose", 80, 220, 0), ("WBC", 4.0, 12.5, 1), ("Hgb", 9.0, 15.5, 1), ("Plt", 140, 400, 0),
        ("Mg", 1.6, 2.4, 1), ("Phos", 2.5, 4.5, 1), ("INR", 0.9, 1.4, 1), ("albumin", 2.8, 4.6, 1),
        ("TSH", 0.5, 4.5, 1))


def default_sizes(n_hospitals: int = DEFAULT_N_HOSPITALS,
                  largest: int = DEFAULT_LARGEST, smallest: int = DEFAULT_SMALLEST) -> list[int]:
    """Geometric sizes from ``largest`` (h01) to ``smallest`` (last): few big sites, several small."""
    if n_hospitals < 1:
        raise ValueError("n_hospitals must be >= 1")
    if n_hospitals == 1:
        return [largest]
    ratio = (smallest / largest) ** (1.0 / (n_hospitals - 1))
    return [int(round(largest * ratio**i)) for i in range(n_hospitals)]


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------

_GH_X, _GH_W = np.polynomial.hermite.hermgauss(24)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bayes_probability(eta: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """E[sigmoid(eta + sd * Z)], Z ~ N(0, 1), by Gauss-Hermite quadrature (exact to ~1e-8)."""
    eta = np.asarray(eta, float)[:, None]
    sd = np.asarray(sd, float)[:, None]
    return (_sigmoid(eta + math.sqrt(2.0) * sd * _GH_X[None, :]) @ _GH_W) / math.sqrt(math.pi)


def auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Rank AUC with ties averaged; None when one class is absent (kept dependency-free)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, float)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _solve_intercept(target: float, offset: np.ndarray, sd: np.ndarray) -> float:
    """Intercept b with mean(p*(b + offset)) == target, by bisection (deterministic)."""
    lo, hi = -15.0, 15.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if bayes_probability(mid + offset, sd).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _r(x, nd: int = 6):
    """Round floats (recursively) so truth.json is stable and readable."""
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else round(float(x), nd)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class _Draws:
    """Pre-drawn uniforms for one note: Python-speed picks that still come from the seeded Generator."""

    __slots__ = ("u", "i")

    def __init__(self, u: list[float]):
        self.u, self.i = u, 0

    def next(self) -> float:
        v = self.u[self.i % len(self.u)]
        self.i += 1
        return v

    def pick(self, seq):
        return seq[int(self.next() * len(seq))]

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        return lo + int(self.next() * (hi - lo + 1))

    def chance(self, p: float) -> bool:
        return self.next() < p


# --------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------


def _make_sites(rng: np.random.Generator, sizes: list[int]) -> list[dict]:
    """Draw each site's planted characteristics; idiosyncrasy grows as size shrinks."""
    n = len(sizes)
    size_rank = np.argsort(np.argsort(-np.asarray(sizes), kind="stable"), kind="stable")  # 0 = largest
    age_means = rng.permutation(np.linspace(50.0, 72.0, n)) if n > 1 else np.array([62.0])
    words = rng.permutation(np.linspace(60.0, 250.0, n)) if n > 1 else np.array([140.0])
    n_drift = max(1, int(round(n / 2)))
    drift_sites = set(int(i) for i in rng.permutation(n)[:n_drift])
    sites = []
    for i in range(n):
        r = float(size_rank[i] / (n - 1)) if n > 1 else 0.0  # idiosyncrasy: 0 largest, 1 smallest
        z_age = (age_means[i] - 50.0) / 22.0
        comorb_rate = float(np.clip(0.8 + 2.7 * (0.6 * z_age + 0.4 * rng.random()), 0.8, 3.5))
        ins_mix = rng.dirichlet(20.0 * np.array([0.45, 0.33, 0.08, 0.08, 0.06]))
        dominant = REGIONS[int(rng.integers(len(REGIONS)))]
        dom_share = float(rng.uniform(0.5, 0.8))
        u_style = rng.random()
        style = "local" if u_style < 0.05 + 0.85 * r**1.2 else ("formal" if rng.random() < 0.5 else "abbrev")
        template = PRE_DRIFT_TEMPLATES[int(rng.integers(len(PRE_DRIFT_TEMPLATES)))]
        # Site-specific shifts of concept weights: more and larger at small sites.
        n_shift = 2 + int(round(4 * r))
        scale = 0.2 + 1.6 * r
        shifted = sorted(int(j) for j in rng.permutation(len(CONCEPTS))[:n_shift])
        shifts = {}
        for j in shifted:
            sign = 1.0 if rng.random() < 0.5 else -1.0
            shifts[CONCEPTS[j].name] = sign * scale * float(rng.uniform(0.7, 1.3))
        # Vocabulary: mostly from the site's style; shifted concepts keep shared (formal/abbrev)
        # wording, so the same words mean something different here (a pooled model cannot
        # separate the sites by vocabulary for exactly the concepts that behave differently).
        vocab = {}
        for c in CONCEPTS:
            if c.name in shifts:
                pool_style = "formal" if rng.random() < 0.5 else "abbrev"
            elif rng.random() < 0.8:
                pool_style = style
            else:
                pool_style = ("formal", "abbrev", "local")[int(rng.integers(3))]
            pool = c.pool(pool_style)
            a = int(rng.integers(len(pool)))
            b = (a + 1 + int(rng.integers(len(pool) - 1))) % len(pool) if len(pool) > 1 else a
            vocab[c.name] = [pool[a], pool[b]]
        for name, formal, abbrev, local in NEUTRAL_CONDITIONS:
            pool = {"formal": formal, "abbrev": abbrev, "local": local}[style if rng.random() < 0.8 else "formal"]
            vocab[name] = [pool[0], pool[0]]
        prevalence_offsets = {k: float(rng.normal(0.0, 0.3)) for k in PREVALENCE_BASE}
        filler_order = [FILLER_TYPES[int(j)] for j in rng.permutation(len(FILLER_TYPES))]
        target_rate = float(0.12 + 0.21 * r**1.5 + rng.uniform(-0.015, 0.015))
        mortality = float(rng.uniform(0.01, 0.04))
        f_frac = float(rng.uniform(0.45, 0.60))
        drift = None
        if i in drift_sites:
            changed = sorted(int(j) for j in rng.permutation(len(CONCEPTS))[:5])
            new_terms = {}
            for j in changed:
                c = CONCEPTS[j]
                options = [t for t in c.formal + c.abbrev + c.local if t not in vocab[c.name]]
                new_terms[c.name] = options[int(rng.integers(len(options)))]
            drift = {"template_after": POST_DRIFT_TEMPLATE, "vocabulary_after": new_terms}
        sites.append(dict(
            name=site_name(i), index=i, size=int(sizes[i]), idiosyncrasy=r, age_mean=float(age_means[i]),
            sex_f_frac=f_frac, comorbidity_rate=comorb_rate,
            insurance_mix=dict(zip(INSURANCE, (float(v) for v in ins_mix))),
            dominant_region=dominant, dominant_region_share=dom_share, vocab_style=style,
            vocabulary=vocab, template=template, filler_order=filler_order,
            words_per_note_target=float(words[i]), concept_shifts=shifts, shift_scale=scale,
            prevalence_offsets=prevalence_offsets, target_rate=target_rate, mortality_target=mortality,
            drift=drift,
        ))
    return sites


# --------------------------------------------------------------------------------------------
# Patients and labels (vectorized per site)
# --------------------------------------------------------------------------------------------


def _patients(rng: np.random.Generator, site: dict, n_days: int, cutoff_day: int) -> dict:
    """Demographics, conditions, concepts and discharge day for one site's encounters."""
    n = site["size"]
    age = np.clip(np.round(rng.normal(site["age_mean"], 15.0, n)), 18, 100).astype(int)
    u = rng.random(n)
    f = site["sex_f_frac"]
    sex = np.where(u < f, "F", np.where(u < 0.985, "M", np.where(u < 0.99, "other", "unknown")))
    k = rng.poisson(site["comorbidity_rate"] * np.exp(0.025 * (age - site["age_mean"])))
    k = np.minimum(k, len(CONDITION_WEIGHTS))
    # insurance: site mix, with government (Medicare) three times as likely from age 65
    mix = np.array([site["insurance_mix"][c] for c in INSURANCE])
    w = np.tile(mix, (n, 1))
    w[:, 1] *= np.where(age >= 65, 3.0, 1.0)
    w /= w.sum(axis=1, keepdims=True)
    ins_idx = (rng.random(n)[:, None] > np.cumsum(w, axis=1)).sum(axis=1).clip(0, len(INSURANCE) - 1)
    insurance = np.array(INSURANCE)[ins_idx]
    u = rng.random(n)
    others = [g for g in REGIONS if g != site["dominant_region"]]
    region = np.where(u < site["dominant_region_share"], site["dominant_region"],
                      np.array(others)[rng.integers(0, len(others), n)])
    # which conditions make up n_comorbidities (weighted sampling without replacement, Gumbel top-k)
    keys = np.log(CONDITION_WEIGHTS)[None, :] + rng.gumbel(size=(n, len(CONDITION_WEIGHTS)))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    has_condition = rank < k[:, None]
    x = np.zeros((n, len(CONCEPTS)), dtype=bool)
    for j, name in enumerate(COMORBIDITY_CONCEPTS):
        x[:, CONCEPT_INDEX[name]] = has_condition[:, j]
    x = _concept_presence(rng, site, x, age, k, insurance)
    day = rng.integers(0, n_days + 1, n)
    after = day > cutoff_day
    return dict(age=age, sex=sex, k=k, insurance=insurance, region=region, has_condition=has_condition,
                x=x, day=day, after=after)


def _concept_presence(rng, site, x, age, k, insurance) -> np.ndarray:
    """Presence of the non-condition concepts; depends on patient features and the site."""
    n = len(age)
    off = site["prevalence_offsets"]
    a10 = (age - AGE_CENTER) / 10.0
    gov = np.isin(insurance, ("government",))
    selfpay = insurance == "self_pay"
    unspec = insurance == "unspecified"
    col = lambda name: x[:, CONCEPT_INDEX[name]]  # noqa: E731

    def draw(name, logit):
        x[:, CONCEPT_INDEX[name]] = rng.random(n) < _sigmoid(PREVALENCE_BASE[name] + off[name] + logit)

    hf, copd = col("heart_failure"), col("copd")
    draw("dyspnea", 1.2 * hf + 1.2 * copd)
    draw("prior_admissions", 0.25 * (k - 2) + 0.3 * gov)
    draw("med_nonadherence", 0.4 * (selfpay | unspec) - 0.1 * a10)
    draw("polypharmacy", 0.35 * (k - 2))
    draw("functional_decline", 0.45 * a10)
    draw("stable_room_air", -0.9 * copd - 0.6 * hf)
    draw("independent_ambulation", -0.3 * a10 - 1.5 * col("functional_decline"))
    draw("lives_alone", 0.2 * a10)
    draw("substance_use", -0.25 * a10)
    draw("family_support", -1.5 * col("lives_alone"))
    draw("against_medical_advice", 0.6 * selfpay + 0.8 * col("substance_use"))
    draw("followup_scheduled", -0.4 * selfpay)
    draw("home_health", 0.3 * a10 + 0.5 * col("functional_decline"))
    return x


def _noise_sd(age, k, insurance) -> np.ndarray:
    m = NOISE_MODEL
    return (m["base_sd"]
            + m["per_comorbidity_above_2"] * np.maximum(0, k - 2)
            + m["comorbidities_5plus"] * (k >= 5)
            + m["per_decade_above_60"] * np.maximum(0.0, (age - 60) / 10.0)
            + m["age_80plus"] * (age >= 80)
            + m["insurance_government_or_unspecified"] * np.isin(insurance, ("government", "unspecified")))


def _linear_predictor(p: dict, weights: np.ndarray) -> np.ndarray:
    """eta without the site intercept; ``weights`` is (n_concepts,) or per-row (n, n_concepts)."""
    drift_w = np.array([DRIFT_WEIGHT_CHANGES.get(c.name, 0.0) for c in CONCEPTS])
    w = weights + p["after"][:, None] * drift_w[None, :]
    ins = np.array([INSURANCE_EFFECT[v] for v in p["insurance"]])
    return ((p["x"] * w).sum(axis=1)
            + AGE_EFFECT_PER_DECADE * (p["age"] - AGE_CENTER) / 10.0
            + COMORBIDITY_EFFECT * (p["k"] - COMORBIDITY_CENTER)
            + ins + DRIFT_INTERCEPT * p["after"])


# --------------------------------------------------------------------------------------------
# Notes
# --------------------------------------------------------------------------------------------


def _cap(t: str) -> str:
    return t[:1].upper() + t[1:]


def _term(site: dict, name: str, after: bool, d: _Draws) -> str:
    if after and site["drift"] and name in site["drift"]["vocabulary_after"]:
        return site["drift"]["vocabulary_after"][name]
    primary, secondary = site["vocabulary"][name]
    return primary if d.chance(0.8) else secondary


def _note(site: dict, age: int, sex: str, cond_row: np.ndarray, x_row: np.ndarray, after: bool,
          target_words: float, d: _Draws) -> tuple[str, int]:
    """One discharge note; returns (text, words in the informative part).

    Everything that carries signal comes first (well inside ~100 words) and site-style filler
    after it, because encoders truncate around 128 tokens at the smallest settings.
    """
    tname = POST_DRIFT_TEMPLATE if (after and site["drift"]) else site["template"]
    t = TEMPLATES[tname]
    sexword = {"F": "female", "M": "male"}.get(sex, "patient")
    sexabbr = {"F": "F", "M": "M", "other": "X"}.get(sex, "U")
    present = [CONCEPTS[j].name for j in np.flatnonzero(x_row)]

    # reason for admission: an acute form of a present condition half the time
    acute = [c for c in ("heart_failure", "copd") if c in present]
    if acute and d.chance(0.5):
        reason = _term(site, acute[int(d.next() * len(acute))], after, d) + " exacerbation"
    else:
        reason = d.pick(REASONS)

    sections: dict[str, list[str]] = {"hpi": [], "pmh": [], "course": [], "social": [], "dispo": []}
    sections["hpi"].append(t["demo"].format(age=age, sexword=sexword, sexabbr=sexabbr, reason=reason))
    for name in present:
        c = CONCEPTS[CONCEPT_INDEX[name]]
        if c.section == "pmh":
            continue
        term = _term(site, name, after, d)
        frame = d.pick(FRAMES[c.section])
        sections[c.section].append(frame.format(t=term, T=_cap(term)))
    for name, p_neg in NEGATABLE.items():
        if name not in present and d.chance(p_neg):
            c = CONCEPTS[CONCEPT_INDEX[name]]
            term = site["vocabulary"][name][0]
            sections[c.section].append(f"Denies {term}." if c.section == "hpi" else f"No {term}.")
    conds = [COMORBIDITY_CONCEPTS[j] if j < len(COMORBIDITY_CONCEPTS) else NEUTRAL_CONDITIONS[j - len(COMORBIDITY_CONCEPTS)][0]
             for j in np.flatnonzero(cond_row)]
    # shuffle condition order with the note's own draws (Fisher-Yates)
    for i in range(len(conds) - 1, 0, -1):
        j = int(d.next() * (i + 1))
        conds[i], conds[j] = conds[j], conds[i]
    terms = [_term(site, c, after, d) if c in CONCEPT_INDEX else site["vocabulary"][c][0] for c in conds]
    sections["pmh"].append((", ".join(terms) if terms else "none") + ".")
    parts = [t["title"]]
    for sec in t["order"]:
        if sections[sec]:
            parts.append(t[sec])
            parts.extend(sections[sec])
    informative = " ".join(parts)
    n_info = len(informative.split())

    budget = int(round(target_words)) - n_info
    filler: list[str] = []
    order = site["filler_order"]
    for pos, ftype in enumerate(order):
        if budget <= 0:
            break
        left = len(order) - pos
        share = budget if left == 1 else max(2, int(budget / left * (0.5 + d.next())))
        text = t["filler"][ftype] + " " + _filler(ftype, share, d)
        filler.append(text)
        budget -= len(text.split())
    note = informative + (" " + " ".join(filler) if filler else "")
    return note, n_info


def _filler(ftype: str, budget: int, d: _Draws) -> str:
    if ftype == "vitals":
        return (f"T {d.integer(970, 1004) / 10:.1f} HR {d.integer(58, 104)} BP {d.integer(100, 165)}/"
                f"{d.integer(55, 95)} RR {d.integer(12, 22)} SpO2 {d.integer(91, 99)}%.")
    if ftype == "code":
        return "full." if d.chance(0.85) else "DNR."
    out: list[str] = []
    used = 1
    if ftype == "labs":
        start = d.integer(0, len(LABS) - 1)
        for i in range(len(LABS)):
            name, lo, hi, nd = LABS[(start + i) % len(LABS)]
            val = lo + d.next() * (hi - lo)
            out.append(f"{name} {val:.{nd}f}")
            used += 2
            if used >= budget:
                break
        return ", ".join(out) + "."
    if ftype == "meds":
        start = d.integer(0, len(MEDS) - 1)
        step = d.pick((1, 5, 7, 11))  # coprime with len(MEDS): visits every med once
        for i in range(len(MEDS)):
            med = MEDS[(start + i * step) % len(MEDS)]
            out.append(med)
            used += len(med.split())
            if used >= budget:
                break
        return "; ".join(out) + "."
    if ftype == "instr":
        start = d.integer(0, len(INSTRUCTIONS) - 1)
        for i in range(len(INSTRUCTIONS)):
            s = INSTRUCTIONS[(start + i) % len(INSTRUCTIONS)]
            out.append(s)
            used += len(s.split())
            if used >= budget:
                break
        return " ".join(out)
    if ftype == "exam":
        start = d.integer(0, len(EXAM) - 1)
        for i in range(len(EXAM)):
            out.append(EXAM[(start + i) % len(EXAM)])
            used += len(out[-1].split())
            if used >= budget:
                break
        return ", ".join(out) + "."
    raise ValueError(ftype)


# --------------------------------------------------------------------------------------------
# Main entry point
# --------------------------------------------------------------------------------------------


# A synthetic hospital's own policy file (common.policy.SIMULATED_POLICY_FILE): its records
# are made up, so it lets its local adapter travel (the full cross-site matrix) and lets the
# simulation-only `augmented` regime use them. Everything else keeps the safe defaults (k = 10).
SYNTHETIC_SITE_POLICY = """\
# clinfed site policy of a synthetic hospital (written by clinfed generate)
share-local-adapters = true
refuse-instance-moving = false
"""


def generate_federation(out_dir, n_hospitals: int = DEFAULT_N_HOSPITALS, seed: int = 0, sizes=None,
                        start: str = "2021-01-01", end: str = "2023-12-31", generative: bool = True,
                        site_policy: str | None = SYNTHETIC_SITE_POLICY, scenario: str = "default",
                        shifted_sites=None) -> dict:
    """Write ``out_dir/hNN/encounters.csv`` per hospital and ``out_dir/truth.json``; return the truth.

    ``scenario`` is one of SCENARIOS (see there); ``default`` writes exactly what this
    generator always wrote. ``shifted_sites`` (``concept-shift`` only) names the hospitals
    where CONCEPT_SHIFT_CUES are reversed (default: the smallest hospitals holding at most
    CONCEPT_SHIFT_MAX_SHARE of the encounters); both are recorded in truth.json.

    ``sizes`` (one per hospital) overrides ``n_hospitals``; by default sizes fall geometrically
    from 2000 (h01) to 200 (last). Same seed and arguments give byte-identical files. Each
    hospital folder also gets its own policy file (``clinfed-policy.toml``, `site_policy`;
    None writes none), read by its simulated node as a deployed node reads ``policy-path``.
    """
    if sizes is None:
        sizes = default_sizes(n_hospitals)
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError("sizes must be a non-empty list of positive integers")
    d0, d1 = date.fromisoformat(start), date.fromisoformat(end)
    if d1 <= d0:
        raise ValueError("end must be after start")
    n_days = (d1 - d0).days
    cutoff_day = int(math.floor(DRIFT_FRACTION * n_days))
    cutoff = d0 + timedelta(days=cutoff_day)

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    if shifted_sites is not None and scenario != "concept-shift":
        raise ValueError("shifted_sites applies to scenario 'concept-shift' only")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    sites = _make_sites(rng, sizes)
    shifted: list[str] = []
    if scenario != "default":  # after _make_sites, so later draws are the same in every scenario
        sites = _one_population(sites)
    if scenario == "concept-shift":
        shifted = _shifted_names(sizes, shifted_sites)
        for st in sites:
            if st["name"] in shifted:
                st["concept_shifts"] = {c: -(1.0 + CONCEPT_SHIFT_FACTOR) * CONCEPTS[CONCEPT_INDEX[c]].weight
                                     for c in CONCEPT_SHIFT_CUES}
    base_w = np.array([c.weight for c in CONCEPTS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # size-weighted site weights: roughly what a model pooled over all sites would learn
    site_w = [base_w + np.array([s["concept_shifts"].get(c.name, 0.0) for c in CONCEPTS]) for s in sites]
    pooled_w = sum(w * s["size"] for w, s in zip(site_w, sites)) / sum(sizes)

    all_y, all_p, all_age, all_k, all_ins, all_after = [], [], [], [], [], []
    site_truth = []
    intercepts: dict = {}  # one label model per population (scenarios other than default)
    for s, w in zip(sites, site_w):
        p = _patients(rng, s, n_days, cutoff_day)
        n = s["size"]
        eta0 = _linear_predictor(p, w)
        sd = _noise_sd(p["age"], p["k"], p["insurance"])
        if scenario == "default":
            b = _solve_intercept(s["target_rate"], eta0, sd)
        else:
            key = tuple(sorted(s["concept_shifts"].items()))
            if key not in intercepts:
                intercepts[key] = _solve_intercept(s["target_rate"], eta0, sd)
            b = intercepts[key]
        eta = b + eta0
        pstar = bayes_probability(eta, sd)
        eps = rng.normal(0.0, 1.0, n) * sd
        y = (rng.random(n) < _sigmoid(eta + eps)).astype(int)
        # mortality: rare, rises with risk and age
        risk = eta - eta.mean()
        m_off = 0.6 * risk + 0.3 * (p["age"] - AGE_CENTER) / 10.0
        mb = _solve_intercept(s["mortality_target"], m_off, np.zeros(n))
        died = (rng.random(n) < _sigmoid(mb + m_off)).astype(int)
        # notes
        draws = rng.random((n, 384)).tolist()
        target_words = s["words_per_note_target"] * np.exp(rng.normal(0.0, 0.25, n) - 0.25**2 / 2)
        notes, info_words = [], []
        for i in range(n):
            txt, ni = _note(s, int(p["age"][i]), str(p["sex"][i]), p["has_condition"][i], p["x"][i],
                            bool(p["after"][i]), float(target_words[i]), _Draws(draws[i]))
            notes.append(txt)
            info_words.append(ni)
        words = np.array([len(t.split()) for t in notes])
        _write_site(out / s["name"], s["name"], notes, y, p, died, d0)
        if site_policy is not None:
            from clinfed.common.policy import SIMULATED_POLICY_FILE

            (out / s["name"] / SIMULATED_POLICY_FILE).write_text(site_policy, encoding="utf-8")

        pstar_pooled = bayes_probability(eta - (p["x"] * (w - pooled_w)).sum(axis=1), sd)
        hard = (p["age"] >= 80) | (p["k"] >= 5)
        auc_site = auc(y, pstar)
        auc_pooled = auc(y, pstar_pooled)
        site_truth.append(dict(
            name=s["name"], size=n, n_positive=int(y.sum()), base_rate=float(y.mean()),
            target_rate=s["target_rate"], intercept=b, mean_bayes_probability=float(pstar.mean()),
            idiosyncrasy=s["idiosyncrasy"],
            age_mean=s["age_mean"], age_mean_realized=float(p["age"].mean()),
            frac_age_80plus=float((p["age"] >= 80).mean()),
            sex_f_frac=s["sex_f_frac"], comorbidity_rate=s["comorbidity_rate"],
            comorbidity_mean_realized=float(p["k"].mean()), frac_comorbidities_5plus=float((p["k"] >= 5).mean()),
            insurance_mix=s["insurance_mix"],
            insurance_realized={c: float((p["insurance"] == c).mean()) for c in INSURANCE},
            dominant_region=s["dominant_region"], dominant_region_share=s["dominant_region_share"],
            mortality_rate=float(died.mean()),
            vocab_style=s["vocab_style"], vocabulary=s["vocabulary"],
            vocab_unique_terms=None,  # filled below
            template=s["template"], filler_order=s["filler_order"],
            words_per_note_target=s["words_per_note_target"], mean_words_per_note=float(words.mean()),
            mean_informative_words=float(np.mean(info_words)),
            frac_informative_over_100_words=float(np.mean(np.array(info_words) > 100)),
            concept_shifts=s["concept_shifts"], shift_scale=s["shift_scale"],
            concept_prevalence={c.name: float(p["x"][:, j].mean()) for j, c in enumerate(CONCEPTS)},
            prevalence_offsets=s["prevalence_offsets"],
            drift=s["drift"], n_after_cutoff=int(p["after"].sum()),
            base_rate_before_cutoff=float(y[~p["after"]].mean()) if (~p["after"]).any() else None,
            base_rate_after_cutoff=float(y[p["after"]].mean()) if p["after"].any() else None,
            bayes_auc=auc_site,
            bayes_auc_before_cutoff=auc(y[~p["after"]], pstar[~p["after"]]),
            bayes_auc_after_cutoff=auc(y[p["after"]], pstar[p["after"]]),
            bayes_auc_hard=auc(y[hard], pstar[hard]), bayes_auc_rest=auc(y[~hard], pstar[~hard]),
            oracle_auc_pooled_weights=auc_pooled,
            auc_gap_pooled_weights=(auc_site - auc_pooled) if auc_site is not None and auc_pooled is not None else None,
        ))
        for acc, v in ((all_y, y), (all_p, pstar), (all_age, p["age"]), (all_k, p["k"]),
                       (all_ins, p["insurance"]), (all_after, p["after"])):
            acc.append(v)

    # vocabulary idiosyncrasy: share of a site's concept terms no other site uses
    term_sets = [set(t for c in CONCEPTS for t in st["vocabulary"][c.name]) for st in site_truth]
    for i, st in enumerate(site_truth):
        others = set().union(*(ts for j, ts in enumerate(term_sets) if j != i)) if len(term_sets) > 1 else set()
        mine = [st["vocabulary"][c.name][0] for c in CONCEPTS]
        st["vocab_unique_terms"] = sorted(t for t in set(mine) if t not in others)
        st["vocab_idiosyncrasy"] = float(np.mean([t not in others for t in mine]))

    y, pstar = np.concatenate(all_y), np.concatenate(all_p)
    age, k, ins = np.concatenate(all_age), np.concatenate(all_k), np.concatenate(all_ins)
    after = np.concatenate(all_after)
    groups = {
        "age_80plus": age >= 80, "age_under_80": age < 80,
        "comorbidities_5plus": k >= 5, "comorbidities_under_5": k < 5,
        "hard_age80plus_or_comorb5plus": (age >= 80) | (k >= 5), "rest": (age < 80) & (k < 5),
        "insurance_government_or_unspecified": np.isin(ins, ("government", "unspecified")),
        "insurance_other_kinds": ~np.isin(ins, ("government", "unspecified")),
        "before_cutoff": ~after, "after_cutoff": after,
    }
    by_group = {g: {"n": int(m.sum()), "positives": int(y[m].sum()), "bayes_auc": auc(y[m], pstar[m])}
                for g, m in groups.items()}

    ranking = sorted(site_truth, key=lambda st: (-(st["idiosyncrasy"]), st["name"]))
    n_top = max(1, len(sites) // 3)
    truth = {
        "generator": "simulations.generate",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "period": {"start": d0.isoformat(), "end": d1.isoformat()},
        "n_hospitals": len(sites),
        "sizes": sizes,
        "files": {st["name"]: f"{st['name']}/encounters.csv" for st in site_truth},
        "sites": site_truth,
        "label_model": {
            "formula": ("eta = intercept[site] + drift_intercept*after_cutoff + sum_c x_c*(weight[c] + "
                        "shift[site,c] + drift_weight[c]*after_cutoff) + age_effect_per_decade*(age-65)/10 + "
                        "comorbidity_effect*(n_comorbidities-2) + insurance_effect[insurance]; "
                        "y ~ Bernoulli(sigmoid(eta + eps)), eps ~ N(0, noise_sd)"),
            "bayes_probability": "p* = E_eps[sigmoid(eta + eps)] (eps is latent); bayes_auc = AUC of p*",
            "concept_weights": {c.name: c.weight for c in CONCEPTS},
            "concept_kind": {c.name: c.kind for c in CONCEPTS},
            "concept_section": {c.name: c.section for c in CONCEPTS},
            "concept_vocabulary_pools": {c.name: {"formal": list(c.formal), "abbrev": list(c.abbrev),
                                                  "local": list(c.local)} for c in CONCEPTS},
            "comorbidity_concepts": list(COMORBIDITY_CONCEPTS),
            "neutral_conditions": [nc[0] for nc in NEUTRAL_CONDITIONS],
            "age_center": AGE_CENTER, "age_effect_per_decade": AGE_EFFECT_PER_DECADE,
            "comorbidity_center": COMORBIDITY_CENTER, "comorbidity_effect": COMORBIDITY_EFFECT,
            "insurance_effects": INSURANCE_EFFECT,
            "site_intercepts": {st["name"]: st["intercept"] for st in site_truth},
            "site_concept_shifts": {st["name"]: st["concept_shifts"] for st in site_truth},
            "pooled_weights_size_weighted": {c.name: float(v) for c, v in zip(CONCEPTS, pooled_w)},
            "noise_model": {
                "formula": ("sd = base_sd + per_comorbidity_above_2*max(0, n_comorbidities-2) + "
                            "comorbidities_5plus*[n_comorbidities>=5] + per_decade_above_60*max(0,(age-60)/10) + "
                            "age_80plus*[age>=80] + insurance_government_or_unspecified*[insurance in "
                            "(government, unspecified)]"),
                **NOISE_MODEL,
            },
            "region_effect": "none (region only shifts patient mix)",
            "mortality_model": "died ~ Bernoulli(sigmoid(b_site + 0.6*(eta - mean eta) + 0.3*(age-65)/10)), b_site set to a site rate of 1-4 %",
        },
        "patient_mix_model": {
            "age": "Normal(site age_mean, 15), rounded, clipped to 18-100",
            "sex": "F with site sex_f_frac, M otherwise except 0.5 % other and 1 % unknown",
            "n_comorbidities": "Poisson(site comorbidity_rate * exp(0.025*(age - site age_mean))), capped at 14",
            "insurance": "site insurance_mix, government weight x3 from age 65",
            "region": "site dominant_region with dominant_region_share, else uniform over the other four",
            "concept_prevalence_base_logit": PREVALENCE_BASE,
        },
        "planted_error_drivers": list(PLANTED_ERROR_DRIVERS),
        "error_driver_detail": ("larger latent noise (see label_model.noise_model) for many comorbidities "
                                "(strongest, esp. 5+), older age (esp. 80+), and government/unspecified insurance; "
                                "their Bayes probabilities are flatter so per-instance error is higher"),
        "temporal_drift": {
            "cutoff_date": cutoff.isoformat(),
            "fraction_of_period": DRIFT_FRACTION,
            "applies_to": "encounters with discharge_date after cutoff_date",
            "intercept_shift_all_sites": DRIFT_INTERCEPT,
            "weight_changes_all_sites": DRIFT_WEIGHT_CHANGES,
            "sites_with_template_and_vocabulary_change": [st["name"] for st in site_truth if st["drift"]],
            "new_template": POST_DRIFT_TEMPLATE,
            "vocabulary_after": {st["name"]: st["drift"]["vocabulary_after"] for st in site_truth if st["drift"]},
        },
        "expected": {
            "largest_gain_from_local_fine_tuning": [st["name"] for st in ranking[:n_top]] if len(sites) > 1 else [],
            "local_gain_ranking": [st["name"] for st in ranking],
            "rationale": ("smaller sites were given more and larger concept-weight shifts (written with shared "
                          "wording) and more idiosyncratic vocabulary, so a model aggregated over all sites, "
                          "dominated by the large ones, fits them worst; auc_gap_pooled_weights per site is the "
                          "Bayes AUC lost by using size-weighted pooled concept weights instead of the site's own"),
            "auc_gap_pooled_weights": {st["name"]: st["auc_gap_pooled_weights"] for st in site_truth},
            "hardest_subgroups": ["comorbidities_5plus", "age_80plus", "insurance_government_or_unspecified"],
            "temporal_test_worse_than_random_test": True,
        },
        "bayes_auc": {
            "overall": auc(y, pstar),
            "by_site": {st["name"]: st["bayes_auc"] for st in site_truth},
            "by_group": by_group,
        },
        "overall_base_rate": float(y.mean()),
    }
    if scenario != "default":  # the default's truth.json stays byte-identical: no new keys there
        truth["scenario"] = scenario
        truth["expected"]["largest_gain_from_local_fine_tuning"] = list(shifted)
        truth["expected"]["local_gain_ranking"] = list(shifted)
        truth["expected"]["rationale"] = (
            "all hospitals share one population and label model; local fine-tuning has nothing to gain "
            "anywhere" if scenario == "exchangeable" else
            "all hospitals share one population and label model except that at the shifted sites the "
            "concept-shift cues mean the opposite; only there can a site's own model beat the global one")
        truth["concept_shift"] = None if scenario == "exchangeable" else {
            "sites": list(shifted),
            "cues": {c: {"weight": CONCEPTS[CONCEPT_INDEX[c]].weight,
                         "weight_at_shifted_sites": -CONCEPT_SHIFT_FACTOR * CONCEPTS[CONCEPT_INDEX[c]].weight}
                     for c in CONCEPT_SHIFT_CUES},
            "words": {c: sites[0]["vocabulary"][c] for c in CONCEPT_SHIFT_CUES},
        }
    if generative:  # generative tasks per site (simulations/generative.py), own seeded stream
        from clinfed.simulations.generative import write_generative_tasks
        truth["generative"] = write_generative_tasks(out, truth, seed)
    truth = _r(truth)
    (out / "truth.json").write_text(json.dumps(truth, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return truth


def _one_population(sites: list[dict]) -> list[dict]:
    """Every site a copy of one population: the largest site's draws, without its weight
    shifts or template drift, at the mean of the sites' base rates; names and sizes kept."""
    import copy

    pop = copy.deepcopy(sites[0])
    pop.update(concept_shifts={}, shift_scale=0.0, drift=None, idiosyncrasy=0.0,
               target_rate=float(np.mean([st["target_rate"] for st in sites])))
    out = []
    for st in sites:
        site = copy.deepcopy(pop)
        site.update(name=st["name"], index=st["index"], size=st["size"])
        out.append(site)
    return out


def _shifted_names(sizes: list[int], shifted_sites) -> list[str]:
    n = len(sizes)
    names = [site_name(i) for i in range(n)]
    if shifted_sites is None:
        chosen, total = [], 0
        for i in sorted(range(n), key=lambda i: (sizes[i], -i)):
            if chosen and total + sizes[i] > CONCEPT_SHIFT_MAX_SHARE * sum(sizes):
                break
            chosen.append(names[i])
            total += sizes[i]
    else:
        chosen = [str(v).strip() for v in (shifted_sites.split(",") if isinstance(shifted_sites, str)
                                           else shifted_sites) if str(v).strip()]
        unknown = [v for v in chosen if v not in names]
        if unknown:
            raise ValueError(f"shifted_sites {', '.join(unknown)} not among {', '.join(names)}")
    if not chosen or len(chosen) == n:
        raise ValueError("concept-shift needs at least one shifted and one unshifted hospital")
    return [v for v in names if v in chosen]


def _write_site(folder: Path, name: str, notes, y, p, died, d0: date) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "encounters.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for i in range(len(notes)):
            w.writerow((
                f"{name}-{i + 1:06d}", notes[i], int(y[i]), (d0 + timedelta(days=int(p["day"][i]))).isoformat(),
                int(p["age"][i]), p["sex"][i], p["insurance"][i], int(p["k"][i]), p["region"][i], int(died[i]),
            ))


def ensure_federation(path, n_hospitals: int = DEFAULT_N_HOSPITALS, seed: int = 0) -> Path:
    """The federation at `path`, generated once; safe when several simulated sites race.

    Written into a private temporary folder and renamed into place, so a reader
    never sees a half-written hospital.
    """
    import os
    import shutil
    import tempfile

    path = Path(path)
    if (path / "truth.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    generate_federation(tmp, n_hospitals=n_hospitals, seed=seed)
    try:
        os.rename(tmp, path)
    except OSError:  # another process won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path
