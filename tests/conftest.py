"""Shared fixtures: tiny federations and quiet, offline libraries."""

import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


# Small test federations need cells smaller than the default k = 10: only a site's own policy
# file may allow that (the run config can only make a site stricter), so each test hospital's
# file sets k = 5 on top of the synthetic hospitals' policy.
SMALL_CELLS_POLICY = "min-cell-size = 5\n"


def small_cells_policy():
    from clinfed.simulations.generate import SYNTHETIC_SITE_POLICY

    return SYNTHETIC_SITE_POLICY + SMALL_CELLS_POLICY


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory):
    """Three generated hospitals, small enough for a tiny-model study in seconds; each one's
    policy file allows cells of 5 (studies that want them also ask for min-cell-size = 5)."""
    from clinfed.simulations.generate import generate_federation

    out = tmp_path_factory.mktemp("fed")
    generate_federation(out, n_hospitals=3, seed=7, sizes=[220, 160, 120], site_policy=small_cells_policy())
    return out


@pytest.fixture
def fresh_federation(small_federation, tmp_path):
    """A private copy of the small federation: for studies whose sites keep lasting state
    beside their data (the DP ledger), so no other test's spending counts against them."""
    import shutil

    return Path(shutil.copytree(small_federation, tmp_path / "fed", ignore=shutil.ignore_patterns("clinfed-out")))


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests (each starts a Flower engine, 40 s to 4 min) first: the suite
    runs on pytest-xdist workers (pyproject's addopts), and a long test started last would run
    alone at the end while the other workers sit idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
