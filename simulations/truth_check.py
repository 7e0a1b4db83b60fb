"""Does the analysis recover what the generator planted?

On a synthetic federation `truth.json` says which patient features drive
per-instance error and which sites should gain most from local fine-tuning.
This compares them with what a study's RUN_DIR recovered, from its files
alone: `python -m clinfed.simulations.truth_check RUN_DIR [--truth truth.json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def recovered_drivers(run_dir: Path) -> list[str]:
    """Patient-level drivers ranked by the study, most important first."""
    path = run_dir / "drivers.csv"
    if path.exists():
        df = pd.read_csv(path)
        df = df[df["level"] == "patient"] if "level" in df else df
        return df.sort_values("rank")["driver"].tolist()
    imp = pd.read_csv(run_dir / "driver_importances.csv")
    w = imp.assign(wi=imp["importance"] * imp["n"]).groupby("driver")[["wi", "n"]].sum()
    return (w["wi"] / w["n"]).sort_values(ascending=False).index.tolist()


def local_gains(run_dir: Path, split: str = "test") -> pd.DataFrame:
    """Per site: AUC gain of local and personalized over global, with training size."""
    m = pd.read_csv(run_dir / "metrics.csv")
    auc = m[(m.metric == "auc") & (m.subgroup == "all") & (m.split == split) & (m.status == "ok")]
    piv = auc.pivot_table(index="site", columns="regime", values="value")
    sizes = pd.read_csv(run_dir / "sites.csv").set_index("site")["n_train"]
    out = pd.DataFrame({"n_train": sizes})
    for r in ("local", "personalized"):
        if r in piv and "global" in piv:
            out[f"gain_{r}"] = piv[r] - piv["global"]
    return out.dropna(how="all", subset=[c for c in out if c.startswith("gain_")])


def compare(run_dir, truth_path=None) -> dict:
    run_dir = Path(run_dir)
    truth_path = Path(truth_path) if truth_path else run_dir / "federation" / "truth.json"
    truth = json.loads(truth_path.read_text())
    planted = list(truth["planted_error_drivers"])
    recovered = recovered_drivers(run_dir)
    top = recovered[: len(planted)]
    result = {
        "planted_drivers": planted,
        "recovered_drivers": recovered,
        "top_k_overlap": len(set(top) & set(planted)) / len(planted),
        "first_planted_rank": recovered.index(planted[0]) + 1 if planted[0] in recovered else None,
    }
    for split in ("test", "temporal"):
        g = local_gains(run_dir, split)
        for col in [c for c in g if c.startswith("gain_")]:
            d = g[["n_train", col]].dropna()
            small = d["n_train"] <= d["n_train"].median()
            result[f"{split}:{col}:spearman_vs_n_train"] = _spearman(d["n_train"], d[col])
            result[f"{split}:{col}:mean_small_sites"] = float(d.loc[small, col].mean())
            result[f"{split}:{col}:mean_large_sites"] = float(d.loc[~small, col].mean())
    result["expected_largest_gainers"] = truth.get("expected", {}).get("largest_gain_from_local_fine_tuning")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--truth", help="truth.json (default: RUN_DIR/federation/truth.json)")
    args = p.parse_args(argv)
    res = compare(args.run_dir, args.truth)
    print("planted drivers  :", ", ".join(res["planted_drivers"]))
    print("recovered ranking:", ", ".join(res["recovered_drivers"]))
    print(f"overlap of the top {len(res['planted_drivers'])}: {res['top_k_overlap']:.2f}; "
          f"first planted driver ranked {res['first_planted_rank']}")
    for key, val in res.items():
        if ":" in key:
            print(f"{key:55s} {val:+.3f}" if isinstance(val, float) and not np.isnan(val) else f"{key:55s} n/a")
    print("expected largest gainers (truth):", res["expected_largest_gainers"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
