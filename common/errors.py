"""One exception base for every failure a user can act on.

Each clinfed error class derives from `ClinfedError`, and its message says what
went wrong and what to do next. The command line catches `ClinfedError` and
prints the message as one paragraph (no traceback; CLINFED_DEBUG=1 shows one);
anything else that escapes is a bug and is reported as one.
"""

from __future__ import annotations


class ClinfedError(Exception):
    """A failure with a message meant for the user."""


class ConfigError(ClinfedError, ValueError):
    """A run-config key or value a user gave that cannot be used; the message names the key."""
