"""An in-process Grid: the real ClientApp run synchronously for each message, without Ray or a SuperLink.

For studies and benchmarks that must not pay for Flower's engines (replays,
unit tests of the server's protocol). Every message and reply goes through
Flower's own protobuf serialization, so anything unserializable fails as it
would on the wire, and every reply a client sent is kept in `self.replies` for
a privacy audit. It uses Flower internals (message ids, serde, the task
identity), kept to this one file because they may move between releases.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def simulated_nodes(n_sites: int) -> list[dict]:
    """The node configs of a simulation: one partition per hospital of the federation."""
    return [{"partition-id": i, "num-partitions": n_sites} for i in range(n_sites)]


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


class LocalGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict], run_config: dict, fail=None):
        # Outside a Flower runtime, Message() needs the task identity set by hand.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        self.app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=dict(nc), state=RecordDict(),
                              run_config=dict(run_config))
            for i, nc in enumerate(node_configs)
        }
        self.fail = fail  # optional callable(node_id, message) -> True to drop the reply
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}

    def set_run(self, run):  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            md = msg.metadata
            md.__dict__["_message_id"] = mid
            md.__dict__["_run_id"] = 1
            md.__dict__["_created_at"] = time.time()
            wired = _wire(msg)
            self.sent.append(wired)
            node = msg.metadata.dst_node_id
            if self.fail is not None and self.fail(node, wired):
                continue
            reply = self.app(wired, self.contexts[node])
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = _wire(reply)
            self.replies.append(reply)
            self._pending[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(m) for m in list(message_ids) if m in self._pending]

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.pull_messages(self.push_messages(messages)))
