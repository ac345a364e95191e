"""Token sampling, vectorised over a batch of rows that each have their own parameters.

One `Sampler.sample` call turns logits [B, V] into one token per row:

    logits -> penalties -> (logprobs reported here) -> temperature -> top-k -> top-p -> min-p -> draw

Choices, and why:

* Every step is a batched tensor op with per-row parameter tensors; rows never read each other's
  data, so a row samples the same token whatever batch it sits in (batch invariance).
* Truncation is a per-row probability cut-off: a token survives when its probability is at least
  the row's cut-off. Top-k, top-p and min-p each raise the cut-off. Ties at the cut-off are kept,
  so top-k may keep more than k tokens when probabilities are exactly equal.
  Order: top-k first, top-p over what top-k kept (renormalised), then min-p (relative to the most
  likely token, which is unaffected by the earlier cuts).
* The draw is an inverse CDF over the kept probabilities in vocabulary order, with one uniform
  number per row taken from that row's own generator. One number per step makes a seeded row
  cheap and reproducible; CPU generators make the draw the same on every device.
* Greedy rows (temperature 0) take the argmax of the penalised logits and draw nothing, so their
  generator is left untouched.
* Logprobs are the log-softmax of the logits after penalties but before temperature and
  truncation: the model's own distribution, which stays finite and meaningful for the top
  alternatives even at temperature 0 or under a tight top-p.
* Everything is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

import torch

from gptoss.tokenizer import ASSISTANT_STOP_IDS as HARMONY_STOP_TOKEN_IDS  # <|return|>, <|call|>

MAX_TOP_LOGPROBS = 20
# Stop strings are matched against every new piece of text: bound the work one request can ask for
# (OpenAI takes 4; vLLM and llama.cpp take more).
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 512

# Penalty input: a dense [B, V] count tensor, or per-row {token_id: count} dicts, or nothing.
TokenCountsLike = Union[Sequence[Mapping[int, int]], None]  # per row: token id -> times generated


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Defaults follow the gpt-oss model card (temperature 1, top_p 1).

    `top_k` 0 or -1 turns top-k off (-1 is stored as 0). `max_tokens` None runs until the context
    ends. `stop` holds strings that end the output (not included in it); a str or list is
    normalised to a tuple. `stop_token_ids` adds to the harmony stop tokens, which `ignore_eos`
    drops. Counts for the penalties are of generated tokens only.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # Logprobs of the prompt's own tokens (each given the ones before it), with this many
    # alternatives; None: not computed. Such a request skips the prefix cache (every prompt
    # position must go through the model).
    prompt_logprobs: int | None = None

    def __post_init__(self):
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: {name} must be {allowed}")

        def check_float(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            if not _is_number(value) or not math.isfinite(value):
                raise bad(name, allowed)
            if value < lo or value > hi or (lo_open and value == lo):
                raise bad(name, allowed)
            object.__setattr__(self, name, float(value))

        check_float("temperature", 0.0, 2.0)
        check_float("top_p", 0.0, 1.0, lo_open=True)
        check_float("min_p", 0.0, 1.0)
        check_float("presence_penalty", -2.0, 2.0)
        check_float("frequency_penalty", -2.0, 2.0)
        rp = self.repetition_penalty
        if not _is_number(rp) or not math.isfinite(rp) or rp <= 0:
            raise bad("repetition_penalty", "a finite number > 0 (1 = off)")
        object.__setattr__(self, "repetition_penalty", float(rp))

        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or 0 or -1 to turn it off")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "None or an integer in [-2**63, 2**64)")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "None or an integer >= 1")

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
            raise ValueError(f"stop=({len(stop)} strings) is invalid: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} "
                             f"characters each (got {len(stop)}, the longest {max(map(len, stop))})")
        object.__setattr__(self, "stop", tuple(stop))

        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

        for name in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > 0 and not self.logprobs:
            raise bad("top_logprobs", "0 unless logprobs is true")
        pl = self.prompt_logprobs
        if pl is not None and (not _is_int(pl) or not 0 <= pl <= MAX_TOP_LOGPROBS):
            raise bad("prompt_logprobs", f"None or an integer in [0, {MAX_TOP_LOGPROBS}]")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from request fields; unknown names are an error, None means "use the default"."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in kwargs if k not in valid)
        if unknown:
            raise ValueError(
                f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                f"valid names are: {', '.join(valid)}"
            )
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_token_set(self, default_stop_ids: Sequence[int] = HARMONY_STOP_TOKEN_IDS) -> frozenset[int]:
        """The token ids that end this request: the defaults (unless ignore_eos) plus stop_token_ids."""
        defaults = () if self.ignore_eos else tuple(default_stop_ids)
        return frozenset(defaults) | frozenset(self.stop_token_ids)

    def finish_reason(
        self,
        token_id: int,
        num_generated: int,
        default_stop_ids: Sequence[int] = HARMONY_STOP_TOKEN_IDS,
    ) -> str | None:
        """"stop" if `token_id` is a stop token, "length" if max_tokens is reached, else None.

        `num_generated` counts `token_id` itself. Stop strings are the StopStringMatcher's job.
        """
        if token_id in self.stop_token_set(default_stop_ids):
            return "stop"
        if self.max_tokens is not None and num_generated >= self.max_tokens:
            return "length"
        return None

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed` (None for an unseeded request).

    The sampler draws one number per step from it, so the same seed gives the same draws on any
    device and in any batch.
    """
    if seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], output_token_counts: TokenCountsLike
) -> torch.Tensor:
    """Return float32 logits with repetition, frequency and presence penalties applied.

    For every token already generated c > 0 times: the repetition penalty divides a positive logit
    (multiplies a negative one) by r, then `frequency_penalty * c + presence_penalty` is
    subtracted (the OpenAI definition). The input is never modified.
    """
    logits = logits.float()
    if output_token_counts is None or not any(p.uses_penalties for p in params):
        return logits
    device = logits.device
    # Sparse: gather only the seen (row, token) pairs, penalise them, scatter them back.
    if len(output_token_counts) != logits.shape[0]:
        raise ValueError(f"got {len(output_token_counts)} token-count rows for {logits.shape[0]} logits rows")
    rows, cols, cnts, rep, freq, pres = [], [], [], [], [], []
    for i, (p, row_counts) in enumerate(zip(params, output_token_counts)):
        if not p.uses_penalties or not row_counts:
            continue
        for token, count in row_counts.items():
            if count > 0:
                rows.append(i)
                cols.append(token)
                cnts.append(count)
                rep.append(p.repetition_penalty)
                freq.append(p.frequency_penalty)
                pres.append(p.presence_penalty)
    if not rows:
        return logits
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    cnt, r, f, pr = (torch.tensor(x, dtype=torch.float32, device=device) for x in (cnts, rep, freq, pres))
    values = logits[index]
    values = torch.where(values > 0, values / r, values * r) - f * cnt - pr
    return logits.index_put(index, values)


@dataclass
class SampleOutput:
    """One sampled token per row, and logprobs when any row asked for them.

    `logprobs[i]` is the chosen token's logprob; `top_ids`/`top_logprobs` hold the K most likely
    tokens per row, K the largest `top_logprobs` in the batch; `num_top[i]` says how many of those
    row i asked for. Logprobs are computed for all rows together, so rows that did not ask get
    values too, which the caller ignores.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    num_top: tuple[int, ...] = ()

    def top_logprobs_of(self, row: int) -> list[tuple[int, float]]:
        """Row `row`'s requested alternatives as (token_id, logprob), most likely first."""
        if self.top_ids is None or not self.num_top or self.num_top[row] == 0:
            return []
        k = self.num_top[row]
        return list(zip(self.top_ids[row, :k].tolist(), self.top_logprobs[row, :k].tolist()))


class Sampler:
    """Samples one token per row from logits [B, V], each row with its own SamplingParams.

    `seed` seeds the sampler's own generator, used for rows that have no generator of their own.
    """

    def __init__(self, seed: int | None = None):
        self._generator = torch.Generator(device="cpu")
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams] | SamplingParams,
        output_token_counts: TokenCountsLike = None,
        generators: Sequence[torch.Generator | None] | None = None,
        masks: tuple[torch.Tensor, list[int]] | None = None,
    ) -> SampleOutput:
        """`masks`: (int32 bitmask [B, V/32], rows it applies to) of structured-output constraints;
        a constrained row samples only among the tokens its bits allow."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if isinstance(params, SamplingParams):
            params = [params] * batch
        if len(params) != batch:
            raise ValueError(f"got {len(params)} SamplingParams for {batch} logits rows")
        if generators is None:
            generators = [None] * batch
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} logits rows")
        device = logits.device

        logits = apply_penalties(logits, params, output_token_counts)
        if masks is not None:
            from gptoss.structured import apply_masks
            logits = apply_masks(logits, *masks)
        token_ids = logits.argmax(dim=-1)

        # Sample the non-greedy rows as one sub-batch; greedy rows keep their argmax.
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sub = [params[i] for i in rows]
            uniforms = self._uniforms([generators[i] for i in rows]).to(device)
            index = torch.tensor(rows, device=device)
            probs = _truncated_probs(logits.index_select(0, index), sub)
            token_ids = token_ids.index_copy(0, index, _inverse_cdf(probs, uniforms))

        out = SampleOutput(token_ids=token_ids)
        if any(p.logprobs for p in params):
            logprobs = torch.log_softmax(logits, dim=-1)
            out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            k = min(max(p.top_logprobs for p in params), vocab)
            if k > 0:
                out.top_logprobs, out.top_ids = logprobs.topk(k, dim=-1)
                out.num_top = tuple(min(p.top_logprobs, vocab) if p.logprobs else 0 for p in params)
        return out

    def _uniforms(self, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """One uniform number in [0, 1) per row, from the row's generator or the sampler's own."""
        draws = []
        for g in generators:
            g = self._generator if g is None else g
            draws.append(torch.rand((), generator=g, dtype=torch.float64, device=g.device).cpu())
        return torch.stack(draws).float()


def _truncated_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Softmax at each row's temperature with tokens below the row's cut-off set to zero."""
    batch, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    cutoff = torch.zeros(batch, device=device)

    ks = [min(p.top_k, vocab) if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top_values = probs.topk(max(ks), dim=-1).values
        k = torch.tensor(ks, device=device)
        kth = top_values.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
        cutoff = torch.where(k > 0, kth, cutoff)

    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
        ordered = probs.sort(dim=-1, descending=True).values
        kept = torch.where(ordered >= cutoff[:, None], ordered, 0.0)
        cumulative = kept.cumsum(dim=-1)
        before = cumulative - kept  # mass of the more likely tokens
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        in_nucleus = before < top_p[:, None] * cumulative[:, -1:]
        smallest = torch.where(in_nucleus, ordered, math.inf).amin(dim=-1)
        cutoff = torch.where(top_p < 1.0, torch.maximum(cutoff, smallest), cutoff)

    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        cutoff = torch.maximum(cutoff, min_p * probs.amax(dim=-1))

    return torch.where(probs >= cutoff[:, None], probs, 0.0)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Pick per row the first token whose cumulative mass exceeds u x total (u in [0, 1)).

    Zero-probability tokens add nothing to the cumulative sum, so they cannot be picked; the
    final check guards against scan rounding on parallel hardware by falling back to the argmax.
    """
    cdf = probs.cumsum(dim=-1)
    target = (uniforms[:, None] * cdf[:, -1:]).clamp(min=torch.finfo(torch.float32).tiny)
    picked = torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.shape[1] - 1)
    ok = probs.gather(1, picked[:, None]).squeeze(1) > 0
    return torch.where(ok, picked, probs.argmax(dim=-1))


@dataclass(frozen=True)
class StopMatch:
    """What a StopStringMatcher.feed call found.

    `emit` is the text safe to stream now; `stopped` says a stop string occurred, `stop` which.
    `held_back` is how many characters at the end are withheld because they may begin a stop.
    """

    emit: str
    stopped: bool = False
    stop: str | None = None
    held_back: int = 0


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in text[start:] as (index, stop); the longest wins a tie."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, start)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(stop) > len(best[1]))):
            best = (at, stop)
    return best


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopStringMatcher:
    """Finds stop strings in text that arrives in pieces, for streaming.

    Feed each decoded delta; the matcher returns the text that can be streamed now. Text that
    could be the beginning of a stop string is held back until the next delta settles it. When a
    stop string occurs the output is cut before it (the stop string is not part of the output, as
    in the OpenAI API) and further deltas are ignored. At the end of a generation that did not
    stop on a string, `flush` releases the held-back text.
    """

    def __init__(self, stops: Sequence[str] | str = ()):
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops = stops
        self._max_len = max((len(s) for s in stops), default=0)
        self._text = ""  # all text received, up to the stop if one occurred
        self._emitted = 0  # characters of _text already returned
        self._searched = 0  # text[: _searched] is known not to contain the start of a stop
        self.stopped = False
        self.stop: str | None = None

    @property
    def text(self) -> str:
        """The output so far: everything received, cut before the stop string if one occurred."""
        return self._text

    def feed(self, delta: str) -> StopMatch:
        if self.stopped:
            return StopMatch("", True, self.stop, 0)
        self._text += delta
        if not self.stops:
            return self._emit_up_to(len(self._text))
        found = find_stop(self._text, self.stops, self._searched)
        if found is not None:
            at, stop = found
            self._text = self._text[:at]
            self.stopped, self.stop = True, stop
            match = self._emit_up_to(at)
            return StopMatch(match.emit, True, stop, 0)
        # A stop that starts before the last max_len-1 characters would have been found already.
        self._searched = max(0, len(self._text) - self._max_len + 1)
        hold = partial_stop_length(self._text, self.stops)
        return self._emit_up_to(len(self._text) - hold)

    def flush(self) -> str:
        """Release the held-back text once no more deltas will come."""
        return self._emit_up_to(len(self._text)).emit

    def _emit_up_to(self, end: int) -> StopMatch:
        end = max(end, self._emitted)
        emit = self._text[self._emitted : end]
        self._emitted = end
        return StopMatch(emit, False, None, len(self._text) - end)
