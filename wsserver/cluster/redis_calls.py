"""Calls of agent runs routed to agents through Redis, and the queue of a
session's direct messages and routed calls (:meth:`RoutedCalls.take_queued`).

A run's call for an agent is one script (:data:`~.redis_scripts.ROUTE_CALL`):
it records the call under its route id (whose run made it, the agent's
session) and queues it for the agent's session like a direct message, so the
``tool_call`` frame enters that session's log on whichever node owns it, once.
The agent's answer is one script too (:data:`~.redis_scripts.ANSWER_CALL`):
only the session it was routed to may answer, once; the result waits in the
requesting session's hash of results (until the frame carrying it is in that
session's log) and its owner is told, which hands it to the run
(:meth:`RoutedCalls.take_results`; an adopting node does the same).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import orjson

from .backplane import ROUTE_TTL_S
from .redis_util import DOWN, skey

if TYPE_CHECKING:
    from ..core.actions import AnswerCall, RouteCall
    from ..core.session import Session
    from .redis import RedisBackplane

__all__ = ["RoutedCalls"]


class RoutedCalls:
    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane
        #: Ids of the queued items handed to each session (a second pass skips them).
        self._seen: dict[str, set[str]] = {}
        #: Sessions whose queue is being drained (True: drain again after this pass).
        self._draining: dict[str, bool] = {}

    def forget(self, sid: str) -> None:
        self._seen.pop(sid, None)

    async def take_queued(self, sid: str) -> None:
        """Hand the session the direct messages and routed calls waiting for it in Redis.

        They stay in its queue until the frames carrying them are in its log
        (the append script trims the queue), so an ``ok`` to a ``send`` is
        never lost to a crash in between; ids keep a second pass from
        delivering one twice. One pass at a time per session, in order.
        While the session is away they stay there (bounded by the send
        script), and its resume takes them (``RedisBackplane.session_resumed``).
        """
        bp = self._bp
        if sid in self._draining:
            self._draining[sid] = True  # again after the running pass
            return
        self._draining[sid] = False
        try:
            while True:
                session = bp.events.local_session(sid)
                if session is None:
                    return  # not (or no longer) ours: the new owner takes them when it adopts
                items = await bp.redis.lrange(f"{skey(sid)}:dm", 0, 999)
                session = bp.events.local_session(sid)
                if session is None or session.members.away:
                    return  # (away: its resume takes them; gone: its new owner does)
                seen = self._seen.setdefault(sid, set())
                messages = [orjson.loads(item) for item in items]
                seen.intersection_update(dm["id"] for dm in messages)  # trimmed ones are forgotten
                for dm in messages:
                    if dm["id"] not in seen:
                        seen.add(dm["id"])
                        if dm.get("kind") == "tool_call":
                            session.members.deliver_tool_call(dm["from"], dm["call"], dm["name"], dm["arguments"])
                        else:
                            session.members.deliver_direct(dm["from"], dm["data"])
                if not self._draining.get(sid):
                    return
                self._draining[sid] = False
        except DOWN as exc:
            bp.down(exc)
        finally:
            self._draining.pop(sid, None)

    async def route(self, session: Session, call: RouteCall) -> bool:
        bp = self._bp
        if not bp.healthy:
            raise ConnectionError("the Redis backplane is unreachable")
        item = orjson.dumps(
            {
                "id": secrets.token_hex(8),
                "kind": "tool_call",
                "from": session.name,
                "call": call.route,
                "name": call.name,
                "arguments": call.arguments,
            }
        )
        keys = [f"wss:agent:{call.agent}", f"wss:call:{call.route}"]
        args: list[Any] = [session.id, call.stream_id, call.call_id, item, int(ROUTE_TTL_S * 1000)]
        try:
            return bool(await bp.scripts["route_call"](keys=keys, args=args))
        except DOWN as exc:
            bp.down(exc)
            raise

    async def answer(self, session: Session, answer: AnswerCall) -> str:
        bp = self._bp
        if not bp.healthy:
            return "down"
        result = orjson.dumps({"content": orjson.Fragment(answer.encoded), "from": session.name})
        try:
            verdict = await bp.scripts["answer_call"](
                keys=[f"wss:call:{answer.msg.call}"], args=[session.id, answer.encoded, result]
            )
        except DOWN as exc:
            bp.down(exc)
            return "down"
        return verdict.decode() if isinstance(verdict, bytes) else str(verdict)

    async def take_results(self, sid: str) -> None:
        """Hand a session's runs the results agents sent them (a result already
        taken changes nothing: the run has it; they stay in Redis until the
        frame carrying each is in the session's log)."""
        bp = self._bp
        try:
            results = await bp.redis.hgetall(f"{skey(sid)}:res")
        except DOWN as exc:
            bp.down(exc)
            return
        for field, raw in sorted(results.items()):
            stream_id, _, call_id = (field.decode() if isinstance(field, bytes) else field).partition(" ")
            result = orjson.loads(raw)
            bp.events.call_result(sid, stream_id, call_id, result["content"], result.get("from"))
