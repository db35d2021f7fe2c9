"""Names of agents, channels and streams: one rule, checked in one way.

The rule is a *full* match: ``re.match`` with ``$`` would also accept a
name followed by a newline (``$`` matches before a trailing ``\\n``), so
``"planner\\n"`` would pass as a name of its own and show up as
``planner`` in presence, channels and direct messages. Pydantic applies
:data:`NAME_PATTERN` with a Rust regex, whose ``$`` is the end of the text
only, and JSON Schema's (ECMAScript) ``$`` is too.
"""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "NAME_RULE", "valid_name"]

#: Agent, channel and stream names (the JSON Schema ``pattern`` too).
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
#: The rule in words, for error messages.
NAME_RULE = "is 1 to 128 characters of A-Z a-z 0-9 _ . : -"

_NAME_RE = re.compile(NAME_PATTERN[1:-1])


def valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None
