"""A comparison study: several arms (base model x method x task form) in one federation.

Every arm runs the same regimes on the same sites, splits, items and seeds (one
`server.study.Study` per arm, writing RUN_DIR/arms/<arm>/), so per-site
differences between arms are paired. Then:

- `evaluate.compare`: each site computes, from the per-item scores every arm left
  in its own folder, the AUC difference of each pair of arms per regime and split
  with a paired-bootstrap interval, and releases only those aggregates
  (common.arm_differences; small cells suppressed; the egress guard checks every key);
- cost per arm, measured: trainable parameters, bytes per round per site (counted
  on the messages), training seconds and peak memory per site (released by sites);
- the unseen-task check: decoder arms are scored at the server on public PubMedQA
  and MeQSum test items (encoder arms with a classification head cannot answer
  them: recorded as not applicable, never a number).

Full fine-tuning is refused before anything runs when the study's
`max-bytes-per-round` is below what one round moves, and an arm is skipped when a
site's policy forbids what it sends (allow-full-weights, max-update-bytes).

RUN_DIR: metrics.csv (with `arm` and `task` columns), comparison.csv, costs.csv,
run.json, report.html, and arms/<arm>/ (each arm's own full study output).
"""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from clinfed.common import protocol
from clinfed.common.arms import Arm, parse_arms
from clinfed.common.config import ConfigError, for_arm
from clinfed.common.metrics import METRIC_COLUMNS
from clinfed.server.checkpoint import write_json
from clinfed.server.messaging import StudyError, exchange, say
from clinfed.server.study import Study, versions

log = logging.getLogger("clinfed.server")

COMPARE_COLUMNS = METRIC_COLUMNS + ["arm", "task"]
DIFF_COLUMNS = ["site", "reference", "arm", "regime", "split", "diff", "diff_lo", "diff_hi", "n", "positives",
                "status", "note"]
COST_COLUMNS = ["arm", "model", "method", "form", "status", "trainable_parameters", "total_parameters",
                "trainable_share", "bytes_per_round_per_site", "bytes_per_round_per_site_planned", "rounds",
                "bytes_total", "train_seconds_per_site", "train_seconds_per_site_max", "federated_train_seconds_per_site",
                "site_held_train_seconds_per_site", "peak_rss_mb_per_site", "peak_rss_mb_max", "wall_seconds",
                "evaluate_seconds", "note"]
PUBLIC_TASKS = ("pubmedqa", "meqsum")
NOT_APPLICABLE_ENCODER = ("not applicable: an encoder with a classification head cannot answer free-text "
                          "questions, so it has no score on PubMedQA or MeQSum")


def plan_costs(cfg: dict) -> list[dict]:
    """Per arm, what one update carries, read from the model's configuration (no weights loaded),
    and the study's bytes budget checked: an arm whose round (arrays to and from one site) exceeds
    `max-bytes-per-round` is refused with a ConfigError naming it, before anything runs."""
    from clinfed.common.model_cache import model_key
    from clinfed.common.model_source import ModelError
    from clinfed.common.model_cache import shapes_nbytes, trainable_shapes
    from clinfed.common.models import is_decoder_model

    out = []
    budget = int(cfg.get("max-bytes-per-round", 0) or 0)
    over = []
    for arm in parse_arms(cfg.arms):
        acfg = for_arm(cfg, arm)
        key = model_key(acfg)
        try:
            decoder = is_decoder_model(arm.model)
            if arm.form == "prompt" and not decoder:
                raise ConfigError(f"run config 'arms': arm {arm.name}: the prompt form needs a decoder (causal) "
                                  f"language model; {arm.model} is an encoder: use {arm.model}:{arm.method} (cls)")
            shapes = trainable_shapes(arm.model, arm.method, arm.form, key.lora, seed=cfg.seed)
        except ModelError as err:
            raise ConfigError(f"run config 'arms': arm {arm.name}: {err}") from None
        nbytes = shapes_nbytes(shapes)
        row = {"arm": arm.name, "parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
               "update_bytes": nbytes, "round_bytes_per_site": 2 * nbytes, "decoder": decoder}
        out.append(row)
        if budget and 2 * nbytes > budget:
            over.append(f"{arm.name} moves {2 * nbytes:,} bytes per site per round ({row['parameters']:,} "
                        f"trainable parameters in fp32, to and from the site)")
    if over:
        raise ConfigError(f"run config 'max-bytes-per-round' = {budget:,}: refused before anything runs, "
                          f"{'; '.join(over)}. Drop the arm(s), or raise the budget")
    return out


def _overall(diffs: pd.DataFrame) -> pd.DataFrame:
    """Across sites, per (reference, arm, regime, split): the n-weighted mean of the sites'
    paired differences; its 95 % interval combines the sites' paired-bootstrap standard errors
    (SE_i = interval width / 3.92; sites independent: SE = sqrt(sum w_i^2 SE_i^2))."""
    rows = []
    ok = diffs[(diffs["status"] == "ok") & (diffs["site"] != "overall")]
    for (ref, arm, regime, split), g in ok.groupby(["reference", "arm", "regime", "split"], sort=False):
        g = g.dropna(subset=["diff", "n"])
        if g.empty:
            continue
        w = g["n"].to_numpy(float) / g["n"].to_numpy(float).sum()
        d = float((w * g["diff"].to_numpy(float)).sum())
        has_ci = g[["diff_lo", "diff_hi"]].notna().all(axis=1).to_numpy()
        lo = hi = None
        if has_ci.all():
            se = (g["diff_hi"].to_numpy(float) - g["diff_lo"].to_numpy(float)) / (2 * 1.959964)
            se_all = float(np.sqrt((w ** 2 * se ** 2).sum()))
            lo, hi = d - 1.959964 * se_all, d + 1.959964 * se_all
        above = int((g["diff"] > 0).sum())
        excl = int(((g["diff_lo"] > 0) | (g["diff_hi"] < 0)).sum())
        rows.append({"site": "overall", "reference": ref, "arm": arm, "regime": regime, "split": split,
                     "diff": d, "diff_lo": lo, "diff_hi": hi, "n": int(g["n"].sum()),
                     "positives": int(g["positives"].sum()) if g["positives"].notna().all() else None,
                     "status": "ok",
                     "note": (f"n-weighted mean over {len(g)} site(s); interval from the sites' paired-bootstrap "
                              f"SEs; arm above reference at {above} of {len(g)}; interval excludes 0 at {excl}")})
    return pd.DataFrame(rows, columns=DIFF_COLUMNS)


class Comparison:
    def __init__(self, grid, cfg: dict, run_dir: Path):
        self.grid = grid
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.arms: list[Arm] = parse_arms(cfg.arms)
        self.rows: list[dict] = []
        self.diff_rows: list[dict] = []
        self.costs: list[dict] = []
        self.errors: list[str] = []
        self.timings: dict[str, float] = {}
        self.studies: dict[str, Study] = {}
        self.t0 = time.time()
        self.run = {"status": "running", "kind": "comparison",
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "config": dict(cfg), "seed": cfg.seed, "versions": versions(),
                    "arms": [{"name": a.name, "model": a.model, "method": a.method, "form": a.form,
                              "folder": f"arms/{a.safe_name}"} for a in self.arms],
                    "overall_method": ("n-weighted mean of the sites' paired AUC differences; 95 % interval "
                                       "combining the sites' paired-bootstrap standard errors (sites independent)")}
        self._public_cache: dict[str, dict] = {}

    # ------------------------------------------------------------------ phases
    def arm_dir(self, arm: Arm) -> Path:
        return self.run_dir / "arms" / arm.safe_name

    def policy_refusal(self, arm: Arm, plan: dict, policies: dict) -> str | None:
        """Why an arm cannot run because a site's policy forbids what it would send (or None)."""
        why = []
        for site, pol in sorted(policies.items()):
            if not pol.allow_adapters:
                continue  # a metrics-only site sends nothing in any arm
            if arm.method == "full" and not pol.allow_full_weights:
                why.append(f"site {site}'s policy forbids sending the whole model (allow-full-weights = false)")
            elif pol.max_update_bytes and plan["update_bytes"] > pol.max_update_bytes:
                why.append(f"site {site}'s policy caps an update at {pol.max_update_bytes:,} bytes "
                           f"(max-update-bytes); this arm's is {plan['update_bytes']:,}")
        if not why:
            return None
        return f"arm {arm.name} refused before training: " + "; ".join(why)

    def run_arm(self, arm: Arm, first: Study | None, plan: dict) -> Study:
        acfg = for_arm(self.cfg, arm)
        study = Study(self.grid, acfg, self.arm_dir(arm), arm=arm, site_run_dir=self.run_dir)
        if first is not None:
            study.adopt_sites(first)
        say(f"arm {arm.name}: {plan['parameters']:,} trainable parameters, "
             f"{plan['round_bytes_per_site']:,} bytes per site per round")
        study.execute()
        return study

    def execute(self):
        try:
            t = time.time()
            plans = {p["arm"]: p for p in plan_costs(self.cfg)}
            self.run["plan"] = plans
            self.timings["plan"] = round(time.time() - t, 2)
            first: Study | None = None
            for arm in self.arms:
                plan = plans[arm.name]
                if first is not None:
                    why = self.policy_refusal(arm, plan, getattr(first, "site_policies", {}))
                    if why:
                        self._refuse(arm, plan, why)
                        continue
                t = time.time()
                try:
                    if first is None:
                        # the first arm waits for the sites and has them describe themselves; its
                        # policies decide whether later arms may run at all
                        study = Study(self.grid, for_arm(self.cfg, arm), self.arm_dir(arm), arm=arm,
                                      site_run_dir=self.run_dir)
                        nodes = study._timed("wait", study.wait_for_nodes)
                        study._timed("describe", study.describe, nodes)
                        first = study
                        why = self.policy_refusal(arm, plan, getattr(study, "site_policies", {}))
                        if why:
                            self._refuse(arm, plan, why)
                            continue
                        study._adopted = True
                        say(f"arm {arm.name}: {plan['parameters']:,} trainable parameters, "
                             f"{plan['round_bytes_per_site']:,} bytes per site per round")
                        study.execute()
                    else:
                        study = self.run_arm(arm, first, plan)
                except Exception as exc:  # noqa: BLE001 - one arm failing leaves the others' results
                    self.errors.append(f"arm {arm.name} failed: {type(exc).__name__}: {exc}")
                    say(f"arm {arm.name} failed: {exc}")
                    self.costs.append(self._cost_row(arm, plan, None, "failed", str(exc)))
                    if first is None:
                        raise
                    continue
                finally:
                    self.timings[f"arm {arm.name}"] = round(time.time() - t, 2)
                self.studies[arm.name] = study
                self.rows.extend({**r, "arm": arm.name, "task": "readmission"} for r in study.rows)
                self.costs.append(self._cost_row(arm, plan, study, "completed", ""))
                t = time.time()
                self.public_check(arm, plan, study)
                self.timings[f"public {arm.name}"] = round(time.time() - t, 2)
            done = [a for a in self.arms if a.name in self.studies]
            if len(done) < 2:
                raise StudyError(f"only {len(done)} arm(s) completed; a comparison needs two or more")
            t = time.time()
            self.compare(first, done)
            self.timings["compare"] = round(time.time() - t, 2)
            self.run["status"] = "completed"
        except Exception as exc:
            self.run["status"] = "failed"
            self.errors.append(f"{type(exc).__name__}: {exc}")
            log.error("comparison failed: %s\n%s", exc, traceback.format_exc())
            raise
        finally:
            self.timings["total"] = round(time.time() - self.t0, 2)
            self.run["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.write()
            if self.cfg.get("report", True):
                try:
                    from clinfed.server.reports import build_report

                    say(f"report: {build_report(self.run_dir)}")
                except Exception as exc:  # the numbers are on disk even if a figure fails
                    log.error("comparison report failed: %s\n%s", exc, traceback.format_exc())
        say(f"comparison of {len(self.studies)} arms completed in {self.timings['total']:.0f}s: {self.run_dir}")
        return self.run_dir

    def _refuse(self, arm: Arm, plan: dict, why: str):
        self.errors.append(why)
        self.run.setdefault("refused", {})[arm.name] = why
        self.costs.append(self._cost_row(arm, plan, None, "refused", why))
        say(why)

    # ------------------------------------------------------------------- costs
    def _cost_row(self, arm: Arm, plan: dict, study: Study | None, status: str, note: str) -> dict:
        row = {c: None for c in COST_COLUMNS}
        row.update({"arm": arm.name, "model": arm.model, "method": arm.method, "form": arm.form, "status": status,
                    "trainable_parameters": plan["parameters"], "bytes_per_round_per_site_planned":
                        plan["round_bytes_per_site"], "note": note})
        if study is None:
            return row
        ad = study.run.get("adapter", {})
        row["trainable_parameters"] = ad.get("parameters", plan["parameters"])
        row["total_parameters"] = ad.get("total_parameters")
        if row["total_parameters"]:
            row["trainable_share"] = row["trainable_parameters"] / row["total_parameters"]
        rounds = [r for r in study.rounds if r["phase"] == "global"]
        per_site_round = [b["sent"] + b["received"] for r in rounds for b in r.get("site_bytes", {}).values()
                          if b["received"]]
        row["rounds"] = len(rounds)
        row["bytes_per_round_per_site"] = float(np.mean(per_site_round)) if per_site_round else None
        row["bytes_total"] = int(sum(r["bytes_sent"] + r["bytes_received"] for r in study.rounds))
        fed: dict[str, float] = {}
        rss: dict[str, float] = {}
        for r in study.rounds:
            for site, c in r.get("site_costs", {}).items():
                fed[site] = fed.get(site, 0.0) + c.get("train_seconds", 0.0)
                rss[site] = max(rss.get(site, 0.0), c.get("peak_rss_mb", 0.0))
        held: dict[str, float] = {}
        for site, m in study.run.get("site_held", {}).items():
            held[site] = sum(v for k, v in m.items() if k.endswith("-train-seconds"))
            rss[site] = max([rss.get(site, 0.0)] + [v for k, v in m.items() if k.endswith("-train-peak-rss")])
        sites = sorted(set(fed) | set(held))
        if sites:
            total = [fed.get(s, 0.0) + held.get(s, 0.0) for s in sites]
            row["train_seconds_per_site"] = float(np.mean(total))
            row["train_seconds_per_site_max"] = float(np.max(total))
            row["federated_train_seconds_per_site"] = float(np.mean([fed.get(s, 0.0) for s in sites]))
            row["site_held_train_seconds_per_site"] = float(np.mean([held.get(s, 0.0) for s in sites]))
        if rss:
            row["peak_rss_mb_per_site"] = float(np.mean(list(rss.values())))
            row["peak_rss_mb_max"] = float(np.max(list(rss.values())))
        row["wall_seconds"] = study.timings.get("total")
        row["evaluate_seconds"] = study.timings.get("evaluate")
        self.run.setdefault("site_costs", {})[arm.name] = {
            s: {"train_seconds": fed.get(s, 0.0) + held.get(s, 0.0), "peak_rss_mb": rss.get(s)} for s in sites}
        return row

    # ------------------------------------------------------------ unseen tasks
    def public_check(self, arm: Arm, plan: dict, study: Study):
        """Score the arm on public PubMedQA and MeQSum test items at the server (public text:
        no site's data). Decoder arms: the base and the arm's final global model, as a causal LM
        (a classifier arm's LoRA lives in the same backbone modules, so it transfers; its
        classification head does not take part). Encoder arms: not applicable, recorded so."""
        if not plan["decoder"]:
            for task in PUBLIC_TASKS:
                for regime in ("base", "global"):
                    self.rows.append({"site": "public", "regime": regime, "split": "test", "subgroup": "all",
                                      "metric": "score", "value": None, "n": None, "status": "not_applicable",
                                      "note": NOT_APPLICABLE_ENCODER, "arm": arm.name, "task": task})
            return
        if not self.cfg.get("public-eval", True):
            return
        from clinfed.common.model_cache import get_decoder
        from clinfed.common.adapters import state_hash

        acfg = for_arm(self.cfg, arm)
        dec = get_decoder(acfg.override({"decoder": arm.model}))
        final = {k: v.numpy() for k, v in study.final_global.items()}
        cells: dict[str, tuple[dict | None, str]] = {"base": (dec.init_state, "")}
        if arm.method == "lora":
            missing = sorted(set(dec.init_state) - set(final))
            if missing:
                cells["global"] = (None, f"not computed: the arm's adapter lacks {len(missing)} LoRA key(s) of the "
                                         f"causal model (e.g. {missing[0]})")
            else:
                cells["global"] = ({k: final[k] for k in dec.init_state},
                                   "" if arm.form == "prompt" else
                                   "the classifier arm's LoRA on the causal LM (its classification head unused)")
        elif arm.method == "head-only":
            cells["global"] = (dec.init_state, "head-only: the backbone is untouched, so the causal LM is the base")
        else:
            cells["global"] = (None, "not computed: moving a fully fine-tuned classifier's backbone into the "
                                     "causal LM is not implemented")
        from clinfed.common.instruct import generate
        from clinfed.common.public_data import load_public
        from clinfed.common.tasks import TASKS

        n = self.cfg.gen_eval_items
        for regime, (state, note) in cells.items():
            if state is None:
                for task in PUBLIC_TASKS:
                    self.rows.append({"site": "public", "regime": regime, "split": "test", "subgroup": "all",
                                      "metric": "score", "value": None, "n": None, "status": "not_computable",
                                      "note": note, "arm": arm.name, "task": task})
                continue
            key = f"{dec.identity}|{state_hash(state)}"
            if key not in self._public_cache:
                scores = {}
                for task in PUBLIC_TASKS:
                    recs = load_public(task, "test", limit=n)
                    prompts = [TASKS[task].prompt(r, max_words=self.cfg.gen_max_words * 2) for r in recs]
                    gens = generate(dec.use(state), dec.tokenizer, prompts,
                                    max_new_tokens=self.cfg.gen_max_new_tokens)
                    scores[task] = (len(recs), {m: float(v) for m, v in TASKS[task].score(recs, gens).items()
                                                if v is not None and np.isfinite(v) and m != "n"})
                self._public_cache[key] = scores
            for task, (n_items, scores) in self._public_cache[key].items():
                for metric, value in scores.items():
                    self.rows.append({"site": "public", "regime": regime, "split": "test", "subgroup": "all",
                                      "metric": metric, "value": value, "n": n_items, "status": "ok",
                                      "note": "; ".join(x for x in ("public data, scored at the server", note) if x),
                                      "arm": arm.name, "task": task})
        say(f"arm {arm.name}: public PubMedQA and MeQSum scored on {n} items each")

    # ---------------------------------------------------------- paired differences
    def compare(self, first: Study, done: list[Arm]):
        """Ask every site for the paired differences between the completed arms."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from clinfed.common.arm_differences import cmp_rows

        names = [a.name for a in done]
        config = {protocol.RUN_DIR: str(self.run_dir.resolve()), protocol.COMPARE_ARMS: ",".join(names)}
        msgs = [Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=node,
                        message_type=protocol.COMPARE) for node in first.sites]
        replies = list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout))
        ok = first._collect(list(first.sites), replies, "compare")
        self.errors.extend(e for e in first.errors if e.startswith("compare:"))
        for site, rep in ok.items():
            self.diff_rows.extend(cmp_rows(site, dict(rep.content[protocol.METRICS]), names))
        say(f"paired differences from {len(ok)} sites")
        if not ok:
            raise StudyError("no site returned the paired differences between arms")

    # ------------------------------------------------------------------ output
    def write(self):
        df = pd.DataFrame(self.rows, columns=COMPARE_COLUMNS)
        df.to_csv(self.run_dir / "metrics.csv", index=False)
        diffs = pd.DataFrame(self.diff_rows, columns=DIFF_COLUMNS)
        if len(diffs):
            diffs = pd.concat([diffs, _overall(diffs)], ignore_index=True)
        diffs.to_csv(self.run_dir / "comparison.csv", index=False)
        pd.DataFrame(self.costs, columns=COST_COLUMNS).to_csv(self.run_dir / "costs.csv", index=False)
        first = next(iter(self.studies.values()), None)
        if first is not None:
            sites = pd.DataFrame([{"site": s, **{f"n_{k}": v for k, v in c.items()}}
                                  for s, c in sorted(first.site_counts.items())],
                                 columns=["site", "n_train", "n_val", "n_test", "n_temporal"])
            sites.to_csv(self.run_dir / "sites.csv", index=False)
        self.run.update({"errors": self.errors, "timings": self.timings,
                         "arms_completed": list(self.studies)})
        write_json(self.run_dir / "run.json", self.run)
