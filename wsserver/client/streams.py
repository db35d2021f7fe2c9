"""A generation as the Python client sees it: an async iterator of its text."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ..wire.errors import ServerError, StreamFailed
from .channels import END
from .types import StreamResult, Usage

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ClientStream"]


class ClientStream:
    """One generation: an async iterator of text pieces.

    ``result`` is set once ``stream.end`` arrived. Iteration ends normally for
    every reason but ``error``, which raises :class:`StreamFailed`.
    """

    def __init__(self, client: Client, ref: str) -> None:
        self._client = client
        self.ref = ref
        self.id: str | None = None
        self.provider: str | None = None
        self.model: str | None = None
        self.steered_from: str | None = None
        self.result: StreamResult | None = None
        self._parts: list[str] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._failure: BaseException | None = None

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._parts)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is END:
            self._queue.put_nowait(END)  # iterating again ends again
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def wait(self) -> StreamResult:
        """Consume the rest of the stream and return its result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def cancel(self) -> None:
        """Stop the generation. Returns once the stream has ended (a no-op if it had)."""
        if self.result is not None or self.id is None:
            return
        try:
            await self._client.request({"type": "cancel", "stream": self.id})
        except ServerError as exc:
            if exc.code != "unknown_stream":  # ended meanwhile: nothing to do
                raise

    async def interrupt(self, text: str | None = None) -> ClientStream | None:
        """Steer: stop this stream where it is and, with ``text``, continue the
        conversation (so far, plus ``text`` as the user's words) in a new stream,
        which is returned. Without ``text`` it only stops (reason ``interrupted``).
        """
        assert self.id is not None
        message: dict[str, Any] = {"type": "interrupt", "stream": self.id}
        if text is None:
            await self._client.request(message)
            return None
        message["input"] = text
        return await self._client._start_stream(message)

    # called by the client's reader
    def _feed(self, text: str) -> None:
        self._parts.append(text)
        self._queue.put_nowait(text)

    def _snapshot(self, text: str) -> None:
        # The server's text so far: deliver only what this handle has not seen.
        seen = self.text
        if text.startswith(seen) and len(text) > len(seen):
            self._feed(text[len(seen) :])

    def _end(self, frame: Mapping[str, Any]) -> None:
        usage = frame.get("usage") or {}
        error = frame.get("error") or {}
        self.result = StreamResult(
            reason=frame["reason"],
            usage=Usage(
                usage.get("input_tokens", 0),
                usage.get("output_tokens", 0),
                bool(usage.get("estimated", False)),
            ),
            ttft_ms=frame.get("ttft_ms"),
            duration_ms=frame.get("duration_ms", 0.0),
            text=self.text,
            error_code=error.get("code"),
            error_message=error.get("message"),
        )
        if frame["reason"] == "error":
            self._failure = StreamFailed(
                error.get("code", "internal"), error.get("message", ""), self.result
            )
        self._queue.put_nowait(END)

    def _lost(self, exc: BaseException) -> None:
        if self.result is None and self._failure is None:
            self._failure = exc
            self._queue.put_nowait(END)
