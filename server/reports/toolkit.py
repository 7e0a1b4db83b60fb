"""The reports' shared toolkit: one stylesheet, table and figure helpers, number formats.

Every report (`classifier`, `generative`, `comparison`) is a self-contained HTML
page with its figures embedded as PNG, built from RUN_DIR's files alone, with
these same pieces, so the three look and read alike.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless servers and CI: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

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
.wrapnote table.data td:last-child{white-space:normal;text-align:left;min-width:16em}
"""


def f3(v: float) -> str:
    return f"{v:.3f}"


def human_bytes(b: Any) -> str:
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


def human_seconds(s: Any) -> str:
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


def html_table(header_rows: list[str], body: list[list[str]], left_cols: int = 1) -> str:
    out = ['<table class="data">', "<thead>", *header_rows, "</thead>", "<tbody>"]
    for row in body:
        tds = "".join(f'<td class="l">{c}</td>' if i < left_cols else f"<td>{c}</td>" for i, c in enumerate(row))
        out.append(f"<tr>{tds}</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def simple_table(df: pd.DataFrame, left_cols: int = 1) -> str:
    head = "<tr>" + "".join(
        f'<th class="l">{html.escape(str(c))}</th>' if i < left_cols else f"<th>{html.escape(str(c))}</th>"
        for i, c in enumerate(df.columns)) + "</tr>"
    body = [[html.escape("" if (isinstance(v, float) and not np.isfinite(v)) else str(v)) for v in row]
            for row in df.itertuples(index=False)]
    return html_table([head], body, left_cols)


def img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def kv_table(d: dict, key: str, value: str) -> pd.DataFrame:
    rows = [{key: str(k), value: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)}
            for k, v in d.items()]
    return pd.DataFrame(rows, columns=[key, value])


def png(fig) -> str:
    """A matplotlib figure as base64 PNG (closed afterwards), for an <img> in a self-contained page."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
