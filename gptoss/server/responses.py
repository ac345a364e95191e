"""The Responses API: POST /v1/responses (streaming or not), GET and DELETE /v1/responses/{id}.

Input items become OpenAI chat messages for `gptoss.chat.render_prompt`; output segments become
items (reasoning, message, function_call). Stored responses keep their whole conversation
(without `instructions`, which, as in OpenAI's API, do not carry over), so `previous_response_id`
continues it.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gptoss.generation import Result
from gptoss.server.async_engine import EngineFailed, RequestStream
from gptoss.server.chat_completions import message_text, render
from gptoss.server.errors import APIError, bad_request, parse_body
from gptoss.server.outputs import ChoiceOutput, Segment, chat_logprobs, random_id, tool_choice_for_render
from gptoss.server.protocol import (FunctionCallItem, FunctionCallOutputItem, InputMessage, ReasoningItem,
                                    ResponsesRequest)
from gptoss.server.state import ServerState, sampling_params, require_json_schema
from gptoss.structured import StructuredOutputError, add_instructions, response_format_instructions
from gptoss.server.streaming import Generation, sse

router = APIRouter()

LOGPROBS_INCLUDE = "message.output_text.logprobs"


# -- request -> conversation ------------------------------------------------------------------------

def input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's input as chat messages (tool calls as assistant tool_calls, outputs as tool messages)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict] = []
    reasoning: list[str] = []  # reasoning items attach to the next assistant message
    for i, item in enumerate(req.input):
        param = f"input[{i}]"
        if isinstance(item, InputMessage):
            message = {"role": item.role, "content": message_text(item.content, f"{param}.content") or ""}
            if item.role == "assistant" and reasoning:
                message["reasoning_content"] = "".join(reasoning)
                reasoning = []
            messages.append(message)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and not reasoning:
                last["tool_calls"].append(call)
            else:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning:
                    message["reasoning_content"] = "".join(reasoning)
                    reasoning = []
                messages.append(message)
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else message_text(item.output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        elif isinstance(item, ReasoningItem):
            parts = item.content or item.summary
            reasoning.append("".join(p.text or "" for p in parts))
    return messages


def format_instructions(req: ResponsesRequest) -> str | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        if not fmt.name:
            raise bad_request("text.format of type 'json_schema' needs a 'name'.", "text.format.name",
                              "missing_required_parameter")
        require_json_schema(fmt.schema_, "text.format.schema")
    return response_format_instructions(fmt.model_dump(by_alias=True, exclude_none=True))


def tool_choice_value(req: ResponsesRequest):
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return tool_choice_for_render(choice, None, [tool.name for tool in req.tools or []])
    return tool_choice_for_render(None, choice.name, [tool.name for tool in req.tools or []])


def responses_sampling(req: ResponsesRequest):
    if req.background and req.store is False:
        raise bad_request("A background response must be stored (store: true) so that it can be polled.", "store")
    if req.background and req.stream:
        raise bad_request("background with stream is not supported by this server; poll GET /v1/responses/{id} "
                          "instead.", "stream", "unsupported_parameter")
    fields = req.model_dump(include={"temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                     "frequency_penalty", "repetition_penalty", "seed", "stop",
                                     "stop_token_ids", "ignore_eos", "top_logprobs"})
    fields["max_tokens"] = req.max_output_tokens
    fields["logprobs"] = bool(req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or []))
    return sampling_params(fields, names={"max_tokens": "max_output_tokens"})[0]


# -- outputs -> items --------------------------------------------------------------------------------

class ResponseBuilder:
    """Items and events of one response; used both to stream and to answer at once."""

    def __init__(self, state: ServerState, req: ResponsesRequest, response_id: str, choice: ChoiceOutput):
        self.state, self.req, self.id, self.choice = state, req, response_id, choice
        self.created_at = int(time.time())
        self.sequence = 0
        self.item_ids: dict[int, str] = {}
        self.want_logprobs = choice.output.params.logprobs

    def item_id(self, segment: Segment) -> str:
        if segment.index not in self.item_ids:
            prefix = {"reasoning": "rs_", "text": "msg_", "tool_call": "fc_"}[segment.kind]
            self.item_ids[segment.index] = random_id(prefix)
        return self.item_ids[segment.index]

    def _logprobs(self, logprobs) -> list[dict]:
        return chat_logprobs(logprobs, self.state.token_bytes) if self.want_logprobs else []

    def item(self, segment: Segment, status: str) -> dict:
        item_id = self.item_id(segment)
        if segment.kind == "reasoning":
            return {"id": item_id, "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": segment.text}], "status": status}
        if segment.kind == "tool_call":
            return {"id": item_id, "type": "function_call", "call_id": segment.call_id, "name": segment.name,
                    "arguments": segment.text, "status": status}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": status,
                "content": [self._text_part(segment.text, segment.logprobs)]}
        if segment.phase == "commentary":
            item["phase"] = "commentary"
        return item

    def empty_answer(self) -> dict:
        """The message item of a turn whose final answer is empty (the model only reasoned)."""
        if "empty" not in self.__dict__:
            self.empty = random_id("msg_")
        return {"id": self.empty, "type": "message", "role": "assistant", "status": "completed",
                "content": [self._text_part("", None)]}

    def _text_part(self, text: str, logprobs) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self._logprobs(logprobs)}

    def status(self, result: Result | None) -> str:
        if result is None:
            return "in_progress"
        return "incomplete" if result.finish_reason == "length" else "completed"

    def response(self, result: Result | None, *, error: dict | None = None) -> dict:
        status = "failed" if error else self.status(result)
        output = []
        if result is not None:
            last = len(self.choice.segments) - 1
            output = [self.item(s, "incomplete" if status == "incomplete" and s.index == last else "completed")
                      for s in self.choice.segments]
            if status == "completed" and not any(s.kind in ("text", "tool_call") for s in self.choice.segments):
                output.append(self.empty_answer())  # clients (the Agents SDK) look for the turn's message
        req = self.req
        tools = [dict(t.model_dump(exclude_none=True), strict=bool(t.strict)) for t in req.tools or []]
        choice = req.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": bool(req.background), "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": req.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning.effort if req.reasoning else None) or "medium", "summary": None},
            "service_tier": "default", "store": req.store is not False,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": req.text.format.model_dump(exclude_none=True, by_alias=True)
                     if req.text and req.text.format else {"type": "text"}},
            "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str)
            else (choice or "auto"),
            "tools": tools, "top_logprobs": req.top_logprobs or 0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": req.truncation or "disabled",
            "usage": self.usage(result) if result is not None else None,
            "user": req.user, "metadata": req.metadata or {},
        }

    @staticmethod
    def usage(result: Result) -> dict:
        u = result.usage
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.total_tokens}

    def output_messages(self) -> list[dict]:
        """This response's output as one assistant chat message (for the stored conversation)."""
        message = self.choice.chat_message()
        if message["reasoning_content"] is None:
            del message["reasoning_content"]
        return [message]

    # -- streaming events -------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(body, event=kind)

    def open_events(self, segment: Segment) -> list[str]:
        item_id, index = self.item_id(segment), segment.index
        added = self.item(segment, "in_progress")
        events = []
        if segment.kind == "reasoning":
            added["content"] = []
            events.append(self.event("response.output_item.added", output_index=index, item=added))
            events.append(self.event("response.content_part.added", item_id=item_id, output_index=index,
                                     content_index=0, part={"type": "reasoning_text", "text": ""}))
        elif segment.kind == "text":
            added["content"] = []
            events.append(self.event("response.output_item.added", output_index=index, item=added))
            events.append(self.event("response.content_part.added", item_id=item_id, output_index=index,
                                     content_index=0, part=self._text_part("", [])))
        else:
            added["arguments"] = ""
            events.append(self.event("response.output_item.added", output_index=index, item=added))
        return events

    def delta_event(self, segment: Segment, text: str, logprobs) -> str:
        item_id, index = self.item_id(segment), segment.index
        if segment.kind == "reasoning":
            return self.event("response.reasoning_text.delta", item_id=item_id, output_index=index,
                              content_index=0, delta=text)
        if segment.kind == "text":
            return self.event("response.output_text.delta", item_id=item_id, output_index=index,
                              content_index=0, delta=text, logprobs=self._logprobs(logprobs))
        return self.event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                          delta=text)

    def close_events(self, segment: Segment, status: str) -> list[str]:
        item_id, index = self.item_id(segment), segment.index
        item = self.item(segment, status)
        events = []
        if segment.kind == "reasoning":
            events.append(self.event("response.reasoning_text.done", item_id=item_id, output_index=index,
                                     content_index=0, text=segment.text))
            events.append(self.event("response.content_part.done", item_id=item_id, output_index=index,
                                     content_index=0, part=item["content"][0]))
        elif segment.kind == "text":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item_id, output_index=index,
                                     content_index=0, text=segment.text, logprobs=part["logprobs"]))
            events.append(self.event("response.content_part.done", item_id=item_id, output_index=index,
                                     content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item_id,
                                     output_index=index, name=segment.name, arguments=segment.text))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


class ResponseRun(Generation):
    def __init__(self, state: ServerState, req: ResponsesRequest, stream: RequestStream,
                 builder: ResponseBuilder, conversation: list[dict]):
        super().__init__([stream], [builder.choice])
        self.state, self.req, self.stream_, self.builder = state, req, stream, builder
        self.conversation = conversation
        self.choice = builder.choice

    def abort(self) -> None:
        self.abort_all()

    def _feed(self, out):
        return self.feed(0, out)

    def _store(self, body: dict) -> None:
        if self.req.store is not False:
            self.state.responses.put(body, self.conversation + self.builder.output_messages())

    async def collect(self) -> dict:
        try:
            async for out in self.stream_:
                self._feed(out)
        finally:
            self.abort()
        body = self.builder.response(self.choice.finish())
        self._store(body)
        return body

    # -- background: answered at once, run as a task, polled with GET, cancelled with POST .../cancel
    def start_background(self) -> dict:
        body = self.builder.response(None)  # status in_progress, no output yet
        self.state.responses.put(body, self.conversation)
        self.state.background[self.builder.id] = self
        self.cancelled = False
        self.task = asyncio.ensure_future(self._run_in_background())
        return body

    async def _run_in_background(self) -> None:
        try:
            await self.collect()
        except EngineFailed as exc:
            error = {"code": "server_error", "message": str(exc)}
            self._store(self.builder.response(self.choice.finish("abort"), error=error))
        except asyncio.CancelledError:
            pass  # cancel() stored the cancelled response
        finally:
            self.state.background.pop(self.builder.id, None)

    def cancel(self) -> dict:
        self.cancelled = True
        self.abort()
        body = self.builder.response(self.choice.finish("abort"))
        body["status"] = "cancelled"
        body["incomplete_details"] = None
        self._store(body)
        self.task.cancel()
        return body

    async def stream(self) -> AsyncIterator[str]:
        b = self.builder
        try:
            start = b.response(None)
            yield b.event("response.created", response=start)
            yield b.event("response.in_progress", response=start)
            open_segment: Segment | None = None
            async for out in self.stream_:
                for piece in self._feed(out):
                    if piece.new:
                        if open_segment is not None:
                            for event in b.close_events(open_segment, "completed"):
                                yield event
                        open_segment = piece.segment
                        for event in b.open_events(piece.segment):
                            yield event
                    if piece.text:
                        yield b.delta_event(piece.segment, piece.text, piece.logprobs)
                if self.choice.done:
                    break
            result = self.choice.finish()
            if open_segment is not None:
                status = "incomplete" if b.status(result) == "incomplete" else "completed"
                for event in b.close_events(open_segment, status):
                    yield event
            body = b.response(result)
            self._store(body)
            kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
            yield b.event(kind, response=body)
        except EngineFailed as exc:
            error = {"code": "server_error", "message": str(exc)}
            yield b.event("response.failed", response=b.response(self.choice.finish("abort"), error=error))
        finally:
            self.abort()


@router.post("/v1/responses")
async def create_response(request: Request):
    state: ServerState = request.app.state.server
    arrival = time.monotonic()
    req = parse_body(await request.body(), ResponsesRequest, strict_fields=state.strict_params)
    state.check_model(req.model)
    params = responses_sampling(req)
    conversation: list[dict] = []
    if req.previous_response_id:
        if not re.fullmatch(r"resp_[A-Za-z0-9_-]{1,128}", req.previous_response_id):
            raise bad_request(f"Invalid 'previous_response_id': {req.previous_response_id[:64]!r}. Expected an ID "
                              f"that begins with 'resp_'.", "previous_response_id")
        stored = state.responses.get(req.previous_response_id)
        if stored is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        conversation = list(stored[1])
    conversation += input_messages(req)
    if not conversation:
        raise bad_request("input must not be empty.", "input")
    messages = conversation
    instructions = "\n\n".join(t for t in (req.instructions, format_instructions(req)) if t)
    if instructions:
        messages = add_instructions(conversation, instructions)
    tools = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
             for t in req.tools or []]
    effort = (req.reasoning.effort if req.reasoning else None) or req.reasoning_effort or "medium"
    prompt = await run_in_threadpool(lambda: render(state, messages, tools=tools, effort=effort,
                                                    tool_choice=tool_choice_value(req), param="input"))
    fmt = req.text.format.model_dump(exclude_none=True, by_alias=True) if req.text and req.text.format else None

    def grammar_and_matcher():
        try:
            grammar = state.structurer.chat_request_grammar(tools=tools, tool_choice=tool_choice_value(req),
                                                            response_format=fmt, param="text.format",
                                                            max_reasoning_tokens=req.max_reasoning_tokens)
        except StructuredOutputError as exc:
            raise bad_request(str(exc), exc.param) from None
        return state.structurer.matcher(grammar)

    constraint = await run_in_threadpool(grammar_and_matcher)
    response_id = random_id("resp_")
    (stream,) = await state.submit([(prompt, params, response_id, constraint)], arrival, param="input")
    choice = ChoiceOutput(state.encoding, params, chat=True, prompt_tokens=len(prompt), token_bytes=state.token_bytes)
    run = ResponseRun(state, req, stream, ResponseBuilder(state, req, response_id, choice), conversation)
    if req.background:
        return JSONResponse(run.start_background())
    return await run.respond(request, bool(req.stream))


def _stored(state: ServerState, response_id: str) -> dict:
    stored = state.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    return stored[0]


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str):
    return JSONResponse(_stored(request.app.state.server, response_id))


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str):
    state: ServerState = request.app.state.server
    body = _stored(state, response_id)
    running = state.background.get(response_id)
    if running is not None:
        return JSONResponse(running.cancel())
    if not body.get("background"):
        raise bad_request("Only background responses can be cancelled.", "response_id")
    return JSONResponse(body)  # finished already: as it is


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    state: ServerState = request.app.state.server
    _stored(state, response_id)
    state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
