"""Node loss: heartbeats, and adopting the sessions of a node that stopped.

Each node beats into the sorted set ``wss:nodes`` (scored with Redis's own
clock) every ``node_timeout / 4``, and refreshes the agent names of its live
sessions every ``node_timeout`` (they expire otherwise). When a node is
``node_timeout`` late, the first node to notice takes the lock
``wss:adopt:{node}`` and claims the lost node's sessions one script each
(ownership moves only from the lost node); the others wait for it. An adopted session is rebuilt from its hash, its log
and the requests of its running streams (:class:`AdoptedSession`), and the
server runs it detached: its streams end with ``error node_lost`` after
every frame the lost node had written (agent runs that waited for tool
results or approvals go on waiting here), and its client resumes here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson

from ..core.limits import ChannelRules
from .backplane import AdoptedSession
from .redis_util import DOWN, decode_request, skey

if TYPE_CHECKING:
    from .redis import RedisBackplane

__all__ = ["NodeWatch"]

logger = logging.getLogger("wsserver.backplane")


class NodeWatch:
    """This node's heartbeat, and the adoption of lost nodes' sessions."""

    def __init__(self, backplane: RedisBackplane, node_timeout: float) -> None:
        self._bp = backplane
        self.node_timeout = node_timeout
        self._adopting: dict[str, asyncio.Task[None]] = {}

    def cancel(self) -> None:
        for task in self._adopting.values():
            task.cancel()

    async def heartbeat(self) -> tuple[bool, list[bytes]]:
        """Beat; returns (whether this node had been dropped from the set, the lost nodes)."""
        bp = self._bp
        added, *lost = await bp.scripts["heartbeat"](
            keys=["wss:nodes"], args=[bp.node, int(self.node_timeout * 1000)]
        )
        return added == b"1", [n for n in lost if n.decode() != bp.node]

    async def run(self) -> None:
        """Heartbeat, and adopt the sessions of nodes whose heartbeat stopped."""
        bp, events = self._bp, self._bp.events
        interval = max(0.1, self.node_timeout / 4)
        clock = asyncio.get_running_loop().time
        refreshed = clock()
        while True:
            await asyncio.sleep(interval)
            if not bp.healthy:
                continue
            try:
                dropped, lost = await self.heartbeat()
                if clock() - refreshed >= self.node_timeout:  # agent names expire unless refreshed
                    refreshed = clock()
                    await bp.refresh_agents()
                if dropped:
                    # Another node may have declared this one lost (a pause
                    # longer than node_timeout) and adopted its sessions:
                    # those are not ours to write any more.
                    sids = events.local_session_ids()
                    for sid, owner in (await bp.owners(sids)).items():
                        if owner is not None and owner != bp.node:
                            logger.error("session %s was adopted by node %s; dropping it here", sid, owner)
                            events.fence_session(sid)
                for node in lost:
                    await self.adopt_node(node.decode())
                # Tunnels to or from nodes gone meanwhile (another node adopted them).
                for node in bp.tunnel_owners() | events.tunnel_peers():
                    if not await self.alive(node):
                        events.node_lost(node)
            except DOWN as exc:
                bp.down(exc)
            except Exception:  # the watcher must outlive any one bad round
                logger.exception("backplane node watch failed")

    async def alive(self, node: str) -> bool:
        return bool(
            await self._bp.scripts["alive"](keys=["wss:nodes"], args=[node, int(self.node_timeout * 1000)])
        )

    async def adopt_node(self, node: str) -> None:
        """Take over the sessions of a lost node (one node does it; others wait for it)."""
        task = self._adopting.get(node)
        if task is None:
            task = self._adopting[node] = asyncio.get_running_loop().create_task(self._adopt_node(node))
            task.add_done_callback(lambda _t: self._adopting.pop(node, None))
        await asyncio.shield(task)

    async def _adopt_node(self, node: str) -> None:
        bp = self._bp
        redis = bp.redis
        bp.events.node_lost(node)  # its tunnels here end; clients reconnect and resume
        if not await redis.set(f"wss:adopt:{node}", bp.node, nx=True, ex=60):
            for _ in range(50):  # another node adopts: wait until it is done
                if not await redis.exists(f"wss:node:{node}:sessions"):
                    return
                await asyncio.sleep(0.1)
            return
        bp.stats["lost_nodes"] += 1
        sids = [s.decode() for s in await redis.smembers(f"wss:node:{node}:sessions")]
        logger.warning("node %s was lost; adopting its %d sessions", node, len(sids))
        for sid in sids:
            await self.adopt_session(sid, node)
        await redis.delete(f"wss:node:{node}:sessions")
        await redis.zrem("wss:nodes", node)
        await redis.delete(f"wss:adopt:{node}")

    async def adopt_previous(self) -> None:
        """Sessions a previous run of this node (same ``node_id``) left behind."""
        bp = self._bp
        lock = f"wss:adopt:{bp.node}"
        for _ in range(100):  # another node adopting them already: let it finish
            if await bp.redis.set(lock, bp.node, nx=True, ex=60):
                break
            await asyncio.sleep(0.1)
        sids = [s.decode() for s in await bp.redis.smembers(f"wss:node:{bp.node}:sessions")]
        if sids:
            logger.warning("adopting %d sessions left by this node's previous run", len(sids))
        for sid in sids:
            await self.adopt_session(sid, bp.node)  # type: ignore[arg-type]
        await bp.redis.delete(lock)

    async def adopt_session(self, sid: str, lost: str) -> None:
        """Own session ``sid`` of node ``lost`` (if it is still that node's) and run it here."""
        bp = self._bp
        key = skey(sid)
        if bp.events.local_session(sid) is not None or not await bp.scripts["claim_session"](
            keys=[key, f"wss:node:{bp.node}:sessions"], args=[lost, bp.node, sid]
        ):
            return
        pipe = bp.redis.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.xrange(f"{key}:log")
        pipe.smembers(f"{key}:run")
        pipe.hgetall(f"{key}:req")
        fields, entries, running, requests = await pipe.execute()
        session = bp.events.adopt(_adopted(sid, fields, entries, running, requests))
        bp.channels.restore(session)
        bp.stats["adopted_sessions"] += 1
        bp.write_log_nowait(session)  # the node_lost ends
        await bp.take_direct_messages(sid)
        await bp.take_results(sid)  # (agents' answers to its waiting runs that were not in its log yet)


def _adopted(
    sid: str,
    fields: dict[bytes, bytes],
    entries: list[tuple[bytes, dict[bytes, bytes]]],
    running: set[bytes],
    requests: dict[bytes, bytes],
) -> AdoptedSession:
    """Parse what Redis kept of a session (see the keys in :mod:`wsserver.cluster.redis`)."""
    state = {k.decode(): v.decode() for k, v in fields.items()}
    log = [(int(entry_id.split(b"-")[0]), entry[b"f"]) for entry_id, entry in entries]
    rules = None
    if state.get("rules"):
        raw = orjson.loads(state["rules"])
        rules = ChannelRules(tuple(raw["subscribe"]), tuple(raw["publish"]))
    seq = max(int(state.get("seq") or 0), log[-1][0] if log else 0)
    return AdoptedSession(
        id=sid,
        identity=state.get("identity", "anonymous"),
        agent=state.get("agent") or None,
        public_id=state.get("public_id") or None,
        rules=rules,
        seq=seq,
        acked=int(state.get("acked") or 0),
        first=log[0][0] if log else seq + 1,
        frames=[frame for _, frame in log],
        subscriptions=list(orjson.loads(state.get("subs") or "[]")),
        running={r.decode(): decode_request(requests.get(r)) for r in running},
    )
