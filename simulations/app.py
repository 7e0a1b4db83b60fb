"""The Flower app of a simulation: the hospitals' ClientApp and the ServerApp, with what only synthetic data allows.

`clinfed simulate` and `flwr run .` run these. They are `clinfed.client.app` and
`clinfed.server.app` built with the capabilities a real federation cannot have:
a simulated site finds the default synthetic federation when the run config
names no `data-dir`; the `augmented` regime borrows other sites' records (every
record is synthetic); the server writes example generations on items of a
made-up hospital. A hospital's node never runs this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from clinfed.client.app import build_app
from clinfed.client.locate import SimulationSupport
from clinfed.server.app import build_server_app
from clinfed.simulations.augment import borrow
from clinfed.simulations.generate import ensure_federation
from clinfed.simulations.generative import probe_items


def default_federation(cfg: dict) -> Path:
    """The default synthetic federation of `hospitals` hospitals and `seed`, generated once per machine."""
    root = Path(os.environ.get("CLINFED_CACHE", Path.home() / ".cache" / "clinfed"))
    return ensure_federation(root / f"federation-h{cfg['hospitals']}-s{cfg['seed']}",
                             n_hospitals=cfg.hospitals, seed=cfg.seed)


SUPPORT = SimulationSupport(federation=default_federation, borrow=borrow)
app = build_app(SUPPORT)
server_app = build_server_app(probe_items=probe_items)
