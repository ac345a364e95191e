"""End to end: `gptoss serve` as a subprocess on a free loopback port, driven by the official
openai client (and raw HTTP for errors and SSE framing), on a random tiny checkpoint.

A random model writes gibberish (often not even valid harmony), so these tests check shapes,
accounting, consistency between streaming and not, and robustness, never the words. Tool calls
and reasoning with known content are covered by test_server_api.py over a scripted engine.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from serving import serving

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-test"
KEY = "test-key"
STARTUP_TIMEOUT = 300  # the first start may build the CPU kernels
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Hello! What is two plus two?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gptoss.cli import main

    folder = tmp_path_factory.mktemp("serve")
    checkpoint = folder / "model"
    assert main(["synth", str(checkpoint), "--preset", "tiny"]) == 0
    assert (checkpoint / "tokenizer.json").exists()
    arguments = [str(checkpoint), "--served-model-name", MODEL, "--api-key", KEY, "--max-num-seqs", "32",
                 "--max-queue", "64", "--kv-cache-size", "16384", "--log-level", "warning"]
    with serving(arguments, folder / "server.log", STARTUP_TIMEOUT) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def metrics(http) -> dict[str, float]:
    values = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_idle(http, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = metrics(http)
        idle = m["gptoss_requests_running"] == 0 and m["gptoss_kv_cache_usage_ratio"] == 0
        if idle or time.time() > deadline:
            return m
        time.sleep(0.05)


def message_parts(message) -> tuple:
    extra = message.model_extra or {}
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return message.content or "", extra.get("reasoning_content") or "", calls


def streamed_parts(chunks) -> tuple:
    content, reasoning, calls = "", "", {}
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for call in delta.tool_calls or []:
                name, args = calls.get(call.index, ("", ""))
                calls[call.index] = (name + (call.function.name or ""), args + (call.function.arguments or ""))
    return content, reasoning, [calls[i] for i in sorted(calls)]


# -- models and chat ---------------------------------------------------------------------------------

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.role == "assistant"
    assert "reasoning_content" in choice.message.model_extra
    usage = r.usage
    assert 1 <= usage.completion_tokens <= 8 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_parts(chunks) == message_parts(whole.choices[0].message)
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed_logprobs = [(e.token, e.logprob) for c in chunks for ch in c.choices
                         for e in (ch.logprobs.content if ch.logprobs else None) or []]
    assert streamed_logprobs == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert len(streamed_logprobs) <= whole.usage.completion_tokens  # headers and special tokens have none
    again = client.chat.completions.create(**kwargs)
    assert message_parts(again.choices[0].message) == message_parts(whole.choices[0].message)
    # The same prompt again finds its complete pages in the prefix cache.
    assert 16 <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_chat_sampling_parameters(client):
    kwargs = dict(model=MODEL, messages=USER, temperature=0.8, top_p=0.9, presence_penalty=0.5,
                  frequency_penalty=0.3, seed=1234, stop=["\n\n", "END"], logprobs=True, top_logprobs=3,
                  max_completion_tokens=6, n=2, extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [message_parts(c.message) for c in first.choices] == [message_parts(c.message) for c in second.choices]
    assert first.usage.completion_tokens <= 12
    assert sum(len(c.logprobs.content or []) for c in first.choices) <= first.usage.completion_tokens
    for choice in first.choices:
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3


def test_chat_tools_and_tool_messages(client):
    for tool_choice in ("auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL],
                                           tool_choice=tool_choice, max_tokens=8)
        for call in r.choices[0].message.tool_calls or []:
            assert call.type == "function" and isinstance(call.function.arguments, str)
    history = [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": json.dumps({"temperature_c": 21})},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=8,
                                       reasoning_effort="low")
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # An earlier answer (with its reasoning) goes back in as it came out.
    history2 = USER + [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "More?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=history2, max_tokens=4, reasoning_effort="high")
    assert r2.choices[0].message.role == "assistant"


def test_chat_response_format(client):
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
                    "type": "object", "properties": {"x": {"type": "integer"}}}}}):
        r = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=4)
        assert r.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_schema"},
                                       max_tokens=4)
    assert info.value.body["param"] == "response_format.json_schema"


# -- completions ---------------------------------------------------------------------------------------

def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                  logprobs=2)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=["Hi", "Bye"], max_tokens=2, echo=True, n=2)
    assert len(echoed.choices) == 4
    assert echoed.choices[0].text.startswith("Hi") and echoed.choices[3].text.startswith("Bye")


# -- responses ----------------------------------------------------------------------------------------

def test_responses(client):
    first = client.responses.create(model=MODEL, input="Tell me a story.", instructions="Be short.",
                                    reasoning={"effort": "low"}, max_output_tokens=8, temperature=0)
    assert first.object == "response" and first.id.startswith("resp_")
    assert first.status in ("completed", "incomplete")
    assert first.usage.output_tokens <= 8 and first.usage.input_tokens > 0
    assert {item.type for item in first.output} <= {"reasoning", "message", "function_call"}
    follow = client.responses.create(model=MODEL, input=[{"role": "user", "content": "And then?"}],
                                     instructions="Be short.", previous_response_id=first.id, max_output_tokens=4)
    assert follow.previous_response_id == first.id
    assert follow.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(first.id).id == first.id
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}]
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
             {"type": "function_call_output", "call_id": "call_1", "output": "{\"temperature_c\": 21}"}]
    r = client.responses.create(model=MODEL, input=items, tools=tools, tool_choice="auto", max_output_tokens=6)
    assert r.status in ("completed", "incomplete")


def test_responses_stream_events(client):
    events = list(client.responses.create(model=MODEL, input="Hi there", max_output_tokens=10, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = set()
    for e in events:
        if e.type == "response.output_item.added":
            added.add(e.output_index)
        elif e.type.endswith(".delta"):
            assert e.output_index in added
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(part.text for item in final.output if item.type == "message" for part in item.content)
    assert final.usage.output_tokens <= 10


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, raw, status, param", [
    ("/v1/chat/completions", b"{\"model\": ", 400, None),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "top_logprobs": 50, "logprobs": True},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER + [{"role": "tool", "content": "x"}]}, 400,
     "messages[1]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]},
     400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 7]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/responses", {"model": MODEL, "input": 5}, 400, "input"),
    ("/v1/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp_missing"}, 404,
     "previous_response_id"),
])
def test_bad_requests_get_openai_errors(http, path, raw, status, param):
    content = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_context_and_auth_errors_through_the_client(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_sse_framing(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block
        assert json.loads(block[len("data: "):])["object"] == "chat.completion.chunk"


def test_metrics(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2})
    assert r.status_code == 200
    m = wait_idle(http)
    assert m['gptoss_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert m["gptoss_generation_tokens_total"] > 0 and m["gptoss_prompt_tokens_total"] > 0
    assert m["gptoss_time_to_first_token_seconds_count"] > 0
    assert "gptoss_kv_cache_usage_ratio" in m and "gptoss_batch_size" in m


# -- concurrency and disconnects -------------------------------------------------------------------------

def test_32_concurrent_streams_match_sequential_greedy_runs(server, client):
    prompts = [[{"role": "user", "content": f"Request number {i}: say something about {i * 7} apples."}]
               for i in range(32)]
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    alone = []
    for messages in prompts:
        r = client.chat.completions.create(messages=messages, **kwargs)
        alone.append((message_parts(r.choices[0].message), r.usage.completion_tokens))

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(messages):
            stream = await aclient.chat.completions.create(messages=messages, stream=True,
                                                           stream_options={"include_usage": True}, **kwargs)
            chunks = [chunk async for chunk in stream]
            return streamed_parts(chunks), chunks[-1].usage.completion_tokens

        try:
            return await asyncio.gather(*(one(m) for m in prompts))
        finally:
            await aclient.close()

    together = asyncio.run(run_all())
    assert all(tokens == 8 for _, tokens in together)
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not mismatched, f"streams differ from their sequential runs: {mismatched}"


@pytest.mark.parametrize("path, body, chunks", [
    # Chat: the role chunk comes at once; a random model may then write only harmony headers for a while.
    ("/v1/chat/completions", {"messages": USER}, 1),
    # Raw completions: every token is text, so this leaves in the middle of the output.
    ("/v1/completions", {"prompt": "Once upon a time"}, 4),
])
def test_disconnect_mid_stream_frees_the_request(server, http, path, body, chunks):
    before = wait_idle(http)
    aborted_before = before.get('gptoss_generations_finished_total{reason="abort"}', 0)
    body = {"model": MODEL, **body, "stream": True, "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            seen = 0
            for line in r.iter_lines():
                assert line != "data: [DONE]", "the stream ended before the client left"
                seen += line.startswith("data: ")
                if seen == chunks:
                    break
    after = wait_idle(http, timeout=10)
    assert after["gptoss_requests_running"] == 0, "the abandoned request is still generating"
    assert after['gptoss_generations_finished_total{reason="abort"}'] == aborted_before + 1
    assert after["gptoss_kv_cache_usage_ratio"] == 0
    assert httpx.get(server.url + "/health").json()["running"] == 0
    # And the server still answers.
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2})
    assert r.status_code == 200


def test_sigterm_drains_then_exits_cleanly(tiny_checkpoint, tmp_path):
    """SIGTERM: new requests get 503, running ones may finish within --shutdown-timeout, the rest
    end with an error event and [DONE], and the server exits 0."""
    import signal
    import threading

    arguments = [str(tiny_checkpoint), "--served-model-name", MODEL, "--shutdown-timeout", "1.5",
                 "--log-level", "warning"]
    with serving(arguments, tmp_path / "server.log", STARTUP_TIMEOUT) as server:
        body = {"model": MODEL, "prompt": "Hello", "temperature": 0, "ignore_eos": True}
        long_text, short_status, started = [], [], threading.Event()

        def long_stream():
            with httpx.stream("POST", server.url + "/v1/completions", json={**body, "max_tokens": 1900, "stream": True},
                              timeout=60) as r:
                for line in r.iter_lines():
                    long_text.append(line)
                    started.set()

        def short_request():
            r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 8}, timeout=60)
            short_status.append(r.status_code)

        threads = [threading.Thread(target=long_stream), threading.Thread(target=short_request)]
        threads[0].start()
        assert started.wait(60)
        threads[1].start()
        deadline = time.time() + 30
        while httpx.get(server.url + "/health", timeout=10).json()["running"] < 2 and not short_status:
            assert time.time() < deadline
            time.sleep(0.005)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        for thread in threads:
            thread.join(60)
        assert short_status == [200]  # finished within the grace period
        events = [line[len("data: "):] for line in long_text if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "shutting down" in json.loads(events[-2])["error"]["message"]
        assert server.proc.wait(timeout=20) == 0


def test_abandoned_uploads_leave_no_tracebacks(server, http):
    """A client that sends half a body and leaves is counted (499) and logs no error."""
    import socket
    from urllib.parse import urlparse

    address = urlparse(server.url)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        with socket.create_connection((address.hostname, address.port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":".encode())
            time.sleep(0.2)
    time.sleep(0.5)
    assert http.get("/health").status_code == 200
    log = server.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_completions_echo_with_logprobs_scores_the_prompt(client):
    """echo + logprobs: the prompt's tokens come first, the first without a logprob (as OpenAI's
    legacy completions and vLLM give them), then the generated ones; streamed the same."""
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    log = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    n_prompt = r.usage.prompt_tokens
    assert len(log.tokens) == n_prompt + r.usage.completion_tokens
    assert "".join(log.tokens[:n_prompt]) == prompt
    assert log.token_logprobs[0] is None and log.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in log.token_logprobs[1:])
    assert all(len(top) >= 1 for top in log.top_logprobs[1:])
    assert log.text_offset[:3] == [0, len(log.tokens[0]), len(log.tokens[0]) + len(log.tokens[1])]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert streamed == log.tokens
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


# -- structured outputs, enforced while decoding (gptoss.structured) ------------------------------------

CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ZONE_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


def _tool_schema(name: str) -> dict:
    return {"get_weather": CITY_TOOL, "get_time": ZONE_TOOL}[name]["function"]["parameters"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_through_the_openai_client(client, choice, stream):
    import jsonschema

    for seed in range(3):
        kwargs = dict(model=MODEL, messages=USER, tools=[CITY_TOOL, ZONE_TOOL], tool_choice=choice, seed=seed,
                      max_tokens=120, extra_body={"max_reasoning_tokens": 4})
        if stream:
            calls, finish = {}, None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice_delta in chunk.choices:
                    finish = choice_delta.finish_reason or finish
                    for call in choice_delta.delta.tool_calls or []:
                        entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                        entry["name"] += call.function.name or ""
                        entry["arguments"] += call.function.arguments or ""
            assert finish == "tool_calls" and len(calls) == 1
            name, arguments = calls[0]["name"], calls[0]["arguments"]
        else:
            out = client.chat.completions.create(**kwargs).choices[0]
            assert out.finish_reason == "tool_calls" and len(out.message.tool_calls) == 1
            name, arguments = out.message.tool_calls[0].function.name, out.message.tool_calls[0].function.arguments
        if isinstance(choice, dict):
            assert name == "get_time"
        jsonschema.validate(json.loads(arguments), _tool_schema(name))


def test_tool_choice_none_never_calls_through_the_server(client):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=USER, tools=[CITY_TOOL], tool_choice="none",
                                             seed=seed, max_tokens=40, extra_body={"max_reasoning_tokens": 4})
        assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason != "tool_calls"


def test_response_format_json_schema_is_enforced(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, seed=seed,
                                             max_tokens=80, extra_body={"max_reasoning_tokens": 6})
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens_details.reasoning_tokens <= 6
        jsonschema.validate(json.loads(out.choices[0].message.content), ANSWER)


def test_responses_text_format_and_forced_call(client):
    import jsonschema

    fmt = {"type": "json_schema", "name": "answer", "schema": ANSWER}
    out = client.responses.create(model=MODEL, input="Two plus two?", text={"format": fmt}, max_output_tokens=80,
                                  extra_body={"max_reasoning_tokens": 6})
    jsonschema.validate(json.loads(out.output_text), ANSWER)
    tool = {"type": "function", **ZONE_TOOL["function"]}
    out = client.responses.create(model=MODEL, input="Time?", tools=[tool], tool_choice="required",
                                  max_output_tokens=80, extra_body={"max_reasoning_tokens": 4})
    calls = [item for item in out.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_time"
    jsonschema.validate(json.loads(calls[0].arguments), _tool_schema("get_time"))


def test_completions_guided_json_extension(client):
    import jsonschema

    out = client.completions.create(model=MODEL, prompt="Data:", max_tokens=80, seed=1,
                                    extra_body={"guided_json": ANSWER})
    jsonschema.validate(json.loads(out.choices[0].text), ANSWER)
    out = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, seed=2,
                                    extra_body={"guided_regex": "[A-Z]{2}[0-9]{3}"})
    assert len(out.choices[0].text) == 5 and out.choices[0].text[:2].isupper()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "intger"}}}}}},
     "response_format.json_schema.schema.properties.a.type"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(unclosed"}, "guided_regex"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": 5}}}}, "text.format.schema.type"),
    ("/v1/chat/completions", {"messages": USER, "max_reasoning_tokens": -1}, "max_reasoning_tokens"),
])
def test_bad_constraints_are_400_naming_the_part(http, path, body, param):
    response = http.post(path, json={"model": MODEL, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
