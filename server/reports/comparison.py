"""The report of a comparison study, rebuilt from RUN_DIR's files alone.

Inputs: metrics.csv (rows of every arm, with `arm` and `task`), comparison.csv
(paired differences per site and overall), costs.csv and run.json. Output:
report.html with the comparison section (AUC per arm, paired differences vs the
reference arm per site and overall, accuracy against cost, the unseen-task
check), figures/*.png and tables/*.csv. Each arm's full study report is in
arms/<arm>/report.html and linked from here.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from clinfed.server.analysis import read_csv, read_metrics  # noqa: E402
from clinfed.server.reports.toolkit import CSS, f3, human_bytes, human_seconds, img, kv_table, simple_table  # noqa: E402

SPLITS = ("test", "temporal")
SPLIT_TEXT = {"test": "random test split", "temporal": "temporal test split (most recent encounters)"}
METHOD_TEXT = {
    "lora": "LoRA adapters on the attention projections, plus the head",
    "head-only": "the classification head alone (for BERT-like encoders with the pooler); the backbone frozen",
    "full": "every weight of the model (the whole model travels each round)",
}
FORM_TEXT = {
    "cls": "a classification head on the model's last representation",
    "prompt": "the readmission question as a yes/no instruction to the decoder; score = P(yes)/(P(yes)+P(no)) "
              "of the first answer token",
}
PROMPT_METHOD = ("LoRA adapters on the attention projections, no classification head (the answer comes from "
                 "the decoder's own language-model head)")
PUBLIC_METRIC = {"pubmedqa": "accuracy", "meqsum": "rouge_l"}


def is_comparison(run_dir) -> bool:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text()).get("kind") == "comparison"
    except (OSError, ValueError):
        return False


def _num(df: pd.DataFrame, cols) -> pd.DataFrame:
    for c in cols:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _fmt_ci(v, lo, hi, signed=False) -> str:
    if v is None or not np.isfinite(v):
        return ""
    f = (lambda x: f"{x:+.3f}") if signed else f3
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        return f"{f(v)} [{f(lo)}, {f(hi)}]"
    return f(v)


def _auc_table(metrics: pd.DataFrame, arms: list[str], regime: str, split: str) -> pd.DataFrame:
    """AUC [95 % CI] per site (rows) and arm (columns), with the mean over sites."""
    m = metrics[(metrics["regime"] == regime) & (metrics["split"] == split) & (metrics["subgroup"] == "all")
                & (metrics["task"] == "readmission")]
    sites = sorted(set(m["site"]))
    rows = []
    for site in sites:
        row = {"site": site}
        for arm in arms:
            c = m[(m["site"] == site) & (m["arm"] == arm)]
            get = lambda metric: c[c["metric"] == metric]  # noqa: E731
            auc = get("auc")
            if auc.empty:
                row[arm] = "suppressed" if (c["status"] == "suppressed").any() else ""
                continue
            st = auc["status"].iloc[0]
            if st != "ok":
                row[arm] = "suppressed" if st == "suppressed" else "n/c"
                continue
            v = float(auc["value"].iloc[0])
            lo, hi = (float(get(x)["value"].iloc[0]) if len(get(x)) else np.nan for x in ("auc_lo", "auc_hi"))
            row[arm] = _fmt_ci(v, lo, hi)
        rows.append(row)
    mean = {"site": "mean over sites"}
    for arm in arms:
        vals = m[(m["arm"] == arm) & (m["metric"] == "auc") & (m["status"] == "ok")]["value"]
        mean[arm] = f"{vals.mean():.3f} ({len(vals)} sites)" if len(vals) else ""
    rows.append(mean)
    return pd.DataFrame(rows, columns=["site"] + arms)


def _mean_auc(metrics: pd.DataFrame, arm: str, regime: str, split: str) -> tuple[float, int]:
    m = metrics[(metrics["arm"] == arm) & (metrics["regime"] == regime) & (metrics["split"] == split)
                & (metrics["subgroup"] == "all") & (metrics["metric"] == "auc") & (metrics["status"] == "ok")
                & (metrics["task"] == "readmission")]
    return (float(m["value"].mean()) if len(m) else float("nan")), len(m)


def _diff_table(diffs: pd.DataFrame, reference: str, arms: list[str], regime: str, split: str) -> pd.DataFrame:
    d = diffs[(diffs["reference"] == reference) & (diffs["regime"] == regime) & (diffs["split"] == split)]
    sites = sorted(s for s in set(d["site"]) if s != "overall") + (["overall"] if (d["site"] == "overall").any() else [])
    rows = []
    for site in sites:
        row = {"site": site}
        for arm in arms:
            c = d[(d["site"] == site) & (d["arm"] == arm)]
            if c.empty:
                row[arm] = ""
                continue
            c = c.iloc[0]
            if c["status"] == "suppressed":
                row[arm] = "suppressed"
            elif c["status"] != "ok":
                row[arm] = "n/c"
            else:
                row[arm] = _fmt_ci(c["diff"], c["diff_lo"], c["diff_hi"], signed=True)
        rows.append(row)
    return pd.DataFrame(rows, columns=["site"] + arms)


def _cost_table(costs: pd.DataFrame, metrics: pd.DataFrame, regime: str, split: str) -> pd.DataFrame:
    rows = []
    for r in costs.itertuples(index=False):
        auc, n_sites = _mean_auc(metrics, r.arm, regime, split)
        share = f" ({100 * r.trainable_share:.2f} %)" if pd.notna(r.trainable_share) else ""
        rows.append({
            "arm": r.arm, "status": r.status,
            f"mean AUC ({regime}, {split})": f"{auc:.3f}" if np.isfinite(auc) else "",
            "trainable parameters": (f"{int(r.trainable_parameters):,}{share}" if pd.notna(r.trainable_parameters)
                                     else ""),
            "bytes per round per site (sent + received)": human_bytes(
                r.bytes_per_round_per_site if pd.notna(r.bytes_per_round_per_site)
                else r.bytes_per_round_per_site_planned),
            "train time per site (mean / max)": (f"{human_seconds(r.train_seconds_per_site)} / "
                                                 f"{human_seconds(r.train_seconds_per_site_max)}"
                                                 if pd.notna(r.train_seconds_per_site) else ""),
            "peak RSS per site (mean / max)": (f"{r.peak_rss_mb_per_site:,.0f} / {r.peak_rss_mb_max:,.0f} MB"
                                               if pd.notna(r.peak_rss_mb_per_site) else ""),
            "arm wall time": human_seconds(r.wall_seconds) if pd.notna(r.wall_seconds) else "",
            "note": r.note if isinstance(r.note, str) else "",
        })
    return pd.DataFrame(rows)


def _public_table(metrics: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    p = metrics[metrics["site"] == "public"]
    rows = []
    for arm in arms:
        a = p[p["arm"] == arm]
        row = {"arm": arm}
        for task, metric in PUBLIC_METRIC.items():
            for regime in ("base", "global"):
                col = f"{task} {metric} ({regime})"
                c = a[(a["task"] == task) & (a["regime"] == regime)]
                if c.empty:
                    row[col] = ""
                elif (c["status"] == "not_applicable").all():
                    row[col] = "not applicable"
                elif (c["status"] == "not_computable").all():
                    row[col] = "not computed"
                else:
                    v = c[c["metric"] == metric]["value"]
                    n = c[c["metric"] == metric]["n"]
                    row[col] = f"{float(v.iloc[0]):.3f} (n={int(n.iloc[0])})" if len(v) and pd.notna(v.iloc[0]) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _fig_cost(costs: pd.DataFrame, metrics: pd.DataFrame, regime: str, splits, path: Path) -> bool:
    pts = []
    for r in costs.itertuples(index=False):
        b = r.bytes_per_round_per_site if pd.notna(r.bytes_per_round_per_site) else np.nan
        t = r.train_seconds_per_site if pd.notna(r.train_seconds_per_site) else np.nan
        for split in splits:
            auc, _ = _mean_auc(metrics, r.arm, regime, split)
            if np.isfinite(auc) and np.isfinite(b):
                pts.append((r.arm, split, b, t, auc))
    if not pts:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marks = {"test": "o", "temporal": "s"}
    colors = {a: c for a, c in zip(dict.fromkeys(p[0] for p in pts), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)}
    for ax, idx, label in ((axes[0], 2, "bytes per round per site (sent + received)"),
                           (axes[1], 3, "training seconds per site (whole study)")):
        for arm, split, b, t, auc in pts:
            x = (b, t)[idx - 2]
            if not np.isfinite(x):
                continue
            ax.scatter([x], [auc], marker=marks.get(split, "o"), color=colors[arm], s=50,
                       label=f"{arm} ({split})")
            ax.annotate(arm, (x, auc), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"mean AUC over sites ({regime})")
        ax.axhline(0.5, ls="--", color="#999", lw=0.8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower center", ncol=min(4, len(uniq)))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _findings(metrics, diffs, costs, arms, reference, regime, run) -> list[str]:
    out = []
    for split in SPLITS:
        means = {a: _mean_auc(metrics, a, regime, split)[0] for a in arms}
        means = {a: v for a, v in means.items() if np.isfinite(v)}
        if not means:
            continue
        best = max(means, key=means.get)
        out.append(f"On the {SPLIT_TEXT[split]}, `{regime}` regime: the highest mean AUC over sites is "
                   f"<strong>{html.escape(best)}</strong> ({means[best]:.3f}); "
                   + ", ".join(f"{html.escape(a)} {v:.3f}" for a, v in means.items() if a != best) + ".")
        d = diffs[(diffs["site"] == "overall") & (diffs["reference"] == reference) & (diffs["regime"] == regime)
                  & (diffs["split"] == split)]
        for r in d.itertuples(index=False):
            if not np.isfinite(r.diff):
                continue
            sig = ("its interval excludes 0" if np.isfinite(r.diff_lo) and (r.diff_lo > 0 or r.diff_hi < 0)
                   else "its interval includes 0: no clear difference")
            out.append(f"{html.escape(r.arm)} − {html.escape(reference)} ({split}): "
                       f"{_fmt_ci(r.diff, r.diff_lo, r.diff_hi, signed=True)} overall; {sig} "
                       f"({html.escape(str(r.note).split('; ', 2)[-1])}).")
    c = costs[costs["status"] == "completed"]
    if len(c) >= 2 and c["bytes_per_round_per_site"].notna().all():
        lo, hi = c.loc[c["bytes_per_round_per_site"].idxmin()], c.loc[c["bytes_per_round_per_site"].idxmax()]
        out.append(f"Cost: one round moves {human_bytes(lo.bytes_per_round_per_site)} per site for "
                   f"{html.escape(lo.arm)} and {human_bytes(hi.bytes_per_round_per_site)} for "
                   f"{html.escape(hi.arm)} ({hi.bytes_per_round_per_site / max(1, lo.bytes_per_round_per_site):.0f}×).")
    for arm, why in (run.get("refused") or {}).items():
        out.append(f"Refused: {html.escape(why)}")
    return out


def build_comparison_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    fig_dir, tab_dir = run_dir / "figures", run_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)
    run = json.loads((run_dir / "run.json").read_text())
    config = run.get("config") or {}
    metrics = read_metrics(run_dir)
    for col in ("arm", "task"):
        if col not in metrics.columns:
            metrics[col] = ""
        metrics[col] = metrics[col].astype(str)
    diffs = read_csv(run_dir / "comparison.csv")
    diffs = _num(diffs if diffs is not None else pd.DataFrame(columns=["site", "reference", "arm", "regime",
                                                                        "split", "diff", "diff_lo", "diff_hi",
                                                                        "n", "positives", "status", "note"]),
                 ["diff", "diff_lo", "diff_hi", "n", "positives"])
    costs = read_csv(run_dir / "costs.csv")
    costs = _num(costs if costs is not None else pd.DataFrame(columns=["arm", "status", "note"]),
                 ["trainable_parameters", "total_parameters", "trainable_share", "bytes_per_round_per_site",
                  "bytes_per_round_per_site_planned", "train_seconds_per_site", "train_seconds_per_site_max",
                  "peak_rss_mb_per_site", "peak_rss_mb_max", "wall_seconds", "evaluate_seconds"])
    arm_info = run.get("arms") or []
    arms = [a["name"] for a in arm_info]
    done = [a for a in arms if a in set(run.get("arms_completed") or [])]
    reference = arms[0] if arms else ""
    regimes = [r for r in ("base", "global", "local", "personalized", "cluster", "similarity-weighted",
                           "augmented", "fedrep", "ditto", "ifca", "interpolated") if r in set(metrics["regime"])]
    main_regime = "global" if "global" in regimes else (regimes[0] if regimes else "global")
    status = str(run.get("status", "unknown"))
    esc = html.escape

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>clinfed comparison — {esc(run_dir.name)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>clinfed comparison study: {esc(run_dir.name)}</h1>"]
    errs = run.get("errors") or []
    if status != "completed":
        parts.append(f'<div class="banner failed">Run status: {esc(status)} — results may be partial.'
                     + ("<ul>" + "".join(f"<li>{esc(e)}</li>" for e in errs) + "</ul>" if errs else "") + "</div>")
    elif errs:
        parts.append('<div class="banner running">The run completed with notes:<ul>'
                     + "".join(f"<li>{esc(e)}</li>" for e in errs) + "</ul></div>")
    total = (run.get("timings") or {}).get("total")
    meta = [("Arms", ", ".join(arms)), ("Completed arms", len(done)), ("Sites", len(set(metrics["site"]) - {"public"})),
            ("Regimes", ", ".join(regimes)), ("Status", status),
            ("Total wall time", human_seconds(total) if total is not None else ""),
            ("Date", str(run.get("finished") or run.get("started") or "")),
            ("Report built", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    parts.append('<table class="meta">' + "".join(
        f"<tr><td><strong>{esc(a)}</strong></td><td>{esc(str(b))}</td></tr>" for a, b in meta) + "</table>")

    items = "".join(f"<li><strong>{esc(a['name'])}</strong>: base model <code>{esc(a['model'])}</code>; "
                    f"{esc(PROMPT_METHOD if a['form'] == 'prompt' else METHOD_TEXT.get(a['method'], a['method']))}; "
                    f"{esc(FORM_TEXT.get(a['form'], a['form']))}. "
                    f'<a href="{esc(a["folder"])}/report.html">full study report of this arm</a></li>'
                    for a in arm_info)
    parts.append(
        '<h2>How to read this</h2><div class="howto">'
        "<p>Every arm ran the same regimes on the same hospitals, the same train/test items and the same seeds, "
        "so at each site the arms' AUCs are <em>paired</em>. Arms:</p>"
        f"<ul>{items}</ul>"
        "<p><strong>Paired difference</strong>: at each site, AUC(arm) − AUC(reference arm) on the same test items; "
        "its 95 % interval is a paired bootstrap computed at the site (each resample scores both arms on the same "
        "resampled patients). Only these aggregates left the sites; per-patient scores stayed in each site's own "
        f"folder. <strong>Overall</strong>: {esc(run.get('overall_method', ''))}. Cells with fewer than k = "
        f"{esc(str(config.get('min-cell-size', 10)))} patients, positives or negatives are <span class=\"supp\">suppressed</span>.</p>"
        "<p><strong>Cost</strong>, measured: trainable parameters (what one update carries); bytes of model arrays "
        "sent to and received from one site in one federated round; training seconds per site over the whole study "
        "(federated rounds plus site-held regimes); peak resident memory of the site's process during training "
        "(sampled every 50 ms; in a simulation one worker process serves several sites and arms in turn).</p></div>")

    parts.append('<h2>Comparison</h2><section id="comparison">')
    findings = _findings(metrics, diffs, costs, done, reference, main_regime, run)
    if findings:
        parts.append("<h3>Key findings</h3><ul>" + "".join(f"<li>{f}</li>" for f in findings) + "</ul>")

    for split in SPLITS:
        if not (metrics["split"] == split).any():
            continue
        for regime in regimes:
            t = _auc_table(metrics, done, regime, split)
            t.to_csv(tab_dir / f"auc_{regime}_{split}.csv", index=False)
            parts.append(f"<h3>AUC [95 % CI] per site and arm — {esc(regime)}, {esc(SPLIT_TEXT[split])}</h3>"
                         + simple_table(t))
            others = [a for a in done if a != reference]
            dt = _diff_table(diffs, reference, others, regime, split)
            if len(dt):
                dt.to_csv(tab_dir / f"diff_{regime}_{split}.csv", index=False)
                parts.append(f"<p class=\"caption\">Paired AUC difference vs the reference arm <strong>"
                             f"{esc(reference)}</strong> (arm − reference) [95 % paired-bootstrap interval], "
                             f"{esc(regime)}, {esc(split)}; last row: overall.</p>" + simple_table(dt))
    if len(done) > 2:
        others = diffs[(diffs["reference"] != reference) & (diffs["site"] == "overall")
                       & (diffs["regime"] == main_regime)].copy()
        if len(others):
            others["difference"] = [_fmt_ci(r.diff, r.diff_lo, r.diff_hi, signed=True)
                                    for r in others.itertuples(index=False)]
            parts.append(f"<h3>Other pairs (overall, {esc(main_regime)})</h3>"
                         + simple_table(others[["reference", "arm", "split", "difference", "n"]], left_cols=3))

    parts.append("<h3>Accuracy against cost</h3>")
    ct = _cost_table(costs, metrics, main_regime, "test")
    ct.to_csv(tab_dir / "costs.csv", index=False)
    parts.append(simple_table(ct) if len(ct) else "<p>No cost records.</p>")
    f_cost = fig_dir / "auc_vs_cost.png"
    if _fig_cost(costs[costs["status"] == "completed"], metrics, main_regime, SPLITS, f_cost):
        parts.append(img(f_cost, "Mean AUC against bytes per round and training time")
                     + '<p class="caption">Each point: one arm on one test split (circle: random; square: '
                       f"temporal), mean AUC over sites of the {esc(main_regime)} regime, against what it cost. "
                       "Up and to the left is better.</p>")

    parts.append("<h3>Unseen tasks (public PubMedQA and MeQSum)</h3>")
    pt = _public_table(metrics, done)
    pt.to_csv(tab_dir / "public.csv", index=False)
    n_items = config.get("gen-eval-items", "")
    parts.append(
        "<p>Each arm's base and final global model answer public test items the tuning never saw (PubMedQA: "
        f"accuracy of yes/no/maybe; MeQSum: ROUGE-L of the summary; {esc(str(n_items))} items each, scored at "
        "the server on public text). A method that wins on readmission but loses here trades general ability "
        "for the tuned task. Encoder arms with a classification head cannot answer free text: "
        "<em>not applicable</em>, no number is given. A decoder classifier arm is scored with its LoRA on the "
        "decoder's language-model head (the classification head unused).</p>"
        + (simple_table(pt) if len(pt) else "<p>No public scores.</p>"))
    parts.append("</section>")

    refused = run.get("refused") or {}
    if refused:
        parts.append("<h2>Refused arms</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in refused.values()) + "</ul>")
    timings = run.get("timings") or {}
    tdf = pd.DataFrame([{"phase": k, "wall time": human_seconds(v)} for k, v in timings.items()])
    parts.append("<h2>Timings</h2>" + (simple_table(tdf) if len(tdf) else "<p>No timings.</p>"))
    parts.append("<h2>Configuration and versions</h2>")
    parts.append("<details><summary>Run configuration</summary>" + simple_table(kv_table(config, "key", "value"))
                 + "</details>")
    parts.append("<details><summary>Software versions</summary>"
                 + simple_table(kv_table(run.get("versions") or {}, "package", "version")) + "</details>")
    parts.append('<p class="foot">Tables: tables/*.csv; paired differences: comparison.csv; costs: costs.csv; '
                 "each arm's own study: arms/&lt;arm&gt;/.</p></body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
