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
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from clinfed.common.app_code import write_app_folder
from clinfed.common.config import resolve, to_toml_overrides
from clinfed.common.console import ANSI, StudyConsole
from clinfed.common.errors import ClinfedError
from clinfed.common.flower_processes import flwr_command
from clinfed.common.memory import GPU_SHARE


class SimulationError(ClinfedError, RuntimeError):
    """The study did not complete; the message says where to look."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN_TAG = "CLINFED_RUN_ID"  # every process of a simulated run inherits it: "<RUN_DIR>:<pid of clinfed>:<start ns>"
_STARTED = re.compile(r"started run (\d+)")


def _run_tag(run_dir: Path) -> str:
    return f"{run_dir}:{os.getpid()}:{time.time_ns()}"


def run_processes(run_dir: str | Path) -> list:
    """Every process tagged with a run of RUN_DIR (any clinfed command that ran it), as psutil handles."""
    import psutil

    prefix = f"{Path(run_dir).resolve()}:"
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_TAG, "").startswith(prefix):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _owner_alive(tag: str) -> int | None:
    """The pid of the clinfed command that started a tagged run, if that command still runs.

    The tag records the command's pid and start time, so a recycled pid (a process
    started after the run began) does not count as the owner."""
    import psutil

    try:
        _, pid, started_ns = tag.rsplit(":", 2)
        proc = psutil.Process(int(pid))
        if proc.create_time() <= int(started_ns) / 1e9 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc.pid
    except (ValueError, psutil.Error):
        pass
    return None


def stop_leftovers(run_dir: str | Path, say=print) -> list[int]:
    """Stop what a killed `clinfed simulate` left running on RUN_DIR; refuse if its command still runs.

    A command killed outright (SIGKILL, the out-of-memory killer) cannot stop its
    SuperLink, simulation and Ray workers: they go on training and hold the RUN_DIR's
    lock, so a resume would fail. They carry the run's tag, so they are found here."""
    import psutil

    procs = run_processes(run_dir)
    owners = set()
    for proc in procs:
        try:
            owner = _owner_alive(proc.environ().get(RUN_TAG, ""))
        except psutil.Error:
            continue
        if owner is not None:
            owners.add(owner)
    if owners:
        pids = ", ".join(map(str, sorted(owners)))
        raise SimulationError(f"{Path(run_dir).resolve()} is still being run by clinfed (pid {pids}); "
                              f"stop that command first (Ctrl-C in its terminal, or kill {pids}), then resume")
    pids = _kill(procs)
    if pids:
        say(f"clinfed: stopped {len(pids)} process(es) left running by an earlier, killed run of "
            f"{Path(run_dir).resolve()} (pids {', '.join(map(str, pids[:8]))}{', ...' if len(pids) > 8 else ''})")
    return pids


def _kill(procs: list, grace: float = 0.0) -> list[int]:
    """SIGKILL the processes and their descendants (after `grace` seconds of SIGTERM); wait for them."""
    import psutil

    doomed = list(procs)
    for proc in list(doomed):
        try:
            doomed.extend(c for c in proc.children(recursive=True) if c not in doomed)
        except psutil.Error:
            pass
    for sig, wait in (("terminate", grace), ("kill", 10.0)):
        if not wait:
            continue
        for proc in doomed:
            try:
                getattr(proc, sig)()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(doomed, timeout=wait)
        if not alive:
            break
    return sorted(p.pid for p in doomed)


def _stop_run(run_tag: str, env: dict, flower_run: int | None, control_port: int) -> None:
    """Stop the run through Flower, then make sure every process of it has ended.

    `flwr stop` records the run as stopped in the SuperLink and ends its ServerApp and
    simulation. A SuperLink that got the user's Ctrl-C may already be gone, and a
    simulation process can outlive its parents: every process of the run inherits
    the run's tag, so it is found whoever its parent is now, and killed."""
    import psutil

    if flower_run is not None:
        try:
            subprocess.run([*flwr_command(), "stop", str(flower_run)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20,
                           start_new_session=True)
        except (OSError, subprocess.TimeoutExpired):
            pass
    procs = []
    for proc in psutil.process_iter(["pid"]):
        try:
            cmd = " ".join(proc.cmdline())
            if proc.environ().get(RUN_TAG) == run_tag or ("flower-superlink" in cmd and f":{control_port}" in cmd):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    if flower_run is not None:  # give the stopped run a moment to end by itself
        _, procs = psutil.wait_procs(procs, timeout=5)
    _kill(procs)


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




class GpuShareError(ClinfedError, ValueError):
    """A --gpus-per-site the machine or the study cannot honour (said before Flower starts)."""


def plan_gpus(requested: float | None, n_sites: int, device: str, cuda: bool, gpu_count: int) -> float:
    """Each simulated site's share of a GPU, which Ray accounts for (`client-resources-num-gpus`).

    Ray fractions only limit how many sites run on a GPU at once; they do not cap memory, so
    each site also plans with its share of the card (`CLINFED_GPU_SHARE`, read by
    `common.memory`). `None` (not given): on a machine with CUDA and a device other than
    cpu, the sites share the GPUs evenly (gpu_count / n_sites each, at most 1); else 0,
    sites on CPU. Given 0 with device cuda is a contradiction; more than 1 GPU per site is
    out of scope; a share > 0 without CUDA is refused."""
    device = (device or "auto").strip().lower()
    if requested is None:
        if not cuda or device == "cpu":
            return 0.0
        return min(1.0, max(1, gpu_count) / max(1, n_sites))
    g = float(requested)
    if g < 0:
        raise GpuShareError(f"--gpus-per-site {g:g}: a share of a GPU cannot be negative")
    if g > 1:
        raise GpuShareError(f"--gpus-per-site {g:g}: several GPUs per site are not supported; give a share "
                            "of one GPU between 0 and 1 (e.g. 0.5: two sites per GPU)")
    if g > 0 and not cuda:
        raise GpuShareError(f"--gpus-per-site {g:g} needs a CUDA GPU, and torch sees none on this machine: "
                            "leave it out (sites train on CPU) or run where a GPU is")
    if g > 0 and device == "cpu":
        raise GpuShareError(f"--gpus-per-site {g:g} with device cpu: the sites would hold GPU shares they never "
                            "use; leave out one of them")
    if g == 0 and device == "cuda":
        raise GpuShareError("--gpus-per-site 0 with device cuda: sites without a GPU share cannot train on the GPU; "
                            "give a share (e.g. --gpus-per-site 0.5) or leave it out")
    return g


def federation_config(n_sites: int, cpus_per_site: float, gpus_per_site: float = 0.0, gpu_count: int = 0,
                      existing_cluster: bool = False) -> str:
    """Flower's `--federation-config` for a local simulation: one supernode per site, each with its
    CPU (and GPU) share of Ray's resources. Keys: flwr 1.42's SimulationConfig fields with `-`
    (client_resources_num_gpus is a float, init_args_num_gpus a whole number of GPUs).

    `existing_cluster` (RAY_ADDRESS set): Ray is not started here, so it is given no CPU or GPU
    count (ray.init refuses them when it attaches); the cluster's own resources hold the sites."""
    cpus = int(cpus_per_site) if float(cpus_per_site).is_integer() else cpus_per_site
    out = f"num-supernodes={n_sites} client-resources-num-cpus={cpus}"
    if not existing_cluster:
        out += f" init-args-num-cpus={ray_cpus(n_sites, cpus_per_site)}"
    if gpus_per_site > 0:
        out += f" client-resources-num-gpus={gpus_per_site:g}"
        if not existing_cluster:
            out += f" init-args-num-gpus={max(1, int(gpu_count))}"
    return out


def gpu_plan(overrides: dict, n_sites: int, requested: float | None) -> tuple[float, int]:
    """(each site's GPU share, the GPUs Ray is given) for this machine and study."""
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    device = str(resolve(overrides).device)
    return plan_gpus(requested, n_sites, device, cuda, count), count


def simulate(run_dir: str | Path, overrides: dict, n_sites: int, cpus_per_site: float = 1.0,
             echo=True, timeout: float | None = None, gpus_per_site: float | None = None) -> dict:
    """Run the ServerApp and one simulated node per site; return run.json or raise.

    `gpus_per_site`: each site's share of a GPU (`plan_gpus`; None = the default for this machine)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve({**overrides, "out-dir": str(run_dir)})
    share, gpu_count = gpu_plan(overrides, n_sites, gpus_per_site)
    if share == 0 and gpus_per_site is not None and str(cfg.device) == "auto":
        # --gpus-per-site 0 asked for CPU sites: Ray is told to leave the GPU visible
        # (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0), so `auto` alone would still find it
        cfg = cfg.override({"device": "cpu"})
        overrides = {**overrides, "device": "cpu"}
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    stop_leftovers(run_dir, say=print if echo else (lambda _m: None))
    http_port, control_port = _free_port(), _free_port()
    run_tag = _run_tag(run_dir)
    env = {
        **os.environ,
        RUN_TAG: run_tag,
        "FLWR_HOME": str(flwr_home),
        # `flwr run` starts `flower-superlink` and friends by name: find them beside this
        # interpreter even when its environment is not activated (pipx, an absolute path)
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "RAY_DEDUP_LOGS": "0",  # every site's progress line reaches flwr.log; the console picks what to show
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        GPU_SHARE: f"{share:g}" if share > 0 else "1",
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
        *flwr_command(), "run", str(write_app_folder(run_dir / ".app", "simulation")),
        "--run-config", to_toml_overrides({k: v for k, v in cfg.items()
                                           if k in overrides or k == "out-dir"}),
        "--federation-config", federation_config(n_sites, cpus_per_site, share, gpu_count,
                                                 existing_cluster=bool(os.environ.get("RAY_ADDRESS"))),
        "--stream",
    ]
    t0 = time.time()
    log_path = run_dir / "flwr.log"
    flower_run = None
    console = StudyConsole() if echo else None
    try:
        with open(log_path, "w") as logf:
            # A session of its own: a terminal's Ctrl-C (sent to the whole foreground group)
            # reaches only clinfed, which stops the run in order instead of every process
            # dying in its own way and order.
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, start_new_session=True)
            for line in proc.stdout:
                logf.write(ANSI.sub("", line))
                if flower_run is None and (m := _STARTED.search(line)):
                    flower_run = int(m.group(1))
                if console is not None:
                    console.feed(line)
                if timeout and time.time() - t0 > timeout:
                    raise SimulationError(f"the simulation exceeded {timeout:.0f}s and was stopped")
            proc.wait()
            flower_run = None  # ended by itself: nothing to stop through Flower
    finally:
        if console is not None:
            console.close()
        _stop_run(run_tag, env, flower_run, control_port)
    if not run_json.exists():
        raise SimulationError(
            f"the study did not start or crashed before writing {run_json}; see {log_path}")
    run = json.loads(run_json.read_text())
    if run.get("status") == "running":
        raise SimulationError(f"the study was stopped before it finished (its ServerApp ended mid-study); "
                              f"continue it with: clinfed simulate --resume {run_dir} (log: {log_path})")
    if run.get("status") != "completed":
        errs = "; ".join(run.get("errors") or []) or "unknown error"
        raise SimulationError(f"the study {run.get('status', 'failed')}: {errs} (log: {log_path})")
    return run


def resume_hint(run_dir: str | Path) -> str:
    """What an interrupted RUN_DIR kept, and the command that continues it."""
    run_dir = Path(run_dir).resolve()
    try:
        state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return ("no round had completed, so nothing was checkpointed: start the study again with the same "
                "command")
    total = state.get("fingerprint", {}).get("num-server-rounds")
    kept = ", ".join(f"{phase} round {info.get('round')}" + (f" of {total}" if total else "")
                     for phase, info in state.get("phases", {}).items())
    kept = kept or ", ".join(state.get("done", [])) or "its settings"
    return f"the checkpoint keeps {kept}; continue with: clinfed simulate --resume {run_dir}"


def resume_settings(run_dir: str | Path) -> tuple[dict, int]:
    """(run-config overrides, number of sites) that continue an interrupted RUN_DIR.

    The settings come from the checkpoint itself, so a resumed study cannot
    silently run with different ones.
    """
    from clinfed.common.config import defaults
    from clinfed.common.data import list_sites
    from clinfed.server.checkpoint import ResumeError

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
