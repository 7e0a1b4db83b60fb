"""The `clinfed` command: parses arguments and calls the modules that do the work.

Every user-facing failure ends in one paragraph on stderr and a non-zero exit
code, never a Python traceback (set CLINFED_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

EXIT_USAGE, EXIT_FAILED = 2, 1


class CliError(Exception):
    """A problem with what the user asked for, reported as-is."""


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"clinfed: error: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------------ commands
def cmd_generate(args) -> int:
    from simulations.generate import generate_federation

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CliError(f"{out} exists and is not empty (use --force to write into it)")
    truth = generate_federation(out, n_hospitals=args.hospitals, seed=args.seed, sizes=sizes)
    sites = truth["sites"]
    print(f"wrote {len(sites)} hospitals to {out} (truth: {out / 'truth.json'})")
    for info in sites:
        print(f"  {info['name']}: {info['size']} encounters, readmission rate {info['base_rate']:.2f}, "
              f"{info['mean_words_per_note']:.0f} words per note")
    return 0


def cmd_validate(args) -> int:
    from common.data import validate_path

    report = validate_path(args.path)
    print(report.summary())
    return 0 if report.ok else EXIT_FAILED


def _parse_run_config(text: str) -> dict:
    from common.config import parse_overrides, resolve

    overrides = parse_overrides(text)
    resolve(overrides)  # refuse unknown keys and bad values before anything starts
    return overrides


def cmd_simulate(args) -> int:
    from common.data import list_sites, validate_path
    from simulations.local import simulate

    overrides = _parse_run_config(args.run_config or "")
    if args.task:
        overrides["task"] = args.task
    out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    if args.data:
        data = Path(args.data).resolve()
    else:
        from simulations.generate import generate_federation

        data = out / "federation"
        if not (data.exists() and list_sites(data)):
            print(f"generating {args.hospitals} synthetic hospitals (seed {args.seed}) in {data}")
            generate_federation(data, n_hospitals=args.hospitals, seed=args.seed)
    report = validate_path(data)
    if not report.ok:
        print(report.summary(), file=sys.stderr)
        raise CliError(f"the hospital data in {data} is not valid (see above); nothing was run")
    sites = list_sites(data)
    if len(sites) < 2:
        raise CliError(f"{data} holds {len(sites)} hospital folder(s); a federation needs at least 2")
    overrides = {"data-dir": str(data), **overrides}
    if not args.data:
        # Generated data is synthetic: let local adapters travel for the full cross-site matrix.
        overrides.setdefault("share-local-adapters", True)
    overrides.setdefault("seed", args.seed)
    print(f"clinfed: simulating {len(sites)} sites -> {out}")
    run = simulate(out, overrides, n_sites=len(sites), cpus_per_site=args.cpus_per_site)
    total = run.get("timings", {}).get("total")
    print(f"clinfed: study completed in {total:.0f}s; report: {out / 'report.html'}")
    return 0


def cmd_report(args) -> int:
    from server.genreport import build_generative_report, is_generative
    from server.report import build_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.csv").exists():
        raise CliError(f"{run_dir} has no metrics.csv: is it a clinfed RUN_DIR?")
    print((build_generative_report if is_generative(run_dir) else build_report)(run_dir))
    return 0


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clinfed", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="write a synthetic federation (one folder per hospital + truth.json)")
    g.add_argument("--out", required=True, help="folder to create")
    g.add_argument("--hospitals", type=int, default=6)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sizes", help="comma-separated encounters per hospital (default: skewed 2000..150)")
    g.add_argument("--force", action="store_true", help="write into a non-empty folder")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("validate", help="check a hospital table, hospital folder or federation folder")
    v.add_argument("path")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("simulate", help="run a federated study on this machine (Flower Simulation Engine)")
    s.add_argument("--data", help="folder of hospital folders (default: generate a synthetic federation)")
    s.add_argument("--out", help="RUN_DIR for outputs (default: runs/<timestamp>)")
    s.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=2 local-steps=10"')
    s.add_argument("--hospitals", type=int, default=6, help="hospitals to generate when --data is absent")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--task", choices=("classifier", "generative"),
                   help="study kind (same as run config `task`): the readmission classifier or instruction tuning")
    s.add_argument("--cpus-per-site", type=float, default=1.0,
                   help="CPU share of each simulated site (sites run in parallel when cores allow)")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("report", help="rebuild report.html from a RUN_DIR")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from common.config import ConfigError
    from common.data import DataValidationError
    from common.models import ModelError

    known = (CliError, ConfigError, DataValidationError, ModelError, FileNotFoundError,
             NotADirectoryError, IsADirectoryError, PermissionError)
    try:
        from simulations.local import SimulationError

        known = known + (SimulationError,)
        return args.func(args)
    except known as exc:
        if os.environ.get("CLINFED_DEBUG"):
            raise
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
