"""The synthetic federation: deterministic, valid under the contract, and carrying its planted truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from clinfed.common.data import list_sites, read_site_table, split_site
from clinfed.simulations.generate import default_sizes, generate_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed")
    truth = generate_federation(out, seed=0)
    return out, truth


def file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_and_other_seed_differs(fed, tmp_path):
    out, _ = fed
    generate_federation(tmp_path / "again", seed=0)
    a, b = file_bytes(out), file_bytes(tmp_path / "again")
    sites = [f"h0{i}" for i in range(1, 7)]
    assert sorted(a) == sorted([f"{s}/encounters.csv" for s in sites] + ["truth.json"]
                               + [f"{s}/generative/{t}.jsonl" for s in sites for t in ("extraction", "triage")]
                               + [f"{s}/clinfed-policy.toml" for s in sites])
    assert a == b
    generate_federation(tmp_path / "other", seed=1)
    c = file_bytes(tmp_path / "other")
    assert all(a[k] != c[k] for k in a if not k.endswith("clinfed-policy.toml"))


def test_each_synthetic_hospital_has_its_own_policy_file(fed):
    """Synthetic hospitals let their local adapter travel and their made-up records be borrowed
    (`augmented`); they keep the safe default k."""
    from clinfed.common.policy import load_site_policy

    out, _ = fed
    pol = load_site_policy(out / "h01" / "clinfed-policy.toml")
    assert pol.share_local_adapters and not pol.refuse_instance_moving and pol.min_cell_size is None
    generate_federation(out.parent / "nopolicy", seed=0, sizes=[30, 20], site_policy=None)
    assert not list((out.parent / "nopolicy").rglob("clinfed-policy.toml"))


def test_every_site_meets_the_contract(fed):
    out, truth = fed
    sites = list_sites(out)
    assert [n for n, _ in sites] == ["h01", "h02", "h03", "h04", "h05", "h06"]
    for (name, folder), st in zip(sites, truth["sites"]):
        df = read_site_table(folder, warn=False)
        assert len(df) == st["size"] and int(df["readmitted_30d"].sum()) == st["n_positive"]
        assert df["encounter_id"].str.startswith(f"{name}-").all()
        assert not df["discharge_date"].is_monotonic_increasing  # random order, not sorted by date
        assert df[["age", "sex", "insurance", "n_comorbidities", "region", "died"]].notna().all().all()
        assert df["age"].between(18, 100).all()


def test_sizes_default_skewed_and_explicit(fed, tmp_path):
    _, truth = fed
    sizes = [s["size"] for s in truth["sites"]]
    assert sizes == default_sizes(6) and sizes[0] == 2000 and 190 <= sizes[-1] <= 210
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert len(default_sizes(10)) == 10 and default_sizes(10)[0] == 2000 and default_sizes(10)[-1] == 200
    t = generate_federation(tmp_path / "x", seed=5, sizes=[40, 3000, 25])
    assert [s["size"] for s in t["sites"]] == [40, 3000, 25]
    assert len(read_site_table(tmp_path / "x" / "h03", warn=False)) == 25


def test_rates_differ_and_small_sites_are_higher(fed):
    _, truth = fed
    rates = [s["base_rate"] for s in truth["sites"]]
    assert max(rates) - min(rates) > 0.08
    assert all(0.05 < r < 0.45 for r in rates)
    assert np.mean(rates[-2:]) > np.mean(rates[:2])
    words = [s["mean_words_per_note"] for s in truth["sites"]]
    assert min(words) < 90 and max(words) > 170  # note length varies by site


def test_truth_has_documented_keys(fed):
    out, truth = fed
    assert json.loads((out / "truth.json").read_text()) == truth
    for key in ("seed", "version", "sites", "label_model", "planted_error_drivers", "temporal_drift",
                "expected", "bayes_auc"):
        assert key in truth
    site_keys = {"name", "size", "base_rate", "intercept", "age_mean", "comorbidity_rate", "insurance_mix",
                 "dominant_region", "vocab_style", "template", "mean_words_per_note", "concept_shifts",
                 "bayes_auc"}
    assert all(site_keys <= set(s) for s in truth["sites"])
    lm = truth["label_model"]
    assert len([c for c, k in lm["concept_kind"].items() if k == "risk"]) >= 8
    assert 3 <= len([c for c, k in lm["concept_kind"].items() if k == "protective"]) <= 5
    assert truth["planted_error_drivers"] == ["n_comorbidities", "age", "insurance"]
    assert truth["temporal_drift"]["cutoff_date"] == "2023-05-26"
    assert truth["expected"]["largest_gain_from_local_fine_tuning"][0] == "h06"
    assert 0.78 <= truth["bayes_auc"]["overall"] <= 0.88
    # smaller sites carry larger planted shifts
    assert sum(map(abs, truth["sites"][-1]["concept_shifts"].values())) > \
        sum(map(abs, truth["sites"][0]["concept_shifts"].values()))


def test_concepts_appear_with_site_vocabulary(fed):
    out, truth = fed
    for st in truth["sites"]:
        notes = pd.read_csv(out / st["name"] / "encounters.csv", usecols=["note_text"])["note_text"]
        primary = st["vocabulary"]["prior_admissions"][0]
        assert notes.str.contains(primary, regex=False).any()
        # the informative part stays inside the first ~100 words
        assert st["frac_informative_over_100_words"] < 0.02


def test_learnable_but_not_trivial_and_planted_hardness(fed):
    out, truth = fed
    parts = {"train": [], "test": []}
    for _, folder in list_sites(out):
        sp = split_site(read_site_table(folder, warn=False), seed=0)
        parts["train"].append(sp["train"])
        parts["test"].append(sp["test"])
    train, test = pd.concat(parts["train"]), pd.concat(parts["test"])
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(vec.fit_transform(train["note_text"]), train["readmitted_30d"])
    score = lr.predict_proba(vec.transform(test["note_text"]))[:, 1]
    auc = roc_auc_score(test["readmitted_30d"], score)
    assert 0.65 < auc < 0.95, auc
    g = truth["bayes_auc"]["by_group"]
    assert g["hard_age80plus_or_comorb5plus"]["bayes_auc"] < g["rest"]["bayes_auc"] - 0.05
    assert g["age_80plus"]["bayes_auc"] < g["age_under_80"]["bayes_auc"]
    assert g["comorbidities_5plus"]["bayes_auc"] < g["comorbidities_under_5"]["bayes_auc"]


# ------------------------------------------------------------------ known-answer scenarios
SCENARIO_SIZES = [800, 600, 400, 300]


def _site_frames(root):
    return {name: read_site_table(path, warn=False) for name, path in list_sites(root)}


def _spread(frames, stat):
    vals = [stat(df) for df in frames.values()]
    return max(vals) - min(vals)


def test_the_default_scenario_is_the_generator_without_one(fed, tmp_path):
    out, _ = fed
    generate_federation(tmp_path / "named", seed=0, scenario="default")
    assert file_bytes(tmp_path / "named") == file_bytes(out)
    with pytest.raises(ValueError, match="scenario"):
        generate_federation(tmp_path / "bad", seed=0, scenario="nonsense")


def test_exchangeable_sites_share_one_population(tmp_path):
    """The per-site spread of case mix, note length and readmission rate collapses to sampling
    noise; under the default scenario the same seed and sizes plant real differences."""
    spreads = {}
    for scenario in ("default", "exchangeable"):
        root = tmp_path / scenario
        truth = generate_federation(root, seed=2, sizes=SCENARIO_SIZES, scenario=scenario, generative=False)
        frames = _site_frames(root)
        spreads[scenario] = {
            "age": _spread(frames, lambda d: d["age"].mean()),
            "comorbidities": _spread(frames, lambda d: d["n_comorbidities"].mean()),
            "words": _spread(frames, lambda d: d["note_text"].str.split().str.len().mean()),
            "rate": _spread(frames, lambda d: d["readmitted_30d"].mean()),
        }
        if scenario == "exchangeable":
            assert truth["scenario"] == "exchangeable"
            assert all(not st["concept_shifts"] and not st["drift"] for st in truth["sites"])
            assert len({json.dumps(st["vocabulary"], sort_keys=True) for st in truth["sites"]}) == 1
            assert len({st["template"] for st in truth["sites"]}) == 1
            assert truth["expected"]["largest_gain_from_local_fine_tuning"] == []
        else:
            assert "scenario" not in truth  # the default's truth.json is unchanged
    d, e = spreads["default"], spreads["exchangeable"]
    for key in ("age", "comorbidities", "words"):
        assert e[key] < 0.3 * d[key], (key, d, e)
    # readmission rates: four samples of one rate (about 0.2) differ by sampling noise only
    assert e["rate"] < 0.08, e


def _cue_rate_difference(frames, words):
    """Readmission rate with the cue's words in the note minus without, pooled over frames."""
    df = pd.concat(frames)
    text = df["note_text"].str.lower()
    has = np.zeros(len(df), dtype=bool)
    for w in words:
        has |= text.str.contains(w.lower(), regex=False).to_numpy()
    y = df["readmitted_30d"].to_numpy()
    assert 20 <= has.sum() <= len(df) - 20
    return y[has].mean() - y[~has].mean()


def test_concept_shift_reverses_the_cue_at_the_named_sites(tmp_path):
    root = tmp_path / "cs"
    truth = generate_federation(root, seed=1, sizes=SCENARIO_SIZES, scenario="concept-shift",
                                shifted_sites="h02,h04", generative=False)
    shift = truth["concept_shift"]
    assert truth["scenario"] == "concept-shift" and shift["sites"] == ["h02", "h04"]
    assert truth["expected"]["largest_gain_from_local_fine_tuning"] == ["h02", "h04"]
    frames = _site_frames(root)
    cue = "prior_admissions"
    assert cue in shift["cues"] and shift["cues"][cue]["weight_at_shifted_sites"] < 0 < shift["cues"][cue]["weight"]
    words = shift["words"][cue]
    at_shifted = _cue_rate_difference([frames[s] for s in ("h02", "h04")], words)
    elsewhere = _cue_rate_difference([frames[s] for s in ("h01", "h03")], words)
    assert elsewhere > 0.05 and at_shifted < -0.05, (elsewhere, at_shifted)
    # the cue is written in the same words everywhere: only its meaning changed
    assert len({json.dumps(st["vocabulary"], sort_keys=True) for st in truth["sites"]}) == 1
    with pytest.raises(ValueError, match="shifted"):
        generate_federation(tmp_path / "bad", seed=1, sizes=SCENARIO_SIZES, scenario="concept-shift",
                            shifted_sites="h09")
