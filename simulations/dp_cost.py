"""What DP-SGD costs in AUC: the classifier study without DP and at a few noise levels.

    python -m clinfed.simulations.dp_cost [--out DIR] [--noise 0.5,1,2] [--hospitals 6]
                                  [--run-config "k=v ..."] [--threads 2]

Each setting runs the study in process (the real ClientApp and ServerApp logic
through `simulations.inprocess`'s Grid, sites one after another, no Ray), on
the default synthetic federation unless `--data` is given, with the default run
config plus `--run-config`. It prints, per setting, the mean AUC over sites of
`base` (the untrained floor), `global` and `local` on the random and temporal tests, and the sites' epsilon
(median and max) after the global rounds and in total (global rounds + local
training), with the machine and settings, and writes `DIR/dp_cost.csv` and
`DIR/dp_cost.md`. Epsilon is at delta = 1/n_train of each site unless
`dp-delta` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd



def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} thread(s), "
            f"AVX512-BF16 {'yes' if bf16 else 'no'}, load average at start {load:.1f}")


def run_setting(cfg: dict, data_dir: Path, run_dir: Path) -> dict:
    """One study, in process; returns mean AUCs and the sites' epsilons."""
    from clinfed.simulations.inprocess import LocalGrid

    from clinfed.simulations.app import app as client_app
    from clinfed.client.locate import site_home
    from clinfed.common.data import list_sites
    from clinfed.common.dp import LEDGER_FOLDER
    from clinfed.server.study import Study

    sites = list_sites(data_dir)
    # Each setting is its own experiment on the same synthetic hospitals: standing in for them,
    # the harness resets their DP ledgers (which otherwise add up across studies, as they must)
    for _, folder in sites:
        shutil.rmtree(site_home({}, folder) / LEDGER_FOLDER, ignore_errors=True)
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))], cfg)
    t = time.time()
    Study(grid, cfg, run_dir).execute()
    seconds = time.time() - t
    df = pd.read_csv(run_dir / "metrics.csv")
    run = json.loads((run_dir / "run.json").read_text())
    out = {"seconds": round(seconds)}
    auc = df[(df.metric == "auc") & (df.subgroup == "all") & (df.status == "ok")]
    for regime in ("base", "global", "local"):
        for split in ("test", "temporal"):
            vals = auc[(auc.regime == regime) & (auc.split == split)]["value"]
            out[f"{regime} AUC {split}"] = float(vals.mean()) if len(vals) else float("nan")
    glob = [r for r in run["rounds"] if r["phase"] == "global"]
    eps_global = {}
    for r in glob:
        for site, e in (r.get("dp") or {}).items():
            eps_global[site] = e["epsilon_total"]
    eps_total = [d["epsilon_total"] for d in (run.get("dp") or {}).values()]
    for name, vals in (("ε global rounds", list(eps_global.values())), ("ε total", eps_total)):
        out[f"{name} (median)"] = float(np.median(vals)) if vals else float("nan")
        out[f"{name} (max)"] = float(np.max(vals)) if vals else float("nan")
    out["declined rounds"] = sum(len(r.get("declined") or {}) for r in glob)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clinfed.simulations.dp_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/dp-cost", help="folder for the runs and the table")
    ap.add_argument("--data", default="", help="federation folder (default: the default synthetic federation)")
    ap.add_argument("--hospitals", type=int, default=6)
    ap.add_argument("--noise", default="0.5,1.0,2.0", help="DP-SGD noise multipliers to run besides no DP")
    ap.add_argument("--run-config", default="", help="extra run-config overrides for every setting")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (sites run one after another)")
    ap.add_argument("--skip-baseline", action="store_true", help="run only the DP settings (no `no DP` run)")
    args = ap.parse_args(argv)

    from clinfed.common.config import parse_overrides, resolve
    from clinfed.simulations.app import default_federation

    extra = parse_overrides(args.run_config)
    base = {"hospitals": args.hospitals, "regimes": "base,global,local", "subgroups": False, "report": False,
            "client-threads": args.threads, **extra}
    data_dir = Path(args.data) if args.data else default_federation(resolve(base))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ([] if args.skip_baseline else [("no DP", {})]) + [(f"DP-SGD σ={float(s):g}", {"dp": True, "dp-noise-multiplier": float(s)})
                                  for s in args.noise.split(",") if s.strip()]
    machine = _machine(args.threads)
    print(f"machine: {machine}")
    print(f"settings: federation {data_dir}; run config = defaults + {base}")
    rows = []
    for name, over in settings:
        cfg = resolve({**base, **over, "data-dir": str(data_dir)})
        run_dir = out / name.replace(" ", "-").replace("σ=", "s")
        print(f"\n== {name} ...", flush=True)
        row = {"setting": name, **run_setting(cfg, data_dir, run_dir)}
        rows.append(row)
        print("   " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    table = pd.DataFrame(rows).dropna(axis=1, how="all")  # e.g. `local` when the regimes leave it out
    table.to_csv(out / "dp_cost.csv", index=False)
    fmt = table.copy()
    for c in fmt.columns:
        if fmt[c].dtype.kind == "f":
            fmt[c] = fmt[c].map(lambda v: "" if not np.isfinite(v) else f"{v:.3f}" if "AUC" in c else f"{v:.2f}")
    md = ("| " + " | ".join(fmt.columns) + " |\n|" + "---|" * len(fmt.columns) + "\n"
          + "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in fmt.itertuples(index=False)))
    text = (f"machine: {machine}\n\nsettings: defaults + {base}; DP: clipping norm "
            f"{resolve(base)['dp-max-grad-norm']}, delta {'1/n_train' if not resolve(base)['dp-delta'] else resolve(base)['dp-delta']}\n\n{md}")
    (out / "dp_cost.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
