"""The egress guard refuses everything but adapter arrays and suppressed aggregates."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clinfed.common import privacy
from clinfed.common.metrics import CellResult, flatten_cell

SHAPES = {"base_model.model.x.lora_A.weight": (4, 8), "base_model.model.classifier.weight": (2, 8)}
K = 10


def arrays(shapes=SHAPES, dtype=np.float32):
    return ArrayRecord({k: Array(np.zeros(s, dtype=dtype)) for k, s in shapes.items()})


def check(content, mtype="train", allow=True, site="h01"):
    return privacy.check_reply(content, mtype, adapter_shapes=SHAPES, site_name=site,
                               allow_adapters=allow, min_cell_size=K)


def ok_cell():
    return flatten_cell("global", "test", "all", CellResult("ok", n=50, values={"auc": 0.7, "positives": 12}))


def test_a_proper_train_reply_passes():
    content = RecordDict({"arrays": arrays(), "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5})})
    assert check(content) == []


def test_a_proper_evaluate_reply_passes():
    sup = flatten_cell("base", "temporal", "all", CellResult("suppressed"))
    assert check(RecordDict({"metrics": MetricRecord({**ok_cell(), **sup})}), "evaluate") == []


@pytest.mark.parametrize("content,mtype,allow,expect", [
    (lambda: RecordDict({"arrays": arrays({**SHAPES, "embeddings": (100, 8)})}), "train", True, "keys differ"),
    (lambda: RecordDict({"arrays": arrays({k: (3, 3) for k in SHAPES})}), "train", True, "shape"),
    (lambda: RecordDict({"arrays": arrays(dtype=np.int64)}), "train", True, "dtype"),
    (lambda: RecordDict({"arrays": arrays()}), "evaluate", True, "non-training"),
    (lambda: RecordDict({"arrays": arrays()}), "train", False, "policy"),
    (lambda: RecordDict({"scores": arrays()}), "train", True, "unexpected ArrayRecord"),
    (lambda: RecordDict({"metrics": MetricRecord({"h01-000123": 0.9})}), "evaluate", True, "allow-list"),
    (lambda: RecordDict({"metrics": MetricRecord({"train-loss": [0.1, 0.9, 0.4]})}), "train", True, "list"),
    (lambda: RecordDict({"metrics": MetricRecord({"num-examples": 3})}), "train", True, "minimum cell size"),
    (lambda: RecordDict({"metrics": MetricRecord({"eval/global/test/all/auc": 0.7, "eval/global/test/all/n": 6,
                                                  "eval/global/test/all/positives": 2})}), "evaluate", True,
     "below the minimum"),
    (lambda: RecordDict({"metrics": MetricRecord({"eval/global/test/all/suppressed": 1,
                                                  "eval/global/test/all/n": 6})}), "evaluate", True,
     "suppressed but"),
    (lambda: RecordDict({"metrics": MetricRecord({"eval/global/test/all/auc": 0.7})}), "evaluate", True,
     "without its n"),
    (lambda: RecordDict({"note": ConfigRecord({"text": "72 y/o F with CHF"})}), "evaluate", True,
     "unexpected ConfigRecord"),
    (lambda: RecordDict({"site": ConfigRecord({"name": "Jane Doe, MRN 12345"})}), "query.describe", True,
     "only the site"),
])
def test_the_guard_refuses(content, mtype, allow, expect):
    problems = check(content(), mtype, allow)
    assert problems, "the guard let a forbidden reply through"
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize("key,value", [
    ("interpolated-weight", 0.4137),  # a validation loss smuggled out as the chosen weight
    ("ifca-cluster", 0.4137),          # ... or as the chosen cluster's index
    ("ifca-cluster", 250),
])
def test_the_methods_released_choices_carry_only_their_grid(key, value):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5, key: value})})
    problems = check(content, "train")
    assert problems, f"the guard let {key}={value} through"


def test_the_methods_released_choices_pass_on_their_grid():
    content = RecordDict({"metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5,
                                                   "interpolated-weight": 0.25, "ifca-cluster": 1})})
    assert check(content, "train") == []


def test_describe_may_name_only_its_own_site():
    assert check(RecordDict({"site": ConfigRecord({"name": "h01"})}), "query.describe") == []
    assert check(RecordDict({"site": ConfigRecord({"name": "h02"})}), "query.describe")


def _msg(mtype="evaluate"):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    m = Message(RecordDict(), dst_node_id=5, message_type=mtype)
    m.metadata.__dict__["_message_id"] = "abc"
    return m


def test_the_mod_sends_an_error_instead_of_a_forbidden_reply():
    privacy.declare("h01", SHAPES, True, K)
    msg = _msg()
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    bad = lambda m, c: Message(RecordDict({"metrics": MetricRecord({"patient-risk": [0.1, 0.8]})}), reply_to=m)
    out = privacy.egress_guard(msg, ctx, bad)
    assert out.has_error()
    assert "0.8" not in out.error.reason
    good = lambda m, c: Message(RecordDict({"metrics": MetricRecord(ok_cell())}), reply_to=m)
    assert not privacy.egress_guard(msg, ctx, good).has_error()


def test_error_reasons_that_could_quote_data_are_withheld():
    msg = _msg()
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    leaky = lambda m, c: Message(Error(code=1, reason="ValueError: bad note 'Jane Doe has CHF'"), reply_to=m)
    out = privacy.egress_guard(msg, ctx, leaky)
    assert out.has_error() and "Jane" not in out.error.reason
    assert out.error.reason.startswith(privacy.PUBLIC_REASON_PREFIX)


# ------------------------------------------------- paired differences and calibration (issue 19)
def _scored(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, np.clip(0.3 + 0.2 * y + 0.15 * rng.standard_normal(n), 0.001, 0.999), rng


def _eval_cells(y, regimes=("base", "global", "local")):
    out = {}
    for r in regimes:
        out.update(flatten_cell(r, "test", "all", CellResult("ok", n=len(y), values={"auc": 0.7,
                                                                                     "positives": int(y.sum())})))
    return out


def test_real_differences_and_calibration_pass_beside_their_cells():
    from clinfed.common.findings_release import release_calibration, release_differences

    y, p, rng = _scored()
    preds = {"base": rng.random(len(y)), "global": p, "local": np.clip(p + 0.05 * rng.standard_normal(len(y)), 0, 1)}
    m = _eval_cells(y)
    m.update(release_differences("test", y, preds, {}, {("all", ""): True}, seed=1, n_boot=200, subgroups=False))
    for r, pr in preds.items():
        m.update(release_calibration(r, "test", y, pr, True, K))
    assert {"diff/global/base/test/all/diff", "diff/local/global/test/all/p"} <= set(m)
    assert any(key.startswith("cal/local/test/bin") for key in m)
    assert check(RecordDict({"metrics": MetricRecord(m)}), "evaluate") == []


def test_a_difference_without_both_cells_is_refused():
    """A difference describes the patients of two released cells; without them it would describe
    patients no released cell covers (a withheld split, a suppressed band)."""
    y, _, _ = _scored()
    m = _eval_cells(y, regimes=("global",))  # `local`'s own cell is not released
    m.update({"diff/local/global/test/all/diff": 0.05, "diff/local/global/test/all/lo": -0.01,
              "diff/local/global/test/all/hi": 0.11, "diff/local/global/test/all/p": 0.1})
    problems = check(RecordDict({"metrics": MetricRecord(m)}), "evaluate")
    assert any("without both regimes' cells" in p for p in problems), problems


def test_calibration_bins_that_isolate_patients_are_refused():
    """Reliability bins partition the split like subgroup bands: the whole split minus the
    released bins must hold nobody or k patients, positives and negatives; each bin needs k of each."""
    from clinfed.common.findings_release import release_calibration

    y, p, _ = _scored()
    m = {**_eval_cells(y, regimes=("global",)), **release_calibration("global", "test", y, p, True, K)}
    assert check(RecordDict({"metrics": MetricRecord(m)}), "evaluate") == []
    released = [key.rsplit("/", 1)[0] for key in m if key.startswith("cal/global/test/bin") and key.endswith("/n")]
    # a leaking build: the split's whole cell exceeds the released bins by 3 patients (1 positive),
    # e.g. bins released without complementary suppression: subtraction isolates them
    leaky = dict(m)
    leaky["eval/global/test/all/n"] = sum(m[f"{b}/n"] for b in released) + 3
    leaky["eval/global/test/all/positives"] = sum(m[f"{b}/positives"] for b in released) + 1
    problems = check(RecordDict({"metrics": MetricRecord(leaky)}), "evaluate")
    assert any("calibration-bin" in p and "isolates" in p for p in problems), problems
    victim = released[0]
    small = {**m, f"{victim}/n": 4}
    assert any("below the minimum" in p for p in check(RecordDict({"metrics": MetricRecord(small)}), "evaluate"))
    lone = {key: v for key, v in m.items() if not key.startswith("eval/")}  # bins without the split's cell
    assert any("without its whole-split cell" in p for p in check(RecordDict({"metrics": MetricRecord(lone)}),
                                                                    "evaluate"))
