"""A request as the engine sees it: tokens, progress, and the KV blocks it holds."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from gptoss.sampling import SamplingParams, make_generator

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be resumed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a sequence is itself: compare by identity, not by its whole prompt
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    stop_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 1 << 30  # already capped by the context length
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose keys/values are in the cache; the rest still have to go through the model.
    num_computed: int = 0
    # Prompt tokens found in the prefix cache at admission (reported as cached tokens).
    num_cached_prompt_tokens: int = 0
    full_blocks: list[int] = field(default_factory=list)  # block of each 16-token page, all layers with full attention
    sliding_blocks: dict[int, int] = field(default_factory=dict)  # page index -> block, only pages in the window
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_ids))
    # With params.prompt_logprobs: (token, logprob, top alternatives) of each prompt token so far,
    # None for the first (nothing comes before it).
    prompt_logprobs: list | None = None
    # A structured-output constraint (gptoss.structured.TokenMatcher): masks this row's logits.
    constraint: object | None = None

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"seq-{self.arrival}"
        self.generator = make_generator(self.params.seed)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self.finish("stop")
        elif len(self.output_token_ids) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = self.finish_reason or reason
