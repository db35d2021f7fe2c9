"""Command line: ``wsserver serve``, ``wsserver chat [URL]``, ``wsserver --version``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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
    # Modules, models and the server's own objects live as long as the
    # process: keep them out of every later full collection, which otherwise
    # scans them again each time (~38,000 objects). (Before start(): this
    # one long collection is not a pause of the running server.)
    gc.collect()
    gc.freeze()
    await server.start()
    stop = asyncio.Event()
    graceful = [False]
    loop = asyncio.get_running_loop()
    drain: list[asyncio.Task[None]] = []  # the drain once it runs (a second signal cuts it short)

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second signal: stop now
            graceful[0] = False
            for task in drain:
                task.cancel()
            return
        graceful[0] = sig == signal.SIGTERM
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
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
    if graceful[0]:  # SIGTERM: drain (a second signal cuts it short)
        print(f"wsserver: draining (up to {config.drain_timeout:g} s)", flush=True)
        drain.append(loop.create_task(server.drain()))
        try:
            await drain[0]
        except asyncio.CancelledError:
            pass
    print("wsserver: stopping", flush=True)
    await server.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    config = from_args(args)
    if config.workers < 1:
        raise SystemExit(f"wsserver: setting workers: at least 1, got {config.workers}")
    if config.workers > 1:
        if not config.redis_url:
            raise SystemExit(
                f"wsserver: --workers {config.workers} needs the Redis backplane (--redis URL or "
                "WSSERVER_REDIS_URL): the workers share sessions and channels through it, so that a "
                "client may resume through any of them"
            )
        from .server.workers import supervise

        argv: list[str] = args.argv
        return int(asyncio.run(supervise(config, argv[argv.index("serve") + 1 :])))
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.log_format == "json":
        from .server.metrics import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per upstream request
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


async def chat(
    url: str, *, provider: str | None, model: str | None, params: dict[str, Any], system: str | None
) -> int:
    """A terminal chat. Interactive: a line typed while an answer streams steers it."""
    from .client import ClientStream, connect
    from .wire.errors import ConnectionLost, ServerError, StreamFailed

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    current: list[ClientStream] = []
    last_interrupt = [0.0]
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    cancelling: set[asyncio.Task[None]] = set()  # cancels under way (kept referenced)

    def on_sigint() -> None:
        now = time.monotonic()
        if current and current[0].result is None:
            task = loop.create_task(current[0].cancel())
            cancelling.add(task)
            task.add_done_callback(cancelling.discard)
            print("\n[cancelling — Ctrl-C again quits]", flush=True)
        elif now - last_interrupt[0] < 2.0:
            main_task.cancel()
        else:
            print("\n[Ctrl-C again to quit, or Ctrl-D]", flush=True)
        last_interrupt[0] = now

    down = [False]

    def on_state(state: str, detail: str) -> None:
        if state == "reconnecting" and not down[0]:
            down[0] = True
            print("\n[connection lost — reconnecting]", flush=True)
        elif state == "open" and down[0]:
            down[0] = False
            print(f"[reconnected: {detail}]", flush=True)

    async def show(stream: ClientStream) -> None:
        try:
            async for piece in stream:
                print(piece, end="", flush=True)
        except StreamFailed as exc:
            print(f"\n[stream failed: {exc.code}: {exc.message}]", flush=True)
        except ConnectionLost as exc:
            print(f"\n[stream lost: {exc}]", flush=True)
            return
        result = stream.result
        assert result is not None
        if result.text and result.reason != "interrupted":  # a steer records its own
            history.append({"role": "assistant", "content": result.text})
        ttft = f"{result.ttft_ms:.0f} ms" if result.ttft_ms is not None else "–"
        print(
            f"\n[{result.reason} · {result.usage.input_tokens} in / "
            f"{result.usage.output_tokens} out tokens · ttft {ttft} · "
            f"{result.duration_ms / 1000:.2f} s]",
            flush=True,
        )

    readline = await _stdin_lines()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    async def read_lines() -> None:
        while line := await readline():
            text = line.decode(errors="replace").strip()
            if text:
                lines.put_nowait(text)
        lines.put_nowait(None)

    reader = loop.create_task(read_lines())
    printer: asyncio.Task[None] | None = None
    try:
        async with connect(url, on_state=on_state) as client:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            hint = "; type while it answers to steer" if interactive else ""
            print(f"connected to {url} (session {client.session}); Ctrl-C cancels, twice quits{hint}", flush=True)
            next_line = loop.create_task(lines.get())
            while True:
                if printer is not None and not interactive:
                    await printer  # piped input: one answer at a time, no steering
                    printer = None
                if printer is not None:
                    done, _ = await asyncio.wait({next_line, printer}, return_when=asyncio.FIRST_COMPLETED)
                    if next_line not in done:
                        printer = None
                        continue
                else:
                    if interactive:
                        print("> ", end="", flush=True)
                    await next_line
                text = next_line.result()
                next_line = loop.create_task(lines.get())
                if text is None:  # end of input
                    if printer is not None:
                        await printer
                    break
                try:
                    if printer is not None and current and current[0].result is None:
                        old = current[0]
                        print("\n[steering]", flush=True)
                        steered = await old.interrupt(text)
                        await printer  # the old answer ends as interrupted
                        if old.text:
                            history.append({"role": "assistant", "content": old.text})
                        history.append({"role": "user", "content": text})
                        assert steered is not None
                        stream = steered
                    else:
                        if printer is not None:
                            await printer
                        history.append({"role": "user", "content": text})
                        try:
                            stream = await client.generate(history, provider=provider, model=model, params=params or None)
                        except ServerError:
                            history.pop()
                            raise
                except ServerError as exc:
                    print(f"[error {exc.code}: {exc.message}]", flush=True)
                    continue
                current[:] = [stream]
                printer = loop.create_task(show(stream))
            next_line.cancel()
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
        reader.cancel()
        if printer is not None:
            printer.cancel()
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (the workers of --workers get them too)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handler
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
