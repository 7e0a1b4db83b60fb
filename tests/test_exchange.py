"""server.study.exchange: replies collected as they arrive, partial results at the timeout."""

import time
from types import SimpleNamespace

from clinfed.server.study import exchange


class SlowGrid:
    """Replies become available `delays[i]` seconds after the push (a unit fake of the Grid)."""

    def __init__(self, delays):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, d in enumerate(self.delays) if f"m{i}" in ids and now >= d]


def test_replies_are_collected_soon_after_they_arrive():
    grid = SlowGrid([0.2, 0.6])
    t = time.monotonic()
    replies = exchange(grid, ["a", "b"], timeout=30)
    took = time.monotonic() - t
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.6 <= took < 1.3  # Flower's send_and_receive polls every 3 s
    assert grid.pulls < 40  # a back-off, not a busy loop


def test_timeout_returns_what_arrived():
    grid = SlowGrid([0.1, 60])
    t = time.monotonic()
    replies = exchange(grid, ["a", "b"], timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - t < 2.0


def test_nothing_to_send_sends_nothing():
    assert exchange(SlowGrid([]), [], timeout=1) == []
