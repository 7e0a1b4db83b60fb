"""What the server needs to continue a study after a crash: RUN_DIR/checkpoint/.

Written atomically after every completed federated round and after each
site-held phase:

- `state.json`: the config fingerprint, per phase the last completed round
  and its groups, the round records, errors and failures so far, the
  clusters, similarity weights and Python's random state;
- `<phase>/<group>.npz`: the phase's current adapter per group (the global,
  cluster, SFT or DPO adapter) after that round;
- `<phase>/strategy/<group>.npz`: what the group's aggregation strategy carries
  into the next round (server.aggregation.strategy_state: FedAdam's, FedYogi's and
  FedAdagrad's moments, FedAvgM's momentum); none for FedAvg, FedProx and the
  robust strategies, which keep nothing between rounds beyond the adapter;
- `<phase>/last/<site>.npz`: each site's last update (the similarity-weighted
  regime averages them), and `shared-local/<site>.npz`: local adapters sites
  chose to share.

Site-held adapters (`local`, `personalized`) stay at the
sites, in their own output folders, across a restart. Evaluation is not
checkpointed: a resumed study scores every regime again.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
from clinfed.common.errors import ClinfedError

# keys that change how a run is watched or where it writes, not what it computes
NOT_IN_FINGERPRINT = ("out-dir", "resume", "report", "round-timeout", "node-wait-timeout", "expected-sites",
                      "min-sites", "client-threads")


class ResumeError(ClinfedError, RuntimeError):
    """RUN_DIR cannot be resumed (no checkpoint, or a different study)."""


def fingerprint(cfg: dict) -> dict:
    return {k: v for k, v in sorted(cfg.items()) if k not in NOT_IN_FINGERPRINT}


def _save_npz(path: Path, state: dict[str, np.ndarray]):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{k.replace("/", "|"): np.asarray(v) for k, v in state.items()})
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    """Write JSON so that a crash mid-write leaves the previous file, never half of one:
    a resumed study reads what the crashed one last finished."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k.replace("|", "/"): z[k].copy() for k in z.files}


def _fname(name: str) -> str:
    return name.replace("/", "_") + ".npz"


class Checkpoint:
    def __init__(self, run_dir: Path, cfg: dict):
        self.dir = Path(run_dir) / "checkpoint"
        self.cfg = cfg
        self.state: dict = {"fingerprint": fingerprint(cfg), "phases": {}, "done": []}

    # ------------------------------------------------------------- reading
    def load(self) -> dict:
        """The saved state; refuses a missing checkpoint or one of a different study."""
        path = self.dir / "state.json"
        if not path.exists():
            raise ResumeError(f"cannot resume: {self.dir.parent} has no checkpoint (state.json); "
                              "a study writes one after its first completed round")
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ResumeError(f"cannot resume: {path} is unreadable ({err})") from None
        old, new = saved.get("fingerprint", {}), fingerprint(self.cfg)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ResumeError(f"cannot resume {self.dir.parent}: the run config differs from the interrupted "
                              f"study's ({shown}); resume with the same settings or start a new RUN_DIR")
        self.state = saved
        if saved.get("random_state") is not None:
            version, internal, gauss = saved["random_state"]
            random.setstate((version, tuple(internal), gauss))
        return saved

    def rounds_done(self, phase: str) -> tuple[int, dict[str, dict[str, np.ndarray]]]:
        """(last completed round, adapter per group) of a federated phase; (0, {}) if none."""
        info = self.state["phases"].get(phase)
        if not info:
            return 0, {}
        return int(info["round"]), {g: _load_npz(self.dir / phase / _fname(g)) for g in info["groups"]}

    def strategy_states(self, phase: str) -> dict[str, dict[str, np.ndarray]]:
        """The aggregation strategy's state per group after the phase's last completed round."""
        info = self.state["phases"].get(phase) or {}
        return {g: _load_npz(self.dir / phase / "strategy" / _fname(g)) for g in info.get("strategy", [])}

    def last_updates(self, phase: str) -> dict[str, dict[str, np.ndarray]]:
        folder = self.dir / phase / "last"
        return {p.stem: _load_npz(p) for p in sorted(folder.glob("*.npz"))} if folder.exists() else {}

    def is_done(self, step: str) -> bool:
        return step in self.state["done"]

    def shared_local(self) -> dict[str, dict[str, np.ndarray]]:
        folder = self.dir / "shared-local"
        return {p.stem: _load_npz(p) for p in sorted(folder.glob("*.npz"))} if folder.exists() else {}

    # ------------------------------------------------------------- writing
    def save_round(self, phase: str, rnd: int, groups: dict[str, dict[str, np.ndarray]],
                   last: dict[str, dict[str, np.ndarray]], study_state: dict,
                   strategies: dict[str, dict[str, np.ndarray]] | None = None):
        """`strategies`: per group, the aggregation strategy's state (numpy arrays by name;
        empty for strategies that keep none)."""
        for g, state in groups.items():
            _save_npz(self.dir / phase / _fname(g), state)
        for site, state in last.items():
            _save_npz(self.dir / phase / "last" / _fname(site), state)
        kept = {g: st for g, st in (strategies or {}).items() if st}
        for g, state in kept.items():
            _save_npz(self.dir / phase / "strategy" / _fname(g), state)
        self.state["phases"][phase] = {"round": int(rnd), "groups": sorted(groups),
                                       **({"strategy": sorted(kept)} if kept else {})}
        self._write(study_state)

    def save_done(self, step: str, study_state: dict, shared_local: dict[str, dict[str, np.ndarray]] | None = None):
        for site, state in (shared_local or {}).items():
            _save_npz(self.dir / "shared-local" / _fname(site), state)
        if step not in self.state["done"]:
            self.state["done"].append(step)
        self._write(study_state)

    def _write(self, study_state: dict):
        self.state.update(study_state)
        self.state["random_state"] = random.getstate()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "state.json", self.state)

    def clear(self):
        shutil.rmtree(self.dir, ignore_errors=True)
