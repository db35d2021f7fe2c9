"""Python's cyclic garbage collector, paced by the event loop (``--gc paced``).

CPython starts a collection of its youngest generation when allocations
minus deallocations of container objects pass 700. Under connection churn
the objects of the connections that end die (by refcount) about as fast as
the new connections make theirs, so the count seldom passes 700 and the
youngest generation grows until it holds every live connection: measured at
500 live streams and 100 new connections/s, collections of generation 0 found
up to 62,000 objects there and stopped the event loop (every stream) for
30-60 ms each, generation 1 the same. Full collections follow CPython's rule
"the objects moved to the oldest generation since the last full collection
are a quarter of it", which churn meets every few seconds although those
objects, too, die by refcount: each one scanned the whole live heap again
(80-300 ms) to find almost nothing.

Paced, the automatic collector is off and the event loop collects instead:
generations 0 and 1 together every :data:`TICK_S` (what was made since the
last tick and is still alive: each stream's pending sleep and read, and the
connections opened since; at 500 live streams and 100 new connections/s,
5.9 ms on average and 13 ms at most), so that an object is scanned once,
then moved to the oldest generation; and the whole heap only when the
oldest generation has grown to :data:`FULL_GROWTH` times what the last full
collection left, and past a floor of :data:`FULL_FLOOR` objects plus
:data:`PER_CONNECTION` for each open connection (counted every
:data:`CHECK_EVERY`-th tick): a heap that grows because connections open is
not garbage, and scanning it then (as a floor alone did, at 1,000 paced
streams: 60-125 ms) finds nothing. Garbage cycles are collected as before,
only later; what can pile up between two full collections is bounded by
the heap's size when the last one ran (as in Go's collector, ``GOGC=100``)
or by the floor. The server's own objects do not make cycles when a
connection closes (see :class:`~wsserver.server.connection.WebSocket`), so
under steady load the oldest generation stays the size of the live
connections, and full collections, whose pause grows with it, are rare.

The pacer only runs while the event loop turns: a loop blocked for seconds
collects nothing meanwhile (and stops every stream anyway).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

__all__ = ["CHECK_EVERY", "FULL_FLOOR", "FULL_GROWTH", "PER_CONNECTION", "TICK_S", "GcPacer"]

#: Seconds between collections of generations 0 and 1. What a streaming
#: connection has pending (a sleep, a read: ~15 objects) is scanned at every
#: tick, and a new connection's ~130 objects once: shorter ticks cost more
#: in all, longer ones pause longer.
TICK_S = 0.2
#: The oldest generation is counted every this many ticks (2 s): counting
#: costs ~5 ns an object (0.3 ms at 500 live streams).
CHECK_EVERY = 10
#: A full collection runs when the oldest generation has this many times the
#: objects the last one left...
FULL_GROWTH = 2.0
#: ...and more than this many (about 15 MB of Python objects)...
FULL_FLOOR = 100_000
#: ...plus this many per open connection (a streaming connection keeps ~130
#: objects alive: twice that).
PER_CONNECTION = 300


class GcPacer:
    """Collects from the event loop on a clock (see the module's text).

    Process-wide: the automatic collector is off while at least one pacer
    runs, and back as it was when the last one stops.
    """

    __slots__ = ("_connections", "_handle", "_left", "_ticks", "full_collections", "old_objects")

    #: Pacers running in this process, and the collector's state before the first.
    _running = 0
    _saved_enabled = True

    def __init__(self, connections: Callable[[], int] = lambda: 0) -> None:
        #: How many connections are open now.
        self._connections = connections
        self._handle: asyncio.TimerHandle | None = None
        self._ticks = 0
        #: Objects the last full collection left in the oldest generation.
        self._left = 0
        #: Objects in the oldest generation when last counted (a gauge).
        self.old_objects = 0
        #: Full collections this pacer ran.
        self.full_collections = 0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Take over from the automatic collector (call from the event loop)."""
        if self._handle is not None:
            return
        cls = type(self)
        if cls._running == 0:
            cls._saved_enabled = gc.isenabled()
            gc.disable()
        cls._running += 1
        self._left = len(gc.get_objects(2))
        self._schedule()

    def stop(self) -> None:
        if self._handle is None:
            return
        self._handle.cancel()
        self._handle = None
        cls = type(self)
        cls._running -= 1
        if cls._running == 0 and cls._saved_enabled:
            gc.enable()

    def _schedule(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(TICK_S, self.tick)

    def tick(self) -> None:
        """One collection: generations 0 and 1, and the whole heap when it has grown."""
        self._ticks += 1
        gc.collect(1)
        if self._ticks % CHECK_EVERY == 0:
            self.old_objects = old = len(gc.get_objects(2))
            if old > FULL_FLOOR + PER_CONNECTION * self._connections() and old >= FULL_GROWTH * self._left:
                gc.collect(2)
                self.full_collections += 1
                self.old_objects = self._left = len(gc.get_objects(2))
        if self._handle is not None:
            self._schedule()
