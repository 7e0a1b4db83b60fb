"""The hospital's ClientApp: the egress guard in front of every reply, and which handler serves which message.

Handlers are in `client.classifier_handlers` and `client.generative_handlers`;
the message types are `common.protocol`'s. `common.privacy.egress_guard` is a
Flower mod on the app itself, so no handler can send anything it has not checked.
`app` is what a hospital's node runs; a simulation builds the same app with what
only a simulation on synthetic data can offer (`clinfed.simulations.app`).
"""

from __future__ import annotations

from functools import partial

from flwr.clientapp import ClientApp

from clinfed.client import classifier_handlers as classifier
from clinfed.client import generative_handlers as generative
from clinfed.client.locate import SimulationSupport
from clinfed.common import privacy, protocol

HANDLERS = {
    protocol.DESCRIBE: classifier.describe,
    protocol.TRAIN: classifier.train,
    protocol.TRAIN_IFCA: classifier.train_ifca,
    protocol.PERSONALIZE: classifier.personalize,
    protocol.EVALUATE: classifier.evaluate,
    protocol.COMPARE: classifier.evaluate_compare,
    protocol.SFT: generative.train_sft,
    protocol.DPO: generative.train_dpo,
    protocol.GEN_LOCAL: generative.train_gen_local,
    protocol.EVALUATE_GEN: generative.evaluate_gen,
}


def build_app(simulation: SimulationSupport | None = None) -> ClientApp:
    """A ClientApp with the egress guard and every handler; `simulation` for simulated sites only."""
    client_app = ClientApp(mods=[privacy.egress_guard])
    for message_type, handler in HANDLERS.items():
        category, _, action = message_type.partition(".")
        register = getattr(client_app, category)
        (register(action) if action else register())(partial(handler, sim=simulation))
    return client_app


app = build_app()
