"""The real Flower Simulation Engine, through `clinfed simulate` (slow; runs in CI). A whole study
run as a user runs it (the installed script, a clean console) is in tests/test_interrupt.py, whose
final `--resume` completes one: a second engine start only for that would cost the suite a minute."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_clinfed_simulate_exits_non_zero_when_the_study_fails(small_federation, tmp_path):
    # LoRA targets the model lacks: every site fails inside the study (not caught before it starts,
    # unlike min-sites above the number of hospitals), flwr run exits 0, we must not.
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "simulate", "--data", str(small_federation), "--out", str(out),
         "--run-config", 'model="tiny-bert" lora-targets="no_such_module" node-wait-timeout=3',
         "--cpus-per-site", "2"],  # one Ray actor: the sites fail in turn, without three actors' imports
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
