"""Command line: ``wsserver serve``, ``wsserver chat [URL]``, ``wsserver --version``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from . import __version__
from .config import ServerConfig, add_arguments, from_args

__all__ = ["main", "run"]


def run(main: Coroutine[Any, Any, Any], loop: str = "auto") -> Any:
    """Run ``main`` on uvloop when available (``loop="auto"``), else asyncio."""
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                main.close()
                raise SystemExit("wsserver: --loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


# ------------------------------------------------------------------ serve


async def serve_until_signalled(config: ServerConfig, ready: Callable[[str], None] | None = None) -> None:
    from .server import Server

    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = f"http://{config.host}:{server.port}/"
    print(
        f"wsserver {__version__} listening on {server.url} "
        f"(provider {config.provider}, loop {type(loop).__module__.split('.')[0]}); "
        f"demo page {http}; Ctrl-C stops",
        flush=True,
    )
    if ready is not None:
        ready(server.url)
    await stop.wait()
    print("wsserver: stopping", flush=True)
    await server.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    config = from_args(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.log_level != "debug":  # one line per connection is too chatty
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
    run(serve_until_signalled(config), config.loop)
    return 0


# ------------------------------------------------------------------- chat


async def _stdin_lines() -> Callable[[], Awaitable[bytes]]:
    """A ``readline`` for stdin that never blocks the event loop."""
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if stat.S_ISREG(mode):  # a file never blocks; pipes can't wrap it
        return lambda: asyncio.to_thread(sys.stdin.buffer.readline)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader.readline


async def chat(url: str, *, provider: str | None, model: str | None, params: dict[str, Any], system: str | None) -> int:
    from .client import ClientStream, connect
    from .errors import ConnectionLost, ServerError, StreamFailed

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    current: list[ClientStream] = []
    last_interrupt = [0.0]
    interactive = sys.stdin.isatty()

    def on_sigint() -> None:
        now = time.monotonic()
        if current and current[0].result is None:
            loop.create_task(current[0].cancel())
            print("\n[cancelling — Ctrl-C again quits]", flush=True)
        elif now - last_interrupt[0] < 2.0:
            main_task.cancel()
        else:
            print("\n[Ctrl-C again to quit, or Ctrl-D]", flush=True)
        last_interrupt[0] = now

    readline = await _stdin_lines()
    try:
        async with connect(url) as client:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            print(f"connected to {url} (session {client.session}); Ctrl-C cancels, twice quits", flush=True)
            history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
            while True:
                if interactive:
                    print("> ", end="", flush=True)
                line = await readline()
                if not line:
                    break
                text = line.decode(errors="replace").strip()
                if not text:
                    continue
                history.append({"role": "user", "content": text})
                try:
                    stream = await client.generate(history, provider=provider, model=model, params=params or None)
                except ServerError as exc:
                    print(f"[error {exc.code}: {exc.message}]", flush=True)
                    history.pop()
                    continue
                current[:] = [stream]
                try:
                    async for piece in stream:
                        print(piece, end="", flush=True)
                except StreamFailed as exc:
                    print(f"\n[stream failed: {exc.code}: {exc.message}]", flush=True)
                current.clear()
                result = stream.result
                assert result is not None
                if result.text:
                    history.append({"role": "assistant", "content": result.text})
                ttft = f"{result.ttft_ms:.0f} ms" if result.ttft_ms is not None else "–"
                print(
                    f"\n[{result.reason} · {result.usage.input_tokens} in / "
                    f"{result.usage.output_tokens} out tokens · ttft {ttft} · "
                    f"{result.duration_ms / 1000:.2f} s]",
                    flush=True,
                )
    except asyncio.CancelledError:
        print("\nbye", flush=True)
        return 0
    except ConnectionLost as exc:
        print(f"\n[connection lost: {exc}]", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        print(f"wsserver chat: cannot connect to {url}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.tokens_per_s is not None:
        params["tokens_per_s"] = args.tokens_per_s
    return int(
        run(
            chat(args.url, provider=args.provider, model=args.model, params=params, system=args.system),
            "auto",
        )
    )


# ------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsserver",
        description="Bidirectional WebSocket server for interactive LLM sessions.",
    )
    parser.add_argument("--version", action="version", version=f"wsserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_p = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every flag is also a WSSERVER_* environment variable.",
    )
    add_arguments(serve_p)
    serve_p.set_defaults(func=_cmd_serve)

    chat_p = sub.add_parser("chat", help="chat with a server in the terminal")
    chat_p.add_argument("url", nargs="?", default="ws://127.0.0.1:8765", help="server URL [ws://127.0.0.1:8765]")
    chat_p.add_argument("--provider", help="provider to ask (server default if unset)")
    chat_p.add_argument("--model", help="model to ask (provider default if unset)")
    chat_p.add_argument("--max-tokens", type=int, help="cap the length of each answer")
    chat_p.add_argument("--tokens-per-s", type=float, help="simulated provider: pace of the answer")
    chat_p.add_argument("--system", help="a system message that starts the conversation")
    chat_p.set_defaults(func=_cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handler
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
