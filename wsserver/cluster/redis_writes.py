"""The Redis backplane's write queue: every write in the order it was asked
for, everything queued in one loop turn in one pipeline (one round trip).

A write is a ``fill(pipeline)`` function; whoever needs to know it landed
gets a future, and a ``check`` sees the replies of its commands. Writes that
must not be lost to an outage (a session ending, a presence leave) are kept
while Redis is unreachable and queued again first when it is back
(:meth:`WriteQueue.later`, :meth:`WriteQueue.take_deferred`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from .redis_util import DOWN

if TYPE_CHECKING:
    from .redis import RedisBackplane

__all__ = ["Fill", "WriteQueue"]

logger = logging.getLogger("wsserver.backplane")

#: Adds a write's commands to a pipeline.
Fill = Callable[[Any], None]


class WriteQueue:
    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane
        #: Writes in the order they were asked for: (fill the pipeline, future, check).
        self._queue: list[tuple[Fill, asyncio.Future[Any] | None, Any]] = []
        #: Writes asked for during an outage, by session: replayed after it.
        self._deferred: list[tuple[str, Fill]] = []
        self._flusher: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._queue)

    def enqueue(
        self, fill: Fill, wait: bool, check: Callable[[list[Any]], None] | None = None
    ) -> asyncio.Future[Any] | None:
        """Queue ``fill(pipeline)``; ``check`` gets the replies of its commands."""
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((fill, future, check))
        if self._flusher is None or self._flusher.done():
            self._flusher = self._bp.spawn(self._flush_loop())
        return future

    def later(self, sid: str, fill: Fill) -> None:
        """A write that must not be lost to an outage: queued, or kept until Redis is back."""
        if self._bp.healthy:
            self.enqueue(fill, wait=False)
        else:
            self._deferred.append((sid, fill))

    def deferred(self) -> list[tuple[str, Fill]]:
        """The writes kept during the outage (still kept: see :meth:`drop_deferred`)."""
        return list(self._deferred)

    def drop_deferred(self, count: int) -> None:
        del self._deferred[:count]

    async def flush_pending(self) -> None:
        """Wait until everything queued so far is written."""
        if self._queue:
            future = self.enqueue(lambda pipe: None, wait=True)
            assert future is not None
            await future

    async def _flush_loop(self) -> None:
        while self._queue:
            await self.flush_once()

    async def flush_once(self) -> None:
        """Everything queued, in one pipeline (one round trip)."""
        batch, self._queue = self._queue, []
        pipe = self._bp.redis.pipeline(transaction=False)
        spans = []
        error: BaseException | None = None
        try:
            for fill, _, _ in batch:
                first = len(pipe)
                fill(pipe)
                spans.append((first, len(pipe)))
            replies = await pipe.execute(raise_on_error=False) if len(pipe) else []
        except DOWN as exc:
            self._bp.down(exc)
            error = exc
        except Exception as exc:  # a bug must not stall every writer waiting here
            logger.exception("backplane write failed")
            error = exc
        if error is None and any(isinstance(r, NoScriptError) for r in replies):
            # Redis forgot the scripts (it restarted under us): recover as from
            # an outage, which loads them and writes every session again.
            error = ConnectionError("redis lost its scripts")
            self._bp.down(error)
        for i, (_, future, check) in enumerate(batch):
            if error is None and check is not None:
                try:
                    check(replies[spans[i][0] : spans[i][1]])
                except Exception:
                    logger.exception("backplane write check failed")
            if future is not None and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(ConnectionError(str(error)))
