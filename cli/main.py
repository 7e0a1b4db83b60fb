"""The `clinfed` command: parses arguments and calls the modules that do the work.

Every user-facing failure ends in one paragraph on stderr and a non-zero exit
code, never a Python traceback (set CLINFED_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from clinfed.common.errors import ClinfedError

EXIT_USAGE, EXIT_FAILED = 2, 1


class CliError(ClinfedError):
    """A problem with what the user asked for, reported as-is."""


class Interrupted(KeyboardInterrupt):
    """A stop signal turned into an exception, so that every `finally` on the way out runs.

    A KeyboardInterrupt, so the paths that already stop a run on Ctrl-C (a simulated
    study's processes, a deployed run through the SuperLink, a node's or SuperLink's
    process tree) serve SIGTERM and SIGHUP too. `hint` says how to continue."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.hint = ""
        super().__init__(self.name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_on_signals():
    """SIGINT, SIGTERM and SIGHUP each raise Interrupted in the main thread.

    Python leaves SIGINT ignored when it starts ignored (a background job of a
    non-interactive shell, many CI runners), and SIGTERM and SIGHUP kill it on the spot
    without running any cleanup: a killed `clinfed simulate` left its SuperLink, Ray and
    sites training headless. SIGHUP that starts ignored (`nohup`) stays ignored: that is
    what the user asked for. Once one signal arrived, later ones are ignored so that the
    orderly stop they asked for is not itself cut short."""
    def handler(signum, _frame):
        for sig in installed:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    import threading

    installed = {}
    for sig in STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ():
        previous = signal.getsignal(sig)
        if sig == signal.SIGHUP and previous == signal.SIG_IGN:
            continue
        installed[sig] = previous
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"clinfed: error: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------- argument types
def _int_in(lo: int, hi: int):
    """argparse type: a whole number in [lo, hi]; argparse names the option in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside the allowed range {lo}-{hi}")
        return value
    parse.__name__ = "whole number"
    return parse


def _share_of_gpu(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of one GPU between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share of one GPU between 0 and 1 (several GPUs per site are "
                                         f"not supported), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def _sizes(text: str) -> list[int]:
    """argparse type of --sizes: comma-separated encounter counts, each >= 1."""
    parts = [t.strip() for t in text.split(",")]
    try:
        sizes = [int(t) for t in parts]
    except ValueError:
        bad = next(t for t in parts if not t.lstrip("+-").isdigit())
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 2000,500,80; {bad!r} is not one") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"every size must be at least 1 encounter, got {text!r}")
    if len(sizes) > 500:
        raise argparse.ArgumentTypeError(f"at most 500 hospitals, got {len(sizes)} sizes")
    return sizes


_SEED = _int_in(0, 2**31 - 1)


# the generator's scenarios (simulations.generate.SCENARIOS), spelled here so --help needs no numpy
SCENARIO_NAMES = ("default", "exchangeable", "concept-shift")
from clinfed.common.config import STUDY_PRESETS  # noqa: E402 - light: the run-config table only


# ------------------------------------------------------------------ commands
def cmd_generate(args) -> int:
    from clinfed.simulations.generate import generate_federation

    sizes = args.sizes
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a folder to write the federation into")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CliError(f"{out} exists and is not empty (use --force to write into it)")
    try:
        truth = generate_federation(out, n_hospitals=args.hospitals, seed=args.seed, sizes=sizes,
                                    scenario=args.scenario, shifted_sites=args.shifted_sites)
    except ValueError as err:
        raise CliError(str(err)) from None
    sites = truth["sites"]
    print(f"wrote {len(sites)} hospitals to {out} (truth: {out / 'truth.json'})"
          + (f"; scenario {args.scenario}" if args.scenario != "default" else "")
          + (f", cues reversed at {', '.join(truth['concept_shift']['sites'])}"
             if truth.get("concept_shift") else ""))
    for info in sites:
        print(f"  {info['name']}: {info['size']} encounters, readmission rate {info['base_rate']:.2f}, "
              f"{info['mean_words_per_note']:.0f} words per note")
    return 0


def cmd_validate(args) -> int:
    from clinfed.common.data import validate_path

    report = validate_path(args.path)
    print(report.summary())
    return 0 if report.ok else EXIT_FAILED


def _parse_run_config(text: str) -> dict:
    from clinfed.common.config import parse_overrides, resolve

    overrides = parse_overrides(text)
    resolve(overrides)  # refuse unknown keys and bad values before anything starts
    return overrides


def _same_as_option(overrides: dict, key: str, option: str, value) -> None:
    """A run-config key and the command-line option for the same thing must not disagree."""
    if value is None or key not in overrides:
        return
    given = overrides[key]
    if isinstance(value, Path):
        same = Path(str(given)).expanduser().resolve() == value
    else:
        same = given == value
    if not same:
        raise CliError(f"{option} {value} and run config '{key}={given}' disagree; give only one of them")


def _resume(args) -> int:
    from clinfed.server.checkpoint import ResumeError
    from clinfed.simulations.local import resume_settings

    if args.data or args.out or args.run_config or args.task:
        raise CliError("--resume takes its settings from the interrupted run's checkpoint: "
                       "give no --data, --out, --run-config or --task with it")
    from clinfed.simulations.replicates import resume_state

    try:
        overrides, n_sites = resume_state(args.resume) or resume_settings(args.resume)
    except ResumeError as err:
        raise CliError(str(err)) from None
    out = Path(args.resume).resolve()
    print(f"clinfed: resuming {out} ({n_sites} sites)")
    run = _simulate(out, overrides, n_sites, args.cpus_per_site, getattr(args, "gpus_per_site", None))
    print(f"clinfed: study completed in {run.get('timings', {}).get('total', 0):.0f}s; report: {out / 'report.html'}")
    return 0


def _simulate(out: Path, overrides: dict, n_sites: int, cpus_per_site: float,
              gpus_per_site: float | None = None) -> dict:
    """Run the study (or its replicates); an interrupt says what was kept and how to continue."""
    from clinfed.common.config import resolve
    from clinfed.simulations.local import resume_hint, simulate
    from clinfed.simulations.replicates import run_replicates

    replicated = resolve(overrides).replicates > 1
    try:
        if replicated:
            return run_replicates(out, overrides, n_sites=n_sites, cpus_per_site=cpus_per_site,
                                  gpus_per_site=gpus_per_site)
        return simulate(out, overrides, n_sites=n_sites, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site)
    except KeyboardInterrupt as exc:
        exc.hint = (f"completed replicates are kept; continue with: clinfed simulate --resume {out}" if replicated
                    else resume_hint(out))
        raise


def _check_device(overrides: dict) -> None:
    """`device = cuda` on a machine without one: refused before Flower starts, not at every site."""
    if str(overrides.get("device", "auto")) == "cuda":
        from clinfed.common.hardware import DeviceError, pick_device

        try:
            pick_device("cuda")
        except DeviceError as err:
            raise CliError(str(err)) from None


def _check_gpus(overrides: dict, gpus_per_site: float | None) -> None:
    """--gpus-per-site the machine cannot honour: refused before Flower starts."""
    if gpus_per_site is None:
        return
    from clinfed.simulations.local import GpuShareError, gpu_plan

    try:
        gpu_plan(overrides, 1, gpus_per_site)
    except GpuShareError as err:
        raise CliError(str(err)) from None


def cmd_simulate(args) -> int:
    from clinfed.common.data import list_sites, validate_path

    # The simulation runs offline unless told otherwise; check model names the same way.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "ray_address", None):
        # Ray's own variable: Flower's simulation backend calls ray.init(), which attaches to it
        os.environ["RAY_ADDRESS"] = args.ray_address
    if args.resume:
        return _resume(args)
    overrides = _parse_run_config(args.run_config or "")
    study = getattr(args, "study", "default") or "default"
    if study != "default":
        from clinfed.common.config import ConfigError, study_preset

        try:
            # the named study's keys, under the user's own run config (which wins key by key)
            overrides = {**study_preset(study), **overrides}
        except ConfigError as err:
            raise CliError(str(err)) from None
    _same_as_option(overrides, "task", "--task", args.task)
    _same_as_option(overrides, "data-dir", "--data", Path(args.data).resolve() if args.data else None)
    _same_as_option(overrides, "out-dir", "--out", Path(args.out).resolve() if args.out else None)
    _same_as_option(overrides, "seed", "--seed", args.seed if args.seed != 0 else None)
    _same_as_option(overrides, "replicates", "--replicates", args.replicates)
    device = getattr(args, "device", None)
    _same_as_option(overrides, "device", "--device", device)
    if device:
        overrides["device"] = device
    _check_device(overrides)
    _check_gpus(overrides, getattr(args, "gpus_per_site", None))
    if args.replicates:
        overrides["replicates"] = args.replicates
    if args.task:
        overrides["task"] = args.task
    if not args.data and str(overrides.get("data-dir", "")).strip():
        args.data = str(overrides["data-dir"])
    if not args.out and str(overrides.get("out-dir", "")).strip():
        args.out = str(overrides["out-dir"])
    out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; RUN_DIR must be a folder")
    if args.data and getattr(args, "scenario", "default") != "default":
        raise CliError("--scenario chooses the generated federation; it does not apply to --data")
    if args.data:
        data = Path(args.data).resolve()
        if not data.exists():
            raise CliError(f"--data {data} does not exist; give the folder that holds one folder per hospital")
        if not data.is_dir():
            raise CliError(f"--data {data} is a file; give the folder that holds one folder per hospital "
                           "(each with its own table)")
        if not list_sites(data):
            from clinfed.common.data import TABLE_SUFFIXES

            direct = sorted(p.name for p in data.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
            why = (f"it holds {', '.join(direct[:3])} directly, so it looks like one hospital's folder; "
                   "give the folder above it" if direct else
                   f"a federation folder has one sub-folder per hospital, each with one table "
                   f"({', '.join(TABLE_SUFFIXES)})")
            raise CliError(f"--data {data} holds no hospital folders: {why}")
    else:
        from clinfed.simulations.generate import generate_federation

        data = out / "federation"
        if not (data.exists() and list_sites(data)):
            from clinfed.common.config import check_for_sites, resolve

            check_for_sites(resolve(overrides), args.hospitals, explicit=set(overrides))  # before generating
            scenario = getattr(args, "scenario", "default")
            print(f"generating {args.hospitals} synthetic hospitals (seed {args.seed}"
                  + (f", scenario {scenario}" if scenario != "default" else "") + f") in {data}")
            generate_federation(data, n_hospitals=args.hospitals, seed=args.seed, scenario=scenario)
    report = validate_path(data)
    if not report.ok:
        print(report.summary(), file=sys.stderr)
        raise CliError(f"the hospital data in {data} is not valid (see above); nothing was run")
    sites = list_sites(data)
    if len(sites) < 2:
        raise CliError(f"{data} holds {len(sites)} hospital folder(s); a federation needs at least 2")
    from clinfed.common.config import check_for_sites, resolve

    check_for_sites(resolve(overrides), len(sites), explicit=set(overrides))
    if str(overrides.get("arms", "")).strip():
        from clinfed.server.comparison import plan_costs

        # a comparison's arms: prompt form on an encoder, or an arm above the bytes budget,
        # is refused here, before Flower starts
        for plan in plan_costs(resolve(overrides)):
            print(f"clinfed: arm {plan['arm']}: {plan['parameters']:,} trainable parameters, "
                  f"{plan['round_bytes_per_site']:,} bytes per site per round")
    overrides = {**overrides, "data-dir": str(data)}  # the folder just validated, whoever named it
    if not args.data:
        # Generated data is synthetic: the study asks for local adapters (the generated hospitals'
        # own policy files allow them to travel) and declares the generator's regions.
        from clinfed.simulations.generate import REGIONS

        overrides.setdefault("share-local-adapters", True)
        overrides.setdefault("region-vocabulary", ",".join(REGIONS))
    overrides.setdefault("seed", args.seed)
    print(f"clinfed: simulating {len(sites)} sites -> {out}")
    run = _simulate(out, overrides, len(sites), args.cpus_per_site, getattr(args, "gpus_per_site", None))
    total = run.get("timings", {}).get("total")
    print(f"clinfed: study completed in {total:.0f}s; report: {out / 'report.html'}")
    return 0


def cmd_compare(args) -> int:
    """A comparison study: the default arms and budgets, overridable, run like `simulate`."""
    from clinfed.common.arms import DEFAULT_COMPARISON
    from clinfed.common.config import parse_overrides, to_toml_overrides

    given = parse_overrides(args.run_config or "")
    if args.arms and "arms" in given and given["arms"] != args.arms:
        raise CliError(f"--arms {args.arms} and run config 'arms={given['arms']}' disagree; give only one of them")
    overrides = {**DEFAULT_COMPARISON, **({"arms": args.arms} if args.arms else {}), **given}
    args.run_config = to_toml_overrides(overrides)
    args.task, args.resume, args.replicates = None, None, None
    return cmd_simulate(args)


def cmd_bench(args) -> int:
    from clinfed.simulations.bench import run_from_args

    return run_from_args(args)


def cmd_report(args) -> int:
    from clinfed.server.reports import build_report

    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CliError(f"{run_dir} is a file; give the RUN_DIR folder of a clinfed run")
    if not (run_dir / "metrics.csv").exists():
        raise CliError(f"{run_dir} has no metrics.csv: is it a clinfed RUN_DIR?")
    _check_metrics_header(run_dir / "metrics.csv")
    print(build_report(run_dir))
    return 0


def _check_metrics_header(path: Path) -> None:
    """A truncated or foreign metrics.csv is refused by name instead of yielding an empty report."""
    import csv

    from clinfed.common.metrics import METRIC_COLUMNS

    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise CliError(f"{path} is not a readable CSV ({err}); the run's metrics are damaged") from None
    if not header:
        raise CliError(f"{path} is empty; the run did not finish writing its metrics")
    missing = [c for c in METRIC_COLUMNS if c not in header]
    if missing:
        raise CliError(f"{path} lacks the column(s) {', '.join(missing)} of a clinfed metrics.csv "
                       f"(found: {', '.join(header[:10])}); is it a clinfed RUN_DIR?")


# ------------------------------------------------- deployment across real sites
# The coordinating team: certs, superlink, enroll, run. A hospital: node.
# Flower's own flags stay inside server/deploy.py and client/node.py.
def _names(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def cmd_certs(args) -> int:
    from clinfed.server.deploy import make_certs

    out = Path(args.out).resolve()
    res = make_certs(out, _names(args.hosts), _names(args.hospitals), days=args.days, force=args.force)
    print(f"clinfed: wrote the study's certificates and keys to {out}")
    print("  ca.crt       root certificate: give to every hospital and to `clinfed run --root-cert` (public)")
    print(f"  server.crt   the SuperLink's TLS certificate, valid for: {', '.join(res['san'])}")
    print("  server.key   its private key: stays on the SuperLink host")
    print("  ca.key       the CA's private key: only needed to issue new certificates; keep it offline")
    for name, (key, pub) in res["nodes"].items():
        print(f"  nodes/{key.name:<12} {name}'s node key: hand to {name}'s IT team over a secure channel, then delete")
        print(f"  nodes/{pub.name:<12} enroll it: clinfed enroll --certs {out} --key {pub} --name {name}")
    return 0


def cmd_superlink(args) -> int:
    from clinfed.server.deploy import StudySuperLink

    link = StudySuperLink(args.certs, args.host, args.port, args.state, args.local_port)
    try:
        link.start()
        print(f"clinfed: SuperLink on {args.host}:{args.port} over TLS for the enrolled hospitals' nodes only "
              f"(Fleet API); enroll and run from this host, at {link.local} (state: {link.state}); "
              "stop with Ctrl-C", flush=True)
        which, code = link.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        link.stop()
    if which:
        raise CliError(f"{which} stopped with exit code {code} (see its log above), so the SuperLink was stopped; "
                       f"is port {args.port} or {link.local_port} already in use, or are the files in "
                       f"{link.certs} unreadable?")
    return 0


def _connection(args):
    """The coordinator's connection: the loopback address `clinfed superlink` wrote to the certs folder."""
    from clinfed.server.deploy import (
        CA_CERT,
        Connection,
        check_root_cert,
        local_address,
        parse_address,
    )

    root = args.root_cert or (Path(args.certs) / CA_CERT if getattr(args, "certs", None) else None)
    if not root:
        raise CliError("give --certs DIR (the `clinfed certs` folder `clinfed superlink` runs with) or "
                       "--root-cert CA with --superlink HOST:PORT")
    if args.superlink:
        parse_address(args.superlink)  # a malformed address is named before anything else
    check_root_cert(root)
    if args.superlink:
        return Connection(args.superlink, root)
    if not getattr(args, "certs", None):
        raise CliError("give --certs DIR (the folder `clinfed superlink` runs with): the SuperLink's address for "
                       "the coordinating team is written there, on the SuperLink host")
    return Connection(local_address(args.certs), root)


def cmd_enroll(args) -> int:
    from clinfed.server.deploy import enroll, list_nodes

    with _connection(args) as conn:
        if args.list:
            nodes = list_nodes(conn)
            print(f"{len(nodes)} enrolled node(s) at {conn.address}:")
            for n in nodes:
                print(f"  {n.get('node-id')}  {n.get('status')}  online since {n.get('online-at')}")
            return 0
        if not (args.key and args.name):
            raise CliError("give --key HOSPITAL.pub and --name HOSPITAL (or --list)")
        node_id = enroll(conn, args.key, args.name)
    print(f"clinfed: enrolled {args.name} ({Path(args.key).name}) as node {node_id} at {conn.address}; "
          "its SuperNode may now join")
    return 0


def cmd_run(args) -> int:
    import json
    import tempfile

    from clinfed.common.app_code import write_app_folder
    from clinfed.common.config import to_toml_overrides
    from clinfed.server.deploy import LogFollower, stop_run, submit, wait_for_run

    overrides = _parse_run_config(args.run_config or "")
    if int(overrides.get("replicates", 1)) > 1:
        raise CliError("run config 'replicates' is carried out by `clinfed simulate`; across real sites, submit "
                       "one `clinfed run` per seed with the same split-seed (see docs/regimes-and-method.md)")
    out = Path(args.out or overrides.get("out-dir") or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve()
    overrides["out-dir"] = str(out)  # a path on the SuperLink host, where the ServerApp writes
    with _connection(args) as conn, tempfile.TemporaryDirectory(prefix="clinfed-app-") as app:
        run_id = submit(conn, write_app_folder(app, "deployment"), to_toml_overrides(overrides))
        print(f"clinfed: study submitted to {conn.address} as run {run_id}; RUN_DIR on the SuperLink host: {out}",
              flush=True)
        follower = None if args.quiet else LogFollower(conn, run_id, out / "flwr.log")
        try:
            row = wait_for_run(conn, run_id, timeout=args.timeout,
                               on_status=lambda s, _r: print(f"clinfed: run {run_id}: {s}", flush=True))
        except KeyboardInterrupt as exc:
            stop_run(conn, run_id)
            exc.hint = (f"run {run_id} was stopped through the SuperLink; its checkpoint in {out} (on the "
                        "SuperLink host) keeps the last completed round: continue it with the same command, "
                        "adding resume=true to --run-config")
            raise
        finally:
            if follower:
                follower.close()
    status = row.get("status", "")
    run_json = out / "run.json"
    study = json.loads(run_json.read_text()) if run_json.exists() else None
    if status != "finished:completed" or (study and study.get("status") != "completed"):
        errs = "; ".join((study or {}).get("errors") or []) or row.get("status-details") or "no details"
        raise CliError(f"run {run_id} ended '{status}': {errs} (SuperLink log and {out / 'flwr.log'})")
    where = (f"report: {out / 'report.html'}" if study else
             f"RUN_DIR {out} is on the SuperLink host (not visible from here)")
    print(f"clinfed: run {run_id} completed; {where}")
    return 0


def cmd_node(args) -> int:
    from clinfed.client.node import check_site, run_node

    if args.check:
        check = check_site(args.data, args.policy, args.site, args.output)
        print(check.summary())
        return 0 if check.ok else EXIT_FAILED
    missing = [opt for opt, val in (("--superlink", args.superlink), ("--root-cert", args.root_cert),
                                    ("--key", args.key)) if not val]
    if missing:
        raise CliError(f"to join a study give {', '.join(missing)} (from the coordinating team's invitation), "
                       "or --check to only check the data and policy")
    return run_node(args.superlink, args.root_cert, args.key, args.data, args.policy, args.site, args.output,
                    max_wait=args.max_wait)


def cmd_app_hash(args) -> int:
    from clinfed.common.app_code import AppCodeError, installed_hash, path_hash

    try:
        print(path_hash(args.path) if args.path else installed_hash())
    except AppCodeError as err:
        raise CliError(str(err)) from None
    return 0


def _add_deploy_commands(sub) -> None:
    c = sub.add_parser("certs", help="coordinator: create the study's CA, SuperLink certificate and hospital keys")
    c.add_argument("--out", required=True, help="folder for ca.crt, server.crt/.key, ca.key and nodes/")
    c.add_argument("--hosts", required=True,
                   help="comma-separated names/IPs hospitals use to reach the SuperLink (localhost is always added)")
    c.add_argument("--hospitals", default="", help="comma-separated hospital names: one node key pair each")
    c.add_argument("--days", type=_int_in(1, 3650), default=825, help="certificate validity (days)")
    c.add_argument("--force", action="store_true", help="replace existing certificates and keys")
    c.set_defaults(func=cmd_certs)

    sl = sub.add_parser("superlink", help="coordinator: run the study's SuperLink (TLS, enrolled hospitals only)")
    sl.add_argument("--certs", required=True, help="the `clinfed certs` folder")
    sl.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    sl.add_argument("--port", type=_int_in(1, 65535), default=8000)
    sl.add_argument("--state", help="database of enrolled nodes and runs (default: CERTS/superlink-state.db)")
    sl.add_argument("--local-port", type=_int_in(1, 65535),
                    help="loopback port of the SuperLink itself, for enroll and run on this host (default: a free one)")
    sl.set_defaults(func=cmd_superlink)

    e = sub.add_parser("enroll", help="coordinator: allow a hospital's node key to join the study")
    e.add_argument("--certs", help="the `clinfed certs` folder `clinfed superlink` runs with on this host")
    e.add_argument("--root-cert", help="the study's ca.crt (instead of --certs; then give --superlink)")
    e.add_argument("--superlink", help="HOST:PORT of the SuperLink's loopback address (default: the one "
                                       "`clinfed superlink` wrote to --certs)")
    e.add_argument("--key", help="the hospital's public key (HOSPITAL.pub)")
    e.add_argument("--name", help="the hospital's name")
    e.add_argument("--list", action="store_true", help="list the enrolled nodes instead")
    e.set_defaults(func=cmd_enroll)

    r = sub.add_parser("run", help="coordinator: run a study on the enrolled hospitals and wait for its verdict")
    r.add_argument("--certs", help="the `clinfed certs` folder `clinfed superlink` runs with on this host")
    r.add_argument("--superlink", help="HOST:PORT of the SuperLink's loopback address (default: the one "
                                       "`clinfed superlink` wrote to --certs)")
    r.add_argument("--root-cert", help="the study's ca.crt (instead of --certs; then give --superlink)")
    r.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=2 expected-sites=3"')
    r.add_argument("--out", help="RUN_DIR on the SuperLink host (default: runs/<timestamp>)")
    r.add_argument("--timeout", type=_positive_float, help="stop the run and fail after this many seconds")
    r.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    r.set_defaults(func=cmd_run)

    h = sub.add_parser("app-hash", help="print the app-code hash of the clinfed installed here (what its "
                                        "`clinfed run` sends, and what its `clinfed node` runs)")
    h.add_argument("path", nargs="?", help="a Flower app folder or .fab file instead")
    h.set_defaults(func=cmd_app_hash)

    n = sub.add_parser("node", help="hospital: check this site, or join a study as its node")
    n.add_argument("--data", required=True, help="this hospital's table or folder")
    n.add_argument("--policy", required=True, help="this hospital's policy file (TOML)")
    n.add_argument("--check", action="store_true", help="only check the data and policy; connect to nothing")
    n.add_argument("--superlink", help="HOST:PORT of the study's SuperLink")
    n.add_argument("--root-cert", help="the study's ca.crt")
    n.add_argument("--key", help="this hospital's private node key (HOSPITAL.key)")
    n.add_argument("--site", help="the site's name in the study (default: the data folder's name)")
    n.add_argument("--output", help="where private adapters and the node log stay (default: DATA/clinfed-out)")
    n.add_argument("--max-wait", type=_positive_float,
                   help="give up after this many seconds without reaching the SuperLink (default: keep trying)")
    n.set_defaults(func=cmd_node)


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clinfed", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="write a synthetic federation (one folder per hospital + truth.json)")
    g.add_argument("--out", required=True, help="folder to create")
    g.add_argument("--hospitals", type=_int_in(1, 500), default=6)
    g.add_argument("--seed", type=_SEED, default=0)
    g.add_argument("--sizes", type=_sizes, help="comma-separated encounters per hospital (default: skewed 2000..150)")
    g.add_argument("--force", action="store_true", help="write into a non-empty folder")
    g.add_argument("--scenario", choices=SCENARIO_NAMES, default="default",
                   help="default: every planted site difference; exchangeable: one population at every site; "
                        "concept-shift: one population, note cues reversed at the shifted sites")
    g.add_argument("--shifted-sites", help="concept-shift: comma-separated hospitals whose cues are reversed "
                                           "(default: the smallest ones, at most a quarter of the encounters)")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("validate", help="check a hospital table, hospital folder or federation folder")
    v.add_argument("path")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("simulate", help="run a federated study on this machine (Flower Simulation Engine)")
    s.add_argument("--data", help="folder of hospital folders (default: generate a synthetic federation)")
    s.add_argument("--out", help="RUN_DIR for outputs (default: runs/<timestamp>)")
    s.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=2 local-steps=10"')
    s.add_argument("--hospitals", type=_int_in(2, 500), default=6, help="hospitals to generate when --data is absent")
    s.add_argument("--seed", type=_SEED, default=0)
    s.add_argument("--scenario", choices=SCENARIO_NAMES, default="default",
                   help="scenario of the generated federation when --data is absent (see `generate`)")
    s.add_argument("--task", choices=("classifier", "generative"),
                   help="study kind (same as run config `task`): the readmission classifier or instruction tuning")
    s.add_argument("--study", choices=tuple(STUDY_PRESETS), default="default",
                   help="a named study: `methods` scores the personalization methods (fedrep, ditto, ifca, "
                        "interpolated) beside global, local and personalized; --run-config keys win over it")
    s.add_argument("--cpus-per-site", type=_positive_float, default=1.0,
                   help="CPU share of each simulated site (sites run in parallel when cores allow)")
    s.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted study from its last completed round (same settings)")
    s.add_argument("--replicates", type=_int_in(1, 50), default=None,
                   help="rerun the training with N seeds on the same test patients and combine the differences "
                        "(same as run config `replicates`)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where the simulated sites train (same as run config `device`; cuda without a GPU "
                        "is refused at start)")
    s.add_argument("--gpus-per-site", type=_share_of_gpu, default=None, metavar="G",
                   help="each simulated site's share of one GPU through Ray (0.25: four sites per GPU), which "
                        "is also the share of the card's memory it plans with; 0 = sites on CPU. Default: on a "
                        "machine with CUDA the sites share the GPUs evenly (GPUs / sites, at most 1), "
                        "elsewhere 0. Refused without a CUDA GPU")
    s.add_argument("--ray-address", metavar="ADDRESS",
                   help="run the simulated sites on an existing Ray cluster (e.g. 10.0.0.5:6379, as `ray start "
                        "--head` prints; same as the RAY_ADDRESS variable) instead of starting Ray on this machine; "
                        "the cluster's nodes need clinfed, the model and --data at the same paths")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("compare", help="run a comparison study of arms (base model x method x task form) "
                                       "with the default budgets, like `simulate`")
    c.add_argument("--arms", help="comma-separated model:method[:form] arms, or 'default' (the default: "
                                  "minilm:lora, minilm:head-only, smollm2:lora, smollm2:lora:prompt)")
    c.add_argument("--data", help="folder of hospital folders (default: generate a synthetic federation)")
    c.add_argument("--out", help="RUN_DIR for outputs (default: runs/<timestamp>)")
    c.add_argument("--run-config", default="", help="overrides of the comparison's budgets, e.g. \"local-steps=5\"")
    c.add_argument("--hospitals", type=_int_in(2, 500), default=6, help="hospitals to generate when --data is absent")
    c.add_argument("--seed", type=_SEED, default=0)
    c.add_argument("--cpus-per-site", type=_positive_float, default=1.0,
                   help="CPU share of each simulated site (sites run in parallel when cores allow)")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="rebuild report.html from a RUN_DIR")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    _add_deploy_commands(sub)

    from clinfed.simulations.bench import add_arguments as _bench_arguments

    b = sub.add_parser("bench", help="performance benchmarks: throughput, overhead, comm, scale, generative")
    _bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        with stop_on_signals():
            return args.func(args)
    except (ClinfedError, OSError) as exc:  # what the user can act on: the message says what to do
        if os.environ.get("CLINFED_DEBUG"):
            raise
        return _fail(str(exc))
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        hint = getattr(exc, "hint", "")
        return _fail(f"interrupted by {signal.Signals(signum).name}" + (f"; {hint}" if hint else ""), 128 + signum)
    except Exception as exc:  # a bug, not the user's input: still one paragraph, never a traceback
        if os.environ.get("CLINFED_DEBUG"):
            raise
        return _fail(f"internal error in 'clinfed {args.command}': {type(exc).__name__}: {exc}. This is a "
                     "bug in clinfed, not in your input; rerun with CLINFED_DEBUG=1 for the traceback and "
                     "report it. Files already written were left in place.")


if __name__ == "__main__":
    sys.exit(main())
