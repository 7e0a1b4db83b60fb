"""Shared fixtures: tiny federations and quiet, offline libraries."""

import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory):
    """Three generated hospitals, small enough for a tiny-model study in seconds."""
    from simulations.generate import generate_federation

    out = tmp_path_factory.mktemp("fed")
    generate_federation(out, n_hospitals=3, seed=7, sizes=[220, 160, 120])
    return out
