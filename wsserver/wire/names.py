"""Names of agents, channels and streams: one rule, checked in one way."""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "NAME_RULE", "valid_name"]

#: Agent, channel and stream names (the JSON Schema ``pattern`` too).
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
#: The rule in words, for error messages.
NAME_RULE = "is 1 to 128 characters of A-Z a-z 0-9 _ . : -"

_NAME_RE = re.compile(NAME_PATTERN)


def valid_name(name: str) -> bool:
    return _NAME_RE.match(name) is not None
