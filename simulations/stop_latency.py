"""How long `clinfed simulate` takes to stop after a signal, measured on a real study.

Starts (or resumes) the study in RUN_DIR, waits until one more federated round is
checkpointed, sends the signal the way its sender would (Ctrl-C signals the
process group; `kill`, `timeout` and schedulers the command's pid), and prints
the seconds from the signal to the command's exit, its exit code, the round the
checkpoint kept and the machine's load. Run it repeatedly on one RUN_DIR:

    python -m clinfed.simulations.stop_latency runs/stop SIGTERM
    python -m clinfed.simulations.stop_latency runs/stop SIGINT    # resumes, then interrupts again
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path


def _round(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["phases"]["global"]["round"]
    except (OSError, ValueError, KeyError):
        return 0


def measure(out: Path, sig: signal.Signals, extra: list[str]) -> dict:
    out = out.resolve()
    resuming = (out / "checkpoint" / "state.json").exists()
    cmd = [sys.executable, "-m", "clinfed.cli", "simulate",
           *(["--resume", str(out)] if resuming else ["--out", str(out), *extra])]
    before = _round(out)
    log = out.parent / f"{out.name}.{sig.name}.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    while _round(out) <= before and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        raise SystemExit(f"the study ended before a round was checkpointed; see {log}")
    t0 = time.time()
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    proc.wait()
    return {"signal": sig.name, "seconds": round(time.time() - t0, 2), "exit": proc.returncode,
            "round_kept": _round(out), "load_1min": round(os.getloadavg()[0], 1),
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__)
        return 2
    print(json.dumps(measure(Path(argv[0]), signal.Signals[argv[1]], argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
