"""The egress guard: the one choke point every message leaving a site passes.

It is a Flower client mod, installed on the ClientApp itself (not per
handler), so no handler can forget it. A reply passes only if it holds
- at most one ArrayRecord, `arrays`, whose keys and shapes are exactly the
  model's trainable adapter + head (registered by the site when it builds the
  model) and only when the site's policy lets adapters leave;
- at most one MetricRecord, `metrics`, whose every key matches the study's
  allow-list, whose values are scalars (never lists: no per-patient arrays),
  and whose count-bearing cells respect small-cell suppression;
- a ConfigRecord only in the `query.describe` reply, holding just the site's
  own configured name.
Anything else is refused: the content is dropped, an error reply carrying no
data goes out instead, and the refusal is logged at the site.
"""

from __future__ import annotations

import logging
import math
import re
import threading

import numpy as np

from common.compare import PREFIX as CMP_PREFIX
from common.metrics import COUNT_METRICS, PREFIX, SEP

log = logging.getLogger("clinfed.privacy")

SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_NAME = r"[A-Za-z0-9_.@=+<\-]+"
ALLOWED_METRIC_KEYS = [
    re.compile(p)
    for p in (
        r"num-examples",
        r"train-loss",
        r"train-steps",
        r"train-seconds",
        r"train-tokens",
        r"train-peak-rss",
        r"adapter-hash",
        r"(local-)?dpo-self-rejected-share",
        r"(local|personalized|similarity-weighted|augmented)-train-(loss|seconds|peak-rss)",
        # DP-SGD accounting of the site's own training (epsilon per call, cumulative, budget)
        r"((local|personalized|similarity-weighted|augmented)-)?dp-(epsilon|budget-exhausted)",
        r"dp-(epsilon-total|epsilon-budget|delta)",
        # the site's effective policy, reported in `describe` (0/1 flags and numbers)
        r"policy/(allow-adapters|share-local-adapters|min-cell-size|dp-required|dp-epsilon|dp-delta|"
        r"refuse-instance-moving|allow-full-weights|max-update-bytes|site-file)",
        r"site-n-(train|val|test|temporal)",
        rf"desc{SEP}(n|readmission_rate|mortality_rate|words_mean|words_q1|words_median|words_q3)",
        rf"desc{SEP}(age|comorbidity|insurance|region)={_NAME}",
        rf"drv{SEP}(age|n_comorbidities|insurance|region|words_per_note)",
        r"drv-n",
        rf"gen{SEP}(triage|extraction|readmission){SEP}(base|sft|dpo){SEP}(base|global|local|personalized){SEP}"
        r"[a-z_0-9]+",
        rf"{PREFIX}{SEP}{_NAME}{SEP}(test|temporal|val){SEP}{_NAME}{SEP}"
        r"(n|positives|auc|auc_lo|auc_hi|pr_auc|f1|brier|suppressed|not_computable)",
        # paired differences between the arms of a comparison (common.compare): pair of arm
        # numbers, regime, split, then the difference, its interval, n, positives or a flag
        rf"{CMP_PREFIX}{SEP}[0-9]{{1,3}}-[0-9]{{1,3}}{SEP}{_NAME}{SEP}(test|temporal){SEP}"
        r"(n|positives|diff|diff_lo|diff_hi|suppressed|not_computable)",
    )
]
COUNT_KEYS = ("num-examples", "site-n-train", "site-n-val", "site-n-test", "site-n-temporal",
              f"desc{SEP}n", "drv-n")


PUBLIC_REASON_PREFIX = "clinfed site error:"


def public_reason(exc: BaseException, phase: str) -> str:
    """A failure description safe to send: the kind of failure, never the data's values."""
    from common.config import ConfigError
    from common.data import DataValidationError
    from common.dp import DPBudgetExhausted
    from common.models import AdapterMismatch, ModelError
    from common.policy import PolicyError, PolicyRefusal

    if isinstance(exc, DataValidationError):
        n = len(getattr(exc, "problems", []) or [])
        what = f"the site's data failed validation ({n} problem(s)); run `clinfed validate` at the site"
    elif isinstance(exc, (ConfigError, ModelError, AdapterMismatch, PolicyError, PolicyRefusal, DPBudgetExhausted)):
        what = str(exc).splitlines()[0][:300]
    else:
        what = f"{type(exc).__name__} (details in the site's log)"
    return f"{PUBLIC_REASON_PREFIX} {phase}: {what}"


class _Registry:
    """What the site itself declared: its name, adapter shapes and effective policy."""

    def __init__(self):
        self.lock = threading.Lock()
        self.adapter_shapes: dict[str, tuple[int, ...]] | None = None
        self.site_name: str | None = None
        self.allow_adapters: bool = True
        self.min_cell_size: int = 10
        self.log: list[dict] = []  # egress log kept at the site: kinds, keys count, bytes


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
        if set(items) != {"name"} or items.get("name") != site_name or not SITE_NAME_RE.match(str(items.get("name"))):
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
        if (key in COUNT_KEYS or (key.startswith(f"gen{SEP}") and key.endswith(f"{SEP}n"))) and val < k:
            problems.append(f"count '{key}' is below the minimum cell size")
        if key.startswith(PREFIX + SEP) or key.startswith(CMP_PREFIX + SEP):
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
        if "positives" not in vals and "not_computable" not in vals:
            problems.append(f"cell '{cell}' lacks its positives count (needed to check suppression)")
    return problems


def egress_guard(msg, ctx, call_next):
    """Flower client mod: refuse any reply the policy does not allow to leave."""
    from flwr.app import Error, Message

    reply = call_next(msg, ctx)
    if reply.has_error():
        # A reason may quote data (an exception message naming a value): only reasons
        # the site composed with `public_reason` leave; details stay in the site's log.
        reason = reply.error.reason or ""
        if not reason.startswith(PUBLIC_REASON_PREFIX):
            log.error("site error withheld from the server: %s", reason)
            reason = f"{PUBLIC_REASON_PREFIX} unexpected failure (details in the site's log)"
        return Message(Error(code=reply.error.code, reason=reason[:500]), reply_to=msg)
    with REGISTRY.lock:
        shapes = REGISTRY.adapter_shapes
        site = REGISTRY.site_name
        allow = REGISTRY.allow_adapters
        k = REGISTRY.min_cell_size
    mtype = msg.metadata.message_type
    problems = check_reply(reply.content, mtype, adapter_shapes=shapes, site_name=site,
                           allow_adapters=allow, min_cell_size=k)
    if problems:
        for p in problems:
            log.error("egress guard refused a '%s' reply of site %s: %s", mtype, site, p)
        return Message(Error(code=900, reason="clinfed egress guard refused the reply: "
                             + "; ".join(problems[:5])), reply_to=msg)
    nbytes = sum(int(a.numpy().nbytes) for r in reply.content.array_records.values() for a in r.values())
    REGISTRY.log.append({
        "message_type": mtype,
        "arrays": sum(len(r) for r in reply.content.array_records.values()),
        "array_bytes": nbytes,
        "metrics": sum(len(r) for r in reply.content.metric_records.values()),
    })
    return reply
