"""Server configuration: one dataclass, each option also a CLI flag and a
``WSSERVER_*`` environment variable.

Precedence: command-line flag, then environment variable, then the TOML
file given with ``--config`` (keys are the option names with underscores,
e.g. ``max_streams = 4``), then the default below. Every value is checked
before the server starts; a bad one stops it with a message naming the
setting. ``ServerConfig.from_env()`` applies the environment alone (for
embedding); :func:`add_arguments` and :func:`from_args` serve the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import field

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass
from typing import Any

__all__ = ["ServerConfig", "add_arguments", "env_name", "from_args", "load_file"]


def _opt(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    # secret: kept out of repr() so a logged config never shows a key
    return field(default=default, repr=not secret, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True, kw_only=True, config=ConfigDict(strict=True, extra="forbid"))
class ServerConfig:
    """Every setting of a server, validated by pydantic when built."""

    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8765, "TCP port (0 picks a free one)")
    provider: str = _opt("simulated", "default provider for generate requests")
    model: str | None = _opt(None, "default model (the provider's own default when unset)")
    max_streams: int = _opt(8, "concurrent streams per session (too_many_streams beyond)")
    max_size: int = _opt(
        1 << 20, "largest client message in bytes (1009 beyond); also the largest conversation an interrupt continues"
    )
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
    max_stream_bytes: int = _opt(
        1 << 20, "output one stream keeps (text, reasoning, tool calls), bytes; at it the stream ends 'length'"
    )
    recent_streams_bytes: int = _opt(
        4 << 20, "what a session keeps of its ended streams (for interrupt), bytes; oldest forgotten first"
    )
    max_subscriptions: int = _opt(100, "channel subscriptions per session (too_many_subscriptions beyond)")
    publish_rate: float = _opt(100.0, "publish + send per session per second (burst 2x; rate_limited beyond)")
    max_data_bytes: int = _opt(64 * 1024, "largest publish/send data, encoded (message_too_large beyond)")
    inbox_messages: int = _opt(100, "direct messages held for an agent that is away (inbox_full beyond)")
    inbox_bytes: int = _opt(1 << 20, "bytes of direct messages held for an agent that is away (inbox_full beyond)")
    channel_history: int = _opt(1000, "messages each channel keeps for recovery by offset")
    channel_history_ttl: float = _opt(300.0, "seconds a channel message stays recoverable")
    channel_history_bytes: int = _opt(
        128 << 20, "bytes the histories of all channels keep together (oldest forgotten first)"
    )
    channel_history_bytes_per_identity: int = _opt(
        16 << 20, "bytes one identity's publications keep in all channel histories (per IP when anonymous)"
    )
    slow_consumer_bytes: int = _opt(
        4 << 20, "close a connection with 1013 when this much output waits for it (slow consumer)"
    )
    sim_tokens_per_s: float = _opt(40.0, "simulated provider: tokens per second (0 = unpaced)")
    sim_ttft_ms: float = _opt(150.0, "simulated provider: time to first token in ms")
    # Real providers (see README "Real providers"). A provider is offered when
    # its key or base URL is set here or in the SDK's own variable
    # (OPENAI_API_KEY / OPENAI_BASE_URL, ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL).
    base_url: str | None = _opt(
        None, "upstream base URL of the default provider (--provider); --openai-base-url etc. win"
    )
    openai_api_key: str | None = _opt(
        None, "OpenAI API key (else OPENAI_API_KEY; prefer the environment to a flag)", secret=True
    )
    openai_base_url: str | None = _opt(
        None,
        "OpenAI-compatible endpoint incl. /v1 (else OPENAI_BASE_URL); no key needed for local servers",
    )
    openai_model: str = _opt("gpt-5-mini", "openai provider: default model")
    openai_api: str = _opt(
        "chat", "openai provider: Chat Completions or Responses API", choices=("chat", "responses")
    )
    openai_images: bool = _opt(
        True, "openai provider: the model takes images (--no-openai-images: refuse them, text-only model)"
    )
    anthropic_api_key: str | None = _opt(
        None, "Anthropic API key (else ANTHROPIC_API_KEY; prefer the environment)", secret=True
    )
    anthropic_base_url: str | None = _opt(None, "Anthropic endpoint (else ANTHROPIC_BASE_URL)")
    anthropic_model: str = _opt("claude-haiku-4-5", "anthropic provider: default model")
    anthropic_max_tokens: int = _opt(
        4096, "anthropic provider: max_tokens when a generate sets none (the API requires one)"
    )
    provider_retries: int = _opt(
        2, "retries of a failed upstream request (429/529/5xx/connection) before the first token"
    )
    provider_backoff: float = _opt(0.5, "first retry delay in s (doubles each retry) without retry-after")
    provider_retry_max: float = _opt(10.0, "longest retry delay in s (caps the upstream's retry-after)")
    provider_timeout: float = _opt(
        120.0, "upstream timeout in s: connecting (at most 10) and between bytes of the answer"
    )
    # Production hardening (README "Running in production").
    api_keys: tuple[str, ...] = _opt(
        (), "accepted API key (repeatable; env: comma-separated); turns authentication on", flag="--api-key", secret=True
    )
    jwt_secret: str | None = _opt(None, "HS256 secret for JWT credentials; turns authentication on", secret=True)
    allowed_origins: tuple[str, ...] = _opt(
        (),
        "browser Origin allowed besides the server's own page on an IP address or localhost (repeatable; '*' = any)",
        flag="--allowed-origin",
    )
    channel_subscribe: tuple[str, ...] = _opt(("*",), "channel patterns clients may subscribe to (repeatable)")
    channel_publish: tuple[str, ...] = _opt(("*",), "channel patterns clients may publish on (repeatable)")
    message_rate: float = _opt(500.0, "requests per connection per second (burst 2x; rate_limited beyond; 0 = off)")
    generate_rate: float = _opt(600.0, "generations per identity per minute (0 = off)")
    token_rate: float = _opt(0.0, "output tokens per identity per minute (0 = off)")
    abuse_threshold: int = _opt(100, "close with 1008 after this many refused messages in 10 s (min 50)")
    max_connections: int = _opt(10_000, "open connections in total (503 beyond)")
    max_connections_per_ip: int = _opt(
        256, "open connections per client IP (503 beyond; 0 = off; behind a proxy all share its IP)"
    )
    open_timeout: float = _opt(10.0, "seconds for the opening handshake")
    drain_timeout: float = _opt(30.0, "on SIGTERM, seconds running streams may take to finish")
    reconnect_ms: int = _opt(1000, "shutdown.reconnect_ms: when clients should reconnect after a drain")
    metrics: bool = _opt(True, "serve Prometheus metrics at /metrics (without a token: to loopback peers only)")
    metrics_token: str | None = _opt(
        None, "require 'Authorization: Bearer TOKEN' for /metrics (then from any address)", secret=True
    )
    log_format: str = _opt("text", "log format", choices=("text", "json"))
    log_content: bool = _opt(False, "log prompt and completion text (debugging only)")
    loop: str = _opt("auto", "event loop", choices=("auto", "asyncio", "uvloop"))
    gc: str = _opt(
        "paced",
        "cyclic garbage collector: paced by the event loop (short pauses under connection churn; README"
        " 'Garbage collection') or Python's own",
        choices=("paced", "python"),
    )
    log_level: str = _opt("info", "logging level", choices=("debug", "info", "warning", "error"))
    # Several nodes (README "Running several nodes").
    redis_url: str | None = _opt(
        None,
        "Redis backplane URL (redis://host:6379/0): share sessions and channels with other nodes",
        flag="--redis",
        secret=True,  # it may hold a password
    )
    node_id: str | None = _opt(None, "this node's name on the backplane (default: random)")
    node_timeout: float = _opt(3.0, "a node whose heartbeat is older than this many s is declared lost")
    workers: int = _opt(
        1, "server processes on one port (SO_REUSEPORT), sharing the Redis backplane of --redis (required above 1); "
        "a worker that dies is restarted (command line only)"
    )
    reuse_port: bool = _opt(False, "listen with SO_REUSEPORT, so that several processes share the port (--workers does)")
    conformance_echo: bool = _opt(
        False, "testing only: also echo every message on WebSocket path /_echo (Autobahn conformance runs)"
    )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        file_values: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> ServerConfig:
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {
            name: _check(fields[name], value, source=f"config file: {name}")
            for name, value in (file_values or {}).items()
        }
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw, source=env_name(f.name))
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            raise SystemExit(f"wsserver: setting {name}: {err['msg']}") from None

    @property
    def heartbeat_ms(self) -> int:
        return int(self.ping_interval * 1000)


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML settings file; unknown keys stop start-up."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SystemExit(f"wsserver: --config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"wsserver: --config {path}: {exc}") from None
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"wsserver: --config {path}: unknown setting(s): {', '.join(unknown)}")
    return values


def _check(f: dataclasses.Field[Any], value: Any, *, source: str) -> Any:
    """Validate a value from the TOML file (already typed by TOML)."""
    kind = _base_type(f)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "str": isinstance(value, str),
    }.get(kind, True)
    if value is None and "None" in str(f.type):
        ok = True
    if not ok:
        raise SystemExit(f"wsserver: {source}: expected {kind}, got {value!r}")
    if kind == "list":
        return tuple(value)
    if kind == "float":
        return float(value)
    choices = f.metadata.get("choices") or ()
    if choices and value not in choices:
        raise SystemExit(f"wsserver: {source}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def env_name(name: str) -> str:
    return "WSSERVER_" + name.upper()


def _base_type(f: dataclasses.Field[Any]) -> str:
    kind = str(f.type).replace(" | None", "")
    return "list" if kind.startswith("tuple[") else kind


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
        if kind == "list":
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError:
        raise SystemExit(f"wsserver: {source}: invalid {kind} value {raw!r}") from None
    choices = f.metadata.get("choices") or ()
    if choices and raw not in choices:
        raise SystemExit(f"wsserver: {source}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per option; defaults come from the environment."""
    parser.add_argument("--config", metavar="FILE", help="a TOML file of settings (flags and env win)")
    for f in dataclasses.fields(ServerConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kind = _base_type(f)
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default}]"
        if kind == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        if kind == "list":
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="VALUE", help=help_text)
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
        f.name: tuple(value) if isinstance(value, list) else value
        for f in dataclasses.fields(ServerConfig)
        if (value := getattr(args, f.name, None)) is not None
    }
    file_values = load_file(args.config) if getattr(args, "config", None) else None
    return ServerConfig.from_env(environ, file_values=file_values, **overrides)
