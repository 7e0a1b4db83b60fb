"""What a curious server can get out of a site, tried from the server's side.

The server here runs the protocol honestly but reads everything it receives, subtracts,
and sends whatever run config and message fields suit it. Each test drives the real
ClientApp (`client.app.app`, with its egress guard) through Flower's serialization, and
fails on a build that leaks: a patient's string in a key or an error text, a withheld cell
recovered by subtraction, a DP budget reset by a new study, a server-chosen k, or a guard
that is not installed."""

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto

from clinfed.simulations.app import app as client_app
from clinfed.simulations.app import app as simulation_app
from clinfed.common.config import for_arm, resolve
from clinfed.common.data import list_sites, read_site_table, split_site
from conftest import small_cells_policy
from clinfed.simulations.inprocess import LocalGrid, simulated_nodes
from clinfed.server.study import Study
from clinfed.simulations.generate import generate_federation

TINY = {"model": "tiny-bert", "num-server-rounds": 1, "local-steps": 2, "personalize-steps": 1, "bootstrap": 10,
        "batch-size": 8, "report": False}
REGIONS = "north,south,east,west,central,New York"
CANARY = "CANARYREG Jane Doe 4471"


def _splits(folder, cfg):
    df = read_site_table(folder, warn=False)
    return split_site(df, seed=int(cfg["seed"]), temporal_frac=cfg["temporal-frac"], test_frac=cfg["test-frac"],
                      val_frac=cfg["val-frac"])


def _edit(folder, column, values: dict):
    """Set `column` of the rows whose encounter_id is a key of `values`."""
    path = folder / "encounters.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    ids = df["encounter_id"]
    df[column] = [values.get(i, v) for i, v in zip(ids, df[column])]
    df.to_csv(path, index=False)


def _wire(msg) -> bytes:
    return message_to_proto(msg).SerializeToString()


def _msg(mtype, node, config=None, **arrays):
    content = RecordDict({"config": ConfigRecord(config or {})})
    for name, state in arrays.items():
        content[name] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return Message(content, dst_node_id=node, message_type=mtype)


def _init_state(cfg):
    from clinfed.common.model_cache import get_model, model_key

    return get_model(model_key(cfg)).init_state


# ------------------------------------------------------------------ 1. no value in any key
@pytest.fixture(scope="module")
def region_study(tmp_path_factory):
    """A study declaring a region vocabulary with `New York`. At h01 one training patient's
    region holds a canary (a name and a number, with spaces), the test splits and forty others
    hold `New York`. Every log record of the process is kept."""
    root = tmp_path_factory.mktemp("region")
    fed = root / "fed"
    generate_federation(fed, n_hospitals=3, seed=7, sizes=[220, 160, 120], site_policy=small_cells_policy())
    cfg = resolve({**TINY, "data-dir": str(fed), "regimes": "base,global", "min-cell-size": 5,
                   "region-vocabulary": REGIONS})
    folder = fed / "h01"
    sp = _splits(folder, cfg)
    canary_id = sp["train"]["encounter_id"].iloc[0]
    ny = list(sp["test"]["encounter_id"]) + list(sp["temporal"]["encounter_id"]) + list(
        sp["train"]["encounter_id"].iloc[1:41])
    _edit(folder, "region", {**{i: "New York" for i in ny}, canary_id: CANARY})
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            try:
                records.append(record.getMessage())
            except Exception:  # noqa: BLE001
                records.append(str(record.msg))

    keep = Keep(level=logging.DEBUG)
    root_logger = logging.getLogger()
    old = root_logger.level
    root_logger.addHandler(keep)
    root_logger.setLevel(logging.DEBUG)
    try:
        grid = LocalGrid(client_app, simulated_nodes(3), cfg)
        Study(grid, cfg, root / "run").execute()
    finally:
        root_logger.removeHandler(keep)
        root_logger.setLevel(old)
    return {"grid": grid, "run_dir": root / "run", "fed": fed, "logs": records, "cfg": cfg, "canary_id": canary_id}


def test_a_region_value_never_leaves_and_new_york_is_a_band_like_any_other(region_study):
    run_dir, grid = region_study["run_dir"], region_study["grid"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    assert "h01" in run["sites"] and not any("h01" in e for e in run["errors"]), run["errors"]
    # the canary: in no message either way, in nothing logged, in no file the server wrote
    needle = b"CANARYREG"
    for msg in grid.sent + grid.replies:
        assert needle not in _wire(msg)
    assert not [r for r in region_study["logs"] if "CANARYREG" in r]
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"the canary reached {path.relative_to(run_dir)}"
    # ... and no key carries a region name: bands travel as codes
    for rep in grid.replies:
        if "metrics" in rep.content.metric_records:
            assert not [k for k in rep.content["metrics"] if "York" in k or "north" in k]
    # New York is released like any other band, named by the study, in metrics and descriptors
    df = pd.read_csv(run_dir / "metrics.csv")
    ny = df[(df.site == "h01") & (df.subgroup == "region=New York") & (df.metric == "auc")]
    assert (ny["status"] == "ok").any(), ny
    desc = pd.read_csv(run_dir / "descriptors.csv")
    assert ((desc.site == "h01") & (desc.descriptor == "region=New York")).any()
    # the canary patient counts as `other` (one patient: withheld, with a complement)
    from clinfed.common.metrics import subgroup_labels

    table = read_site_table(region_study["fed"] / "h01", warn=False)
    labels = subgroup_labels(table, [117.0, 163.0, 197.0], REGIONS)["region"]
    assert labels[list(table["encounter_id"]).index(region_study["canary_id"])] == "other"
    assert not ((desc.site == "h01") & (desc.descriptor == "region=other")).any()
    assert (df[(df.site == "h01") & (df.subgroup == "region=other")]["status"] == "suppressed").all()


def test_without_a_declared_vocabulary_there_are_no_region_bands(tmp_path):
    from clinfed.common.metrics import site_descriptors, subgroup_labels

    df = pd.DataFrame({"note_text": ["a b c"] * 30, "readmitted_30d": [0, 1] * 15, "region": ["New York"] * 30})
    assert "region" not in subgroup_labels(df, [1.0], "")
    assert not [k for k in site_descriptors(df, 5, [1.0], "") if k.startswith("region")]


def test_error_texts_quote_no_key_value_or_path_of_the_site(small_federation, tmp_path):
    """A site whose policy file is broken, and a reply the guard refuses: the server reads why
    in general terms; the file's path, the bad key and the refused metric key stay at the site."""
    secret = tmp_path / "fed-secret-path"
    secret.mkdir()
    (secret / "h02-policy.toml").write_text("min-cell-size = 5\nsecret-key-Jane = 1\n")
    cfg = resolve({**TINY, "data-dir": str(small_federation), "regimes": "base,global", "min-cell-size": 5})
    nodes = simulated_nodes(3)
    nodes[1]["policy-path"] = str(secret / "h02-policy.toml")
    grid = LocalGrid(client_app, nodes, cfg)
    [rep] = grid.send_and_receive([_msg("query.describe", 1001, {"run-dir": str(tmp_path / "run")})])
    assert rep.has_error() and "policy file" in rep.error.reason
    assert "secret" not in rep.error.reason and "fed-secret-path" not in rep.error.reason

    @client_app.evaluate("leakykey")
    def leakykey(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"eval/global/test/region=Jane Doe/n": 40})}),
                       reply_to=msg)

    try:
        [rep] = grid.send_and_receive([_msg("evaluate.leakykey", 1000)])
    finally:
        client_app._registered_funcs.pop("evaluate.leakykey")
    assert rep.has_error() and "egress guard refused" in rep.error.reason
    assert "Jane" not in rep.error.reason and "region" not in rep.error.reason


def test_node_check_applies_the_guards_rule_to_the_site_name(small_federation, tmp_path):
    from clinfed.client.node import check_site

    folder = shutil.copytree(small_federation / "h01", tmp_path / "Hospital St Mary")
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    bad = check_site(folder, policy, output=tmp_path / "out")
    assert not bad.ok and "site name" in bad.summary(), bad.summary()
    good = check_site(folder, policy, site="st-mary", output=tmp_path / "out")
    assert good.ok, good.summary()
    from clinfed.common.privacy import site_name_problem  # the very rule the guard applies to describe

    assert site_name_problem("Hospital St Mary") and site_name_problem("st-mary") is None


# --------------------------------------------------- 2. nothing recovered by subtraction
def test_subtraction_recovers_no_patient_from_the_sites_real_reply(tmp_path):
    """The attack of the issue against a real evaluate reply: one 85-year-old in the test split
    (everyone else younger) and one patient of `south` (everyone else `north`). On the old release,
    `all` minus the released age bands (and minus `north`) was that one patient: label and, from
    the n-weighted Brier sums, predicted probability. Now the remainder is nobody or >= k."""
    fed = tmp_path / "fed"
    generate_federation(fed, n_hospitals=2, seed=7, sizes=[400, 150], site_policy=small_cells_policy())
    cfg = resolve({**TINY, "data-dir": str(fed), "min-cell-size": 5, "region-vocabulary": "north,south",
                   "regimes": "base,global"})
    folder = fed / "h01"
    sp = _splits(folder, cfg)
    ids = list(read_site_table(folder, warn=False)["encounter_id"])
    old = sp["test"]["encounter_id"].iloc[3]
    _edit(folder, "age", {i: ("85" if i == old else "50") for i in ids})
    lone = sp["test"]["encounter_id"].iloc[7]
    _edit(folder, "region", {i: ("south" if i == lone else "north") for i in ids})
    grid = LocalGrid(client_app, simulated_nodes(2), cfg)
    init = _init_state(cfg)
    [rep] = grid.send_and_receive([_msg("evaluate", 1000, {"run-dir": str(tmp_path / "run")}, **{"global": init})])
    assert not rep.has_error(), rep.error.reason
    m = dict(rep.content["metrics"])
    k = 5
    for regime in ("base", "global"):
        pre = f"eval/{regime}/test"
        assert f"{pre}/all/n" in m, "the test split's whole cell should be released here"
        n, pos = m[f"{pre}/all/n"], m[f"{pre}/all/positives"]
        brier_sum = m[f"{pre}/all/brier"] * n
        for group in ("age", "region"):
            bands = sorted({key[len(pre) + 1:].rsplit("/", 1)[0] for key in m if key.startswith(f"{pre}/{group}=")})
            assert len(bands) >= 2, bands
            rel = [b for b in bands if f"{pre}/{b}/n" in m]
            rn = n - sum(m[f"{pre}/{b}/n"] for b in rel)
            rpos = pos - sum(m[f"{pre}/{b}/positives"] for b in rel)
            rbrier = brier_sum - sum(m[f"{pre}/{b}/brier"] * m[f"{pre}/{b}/n"] for b in rel)
            if rn == 1:  # the attack succeeds: the lone patient's label and predicted probability
                p = rpos + (-1 if rpos else 1) * np.sqrt(max(rbrier, 0.0))
                pytest.fail(f"{regime} {group}: recovered one patient: label {rpos}, p {p:.6f}")
            assert rn == 0 or (rn >= k and rpos >= k and rn - rpos >= k), (regime, group, rn, rpos)
        assert m.get(f"{pre}/age=80+/suppressed") == 1
        # the reliability bins partition the same split: the whole minus the released bins is safe too
        cal = f"cal/{regime}/test"
        bins = {key.rsplit("/", 1)[0] for key in m if key.startswith(f"{cal}/bin")}
        assert len(bins) == 10, bins
        rel = [b for b in bins if f"{b}/n" in m]
        rn = n - sum(m[f"{b}/n"] for b in rel)
        rpos = pos - sum(m[f"{b}/positives"] for b in rel)
        assert rn == 0 or (rn >= k and rpos >= k and rn - rpos >= k), (regime, "bins", rn, rpos)
        # and every difference is released only beside both regimes' cells of the same patients
        for key in m:
            if key.startswith("diff/"):
                _, a, b, split, sub, _ = key.split("/")
                assert f"eval/{a}/{split}/{sub}/n" in m and f"eval/{b}/{split}/{sub}/n" in m, key


# -------------------------------------------------- 3. a DP budget the server cannot reset
def test_a_server_varying_every_field_cannot_exceed_the_sites_budget(fresh_federation, tmp_path):
    """The site's own policy sets epsilon 2 at delta 1e-5. The server sends train rounds, each
    as if from a new study: another run-dir, arm, seed, split fractions, noise, run id, round
    number, a looser run-config budget and delta. The epsilon of every call the site accepted,
    composed, stays within the site's budget; the site reports its lifetime total."""
    from clinfed.common.dp import rdp_epsilon

    budget = 2.0
    policy = tmp_path / "h01-policy.toml"  # the hospital's own file, named by its node config
    policy.write_text(small_cells_policy() + f"dp-epsilon = {budget}\ndp-delta = 1e-5\n")
    accepted, refused, totals = [], 0, []
    arms = "tiny-bert:lora,tiny-bert:head-only"
    for call in range(8):
        sigma = 1.5 if call % 3 else 2.0
        over = {**TINY, "data-dir": str(fresh_federation), "dp": True, "dp-noise-multiplier": sigma,
                "local-steps": 10, "seed": call, "temporal-frac": 0.1 + 0.05 * (call % 3),
                "dp-epsilon": 1000.0, "dp-delta": 0.1, "arms": arms}
        cfg = resolve(over)
        nodes = simulated_nodes(3)
        nodes[0]["policy-path"] = str(policy)
        grid = LocalGrid(client_app, nodes, cfg)
        for ctx in grid.contexts.values():
            ctx.run_id = 100 + call
        arm = "tiny-bert:head-only" if call % 2 else "tiny-bert:lora"
        from clinfed.common.arms import parse_arm

        state = _init_state(for_arm(cfg, parse_arm(arm)))
        msg = _msg("train", 1000, {"run-dir": str(tmp_path / f"study-{call}"), "arm": arm,
                                   "server-round": call + 1}, arrays=state)
        [rep] = grid.send_and_receive([msg])
        assert not rep.has_error(), rep.error.reason
        m = dict(rep.content["metrics"])
        totals.append(m["dp-epsilon-total"])
        if "arrays" in rep.content.array_records:
            accepted.append((sigma, min(1.0, 8 / m["num-examples"]), 10))
        else:
            assert m["dp-budget-exhausted"] == 1
            refused += 1
    assert refused > 0 and len(accepted) >= 2, (len(accepted), refused)
    assert rdp_epsilon(accepted, 1e-5) <= budget + 1e-9, (len(accepted), rdp_epsilon(accepted, 1e-5))
    assert totals == sorted(totals) and max(totals) <= budget  # one lifetime total, never reset
    assert totals[-1] == pytest.approx(rdp_epsilon(accepted, 1e-5), rel=1e-6)
    # the ledger lives with the hospital's data, not in any run folder the server named
    assert list((fresh_federation / "h01" / "clinfed-out" / "dp").glob("ledger-*.json"))
    assert not [p for p in tmp_path.glob("study-*/**/*") if "ledger" in p.name]


# -------------------------------------------- 4. the run config can only make a site stricter
def test_a_run_config_cannot_lower_k_or_take_the_local_adapter(small_federation, tmp_path):
    """Deployed nodes without a policy file, a run config asking for k = 1 and local adapters:
    the site keeps k = 10 and its local adapter."""
    sites = list_sites(small_federation)
    cfg = resolve({**TINY, "min-cell-size": 1, "share-local-adapters": True, "regimes": "base,global,local"})
    nodes = [{"data-path": str(folder), "site": name, "output-path": str(tmp_path / name)} for name, folder in sites]
    grid = LocalGrid(client_app, nodes, cfg)
    run = {"run-dir": str(tmp_path / "run")}
    init = _init_state(cfg)
    [d] = grid.send_and_receive([_msg("query.describe", 1000, run)])
    assert not d.has_error(), d.error.reason
    assert d.content["metrics"]["policy/min-cell-size"] == 10
    assert d.content["metrics"]["policy/share-local-adapters"] == 0
    [p] = grid.send_and_receive([_msg("train.personalize", 1000, run, **{"global": init})])
    assert not p.has_error(), p.error.reason
    assert "arrays" not in p.content.array_records, "the local adapter left a site whose policy is silent"
    [e] = grid.send_and_receive([_msg("evaluate", 1000, run, **{"global": init})])
    cells = {}
    for key, v in e.content["metrics"].items():
        if key.startswith("eval/"):
            cell, metric = key.rsplit("/", 1)
            cells.setdefault(cell, {})[metric] = v
    released = [v for v in cells.values() if "n" in v]
    assert all(v["n"] >= 10 and v["positives"] >= 10 and v["n"] - v["positives"] >= 10 for v in released)
    assert any("suppressed" in v for v in cells.values())


# ------------------------------------------------------- 5. the guard is really installed
LEAKS = {
    "note_text": lambda df: RecordDict({"metrics": MetricRecord({f"eval/global/test/{df['note_text'].iloc[0][:40]}/n": 50})}),
    "note_config": lambda df: RecordDict({"note": ConfigRecord({"text": df["note_text"].iloc[0]})}),
    "encounter_ids": lambda df: RecordDict({"site": ConfigRecord({"name": ",".join(df["encounter_id"].iloc[:5])})}),
    "scores": lambda df: RecordDict({"metrics": MetricRecord({"train-loss": [float(x) for x in df["age"].iloc[:50]]})}),
    "patient_arrays": lambda df: RecordDict({"scores": ArrayRecord({"p": Array(df["age"].to_numpy(dtype="float64"))})}),
    "ids_as_keys": lambda df: RecordDict({"metrics": MetricRecord({str(i): 1.0 for i in df["encounter_id"].iloc[:5]})}),
}


@pytest.mark.parametrize("which", ["hospital", "simulation"])
@pytest.mark.parametrize("leak", sorted(LEAKS) + ["error_text", "exception_text"])
def test_the_real_client_app_blocks_a_handler_that_leaks(small_federation, tmp_path, leak, which):
    """A handler registered on the real ClientApp (the one a hospital's node runs, and the one a
    simulation runs, so it gets exactly the app's mods) tries to send note text, encounter ids or
    per-patient arrays; each reply that reaches the server is an error with no data. Taking
    `mods=[privacy.egress_guard]` off `client.app.build_app` makes this fail."""
    from clinfed.client.app import app as hospital_app

    client_app = hospital_app if which == "hospital" else simulation_app
    cfg = resolve({**TINY, "data-dir": str(small_federation), "min-cell-size": 5})
    grid = LocalGrid(client_app, simulated_nodes(3), cfg)
    table = read_site_table(small_federation / "h01", warn=False)

    def handler(msg, context):
        from clinfed.common.privacy import PUBLIC_REASON_PREFIX

        if leak == "error_text":  # a reason dressed as a public one, quoting a note
            from flwr.app import Error

            return Message(Error(code=1, reason=f"{PUBLIC_REASON_PREFIX} {table['note_text'].iloc[0]}"),
                           reply_to=msg)
        if leak == "exception_text":
            raise ValueError(f"bad row {table['encounter_id'].iloc[0]}: {table['note_text'].iloc[0]}")
        return Message(LEAKS[leak](table), reply_to=msg)

    mtype = "query.leak"
    client_app.query("leak")(handler)
    try:
        # the site first declares itself as in any study, then the leaking handler answers
        grid.send_and_receive([_msg("query.describe", 1000, {"run-dir": str(tmp_path / "run")})])
        [rep] = grid.send_and_receive([_msg(mtype, 1000)])
    finally:
        client_app._registered_funcs.pop(mtype)
    raw = _wire(rep)
    assert rep.has_error(), f"{leak}: the reply left the site"
    assert not rep.has_content()
    for secret in [table["note_text"].iloc[0][:30]] + list(table["encounter_id"].iloc[:5]):
        assert secret.encode() not in raw, f"{leak}: {secret!r} reached the server"
