"""The study's reports, rebuilt from RUN_DIR's files alone; `build_report` picks the one a run needs.

A comparison of arms, a generative (instruction-tuning) study and the classifier
study each have their own report (`comparison`, `generative`, `classifier`), made
from one toolkit (`toolkit`). The ServerApp and `clinfed report` both call
`build_report`, so the choice is made in one place.
"""

from __future__ import annotations

from pathlib import Path

from clinfed.server.reports.classifier import build_classifier_report
from clinfed.server.reports.comparison import build_comparison_report, is_comparison
from clinfed.server.reports.generative import build_generative_report, is_generative


def build_report(run_dir) -> Path:
    """The report this RUN_DIR's study calls for, written into RUN_DIR; returns its path."""
    if is_comparison(run_dir):
        return build_comparison_report(run_dir)
    if is_generative(run_dir):
        return build_generative_report(run_dir)
    return build_classifier_report(run_dir)


__all__ = ["build_report", "build_classifier_report", "build_comparison_report", "build_generative_report",
           "is_comparison", "is_generative"]
