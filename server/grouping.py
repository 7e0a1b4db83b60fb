"""Which sites belong together: descriptor space, k-means clusters, similarity weights.

Sites are compared by the aggregate descriptors they released at `describe`
(shares of age bands, comorbidity levels, insurance, regions, word bands, rates;
size excluded, since similarity is about case mix). The `cluster` regime runs
federated rounds within each k-means cluster; the `similarity-weighted` regime
starts each site from the other sites' last-round adapters weighted by closeness.
Both use only what the sites already released: no record, no new adapter.
"""

from __future__ import annotations

import numpy as np


def impute_withheld_shares(X: np.ndarray, feats: list[str], col_mean: np.ndarray) -> np.ndarray:
    """Fill a site's withheld band shares from what it did release: the withheld bands of a
    grouping together hold 1 minus its released shares (disclosure control releases shares so
    that this remainder is nobody or at least k patients), split in proportion to the other
    sites' mean shares of those bands. A withheld complement (a band withheld only to protect
    a small one) thus stays near its true size instead of jumping to the federation's mean,
    which would move the site in descriptor space and regroup the clusters."""
    X = X.copy()
    groups: dict[str, list[int]] = {}
    for j, f in enumerate(feats):
        if "=" in f:
            groups.setdefault(f.split("=", 1)[0], []).append(j)
    for i in range(X.shape[0]):
        for cols in groups.values():
            missing = [j for j in cols if np.isnan(X[i, j])]
            if not missing or len(missing) == len(cols):
                continue
            rest = max(0.0, 1.0 - float(np.nansum(X[i, cols])))
            w = np.array([max(0.0, float(col_mean[j])) for j in missing])
            w = w / w.sum() if w.sum() > 0 else np.full(len(missing), 1.0 / len(missing))
            X[i, missing] = rest * w
    return X


def descriptor_matrix(names: list[str], descriptors: dict[str, dict[str, float]]) -> tuple[np.ndarray, list[str]]:
    """Standardized site descriptors, one row per site (size excluded: similarity is about case mix)."""
    feats = sorted({k for s in names for k in descriptors.get(s, {}) if k != "n"})
    X = np.array([[descriptors.get(s, {}).get(f, np.nan) for f in feats] for s in names], dtype=float)
    if X.size == 0:
        return np.zeros((len(names), 0)), []
    col_mean = np.nanmean(np.where(np.isnan(X), np.nan, X), axis=0)
    X = impute_withheld_shares(X, feats, np.nan_to_num(col_mean))
    X = np.where(np.isnan(X), np.nan_to_num(col_mean), X)
    sd = X.std(axis=0)
    keep = sd > 1e-12
    X = (X[:, keep] - X[:, keep].mean(axis=0)) / sd[keep]
    return X, [f for f, k in zip(feats, keep) if k]


def kmeans_assignment(names: list[str], X: np.ndarray, k: int, seed: int) -> dict[str, str]:
    """Each site's cluster (`c0`, `c1`, ...): k-means on the standardized descriptors."""
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, n_init=10, random_state=int(seed)).fit_predict(X)
    return {s: f"c{int(c)}" for s, c in zip(names, labels)}


def similarity_mix(names: list[str], X: np.ndarray, states: dict[str, dict[str, np.ndarray]]
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, float]]]:
    """Per site, the other sites' adapters averaged with weights exp(-d / median d), d the distance
    between standardized descriptors; returns (starting adapters, weights)."""
    starts, weights = {}, {}
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)) if X.size else np.zeros((len(names),) * 2)
    off = D[~np.eye(len(names), dtype=bool)]
    tau = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
    for i, s in enumerate(names):
        others = [(j, o) for j, o in enumerate(names) if o != s and o in states]
        if not others:
            continue
        w = np.array([np.exp(-D[i, j] / tau) for j, _ in others])
        w = w / w.sum()
        weights[s] = {o: round(float(x), 4) for (_, o), x in zip(others, w)}
        keys = states[others[0][1]].keys()
        starts[s] = {k: sum(wi * states[o][k] for wi, (_, o) in zip(w, others)).astype(np.float32) for k in keys}
    return starts, weights


def ifca_inits(init_state: dict[str, np.ndarray], k: int, seed: int) -> list[dict[str, np.ndarray]]:
    """k different starting adapters for IFCA (Ghosh et al. 2020 start its k models at random),
    seeded: the first is the model's own initial adapter; every other one redraws the arrays the
    model itself initializes at random (LoRA A and the classification head's weights) from a normal
    with that array's mean and spread. LoRA B stays zero (LoRA's start) and the pooler keeps its
    pretrained weights (the model does not draw them at random, so neither do the other starts).
    The k adapters thus differ at round 1 through their heads, each drawn like the model's own.
    On exchangeable sites every site may pick the same adapter every round (a tiny three-site
    study did): IFCA then equals `global` with other batches, which is its answer there."""
    out = [dict(init_state)]
    for j in range(1, k):
        rng = np.random.default_rng([int(seed), 7177, j])
        state = {}
        for key, arr in sorted(init_state.items()):
            sd = float(np.std(arr)) if arr.size else 0.0
            fresh = "lora_A" in key or (key.endswith("weight") and any(
                f".{h}." in f".{key}" for h in ("classifier", "score")) and "pooler" not in key)
            state[key] = (rng.normal(float(np.mean(arr)), sd, size=arr.shape).astype(arr.dtype)
                          if fresh and sd > 0 else arr.copy())
        out.append(state)
    return out
