"""The HTTP layer in-process, over a scripted engine that emits chosen harmony tokens.

A random-weight model cannot be relied on to call a tool or to reason, so these tests drive the
real app, AsyncEngine, output parsing and API shapes with an engine stand-in that "generates" a
fixed token script (a harmony-encoded tool call, reasoning then an answer, ...). The end-to-end
tests against the real model live in test_server_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from openai_harmony import Message, Role  # noqa: E402

from gptoss.engine.engine import EngineStats, RequestError, StepOutput, TokenLogprob  # noqa: E402
from gptoss.engine.sequence import Sequence, Status  # noqa: E402
from gptoss.server import create_app  # noqa: E402
from gptoss.server.async_engine import AsyncEngine  # noqa: E402
from gptoss.server.errors import APIError, parse_body  # noqa: E402
from gptoss.server.metrics import ServerMetrics  # noqa: E402
from gptoss.server.protocol import ChatCompletionRequest, ResponsesRequest  # noqa: E402
from gptoss.server.state import ServerState  # noqa: E402
from gptoss.tokenizer import harmony_encoding, tiktoken_encoding  # noqa: E402

RETURN, CALL = 200002, 200012
MODEL = "scripted"


def assistant_tokens(*messages: Message) -> list[int]:
    """What a model writes after the prompt's `<|start|>assistant`: the rendered messages, minus
    that first header, each later one starting with `<|start|>assistant`."""
    encoding = harmony_encoding()
    tokens: list[int] = []
    for message in messages:
        tokens += encoding.render(message)
    return tokens[2:]


def analysis(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis")


def final(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final")


def tool_call(name: str, arguments: dict) -> Message:
    return (Message.from_role_and_content(Role.ASSISTANT, json.dumps(arguments)).with_channel("commentary")
            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))


def with_stop(tokens: list[int], stop: int) -> list[int]:
    """Harmony renders a message with <|end|> (a tool call with <|call|>); a turn ends with
    <|return|> or <|call|>."""
    assert tokens[-1] in (200007, stop)
    return tokens[:-1] + [stop]


REASON_THEN_ANSWER = with_stop(assistant_tokens(analysis("Let me think."), final("Hello there!")), RETURN)
TOOL_CALL = with_stop(assistant_tokens(analysis("Need the weather."), tool_call("get_weather", {"city": "Paris"})),
                      CALL)


class ScriptedEngine:
    """Stands in for LLMEngine: each request emits `script` one token per step (then filler)."""

    def __init__(self, script: list[int], *, max_num_seqs: int = 4, context_length: int = 4096):
        self.script = list(script)
        self.filler = tiktoken_encoding().encode(" more")[0]
        self.max_num_seqs = max_num_seqs
        self.context_length = self.kv_cache_tokens = context_length
        self.stats = EngineStats(max_num_seqs=max_num_seqs)
        self.running: dict[str, Sequence] = {}
        self.aborted: list[str] = []
        self.seen: set[tuple] = set()
        self.fail_next = False
        self.step_delay = 0.0
        self.lock = threading.Lock()

    def add_request(self, prompt_token_ids, params, request_id="", constraint=None):
        if len(prompt_token_ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens; this server holds at most "
                               f"{self.context_length} tokens per request")
        room = self.context_length - len(prompt_token_ids)
        seq = Sequence(list(prompt_token_ids), params, request_id=request_id,
                       stop_token_ids=params.stop_token_set(), max_tokens=min(params.max_tokens or room, room))
        seq.status = Status.RUNNING
        if tuple(prompt_token_ids) in self.seen:  # like the prefix cache: complete pages, one token left
            seq.num_cached_prompt_tokens = (len(prompt_token_ids) - 1) // 16 * 16
        self.seen.add(tuple(prompt_token_ids))
        self.running[request_id] = seq
        return seq

    def step(self):
        time.sleep(self.step_delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated device failure")
        batch = list(self.running.values())[: self.max_num_seqs]
        outputs = []
        for seq in batch:
            i = len(seq.output_token_ids)
            token = self.script[i] if i < len(self.script) else self.filler
            seq.append_token(token)
            logprob = TokenLogprob(token, -0.25, [(token, -0.25), (self.filler, -2.0)]) if seq.params.logprobs else None
            outputs.append(StepOutput(seq.request_id, token, seq.is_finished, seq.finish_reason, logprob,
                                      len(seq.prompt_token_ids), seq.num_cached_prompt_tokens,
                                      len(seq.output_token_ids)))
            if seq.is_finished:
                del self.running[seq.request_id]
        self.stats = dataclasses.replace(self.stats, last_batch_size=len(batch), kv_usage=self.kv_usage())
        return outputs

    def abort(self, request_id):
        seq = self.running.pop(request_id, None)
        if seq is not None:
            seq.finish("abort")
            self.aborted.append(request_id)
        return seq

    def has_unfinished(self):
        return bool(self.running)

    def kv_usage(self):
        return len(self.running) / 100


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine(REASON_THEN_ANSWER)
    state = ServerState(AsyncEngine(engine, max_queue=2, metrics=ServerMetrics()), harmony_encoding(),
                        tiktoken_encoding(), MODEL)
    with TestClient(create_app(state)) as client:
        client.engine = engine
        yield client


@pytest.fixture
def client(scripted):
    scripted.engine.script = list(REASON_THEN_ANSWER)
    scripted.engine.step_delay = 0.0
    yield scripted
    deadline = time.time() + 5
    while scripted.engine.running and time.time() < deadline:  # let aborted requests drain
        time.sleep(0.01)


def chat(client, **body):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
    return client.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
        events.append((name, data))
    return events


# -- chat completions ---------------------------------------------------------------------------------

def test_chat_separates_reasoning_from_the_answer(client):
    r = chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["content"] == "Hello there!"
    assert message["reasoning_content"] == "Let me think."
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(REASON_THEN_ANSWER)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    again = chat(client, messages=[{"role": "user", "content": "Hi"}]).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == (usage["prompt_tokens"] - 1) // 16 * 16 > 0


def test_chat_tool_call_maps_to_the_api_shape(client):
    client.engine.script = list(TOOL_CALL)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    r = chat(client, tools=tools, tool_choice="auto")
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["reasoning_content"] == "Need the weather."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_chat_tool_call_streams_as_tool_call_deltas(client):
    client.engine.script = list(TOOL_CALL)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = chat(client, tools=tools, stream=True)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all(c["index"] == 0 for c in calls) and all("id" not in c for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    assert reasoning == "Need the weather."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    whole = chat(client).json()
    r = chat(client, stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(data) for _, data in sse_events(r.text)[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert all("usage" in c for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(REASON_THEN_ANSWER)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("stop") == 1


def test_chat_renders_tool_history_and_logprobs(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = chat(client, messages=messages, tools=tools, logprobs=True, top_logprobs=2, n=2, seed=7,
             reasoning_effort="low")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][0]["logprobs"]["content"]
    # The reasoning's and the answer's tokens, never harmony's headers or special tokens.
    assert "".join(entry["token"] for entry in content) == "Let me think." + "Hello there!"
    assert not any(entry["token"].startswith("<|") or entry["token"] in ("analysis", "final") for entry in content)
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)
    assert body["usage"]["completion_tokens"] == 2 * len(REASON_THEN_ANSWER)
    r = chat(client, messages=messages, tools=tools, logprobs=True, top_logprobs=2, stream=True)
    chunks = [json.loads(data) for _, data in sse_events(r.text)[:-1]]
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == content


def test_chat_stop_string_ends_the_answer(client):
    r = chat(client, stop=["there"])
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Hello "
    assert choice["finish_reason"] == "stop"


def test_chat_response_formats(client):
    ok = chat(client, response_format={"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": {"type": "object"}}})
    assert ok.status_code == 200, ok.text
    assert chat(client, response_format={"type": "json_object"}).status_code == 200
    missing = chat(client, response_format={"type": "json_schema"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "response_format.json_schema"
    bad = chat(client, response_format={"type": "xml"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.type"


# -- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": [{"role": "user",
                                    "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type"),
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_chat_bad_requests(client, body, status, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_and_non_objects(client):
    for raw in (b"{not json", b"[1, 2]", b"", b"null"):
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_context(client):
    r = chat(client, messages=[{"role": "user", "content": "word " * 5000}])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"


def test_validation_error_names_nested_fields():
    with pytest.raises(APIError) as info:
        parse_body(b'{"model": "m", "input": [{"type": "function_call", "name": "f"}]}', ResponsesRequest)
    assert info.value.param == "input[0].call_id"
    with pytest.raises(APIError) as info:
        parse_body(b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', ChatCompletionRequest)
    assert info.value.param == "messages[0].content"


# -- capacity and aborts -------------------------------------------------------------------------------

def test_over_capacity_requests_get_429_and_others_finish(client):
    engine = client.engine
    engine.step_delay = 0.02
    limit = engine.max_num_seqs + 2  # max_queue=2
    statuses: list[int] = []
    retry_after: list[str | None] = []

    def one():
        r = chat(client, max_tokens=20, ignore_eos=True)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry_after.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=one) for _ in range(limit + 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(429) >= 1
    assert statuses.count(200) >= limit - 1
    assert set(statuses) <= {200, 429}
    assert retry_after and all(value == "1" for value in retry_after)  # clients know when to come back
    r = chat(client)  # still serving
    assert r.status_code == 200


def test_more_choices_than_the_server_holds_is_a_400(client):
    r = chat(client, n=50)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_an_engine_failure_fails_its_requests_but_not_the_server(client):
    client.engine.fail_next = True
    r = chat(client)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    client.engine.running.clear()  # what the failed step held
    assert chat(client).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_stream_disconnect_aborts_the_request(client):
    engine = client.engine
    engine.step_delay = 0.01
    before = len(engine.aborted)
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                             "stream": True, "max_tokens": 100000, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 5
    while len(engine.aborted) == before and time.time() < deadline:
        time.sleep(0.02)
    assert len(engine.aborted) == before + 1
    assert not engine.running


def test_async_engine_generate_aborts_when_closed_early():
    import asyncio

    from gptoss.sampling import SamplingParams

    engine = ScriptedEngine(REASON_THEN_ANSWER)
    engine.step_delay = 0.005

    async def main():
        async_engine = AsyncEngine(engine, max_queue=0)
        async_engine.start()
        try:
            seen = []
            stream = async_engine.generate([1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True), "r1")
            async for out in stream:
                seen.append(out.token_id)
                if len(seen) == 3:
                    break
            await stream.aclose()
            for _ in range(100):
                if engine.aborted:
                    break
                await asyncio.sleep(0.01)
            assert engine.aborted == ["r1"] and async_engine.num_active == 0
            full = [out.token_id async for out in async_engine.generate([1], SamplingParams(), "r2")]
            assert full == REASON_THEN_ANSWER
        finally:
            await async_engine.stop()

    asyncio.run(main())


# -- responses -----------------------------------------------------------------------------------------

def test_responses_items_and_previous_response(client):
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "instructions": "Be brief.",
                                           "reasoning": {"effort": "high"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["status"] == "completed"
    kinds = [item["type"] for item in body["output"]]
    assert kinds == ["reasoning", "message"]
    assert body["output"][0]["content"][0]["text"] == "Let me think."
    assert body["output"][1]["content"][0]["text"] == "Hello there!"
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    follow = client.post("/v1/responses", json={"model": MODEL, "input": "And then?",
                                                "previous_response_id": body["id"]})
    assert follow.status_code == 200
    assert follow.json()["previous_response_id"] == body["id"]
    assert client.get(f"/v1/responses/{body['id']}").json()["id"] == body["id"]
    missing = client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_no"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "previous_response_id"


def test_responses_function_call_round_trip(client):
    client.engine.script = list(TOOL_CALL)
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Weather?", "tools": tools})
    body = r.json()
    call = body["output"][-1]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    client.engine.script = list(REASON_THEN_ANSWER)
    items = [{"type": "function_call_output", "call_id": call["call_id"], "output": "{\"temp\": 21}"}]
    r2 = client.post("/v1/responses", json={"model": MODEL, "input": items, "tools": tools,
                                            "previous_response_id": body["id"]})
    assert r2.status_code == 200, r2.text
    # The same without a stored response: the whole history as items.
    history = [{"role": "user", "content": "Weather?"}, call, items[0]]
    r3 = client.post("/v1/responses", json={"model": MODEL, "input": history, "tools": tools, "store": False})
    assert r3.status_code == 200, r3.text
    assert client.get(f"/v1/responses/{r3.json()['id']}").status_code == 404


def test_responses_stream_event_sequence(client):
    client.engine.script = list(TOOL_CALL)
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Weather?", "tools": tools, "stream": True})
    events = sse_events(r.text)
    names = [name for name, _ in events]
    datas = [json.loads(data) for _, data in events]
    assert all(d["type"] == n for n, d in zip(names, datas))
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    compact = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert compact == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = datas[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "function_call"]
    args = "".join(d["delta"] for d in datas if d["type"] == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"} == json.loads(final["output"][1]["arguments"])


def test_responses_text_stream_and_incomplete(client):
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    names = [name for name, _ in sse_events(r.text)]
    assert "response.output_text.delta" in names and names[-1] == "response.completed"
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 3})
    body = r.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": MODEL, "input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"model": MODEL, "input": "x", "background": True, "stream": True}, "stream"),
    ({"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.name"),
    ({"model": MODEL, "input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ({"model": MODEL, "input": []}, "input"),
])
def test_responses_bad_requests(client, body, param):
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- completions ---------------------------------------------------------------------------------------

def test_completions_raw_text(client):
    client.engine.script = tiktoken_encoding().encode(" the end")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Once", "Twice"], "max_tokens": 2,
                                             "echo": True, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == ["Once the end"] * 2 + ["Twice the end"] * 2
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 1})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" the", " end"] and logprobs["text_offset"] == [0, 4]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
    events = sse_events(r.text)
    texts = [json.loads(d)["choices"][0]["text"] for _, d in events[:-1]]
    assert "".join(texts) == " the end" and events[-1][1] == "[DONE]"


def test_completions_bad_requests(client):
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "suffix": "y"}).status_code == 400
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": ""}).status_code == 400
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", ""]}).json()["error"]["param"] \
        == "prompt[1]"
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "best_of": 3}).status_code \
        == 400


# -- the rest --------------------------------------------------------------------------------------------

def test_models_health_metrics(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").status_code == 200
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    chat(client)
    text = client.get("/metrics").text
    for name in ("gptoss_requests_total", "gptoss_generation_tokens_total", "gptoss_prompt_tokens_total",
                 "gptoss_batch_size", "gptoss_kv_cache_usage_ratio", "gptoss_time_to_first_token_seconds_count"):
        assert name in text
    assert 'gptoss_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_api_key_is_enforced():
    engine = ScriptedEngine(REASON_THEN_ANSWER)
    state = ServerState(AsyncEngine(engine), harmony_encoding(), tiktoken_encoding(), MODEL, api_key="sekret")
    with TestClient(create_app(state)) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        assert c.post("/v1/chat/completions", json=body).status_code == 401
        wrong = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert right.status_code == 200
        assert c.get("/health").status_code == 200  # health and metrics stay open


# -- limits on what one request may ask ---------------------------------------------------------------

def test_a_body_over_the_limit_gets_413_before_parsing(client):
    from gptoss.server.app import MAX_BODY_BYTES

    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a" * MAX_BODY_BYTES}]})
    r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: counted as it arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536].encode()

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert chat(client).status_code == 200  # still serving


def test_too_many_stop_strings_are_refused(client):
    r = chat(client, stop=[f"s{i}" for i in range(10_000)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert "at most 32" in r.json()["error"]["message"]
    assert chat(client, stop=["a", "b", "c", "d"]).status_code == 200


def test_health_answers_while_a_large_request_is_rendered(client):
    """Rendering runs off the event loop: a ~1 MB prompt, or 10,000 stop strings, do not stall /health."""
    done = threading.Event()
    statuses = []

    def big():  # rendered in full, then refused for length by the 4096-token stand-in engine
        r = chat(client, messages=[{"role": "user", "content": "a" * 1_000_000}], max_tokens=1)
        statuses.append((r.status_code, r.json()["error"]["code"]))
        r = chat(client, stop=[f"stop-{i}" for i in range(10_000)])
        statuses.append((r.status_code, r.json()["error"]["param"]))
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    worst = 0.0
    while not done.is_set():
        start = time.perf_counter()
        assert client.get("/health").status_code == 200
        worst = max(worst, time.perf_counter() - start)
        time.sleep(0.01)
    thread.join()
    assert statuses == [(400, "context_length_exceeded"), (400, "stop")]
    assert worst < 0.2, f"/health took {worst:.3f} s"


# -- compatibility with what other servers' clients send ------------------------------------------------

def test_unknown_top_level_fields_are_ignored_unless_strict(client, caplog):
    with caplog.at_level("WARNING", logger="gptoss.server"):
        r = chat(client, session_id="abc", request_id="r-1")
    assert r.status_code == 200
    assert "session_id" in caplog.text and "request_id" in caplog.text
    r = chat(client, messages=[{"role": "user", "content": "Hi"}], temperature="hot", session_id="x")
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"  # other errors still count

    engine = ScriptedEngine(REASON_THEN_ANSWER)
    state = ServerState(AsyncEngine(engine, max_queue=2, metrics=ServerMetrics()), harmony_encoding(),
                        tiktoken_encoding(), MODEL, strict_params=True)
    with TestClient(create_app(state)) as strict:
        r = chat(strict, session_id="abc")
        assert r.status_code == 400 and r.json()["error"]["param"] == "session_id"


def test_reasoning_also_comes_as_reasoning(client):
    message = chat(client).json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "Let me think."
    events = sse_events(chat(client, stream=True).text)
    deltas = [json.loads(data)["choices"][0]["delta"] for _, data in events if data != "[DONE]"
              and json.loads(data)["choices"]]
    pieces = [d for d in deltas if "reasoning_content" in d]
    assert pieces and all(d["reasoning"] == d["reasoning_content"] for d in pieces)


def test_responses_take_a_top_level_reasoning_effort_and_check_previous_ids(client):
    body = {"model": MODEL, "input": "Hi", "reasoning_effort": "low"}
    assert client.post("/v1/responses", json=body).status_code == 200
    r = client.post("/v1/responses", json={**body, "previous_response_id": "not an id"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    r = client.post("/v1/responses", json={**body, "previous_response_id": "resp_doesnotexist"})
    assert r.status_code == 404


def test_model_card_has_root(client):
    card = client.get(f"/v1/models/{MODEL}").json()
    assert "root" in card and card["id"] == MODEL


@pytest.mark.parametrize("kind", ["web_search", "code_interpreter", "mcp"])
def test_built_in_tool_types_are_refused_by_name(client, kind):
    for path, body in (("/v1/responses", {"model": MODEL, "input": "Hi", "tools": [{"type": kind}]}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                 "tools": [{"type": kind}]})):
        error = client.post(path, json=body).json()["error"]
        assert error["code"] == "unsupported_tool_type" and error["param"] == "tools[0].type"
        assert kind in error["message"] and "not supported" in error["message"]


def test_a_turn_with_an_empty_answer_still_has_a_message_item(client):
    client.engine.script = with_stop(assistant_tokens(analysis("Nothing to add.")), RETURN)
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi"}).json()
    assert [item["type"] for item in r["output"]] == ["reasoning", "message"]
    assert r["output"][1]["content"][0]["text"] == ""
    events = sse_events(client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True}).text)
    done = [json.loads(data) for name, data in events if name == "response.completed"][0]["response"]
    assert done["output"][-1]["type"] == "message"


def test_completions_stream_ends_with_the_last_token_and_its_logprobs(client):
    client.engine.script = tiktoken_encoding().encode(" the end")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True,
                                             "logprobs": 1})
    chunks = [json.loads(d)["choices"][0] for _, d in sse_events(r.text)[:-1]]
    assert [c["text"] for c in chunks] == [" the", " end"]  # no extra empty chunk
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["logprobs"]["tokens"] == [" end"]
    assert all(c["logprobs"] is not None for c in chunks)


# -- background responses ------------------------------------------------------------------------------

def test_background_response_is_polled_to_completion(client):
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "background": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["background"] is True and body["status"] == "in_progress" and body["output"] == []
    deadline = time.time() + 10
    while body["status"] == "in_progress":
        assert time.time() < deadline
        time.sleep(0.02)
        body = client.get(f"/v1/responses/{body['id']}").json()
    assert body["status"] == "completed" and body["background"] is True
    assert body["output"][-1]["content"][0]["text"] == "Hello there!"
    # Finished already: cancel returns it as it is.
    assert client.post(f"/v1/responses/{body['id']}/cancel").json()["status"] == "completed"


def test_background_response_can_be_cancelled(client):
    engine = client.engine
    engine.step_delay = 0.02
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "background": True,
                                           "max_output_tokens": 400, "ignore_eos": True})
    response_id = r.json()["id"]
    time.sleep(0.1)
    cancelled = client.post(f"/v1/responses/{response_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    time.sleep(0.2)
    assert client.get(f"/v1/responses/{response_id}").json()["status"] == "cancelled"
    assert response_id in engine.aborted


def test_background_needs_store_and_only_background_responses_cancel(client):
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "background": True, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "store"
    done = client.post("/v1/responses", json={"model": MODEL, "input": "Hi"}).json()
    r = client.post(f"/v1/responses/{done['id']}/cancel")
    assert r.status_code == 400
    assert client.post("/v1/responses/resp_nothing/cancel").status_code == 404
