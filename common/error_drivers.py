"""Which patient features drive the global model's ranking errors at a site (computed there).

Why not a per-instance error indicator. The first version modelled a 0/1
"misranked" flag (a positive below the negatives' median score, a negative
above the positives' median) and ranked features by how well they predicted
it. That flag mixes two things. A group whose scores are all shifted up (a
higher-risk group: many comorbidities, older, government insurance) has its
negatives flagged and its positives cleared, so the flag's rate in the group
follows its score level and its class mix, not how well the model ranks its
patients. On generated federations (simulations.generate) the planted
hardness is latent label noise, i.e. a loss of separation *within* the group;
the shift dominated the flag (5+ comorbidities: 7 % of positives flagged vs
50 % of negatives), so a feature that only moves scores (note length) beat
planted `age` and `insurance`, and recovery of all three planted drivers was
at chance level (3 of 10 generator seeds).

What replaces it. A driver is a feature whose bands the model ranks
differently well: for each band, the AUC among the band's own patients
(positives and negatives of the same band, so a band-wide score shift cancels
exactly), compared with the site's AUC. The importance of a feature is the
n-weighted mean over its bands of the squared difference, minus the DeLong
variance of the band's AUC, i.e. an estimate of the between-band spread in
ranking quality that sampling noise alone does not explain (about 0 for a
feature that does not matter, whatever its number of bands). Only the
importances and n leave the site, as before.
"""

from __future__ import annotations

import numpy as np

# Feature groupings of common.metrics.subgroup_labels -> the driver names the study reports.
DRIVER_GROUPS = {"age": "age", "comorbidity": "n_comorbidities", "insurance": "insurance",
                 "region": "region", "words": "words_per_note"}
# A band's own AUC needs some patients of each class; a band with fewer is left out of the sum
# (it still counts in n), so a sparse band cannot add a huge, noise-only squared deviation.
MIN_CLASS_IN_BAND = 3


def band_ranking_spread(y: np.ndarray, p: np.ndarray, labels: np.ndarray,
                        min_class: int = MIN_CLASS_IN_BAND) -> float:
    """Mean over patients of (AUC of their band - site AUC)^2 less the band AUC's DeLong variance."""
    from clinfed.common.stats import auc_delong

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    a_all, _ = auc_delong(y, p)
    total = 0.0
    for band in sorted(set(labels)):
        m = labels == band
        n1 = int(y[m].sum())
        if n1 < min_class or int(m.sum()) - n1 < min_class:
            continue
        a, var = auc_delong(y[m], p[m])
        total += int(m.sum()) * ((a - a_all) ** 2 - var)
    return total / len(y)


def error_driver_importance(df, y: np.ndarray, p: np.ndarray, seed: int, k: int,
                            word_edges: list[float], repeats: int = 10,
                            region_vocabulary=()) -> tuple[dict[str, float], int]:
    """Importance of each patient feature as a driver of ranking error at this site, and n.

    Nothing is released below 2k patients or k positives and k negatives. A feature
    whose column the table lacks, or whose patients all fall in one band, gets no
    importance. `seed` and `repeats` are kept for the caller's signature: the
    estimate is deterministic and needs no resampling.
    """
    from clinfed.common.metrics import subgroup_labels

    y = np.asarray(y).astype(int)
    n = len(y)
    pos = int(y.sum())
    if n < 2 * k or min(pos, n - pos) < k:
        return {}, n
    labels = subgroup_labels(df, word_edges, region_vocabulary)
    out: dict[str, float] = {}
    for key, driver in DRIVER_GROUPS.items():
        lab = labels.get(key)
        if lab is None or len(set(lab)) < 2:
            continue
        out[driver] = float(band_ranking_spread(y, p, lab))
    return out, n
