"""The codec, the golden vectors in protocol/vectors/, and the generated schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsserver.wire.errors import ErrorCode, ProtocolError
from wsserver.wire.messages import (
    CLIENT_TYPES,
    Message,
    StreamDelta,
    StreamToolCall,
    decode_client,
    decode_server,
)
from wsserver.wire.codec import encode, encode_delta, encode_tool_call
from wsserver.core.actions import CloseConnection
from wsserver.core.protocol import Opened, ServerProtocol
from wsserver.providers import Providers, SimulatedProvider
from wsserver.core.session import Session

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "protocol" / "vectors"


def vectors(kind: str) -> list[Any]:
    paths = sorted((VECTORS / kind).glob("*.json"))
    assert paths, f"no vectors in {kind}"
    return [pytest.param(json.loads(p.read_text()), id=p.stem) for p in paths]


def new_protocol() -> ServerProtocol:
    providers = Providers([SimulatedProvider()], default="simulated")
    return ServerProtocol(
        open_session=lambda hello: Opened(Session("sess", providers=providers), False),
        welcome={"heartbeat_ms": 0, "limits": {}, "server": "test"},
    )


class TestVectors:
    @pytest.mark.parametrize("vector", vectors("client-valid"))
    def test_client_valid(self, vector: dict[str, Any]) -> None:
        msg = decode_client(orjson.dumps(vector["message"]))
        assert msg.type == vector["message"]["type"]

    @pytest.mark.parametrize("vector", vectors("server-valid"))
    def test_server_valid_round_trips(self, vector: dict[str, Any]) -> None:
        model = decode_server(orjson.dumps(vector["message"]))
        assert orjson.loads(encode(model)) == vector["message"]

    @pytest.mark.parametrize("vector", vectors("client-invalid"))
    def test_client_invalid_gets_its_error(self, vector: dict[str, Any]) -> None:
        proto = new_protocol()
        if vector["state"] == "after_hello":
            proto.receive_text('{"type":"hello","protocol":1}')
            proto.data_to_send()
        if vector.get("binary"):
            actions = proto.receive_binary(vector["raw"].encode())
        else:
            actions = proto.receive_text(vector["raw"])
        sent = [orjson.loads(f) for f in proto.data_to_send()]
        errors = [f for f in sent if f["type"] == "error"]
        assert len(errors) == 1, sent
        (err,) = errors
        assert err["code"] == vector["error"]["code"]
        assert err["code"] in set(ErrorCode)
        if "field" in vector["error"]:
            assert err["field"] == vector["error"]["field"]
        assert ("seq" in err) == (vector["state"] == "after_hello")
        closes = [a for a in actions if isinstance(a, CloseConnection)]
        if "close" in vector:
            assert [c.code for c in closes] == [vector["close"]]
        else:
            assert closes == []

    def test_every_client_type_has_a_valid_vector(self) -> None:
        seen = {json.loads(p.read_text())["message"]["type"] for p in (VECTORS / "client-valid").glob("*.json")}
        assert seen == CLIENT_TYPES


class TestCodec:
    def test_encode_delta_matches_the_model(self) -> None:
        fast = encode_delta(7, "s1", 3, 'he said "hi" \u2603\n')
        model = StreamDelta(seq=7, stream="s1", index=3, text='he said "hi" \u2603\n')
        assert fast == encode(model)
        assert decode_server(fast) == model

    @pytest.mark.parametrize(
        ("part", "call"), [("reasoning", None), ("tool_call", "call_1"), ("tool_call", 'c"\u2603')]
    )
    def test_encode_delta_of_a_part_matches_the_model(self, part: str, call: str | None) -> None:
        text = '{"city": "Z\u00fcrich \\"}'
        fast = encode_delta(7, "s1", 3, text, part, call)
        model = StreamDelta(seq=7, stream="s1", index=3, text=text, part=part, call=call)
        assert fast == encode(model)
        assert decode_server(fast) == model

    def test_encode_tool_call_matches_the_model(self) -> None:
        fast = encode_tool_call(8, "s1", 4, "toolu_01", "get_weather")
        model = StreamToolCall(seq=8, stream="s1", index=4, call="toolu_01", name="get_weather")
        assert fast == encode(model)
        assert decode_server(fast) == model

    def test_absent_fields_are_left_out(self) -> None:
        frame = orjson.loads(encode(decode_server(b'{"type":"pong"}')))
        assert frame == {"type": "pong"}

    def test_message_data_may_be_null(self) -> None:
        frame = orjson.loads(encode(Message(**{"from": "a"}, channel="c", offset=1, data=None)))
        assert frame["data"] is None and frame["from"] == "a"

    def test_bad_message_names_field_and_echoes_id(self) -> None:
        with pytest.raises(ProtocolError) as exc:
            decode_client(b'{"type":"generate","id":"r1","messages":[{"role":"user"}]}')
        assert exc.value.code == "bad_message"
        assert exc.value.field == "messages.0.content"
        assert exc.value.ref == "r1"
        assert "messages.0.content" in exc.value.message

    def test_unknown_type_lists_the_known_ones(self) -> None:
        with pytest.raises(ProtocolError) as exc:
            decode_client(b'{"type":"nope"}')
        assert exc.value.code == "unknown_type"
        assert "generate" in exc.value.message

    def test_strings_and_bytes_decode_alike(self) -> None:
        raw = '{"type":"ping","id":"p"}'
        assert decode_client(raw) == decode_client(raw.encode())

    def test_text_with_lone_surrogates_is_bad_json(self) -> None:
        # Found by tests/reliability/test_fuzz.py: str input holding a lone surrogate made
        # the error path's json.loads raise JSONDecodeError (or, inside a JSON
        # string, gave bad_message with field ''). Not reachable through
        # websockets, which hands over valid UTF-8 only.
        for data in ("\ud800", '{"type":"ping"}\udc00', '{"type":"ping","id":"\ud800"}'):
            with pytest.raises(ProtocolError) as exc:
                decode_client(data)
            assert exc.value.code == ErrorCode.BAD_JSON

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_only_raise_protocol_errors(self, data: bytes) -> None:
        try:
            decode_client(data)
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE)

    @settings(max_examples=300, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(["type", "id", "messages", "stream", "seq", "protocol", "x"]), kids, max_size=5),
            max_leaves=12,
        )
    )
    def test_arbitrary_json_only_raises_protocol_errors(self, value: Any) -> None:
        for candidate in (value, {"type": "generate", "messages": value}, {"type": "hello", "protocol": value}):
            try:
                decode_client(json.dumps(candidate))
            except ProtocolError as exc:
                assert exc.code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE)


def test_names_match_in_full() -> None:
    # Regression: re.match with "^…$" accepted "planner\n" ("$" matches before
    # a trailing newline), a name of its own shown as "planner" to others.
    from wsserver.wire.names import valid_name

    assert valid_name("planner") and valid_name("team:a.b-c_1") and valid_name("x" * 128)
    for name in ("planner\n", "planner\n\n", "\nplanner", "plan ner", "", "x" * 129, "é"):
        assert not valid_name(name), repr(name)
    for name in ("s1\n", "s1\r"):  # the schema's pattern (pydantic: a Rust regex) agrees
        with pytest.raises(ProtocolError) as exc:
            decode_client(json.dumps({"type": "cancel", "stream": name}))
        assert exc.value.field == "stream"


def test_schema_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_schema.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_every_error_code_is_in_the_spec_and_the_js_client() -> None:
    """ErrorCode, PROTOCOL.md's code table and the JS client's ERROR_CODES agree."""
    spec = (ROOT / "protocol" / "PROTOCOL.md").read_text()
    constants = (ROOT / "clients" / "js" / "src" / "constants.js").read_text()
    for code in ErrorCode:
        assert f"`{code.value}`" in spec, f"{code.value} is not in PROTOCOL.md"
        assert f'"{code.value}"' in constants, f"{code.value} is not in clients/js/src/constants.js"
