"""What the server says about itself: Prometheus metrics and event logs.

:class:`Telemetry` is the session core's observer (the core calls it; it does
no I/O of its own beyond logging) and the transport's counter board. Each
server has its own :class:`prometheus_client.CollectorRegistry`, served at
``GET /metrics``. Event logs go to the ``wsserver.events`` logger, one line
per connection and stream event, with session and stream ids; prompt and
completion text only with ``--log-content``. ``--log-format json`` renders
every log record as one JSON object per line (:class:`JsonFormatter`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from ..cluster.backplane import Backplane
    from ..core.streams import Stream
    from .gcpace import GcPacer

__all__ = ["CONTENT_TYPE", "GcPauses", "JsonFormatter", "Telemetry"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
events = logging.getLogger("wsserver.events")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: A collection stops the event loop, and every stream with it: 20 ms is the
#: line past which a pause shows in token latency (the service bench's target).
_GC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Telemetry:
    def __init__(self, *, log_content: bool = False) -> None:
        self.log_content = log_content
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "wsserver_"
        self.connections_open = Gauge(p + "connections_open", "Open WebSocket connections", registry=r)
        self.connections_refused = Counter(
            p + "connections_refused", "Handshakes refused, by reason", ["reason"], registry=r
        )
        self.sessions = Gauge(p + "sessions", "Live sessions, by state", ["state"], registry=r)
        self.sessions_parked = Gauge(
            p + "sessions_parked", "Detached sessions kept as bytes (nothing running; counted in detached too)",
            registry=r,
        )
        self.sessions_parked_bytes = Gauge(
            p + "sessions_parked_bytes", "Bytes the parked sessions keep (their replay logs and state)", registry=r
        )
        self.streams_active = Gauge(p + "streams_active", "Running streams", registry=r)
        self.streams_ended = Counter(p + "streams_ended", "Ended streams, by reason", ["reason"], registry=r)
        self.ttft = Histogram(p + "ttft_seconds", "Time to first token", buckets=_TTFT_BUCKETS, registry=r)
        self.delivery = Histogram(
            p + "delivery_seconds",
            "Time a batch of output waited for a socket that lagged (a writer woken to the batch"
            " written); output written at once, the usual case, is not sampled",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.messages_in = Counter(p + "messages_in", "Client messages, by type", ["type"], registry=r)
        self.frames_out = Counter(p + "frames_out", "Frames written by the session writers", registry=r)
        self.bytes_in = Counter(p + "bytes_in", "Bytes of client messages", registry=r)
        self.bytes_out = Counter(p + "bytes_out", "Bytes written by the session writers", registry=r)
        self.cancels = Counter(p + "cancels", "Streams cancelled by the client", registry=r)
        self.steers = Counter(p + "steers", "Streams steered by interrupt", registry=r)
        self.resumes = Counter(p + "resumes", "Resume attempts, by result", ["result"], registry=r)
        self.slow_consumers = Counter(
            p + "slow_consumer_disconnects", "Connections closed with 1013", registry=r
        )
        self.errors = Counter(p + "errors", "error frames sent, by code", ["code"], registry=r)
        self.provider_errors = Counter(
            p + "provider_errors", "Streams ended by a provider failure, by provider", ["provider"], registry=r
        )
        self.gc_pause = Histogram(
            p + "gc_pause_seconds",
            "Collections of Python's cyclic garbage collector, by generation: each one stops the"
            " event loop (and every stream) for its duration",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=r,
        )
        self.gc = GcPauses(self.gc_pause)
        longest = Gauge(
            p + "gc_pause_max_seconds", "The longest collection since start, by generation", ["generation"], registry=r
        )
        for g in range(3):
            longest.labels(str(g)).set_function(lambda g=g: self.gc.longest[g])

    def bind(self, sessions: Callable[[], tuple[int, int, int, int, int]]) -> None:
        """``sessions()`` returns (attached, detached, running streams, parked,
        bytes parked) at scrape time."""
        self.sessions.labels("attached").set_function(lambda: sessions()[0])
        self.sessions.labels("detached").set_function(lambda: sessions()[1])
        self.streams_active.set_function(lambda: sessions()[2])
        self.sessions_parked.set_function(lambda: sessions()[3])
        self.sessions_parked_bytes.set_function(lambda: sessions()[4])

    def bind_gc(self, pacer: GcPacer | None) -> None:
        """Gauges of the paced collector (nothing with Python's own)."""
        if pacer is None:
            return
        p, r = "wsserver_gc_", self.registry
        Gauge(p + "old_objects", "Objects in the collector's oldest generation when last counted (every 2 s)",
              registry=r).set_function(lambda: pacer.old_objects)
        Gauge(p + "full_collections", "Full collections the paced collector ran (since start)",
              registry=r).set_function(lambda: pacer.full_collections)

    def bind_backplane(self, backplane: Backplane) -> None:
        """Gauges of a shared backplane, read at scrape time (nothing when alone)."""
        if not backplane.shared:
            return
        p, r = "wsserver_backplane_", self.registry
        Gauge(p + "up", "1 while the backplane (Redis) is reachable", registry=r).set_function(
            lambda: 1.0 if backplane.status() is None else 0.0
        )
        for key, text in (
            ("adopted_sessions", "Sessions adopted from lost nodes"),
            ("lost_nodes", "Nodes this node found lost and adopted"),
            ("outages", "Times the backplane became unreachable"),
        ):
            Gauge(p + key, text + " (since start)", registry=r).set_function(lambda k=key: backplane.stats[k])
        Gauge(p + "tunnels", "Connections relayed to their session's node", registry=r).set_function(
            backplane.tunnel_count
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------ observer of the core

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def stream_started(self, session_id: str, stream: Stream) -> None:
        fields: dict[str, Any] = {
            "session": session_id,
            "stream": stream.id,
            "provider": stream.provider,
            "model": stream.model,
            "steered_from": stream.steered_from,
        }
        if self.log_content:
            fields["messages"] = [[m.role, m.content] for m in stream.messages]
        events.info("stream start", extra={"event": "stream.start", **fields})

    def stream_ended(self, session_id: str, stream: Stream, usage: Any, error: tuple[str, str] | None) -> None:
        reason = stream.reason or "complete"
        self.streams_ended.labels(reason).inc()
        if stream.first_token_at is not None:
            self.ttft.observe(stream.first_token_at - stream.started_at)
        if reason == "cancelled":
            self.cancels.inc()
        elif reason == "interrupted":
            self.steers.inc()
        if error is not None and error[0] in ("provider_error", "provider_timeout"):
            self.provider_errors.labels(stream.provider).inc()
        fields: dict[str, Any] = {
            "session": session_id,
            "stream": stream.id,
            "reason": reason,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
        }
        if error is not None:
            fields["error"] = error[0]
        if self.log_content:
            fields["text"] = stream.text
        events.info("stream end", extra={"event": "stream.end", **fields})


class GcPauses:
    """Times every collection of the cyclic garbage collector (``gc.callbacks``)
    into a histogram by generation, while installed.

    Always on: per collection it costs two calls and one observation (about
    2 µs), against collections that take from ~0.1 ms (generation 0) to
    whatever the number of live container objects makes a full one take.
    """

    __slots__ = ("_by_generation", "_started", "longest")

    def __init__(self, histogram: Histogram) -> None:
        self._by_generation = [histogram.labels(str(g)) for g in range(3)]
        self._started = 0.0
        #: The longest pause so far, by generation (seconds).
        self.longest = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        pause = time.perf_counter() - self._started
        self._by_generation[generation].observe(pause)
        if pause > self.longest[generation]:
            self.longest[generation] = pause

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the extras."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()
