"""Sessions' replay logs in Redis, written through before frames are sent.

A session's hash says who owns it; its log is a stream keyed by seq. A batch
of frames is one script (the owner check, one ``XADD`` per frame, ``HSET``,
``XTRIM``), queued in the node's write queue. A ``stream.start`` also stores
the stream's request (so a node that adopts the session can continue the
conversation), a ``stream.end`` removes it, and a direct message in the log
is trimmed off the session's DM queue. An agent run's waits, steps and tool
results store the stream's request again, with the run so far, so a node
that adopts the session goes on with a run that waits; an agent's result in
the log is dropped from the session's hash of results.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import orjson

from ..wire.codec import peek
from .redis_util import encode_request, eval_in, skey

if TYPE_CHECKING:
    from ..core.session import Session
    from .redis import RedisBackplane

__all__ = ["SessionLogs"]

#: Frames after which a stream's request is stored again (see APPEND's ops).
_KEEPS_REQUEST = {"stream.start": "s", "stream.waiting": "s", "stream.step": "s", "stream.tool_result": "r"}


class SessionLogs:
    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane
        #: Registrations of new sessions not yet confirmed (see write_log).
        self._registering: dict[str, asyncio.Future[Any]] = {}

    def register(self, pipe: Any, session: Session) -> None:
        """The session's hash: this node owns it (and what an adopter needs)."""
        bp = self._bp
        pipe.hset(
            skey(session.id),
            mapping={
                "owner": bp.node,
                "identity": session.identity,
                "agent": session.agent or "",
                "public_id": session.public_id,
                "subs": orjson.dumps(sorted(session.subscriptions)),
                "rules": _rules(session),
            },
        )
        pipe.sadd(f"wss:node:{bp.node}:sessions", session.id)

    def save_rules(self, pipe: Any, session: Session) -> None:
        """The session's channel rights changed (a resume with a narrower credential)."""
        pipe.hset(skey(session.id), "rules", _rules(session))

    def reregister(self, pipe: Any, session: Session) -> None:
        """After Redis lost everything: the session, its agent name, its presence, its running streams."""
        self.register(pipe, session)
        key = skey(session.id)
        if session.agent is not None:
            pipe.set(f"wss:agent:{session.agent}", session.id, px=self._bp.agent_ttl_ms)
        for name in session.subscriptions:
            pipe.hincrby(f"wss:c:{name}:m", session.name, 1)
        for stream in session.streams.values():
            pipe.sadd(f"{key}:run", stream.id)
            pipe.hset(f"{key}:req", stream.id, encode_request(stream))

    def write(self, session: Session, entries: list[tuple[int, bytes]], wait: bool) -> asyncio.Future[Any] | None:
        """Queue the append script for ``entries`` of ``session`` (the owner check included)."""
        bp = self._bp
        key = skey(session.id)
        keys = [key, f"{key}:log", f"{key}:run", f"{key}:req", f"{key}:dm", f"{key}:res", f"{key}:dmb"]
        args: list[Any] = [bp.node, session.acked, session.log_first]
        for seq, frame in entries:
            op, stream_id, request = "", "", b""
            kind = peek(frame)
            if kind.type in _KEEPS_REQUEST:
                op, stream_id = _KEEPS_REQUEST[kind.type], kind.stream or ""
                stream = session.streams.get(stream_id)
                if stream is not None:  # what an adopting node needs to continue it
                    request = encode_request(stream)
                if op == "r":  # (the script drops "{stream} {call}" from the results waiting)
                    op += kind.call or ""
            elif kind.type == "stream.end":
                op, stream_id = "e", kind.stream or ""
            elif kind.direct:
                op = "m"
            args += [seq, frame, op, stream_id, request]
        script = bp.scripts["append"]
        events = bp.events

        def check(replies: list[Any]) -> None:
            if replies and replies[0] == 0:  # another node owns it now
                events.fence_session(session.id)

        return bp.writes.enqueue(lambda pipe: eval_in(pipe, script, keys, args), wait, check)

    async def write_log(self, session: Session) -> None:
        """The session's journal, written before its frames are sent."""
        registering = self._registering.pop(session.id, None)
        if registering is not None:  # its welcome waits until other nodes can find it
            with contextlib.suppress(ConnectionError):
                await registering
        entries = session.out.take_journal()
        if not entries or not self._bp.healthy:
            return  # (degraded: sent without Redis; the memory log is written again after the outage)
        future = self.write(session, entries, wait=True)
        assert future is not None
        with contextlib.suppress(ConnectionError):
            await future  # (degraded: the frames go out; they are written again after the outage)

    def write_log_nowait(self, session: Session) -> None:
        entries = session.out.take_journal()
        if entries and self._bp.healthy:
            self.write(session, entries, wait=False)

    def opened(self, session: Session) -> None:
        bp = self._bp
        if bp.healthy:
            future = bp.writes.enqueue(lambda pipe: self.register(pipe, session), wait=True)
            assert future is not None
            self._registering[session.id] = future

    def ended(self, session: Session) -> None:
        """Forget the session in Redis (kept for after an outage, if there is one)."""
        bp = self._bp
        self._registering.pop(session.id, None)
        key = skey(session.id)
        keys = [key, f"{key}:log", f"{key}:run", f"{key}:req", f"{key}:dm", f"{key}:res", f"wss:node:{bp.node}:sessions"]
        keys.append(f"{key}:dmb")  # (KEYS[8])
        script = bp.scripts["end"]
        bp.writes.later(session.id, lambda pipe: eval_in(pipe, script, keys, [bp.node, session.id]))


def _rules(session: Session) -> bytes:
    rules = session.members.rules
    return b"" if rules is None else orjson.dumps({"subscribe": rules.subscribe, "publish": rules.publish})
