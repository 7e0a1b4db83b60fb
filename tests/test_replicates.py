"""Replicates: the same study with several training seeds on the same test patients, combined."""

import pandas as pd
import pytest

from clinfed.common.config import resolve
from clinfed.common.data import list_sites
from clinfed.server.findings import combine_replicates
from clinfed.server.study import Study
from clinfed.simulations.app import app as client_app
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes


@pytest.fixture(scope="module")
def replicated(small_federation, tmp_path_factory):
    dirs = []
    for seed in (0, 1):
        cfg = resolve({"model": "tiny-bert", "data-dir": str(small_federation), "num-server-rounds": 1,
                       "local-steps": 3, "personalize-steps": 2, "min-cell-size": 5, "batch-size": 8,
                       "regimes": "base,global,local", "seed": seed, "split-seed": 0, "report": False})
        run_dir = tmp_path_factory.mktemp(f"seed{seed}")
        Study(LocalGrid(client_app, simulated_nodes(len(list_sites(small_federation))), cfg), cfg, run_dir).execute()
        dirs.append(run_dir)
    out = tmp_path_factory.mktemp("combined")
    pd.read_csv(dirs[0] / "sites.csv").to_csv(out / "sites.csv", index=False)
    return dirs, out, combine_replicates(dirs, out)


def test_replicates_score_the_same_patients(replicated):
    """split-seed fixes the test patients: every cell has the same n and positives in both seeds,
    while the training seed changes the scores."""
    dirs, _, _ = replicated
    a, b = (pd.read_csv(d / "metrics.csv") for d in dirs)
    key = ["site", "regime", "split", "subgroup", "metric"]
    m = a.merge(b, on=key, suffixes=("_a", "_b"))
    counts = m[m.metric == "positives"]
    assert len(counts) > 0 and (counts.value_a.fillna(-1) == counts.value_b.fillna(-1)).all()
    assert (m.n_a.fillna(-1) == m.n_b.fillna(-1)).all()
    auc = m[(m.metric == "auc") & (m.regime == "local") & m.value_a.notna()]
    assert (auc.value_a != auc.value_b).any(), "the training seed did not change the local regime"


def test_combined_differences_follow_rubins_rules(replicated):
    dirs, out, frames = replicated
    per = pd.read_csv(out / "replicates.csv")
    assert set(per.replicate) == {1, 2}
    comb = pd.read_csv(out / "differences.csv")
    ok = comb[(comb.site != "pooled") & (comb.status == "ok")]
    assert len(ok) > 0
    for r in ok.itertuples():
        g = per[(per.site == r.site) & (per.regime == r.regime) & (per.reference == r.reference)
                & (per.split == r.split) & (per.subgroup == r.subgroup)]
        assert len(g) == 2 and (g.status == "ok").all()
        assert r.diff == pytest.approx(g["diff"].mean())
        within = (((g.hi - g.lo) / (2 * 1.959963984540054)) ** 2).mean()
        between = g["diff"].var(ddof=1)
        assert r.se ** 2 == pytest.approx(within + 1.5 * between, rel=1e-6)
        assert r.replicates == 2 and 0 <= r.consistent <= 2
    assert {"mean", "sd", "replicates"} <= set(pd.read_csv(out / "replicate_aucs.csv").columns)
    assert (out / "size_effects.csv").exists()
