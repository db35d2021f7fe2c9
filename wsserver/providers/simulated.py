"""The ``simulated`` provider: deterministic text, no key, no network.

The reply is a function of the conversation alone (same messages, same
text). It begins with a short echo of the latest user message's words, so a
test or a person at the demo page can tell which input it answers, and goes
on with filler sentences drawn from a fixed vocabulary by a generator seeded
with a hash of the conversation. One token is one word with its leading space
(or one punctuation mark), and the reported usage counts exactly those.

Parameters (``generate.params``, else the provider's defaults):
``max_tokens`` caps the reply (reason ``length``); ``reply_tokens`` sets the
natural length of the reply exactly (default: whole sentences adding up to
24 to 70 tokens, derived from the conversation); ``ttft_ms`` delays the first token; ``tokens_per_s``
paces the rest (0 = as fast as possible, yielding to the event loop after
every ``UNPACED_BURST`` tokens so that other streams and connections keep
moving).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import orjson

from ..wire.messages import ChatMessage
from .base import Finish, GenerationRequest, Provider, ProviderEvent, TextDelta, UsageReport

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


def count_tokens(text: str) -> int:
    """Tokens of ``text`` the way the simulated provider counts them."""
    return len(_TOKEN.findall(text))


def simulated_reply(messages: Sequence[ChatMessage], reply_tokens: int | None = None) -> list[str]:
    """The tokens of the reply to ``messages`` (deterministic)."""
    return list(_reply_tokens(messages, reply_tokens))


def _reply_tokens(messages: Sequence[ChatMessage], reply_tokens: int | None) -> Iterator[str]:
    """:func:`simulated_reply`, one sentence at a time: a stream's first token
    does not wait for the whole reply to be made up."""
    canonical = orjson.dumps([[m.role, m.content] for m in messages])
    rng = random.Random(hashlib.sha256(canonical).digest())
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    words = last_user.split()
    quoted = " ".join(words[:_ECHO_WORDS]) + (" …" if len(words) > _ECHO_WORDS else "")
    tokens = _TOKEN.findall(f'You said "{quoted}".' if quoted else "You said nothing.")
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
        tokens = _reply_tokens(request.messages, params.reply_tokens)  # made up as it goes
        reason = "complete"
        limit = params.max_tokens if params.max_tokens is not None else -1
        sent = 0

        yield UsageReport(input_tokens=sum(count_tokens(m.content) + 3 for m in request.messages))
        if ttft > 0:
            await asyncio.sleep(ttft / 1000)
        sleep = asyncio.sleep
        if rate > 0:
            interval = 1.0 / rate
            start = time.monotonic()
            for i, token in enumerate(tokens):
                if i == limit:  # there is more: cut at max_tokens
                    reason = "length"
                    break
                if i:  # the first token comes right after ttft
                    delay = start + i * interval - time.monotonic()
                    await sleep(delay if delay > 0 else 0)
                sent = i + 1
                yield TextDelta(token, 1)
        else:
            for i, token in enumerate(tokens):
                if i == limit:
                    reason = "length"
                    break
                sent = i + 1
                yield TextDelta(token, 1)
                if sent % UNPACED_BURST == 0:
                    await sleep(0)  # as fast as possible, but never starve the loop
        yield UsageReport(output_tokens=sent)
        yield Finish(reason)  # type: ignore[arg-type]
