"""The error-driver analysis recovers the drivers the generator planted, far from chance.

Property: on generated federations at the generator's default strength, the site-level
driver analysis (common.error_drivers, run at each site on a global model's scores for its
test and temporal splits, n-weighted across sites as server.analysis.patient_drivers does)
puts the three planted drivers (n_comorbidities, age, insurance) in its top 3 of the 5
candidates (those plus region and words_per_note).

Chance rate. Under a ranking that ignores the data every order of the 5 drivers is equally
likely, so the planted 3 fill the top 3 with probability 1 / C(5, 3) = 0.1 per seed, and in
at least 4 of 5 independent seeds with probability 5 * 0.1**4 * 0.9 + 0.1**5 = 0.00046
(0.046 %, well under 1 %). The old median-split error flag met the per-seed criterion in
6 of 12 seeds at these sizes (3 of 10 at the default sizes); the within-band measure in 10
of 12 (5 of 10): see docs/results/default-study.md for the command.

The model. Five full studies (MiniLM + LoRA, federated rounds) do not fit in the suite's
time, so the scores come from a cheap but real text model fitted to the generated notes:
TF-IDF (words and word pairs) and logistic regression trained on all sites' training
splits pooled (what a global model approximates), scored on each site's held-out splits.
Its errors come from the notes, not from the truth file, like the federated model's; it
ranks a little better than a two-round MiniLM (site AUCs about 0.7). Sites are three times
the default sizes (6000 down to 600 encounters): planted strength unchanged, but the
hardness in an imperfect model's errors is a few AUC points, which the default federation's
2,000 held-out patients do not separate from noise reliably.

The gain-versus-size check of the old test (two small vs two large sites) is not here: it
belongs to the meta-regression of the per-site differences.
"""

import time

import pandas as pd

from clinfed.common.data import list_sites, read_site_table, split_site
from clinfed.common.error_drivers import error_driver_importance
from clinfed.common.metrics import EVAL_SPLITS, parse_edges
from clinfed.server.analysis import patient_drivers
from clinfed.simulations.generate import REGIONS, default_sizes, generate_federation

SEEDS = (0, 1, 2, 3, 4)
SIZE_FACTOR = 3
MIN_HITS = 4
EDGES = parse_edges("117,163,197")


def _driver_ranking(data) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    sites = {name: split_site(read_site_table(path, warn=False), seed=0) for name, path in list_sites(data)}
    train = pd.concat([s["train"] for s in sites.values()])
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=50000, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(train["note_text"]), train["readmitted_30d"])
    rows = []
    for i, (name, s) in enumerate(sites.items()):
        df = pd.concat([s[k] for k in EVAL_SPLITS]).reset_index(drop=True)
        p = clf.predict_proba(vec.transform(df["note_text"]))[:, 1]
        imp, n = error_driver_importance(df, df["readmitted_30d"].to_numpy(int), p, seed=i, k=10,
                                         word_edges=EDGES, region_vocabulary=list(REGIONS))
        rows += [{"site": name, "driver": d, "importance": v, "n": n} for d, v in imp.items()]
    return patient_drivers(pd.DataFrame(rows))["driver"].tolist()


def test_planted_drivers_are_recovered_far_from_chance(tmp_path):
    t0 = time.perf_counter()
    sizes = [SIZE_FACTOR * s for s in default_sizes()]
    hits, seen = 0, {}
    for seed in SEEDS:
        data = tmp_path / f"fed{seed}"
        truth = generate_federation(data, seed=seed, sizes=sizes, generative=False, site_policy=None)
        ranking = _driver_ranking(data)
        assert len(ranking) == 5, ranking
        seen[seed] = ranking
        hits += set(ranking[:3]) == set(truth["planted_error_drivers"])
    assert hits >= MIN_HITS, (hits, seen)
    assert time.perf_counter() - t0 < 300  # a budget guard, far above the ~60 s it takes
