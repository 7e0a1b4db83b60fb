"""HTML report of a clinfed study, rebuilt from the files in RUN_DIR alone.

Inputs: ``metrics.csv`` (tidy per-site metrics, with suppression status),
``sites.csv`` (per-site sample sizes) and ``run.json`` (config, rounds,
timings, errors). Nothing is rerun, so the report can be rebuilt and tested
on fixture files. Output: ``report.html`` (self-contained, figures embedded
as base64 PNG, no JS), ``figures/*.png`` and ``tables/*.csv``.

Privacy rule enforced here, not trusted upstream: a cell whose status is
``suppressed`` never shows a value or an n, even if the file carries one.
"""

from __future__ import annotations

import base64
import html
import json
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

KNOWN_REGIMES = ["base", "global", "local", "personalized"]
KNOWN_SPLITS = ["test", "temporal"]
METRIC_COLUMNS = ["site", "regime", "split", "subgroup", "metric", "value", "n", "status", "note"]
DEFAULT_MIN_CELL = 10

REGIME_TEXT = {
    "base": "the pretrained model with a freshly initialised prediction head (no federated training): the floor",
    "global": "one adapter aggregated over all hospitals (federated averaging), the same model everywhere",
    "local": "an adapter trained only on that hospital's own data",
    "personalized": "the global adapter further fine-tuned on that hospital's own data",
    "cluster": "an adapter aggregated only within the hospital's cluster of similar sites",
    "augmented": "local training augmented with similar instances or knowledge from other sites",
    "similarity-weighted": "an adapter aggregated with weights favouring similar sites",
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
}
EXTRA_COLORS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f"]

CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
.meta td{padding:2px 12px 2px 0} .howto{background:#f5f7fa;border-left:4px solid #1f77b4;padding:.6em 1em}
.banner{padding:.8em 1em;margin:1em 0;border-radius:4px;font-weight:bold}
.banner.failed{background:#fde2e1;border:2px solid #c62828;color:#8e0000}
.banner.running{background:#fff4d6;border:2px solid #e0a800;color:#6b5200}
.banner ul{font-weight:normal}
table.data{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.data th,table.data td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
table.data th{background:#eef1f5} table.data td.l,table.data th.l{text-align:left}
.supp{color:#8a6d00;font-style:italic} .nc{color:#b00;font-style:italic} .na{color:#999}
.foot{font-size:.85em;color:#444} img{max-width:100%} .caption{font-size:.9em;color:#444}
details{margin:.6em 0} summary{cursor:pointer;font-weight:bold}
"""


# --------------------------------------------------------------------------- inputs


def _read_metrics(run_dir: Path) -> pd.DataFrame:
    """Read metrics.csv as strings first so empty cells stay empty, then coerce numbers."""
    path = run_dir / "metrics.csv"
    if path.exists() and path.stat().st_size > 0:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        df = pd.DataFrame(columns=METRIC_COLUMNS)
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    for col in ["site", "regime", "split", "subgroup", "metric", "status", "note"]:
        df[col] = df[col].astype(str).str.strip()
    df["subgroup"] = df["subgroup"].replace("", "all")
    df["status"] = df["status"].str.lower()
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["n"] = pd.to_numeric(df["n"], errors="coerce")
    # Missing status: a number means ok, no number means nothing to show.
    df.loc[(df["status"] == "") & df["value"].notna(), "status"] = "ok"
    # Never carry a suppressed number past this point.
    supp = df["status"] == "suppressed"
    df.loc[supp, "value"] = np.nan
    df.loc[supp, "n"] = np.nan
    return df[df["site"] != ""].reset_index(drop=True)


def _read_sites(run_dir: Path, metrics: pd.DataFrame) -> pd.DataFrame:
    """Sites from sites.csv plus any site seen only in metrics.csv (size unknown)."""
    path = run_dir / "sites.csv"
    cols = ["site", "n_train", "n_val", "n_test", "n_temporal"]
    if path.exists() and path.stat().st_size > 0:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        df = pd.DataFrame(columns=cols)
    for col in cols:
        if col not in df.columns:
            df[col] = ""
    df["site"] = df["site"].astype(str).str.strip()
    for col in cols[1:]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    extra = sorted(set(metrics["site"]) - set(df["site"]))
    if extra:
        df = pd.concat([df, pd.DataFrame({"site": extra})], ignore_index=True)
    df = df[df["site"] != ""].drop_duplicates("site")
    df = df.assign(_missing=df["n_train"].isna()).sort_values(
        ["_missing", "n_train", "site"], ascending=[True, False, True]
    )
    return df.drop(columns="_missing").reset_index(drop=True)


def _read_run(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"status": "unknown", "errors": [f"run.json could not be read: {exc}"]}
    return data if isinstance(data, dict) else {}


def _as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _errors(run: dict) -> list[str]:
    errs = run.get("errors") or []
    if isinstance(errs, str):
        errs = [errs]
    return [str(e) for e in errs]


def _ordered(values, known: list[str]) -> list[str]:
    """Known names first in their canonical order, then the rest alphabetically."""
    present = [v for v in dict.fromkeys(values) if v != ""]
    return [k for k in known if k in present] + sorted(v for v in present if v not in known)


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


def _f3(v: float) -> str:
    return f"{v:.3f}"


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
    text = _f3(v)
    if with_ci:
        lo = cells.value(site, regime, split, "auc_lo")
        hi = cells.value(site, regime, split, "auc_hi")
        if np.isfinite(lo) and np.isfinite(hi):
            text += f" [{_f3(lo)}, {_f3(hi)}]"
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


def _human_bytes(b: Any) -> str:
    try:
        b = float(b)
    except (TypeError, ValueError):
        return ""
    if not np.isfinite(b):
        return ""
    for unit in ["B", "KB", "MB", "GB", "TB"]:
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000.0
    return ""


def _human_seconds(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return ""
    if not np.isfinite(s):
        return ""
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _gain_regimes(regimes: list[str]) -> list[str]:
    """Regimes compared against global: all but base/global and cross-site (`x@site`) ones."""
    return [r for r in regimes if r not in ("base", "global") and "@" not in r]


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


def _html_table(header_rows: list[str], body: list[list[str]], left_cols: int = 1) -> str:
    out = ['<table class="data">', "<thead>", *header_rows, "</thead>", "<tbody>"]
    for row in body:
        tds = "".join(f'<td class="l">{c}</td>' if i < left_cols else f"<td>{c}</td>" for i, c in enumerate(row))
        out.append(f"<tr>{tds}</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _simple_table(df: pd.DataFrame, left_cols: int = 1) -> str:
    head = "<tr>" + "".join(
        f'<th class="l">{html.escape(str(c))}</th>' if i < left_cols else f"<th>{html.escape(str(c))}</th>"
        for i, c in enumerate(df.columns)) + "</tr>"
    body = [[html.escape("" if (isinstance(v, float) and not np.isfinite(v)) else str(v)) for v in row]
            for row in df.itertuples(index=False)]
    return _html_table([head], body, left_cols)


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
    return df, _html_table([h1, h2], html_rows, left_cols=2)


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
            "failures": "; ".join(f"{k}: {v}" for k, v in failures.items()) or "none",
            "bytes sent": _human_bytes(rd.get("bytes_sent")),
            "bytes received": _human_bytes(rd.get("bytes_received")),
            "mean train loss": f"{np.mean(losses):.3f}" if losses else "",
        })
    return pd.DataFrame(rows, columns=["round", "sites answered", "failures", "bytes sent", "bytes received",
                                       "mean train loss"])


def _fmt_auc_ci(cells: Cells, s, r, split) -> str:
    v = cells.value(s, r, split, "auc")
    lo, hi = cells.value(s, r, split, "auc_lo"), cells.value(s, r, split, "auc_hi")
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{_f3(v)} [{_f3(lo)}, {_f3(hi)}]"
    return _f3(v)


def _findings(cells: Cells, sites_df, regimes, splits, gains: pd.DataFrame, run: dict, k: int,
              metrics: pd.DataFrame) -> tuple[list[tuple[str, list[str]]], pd.DataFrame]:
    """Plain-language findings grouped as (heading, HTML bullets); every claim is computed from the numbers."""
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
        for r in _gain_regimes(regimes):
            gr = gains[(gains["split"] == split) & (gains["regime"] == r)]
            if gr.empty:
                continue
            better = gr[gr["gain"] > 0]
            msg = (f"{esc(r.capitalize())} beats global at <strong>{len(better)} of {len(gr)}</strong> sites "
                   f"(mean AUC difference {gr['gain'].mean():+.3f}, range {gr['gain'].min():+.3f} to "
                   f"{gr['gain'].max():+.3f}")
            if not better.empty:
                best = better.loc[better["gain"].idxmax()]
                msg += f"; largest at {esc(best['site'])}, {best['gain']:+.3f}"
            out.append(msg + ").")
            gs = gr[gr["n_train"].notna()]
            rho = _spearman(gs["n_train"], gs["gain"])
            if len(gs) < 3:
                too_few.append((r, len(gs)))
            else:
                rhos.append((r, rho, len(gs)))
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
            if any("beats global" in o for o in out):
                out.append("AUC differences are point estimates; each site's CI is in the table below.")
            sections.append((SPLIT_TEXT.get(split, split).capitalize(), out))
    sub = metrics[(metrics["subgroup"] == "all") & (metrics["metric"] == "auc")]
    n_supp = int((sub["status"] == "suppressed").sum())
    n_nc = int((sub["status"] == "not_computable").sum())
    if n_supp or n_nc:
        general.append(f"{n_supp} site × regime × split AUC cell{'s are' if n_supp != 1 else ' is'} suppressed "
                       f"(fewer than k = {k} patients or positives) and {n_nc} {'are' if n_nc != 1 else 'is'} "
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


# --------------------------------------------------------------------------- main


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def _kv_table(d: dict, key: str, value: str) -> pd.DataFrame:
    rows = [{key: str(k), value: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)}
            for k, v in d.items()]
    return pd.DataFrame(rows, columns=[key, value])


def build_report(run_dir) -> Path:
    """Build RUN_DIR/report.html (+ figures/*.png, tables/*.csv) from RUN_DIR's files alone."""
    run_dir = Path(run_dir)
    fig_dir, tab_dir = run_dir / "figures", run_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)

    metrics = _read_metrics(run_dir)
    sites_df = _read_sites(run_dir, metrics)
    run = _read_run(run_dir)
    config = _as_dict(run.get("config"))
    versions = _as_dict(run.get("versions"))
    timings = _as_dict(run.get("timings"))
    rounds = run.get("rounds") or []
    status = str(run.get("status", "unknown"))
    try:
        k = int(config.get("min-cell-size", DEFAULT_MIN_CELL))
    except (TypeError, ValueError):
        k = DEFAULT_MIN_CELL

    regimes = _ordered(metrics["regime"], KNOWN_REGIMES)
    splits = _ordered(metrics["split"], KNOWN_SPLITS)
    sites = list(sites_df["site"])
    cells = Cells(metrics)
    notes = Notes()
    gains = _gains(cells, sites_df, regimes, splits)

    # Figures.
    f_auc, f_gain = fig_dir / "auc_by_regime.png", fig_dir / "gain_vs_size.png"
    _fig_auc_by_regime(cells, sites, regimes, splits, f_auc)
    _fig_gain_vs_size(gains, regimes, splits, f_gain)

    # Tables.
    findings, mean_auc = _findings(cells, sites_df, regimes, splits, gains, run, k, metrics)
    overview_df, overview_html = _overview(cells, notes, sites_df, regimes, splits)
    training_df = _training(run)
    timings_df = pd.DataFrame([{"phase": str(p), "wall time": _human_seconds(s), "seconds": s}
                               for p, s in timings.items()], columns=["phase", "wall time", "seconds"])
    config_df = _kv_table(config, "key", "value")
    versions_df = _kv_table(versions, "package", "version")
    gains_out = gains.copy()
    for c in ["auc", "auc_global", "gain"]:
        gains_out[c] = gains_out[c].map(_f3)
    gains_out["n_train"] = gains_out["n_train"].map(lambda v: str(int(v)) if np.isfinite(v) else "")
    for name, df in [("overview", overview_df), ("mean_auc", mean_auc), ("gains", gains_out),
                     ("training", training_df), ("timings", timings_df), ("config", config_df),
                     ("versions", versions_df)]:
        df.to_csv(tab_dir / f"{name}.csv", index=False)

    # Header facts.
    study = config.get("study-name") or run.get("study") or run.get("name") or run_dir.name
    date = str(run.get("finished") or run.get("started") or "")
    configured = config.get("num-server-rounds") or config.get("rounds")
    rounds_txt = f"{len(rounds)}" + (f" of {configured} configured" if configured not in (None, "") else "")
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
            ("Rounds", rounds_txt), ("Total wall time", _human_seconds(total) if total is not None else ""),
            ("Report built", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    parts.append('<table class="meta">' + "".join(
        f"<tr><td><strong>{esc(a)}</strong></td><td>{esc(str(b))}</td></tr>" for a, b in meta) + "</table>")

    regime_items = "".join(
        f"<li><strong>{esc(r)}</strong>: {esc(REGIME_TEXT.get(r, _unknown_regime_text(r)))}</li>"
        for r in list(dict.fromkeys(KNOWN_REGIMES + regimes)))
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
        f"<p><span class=\"supp\">suppressed</span> = the cell had fewer than k = {k} patients or positives, so "
        "no number is released (privacy). <span class=\"nc\">n/c</span> = not computable (e.g. only one class "
        "present); hover for the reason, or see the footnotes under the table.</p></div>"
    )

    parts.append('<h2>Key findings</h2><section id="findings">' + "".join(
        f"<h3>{esc(head)}</h3><ul>" + "".join(f"<li>{b}</li>" for b in bullets) + "</ul>"
        for head, bullets in findings) + "</section>")
    if not mean_auc.empty:
        parts.append("<p class=\"caption\">Mean AUC by regime (unweighted mean over sites with a computable AUC).</p>"
                     + _simple_table(mean_auc, left_cols=2))

    parts.append("<h2>AUC by regime at each site</h2>" + _img(f_auc, "AUC by regime at each site")
                 + '<p class="caption">Bars: AUC; whiskers: 95 % bootstrap CI; dashed line: chance (0.5). Sites '
                 "sorted by training size, largest first. Suppressed (supp.) and not-computable (n/c) cells have "
                 "no bar.</p>")
    parts.append("<h2>Gain over global vs site size</h2>" + _img(f_gain, "Gain over global vs site size")
                 + '<p class="caption">Each point is one site: AUC of the regime minus AUC of the global model on '
                 "the same patients. Above 0: the regime beats the global model there. Sites without both AUCs or "
                 "without a known training size are not shown.</p>")

    parts.append("<h2>Results by site</h2>" + (overview_html if len(overview_df) else "<p>No results.</p>"))
    if notes.items:
        parts.append('<ol class="foot">' + "".join(f"<li>n/c: {esc(n)}</li>" for n in notes.items) + "</ol>")
    other_sub = sorted(set(metrics["subgroup"]) - {"all"})
    if other_sub:
        parts.append(f'<p class="foot">Subgroup results present in metrics.csv but not shown here: '
                     f"{esc(', '.join(other_sub))}.</p>")

    parts.append("<h2>Training</h2>" + (_simple_table(training_df) if len(training_df)
                                         else "<p>No federated rounds were recorded.</p>"))
    parts.append("<h2>Timings</h2>" + (_simple_table(timings_df[["phase", "wall time"]]) if len(timings_df)
                                        else "<p>No timings recorded.</p>"))
    parts.append("<h2>Configuration and versions</h2>")
    parts.append("<details><summary>Run configuration</summary>" + _simple_table(config_df) + "</details>")
    parts.append("<details><summary>Software versions</summary>" + _simple_table(versions_df) + "</details>")
    parts.append('<p class="foot">Figures: figures/*.png; tables: tables/*.csv (in this run directory).</p>')
    parts.append("</body></html>")

    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _unknown_regime_text(r: str) -> str:
    if "@" in r:
        model, where = r.split("@", 1)
        return f"the {model} adapter of site {where}, evaluated at this site (cross-site check)"
    return "a regime without a built-in description (see the run configuration)"


if __name__ == "__main__":  # pragma: no cover - convenience: python -m server.report RUN_DIR
    print(build_report(sys.argv[1] if len(sys.argv) > 1 else "."))
