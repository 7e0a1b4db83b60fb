"""How the server talks to the sites: messages out, replies in, and what to do with a bad one.

Every phase of a study sends one message per site and waits, bounded, for the
replies; a site that fails or is late is recorded with its (data-free) reason and
the study goes on with the others (`min-sites`); an update whose keys, shapes or
values do not fit the adapter, whose bytes changed in transit, or whose size is
far outside the round's is left out of the aggregation, naming the site.
`SiteMessaging` is the part of a study (`server.study.Study`) that does this.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clinfed.common import protocol
from clinfed.common.adapters import AdapterMismatch, check_adapter_state, wire_hash
from clinfed.common.errors import ClinfedError
from clinfed.common.ranks import truncate

OUTLIER_FACTOR = 10.0  # an update 10x the round's median size is treated as corrupt or hostile


class StudyError(ClinfedError, RuntimeError):
    """The study cannot go on (too few sites, a phase that failed everywhere)."""


def say(text: str):
    """Progress the user sees in the streamed ServerApp log."""
    from flwr.supercore import log as flwr_log

    flwr_log(logging.INFO, "[clinfed] %s", text)


def exchange(grid, messages, timeout: float) -> list[Message]:
    """Send messages and collect the replies that arrive within `timeout` seconds.

    Flower's own `send_and_receive` (HttpGrid, flwr 1.41) sleeps 3 s between polls, so a
    phase whose sites answer in one second still waited 1.5 s on average, every round
    (`clinfed bench overhead`). The same public Grid calls, polled with a short back-off
    (50 ms growing to 0.5 s while nothing arrives) instead."""
    msgs = list(messages)
    if not msgs:
        return []
    pending = set(grid.push_messages(msgs))
    replies: list[Message] = []
    end = time.monotonic() + float(timeout)
    wait = 0.05
    while pending:
        got = list(grid.pull_messages(pending))
        if got:
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            wait = 0.05
            continue
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(0.5, wait * 1.5)
    return replies


class SiteMessaging:
    """Messages to the sites and the checks of their replies (mixed into a study, which holds
    `grid`, `cfg`, `sites`, `errors`, `phase_failures`, `arm` and `site_run_dir`)."""

    def _config(self, **extra) -> ConfigRecord:
        arm = {protocol.ARM: self.arm.name} if self.arm is not None else {}
        return ConfigRecord({protocol.RUN_DIR: str(self.site_run_dir.resolve()), **arm, **extra})

    def _send(self, nodes, message_type: str, arrays: ArrayRecord | None, phase: str,
              **config) -> dict[str, Message]:
        """Send one message per node; return replies by site, recording failures."""
        msgs = []
        for node in nodes:
            content = RecordDict({"config": self._config(**config)})
            if arrays is not None:
                content[protocol.ARRAYS] = arrays
            msgs.append(Message(content=content, dst_node_id=node, message_type=message_type))
        replies = list(exchange(self.grid, msgs, timeout=self.cfg.round_timeout))
        return self._collect(nodes, replies, phase)

    def _collect(self, nodes, replies, phase: str) -> dict[str, Message]:
        ok: dict[str, Message] = {}
        failures: dict[str, str] = {}
        answered = set()
        for rep in replies:
            node = rep.metadata.src_node_id
            answered.add(node)
            site = self.sites.get(node, f"node-{node}")
            if rep.has_error():
                failures[site] = rep.error.reason or f"error code {rep.error.code}"
            else:
                ok[site] = rep
        for node in nodes:
            if node not in answered:
                failures[self.sites.get(node, f"node-{node}")] = (
                    f"no reply within round-timeout={self.cfg['round-timeout']:.0f}s")
        for site, why in sorted(failures.items()):
            say(f"{phase}: site {site} failed: {why}")
            self.errors.append(f"{phase}: site {site}: {why}")
        self.phase_failures[phase] = failures
        return dict(sorted(ok.items()))

    def _checked(self, ok: dict[str, Message], reference: dict, phase: str,
                 starts: dict[str, ArrayRecord] | None = None,
                 ranks: dict[str, int] | None = None) -> dict[str, Message]:
        """Drop updates whose keys, shapes or values do not fit the adapter, or whose size
        (distance from the adapter the site started from) is far outside the round's, naming the site.
        `ranks`: sites whose policy caps their LoRA rank; their update must have exactly the
        adapter's shapes at that rank (common.ranks), any other shape is refused as before."""
        kept, norms = {}, {}
        for site, rep in ok.items():
            try:
                if protocol.ARRAYS not in rep.content.array_records:
                    raise AdapterMismatch(f"site {site} sent no adapter")
                state = {k: v.numpy() for k, v in rep.content[protocol.ARRAYS].items()}
                expected = reference
                if ranks and site in ranks:
                    expected = truncate(reference, ranks[site])
                check_adapter_state(expected, state, who=f"update from site {site}")
                sent_hash = rep.content[protocol.METRICS].get("adapter-hash") if protocol.METRICS in rep.content.metric_records else None
                if sent_hash is not None and int(sent_hash) != wire_hash(state):
                    raise AdapterMismatch(f"update from site {site}: the arrays that arrived do not match the "
                                          "hash the site computed before sending (changed in transit)")
                kept[site] = rep
                if starts and site in starts:
                    start = starts[site]
                    norms[site] = float(np.sqrt(sum(float(((state[k] - start[k].numpy()) ** 2).sum()) for k in state)))
            except AdapterMismatch as err:
                self._reject(phase, site, str(err))
        if len(norms) >= 3:
            values = np.array(list(norms.values()))
            med = float(np.median(values))
            mad = float(np.median(np.abs(values - med))) or med * 0.1
            for site, norm in norms.items():
                if norm > max(OUTLIER_FACTOR * med, med + 3 * OUTLIER_FACTOR * mad):
                    self._reject(phase, site, f"update from site {site}: norm {norm:.3g} is far outside this "
                                              f"round's (median {med:.3g}); left out of aggregation")
                    kept.pop(site, None)
        return kept

    def _reject(self, phase: str, site: str, why: str):
        self.phase_failures.setdefault(phase, {})[site] = f"rejected: {why}"
        self.errors.append(f"{phase}: {why}")
        say(f"{phase}: {why}")

    def wait_for_nodes(self) -> list[int]:
        """Bounded wait for sites: never forever, and a clear message when too few came."""
        need = self.cfg.min_sites
        want = self.cfg.expected_sites
        deadline = time.time() + self.cfg.node_wait_timeout
        last = -1
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if want and len(nodes) >= want:
                return nodes
            if not want and len(nodes) >= need and len(nodes) == last:
                return nodes
            if time.time() > deadline:
                if len(nodes) >= need:
                    say(f"node-wait-timeout: starting with {len(nodes)} of {want} expected sites")
                    self.errors.append(f"only {len(nodes)} of {want} expected sites connected")
                    return nodes
                raise StudyError(
                    f"only {len(nodes)} site(s) connected within node-wait-timeout="
                    f"{self.cfg['node-wait-timeout']:.0f}s; the study needs min-sites={need}")
            if len(nodes) != last:
                say(f"waiting for sites: {len(nodes)} connected (need {max(need, want)})")
            last = len(nodes)
            time.sleep(1.0 if nodes else 0.5)
