"""What a person sees while a study runs: Flower's streamed log turned into one line per phase.

A study's log, as Flower streams it, is mostly machinery: colour codes even in a
file, Ray's `(ClientAppActor pid=...)` prefixes and `[repeated 4x across cluster]`
notes, Flower's own INFO lines and warnings that do not apply to clinfed's
protocol. The whole log still goes to RUN_DIR/flwr.log (without colour codes);
the console shows only what clinfed itself says:

- progress, which the ServerApp logs as `[clinfed] <phase> <done>/<total>: <detail>`
  (`progress_line` writes it): on a terminal one bar per phase (tqdm) that the
  sites' own progress (`[clinfed] site <name> <what>: step s/t loss x`) annotates;
  elsewhere (a pipe, a file, CI) one plain line per completed step, no bars;
- clinfed's other messages, one line each;
- warnings and errors, except those known not to apply.
"""

from __future__ import annotations

import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?:\w+) pid=\d+(?:, ip=[\d.]+)?\)\s*")
_RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_LEVEL = re.compile(r"^(INFO|WARNING|ERROR|DEBUG|CRITICAL)\s*:\s*")
_PROGRESS = re.compile(r"^(?P<phase>[^:]+?) (?P<done>\d+)/(?P<total>\d+): (?P<detail>.*)$")
_SITE = re.compile(r"^site (?P<site>\S+) (?P<what>.+?): step (?P<step>\d+)/(?P<steps>\d+) loss (?P<loss>\S+)$")
TAG = "[clinfed] "
# Flower and Ray messages that clinfed's protocol makes irrelevant (it addresses sites and
# evaluates them itself; Ray's deduplication note is about the machinery of the log).
NOT_APPLICABLE = ("fraction_evaluate is set to 0.0", "Federated evaluation will be skipped",
                  "Ray deduplicates logs by default", "To change federation size",
                  "flwr federation simulation-config", "Since flwr 1.32", "Manually terminating ClientAppActor")


def plain(line: str) -> str:
    """The line without colour codes, Ray's actor prefix and deduplication note."""
    line = ANSI.sub("", line.rstrip("\n"))
    line = _RAY_PREFIX.sub("", line)
    return _RAY_REPEATED.sub("", line)


def progress_line(phase: str, done: int, total: int, detail: str = "") -> str:
    """How the ServerApp reports progress so that the console can draw it."""
    return f"{phase} {int(done)}/{int(total)}: {detail}"


class StudyConsole:
    """Feed it Flower's log lines; it prints what a person needs to follow the study."""

    def __init__(self, out=None, tty: bool | None = None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.bar = None
        self.phase = None

    def feed(self, raw: str) -> None:
        line = plain(raw)
        level = _LEVEL.match(line)
        text = line[level.end():] if level else line
        if any(n in text for n in NOT_APPLICABLE):
            return
        if text.startswith(TAG):
            self._clinfed(text[len(TAG):])
        elif level and level.group(1) in ("WARNING", "ERROR", "CRITICAL"):
            self._print(f"{level.group(1).lower()}: {text}")

    def _clinfed(self, text: str) -> None:
        site = _SITE.match(text)
        if site:
            if self.bar is not None:
                self.bar.set_postfix_str(f"site {site['site']} {site['what']} step {site['step']}/{site['steps']}",
                                         refresh=True)
            return
        step = _PROGRESS.match(text)
        if not step:
            self._print(text)
            return
        phase, done, total, detail = step["phase"], int(step["done"]), int(step["total"]), step["detail"]
        if not self.tty:
            self._print(text)
            return
        key = re.sub(r"\s+round$", "", phase)
        if key != self.phase:
            self._close_bar()
            from tqdm import tqdm

            self.phase = key
            self.bar = tqdm(total=total, desc=key, file=self.out, leave=True, dynamic_ncols=True,
                            bar_format="{desc}: {bar:24} {n_fmt}/{total_fmt} {postfix}")
        self.bar.n = done
        self.bar.set_postfix_str(detail, refresh=True)
        if done >= total:
            self._close_bar()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None

    def close(self) -> None:
        self._close_bar()
