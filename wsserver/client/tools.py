"""Tool handlers of the Python client: calls answered as they come.

::

    async def lookup(arguments):
        return {"topic": arguments["topic"], "summary": "…"}

    client.tools.register("lookup", lookup)      # sync or async, a dict in, anything out

A registered handler answers, by itself and once per call:

* the calls of this client's own agent runs that wait for the client
  (``stream.waiting``, ``wait: "client"``), with ``tool_result {stream,
  call, content}``;
* the calls routed to this client's agent by other sessions' runs
  (``tool_call`` frames), with ``tool_result {call, content}``.

What a handler returns becomes the content: a string as it is, anything
else as JSON. A handler that raises answers ``{"error": "tool_failed",
"message": …}`` (the model reads it and reacts). Routed calls with no
handler wait in :attr:`Tools.calls` for the caller to answer with
:meth:`Client.tool_result`; calls of a run with no handler are returned by
:meth:`ClientStream.wait_for_tools`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..wire.errors import ConnectionLost, ServerError
from .types import ToolCallRequest

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Handler", "Tools", "content_of"]

logger = logging.getLogger("wsserver.client")

#: A tool handler: the call's arguments in, its result out (sync or async).
Handler = Callable[[dict[str, Any]], Any]


def content_of(result: Any) -> Any:
    """A result as ``tool_result.content``: a string as it is, else JSON text."""
    return result if isinstance(result, str) else orjson.dumps(result, default=str).decode()


class Tools:
    """The client's tool handlers, by tool name."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._handlers: dict[str, Handler] = {}
        #: Routed calls no handler took, in order.
        self.calls: asyncio.Queue[ToolCallRequest] = asyncio.Queue()
        self._taken: set[tuple[str | None, str]] = set()  # (stream, call) answered by a handler
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, name: str, handler: Handler) -> Handler:
        """Answer calls of tool ``name`` with ``handler`` (sync or async)."""
        self._handlers[name] = handler
        return handler

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def handles(self, name: str) -> bool:
        return name in self._handlers

    # ----------------------------------------------------- called by the client

    def routed(self, frame: dict[str, Any]) -> None:
        request = ToolCallRequest(frame["call"], frame["name"], frame.get("arguments") or {}, frame.get("from", ""))
        if self.handles(request.name):
            self.answer(None, request.call, request.name, request.arguments)
        else:
            self.calls.put_nowait(request)

    def answer(self, stream: str | None, call: str, name: str, arguments: dict[str, Any]) -> bool:
        """Run the handler of ``name`` for ``call`` (once) and send its result; False: no handler."""
        handler = self._handlers.get(name)
        if handler is None:
            return False
        if (stream, call) not in self._taken:
            self._taken.add((stream, call))
            task = asyncio.get_running_loop().create_task(self._run(handler, stream, call, arguments))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, handler: Handler, stream: str | None, call: str, arguments: dict[str, Any]) -> None:
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(arguments)
            else:
                result = await asyncio.to_thread(handler, arguments)
                if inspect.isawaitable(result):
                    result = await result
            content = content_of(result)
        except Exception as exc:  # the model is told, and the run goes on
            logger.warning("tool handler for call %s failed: %r", call, exc)
            content = content_of({"error": "tool_failed", "message": str(exc) or type(exc).__name__})
        try:
            await self._client.tool_result(call, content, stream=stream)
        except (ServerError, ConnectionLost) as exc:  # e.g. the run ended meanwhile
            logger.info("result of call %s not taken: %s", call, exc)

