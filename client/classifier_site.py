"""One hospital's side of a study: its data, its model, its private adapters.

Everything patient-level stays inside this object. It hands the ClientApp
adapter arrays (only what the egress guard will let out anyway) and
aggregate metrics computed by `common.metrics`.

Caches are per process: in simulation a Ray actor serves many sites and many
messages, so the base model is loaded once and adapters are swapped in, and a
site's notes are tokenized once.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np

from clinfed.common.data import read_site_table, split_site
from clinfed.common.metrics import (
    EVAL_SPLITS,
    best_f1_threshold,
    describe_release,
    eval_plan,
    flatten_split,
    parse_edges,
    parse_region_vocabulary,
    site_descriptors,
    split_plan,
    subgroup_labels,
)
from clinfed.common.config import split_seed
from clinfed.common.findings_release import release_calibration, release_differences
from clinfed.common.error_drivers import error_driver_importance
from clinfed.common.adapters import adapter_file, adapter_state, read_adapter, save_adapter
from clinfed.common.model_cache import LoadedModel
from clinfed.common.dp import train_classifier_dp
from clinfed.common.training import (
    PeakRSS,
    TrainSettings,
    encode_texts,
    predict_proba,
    predict_yes_proba,
    train_classifier,
    train_prompt_classifier,
)

log = logging.getLogger("clinfed.site")


_SITES: dict[tuple, "Site"] = {}


class Site:
    """A hospital's data, splits and tokenized notes, with its private output folder."""

    def __init__(self, name: str, table: Path, out_dir: Path, cfg: dict):
        self.name = name
        self.table = Path(table)
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        df = read_site_table(self.table)
        self.splits = split_site(df, seed=split_seed(cfg), temporal_frac=cfg.temporal_frac,
                                 test_frac=cfg.test_frac, val_frac=cfg.val_frac)
        if len(self.splits["train"]) == 0:
            raise ValueError(f"site {name}: no training encounters after splitting")
        cap = int(cfg.get("eval-items", 0) or 0)
        if cap:
            self.splits.update({s: _first_by_hash(self.splits[s], split_seed(cfg), cap)
                                for s in ("val",) + EVAL_SPLITS})
        self._encoded: dict[str, list[np.ndarray]] = {}
        self.site_seed = site_seed(cfg, name)

    @classmethod
    def get(cls, name: str, table: Path, out_dir: Path, cfg: dict) -> "Site":
        stamp = Path(table).stat().st_mtime_ns if Path(table).is_file() else 0
        # the whole run config: an arm's model, form and training settings are the Site's
        key = (name, str(table), stamp, str(out_dir), tuple(sorted(cfg.items())))
        if key not in _SITES:
            if len(_SITES) > 64:
                _SITES.clear()
            _SITES[key] = cls(name, table, out_dir, cfg)
        return _SITES[key]

    # ------------------------------------------------------------------ data
    def encoded(self, split: str, tokenizer) -> list[np.ndarray]:
        if split not in self._encoded:
            self._encoded[split] = self.encode_notes(self.splits[split]["note_text"].tolist(), tokenizer)
        return self._encoded[split]

    def encode_notes(self, texts, tokenizer) -> list[np.ndarray]:
        """Token ids per note: the note's first `max-length` tokens; in the prompt form, those
        tokens inside the readmission yes/no question (common.tasks), ready for the answer."""
        if self.cfg.get("arm-form", "cls") != "prompt":
            return encode_texts(tokenizer, texts, self.cfg.max_length)
        from clinfed.common.tasks import TASKS

        cut = tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length,
                        add_special_tokens=False)["input_ids"]
        out = []
        for ids in cut:
            note = tokenizer.decode(ids, skip_special_tokens=True)
            messages = TASKS["readmission"].prompt({"note_text": note}, max_words=10**6)
            out.append(np.asarray(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False), dtype=np.int64))
        return out

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split]["readmitted_30d"].to_numpy(dtype=np.int64)

    def counts(self) -> dict[str, int]:
        return {s: len(df) for s, df in self.splits.items()}

    # -------------------------------------------------------------- training
    def dp_settings(self, policy):
        """DP-SGD settings when the study runs with `dp`; budget and delta from the effective policy."""
        from clinfed.common.dp import settings_for

        return settings_for(self.cfg, policy, len(self.splits["train"]))

    def train(self, lm: LoadedModel, start: dict[str, np.ndarray], steps: int, seed_offset: int,
              label: str, extra: tuple[list[np.ndarray], np.ndarray] | None = None,
              dp=None, ledger=None, proximal_mu: float = 0.0, head_only: bool = False,
              anchor: dict[str, np.ndarray] | None = None, body_only: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """Train `steps` steps from `start` (on `extra` examples too, if given).

        `proximal_mu`: a pull toward `anchor` (mu/2 * ||w - anchor||^2, common.training), `start`
        when no anchor is given: FedProx's term in a federated round; Ditto's personal adapter
        starts from itself and is pulled toward the round's global adapter (`anchor`).
        `head_only`: the LoRA weights stay as `start` has them and only the head trains;
        `body_only`: the head stays and only the LoRA weights train (FedRep's two phases of a
        round, client.personal_regimes).

        With `dp`, the call is first charged to the site's `ledger` (common.dp.plan),
        which raises DPBudgetExhausted, before any training, if it would exceed the budget."""
        cfg = self.cfg
        encoded, labels = self.encoded("train", lm.tokenizer), self.labels("train")
        if extra is not None:
            encoded, labels = encoded + list(extra[0]), np.concatenate([labels, extra[1]])
        event = None
        if dp is not None:
            from clinfed.common.dp import plan

            event = plan(ledger, dp, len(encoded), cfg.batch_size, int(steps), label)
        pull_to = None
        if anchor is not None and proximal_mu > 0:
            from clinfed.common.training import trainable_snapshot

            pull_to = trainable_snapshot(lm.use(anchor))  # by parameter name, as the loop reads it
        model = lm.use(start)
        settings = TrainSettings(
            steps=int(steps), batch_size=cfg.batch_size, lr=cfg.learning_rate,
            seed=self.site_seed + seed_offset, precision=cfg.precision, device=cfg.device,
            gpu_memory_gb=cfg.gpu_memory_gb, micro_batch=getattr(self, "micro_batch", 0),
            proximal_mu=float(proximal_mu), anchor=pull_to, base_dropout=bool(cfg.base_dropout),
        )
        prompt = lm.answer_ids is not None
        if prompt and dp is not None:
            raise ValueError("DP-SGD is built for classifier heads, not for the prompt form")
        if dp is not None and proximal_mu > 0:
            raise ValueError("the proximal term (fedprox) is not built into the DP-SGD loop")
        marks = {max(1, steps // 4 * i) for i in range(1, 5)}

        def progress(step, total, loss):
            if step in marks:
                from flwr.supercore import log as flwr_log

                flwr_log(logging.INFO, "[clinfed] site %s %s: step %d/%d loss %.3f",
                         self.name, label, step, total, loss)

        from clinfed.client.personal_regimes import part_frozen

        with PeakRSS() as rss, part_frozen(model, "lora" if head_only else "head" if body_only else None):
            if prompt:
                info = train_prompt_classifier(model, encoded, labels, settings, pad_id=lm.tokenizer.pad_token_id,
                                               answer_ids=lm.answer_ids, progress=progress)
            elif dp is not None:
                info = train_classifier_dp(model, encoded, labels, settings, lm.tokenizer.pad_token_id, dp,
                                           progress=progress)
            else:
                info = train_classifier(model, encoded, labels, settings, pad_id=lm.tokenizer.pad_token_id,
                                        progress=progress)
        info["peak_rss_mb"] = rss.peak_mb
        self.micro_batch = int(info.get("micro_batch", 0))  # the plan holds for the site's next calls
        if event is not None:
            info["dp"] = event
        return adapter_state(model), info

    def save_private(self, lm: LoadedModel, regime: str, state: dict[str, np.ndarray]) -> Path:
        """Local/personalized adapters stay here, in PEFT format."""
        return save_adapter(lm.model, state, self.out_dir / "adapters" / regime,
                            meta={"site": self.name, "regime": regime, "base_model": lm.identity})

    def load_private(self, lm: LoadedModel, regime: str) -> dict[str, np.ndarray] | None:
        folder = self.out_dir / "adapters" / regime
        if adapter_file(folder) is None:
            return None
        return read_adapter(lm.model, folder, lm.identity)

    # ------------------------------------------------------------ evaluation
    @property
    def region_vocabulary(self) -> list[str]:
        return parse_region_vocabulary(self.cfg.get("region-vocabulary", ""))

    def descriptors(self, k: int) -> dict[str, float]:
        """Aggregate site descriptors over all of the site's encounters (disclosure-controlled)."""
        import pandas as pd

        df = pd.concat([self.splits[s] for s in ("train", "val", "test", "temporal")])
        return site_descriptors(df, k, parse_edges(self.cfg.word_bands), self.region_vocabulary)

    def describe_metrics(self, k: int) -> dict[str, float]:
        """The describe reply's numbers: split sizes and descriptors, through disclosure control."""
        return describe_release(self.splits, k, parse_edges(self.cfg.word_bands), self.region_vocabulary)

    def evaluate(self, lm: LoadedModel, states: dict[str, dict[str, np.ndarray]], k: int,
                 subgroups: bool = True, cross: dict[str, dict[str, np.ndarray]] | None = None
                 ) -> dict[str, float]:
        """Aggregate metrics per regime, split and subgroup; F1 threshold chosen on validation.

        Which cells are released is decided once per split from the labels (common.disclosure),
        so every regime releases the same cells. Cross-site regimes (another site's or
        cluster's adapter) are scored on the whole splits only. The error-driver model runs
        on the global adapter's predictions; only its per-feature importances and n are returned.
        """
        import pandas as pd

        cfg = self.cfg
        out: dict[str, float] = {}
        edges = parse_edges(cfg.word_bands)
        vocab = self.region_vocabulary
        labels = {s: subgroup_labels(self.splits[s], edges, vocab) if subgroups else {} for s in EVAL_SPLITS}
        plans = {s: eval_plan(self.labels(s), labels[s], k, edges, vocab) for s in EVAL_SPLITS}
        own: dict[str, dict[str, np.ndarray]] = {}
        keep_scores = bool(str(cfg.get("arms", "")).strip())
        for regime, state in list(states.items()) + list((cross or {}).items()):
            preds = self._predict(lm, state)
            if keep_scores and regime in states:
                self.save_scores(regime, preds)
            thr = best_f1_threshold(self.labels("val"), preds["val"])
            for i, split in enumerate(EVAL_SPLITS):
                y = self.labels(split)
                if len(y) == 0:
                    continue
                plan = plans[split] if regime in states else {("all", ""): plans[split][("all", "")]}
                out.update(flatten_split(regime, split, y, preds[split], thr, labels[split], plan,
                                         self.site_seed + i, cfg.bootstrap, vocab))
                if regime in states:
                    out.update(release_calibration(regime, split, y, preds[split], plan[("all", "")], k))
            if regime in states:
                own[regime] = preds
        # paired differences on the same patients, released where both regimes' cells are
        for i, split in enumerate(EVAL_SPLITS):
            y = self.labels(split)
            if len(y):
                out.update(release_differences(split, y, {r: p[split] for r, p in own.items()}, labels[split],
                                               plans[split], self.site_seed + i, cfg.bootstrap, vocab,
                                               subgroups=subgroups))
        global_preds = own.get("global", {})
        sizes = split_plan(self.splits, k)["sizes"]
        known = all(s in sizes or len(self.splits[s]) == 0 for s in EVAL_SPLITS)  # drv-n is their sum
        if global_preds and cfg.get("drivers", True) and known:
            df = pd.concat([self.splits[s] for s in EVAL_SPLITS])
            y = np.concatenate([self.labels(s) for s in EVAL_SPLITS])
            p = np.concatenate([global_preds[s] for s in EVAL_SPLITS])
            imp, n = error_driver_importance(df, y, p, seed=self.site_seed, k=k, word_edges=edges,
                                             region_vocabulary=vocab)
            if imp:
                out["drv-n"] = int(n)
                out.update({f"drv/{name}": float(v) for name, v in imp.items()})
        return out

    def save_scores(self, regime: str, preds: dict[str, np.ndarray]):
        """A comparison's arm keeps its per-item scores here, at the site (common.arm_differences):
        the paired differences are computed from them; they never leave."""
        from clinfed.common.arm_differences import save_scores

        save_scores(self.out_dir, regime, {
            s: (self.splits[s]["encounter_id"].astype(str).to_numpy(), self.labels(s), preds[s])
            for s in EVAL_SPLITS}, seed=self.site_seed)

    def _predict(self, lm: LoadedModel, state: dict[str, np.ndarray],
                 splits: tuple[str, ...] = ("val",) + EVAL_SPLITS) -> dict[str, np.ndarray]:
        model = lm.use(state)
        if lm.answer_ids is not None:
            return {split: predict_yes_proba(model, self.encoded(split, lm.tokenizer), lm.tokenizer.pad_token_id,
                                             lm.answer_ids, batch_size=self.cfg.eval_batch_size,
                                             device=self.cfg.device, precision=self.cfg.precision)
                    for split in splits}
        return {
            split: predict_proba(model, self.encoded(split, lm.tokenizer), lm.tokenizer.pad_token_id,
                                 batch_size=self.cfg.eval_batch_size, device=self.cfg.device,
                                 precision=self.cfg.precision)
            for split in splits
        }

    def choice_loss(self, lm: LoadedModel, state: dict[str, np.ndarray]) -> float:
        """Mean log loss of `state` on the site's validation split (its training split when the
        study keeps no validation patients): what IFCA and interpolation choose by. It stays here."""
        from clinfed.client.personal_regimes import log_loss

        split = "val" if len(self.splits["val"]) else "train"
        return log_loss(self.labels(split), self._predict(lm, state, (split,))[split])


def site_seed(cfg: dict, name: str) -> int:
    """The site's seed of batches and bootstrap: the same for every arm of a comparison."""
    return cfg.seed * 1000003 + zlib.crc32(name.encode()) % 1000003


def _first_by_hash(df, seed: int, cap: int):
    """At most `cap` rows: those first by a stable hash of (seed, encounter id), in their
    original order. The same rows for every arm and every run with this seed."""
    from clinfed.common.data import stable_uniform

    if cap <= 0 or len(df) <= cap:
        return df
    u = stable_uniform(int(seed) + 7919, df["encounter_id"].astype(str).tolist())
    keep = np.sort(np.argsort(u, kind="stable")[:cap])
    return df.iloc[keep].reset_index(drop=True)
