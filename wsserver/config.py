"""Server configuration: one dataclass, each option also a CLI flag and a
``WSSERVER_*`` environment variable.

Precedence: command-line flag, then environment variable, then the default
below. ``ServerConfig.from_env()`` applies the environment alone (for
embedding); :func:`add_arguments` and :func:`from_args` serve the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServerConfig", "add_arguments", "env_name", "from_args"]


def _opt(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8765, "TCP port (0 picks a free one)")
    provider: str = _opt("simulated", "default provider for generate requests")
    model: str | None = _opt(None, "default model (the provider's own default when unset)")
    max_streams: int = _opt(8, "concurrent streams per session (too_many_streams beyond)")
    max_size: int = _opt(1 << 20, "largest client message in bytes; larger closes with 1009")
    max_queue: int = _opt(16, "incoming frames buffered per connection before TCP backpressure")
    write_limit: int = _opt(1 << 15, "write buffer high-water mark per connection, bytes")
    ping_interval: float = _opt(20.0, "WebSocket keepalive ping interval in s (0 = off)")
    ping_timeout: float = _opt(20.0, "close with 1011 when a ping is unanswered this long (0 = never)")
    close_timeout: float = _opt(10.0, "seconds to wait for a closing handshake before aborting")
    hello_timeout: float = _opt(10.0, "close with 4008 when no hello arrives within this many s")
    compression: bool = _opt(False, "offer permessage-deflate (costs ~3x memory per connection)")
    coalesce: bool = _opt(True, "merge a stream's pending deltas when a socket lags")
    session_ttl: float = _opt(120.0, "seconds a session outlives its connection (resume window)")
    replay_max_messages: int = _opt(10_000, "replay log bound per session, in frames")
    replay_max_bytes: int = _opt(4 << 20, "replay log bound per session, in bytes")
    sim_tokens_per_s: float = _opt(40.0, "simulated provider: tokens per second (0 = unpaced)")
    sim_ttft_ms: float = _opt(150.0, "simulated provider: time to first token in ms")
    loop: str = _opt("auto", "event loop", choices=("auto", "asyncio", "uvloop"))
    log_level: str = _opt("info", "logging level", choices=("debug", "info", "warning", "error"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw, source=env_name(f.name))
        values.update(overrides)
        return cls(**values)

    @property
    def heartbeat_ms(self) -> int:
        return int(self.ping_interval * 1000)


def env_name(name: str) -> str:
    return "WSSERVER_" + name.upper()


def _base_type(f: dataclasses.Field[Any]) -> str:
    return str(f.type).replace(" | None", "")


def _parse(f: dataclasses.Field[Any], raw: str, *, source: str) -> Any:
    kind = _base_type(f)
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SystemExit(f"wsserver: {source}: invalid {kind} value {raw!r}") from None
    choices = f.metadata.get("choices") or ()
    if choices and raw not in choices:
        raise SystemExit(f"wsserver: {source}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per option; defaults come from the environment."""
    for f in dataclasses.fields(ServerConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kind = _base_type(f)
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default}]"
        if kind == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type={"int": int, "float": float}.get(kind, str),
            choices=f.metadata.get("choices") or None,
            default=None,
            metavar=kind.upper(),
            help=help_text,
        )


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ServerConfig)
        if getattr(args, f.name, None) is not None
    }
    return ServerConfig.from_env(environ, **overrides)
