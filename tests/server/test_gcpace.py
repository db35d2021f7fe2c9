"""The paced garbage collector (server/gcpace.py): when it collects which
generation, that it hands the collector back as it found it, and that a
server running it still frees garbage cycles."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import PY, clean_env, http_get, until
from wsserver.server import Server, gcpace
from wsserver.server.gcpace import CHECK_EVERY, FULL_FLOOR, PER_CONNECTION, GcPacer


class FakeGc:
    """Records the collections asked for; the oldest generation holds ``old`` objects."""

    def __init__(self, old: int = 0) -> None:
        self.old = old
        self.collected: list[int] = []
        self.left_after_full = 0

    def collect(self, generation: int = 2) -> int:
        self.collected.append(generation)
        if generation == 2:
            self.old = self.left_after_full
        return 0

    def get_objects(self, generation: int | None = None) -> list[None]:
        assert generation == 2
        return [None] * self.old


@pytest.fixture
def fake_gc(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGc]:
    fake = FakeGc()
    monkeypatch.setattr(gcpace.gc, "collect", fake.collect)
    monkeypatch.setattr(gcpace.gc, "get_objects", fake.get_objects)
    yield fake


def ticks(pacer: GcPacer, n: int) -> None:
    for _ in range(n):
        pacer.tick()


def test_each_tick_collects_the_young_generations(fake_gc: FakeGc) -> None:
    pacer = GcPacer()
    ticks(pacer, 3)
    assert fake_gc.collected == [1, 1, 1]  # 0 and 1 together: survivors go to the oldest


def test_no_full_collection_below_the_floor(fake_gc: FakeGc) -> None:
    pacer = GcPacer()
    fake_gc.old = FULL_FLOOR  # however much it grew since the last one
    ticks(pacer, 5 * CHECK_EVERY)
    assert 2 not in fake_gc.collected
    assert pacer.old_objects == FULL_FLOOR  # counted, for the gauge
    assert pacer.full_collections == 0


def test_the_floor_grows_with_the_open_connections(fake_gc: FakeGc) -> None:
    """A heap that grew because connections opened is not garbage."""
    open_now = [1000]
    pacer = GcPacer(lambda: open_now[0])
    fake_gc.old = FULL_FLOOR + PER_CONNECTION * 1000
    ticks(pacer, 3 * CHECK_EVERY)
    assert 2 not in fake_gc.collected
    open_now[0] = 999  # the same heap, one connection fewer: past the floor
    ticks(pacer, CHECK_EVERY)
    assert fake_gc.collected.count(2) == 1


def test_full_collection_when_the_oldest_generation_doubled(fake_gc: FakeGc) -> None:
    pacer = GcPacer()
    fake_gc.old = FULL_FLOOR + 1
    fake_gc.left_after_full = 150_000  # all alive: the full collection frees nothing
    ticks(pacer, CHECK_EVERY)
    assert fake_gc.collected.count(2) == 1
    assert pacer.old_objects == 150_000 and pacer.full_collections == 1
    # grown, but not to twice what the last one left: no second one
    fake_gc.old = 299_999
    ticks(pacer, 3 * CHECK_EVERY)
    assert fake_gc.collected.count(2) == 1
    # twice: the second one
    fake_gc.old = 300_000
    ticks(pacer, CHECK_EVERY)
    assert fake_gc.collected.count(2) == 2
    # it counts only every CHECK_EVERY ticks
    fake_gc.old = 10**7
    ticks(pacer, CHECK_EVERY - 1)
    assert fake_gc.collected.count(2) == 2


async def test_start_and_stop_hand_the_collector_back() -> None:
    assert gc.isenabled()
    first, second = GcPacer(), GcPacer()
    first.start()
    second.start()
    try:
        assert not gc.isenabled() and first.running
        first.stop()
        assert not gc.isenabled()  # the other one still paces
    finally:
        first.stop()
        second.stop()
    assert gc.isenabled() and not second.running
    second.stop()  # (twice: nothing more)
    assert gc.isenabled()


async def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    try:
        pacer = GcPacer()
        pacer.start()
        pacer.stop()
        assert not gc.isenabled()
    finally:
        gc.enable()


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_a_paced_server_still_frees_garbage_cycles(make_server: Callable[..., Server]) -> None:
    async with make_server() as server:
        assert server.gc_pacer is not None and server.gc_pacer.running
        assert not gc.isenabled()  # (automatic collection off: only the pacer frees it)
        freed = asyncio.Event()
        garbage = Cycle()
        weakref.finalize(garbage, freed.set)
        del garbage
        await asyncio.wait_for(freed.wait(), 5.0)  # (within a tick, 0.2 s)
    assert gc.isenabled()


async def test_python_gc_leaves_the_collector_alone(make_server: Callable[..., Server]) -> None:
    async with make_server(gc="python") as server:
        assert server.gc_pacer is None
        assert gc.isenabled()
        status, body = await asyncio.to_thread(http_get, server.port, "/metrics")
        assert status == 200 and b"wsserver_gc_old_objects" not in body


async def test_gauges_of_the_paced_collector(make_server: Callable[..., Server], monkeypatch: Any) -> None:
    monkeypatch.setattr(gcpace, "CHECK_EVERY", 1)  # count at each tick (0.2 s)
    async with make_server() as server:
        pacer = server.gc_pacer
        assert pacer is not None
        await until(lambda: pacer.old_objects > 0, timeout=5.0)
        status, body = await asyncio.to_thread(http_get, server.port, "/metrics")
        assert status == 200
        lines = dict(
            line.split(" ", 1) for line in body.decode().splitlines() if line.startswith("wsserver_gc_") and " " in line
        )
        assert float(lines["wsserver_gc_old_objects"]) > 0
        assert float(lines["wsserver_gc_full_collections"]) == pacer.full_collections


@pytest.mark.parametrize("where", ["flag", "env"])
def test_an_unknown_gc_mode_stops_start_up_naming_the_setting(where: str) -> None:
    args, env = (["--gc", "bogus"], clean_env()) if where == "flag" else ([], clean_env(WSSERVER_GC="bogus"))
    out = subprocess.run([*PY, "serve", *args], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode != 0
    assert ("--gc" if where == "flag" else "WSSERVER_GC") in out.stderr
    assert "bogus" in out.stderr and "paced" in out.stderr
    assert "Traceback" not in out.stderr
