"""Agent runs in the core: steps, stream.waiting, tool results, approvals, calls
routed to agents, timeouts, cancel and interrupt in every wait, threads and
on_busy, and each bad input's code (PROTOCOL.md 4.4)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.core.drive import HI, feed, frames, make_session, start
from wsserver.core.actions import AnswerCall, ArmTimer, RouteCall, StartGeneration, StopGeneration
from wsserver.core.runs import AGENT_TIMEOUT_MS, Run, route_id
from wsserver.core.session import Session
from wsserver.core.streams import Stream, StreamState

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
LOOKUP = {"name": "lookup", "agent": "librarian"}
PAY = {"name": "pay", "approval": True}


def run(s: Session, tools: list[dict[str, Any]] | None = None, steps: int = 3, **fields: Any) -> Stream:
    stream = start(s, tools=tools or [WEATHER, LOOKUP, PAY], max_steps=steps, **fields)
    frames(s)
    return stream


def call(s: Session, stream: Stream, *calls: tuple[str, str], text: str = "") -> None:
    """One step of the model: some text, then ``calls`` ((id, tool)), each with ``{}``."""
    if text:
        s.stream_delta(stream, text, 1)
    for call_id, name in calls:
        s.stream_tool_call(stream, call_id, name)
        s.stream_tool_delta(stream, call_id, '{"q": 1}')
    s.stream_usage(stream, 10, 5)
    s.step_end(stream, "tool_calls")


def of(out: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in out if f["type"] == kind]


def error(out: list[dict[str, Any]]) -> dict[str, Any]:
    (err,) = of(out, "error")
    return err


def result(s: Session, stream: Stream, call_id: str, content: Any = "42", **fields: Any) -> list[Any]:
    return feed(s, {"type": "tool_result", "stream": stream.id, "call": call_id, "content": content, **fields})


class TestSteps:
    def test_a_step_with_calls_waits_and_a_result_starts_the_next(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"), text="Looking.")
        out = frames(s)
        (waiting,) = of(out, "stream.waiting")
        assert waiting["step"] == 1 and not of(out, "stream.end")
        assert waiting["calls"] == [{"id": "c1", "name": "get_weather", "arguments": {"q": 1}, "wait": "client"}]
        assert waiting["message"]["tool_calls"] == [{"id": "c1", "name": "get_weather", "arguments": {"q": 1}}]
        assert a.state is StreamState.WAITING and s.take_actions() == []
        assert result(s, a, "c1", "sunny", id="r1") == []
        out = frames(s)
        assert [f["type"] for f in out] == ["stream.tool_result", "stream.step", "ok"]
        assert out[0] == {"type": "stream.tool_result", "seq": out[0]["seq"], "stream": a.id, "call": "c1",
                          "name": "get_weather", "content": "sunny"}
        assert out[1]["step"] == 2
        assert s.take_actions() == [StartGeneration(a)]
        # the next step answers the conversation so far
        assert [m.role for m in a.step_messages()] == ["user", "assistant", "tool"]

    def test_one_end_for_the_run_with_usage_summed_and_what_it_added(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"), ("c2", "get_weather"), text="Two.")
        result(s, a, "c2", "rain")  # results in any order; messages keep the calls' order
        result(s, a, "c1", "sun")
        s.take_actions()
        s.stream_usage(a, 30, 7)
        s.stream_delta(a, "Sun and rain.", 3)
        s.step_end(a, "complete")
        (end,) = of(frames(s), "stream.end")
        assert end["reason"] == "complete" and end["steps"] == 2
        assert end["usage"] == {"input_tokens": 40, "output_tokens": 12}
        assert end["message"] == {"role": "assistant", "content": "Sun and rain."}
        roles = [(m["role"], m.get("tool_call_id")) for m in end["messages"]]
        assert roles == [("assistant", None), ("tool", "c1"), ("tool", "c2"), ("assistant", None)]
        assert end["messages"][1]["content"] == "sun"

    def test_the_last_step_ends_with_tool_calls_as_a_plain_stream(self) -> None:
        s = make_session()
        a = run(s, steps=2)
        call(s, a, ("c1", "get_weather"))
        result(s, a, "c1", "x")
        s.take_actions()
        frames(s)
        call(s, a, ("c2", "get_weather"))
        out = frames(s)
        (end,) = of(out, "stream.end")
        assert end["reason"] == "tool_calls" and end["steps"] == 2 and not of(out, "stream.waiting")
        assert end["messages"][-1]["tool_calls"][0]["id"] == "c2"  # the client may take it from here

    def test_max_steps_1_is_today(self) -> None:
        s = make_session()
        a = start(s, tools=[WEATHER])
        call(s, a, ("c1", "get_weather"))
        (end,) = of(frames(s), "stream.end")
        assert end["reason"] == "tool_calls" and "messages" not in end and "steps" not in end

    def test_a_tool_the_request_lacks_waits_for_the_client(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "invented"))
        assert of(frames(s), "stream.waiting")[0]["calls"][0]["wait"] == "client"


class TestAgents:
    def test_a_call_for_an_agent_is_routed_and_timed(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "lookup"))
        waiting = of(frames(s), "stream.waiting")[0]
        assert waiting["calls"][0]["wait"] == "agent" and waiting["calls"][0]["agent"] == "librarian"
        route = route_id("sess", a.id, "c1")
        assert s.take_actions() == [
            RouteCall(a.id, "c1", route, "librarian", "lookup", {"q": 1}),
            ArmTimer(a.id, "c1", AGENT_TIMEOUT_MS / 1000),
        ]
        s.call_routed(a.id, "c1", True)
        assert frames(s) == []
        s.routed_result(a.id, "c1", "found it", "librarian")
        out = frames(s)
        assert out[0]["type"] == "stream.tool_result" and out[0]["from"] == "librarian"
        assert out[1]["type"] == "stream.step"
        s.routed_result(a.id, "c1", "again", "librarian")  # a second answer is dropped
        assert frames(s) == []

    def test_the_session_may_not_answer_a_call_routed_to_an_agent(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "lookup"))
        frames(s)
        result(s, a, "c1", id="r1")
        assert error(frames(s))["code"] == "call_forbidden"

    @pytest.mark.parametrize(("delivered", "code"), [(False, "unknown_agent"), (None, "backplane_unavailable")])
    def test_an_agent_nobody_holds_gives_the_model_an_error_result(self, delivered: bool | None, code: str) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "lookup"))
        frames(s)
        s.call_routed(a.id, "c1", delivered)
        out = frames(s)
        assert out[0]["error"] == code
        content = orjson.loads(out[0]["content"])
        assert content["error"] == code and "message" in content
        assert out[1]["type"] == "stream.step"  # the model reacts to it in the next step

    def test_no_answer_in_time_is_a_timeout_result(self) -> None:
        s = make_session()
        a = run(s, tools=[{**LOOKUP, "timeout_ms": 500}])
        call(s, a, ("c1", "lookup"))
        assert ArmTimer(a.id, "c1", 0.5) in s.take_actions()
        frames(s)
        s.call_timed_out(a.id, "c1")
        out = frames(s)
        assert out[0]["error"] == "timeout" and "500 ms" in orjson.loads(out[0]["content"])["message"]
        s.call_timed_out(a.id, "c1")  # a late timer changes nothing
        assert frames(s) == []

    def test_a_routed_answer_goes_to_the_backplane_and_its_verdict_answers(self) -> None:
        s = make_session()
        actions = feed(s, {"type": "tool_result", "id": "t1", "call": "rc_x", "content": [{"type": "text", "text": "hi"}]})
        (answer,) = actions
        assert isinstance(answer, AnswerCall) and orjson.loads(answer.encoded) == [{"type": "text", "text": "hi"}]
        for verdict, code in [("ok", None), ("same", None), ("different", "call_answered"),
                              ("forbidden", "call_forbidden"), ("unknown", "unknown_call"), ("down", "backplane_unavailable")]:
            s.call_answered(answer.msg, verdict)
            (frame,) = frames(s)
            assert frame.get("code") == code and frame["ref"] == "t1"


class TestApproval:
    def test_approved_then_answered(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "pay"), ("c2", "get_weather"))
        waiting = of(frames(s), "stream.waiting")[0]
        assert [c["wait"] for c in waiting["calls"]] == ["approval", "client"]
        assert s.take_actions() == []
        result(s, a, "c1", id="early")
        assert error(frames(s))["code"] == "approval_required"
        feed(s, {"type": "approve", "id": "ap", "stream": a.id, "call": "c1", "approved": True})
        out = frames(s)
        assert [f["type"] for f in out] == ["stream.waiting", "ok"]
        assert [c["wait"] for c in out[0]["calls"]] == ["client", "client"]
        result(s, a, "c1", "paid")
        result(s, a, "c2", "sun")
        assert of(frames(s), "stream.step")

    def test_a_denial_is_the_result(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "pay"))
        frames(s)
        feed(s, {"type": "approve", "id": "ap", "stream": a.id, "call": "c1", "approved": False, "reason": "too much"})
        out = frames(s)
        assert [f["type"] for f in out] == ["stream.tool_result", "stream.step", "ok"]
        assert out[0]["error"] == "denied"
        assert orjson.loads(out[0]["content"]) == {"error": "denied", "message": "the user denied this call", "reason": "too much"}

    def test_an_approved_agent_call_is_routed_then(self) -> None:
        s = make_session()
        a = run(s, tools=[{**LOOKUP, "approval": True}])
        call(s, a, ("c1", "lookup"))
        frames(s)
        assert s.take_actions() == []
        feed(s, {"type": "approve", "stream": a.id, "call": "c1", "approved": True})
        assert isinstance(s.take_actions()[0], RouteCall)

    def test_approve_bad_input(self) -> None:
        s = make_session()
        a = run(s)
        feed(s, {"type": "approve", "id": "x1", "stream": "nope", "call": "c1", "approved": True})
        assert error(frames(s))["code"] == "unknown_stream"
        feed(s, {"type": "approve", "id": "x2", "stream": a.id, "call": "c1", "approved": True})
        assert error(frames(s))["code"] == "not_waiting"  # running: nothing waits
        call(s, a, ("c1", "pay"), ("c2", "get_weather"))
        frames(s)
        feed(s, {"type": "approve", "id": "x3", "stream": a.id, "call": "c9", "approved": True})
        assert error(frames(s))["code"] == "unknown_call"
        feed(s, {"type": "approve", "id": "x4", "stream": a.id, "call": "c2", "approved": True})
        assert error(frames(s))["code"] == "not_waiting"  # needs no approval
        feed(s, {"type": "approve", "id": "x5", "stream": a.id, "call": "c1", "approved": True})
        frames(s)
        feed(s, {"type": "approve", "id": "x6", "stream": a.id, "call": "c1", "approved": True})
        assert of(frames(s), "ok")  # the same decision again: no second effect
        feed(s, {"type": "approve", "id": "x7", "stream": a.id, "call": "c1", "approved": False})
        assert error(frames(s))["code"] == "not_waiting"


class TestResultsBadInput:
    def test_unknown_stream_not_waiting_and_unknown_call(self) -> None:
        s = make_session()
        a = run(s)
        result(s, a, "c1", id="r0")
        assert error(frames(s))["code"] == "not_waiting"
        feed(s, {"type": "tool_result", "id": "r1", "stream": "nope", "call": "c1", "content": "x"})
        assert error(frames(s))["code"] == "unknown_stream"
        call(s, a, ("c1", "get_weather"))
        frames(s)
        result(s, a, "c9", id="r2")
        assert error(frames(s))["code"] == "unknown_call"

    def test_twice_for_one_call_same_is_ok_different_is_refused(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"), ("c2", "get_weather"))
        frames(s)
        result(s, a, "c1", "sun", id="r1")
        frames(s)
        result(s, a, "c1", "sun", id="r1")  # the same id: duplicate_request
        assert error(frames(s))["code"] == "duplicate_request"
        result(s, a, "c1", "sun", id="r2")  # another id, the same result: idempotent
        assert [f["type"] for f in frames(s)] == ["ok"]
        result(s, a, "c1", "rain", id="r3")
        assert error(frames(s))["code"] == "call_answered"
        result(s, a, "c2", "x")
        frames(s)
        result(s, a, "c1", "sun", id="r4")  # after the run went on too
        assert [f["type"] for f in frames(s)] == ["ok"]

    def test_content_is_checked(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"))
        frames(s)
        result(s, a, "c1", [{"type": "image", "url": "file:///etc/passwd"}], id="r1")
        assert error(frames(s))["field"] == "content.0.url"
        result(s, a, "c1", [{"type": "reasoning", "text": "x"}], id="r2")
        assert error(frames(s))["code"] == "misplaced_content"

    @pytest.mark.parametrize(
        ("tool", "field", "code"),
        [
            ({"name": "t", "agent": "bad name!"}, "tools.0.agent", "bad_name"),
            ({"name": "t", "agent": "ok"}, "tools.0.agent", "bad_message"),
            ({"name": "t", "approval": True}, "tools.0.approval", "bad_message"),
        ],
    )
    def test_run_tools_are_checked(self, tool: dict[str, Any], field: str, code: str) -> None:
        s = make_session()
        steps = {"max_steps": 2} if code == "bad_name" else {}
        feed(s, {"type": "generate", "id": "g", "messages": HI, "tools": [tool], **steps})
        err = error(frames(s))
        assert (err["code"], err["field"]) == (code, field)


class TestEndsInAWait:
    @pytest.mark.parametrize("wait", ["client", "agent", "approval"])
    def test_cancel_in_every_wait_ends_the_run_at_once(self, wait: str) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", {"client": "get_weather", "agent": "lookup", "approval": "pay"}[wait]), text="Hm.")
        s.take_actions()
        frames(s)
        actions = feed(s, {"type": "cancel", "id": "c", "stream": a.id})
        assert actions == [StopGeneration(a.id)]
        out = frames(s)
        assert [f["type"] for f in out] == ["stream.end", "ok"]
        end = out[0]
        assert end["reason"] == "cancelled" and end["usage"] == {"input_tokens": 10, "output_tokens": 5}
        assert end["message"]["tool_calls"][0]["id"] == "c1"
        tool = end["messages"][-1]
        assert tool["role"] == "tool" and orjson.loads(tool["content"])["error"] == "cancelled"
        # what was waiting has no more effect
        s.call_timed_out(a.id, "c1")
        s.routed_result(a.id, "c1", "late", "librarian")
        assert frames(s) == [] and s.take_actions() == []
        result(s, a, "c1", id="late")
        assert error(frames(s))["code"] == "not_waiting"

    def test_interrupt_in_a_wait_continues_from_a_valid_conversation(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"), ("c2", "pay"))
        result(s, a, "c1", "sun")
        frames(s)
        actions = feed(s, {"type": "interrupt", "id": "i", "stream": a.id, "input": "never mind"})
        assert actions[0] == StopGeneration(a.id) and isinstance(actions[1], StartGeneration)
        steered = actions[1].stream
        roles = [(m.role, m.tool_call_id) for m in steered.messages]
        assert roles == [("user", None), ("assistant", None), ("tool", "c1"), ("tool", "c2"), ("user", None)]
        assert orjson.loads(steered.messages[3].content)["error"] == "interrupted"  # type: ignore[arg-type]
        assert steered.run is not None and steered.run.max_steps == 3

    def test_expiry_says_so(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"))
        frames(s)
        s.close("error", ("expired", "the session expired while a run waited for tool results"))
        (end,) = of(frames(s), "stream.end")
        assert end["error"]["code"] == "expired" and "waited" in end["error"]["message"]
        assert orjson.loads(end["messages"][-1]["content"])["error"] == "expired"

    def test_a_handover_keeps_waiting_runs(self) -> None:
        s = make_session()
        a = run(s)
        b = start(s)
        call(s, a, ("c1", "get_weather"))
        frames(s)
        assert s.close("error", ("shutdown", "x"), keep_waiting=True) == [StopGeneration(b.id)]
        assert a.state is StreamState.WAITING


class TestSnapshot:
    def test_a_waiting_run_shows_its_pending_calls_and_every_step(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"), text="One.")
        result(s, a, "c1", "x")
        s.take_actions()
        s.stream_delta(a, " Two.", 1)
        call(s, a, ("c2", "pay"))
        frames(s)
        s.snapshot()
        (snap,) = of(frames(s), "stream.snapshot")
        assert snap["text"] == "One. Two." and snap["step"] == 2
        assert [c["call"] for c in snap["calls"]] == ["c1", "c2"]
        assert snap["waiting"] == [{"id": "c2", "name": "pay", "arguments": {"q": 1}, "wait": "approval"}]


class TestState:
    def test_a_run_survives_its_state_as_json(self) -> None:
        s = make_session()
        a = run(s)
        call(s, a, ("c1", "get_weather"), ("c2", "pay"))
        result(s, a, "c1", [{"type": "text", "text": "sun"}])
        feed(s, {"type": "approve", "stream": a.id, "call": "c2", "approved": True})
        assert a.run is not None
        again = Run.from_state(orjson.loads(orjson.dumps(a.run.state())))
        assert again.state() == a.run.state()
        assert [c.wait for c in again.waiting_calls()] == ["client"]


class TestThreads:
    said: list[dict[str, Any]]

    def chat(self, s: Session, text: str, on_busy: str, **fields: Any) -> list[Any]:
        """The user's words so far, as a chat page sends them (it has no answer yet)."""
        if text == "one":
            self.said = list(HI)
        self.said.append({"role": "user", "content": text})
        return feed(s, {"type": "generate", "id": text, "messages": self.said, "thread": "t", "on_busy": on_busy, **fields})

    def test_reject_answers_busy(self) -> None:
        s = make_session()
        first = self.chat(s, "one", "reject")[0].stream
        frames(s)
        assert self.chat(s, "two", "reject") == []
        err = error(frames(s))
        assert (err["code"], err["stream"]) == ("busy", first.id)

    def test_parallel_runs_both(self) -> None:
        s = make_session()
        self.chat(s, "one", "parallel")
        assert isinstance(self.chat(s, "two", "parallel")[0], StartGeneration)

    def test_queue_starts_after_the_running_one_with_its_answer(self) -> None:
        s = make_session()
        first = self.chat(s, "one", "queue")[0].stream
        assert self.chat(s, "two", "queue") == []
        start_frame = of(frames(s), "stream.start")[-1]
        assert start_frame["queued_after"] == first.id and start_frame["thread"] == "t"
        second = s.streams[start_frame["stream"]]
        assert second.state is StreamState.QUEUED
        s.stream_delta(first, "Answer one.", 2)
        s.step_end(first, "complete")
        assert s.take_actions() == [StartGeneration(second)]
        assert [(m.role, m.content) for m in second.messages] == [
            ("user", "hi"), ("user", "one"), ("assistant", "Answer one."), ("user", "two")
        ]

    def test_interrupt_steers_from_the_running_one(self) -> None:
        s = make_session()
        first = self.chat(s, "one", "interrupt")[0].stream
        s.stream_delta(first, "Half", 1)
        actions = self.chat(s, "two", "interrupt")
        assert actions[0] == StopGeneration(first.id)
        second = actions[1].stream
        assert second.steered_from == first.id and first.reason == "interrupted"
        assert [m.content for m in second.messages] == ["hi", "one", "Half", "two"]

    def test_a_client_that_sent_the_answer_itself_is_taken_as_sent(self) -> None:
        s = make_session()
        first = self.chat(s, "one", "interrupt")[0].stream
        s.stream_delta(first, "Half", 1)
        mine = [*HI, {"role": "user", "content": "one"}, {"role": "assistant", "content": "Ha"}, {"role": "user", "content": "x"}]
        actions = feed(s, {"type": "generate", "messages": mine, "thread": "t", "on_busy": "interrupt"})
        assert [m.content for m in actions[1].stream.messages] == ["hi", "one", "Ha", "x"]

    def test_cancel_of_a_queued_stream_and_a_queue_behind_a_waiting_run(self) -> None:
        s = make_session()
        first = self.chat(s, "one", "queue", tools=[WEATHER], max_steps=2)[0].stream
        self.chat(s, "two", "queue")
        self.chat(s, "three", "queue")
        out = frames(s)
        two, three = (f["stream"] for f in of(out, "stream.start")[1:])
        assert of(out, "stream.start")[2]["queued_after"] == two
        call(s, first, ("c1", "get_weather"))
        assert s.streams[two].state is StreamState.QUEUED  # a waiting run keeps its thread busy
        feed(s, {"type": "cancel", "stream": two})
        assert of(frames(s), "stream.end")[0]["reason"] == "cancelled"
        assert s.take_actions() == [StartGeneration(s.streams[three])]  # it waited behind two

    def test_on_busy_needs_a_thread(self) -> None:
        s = make_session()
        feed(s, {"type": "generate", "id": "g", "messages": HI, "on_busy": "queue"})
        assert error(frames(s))["field"] == "on_busy"
