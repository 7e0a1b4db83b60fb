"""Stopping a real `clinfed simulate` with the signals users and schedulers send, and resuming it;
the final resume also checks the command as a user runs it (installed script, clean console).
SIGTERM and SIGKILL stop a study mid-round, Ctrl-C (SIGINT, started ignored) one that is still
starting; SIGHUP, handled by the same code, is checked in process (each Flower start costs the
suite tens of seconds).

Each test sets the signal dispositions of the process it starts (SIGINT starts
*ignored*, as in a background job of a non-interactive shell, where Python would
otherwise never see it), interrupts on an event (a checkpointed round, read from
RUN_DIR/checkpoint/state.json), and freezes the simulated sites (SIGSTOP) before
the signal, so that no further round can complete except by a study that ignores
the signal: the tests pass or fail on clinfed's behaviour, not on the machine's
speed, its load or the shell that launched the suite. Slow: every step starts a
real Flower Simulation Engine.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 6
CONFIG = (f'model="tiny-bert" num-server-rounds={ROUNDS} local-steps=40 personalize-steps=2 bootstrap=20 '
          'min-cell-size=5 regimes="global,local" local-regime-steps=5 subgroups=false')
STOP_WITHIN = 60  # seconds from the signal to the command's exit, on a loaded 2-core machine (typically 3-8 s)


def _dispositions():
    """What a background job of a non-interactive shell inherits: SIGINT ignored; the rest default."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# One Ray actor runs the three sites in turn (`--cpus-per-site 2` on 2 cores): each actor imports
# torch, transformers and peft (seconds of CPU), and this test starts Flower four times.
ONE_ACTOR = ("--cpus-per-site", "2")


def _clinfed(*args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clinfed.cli", *args, *ONE_ACTOR], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_dispositions)


def _round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["phases"]["global"]["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_round(proc, run_dir: Path, log: Path, at_least: int = 1, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and _round(run_dir) < at_least:
        time.sleep(0.2)
    assert proc.poll() is None and _round(run_dir) >= at_least, log.read_text()[-3000:]


def _run_processes(run_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("CLINFED_RUN_ID", "").startswith(f"{run_dir.resolve()}:"):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _living(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:100])
        except psutil.Error:
            pass
    return out


def _freeze_sites(run_dir: Path) -> int:
    """SIGSTOP the simulated sites (Ray's ClientApp actors): from now on no round can complete."""
    sites = [p for p in _run_processes(run_dir) if "ClientAppActor" in " ".join(p.cmdline())]
    for p in sites:
        p.suspend()
    return len(sites)


def _interrupt(proc, sig, run_dir: Path, log: Path) -> tuple[int, float]:
    """Freeze the sites, send `sig` as a user or scheduler would; return (round at the signal, seconds to exit)."""
    assert _freeze_sites(run_dir) > 0, log.read_text()[-3000:]
    at_signal = _round(run_dir)
    t0 = time.time()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the foreground process group
    else:
        os.kill(proc.pid, sig)  # `kill PID`, `timeout`, a batch scheduler: the command's own pid
    try:
        proc.wait(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"clinfed simulate still ran {STOP_WITHIN}s after {sig.name}: " + log.read_text()[-2000:])
    return at_signal, time.time() - t0


def _assert_stopped(run_dir: Path, at_signal: int) -> int:
    """Nothing of the run survives, and the checkpoint stays at the last round completed before the signal."""
    assert not _living(_run_processes(run_dir)), _living(_run_processes(run_dir))
    done = _round(run_dir)
    assert at_signal <= done <= at_signal + 1 < ROUNDS  # a round whose replies were all in may still close
    mtime = (run_dir / "checkpoint" / "state.json").stat().st_mtime
    time.sleep(2)
    assert (run_dir / "checkpoint" / "state.json").stat().st_mtime == mtime
    return done


@pytest.mark.slow
def test_sigterm_and_sigkill_each_stop_the_study_and_resume_finishes_it(small_federation, tmp_path):
    out = tmp_path / "run"
    resume = ("simulate", "--resume", str(out))

    # 1. SIGTERM to the command's pid (`kill`, `timeout`, `systemctl stop`) once round 1 is checkpointed
    log = tmp_path / "1.log"
    proc = _clinfed("simulate", "--data", str(small_federation), "--out", str(out), "--run-config", CONFIG, log=log)
    _wait_for_round(proc, out, log)
    at_signal, took = _interrupt(proc, signal.SIGTERM, out, log)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "interrupted by SIGTERM" in text and f"clinfed simulate --resume {out.resolve()}" in text, text[-2000:]
    done = _assert_stopped(out, at_signal)
    print(f"SIGTERM: exit {took:.1f}s after the signal, checkpoint at round {done}")

    # 2. the resumed command is killed outright (SIGKILL, the out-of-memory killer): no handler runs, and the
    #    SuperLink, simulation and sites go on without it
    #    (frozen first, so that they cannot finish the study before the resume below starts)
    log = tmp_path / "3.log"
    proc = _clinfed(*resume, log=log)
    _wait_for_round(proc, out, log, at_least=done + 1)
    _freeze_sites(out)
    proc.kill()
    proc.wait()
    assert _living(_run_processes(out)), "a SIGKILLed command is expected to leave its run's processes behind"

    # 3. --resume finds what the killed command left, stops it, says so, and finishes the study.
    #    Run as pipx runs it: the `clinfed` script by its absolute path, its environment not
    #    activated (no virtual environment on PATH), from a folder that is not the checkout.
    script = Path(sys.executable).parent / "clinfed"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    res = subprocess.run([str(script), *resume, *ONE_ACTOR], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600, preexec_fn=_dispositions)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "left running by an earlier, killed run" in res.stdout, res.stdout[-3000:]
    assert not _living(_run_processes(out))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert [r["round"] for r in run["rounds"]] == list(range(1, ROUNDS + 1))
    assert pd.read_csv(out / "metrics.csv")["site"].nunique() == 3
    assert (out / "report.html").exists()
    # piped to a file, the console is for a person: no colour codes, no Ray actor prefixes or
    # deduplication notes, no Flower warning that does not apply; the whole log is in flwr.log
    console = res.stdout
    for machinery in ("\x1b[", "ClientAppActor", "repeated", "fraction_evaluate", "Federated evaluation will be"):
        assert machinery not in console, (machinery, console[-3000:])
    assert f"global round {ROUNDS}/{ROUNDS}:" in console and "evaluation 1/1:" in console, console[-3000:]
    flwr_log = (out / "flwr.log").read_text()
    assert "site h" in flwr_log and "\x1b[" not in flwr_log


@pytest.mark.slow
def test_ctrl_c_before_any_round_stops_everything_and_says_there_is_nothing_to_resume(small_federation,
                                                                                      tmp_path):
    """Ctrl-C (SIGINT to the process group, in a job that started with SIGINT ignored) while
    Flower and the sites start (nothing checkpointed yet)."""
    out = tmp_path / "run"
    log = tmp_path / "log"
    proc = _clinfed("simulate", "--data", str(small_federation), "--out", str(out), "--run-config", CONFIG, log=log)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _run_processes(out):
        time.sleep(0.1)
    assert proc.poll() is None, log.read_text()[-3000:]
    time.sleep(1)  # Flower is starting its SuperLink and simulation
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    proc.wait(timeout=STOP_WITHIN)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGINT, text[-2000:]
    assert "interrupted by SIGINT" in text and "start the study again" in text, text[-2000:]
    assert time.time() - t0 < STOP_WITHIN
    assert not _living(_run_processes(out)), _living(_run_processes(out))
    assert not (out / "checkpoint" / "state.json").exists()


def test_sighup_stops_like_sigterm_unless_it_started_ignored():
    """The terminal closing (SIGHUP) raises the same Interrupted as SIGTERM, with every `finally`
    on the way out run; under `nohup` (SIGHUP started ignored) it stays ignored, as asked."""
    from clinfed.cli.main import Interrupted, stop_on_signals

    previous = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        cleaned = []
        with pytest.raises(Interrupted) as err:
            try:
                with stop_on_signals():
                    os.kill(os.getpid(), signal.SIGHUP)
                    time.sleep(5)
            finally:
                cleaned.append(True)
        assert err.value.name == "SIGHUP" and cleaned == [True]
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # restored
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_run_dir_whose_command_still_runs_is_not_taken_over(tmp_path):
    """Leftovers are stopped only when the command that started them is gone; a live one is refused."""
    from clinfed.simulations.local import SimulationError, stop_leftovers

    tag = f"{tmp_path.resolve()}:{os.getpid()}:{time.time_ns()}"  # this test plays the live command
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "CLINFED_RUN_ID": tag})
    try:
        time.sleep(0.3)
        with pytest.raises(SimulationError, match=rf"still being run by clinfed \(pid {os.getpid()}\)"):
            stop_leftovers(tmp_path)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
    # the same process, tagged by a command that has exited, is stopped
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "CLINFED_RUN_ID": f"{tmp_path.resolve()}:{dead.stdout.strip()}:1"})
    try:
        time.sleep(0.3)
        said = []
        assert stop_leftovers(tmp_path, say=said.append) == [orphan.pid]
        orphan.wait(timeout=10)  # ended (psutil reaped it, so its exit status is not ours to read)
        assert "left running" in said[0]
    finally:
        if orphan.poll() is None:
            orphan.kill()
