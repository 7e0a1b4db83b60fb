"""Disclosure control from a curious server's side: whatever a site releases, subtracting the
released parts of a whole from the whole never isolates 1 to k-1 patients, positives or negatives.

The property test draws many random site tables and k and reads the site's real release
functions (`common.metrics`: the evaluation plan and its flattened cells, the describe reply)
the way the server receives them; the arithmetic of the attack is written out here, not taken
from `common.disclosure`, so the test does not check the rule with itself."""

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from clinfed.common.disclosure import Counts, protect, releasable, remainder_safe
from clinfed.common.metrics import (
    EVAL_SPLITS,
    describe_release,
    eval_plan,
    flatten_split,
    parse_cells,
    subgroup_labels,
)
from clinfed.common.privacy import check_reply

EDGES = [117.0, 163.0, 197.0]
VOCAB = ["north", "south", "New York"]


def random_table(rng, n):
    """A site table with skewed bands, missing values and free-text regions."""
    miss = rng.random() * 0.15
    age = rng.choice([30.0, 50.0, 70.0, 85.0], n, p=rng.dirichlet(np.ones(4) * 0.7))
    age[rng.random(n) < miss] = np.nan
    com = rng.poisson(rng.random() * 4, n).astype(float)
    com[rng.random(n) < miss] = np.nan
    ins = rng.choice(["commercial", "government", "self_pay", "unspecified", "other"], n,
                     p=rng.dirichlet(np.ones(5) * 0.5)).astype(object)
    ins[rng.random(n) < miss] = None
    reg = rng.choice(["north", "South ", "new  york", "Jane Doe MRN 123", "east"], n,
                     p=rng.dirichlet(np.ones(5) * 0.6)).astype(object)
    reg[rng.random(n) < miss] = None
    return pd.DataFrame({
        "note_text": [" ".join(["w"] * int(w)) for w in rng.integers(60, 260, n)],
        "readmitted_30d": (rng.random(n) < rng.uniform(0.02, 0.7)).astype(int),
        "age": age, "n_comorbidities": com, "insurance": ins, "region": reg,
        "died": (rng.random(n) < 0.15).astype(float),
    })


def random_splits(rng, df):
    part = rng.choice(4, len(df), p=rng.dirichlet(np.ones(4) * 2))
    return {s: df[part == i].reset_index(drop=True) for i, s in enumerate(("train", "val", "test", "temporal"))}


def assert_no_isolation(whole_n, whole_pos, released, k, what):
    """The attack: the whole minus the released parts. `released`: [(n, pos or None)]."""
    n = whole_n - sum(r[0] for r in released)
    assert n == 0 or n >= k, f"{what}: {n} patient(s) isolated"
    if whole_pos is not None and n > 0 and all(r[1] is not None for r in released):
        pos = whole_pos - sum(r[1] for r in released)
        assert pos >= k and n - pos >= k, f"{what}: {pos} positive(s), {n - pos} negative(s) isolated"


def test_protect_withholds_a_complement_and_nothing_more():
    bands = {"a": Counts(40, 12), "b": Counts(30, 11), "c": Counts(25, 10), "d": Counts(1, 1)}
    assert protect(bands, 10) == {"a", "b"}  # d alone would be readable; c is the smallest fix
    assert protect({"a": Counts(40, 12), "b": Counts(30, 11)}, 10) == {"a", "b"}
    assert protect(bands, 10, whole_released=False) == set()
    assert not releasable(Counts(30, 25), 10) and releasable(Counts(30, 15), 10)  # negatives count too
    assert remainder_safe([], 10) and remainder_safe([Counts(0, 0)], 10)
    assert not remainder_safe([Counts(12, 0)], 10)  # "all of them negative" is a disclosure too
    # a band kept because it is released elsewhere is never the complement
    assert protect({"a": Counts(40), "b": Counts(15), "c": Counts(3)}, 10, keep={"b"}) == {"b"}


def test_no_grouping_leaks_by_subtraction_over_many_random_sites():
    """Seeded property test: 400 random site tables, k from 2 to 15, every grouping of the
    evaluation cells and of the describe reply; the whole minus the released parts is
    always nobody or at least k patients, k positives and k negatives."""
    rng = np.random.default_rng(20261124)
    checked = released_bands = 0
    for it in range(400):
        k = int(rng.integers(2, 16))
        df = random_table(rng, int(rng.integers(0, 500)))
        splits = random_splits(rng, df)
        # ---- evaluation cells of every test split
        for split in EVAL_SPLITS:
            part = splits[split]
            if len(part) == 0:
                continue
            y = part["readmitted_30d"].to_numpy()
            labels = subgroup_labels(part, EDGES, VOCAB)
            plan = eval_plan(y, labels, k, EDGES, VOCAB)
            if it % 25 == 0:  # the flattened record agrees with the plan and passes the guard
                p = rng.random(len(y))
                rec = flatten_split("global", split, y, p, 0.5, labels, plan, seed=0, n_boot=4, region_vocabulary=VOCAB)
                assert check_reply(RecordDict({"metrics": MetricRecord(rec)}), "evaluate", adapter_shapes={},
                                   site_name="h01", allow_adapters=True, min_cell_size=k) == []
                cells = {sub: v for (_, _, sub), v in parse_cells(rec).items()}
                assert ("suppressed" in cells["all"]) != plan[("all", "")]
            whole = (len(y), int(y.sum())) if plan[("all", "")] else None
            for group, lab in labels.items():
                rel = [(int((lab == b).sum()), int(y[lab == b].sum())) for (g, b), ok in plan.items()
                       if g == group and ok]
                for n_b, pos_b in rel:
                    assert n_b >= k and pos_b >= k and n_b - pos_b >= k
                released_bands += len(rel)
                if whole is None:
                    assert not rel, "bands of a withheld split were released"
                    continue
                assert_no_isolation(whole[0], whole[1], rel, k, f"it {it} {split} {group}")
                checked += 1
        # ---- the describe reply: split sizes and descriptors
        rec = describe_release(splits, k, EDGES, VOCAB)
        assert check_reply(RecordDict({"site": ConfigRecord({"name": "h01"}), "metrics": MetricRecord(rec)}),
                           "query.describe", adapter_shapes={}, site_name="h01", allow_adapters=True,
                           min_cell_size=k) == []
        if "desc/n" not in rec:
            continue
        n = int(rec["desc/n"])
        assert n == len(df)
        sizes = [(int(v), None) for key, v in rec.items() if key.startswith("site-n-")]
        assert_no_isolation(n, None, sizes, k, f"it {it} split sizes")
        for group in ("age", "comorbidity", "insurance", "region"):
            shares = [(int(round(v * n)), None) for key, v in rec.items() if key.startswith(f"desc/{group}=")]
            assert_no_isolation(n, None, shares, k, f"it {it} descriptor {group}")
            checked += 1
        if "desc/readmission_rate" in rec:
            pos = int(round(rec["desc/readmission_rate"] * n))
            labelled = [(len(splits[s]), int(splits[s]["readmitted_30d"].sum())) for s in EVAL_SPLITS
                        if releasable(Counts(len(splits[s]), int(splits[s]["readmitted_30d"].sum())), k)]
            assert_no_isolation(n, pos, labelled, k, f"it {it} readmission rate against the splits")
    assert checked > 2000 and released_bands > 1000, (checked, released_bands)


def test_the_guard_refuses_a_release_that_subtraction_opens():
    """Primary suppression alone (the old release): `all` minus the released age bands gives
    away the one 80+ patient; the guard refuses it, and its refusal text names no key."""
    from clinfed.common.metrics import CellResult, flatten_cell

    rec = flatten_cell("global", "test", "all", CellResult("ok", n=41, values={"positives": 11, "auc": .7}))
    rec.update(flatten_cell("global", "test", "age=<45", CellResult("ok", n=20, values={"positives": 5, "auc": .7})))
    rec.update(flatten_cell("global", "test", "age=45-64", CellResult("ok", n=20, values={"positives": 5, "auc": .7})))
    rec.update(flatten_cell("global", "test", "age=80+", CellResult("suppressed")))
    problems = check_reply(RecordDict({"metrics": MetricRecord(rec)}), "evaluate", adapter_shapes={},
                           site_name="h01", allow_adapters=True, min_cell_size=5)
    assert any("isolates 1 patient" in p for p in problems), problems


@pytest.mark.parametrize("k", [5, 10])
def test_descriptor_shares_and_mortality_follow_the_rule(k):
    rng = np.random.default_rng(3)
    df = random_table(rng, 300)
    df["insurance"] = ["government"] * 200 + ["commercial"] * 97 + ["self_pay"] * 3
    df["age"] = 50.0
    df.loc[:2, "age"] = np.nan  # three patients with an unknown age: a band of their own
    splits = {"train": df.iloc[:200], "val": df.iloc[200:230], "test": df.iloc[230:270], "temporal": df.iloc[270:]}
    rec = describe_release(splits, k, EDGES, VOCAB)
    ins = {key: round(v * 300) for key, v in rec.items() if key.startswith("desc/insurance=")}
    assert "desc/insurance=self_pay" not in ins and "desc/insurance=commercial" not in ins  # its complement
    assert ins == {"desc/insurance=government": 200}
    assert not any(key.startswith("desc/age=") for key in rec)  # 297 vs 3 unknown: nothing to release
