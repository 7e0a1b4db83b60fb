"""The study's run configuration: one table of keys, defaults, ranges and meaning.

`pyproject.toml`'s `[tool.flwr.app.config]` holds the same defaults (a test
keeps them in step) because `flwr run` only accepts overrides of keys declared
there; `clinfed simulate --run-config` goes through the same parser.
"""

from __future__ import annotations

import difflib
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import field, make_dataclass
from functools import lru_cache
from typing import Any

from clinfed.common.arms import parse_arms
from clinfed.common.errors import ConfigError

# key: (default, kind, (min, max) or allowed values or None, meaning)
KEYS: dict[str, tuple[Any, type, Any, str]] = {
    "model": ("minilm", str, None,
              "base model: 'minilm' (offline all-MiniLM-L6-v2), a Hugging Face id, a local path, or 'tiny-bert'/'tiny-llama' (random, for tests)"),
    "data-dir": ("", str, None,
                 "simulation: folder of hospital folders; empty = generate the default synthetic federation"),
    "out-dir": ("", str, None, "where the server writes RUN_DIR; empty = ./runs/<timestamp>"),
    "hospitals": (6, int, (2, 500), "hospitals in the generated federation when data-dir is empty"),
    "seed": (0, int, (0, 2**31 - 1), "seed of training (initial adapter, batches) and, unless split-seed is set, of the splits"),
    "split-seed": (-1, int, (-1, 2**31 - 1),
                   "seed of the train/val/test splits; -1 = the same as seed. Replicates keep it and vary seed"),
    "replicates": (1, int, (1, 50),
                   "`clinfed simulate`: rerun the training with this many seeds (seed, seed+1, ...) on the same splits and combine the differences"),
    "num-server-rounds": (3, int, (1, 1000), "federated rounds of the global adapter"),
    "local-steps": (20, int, (1, 100000), "optimizer steps per site per federated round"),
    "local-regime-steps": (0, int, (0, 1000000), "steps of the `local` regime; 0 = num-server-rounds x local-steps"),
    "personalize-steps": (20, int, (0, 100000), "steps fine-tuning the global adapter at a site (`personalized`)"),
    "batch-size": (16, int, (1, 4096), "training batch size"),
    "eval-batch-size": (64, int, (1, 4096), "scoring batch size"),
    "learning-rate": (1e-3, float, (1e-7, 1.0), "peak learning rate (warm-up, cosine decay)"),
    "max-length": (96, int, (8, 8192), "tokens kept per note"),
    "lora-rank": (8, int, (1, 1024), "LoRA rank"),
    "lora-alpha": (16, int, (1, 4096), "LoRA alpha"),
    "lora-dropout": (0.0, float, (0.0, 0.9), "LoRA dropout"),
    "base-dropout": (True, bool, None,
                     "the pretrained model's own dropout during training (false: off in the frozen base, a lever with "
                     "no detectable effect on speed or accuracy in the default study on CPU; LoRA's own is "
                     "lora-dropout; DP-SGD keeps it)"),
    "lora-targets": ("", str, None, "comma-separated module names; empty = per architecture (query,value / q_proj,v_proj)"),
    "precision": ("auto", str, ("auto", "fp32", "bf16"), "auto = bf16 autocast where the hardware supports it"),
    "device": ("auto", str, ("auto", "cpu", "cuda"),
               "where sites train and score: auto = the GPU when there is one; cuda without one is an error at "
               "start (a site's policy may set its own)"),
    "quantization": ("none", str, ("none", "4bit", "8bit", "auto"),
                     "hold the frozen base in 4 bits (NF4, double quantization, bf16 compute) or 8 bits through "
                     "bitsandbytes and train LoRA on it (QLoRA); adapters stay plain PEFT. auto = each site chooses "
                     "before loading, from the model's size and its GPU memory: none if the base fits well, else "
                     "8bit, else 4bit, else an error (none on CPU). A site's policy may set "
                     "its own to fit its card (the site's wins). LoRA only; not with dp"),
    "gpu-memory-gb": (0.0, float, (0.0, 100000.0),
                      "GPU memory a site may use, in GiB, to plan micro-batches and gradient accumulation "
                      "(keeping batch-size and the steps); 0 = the card's total. A site's policy or node config may set its own"),
    "client-threads": (1, int, (0, 256), "torch threads per simulated site (0 = all cores)"),
    "temporal-frac": (0.2, float, (0.0, 0.9), "most recent share of each site's encounters held out as the temporal test"),
    "test-frac": (0.25, float, (0.05, 0.9), "share of the remaining encounters in the random test split"),
    "val-frac": (0.1, float, (0.0, 0.5), "share of the remaining encounters in validation (F1 threshold)"),
    "min-cell-size": (10, int, (1, 100000), "k: a cell with fewer patients or positives is suppressed"),
    "bootstrap": (500, int, (0, 100000), "bootstrap resamples for AUC intervals"),
    "min-sites": (2, int, (1, 10000), "fewest answering sites for a round to count"),
    "expected-sites": (0, int, (0, 10000),
                       "sites to wait for before starting (up to node-wait-timeout); 0 = start once min-sites are connected and no more arrive for a second"),
    "node-wait-timeout": (300.0, float, (1.0, 1e7), "seconds to wait for sites to connect"),
    "round-timeout": (3600.0, float, (1.0, 1e7), "seconds to wait for replies in one round"),
    "regimes": ("base,global,local,personalized,cluster,similarity-weighted,augmented", str, None,
                "regimes to train and score (base and global always run)"),
    "share-local-adapters": (False, bool, None,
                             "let local adapters leave their site to be scored at every other site (cross-site matrix)"),
    "clusters": (2, int, (1, 100), "k of the `cluster` regime (sites grouped by their descriptors, k-means) and of "
                 "`ifca` (k adapters; each site joins the one with the lowest loss on its own validation split)"),
    "ditto-lambda": (1.0, float, (0.0, 1e6),
                     "`ditto`: strength of the personal adapter's proximal pull lambda/2 * ||v - w_t||^2 toward "
                     "each global round's adapter w_t (0 = a local adapter trained alongside the rounds)"),
    "augment-k": (200, int, (1, 1000000), "`augmented`: instances borrowed from other sites (simulation only)"),
    "augment-space": ("features", str, ("features", "embedding"),
                      "`augmented`: similarity in patient-feature space or the base model's embedding space"),
    "word-bands": ("117,163,197", str, None, "words-per-note band edges, the same at every site (q1..q4)"),
    "subgroups": (True, bool, None, "score every regime per subgroup (age, comorbidity, insurance, region, words)"),
    "region-vocabulary": ("", str, None,
                          "comma-separated region names the study's region bands are named from (a site maps any "
                          "other value to `other`; no region bands without it)"),
    "drivers": (True, bool, None,
                "fit each site's error-driver model on the global adapter's predictions (patient-level drivers)"),
    "dp": (False, bool, None,
           "DP-SGD (Opacus: per-example clipping, Gaussian noise, Poisson sampling) for all training at every "
           "site: the classifier, and generative SFT (needs dpo-rounds = 0)"),
    "dp-noise-multiplier": (1.0, float, (0.05, 100.0), "DP-SGD noise multiplier (noise std / clipping norm)"),
    "dp-max-grad-norm": (1.0, float, (1e-6, 1e6), "DP-SGD per-example gradient clipping norm"),
    "dp-optimizer": ("sgd", str, ("sgd", "adam"),
                     "optimizer of DP-SGD steps: plain SGD (default; AdamW under DP noise was measured to "
                     "anti-learn, docs/results/dp.md) or AdamW"),
    "dp-learning-rate": (0.5, float, (0.0, 100.0),
                         "peak learning rate of DP training (SGD needs a far larger one than AdamW); 0 = learning-rate"),
    "dp-epsilon": (0.0, float, (0.0, 1e6),
                   "DP-SGD epsilon budget per site for the whole study (0 = none; a site's policy may set a smaller one)"),
    "dp-delta": (0.0, float, (0.0, 0.5), "DP-SGD delta the epsilon is reported at; 0 = 1/n_train of each site"),
    "update-dp-noise": (0.0, float, (0.0, 100.0),
                        "server-side DP on adapter updates (Flower fixed clipping): noise multiplier; 0 = off"),
    "update-dp-clip": (1.0, float, (1e-6, 1e6), "server-side DP on adapter updates: clipping norm of each site's update"),
    "strategy": ("fedavg", str, ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
                              "fedtrimmedavg"),
                 "aggregation of the federated rounds, Flower's strategy of that name: fedavg (weighted by training "
                 "examples), fedprox (sites add proximal-mu/2 ||w - global||^2 to their loss), the server optimizers "
                 "fedadam, fedyogi, fedadagrad, fedavgm, and the robust fedmedian and fedtrimmedavg "
                 "(docs/regimes-and-method.md, Aggregation strategies)"),
    "proximal-mu": (0.01, float, (0.0, 1e4),
                    "fedprox: weight mu of the proximal term each site adds in federated rounds (Flower's default 0 "
                    "would make fedprox fedavg)"),
    "server-learning-rate": (0.0, float, (0.0, 100.0),
                             "fedadam, fedyogi, fedadagrad, fedavgm: server learning rate (eta); 0 = Flower's default "
                             "(fedadam 0.1, fedyogi 0.01, fedadagrad 0.1, fedavgm 1.0)"),
    "server-beta-1": (0.9, float, (0.0, 0.9999), "fedadam, fedyogi: first-moment decay (Flower's default 0.9)"),
    "server-beta-2": (0.99, float, (0.0, 0.9999), "fedadam, fedyogi: second-moment decay (Flower's default 0.99)"),
    "server-tau": (1e-3, float, (1e-12, 10.0),
                   "fedadam, fedyogi, fedadagrad: adaptivity tau added to the root of the second moment (Flower's default 1e-3)"),
    "server-momentum": (0.9, float, (0.0, 0.9999),
                        "fedavgm: server momentum (Flower's default 0 would make fedavgm fedavg)"),
    "trim-beta": (0.2, float, (0.0, 0.49),
                  "fedtrimmedavg: share of the sites' values cut at each end, per coordinate (int(beta x sites) "
                  "each side; Flower's default 0.2)"),
    "task": ("classifier", str, ("classifier", "generative"),
             "`classifier`: the readmission classifier study; `generative`: instruction tuning (SFT then DPO) of a decoder"),
    "decoder": ("smollm2", str, None,
                "generative: decoder model: 'smollm2' (offline SmolLM2-135M-Instruct), a Hugging Face id, a local path, or 'tiny-llama'"),
    "gen-tasks": ("triage,extraction,readmission", str, None, "generative: the sites' instruction tasks to train and score"),
    "gen-holdout-task": ("", str, None,
                         "generative: one of gen-tasks left out of training and scored zero-shot (leave-one-task-out); empty = none"),
    "gen-train-items": (100, int, (1, 1000000),
                        "generative: training items per task per site (a balanced mixture: readmission notes far outnumber the others)"),
    "dpo-self-rejected": (True, bool, None,
                          "generative: DPO's rejected answer is the starting model's own wrong answer when it has one, else a plausible wrong one"),
    "gen-examples": (3, int, (0, 50),
                     "generative: example generations per task shown in the report, on items of a made-up hospital the server generates"),
    "sft-steps": (8, int, (1, 100000), "generative: SFT steps per site per round"),
    "dpo-rounds": (1, int, (0, 1000), "generative: federated DPO rounds after the SFT rounds"),
    "dpo-steps": (4, int, (1, 100000), "generative: DPO steps per site per round"),
    "dpo-beta": (0.1, float, (1e-4, 100.0), "generative: DPO beta"),
    "gen-learning-rate": (1e-3, float, (1e-7, 1.0), "generative: peak learning rate of SFT"),
    "dpo-learning-rate": (2e-4, float, (1e-7, 1.0), "generative: peak learning rate of DPO"),
    "gen-batch-size": (4, int, (1, 1024), "generative: batch size of SFT and DPO"),
    "gen-max-length": (256, int, (16, 8192), "generative: tokens per example"),
    "gen-max-words": (60, int, (5, 5000), "generative: words of each input kept in the prompt"),
    "gen-eval-items": (16, int, (1, 100000), "generative: test items per task per site"),
    "gen-max-new-tokens": (48, int, (1, 4096), "generative: tokens generated per answer"),
    "public-eval": (True, bool, None,
                    "generative: the server also scores base and global adapters on public PubMedQA and MeQSum test items"),
    "arms": ("", str, None,
             "comparison study: comma-separated arms `model:method[:form]` (e.g. minilm:lora, minilm:head-only, "
             "smollm2:lora:prompt) or `default`; each runs the same regimes on the same splits and seeds; empty = one arm, the run's model"),
    "arm-method": ("lora", str, ("lora", "head-only", "full"),
                   "how the model is tuned: lora (adapters + head), head-only (the head alone), full (every weight); an arm sets it"),
    "arm-form": ("cls", str, ("cls", "prompt"),
                 "task form: cls (classification head) or prompt (the readmission yes/no question to a decoder, scored by p(yes)); an arm sets it"),
    "full-learning-rate": (5e-5, float, (1e-8, 1.0), "peak learning rate of `full` fine-tuning arms (every weight moves)"),
    "max-bytes-per-round": (0, int, (0, 2**62),
                            "bytes budget of one site's round (model arrays sent to it + received from it); an arm above it is refused before anything runs; 0 = none"),
    "eval-items": (0, int, (0, 10**9),
                   "at most this many items of each scored split (val, test, temporal) per site, picked by a stable hash of (seed, encounter id), so every arm scores the same ones; 0 = all"),
    "report": (True, bool, None, "build report.html at the end"),
    "resume": (False, bool, None,
               "continue the study in out-dir from its checkpoint (last completed round); `clinfed simulate --resume RUN_DIR` sets it"),
}


REGIMES = ("base", "global", "local", "personalized", "cluster", "similarity-weighted", "augmented",
           "fedrep", "ditto", "ifca", "interpolated")

# named studies: run-config presets `clinfed simulate --study NAME` starts from (the user's own
# run config wins over them, key by key); `default` is the run config's own defaults
STUDY_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the personalization methods the field compares, each scored against `global` on the same patients
    "methods": {"regimes": "base,global,local,personalized,fedrep,ditto,ifca,interpolated"},
}


def study_preset(name: str) -> dict[str, Any]:
    """The run-config overrides of a named study (`STUDY_PRESETS`); an unknown name is refused."""
    if name not in STUDY_PRESETS:
        raise ConfigError(f"unknown study {name!r}; known: {', '.join(STUDY_PRESETS)}")
    return dict(STUDY_PRESETS[name])


def split_seed(cfg: Mapping[str, Any]) -> int:
    """The seed of a site's splits: replicates vary the training seed on the same test patients."""
    value = int(cfg.get("split-seed", -1))
    return int(cfg["seed"]) if value < 0 else value


def regimes(cfg: dict[str, Any]) -> list[str]:
    """The study's regimes, in canonical order; base and global always run."""
    asked = {r.strip() for r in str(cfg.get("regimes", "")).split(",") if r.strip()}
    unknown = asked - set(REGIMES)
    if unknown:
        raise ConfigError(f"run config 'regimes': unknown regime(s) {sorted(unknown)}; known: {', '.join(REGIMES)}")
    return [r for r in REGIMES if r in asked or r in ("base", "global")]


GEN_SITE_TASKS = ("triage", "extraction", "readmission")


def gen_tasks(cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The generative study's (trained, held-out) site tasks, checked."""
    names = [t.strip() for t in str(cfg.get("gen-tasks", "")).split(",") if t.strip()]
    unknown = sorted(set(names) - set(GEN_SITE_TASKS))
    if unknown or not names:
        raise ConfigError(f"run config 'gen-tasks': {'unknown task(s) ' + str(unknown) if unknown else 'empty'}; "
                          f"site tasks are {', '.join(GEN_SITE_TASKS)}")
    hold = str(cfg.get("gen-holdout-task", "")).strip()
    if hold and hold not in names:
        raise ConfigError(f"run config 'gen-holdout-task': {hold!r} is not one of gen-tasks ({', '.join(names)})")
    if hold and len(names) < 2:
        raise ConfigError("run config 'gen-holdout-task': holding out the only task leaves nothing to train on; "
                          "list at least two gen-tasks")
    return [t for t in names if t != hold], [hold] if hold else []


def defaults() -> dict[str, Any]:
    return {k: v[0] for k, v in KEYS.items()}


def reference_markdown() -> str:
    """The run-config reference table of `docs/run-config.md`, rendered from KEYS.

    The docs' table is generated rather than written so it cannot drift from the
    defaults, ranges and meanings the parser enforces (tests/test_docs.py compares them)."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "text"}

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)

    def number(v: Any) -> str:
        return repr(v) if isinstance(v, int) else format(v, "g")

    def cell(text: str) -> str:
        """Markdown for a table cell: pipes escaped; outside `code`, `<` escaped (a site would read a tag)."""
        parts = text.replace("|", "\\|").split("`")
        return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))

    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, (default, kind, allowed, meaning) in KEYS.items():
        if isinstance(allowed, tuple) and kind in (int, float):
            span = f"{number(allowed[0])} to {number(allowed[1])}"
        elif isinstance(allowed, tuple):
            span = ", ".join(f"`{v}`" for v in allowed)
        else:
            span = "true, false" if kind is bool else "any"
        rows.append(f"| `{key}` | {kinds[kind]} | `{value(default)}` | {span} | {cell(meaning)} |")
    return "\n".join(rows) + "\n"


def _coerce(key: str, value: Any) -> Any:
    default, kind, rng, _ = KEYS[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run config '{key}': expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"run config '{key}': expected an integer, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run config '{key}': expected a number, got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"run config '{key}': expected a string, got {value!r}")
    if isinstance(rng, tuple) and len(rng) == 2 and kind in (int, float):
        lo, hi = rng
        if not lo <= value <= hi:
            raise ConfigError(f"run config '{key}': {value} is outside the allowed range [{lo}, {hi}]")
    elif isinstance(rng, tuple) and kind is str and value not in rng:
        raise ConfigError(f"run config '{key}': expected one of {', '.join(rng)}, got {value!r}")
    return value


def resolve(overrides: Mapping[str, Any] | None = None) -> "RunConfig":
    """The run config: defaults updated with checked overrides; unknown keys are refused by name."""
    cfg = defaults()
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            close = [k for k in KEYS if k.split("-")[0] == key.split("-")[0]]
            close = close or difflib.get_close_matches(key.replace("_", "-"), list(KEYS), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown run-config key '{key}'{hint}; see docs/run-config.md for the list")
        cfg[key] = _coerce(key, value)
    regimes(cfg)
    gen_tasks(cfg)
    from clinfed.common.metrics import parse_edges

    try:
        parse_edges(cfg["word-bands"])
    except ValueError as err:
        raise ConfigError(f"run config 'word-bands': {err}") from None
    from clinfed.common.metrics import parse_region_vocabulary

    try:
        parse_region_vocabulary(cfg["region-vocabulary"])
    except ValueError as err:
        raise ConfigError(f"run config 'region-vocabulary': {err}") from None
    if cfg["test-frac"] + cfg["val-frac"] >= 1.0:
        raise ConfigError(f"run config 'test-frac' + 'val-frac' = {cfg['test-frac'] + cfg['val-frac']:g} "
                          "leaves no encounters for training; their sum must be below 1")
    if cfg["dp"] and cfg["task"] == "generative" and int(cfg["dpo-rounds"]) > 0:
        raise ConfigError("run config 'dp': the generative study trains SFT with DP-SGD, but DPO has no DP "
                          "path (see docs/privacy.md); set dpo-rounds = 0 with dp = true")
    if cfg["strategy"] == "fedprox" and cfg["dp"]:
        raise ConfigError("run config 'strategy': fedprox's proximal term is not built into the DP-SGD loop; "
                          "use another strategy with dp = true")
    if cfg["quantization"] not in ("none", "auto"):  # auto falls back to none where quantization cannot go
        if cfg["dp"]:
            raise ConfigError("run config 'quantization': DP-SGD (dp = true) on a quantized base is not built "
                              "or tested; set quantization = none with dp")
        if cfg["arm-method"] != "lora" or str(cfg["arms"]).strip():
            raise ConfigError("run config 'quantization': a quantized base trains LoRA adapters only (QLoRA); "
                              "it cannot be combined with arm-method head-only/full or a comparison's arms")
    _check_models(cfg)
    _check_arms(cfg)
    return RunConfig(**{attribute(k): v for k, v in cfg.items()})


def attribute(key: str) -> str:
    """A run-config key's attribute name on RunConfig: `local-steps` -> `local_steps`."""
    return key.replace("-", "_")


class _ByKey(Mapping):
    """A RunConfig is also a read-only mapping by the keys users write (`cfg["local-steps"]`):
    what Flower's run config, run.json and the checkpoint's fingerprint hold."""

    def __getitem__(self, key: str) -> Any:
        if key not in KEYS:
            raise KeyError(key)
        return getattr(self, attribute(key))

    def __iter__(self):
        return iter(KEYS)

    def __len__(self) -> int:
        return len(KEYS)

    def override(self, values: Mapping[str, Any]) -> "RunConfig":
        """This config with some keys changed, checked again like any run config."""
        return resolve({**self, **values})

    def as_dict(self) -> dict[str, Any]:
        return dict(self)


# The typed run config, built once from the table of keys (the table stays the single source of
# defaults, ranges and meanings): `resolve` makes one; code reads attributes (`cfg.local_steps`).
RunConfig = make_dataclass(
    "RunConfig", [(attribute(k), spec[1], field(default=spec[0])) for k, spec in KEYS.items()],
    bases=(_ByKey,), frozen=True, eq=True,
    namespace={"__doc__": "A study's checked run config: one attribute per key of `common.config.KEYS`."})


@lru_cache(maxsize=16)
def _resolved(items: tuple) -> "RunConfig":
    return resolve(dict(items))


def from_run_config(run_config: Mapping[str, Any]) -> "RunConfig":
    """The RunConfig of a Flower Context's run config, resolved once per distinct config in a process
    (a site receives the same run config with every message of a study)."""
    return _resolved(tuple(sorted(dict(run_config).items())))


def _check_arms(cfg: dict[str, Any]) -> None:
    """A comparison's arms are parsed and checked with everything else, before anything runs."""
    if not str(cfg.get("arms", "")).strip():
        return
    from clinfed.common.model_source import ModelError, check_model_source

    arms = parse_arms(cfg["arms"])
    if len(arms) < 2:
        raise ConfigError(f"run config 'arms': one arm ({arms[0].name}) is not a comparison; list two or more, "
                          "or set `model` and leave `arms` empty for a single-model study")
    if cfg["task"] != "classifier":
        raise ConfigError("run config 'arms': comparisons run the readmission study (task = classifier); "
                          "the generative study compares its regimes itself")
    if cfg.get("resume"):
        raise ConfigError("run config 'arms': a comparison cannot be resumed yet; run it again "
                          "(every arm is seeded, so the numbers repeat)")
    for arm in arms:
        try:
            check_model_source(arm.model)
        except ModelError as err:
            raise ConfigError(f"run config 'arms': arm {arm.name}: {err}") from None
        if arm.form == "prompt" and cfg["dp"]:
            raise ConfigError(f"run config 'arms': arm {arm.name}: DP-SGD (dp = true) is built for classifier "
                              "heads; the prompt form cannot train with it")


def _check_models(cfg: dict[str, Any]) -> None:
    """A model path that does not exist stops here, before any site loads anything."""
    from clinfed.common.model_source import ModelError, check_model_source

    for key in ("model", "decoder"):
        if key in cfg:
            try:
                check_model_source(cfg[key], chat_template=key == "decoder" and cfg.get("task") == "generative")
            except ModelError as err:
                raise ConfigError(f"run config '{key}': {err}") from None


def for_arm(cfg: dict[str, Any], arm) -> dict[str, Any]:
    """The study's resolved run config with an arm of its comparison applied (checked like any run config)."""
    base = {k: v for k, v in cfg.items() if k != "arms"}
    checked = resolve({**base, **arm.overrides(cfg)})
    return checked.override({"arms": cfg.get("arms", "")}) if cfg.get("arms", "") else checked


def check_for_sites(cfg: dict[str, Any], n_sites: int, explicit: set[str] | frozenset[str] = frozenset()) -> None:
    """Options that cannot work with this many hospitals, refused before the study starts.

    Without this, `min-sites`/`expected-sites` above the number of hospitals wait out
    `node-wait-timeout` and then fail, and an explicit `clusters` that cannot be honoured is
    silently skipped. `explicit`: the keys the user set (a default `clusters` is skipped quietly,
    as documented).
    """
    for key in ("min-sites", "expected-sites"):
        if int(cfg.get(key, 0)) > n_sites:
            raise ConfigError(f"run config '{key}': {cfg[key]} but the federation has only {n_sites} "
                              f"hospital{'s' if n_sites != 1 else ''}; no study could start")
    k = int(cfg.get("clusters", 2))
    if "clusters" in explicit and "cluster" in regimes(cfg) and not 2 <= k < n_sites:
        raise ConfigError(f"run config 'clusters': {k} cluster(s) of {n_sites} hospitals is not a grouping "
                          f"(it needs 2 <= clusters < hospitals, here at most {n_sites - 1}); "
                          "lower it, or drop 'cluster' from regimes")
    if "clusters" in explicit and "ifca" in regimes(cfg) and not 2 <= k <= n_sites:
        raise ConfigError(f"run config 'clusters': ifca with {k} adapter(s) for {n_sites} hospitals needs "
                          f"2 <= clusters <= hospitals; lower it, or drop 'ifca' from regimes")


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse `k1=v1 k2=v2` as `flwr run --run-config` does (values are TOML)."""
    out: dict[str, Any] = {}
    try:
        tokens = shlex.split(text or "")
    except ValueError as err:  # "No closing quotation"
        raise ConfigError(f"run config {text!r} cannot be split into key=value items ({err})") from None
    for token in tokens:
        if "=" not in token:
            raise ConfigError(f"run-config item '{token}' is not of the form key=value")
        key, raw = token.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # bare words are strings, as a user would expect
    return out


def to_toml_overrides(cfg: dict[str, Any]) -> str:
    """Render overrides for `flwr run --run-config` (strings quoted as TOML)."""
    parts = []
    for key, value in cfg.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)
