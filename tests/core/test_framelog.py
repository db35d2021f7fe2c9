"""The replay log's frames in chunks (core/framelog.py): a deque to its users, nearly nothing to the GC."""

from __future__ import annotations

import gc
from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from wsserver.core.framelog import CHUNK, FrameLog

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=40)),
        st.tuples(st.just("popleft"), st.none()),
        st.tuples(st.just("from"), st.integers(0, 300)),
    ),
    max_size=400,
)


@given(ops)
def test_it_behaves_as_a_deque_of_its_frames(script: list[tuple[str, object]]) -> None:
    log, model = FrameLog(), deque[bytes]()
    for op, arg in script:
        if op == "append":
            log.append(arg)  # type: ignore[arg-type]
            model.append(arg)  # type: ignore[arg-type]
        elif op == "popleft" and model:
            assert log.popleft() == model.popleft()
        elif op == "from":
            assert list(log.frames_from(arg)) == list(model)[arg:]  # type: ignore[misc]
        assert len(log) == len(model) and bool(log) == bool(model)
    assert list(log) == list(model)


def test_a_long_log_is_a_few_references() -> None:
    frames = [b'{"type":"stream.delta","seq":%d}' % i for i in range(10 * CHUNK + 5)]
    log = FrameLog(frames)
    assert list(log) == frames
    referents = [r for r in gc.get_referents(log) if gc.is_tracked(r)]
    visited = sum(len(gc.get_referents(r)) for r in referents)
    assert visited <= 2 * 10 + CHUNK  # a blob and an array per chunk, the open tail's frames
    for _ in range(3 * CHUNK + 1):
        log.popleft()
    assert list(log) == frames[3 * CHUNK + 1 :]
