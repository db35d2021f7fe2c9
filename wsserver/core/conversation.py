"""The rules of a generate's conversation and tools that a schema cannot say.

The wire models check the shape of a ``generate`` (a tool name is
``[A-Za-z0-9_-]{1,64}``, a content part has a known ``type``: ``bad_message``
with ``field``). :func:`check_generate` checks what depends on the rest of
the request, each with its own error code and the ``field`` it concerns:

* ``bad_tool_schema``: a tool's ``parameters`` is not a JSON Schema of an
  object (``type: "object"``, ``properties`` an object of schemas,
  ``required`` an array of strings);
* ``duplicate_tool``: two tools with one name;
* ``unknown_tool``: ``tool_choice {name}`` names no tool of the request, or
  ``tool_choice: "required"`` with no tools;
* ``misplaced_content``: ``tool_calls`` or a reasoning part in a message that
  is not the assistant's, an image in a ``system`` or ``assistant`` message,
  ``tool_call_id`` in a message that is not a ``tool`` result;
* ``bad_message``: a ``tool`` message without ``tool_call_id``;
* ``unknown_tool_call``: a ``tool`` message whose ``tool_call_id`` matches no
  call of an earlier assistant message;
* ``bad_image``: an image URL that is neither ``http(s)://host…`` nor a
  ``data:image/…;base64,…`` URL with valid base64;
* agent runs: ``bad_name`` for a tool's ``agent`` that is not a name;
  ``bad_message`` for ``agent``, ``approval`` or ``timeout_ms`` without
  ``max_steps`` > 1 (they take effect in a run only), and for ``on_busy``
  without ``thread``.

:func:`check_content` checks a ``tool_result``'s content the same way.

An image's size is bounded by the frame's (``max_size``, close 1009): there
is no smaller bound per image.
"""

from __future__ import annotations

import binascii
import re
from typing import Any

from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import ChatMessage, Generate
from ..wire.names import NAME_RULE, valid_name

__all__ = ["check_content", "check_generate", "check_image_url"]

_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
_HTTP_URL = re.compile(r"https?://[^/\s?#]+(?:[/?#]\S*)?", re.ASCII | re.IGNORECASE)


def check_generate(msg: Generate) -> ProtocolError | None:
    """The first problem of ``msg`` beyond its schema, or None."""
    problem = _check_tools(msg) or _check_run(msg) or _check_messages(msg.messages)
    if problem is None:
        return None
    code, field, text = problem
    return ProtocolError(code, text, field=field, ref=msg.id)


def _check_tools(msg: Generate) -> tuple[ErrorCode, str, str] | None:
    names: set[str] = set()
    for i, tool in enumerate(msg.tools or ()):
        if tool.name in names:
            return ErrorCode.DUPLICATE_TOOL, f"tools.{i}.name", f"tool {tool.name!r} is defined twice"
        names.add(tool.name)
        if tool.parameters is not None:
            wrong = _object_schema_problem(tool.parameters)
            if wrong is not None:
                return (
                    ErrorCode.BAD_TOOL_SCHEMA,
                    f"tools.{i}.parameters",
                    f"tool {tool.name!r}: parameters must be a JSON Schema of an object: {wrong}",
                )
    choice = msg.tool_choice
    if choice == "required" and not names:
        return ErrorCode.UNKNOWN_TOOL, "tool_choice", "tool_choice 'required' but the request has no tools"
    if choice is not None and not isinstance(choice, str) and choice.name not in names:
        return ErrorCode.UNKNOWN_TOOL, "tool_choice.name", f"tool_choice names {choice.name!r}, which is not in tools"
    return None


def _check_run(msg: Generate) -> tuple[ErrorCode, str, str] | None:
    run = msg.max_steps is not None and msg.max_steps > 1
    for i, tool in enumerate(msg.tools or ()):
        if tool.agent is not None and not valid_name(tool.agent):
            return ErrorCode.BAD_NAME, f"tools.{i}.agent", f"an agent name {NAME_RULE}"
        for key in ("agent", "approval", "timeout_ms"):
            if not run and getattr(tool, key) not in (None, False):
                return ErrorCode.BAD_MESSAGE, f"tools.{i}.{key}", f"{key!r} takes effect in an agent run only: set max_steps > 1"
    if msg.on_busy is not None and msg.thread is None:
        return ErrorCode.BAD_MESSAGE, "on_busy", "'on_busy' says what happens in a thread: give 'thread' too"
    return None


def check_content(content: Any) -> tuple[ErrorCode, str, str] | None:
    """What is wrong with a tool result's content (a string or text and image parts), or None."""
    if isinstance(content, str):
        return None
    for j, part in enumerate(content):
        if part.type == "reasoning":
            return ErrorCode.MISPLACED_CONTENT, f"content.{j}", "a reasoning part in a tool result"
        if part.type == "image":
            wrong = check_image_url(part.url)
            if wrong is not None:
                return ErrorCode.BAD_IMAGE, f"content.{j}.url", wrong
    return None


def _object_schema_problem(schema: dict[str, Any]) -> str | None:
    if schema.get("type") != "object":
        return f"'type' is {schema.get('type')!r}, not 'object'"
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            return "'properties' is not an object"
        for key, sub in properties.items():
            if not isinstance(sub, (dict, bool)):
                return f"property {key!r} is not a schema"
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        return "'required' is not an array of strings"
    return None


def _check_messages(messages: list[ChatMessage]) -> tuple[ErrorCode, str, str] | None:
    calls: set[str] = set()
    for i, m in enumerate(messages):
        role = m.role
        if m.tool_calls is not None and role != "assistant":
            return ErrorCode.MISPLACED_CONTENT, f"messages.{i}.tool_calls", f"tool_calls in a {role} message"
        if role == "tool":
            if m.tool_call_id is None:
                return ErrorCode.BAD_MESSAGE, f"messages.{i}.tool_call_id", "a tool message needs 'tool_call_id'"
            if m.tool_call_id not in calls:
                return (
                    ErrorCode.UNKNOWN_TOOL_CALL,
                    f"messages.{i}.tool_call_id",
                    f"tool result for call {m.tool_call_id!r}, which no earlier assistant message made",
                )
        elif m.tool_call_id is not None:
            return ErrorCode.MISPLACED_CONTENT, f"messages.{i}.tool_call_id", f"tool_call_id in a {role} message"
        for call in m.tool_calls or ():
            calls.add(call.id)
        if isinstance(m.content, str):
            continue
        for j, part in enumerate(m.content):
            field = f"messages.{i}.content.{j}"
            if part.type == "reasoning" and role != "assistant":
                return ErrorCode.MISPLACED_CONTENT, field, f"a reasoning part in a {role} message"
            if part.type == "image":
                if role in ("system", "assistant"):
                    return ErrorCode.MISPLACED_CONTENT, field, f"an image in a {role} message"
                wrong = check_image_url(part.url)
                if wrong is not None:
                    return ErrorCode.BAD_IMAGE, field + ".url", wrong
    return None


def check_image_url(url: str) -> str | None:
    """What is wrong with an image URL, or None: ``http(s)://`` with a host,
    or ``data:image/<type>;base64,<base64>``."""
    if url[:5].lower() == "data:":
        head = _DATA_URL.match(url)
        if head is None:
            return "a data: URL of an image must read data:image/<type>;base64,<data>"
        try:
            binascii.a2b_base64(url[head.end() :], strict_mode=True)
        except binascii.Error:
            return "the data: URL's base64 is not valid"
        return None
    if _HTTP_URL.fullmatch(url) is None:
        scheme = url.partition(":")[0] if ":" in url else ""
        shown = scheme[:20] + ("…" if len(scheme) > 20 else "")
        return f"an image URL must be http(s) or data:, not {shown + ':' if shown else repr(url[:20])}"
    return None
