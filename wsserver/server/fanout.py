"""Channel traffic to sockets, and the watch on connections whose output backs up.

:meth:`Fanout.flush` runs once at the end of a loop turn in which the
backplane queued channel frames (it pulls them with
:meth:`~wsserver.cluster.backplane.Backplane.take_deliveries`). Each frame
was encoded once; a connection whose writer is idle gets it through
``broadcast()`` (no per-subscriber encoding, no per-subscriber task), one
with frames still queued gets it queued behind them, so nothing overtakes.
A detached session gets nothing, and neither does a resumed one until it
subscribes again: it recovers by offset then, and live traffic that arrived
before its recovery would otherwise overtake the recovered messages.

:meth:`Fanout.watch` runs every 0.25 s: connections with more than
``slow_consumer_bytes`` waiting are closed with 1013 (slow consumers), idle
channels and rate-limit state are forgotten, and output counters are added
to the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import broadcast

if TYPE_CHECKING:
    from .app import Server
    from .connection import Connection

__all__ = ["Fanout"]

logger = logging.getLogger("wsserver.server")

#: How often the slow-consumer watch looks.
WATCH_S = 0.25
#: A connection whose backlog (over the limit) has not gone down for this long is not reading.
STALL_S = 2.0


class Fanout:
    def __init__(self, server: Server) -> None:
        self._server = server
        self._scheduled = False
        #: Connections whose output may be backing up (the writer was needed,
        #: or the socket's buffer passed write_limit): all the monitor checks.
        self.lagging: set[Connection] = set()
        #: Frames and bytes written inline since the counters were last
        #: updated (a prometheus Counter.inc takes a lock: ~1 us per frame).
        self._out_frames = 0
        self._out_bytes = 0

    def count(self, frames: list[bytes]) -> None:
        """Frames written inline (added to the metrics in batches)."""
        self._out_frames += len(frames)
        self._out_bytes += sum(map(len, frames))

    def count_output(self) -> None:
        if self._out_frames:
            telemetry = self._server.telemetry
            telemetry.frames_out.inc(self._out_frames)
            telemetry.bytes_out.inc(self._out_bytes)
            self._out_frames = self._out_bytes = 0

    # ------------------------------------------------------------ channels

    def pending(self) -> None:
        """The backplane queued channel traffic: flush it at the end of this turn."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        server = self._server
        lives = server.sessions
        shared = server.backplane.shared
        for channel, offset, frame, sessions in server.backplane.take_deliveries():
            direct = []
            if not shared:  # one node: the fan-out hot path, per subscriber as little as possible
                for session in sessions:
                    live = lives.active(session.id)
                    conn = live.conn if live is not None else None
                    if conn is None or channel in session.paused:
                        continue
                    if conn.busy or session.out.pending or conn.ws.paused:  # (has_output, inlined)
                        session.out.push_raw(frame)  # a paused socket: through the writer (drain)
                    else:
                        direct.append(conn.ws)
            else:
                for session in sessions:
                    members = session.members
                    if members.held and members.hold(channel, offset, frame):
                        continue  # a subscribe or publish of its own on the backplane is under way
                    live = lives.active(session.id)
                    conn = live.conn if live is not None else None
                    if conn is None or channel in members.paused or not members.admit(channel, offset):
                        continue  # (admit: each offset once, in order; a late copy is dropped)
                    if conn.busy or session.out.pending or conn.ws.paused:
                        session.out.push_raw(frame)  # a paused socket: through the writer (drain)
                    else:
                        direct.append(conn.ws)
            if direct:
                broadcast(direct, frame, text=True)

    # ------------------------------------------------------------- monitor

    async def watch(self) -> None:
        """Every 0.25 s: close slow consumers (1013), forget idle channels, end
        detached sessions whose time is up.

        Only lagging connections are looked at: output backs up only behind
        a busy writer or a paused socket, and both put the connection there.
        A connection with more than ``slow_consumer_bytes`` waiting is a slow
        consumer when that amount grew since the last look (output piles up
        faster than it reads), or has not gone down for ``STALL_S`` (it does
        not read). A client working through one big frame (a long answer's
        ``stream.end`` carries the whole message) or a resume's replay is
        left to read it.
        """
        server = self._server
        limit = server.config.slow_consumer_bytes
        lagging = self.lagging
        #: per lagging connection: (bytes waiting at the last look, looks since they last went down)
        waiting: dict[Any, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(WATCH_S)
            looked: dict[Any, tuple[int, int]] = {}
            for conn in list(lagging):
                pending = conn.pending_bytes()
                before, stalled = waiting.get(conn, (None, 0))
                stalled = 0 if before is None or pending < before else stalled + 1
                if (
                    pending > limit
                    and before is not None
                    and (pending > before or stalled * WATCH_S >= STALL_S)
                    and conn.close_with is None
                ):
                    server.stats["slow_consumer_disconnects"] += 1
                    server.telemetry.slow_consumers.inc()
                    logger.warning("closing a slow consumer (1013): %d bytes waiting", pending)
                    conn.close_slow()
                if conn.lagging():
                    looked[conn] = (pending, stalled)
                else:
                    lagging.discard(conn)
            waiting = looked  # (closed connections are forgotten with the rest)
            server.backplane.sweep()
            server.sessions.prune_quotas()
            server.sessions.expire_due(asyncio.get_running_loop().time())
            self.count_output()
