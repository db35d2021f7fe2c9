"""This node's sessions: opening, resuming, parking, adopting and fencing them.

:class:`Sessions` is a read-only mapping of session id to
:class:`~wsserver.server.runtime.SessionRuntime`; it decides what a
``hello`` gets (a resumed session with its replay, a snapshot, or a fresh
session after ``resume_failed``), builds new sessions with the identity's
rate limits, and rebuilds the sessions a backplane hands over from a lost
node.

A finished session (detached, idle: :func:`~wsserver.core.dormant.can_park`)
is *parked*: kept as one ``bytes`` (:mod:`wsserver.core.dormant`) until it
is resumed, looked up, or expires. Looking a parked session up by id
(``sessions[sid]``, ``get``) wakes it; :meth:`Sessions.active` and
:meth:`Sessions.running` see only the sessions that are not parked.
Detached sessions, parked or not, expire by a sweep over a heap of deadlines
(:meth:`Sessions.expire_due`, every 0.25 s) instead of a timer each.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..cluster.backplane import AdoptedSession, Route
from ..core import dormant
from ..core.limits import ChannelRules, GenerationQuota, MessagingLimits, StreamLimits, TokenBucket, TokenBudget
from ..core.protocol import Opened
from ..core.session import ANONYMOUS, Session
from ..core.runs import Run
from ..core.streams import Stream, StreamState
from ..core.takeover import end_lost, restore_log
from ..wire.codec import encode
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import Error, Hello
from ..wire.names import NAME_RULE, valid_name
from .runtime import Attachable, SessionRuntime

if TYPE_CHECKING:
    from .app import Server
    from .auth import Identity

__all__ = ["Sessions"]


class Sessions(Mapping[str, SessionRuntime]):
    """This node's sessions by id: attached, detached or parked."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._live: dict[str, SessionRuntime] = {}
        #: Parked sessions and when each expires (loop time). Both dicts hold
        #: only str, bytes and float: the garbage collector does not track them.
        self._parked: dict[str, bytes] = {}
        self._parked_until: dict[str, float] = {}
        #: Bytes of the parked sessions' blobs (their payload, not the dict's own).
        self.parked_bytes = 0
        #: (expiry, session id) of detached sessions, soonest first; an entry
        #: whose expiry is no longer the session's is stale (it was resumed).
        self._expiries: list[tuple[float, str]] = []
        #: The runtime of a session that is not parked, or None: dict's own
        #: get(), since fan-out looks up every subscriber.
        self.active = self._live.get
        cfg = server.config
        self.limits = MessagingLimits(
            max_subscriptions=cfg.max_subscriptions,
            max_data_bytes=cfg.max_data_bytes,
            publish_rate=cfg.publish_rate,
            publish_burst=cfg.publish_rate * 2,
            inbox_messages=cfg.inbox_messages,
            inbox_bytes=cfg.inbox_bytes,
        )
        # (the conversation an interrupt continues: no larger than one a client could send)
        self.stream_limits = StreamLimits(cfg.max_stream_bytes, cfg.recent_streams_bytes, cfg.max_size)
        self._quotas: dict[str, GenerationQuota] = {}

    def __getitem__(self, session_id: str) -> SessionRuntime:
        """The session's runtime; a parked session is woken."""
        live = self._live.get(session_id)
        if live is None:
            live = self.wake(session_id)
            if live is None:
                raise KeyError(session_id)
        return live

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._live or session_id in self._parked

    def __iter__(self) -> Iterator[str]:
        return itertools.chain(list(self._live), list(self._parked))

    def __len__(self) -> int:
        return len(self._live) + len(self._parked)

    def running(self) -> list[SessionRuntime]:
        """The sessions that are not parked (attached, or detached with work to do)."""
        return list(self._live.values())

    @property
    def parked(self) -> int:
        return len(self._parked)

    def remove(self, live: SessionRuntime) -> None:
        if self._live.get(live.session.id) is live:
            del self._live[live.session.id]

    def counts(self) -> tuple[int, int, int, int, int]:
        """(attached, detached incl. parked, running streams, parked, bytes parked)."""
        lives = self._live.values()
        attached = sum(1 for live in lives if live.conn is not None)
        streams = sum(len(live.session.streams) for live in lives)
        return attached, len(self) - attached, streams, len(self._parked), self.parked_bytes

    # ---------------------------------------------------------------- parking

    def park(self, live: SessionRuntime) -> bool:
        """Keep a detached, idle session as bytes (False: it is not idle)."""
        session = live.session
        if live.conn is not None or live.tasks or self._live.get(session.id) is not live:
            return False
        if session.has_output:  # sequenced into the log and written, as while detached
            session.take_output()
            self._server.backplane.write_log_nowait(session)
        if not dormant.can_park(session):
            return False
        session.out.on_output = session.on_actions = None  # (the runtime's wake-ups: no cycle left behind)
        del self._live[session.id]
        blob = self._parked[session.id] = dormant.park(session, quota=live.quota_key)
        self._parked_until[session.id] = live.until
        self.parked_bytes += len(blob)
        return True

    def wake(self, session_id: str) -> SessionRuntime | None:
        """Rebuild a parked session (detached, its expiry unchanged); None if not parked."""
        blob = self._parked.pop(session_id, None)
        if blob is None:
            return None
        until = self._parked_until.pop(session_id)
        self.parked_bytes -= len(blob)
        parked = dormant.read(blob)
        quota_key = parked.extra.get("quota") or parked.identity
        session = self._build(session_id, parked.identity, quota_key, rules=parked.rules, public_id=parked.public_id)
        dormant.restore(session, parked)
        live = SessionRuntime(self._server, session, quota_key)
        self._live[session_id] = live
        live.start_detached(until)
        return live

    def expire_at(self, session_id: str, until: float) -> None:
        """The detached session expires at loop time ``until`` (unless resumed)."""
        heapq.heappush(self._expiries, (until, session_id))

    def expire_due(self, now: float) -> None:
        """End the detached sessions (parked or not) whose ``session_ttl`` has run out."""
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            until, session_id = heapq.heappop(expiries)
            if self._parked_until.get(session_id) == until:
                live = self.wake(session_id)
            else:
                live = self._live.get(session_id)
                if live is None or live.until != until or live.conn is not None:
                    continue  # resumed (or ended) since
            if live is not None:
                live.expire()

    # ------------------------------------------------------------------ hello

    def open(self, hello: Hello, conn: Attachable, reserved: Route) -> Opened:
        """Resume the session ``hello`` names if possible, else open a fresh one.

        ``reserved`` is what the backplane settled for the hello (the id a new
        session gets, whether its agent name is taken on another node).
        """
        server = self._server
        telemetry = server.telemetry
        before: list[bytes] = []
        if hello.agent is not None and not valid_name(hello.agent):
            raise ProtocolError(ErrorCode.BAD_NAME, f"an agent name {NAME_RULE}", field="agent", ref=hello.id)
        identity = server.identify(hello, conn.identity)
        live = self.get(hello.session) if hello.session else None
        if live is not None and live.session.identity != identity.id:
            live = None  # another identity's session: as if unknown (no hint that it exists)
        if live is not None:
            live.attach(conn)  # takes the session over from another connection
            session = live.session
            session.take_output()  # sequence what is pending: the replay covers it
            if hello.snapshot:
                session.snapshot()
                telemetry.resumes.labels("ok").inc()
                self._back(session, identity)
                return Opened(session, True)
            replay = session.replay_after(hello.last_seq or 0)
            if replay is not None:
                telemetry.resumes.labels("ok").inc()
                self._back(session, identity)
                return Opened(session, True, after=replay)
            message = (
                f"cannot resume after seq {hello.last_seq or 0}: the session's "
                "replay log no longer reaches back that far; a new session was opened"
            )
            before.append(encode(Error(code=ErrorCode.RESUME_FAILED.value, message=message)))
            telemetry.resumes.labels("failed").inc()
            live.detach(conn)
            live.end("cancelled")
        # (with a shared backplane, Backplane.route() settled it across nodes too)
        if reserved.agent_taken or (hello.agent is not None and server.backplane.agent_held(hello.agent)):
            raise ProtocolError(
                ErrorCode.AGENT_NAME_TAKEN,
                f"agent name {hello.agent!r} is held by another session; resume that "
                "session or choose another name",
                ref=hello.id,
            )
        quota_key = identity.id if identity.id != ANONYMOUS else "ip:" + conn.ip
        session = self._new_session(
            reserved.session_id or secrets.token_urlsafe(16),  # 128 bits: unguessable
            identity.id,
            identity.rules,
            hello.agent,
            quota_key,
        )
        live = SessionRuntime(server, session, quota_key)
        self._live[session.id] = live
        server.backplane.session_opened(session)
        live.attach(conn)
        return Opened(session, False, before=before)

    def _back(self, session: Session, identity: Identity) -> None:
        """A resumed session, its replay taken: the resuming credential's
        channel rights apply from now on, and the direct messages that waited
        while it was away follow the replay."""
        backplane = self._server.backplane
        changed = session.members.rules != identity.rules
        for call in session.members.restrict(identity.rules, session.streams.values()):
            backplane.call(session, call)  # (unsubscribes: carried out at once by every backplane)
        session.members.present()
        backplane.session_resumed(session, rights_changed=changed)

    def _new_session(
        self,
        session_id: str,
        identity: str,
        rules: ChannelRules | None,
        agent: str | None,
        quota_key: str,
        public_id: str | None = None,
    ) -> Session:
        session = self._build(session_id, identity, quota_key, agent=agent, rules=rules, public_id=public_id)
        if agent is not None:
            self._server.backplane.claim_agent(agent, session)
        return session

    def _build(self, session_id: str, identity: str, quota_key: str, **fields: Any) -> Session:
        """A session with this server's settings and the identity's limits."""
        server = self._server
        cfg = server.config
        session = Session(
            session_id,
            providers=server.providers,
            max_streams=cfg.max_streams,
            stream_limits=self.stream_limits,
            max_log_messages=cfg.replay_max_messages,
            max_log_bytes=cfg.replay_max_bytes,
            coalesce=cfg.coalesce,
            channels=server.backplane,
            limits=self.limits,
            identity=identity,
            observer=server.telemetry,
            quota=self._quota(quota_key),
            account=quota_key,  # (per IP when anonymous)
            **fields,
        )
        if server.backplane.shared:
            session.out.journal = []  # written to the backplane before it is sent
        return session

    def _quota(self, key: str) -> GenerationQuota | None:
        """Generation and token limits are per identity (per client IP when anonymous)."""
        cfg = self._server.config
        if cfg.generate_rate <= 0 and cfg.token_rate <= 0:
            return None
        quota = self._quotas.get(key)
        if quota is None:
            quota = self._quotas[key] = GenerationQuota(
                TokenBucket(cfg.generate_rate / 60, cfg.generate_rate) if cfg.generate_rate > 0 else None,
                TokenBudget(cfg.token_rate) if cfg.token_rate > 0 else None,
            )
        return quota

    def prune_quotas(self) -> None:
        """Forget the limits of identities idle long enough to be full again."""
        now = time.monotonic()
        for key, quota in list(self._quotas.items()):
            if quota.idle_full(now):
                del self._quotas[key]

    # ------------------------------------------------------ several nodes

    def adopt(self, adopted: AdoptedSession) -> Session:
        """Take over a session of a lost node from what the backplane kept.

        Its replay log and seq continue where the lost node's writes ended;
        streams that ran there end with ``error node_lost``; agent runs that
        waited for tool results or approvals go on waiting here (their calls
        routed and timed again), and a queued stream waits behind its
        predecessor if that one is still here (else it ends ``node_lost`` too);
        the session is detached until its client resumes (or it expires).
        """
        quota_key = adopted.identity if adopted.identity != ANONYMOUS else "ip:?"
        session = self._new_session(
            adopted.id, adopted.identity, adopted.rules, adopted.agent, quota_key, public_id=adopted.public_id
        )
        answers = restore_log(session, adopted.seq, adopted.acked, adopted.first, adopted.frames)
        session.subscriptions.update(adopted.subscriptions)
        session.paused.update(adopted.subscriptions)
        live = SessionRuntime(self._server, session, quota_key)
        self._live[session.id] = live
        now = session.clock()
        lost = (ErrorCode.NODE_LOST.value, "the node running this stream was lost")
        running: list[Stream] = []
        for stream_id, request in sorted(adopted.running.items()):
            stream = Stream(
                id=stream_id,
                ref=None,
                provider=request.provider,
                model=request.model,
                messages=request.messages,
                params=request.params,
                started_at=now,
                channel=request.channel,
                tools=request.tools,
                tool_choice=request.tool_choice,
                thread=request.thread,
                queued_after=request.queued_after,
                run=Run.from_state(request.run) if request.run is not None else None,
            )
            if request.state == "waiting" and stream.run is not None and stream.run.calls:
                stream.state, stream.next_index = StreamState.WAITING, request.next_index
                session.book.add(stream)
                session.resume_waiting(stream)
            elif request.state == "queued" and not answers.get(stream_id):
                stream.state = StreamState.QUEUED
                session.book.add(stream)
            else:
                running.append(stream)
        for stream in running:  # (a stream queued behind one of them starts here)
            end_lost(session, stream, answers.get(stream.id, []), lost)
        for stream in list(session.streams.values()):  # queued behind a stream that is gone
            if stream.state is StreamState.QUEUED and stream.queued_after not in session.streams:
                session.book.running.pop(stream.id)
                end_lost(session, stream, [], lost)
        live.start_detached()
        return session

    def fence(self, session_id: str) -> Attachable | None:
        """Another node adopted this session (this one was declared lost): drop
        it here without touching the backplane. Returns its connection, whose
        client must be told to resume elsewhere."""
        blob = self._parked.pop(session_id, None)
        if blob is not None:
            del self._parked_until[session_id]
            self.parked_bytes -= len(blob)
            return None
        live = self._live.pop(session_id, None)
        if live is None:
            return None
        conn, live.conn = live.conn, None
        if conn is not None:  # nothing more reaches the client from here
            conn.proto.release()
            conn.live = None
        live.end("error", (ErrorCode.NODE_LOST.value, "this node was declared lost"), forget=False, write=False)
        return conn

    def end_all(self, *, forget: bool) -> None:
        """Stop every stream with ``error shutdown`` (``forget``: and end the sessions).

        Parked sessions have nothing running and nothing unwritten: kept on a
        shared backplane, they are simply dropped here."""
        for session_id in list(self._parked):
            if forget:
                self.wake(session_id)  # then ended below
            else:
                self.parked_bytes -= len(self._parked.pop(session_id))
                del self._parked_until[session_id]
        for live in list(self._live.values()):
            live.end("error", (ErrorCode.SHUTDOWN.value, "the server is shutting down"), forget=forget)
