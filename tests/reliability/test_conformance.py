"""RFC 6455 conformance: the Autobahn testsuite cases, run by kosoku.

kosoku (PyPI, test extra) is a Python 3 port of Autobahn's ``fuzzingclient``;
the original suite is Python 2 code and cannot run here. The cases need an
echo peer and know nothing of ``hello``, so the server runs with
``conformance_echo`` on: path ``/_echo`` echoes every message through the same
``serve()`` call, hence the same transport settings, as ``/``.

What runs where (README "Reliability" has the figures):

* default run: cases 1-7 and 9 against the default configuration
  (``max_size`` 1 MiB), a few seconds with 4 cases in parallel;
* ``-m slow``: the 9.x cases again with ``max_size`` raised to 16 MiB, so
  that the 4-16 MiB messages are echoed instead of refused (~25 s);
* never: 12.x and 13.x (permessage-deflate: compression is off by default,
  and the 12.x cases time out on 2 cores); 10.1.1 is outside the selection.

Exclusions and expected refusals, each with its reason:

* 7.1.5 (fragment, close, fragment): websockets answers 1002 "incomplete
  fragmented message" where Autobahn expects 1000. Library behaviour, not
  ours; excluded.
* 9.1.4-9.1.6, 9.2.4-9.2.6, 9.3.*, 9.4.* send 4-16 MiB messages. Over
  ``max_size`` (1 MiB) the server closes with 1009, which is what it
  documents; Autobahn counts that as FAILED. Asserted as 1009.
* 9.3.1, 9.3.2, 9.4.1, 9.4.2 split 4 MiB into 64- or 256-byte fragments:
  more than websockets' 4096-fragment limit (``WEBSOCKETS_MAX_FRAGMENTS``),
  so 1009 "too many fragments" at any ``max_size``. Asserted as 1009.

NON-STRICT (3.2-3.4, 4.1.3-4.1.5, 4.2.3-4.2.5, 5.15, 6.4.1-6.4.4) and
INFORMATIONAL (7.1.6, 7.13.1, 7.13.2) verdicts count as passing, as in
Autobahn.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import kosoku
import pytest

from wsserver.config import ServerConfig
from wsserver.server import Server

SELECTION = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*"]
EXCLUDED = {"7.1.5": "websockets closes with 1002 'incomplete fragmented message' where 1000 is expected"}
#: 4 MiB or more: over the default max_size (1 MiB).
OVER_MAX_SIZE = {f"9.{g}.{n}" for g in (1, 2) for n in (4, 5, 6)} | {f"9.{g}.{n}" for g in (3, 4) for n in range(1, 10)}
#: Over websockets' 4096-fragment limit, whatever max_size is.
TOO_MANY_FRAGMENTS = {"9.3.1", "9.3.2", "9.4.1", "9.4.2"}
PARALLEL = 4


async def run_cases(server: Server, cases: list[str]) -> list[Any]:
    url = f"ws://127.0.0.1:{server.port}/_echo"
    try:
        return list(await kosoku.run_fuzzingclient(url, cases, list(EXCLUDED), concurrency=PARALLEL))
    except kosoku.FailureError as failure:  # carries every result; judged below
        return failure.results


def check(results: list[Any], refused: set[str]) -> Counter[str]:
    """Every case passes, except those in ``refused``, which must end with 1009."""
    bad = []
    for r in results:
        if r.case_id in refused:
            if r.remote_close_code != 1009:
                bad.append((r.case_id, "expected close 1009", r.remote_close_code, r.remote_close_reason))
        elif not r.passed:
            bad.append((r.case_id, r.behavior.value, r.behavior_close.value, r.remote_close_code, r.result))
    assert not bad, bad
    return Counter("REFUSED 1009" if r.case_id in refused else r.behavior.value for r in results)


def conformance_server(**overrides: Any) -> Server:
    # The defaults, as `wsserver serve` runs, plus the echo route.
    return Server(ServerConfig(host="127.0.0.1", port=0, conformance_echo=True, **overrides))


async def test_autobahn_cases_1_to_7_and_9() -> None:
    async with conformance_server() as server:
        results = await run_cases(server, SELECTION)
    ids = {r.case_id for r in results}
    assert len(results) > 250 and "1.1.1" in ids and "9.8.6" in ids and not ids & set(EXCLUDED)
    verdicts = check(results, OVER_MAX_SIZE)
    assert verdicts["REFUSED 1009"] == len(OVER_MAX_SIZE)
    assert verdicts["OK"] > 200, verdicts


async def test_echo_route_is_off_by_default(make_server: Any) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async with make_server() as server:
        with pytest.raises(InvalidStatus) as exc:
            async with connect(f"ws://127.0.0.1:{server.port}/_echo"):
                pass
        assert exc.value.response.status_code == 404


async def test_echo_route_opens_no_session() -> None:
    from websockets.asyncio.client import connect

    async with conformance_server() as server:
        async with connect(f"ws://127.0.0.1:{server.port}/_echo") as ws:
            await ws.send("not a hello")
            assert await ws.recv() == "not a hello"
            await ws.send(b"\x00\x01")
            assert await ws.recv() == b"\x00\x01"
        assert not server.sessions


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_autobahn_9_large_messages_under_a_16_mib_limit() -> None:
    async with conformance_server(max_size=16 << 20) as server:
        results = await run_cases(server, ["9.*"])
    verdicts = check(results, TOO_MANY_FRAGMENTS)
    assert verdicts["REFUSED 1009"] == len(TOO_MANY_FRAGMENTS)
