"""Who may connect, and which channels they may touch.

Authentication is off until a key or a secret is configured:

* static API keys (``--api-key``, repeatable; ``WSSERVER_API_KEYS``,
  comma-separated): the identity is ``key:`` plus a short hash of the key;
* JWT, HS256 only, signed with ``WSSERVER_JWT_SECRET`` (``--jwt-secret``):
  ``sub`` is the identity, ``exp`` and ``nbf`` are honoured, and an optional
  ``channels`` claim ``{"subscribe": [patterns], "publish": [patterns]}``
  replaces the server's channel rules for that identity.

HS256 verification is a few lines over :mod:`hmac`; a JWT library would add
a dependency for one algorithm we need (and ``alg`` confusion is avoided by
accepting exactly one). Its parts are read strictly: base64url without
padding and in its one canonical spelling (junk appended to a signature, or
the same bytes spelled otherwise, is refused), JSON by orjson, whose depth
limit makes a deeply nested token a refusal rather than a ``RecursionError``.
Whatever a credential holds, verifying it never raises. Channel patterns are
:func:`fnmatch.fnmatchcase` patterns (``team:*``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import orjson

from ..core.limits import ChannelRules
from ..core.session import ANONYMOUS

__all__ = [
    "ANONYMOUS",
    "Authenticator",
    "ChannelRules",
    "Identity",
    "make_jwt",
    "origin_allowed",
    "token_from_request",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client. ``id`` is what sessions and agent names bind to."""

    id: str
    rules: ChannelRules


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64decode(part: str) -> bytes:
    """Strict base64url without padding (RFC 7515); anything else raises ValueError.

    The standard decoder skips characters outside the alphabet and ignores
    the unused low bits of the last character, so one signature would have
    many spellings, junk appended included.
    """
    if len(part) % 4 == 1 or _B64URL.fullmatch(part) is None:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != part.encode():
        raise ValueError("not the canonical base64url spelling")
    return data


class Authenticator:
    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        jwt_secret: str | None = None,
        rules: ChannelRules = ChannelRules(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = [k.encode() for k in api_keys if k]
        self._secret = jwt_secret.encode() if jwt_secret else None
        self.rules = rules
        self._now = clock

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._secret is not None

    def anonymous(self) -> Identity:
        return Identity(ANONYMOUS, self.rules)

    def verify(self, token: str) -> Identity | None:
        """The identity a credential proves, or None. Never says why."""
        raw = token.encode("utf-8", "surrogateescape")  # (a header's non-ASCII bytes come escaped)
        for key in self._keys:
            if hmac.compare_digest(raw, key):
                return Identity("key:" + hashlib.sha256(key).hexdigest()[:12], self.rules)
        if self._secret is not None and token.count(".") == 2:
            return self._verify_jwt(token)
        return None

    def _verify_jwt(self, token: str) -> Identity | None:
        assert self._secret is not None
        head, body, sig = token.split(".")
        try:
            signature = _b64decode(sig)
            header = orjson.loads(_b64decode(head))
            claims = orjson.loads(_b64decode(body))
        except (ValueError, binascii.Error, RecursionError):  # (orjson's JSONDecodeError is a ValueError)
            return None
        if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
            return None
        expected = hmac.new(self._secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(signature, expected):
            return None
        now = self._now()
        exp, nbf, sub = claims.get("exp"), claims.get("nbf"), claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return None
        if isinstance(exp, (int, float)) and now >= exp:
            return None
        if exp is not None and not isinstance(exp, (int, float)):
            return None
        if isinstance(nbf, (int, float)) and now < nbf:
            return None
        rules = self.rules
        channels = claims.get("channels")
        if isinstance(channels, dict):
            rules = ChannelRules(
                subscribe=_patterns(channels.get("subscribe")),
                publish=_patterns(channels.get("publish")),
            )
        return Identity("sub:" + sub, rules)


def _patterns(value: object) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(p for p in value if isinstance(p, str))
    return ()


def make_jwt(secret: str, claims: dict[str, object]) -> str:
    """Sign ``claims`` with HS256 (for tests and tools)."""

    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = enc(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(sig)}"


def token_from_request(path: str, authorization: str | None) -> str | None:
    """The credential of a handshake: ``Authorization: Bearer``, else ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    query = urlsplit(path).query
    if query:
        values = parse_qs(query).get("token")
        if values and values[0]:
            return values[0]
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket (or other cross-origin) request may come from a
    page of ``origin``, sent to ``host`` (the ``Host`` header).

    No ``Origin`` (servers, Node, CLI clients) is allowed. A browser's must be
    in ``allowed`` (exact ``scheme://host[:port]``; ``*`` allows any), or be
    the server's own page reached by an address rather than a name: an
    ``http(s)`` Origin equal to the Host, whose host is an IP address or
    ``localhost``. An Origin equal to a Host that is a DNS name proves
    nothing: under DNS rebinding a page of ``evil.example`` reaches a server
    on 127.0.0.1 as ``evil.example``, Origin and Host agreeing; an address
    (or ``localhost``, which browsers resolve to loopback themselves) cannot
    be rebound. Other local pages (another port: a dev server, anything a
    local user runs) are not the server's own either: ``--allowed-origin``.
    """
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
        return False
    name = parts.hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
