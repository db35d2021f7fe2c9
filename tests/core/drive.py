"""Driving the session core with no socket: the helpers every tests/core file uses."""

from __future__ import annotations

from typing import Any

import orjson

from tests.helpers import USER_HI as HI
from tests.helpers import FakeClock
from wsserver.core.actions import StartGeneration
from wsserver.core.session import Session
from wsserver.providers import Providers, SimulatedProvider
from wsserver.wire.messages import decode_client, decode_server

__all__ = ["HI", "feed", "frames", "make_session", "start"]


def make_session(**kwargs: Any) -> Session:
    providers = Providers([SimulatedProvider()], default="simulated")
    kwargs.setdefault("clock", FakeClock())
    return Session("sess", providers=providers, **kwargs)


def feed(session: Session, message: dict[str, Any]) -> list[Any]:
    return session.handle(decode_client(orjson.dumps(message)))


def frames(session: Session) -> list[dict[str, Any]]:
    out = [orjson.loads(f) for f in session.take_output()]
    for frame in out:
        decode_server(orjson.dumps(frame))  # every frame is a valid server message
    return out


def start(session: Session, **fields: Any) -> Any:
    actions = feed(session, {"type": "generate", "messages": HI, **fields})
    assert len(actions) == 1 and isinstance(actions[0], StartGeneration)
    return actions[0].stream
