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
    """Run as pipx runs it: the `clinfed` script by its absolute path, its environment not activated
    (no virtual environment on PATH), from a folder that is not the checkout."""
    import os

    out = tmp_path / "run"
    script = Path(sys.executable).parent / "clinfed"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    res = subprocess.run(
        [str(script), "simulate", "--data", str(small_federation), "--out", str(out),
         "--run-config", 'model="tiny-bert" num-server-rounds=2 local-steps=3 personalize-steps=2 '
                         "bootstrap=20 min-cell-size=5"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
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
    # piped to a file, the console is for a person: no colour codes, no Ray actor prefixes or
    # deduplication notes, no Flower warning that does not apply; the whole log is in flwr.log
    console = res.stdout
    for machinery in ("\x1b[", "ClientAppActor", "repeated", "fraction_evaluate", "Federated evaluation will be"):
        assert machinery not in console, (machinery, console[-3000:])
    assert "global round 2/2:" in console and "evaluation 1/1:" in console, console[-3000:]
    assert "ClientAppActor" in (out / "flwr.log").read_text() or "site h" in (out / "flwr.log").read_text()
    assert "\x1b[" not in (out / "flwr.log").read_text()


@pytest.mark.slow
def test_clinfed_simulate_exits_non_zero_when_the_study_fails(small_federation, tmp_path):
    # LoRA targets the model lacks: every site fails inside the study (not caught before it starts,
    # unlike min-sites above the number of hospitals), flwr run exits 0, we must not.
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "simulate", "--data", str(small_federation), "--out", str(out),
         "--run-config", 'model="tiny-bert" lora-targets="no_such_module" node-wait-timeout=3'],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode != 0
    assert "NoMatchingPeftModuleError" in res.stderr and "min-sites=2" in res.stderr, res.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_small_federations_run_all_sites_at_once():
    """Ray gets the cores, or all sites when that oversubscribes by at most half (no lone last wave)."""
    from clinfed.simulations.local import ray_cpus

    assert ray_cpus(3, 1, cores=2) == 3      # the generative default: one wave of 3, not 2 + 1
    assert ray_cpus(2, 1, cores=2) == 2
    assert ray_cpus(6, 1, cores=2) == 2      # the classifier default: 3 even waves of 2
    assert ray_cpus(5, 1, cores=4) == 5 and ray_cpus(7, 1, cores=4) == 4
    assert ray_cpus(3, 2, cores=4) == 6 and ray_cpus(4, 2, cores=4) == 4
