"""Run a study on one machine through Flower's Simulation Engine (`flwr run`).

`flwr run` exits 0 even when the run failed and leaves a detached SuperLink
behind, and offline it must not try to install the app's dependencies. This
module owns all of that: an isolated FLWR_HOME inside RUN_DIR, free ports, the
runtime-install switch, the log streamed to the terminal and to
RUN_DIR/flwr.log, the verdict read from RUN_DIR/run.json, and the SuperLink
stopped afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.config import resolve, to_toml_overrides

PACKAGES = ("server", "client", "common", "simulations")
_NOISE = ("FutureWarning", "warnings.warn(", "is_gradient_checkpointing", "RAY_ACCEL_ENV_VAR",
          "UserWarning: The given NumPy", "Since flwr 1.32", "To change federation size",
          "flwr federation simulation-config", "tensor_numpy.cpp")


class SimulationError(RuntimeError):
    """The study did not complete; the message says where to look."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_dir() -> Path:
    """The Flower app to run: the source tree, or a copy built from the installed packages."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text():
        return root
    # Installed without the source tree: assemble a minimal app folder.
    out = Path(tempfile.mkdtemp(prefix="clinfed-app-"))
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    from common.config import KEYS

    lines = ['[build-system]', 'requires = ["setuptools"]', 'build-backend = "setuptools.build_meta"',
             '[project]', 'name = "clinfed"', 'version = "0.1.0"', 'dependencies = []',
             '[tool.flwr.app]', 'publisher = "clinfed"', '[tool.flwr.app.components]',
             'serverapp = "server.app:app"', 'clientapp = "client.app:app"', '[tool.flwr.app.config]']
    lines += [line for line in to_toml_overrides({k: v[0] for k, v in KEYS.items()}).split(" ")]
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return out


def _stop_run(run_id: str, control_port: int):
    """Kill every process of this run: the SuperLink and everything it started.

    A SuperLink that gets Ctrl-C may exit before its simulation process, which
    is then orphaned and would keep writing into RUN_DIR while a `--resume`
    runs. Every process of the run inherits CLINFED_RUN_ID, so it is found
    whoever its parent is now.
    """
    import psutil

    me = os.getpid()
    doomed = []
    for proc in psutil.process_iter(["cmdline", "pid"]):
        if proc.pid == me:
            continue
        try:
            cmd = " ".join(proc.info.get("cmdline") or [])
            if ("flower-superlink" in cmd and f":{control_port}" in cmd) \
                    or proc.environ().get("CLINFED_RUN_ID") == run_id:
                doomed.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in doomed:
        try:
            doomed.extend(c for c in proc.children(recursive=True) if c not in doomed)
        except psutil.NoSuchProcess:
            pass
    for proc in doomed:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(doomed, timeout=10)


def ray_cpus(n_sites: int, cpus_per_site: float, cores: int | None = None) -> int:
    """The CPUs Ray may hand out: the machine's cores, or all sites at once when that
    oversubscribes the cores by at most half.

    Sites train in waves of cores / cpus-per-site; 3 sites on 2 cores would run
    two waves, the second a lone site with a core idle (the generative study's
    default: a third of its site-phase time). Running the 3 at once is 1.5x
    oversubscribed and takes 1.5 site-times instead of 2.
    """
    cores = cores or os.cpu_count() or 1
    need = n_sites * float(cpus_per_site)
    return int(-(-need // 1)) if cores < need <= 1.5 * cores else cores


def simulate(run_dir: str | Path, overrides: dict, n_sites: int, cpus_per_site: float = 1.0,
             echo=True, timeout: float | None = None) -> dict:
    """Run the ServerApp and one simulated node per site; return run.json or raise."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve({**overrides, "out-dir": str(run_dir)})
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    http_port, control_port = _free_port(), _free_port()
    run_id = f"{run_dir}:{os.getpid()}:{time.time_ns()}"
    env = {
        **os.environ,
        "CLINFED_RUN_ID": run_id,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "RAY_DEDUP_LOGS": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        # On a saturated machine (or a study run under `nice`), Ray's raylet can miss its
        # default health checks (10 s timeout, 5 failures) and the GCS then declares the only
        # node dead and kills every site mid-study: measured here at a load average of ~95 on
        # 2 cores. A local simulation has one node; give it minutes, not seconds.
        "RAY_health_check_timeout_ms": os.environ.get("RAY_health_check_timeout_ms", "60000"),
        "RAY_health_check_failure_threshold": os.environ.get("RAY_health_check_failure_threshold", "20"),
    }
    run_json = run_dir / "run.json"
    if run_json.exists():
        run_json.unlink()  # the verdict must come from this run
    cmd = [
        sys.executable, "-m", "flwr.cli.app", "run", str(app_dir()),
        "--run-config", to_toml_overrides({k: v for k, v in cfg.items()
                                           if k in overrides or k == "out-dir"}),
        "--federation-config", f"num-supernodes={n_sites} client-resources-num-cpus="
                               f"{int(cpus_per_site) if float(cpus_per_site).is_integer() else cpus_per_site} "
                               f"init-args-num-cpus={ray_cpus(n_sites, cpus_per_site)}",
        "--stream",
    ]
    flwr_bin = shutil.which("flwr")
    if flwr_bin:
        cmd[:3] = [flwr_bin]
    t0 = time.time()
    log_path = run_dir / "flwr.log"
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            for line in proc.stdout:
                logf.write(line)
                if echo and not any(n in line for n in _NOISE):
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if timeout and time.time() - t0 > timeout:
                    proc.kill()
                    raise SimulationError(f"the simulation exceeded {timeout:.0f}s and was stopped")
            proc.wait()
    finally:
        _stop_run(run_id, control_port)
    if not run_json.exists():
        raise SimulationError(
            f"the study did not start or crashed before writing {run_json}; see {log_path}")
    run = json.loads(run_json.read_text())
    if run.get("status") != "completed":
        errs = "; ".join(run.get("errors") or []) or "unknown error"
        raise SimulationError(f"the study {run.get('status', 'failed')}: {errs} (log: {log_path})")
    return run


def resume_settings(run_dir: str | Path) -> tuple[dict, int]:
    """(run-config overrides, number of sites) that continue an interrupted RUN_DIR.

    The settings come from the checkpoint itself, so a resumed study cannot
    silently run with different ones.
    """
    from common.config import defaults
    from common.data import list_sites
    from server.checkpoint import ResumeError

    run_dir = Path(run_dir).resolve()
    state = run_dir / "checkpoint" / "state.json"
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: no such RUN_DIR folder")
    if not state.exists():
        raise ResumeError(f"--resume {run_dir}: no checkpoint/state.json there; a study writes it after its first "
                          "completed round, so this run either never completed one or is not a clinfed RUN_DIR")
    try:
        saved = json.loads(state.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError) as err:
        raise ResumeError(f"--resume {run_dir}: {state} is unreadable ({err})") from None
    base = defaults()
    overrides = {k: v for k, v in saved.items() if k in base and v != base[k]}
    overrides["resume"] = True
    data = Path(str(saved.get("data-dir") or ""))
    sites = list_sites(data) if data.is_dir() else []
    if not sites:
        raise ResumeError(f"--resume {run_dir}: the study's hospital folder {data} is gone or empty")
    return overrides, len(sites)
