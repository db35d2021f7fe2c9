"""A session at run time: its generation tasks, its connection, its expiry.

:class:`SessionRuntime` wraps one :class:`~wsserver.core.session.Session`
(the pure core) with what takes time: a task per running generation, the
connection attached to it (if any), and the ``session_ttl`` timer that runs
while none is. :func:`carry_out` carries out the actions the core returns
after one client message.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from ..core.actions import CloseConnection, MessagingCall, StartGeneration, StopGeneration
from ..wire.errors import ErrorCode
from .runner import run_generation

if TYPE_CHECKING:
    from ..cluster.backplane import Route
    from ..core.protocol import ServerProtocol
    from ..core.session import Session
    from .app import Server
    from .auth import Identity

__all__ = ["Attachable", "SessionRuntime", "carry_out"]


class Attachable(Protocol):
    """A connection a session can be attached to (a WebSocket, or a tunnel from another node)."""

    proto: ServerProtocol
    live: SessionRuntime | None
    server: Server
    ip: str
    #: Who the handshake authenticated (None: the hello's token decides).
    identity: Identity | None
    #: What the backplane settled for the next hello.
    reserved: Route

    def send_soon(self) -> None: ...
    def take_over(self) -> None: ...


class SessionRuntime:
    """The session outlives its connection: while detached its streams go on
    and their frames are sequenced straight into the replay log;
    ``session_ttl`` after the last detach the session ends (streams stopped
    with ``error expired``, upstreams closed) and its memory is released.
    """

    __slots__ = ("_drain_scheduled", "_expiry", "conn", "server", "session", "tasks")

    def __init__(self, server: Server, session: Session) -> None:
        self.server = server
        self.session = session
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.conn: Attachable | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._drain_scheduled = False
        session.out.on_output = self.wake

    def wake(self) -> None:
        """Output is pending: the connection sends it, or (detached) the log takes it."""
        conn = self.conn
        if conn is not None:
            conn.send_soon()
        elif not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain_detached)

    def _drain_detached(self) -> None:
        self._drain_scheduled = False
        if self.conn is None:
            self.session.take_output()  # sequenced into the replay log only
            self.server.backplane.write_log_nowait(self.session)

    def attach(self, conn: Attachable) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        old, self.conn = self.conn, conn
        conn.live = self
        if old is not None and old is not conn:
            old.take_over()

    def detach(self, conn: Attachable) -> None:
        conn.live = None
        if self.conn is not conn:
            return  # taken over already
        self.conn = None
        self.start_detached()

    def start_detached(self) -> None:
        """No connection: subscriptions pause, the expiry clock runs, output goes to the log."""
        session = self.session
        session.paused.update(session.subscriptions)
        session.members.away = True  # direct messages wait in its inbox
        if self.server.sessions.get(session.id) is self:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(self.server.config.session_ttl, self.expire)
        if session.has_output:
            self.wake()

    def expire(self) -> None:
        self._expiry = None
        self.end("error", (ErrorCode.EXPIRED.value, "the session expired with no connection attached"))

    def end(
        self, reason: str, error: tuple[str, str] | None = None, *, forget: bool = True, write: bool = True
    ) -> None:
        """Stop every stream and forget the session (``forget=False``: on a
        shared backplane, leave it there for another node to adopt; ``write=False``:
        and write nothing more there, it is another node's now)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        session = self.session
        self.server.sessions.remove(self)
        self.apply(session.close(reason, error))
        backplane = self.server.backplane
        if forget:
            backplane.session_ended(session)
        elif not write:
            session.out.journal = None
        elif self.conn is None:  # (an attached session's writer writes them)
            session.take_output()
            backplane.write_log_nowait(session)
        session.out.on_output = None

    def apply(self, actions: list[Any]) -> None:
        """Start and stop generation tasks."""
        for action in actions:
            if type(action) is StartGeneration:
                stream = action.stream
                task = asyncio.get_running_loop().create_task(
                    run_generation(self.session, stream, self.server.providers[stream.provider]),
                    name=f"stream:{stream.id}",
                )
                self.tasks[stream.id] = task
                task.add_done_callback(lambda _t, sid=stream.id: self.tasks.pop(sid, None))
            elif type(action) is StopGeneration:
                task = self.tasks.get(action.stream_id)
                if task is not None:
                    task.cancel()


async def carry_out(conn: Attachable, actions: list[Any]) -> CloseConnection | None:
    """Carry out what the protocol asked for after one client message; returns a close, if asked."""
    close = None
    for action in actions:
        if type(action) is CloseConnection:
            close = action
        elif type(action) is MessagingCall:
            session = conn.proto.session
            if session is not None:  # (awaited: replies leave in request order)
                pending = conn.server.backplane.call(session, action)
                if pending is not None:
                    await pending
        elif conn.live is not None:
            conn.live.apply([action])
    return close
