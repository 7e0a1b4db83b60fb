"""What may leave a site: the hospital's own policy file, and its merge with the study's.

A hospital keeps a small TOML file next to its data (node config `policy-path`):

    allow-adapters = true          # false: metrics-only; the site trains at home, is evaluated, sends no adapter
    share-local-adapters = false   # may the site's local adapter leave for the cross-site matrix?
    min-cell-size = 20             # k for small-cell suppression
    dp-required = true             # refuse to train in a study without DP-SGD
    dp-epsilon = 8.0               # the site's privacy budget for the whole study
    dp-delta = 1e-5
    refuse-instance-moving = true  # never take part in record-moving regimes (`augmented`)
    allow-full-weights = false     # never send the whole model (full fine-tuning arms of a comparison)
    max-update-bytes = 10000000    # never send an update larger than this many bytes
    approved-app-hashes = ["<64 hex digits>"]  # app bundles the node may run besides its own clinfed's
    quantization = "4bit"          # the site's card: hold the frozen base in 4 (or 8) bits, whatever the study says
    device = "cuda"                # where the site trains (auto, cpu, cuda)
    gpu-memory-gb = 24             # the memory the site's training may use (micro-batches are planned to fit)
    max-lora-rank = 4              # the site trains LoRA at min(study rank, 4) (common.ranks)

Every key is optional. `quantization`, `device` and `gpu-memory-gb` describe the
site's hardware, not what may leave: there the site's setting simply replaces the study's (`hardware_overrides`;
a deployed node's config may also set `gpu-memory-gb`, `device` and `quantization`),
and an adapter trained on a quantized base is still a plain adapter of the same base.
`max-lora-rank` too (a small card): the site trains its LoRA adapter at the smaller
rank and reports the cap in `describe`, so the server sends it the global adapter
at that rank and widens its update before aggregating (`common.ranks`).
The run config is written by the server, the file by
the hospital: in `effective` the stricter side of each setting wins, so no
run config can loosen a site's policy, and where the file is silent the safe
default holds, not the server's wish: k is at least 10 (`DEFAULT_MIN_CELL_SIZE`;
only the site's own file may set a smaller one) and a local adapter never
leaves (only the site's `share-local-adapters = true` lets it). The site reports
its effective policy (numbers and 0/1 flags only) in its `describe` reply.

In simulation, a hospital folder may hold its own policy file,
`clinfed-policy.toml` (`SIMULATED_POLICY_FILE`), read like a deployed node's
`policy-path`.

`approved-app-hashes` is read by the node before any app code runs
(`client.node`, `client.app_gate`; the hash is `common.app_code`'s).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinfed.common.errors import ClinfedError

DEFAULT_MIN_CELL_SIZE = 10
SIMULATED_POLICY_FILE = "clinfed-policy.toml"


class PolicyError(ClinfedError, ValueError):
    """A site policy file that cannot be used; the message names the file and the key."""


class PolicyRefusal(ClinfedError, RuntimeError):
    """The site declines a request its policy forbids; the message is safe to send to the server."""


@dataclass(frozen=True)
class SitePolicy:
    """The hospital's own policy as written in its file (None = the file does not set it)."""

    allow_adapters: bool = True
    share_local_adapters: bool = False  # a local adapter leaves only if the site says so
    min_cell_size: int | None = None  # None: DEFAULT_MIN_CELL_SIZE
    dp_required: bool = False
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    refuse_instance_moving: bool = True
    allow_full_weights: bool = True
    max_update_bytes: int | None = None
    approved_app_hashes: tuple[str, ...] = ()
    quantization: str | None = None
    device: str | None = None
    gpu_memory_gb: float | None = None
    max_lora_rank: int | None = None
    source: str = ""


# file key: (attribute, kind, check, what the check says)
_FIELDS: dict[str, tuple[str, type, Any, str]] = {
    "allow-adapters": ("allow_adapters", bool, None, "true or false"),
    "share-local-adapters": ("share_local_adapters", bool, None, "true or false"),
    "min-cell-size": ("min_cell_size", int, lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "dp-required": ("dp_required", bool, None, "true or false"),
    "dp-epsilon": ("dp_epsilon", float, lambda v: 0 < v <= 1e6,
                   "a number > 0 (omit the key for no budget)"),
    "dp-delta": ("dp_delta", float, lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
    "refuse-instance-moving": ("refuse_instance_moving", bool, None, "true or false"),
    "allow-full-weights": ("allow_full_weights", bool, None, "true or false"),
    "max-update-bytes": ("max_update_bytes", int, lambda v: v >= 1, "a whole number of bytes >= 1 (omit for no cap)"),
    "approved-app-hashes": ("approved_app_hashes", tuple, None,
                            "a list of app-code hashes, 64 hex digits each, as `clinfed app-hash` prints them"),
    "quantization": ("quantization", str, ("none", "4bit", "8bit"), "one of \"none\", \"4bit\", \"8bit\""),
    "device": ("device", str, ("auto", "cpu", "cuda"), "one of \"auto\", \"cpu\", \"cuda\""),
    "gpu-memory-gb": ("gpu_memory_gb", float, lambda v: 0 < v <= 100_000, "a number of GiB > 0"),
    "max-lora-rank": ("max_lora_rank", int, lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
}
HARDWARE_KEYS = ("quantization", "device", "gpu-memory-gb")
POLICY_KEYS = tuple(_FIELDS)


def _value(where: str, key: str, raw: Any) -> Any:
    attr, kind, check, expected = _FIELDS[key]
    bad = PolicyError(f"{where}: key '{key}': expected {expected}, got {raw!r}")
    if kind is tuple:
        from clinfed.common.app_code import HASH_RE

        if not isinstance(raw, list) or not all(isinstance(v, str) and HASH_RE.match(v.strip().lower()) for v in raw):
            raise bad
        return tuple(v.strip().lower() for v in raw)
    if kind is bool:
        if not isinstance(raw, bool):
            raise bad
        return raw
    if kind is str:
        if not isinstance(raw, str) or raw.strip().lower() not in check:
            raise bad
        return raw.strip().lower()
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise bad
    if kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise bad
        raw = int(raw)
    else:
        raw = float(raw)
        if not math.isfinite(raw):
            raise bad
    if check is not None and not check(raw):
        raise bad
    return raw


def site_policy_from_dict(items: dict[str, Any], source: str = "site policy") -> SitePolicy:
    """Check a parsed policy table; every problem names `source` and the key."""
    if not isinstance(items, dict):
        raise PolicyError(f"{source}: expected a table of policy keys, got {type(items).__name__}")
    values: dict[str, Any] = {}
    for key, raw in items.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, POLICY_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PolicyError(f"{source}: unknown key '{key}'{hint}; known keys: {', '.join(POLICY_KEYS)}")
        values[_FIELDS[key][0]] = _value(source, key, raw)
    return SitePolicy(**values, source=source)


def load_site_policy(path) -> SitePolicy:
    """Read and check a hospital's policy file (TOML). Raises PolicyError naming the file and the key."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            items = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except IsADirectoryError:
        raise PolicyError(f"{path}: is a folder; policy-path must name the policy file (TOML)") from None
    except OSError as err:
        raise PolicyError(f"{path}: cannot read the site policy file: {err.strerror or err}") from None
    return site_policy_from_dict(items, source=str(path))


# A node without a policy file keeps the safe defaults (k >= 10, no local adapter leaves);
# refuse-instance-moving then follows deployment: a node with data-path always refuses.
NO_SITE_POLICY = SitePolicy(refuse_instance_moving=False, source="")


@dataclass(frozen=True)
class Policy:
    """A site's effective policy: the stricter of the study's run config and the site's file.

    `dp_epsilon` 0 = no budget; `dp_delta` 0 = 1/n_train at the site.
    """

    allow_adapters: bool = True
    share_local_adapters: bool = False
    min_cell_size: int = 10
    dp_required: bool = False
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    refuse_instance_moving: bool = False
    allow_full_weights: bool = True
    max_update_bytes: int = 0  # 0 = no cap
    max_lora_rank: int = 0  # 0 = the study's rank
    site_file: bool = False

    @classmethod
    def effective(cls, run_cfg: dict[str, Any], site_policy: "SitePolicy | dict | None" = None,
                  *, deployment: bool = False) -> "Policy":
        return effective(run_cfg, site_policy, deployment=deployment)

    def delta_for(self, n_train: int) -> float:
        """The delta the site's accountant reports epsilon at."""
        return self.dp_delta if self.dp_delta > 0 else 1.0 / max(1, int(n_train))

    # The describe reply carries these, all numbers (MetricRecords hold no booleans).
    def to_metrics(self, prefix: str = "policy/") -> dict[str, float | int]:
        return {
            f"{prefix}allow-adapters": int(self.allow_adapters),
            f"{prefix}share-local-adapters": int(self.share_local_adapters),
            f"{prefix}min-cell-size": int(self.min_cell_size),
            f"{prefix}dp-required": int(self.dp_required),
            f"{prefix}dp-epsilon": float(self.dp_epsilon),
            f"{prefix}dp-delta": float(self.dp_delta),
            f"{prefix}refuse-instance-moving": int(self.refuse_instance_moving),
            f"{prefix}allow-full-weights": int(self.allow_full_weights),
            f"{prefix}max-update-bytes": int(self.max_update_bytes),
            f"{prefix}max-lora-rank": int(self.max_lora_rank),
            f"{prefix}site-file": int(self.site_file),
        }

    @classmethod
    def from_metrics(cls, metrics: dict, prefix: str = "policy/") -> "Policy | None":
        """The server's view of a site's policy, from its describe reply (None if absent)."""
        got = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        if not got:
            return None
        base = cls()
        return cls(
            allow_adapters=bool(got.get("allow-adapters", base.allow_adapters)),
            share_local_adapters=bool(got.get("share-local-adapters", base.share_local_adapters)),
            min_cell_size=int(got.get("min-cell-size", base.min_cell_size)),
            dp_required=bool(got.get("dp-required", base.dp_required)),
            dp_epsilon=float(got.get("dp-epsilon", base.dp_epsilon)),
            dp_delta=float(got.get("dp-delta", base.dp_delta)),
            refuse_instance_moving=bool(got.get("refuse-instance-moving", base.refuse_instance_moving)),
            allow_full_weights=bool(got.get("allow-full-weights", base.allow_full_weights)),
            max_update_bytes=int(got.get("max-update-bytes", base.max_update_bytes)),
            max_lora_rank=int(got.get("max-lora-rank", base.max_lora_rank)),
            site_file=bool(got.get("site-file", base.site_file)),
        )


def hardware_overrides(site_policy: "SitePolicy | None", node_config: dict | None = None) -> dict[str, Any]:
    """Run-config values the site sets for its own hardware (quantization, device, GPU memory):
    the site's policy file first, then its node config; the site's setting wins over the study's,
    since only the site knows its card. Nothing here changes what leaves the site."""
    out: dict[str, Any] = {}
    nc = dict(node_config or {})
    for key in HARDWARE_KEYS:
        raw = nc.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        if key == "gpu-memory-gb" and isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raise PolicyError(f"node config: key '{key}': expected a number of GiB > 0, got {raw!r}") from None
        out[key] = _value("node config", key, raw)
    if site_policy is not None:
        for key in HARDWARE_KEYS:
            value = getattr(site_policy, _FIELDS[key][0])
            if value is not None:
                out[key] = value
    return out


def _min_positive(*values) -> float:
    pos = [float(v) for v in values if v is not None and float(v) > 0]
    return min(pos) if pos else 0.0


def effective(run_cfg: dict[str, Any], site_policy: "SitePolicy | dict | None" = None,
              *, deployment: bool = False) -> Policy:
    """Merge the study's run config with the site's policy; the stricter side always wins.

    - adapters leave only if the site allows it; local adapters only if the study
      asks for them, the site's own file allows it and adapters may leave at all;
    - k is the larger of the study's and the site's, and the site's is 10 unless its
      own file sets it; the epsilon budget and delta the smaller set one;
    - DP is required if the site says so or sets a budget (a budget cannot be kept
      without DP);
    - record-moving regimes are refused if the site says so, and always in a deployment.
    """
    if isinstance(site_policy, dict):
        site_policy = site_policy_from_dict(site_policy, source="site policy")
    site = site_policy if site_policy is not None else NO_SITE_POLICY
    allow = bool(site.allow_adapters)
    return Policy(
        allow_adapters=allow,
        share_local_adapters=bool(run_cfg.get("share-local-adapters", False)) and site.share_local_adapters and allow,
        min_cell_size=max(int(run_cfg.get("min-cell-size", DEFAULT_MIN_CELL_SIZE)),
                          int(site.min_cell_size if site.min_cell_size is not None else DEFAULT_MIN_CELL_SIZE)),
        dp_required=bool(site.dp_required or site.dp_epsilon is not None),
        dp_epsilon=_min_positive(site.dp_epsilon, run_cfg.get("dp-epsilon", 0.0)),
        dp_delta=_min_positive(site.dp_delta, run_cfg.get("dp-delta", 0.0)),
        refuse_instance_moving=bool(site.refuse_instance_moving or deployment),
        # full weights leave only if the site allows adapters at all and full weights in particular
        allow_full_weights=bool(site.allow_full_weights and allow),
        max_update_bytes=int(site.max_update_bytes or 0),
        max_lora_rank=int(site.max_lora_rank or 0),  # the site's card: only its own file caps it
        site_file=site_policy is not None,
    )


__all__ = ["HARDWARE_KEYS", "hardware_overrides", "DEFAULT_MIN_CELL_SIZE", "SIMULATED_POLICY_FILE", "POLICY_KEYS", "NO_SITE_POLICY", "Policy", "PolicyError", "PolicyRefusal", "SitePolicy", "effective",
           "load_site_policy", "site_policy_from_dict"]
