"""The site-owned policy file: loading errors name the file and the key, and the merge
with the study's run config never lets the server loosen what the site asked for."""

import itertools

import pytest

from clinfed.common.config import resolve
from clinfed.common.policy import (
    POLICY_KEYS, Policy, PolicyError, SitePolicy, effective, load_site_policy,
)
from clinfed.common.privacy import check_reply


def _write(tmp_path, text, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_policy_file_loads(tmp_path):
    path = _write(tmp_path, """
allow-adapters = false
share-local-adapters = false
min-cell-size = 20
dp-required = true
dp-epsilon = 8
dp-delta = 1e-5
refuse-instance-moving = true
""")
    pol = load_site_policy(path)
    assert pol == SitePolicy(allow_adapters=False, share_local_adapters=False, min_cell_size=20, dp_required=True,
                             dp_epsilon=8.0, dp_delta=1e-5, refuse_instance_moving=True, source=str(path))
    assert isinstance(pol.dp_epsilon, float)
    empty = load_site_policy(_write(tmp_path, "", "empty.toml"))
    assert empty.allow_adapters and empty.min_cell_size is None and empty.refuse_instance_moving


@pytest.mark.parametrize("text, key, words", [
    ("allow-adapter = false", "allow-adapter", ["unknown key", "did you mean 'allow-adapters'"]),
    ("colour = 'blue'", "colour", ["unknown key"]),
    ('allow-adapters = "no"', "allow-adapters", ["true or false"]),
    ("dp-required = 1", "dp-required", ["true or false"]),
    ("min-cell-size = 0", "min-cell-size", ["integer from 1"]),
    ("min-cell-size = 2.5", "min-cell-size", ["integer"]),
    ("min-cell-size = true", "min-cell-size", ["integer"]),
    ("dp-epsilon = -1.0", "dp-epsilon", ["> 0"]),
    ("dp-epsilon = 0", "dp-epsilon", ["> 0"]),
    ("dp-epsilon = nan", "dp-epsilon", ["> 0"]),
    ('dp-epsilon = "8"', "dp-epsilon", ["> 0"]),
    ("dp-delta = 1.5", "dp-delta", ["between 0 and 1"]),
    ("[allow-adapters]\nx = 1", "allow-adapters", ["true or false"]),
])
def test_bad_values_name_the_file_and_the_key(tmp_path, text, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_site_policy(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg, msg
    for w in words:
        assert w in msg, msg


def test_unreadable_files_name_the_file(tmp_path):
    bad = _write(tmp_path, "allow-adapters = \n")
    with pytest.raises(PolicyError, match="not valid TOML") as err:
        load_site_policy(bad)
    assert str(bad) in str(err.value) and "line 1" in str(err.value)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00x = 1")
    with pytest.raises(PolicyError, match="bin.toml"):
        load_site_policy(binary)
    with pytest.raises(PolicyError, match="cannot read") as err:
        load_site_policy(tmp_path / "missing.toml")
    assert "missing.toml" in str(err.value)
    with pytest.raises(PolicyError, match="is a folder"):
        load_site_policy(tmp_path)
    assert issubclass(PolicyError, ValueError)


def test_the_stricter_side_wins():
    run = resolve({"min-cell-size": 5, "share-local-adapters": True, "dp-epsilon": 4.0, "dp-delta": 1e-4})
    assert effective(run, SitePolicy(min_cell_size=20)).min_cell_size == 20
    assert effective({**run, "min-cell-size": 30}, SitePolicy(min_cell_size=20)).min_cell_size == 30
    assert effective(run, SitePolicy(share_local_adapters=False)).share_local_adapters is False
    assert effective({**run, "share-local-adapters": False}, SitePolicy()).share_local_adapters is False
    assert effective(run, SitePolicy(share_local_adapters=True)).share_local_adapters is True
    # metrics-only: nothing adapter-shaped leaves, local adapters included
    metrics_only = effective(run, SitePolicy(allow_adapters=False))
    assert not metrics_only.allow_adapters and not metrics_only.share_local_adapters
    assert effective(run, SitePolicy(dp_epsilon=2.0)).dp_epsilon == 2.0
    assert effective(run, SitePolicy(dp_epsilon=9.0)).dp_epsilon == 4.0
    assert effective({**run, "dp-epsilon": 0.0}, SitePolicy(dp_epsilon=9.0)).dp_epsilon == 9.0
    assert effective({**run, "dp-epsilon": 0.0}, SitePolicy()).dp_epsilon == 0.0
    assert effective(run, SitePolicy(dp_delta=1e-6)).dp_delta == 1e-6
    assert effective(run, SitePolicy(dp_delta=1e-2)).dp_delta == 1e-4
    # a budget cannot be kept without DP: it makes DP required
    assert effective(run, SitePolicy(dp_epsilon=9.0)).dp_required
    assert effective(run, SitePolicy(dp_required=True)).dp_required
    assert not effective(run, None).dp_required
    # record-moving regimes: the site's word, and always in a deployment
    assert not effective(run, None).refuse_instance_moving
    assert effective(run, None, deployment=True).refuse_instance_moving
    assert effective(run, SitePolicy(refuse_instance_moving=False), deployment=True).refuse_instance_moving
    assert effective(run, SitePolicy()).refuse_instance_moving
    # delta 0 = 1/n_train at the site
    assert effective({**run, "dp-delta": 0.0}, None).delta_for(250) == pytest.approx(1 / 250)


def test_where_the_site_is_silent_the_safe_default_holds_not_the_servers_wish():
    """A run config of k = 1 and share-local-adapters = true, against a site without a policy
    file or with one that does not mention them: k stays 10 and the local adapter stays home.
    Only the site's own file may lower k or let the local adapter leave."""
    loose = resolve({"min-cell-size": 1, "share-local-adapters": True})
    for site in (None, SitePolicy(), SitePolicy(dp_required=True), SitePolicy(allow_adapters=True)):
        pol = effective(loose, site)
        assert pol.min_cell_size == 10 and not pol.share_local_adapters, site
        assert effective(loose, site, deployment=True).min_cell_size == 10
    assert effective(loose, SitePolicy(min_cell_size=3)).min_cell_size == 3
    assert effective(resolve({"min-cell-size": 8}), SitePolicy(min_cell_size=3)).min_cell_size == 8
    assert effective(loose, SitePolicy(share_local_adapters=True)).share_local_adapters
    assert not effective(resolve({}), SitePolicy(share_local_adapters=True)).share_local_adapters


def test_no_run_config_loosens_any_site_policy():
    """Every combination of run config and site policy: the effective policy is at least
    as strict as the site's on every field."""
    sites = [SitePolicy(allow_adapters=a, share_local_adapters=s, min_cell_size=k, dp_required=r, dp_epsilon=e,
                        dp_delta=d, refuse_instance_moving=m)
             for a, s, k, r, e, d, m in itertools.product(
                 [True, False], [True, False], [None, 3, 50], [True, False], [None, 1.0], [None, 1e-6],
                 [True, False])]
    runs = [resolve({"min-cell-size": k, "share-local-adapters": s, "dp-epsilon": e, "dp-delta": d})
            for k, s, e, d in itertools.product([1, 10, 100], [True, False], [0.0, 0.5, 5.0], [0.0, 1e-7, 1e-3])]
    for site, run in itertools.product(sites, runs):
        pol = effective(run, site)
        assert pol.allow_adapters <= site.allow_adapters
        assert pol.share_local_adapters <= (site.share_local_adapters and site.allow_adapters)
        assert pol.min_cell_size >= (site.min_cell_size or 10) and pol.min_cell_size >= run["min-cell-size"]
        assert pol.dp_required >= site.dp_required
        if site.dp_epsilon:
            assert 0 < pol.dp_epsilon <= site.dp_epsilon
        if site.dp_delta:
            assert 0 < pol.dp_delta <= site.dp_delta
        assert pol.refuse_instance_moving >= site.refuse_instance_moving


def test_reported_policy_passes_the_egress_guard_and_round_trips():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    pol = effective(resolve({"dp-epsilon": 3.0}), SitePolicy(allow_adapters=False, min_cell_size=12, dp_delta=1e-5))
    released = pol.to_metrics()
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in released.values())
    content = RecordDict({"site": ConfigRecord({"name": "h01"}), "metrics": MetricRecord(released)})
    assert check_reply(content, "query.describe", adapter_shapes={}, site_name="h01", allow_adapters=False,
                       min_cell_size=12) == []
    assert Policy.from_metrics(released) == pol
    assert Policy.from_metrics({"site-n-train": 100}) is None


def test_policy_keys_are_documented():
    assert set(POLICY_KEYS) == {"allow-adapters", "share-local-adapters", "min-cell-size", "dp-required",
                                "dp-epsilon", "dp-delta", "refuse-instance-moving", "allow-full-weights",
                                "max-update-bytes", "approved-app-hashes", "quantization", "device",
                                "gpu-memory-gb", "max-lora-rank"}
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "site-policy.md").read_text()
    missing = [k for k in POLICY_KEYS if f"\n{k} = " not in page]  # each in the page's example file
    assert not missing, f"docs/site-policy.md lacks policy keys: {missing}"
