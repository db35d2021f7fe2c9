"""The client's side of the HTTP transport (``transport="sse"``), on httpx2.

:func:`sse_connect` opens ``GET /v1/events`` and gives an object that the
:class:`~wsserver.client.client.Client` uses as it uses a websockets
``ClientConnection``: ``send()``, ``recv()`` and ``async for``, ``close()``,
``close_code``/``close_reason``; a closed stream raises websockets'
``ConnectionClosed`` with the code of the server's ``event: close`` (1006
when the stream just ended). What ``send()`` is given is posted to
``/v1/send`` by one task, one POST at a time, frames that waited meanwhile
batched into one array, so the server reads them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx2
import orjson
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidHandshake
from websockets.frames import Close

__all__ = ["SseSocket", "http_base", "sse_connect"]

_ABNORMAL = 1006


def http_base(url: str) -> tuple[str, dict[str, str]]:
    """``ws://h:p/path?token=t`` -> (``http://h:p``, its query); wss -> https."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    query = dict(item.split("=", 1) for item in parts.query.split("&") if "=" in item)
    return urlunsplit((scheme, parts.netloc, "", "", "")), query


class SseSocket:
    """One HTTP transport connection (see the module docstring)."""

    def __init__(self, http: httpx2.AsyncClient, base: str, query: dict[str, str], response: httpx2.Response) -> None:
        self._http = http
        self._base = base
        self._query = query
        self._response = response
        self.token = ""
        self.close_code: int | None = None
        self.close_reason = ""
        self._frames: asyncio.Queue[str | None] = asyncio.Queue()
        self._outbox: deque[bytes] = deque()
        self._posted = asyncio.Event()
        self._lines = response.aiter_lines()
        self._reader: asyncio.Task[None] | None = None
        self._poster: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Read the stream's first event (its connection token) and start reading and posting."""
        event, data = await self._event()
        if event != "connection" or data is None:
            raise InvalidHandshake("the stream did not begin with its connection event")
        self.token = orjson.loads(data)["connection"]
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._poster = loop.create_task(self._post_loop())

    async def _event(self) -> tuple[str, str | None]:
        """The next SSE event (comments skipped): (event name, data); ("", None) at the end."""
        name, data = "message", []
        async for line in self._lines:
            if not line:
                if data:
                    return name, "\n".join(data)
                name = "message"
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
        return "", None

    async def _read(self) -> None:
        try:
            while True:
                event, data = await self._event()
                if data is None:
                    break
                if event == "close":
                    close = orjson.loads(data)
                    self.close_code, self.close_reason = int(close["code"]), str(close["reason"])
                    break
                self._frames.put_nowait(data)
        except (httpx2.HTTPError, OSError):
            pass
        finally:
            if self.close_code is None:
                self.close_code = _ABNORMAL
            await self._response.aclose()
            self._frames.put_nowait(None)

    async def _post_loop(self) -> None:
        url = f"{self._base}/v1/send?" + urlencode({**self._query, "connection": self.token})
        headers = {"Content-Type": "application/json"}
        try:
            while True:
                while not self._outbox:
                    self._posted.clear()
                    await self._posted.wait()
                batch = list(self._outbox)
                self._outbox.clear()
                body = b"[" + b",".join(batch) + b"]"
                response = await self._http.post(url, content=body, headers=headers)
                if response.status_code != 202:  # the connection is gone: the stream ends too
                    return
        except (httpx2.HTTPError, OSError):
            return

    # ------------------------------------------------- ClientConnection's face

    async def send(self, data: str | bytes, text: bool = True) -> None:
        if self.close_code is not None:
            raise self._closed()
        self._outbox.append(data.encode() if isinstance(data, str) else data)
        self._posted.set()

    async def recv(self) -> str:
        frame = await self._frames.get()
        if frame is None:
            self._frames.put_nowait(None)  # every later recv() sees the close too
            raise self._closed()
        return frame

    async def __aiter__(self) -> AsyncIterator[str]:
        with contextlib.suppress(ConnectionClosedOK):
            while True:
                yield await self.recv()

    def _closed(self) -> Exception:
        close = Close(self.close_code or _ABNORMAL, self.close_reason)
        if close.code in (1000, 1001):
            return ConnectionClosedOK(close, None)
        return ConnectionClosedError(close, None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the stream (the server detaches the session, as on a socket close)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        for task in (self._poster, self._reader):
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):
            await self._response.aclose()
        await self._http.aclose()


async def sse_connect(url: str, *, open_timeout: float = 10.0, **_: Any) -> SseSocket:
    """Open ``GET /v1/events`` on the server of ``url`` (a ``ws://`` or ``http://`` URL)."""
    base, query = http_base(url)
    http = httpx2.AsyncClient(timeout=httpx2.Timeout(open_timeout, read=None))
    try:
        request = http.build_request("GET", f"{base}/v1/events", params=query, headers={"Accept": "text/event-stream"})
        response = await http.send(request, stream=True)
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise InvalidHandshake(f"GET /v1/events answered {response.status_code}: {body}")
        socket = SseSocket(http, base, query, response)
        async with asyncio.timeout(open_timeout):
            await socket.open()
    except httpx2.TransportError as exc:
        await http.aclose()
        raise OSError(f"cannot reach {base}: {exc!r}") from exc
    except BaseException:
        await http.aclose()
        raise
    return socket
