"""The real Flower Simulation Engine, through `clinfed simulate` (slow; runs in CI)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_clinfed_simulate_runs_a_study_with_flower(small_federation, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--data", str(small_federation), "--out", str(out),
         "--run-config", 'model="tiny-bert" num-server-rounds=2 local-steps=3 personalize-steps=2 '
                         "bootstrap=20 min-cell-size=5"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert [r["phase"] for r in run["rounds"]] == ["global", "global", "cluster", "cluster"]
    df = pd.read_csv(out / "metrics.csv")
    main = {"base", "global", "local", "personalized", "cluster", "similarity-weighted", "augmented"}
    # --data given: local adapters stay home, so only cluster adapters cross sites
    assert set(df["regime"]) == main | {"cluster@c0", "cluster@c1"}
    assert df["site"].nunique() == 3
    assert (out / "report.html").exists()


@pytest.mark.slow
def test_clinfed_simulate_exits_non_zero_when_the_study_fails(small_federation, tmp_path):
    # LoRA targets the model lacks: every site fails inside the study (not caught before it starts,
    # unlike min-sites above the number of hospitals), flwr run exits 0, we must not.
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--data", str(small_federation), "--out", str(out),
         "--run-config", 'model="tiny-bert" lora-targets="no_such_module" node-wait-timeout=3'],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode != 0
    assert "NoMatchingPeftModuleError" in res.stderr and "min-sites=2" in res.stderr, res.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_interrupted_simulation_resumes_with_clinfed_simulate_resume(small_federation, tmp_path):
    """Kill `clinfed simulate` once a round is checkpointed, then `--resume` finishes the study
    without training the completed rounds again."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    # enough rounds that Ctrl-C lands mid-study: stopping takes seconds, and replies now arrive within 0.5 s
    cfg = ('model="tiny-bert" num-server-rounds=30 local-steps=40 personalize-steps=2 bootstrap=20 '
           'min-cell-size=5 regimes="global,local" subgroups=false')
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "simulate", "--data", str(small_federation),
                             "--out", str(out), "--run-config", cfg], cwd=ROOT, stdout=open(tmp_path / "log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["phases"].get("global", {}).get("round", 0) >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C: clinfed stops its SuperLink on the way out
            proc.wait(timeout=300)  # a loaded CI machine needs more than a minute to stop
    done = json.loads(state.read_text())["phases"]["global"]["round"]
    assert done < 30
    # nothing of the interrupted run survives it (an orphaned ServerApp would write into RUN_DIR)
    import psutil

    def survivors():
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("CLINFED_RUN_ID", "").startswith(f"{out.resolve()}:"):
                    found.append(" ".join(p.cmdline())[:120])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    assert not survivors(), survivors()
    mtime = state.stat().st_mtime
    time.sleep(3)
    assert state.stat().st_mtime == mtime and json.loads(state.read_text())["phases"]["global"]["round"] == done
    res = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--resume", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["resumed"][0]["rounds_done"]["global"] == done
    assert [r["round"] for r in run["rounds"]] == list(range(1, 31))
    assert pd.read_csv(out / "metrics.csv")["site"].nunique() == 3
    # a resume with nothing to resume says so, without a traceback
    bad = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--resume", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_small_federations_run_all_sites_at_once():
    """Ray gets the cores, or all sites when that oversubscribes by at most half (no lone last wave)."""
    from simulations.local import ray_cpus

    assert ray_cpus(3, 1, cores=2) == 3      # the generative default: one wave of 3, not 2 + 1
    assert ray_cpus(2, 1, cores=2) == 2
    assert ray_cpus(6, 1, cores=2) == 2      # the classifier default: 3 even waves of 2
    assert ray_cpus(5, 1, cores=4) == 5 and ray_cpus(7, 1, cores=4) == 4
    assert ray_cpus(3, 2, cores=4) == 6 and ray_cpus(4, 2, cores=4) == 4
