"""Rich streams in each vendor's exact wire format, for :class:`FakeUpstream`:
tool calls (parallel, arguments in fragments), reasoning with signatures,
redacted thinking, refusals.

The shapes follow what the real APIs send (and what the SDKs parse):

* OpenAI Chat Completions: data-only ``chat.completion.chunk`` objects. A
  tool call's first delta carries ``index``, ``id``, ``type`` and
  ``function.name`` with empty ``arguments``; the following deltas carry
  only ``index`` and an ``arguments`` fragment. OpenAI streams parallel calls
  one after the other (index 0's fragments, then index 1's);
  :func:`chat_tool_calls` can also interleave them, which the mapping must
  survive. The chunk with ``finish_reason`` has an empty delta; usage comes
  last with ``choices: []``; then ``[DONE]``.
* Anthropic Messages: ``event:`` lines are mandatory. ``content_block_start``
  opens a block (``thinking`` with empty text, ``redacted_thinking`` with its
  whole ``data``, ``tool_use`` with ``id``, ``name`` and ``input: {}``), deltas
  follow (``thinking_delta``, ``signature_delta`` just before the thinking
  block's stop, ``text_delta``, ``input_json_delta`` whose first fragment is
  empty), then ``content_block_stop``.
* OpenAI Responses: ``event: <type>`` plus a data object with the same
  ``type`` and a ``sequence_number``. Each output item is announced by
  ``response.output_item.added`` and closed by ``response.output_item.done``
  with its final shape (a reasoning item's ``encrypted_content`` arrives
  there); ``response.completed`` repeats the whole output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "a_redacted",
    "a_text",
    "a_thinking",
    "a_tool_use",
    "anthropic_message",
    "anthropic_start",
    "chat_chunk",
    "chat_deltas",
    "chat_tool_calls",
    "json_fragments",
    "r_function_call",
    "r_message",
    "r_reasoning",
    "response_object",
    "responses_usage",
    "responses_stream",
]

Event = tuple[str | None, Any]

# ------------------------------------------------------------ Chat Completions


def chat_deltas(
    deltas: Sequence[dict[str, Any]],
    *,
    finish: str | None = "stop",
    usage: tuple[int, int] | None = (5, 6),
    done: bool = True,
) -> list[Event]:
    """A Chat Completions stream: a role chunk, one chunk per delta, the
    finish chunk, the usage chunk and ``[DONE]`` (each but the deltas can be
    left out, as a cut stream would)."""

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    events = [chat_chunk([choice({"role": "assistant", "content": None, "refusal": None})])]
    events += [chat_chunk([choice(d)]) for d in deltas]
    if finish is not None:
        events.append(chat_chunk([choice({}, finish)]))
    if usage is not None:
        events.append(
            chat_chunk([], usage={"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)})
        )
    if done:
        events.append((None, "[DONE]"))
    return events


def chat_chunk(choices: list[Any], **extra: Any) -> Event:
    """One ``chat.completion.chunk`` (the SDK's stream helper skips chunks without ``object``)."""
    return None, {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": None,
        "choices": choices,
        **extra,
    }


def chat_tool_calls(calls: Sequence[tuple[str, str, Sequence[str]]], *, interleave: bool = False) -> list[dict[str, Any]]:
    """Deltas for parallel tool calls ``(id, name, argument fragments)``."""
    per_call = []
    for index, (call_id, name, fragments) in enumerate(calls):
        first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        rest = [{"index": index, "function": {"arguments": f}} for f in fragments]
        per_call.append([first, *rest])
    if not interleave:
        return [{"tool_calls": [d]} for deltas in per_call for d in deltas]
    out = []
    for step in range(max(len(d) for d in per_call)):
        for deltas in per_call:
            if step < len(deltas):
                out.append({"tool_calls": [deltas[step]]})
    return out


# ------------------------------------------------------------ Anthropic Messages

Block = Callable[[int], list[Event]]


def _start(index: int, block: dict[str, Any]) -> Event:
    return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}


def _delta(index: int, delta: dict[str, Any]) -> Event:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _stop(index: int) -> Event:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def a_text(*pieces: str) -> Block:
    return lambda i: [
        _start(i, {"type": "text", "text": ""}),
        *[_delta(i, {"type": "text_delta", "text": p}) for p in pieces],
        _stop(i),
    ]


def a_thinking(pieces: Sequence[str], signature: str) -> Block:
    return lambda i: [
        _start(i, {"type": "thinking", "thinking": ""}),
        *[_delta(i, {"type": "thinking_delta", "thinking": p}) for p in pieces],
        _delta(i, {"type": "signature_delta", "signature": signature}),
        _stop(i),
    ]


def a_redacted(data: str) -> Block:
    return lambda i: [_start(i, {"type": "redacted_thinking", "data": data}), _stop(i)]


def a_tool_use(call_id: str, name: str, fragments: Sequence[str]) -> Block:
    return lambda i: [
        _start(i, {"type": "tool_use", "id": call_id, "name": name, "input": {}}),
        _delta(i, {"type": "input_json_delta", "partial_json": ""}),
        *[_delta(i, {"type": "input_json_delta", "partial_json": f}) for f in fragments],
        _stop(i),
    ]


def anthropic_start(input_tokens: int) -> Event:
    """``message_start`` as the API sends it (``usage`` must be there: the SDK
    writes ``output_tokens`` into it)."""
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "m",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": 1,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        },
    )


def anthropic_message(
    blocks: Sequence[Block],
    *,
    stop_reason: str | None = "end_turn",
    input_tokens: int = 7,
    output_tokens: int = 20,
    cut_after_blocks: int | None = None,
) -> list[Event]:
    """A Messages stream of ``blocks``; ``cut_after_blocks``: stop sending
    after that many blocks (no message_delta: the stream was cut)."""
    events: list[Event] = [anthropic_start(input_tokens), ("ping", {"type": "ping"})]
    for i, block in enumerate(blocks):
        if cut_after_blocks is not None and i >= cut_after_blocks:
            return events
        events += block(i)
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# ------------------------------------------------------------ OpenAI Responses

#: An output item: (its events at output_index, its final shape)
Item = Callable[[int], tuple[list[dict[str, Any]], dict[str, Any]]]


def r_reasoning(item_id: str, summaries: Sequence[Sequence[str]], encrypted: str | None) -> Item:
    """A reasoning item with summary parts (each streamed in pieces)."""

    def build(o: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        added = {"id": item_id, "type": "reasoning", "summary": [], "encrypted_content": None}
        events: list[dict[str, Any]] = [{"type": "response.output_item.added", "output_index": o, "item": added}]
        final_summary = []
        for s, pieces in enumerate(summaries):
            text = "".join(pieces)
            base = {"item_id": item_id, "output_index": o, "summary_index": s}
            events.append({"type": "response.reasoning_summary_part.added", **base, "part": {"type": "summary_text", "text": ""}})
            events += [{"type": "response.reasoning_summary_text.delta", **base, "delta": p} for p in pieces]
            events.append({"type": "response.reasoning_summary_text.done", **base, "text": text})
            events.append({"type": "response.reasoning_summary_part.done", **base, "part": {"type": "summary_text", "text": text}})
            final_summary.append({"type": "summary_text", "text": text})
        done = {"id": item_id, "type": "reasoning", "summary": final_summary, "encrypted_content": encrypted}
        events.append({"type": "response.output_item.done", "output_index": o, "item": done})
        return events, done

    return build


def r_message(item_id: str, pieces: Sequence[str], *, refusal: bool = False) -> Item:
    def build(o: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        text = "".join(pieces)
        kind = "refusal" if refusal else "output_text"
        part: dict[str, Any] = {"type": "refusal", "refusal": ""} if refusal else {"type": "output_text", "text": "", "annotations": []}
        base = {"item_id": item_id, "output_index": o, "content_index": 0}
        added = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        events: list[dict[str, Any]] = [
            {"type": "response.output_item.added", "output_index": o, "item": added},
            {"type": "response.content_part.added", **base, "part": part},
        ]
        extra = {} if refusal else {"logprobs": []}
        events += [{"type": f"response.{kind}.delta", **base, "delta": p, **extra} for p in pieces]
        final_part = {"type": "refusal", "refusal": text} if refusal else {"type": "output_text", "text": text, "annotations": []}
        events.append({"type": f"response.{kind}.done", **base, ("refusal" if refusal else "text"): text, **extra})
        events.append({"type": "response.content_part.done", **base, "part": final_part})
        done = {**added, "status": "completed", "content": [final_part]}
        events.append({"type": "response.output_item.done", "output_index": o, "item": done})
        return events, done

    return build


def r_function_call(item_id: str, call_id: str, name: str, fragments: Sequence[str]) -> Item:
    def build(o: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        arguments = "".join(fragments)
        added = {"id": item_id, "type": "function_call", "status": "in_progress", "arguments": "", "call_id": call_id, "name": name}
        base = {"item_id": item_id, "output_index": o}
        events: list[dict[str, Any]] = [{"type": "response.output_item.added", "output_index": o, "item": added}]
        events += [{"type": "response.function_call_arguments.delta", **base, "delta": f} for f in fragments]
        events.append({"type": "response.function_call_arguments.done", **base, "arguments": arguments})
        done = {**added, "status": "completed", "arguments": arguments}
        events.append({"type": "response.output_item.done", "output_index": o, "item": done})
        return events, done

    return build


def response_object(status: str, output: Sequence[Any] = (), **extra: Any) -> dict[str, Any]:
    """The ``response`` object of ``response.created``/``.completed``/…"""
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "model": "m",
        "status": status,
        "output": list(output),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        **extra,
    }


def responses_usage(usage: tuple[int, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage[0],
        "output_tokens": usage[1],
        "total_tokens": sum(usage),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def responses_stream(items: Sequence[Item], *, usage: tuple[int, int] = (9, 4), cut_after_items: int | None = None) -> list[Event]:
    """A Responses API stream of ``items`` (``event:`` lines and sequence numbers included)."""

    datas: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object("in_progress")},
        {"type": "response.in_progress", "response": response_object("in_progress")},
    ]
    output = []
    for o, item in enumerate(items):
        if cut_after_items is not None and o >= cut_after_items:
            break
        events, final = item(o)
        datas += events
        output.append(final)
    else:
        datas.append({"type": "response.completed", "response": response_object("completed", output, usage=responses_usage(usage))})
    return [(d["type"], {**d, "sequence_number": n}) for n, d in enumerate(datas)]


def json_fragments(value: Any, size: int = 5) -> list[str]:
    """``value`` as JSON text cut in pieces of ``size`` characters."""
    text = json.dumps(value)
    return [text[i : i + size] for i in range(0, len(text), size)]
