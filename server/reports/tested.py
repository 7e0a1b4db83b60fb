"""The classifier report's tested comparisons: sentences, the Differences, Calibration and Subgroup
gaps sections, read from issue 19's files (differences.csv, size_effects.csv, calibration.csv,
subgroup_gaps.csv) through ``server.analysis``.

Why its own module: the findings must say "better" or "worse" only where a Holm-adjusted test
does (``analysis.verdict``); keeping every sentence that states a tested result next to the
figures and tables that show the same rows makes it hard for the text and the numbers to drift.
Suppressed rows are shown as withheld by disclosure control and never carry a number.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless servers and CI: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

from clinfed.server.analysis import (  # noqa: E402
    ALPHA, GROUPINGS, I2_SITE_SPECIFIC, KNOWN_REGIMES, KNOWN_SPLITS, POOLED, ordered,
)
from clinfed.server.reports.toolkit import html_table, img, simple_table  # noqa: E402

WITHHELD_HTML = '<span class="supp">withheld (disclosure control)</span>'
WITHHELD_TEXT = "withheld (disclosure control)"
SPLIT_NAME = {"test": "random test", "temporal": "temporal test"}
N_BINS = 10


# --------------------------------------------------------------------------- number formats


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and bool(np.isfinite(v))


def signed(v) -> str:
    return f"{v:+.3f}".replace("-", "−") if finite(v) else ""


def interval(lo, hi) -> str:
    return f"[{signed(lo)}, {signed(hi)}]" if finite(lo) and finite(hi) else "[interval not given]"


def p_text(p) -> str:
    if not finite(p):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_adj_clause(p) -> str:
    """HTML 'p_adj = 0.012' or 'p_adj &lt; 0.001' (never 'p_adj = < 0.001')."""
    t = p_text(p)
    if not t:
        return "p_adj not given"
    return f"p_adj {html.escape(t)}" if t.startswith("<") else f"p_adj = {t}"


def diff_clause(e: dict, with_p: bool = True) -> str:
    """'+0.080 [+0.020, +0.140], p_adj = 0.012' for a tested row."""
    out = f"{signed(e['diff'])} {interval(e['lo'], e['hi'])}"
    return out + (f", {p_adj_clause(e['p_adj'])}" if with_p else "")


def _count(v) -> str:
    return str(int(round(v))) if finite(v) else ""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _split_name(split: str) -> str:
    return SPLIT_NAME.get(split, split)


# --------------------------------------------------------------------------- sentences


def _replicate_note(e: dict) -> str:
    if e.get("replicates", 1) <= 1 or e["verdict"] not in ("better", "worse"):
        return ""
    cons = e.get("consistent")
    if not finite(cons):
        return f", replicates: {e['replicates']}, per-replicate agreement not given"
    held = int(cons)
    if held >= e["replicates"]:
        return f", holds in every one of {e['replicates']} replicates"
    return f", holds in {held} of {e['replicates']} replicates only"


def comparison_sentence(c: dict) -> str:
    """One bullet per regime × reference × split: the sites' verdicts, then the pooled one."""
    esc = html.escape
    reg, ref = esc(c["regime"]), esc(c["reference"])
    groups: dict[str, list[str]] = {"better": [], "worse": [], "none": [], "suppressed": [], "not_computable": []}
    for e in c["sites"]:
        s = f"<strong>{esc(e['site'])}</strong>" if e["verdict"] in ("better", "worse") else esc(e["site"])
        if e["verdict"] in ("better", "worse"):
            groups[e["verdict"]].append(f"{s} ({diff_clause(e)}{_replicate_note(e)})")
        elif e["verdict"] == "none":
            groups["none"].append(f"{s} ({diff_clause(e, with_p=False)}, {p_adj_clause(e['p_adj'])})")
        else:
            groups[e["verdict"]].append(s)
    parts = []
    if groups["better"]:
        parts.append(f"<strong>better</strong> than {ref} at " + ", ".join(groups["better"]))
    if groups["worse"]:
        parts.append(f"<strong>worse</strong> than {ref} at " + ", ".join(groups["worse"]))
    if groups["none"]:
        parts.append("no detectable difference at " + ", ".join(groups["none"]))
    if groups["suppressed"]:
        parts.append("withheld by disclosure control at " + ", ".join(groups["suppressed"]))
    if groups["not_computable"]:
        parts.append("not computable at " + ", ".join(groups["not_computable"]))
    msg = f"<strong>{reg}</strong> vs {ref}: " + ("; ".join(parts) if parts else "no site rows") + "."
    msg += " " + pooled_sentence(c)
    return msg.strip()


def pooled_sentence(c: dict) -> str:
    p = c["pooled"]
    if p is None:
        return "No pooled row."
    if p["verdict"] == "suppressed":
        return "Pooled: withheld by disclosure control."
    if p["verdict"] == "not_computable":
        return "Pooled: not computable" + (f" ({html.escape(p['note'])})" if p.get("note") else "") + "."
    k = _count(p["n_sites"])
    head = f"Pooled over {k} sites (random effects)" if k else "Pooled (random effects)"
    if p["verdict"] in ("better", "worse"):
        msg = (f"{head}: <strong>{p['verdict']}</strong> than {html.escape(c['reference'])}, "
               f"{diff_clause(p)}{_replicate_note(p)}")
    else:
        msg = f"{head}: no detectable difference, {diff_clause(p, with_p=False)}, {p_adj_clause(p['p_adj'])}"
    het = []
    if finite(p["tau2"]):
        het.append(f"τ² = {p['tau2']:.4f}")
    if finite(p["i2"]):
        het.append(f"I² = {100 * p['i2']:.0f} %")
    if het:
        msg += "; " + ", ".join(het)
    msg += heterogeneity_text(c) + "."
    return msg


def heterogeneity_text(c: dict) -> str:
    h = c["heterogeneity"]
    i2 = c["pooled"]["i2"] if c["pooled"] else math.nan
    sig = [e["site"] for e in c["sites"] if e["verdict"] in ("better", "worse")]
    lim = f"{100 * I2_SITE_SPECIFIC:.0f} %"
    if h == "general":
        return f": the effect looks general (the sites agree: I² ≤ {lim}, no site significantly against it)"
    if h == "heterogeneous":
        why = f"I² &gt; {lim}" if finite(i2) and i2 > I2_SITE_SPECIFIC else "sites significant in both directions"
        return f": significant on average, but its size looks site-specific ({why})"
    if h == "site-specific":
        why = (f"significant at {html.escape(', '.join(sig))} only" if sig
               else f"I² &gt; {lim}")
        return f": no pooled effect, but the effect looks site-specific ({why})"
    if h == "none":
        return ": no detectable effect at any site or pooled"
    return ""


def size_sentence(v: dict) -> str:
    """'local − global: helps small sites more: slope −0.030 per doubling [...], p_adj = 0.004 (5 sites)'."""
    esc = html.escape
    name = f"<strong>{esc(v['regime'])}</strong> − {esc(v['reference'])}"
    k = f" ({_count(v['n_sites'])} sites)" if finite(v["n_sites"]) else ""
    cov = v.get("covariate") or "log2 training notes"
    unit = f"doubling of {cov[5:]}" if cov.startswith("log2 ") else f"unit of {cov}"
    slope = f"slope {signed(v['slope'])} AUC per {esc(unit)} {interval(v['lo'], v['hi'])}"
    if v["verdict"] == "small":
        return f"{name}: <strong>helps small sites more</strong>: {slope}, {p_adj_clause(v['p_adj'])}{k}"
    if v["verdict"] == "large":
        return f"{name}: <strong>helps large sites more</strong>: {slope}, {p_adj_clause(v['p_adj'])}{k}"
    if v["verdict"] == "none":
        return f"{name}: no detectable size dependence ({slope}, {p_adj_clause(v['p_adj'])}{k})"
    return f"{name}: size dependence not computable" + (f" ({esc(v['note'])})" if v["note"] else "")


def size_sentences(verdicts: list[dict]) -> str:
    """The computable slopes one by one, then the regimes without a slope in one clause."""
    done = [v for v in verdicts if v["verdict"] != "not_computable"]
    missing = [v for v in verdicts if v["verdict"] == "not_computable"]
    parts = [size_sentence(v) for v in done]
    if missing:
        notes = sorted({v["note"] for v in missing if v["note"]})
        parts.append("size dependence not computable for " + ", ".join(
            f"{html.escape(v['regime'])} − {html.escape(v['reference'])}" for v in missing)
            + (f" ({html.escape('; '.join(notes))})" if notes else ""))
    return "; ".join(parts)


def site_tested_text(entries: list[dict], reference: str = "global", where: str = "there") -> str:
    """For 'who is served worst': which regimes are detectably better than `reference` there."""
    esc = html.escape
    entries = [e for e in entries if e["regime"] not in ("base", reference) and "@" not in e["regime"]]
    better = [e for e in entries if e["verdict"] == "better"]
    if better:
        return f"; tested against global {where}: " + ", ".join(
            f"<strong>{esc(e['regime'])}</strong> is better ({diff_clause(e)})" for e in better)
    usable = [e for e in entries if e["verdict"] in ("none", "worse")]
    if usable:
        top = max(usable, key=lambda e: e["diff"])
        return (f"; no regime is detectably better than global {where} (largest difference: {esc(top['regime'])} "
                f"{diff_clause(top)})")
    if entries:
        return f"; the paired differences {where} are withheld or not computable"
    return ""


def flip_sentences(comparisons: list[dict]) -> list[str]:
    """Random vs temporal test from the pooled tests: a tested flip, or a point-estimate flip that is not."""
    esc = html.escape
    pooled = {(c["regime"], c["reference"], c["split"]): c["pooled"] for c in comparisons if c["pooled"]}
    out = []
    for (reg, ref, split), p in pooled.items():
        if split != "test" or ref != "global":
            continue
        q = pooled.get((reg, ref, "temporal"))
        if q is None or not (finite(p["diff"]) and finite(q["diff"])) or p["diff"] * q["diff"] >= 0:
            continue
        if {p["verdict"], q["verdict"]} == {"better", "worse"}:
            out.append(f"<strong>{esc(reg)}</strong> is {p['verdict']} than global pooled on the random test "
                       f"({diff_clause(p)}) but {q['verdict']} on the temporal test ({diff_clause(q)}).")
        else:
            out.append(f"{esc(reg)}'s pooled difference to global changes sign between the random test "
                       f"({diff_clause(p)}) and the temporal test ({diff_clause(q)}), but not detectably on both: "
                       "no tested sign flip.")
    return out


def gap_sentence(g: dict) -> str:
    esc = html.escape
    parts = []
    for key, label in (("pooled", "pooled over sites"), ("site", "at one site")):
        e = g.get(key)
        if not e:
            continue
        where = "" if key == "pooled" else f" ({esc(e['site'])})"
        verdict = "significant" if e["significant"] else "not significant"
        parts.append(f"{label}{where}: {esc(e['regime'])} serves {esc(e['best'])} best and "
                     f"<strong>{esc(e['worst'])}</strong> worst, gap {signed(e['gap'])} "
                     f"{interval(e['lo'], e['hi'])}, {p_adj_clause(e['p_adj'])} ({verdict})")
    return f"<strong>{esc(g['grouping'])}</strong>, widest gap " + "; ".join(parts) + "."


def replicate_sentences(tests: dict) -> list[str]:
    esc = html.escape
    reps = tests.get("replicates") or []
    n = tests.get("max_replicates", 1)
    if n <= 1:
        return []
    if not reps:
        return [f"{n} replicates (training seeds on the same splits): no finding is significant after "
                "adjustment, so none to check across replicates."]
    held = [r for r in reps if r["holds_in_all"]]
    not_held = [r for r in reps if not r["holds_in_all"]]

    def name(r):
        where = "pooled over sites" if r["site"] == POOLED else f"at {esc(r['site'])}"
        return f"{esc(r['regime'])} {r['verdict']} than {esc(r['reference'])} {where} ({_split_name(r['split'])})"

    out = []
    if held:
        out.append(f"Findings that hold in every one of the {n} replicates: " + "; ".join(map(name, held)) + ".")
    if not_held:
        out.append("Findings that do not hold in every replicate: " + "; ".join(
            f"{name(r)}: {r['consistent'] if r['consistent'] is not None else '?'} of {r['replicates']}"
            for r in not_held) + ".")
    return out


def calibration_sentences(tests: dict, splits) -> list[str]:
    wide = tests["tables"]["calibration_wide"]
    if wide.empty:
        return []
    pooled = wide[(wide["site"] == POOLED) & (wide["status"] == "ok")]
    out = []
    for split in splits:
        d = pooled[pooled["split"] == split]
        items = []
        for reg in ordered(d["regime"], KNOWN_REGIMES):
            r = d[d["regime"] == reg].iloc[0]
            bit = f"{html.escape(reg)} ECE {r['ece']:.3f}" if finite(r.get("ece")) else ""
            if finite(r.get("slope")):
                bit += (f", slope {r['slope']:.2f} "
                        f"[{r.get('slope_lo', math.nan):.2f}, {r.get('slope_hi', math.nan):.2f}]")
            if bit:
                items.append(bit)
        if items:
            out.append(f"Calibration pooled over sites ({_split_name(split)}): " + "; ".join(items)
                       + " (ECE 0 = perfect; slope 1 = risks spread right, &lt; 1 too extreme).")
    return out


# --------------------------------------------------------------------------- figures


def _forest_panel(ax, c: dict, color: str) -> None:
    rows = c["sites"] + ([c["pooled"]] if c["pooled"] else [])
    labels = []
    n = len(rows)
    for i, e in enumerate(rows):
        y = n - 1 - i
        is_pooled = e["site"] == POOLED
        k = _count(e["n_sites"]) if is_pooled and finite(e["n_sites"]) else ""
        labels.append(f"pooled ({k} site{'' if k == '1' else 's'})" if k else e["site"])
        sig = e["verdict"] in ("better", "worse")
        if e["verdict"] in ("suppressed", "not_computable") or not finite(e["diff"]):
            ax.text(0, y, "withheld (disclosure control)" if e["verdict"] == "suppressed" else "not computable",
                    ha="center", va="center", fontsize=7, color="#8a6d00" if e["verdict"] == "suppressed" else "#b00")
            continue
        lo, hi = (e["lo"], e["hi"]) if finite(e["lo"]) and finite(e["hi"]) else (e["diff"], e["diff"])
        if is_pooled:
            ax.add_patch(Polygon([(lo, y), (e["diff"], y + 0.3), (hi, y), (e["diff"], y - 0.3)], closed=True,
                                 facecolor=color if sig else "white", edgecolor=color, lw=1.2, zorder=3))
        else:
            ax.plot([lo, hi], [y, y], color=color if sig else "#777", lw=1.4, zorder=2)
            ax.plot([e["diff"]], [y], marker="s", ms=6, color=color if sig else "white",
                    markeredgecolor=color if sig else "#555", zorder=3)
        if sig:
            ax.annotate("*", (hi, y), textcoords="offset points", xytext=(4, -3), fontsize=11, color=color)
    ax.axvline(0, color="#555", lw=1, ls="--")
    ends = [x for e in rows for x in (e["lo"], e["hi"], e["diff"]) if finite(x)]
    if ends:  # an AUC difference lies in [−1, 1]: a wider interval (few sites) is cut at the frame
        lo, hi = max(-1.0, min(ends + [0.0])), min(1.0, max(ends + [0.0]))
        pad = 0.05 * max(hi - lo, 0.02)
        ax.set_xlim(lo - pad, hi + pad)
    if c["pooled"] and n:
        ax.axhline(0.5, color="#ccc", lw=0.8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    ax.set_ylim(-0.8, max(n, 1) - 0.2)
    ax.set_xlabel(f"AUC({c['regime']}) − AUC({c['reference']}), 95 % interval")
    ax.set_title(f"{c['regime']} − {c['reference']} — {_split_name(c['split'])}", fontsize=10)


def fig_forest(comps: list[dict], color: str, path: Path) -> None:
    """One panel per split: sites (squares, 95 % intervals) and the pooled diamond; * = p_adj < ALPHA."""
    n = max(len(c["sites"]) + 1 for c in comps)
    fig, axes = plt.subplots(1, len(comps), figsize=(5.2 * len(comps), max(2.4, 0.38 * n + 1.4)), squeeze=False)
    for ax, c in zip(axes[0, :], comps):
        _forest_panel(ax, c, color)
    fig.text(0.01, 0.005, f"filled, *: significant after Holm (adjusted p < {ALPHA}); hollow: no detectable difference",
             fontsize=7, color="#444")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_bins(wide_row) -> pd.DataFrame:
    """The released bins of one calibration row: lo, hi, n, positives, mean_p, observed (NaN: withheld)."""
    rows = []
    for i in range(N_BINS):
        get = lambda k: wide_row.get(f"bin{i}_{k}", math.nan)  # noqa: E731
        n, pos = get("n"), get("positives")
        rows.append({"bin": i, "lo": get("lo"), "hi": get("hi"), "n": n, "positives": pos, "mean_p": get("mean_p"),
                     "observed": pos / n if finite(n) and finite(pos) and n > 0 else math.nan})
    return pd.DataFrame(rows)


def fig_reliability(wide: pd.DataFrame, regimes, splits, colors: dict, path: Path) -> bool:
    """Pooled reliability diagram per split: observed rate vs mean predicted risk, marker area ∝ bin n."""
    pooled = wide[(wide["site"] == POOLED) & (wide["status"] == "ok")]
    if pooled.empty:
        return False
    fig, axes = plt.subplots(1, len(splits), figsize=(4.8 * len(splits), 4.4), squeeze=False)
    nmax = 1.0
    for _, r in pooled.iterrows():
        b = reliability_bins(r)
        if b["n"].notna().any():
            nmax = max(nmax, float(b["n"].max()))
    for ax, split in zip(axes[0, :], splits):
        ax.plot([0, 1], [0, 1], ls="--", color="#555", lw=1, label="perfect calibration")
        for reg in regimes:
            d = pooled[(pooled["split"] == split) & (pooled["regime"] == reg)]
            if d.empty:
                continue
            b = reliability_bins(d.iloc[0])
            b = b[b["mean_p"].notna() & b["observed"].notna()]
            if b.empty:
                continue
            ax.plot(b["mean_p"], b["observed"], color=colors.get(reg, "#777"), lw=1.2, label=reg)
            ax.scatter(b["mean_p"], b["observed"], s=10 + 120 * b["n"] / nmax, color=colors.get(reg, "#777"),
                       zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted risk in the bin")
        ax.set_ylabel("observed readmission rate (positives / n)")
        ax.set_title(f"Reliability, pooled over sites — {_split_name(split)}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- sections


def _status_html(status: str, note: str = "") -> str:
    if status == "suppressed":
        return WITHHELD_HTML
    if status == "not_computable":
        return f'<span class="nc" title="{html.escape(note or "", quote=True)}">not computable</span>'
    return html.escape(status)


def _diff_rows(c: dict, replicates: bool) -> tuple[list[list[str]], list[list[str]]]:
    """(CSV rows, HTML rows) of one comparison: sites then pooled; withheld rows carry no number."""
    csv_rows, html_rows = [], []
    for e in c["sites"] + ([c["pooled"]] if c["pooled"] else []):
        shown = e["status"] not in ("suppressed", "not_computable")
        diff = signed(e["diff"]) if shown else ""
        ci = interval(e["lo"], e["hi"]) if shown and finite(e["diff"]) else ""
        verdict = {"better": "better", "worse": "worse", "none": "no detectable difference"}.get(e["verdict"], "")
        het = ""
        if e["site"] == POOLED and shown:
            het = ", ".join(x for x in (f"τ² {e['tau2']:.4f}" if finite(e["tau2"]) else "",
                                        f"I² {100 * e['i2']:.0f} %" if finite(e["i2"]) else "") if x)
        base = [e["site"], c["split"], diff, ci, p_text(e["p"]) if shown else "",
                p_text(e["p_adj"]) if shown else "",
                _count(e["n"]) if e["status"] != "suppressed" else "",
                _count(e["positives"]) if e["status"] != "suppressed" else "", e["method"]]
        rep = [(_count(e["consistent"]) + f" of {e['replicates']}") if replicates and finite(e["consistent"]) else ""]
        tail = [verdict, het]
        csv_status = WITHHELD_TEXT if e["status"] == "suppressed" else e["status"]
        csv_rows.append([c["regime"], c["reference"]] + base + ([csv_status] + (rep if replicates else []) + tail))
        mark = " *" if e["verdict"] in ("better", "worse") else ""
        h = [html.escape(x) for x in base]
        h[0] = (f"<strong>{h[0]}</strong>" if e["site"] == POOLED else h[0]) + mark
        html_rows.append(h + [_status_html(e["status"], e.get("note", ""))]
                         + ([html.escape(rep[0])] if replicates else []) + [html.escape(x) for x in tail])
    return csv_rows, html_rows


DIFF_TABLE_COLUMNS = ["site", "split", "diff", "95 % interval", "p", "p_adj", "n", "positives", "method",
                      "status"]


def differences_section(tests: dict, colors: dict, fig_dir: Path, tab_dir: Path) -> str:
    """Forest plot + table per regime compared, the size meta-regression lines, subgroup-family rows."""
    if not tests["available"]["differences"]:
        return ("<h2>Differences</h2><p>differences.csv not found: this run folder predates the paired tests "
                "(issue 19), so the comparisons in this report are untested point estimates.</p>")
    comps = tests["comparisons"]
    replicates = tests.get("max_replicates", 1) > 1
    out = ["<h2>Differences</h2>",
           '<p class="caption">Each site computes the paired difference of AUCs on the same patients, '
           "AUC(regime) − AUC(reference), with DeLong's variance (a paired bootstrap where DeLong does not "
           "apply) and releases only the difference, its 95 % interval, p, n and positives. Pooled: "
           "random-effects meta-analysis (DerSimonian–Laird τ², Knapp–Hartung interval), with τ² (between-site "
           "variance) and I² (share of the spread that is heterogeneity). p_adj: Holm-adjusted over the study's "
           f"primary family (every comparison at every site and pooled, both splits, subgroup all). *: "
           f"p_adj &lt; {ALPHA}, the only rows called better or worse.</p>"]
    cols = DIFF_TABLE_COLUMNS + (["holds in replicates"] if replicates else []) + ["verdict", "heterogeneity"]
    all_csv = []
    pairs = list(dict.fromkeys((c["regime"], c["reference"]) for c in comps))
    for reg, ref in pairs:
        cs = [c for c in comps if c["regime"] == reg and c["reference"] == ref]
        split_order = ordered([c["split"] for c in cs], KNOWN_SPLITS)
        cs = sorted(cs, key=lambda c: split_order.index(c["split"]))
        path = fig_dir / f"differences_{_safe(reg)}_vs_{_safe(ref)}.png"
        fig_forest(cs, colors.get(reg, "#1f77b4"), path)
        out.append(f"<h3>{html.escape(reg)} vs {html.escape(ref)}</h3>")
        out.append(img(path, f"Forest plot: {reg} − {ref}"))
        out.append("<ul>" + "".join(f"<li>{_split_name(c['split']).capitalize()}: {comparison_sentence(c)}</li>"
                                    for c in cs) + "</ul>")
        body = []
        for c in cs:
            csv_rows, html_rows = _diff_rows(c, replicates)
            all_csv += csv_rows
            body += html_rows
        head = "<tr>" + "".join(f'<th class="l">{html.escape(x)}</th>' if i < 2 else f"<th>{html.escape(x)}</th>"
                                for i, x in enumerate(cols)) + "</tr>"
        out.append(html_table([head], body, left_cols=2))
    pd.DataFrame(all_csv, columns=["regime", "reference"] + cols[:len(DIFF_TABLE_COLUMNS)]
                 + (["holds in replicates"] if replicates else []) + ["verdict", "heterogeneity"]
                 ).to_csv(tab_dir / "differences_by_site.csv", index=False)
    out.append(size_section(tests, tab_dir))
    out.append(_subgroup_family(tests, tab_dir))
    return "".join(out)


def size_section(tests: dict, tab_dir: Path) -> str:
    if not tests["available"]["size_effects"]:
        return ("<h3>Difference vs site size</h3><p>size_effects.csv not found: no tested size dependence "
                "(the Spearman ρ in the findings is descriptive).</p>")
    rows = []
    for v in tests["size"]:
        rows.append({"regime": v["regime"], "reference": v["reference"], "split": v["split"],
                     "slope per doubling": signed(v["slope"]), "95 % interval": interval(v["lo"], v["hi"])
                     if finite(v["slope"]) else "", "p": p_text(v["p"]), "p_adj": p_text(v["p_adj"]),
                     "sites": _count(v["n_sites"]),
                     "verdict": {"small": "helps small sites more", "large": "helps large sites more",
                                 "none": "no detectable size dependence",
                                 "not_computable": "not computable"}[v["verdict"]],
                     "note": v["note"]})
    df = pd.DataFrame(rows, columns=["regime", "reference", "split", "slope per doubling", "95 % interval", "p",
                                     "p_adj", "sites", "verdict", "note"])
    df.to_csv(tab_dir / "size_effects.csv", index=False)
    return ("<h3>Difference vs site size</h3>"
            "<ul>" + "".join(f"<li>{size_sentence(v)}.</li>" for v in tests["size"]) + "</ul>"
            + simple_table(df, left_cols=3)
            + '<p class="caption">Mixed-effects meta-regression of each site\'s difference on log2 of its '
              "training notes (weights 1/(v + τ²), Knapp–Hartung interval): the slope is the change of the "
              "difference per doubling of site size; negative = the regime helps small sites more. Holm over "
              "the rows of this table.</p>")


def _subgroup_family(tests: dict, tab_dir: Path) -> str:
    d = tests["tables"]["differences"]
    d = d[d["subgroup"] != "all"] if d is not None else None
    if d is None or d.empty:
        return ""
    rows = []
    for _, r in d.iterrows():
        supp = r["status"] == "suppressed"
        shown = r["status"] == "ok"
        rows.append([r["subgroup"], r["site"], r["regime"], r["reference"], r["split"],
                     signed(r["diff"]) if shown else "",
                     interval(r["lo"], r["hi"]) if shown and finite(r["diff"]) else "",
                     p_text(r["p"]) if shown else "", p_text(r["p_adj"]) if shown else "",
                     "" if supp else _count(r["n"]), WITHHELD_TEXT if supp else r["status"]])
    cols = ["subgroup", "site", "regime", "reference", "split", "diff", "95 % interval", "p", "p_adj", "n", "status"]
    df = pd.DataFrame(rows, columns=cols)
    df.to_csv(tab_dir / "differences_subgroups.csv", index=False)
    body = [[html.escape(x) for x in row[:-1]] + [WITHHELD_HTML if row[-1] == WITHHELD_TEXT
                                                  else html.escape(row[-1])] for row in rows]
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    return ("<details><summary>Subgroup differences (second Holm family)</summary>"
            + html_table([head], body, left_cols=5) + "</details>")


def calibration_section(tests: dict, regimes, splits, colors: dict, fig_dir: Path, tab_dir: Path) -> str:
    if not tests["available"]["calibration"]:
        return ""
    wide = tests["tables"]["calibration_wide"]
    out = ["<h2>Calibration</h2>"]
    regs = ordered(list(wide["regime"]), KNOWN_REGIMES) if len(wide) else []
    sps = ordered(list(wide["split"]), KNOWN_SPLITS) if len(wide) else []
    f_rel = fig_dir / "reliability.png"
    if fig_reliability(wide, [r for r in regs if r in regimes] + [r for r in regs if r not in regimes],
                       sps, colors, f_rel):
        out.append(img(f_rel, "Reliability diagram pooled over sites")
                   + '<p class="caption">Pooled over sites from the bins each site released (10 bins of predicted '
                   "risk): x = mean predicted risk, y = positives / n, marker area ∝ patients in the bin. A bin "
                   "a site withheld adds nothing from that site: the pooled bin counts the sites that released "
                   "it.</p>")
    out.append(_bins_table(wide, regs, sps, tab_dir))
    rows, body = [], []

    def with_ci(r, key):
        v = r.get(key, math.nan)
        if not finite(v):
            return ""
        lo, hi = r.get(f"{key}_lo", math.nan), r.get(f"{key}_hi", math.nan)
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if finite(lo) and finite(hi) else f"{v:.3f}"

    site_rank = {s: i for i, s in enumerate(dict.fromkeys(wide["site"]))}
    order = wide.assign(_p=(wide["site"] == POOLED), _s=wide["site"].map(site_rank),
                        _r=[regs.index(r) for r in wide["regime"]], _sp=[sps.index(s) for s in wide["split"]]
                        ).sort_values(["_r", "_sp", "_p", "_s"])
    for _, r in order.iterrows():
        supp = r["status"] == "suppressed"
        row = [r["site"], r["regime"], r["split"],
               "" if supp or not finite(r.get("ece", math.nan)) else f"{r['ece']:.3f}",
               "" if supp else with_ci(r, "slope"), "" if supp else with_ci(r, "intercept"),
               WITHHELD_TEXT if supp else r["status"]]
        rows.append(row)
        h = [html.escape(x) for x in row[:-1]] + [_status_html(r["status"])]
        if r["site"] == POOLED:
            h[0] = f"<strong>{h[0]}</strong>"
        body.append(h)
    cols = ["site", "regime", "split", "ECE", "slope [95 % CI]", "intercept [95 % CI]", "status"]
    pd.DataFrame(rows, columns=cols).to_csv(tab_dir / "calibration.csv", index=False)
    head = "<tr>" + "".join(f'<th class="l">{c}</th>' if i < 3 else f"<th>{c}</th>" for i, c in enumerate(cols)) \
        + "</tr>"
    out.append(html_table([head], body, left_cols=3))
    out.append('<p class="caption">ECE: patient-weighted mean gap between observed rate and mean predicted risk '
               "over the bins (0 = perfect). Slope and intercept: logistic recalibration at the site (slope 1 and "
               "intercept 0 = well calibrated; slope &lt; 1: risks too extreme); pooled: random effects across "
               "sites.</p>")
    return "".join(out)


def _bins_table(wide: pd.DataFrame, regs, sps, tab_dir: Path) -> str:
    """The pooled reliability bins (counts behind the diagram): tables/reliability_bins.csv and a folded table."""
    pooled = wide[wide["site"] == POOLED]
    rows = []
    for reg in regs:
        for sp in sps:
            d = pooled[(pooled["regime"] == reg) & (pooled["split"] == sp)]
            if d.empty:
                continue
            supp = d.iloc[0]["status"] == "suppressed"
            for b in reliability_bins(d.iloc[0]).itertuples(index=False):
                if not supp and not any(finite(v) for v in (b.lo, b.hi, b.n, b.mean_p)):
                    continue
                withheld = supp or not finite(b.n)
                rows.append([reg, sp, str(b.bin),
                             f"{b.lo:.2f}–{b.hi:.2f}" if finite(b.lo) and finite(b.hi) else "",
                             WITHHELD_TEXT if withheld else _count(b.n),
                             "" if withheld else _count(b.positives),
                             "" if withheld or not finite(b.mean_p) else f"{b.mean_p:.3f}",
                             "" if withheld or not finite(b.observed) else f"{b.observed:.3f}"])
    cols = ["regime", "split", "bin", "predicted risk", "n", "positives", "mean predicted", "observed rate"]
    pd.DataFrame(rows, columns=cols).to_csv(tab_dir / "reliability_bins.csv", index=False)
    if not rows:
        return ""
    body = [[html.escape(x) if x != WITHHELD_TEXT else WITHHELD_HTML for x in r] for r in rows]
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    return ("<details><summary>Pooled reliability bins (counts behind the diagram)</summary>"
            + html_table([head], body, left_cols=2) + "</details>")


def gaps_section(tests: dict, tab_dir: Path) -> str:
    if not tests["available"]["subgroup_gaps"]:
        return ""
    g = tests["tables"]["subgroup_gaps"]
    rows, body = [], []
    if g is not None and len(g):
        g = g.assign(_g=[GROUPINGS.index(x) if x in GROUPINGS else len(GROUPINGS) for x in g["grouping"]],
                     _p=(g["site"] == POOLED)).sort_values(["split", "_g", "regime", "_p"], kind="stable")
    for _, r in (g.iterrows() if g is not None else []):
        shown = r["status"] == "ok"
        supp = r["status"] == "suppressed"
        sig = shown and finite(r["p_adj"]) and r["p_adj"] < ALPHA
        row = [r["site"], r["regime"], r["split"], r["grouping"], "" if supp else r["best"],
               "" if supp else r["worst"], signed(r["gap"]) if shown else "",
               interval(r["lo"], r["hi"]) if shown and finite(r["gap"]) else "",
               p_text(r["p"]) if shown else "", p_text(r["p_adj"]) if shown else "",
               WITHHELD_TEXT if supp else r["status"]]
        rows.append(row)
        h = [html.escape(x) for x in row[:-1]] + [_status_html(r["status"])]
        if sig:
            h[6] = f"<strong>{h[6]}</strong> *"
        body.append(h)
    cols = ["site", "regime", "split", "grouping", "best band", "worst band", "gap", "95 % interval", "p", "p_adj",
            "status"]
    pd.DataFrame(rows, columns=cols).to_csv(tab_dir / "subgroup_gaps.csv", index=False)
    head = "<tr>" + "".join(f'<th class="l">{c}</th>' if i < 6 else f"<th>{c}</th>" for i, c in enumerate(cols)) \
        + "</tr>"
    return ("<h2>Subgroup gaps</h2>" + html_table([head], body, left_cols=6)
            + '<p class="caption">Per grouping, the best- and worst-served band by AUC among the released bands; '
            "gap = AUC(best) − AUC(worst) with its 95 % interval (independent bands). Pooled: random effects "
            f"of the sites' gaps. p_adj: Holm over this table; * = p_adj &lt; {ALPHA}.</p>")
