"""Report of a generative (instruction-tuning) study, from RUN_DIR's files alone.

Per task: every site's score by stage and regime (base -> SFT -> DPO), the
mean over sites, and a figure of the stage progression. Only aggregates the
sites released are shown; no generation of a site is ever available here.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from clinfed.server.reports.toolkit import png  # noqa: E402

HEADLINE = {"triage": ["urgency_f1", "personnel_f1"], "extraction": ["f1", "unparseable_share"],
            "readmission": ["auc", "f1"], "pubmedqa": ["accuracy", "macro_f1"], "meqsum": ["rouge_l"]}
CELL_ORDER = [("base", "base"), ("sft", "global"), ("sft", "local"), ("dpo", "global"), ("dpo", "local"),
              ("dpo", "personalized")]


def is_generative(run_dir) -> bool:
    path = Path(run_dir) / "metrics.csv"
    return path.exists() and "task" in pd.read_csv(path, nrows=0).columns


def _holdout_section(df: pd.DataFrame, task: str) -> str:
    """The multi-task effect: the held-out task's score, mean over sites, before and after
    tuning on the other tasks (leave-one-task-out)."""
    rows = []
    for metric in HEADLINE.get(task, []):
        m = df[(df["task"] == task) & (df["metric"] == metric) & (df["site"] != "public")]
        if not len(m):
            continue
        means = m.groupby(["stage", "regime"])["value"].mean()
        rows.append({"metric": metric, **{f"{s}: {r}": means.get((s, r)) for s, r in CELL_ORDER if (s, r) in means}})
    if not rows:
        return ""
    table = pd.DataFrame(rows).set_index("metric")
    return (f"<h2>Multi-task effect: {html.escape(task)} held out</h2><p>No {html.escape(task)} item was trained "
            "on at any site; the adapters were tuned on the other tasks only. The table is the mean over sites of "
            f"the zero-shot {html.escape(task)} scores: a rise from <b>base</b> is the transfer of multi-task "
            "instruction tuning to an unseen task.</p>" + table.to_html(float_format=lambda x: f"{x:.3f}", na_rep="-"))


TICK = "\u2713"


def _examples_section(path: Path) -> str:
    """Generations on the server's own synthetic probe items (never a site's items)."""
    if not path.exists():
        return ""
    items = json.loads(path.read_text())
    if not items:
        return ""
    parts = ["<h2>Example generations (synthetic probe items)</h2><p>Items of a made-up hospital that the server "
             "generated itself; sites' own generations never leave them. \u2713 = exactly right.</p>"]
    for it in items:
        cells = "".join(f"<tr><td>{html.escape(cell)}</td><td>{TICK if out['correct'] else ''}</td>"
                        f"<td><pre>{html.escape(out['text'])}</pre></td></tr>" for cell, out in it["outputs"].items())
        parts.append(f"<h4>{html.escape(it['task'])}{' (held out)' if it.get('held_out') else ''}</h4>"
                     f"<pre style='white-space:pre-wrap'>{html.escape(it['input'])}</pre>"
                     f"<table><tr><th>adapter</th><th></th><th>output</th></tr>"
                     f"<tr><td>expected</td><td></td><td><pre>{html.escape(it['expected'])}</pre></td></tr>{cells}</table>")
    return "\n".join(parts)


def build_generative_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    (run_dir / "figures").mkdir(exist_ok=True)
    (run_dir / "tables").mkdir(exist_ok=True)
    df = pd.read_csv(run_dir / "metrics.csv")
    df = df[~df["metric"].astype(str).str.startswith("dp_")]  # DP accounting: see run.json
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    cfg = run.get("config", {})
    parts = [
        "<h1>clinfed generative study</h1>",
        f"<p>Status: <b>{html.escape(str(run.get('status', 'unknown')))}</b>; decoder "
        f"<code>{html.escape(str(cfg.get('decoder', '?')))}</code>; sites: {df['site'].nunique()}; "
        f"{cfg.get('num-server-rounds', '?')} SFT round(s) of {cfg.get('sft-steps', '?')} steps, "
        f"{cfg.get('dpo-rounds', '?')} DPO round(s) of {cfg.get('dpo-steps', '?')} steps; "
        f"total {run.get('timings', {}).get('total', float('nan')):.0f} s.</p>",
        "<p>How to read: <b>base</b> is the pretrained decoder; <b>global</b> is the federated adapter after "
        "SFT, then after DPO (DPO's reference policy is the global SFT adapter it starts from); <b>local</b> is "
        "SFT then DPO at the site alone; <b>personalized</b> is the global DPO adapter fine-tuned at the site. "
        "Scores are computed at each site on its own test items; a task with fewer than k items (for the readmission question: k readmitted and k not) is withheld. "
        "Unparseable outputs count as wrong.</p>",
    ]
    for err in run.get("errors") or []:
        parts.append(f"<p style='color:#a00'>{html.escape(str(err))}</p>")
    held_out = str(cfg.get("gen-holdout-task", "") or "")
    if held_out and held_out in set(df["task"]):
        parts.append(_holdout_section(df, held_out))
    for task in [t for t in HEADLINE if t in set(df["task"])]:
        sub = df[df["task"] == task]
        metrics = [m for m in HEADLINE[task] if m in set(sub["metric"])]
        role = (" (held out of training: zero-shot)" if task == held_out else
                " (public text, scored at the server: unseen by the tuning)" if task in ("pubmedqa", "meqsum") else "")
        parts.append(f"<h2>{html.escape(task)}{role}</h2>")
        for metric in metrics:
            m = sub[sub["metric"] == metric]
            table = m.pivot_table(index="site", columns=["stage", "regime"], values="value")
            cols = [c for c in CELL_ORDER if c in table.columns]
            table = table[cols]
            table.loc["mean over sites"] = table.mean()
            table.columns = [f"{s}: {r}" for s, r in cols]
            table.round(4).to_csv(run_dir / "tables" / f"generative_{task}_{metric}.csv")
            parts.append(f"<h3>{html.escape(metric)}</h3>" + table.to_html(float_format=lambda x: f"{x:.3f}",
                                                                           na_rep="withheld"))
            fig, ax = plt.subplots(figsize=(7, 3))
            means = table.loc["mean over sites"]
            ax.bar(range(len(means)), means.values, color="#4477aa")
            ax.set_xticks(range(len(means)), means.index, rotation=30, ha="right")
            ax.set_ylabel(metric)
            ax.set_title(f"{task}: {metric}, mean over sites")
            fig.savefig(run_dir / "figures" / f"generative_{task}_{metric}.png", dpi=110, bbox_inches="tight")
            parts.append(f"<img src='data:image/png;base64,{png(fig)}'>")
    parts.append(_examples_section(run_dir / "examples.json"))
    rounds = pd.DataFrame([{k: r.get(k) for k in ("phase", "round", "bytes_sent", "bytes_received", "seconds")}
                           for r in run.get("rounds", [])])
    if len(rounds):
        parts.append("<h2>Rounds</h2>" + rounds.to_html(index=False))
    parts.append("<details><summary>Configuration</summary><pre>"
                 + html.escape(json.dumps(cfg, indent=1)) + "</pre></details>")
    out = run_dir / "report.html"
    out.write_text("<!doctype html><meta charset='utf-8'><title>clinfed generative study</title>"
                   "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
                   "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style>"
                   + "\n".join(parts))
    return out
