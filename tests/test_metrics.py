"""Site metrics: AUC, suppression, subgroups, descriptors and the error-driver model."""

import numpy as np
import pandas as pd
import pytest

from clinfed.common.error_drivers import error_driver_importance
from clinfed.common.metrics import (
    auc_roc,
    cell_metrics,
    cell_rows,
    flatten_cell,
    score_cell,
    site_descriptors,
    subgroup_labels,
)

EDGES = [117.0, 163.0, 197.0]


def frame(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "note_text": [" ".join(["w"] * int(k)) for k in rng.integers(60, 260, n)],
        "readmitted_30d": rng.integers(0, 2, n),
        "age": rng.integers(20, 95, n).astype(float),
        "n_comorbidities": rng.poisson(2.5, n).astype(float),
        "insurance": rng.choice(["commercial", "government", "self_pay"], n),
        "region": rng.choice(["north", "south"], n),
        "died": (rng.random(n) < 0.2).astype(float),
    })


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) + 0.3 * y
    assert auc_roc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_small_cells_are_suppressed_and_single_class_is_not_computable():
    y = np.array([0] * 40 + [1] * 9)
    assert cell_metrics(y, np.linspace(0, 1, 49), 0.5, k=10, seed=0).status == "suppressed"
    # k positives but fewer than k negatives: withheld too (negatives are counted like positives)
    y = np.array([1] * 30 + [0] * 9)
    assert cell_metrics(y, np.linspace(0, 1, 39), 0.5, k=10, seed=0).status == "suppressed"
    # a cell where every patient was readmitted is withheld, never released with its n
    ones = cell_metrics(np.ones(30, int), np.linspace(0, 1, 30), 0.5, k=10, seed=0)
    assert ones.status == "suppressed"
    assert flatten_cell("global", "test", "all", ones) == {"eval/global/test/all/suppressed": 1}
    # scoring itself still says why a one-class cell has no AUC (disclosure control never releases one)
    scored = score_cell(np.ones(30, int), np.linspace(0, 1, 30), 0.5, seed=0)
    assert scored.status == "not_computable"
    rows = cell_rows("h01", flatten_cell("global", "test", "all", scored))
    assert all(r["value"] is None for r in rows if r["metric"] == "auc")
    assert "one class" in [r for r in rows if r["metric"] == "auc"][0]["note"]


def test_subgroup_bands():
    df = pd.DataFrame({"note_text": ["a " * 100, "a " * 150, "a " * 300], "age": [30.0, 70.0, 85.0],
                       "n_comorbidities": [0.0, 2.0, 7.0], "insurance": ["government"] * 3, "region": ["n"] * 3})
    lab = subgroup_labels(df, EDGES)
    assert list(lab["age"]) == ["<45", "65-79", "80+"]
    assert list(lab["comorbidity"]) == ["0", "1-2", "5+"]
    assert list(lab["words"]) == ["q1", "q2", "q4"]


def test_descriptors_withhold_small_shares():
    df = frame(200)
    df.loc[:4, "insurance"] = "other"  # 5 patients: below k
    d = site_descriptors(df, k=10, word_edges=EDGES)
    assert d["n"] == 200 and 0 < d["readmission_rate"] < 1
    assert "insurance=other" not in d and "insurance=government" in d
    assert site_descriptors(df.iloc[:8], k=10, word_edges=EDGES) == {}


def test_error_driver_model_finds_the_planted_driver():
    df = frame(1200, seed=3)
    rng = np.random.default_rng(4)
    y = df["readmitted_30d"].to_numpy()
    # scores informative except for multi-morbid patients, whose scores are noise
    hard = df["n_comorbidities"].to_numpy() >= 5
    p = np.where(hard, rng.random(len(y)), 0.3 + 0.4 * y + 0.2 * rng.random(len(y)))
    imp, n = error_driver_importance(df, y, p, seed=0, k=10, word_edges=EDGES, region_vocabulary=["north", "south"])
    assert n == 1200
    assert max(imp, key=imp.get) == "n_comorbidities", imp
    assert imp["n_comorbidities"] > 5 * max(abs(imp["region"]), abs(imp["insurance"]))


def test_a_score_shift_counts_far_less_than_a_loss_of_separation():
    """A band whose scores are all moved up, but ranked as well as the rest, is at most a weak
    driver (it lowers the site's AUC a little); the old median-split error flag called most of
    its negatives errors and ranked it first."""
    df = frame(2000, seed=5)
    rng = np.random.default_rng(6)
    y = df["readmitted_30d"].to_numpy()
    p = 0.6 * y + rng.normal(0, 0.5, len(y))
    shifted = df["n_comorbidities"].to_numpy() >= 4
    p_shift = p + 1.5 * shifted
    hard = df["age"].to_numpy() >= 80
    p_shift = np.where(hard, rng.normal(0, 0.5, len(y)) + 0.1 * y + 1.5 * shifted, p_shift)
    imp, _ = error_driver_importance(df, y, p_shift, seed=0, k=10, word_edges=EDGES)
    assert max(imp, key=imp.get) == "age", imp
    assert imp["n_comorbidities"] < 0.5 * imp["age"], imp
