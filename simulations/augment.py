"""`augmented` regime: a site's training set plus the most similar instances of other sites.

Moving patient records between hospitals is impossible in a real federation,
so this runs only in simulation, on synthetic data, where the simulated site
can read the other sites' folders. It is clinfed's operationalisation of the
study's instance-based augmented fine-tuning (whose selection rules were not
published): borrow the `augment-k` instances from other sites' training splits
whose nearest neighbour in the site's own training set is closest, in
standardized patient-feature space or in the base model's mean-pooled
embedding space.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clinfed.common.config import split_seed
from clinfed.common.data import find_table, list_sites, read_site_table, split_site
from clinfed.common.metrics import word_counts

FEATURE_COLUMNS = ("age", "n_comorbidities", "insurance", "region", "sex")
POOL_CAP = 4000  # other sites' instances considered, for bounded cost


def feature_matrix(frames: list[pd.DataFrame]) -> list[np.ndarray]:
    """Standardized numeric + one-hot patient features, on a shared encoding."""
    allf = pd.concat(frames, keys=range(len(frames)))
    parts = []
    for col in ("age", "n_comorbidities"):
        if col in allf:
            v = allf[col].astype(float).fillna(allf[col].astype(float).median())
            parts.append(((v - v.mean()) / (v.std() or 1.0)).to_numpy()[:, None])
    for col in ("insurance", "region", "sex"):
        if col in allf:
            parts.append(pd.get_dummies(allf[col].astype(str)).to_numpy(dtype=float))
    w = word_counts(allf["note_text"])
    parts.append(((w - w.mean()) / (w.std() or 1.0))[:, None])
    X = np.concatenate(parts, axis=1)
    sizes = np.cumsum([0] + [len(f) for f in frames])
    return [X[sizes[i]:sizes[i + 1]] for i in range(len(frames))]


def embeddings(lm, encoded: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states of the base model (the adapter at its init is a no-op)."""
    import torch

    from clinfed.common.training import collate, pick_device

    model = lm.use(lm.init_state)
    device = pick_device()
    out = []
    with torch.inference_mode():
        for i in range(0, len(encoded), batch):
            ids, mask = collate(encoded, np.arange(i, min(i + batch, len(encoded))), lm.tokenizer.pad_token_id, device)
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            m = mask.unsqueeze(-1).float()
            out.append(((hs.float() * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy())
    emb = np.concatenate(out)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)


def _nearest_distance(pool: np.ndarray, own: np.ndarray, chunk: int = 512) -> np.ndarray:
    best = np.full(len(pool), np.inf)
    for i in range(0, len(pool), chunk):
        d = ((pool[i:i + chunk, None, :] - own[None, :, :]) ** 2).sum(-1)
        best[i:i + chunk] = d.min(1)
    return best


def borrow(site, data_dir, lm, k: int, space: str = "features", seed: int = 0) -> pd.DataFrame:
    """The k other-site training instances most similar to `site`'s training set."""
    frames = []
    for name, folder in list_sites(data_dir):
        if name == site.name:
            continue
        df = read_site_table(find_table(folder), warn=False)
        tr = split_site(df, seed=split_seed(site.cfg), temporal_frac=site.cfg.temporal_frac,
                        test_frac=site.cfg.test_frac, val_frac=site.cfg.val_frac)["train"]
        frames.append(tr)
    if not frames:
        return site.splits["train"].iloc[:0]
    pool = pd.concat(frames, ignore_index=True)
    if len(pool) > POOL_CAP:
        pool = pool.sample(POOL_CAP, random_state=seed).reset_index(drop=True)
    own = site.splits["train"]
    if space == "embedding":
        from clinfed.common.training import encode_texts

        ml = int(site.cfg.max_length)
        pool_x = embeddings(lm, encode_texts(lm.tokenizer, pool["note_text"], ml))
        own_x = embeddings(lm, site.encoded("train", lm.tokenizer))
    else:
        own_x, pool_x = feature_matrix([own, pool])
    dist = _nearest_distance(pool_x, own_x)
    take = np.argsort(dist, kind="stable")[: min(k, len(pool))]
    return pool.iloc[take].reset_index(drop=True)
