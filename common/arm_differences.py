"""Paired comparison of arms at one site, from scores that never leave it.

Every arm of a comparison scores the same test items with the same seeds at a
site (same splits, same `eval-items` selection). At evaluation each arm's
per-item scores are written to the site's own folder
(`<site folder>/arms/<arm>/scores/<regime>.npz`: item ids, labels, scores,
seed). The server's `evaluate.compare` message then asks the site for
differences only: for each pair of arms and each regime and split, the AUC
difference and its paired-bootstrap interval (the same resampled items for
both arms), through the same disclosure control as every other cell. Scores, ids and labels stay
on the site's disk.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from clinfed.common.disclosure import Counts, releasable
from clinfed.common.metrics import auc_roc

PREFIX = "cmp"
SEP = "/"
CMP_METRICS = ("n", "positives", "diff", "diff_lo", "diff_hi", "suppressed", "not_computable")
# not-computable reasons (numeric codes: MetricRecords hold numbers only)
NOT_PAIRED = 3
ONE_CLASS = 1
NOT_COMPUTABLE_TEXT = {
    ONE_CLASS: "only one class in this test set: AUC difference undefined",
    NOT_PAIRED: "the two arms scored different items or seeds at this site: not a paired comparison",
}


def paired_auc_difference(y: np.ndarray, p_ref: np.ndarray, p_arm: np.ndarray, seed: int,
                          n_boot: int = 500, alpha: float = 0.05) -> tuple[float, float, float]:
    """AUC(arm) - AUC(reference) on the same items, and its paired percentile bootstrap interval:
    each resample draws one set of items and scores both arms on exactly those items, so the
    interval reflects the difference's own variability, not the two AUCs' separately.
    An arm compared with itself gives exactly (0, 0, 0)."""
    y = np.asarray(y).astype(int)
    p_ref, p_arm = np.asarray(p_ref, dtype=float), np.asarray(p_arm, dtype=float)
    if not (len(y) == len(p_ref) == len(p_arm)):
        raise ValueError("paired scores must cover the same items")
    diff = auc_roc(y, p_arm) - auc_roc(y, p_ref)
    if math.isnan(diff):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = len(y)
    stats = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, n)
        d = auc_roc(y[idx], p_arm[idx]) - auc_roc(y[idx], p_ref[idx])
        if not math.isnan(d):
            stats.append(d)
    if len(stats) < max(1, int(n_boot) // 2):
        return float(diff), float("nan"), float("nan")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(diff), float(lo), float(hi)


# ------------------------------------------------------------- the site's score store
def scores_dir(arm_dir: Path) -> Path:
    return Path(arm_dir) / "scores"


def save_scores(arm_dir: Path, regime: str, splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                seed: int) -> Path:
    """Keep one regime's per-item scores at the site: {split: (ids, labels, scores)}."""
    folder = scores_dir(arm_dir)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"seed": np.array([int(seed)])}
    for split, (ids, y, p) in splits.items():
        arrays[f"{split}.ids"] = np.asarray(ids).astype(str)
        arrays[f"{split}.y"] = np.asarray(y, dtype=np.int64)
        arrays[f"{split}.p"] = np.asarray(p, dtype=np.float64)
    path = folder / f"{regime}.npz"
    tmp = folder / f".{regime}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_scores(arm_dir: Path) -> dict[str, dict]:
    """{regime: {"seed": int, split: (ids, y, p)}} of one arm at this site."""
    out: dict[str, dict] = {}
    folder = scores_dir(arm_dir)
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.npz")):
        if path.name.startswith("."):
            continue
        with np.load(path, allow_pickle=False) as z:
            entry: dict = {"seed": int(z["seed"][0])}
            for key in z.files:
                if key.endswith(".ids"):
                    split = key[:-4]
                    entry[split] = (z[key], z[f"{split}.y"], z[f"{split}.p"])
        out[path.stem] = entry
    return out


def cell_key(pair: tuple[int, int], regime: str, split: str, metric: str) -> str:
    return SEP.join((PREFIX, f"{pair[0]}-{pair[1]}", regime, split, metric))


def compare_metrics(arm_dirs: list[Path], k: int, n_boot: int, seed: int,
                    pairs: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """The aggregates a site releases for a comparison: per pair (i, j) of arms (j minus i),
    regime and split, the AUC difference with its paired-bootstrap interval, n and positives;
    a cell without k patients, k positives and k negatives carries only `suppressed`
    (common.disclosure; the split's whole test set, so there is no grouping to complement).

    Arms are numbered by their position in the study's `arms`; pairs default to every arm
    against the first (the reference) and every later pair."""
    scores = [load_scores(d) for d in arm_dirs]
    if pairs is None:
        pairs = [(i, j) for i in range(len(arm_dirs)) for j in range(i + 1, len(arm_dirs))]
    out: dict[str, float] = {}
    for i, j in pairs:
        for regime in sorted(set(scores[i]) & set(scores[j])):
            a, b = scores[i][regime], scores[j][regime]
            for s_idx, split in enumerate(("test", "temporal")):
                if split not in a or split not in b:
                    continue
                ids_a, y, p_a = a[split]
                ids_b, y_b, p_b = b[split]
                n, pos = len(y), int(np.sum(y))
                # the same rule as every other cell (common.disclosure): k patients, k positives,
                # k negatives, else a bare flag; a one-class cell is never released
                if not releasable(Counts(n, pos), k):
                    out[cell_key((i, j), regime, split, "suppressed")] = 1
                    continue
                base = {cell_key((i, j), regime, split, "n"): n,
                        cell_key((i, j), regime, split, "positives"): pos}
                if (len(ids_a) != len(ids_b) or not np.array_equal(ids_a, ids_b) or not np.array_equal(y, y_b)
                        or a["seed"] != b["seed"]):
                    out.update(base)
                    out[cell_key((i, j), regime, split, "not_computable")] = NOT_PAIRED
                    continue
                d, lo, hi = paired_auc_difference(y, p_a, p_b, seed=seed + 17 * (s_idx + 1), n_boot=n_boot)
                out.update(base)
                if math.isnan(d):
                    out[cell_key((i, j), regime, split, "not_computable")] = ONE_CLASS
                    continue
                out[cell_key((i, j), regime, split, "diff")] = d
                if not (math.isnan(lo) or math.isnan(hi)):
                    out[cell_key((i, j), regime, split, "diff_lo")] = lo
                    out[cell_key((i, j), regime, split, "diff_hi")] = hi
    return out


def cmp_rows(site: str, released: dict, arm_names: list[str]) -> list[dict]:
    """Tidy rows of comparison.csv from one site's released record."""
    cells: dict[tuple, dict] = {}
    for key, val in released.items():
        parts = key.split(SEP)
        if len(parts) != 5 or parts[0] != PREFIX:
            continue
        _, pair, regime, split, metric = parts
        i, j = (int(x) for x in pair.split("-"))
        cells.setdefault((i, j, regime, split), {})[metric] = float(val)
    rows = []
    for (i, j, regime, split), vals in sorted(cells.items()):
        status, note = "ok", ""
        if "suppressed" in vals:
            status = "suppressed"
        elif "not_computable" in vals:
            status, note = "not_computable", NOT_COMPUTABLE_TEXT.get(int(vals["not_computable"]), "")
        rows.append({"site": site, "reference": arm_names[i], "arm": arm_names[j], "regime": regime,
                     "split": split, "diff": vals.get("diff") if status == "ok" else None,
                     "diff_lo": vals.get("diff_lo") if status == "ok" else None,
                     "diff_hi": vals.get("diff_hi") if status == "ok" else None,
                     "n": int(vals["n"]) if "n" in vals and status != "suppressed" else None,
                     "positives": int(vals["positives"]) if "positives" in vals and status != "suppressed" else None,
                     "status": status, "note": note})
    return rows
