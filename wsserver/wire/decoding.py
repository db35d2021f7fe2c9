"""What a client frame that failed validation gets: the error code, the
offending field's dotted path, and a message that says what was expected and
what arrived (PROTOCOL.md section 9). Only the rare error path runs here."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from .errors import ErrorCode, ProtocolError

__all__ = ["protocol_error"]


def protocol_error(data: str | bytes, exc: ValidationError, client_types: frozenset[str]) -> ProtocolError:
    """The :class:`ProtocolError` for a client frame that failed validation."""
    errors = exc.errors(include_url=False)
    # Of the alternatives of a union (content: a string or a list of parts),
    # the one that got furthest into the input says what is wrong.
    err = max(errors, key=lambda e: len(e["loc"]))
    kind = err["type"]
    if kind == "json_invalid":
        return ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {err['msg'][14:]}")
    if kind == "string_unicode":  # a str with lone surrogates (never from the wire: UTF-8)
        return ProtocolError(ErrorCode.BAD_JSON, "not valid JSON: the text is not valid Unicode")
    # Valid JSON from here on, but possibly beyond what orjson reads (integers
    # over 64 bits, NaN, Infinity), so the rare error path uses the stdlib.
    obj = json.loads(data)
    if not isinstance(obj, dict):
        return ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"a message must be a JSON object, got {_json_kind(obj)}",
            field="",
        )
    ref = obj.get("id") if isinstance(obj.get("id"), str) and len(obj["id"]) <= 64 else None
    msg_type = obj.get("type")
    if kind == "union_tag_not_found" and len(err["loc"]) == 0:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE, "field 'type' is required", field="type", ref=ref
        )
    if kind == "union_tag_invalid" and len(err["loc"]) == 0:
        if not isinstance(msg_type, str):
            return ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"field 'type' must be a string, got {_json_kind(msg_type)}",
                field="type",
                ref=ref,
            )
        shown = msg_type if len(msg_type) <= 40 else msg_type[:40] + "…"
        return ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {shown!r}; expected one of {', '.join(sorted(client_types))}",
            ref=ref,
        )
    path = _field_path(obj, err["loc"][1:])  # drop the union tags
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a part's (or a format's) type
        path.append(err["ctx"]["discriminator"].strip("'"))
        kind = "missing" if kind == "union_tag_not_found" else "literal_error"
        err = {**err, "msg": f"Input should be one of {err['ctx'].get('expected_tags', '?')}"}
    field = ".".join(str(p) for p in path)
    alternatives = [e for e in errors if _field_path(obj, e["loc"][1:]) == path]
    if kind == "missing":
        text = f"field {field!r} is required"
    elif len(alternatives) > 1 and len(err["loc"]) - 1 > len(path):  # e.g. a string or a list of parts
        text = f"field {field!r}: not of any accepted type, got {_json_kind(_lookup(obj, path))}"
    else:
        got = _lookup(obj, path)
        text = f"field {field!r}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_json_kind(got)}"
    return ProtocolError(ErrorCode.BAD_MESSAGE, text, field=field, ref=ref)


def _field_path(obj: Any, loc: tuple[Any, ...]) -> list[Any]:
    """The fields and indexes of a pydantic error location in the input
    ``obj``, without the labels pydantic adds for a union's branches (``str``,
    ``list[...]``, a model's name) or a discriminated union's tag (the value
    of ``type``): a part followed by more parts must exist in the input."""
    path: list[Any] = []
    for i, part in enumerate(loc):
        if i + 1 < len(loc):
            if isinstance(obj, dict):
                if part not in obj or part == obj.get("type"):
                    continue
            elif isinstance(obj, list):
                if not isinstance(part, int) or not -len(obj) <= part < len(obj):
                    continue
            else:
                continue
        elif isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part):
            continue
        path.append(part)
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            obj = None
    return path


def _lookup(obj: Any, loc: list[Any]) -> Any:
    for part in loc:
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
