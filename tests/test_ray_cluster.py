"""`clinfed simulate --ray-address`: a federation that outgrows one machine runs its simulated
sites on a Ray cluster that is already running, instead of a Ray clinfed starts itself.

The test starts a real head node (`ray start --head --block`, its own temp folder, two CPUs),
runs a tiny study against it, and reads the cluster's own worker logs: the sites' progress lines
must be there (a study that quietly started a Ray of its own would leave none). Every process of
the head is tagged through its environment and stopped at the end; `ray stop` is never called,
since it would stop every Ray on the machine (another test's simulation among them).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
TAG = "CLINFED_TEST_RAY_HEAD"
CONFIG = ('model="tiny-bert" num-server-rounds=1 local-steps=2 personalize-steps=1 bootstrap=20 '
          'min-cell-size=5 regimes="global" subgroups=false drivers=false report=false')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _stop(tag: str, head: subprocess.Popen) -> None:
    procs = _tagged(tag)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    head.wait(timeout=30)


@pytest.mark.slow
def test_simulate_runs_its_sites_on_an_existing_ray_cluster(small_federation, tmp_path):
    tag = uuid.uuid4().hex
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = _free_port()
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, TAG: tag, "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    head = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(temp.glob("session_*/logs/raylet.out")):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        out = tmp_path / "run"
        res = subprocess.run([sys.executable, "-m", "clinfed.cli", "simulate", "--data", str(small_federation),
                              "--out", str(out), "--run-config", CONFIG, "--ray-address", f"127.0.0.1:{port}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert (out / "metrics.csv").exists()
        # the sites ran in the cluster's workers: their progress lines are in its logs
        logs = [f for f in temp.glob("session_*/logs/worker-*") if f.is_file()]
        assert any("[clinfed] site h0" in f.read_text(errors="replace") for f in logs), \
            [f.name for f in logs][:20]
        assert head.poll() is None  # the study left the cluster running, as a shared cluster must be
    finally:
        _stop(tag, head)
        shutil.rmtree(temp, ignore_errors=True)
