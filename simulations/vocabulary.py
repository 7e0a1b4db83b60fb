"""The synthetic hospitals' clinical vocabulary and names, shared by the note and task generators.

`simulations.generate` writes the encounter tables and `simulations.generative`
the instruction tasks; both draw on these concepts (their weight in the label
model, their note section, and the words each site's style uses for them), the
conditions that count toward comorbidity without a weight, and the site names.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Clinical concepts: weight in the label model, note section, and the vocabulary pools sites
# choose from ("formal" and "abbrev" are what large systems write; "local" is idiosyncratic).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    name: str
    weight: float
    section: str  # hpi, pmh, course, social, dispo
    formal: tuple[str, ...]
    abbrev: tuple[str, ...]
    local: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "risk" if self.weight > 0 else "protective"

    def pool(self, style: str) -> tuple[str, ...]:
        return {"formal": self.formal, "abbrev": self.abbrev, "local": self.local}[style]


CONCEPTS: tuple[Concept, ...] = (
    # chronic conditions (listed in the past medical history; prevalence follows n_comorbidities)
    Concept("heart_failure", 0.70, "pmh",
            ("congestive heart failure", "heart failure with reduced ejection fraction"),
            ("CHF", "HFrEF"), ("CCF", "cardiac failure", "pump failure")),
    Concept("copd", 0.60, "pmh",
            ("chronic obstructive pulmonary disease", "emphysema"),
            ("COPD", "AECOPD"), ("COAD", "chronic airflow limitation", "obstructive lung dz")),
    Concept("ckd", 0.55, "pmh",
            ("chronic kidney disease stage 3", "chronic renal insufficiency"),
            ("CKD", "CKD3b"), ("CRI", "renal impairment", "chronic renal failure")),
    Concept("diabetes", 0.35, "pmh",
            ("type 2 diabetes mellitus, poorly controlled", "uncontrolled diabetes mellitus"),
            ("T2DM", "DM2 uncontrolled"), ("NIDDM", "sugar diabetes", "brittle diabetic")),
    # admission and course
    Concept("dyspnea", 0.30, "hpi",
            ("shortness of breath", "dyspnea on exertion"),
            ("SOB", "DOE"), ("breathlessness", "winded with minimal exertion")),
    Concept("prior_admissions", 1.10, "hpi",
            ("two hospital admissions in the past six months", "multiple recent hospitalizations"),
            ("2 admits in last 6 mo", "frequent readmits"),
            ("bounce-back patient", "recurrent admissions this year", "known frequent flyer")),
    Concept("med_nonadherence", 0.80, "hpi",
            ("non-adherent to medications", "poor medication adherence"),
            ("med noncompliance", "nonadherent w/ meds"),
            ("not taking meds as prescribed", "ran out of pills", "erratic with tablets")),
    Concept("polypharmacy", 0.40, "course",
            ("polypharmacy with more than ten medications", "complex medication regimen"),
            ("polypharmacy", "10+ meds"), ("extensive med list", "high pill burden")),
    Concept("functional_decline", 0.50, "course",
            ("recent falls with functional decline", "progressive deconditioning"),
            ("frequent falls", "debility"), ("weak and unsteady", "needs assist with ADLs")),
    Concept("stable_room_air", -0.45, "course",
            ("stable on room air", "oxygen saturation normal on room air"),
            ("sats OK on RA", "stable on RA"), ("no O2 requirement", "weaned off oxygen")),
    Concept("independent_ambulation", -0.40, "course",
            ("ambulating independently", "independent with mobility"),
            ("ambulating indep", "indep ADLs"), ("walking without assistance", "up and about")),
    # social
    Concept("lives_alone", 0.50, "social",
            ("lives alone", "lives alone without nearby family"),
            ("lives alone", "lives alone, no caregiver"), ("no caregiver at home", "home alone most days")),
    Concept("substance_use", 0.55, "social",
            ("active alcohol use disorder", "ongoing substance use"),
            ("EtOH abuse", "active SUD"), ("drinks daily", "using again")),
    Concept("family_support", -0.40, "social",
            ("strong family support", "lives with spouse who assists"),
            ("good social support", "family involved"), ("daughter at bedside", "supportive kin")),
    # disposition
    Concept("against_medical_advice", 1.20, "dispo",
            ("left against medical advice", "discharged against medical advice"),
            ("left AMA", "AMA"), ("self-discharged", "eloped from the ward", "signed self out")),
    Concept("followup_scheduled", -0.75, "dispo",
            ("follow-up appointment scheduled within 7 days", "outpatient follow-up arranged"),
            ("f/u appt made", "PCP f/u in 1 wk"), ("clinic visit booked", "TCM visit set")),
    Concept("home_health", -0.50, "dispo",
            ("home health services arranged", "visiting nurse arranged"),
            ("HHC set up", "VNA arranged"), ("home nursing in place", "community nurse referral")),
)
# Conditions that count toward n_comorbidities but carry no weight of their own.
NEUTRAL_CONDITIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("hypertension", ("hypertension",), ("HTN",), ("high blood pressure",)),
    ("hyperlipidemia", ("hyperlipidemia",), ("HLD",), ("high cholesterol",)),
    ("atrial_fibrillation", ("atrial fibrillation",), ("AFib",), ("irregular heartbeat",)),
    ("coronary_disease", ("coronary artery disease",), ("CAD",), ("ischemic heart dz",)),
    ("depression", ("major depressive disorder",), ("MDD",), ("low mood",)),
    ("obesity", ("obesity",), ("BMI>35",), ("morbid obesity",)),
    ("hypothyroidism", ("hypothyroidism",), ("hypoT4",), ("underactive thyroid",)),
    ("osteoarthritis", ("osteoarthritis",), ("OA",), ("arthritis of knees",)),
    ("anemia", ("chronic anemia",), ("anemia",), ("low blood count",)),
    ("gerd", ("gastroesophageal reflux disease",), ("GERD",), ("acid reflux",)),
)


def site_name(i: int) -> str:
    """``h01``, ``h02``, ...: zero-padded so lexical order is site order."""
    return f"h{i + 1:02d}"
