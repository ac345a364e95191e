"""The engine loop: requests in, one batched model step at a time, tokens out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from gptoss.engine.kv_cache import KVCacheManager
from gptoss.engine.runner import ModelRunner
from gptoss.engine.scheduler import Scheduler
from gptoss.engine.sequence import Sequence
from gptoss.model import Model
from gptoss.sampling import SamplingParams

BLOCK_SIZE = 16


class RequestError(ValueError):
    """A request the engine cannot serve (too long for the context or the KV cache)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: plain values, safe to hand to another thread."""

    request_id: str
    token_id: int | None  # None when the request ended without a new token (aborted)
    finished: bool
    finish_reason: str | None
    logprob: TokenLogprob | None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    output_tokens: int = 0  # generated so far, this token included
    # With SamplingParams.prompt_logprobs, on the first token's output: one entry per prompt
    # token (None for the first).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters (totals since start, and the last step)."""

    steps: int = 0
    prompt_tokens: int = 0  # prompts of requests that produced their first token
    generation_tokens: int = 0
    batch_tokens: int = 0  # tokens the model computed (prefill chunks and decodes)
    expert_rows: int = 0  # token rows the experts computed: equal to batch_tokens (nothing padded)
    last_batch_size: int = 0
    preemptions: int = 0
    running: int = 0
    waiting: int = 0
    max_num_seqs: int = 0
    kv_usage: float = 0.0


def parse_size(text: str | int | None) -> tuple[str, int] | None:
    """'65536' -> ('tokens', 65536); '4GB' / '512MiB' -> ('bytes', n)."""
    if text is None:
        return None
    if isinstance(text, int):
        return ("tokens", text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b|tokens?)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"cannot read the size {text!r}: give tokens (65536) or bytes (4GB, 512MiB)")
    number, unit = float(match.group(1)), match.group(2) or "tokens"
    if unit.startswith("token"):
        return ("tokens", int(number))
    powers = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
    base = 1024 if "i" in unit else 1000
    return ("bytes", int(number * base ** powers[unit[0]]))


class LLMEngine:
    def __init__(self, model: Model, *, kv_cache_size: str | int | None = None, max_num_seqs: int = 32,
                 max_batched_tokens: int = 512, prefix_caching: bool = True, seed: int | None = None,
                 cuda_graphs: bool | None = None):
        """`cuda_graphs`: None replays decode steps from CUDA graphs on a GPU (False: --enforce-eager)."""
        self.model = model
        config = model.config
        self.context_length = config.context_length
        full_bytes = ModelRunner.bytes_per_block(config, BLOCK_SIZE, model.dtype, sliding=False)
        sliding_bytes = ModelRunner.bytes_per_block(config, BLOCK_SIZE, model.dtype, sliding=True)
        window_pages = -(-config.sliding_window // BLOCK_SIZE)
        # Between steps each sequence holds a window of pages; a step writes up to its token budget
        # more. Twice that leaves room to keep recent pages findable for the prefix cache.
        num_sliding = 2 * (max_num_seqs * (window_pages + 2) + -(-max_batched_tokens // BLOCK_SIZE))
        size = parse_size(kv_cache_size) or ("tokens", 32 * 4096)
        if size[0] == "tokens":
            num_full = -(-size[1] // BLOCK_SIZE)
        else:
            num_full = (size[1] - num_sliding * sliding_bytes) // max(full_bytes, 1)
        if num_full < 1:
            raise ValueError(f"a KV cache of {kv_cache_size} is too small: the sliding-window layers alone need "
                             f"{num_sliding * sliding_bytes / 1e6:.0f} MB for {max_num_seqs} sequences")
        self.kv = KVCacheManager(num_full, num_sliding, BLOCK_SIZE, config.sliding_window, prefix_caching)
        self.kv_cache_tokens = num_full * BLOCK_SIZE
        self.kv_cache_bytes = num_full * full_bytes + num_sliding * sliding_bytes
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_batched_tokens)
        self.runner = ModelRunner(model, self.kv, seed, cuda_graphs=cuda_graphs, max_num_seqs=max_num_seqs)
        self.max_num_seqs = max_num_seqs
        self._totals = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "batch_tokens": 0,
                        "last_batch_size": 0}

    # -- requests --------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = "",
                    default_stop_ids=None, constraint=None) -> Sequence:
        """Queue a request; it stops at the model's eos ids (generation_config.json) unless
        `default_stop_ids` or the params say otherwise. `constraint` (gptoss.structured.TokenMatcher)
        limits every token it samples to those its grammar allows."""
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise RequestError(f"stop_token_ids {outside[:3]} are not token ids of this model (they lie in [0, {vocab}))")
        room = min(self.context_length, self.kv_cache_tokens) - len(prompt_token_ids)
        if room < 1:
            limit = min(self.context_length, self.kv_cache_tokens)
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens; this server holds at most {limit} "
                               "tokens per request (context length and KV cache size)")
        max_tokens = min(params.max_tokens or room, room)
        seq = Sequence(list(prompt_token_ids), params, request_id=request_id,
                       stop_token_ids=params.stop_token_set(self.model.config.eos_token_ids if default_stop_ids is None
                                                            else default_stop_ids), max_tokens=max_tokens,
                       constraint=constraint)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = self.runner.run(batch)
        tokens = {key: token for key, (token, _, _) in sampled.items()}
        self.scheduler.finish_step(batch, tokens)
        totals = self._totals
        totals["steps"] += 1
        totals["batch_tokens"] += sum(item.num_tokens for item in batch)
        totals["last_batch_size"] = len(batch)
        outputs = []
        for item in batch:
            seq = item.seq
            if id(seq) not in sampled:
                continue
            token, sample, row = sampled[id(seq)]
            logprob = None
            if seq.params.logprobs and sample.logprobs is not None:
                logprob = TokenLogprob(token, float(sample.logprobs[row]), sample.top_logprobs_of(row))
            totals["generation_tokens"] += 1
            if len(seq.output_token_ids) == 1:
                totals["prompt_tokens"] += len(seq.prompt_token_ids)
            prompt_logprobs = None
            if seq.prompt_logprobs is not None and len(seq.output_token_ids) == 1:
                prompt_logprobs = tuple(None if entry is None else TokenLogprob(*entry) for entry in seq.prompt_logprobs)
            outputs.append(StepOutput(seq.request_id, token, seq.is_finished, seq.finish_reason, logprob,
                                      len(seq.prompt_token_ids), seq.num_cached_prompt_tokens,
                                      len(seq.output_token_ids), prompt_logprobs))
        return outputs

    @property
    def stats(self) -> EngineStats:
        return EngineStats(**self._totals, expert_rows=self.runner.expert_rows,
                           preemptions=self.scheduler.num_preemptions, running=len(self.scheduler.running),
                           waiting=len(self.scheduler.waiting), max_num_seqs=self.max_num_seqs,
                           kv_usage=self.kv_usage())

    def kv_usage(self) -> float:
        return self.kv.usage()

    def run_until_done(self) -> None:
        while self.has_unfinished():
            self.step()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.bfloat16, **kwargs) -> "LLMEngine":
        return cls(Model.from_pretrained(path, device=device, dtype=dtype), **kwargs)

