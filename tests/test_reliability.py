"""Five sites: one raises in round 2 and rejoins, another drops out for good from round 2.
The study finishes with the others, and run.json and the report say who missed what and why."""

import json

import pandas as pd
import pytest

from clinfed.simulations.app import app as client_app
from clinfed.common.config import resolve
from clinfed.common.data import list_sites
from clinfed.simulations.inprocess import LocalGrid
from clinfed.server.study import Study


@pytest.fixture(scope="module")
def five_sites(tmp_path_factory):
    from conftest import small_cells_policy
    from clinfed.simulations.generate import generate_federation

    out = tmp_path_factory.mktemp("fed5")
    generate_federation(out, n_hospitals=5, seed=11, sizes=[180, 150, 130, 120, 110], site_policy=small_cells_policy())
    return out


class FlakySites:
    """The real ClientApp, except that site `raises` gets a broken round-2 message (its handler
    raises, and the app answers with an error reply) and site `gone` never answers from round 2."""

    def __init__(self, raises: int, gone: int):
        self.raises, self.gone, self.gone_since = raises, gone, None

    def __call__(self, msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content.config_records else 0
        if pid == self.raises and msg.metadata.message_type == "train" and rnd == 2:
            del msg.content["arrays"]  # the handler fails reading its adapter: a real exception at the site
        return client_app(msg, ctx)

    def drop(self, node, msg) -> bool:
        """LocalGrid's hook: True = no reply (the node is offline)."""
        rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content.config_records else 0
        if node == 1000 + self.gone and msg.metadata.message_type == "train" and rnd == 2:
            self.gone_since = "round 2"
        return node == 1000 + self.gone and self.gone_since is not None


def test_failing_and_dropped_sites_do_not_stop_the_study(five_sites, tmp_path):
    sites = [name for name, _ in list_sites(five_sites)]
    cfg = resolve({"model": "tiny-bert", "data-dir": str(five_sites), "num-server-rounds": 3, "local-steps": 2,
                   "personalize-steps": 1, "bootstrap": 10, "min-cell-size": 5, "subgroups": False,
                   "regimes": "global,local,personalized", "min-sites": 3})
    flaky = FlakySites(raises=1, gone=3)
    grid = LocalGrid(flaky, [{"partition-id": i, "num-partitions": 5} for i in range(5)], cfg, fail=flaky.drop)
    Study(grid, cfg, tmp_path).execute()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "completed", run["errors"]
    raised, gone = sites[1], sites[3]
    r1, r2, r3 = [r for r in run["rounds"] if r["phase"] == "global"]
    assert set(r1["sites"]) == set(sites)
    assert raised in r2["failures"] and "clinfed site error" in r2["failures"][raised]
    assert "no reply" in r2["failures"][gone]
    assert set(r2["sites"]) == set(sites) - {raised, gone}
    assert raised in r3["sites"] and gone not in r3["sites"]  # the failed site rejoined; the dropped one did not
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert set(df["site"]) == set(sites) - {gone}
    report = (tmp_path / "report.html").read_text()
    assert f"{gone} (no results at all)" in report
    assert raised in report and "clinfed site error" in report
