"""The egress guard: the one choke point every message leaving a site passes.

It is a Flower client mod, installed on the ClientApp itself (not per
handler), so no handler can forget it. A reply passes only if it holds
- at most one ArrayRecord, `arrays`, whose keys and shapes are exactly the
  model's trainable adapter + head (registered by the site when it builds the
  model) and only when the site's policy lets adapters leave;
- at most one MetricRecord, `metrics`, whose every key matches the study's
  allow-list (subgroup bands from closed sets only: no key can carry a value
  from the table), whose values are scalars (never lists: no per-patient
  arrays), and whose cells respect small-cell and complementary suppression
  (`common.disclosure`, checked again here from what the reply itself says);
- a ConfigRecord only in the `query.describe` reply, holding just the site's
  own configured name.
Anything else is refused: the content is dropped, an error reply carrying no
data goes out instead, and the refusal is logged at the site. An error reply
leaves only with a reason `public_reason` composed (fixed texts and numbers,
never a key, value or path of the site); any other reason, and any exception
a handler lets escape, is replaced by a fixed text.
"""

from __future__ import annotations

import logging
import math
import re
import threading

import numpy as np

from clinfed.common.arm_differences import PREFIX as CMP_PREFIX
from clinfed.common.data import INSURANCE_VALUES
from clinfed.common.findings_release import CAL, CAL_BIN_METRICS, CAL_FIT_METRICS, DIFF, DIFF_METRICS
from clinfed.common.protocol import IFCA_CHOICE, INTERPOLATION_GRID, INTERPOLATION_WEIGHT, SITE_HELD
from clinfed.common.metrics import AGE_BANDS, COMORBIDITY_BANDS, COUNT_METRICS, MISSING, OTHER, PREFIX, SEP

log = logging.getLogger("clinfed.privacy")

SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def site_name_problem(name) -> str | None:
    """Why `name` cannot be a site's name on the wire (None: it can). The guard and
    `clinfed node --check` apply exactly this rule."""
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        return ("a site name is 1-64 characters: letters, digits, '_', '.', '-', starting with a letter "
                "or digit")
    return None


_NAME = r"[A-Za-z0-9_.@=+<\-]+"


def _alt(names) -> str:
    return "|".join(re.escape(n) for n in names)


# the bands a key may name: closed sets (region bands travel as codes r1..r99)
_BANDS = {
    "age": _alt([b[0] for b in AGE_BANDS] + [MISSING]),
    "comorbidity": _alt([b[0] for b in COMORBIDITY_BANDS] + [MISSING]),
    "insurance": _alt(list(INSURANCE_VALUES) + [MISSING]),
    "region": rf"r[1-9][0-9]?|{OTHER}|{MISSING}",
}
_DESC_BAND = "|".join(rf"{g}=(?:{b})" for g, b in _BANDS.items())
_SUBGROUP = rf"all|{_DESC_BAND}|words=q[1-9][0-9]?"
_HELD = "|".join(re.escape(r) for r in SITE_HELD)  # the site-held regimes' prefixes of their training figures
ALLOWED_METRIC_KEYS = [
    re.compile(p)
    for p in (
        r"num-examples",
        r"train-loss",
        r"train-steps",
        r"train-seconds",
        r"train-tokens",
        r"train-peak-rss",
        # what the site chose to fit its card (common.memory): hardware, not patients
        r"train-(micro-batch|accumulation|oom-retries|quantization-bits|gradient-checkpointing)",
        # the card's throughput: tokens per second and peak GPU memory of a training call
        rf"(({_HELD})-)?train-(tokens-per-s|peak-gpu-mb)",
        r"adapter-hash",
        r"(local-)?dpo-self-rejected-share",
        rf"({_HELD})-train-(loss|seconds|peak-rss)",
        # site-level choices of the personalization methods (client.personal_regimes): the IFCA
        # adapter the site trained this round and its global-local interpolation weight; never a loss
        r"ifca-cluster",
        r"interpolated-weight",
        # DP-SGD accounting of the site's own training (epsilon per call, cumulative, budget)
        rf"(({_HELD})-)?dp-(epsilon|budget-exhausted)",
        r"dp-(epsilon-total|epsilon-budget|delta)",
        # the site's effective policy, reported in `describe` (0/1 flags and numbers)
        r"policy/(allow-adapters|share-local-adapters|min-cell-size|dp-required|dp-epsilon|dp-delta|"
        r"refuse-instance-moving|allow-full-weights|max-update-bytes|max-lora-rank|site-file)",
        r"site-n-(train|val|test|temporal)",
        rf"desc{SEP}(n|readmission_rate|mortality_rate|words_mean|words_q1|words_median|words_q3)",
        rf"desc{SEP}({_DESC_BAND})",
        rf"drv{SEP}(age|n_comorbidities|insurance|region|words_per_note)",
        r"drv-n",
        rf"gen{SEP}(triage|extraction|readmission){SEP}(base|sft|dpo){SEP}(base|global|local|personalized){SEP}"
        r"[a-z_0-9]+",
        rf"{PREFIX}{SEP}{_NAME}{SEP}(test|temporal|val){SEP}({_SUBGROUP}){SEP}"
        r"(n|positives|auc|auc_lo|auc_hi|pr_auc|f1|brier|suppressed|not_computable)",
        # paired differences between the arms of a comparison (common.arm_differences): pair of arm
        # numbers, regime, split, then the difference, its interval, n, positives or a flag
        rf"{CMP_PREFIX}{SEP}[0-9]{{1,3}}-[0-9]{{1,3}}{SEP}{_NAME}{SEP}(test|temporal){SEP}"
        r"(n|positives|diff|diff_lo|diff_hi|suppressed|not_computable)",
        # paired regime differences (common.findings_release): released only beside both regimes' cells
        rf"{DIFF}{SEP}{_NAME}{SEP}{_NAME}{SEP}(test|temporal){SEP}({_SUBGROUP}){SEP}({'|'.join(DIFF_METRICS)})",
        # calibration: the recalibration fit beside the regime's `all` cell; reliability bins as a grouping
        rf"{CAL}{SEP}{_NAME}{SEP}(test|temporal){SEP}all{SEP}({'|'.join(CAL_FIT_METRICS)})",
        rf"{CAL}{SEP}{_NAME}{SEP}(test|temporal){SEP}bin[0-9]{SEP}({'|'.join(CAL_BIN_METRICS)})",
    )
]
COUNT_KEYS = ("num-examples", "site-n-train", "site-n-val", "site-n-test", "site-n-temporal",
              f"desc{SEP}n", "drv-n")


PUBLIC_REASON_PREFIX = "clinfed site error:"


_MODEL_TEXT = "the study's model cannot be loaded at the site (details in the site's log)"


def public_reason(exc: BaseException, phase: str) -> str:
    """A failure description safe to send: the kind of failure, never a key, value or path of the site.

    Only texts clinfed composes from the site's policy numbers and the study's own run
    config pass as they are (a policy refusal, an exhausted DP budget, a run-config
    problem); everything else becomes a fixed text, and the details stay in the site's
    log. The egress guard lets an error reply leave only with a reason made here."""
    from clinfed.common.config import ConfigError
    from clinfed.common.data import DataValidationError
    from clinfed.common.dp import DPBudgetExhausted
    from clinfed.common.adapters import AdapterMismatch
    from clinfed.common.model_source import ModelError
    from clinfed.common.policy import PolicyError, PolicyRefusal

    if isinstance(exc, DataValidationError):
        n = len(getattr(exc, "problems", []) or [])
        what = f"the site's data failed validation ({n} problem(s)); run `clinfed validate` at the site"
    elif isinstance(exc, PolicyError):
        what = "the site's policy file cannot be used; run `clinfed node --check` at the site"
    elif isinstance(exc, ModelError) or (isinstance(exc, ConfigError) and isinstance(exc.__context__, ModelError)):
        what = _MODEL_TEXT
    elif isinstance(exc, AdapterMismatch):
        what = ("the adapter the server sent does not fit the site's model (another base model, or other "
                "keys or shapes; details in the site's log)")
    elif isinstance(exc, (ConfigError, PolicyRefusal, DPBudgetExhausted)):
        # composed by clinfed from the study's run config and the site's policy numbers only
        what = str(exc).splitlines()[0][:300]
    else:
        what = f"{type(exc).__name__} (details in the site's log)"
    reason = f"{PUBLIC_REASON_PREFIX} {phase}: {what}"
    with REGISTRY.lock:
        if len(REGISTRY.public_reasons) > 1000:
            REGISTRY.public_reasons.clear()
        REGISTRY.public_reasons.add(reason)
    return reason


class _Registry:
    """What the site itself declared: its name, adapter shapes and effective policy."""

    def __init__(self):
        self.lock = threading.Lock()
        self.adapter_shapes: dict[str, tuple[int, ...]] | None = None
        self.site_name: str | None = None
        self.allow_adapters: bool = True
        self.min_cell_size: int = 10
        self.log: list[dict] = []  # egress log kept at the site: kinds, keys count, bytes
        self.public_reasons: set[str] = set()  # error reasons `public_reason` composed


REGISTRY = _Registry()


def declare(site_name: str, adapter_shapes: dict[str, tuple[int, ...]], allow_adapters: bool, min_cell_size: int):
    with REGISTRY.lock:
        REGISTRY.site_name = site_name
        REGISTRY.adapter_shapes = {k: tuple(v) for k, v in adapter_shapes.items()}
        REGISTRY.allow_adapters = bool(allow_adapters)
        REGISTRY.min_cell_size = int(min_cell_size)


def check_reply(content, message_type: str, *, adapter_shapes, site_name, allow_adapters: bool,
                min_cell_size: int) -> list[str]:
    """All reasons this reply may not leave (empty list = it may)."""
    problems: list[str] = []
    # ---- arrays
    for name, rec in content.array_records.items():
        if name != "arrays":
            problems.append(f"unexpected ArrayRecord '{name}'")
            continue
        if not message_type.startswith("train"):
            problems.append("adapter arrays in a non-training reply")
        if not allow_adapters:
            problems.append("the site policy does not allow adapters to leave")
        if adapter_shapes is None:
            problems.append("no adapter was declared by the site; arrays refused")
            continue
        keys = set(rec.keys())
        if keys != set(adapter_shapes):
            problems.append(
                f"array keys differ from the model's adapter ({len(keys - set(adapter_shapes))} unexpected, "
                f"{len(set(adapter_shapes) - keys)} missing)"
            )
        for key in keys & set(adapter_shapes):
            arr = rec[key]
            if tuple(arr.shape) != tuple(adapter_shapes[key]):
                problems.append(f"array '{key}' shape {tuple(arr.shape)} is not the adapter's {adapter_shapes[key]}")
            elif not str(arr.dtype).startswith("float"):
                problems.append(f"array '{key}' has dtype {arr.dtype}, expected floating point")
    # ---- metrics
    for name, rec in content.metric_records.items():
        if name != "metrics":
            problems.append(f"unexpected MetricRecord '{name}'")
            continue
        problems.extend(_check_metrics(dict(rec), min_cell_size))
    # ---- configs
    for name, rec in content.config_records.items():
        if message_type != "query.describe" or name != "site":
            problems.append(f"unexpected ConfigRecord '{name}' in a '{message_type}' reply")
            continue
        items = dict(rec)
        if set(items) != {"name"} or items.get("name") != site_name or site_name_problem(items.get("name")):
            problems.append("the site ConfigRecord may hold only the site's configured name")
    return problems


def _check_metrics(items: dict, k: int) -> list[str]:
    problems = []
    cells: dict[str, dict[str, float]] = {}
    for key, val in items.items():
        if not any(p.fullmatch(key) for p in ALLOWED_METRIC_KEYS):
            problems.append(f"metric '{key}' is not on the study's allow-list")
            continue
        if isinstance(val, (list, tuple, np.ndarray)):
            problems.append(f"metric '{key}' is a list: per-item arrays never leave a site")
            continue
        if isinstance(val, float) and not math.isfinite(val):
            problems.append(f"metric '{key}' is not finite")
        if key == IFCA_CHOICE and not (float(val).is_integer() and 0 <= val < 100):
            problems.append(f"metric '{key}' is not a cluster index")
        if key == INTERPOLATION_WEIGHT and float(val) not in INTERPOLATION_GRID:
            problems.append(f"metric '{key}' is not a weight of the interpolation grid")
        if (key in COUNT_KEYS or (key.startswith(f"gen{SEP}") and key.endswith(f"{SEP}n"))) and val < k:
            problems.append(f"count '{key}' is below the minimum cell size")
        if key.startswith(PREFIX + SEP) or key.startswith(CMP_PREFIX + SEP) or _is_bin(key):
            cell, metric = key.rsplit(SEP, 1)
            cells.setdefault(cell, {})[metric] = val
    for cell, vals in cells.items():
        if "suppressed" in vals:
            if len(vals) != 1:
                problems.append(f"cell '{cell}' is suppressed but carries other values")
            continue
        for m in COUNT_METRICS:
            if m in vals and vals[m] < k:
                problems.append(f"cell '{cell}' has {m} below the minimum cell size and is not suppressed")
        if "n" not in vals:
            problems.append(f"cell '{cell}' releases values without its n")
        if "positives" not in vals:
            problems.append(f"cell '{cell}' lacks its positives count (needed to check suppression)")
        elif "n" in vals and vals["n"] - vals["positives"] < k:
            problems.append(f"cell '{cell}' has negatives below the minimum cell size and is not suppressed")
    problems.extend(_check_subtraction(items, cells, k))
    problems.extend(_check_beside_cells(items, cells))
    return problems


def _is_bin(key: str) -> bool:
    parts = key.split(SEP)
    return len(parts) == 5 and parts[0] == CAL and parts[3].startswith("bin")


def _check_beside_cells(items: dict, cells: dict[str, dict[str, float]]) -> list[str]:
    """Differences and calibration fits carry no counts of their own: each is released only
    beside the released eval cells of the very patients it describes (both regimes' for a
    difference), so it cannot describe patients no released cell covers."""
    def released(regime, split, sub):
        v = cells.get(SEP.join((PREFIX, regime, split, sub)))
        return v is not None and "suppressed" not in v and "n" in v

    problems, seen = [], set()
    for key in items:
        parts = key.split(SEP)
        if parts[0] == DIFF and len(parts) == 6:
            _, regime, ref, split, sub, _ = parts
            if (regime, ref, split, sub) not in seen:
                seen.add((regime, ref, split, sub))
                if not (released(regime, split, sub) and released(ref, split, sub)):
                    problems.append(f"difference '{SEP.join(parts[:5])}' released without both regimes' cells")
        elif parts[0] == CAL and len(parts) == 5:
            _, regime, split, sub, _ = parts
            if (regime, split) not in seen:
                seen.add((regime, split))
                if not released(regime, split, "all"):
                    problems.append(f"calibration of '{regime}/{split}' released without its whole-split cell")
    return problems


def _check_subtraction(items: dict, cells: dict[str, dict[str, float]], k: int) -> list[str]:
    """What a reader gets by subtracting the released parts of a whole from it must not isolate
    fewer than k patients, positives or negatives (common.disclosure), checked on the reply itself."""
    from clinfed.common.disclosure import Counts, leaks

    problems = []
    released = {c: v for c, v in cells.items() if "suppressed" not in v and "n" in v}
    # eval cells: each grouping's released bands against the split's `all` cell
    groups: dict[tuple[str, str], dict[str, Counts]] = {}
    for cell, v in released.items():
        parts = cell.split(SEP)
        if parts[0] == CAL and len(parts) == 4:  # reliability bins: a grouping of the regime's split
            groups.setdefault((SEP.join((PREFIX, *parts[1:3])), "calibration-bin"), {})[parts[3]] = Counts(
                int(v["n"]), int(v.get("positives", 0)))
            continue
        if parts[0] != PREFIX or len(parts) != 4 or parts[3] == "all":
            continue
        group = parts[3].split("=", 1)[0]
        groups.setdefault((SEP.join(parts[:3]), group), {})[parts[3]] = Counts(int(v["n"]), int(v.get("positives", 0)))
    for (pre, group), bands in groups.items():
        whole = released.get(f"{pre}{SEP}all")
        if whole is None:
            problems.append(f"'{pre}': {group} bands released while the whole split is withheld")
            continue
        lost = leaks(Counts(int(whole["n"]), int(whole.get("positives", 0))), bands, k)
        if lost:
            problems.append(f"'{pre}': all minus the released {group} bands isolates {', '.join(lost)}")
    # descriptors: each grouping's released shares against the site's n; split sizes against n
    n = items.get(f"desc{SEP}n")
    shares: dict[str, dict[str, Counts]] = {}
    for key, val in items.items():
        if key.startswith(f"desc{SEP}") and "=" in key and not isinstance(val, (list, tuple, np.ndarray)):
            group = key[len("desc") + 1:].split("=", 1)[0]
            shares.setdefault(group, {})[key] = Counts(int(round(float(val) * float(n or 0))))
    if shares and n is None:
        problems.append("descriptor shares released without the site's n")
    elif n is not None:
        for group, bands in shares.items():
            lost = leaks(Counts(int(n)), bands, k)
            if lost:
                problems.append(f"descriptors: n minus the released {group} shares isolates {', '.join(lost)}")
        sizes = {key: Counts(int(v)) for key, v in items.items() if key.startswith("site-n-")}
        lost = leaks(Counts(int(n)), sizes, k)
        if lost:
            problems.append(f"describe: n minus the released split sizes isolates {', '.join(lost)}")
    return problems


def _withheld(msg, text: str):
    from flwr.app import Error, Message

    return Message(Error(code=900, reason=f"{PUBLIC_REASON_PREFIX} {text}"), reply_to=msg)


def egress_guard(msg, ctx, call_next):
    """Flower client mod: refuse any reply the policy does not allow to leave."""
    from flwr.app import Error, Message

    try:
        reply = call_next(msg, ctx)
    except Exception:  # noqa: BLE001 - Flower would send the exception's text, which may quote data
        log.exception("a handler raised; its text stays at the site")
        return _withheld(msg, "unexpected failure (details in the site's log)")
    if reply.has_error():
        # A reason may quote data (an exception message naming a value): only reasons
        # `public_reason` composed leave; any other text stays in the site's log.
        reason = reply.error.reason or ""
        with REGISTRY.lock:
            public = reason in REGISTRY.public_reasons
        if not public:
            log.error("site error withheld from the server: %s", reason)
            reason = f"{PUBLIC_REASON_PREFIX} unexpected failure (details in the site's log)"
        return Message(Error(code=reply.error.code, reason=reason[:500]), reply_to=msg)
    with REGISTRY.lock:
        shapes = REGISTRY.adapter_shapes
        site = REGISTRY.site_name
        allow = REGISTRY.allow_adapters
        k = REGISTRY.min_cell_size
    mtype = msg.metadata.message_type
    try:
        problems = check_reply(reply.content, mtype, adapter_shapes=shapes, site_name=site,
                               allow_adapters=allow, min_cell_size=k)
    except Exception:  # noqa: BLE001 - a reply the guard cannot read does not leave
        log.exception("egress guard could not check a '%s' reply", mtype)
        problems = ["the reply could not be checked"]
    if problems:
        for p in problems:
            log.error("egress guard refused a '%s' reply of site %s: %s", mtype, site, p)
        # the problems name keys, which could carry data: they stay in the site's log
        return Message(Error(code=900, reason=f"clinfed egress guard refused the reply ({len(problems)} "
                             "problem(s); details in the site's log)"), reply_to=msg)
    nbytes = sum(int(a.numpy().nbytes) for r in reply.content.array_records.values() for a in r.values())
    REGISTRY.log.append({
        "message_type": mtype,
        "arrays": sum(len(r) for r in reply.content.array_records.values()),
        "array_bytes": nbytes,
        "metrics": sum(len(r) for r in reply.content.metric_records.values()),
    })
    return reply
