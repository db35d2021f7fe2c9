"""A session at run time: its generation tasks, its connection, its expiry.

:class:`SessionRuntime` wraps one :class:`~wsserver.core.session.Session`
(the pure core) with what takes time: a task per running generation (a
step of an agent run), the timers of calls a run waits on, the connection
attached to it (if any), and its expiry (``session_ttl``) while none is.
:func:`carry_out` carries out the actions the core returns after one
client message; the actions of transitions a stream makes by itself (a run's
next step, a call to route, a queued stream that starts) are pulled from the
core when its ``on_actions`` wake-up says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import logging

from ..core.actions import (
    AnswerCall,
    ArmTimer,
    CloseConnection,
    MessagingCall,
    RouteCall,
    StartGeneration,
    StopGeneration,
)
from ..core.streams import StreamState
from ..wire.errors import ErrorCode
from .runner import run_generation

if TYPE_CHECKING:
    from ..cluster.backplane import Route
    from ..core.protocol import ServerProtocol
    from ..core.session import Session
    from .app import Server
    from .auth import Identity

__all__ = ["Attachable", "SessionRuntime", "carry_out"]

logger = logging.getLogger("wsserver.streams")

T = TypeVar("T")


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
    Once detached and idle it is parked (:meth:`Sessions.park`) until then.
    Expiry is a sweep every 0.25 s over a heap of deadlines
    (:meth:`Sessions.expire_due`), not a timer per session.
    """

    __slots__ = (
        "_actions_scheduled", "_drain_scheduled", "calls", "conn", "quota_key", "server", "session", "tasks", "timers",
        "until",
    )

    def __init__(self, server: Server, session: Session, quota_key: str) -> None:
        self.server = server
        self.session = session
        #: Whose generation limits the session draws on (kept when it is parked).
        self.quota_key = quota_key
        self.tasks: dict[str, asyncio.Task[None]] = {}
        #: Timers of calls a run waits on, by (stream, call).
        self.timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        #: Backplane calls of this session under way (their answers come to this object).
        self.calls = 0
        self.conn: Attachable | None = None
        #: While detached: when the session expires (loop time; the sweep of
        #: :meth:`Sessions.expire_due` ends it). 0 while attached.
        self.until = 0.0
        self._drain_scheduled = False
        self._actions_scheduled = False
        session.out.on_output = self.wake
        session.on_actions = self.actions_pending
        if session.deferred:  # (a session rebuilt here: its runs' calls to route and time)
            self.actions_pending()

    def actions_pending(self) -> None:
        """The core deferred actions: carried out at the end of this loop turn."""
        if not self._actions_scheduled:
            self._actions_scheduled = True
            asyncio.get_running_loop().call_soon(self._carry_out_deferred)

    def _carry_out_deferred(self) -> None:
        self._actions_scheduled = False
        if self.session.on_actions is not None:  # (ended meanwhile: nothing more)
            self.apply(self.session.take_actions())

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
        self.until = 0.0
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

    def start_detached(self, until: float | None = None) -> None:
        """No connection: subscriptions pause, the expiry clock runs (until
        loop time ``until``, else for ``session_ttl``), output goes to the
        log, and once idle the session is parked (:meth:`settle`)."""
        session = self.session
        session.paused.update(session.subscriptions)
        session.members.away = True  # direct messages wait in its inbox
        sessions = self.server.sessions
        if sessions.active(session.id) is self:
            loop = asyncio.get_running_loop()
            if until is None:  # (else: woken from parking, its deadline is in the heap already)
                until = loop.time() + self.server.config.session_ttl
                sessions.expire_at(session.id, until)
            self.until = until
            self.settle_soon()
        if session.has_output:
            self.wake()

    def settle_soon(self) -> None:
        """While detached: try :meth:`settle` at the end of this loop turn
        (after the last frames of what just ended are logged)."""
        if self.until and self.conn is None:
            asyncio.get_running_loop().call_soon(self.settle)

    def settle(self) -> None:
        """Detached and idle (no stream running, no backplane call under way): parked, kept as bytes."""
        if self.until and self.conn is None and not self.tasks and not self.calls and not self.timers:
            self.server.sessions.park(self)

    def expire(self) -> None:
        self.end("error", (ErrorCode.EXPIRED.value, "the session expired with no connection attached"))

    def end(
        self, reason: str, error: tuple[str, str] | None = None, *, forget: bool = True, write: bool = True
    ) -> None:
        """Stop every stream and forget the session (``forget=False``: on a
        shared backplane, leave it there for another node to adopt, with its
        waiting runs and queued streams, which that node goes on with;
        ``write=False``: and write nothing more there, it is another node's now)."""
        self.until = 0.0
        session = self.session
        self.server.sessions.remove(self)
        session.on_actions = None
        self.apply(session.close(reason, error, keep_waiting=not forget and write))
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
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
        """Start and stop generation tasks, route calls to agents, arm timers."""
        for action in actions:
            kind = type(action)
            if kind is StartGeneration:
                stream = action.stream
                if stream.state is not StreamState.RUNNING:
                    continue  # ended before its (next) step could start
                task = asyncio.get_running_loop().create_task(
                    run_generation(self.session, stream, self.server.providers[stream.provider]),
                    name=f"stream:{stream.id}",
                )
                self.tasks[stream.id] = task
                task.add_done_callback(lambda t, sid=stream.id: self._task_done(sid, t))
            elif kind is StopGeneration:
                task = self.tasks.get(action.stream_id)
                if task is not None:
                    task.cancel()
                for key in [key for key in self.timers if key[0] == action.stream_id]:
                    self.timers.pop(key).cancel()
            elif kind is ArmTimer:
                key = (action.stream_id, action.call_id)
                old = self.timers.pop(key, None)
                if old is not None:
                    old.cancel()
                self.timers[key] = asyncio.get_running_loop().call_later(action.seconds, self._timed_out, key)
            elif kind is RouteCall:
                self.server.spawn(self._route(action))

    def _task_done(self, stream_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(stream_id) is task:  # (a run's next step may have its own task already)
            del self.tasks[stream_id]
        if not self.tasks:
            self.settle_soon()

    def _timed_out(self, key: tuple[str, str]) -> None:
        self.timers.pop(key, None)
        self.session.call_timed_out(*key)

    async def _route(self, action: RouteCall) -> None:
        session = self.session
        try:
            delivered: bool | None = await self.server.backplane.route_call(session, action)
        except Exception as exc:  # the model is told, and the run goes on
            logger.warning("routing call %s of stream %s failed: %r", action.call_id, action.stream_id, exc)
            delivered = None
        session.call_routed(action.stream_id, action.call_id, delivered)
        if not delivered:
            timer = self.timers.pop((action.stream_id, action.call_id), None)
            if timer is not None:
                timer.cancel()


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
                    await _answered(conn.live, pending)
        elif type(action) is AnswerCall:
            session = conn.proto.session
            if session is not None:  # (awaited, likewise)
                try:
                    verdict = await _answered(conn.live, conn.server.backplane.answer_call(session, action))
                except Exception as exc:
                    logger.warning("answering routed call %s failed: %r", action.msg.call, exc)
                    verdict = "down"
                session.call_answered(action.msg, verdict)
        elif conn.live is not None:
            conn.live.apply([action])
    return close


async def _answered(live: SessionRuntime | None, pending: Awaitable[T]) -> T:
    """Await a backplane call; meanwhile the session is not parked (the answer
    comes to this runtime's session, even if the client has left by then)."""
    if live is None:
        return await pending
    live.calls += 1
    try:
        return await pending
    finally:
        live.calls -= 1
        if not live.calls:
            live.settle_soon()
