"""Does the error-driver analysis recover the planted drivers? Over several generator seeds.

For each seed: generate a federation (sizes = factor x the default sizes, default planted
strength), fit a cheap but real text model (TF-IDF words and word pairs + logistic regression
on all sites' training splits pooled, what a global model approximates), run the site-level
driver analysis (common.error_drivers) on each site's test and temporal splits and combine the
sites as server.analysis.patient_drivers does. A seed is a hit when the planted drivers fill
the top of the ranking. `python -m clinfed.simulations.driver_recovery --seeds 0-9 --size-factor 3`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from clinfed.common.data import list_sites, read_site_table, split_site
from clinfed.common.error_drivers import error_driver_importance
from clinfed.common.metrics import EVAL_SPLITS, parse_edges
from clinfed.server.analysis import patient_drivers
from clinfed.simulations.generate import REGIONS, default_sizes, generate_federation

WORD_EDGES = "117,163,197"  # the run config's default `word-bands`


def driver_ranking(data, k: int = 10, importance=error_driver_importance) -> list[str]:
    """Patient-level drivers of a pooled TF-IDF model's errors on a generated federation, first first."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    edges = parse_edges(WORD_EDGES)
    sites = {name: split_site(read_site_table(path, warn=False), seed=0) for name, path in list_sites(data)}
    train = pd.concat([s["train"] for s in sites.values()])
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=50000, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(train["note_text"]), train["readmitted_30d"])
    rows = []
    for i, (name, s) in enumerate(sites.items()):
        df = pd.concat([s[key] for key in EVAL_SPLITS]).reset_index(drop=True)
        p = clf.predict_proba(vec.transform(df["note_text"]))[:, 1]
        imp, n = importance(df, df["readmitted_30d"].to_numpy(int), p, seed=i, k=k, word_edges=edges,
                            region_vocabulary=list(REGIONS))
        rows += [{"site": name, "driver": d, "importance": v, "n": n} for d, v in imp.items()]
    return patient_drivers(pd.DataFrame(rows))["driver"].tolist()


def recovery(seeds, size_factor: float = 1.0, workdir=None) -> list[dict]:
    """Per seed: the ranking, the planted drivers and whether they fill the top."""
    sizes = [int(round(size_factor * s)) for s in default_sizes()]
    out = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for seed in seeds:
            data = Path(tmp) / f"fed{seed}"
            truth = generate_federation(data, seed=seed, sizes=sizes, generative=False, site_policy=None)
            planted = list(truth["planted_error_drivers"])
            ranking = driver_ranking(data)
            out.append({"seed": seed, "ranking": ranking, "planted": planted,
                        "hit": set(ranking[: len(planted)]) == set(planted)})
    return out


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(v) for v in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-4", help="generator seeds: 0-9 or 0,3,5")
    p.add_argument("--size-factor", type=float, default=1.0, help="sites are this times the default sizes")
    args = p.parse_args(argv)
    res = recovery(_seeds(args.seeds), args.size_factor)
    for r in res:
        print(f"seed {r['seed']}: {'hit ' if r['hit'] else 'miss'} {', '.join(r['ranking'])}")
    print(f"planted drivers in the top {len(res[0]['planted'])}: {sum(r['hit'] for r in res)} of {len(res)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
