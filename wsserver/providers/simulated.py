"""The ``simulated`` provider: deterministic text, reasoning and tool calls, no key, no network.

The reply is a function of the request alone (same conversation, same
tools, same parameters: same events). It begins with a short echo of the
latest user message's words, so a test or a person at the demo page can tell
which input it answers, and goes on with filler sentences drawn from a fixed
vocabulary by a generator seeded with a hash of the conversation. One token
is one word with its leading space (or one punctuation mark), and the
reported usage counts exactly those.

Rich generations (what a real model does, made predictable):

* **Reasoning.** With ``params.reasoning`` it first streams reasoning tokens
  (``ReasoningDelta``): a sentence about the question and what it will do,
  padded with filler words to 8, 16, 32 or 64 tokens for ``effort``
  minimal, low, medium (the default) or high (a longer sentence is kept
  whole), cut at ``budget_tokens``. The block ends with
  ``ReasoningDone`` carrying a *fake* signature, ``sim-`` and 24 hex digits
  of a hash of the reasoning text: it only shows where a real provider's
  signature goes, and nothing checks it.
* **Tool calls.** With ``tools``, when the conversation ends with a user
  message whose text names tools (their exact names, e.g. "get_weather in
  Oslo"), it says "Calling get_weather." and calls each named tool, in the
  order they are named (two named: two parallel calls), then finishes with
  ``tool_calls``. The arguments are built from the tool's ``parameters``:
  each *required* property gets a value (a string: the next word of the
  prompt after the tool's name, skipping small words like "in" or "the",
  else a word before it, else the property's name; an ``enum``: its first
  value; an integer 3, a number 1.5, a boolean true, an array [], an object
  {}); the JSON is streamed in fragments of 6 characters (at least two).
  Call ids are ``call_`` and a hash of the conversation and the call's place.
  ``tool_choice``: ``none`` never calls; ``auto`` (the default) calls the
  named tools; ``required`` calls the named tools, or the first tool when
  none is named; ``{"name"}`` calls that tool (once), whatever is named.
* **Steps.** A user message may name tools in stages separated by ", then"
  (or "; then", ". Then": "get_weather in Oslo, then book_table in Oslo";
  a plain "and then" does not separate stages): the first step
  calls the first stage's tools; after their results the next step calls the
  next stage's (arguments from that stage's words), and so on: one stage per
  step of an agent run. Without "then" there is one stage.
* **Tool results.** When the conversation ends with ``tool`` messages and no
  stage is left, it answers with text that quotes each result
  (``get_weather returned "…".``, a result cut at 120 characters) and never
  calls again, whatever ``tool_choice`` says (so that a loop of steps ends).

Parameters (``generate.params``, else the provider's defaults):
``max_tokens`` caps the answer text and the argument fragments (reason
``length``; a call cut short is dropped by the session), not the reasoning;
``reply_tokens`` sets the natural length of a text reply exactly (default:
whole sentences adding up to 24 to 70 tokens, derived from the
conversation); ``ttft_ms`` delays the first token; ``tokens_per_s`` paces the
rest, every reasoning token and argument fragment counting as a token (0 =
as fast as possible, yielding to the event loop after every
``UNPACED_BURST`` tokens so that other streams and connections keep moving).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import orjson

from ..wire.messages import ChatMessage, GenerateParams, Tool, ToolChoice
from .base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderEvent,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)

__all__ = ["SimulatedProvider", "count_tokens", "simulated_reply"]

_ECHO_WORDS = 8
#: Unpaced, the provider yields to the event loop after this many tokens (a
#: network read hands over several tokens at once too). Other streams and
#: connections keep moving, and the writer sends each burst in one go.
UNPACED_BURST = 16
_WORDS = (
    "the a stream token socket session server client model answer question channel agent "
    "message reply replay cancel steer resume order time fast slow small large simple clear "
    "every each one two three many data text frame protocol sequence offset history network "
    "works keeps sends reads writes waits starts ends moves flows arrives returns carries "
    "quietly quickly exactly safely again together always never often here there now then"
).split()
_TOKEN = re.compile(r"\s*[\w'’-]+|\s*[^\w\s]")
#: Reasoning tokens by ``params.reasoning.effort``.
REASONING_TOKENS = {"minimal": 8, "low": 16, "medium": 32, "high": 64}
#: Characters of argument JSON per ``ToolCallDelta``.
ARGUMENT_FRAGMENT = 6
_RESULT_CHARS = 120
_SMALL_WORDS = frozenset("a an the in on at for of to and or with please call use what is me my".split())
_PROMPT_WORD = re.compile(r"[\w'’-]+")


def count_tokens(text: str) -> int:
    """Tokens of ``text`` the way the simulated provider counts them."""
    return len(_TOKEN.findall(text))


def text_of(message: ChatMessage) -> str:
    """The text of a message (its text parts, joined by spaces)."""
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(part.text for part in content if part.type == "text")


def simulated_reply(messages: Sequence[ChatMessage], reply_tokens: int | None = None) -> list[str]:
    """The tokens of the text reply to ``messages`` (deterministic)."""
    return list(_reply_tokens(messages, reply_tokens))


def _seed(messages: Sequence[ChatMessage]) -> bytes:
    """A hash of the conversation (plain text messages hash as they always did)."""
    canonical = []
    for m in messages:
        if isinstance(m.content, str) and m.tool_calls is None and m.tool_call_id is None:
            canonical.append([m.role, m.content])
        else:
            canonical.append([m.role, m.model_dump(mode="json", exclude_none=True)])
    return hashlib.sha256(orjson.dumps(canonical)).digest()


def _reply_tokens(messages: Sequence[ChatMessage], reply_tokens: int | None, opening: str | None = None) -> Iterator[str]:
    """:func:`simulated_reply`, one sentence at a time: a stream's first token
    does not wait for the whole reply to be made up. ``opening`` replaces the
    echo of the user's words."""
    rng = random.Random(_seed(messages))
    if opening is None:
        last_user = next((text_of(m) for m in reversed(messages) if m.role == "user"), "")
        words = last_user.split()
        quoted = " ".join(words[:_ECHO_WORDS]) + (" …" if len(words) > _ECHO_WORDS else "")
        opening = f'You said "{quoted}".' if quoted else "You said nothing."
    tokens = _TOKEN.findall(opening)
    target = reply_tokens if reply_tokens is not None else rng.randint(24, 64)
    count = 0
    while count < target:  # whole sentences; cut only for an exact reply_tokens
        if reply_tokens is not None and count + len(tokens) > reply_tokens:
            tokens = tokens[: reply_tokens - count]
        yield from tokens
        count += len(tokens)
        if count >= target:
            return
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(4, 11))]
        sentence[0] = sentence[0].capitalize()
        tokens = [" " + w for w in sentence]
        tokens.append(rng.choice(".!?") if rng.random() < 0.3 else ".")


# ------------------------------------------------------------------- the plan


def _plan(request: GenerationRequest) -> tuple[list[str], str | None, Iterator[str], list[tuple[str, str, list[str]]]]:
    """What to say: reasoning tokens and their signature, the text tokens,
    and the calls (id, tool name, argument fragments)."""
    messages, params = request.messages, request.params
    seed = _seed(messages).hex()
    calls: list[tuple[str, str, list[str]]] = []
    last = messages[-1] if messages else None
    prompt, answered = _stage(messages)
    if last is not None and last.role == "tool" and prompt is None:
        text = _reply_tokens(messages, params.reply_tokens, _quote_results(messages))
    else:
        prompt = prompt or ""
        choice = request.tool_choice if not answered else "auto"  # (a later stage calls only what it names)
        for i, tool in enumerate(_tools_to_call(prompt, request.tools, choice)):
            arguments = orjson.dumps(_arguments(tool, prompt)).decode()
            calls.append((f"call_{seed[:12]}_{i}", tool.name, _fragments(arguments)))
        if calls:
            names = " and ".join(dict.fromkeys(name for _, name, _ in calls))
            text = iter(_TOKEN.findall(f"Calling {names}."))
        else:
            text = _reply_tokens(messages, params.reply_tokens)
    reasoning: list[str] = []
    signature = None
    if params.reasoning is not None:
        reasoning, signature = _reasoning(messages, params, [name for _, name, _ in calls])
    return reasoning, signature, text, calls


#: A stage ends at a comma, semicolon or full stop followed by "then".
_THEN = re.compile(r"[,;.]\s*then\b", re.IGNORECASE)


def _stage(messages: Sequence[ChatMessage]) -> tuple[str | None, int]:
    """The stage of the latest user message this step acts on ("…, then …"),
    None when every stage has been called; and how many were called."""
    called = 0
    for m in reversed(messages):
        if m.role == "user":
            stages = _THEN.split(text_of(m))
            return (stages[called] if called < len(stages) else None), called
        if m.role == "assistant" and m.tool_calls:
            called += 1
    return "", 0


def _quote_results(messages: Sequence[ChatMessage]) -> str:
    names: dict[str, str] = {}
    for m in messages:
        for call in m.tool_calls or ():
            names[call.id] = call.name
    results = []
    for m in reversed(messages):
        if m.role != "tool":
            break
        result = text_of(m)
        if len(result) > _RESULT_CHARS:
            result = result[:_RESULT_CHARS] + "…"
        results.append(f'{names.get(m.tool_call_id or "", "the tool")} returned "{result}".')
    return " ".join(reversed(results))


def _tools_to_call(prompt: str, tools: Sequence[Tool], choice: ToolChoice | None) -> list[Tool]:
    if not tools or choice == "none" or not prompt and choice in (None, "auto"):
        return []
    if choice is not None and not isinstance(choice, str):
        return [t for t in tools if t.name == choice.name][:1]
    named = sorted(
        ((match.start(), t) for t in tools if (match := _named(t.name, prompt)) is not None),
        key=lambda found: found[0],
    )
    called = [t for _, t in named]
    if not called and choice == "required":
        called = [tools[0]]
    return called


def _named(name: str, text: str) -> re.Match[str] | None:
    return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(name)}(?![A-Za-z0-9_-])", text, re.IGNORECASE)


def _arguments(tool: Tool, prompt: str) -> dict[str, Any]:
    schema = tool.parameters or {}
    properties = schema.get("properties") or {}
    words = _words_for(tool.name, prompt)
    arguments: dict[str, Any] = {}
    for name in schema.get("required") or ():
        prop = properties.get(name)
        prop = prop if isinstance(prop, dict) else {}
        kind = prop.get("type", "string")
        if isinstance(prop.get("enum"), list) and prop["enum"]:
            arguments[name] = prop["enum"][0]
        elif kind == "string":
            arguments[name] = words.pop(0) if words else name
        else:
            arguments[name] = {"integer": 3, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(kind)
    return arguments


def _words_for(tool: str, prompt: str) -> list[str]:
    """The prompt's words after the tool's name, then those before it (small words left out)."""
    match = _named(tool, prompt)
    before, after = (prompt[: match.start()], prompt[match.end() :]) if match else ("", prompt)
    keep = [w for w in _PROMPT_WORD.findall(after) if w.lower() not in _SMALL_WORDS]
    keep += [w for w in _PROMPT_WORD.findall(before) if w.lower() not in _SMALL_WORDS]
    return keep


def _fragments(text: str) -> list[str]:
    size = ARGUMENT_FRAGMENT if len(text) > ARGUMENT_FRAGMENT else max(1, len(text) // 2)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _reasoning(messages: Sequence[ChatMessage], params: GenerateParams, calls: list[str]) -> tuple[list[str], str]:
    assert params.reasoning is not None
    wanted = REASONING_TOKENS[params.reasoning.effort or "medium"]
    last = messages[-1] if messages else None
    if last is not None and last.role == "tool":
        thought = "The tool answered; I will tell the user what it returned."
    else:
        words = (text_of(last) if last is not None else "").split()
        asked = " ".join(words[:_ECHO_WORDS]) + (" …" if len(words) > _ECHO_WORDS else "")
        plan = f"I will call {' and '.join(dict.fromkeys(calls))}." if calls else "I can answer directly."
        thought = f'The user asks "{asked}". {plan}'
    tokens = _TOKEN.findall(thought)
    filler = random.Random(_seed(messages) + b"reasoning")
    while len(tokens) < wanted:
        tokens.append(" " + filler.choice(_WORDS))
    if params.reasoning.budget_tokens is not None:
        tokens = tokens[: params.reasoning.budget_tokens]
    signature = "sim-" + hashlib.sha256("".join(tokens).encode()).hexdigest()[:24]
    return tokens, signature


class SimulatedProvider(Provider):
    """Deterministic local provider for demos, tests and benchmarks."""

    name = "simulated"

    def __init__(
        self,
        *,
        tokens_per_s: float = 40.0,
        ttft_ms: float = 150.0,
        default_model: str = "sim-1",
    ) -> None:
        self.tokens_per_s = tokens_per_s
        self.ttft_ms = ttft_ms
        self.default_model = default_model

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        params = request.params
        rate = params.tokens_per_s if params.tokens_per_s is not None else self.tokens_per_s
        ttft = params.ttft_ms if params.ttft_ms is not None else self.ttft_ms
        reasoning, signature, text, calls = _plan(request)  # text is made up as it goes
        reason = "tool_calls" if calls else "complete"
        limit = params.max_tokens if params.max_tokens is not None else -1

        yield UsageReport(input_tokens=sum(_input_tokens(m) for m in request.messages))
        if ttft > 0:
            await asyncio.sleep(ttft / 1000)
        sleep = asyncio.sleep
        interval = 1.0 / rate if rate > 0 else 0.0
        start = time.monotonic()
        paced = 0  # tokens sent (reasoning, text, argument fragments)
        capped = 0  # of which max_tokens counts (text, fragments)
        for event in _events(reasoning, signature, text, calls):
            kind = type(event)
            if kind is ToolCallStart or kind is ReasoningDone:
                yield event
                continue
            if kind is not ReasoningDelta:
                if capped == limit:  # there is more: cut at max_tokens
                    reason = "length"
                    break
                capped += 1
            if interval:
                if paced:  # the first token comes right after ttft
                    delay = start + paced * interval - time.monotonic()
                    await sleep(delay if delay > 0 else 0)
                paced += 1
                yield event
            else:
                paced += 1
                yield event
                if paced % UNPACED_BURST == 0:
                    await sleep(0)  # as fast as possible, but never starve the loop
        yield UsageReport(output_tokens=paced)
        yield Finish(reason)  # type: ignore[arg-type]


def _events(
    reasoning: list[str], signature: str | None, text: Iterator[str], calls: list[tuple[str, str, list[str]]]
) -> Iterator[ProviderEvent]:
    for token in reasoning:
        yield ReasoningDelta(token, 1)
    if signature is not None:
        yield ReasoningDone(signature=signature)
    for token in text:
        yield TextDelta(token, 1)
    for call, name, fragments in calls:
        yield ToolCallStart(call, name)
        for fragment in fragments:
            yield ToolCallDelta(call, fragment)


def _input_tokens(message: ChatMessage) -> int:
    tokens = count_tokens(text_of(message)) + 3
    for call in message.tool_calls or ():
        tokens += count_tokens(call.name) + count_tokens(orjson.dumps(call.arguments).decode())
    return tokens
