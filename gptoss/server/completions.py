"""POST /v1/completions: raw text completion (no harmony), the legacy OpenAI shape."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from gptoss.server.async_engine import EngineFailed, RequestStream
from gptoss.server.errors import bad_request, parse_body
from gptoss.server.outputs import ChoiceOutput, random_id, token_text, usage_dict
from gptoss.server.protocol import CompletionRequest
from gptoss.server.state import ServerState, reject_logit_bias, sampling_params
from gptoss.server.streaming import Generation, merged, sse
from gptoss.structured import StructuredOutputError

router = APIRouter()


def prompts_of(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        texts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    else:
        texts = list(prompt)
    if not texts:
        raise bad_request("prompt must not be empty.", "prompt")
    out = []
    for i, item in enumerate(texts):
        tokens = list(item) if isinstance(item, list) else state.text_encoding.encode(item, allowed_special="all")
        if not tokens:
            raise bad_request("prompt must not be empty.", "prompt" if len(texts) == 1 else f"prompt[{i}]")
        out.append(tokens)
    return out


def completion_sampling(req: CompletionRequest):
    reject_logit_bias(req.logit_bias)
    if req.suffix:
        raise bad_request("suffix is not supported by this server.", "suffix", "unsupported_parameter")
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise bad_request("best_of must equal n (this server does not rank candidates).", "best_of")
    fields = req.model_dump(include={"temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                     "frequency_penalty", "repetition_penalty", "seed", "stop",
                                     "stop_token_ids", "ignore_eos", "max_tokens"})
    if req.logprobs is not None:
        fields["logprobs"] = True
        fields["top_logprobs"] = req.logprobs
        if req.echo:  # the echoed prompt's tokens get logprobs too
            fields["prompt_logprobs"] = req.logprobs
    return sampling_params(fields, n=n, names={"top_logprobs": "logprobs"})


class TokenLog:
    """The legacy `logprobs` object of one choice, built token by token."""

    def __init__(self, token_bytes, offset: int = 0):
        self.token_bytes, self.offset = token_bytes, offset
        self.data = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add_prompt(self, prompt_ids: list[int], logprobs) -> dict:
        """The echoed prompt's entries (the first token has no logprob: nothing comes before it)."""
        entry = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprob in zip(prompt_ids, logprobs):
            text, _ = token_text(self.token_bytes, token_id)
            entry["tokens"].append(text)
            entry["token_logprobs"].append(None if logprob is None else logprob.logprob)
            entry["top_logprobs"].append(None if logprob is None else
                                         {token_text(self.token_bytes, t)[0]: v for t, v in logprob.top})
            entry["text_offset"].append(self.offset)
            self.offset += len(text)
        for key, value in entry.items():
            self.data[key] += value
        return entry

    def add(self, logprob) -> dict:
        text, _ = token_text(self.token_bytes, logprob.token_id)
        entry = {"tokens": [text], "token_logprobs": [logprob.logprob],
                 "top_logprobs": [{token_text(self.token_bytes, t)[0]: v for t, v in logprob.top}],
                 "text_offset": [self.offset]}
        self.offset += len(text)
        for key, value in entry.items():
            self.data[key] += value
        return entry


class Completion(Generation):
    def __init__(self, state: ServerState, req: CompletionRequest, prompts: list[list[int]], n: int,
                 streams: list[RequestStream], choices: list[ChoiceOutput], request_id: str):
        super().__init__(streams, choices)
        self.state, self.req, self.prompts, self.n, self.id = state, req, prompts, n, request_id
        self.created = int(time.time())
        self.echo = [self._prompt_text(i) if req.echo else "" for i in range(len(choices))]
        self.logs = [TokenLog(state.token_bytes) if req.logprobs is not None else None for _ in self.echo]
        self.stop_ids = [p.stop_token_set() for p in (c.output.params for c in choices)]

    def _prompt_text(self, index: int) -> str:
        return self.state.text_encoding.decode(self.prompts[index // self.n])

    def _feed(self, index: int, out) -> tuple[str, list[dict]]:
        """The new text, and the logprob entries this step adds (the prompt's first, with echo)."""
        pieces = self.feed(index, out)
        entries, prefix = [], ""
        log = self.logs[index]
        if log is not None and out.prompt_logprobs is not None:  # echo: the prompt's entries come first
            entries.append(log.add_prompt(self.prompts[index // self.n], out.prompt_logprobs))
            prefix = self.echo[index]
        if log is not None and out.logprob is not None and out.token_id not in self.stop_ids[index]:
            entries.append(log.add(out.logprob))
        return prefix + "".join(p.text for p in pieces), entries

    async def collect(self) -> dict:
        try:
            async for index, out in merged(self.streams):
                self._feed(index, out)
        finally:
            self.abort_all()
        choices = []
        for i, choice in enumerate(self.choices):
            result = choice.finish()
            text = self.echo[i] + "".join(s.text for s in choice.segments)
            log = self.logs[i]
            choices.append({"index": i, "text": text, "logprobs": log.data if log else None,
                            "finish_reason": result.finish_reason})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model,
                "choices": choices, "usage": self._usage(), "system_fingerprint": None}

    def _usage(self) -> dict:
        results = [c.finish() for c in self.choices]
        usage = usage_dict(results)
        prompt = sum(len(p) for p in self.prompts)
        usage["prompt_tokens"] = prompt
        usage["total_tokens"] = prompt + usage["completion_tokens"]
        return usage

    def _chunk(self, index: int, text: str, *, logprobs=None, finish_reason=None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model,
                "system_fingerprint": None,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    async def stream(self) -> AsyncIterator[str]:
        try:
            for i, echo in enumerate(self.echo):
                if echo and self.logs[i] is None:  # with logprobs it comes with the prompt's, on the first token
                    yield self._chunk(i, echo)
            async for index, out in merged(self.streams):
                text, entries = self._feed(index, out)
                choice = self.choices[index]
                merged_log = None
                if entries:
                    merged_log = {k: [v for e in entries for v in e[k]] for k in entries[0]}
                if choice.done:  # the last token's text and logprobs ride with the finish reason
                    yield self._chunk(index, text, logprobs=merged_log, finish_reason=choice.result.finish_reason)
                elif text or entries:
                    yield self._chunk(index, text, logprobs=merged_log)
            if self.include_usage:
                yield sse({"id": self.id, "object": "text_completion", "created": self.created,
                           "model": self.req.model, "choices": [], "usage": self._usage()})
        except EngineFailed as exc:
            yield self.failed_event(exc)
        finally:
            self.abort_all()
        yield "data: [DONE]\n\n"


def completion_grammar(state: ServerState, req: CompletionRequest) -> str | None:
    fmt = req.response_format
    schema = fmt.json_schema.schema_ if fmt and fmt.type == "json_schema" and fmt.json_schema else None
    if fmt and fmt.type == "json_schema" and schema is None:
        raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'.",
                          "response_format.json_schema")
    try:
        return state.structurer.text_grammar(
            json_schema=req.guided_json if req.guided_json is not None else schema, regex=req.guided_regex,
            grammar=req.guided_grammar, json_object=bool(fmt and fmt.type == "json_object"),
            names={"json_schema": "guided_json" if req.guided_json is not None else "response_format.json_schema.schema",
                   "regex": "guided_regex", "grammar": "guided_grammar"})
    except StructuredOutputError as exc:
        raise bad_request(str(exc), exc.param) from None


@router.post("/v1/completions")
async def create_completion(request: Request):
    state: ServerState = request.app.state.server
    arrival = time.monotonic()
    req = parse_body(await request.body(), CompletionRequest, strict_fields=state.strict_params)
    state.check_model(req.model)
    params = completion_sampling(req)
    prompts = await run_in_threadpool(prompts_of, state, req)  # off the event loop
    n = len(params)
    request_id = random_id("cmpl-")
    grammar = await run_in_threadpool(completion_grammar, state, req)
    constraints = iter(await run_in_threadpool(state.constraints, grammar, len(prompts) * n))
    jobs = [(prompt, p, f"{request_id}-{i * n + j}", next(constraints))
            for i, prompt in enumerate(prompts) for j, p in enumerate(params)]
    streams = await state.submit(jobs, arrival, param="prompt")
    choices = [ChoiceOutput(state.encoding, params, chat=False, prompt_tokens=len(prompt),
                            token_bytes=state.token_bytes) for prompt, params, *_ in jobs]
    return await Completion(state, req, prompts, n, streams, choices, request_id).respond(request, bool(req.stream))
