"""What the HTTP providers (``openai``, ``anthropic``) share: the retry loop,
closing the upstream response, reading a stream (:class:`Reader`), and
turning SDK errors into safe messages.

Retry policy (:class:`RetryPolicy`): a request is retried only while nothing
has been produced: HTTP 408, 409, 429, 529 and other 5xx (the statuses the
SDKs themselves would retry), connection failures, connect timeouts, a stream
that ends without a finish reason, and in-band stream errors that say the
upstream is overloaded or failed (Anthropic ``event: error`` with
``overloaded_error``/``api_error``/``rate_limit_error``; OpenAI
``server_error``/``rate_limit_exceeded``) are retried up to ``retries`` times.
A read timeout (the upstream went silent) is not retried. The delay is the upstream's
``retry-after-ms``/``retry-after`` when it sends one, else ``backoff_s``
doubling each retry (with jitter), and never more than ``max_delay_s``. Once
the first event of any kind has been yielded (text, reasoning, a reasoning
block's end, a tool call or a piece of its arguments) nothing is retried: a
retry would send the client the beginning of the answer twice. A usage
report is not output (a later one overwrites it), so Anthropic's
``message_start`` does not stop a retry. Other 4xx (400 bad model, 401 bad
key, 403, 404) are never retried.

The SDK clients run with ``max_retries=0`` so this is the only retry loop.
Every failure leaves as :class:`~wsserver.providers.base.ProviderFailure`
with a message that names the provider and the HTTP status or error type and
is safe to show to the client: the upstream's own error text is passed on
only for 400/404/409/413/422 answers (it describes the request, e.g. an
unknown model, or a model that takes no images or no reasoning parameters),
truncated and with anything that looks like a key, an organisation or a
project id masked; 401, 403 and 429 texts are dropped (they can quote part
of the key or name the organisation). The full upstream text is logged at
WARNING on ``wsserver.providers``.

The upstream response is always closed explicitly (``finally: await
stream.close()``) when the generation ends, fails or is cancelled, whatever
it was streaming (text, reasoning, tool-call arguments): leaving an SDK
stream by ``break`` or by an exception does not close the HTTP response by
itself, and an open response keeps the upstream generating (and billing).
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderEvent,
    ProviderFailure,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)

__all__ = ["HTTPProvider", "InBandError", "Reader", "RetryPolicy", "UpstreamError"]

logger = logging.getLogger("wsserver.providers")

#: Statuses retried before the first token (529: Anthropic "overloaded").
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
#: Statuses whose upstream message describes the request and may be shown.
_SHOW_MESSAGE = frozenset({400, 404, 409, 413, 422})
_SECRETS = re.compile(r"\b(sk-[\w-]{4,}|sk_[\w-]{4,}|org-[\w-]{4,}|proj_[\w-]{4,}|key-[\w-]{4,})", re.I)
_MAX_DETAIL = 200


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries before the first token (see the module docstring)."""

    retries: int = 2
    backoff_s: float = 0.5
    max_delay_s: float = 10.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_delay_s))
        nominal = self.backoff_s * (2**attempt)
        return max(0.0, min(nominal * random.uniform(0.75, 1.0), self.max_delay_s))


class InBandError(Exception):
    """An error the upstream reported inside a 200 stream (raised by ``convert``)."""

    def __init__(self, kind: str, *, retryable: bool, detail: str | None = None) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.retryable = retryable
        self.detail = detail


@dataclass(slots=True)
class UpstreamError:
    """A classified failure: what to tell the client and whether to retry."""

    message: str
    code: str = "provider_error"
    retryable: bool = False
    retry_after: float | None = None
    log_detail: str = ""


class Reader(abc.ABC):
    """One attempt's reading of an upstream stream: :meth:`events` turns
    each SDK event into provider events, :meth:`finish` gives the events
    after the upstream's last one. Subclasses (one per vendor API) call the
    helpers below, which keep what every API needs: why the upstream
    stopped, whether a reasoning block is open, and which tool calls were
    opened and got argument text.

    Rules shared by every API: empty pieces are not events; an open
    reasoning block is closed (``ReasoningDone()``, no signature) when text
    or a tool call follows it or the stream ends, for APIs that mark no end;
    a tool call that got no argument text gets ``{}`` (a tool without
    parameters); the stream ends ``tool_calls`` when the model opened calls
    (some OpenAI-compatible servers say ``stop``), and a ``tool_calls``
    finish without any call is ``complete``.
    """

    def __init__(self) -> None:
        self.reason: str | None = None  # "complete" / "length" / "tool_calls" once the upstream said
        self._reasoning = False
        self._opened: dict[str, bool] = {}  # call id -> got argument text

    @abc.abstractmethod
    def events(self, event: Any) -> list[ProviderEvent]:
        """Translate one SDK stream event."""

    def finish(self) -> list[ProviderEvent]:
        """Events after the stream ended; raise InBandError if it ended early."""
        if self.reason is None:
            raise InBandError("stream ended early", retryable=True)
        out = self.close_reasoning()
        for call in self._opened:
            out += self.call_end(call)
        reason = self.reason
        if self._opened and reason == "complete":
            reason = "tool_calls"
        elif not self._opened and reason == "tool_calls":
            reason = "complete"
        out.append(Finish(reason))  # type: ignore[arg-type]
        return out

    # ----------------------------------------------------------- helpers

    def text(self, text: str | None) -> list[ProviderEvent]:
        if not text:
            return []
        return [*self.close_reasoning(), TextDelta(text)]

    def reasoning(self, text: str | None) -> list[ProviderEvent]:
        if not text:
            return []
        self._reasoning = True
        return [ReasoningDelta(text)]

    def close_reasoning(self, signature: str | None = None) -> list[ProviderEvent]:
        """End the open reasoning block (with its signature, when it has one)."""
        if not self._reasoning and not signature:
            return []
        self._reasoning = False
        return [ReasoningDone(signature=signature or None)]

    def redacted(self, data: str) -> list[ProviderEvent]:
        return [*self.close_reasoning(), ReasoningDone(redacted=data)]

    def call_start(self, call: str, name: str) -> list[ProviderEvent]:
        if call in self._opened:  # the wire needs one id per call
            raise InBandError("tool call id used twice", retryable=False)
        self._opened[call] = False
        return [*self.close_reasoning(), ToolCallStart(call, name)]

    def call_delta(self, call: str, text: str | None) -> list[ProviderEvent]:
        if not text:
            return []
        self._opened[call] = True
        return [ToolCallDelta(call, text)]

    def call_end(self, call: str, arguments: str | None = None) -> list[ProviderEvent]:
        """A call is complete: send the arguments if none were streamed
        (``arguments``, else ``{}``)."""
        if self._opened.get(call, True):
            return []
        return self.call_delta(call, arguments or "{}")


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date)."""
    if headers is None:
        return None
    try:
        raw_ms = headers.get("retry-after-ms")
        if raw_ms is not None:
            return max(0.0, float(raw_ms) / 1000)
    except (TypeError, ValueError):
        pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _safe_detail(text: Any) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return None
    text = _SECRETS.sub("***", " ".join(text.split()))
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _body_error(body: Any) -> tuple[str | None, str | None]:
    """``(type or code, message)`` of an error body (OpenAI and Anthropic shapes)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            kind = err.get("type") or err.get("code")
            message = err.get("message")
            return (str(kind) if kind else None), (message if isinstance(message, str) else None)
    return None, None


_STATUS_TEXT = {
    400: "request rejected",
    401: "authentication failed",
    403: "permission denied",
    404: "not found",
    408: "upstream request timeout",
    409: "conflict",
    413: "request too large",
    422: "request rejected",
    429: "rate limited",
    529: "overloaded",
}
_RETRYABLE_KINDS = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "server_error", "rate_limit_exceeded"}
)


class HTTPProvider(Provider):
    """A provider that streams from an SDK client, with the shared retry loop.

    Subclasses create ``self._client`` (importing their SDK in ``__init__``,
    never at module import), and implement :meth:`_open` (map the request,
    start one upstream request, return the SDK's async stream; an input the
    API cannot take raises ProviderFailure before anything is sent) and
    :meth:`_reader` (what reads one attempt's events; it may raise
    :class:`InBandError`).
    """

    #: How messages name the provider ("openai: rate limited (429)").
    label: str
    #: The SDK module (for its exception classes).
    _sdk: Any
    _client: Any

    def __init__(self, *, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or RetryPolicy()

    # ------------------------------------------------------------ subclass API

    @abc.abstractmethod
    async def _open(self, request: GenerationRequest) -> Any:
        """Send the request; return the SDK stream (has ``close()`` and ``__aiter__``)."""

    @abc.abstractmethod
    def _reader(self) -> Reader:
        """A fresh :class:`Reader` for one attempt's stream."""

    # ---------------------------------------------------------------- running

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        attempt = 0
        produced = False  # an event other than usage was yielded: no more retries
        while True:
            error: UpstreamError
            try:
                upstream = await self._open(request)
            except ProviderFailure:
                raise
            except Exception as exc:
                error = self._classify(exc, mid_stream=False)
            else:
                try:
                    reader = self._reader()
                    async for sdk_event in upstream:
                        for event in reader.events(sdk_event):
                            produced = produced or type(event) is not UsageReport
                            yield event
                    for event in reader.finish():
                        yield event
                    return
                except ProviderFailure:
                    raise
                except Exception as exc:
                    error = self._classify(exc, mid_stream=produced)
                finally:
                    # Explicit: leaving the SDK iterator does not close the response.
                    await self._close(upstream)
            tries = attempt + 1
            if produced or not error.retryable or attempt >= self.retry.retries:
                logger.warning(
                    "%s: %s after %d attempt(s)%s: %s",
                    self.name,
                    "stream failed" if produced else "request failed",
                    tries,
                    " (not retried: output already sent)" if produced and error.retryable else "",
                    error.log_detail or error.message,
                )
                message = error.message
                if error.retryable and not produced and tries > 1:
                    message += f" after {tries} attempts"
                raise ProviderFailure(message, code=error.code)
            delay = self.retry.delay(attempt, error.retry_after)
            logger.info(
                "%s: attempt %d failed (%s); retrying in %.2f s",
                self.name,
                tries,
                error.log_detail or error.message,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1

    async def _close(self, upstream: Any) -> None:
        try:
            await upstream.close()
        except Exception:  # never mask the stream's own outcome
            logger.debug("%s: closing the upstream response failed", self.name, exc_info=True)

    async def aclose(self) -> None:
        await self._client.close()

    # --------------------------------------------------------- classification

    def _classify(self, exc: Exception, *, mid_stream: bool) -> UpstreamError:
        """Turn an SDK/transport exception into an :class:`UpstreamError`."""
        sdk = self._sdk
        label = self.label
        if isinstance(exc, InBandError):
            return UpstreamError(
                f"{label}: upstream error ({exc.kind})",
                retryable=exc.retryable,
                log_detail=f"in-band error {exc.kind}: {exc.detail}",
            )
        if isinstance(exc, sdk.APIStatusError):
            status = exc.status_code
            kind, upstream_message = _body_error(getattr(exc, "body", None))
            log = f"HTTP {status}{f' {kind}' if kind else ''}: {upstream_message or exc}"
            if status < 400:  # an error event inside a 200 stream (Anthropic)
                kind = kind or "error"
                return UpstreamError(
                    f"{label}: upstream error ({kind})",
                    retryable=kind in _RETRYABLE_KINDS,
                    log_detail=f"in-band error {kind}: {upstream_message}",
                )
            text = _STATUS_TEXT.get(status) or (
                "upstream server error" if status >= 500 else "upstream error"
            )
            message = f"{label}: {text} ({status})"
            if status in _SHOW_MESSAGE:
                detail = _safe_detail(upstream_message)
                if detail:
                    message += f": {detail}"
            retry_after = None
            if status in RETRY_STATUSES or status >= 500:
                retry_after = parse_retry_after(getattr(exc.response, "headers", None))
            return UpstreamError(
                message,
                retryable=status in RETRY_STATUSES or status >= 500,
                retry_after=retry_after,
                log_detail=log,
            )
        if self._is_timeout(exc):
            connect = self._is_connect_timeout(exc)
            return UpstreamError(
                f"{label}: the upstream did not answer in time"
                if not mid_stream
                else f"{label}: the upstream stalled mid-stream",
                code="provider_timeout",
                retryable=connect,
                log_detail=f"timeout: {exc!r} (cause {exc.__cause__!r})",
            )
        if self._is_connection_error(exc):
            return UpstreamError(
                f"{label}: the upstream connection was lost mid-stream"
                if mid_stream
                else f"{label}: could not reach the upstream",
                retryable=True,
                log_detail=f"connection error: {exc!r} (cause {exc.__cause__!r})",
            )
        if isinstance(exc, sdk.APIError):  # an error payload inside the stream (OpenAI SDK)
            kind, upstream_message = _body_error(getattr(exc, "body", None))
            kind = kind or "error"
            return UpstreamError(
                f"{label}: upstream error ({kind})",
                retryable=kind in _RETRYABLE_KINDS,
                log_detail=f"in-band error {kind}: {upstream_message or exc}",
            )
        logger.error("%s: unexpected upstream failure", self.name, exc_info=exc)
        return UpstreamError(
            f"{label}: unexpected upstream response",
            retryable=False,
            log_detail=f"unexpected: {exc!r}",
        )

    def _is_timeout(self, exc: Exception) -> bool:
        import httpx2

        return isinstance(exc, (self._sdk.APITimeoutError, httpx2.TimeoutException))

    @staticmethod
    def _is_connect_timeout(exc: Exception) -> bool:
        import httpx2

        cause = exc if isinstance(exc, httpx2.TimeoutException) else exc.__cause__
        return isinstance(cause, (httpx2.ConnectTimeout, httpx2.PoolTimeout))

    def _is_connection_error(self, exc: Exception) -> bool:
        import httpx2

        return isinstance(exc, (self._sdk.APIConnectionError, httpx2.TransportError, ConnectionError))
