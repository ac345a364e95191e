"""From engine tokens to what a user sees: channel deltas, stop strings, tool calls, usage.

One `RequestOutput` follows one request. The Python API (`gptoss.LLM`) and the HTTP server both
feed it the engine's step outputs, so streaming, stop handling and accounting behave the same
everywhere.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Callable

from gptoss.chat import Delta, StreamParser
from gptoss.engine.engine import StepOutput, TokenLogprob
from gptoss.sampling import SamplingParams, StopStringMatcher


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Result:
    text: str  # the answer: final channel for chat, all text for raw completions
    reasoning: str
    tool_calls: list[dict]
    finish_reason: str  # "stop", "length", "tool_calls" or "abort"
    usage: Usage
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    messages: list = field(default_factory=list)  # the parsed harmony messages (chat only)


class RequestOutput:
    """Assembles one request's output, token by token.

    chat=True parses harmony (reasoning, answer, tool calls); chat=False decodes raw text.
    Stop strings apply to the answer text; when one matches, `stopped` turns true and the
    caller aborts the request in the engine.
    """

    def __init__(self, encoding, params: SamplingParams, *, chat: bool, prompt_tokens: int,
                 token_bytes: Callable[[int], bytes] | None = None):
        self.params = params
        self.chat = chat
        self.parser = StreamParser(encoding) if chat else None
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopStringMatcher(params.stop)
        self.stopped = False
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.finish_reason: str | None = None
        self.text = ""
        self.reasoning = ""

    def feed(self, step: StepOutput) -> list[Delta]:
        deltas: list[Delta] = []
        if step.token_id is not None and not self.stopped:
            self.token_ids.append(step.token_id)
            if step.logprob is not None:
                self.logprobs.append(step.logprob)
            deltas = self._deltas(step.token_id)
            if deltas:
                deltas[0].token_ids = [step.token_id]
                deltas[0].logprobs = [step.logprob] if step.logprob is not None else []
        if step.finished or self.stopped:
            self.usage.cached_tokens = step.cached_tokens
            self.finish_reason = "stop" if self.stopped else step.finish_reason
            deltas += self._flush()
        return deltas

    def _deltas(self, token_id: int) -> list[Delta]:
        if not self.chat:
            if token_id in self.params.stop_token_set() and not self.params.ignore_eos:
                return []
            return self._answer(Delta(self._utf8.decode(self.token_bytes(token_id))))
        return self._route(self.parser.feed(token_id))

    def _route(self, parsed) -> list[Delta]:
        """Reasoning is collected, answer text goes through the stop strings, the rest passes."""
        out = []
        for d in parsed:
            if d.channel == "analysis":
                self.reasoning += d.text
                out.append(Delta(d.text, "analysis", d.recipient))
            elif d.channel == "final" or (d.channel is None and d.recipient is None):
                out += self._answer(Delta(d.text, "final"))
            else:
                out.append(Delta(d.text, d.channel, d.recipient))
        return out

    def _answer(self, delta: Delta) -> list[Delta]:
        """Pass answer text through the stop-string matcher, which may hold some back."""
        match = self.stops.feed(delta.text)
        self.text += match.emit
        if match.stopped:
            self.stopped = True
        delta.text = match.emit
        return [delta] if delta.text else []

    def _flush(self) -> list[Delta]:
        deltas = []
        if self.parser is not None and not self.stopped:
            deltas = self._route(self.parser.flush())
        rest = "" if self.stopped else self.stops.flush()
        self.text += rest
        return deltas + ([Delta(rest, "final" if self.chat else None)] if rest else [])

    def result(self) -> Result:
        tool_calls: list[dict] = []
        messages: list = []
        if self.chat:
            parsed = self.parser.finish()
            tool_calls, messages = parsed.tool_calls, parsed.messages
            self.usage.reasoning_tokens = parsed.reasoning_tokens
        self.usage.completion_tokens = len(self.token_ids)
        reason = self.finish_reason or "length"
        if tool_calls and reason == "stop":
            reason = "tool_calls"
        return Result(self.text, self.reasoning, tool_calls, reason, self.usage, list(self.token_ids),
                      self.logprobs if self.params.logprobs else None, messages)
