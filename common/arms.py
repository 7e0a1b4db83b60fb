"""Arms of a comparison study: which base model, which way of tuning it, which task form.

An arm is written `model:method[:form]` and a study lists them comma-separated
in the run-config key `arms`, e.g. the default comparison

    minilm:lora, minilm:head-only, smollm2:lora, smollm2:lora:prompt

- model: anything `model` accepts ('minilm', 'smollm2', a Hugging Face id, a
  local path, 'tiny-bert' / 'tiny-llama' for tests);
- method: `lora` (the run's lora-rank), `lora-r<N>` (rank N), `head-only` (the
  classification head alone), `full` (every weight: the whole model travels
  each round);
- form: `cls` (a classification head, the default) or `prompt` (the readmission
  question as an instruction, scored by the probability of the answer "yes";
  decoders only).

Every arm runs the same regimes on the same splits and seeds, so per-site
differences between arms are paired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clinfed.common.errors import ConfigError

METHODS = ("lora", "head-only", "full")
FORMS = ("cls", "prompt")
_LORA_RANK = re.compile(r"^lora-r(\d+)$")


@dataclass(frozen=True)
class Arm:
    model: str
    method: str = "lora"
    form: str = "cls"
    rank: int | None = None  # None = the run's lora-rank

    @property
    def name(self) -> str:
        method = f"lora-r{self.rank}" if self.method == "lora" and self.rank else self.method
        return ":".join([self.model, method] + (["prompt"] if self.form == "prompt" else []))

    @property
    def safe_name(self) -> str:
        """The arm's name as a folder name (RUN_DIR/arms/<safe_name>, a site's arms/<safe_name>)."""
        return safe_name(self.name)

    def overrides(self, cfg: dict) -> dict:
        """The run-config values this arm runs with (on top of the study's run config)."""
        out = {"model": self.model, "arm-method": self.method, "arm-form": self.form}
        if self.rank:
            out["lora-rank"] = self.rank
            out["lora-alpha"] = 2 * self.rank
        if self.method == "full":
            out["learning-rate"] = float(cfg.get("full-learning-rate", 5e-5))
        return out


# The default comparison (`arms = "default"`, `clinfed compare`): the default encoder with
# LoRA and with its head alone, the default decoder with LoRA as a classifier and as a prompt.
DEFAULT_ARMS = "minilm:lora,minilm:head-only,smollm2:lora,smollm2:lora:prompt"


# The default comparison's budgets (`clinfed compare`), chosen to fit 45 minutes on a 2-core
# CPU with the two SmolLM2 arms: every arm gets the same rounds, steps, batch, note length and
# scored items, so the comparison is of methods at equal compute steps, not of budgets.
DEFAULT_COMPARISON = {
    "arms": "default",
    "regimes": "base,global,local",
    "num-server-rounds": 3,
    "local-steps": 10,
    "batch-size": 16,
    "max-length": 64,
    "eval-items": 150,
    "subgroups": False,
    "share-local-adapters": False,  # no cross-site matrix: the arms, not the sites, are compared
    "gen-eval-items": 10,
    "gen-max-new-tokens": 32,
}


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text.replace(":", "__")).strip("_") or "arm"


def parse_arm(text: str) -> Arm:
    parts = [p.strip() for p in str(text).strip().split(":")]
    if len(parts) < 2 or len(parts) > 3 or not all(parts):
        raise ConfigError(f"run config 'arms': {text!r} is not model:method[:form] "
                          f"(methods: lora, lora-r<N>, head-only, full; forms: cls, prompt)")
    model, method = parts[0], parts[1]
    form = parts[2] if len(parts) == 3 else "cls"
    rank = None
    m = _LORA_RANK.match(method)
    if m:
        method, rank = "lora", int(m.group(1))
        if not 1 <= rank <= 1024:
            raise ConfigError(f"run config 'arms': {text!r}: LoRA rank {rank} is outside 1-1024")
    if method not in METHODS:
        raise ConfigError(f"run config 'arms': {text!r}: unknown method {method!r}; "
                          "use lora, lora-r<N>, head-only or full")
    if form not in FORMS:
        raise ConfigError(f"run config 'arms': {text!r}: unknown form {form!r}; use cls or prompt")
    if form == "prompt" and method != "lora":
        raise ConfigError(f"run config 'arms': {text!r}: the prompt form tunes LoRA adapters "
                          "(a prompt has no head to train alone)")
    return Arm(model=model, method=method, form=form, rank=rank)


def parse_arms(text: str) -> list[Arm]:
    """The study's arms, in order; an empty string means no comparison (one arm: the run's model)."""
    if str(text or "").strip() == "default":
        text = DEFAULT_ARMS
    items = [t for t in str(text or "").split(",") if t.strip()]
    arms = [parse_arm(t) for t in items]
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"run config 'arms': {', '.join(dup)} listed twice")
    safe = [a.safe_name for a in arms]
    clash = sorted({n for a, n in zip(arms, safe) if safe.count(n) > 1})
    if clash:
        raise ConfigError(f"run config 'arms': two arms share the folder name {clash[0]!r}; rename one")
    return arms
