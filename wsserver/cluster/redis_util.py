"""Small pieces the Redis backplane's modules share: key names, the failures
that mean "Redis is not answering", queuing a script in a pipeline, and the
stored form of a running stream's request."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.streams import Stream, request_fields, request_record
from .backplane import LostStream

__all__ = ["DOWN", "decode_request", "encode_request", "eval_in", "redacted", "skey", "suppress_down"]

#: What means "Redis is not answering" (a script error, say, does not).
DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


def skey(sid: str) -> str:
    """The hash of session ``sid`` (its other keys have this prefix)."""
    return f"wss:s:{sid}"


def eval_in(pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
    """Queue a script in a pipeline by its sha. The scripts are loaded when the
    node connects (:meth:`RedisBackplane.load_scripts`); redis-py's own way
    (``pipe.scripts``) would cost a ``SCRIPT EXISTS`` round trip per pipeline."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def encode_request(stream: Stream) -> bytes:
    """What an adopting node needs to continue a running stream (an interrupt)
    or a run waiting for tool results: its request
    (:func:`~wsserver.core.streams.request_record`: provider and model, the rich
    messages, the params, the channel, the tools and tool_choice, as a client
    would send them), its thread, and where it is: its state, the next index,
    the run so far."""
    request = request_record(stream)
    if stream.thread is not None:
        request["thread"] = stream.thread
    if stream.queued_after is not None:
        request["queued_after"] = stream.queued_after
    if stream.run is not None:
        request["run"] = stream.run.state()
    request["state"] = stream.state.name.lower()
    request["next_index"] = stream.next_index
    return orjson.dumps(request)


def decode_request(raw: bytes | None) -> LostStream:
    if raw is None:
        return LostStream()
    request = orjson.loads(raw)
    return LostStream(
        **request_fields(request),
        thread=request.get("thread"),
        state=request.get("state", "running"),
        queued_after=request.get("queued_after"),
        next_index=int(request.get("next_index", 0)),
        run=request.get("run"),
    )


def redacted(url: str) -> str:
    """``url`` without its password (for logs)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ':'}***@{host}"


class suppress_down:
    """``with suppress_down():`` ignores Redis being unreachable (and a cancel)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, (*DOWN, asyncio.CancelledError))
