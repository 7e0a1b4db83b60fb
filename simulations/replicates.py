"""A study repeated with several training seeds on the same splits, and its combined findings.

One seed is one draw of the training's randomness (initial adapter, batches):
a regime that beats `global` at a site with one seed may lose with the next.
`clinfed simulate --replicates N` (run config `replicates = N`) runs the same
study N times, with seeds seed, seed+1, ..., and one `split-seed` (the original
seed unless given), so every replicate scores the same test patients. Each
replicate is a complete, resumable RUN_DIR under ``RUN_DIR/replicates/``; the
top RUN_DIR gets the first replicate's files, the combined `differences.csv`
and `size_effects.csv` (`server.findings.combine_replicates`), `replicates.csv`
(per-seed rows), `replicate_aucs.csv` (mean and spread per site and regime),
and a report built from them. `clinfed simulate --resume RUN_DIR` continues the
replicates that did not finish and skips those that did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clinfed.common.config import resolve
from clinfed.server.findings import combine_replicates

STATE = "replicates.json"
KEEP_FROM_FIRST = ("metrics.csv", "sites.csv", "descriptors.csv", "driver_importances.csv", "calibration.csv",
                   "subgroup_gaps.csv", "run.json")


def replicate_dirs(out: Path, seed: int, n: int) -> list[Path]:
    return [Path(out) / "replicates" / f"seed-{seed + r}" for r in range(n)]


def run_replicates(out: str | Path, overrides: dict, n_sites: int, cpus_per_site: float = 1.0,
                   gpus_per_site: float | None = None) -> dict:
    """Run (or continue) every replicate, then combine them into `out`; returns the top run.json."""
    from clinfed.simulations.local import resume_settings, simulate

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve(overrides)
    n, seed = int(cfg.replicates), int(cfg.seed)
    split = int(cfg["split-seed"]) if int(cfg["split-seed"]) >= 0 else seed
    (out / STATE).write_text(json.dumps({"overrides": {k: v for k, v in overrides.items() if k != "resume"},
                                         "n_sites": n_sites}, indent=1, default=str))
    dirs = replicate_dirs(out, seed, n)
    for r, rdir in enumerate(dirs):
        if _completed(rdir):
            print(f"clinfed: replicate {r + 1} of {n} (seed {seed + r}) already completed")
            continue
        print(f"clinfed: replicate {r + 1} of {n}: seed {seed + r}, split seed {split}")
        if (rdir / "checkpoint" / "state.json").exists():
            rover, _ = resume_settings(rdir)
        else:
            rover = {**overrides, "seed": seed + r, "split-seed": split, "replicates": 1}
            rover.pop("resume", None)
        simulate(rdir, rover, n_sites=n_sites, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site)
    return combine(out, dirs)


def combine(out: Path, dirs: list[Path]) -> dict:
    """The top RUN_DIR from its completed replicates (rebuilt by `clinfed report` from these files)."""
    from clinfed.server.reports import build_report

    for name in KEEP_FROM_FIRST:
        if (dirs[0] / name).exists():
            shutil.copyfile(dirs[0] / name, out / name)
    combine_replicates(dirs, out)
    run = json.loads((out / "run.json").read_text())
    run["replicates"] = {"n": len(dirs), "seeds": [json.loads((d / "run.json").read_text()).get("seed")
                                                   for d in dirs],
                         "folders": [str(d.relative_to(out)) for d in dirs]}
    run["timings"] = {**run.get("timings", {}),
                      "total": sum(json.loads((d / "run.json").read_text()).get("timings", {}).get("total", 0)
                                   for d in dirs)}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    build_report(out)
    return run


def _completed(rdir: Path) -> bool:
    try:
        return json.loads((rdir / "run.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def resume_state(out: str | Path) -> tuple[dict, int] | None:
    """(overrides, n_sites) of a replicated RUN_DIR, or None when `out` is a single study."""
    path = Path(out) / STATE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    return state["overrides"], int(state["n_sites"])
