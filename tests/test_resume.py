"""A server that crashes mid-study resumes from its checkpoint and ends with the same
results as a study that was never interrupted (same seed, same settings)."""

import json

import pandas as pd
import pytest

from clinfed.simulations.app import app as client_app
from clinfed.common.config import resolve
from clinfed.common.data import list_sites
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from clinfed.server.checkpoint import ResumeError
from clinfed.server.study import Study


class ServerCrash(RuntimeError):
    pass


class CrashingGrid(LocalGrid):
    """Dies (like a killed ServerApp) when the server sends its `n`-th message of a type."""

    def __init__(self, *a, crash_type: str, crash_at: int, **kw):
        super().__init__(*a, **kw)
        self.crash_type, self.crash_at, self.seen = crash_type, crash_at, 0

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == self.crash_type for m in messages):
            self.seen += 1
            if self.seen == self.crash_at:
                raise ServerCrash(f"server killed while sending {self.crash_type} #{self.crash_at}")
        return super().push_messages(messages)


def _cfg(data, **extra):
    return resolve({"report": False, "model": "tiny-bert", "data-dir": str(data), "num-server-rounds": 3, "local-steps": 3,
                    "personalize-steps": 2, "bootstrap": 20, "min-cell-size": 5, "batch-size": 8,
                    "subgroups": False, "regimes": "global,local,personalized,cluster,similarity-weighted",
                    "share-local-adapters": True, **extra})


def _nodes(data):
    return simulated_nodes(len(list_sites(data)))


def _values(run_dir):
    df = pd.read_csv(run_dir / "metrics.csv")
    return df.set_index(["site", "regime", "split", "subgroup", "metric"])["value"].sort_index()


@pytest.fixture(scope="module")
def uninterrupted(small_federation, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    cfg = _cfg(small_federation)
    Study(LocalGrid(client_app, _nodes(small_federation), cfg), cfg, run_dir).execute()
    return run_dir


@pytest.mark.parametrize("crash_type,crash_at,personalize_resent", [
    ("train", 5, True),       # killed in round 2 of the cluster phase (global rounds 1-3 done)
    ("evaluate", 1, False),   # killed at evaluation: all training kept, site-held adapters at the sites
])
def test_killed_study_resumes_to_the_same_results(small_federation, tmp_path, uninterrupted,
                                                  crash_type, crash_at, personalize_resent):
    cfg = _cfg(small_federation)
    grid = CrashingGrid(client_app, _nodes(small_federation), cfg, crash_type=crash_type, crash_at=crash_at)
    with pytest.raises(ServerCrash):
        Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "failed"
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    done_before = {p: i["round"] for p, i in state["phases"].items()}

    resumed_cfg = _cfg(small_federation, resume=True)
    grid2 = LocalGrid(client_app, _nodes(small_federation), resumed_cfg)  # restarted nodes, fresh contexts
    Study(grid2, resumed_cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "completed", run["errors"]
    assert run["resumed"][0]["rounds_done"] == done_before
    # the rounds completed before the crash were not trained again
    sent = [m.metadata.message_type for m in grid2.sent]
    rounds_total = 2 * 3  # global and cluster phases, 3 rounds each
    assert sent.count("train") == 3 * (rounds_total - sum(done_before.values()))
    assert sent.count("train.personalize") == (3 if personalize_resent else 0)
    # every round is recorded once, and the results equal the uninterrupted study's
    phases = [(r["phase"], r["round"]) for r in run["rounds"]]
    assert len(phases) == len(set(phases)) == len(json.loads((uninterrupted / "run.json").read_text())["rounds"])
    a, b = _values(uninterrupted), _values(tmp_path)
    assert list(a.index) == list(b.index)
    pd.testing.assert_series_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-9)


def test_resume_refuses_a_different_study_or_no_checkpoint(small_federation, tmp_path):
    cfg = _cfg(small_federation, resume=True)
    with pytest.raises(ResumeError, match="no checkpoint"):
        Study(LocalGrid(client_app, _nodes(small_federation), cfg), cfg, tmp_path).execute()
    cfg0 = _cfg(small_federation, **{"num-server-rounds": 1, "regimes": "global"})
    Study(LocalGrid(client_app, _nodes(small_federation), cfg0), cfg0, tmp_path).execute()
    other = _cfg(small_federation, resume=True, **{"num-server-rounds": 1, "regimes": "global", "local-steps": 9})
    with pytest.raises(ResumeError, match="local-steps: 3 -> 9"):
        Study(LocalGrid(client_app, _nodes(small_federation), other), other, tmp_path).execute()


def test_a_run_dir_in_use_by_another_study_is_refused_untouched(small_federation, tmp_path):
    """An orphaned or second ServerApp writing the same RUN_DIR would corrupt the checkpoint."""
    import fcntl
    import subprocess
    import sys

    from clinfed.server.study import StudyError

    # another process holds the RUN_DIR's lock, as a still-running study does
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242'); f.flush()\n"
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = _cfg(small_federation, **{"num-server-rounds": 1, "regimes": "global"})
        with pytest.raises(StudyError, match=r"being written by another running study \(pid 4242\)"):
            Study(LocalGrid(client_app, _nodes(small_federation), cfg), cfg, tmp_path).execute()
        assert not (tmp_path / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone (even killed), the lock is free
    Study(LocalGrid(client_app, _nodes(small_federation), cfg), cfg, tmp_path).execute()
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "completed"
    with open(tmp_path / ".lock") as f:  # and the finished study released it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
