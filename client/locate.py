"""Where a node's hospital is, and under which rules: its table, its lasting folder, its policy.

A deployed node names its table (`data-path`) and output folder; a simulated node
is one of the federation's hospital folders, by partition id. Either way the
site's own policy file bounds what the study's run config may ask
(`common.policy.effective`), and with an arm of a comparison the site runs only
arms its study lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from clinfed.client.classifier_site import Site
from clinfed.common.config import for_arm, from_run_config
from clinfed.common.data import find_table, list_sites
from clinfed.common.policy import Policy, effective, hardware_overrides, load_site_policy
from clinfed.common.training import set_threads


def quiet_libraries():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class SimulationSupport:
    """What only a simulation on synthetic data offers a site (`clinfed.simulations.app` supplies it).

    A hospital's node has none of it: it reads its own table (`data-path`) and never
    takes records of another site. In simulation, `federation(cfg)` is the folder of
    hospital folders when the run config names no `data-dir` (the default synthetic
    federation), and `borrow` is the `augmented` regime's instance borrowing."""

    federation: Callable[[dict], Path] | None = None
    borrow: Callable | None = None


def simulated_federation(cfg: dict, sim: SimulationSupport | None) -> Path:
    """The simulated federation's folder: the run config's `data-dir`, else the simulation's default."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if sim is None or sim.federation is None:
        raise ValueError("the run config names no data-dir: give the folder of hospital folders "
                         "(`clinfed generate --out DIR` writes one), or run `clinfed simulate`")
    return sim.federation(cfg)


def _site_policy(node_config: dict, folder: Path):
    """The hospital's own policy file, checked; None without one. A deployed node names it
    (node config `policy-path`); a simulated hospital may keep one in its folder
    (`clinfed-policy.toml`), read the same way."""
    from clinfed.common.policy import SIMULATED_POLICY_FILE

    path = node_config.get("policy-path")
    if not path and "data-path" not in node_config and (Path(folder) / SIMULATED_POLICY_FILE).is_file():
        path = Path(folder) / SIMULATED_POLICY_FILE
    if not path:
        return None
    return load_site_policy(str(path))


def site_home(node_config: dict, folder: Path) -> Path:
    """The site's own lasting folder: a deployed node's output folder (`output-path`, else
    `<data folder>/clinfed-out`); in simulation `<hospital folder>/clinfed-out`, beside the
    hospital's data, never in the server's run folder. The DP ledger lives here."""
    if "data-path" in node_config and node_config.get("output-path"):
        return Path(str(node_config["output-path"]))
    return Path(folder) / "clinfed-out"


def in_simulation(context: Context) -> bool:
    return "data-path" not in context.node_config and "partition-id" in context.node_config


def open_site(context: Context, run_dir: str = "", arm: str = "",
              sim: SimulationSupport | None = None) -> tuple[Site, dict, Policy]:
    """The classifier study's view of this node's hospital (for one arm of a comparison)."""
    name, folder, table, out_dir, cfg, policy = locate_site(context, run_dir, arm, sim)
    return Site.get(name, table, out_dir, cfg), cfg, policy


def arm_config(cfg: dict, arm: str) -> dict:
    """The run config with the arm's overrides applied. A site runs only arms its study's
    run config lists (the server cannot ask for another model or method)."""
    from clinfed.common.arms import parse_arm, parse_arms

    wanted = parse_arm(arm)
    if wanted.name not in [a.name for a in parse_arms(cfg.get("arms", ""))]:
        from clinfed.common.config import ConfigError

        raise ConfigError(f"arm {wanted.name} is not one of the study's arms (run config 'arms')")
    return for_arm(cfg, wanted)


def locate_site(context: Context, run_dir: str = "", arm: str = "", sim: SimulationSupport | None = None):
    """Find this node's hospital: `data-path` (deployment) or partition id (simulation).
    With an arm, its run config and its own sub-folder (`<site folder>/arms/<arm>`)."""
    quiet_libraries()
    cfg = from_run_config(context.run_config)
    if arm:
        cfg = arm_config(cfg, arm)
    nc = dict(context.node_config)
    set_threads(cfg.client_threads or None)
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"]))
        table = find_table(data_path)
        folder = data_path if data_path.is_dir() else data_path.parent
        name = str(nc.get("site") or folder.name)
        out_dir = site_home(nc, folder)
    elif "partition-id" in nc:
        data_dir = simulated_federation(cfg, sim)
        sites = list_sites(data_dir)
        pid, nparts = int(nc["partition-id"]), int(nc["num-partitions"])
        if nparts != len(sites):
            raise ValueError(
                f"the federation has {nparts} simulated nodes but {data_dir} holds {len(sites)} "
                f"hospitals: run with --federation-config \"num-supernodes={len(sites)}\" "
                "(clinfed simulate sets it for you)"
            )
        name, folder = sites[pid]
        table = find_table(folder)
        run_dir = run_dir or cfg.out_dir
        if not run_dir:
            raise ValueError("simulation needs the run folder (sent by the server as 'run-dir')")
        # In simulation a site's private folder lives inside RUN_DIR/sites/<name>.
        out_dir = Path(run_dir) / "sites" / name
    else:
        raise ValueError("node config has neither 'data-path' (deployment) nor 'partition-id' (simulation)")
    site_policy = _site_policy(nc, folder)
    hardware = hardware_overrides(site_policy, nc)
    if hardware and any(cfg[k] != v for k, v in hardware.items()):
        cfg = cfg.override(hardware)  # the site's card, not the study, decides these (checked again)
    policy = effective(cfg, site_policy, deployment="data-path" in nc)
    if arm:
        from clinfed.common.arms import parse_arm

        out_dir = Path(out_dir) / "arms" / parse_arm(arm).safe_name
    return name, folder, table, out_dir, cfg, policy
