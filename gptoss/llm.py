"""`gptoss.LLM`: the Python API.

    llm = LLM("path/to/gpt-oss-20b")
    result = llm.chat([{"role": "user", "content": "Hi"}], reasoning_effort="low")
    print(result.text)

    stream = llm.chat_stream(messages)
    for delta in stream:                 # Delta(text, channel="analysis" | "commentary" | "final")
        print(delta.text, end="")
    print(stream.result.usage)

Requests run on the same continuous-batching engine as the server; several streams may be
consumed side by side, or `generate` may be given a list of prompts.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Iterator, Sequence

import torch

from gptoss import chat as harmony_chat
from gptoss.engine.distributed import load_model
from gptoss.engine.engine import LLMEngine
from gptoss.generation import Delta, RequestOutput, Result
from gptoss.sampling import SamplingParams
from gptoss.structured import Structurer, add_instructions, response_format_instructions
from gptoss.tokenizer import harmony_encoding, tiktoken_encoding

_request_ids = itertools.count()


class GenerationStream:
    """Iterate for deltas; `result` holds the final Result once the iteration ends."""

    def __init__(self, llm: "LLM", request_id: str, output: RequestOutput):
        self._llm, self.request_id, self._output = llm, request_id, output
        self._pending: list[Delta] = []
        self.result: Result | None = None

    def __iter__(self) -> Iterator[Delta]:
        try:
            while self.result is None:
                self._llm._step_until(self)
                while self._pending:
                    yield self._pending.pop(0)
        finally:
            self.close()

    def _deliver(self, deltas: list[Delta], finished: bool) -> None:
        self._pending += deltas
        if finished:
            self.result = self._output.result()
            self._llm._streams.pop(self.request_id, None)

    def close(self) -> None:
        """Stop generating (e.g. on Ctrl-C): the request is aborted and its cache freed."""
        if self.result is None:
            self._llm.engine.abort(self.request_id)
            self._llm._streams.pop(self.request_id, None)
            self._output.finish_reason = self._output.finish_reason or "abort"
            self.result = self._output.result()

    def collect(self) -> Result:
        for _ in self:
            pass
        return self.result


class LLM:
    def __init__(self, path: str | Path | None = None, *, revision: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, progress: bool = False, dense_int8: bool = False,
                 tensor_parallel_size: int = 1, expert_parallel: bool = False, mmap: bool = True,
                 **engine_options):
        """`path`: a model folder, a Hugging Face Hub id (`openai/gpt-oss-20b`, at `revision`), or
        None for the demo model that ships with gptoss. `tensor_parallel_size` N > 1 splits the
        model over N processes (gptoss.parallel; `expert_parallel` puts whole experts on each);
        `close()` stops them. `mmap=False` copies the weights out of the file map (see
        `Model.from_pretrained`)."""
        if path is None:
            from gptoss.demo import demo_model_path
            path = demo_model_path()
        else:
            from gptoss.hub import resolve
            path = resolve(path, revision)
        self.path = Path(path)
        self.model = load_model(path, device=device, dtype=dtype, progress=progress, dense_int8=dense_int8,
                                tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel,
                                mmap=mmap)
        self.engine = LLMEngine(self.model, **engine_options)
        self.encoding = harmony_encoding(path)
        self._text_encoding = tiktoken_encoding(path)
        self._streams: dict[str, GenerationStream] = {}

    def close(self) -> None:
        """Stop the other ranks (tensor parallelism); the model cannot run after this."""
        ranks = getattr(self.model, "ranks", None)
        if ranks is not None:
            ranks.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chat --------------------------------------------------------------------------------
    def chat_stream(self, messages: list[dict], *, tools: list[dict] | None = None,
                    reasoning_effort: str = "medium", tool_choice=None, response_format: dict | None = None,
                    max_reasoning_tokens: int | None = None, **sampling) -> GenerationStream:
        """`response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"name", "schema"}}), a forced `tool_choice` ("required" or a named function), strict
        tools and `max_reasoning_tokens` are enforced while decoding (gptoss.structured)."""
        params = SamplingParams.from_kwargs(**sampling)
        grammar = self.structurer.chat_request_grammar(tools=tools, tool_choice=tool_choice,
                                                       response_format=response_format,
                                                       max_reasoning_tokens=max_reasoning_tokens)
        extra = response_format_instructions(response_format)
        if extra:
            messages = add_instructions(messages, extra)
        prompt = harmony_chat.render_prompt(self.encoding, messages, tools=tools,
                                            reasoning_effort=reasoning_effort, tool_choice=tool_choice)
        return self._start(prompt, params, chat=True, constraint=self.structurer.matcher(grammar))

    def chat(self, messages: list[dict], **options) -> Result:
        return self.chat_stream(messages, **options).collect()

    # -- raw completion ------------------------------------------------------------------------
    def generate_stream(self, prompt: str | Sequence[int], *, json_schema: dict | str | None = None,
                        regex: str | None = None, grammar: str | None = None, **sampling) -> GenerationStream:
        """A raw completion; `json_schema`, `regex` or `grammar` (Lark, llguidance's dialect)
        constrain it from the first token."""
        params = SamplingParams.from_kwargs(**sampling)
        constraint = self.structurer.text_grammar(json_schema=json_schema, regex=regex, grammar=grammar)
        return self._start(self.encode(prompt), params, chat=False, constraint=self.structurer.matcher(constraint))

    def generate(self, prompt: str | Sequence[int] | list, **options) -> Result | list[Result]:
        """One prompt (text or token ids) -> Result; a list of text prompts -> a list, run as one batch."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            streams = [self.generate_stream(p, **options) for p in prompt]
            return [s.collect() for s in streams]
        return self.generate_stream(prompt, **options).collect()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._text_encoding.encode(prompt, allowed_special="all")
        return [int(t) for t in prompt]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._text_encoding.decode(list(token_ids))

    # -- the engine loop, driven by whichever stream needs output -----------------------------
    @functools.cached_property
    def structurer(self) -> Structurer:
        return Structurer(self._text_encoding, self.model.config.vocab_size)

    def _start(self, prompt: list[int], params: SamplingParams, chat: bool, constraint=None) -> GenerationStream:
        request_id = f"req-{next(_request_ids)}"
        output = RequestOutput(self.encoding, params, chat=chat, prompt_tokens=len(prompt),
                               token_bytes=self._text_encoding.decode_single_token_bytes)
        self.engine.add_request(prompt, params, request_id, constraint=constraint)
        stream = GenerationStream(self, request_id, output)
        self._streams[request_id] = stream
        return stream

    def _step_until(self, stream: GenerationStream) -> None:
        """Run engine steps until `stream` has something to yield (other streams advance too)."""
        while stream.result is None and not stream._pending:
            outputs = self.engine.step()
            if not outputs and not self.engine.has_unfinished():
                stream._deliver([], finished=True)
                return
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is None:
                    continue
                deltas = target._output.feed(out)
                finished = out.finished or target._output.stopped
                if target._output.stopped and not out.finished:
                    self.engine.abort(out.request_id)
                target._deliver(deltas, finished)
