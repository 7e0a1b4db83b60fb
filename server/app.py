"""The ServerApp: read the run config, pick RUN_DIR, run the study protocol."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import resolve
from server.study import Study

app = ServerApp()


def run_dir_for(cfg: dict) -> Path:
    """RUN_DIR: `out-dir` if given, else ./runs/<timestamp> under the launching folder."""
    if cfg["out-dir"]:
        return Path(cfg["out-dir"]).expanduser().resolve()
    base = Path(os.environ.get("CLINFED_RUNS", "runs"))
    return (base / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = resolve(dict(context.run_config))
    if str(cfg.get("arms", "")).strip():
        from server.compare import Comparison

        Comparison(grid, cfg, run_dir_for(cfg)).execute()
        return
    Study(grid, cfg, run_dir_for(cfg)).execute()
