"""Two simulated runs of one study, compared on the same patients: a training lever's accuracy cost.

A lever that changes how sites train (issue 22's `base-dropout = false`, a precision, a
strategy) is worth adopting only at a measured accuracy cost. Two runs of the same study with the
same seeds score the same test patients, so their regimes' AUCs are compared pairwise: at every
site, for every regime and split, the paired DeLong difference (run B minus run A, the study's own
`paired_auc_difference`), Holm-adjusted over all the comparisons made, and pooled over the sites
by random effects, exactly as the study compares its regimes.

It rescores the adapters each run kept (the federated ones under RUN/adapters, the site-held
ones under RUN/sites/<site>/adapters) on the sites' test splits, rebuilt from the run's
configuration. It reads the patients directly, so it is a researcher's tool for simulated
federations on one machine, not a federation step: nothing here is released by a site.

    python -m clinfed.simulations.paired_runs RUN_A RUN_B [--regimes global,local,personalized]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

# the configuration keys that decide who the test patients are: two runs compared here must agree on them
SAME_PATIENTS = ("seed", "split-seed", "test-frac", "temporal-frac", "val-frac", "eval-items", "max-length",
                 "model")


def _same_data(dir_a: Path, dir_b: Path) -> bool:
    """Whether two federation folders hold the same hospitals with byte-identical tables: two
    `clinfed simulate --out` runs of one seed generate their federations into their own folders,
    and those are the same patients although the paths differ."""
    import hashlib

    from clinfed.common.data import find_table, list_sites

    if dir_a.resolve() == dir_b.resolve():
        return True

    def digests(root: Path) -> dict[str, str]:
        return {name: hashlib.sha256(find_table(folder).read_bytes()).hexdigest() for name, folder in list_sites(root)}

    return digests(dir_a) == digests(dir_b)


def _adapter_folder(run_dir: Path, run: dict, site: str, regime: str) -> Path | None:
    if regime == "global":
        folder = run_dir / "adapters" / "global" / "final"
    elif regime == "cluster":
        c = ((run.get("clusters") or {}).get("assignment") or {}).get(site)
        folder = run_dir / "adapters" / f"cluster-{c}" / "final" if c is not None else None
    elif regime == "ifca":
        j = ((run.get("ifca") or {}).get("membership") or {}).get(site)
        folder = run_dir / "adapters" / f"ifca-{j}" / "final" if j is not None else None
    else:
        folder = run_dir / "sites" / site / "adapters" / regime
    return folder if folder is not None and folder.exists() else None


def paired_runs(run_a, run_b, regimes=("global", "local", "personalized"), splits=("test", "temporal"),
                alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-site differences B - A, pooled differences) for each regime and split, Holm-adjusted
    over every per-site comparison made; raises ValueError when the runs' patients differ."""
    from clinfed.client.classifier_site import Site
    from clinfed.common.adapters import read_adapter
    from clinfed.common.config import resolve
    from clinfed.common.data import find_table, list_sites
    from clinfed.common.model_cache import LoadedModel, model_key
    from clinfed.common.stats import holm, paired_auc_difference, random_effects
    from clinfed.common.training import predict_proba

    run_a, run_b = Path(run_a), Path(run_b)
    runs = [json.loads((r / "run.json").read_text()) for r in (run_a, run_b)]
    ca, cb = (r["config"] for r in runs)
    differ = [k for k in SAME_PATIENTS if ca.get(k) != cb.get(k)]
    if not _same_data(Path(ca["data-dir"]), Path(cb["data-dir"])):
        differ.insert(0, "data-dir (the hospitals' tables)")
    if differ:
        raise ValueError(f"{run_a} and {run_b} do not score the same patients: they differ in {', '.join(differ)}")
    cfg = resolve({k: v for k, v in ca.items() if k != "out-dir"})
    lm = LoadedModel(model_key(cfg))
    rows = []
    with tempfile.TemporaryDirectory(prefix="clinfed-paired.") as tmp:
        for name, folder in list_sites(Path(cfg["data-dir"])):
            site = Site(name, find_table(folder), Path(tmp) / name, cfg)
            for regime in regimes:
                folders = [_adapter_folder(r, run, name, regime) for r, run in zip((run_a, run_b), runs)]
                if None in folders:
                    continue
                states = [read_adapter(lm.model, f, lm.identity) for f in folders]
                for split in splits:
                    enc, y = site.encoded(split, lm.tokenizer), site.labels(split)
                    if len(y) == 0:
                        continue
                    p = [predict_proba(lm.use(st), enc, lm.tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                                       device=cfg.device, precision=cfg.precision) for st in states]
                    d = paired_auc_difference(y, p[1], p[0], alpha=alpha, seed=int(cfg.seed))
                    rows.append({"site": name, "regime": regime, "split": split, "diff": d["diff"], "lo": d["lo"],
                                 "hi": d["hi"], "p": d["p"], "se": d["se"], "n": d["n"], "status": d["status"]})
    by_site = pd.DataFrame(rows, columns=["site", "regime", "split", "diff", "lo", "hi", "p", "se", "n", "status"])
    by_site["p_adj"] = holm(by_site["p"].to_numpy(dtype=float)) if len(by_site) else []
    pooled = []
    for (regime, split), g in by_site.groupby(["regime", "split"], sort=False):
        re = random_effects(g["diff"].to_numpy(float), (g["se"].to_numpy(float)) ** 2, alpha=alpha)
        pooled.append({"regime": regime, "split": split, "diff": re["estimate"], "lo": re["lo"], "hi": re["hi"],
                       "p": re["p"], "n_sites": re["n_sites"]})
    pooled = pd.DataFrame(pooled, columns=["regime", "split", "diff", "lo", "hi", "p", "n_sites"])
    pooled["p_adj"] = holm(pooled["p"].to_numpy(dtype=float)) if len(pooled) else []
    return by_site, pooled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinfed.simulations.paired_runs", description=__doc__.split("\n")[0])
    p.add_argument("run_a", help="the reference run folder (A)")
    p.add_argument("run_b", help="the run with the lever (B); differences are B - A")
    p.add_argument("--regimes", default="global,local,personalized")
    p.add_argument("--json", help="write both tables here")
    args = p.parse_args(argv)
    by_site, pooled = paired_runs(args.run_a, args.run_b, tuple(args.regimes.split(",")))
    pd.set_option("display.width", 200)
    print(f"AUC differences B - A on the same patients (B = {args.run_b}, A = {args.run_a}); Holm over "
          f"{len(by_site)} site comparisons and {len(pooled)} pooled ones")
    print(by_site.drop(columns=["se"]).round(4).to_string(index=False))
    print("\npooled over the sites (random effects):")
    print(pooled.round(4).to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps({"by_site": by_site.to_dict("records"), "pooled": pooled.to_dict("records")},
                                              indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
