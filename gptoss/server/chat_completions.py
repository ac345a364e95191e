"""POST /v1/chat/completions: harmony chat with reasoning, tools, streaming and n choices.

Reasoning (the analysis channel) comes back as `reasoning_content` and as `reasoning`, beside
`content`. With `logprobs`, the tokens of the reasoning and of the answer are listed (never
harmony's headers and special tokens); a stream attaches each token's entry to the chunk that
carries its text.
"""

from __future__ import annotations

import re
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from gptoss import chat as harmony_chat
from gptoss.server.async_engine import EngineFailed, RequestStream
from gptoss.server.errors import bad_request, from_value_error, parse_body
from gptoss.server.outputs import ChoiceOutput, Piece, chat_logprobs, random_id, tool_choice_for_render, usage_dict
from gptoss.server.protocol import ChatCompletionRequest, ChatMessage
from gptoss.server.state import (ServerState, reject_logit_bias, sampling_params,
                                 require_json_schema)
from gptoss.server.streaming import Generation, merged, sse
from gptoss import structured
from gptoss.structured import StructuredOutputError, add_instructions

router = APIRouter()

TEXT_PART_TYPES = ("text", "input_text", "output_text")


# -- request -> prompt and sampling ------------------------------------------------------------------

def message_text(content, param: str) -> str | None:
    """A message's content as one string (text parts joined); other part types are refused."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type not in TEXT_PART_TYPES or part.text is None:
            raise bad_request(f"content parts of type {part.type!r} are not supported (text only).",
                              f"{param}[{i}].type", "unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def chat_message_dict(message: ChatMessage, param: str) -> dict:
    out: dict = {"role": message.role}
    content = message_text(message.content, f"{param}.content")
    if content is not None:
        out["content"] = content
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def response_format_instructions(req: ChatCompletionRequest) -> str | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object.",
                              "response_format.json_schema", "missing_required_parameter")
        require_json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
    return structured.response_format_instructions(fmt.model_dump(by_alias=True, exclude_none=True))


def tool_choice_value(req: ChatCompletionRequest):
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return tool_choice_for_render(choice, None, [tool.function.name for tool in req.tools or []])
    return tool_choice_for_render(None, choice.function.name, [tool.function.name for tool in req.tools or []])


def render(state: ServerState, messages: list[dict], *, tools: list[dict] | None, effort: str,
           tool_choice, param: str = "messages") -> list[int]:
    try:
        return harmony_chat.render_prompt(state.encoding, messages, tools=tools or None,
                                          reasoning_effort=effort, tool_choice=tool_choice)
    except ValueError as exc:  # ChatFormatError: "messages[2]: ..." names the culprit
        match = re.match(r"((?:messages|tools)\[\d+\][\w.\[\]]*|tool_choice)[:\s]", str(exc))
        if match and (param == "messages" or not match.group(1).startswith("messages")):
            param = match.group(1)
        raise from_value_error(exc, param) from None


def build_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    messages = [chat_message_dict(m, f"messages[{i}]") for i, m in enumerate(req.messages)]
    extra = response_format_instructions(req)
    if extra:
        messages = add_instructions(messages, extra)
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
    return render(state, messages, tools=tools, effort=req.reasoning_effort or "medium",
                  tool_choice=tool_choice_value(req))


def request_grammar(state: ServerState, req: ChatCompletionRequest) -> str | None:
    """The grammar enforcing response_format, a forced tool_choice, strict tools and
    max_reasoning_tokens (None when the request constrains nothing); a bad schema is a 400."""
    fmt = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    try:
        return state.structurer.chat_request_grammar(
            tools=[tool.model_dump(exclude_none=True) for tool in req.tools or []], tool_choice=tool_choice_value(req),
            response_format=fmt, max_reasoning_tokens=req.max_reasoning_tokens, param="response_format.json_schema")
    except StructuredOutputError as exc:
        raise bad_request(str(exc), exc.param) from None


def chat_sampling(req: ChatCompletionRequest):
    reject_logit_bias(req.logit_bias)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    fields = req.model_dump(include={"temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                     "frequency_penalty", "repetition_penalty", "seed", "stop",
                                     "stop_token_ids", "ignore_eos", "top_logprobs"})
    fields["max_tokens"] = max_tokens
    fields["logprobs"] = req.logprobs
    names = {"max_tokens": "max_completion_tokens"} if req.max_completion_tokens is not None else {}
    return sampling_params(fields, n=req.n or 1, names=names)


# -- outputs -> API objects -----------------------------------------------------------------------------

def delta_of(piece: Piece) -> dict:
    seg = piece.segment
    if seg.kind == "reasoning":  # both names: vLLM's reasoning_content, and reasoning (OpenRouter, Ollama, newer vLLM)
        return {"reasoning_content": piece.text, "reasoning": piece.text}
    if seg.kind == "text":
        return {"content": piece.text}
    call: dict = {"index": seg.tool_index}
    if piece.new:
        call.update(id=seg.call_id, type="function", function={"name": seg.name, "arguments": piece.text})
    else:
        call["function"] = {"arguments": piece.text}
    return {"tool_calls": [call]}


def message_of(choice: ChoiceOutput) -> dict:
    message = choice.chat_message()
    message["reasoning"] = message["reasoning_content"]  # both names (see the module doc)
    message["refusal"] = None
    return message


class ChatCompletion(Generation):
    """One chat completion request in flight: its choices, ids, and the two ways to answer."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, streams: list[RequestStream],
                 choices: list[ChoiceOutput], request_id: str):
        super().__init__(streams, choices)
        self.state, self.req, self.id = state, req, request_id
        self.created = int(time.time())
        self.want_logprobs = bool(req.logprobs)

    async def collect(self) -> dict:
        try:
            async for index, out in merged(self.streams):
                self.feed(index, out)
        finally:
            self.abort_all()
        choices = []
        for i, choice in enumerate(self.choices):
            result = choice.finish()
            logprobs = None
            if self.want_logprobs:
                logprobs = self._logprobs(choice.all_logprobs())
            choices.append({"index": i, "message": message_of(choice), "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.req.model,
                "choices": choices, "usage": usage_dict([c.result for c in self.choices]),
                "system_fingerprint": None, "service_tier": "default"}

    def _logprobs(self, logprobs) -> dict:
        return {"content": chat_logprobs(logprobs, self.state.token_bytes), "refusal": None}

    def _chunk(self, index: int, delta: dict, *, finish_reason=None, logprobs=None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    async def stream(self) -> AsyncIterator[str]:
        try:
            for i in range(len(self.choices)):
                yield self._chunk(i, {"role": "assistant", "content": ""})
            async for index, out in merged(self.streams):
                choice = self.choices[index]
                for piece in self.feed(index, out):
                    logprobs = self._logprobs(piece.logprobs) if self.want_logprobs else None
                    yield self._chunk(index, delta_of(piece), logprobs=logprobs)
                if choice.done:
                    rest = choice.pending
                    logprobs = self._logprobs(rest) if self.want_logprobs and rest else None
                    yield self._chunk(index, {}, finish_reason=choice.result.finish_reason, logprobs=logprobs)
            if self.include_usage:
                body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.req.model, "system_fingerprint": None, "choices": [],
                        "usage": usage_dict([c.finish() for c in self.choices])}
                yield sse(body)
        except EngineFailed as exc:
            yield self.failed_event(exc)
        finally:
            self.abort_all()
        yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request):
    state: ServerState = request.app.state.server
    arrival = time.monotonic()
    req = parse_body(await request.body(), ChatCompletionRequest, strict_fields=state.strict_params)
    state.check_model(req.model)
    params = chat_sampling(req)
    prompt = await run_in_threadpool(build_prompt, state, req)  # off the event loop: /health stays quick
    grammar = await run_in_threadpool(request_grammar, state, req)
    constraints = await run_in_threadpool(state.constraints, grammar, len(params))
    request_id = random_id("chatcmpl-")
    streams = await state.submit([(prompt, p, f"{request_id}-{i}", c)
                                  for i, (p, c) in enumerate(zip(params, constraints))], arrival)
    choices = [ChoiceOutput(state.encoding, p, chat=True, prompt_tokens=len(prompt),
                            token_bytes=state.token_bytes) for p in params]
    return await ChatCompletion(state, req, streams, choices, request_id).respond(request, bool(req.stream))
