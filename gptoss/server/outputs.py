"""One choice's output, cut into the pieces the APIs show: reasoning, text, and tool calls.

`ChoiceOutput` feeds a request's StepOutputs to a `gptoss.generation.RequestOutput` (which parses
harmony, applies stop strings and counts usage) and groups the resulting deltas into segments:

    reasoning   the analysis channel                      -> reasoning_content / a reasoning item
    text        the final channel (or plain text when the output is not harmony), and
                commentary without a recipient (a preamble) -> content / a message item
    tool_call   text addressed to functions.NAME           -> tool_calls / a function_call item

A new segment starts when the kind or the recipient changes, or after a harmony message
boundary, so two calls of the same function stay two calls. Streaming and non-streaming
answers are built from the same segments, so they always agree.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

from gptoss.server.errors import bad_request
from gptoss.engine.engine import StepOutput, TokenLogprob
from gptoss.generation import Delta, RequestOutput, Result
from gptoss.sampling import SamplingParams
from gptoss.tokenizer import CALL, END, RETURN, START

# A harmony message ends or begins around these.
MESSAGE_BOUNDARY_TOKENS = frozenset({RETURN, START, END, CALL})
FUNCTIONS_PREFIX = "functions."


def random_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"


@dataclass
class Segment:
    kind: str  # "reasoning" | "text" | "tool_call"
    index: int  # position among all segments of the choice
    name: str | None = None  # the function, for tool calls
    phase: str = "final"  # "final" or "commentary" (a preamble), for text
    call_id: str | None = None
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_index: int = 0  # position among the choice's tool calls


@dataclass
class Piece:
    """What one step added to one segment: `new` is true for the first piece of a segment."""

    segment: Segment
    text: str
    logprobs: list[TokenLogprob]
    new: bool


def classify(delta: Delta) -> tuple[str, str | None, str]:
    """(kind, function name, phase) of a delta. Text addressed to anything but a declared-style
    function (a built-in tool this server does not run) is shown as commentary text."""
    if delta.recipient and delta.recipient.startswith(FUNCTIONS_PREFIX):
        return "tool_call", delta.recipient[len(FUNCTIONS_PREFIX):], "final"
    if delta.channel == "analysis":
        return "reasoning", None, "final"
    if delta.channel == "commentary":
        return "text", None, "commentary"
    return "text", None, "final"


class ChoiceOutput:
    def __init__(self, encoding, params: SamplingParams, *, chat: bool, prompt_tokens: int,
                 token_bytes: Callable[[int], bytes]):
        self.output = RequestOutput(encoding, params, chat=chat, prompt_tokens=prompt_tokens,
                                    token_bytes=token_bytes)
        self.segments: list[Segment] = []
        self.pending: list[TokenLogprob] = []  # logprobs of tokens no piece has carried yet
        self.done = False
        self.result: Result | None = None
        self._boundary = True

    @property
    def tool_calls(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "tool_call"]

    def feed(self, step: StepOutput) -> list[Piece]:
        """The pieces this step added. After the last step, `done` is true and `result` set."""
        if self.done:
            return []
        stopped_before = self.output.stopped
        deltas = self.output.feed(step)
        # Logprobs are reported for the tokens of messages' text only, never for harmony's
        # headers and special tokens (<|channel|>, final, <|message|>, <|end|>, ...).
        parser = self.output.parser
        if step.logprob is not None and not stopped_before and (parser is None or parser.last_was_content):
            self.pending.append(step.logprob)
        pieces: list[Piece] = []
        for delta in deltas:
            pieces += self._add(delta)
        if step.token_id in MESSAGE_BOUNDARY_TOKENS:
            self._boundary = True
        if step.finished or self.output.stopped:
            self.finish()
        return pieces

    def finish(self, reason: str | None = None) -> Result:
        """End the choice (also when aborted: reason 'abort'); returns its Result."""
        if not self.done:
            self.done = True
            if reason and not self.output.finish_reason:
                self.output.finish_reason = reason
            self.result = self.output.result()  # "stop" with tool calls is already "tool_calls"
        return self.result

    def _add(self, delta: Delta) -> list[Piece]:
        kind, name, phase = classify(delta)
        last = self.segments[-1] if self.segments else None
        new = (self._boundary or last is None or last.kind != kind or last.name != name or last.phase != phase)
        if not delta.text and not new:
            return []
        if new:
            segment = Segment(kind, len(self.segments), name, phase)
            if kind == "tool_call":
                segment.call_id = random_id("call_")
                segment.tool_index = len(self.tool_calls)
            self.segments.append(segment)
            self._boundary = False
        else:
            segment = last
        # A piece carries the logprobs of every token since the previous piece: header tokens and
        # text held back (stop strings, a header that turned out to be plain text) come out later.
        logprobs, self.pending = self.pending, []
        segment.text += delta.text
        segment.logprobs += logprobs
        return [Piece(segment, delta.text, logprobs, new)]

    def chat_message(self) -> dict:
        """The choice as one assistant chat message: text, reasoning and tool calls (what Chat
        Completions answers, and what a stored Responses conversation continues from)."""
        text = "".join(s.text for s in self.segments if s.kind == "text")
        reasoning = "".join(s.text for s in self.segments if s.kind == "reasoning")
        calls = [{"id": s.call_id, "type": "function", "function": {"name": s.name, "arguments": s.text}}
                 for s in self.tool_calls]
        message: dict = {"role": "assistant", "content": text if (text or not calls) else None,
                         "reasoning_content": reasoning or None}
        if calls:
            message["tool_calls"] = calls
        return message

    def all_logprobs(self) -> list[TokenLogprob]:
        """Every generated token's logprob, in order (what the pieces carried, then the rest)."""
        return [lp for s in self.segments for lp in s.logprobs] + self.pending


def tool_choice_for_render(mode: str | None, function: str | None, tool_names: list[str]):
    """An endpoint's tool_choice ("auto", "none", "required", or a named `function`) as
    chat.render_prompt takes it; a named function must be among the tools."""
    if function is None:
        if mode == "required" and not tool_names:
            raise bad_request("tool_choice 'required' needs tools.", "tool_choice")
        return mode
    if function not in tool_names:
        raise bad_request(f"tool_choice names the function {function!r}, which is not among the tools.",
                          "tool_choice")
    return {"type": "function", "function": {"name": function}}


# -- logprobs --------------------------------------------------------------------------------------

def token_text(token_bytes: Callable[[int], bytes], token_id: int) -> tuple[str, list[int]]:
    data = token_bytes(token_id)
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(logprobs: list[TokenLogprob], token_bytes) -> list[dict]:
    """The chat API's `logprobs.content` entries."""
    out = []
    for lp in logprobs:
        text, data = token_text(token_bytes, lp.token_id)
        top = []
        for token_id, value in lp.top:
            t, b = token_text(token_bytes, token_id)
            top.append({"token": t, "logprob": value, "bytes": b})
        out.append({"token": text, "logprob": lp.logprob, "bytes": data, "top_logprobs": top})
    return out


def usage_dict(results: list[Result]) -> dict:
    """Chat / completions usage: the prompt counted once, completions summed over the choices."""
    prompt = results[0].usage.prompt_tokens if results else 0
    completion = sum(r.usage.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min((r.usage.cached_tokens for r in results), default=0)},
        "completion_tokens_details": {"reasoning_tokens": sum(r.usage.reasoning_tokens for r in results)},
    }
