"""The ServerApp: read the run config once, pick RUN_DIR, run the study protocol it names.

`app` is what a coordinator's SuperLink runs; a simulation builds the same app
with what only synthetic data can offer (`clinfed.simulations.app`: example
generations on items of a made-up hospital for the generative study's report).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clinfed.common.config import resolve
from clinfed.server.generative_study import GenerativeStudy
from clinfed.server.study import Study


def run_dir_for(cfg: dict) -> Path:
    """RUN_DIR: `out-dir` if given, else ./runs/<timestamp> under the launching folder."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    base = Path(os.environ.get("CLINFED_RUNS", "runs"))
    return (base / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


def build_server_app(probe_items: Callable[[int, int], dict] | None = None) -> ServerApp:
    """The ServerApp; `probe_items(seed, n)` gives the generative report's example items (simulation only)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # quiet transformers through its environment, should anything in this process import it
        # (importing it here only to set its verbosity cost the server seconds of CPU per study)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        cfg = resolve(dict(context.run_config))
        if str(cfg.get("arms", "")).strip():
            from clinfed.server.comparison import Comparison

            Comparison(grid, cfg, run_dir_for(cfg)).execute()
            return
        kind = GenerativeStudy if cfg.task == "generative" else Study
        kind(grid, cfg, run_dir_for(cfg), probe_items=probe_items).execute()

    return server_app


app = build_server_app()
