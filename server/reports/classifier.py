"""HTML report of a clinfed study, rebuilt from the files in RUN_DIR alone.

Inputs: ``metrics.csv`` (tidy per-site metrics, with suppression status),
``sites.csv`` (per-site sample sizes), ``run.json`` (config, rounds,
timings, errors, clusters) and, through ``server.analysis.analyze`` (called
here, so one command rebuilds everything), ``descriptors.csv`` and
``driver_importances.csv``. Nothing is rerun, so the report can be rebuilt
and tested on fixture files. Output: ``report.html`` (self-contained, figures
embedded as base64 PNG, no JS), ``figures/*.png``, ``tables/*.csv``, and the
analysis' ``drivers.csv`` and ``site_analysis.csv``.

Privacy rule enforced here, not trusted upstream: a cell whose status is
``suppressed`` never shows a value or an n, even if the file carries one.
"""

from __future__ import annotations

import html
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless servers and CI: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402

from clinfed.server.reports.toolkit import (  # noqa: E402
    CSS, f3, html_table, human_bytes, human_seconds, img, kv_table, simple_table,
)
from clinfed.server.analysis import (  # noqa: E402
    ALPHA, GROUPINGS, KNOWN_REGIMES, KNOWN_SPLITS, analyze, gain_regimes, ordered, read_metrics,
    read_run, read_sites, split_subgroup, subgroup_sort_key,
)
from clinfed.server.reports.tested import (  # noqa: E402
    calibration_section, calibration_sentences, comparison_sentence, differences_section, flip_sentences,
    gap_sentence, gaps_section, replicate_sentences, site_tested_text, size_sentence, size_sentences,
)

DEFAULT_MIN_CELL = 10
# the personalization methods of the `methods` study: described only in a report whose run scored them
METHOD_REGIMES = ("fedrep", "ditto", "ifca", "interpolated")

REGIME_TEXT = {
    "base": "the pretrained model with a freshly initialised prediction head (no federated training): the floor",
    "global": "one adapter aggregated over all hospitals (federated averaging), the same model everywhere",
    "local": "an adapter trained only on that hospital's own data",
    "personalized": "the global adapter further fine-tuned on that hospital's own data",
    "cluster": "an adapter aggregated only within the hospital's cluster of similar sites",
    "augmented": "local training augmented with similar instances or knowledge from other sites",
    "similarity-weighted": "an adapter aggregated with weights favouring similar sites",
    "fedrep": "a backbone (LoRA weights) federated in rounds of its own under each hospital's own prediction head, "
              "trained there every round (FedRep/FedPer: the head never leaves the site)",
    "ditto": "a personal adapter trained at the hospital alongside the global rounds with a proximal pull toward "
             "each round's global adapter (Ditto, strength ditto-lambda)",
    "ifca": "one of k federated adapters: each round every hospital trains the one with the lowest loss on its own "
            "validation patients (IFCA); the hospital is scored with the one it chose last",
    "interpolated": "a mix a x global + (1 - a) x local adapter, the weight a chosen on the hospital's own "
                    "validation patients from 0, 0.25, 0.5, 0.75, 1",
}
SPLIT_TEXT = {
    "test": "random test split",
    "temporal": "temporal test split (most recent encounters)",
}
SPLIT_SHORT = {"test": "random test split", "temporal": "temporal split"}
REGIME_COLORS = {
    "base": "#9e9e9e",
    "global": "#1f77b4",
    "local": "#ff7f0e",
    "personalized": "#2ca02c",
    "cluster": "#9467bd",
    "similarity-weighted": "#8c564b",
    "augmented": "#d62728",
    "fedrep": "#17becf",
    "ditto": "#bcbd22",
    "ifca": "#393b79",
    "interpolated": "#e7969c",
}
EXTRA_COLORS = ["#e377c2", "#bcbd22", "#17becf", "#7f7f7f"]

def _read_sites(run_dir: Path, metrics: pd.DataFrame) -> pd.DataFrame:
    return read_sites(run_dir, metrics)


def _as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _errors(run: dict) -> list[str]:
    errs = run.get("errors") or []
    if isinstance(errs, str):
        errs = [errs]
    return [str(e) for e in errs]


_ordered = ordered


# --------------------------------------------------------------------------- cells


class Cells:
    """Lookup of (site, regime, split, metric) for subgroup `all`, status-aware."""

    def __init__(self, metrics: pd.DataFrame, subgroup: str = "all"):
        sub = metrics[metrics["subgroup"] == subgroup]
        self._d: dict[tuple, dict] = {}
        for row in sub.itertuples(index=False):
            self._d[(row.site, row.regime, row.split, row.metric)] = {
                "status": row.status,
                "value": row.value,
                "n": row.n,
                "note": row.note,
            }

    def get(self, site, regime, split, metric) -> dict | None:
        return self._d.get((site, regime, split, metric))

    def value(self, site, regime, split, metric) -> float:
        """Usable number or NaN (suppressed, not computable, missing)."""
        c = self.get(site, regime, split, metric)
        if c is None or c["status"] != "ok":
            return math.nan
        v = c["value"]
        return float(v) if v is not None and np.isfinite(v) else math.nan

    def state(self, site, regime, split, metric="auc") -> str:
        """'ok' | 'suppressed' | 'not_computable' | 'missing' | 'empty'."""
        c = self.get(site, regime, split, metric)
        if c is None:
            return "missing"
        if c["status"] in ("suppressed", "not_computable"):
            return c["status"]
        if c["status"] == "ok" and np.isfinite(c["value"]):
            return "ok"
        return "empty"

    def has_cell(self, site, regime, split) -> bool:
        return any(k[:3] == (site, regime, split) for k in self._d)


class Notes:
    """Numbered footnotes for not-computable reasons, shared across tables."""

    def __init__(self):
        self.items: list[str] = []

    def ref(self, note: str) -> int:
        note = note or "reason not given"
        if note not in self.items:
            self.items.append(note)
        return self.items.index(note) + 1


def _fmt_cell(cells: Cells, notes: Notes, site, regime, split, metric, with_ci=False) -> tuple[str, str]:
    """Return (plain text for CSV, HTML) for one table cell."""
    c = cells.get(site, regime, split, metric)
    if c is None:
        return "", '<span class="na">—</span>'
    if c["status"] == "suppressed":
        return "suppressed", '<span class="supp">suppressed</span>'
    if c["status"] == "not_computable":
        k = notes.ref(c["note"])
        note = html.escape(c["note"] or "reason not given", quote=True)
        return f"n/c ({c['note'] or 'reason not given'})", f'<span class="nc" title="{note}">n/c<sup>{k}</sup></span>'
    v = cells.value(site, regime, split, metric)
    if not np.isfinite(v):
        return "", '<span class="na">—</span>'
    text = f3(v)
    if with_ci:
        lo = cells.value(site, regime, split, "auc_lo")
        hi = cells.value(site, regime, split, "auc_hi")
        if np.isfinite(lo) and np.isfinite(hi):
            text += f" [{f3(lo)}, {f3(hi)}]"
    return text, html.escape(text)


def _cell_count(cells: Cells, regimes, site, split) -> tuple[tuple[str, str], tuple[str, str]]:
    """n and positives of a site × split evaluation cell, from any regime that released them."""
    n_val, pos_val, supp, nc_note = math.nan, math.nan, False, None
    for r in regimes:
        for metric in ("auc", "positives", "pr_auc", "f1", "brier"):
            c = cells.get(site, r, split, metric)
            if c is None:
                continue
            if c["status"] == "suppressed":
                supp = True
            elif c["status"] == "not_computable" and nc_note is None:
                nc_note = c["note"]
            if c["status"] != "suppressed" and not np.isfinite(n_val) and np.isfinite(c["n"]):
                n_val = c["n"]
        if not np.isfinite(pos_val):
            pos_val = cells.value(site, r, split, "positives")

    def fmt(v):
        if np.isfinite(v):
            s = str(int(round(v)))
            return s, s
        if supp:
            return "suppressed", '<span class="supp">suppressed</span>'
        return "", '<span class="na">—</span>'

    return fmt(n_val), fmt(pos_val)


# --------------------------------------------------------------------------- stats


def _spearman(x, y) -> float:
    """Spearman rho via Pearson on average ranks (no scipy needed); NaN if undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return math.nan
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    if np.std(rx) == 0 or np.std(ry) == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


_gain_regimes = gain_regimes


# --------------------------------------------------------------------------- figures


def _colors(regimes: list[str]) -> dict[str, str]:
    out, i = {}, 0
    for r in regimes:
        if r in REGIME_COLORS:
            out[r] = REGIME_COLORS[r]
        else:
            out[r] = EXTRA_COLORS[i % len(EXTRA_COLORS)]
            i += 1
    return out


def _fig_auc_by_regime(cells: Cells, sites: list[str], regimes, splits, path: Path) -> None:
    colors = _colors(regimes)
    panels = splits or ["test"]
    width_in = max(8.5, 0.35 * max(1, len(sites)) * max(1, len(regimes)) + 3.5)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.6 * len(panels)), squeeze=False)
    bar_w = 0.8 / max(1, len(regimes))
    for ax, split in zip(axes[:, 0], panels):
        x = np.arange(len(sites))
        states = [[cells.state(s, r, split, "auc") for r in regimes] for s in sites]
        all_supp = [bool(st) and all(v == "suppressed" for v in st) for st in states]
        for j, r in enumerate(regimes):
            pos = x - 0.4 + bar_w * (j + 0.5)
            for i, s in enumerate(sites):
                st = cells.state(s, r, split, "auc")
                if st == "ok":
                    v = cells.value(s, r, split, "auc")
                    lo = cells.value(s, r, split, "auc_lo")
                    hi = cells.value(s, r, split, "auc_hi")
                    ax.bar(pos[i], v, bar_w, color=colors[r], edgecolor="white", linewidth=0.5)
                    if np.isfinite(lo) and np.isfinite(hi):
                        ax.errorbar(pos[i], v, yerr=[[max(v - lo, 0)], [max(hi - v, 0)]],
                                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
                elif st in ("suppressed", "not_computable") and not all_supp[i]:
                    ax.text(pos[i], 0.03, "supp." if st == "suppressed" else "n/c", rotation=90,
                            ha="center", va="bottom", fontsize=7, color="#8a6d00" if st == "suppressed" else "#b00")
        for i, s in enumerate(sites):
            if all_supp[i]:
                ax.text(x[i], 0.25, "all cells\nsuppressed", ha="center", va="center", fontsize=8, color="#8a6d00")
        for j, r in enumerate(regimes):
            ax.bar([np.nan], [np.nan], color=colors[r], label=r)  # legend entry even if all bars omitted
        ax.axhline(0.5, ls="--", color="#555", lw=1, label="chance (0.5)")
        ax.set_xticks(x)
        ax.set_xticklabels(sites, rotation=45 if len(sites) > 8 else 0, ha="right" if len(sites) > 8 else "center")
        ax.set_ylim(0, 1.05)
        ax.set_xlim(-0.6, max(len(sites), 1) - 0.4)
        ax.set_ylabel("ROC AUC")
        ax.set_title(f"AUC by regime at each site — {SPLIT_SHORT.get(split, split)}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("site (largest training set first); supp. = suppressed, n/c = not computable")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_gain_vs_size(gains: pd.DataFrame, regimes, splits, path: Path) -> None:
    colors = _colors(regimes)
    panels = splits or ["test"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, split in zip(axes[0, :], panels):
        g = gains[(gains["split"] == split) & gains["n_train"].notna() & (gains["n_train"] > 0)]
        for r in _gain_regimes(regimes):
            gr = g[g["regime"] == r]
            if gr.empty:
                continue
            ax.scatter(gr["n_train"], gr["gain"], color=colors[r], label=r, zorder=3)
            for row in gr.itertuples(index=False):
                ax.annotate(row.site, (row.n_train, row.gain), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
        ax.axhline(0, color="#555", lw=1)
        if not g.empty:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
        else:
            ax.text(0.5, 0.5, "no comparable sites", transform=ax.transAxes, ha="center", color="#777")
        ax.set_xlabel("training patients at the site (n_train, log scale)")
        ax.set_ylabel("AUC(regime) − AUC(global)")
        ax.set_title(f"Gain over global vs site size — {SPLIT_SHORT.get(split, split)}", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- tables & findings


def _gains(cells: Cells, sites_df: pd.DataFrame, regimes, splits) -> pd.DataFrame:
    rows = []
    n_train = dict(zip(sites_df["site"], sites_df["n_train"]))
    for split in splits:
        for s in sites_df["site"]:
            g = cells.value(s, "global", split, "auc")
            for r in _gain_regimes(regimes):
                v = cells.value(s, r, split, "auc")
                if np.isfinite(g) and np.isfinite(v):
                    rows.append({"site": s, "split": split, "regime": r, "auc": v, "auc_global": g,
                                 "gain": v - g, "n_train": n_train.get(s, math.nan)})
    return pd.DataFrame(rows, columns=["site", "split", "regime", "auc", "auc_global", "gain", "n_train"])


def _overview(cells: Cells, notes: Notes, sites_df, regimes, splits) -> tuple[pd.DataFrame, str]:
    cols = ["site", "split", "n_train", "n evaluated", "positives"]
    metric_defs = [("auc", "AUC [95% CI]", True), ("pr_auc", "PR AUC", False), ("f1", "F1", False), ("brier", "Brier", False)]
    for r in regimes:
        cols += [f"{r} {label}" for _, label, _ in metric_defs]
    csv_rows, html_rows = [], []
    for s, ntr in zip(sites_df["site"], sites_df["n_train"]):
        for split in splits:
            if not any(cells.has_cell(s, r, split) for r in regimes):
                continue
            (n_t, n_h), (p_t, p_h) = _cell_count(cells, regimes, s, split)
            ntr_t = str(int(ntr)) if np.isfinite(ntr) else ""
            crow = [s, split, ntr_t, n_t, p_t]
            hrow = [html.escape(s), html.escape(split), ntr_t or '<span class="na">—</span>', n_h, p_h]
            for r in regimes:
                for m, _, ci in metric_defs:
                    t, h = _fmt_cell(cells, notes, s, r, split, m, with_ci=ci)
                    crow.append(t)
                    hrow.append(h)
            csv_rows.append(crow)
            html_rows.append(hrow)
    df = pd.DataFrame(csv_rows, columns=cols)
    h1 = ('<tr><th class="l" rowspan="2">Site</th><th class="l" rowspan="2">Split</th>'
          '<th rowspan="2">n_train</th><th rowspan="2">n evaluated</th><th rowspan="2">positives</th>'
          + "".join(f'<th colspan="4">{html.escape(r)}</th>' for r in regimes) + "</tr>")
    h2 = "<tr>" + "".join(f"<th>{label}</th>" for _ in regimes for _, label, _ in metric_defs) + "</tr>"
    return df, html_table([h1, h2], html_rows, left_cols=2)


def _training(run: dict) -> pd.DataFrame:
    rows = []
    for i, rd in enumerate(run.get("rounds") or []):
        rd = _as_dict(rd)
        answered = rd.get("sites") or []
        failures = _as_dict(rd.get("failures"))
        losses = [float(v) for v in _as_dict(rd.get("train_loss")).values()
                  if isinstance(v, (int, float)) and np.isfinite(v)]
        rows.append({
            "round": rd.get("round", i + 1),
            "sites answered": f"{len(answered)}: {', '.join(map(str, answered))}" if answered else "0",
            "failures": "; ".join(f"{k}: {v}" for k, v in {**failures, **_as_dict(rd.get("declined"))}.items())
            or "none",
            "bytes sent": human_bytes(rd.get("bytes_sent")),
            "bytes received": human_bytes(rd.get("bytes_received")),
            "mean train loss": f"{np.mean(losses):.3f}" if losses else "",
            "DP-SGD ε this round / total": "; ".join(
                f"{site} {float(_as_dict(e).get('epsilon', np.nan)):.3g} / {float(_as_dict(e).get('epsilon_total', np.nan)):.3g}"
                for site, e in _as_dict(rd.get("dp")).items()),
        })
    cols = ["round", "sites answered", "failures", "bytes sent", "bytes received", "mean train loss"]
    if any(r["DP-SGD ε this round / total"] for r in rows):
        cols.append("DP-SGD ε this round / total")
    return pd.DataFrame(rows, columns=cols)


# What each regime needs beyond its own training: the federated adapter it starts from or
# mixes (and so that adapter's rounds and traffic) and the site-held training it reuses.
_BUILDS_ON = {"personalized": ("global",), "similarity-weighted": ("global",),
              "ditto": ("global",), "interpolated": ("global", "local")}
_FEDERATED = ("global", "cluster", "ifca", "fedrep")  # regimes trained in rounds of their own (run.json phase)


def regime_costs(run: dict, regimes: list[str], mean_auc: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each regime's measured cost in this run, next to its accuracy: the federated rounds it
    rode on, the adapter bytes each site sent and received per round and over the study, and
    each site's training seconds, its own and with what it builds on (mean over the sites
    that reported them; evaluation is not counted). From run.json's rounds (site_bytes,
    site_costs; Ditto's personal training rides on the global rounds) and site_held."""
    rounds = [_as_dict(r) for r in run.get("rounds") or []]
    held = {str(s): _as_dict(v) for s, v in _as_dict(run.get("site_held")).items()}
    own: dict[str, dict[str, float]] = {}      # regime -> site -> own training seconds
    traffic: dict[str, dict[str, float]] = {}  # federated regime -> site -> bytes over the study
    n_rounds: dict[str, int] = {}
    for rd in rounds:
        phase = str(rd.get("phase", "global"))
        n_rounds[phase] = n_rounds.get(phase, 0) + 1
        for site, b in _as_dict(rd.get("site_bytes")).items():
            b = _as_dict(b)
            traffic.setdefault(phase, {})[site] = (traffic.get(phase, {}).get(site, 0.0)
                                                   + float(b.get("sent", 0)) + float(b.get("received", 0)))
        for site, c in _as_dict(rd.get("site_costs")).items():
            c = _as_dict(c)
            for regime, key in ((phase, "train_seconds"), ("ditto", "ditto_train_seconds")):
                if key in c and (regime != "ditto" or phase == "global"):
                    own.setdefault(regime, {})[site] = own.get(regime, {}).get(site, 0.0) + float(c[key])
    for site, figures in held.items():
        for key, v in figures.items():
            if key.endswith("-train-seconds"):
                own.setdefault(key[: -len("-train-seconds")], {})[site] = float(v)

    def mean(d: dict) -> float:
        return float(np.mean(list(d.values()))) if d else float("nan")

    auc = {}
    if mean_auc is not None and len(mean_auc):
        for r in mean_auc.to_dict("records"):
            auc.setdefault(r["regime"], {})[r["split"]] = r["mean AUC"]
    rows = []
    for regime in regimes:
        if regime == "base":
            continue
        deps = _BUILDS_ON.get(regime, ())
        fed = [x for x in (regime, *deps) if x in _FEDERATED and x in n_rounds]
        sites = sorted(set().union(*[own.get(x, {}) for x in (regime, *deps)]) or [""])
        total = {s: sum(own.get(x, {}).get(s, 0.0) for x in (regime, *deps)) for s in sites if s}
        per_round = [traffic[x][s] / n_rounds[x] for x in fed for s in traffic.get(x, {})]
        study_bytes = {s: sum(traffic.get(x, {}).get(s, 0.0) for x in fed) for s in sites if s}
        rows.append({
            "regime": regime,
            **{f"mean AUC ({split})": v for split, v in auc.get(regime, {}).items()},
            "federated rounds": sum(n_rounds[x] for x in fed),
            "bytes per site per round (sent + received)": human_bytes(np.mean(per_round)) if per_round else "none",
            "bytes per site, whole study": human_bytes(mean(study_bytes)) if fed else "none",
            "own training s per site": f"{mean(own.get(regime, {})):.1f}" if own.get(regime) else
            ("0 (a mix, no training)" if regime == "interpolated" else ""),
            "training s per site, with what it builds on": f"{mean(total):.1f}" if total else "",
            "builds on": ", ".join(deps),
        })
    return pd.DataFrame(rows)


def _fmt_auc_ci(cells: Cells, s, r, split) -> str:
    v = cells.value(s, r, split, "auc")
    lo, hi = cells.value(s, r, split, "auc_lo"), cells.value(s, r, split, "auc_hi")
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{f3(v)} [{f3(lo)}, {f3(hi)}]"
    return f3(v)


def _findings(cells: Cells, sites_df, regimes, splits, gains: pd.DataFrame, run: dict, k: int,
              metrics: pd.DataFrame, tests: dict | None = None) -> tuple[list[tuple[str, list[str]]], pd.DataFrame]:
    """Plain-language findings grouped as (heading, HTML bullets); every claim is computed from the numbers.

    A regime is called better or worse than another only from differences.csv's Holm-adjusted
    tests (``tests``, from ``analysis.tested_summary``); without that file (a run folder from
    before the tests) the comparisons are stated as untested point estimates.
    """
    tests = tests or {"available": {}, "comparisons": [], "size": []}
    tested = bool(tests["available"].get("differences"))
    esc = html.escape
    sites = list(sites_df["site"])
    n_train = dict(zip(sites_df["site"], sites_df["n_train"]))
    sections: list[tuple[str, list[str]]] = []
    general: list[str] = []
    status = str(run.get("status", "unknown"))
    if status != "completed":
        sections.append(("Run status", [f"The run's status is <strong>{esc(status)}</strong>: the results below "
                                        "cover only what was evaluated before it stopped and may be incomplete."]))
    mean_rows = []
    for split in splits:
        out: list[str] = []
        parts = []
        for r in regimes:
            vals = [v for v in (cells.value(s, r, split, "auc") for s in sites) if np.isfinite(v)]
            if vals:
                parts.append(f"{esc(r)} <strong>{np.mean(vals):.3f}</strong> ({len(vals)} site{'s' if len(vals) != 1 else ''})")
                mean_rows.append({"split": split, "regime": r, "mean AUC": f"{np.mean(vals):.3f}",
                                  "sites with AUC": len(vals)})
        if parts:
            out.append("Mean AUC across sites (unweighted, sites with a computable AUC): " + "; ".join(parts) + ".")
        g = {s: cells.value(s, "global", split, "auc") for s in sites}
        g = {s: v for s, v in g.items() if np.isfinite(v)}
        if g:
            worst = min(g, key=g.get)
            size = f", n_train {int(n_train[worst])}" if np.isfinite(n_train.get(worst, math.nan)) else ""
            msg = (f"The global model serves <strong>{esc(worst)}</strong> worst: "
                   f"AUC {_fmt_auc_ci(cells, worst, 'global', split)}{size}.")
            chance = [s for s in g if cells.value(s, "global", split, "auc_lo") <= 0.5]
            if chance:
                msg += (f" At {esc(', '.join(chance))} its 95 % CI includes 0.5: "
                        "not distinguishable from chance there.")
            out.append(msg)
        rhos, too_few = [], []
        comps = [c for c in tests["comparisons"] if c["split"] == split]
        if tested:
            out.append(f"Paired differences, tested (Holm-adjusted p_adj &lt; {ALPHA} is called better or worse; "
                       "otherwise no detectable difference, with its 95 % interval):")
            out += [comparison_sentence(c) for c in comps]
            if not comps:
                out.append("differences.csv has no comparison on this split.")
        for r in _gain_regimes(regimes):
            gr = gains[(gains["split"] == split) & (gains["regime"] == r)]
            if gr.empty:
                continue
            if not tested:
                higher = gr[gr["gain"] > 0]
                msg = (f"{esc(r.capitalize())} has the higher point AUC than global at <strong>{len(higher)} of "
                       f"{len(gr)}</strong> sites (mean AUC difference {gr['gain'].mean():+.3f}, range "
                       f"{gr['gain'].min():+.3f} to {gr['gain'].max():+.3f}")
                if not higher.empty:
                    best = higher.loc[higher["gain"].idxmax()]
                    msg += f"; largest at {esc(best['site'])}, {best['gain']:+.3f}"
                out.append(msg + "; untested point estimates).")
            gs = gr[gr["n_train"].notna()]
            rho = _spearman(gs["n_train"], gs["gain"])
            if len(gs) < 3:
                too_few.append((r, len(gs)))
            else:
                rhos.append((r, rho, len(gs)))
        size = [v for v in tests["size"] if v["split"] == split]
        if size:
            out.append("Difference vs site size (meta-regression on log2 training notes, Holm-adjusted): "
                       + size_sentences(size) + ".")
        elif tests["available"].get("size_effects"):
            out.append("size_effects.csv has no meta-regression for this split: no tested size dependence.")
        if tests["available"].get("size_effects"):
            rhos, too_few = [], []  # a size claim comes from the tested slope only
        if rhos:
            items = []
            for r, rho, n in rhos:
                if np.isfinite(rho):
                    trend = ("larger at smaller sites" if rho < 0 else "larger at larger sites" if rho > 0
                             else "unrelated to size")
                    items.append(f"{esc(r)} − global: Spearman ρ = <strong>{rho:+.2f}</strong> over n = {n} sites "
                                 f"(gain {trend})")
                else:
                    items.append(f"{esc(r)} − global: Spearman ρ undefined over n = {n} sites (ties or constant values)")
            out.append("Gain over global vs training size: " + "; ".join(items)
                       + ". Descriptive only: with this few sites it is not a statistical test.")
        for r, n in too_few:
            out.append(f"Too few sites with a known training size ({n}) to relate the {esc(r)} − global gain "
                       "to site size.")
        if out:
            if not tested and any("higher point AUC" in o for o in out):
                out.append("differences.csv not found (a run from before paired tests): these AUC differences are "
                           "untested point estimates, so no regime is called better or worse than global; each "
                           "site's CI is in the table below.")
            sections.append((SPLIT_TEXT.get(split, split).capitalize(), out))
    sub = metrics[(metrics["subgroup"] == "all") & (metrics["metric"] == "auc")]
    n_supp = int((sub["status"] == "suppressed").sum())
    n_nc = int((sub["status"] == "not_computable").sum())
    if n_supp or n_nc:
        general.append(f"{n_supp} site × regime × split AUC cell{'s are' if n_supp != 1 else ' is'} suppressed "
                       f"(fewer than k = {k} patients, positives or negatives, or protecting such a cell) and {n_nc} {'are' if n_nc != 1 else 'is'} "
                       "not computable; they are excluded from every mean and comparison.")
    all_supp = [s for s in sites if len(sub[sub["site"] == s]) and (sub[sub["site"] == s]["status"] == "suppressed").all()]
    if all_supp:
        general.append(f"All cells are suppressed at {esc(', '.join(all_supp))}: no result can be released for "
                       f"{'this site' if len(all_supp) == 1 else 'these sites'}.")
    missing = []
    for s in sites:
        lacking = [r for r in regimes if not any(cells.has_cell(s, r, sp) for sp in splits)]
        if lacking and len(lacking) < len(regimes):
            missing.append(f"{s} (no {', '.join(lacking)})")
        elif lacking:
            missing.append(f"{s} (no results at all)")
    if missing:
        general.append("Missing results: " + esc("; ".join(missing)) + ".")
    if not sections and not general:
        general.append("No computable results were found in metrics.csv.")
    if general:
        sections.append(("Completeness", general))
    return sections, pd.DataFrame(mean_rows, columns=["split", "regime", "mean AUC", "sites with AUC"])


# --------------------------------------------------------------------------- analysis sections


def _auc_text(v: float) -> str:
    return f3(v) if v is not None and np.isfinite(v) else ""


def _pooled_cell(row) -> tuple[str, str, str]:
    """(CSV AUC text, CSV sites text, HTML) for one pooled subgroup cell; suppressed never shows a number."""
    if row is None:
        return "", "", '<span class="na">—</span>'
    n_sites, n_supp = int(row["n_sites"]), int(row["n_suppressed"])
    if n_sites == 0 or not np.isfinite(row["auc"]):
        if n_supp:
            return "suppressed", "0", '<span class="supp">suppressed</span>'
        return "", "0", '<span class="na">—</span>'
    text = f3(row["auc"])
    extra = f"{n_sites} site{'s' if n_sites != 1 else ''}" + (f", {n_supp} suppressed" if n_supp else "")
    return text, str(n_sites), f'{text} <span class="foot">({extra})</span>'


def _subgroup_section(pooled: pd.DataFrame, by_site: pd.DataFrame, main_regimes, splits,
                      tab_dir: Path, fig_dir: Path) -> str:
    """Pooled AUC per subgroup × regime × split (tables per grouping) and the global-AUC figure."""
    regimes = [r for r in main_regimes if r != "base" and r in set(pooled["regime"])]
    sp_list = [s for s in splits if s in set(pooled["split"])]
    cols = ["grouping", "subgroup"] + [f"{r} {sp} {x}" for r in regimes for sp in sp_list for x in ("AUC", "sites")]
    lookup = {(r.subgroup, r.regime, r.split): r._asdict() for r in pooled.itertuples(index=False)}
    csv_rows, blocks = [], []
    groupings = ordered(pooled["grouping"], GROUPINGS)
    for grouping in groupings:
        subs = sorted(set(pooled.loc[pooled["grouping"] == grouping, "subgroup"]), key=subgroup_sort_key)
        body = []
        for sub in subs:
            crow, hrow = [grouping, sub], [html.escape(split_subgroup(sub)[1] or sub)]
            for r in regimes:
                for sp in sp_list:
                    a, n, h = _pooled_cell(lookup.get((sub, r, sp)))
                    crow += [a, n]
                    hrow.append(h)
            csv_rows.append(crow)
            body.append(hrow)
        h1 = (f'<tr><th class="l" rowspan="2">{html.escape(grouping)}</th>'
              + "".join(f'<th colspan="{len(sp_list)}">{html.escape(r)}</th>' for r in regimes) + "</tr>")
        h2 = "<tr>" + "".join(f"<th>{html.escape(sp)}</th>" for _ in regimes for sp in sp_list) + "</tr>"
        blocks.append(f"<h3>By {html.escape(grouping)}</h3>" + html_table([h1, h2], body))
    pd.DataFrame(csv_rows, columns=cols).to_csv(tab_dir / "subgroups.csv", index=False)
    detail = by_site.copy()
    detail["auc"] = [("suppressed" if st == "suppressed" else _auc_text(v))
                     for v, st in zip(detail["auc"], detail["status"])]
    detail["n"] = [("suppressed" if st == "suppressed" else (str(int(v)) if pd.notna(v) else ""))
                   for v, st in zip(detail["n"], detail["status"])]
    detail.to_csv(tab_dir / "subgroups_by_site.csv", index=False)
    if pooled.empty:
        return ("<h2>AUC by patient subgroup</h2><p>No subgroup results in metrics.csv.</p>")
    f_sub = fig_dir / "subgroups.png"
    _fig_subgroups(pooled, groupings, sp_list, f_sub)
    return ("<h2>AUC by patient subgroup</h2>"
            + img(f_sub, "Global model AUC by patient subgroup")
            + '<p class="caption">Global model, AUC pooled over sites (n-weighted mean of the sites\' released '
            "cells) per subgroup band, random test vs temporal split. supp. = every site's cell was suppressed.</p>"
            + '<p class="caption">Each cell: AUC pooled over sites as the n-weighted mean of the non-suppressed '
            "site cells, with the number of sites contributing (and of sites whose cell was suppressed). "
            "Per-site cells: tables/subgroups_by_site.csv.</p>" + "".join(blocks))


def _fig_subgroups(pooled: pd.DataFrame, groupings, splits, path: Path) -> None:
    g = pooled[pooled["regime"] == "global"]
    n = max(1, len(groupings))
    fig, axes = plt.subplots(1, n, figsize=(max(8.0, 3.0 * n), 3.8), squeeze=False, sharey=True)
    split_colors = {"test": "#1f77b4", "temporal": "#ff7f0e"}
    for ax, grouping in zip(axes[0, :], groupings):
        subs = sorted(set(g.loc[g["grouping"] == grouping, "subgroup"]), key=subgroup_sort_key)
        x = np.arange(len(subs))
        w = 0.8 / max(1, len(splits))
        for j, sp in enumerate(splits):
            for i, sub in enumerate(subs):
                d = g[(g["subgroup"] == sub) & (g["split"] == sp)]
                pos = x[i] - 0.4 + w * (j + 0.5)
                if len(d) and np.isfinite(d["auc"].iloc[0]):
                    ax.bar(pos, d["auc"].iloc[0], w, color=split_colors.get(sp, "#777"))
                elif len(d) and d["n_suppressed"].iloc[0] > 0:
                    ax.text(pos, 0.03, "supp.", rotation=90, ha="center", va="bottom", fontsize=7, color="#8a6d00")
            ax.bar([np.nan], [np.nan], color=split_colors.get(sp, "#777"), label=SPLIT_SHORT.get(sp, sp))
        ax.axhline(0.5, ls="--", color="#555", lw=1)
        ax.set_xticks(x)
        ax.set_xticklabels([split_subgroup(s)[1] or s for s in subs], rotation=45, ha="right", fontsize=8)
        ax.set_title(grouping, fontsize=10)
        ax.set_ylim(0, 1.05)
    axes[0, 0].set_ylabel("global model ROC AUC (pooled)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _origin_key(r: str, site_order: list[str]) -> tuple:
    if "@" not in r:
        fixed = ["global", "cluster", "similarity-weighted"]
        return (0, fixed.index(r) if r in fixed else len(fixed), r)
    model, where = r.split("@", 1)
    return (1, model, site_order.index(where) if where in site_order else len(site_order), where)


def _cross_site(metrics: pd.DataFrame, sites: list[str], splits, fig_dir: Path, tab_dir: Path,
                config: dict) -> str:
    """Adapter origin × evaluation site AUC matrix (one panel per split), CSV + heatmap."""
    cells = Cells(metrics)
    present = set(metrics["regime"])
    origins = [r for r in present if r in ("global", "cluster") or "@" in r]
    origins = sorted(origins, key=lambda r: _origin_key(r, sites))
    sp_list = [s for s in splits if s in ("test", "temporal")] or ["test"]
    rows = []
    for sp in sp_list:
        for o in origins:
            rows.append([sp, o] + [_fmt_cell(cells, Notes(), s, o, sp, "auc")[0] for s in sites])
    pd.DataFrame(rows, columns=["split", "adapter"] + sites).to_csv(tab_dir / "cross_site.csv", index=False)
    shared = any("@" in o for o in origins)
    if shared:
        note = ("Rows: where the adapter comes from (<em>local@hXX</em> = site hXX's local adapter, shared under "
                "the study's policy); columns: the site whose patients it was evaluated on. The cell at its own "
                "site is the local regime there.")
    else:
        flag = str(config.get("share-local-adapters", "")).lower()
        why = ("sharing was enabled but no cross-site results were returned" if flag in ("true", "1", "yes")
               else "local adapters were not shared by policy, so only adapters every site already holds appear")
        note = f"No cross-site evaluations: {html.escape(why)}."
    if not origins:
        return f"<h2>Cross-site matrix</h2><p>{note}</p>"
    f_cs = fig_dir / "cross_site.png"
    _fig_cross_site(cells, origins, sites, sp_list, f_cs)
    return ("<h2>Cross-site matrix</h2>" + img(f_cs, "AUC of each adapter at each site")
            + f'<p class="caption">{note} Hatched: suppressed (fewer than k patients, positives or negatives, or protecting such a cell); blank: not '
            "evaluated or not computable. Table: tables/cross_site.csv.</p>")


def _fig_cross_site(cells: Cells, origins, sites, splits, path: Path) -> None:
    fig, axes = plt.subplots(1, len(splits), figsize=(max(5.0, 0.8 * len(sites) + 2.5) * len(splits),
                                                      max(2.5, 0.45 * len(origins) + 1.5)), squeeze=False)
    vals = [cells.value(s, o, sp, "auc") for sp in splits for o in origins for s in sites]
    vals = [v for v in vals if np.isfinite(v)]
    lo, hi = (min(min(vals), 0.5), max(max(vals), 0.5)) if vals else (0.4, 0.9)
    im = None
    for ax, sp in zip(axes[0, :], splits):
        mat = np.array([[cells.value(s, o, sp, "auc") for s in sites] for o in origins], float)
        im = ax.imshow(np.ma.masked_invalid(mat), cmap="RdYlGn", vmin=lo, vmax=hi, aspect="auto")
        for i, o in enumerate(origins):
            for j, s in enumerate(sites):
                st = cells.state(s, o, sp, "auc")
                if st == "ok":
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
                elif st == "suppressed":
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                               edgecolor="#8a6d00", lw=0))
                    ax.text(j, i, "supp.", ha="center", va="center", fontsize=6, color="#8a6d00")
                elif st == "not_computable":
                    ax.text(j, i, "n/c", ha="center", va="center", fontsize=6, color="#b00")
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels(sites, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(origins)))
        ax.set_yticklabels(origins, fontsize=8)
        ax.set_xlabel("evaluated at site")
        ax.set_title(f"AUC — {SPLIT_SHORT.get(sp, sp)}", fontsize=10)
    axes[0, 0].set_ylabel("adapter (origin)")
    if im is not None:
        fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8, label="ROC AUC")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fig_drivers(patient: pd.DataFrame, per_site: pd.DataFrame, path: Path) -> None:
    d = patient[patient["importance"].notna()].sort_values("importance")
    fig, ax = plt.subplots(figsize=(7.0, max(2.2, 0.45 * len(d) + 1.2)))
    y = np.arange(len(d))
    ax.barh(y, d["importance"], color="#1f77b4", label="n-weighted mean over sites")
    if len(per_site):
        for i, drv in enumerate(d["driver"]):
            ps = per_site[(per_site["driver"] == drv) & per_site["importance"].notna()]
            if len(ps):
                sizes = 12 + 60 * ps["n"].fillna(0) / max(1.0, float(per_site["n"].max()))
                ax.scatter(ps["importance"], np.full(len(ps), i), s=sizes, color="#ff7f0e", zorder=3,
                           label="one site (size ∝ n)" if i == 0 else None)
    ax.axvline(0, color="#555", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels(d["driver"])
    ax.set_xlabel("drop in ROC AUC of the error classifier when the feature is permuted")
    ax.set_title("Patient features driving the global model's errors", fontsize=10)
    if len(d):
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _drivers_section(summary: dict, run_dir: Path, fig_dir: Path, tab_dir: Path) -> str:
    """Patient-level ranking (+figure), site-level Spearman table and the regression table."""
    from clinfed.server.analysis import read_driver_importances

    drivers = summary["tables"]["drivers"]
    reg = summary["tables"]["site_analysis"]
    patient = drivers[drivers["level"] == "patient"]
    site = drivers[drivers["level"] == "site"]
    out = ["<h2>Drivers</h2>"]

    pt = pd.DataFrame({
        "rank": [str(int(v)) if pd.notna(v) else "" for v in patient["rank"]],
        "patient feature": patient["driver"],
        "importance (n-weighted)": [_sig(v) for v in patient["importance"]],
        "unweighted mean": [_sig(v) for v in patient["importance_unweighted"]],
        "instances": [str(int(v)) if pd.notna(v) else "" for v in patient["n"]],
        "sites": patient["n_sites"].astype(str),
    })
    pt.to_csv(tab_dir / "drivers_patient.csv", index=False)
    out.append("<h3>Patient level</h3>")
    if len(patient):
        f_drv = fig_dir / "drivers.png"
        _fig_drivers(patient, read_driver_importances(run_dir), f_drv)
        out.append(simple_table(pt) + img(f_drv, "Patient-level drivers")
                   + '<p class="caption">At each site, a classifier learns to predict where the global model is '
                   "wrong (per instance, on the site's test split); each feature group is permuted and the drop in "
                   "that classifier's ROC AUC is its importance (can be slightly negative: no signal). Only the "
                   "importances leave the site; they are combined here as a mean weighted by the instances each "
                   "site used. Rank 1 = most important.</p>")
    else:
        out.append("<p>No site returned driver importances (driver_importances.csv absent or empty).</p>")

    out.append("<h3>Site level</h3>")
    wanted = [t for t in ("gain:local", "global_gap") if t in set(site["target"])]
    if wanted:
        cols = [(t, sp) for t in wanted for sp in ordered(site.loc[site["target"] == t, "split"], KNOWN_SPLITS)]
        lookup = {(r.target, r.split, r.driver): r for r in site.itertuples(index=False)}
        descs = list(dict.fromkeys(site["driver"]))
        first = cols[0]
        descs.sort(key=lambda d: -abs(lookup[(*first, d)].importance) if (*first, d) in lookup
                   and np.isfinite(lookup[(*first, d)].importance) else 0.0)
        rows = []
        for d in descs:
            row = [d]
            for t, sp in cols:
                r = lookup.get((t, sp, d))
                row.append("" if r is None or not np.isfinite(r.importance)
                           else f"{r.importance:+.2f} (n={int(r.n_sites)})")
            rows.append(row)
        st = pd.DataFrame(rows, columns=["descriptor"] + [f"rho {t} {sp}" for t, sp in cols])
        st.to_csv(tab_dir / "drivers_site.csv", index=False)
        skipped = sorted({r.note for r in site.itertuples(index=False) if r.note})
        out.append(simple_table(st)
                   + '<p class="caption">Spearman ρ across sites between a site descriptor (computed at the '
                   "site; n_train from sites.csv) and: <em>gain:local</em> = AUC(local) − AUC(global) at the site; "
                   "<em>global_gap</em> = AUC(global at the site) − the n-weighted mean of the sites' global AUC "
                   "(a proxy for the pooled AUC, which would need patient-level scores). Sorted by |ρ| in the first "
                   "column; empty = not computed"
                   + (": " + html.escape("; ".join(skipped)) if skipped else "")
                   + ". Descriptive: few sites, no test.</p>")
    else:
        pd.DataFrame(columns=["descriptor"]).to_csv(tab_dir / "drivers_site.csv", index=False)
        out.append("<p>No site-level gains to relate to site descriptors.</p>")

    rt = reg.copy()
    rt["coef"] = [_sig(v) for v in rt["coef"]]
    rt["r2"] = [f"{v:.2f}" if pd.notna(v) else "" for v in rt["r2"]]
    rt.to_csv(tab_dir / "site_regression.csv", index=False)
    if len(rt):
        # One row per target × split: the long form (one row per term) is in the CSV.
        compact = pd.DataFrame([{
            "target": t, "split": sp, "sites": str(d["n_sites"].iloc[0]), "R²": d["r2"].iloc[0],
            "standardized coefficients": "; ".join(f"{a} {b}" for a, b in zip(d["term"], d["coef"]) if a),
            "note": d["note"].iloc[0]} for (t, sp), d in rt.groupby(["target", "split"], sort=False)])
        out.append("<h4>Regression of the gain on site descriptors</h4>"
                   + f'<div class="wrapnote">{simple_table(compact, left_cols=2)}</div>'
                   + '<p class="caption">Ordinary least squares per target and split: intercept + standardized '
                   "(z) log10 n_train and the two descriptors with the largest |ρ| for that target (skipping "
                   "near-copies, |r| > 0.95, of a term already chosen), fewer when "
                   "there are too few sites (at least one residual degree of freedom is kept). With this few "
                   "sites R² is near 1 by construction: read the signs, not the fit.</p>")
    return "".join(out)


def _sig(v) -> str:
    return f"{v:.4f}" if v is not None and pd.notna(v) and np.isfinite(v) else ""


def _privacy(run: dict) -> tuple[pd.DataFrame, str]:
    """Each site's effective policy (as the site reported it) and its DP-SGD accounting."""
    pols, dp = _as_dict(run.get("site_policies")), _as_dict(run.get("dp"))
    config = _as_dict(run.get("config"))
    sites = sorted(set(pols) | set(dp))
    yn = lambda v: "yes" if v else "no"  # noqa: E731
    rows = []
    for s in sites:
        p, d = _as_dict(pols.get(s)), _as_dict(dp.get(s))
        eps_budget, delta = p.get("dp_epsilon") or 0, p.get("dp_delta") or 0
        rows.append({
            "site": s,
            "policy file": yn(p.get("site_file")) if p else "?",
            "adapters leave": yn(p.get("allow_adapters", True)) if p else "?",
            "local adapter shared": yn(p.get("share_local_adapters")) if p else "?",
            "k": str(p.get("min_cell_size", "")),
            "DP required": yn(p.get("dp_required")) if p else "?",
            "ε budget": f"{eps_budget:g}" if eps_budget else "none",
            "δ": f"{delta:.3g}" if delta else ("1/n_train" if p else ""),
            "record-moving refused": yn(p.get("refuse_instance_moving")) if p else "?",
            "ε spent (DP-SGD)": f"{float(d['epsilon_total']):.3g}" if "epsilon_total" in d else "",
            "at δ": f"{float(d['delta']):.3g}" if "delta" in d else "",
            "training stopped by the budget": ", ".join(d.get("stopped") or []),
        })
    df = pd.DataFrame(rows, columns=["site", "policy file", "adapters leave", "local adapter shared", "k",
                                     "DP required", "ε budget", "δ", "record-moving refused", "ε spent (DP-SGD)",
                                     "at δ", "training stopped by the budget"])
    if df.empty:
        return df, ""
    notes = []
    if config.get("dp") in (True, "true", "True"):
        notes.append(f"DP-SGD at every site: noise multiplier {config.get('dp-noise-multiplier')}, per-example "
                     f"clipping norm {config.get('dp-max-grad-norm')}, Poisson sampling; ε from the RDP accountant, "
                     "composed over every training call at the site (all rounds and regimes).")
    else:
        notes.append("The study ran without DP-SGD (run config dp = false).")
    for phase, u in _as_dict(run.get("update_dp")).items():
        u = _as_dict(u)
        notes.append(f"Adapter updates of the {phase} rounds: clipped to L2 norm "
                     f"{u.get('clipping_norm')} and noised at the server (noise multiplier {u.get('noise_multiplier')}, "
                     f"equal site weights): site-level ε {float(u.get('epsilon', float('nan'))):.3g} at δ "
                     f"{u.get('delta')} over {u.get('rounds')} rounds.")
    mo = sorted({s for names in _as_dict(run.get("metrics_only")).values() for s in names})
    if mo:
        notes.append(f"Metrics-only sites (no adapter leaves; trained at home, evaluated): {', '.join(mo)}.")
    html_out = ("<h2>Privacy</h2><p>Each site's effective policy: the stricter of the study's run configuration "
                "and the site's own policy file, as reported by the site.</p>" + simple_table(df)
                + "".join(f'<p class="caption">{html.escape(n)}</p>' for n in notes))
    return df, html_out


def _clusters_section(summary: dict, tab_dir: Path) -> str:
    cl = summary.get("clusters")
    if not cl:
        return ""
    assign = _as_dict(cl.get("assignment"))
    df = pd.DataFrame([{"site": str(s), "cluster": str(c)} for s, c in assign.items()], columns=["site", "cluster"])
    df.to_csv(tab_dir / "clusters.csv", index=False)
    groups = df.groupby("cluster", sort=True)["site"].apply(lambda x: ", ".join(x)).reset_index()
    groups.columns = ["cluster", "sites"]
    feats = cl.get("features") or []
    feats = [str(f) for f in feats] if isinstance(feats, list) else [str(feats)]
    return ("<h2>Clusters</h2>"
            f"<p>Sites were grouped into k = {html.escape(str(cl.get('k', '?')))} clusters by "
            f"<strong>{html.escape(str(cl.get('method', '?')))}</strong>, using: "
            f"{html.escape(', '.join(feats)) or 'not recorded'}. The <em>cluster</em> regime aggregates only "
            "within a site's cluster.</p>" + simple_table(groups))


def _methods_section(run: dict, tab_dir: Path) -> str:
    """What the personalization methods chose at each site (run.json): the IFCA adapter per round
    and the interpolation weight, the site-level choices the sites released."""
    ifca = _as_dict(run.get("ifca"))
    weights = _as_dict(run.get("interpolation"))
    if not ifca and not weights:
        return ""
    rows = {}
    for h in ifca.get("history") or []:
        for site, j in _as_dict(h.get("membership")).items():
            rows.setdefault(str(site), {})[f"ifca round {h.get('round')}"] = j
    for site, a in weights.items():
        rows.setdefault(str(site), {})["interpolation weight a (global)"] = a
    df = pd.DataFrame([{"site": s, **v} for s, v in sorted(rows.items())])
    df.to_csv(tab_dir / "method_choices.csv", index=False)
    text = "<h2>Personalization methods: the sites' choices</h2><p>"
    if ifca:
        text += (f"IFCA ran k = {html.escape(str(ifca.get('k', '?')))} adapters; each round every site trained the "
                 "one with the lowest loss on its own validation patients (the losses stayed at the site; only the "
                 "index was sent) and is scored with the one it chose last. ")
    if weights:
        text += ("The interpolated regime is a x global + (1 - a) x local, with a chosen by each site's validation "
                 "log loss from 0, 0.25, 0.5, 0.75, 1 (a = 1: the global adapter; a = 0: the local one).")
    return text + "</p>" + simple_table(df)


def _analysis_findings(summary: dict, main_regimes, config: dict) -> list[tuple[str, list[str]]]:
    """Findings from the analysis summary; every sentence is filled from computed numbers."""
    esc = html.escape
    sections = []
    worst_items = []
    tests = summary.get("tests") or {"available": {}, "comparisons": [], "size": [], "gaps": []}
    tested = bool(tests["available"].get("differences"))
    for split in [s for s in ("temporal", "test") if s in summary["worst"]] + \
            [s for s in summary["worst"] if s not in ("temporal", "test")]:
        w = summary["worst"][split]
        where = SPLIT_SHORT.get(split, split).capitalize()
        ws = w.get("site")
        if ws:
            msg = f"{where}: the global model serves site <strong>{esc(ws['site'])}</strong> worst (AUC {f3(ws['auc'])})"
            told = site_tested_text(ws.get("tested") or []) if tested else ""
            msg += (told or _helps_text(ws["best_regime"], ws["gain"], None)) + "."
            worst_items.append(msg)
        wg = w.get("subgroup")
        if wg:
            msg = (f"{where}: pooled over sites, the subgroup served worst is <strong>{esc(wg['subgroup'])}</strong> "
                   f"(AUC {f3(wg['auc'])}, n-weighted over {wg['n_sites']} site{'s' if wg['n_sites'] != 1 else ''})")
            told = site_tested_text(wg.get("tested") or [], where="pooled in this subgroup") if tested else ""
            msg += (told or
                    _helps_text(wg["best_regime"], wg["gain"], wg["gain_n_sites"])) + "."
            others = [f"{esc(v['subgroup'])} {f3(v['auc'])}" for v in w["by_grouping"].values()]
            if len(others) > 1:
                msg += " Lowest band in each grouping: " + "; ".join(others) + "."
            worst_items.append(msg)
    if worst_items:
        sections.append(("Who the global model serves worst", worst_items))

    flip_items = flip_sentences(tests["comparisons"]) if tested else []
    for f in ([] if tested else summary["sign_flips"]):
        r = esc(f["regime"])
        if f["mean_flips"]:
            verb = ("is above global on the random test but below it on the temporal test"
                    if f["mean_gain_test"] > 0 else "is below global on the random test but above it on the temporal test")
            flip_items.append(f"<strong>{r}</strong> {verb} (untested point estimates): mean gain over global "
                              f"{f['mean_gain_test']:+.3f} ({f['n_sites_test']} sites) vs "
                              f"{f['mean_gain_temporal']:+.3f} ({f['n_sites_temporal']} sites).")
        if f["sites_helps_test_hurts_temporal"]:
            flip_items.append(f"{r}'s point gain is positive on the random test but negative on the temporal test at "
                              f"{esc(', '.join(f['sites_helps_test_hurts_temporal']))} (untested).")
    if any(r in main_regimes for r in gain_regimes(main_regimes)) and summary["splits"] and \
            {"test", "temporal"} <= set(summary["splits"]):
        if not flip_items:
            flip_items.append("No regime's pooled difference to global changes sign between the random and the "
                              "temporal test." if tested else
                              "No regime's gain over global changes sign between the random and the temporal test.")
        sections.append(("Random vs temporal test", flip_items))

    drv = []
    top = summary["top_drivers"]
    if top:
        n_sites = max(t["n_sites"] for t in top)
        drv.append("Patient features along which the global model ranks patients least evenly (spread of its AUC "
                   "within each feature's bands around the site's AUC, less sampling variance, "
                   f"n-weighted over {n_sites} site{'s' if n_sites != 1 else ''}): "
                   + ", ".join(f"{t['rank']}. <strong>{esc(t['driver'])}</strong> ({t['importance']:.3f})"
                               for t in top[:3]) + ".")
    loc = [g for g in summary["gain_vs_n_train"] if g["regime"] == "local"]
    ok = [g for g in loc if np.isfinite(g["rho"])]
    size_local = [v for v in tests["size"] if v["regime"] == "local" and v["reference"] == "global"]
    if size_local:
        drv.append("Local − global vs site size (meta-regression slope, Holm-adjusted): " + "; ".join(
            f"{SPLIT_SHORT.get(v['split'], v['split'])}: {size_sentence(v)}" for v in size_local) + ".")
    elif ok:
        parts = [f"ρ = <strong>{g['rho']:+.2f}</strong> on the {SPLIT_SHORT.get(g['split'], g['split'])} "
                 f"({g['n_sites']} sites)" for g in ok]
        if all(g["rho"] < 0 for g in ok):
            verdict = "local point gains are largest at the smallest sites"
        elif all(g["rho"] > 0 for g in ok):
            verdict = "local point gains are largest at the largest sites, not the smallest"
        else:
            verdict = "no consistent relation between local point gain and site size"
        drv.append(f"Local − global gain vs training size (Spearman): {'; '.join(parts)}: {verdict} "
                   "(descriptive, untested: size_effects.csv not found).")
    elif loc:
        drv.append("Local gain vs site size: " + esc(loc[0]["note"] or "not computable") + ".")
    if drv:
        sections.append(("Drivers", drv))

    gap_items = [f"{SPLIT_SHORT.get(g['split'], g['split']).capitalize()}: {gap_sentence(g)}" for g in tests["gaps"]]
    if gap_items:
        sections.append(("Subgroup gaps", gap_items))
    cal_items = calibration_sentences(tests, summary["splits"]) if tests["available"].get("calibration") else []
    if cal_items:
        sections.append(("Calibration", cal_items))
    rep_items = replicate_sentences(tests)
    if rep_items:
        sections.append(("Replicates", rep_items))

    if "augmented" in main_regimes:
        k = config.get("augment-k")
        space = config.get("augment-space")
        how = ""
        if k not in (None, "") or space not in (None, ""):
            how = f" (augment-k = {esc(str(k))}, augment-space = {esc(str(space))})"
        sections.append(("Simulation-only regime", [
            f"<strong>augmented</strong> moved training instances between sites{how}: possible only in simulation, "
            "where all data are synthetic. A deployment would not allow records to leave a site."]))
    return sections


def _helps_text(best, gain, n_sites) -> str:
    if not best or not np.isfinite(gain):
        return ""
    over = f", n-weighted over {n_sites} site{'s' if n_sites != 1 else ''}" if n_sites else ""
    if gain > 0:
        return (f"; largest point gain there: <strong>{html.escape(best)}</strong> ({gain:+.3f} AUC{over}; "
                "untested point estimate)")
    return f"; no regime has a higher point AUC than global there (best: {html.escape(best)}, {gain:+.3f}{over})"


# --------------------------------------------------------------------------- main


def rounds_summary(rounds: list[dict], config: dict) -> str:
    """Completed rounds per federated phase against the configured number, e.g.
    "3 of 3 (global), 3 of 3 (cluster)": each phase runs its own rounds."""
    done: dict[str, int] = {}
    for r in rounds:
        phase = str(r.get("phase", "global"))
        done[phase] = max(done.get(phase, 0), int(r.get("round", 0)))
    if not done:
        return "none completed"

    def configured(phase):
        value = config.get("dpo-rounds" if phase == "dpo" else "num-server-rounds")
        return f" of {value}" if value not in (None, "") else ""

    return ", ".join(f"{n}{configured(phase)} ({phase})" for phase, n in done.items())


def build_classifier_report(run_dir) -> Path:
    """Build RUN_DIR/report.html (+ figures/*.png, tables/*.csv) from RUN_DIR's files alone."""
    run_dir = Path(run_dir)
    fig_dir, tab_dir = run_dir / "figures", run_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)

    metrics = read_metrics(run_dir)
    sites_df = _read_sites(run_dir, metrics)
    run = read_run(run_dir)
    config = _as_dict(run.get("config"))
    versions = _as_dict(run.get("versions"))
    timings = _as_dict(run.get("timings"))
    rounds = run.get("rounds") or []
    status = str(run.get("status", "unknown"))
    try:
        k = int(config.get("min-cell-size", DEFAULT_MIN_CELL))
    except (TypeError, ValueError):
        k = DEFAULT_MIN_CELL

    all_regimes = _ordered(metrics["regime"], KNOWN_REGIMES)
    # Cross-site (`x@site`) evaluations live in their own matrix, not in per-site comparisons.
    regimes = [r for r in all_regimes if "@" not in r]
    splits = _ordered(metrics["split"], KNOWN_SPLITS)
    sites = list(sites_df["site"])
    cells = Cells(metrics)
    notes = Notes()
    gains = _gains(cells, sites_df, regimes, splits)
    summary = analyze(run_dir)  # writes drivers.csv and site_analysis.csv: the report rebuilds everything

    # Figures.
    f_auc, f_gain = fig_dir / "auc_by_regime.png", fig_dir / "gain_vs_size.png"
    _fig_auc_by_regime(cells, sites, regimes, splits, f_auc)
    _fig_gain_vs_size(gains, regimes, splits, f_gain)

    # Tables.
    findings, mean_auc = _findings(cells, sites_df, regimes, splits, gains, run, k, metrics, summary["tests"])
    extra = _analysis_findings(summary, regimes, config)
    cut = next((i for i, (head, _) in enumerate(findings) if head == "Completeness"), len(findings))
    findings = findings[:cut] + extra + findings[cut:]
    overview_df, overview_html = _overview(cells, notes, sites_df, regimes, splits)
    subgroup_html = _subgroup_section(summary["tables"]["subgroups"], summary["tables"]["subgroups_by_site"],
                                      regimes, splits, tab_dir, fig_dir)
    cross_html = _cross_site(metrics, sites, splits, fig_dir, tab_dir, config)
    colors = _colors(list(dict.fromkeys(regimes + list(KNOWN_REGIMES))))
    differences_html = differences_section(summary["tests"], colors, fig_dir, tab_dir)
    calibration_html = calibration_section(summary["tests"], regimes, splits, colors, fig_dir, tab_dir)
    gaps_html = gaps_section(summary["tests"], tab_dir)
    drivers_html = _drivers_section(summary, run_dir, fig_dir, tab_dir)
    clusters_html = _clusters_section(summary, tab_dir) + _methods_section(run, tab_dir)
    training_df = _training(run)
    costs_df = regime_costs(run, regimes, mean_auc)
    privacy_df, privacy_html = _privacy(run)
    timings_df = pd.DataFrame([{"phase": str(p), "wall time": human_seconds(s), "seconds": s}
                               for p, s in timings.items()], columns=["phase", "wall time", "seconds"])
    config_df = kv_table(config, "key", "value")
    versions_df = kv_table(versions, "package", "version")
    gains_out = gains.copy()
    for c in ["auc", "auc_global", "gain"]:
        gains_out[c] = gains_out[c].map(f3)
    gains_out["n_train"] = gains_out["n_train"].map(lambda v: str(int(v)) if np.isfinite(v) else "")
    for name, df in [("overview", overview_df), ("mean_auc", mean_auc), ("gains", gains_out),
                     ("training", training_df), ("costs", costs_df),
                     ("privacy", privacy_df), ("timings", timings_df), ("config", config_df),
                     ("versions", versions_df)]:
        df.to_csv(tab_dir / f"{name}.csv", index=False)

    # Header facts.
    study = config.get("study-name") or run.get("study") or run.get("name") or run_dir.name
    date = str(run.get("finished") or run.get("started") or "")
    rounds_txt = rounds_summary(rounds, config)
    total = timings.get("total")
    esc = html.escape

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>clinfed report — {esc(str(study))}</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>clinfed study report: {esc(str(study))}</h1>",
    ]
    errs = _errors(run)
    if status == "failed":
        parts.append('<div class="banner failed">⚠ RUN FAILED — this report shows only what completed '
                     f"({len(rounds)} round(s) recorded).")
        if errs:
            parts.append("<ul>" + "".join(f"<li>{esc(e)}</li>" for e in errs) + "</ul>")
        parts.append("</div>")
    elif status != "completed":
        parts.append(f'<div class="banner running">Run status: {esc(status)} — results may be partial.'
                     + ("<ul>" + "".join(f"<li>{esc(e)}</li>" for e in errs) + "</ul>" if errs else "") + "</div>")
    elif errs:
        parts.append('<div class="banner running">The run completed with errors:<ul>'
                     + "".join(f"<li>{esc(e)}</li>" for e in errs) + "</ul></div>")

    meta = [("Model", run.get("model", "")), ("Date", date), ("Status", status), ("Sites", len(sites)),
            ("Rounds", rounds_txt), ("Total wall time", human_seconds(total) if total is not None else ""),
            ("Report built", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    parts.append('<table class="meta">' + "".join(
        f"<tr><td><strong>{esc(a)}</strong></td><td>{esc(str(b))}</td></tr>" for a, b in meta) + "</table>")

    regime_items = "".join(
        f"<li><strong>{esc(r)}</strong>: {esc(REGIME_TEXT.get(r, _unknown_regime_text(r)))}</li>"
        for r in list(dict.fromkeys([r for r in KNOWN_REGIMES if r in all_regimes or r not in METHOD_REGIMES]
                                    + all_regimes)))
    parts.append(
        '<h2>How to read this</h2><div class="howto">'
        "<p>Each hospital (site) evaluates every model on its own held-out patients; only aggregate numbers leave "
        "the site. The task is 30-day readmission prediction from discharge notes. Models (regimes) compared:</p>"
        f"<ul>{regime_items}</ul>"
        "<p><strong>AUC</strong> (ROC area under the curve) is the probability that a readmitted patient is ranked "
        "above one who was not: 0.5 = chance, 1.0 = perfect. <strong>CI</strong> = 95 % bootstrap confidence "
        "interval, computed at the site. <strong>PR AUC</strong> = precision–recall area (compare with the "
        "readmission rate, not 0.5); <strong>F1</strong> at the study's threshold; <strong>Brier</strong> = mean "
        "squared error of the predicted probability (lower is better). Splits: <em>test</em> = random held-out "
        "patients; <em>temporal</em> = the most recent encounters (a check against drift over time).</p>"
        f"<p><span class=\"supp\">suppressed</span> = the cell had fewer than k = {k} patients, positives or "
        "negatives, or was withheld so that subtracting released cells cannot reveal such a cell; no number is "
        "released (privacy; a site's own policy may set a larger k). <span class=\"nc\">n/c</span> = not computable (e.g. only one class "
        "present); hover for the reason, or see the footnotes under the table.</p></div>"
    )

    parts.append('<h2>Key findings</h2><section id="findings">' + "".join(
        f"<h3>{esc(head)}</h3><ul>" + "".join(f"<li>{b}</li>" for b in bullets) + "</ul>"
        for head, bullets in findings) + "</section>")
    if not mean_auc.empty:
        parts.append("<p class=\"caption\">Mean AUC by regime (unweighted mean over sites with a computable AUC).</p>"
                     + simple_table(mean_auc, left_cols=2))

    parts.append("<h2>AUC by regime at each site</h2>" + img(f_auc, "AUC by regime at each site")
                 + '<p class="caption">Bars: AUC; whiskers: 95 % bootstrap CI; dashed line: chance (0.5). Sites '
                 "sorted by training size, largest first. Suppressed (supp.) and not-computable (n/c) cells have "
                 "no bar.</p>")
    parts.append("<h2>Results by site</h2>" + (overview_html if len(overview_df) else "<p>No results.</p>"))
    if notes.items:
        parts.append('<ol class="foot">' + "".join(f"<li>n/c: {esc(n)}</li>" for n in notes.items) + "</ol>")
    parts.append(differences_html)
    parts.append(calibration_html)
    parts.append(subgroup_html)
    parts.append(gaps_html)
    parts.append(cross_html)
    parts.append("<h2>Gain over global vs site size</h2>" + img(f_gain, "Gain over global vs site size")
                 + '<p class="caption">Each point is one site: AUC of the regime minus AUC of the global model on '
                 "the same patients, for every regime other than base. Above 0: the regime beats the global model "
                 "there. Sites without both AUCs or without a known training size are not shown.</p>")
    parts.append(drivers_html)
    parts.append(clusters_html)
    if summary["notes"]:
        parts.append('<p class="foot">Analysis inputs: ' + esc(" ".join(summary["notes"])) + "</p>")

    parts.append(privacy_html)
    parts.append("<h2>Training</h2>" + (simple_table(training_df) if len(training_df)
                                         else "<p>No federated rounds were recorded.</p>"))
    if len(costs_df):
        parts.append("<h2>Cost of each regime</h2>" + simple_table(costs_df)
                     + '<p class="caption">Measured in this run: bytes of adapter arrays in each regime\'s training '
                     "messages (to and from a site), and seconds each site spent training (not scoring), mean over "
                     "the sites; <em>with what it builds on</em> adds the training of the adapters a regime starts "
                     "from or mixes (e.g. <em>personalized</em> = the global rounds + its own fine-tuning). Ditto's "
                     "personal training runs alongside the global rounds and moves no bytes of its own.</p>")
    parts.append("<h2>Timings</h2>" + (simple_table(timings_df[["phase", "wall time"]]) if len(timings_df)
                                        else "<p>No timings recorded.</p>"))
    parts.append("<h2>Configuration and versions</h2>")
    parts.append("<details><summary>Run configuration</summary>" + simple_table(config_df) + "</details>")
    parts.append("<details><summary>Software versions</summary>" + simple_table(versions_df) + "</details>")
    parts.append('<p class="foot">Figures: figures/*.png; tables: tables/*.csv (in this run directory).</p>')
    parts.append("</body></html>")

    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _unknown_regime_text(r: str) -> str:
    if "@" in r:
        model, where = r.split("@", 1)
        return f"the {model} adapter of {where}, evaluated at this site (cross-site check)"
    return "a regime without a built-in description (see the run configuration)"


if __name__ == "__main__":  # pragma: no cover - convenience: python -m clinfed.server.reports.classifier RUN_DIR
    print(build_classifier_report(sys.argv[1] if len(sys.argv) > 1 else "."))
