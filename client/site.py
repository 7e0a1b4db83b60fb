"""One hospital's side of a study: its data, its model, its private adapters.

Everything patient-level stays inside this object. It hands the ClientApp
adapter arrays (only what the egress guard will let out anyway) and
aggregate metrics computed by `common.metrics`.

Caches are per process: in simulation a Ray actor serves many sites and many
messages, so the base model is loaded once and adapters are swapped in, and a
site's notes are tokenized once.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import read_site_table, split_site
from common.metrics import best_f1_threshold, cell_metrics, flatten_cell
from common.models import (
    LoraSettings,
    adapter_state,
    load_adapter_state,
    make_lora_model,
    model_identity,
    read_adapter,
    save_adapter,
)
from common.training import TrainSettings, encode_texts, predict_proba, train_classifier

log = logging.getLogger("clinfed.site")

EVAL_SPLITS = ("test", "temporal")


@dataclass(frozen=True)
class ModelKey:
    model: str
    seed: int
    lora: LoraSettings


class LoadedModel:
    """A base classifier with its LoRA adapter, loaded once per process."""

    def __init__(self, key: ModelKey):
        self.key = key
        self.model, self.tokenizer = make_lora_model(key.model, key.seed, key.lora)
        self.init_state = adapter_state(self.model)
        self.shapes = {k: tuple(v.shape) for k, v in self.init_state.items()}
        self.identity = model_identity(key.model)

    def use(self, state: dict[str, np.ndarray]):
        load_adapter_state(self.model, state, reference=self.init_state)
        return self.model


_MODELS: dict[ModelKey, LoadedModel] = {}
_SITES: dict[tuple, "Site"] = {}


def get_model(key: ModelKey) -> LoadedModel:
    if key not in _MODELS:
        _MODELS.clear()  # one base model per process: a new study replaces the old one
        _MODELS[key] = LoadedModel(key)
    return _MODELS[key]


def model_key(cfg: dict) -> ModelKey:
    targets = tuple(t.strip() for t in cfg["lora-targets"].split(",") if t.strip())
    lora = LoraSettings(cfg["lora-rank"], cfg["lora-alpha"], cfg["lora-dropout"], targets)
    return ModelKey(cfg["model"], int(cfg["seed"]), lora)


class Site:
    """A hospital's data, splits and tokenized notes, with its private output folder."""

    def __init__(self, name: str, table: Path, out_dir: Path, cfg: dict):
        self.name = name
        self.table = Path(table)
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        df = read_site_table(self.table)
        self.splits = split_site(df, seed=int(cfg["seed"]), temporal_frac=cfg["temporal-frac"],
                                 test_frac=cfg["test-frac"], val_frac=cfg["val-frac"])
        if len(self.splits["train"]) == 0:
            raise ValueError(f"site {name}: no training encounters after splitting")
        self._encoded: dict[str, list[np.ndarray]] = {}
        self.site_seed = int(cfg["seed"]) * 1000003 + zlib.crc32(name.encode()) % 1000003

    @classmethod
    def get(cls, name: str, table: Path, out_dir: Path, cfg: dict) -> "Site":
        stamp = Path(table).stat().st_mtime_ns if Path(table).is_file() else 0
        key = (name, str(table), stamp, str(out_dir), cfg["seed"], cfg["temporal-frac"],
               cfg["test-frac"], cfg["val-frac"], cfg["max-length"], cfg["model"])
        if key not in _SITES:
            if len(_SITES) > 64:
                _SITES.clear()
            _SITES[key] = cls(name, table, out_dir, cfg)
        return _SITES[key]

    # ------------------------------------------------------------------ data
    def encoded(self, split: str, tokenizer) -> list[np.ndarray]:
        if split not in self._encoded:
            texts = self.splits[split]["note_text"].tolist()
            self._encoded[split] = encode_texts(tokenizer, texts, int(self.cfg["max-length"]))
        return self._encoded[split]

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split]["readmitted_30d"].to_numpy(dtype=np.int64)

    def counts(self) -> dict[str, int]:
        return {s: len(df) for s, df in self.splits.items()}

    # -------------------------------------------------------------- training
    def train(self, lm: LoadedModel, start: dict[str, np.ndarray], steps: int, seed_offset: int,
              label: str) -> tuple[dict[str, np.ndarray], dict]:
        """Train `steps` steps from `start`; return the new adapter state and stats."""
        cfg = self.cfg
        model = lm.use(start)
        settings = TrainSettings(
            steps=int(steps), batch_size=int(cfg["batch-size"]), lr=float(cfg["learning-rate"]),
            seed=self.site_seed + seed_offset, precision=cfg["precision"],
        )
        marks = {max(1, steps // 4 * i) for i in range(1, 5)}

        def progress(step, total, loss):
            if step in marks:
                log.info("site %s %s: step %d/%d loss %.3f", self.name, label, step, total, loss)

        info = train_classifier(model, self.encoded("train", lm.tokenizer), self.labels("train"),
                                settings, pad_id=lm.tokenizer.pad_token_id, progress=progress)
        return adapter_state(model), info

    def save_private(self, lm: LoadedModel, regime: str, state: dict[str, np.ndarray]) -> Path:
        """Local/personalized adapters stay here, in PEFT format."""
        return save_adapter(lm.model, state, self.out_dir / "adapters" / regime,
                            meta={"site": self.name, "regime": regime, "base_model": lm.identity})

    def load_private(self, lm: LoadedModel, regime: str) -> dict[str, np.ndarray] | None:
        folder = self.out_dir / "adapters" / regime
        if not (folder / "adapter_model.safetensors").exists():
            return None
        return read_adapter(lm.model, folder)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, lm: LoadedModel, states: dict[str, dict[str, np.ndarray]], k: int) -> dict[str, float]:
        """Aggregate metrics per regime and split; F1 threshold chosen on validation."""
        cfg = self.cfg
        out: dict[str, float] = {}
        pad = lm.tokenizer.pad_token_id
        for regime, state in states.items():
            model = lm.use(state)
            preds = {}
            for split in ("val",) + EVAL_SPLITS:
                enc = self.encoded(split, lm.tokenizer)
                preds[split] = predict_proba(model, enc, pad, batch_size=int(cfg["eval-batch-size"]),
                                             precision=cfg["precision"])
            thr = best_f1_threshold(self.labels("val"), preds["val"])
            for i, split in enumerate(EVAL_SPLITS):
                y = self.labels(split)
                if len(y) == 0:
                    continue
                cell = cell_metrics(y, preds[split], thr, k, seed=self.site_seed + i,
                                    n_boot=int(cfg["bootstrap"]))
                out.update(flatten_cell(regime, split, "all", cell))
        return out

    def write_status(self, payload: dict):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "site_status.json").write_text(json.dumps(payload, indent=1, default=str))
