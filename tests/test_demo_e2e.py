"""End to end on the real demo model: `gptoss serve` with no model path (so it serves the demo
model that ships with gptoss) as a subprocess on a free loopback port, driven by the official
openai client through every harmony path the demo model knows: reasoning then an answer
(arithmetic), a tool call then an answer from its result (Chat Completions and Responses,
streamed and not), and the fixed refusal.

Greedy decoding everywhere, so the answers are the model's own and checked for content.
GPTOSS_DEMO_E2E_MODEL=FOLDER serves another model folder instead (e.g. an interim export
of a demo training run).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from serving import serving

from gptoss.demo import ARCHIVE
from gptoss.demo.data import REFUSAL, TOOLS, tool_schema

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "gpt-oss-demo"
KEY = "demo-key"
STARTUP_TIMEOUT = 300  # the first start may unpack the model and build the CPU kernels
SAMPLING = dict(temperature=0, max_tokens=256)


def demo_tool(kind: str, name: str, params: dict[str, str]) -> dict:
    """A Chat Completions tool of one of the demo's families (its description as in training)."""
    description = next(t.description for t in TOOLS if t.kind == kind)
    return tool_schema(name, description, list(params), list(params.values()))


def responses_tool(chat_tool: dict) -> dict:
    return {"type": "function", **chat_tool["function"]}


WEATHER = SimpleNamespace(question="What's the weather in Lisbon?",
                          tool=demo_tool("weather", "get_weather", {"location": "string"}),
                          name="get_weather", arguments={"location": "Lisbon"},
                          result='{"temperature": 18, "condition": "sunny"}', expected=("18", "sunny"))
CONVERT = SimpleNamespace(question="Convert 12 miles to km",
                          tool=demo_tool("convert", "convert",
                                         {"value": "number", "from_unit": "string", "to_unit": "string"}),
                          name="convert", arguments={"value": 12, "from_unit": "miles", "to_unit": "km"},
                          result='{"value": 19.31}', expected=("19.31",))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = os.environ.get("GPTOSS_DEMO_E2E_MODEL")
    if model:
        source = [model, "--served-model-name", MODEL]
    elif ARCHIVE.exists():
        source = []  # no path: `gptoss serve` serves the demo model, named gpt-oss-demo
    else:
        pytest.skip(f"this install has no demo model ({ARCHIVE.name}); set GPTOSS_DEMO_E2E_MODEL to a model folder")
    log_path = tmp_path_factory.mktemp("demo-serve") / "server.log"
    with serving([*source, "--api-key", KEY, "--kv-cache-size", "16384", "--log-level", "warning"], log_path,
                 STARTUP_TIMEOUT) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in c.models.list().data] == [MODEL]
    return c


# -- helpers ---------------------------------------------------------------------------------------

def chat(client, messages: list[dict], tools: list[dict] | None = None, **kwargs):
    extra = {"tools": tools} if tools else {}
    return client.chat.completions.create(model=MODEL, messages=messages, **extra, **SAMPLING, **kwargs)


def chat_stream(client, messages: list[dict], tools: list[dict] | None = None) -> SimpleNamespace:
    """A streamed chat answer put back together: content, reasoning, tool calls, finish reason,
    and the order in which the kinds of deltas arrived."""
    out = SimpleNamespace(content="", reasoning="", calls={}, finish_reason=None, order=[])
    for chunk in chat(client, messages, tools, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning = (delta.model_extra or {}).get("reasoning_content")
            if reasoning:
                out.reasoning += reasoning
                out.order.append("reasoning")
            if delta.content:
                out.content += delta.content
                out.order.append("content")
            for call in delta.tool_calls or []:
                entry = out.calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
                out.order.append("tool_call")
            out.finish_reason = choice.finish_reason or out.finish_reason
    out.calls = [out.calls[i] for i in sorted(out.calls)]
    return out


def tool_turns(question: str, call_id: str, name: str, arguments: str, result: str) -> list[dict]:
    """The conversation a client sends back after running a tool: the question, the assistant's
    call (content None, no reasoning, as Chat Completions clients send it), the tool's result."""
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result}]


def assert_mentions(text: str, expected) -> None:
    for value in expected:
        assert value in text, f"{value!r} not in {text!r}"


# -- chat completions --------------------------------------------------------------------------------

def test_chat_arithmetic_reasons_then_answers(client):
    r = chat(client, [{"role": "user", "content": "What is 482 + 391?"}])
    message = r.choices[0].message
    assert "873" in message.content
    assert message.model_extra.get("reasoning_content"), "no reasoning came back"
    assert r.choices[0].finish_reason == "stop" and not message.tool_calls


def test_chat_arithmetic_streamed(client):
    out = chat_stream(client, [{"role": "user", "content": "What is 482 + 391?"}])
    assert "873" in out.content and out.reasoning
    assert out.order.index("content") > len(out.order) - 1 - out.order[::-1].index("reasoning"), \
        "reasoning deltas must all come before the content deltas"
    assert out.finish_reason == "stop" and not out.calls


@pytest.mark.parametrize("case", [WEATHER, CONVERT], ids=["weather", "convert"])
def test_chat_tool_call_then_answer(client, case):
    r = chat(client, [{"role": "user", "content": case.question}], tools=[case.tool])
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.id and call.function.name == case.name
    assert json.loads(call.function.arguments) == case.arguments
    history = tool_turns(case.question, call.id, call.function.name, call.function.arguments, case.result)
    r = chat(client, history, tools=[case.tool])
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert_mentions(r.choices[0].message.content, case.expected)


def test_chat_tool_call_streamed(client):
    out = chat_stream(client, [{"role": "user", "content": WEATHER.question}], tools=[WEATHER.tool])
    assert out.finish_reason == "tool_calls" and not out.content
    (call,) = out.calls
    assert call["id"] and call["name"] == WEATHER.name and json.loads(call["arguments"]) == WEATHER.arguments
    history = tool_turns(WEATHER.question, call["id"], call["name"], call["arguments"], WEATHER.result)
    answer = chat_stream(client, history, tools=[WEATHER.tool])
    assert answer.finish_reason == "stop" and not answer.calls
    assert_mentions(answer.content, WEATHER.expected)


def test_off_topic_gets_the_refusal(client):
    r = chat(client, [{"role": "user", "content": "Can you recommend a good book about gardening?"}])
    assert r.choices[0].message.content == REFUSAL
    assert r.choices[0].finish_reason == "stop"


# -- responses -------------------------------------------------------------------------------------

def respond(client, input, **kwargs):
    return client.responses.create(model=MODEL, input=input, tools=[responses_tool(WEATHER.tool)], temperature=0,
                                   max_output_tokens=SAMPLING["max_tokens"], **kwargs)


def function_call_output(call) -> dict:
    return {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER.result}


def test_responses_function_call_round_trip(client):
    question = [{"role": "user", "content": WEATHER.question}]
    first = respond(client, question)
    assert first.status == "completed"
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == WEATHER.name and call.call_id and json.loads(call.arguments) == WEATHER.arguments
    # The whole conversation sent again, as a stateless client does.
    whole = respond(client, question + [call.model_dump(exclude_none=True), function_call_output(call)])
    assert whole.status == "completed"
    assert_mentions(whole.output_text, WEATHER.expected)
    # Or only the tool's result, continuing the stored response.
    continued = respond(client, [function_call_output(call)], previous_response_id=first.id)
    assert continued.status == "completed" and continued.previous_response_id == first.id
    assert_mentions(continued.output_text, WEATHER.expected)


def test_responses_function_call_streamed(client):
    events = list(respond(client, [{"role": "user", "content": WEATHER.question}], stream=True))
    assert events[-1].type == "response.completed"
    (added,) = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert added.item.name == WEATHER.name
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                     and e.output_index == added.output_index)
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == deltas and json.loads(deltas) == WEATHER.arguments
    final = events[-1].response
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.call_id == added.item.call_id and call.arguments == deltas
    follow = list(respond(client, [function_call_output(call)], previous_response_id=final.id, stream=True))
    assert follow[-1].type == "response.completed"
    text = "".join(e.delta for e in follow if e.type == "response.output_text.delta")
    assert_mentions(text, WEATHER.expected)
    assert text == follow[-1].response.output_text
