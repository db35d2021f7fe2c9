"""Plain HTTP on the WebSocket port, and the checks before an upgrade.

Everything goes through websockets' ``process_request``: ``GET /healthz``
answers 200, ``/readyz`` 200 (``ready`` or ``degraded: …``) or 503 while
draining, ``/metrics`` the Prometheus text (unless turned off; to loopback
peers only, or to anyone with ``metrics_token``), ``/`` and ``/static/…``,
``/client/…`` the demo page and the JS client. websockets closes the TCP
connection after each plain-HTTP reply.
(Requests under ``/v1/`` never get here: :mod:`wsserver.server.front` hands
them to the HTTP transport, :mod:`wsserver.server.sse`, which runs the same
:meth:`HttpFront.admission` before a stream opens.) An upgrade is refused
here when a header that decides admission comes twice, the server drains,
the Origin is not allowed, a connection limit is reached or the
handshake's credential is wrong.
"""

from __future__ import annotations

import hmac
import ipaddress
import weakref
from http import HTTPStatus
from typing import TYPE_CHECKING, NamedTuple

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from .auth import Identity, origin_allowed, token_from_request
from .connection import client_ip
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .static import StaticFiles

if TYPE_CHECKING:
    from .app import Server

__all__ = ["ECHO_PATH", "SINGLE_HEADERS", "WS_PATHS", "HttpFront", "Refusal", "duplicated_header"]

WS_PATHS = frozenset({"/", "/ws"})
#: With ``conformance_echo`` on: a WebSocket path that echoes every message,
#: for RFC 6455 conformance suites (Autobahn cases via kosoku), which need an
#: echo peer and know nothing of ``hello``. Same ``serve()`` settings as
#: ``/``; off by default.
ECHO_PATH = "/_echo"
#: Request headers that decide admission: each may come once (a 400
#: otherwise, rather than a guess at which one counts).
SINGLE_HEADERS = ("Host", "Origin", "Authorization", "Upgrade")
#: Headers a reverse proxy adds: a request carrying one came through a proxy,
#: so its loopback address says nothing about the client.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


class Refusal(NamedTuple):
    """Why a connection is not opened: its status, text and metric label."""

    status: HTTPStatus
    text: str
    reason: str


class HttpFront:
    def __init__(self, server: Server) -> None:
        self._server = server
        self._static = StaticFiles()
        #: Connections per client IP (for ``max_connections_per_ip``).
        self.per_ip: dict[str, int] = {}
        self._identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = weakref.WeakKeyDictionary()

    def handshake_identity(self, connection: ServerConnection) -> Identity | None:
        """Who the upgrade request's credential proved to be (None: no credential)."""
        return self._identities.get(connection)

    def _refuse(self, connection: ServerConnection, status: HTTPStatus, text: str, reason: str) -> Response:
        self.count_refusal(reason)
        response = connection.respond(status, text)
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            response.headers["Retry-After"] = "1"
        return response

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        try:
            return self._process_request(connection, request)
        except MultipleValuesError as exc:  # any other header read as one value: a 400, never a 500
            return self._refuse(connection, HTTPStatus.BAD_REQUEST, f"duplicated header {exc}\n", "header")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        server = self._server
        cfg = server.config
        path = request.path.split("?", 1)[0]
        headers = request.headers
        duplicated = duplicated_header(headers)
        if duplicated is not None:
            return self._refuse(connection, HTTPStatus.BAD_REQUEST, f"duplicated {duplicated} header\n", "header")
        if headers.get("Upgrade", "").lower() == "websocket":
            if path == ECHO_PATH and cfg.conformance_echo:
                return None
            if path not in WS_PATHS:
                return self._refuse(connection, HTTPStatus.NOT_FOUND, "no WebSocket endpoint here; use /\n", "path")
            return self._admit(connection, request)
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if path == "/readyz":
            if server.draining:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            degraded = server.backplane.status()
            return connection.respond(HTTPStatus.OK, f"{degraded}\n" if degraded else "ready\n")
        if path == "/metrics" and cfg.metrics:
            refused = self.metrics_refusal(headers, client_ip(connection))
            if refused is not None:
                return connection.respond(refused.status, refused.text)
            server.fanout.count_output()
            body = server.telemetry.render()
            return Response(
                200, "OK", Headers([("Content-Type", METRICS_CONTENT_TYPE), ("Content-Length", str(len(body)))]), body
            )
        found = self._static.get(path)
        if found is not None:
            content_type, body = found
            headers = Headers(
                [
                    ("Content-Type", content_type),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-cache"),
                ]
            )
            return Response(200, "OK", headers, body)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """The checks before an upgrade (:meth:`admission`)."""
        verdict = self.admission(request.path, request.headers, client_ip(connection))
        if isinstance(verdict, Refusal):
            return self._refuse(connection, verdict.status, verdict.text, verdict.reason)
        if verdict is not None:
            self._identities[connection] = verdict
        return None

    def admission(self, target: str, headers: Headers, ip: str) -> Refusal | Identity | None:
        """The checks before a connection opens, a WebSocket upgrade or an HTTP
        transport stream alike: a duplicated admission header, drain, Origin,
        connection limits, credential. Returns the refusal, or who the
        credential proved to be (None: no credential)."""
        server = self._server
        cfg = server.config
        duplicated = duplicated_header(headers)
        if duplicated is not None:
            return Refusal(HTTPStatus.BAD_REQUEST, f"duplicated {duplicated} header\n", "header")
        if server.draining:
            return Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", "draining")
        if not origin_allowed(headers.get("Origin"), headers.get("Host"), cfg.allowed_origins):
            return Refusal(HTTPStatus.FORBIDDEN, "origin not allowed\n", "origin")
        if len(server.connections) + len(server.sse) >= cfg.max_connections:
            return Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n", "limit")
        if cfg.max_connections_per_ip and self.per_ip.get(ip, 0) >= cfg.max_connections_per_ip:
            return Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n", "ip_limit")
        if server.auth.enabled:
            token = token_from_request(target, headers.get("Authorization"))
            if token is not None:
                identity = server.auth.verify(token)
                if identity is None:
                    return Refusal(HTTPStatus.UNAUTHORIZED, "unauthorized\n", "unauthorized")
                return identity
        return None

    def metrics_refusal(self, headers: Headers, ip: str) -> Refusal | None:
        """``/metrics``: with a token, whoever presents it (compared in constant
        time); without, loopback peers that did not come through a proxy (a
        proxy on the same machine would make every client look local)."""
        token = self._server.config.metrics_token
        if token:
            given = headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                return None
            return Refusal(HTTPStatus.UNAUTHORIZED, "unauthorized\n", "metrics")
        if _loopback(ip) and not any(name in headers for name in PROXY_HEADERS):
            return None
        return Refusal(HTTPStatus.FORBIDDEN, "metrics are served to loopback only; set --metrics-token\n", "metrics")

    def count_refusal(self, reason: str) -> None:
        self._server.telemetry.connections_refused.labels(reason).inc()

    def opened(self, ip: str) -> None:
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def closed(self, ip: str) -> None:
        left = self.per_ip.get(ip, 1) - 1
        if left:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


def duplicated_header(headers: Headers) -> str | None:
    """The first of :data:`SINGLE_HEADERS` that ``headers`` hold more than once, if any."""
    for name in SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return name
    return None


def _loopback(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's 127.0.0.1
    return address.is_loopback
