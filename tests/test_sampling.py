"""Tests for gptoss.sampling: the batched sampler, parameter validation and stop strings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptoss.sampling import (
    HARMONY_STOP_TOKEN_IDS,
    Sampler,
    SamplingParams,
    StopStringMatcher,
    apply_penalties,
    find_stop,
    make_generator,
    partial_stop_length,
)


def random_logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row, done as one batch of n identical rows."""
    logits = logits_row.expand(n, -1).clone()
    return Sampler(seed=seed).sample(logits, [params] * n).token_ids


# -- defaults and validation --------------------------------------------------------------------


def test_defaults_follow_the_model_card():
    p = SamplingParams()
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.max_tokens is None and p.stop == () and not p.logprobs


def test_normalisation():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[5, 6]).stop_token_ids == (5, 6)
    assert SamplingParams(top_k=-1).top_k == 0
    assert isinstance(SamplingParams(temperature=1).temperature, float)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("presence_penalty", 2.1),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("seed", 1.5),
        ("seed", 2**64),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["x"]),
        ("logprobs", 1),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value) or field in ("stop",)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=3)
    assert SamplingParams(logprobs=True, top_logprobs=20).top_logprobs == 20


def test_from_kwargs():
    assert SamplingParams.from_kwargs(temperature=0.5, top_p=None) == SamplingParams(temperature=0.5)
    with pytest.raises(ValueError, match="unknown sampling parameter.*'topp'.*valid names are:.*top_p"):
        SamplingParams.from_kwargs(topp=0.5)


def test_stop_tokens_and_finish_reason():
    assert HARMONY_STOP_TOKEN_IDS == (200002, 200012)
    p = SamplingParams(max_tokens=3, stop_token_ids=[7])
    assert p.stop_token_set() == {200002, 200012, 7}
    assert p.finish_reason(200012, 1) == "stop"
    assert p.finish_reason(7, 1) == "stop"
    assert p.finish_reason(8, 2) is None
    assert p.finish_reason(8, 3) == "length"
    q = SamplingParams(ignore_eos=True, stop_token_ids=[7])
    assert q.stop_token_set() == {7}
    assert q.finish_reason(200002, 10) is None


# -- truncation ------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_leaves_the_generator_alone():
    logits = random_logits(8, 50)
    gens = [make_generator(i) for i in range(8)]
    states = [g.get_state() for g in gens]
    out = Sampler(seed=0).sample(logits, [SamplingParams(temperature=0)] * 8, generators=gens)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))


def test_greedy_accepts_bfloat16_logits():
    logits = random_logits(4, 50).bfloat16()
    out = Sampler(seed=0).sample(logits, SamplingParams(temperature=0))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))


@pytest.mark.parametrize(
    "params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0, temperature=2.0)]
)
def test_degenerate_truncation_is_greedy(params):
    logits = random_logits(64, 100, seed=1)
    out = Sampler(seed=0).sample(logits, [params] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_min_p_support():
    logits = PROBS.log()
    drawn = set(draw_many(logits, SamplingParams(min_p=0.5), 2000).tolist())
    assert drawn == {0, 1}  # 0.3 >= 0.5 * 0.5 > 0.15


def test_top_p_support_and_renormalisation():
    logits = PROBS.log()
    tokens = draw_many(logits, SamplingParams(top_p=0.7), 4000)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_top_k_then_top_p():
    logits = PROBS.log()
    # top-k 3 renormalises to [0.526, 0.316, 0.158]; top-p 0.85 then needs all three.
    assert set(draw_many(logits, SamplingParams(top_k=3, top_p=0.85), 3000).tolist()) == {0, 1, 2}
    assert set(draw_many(logits, SamplingParams(top_k=2), 3000).tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    n = 8000
    tokens = draw_many(logits, SamplingParams(temperature=temperature), n, seed=123)
    empirical = torch.bincount(tokens, minlength=5).float() / n
    expected = torch.softmax(logits / temperature, -1)
    assert (empirical - expected).abs().max().item() < 0.025


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    vocab=st.integers(2, 40),
    rows=st.integers(1, 4),
)
def test_sampled_tokens_lie_in_the_allowed_set(data, vocab, rows):
    logits = torch.tensor(
        data.draw(st.lists(st.lists(st.floats(-8, 8), min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    )
    params = [
        SamplingParams(
            temperature=data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.0])),
            top_k=data.draw(st.integers(-1, vocab + 2)),
            top_p=data.draw(st.sampled_from([0.05, 0.3, 0.7, 0.95, 1.0])),
            min_p=data.draw(st.sampled_from([0.0, 0.05, 0.3, 0.9])),
        )
        for _ in range(rows)
    ]
    repeat = 32  # several draws of every row, all in one batch
    batch_logits = logits.repeat_interleave(repeat, dim=0)
    batch_params = [p for p in params for _ in range(repeat)]
    tokens = Sampler(seed=data.draw(st.integers(0, 2**32))).sample(batch_logits, batch_params).token_ids
    for i, p in enumerate(params):
        allowed = reference_support(logits[i], p)
        chosen = set(tokens[i * repeat : (i + 1) * repeat].tolist())
        assert chosen <= allowed, (p, logits[i].tolist(), chosen, allowed)


def reference_support(logits: torch.Tensor, p: SamplingParams, slack: float = 1e-5) -> set[int]:
    """The tokens a row may pick, computed plainly in float64 and with a little slack at the edges."""
    if p.temperature == 0:
        top = logits.max().item()
        return {i for i, x in enumerate(logits.tolist()) if x == top}
    probs = torch.softmax(logits.double() / p.temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    cut = 0.0
    if p.top_k > 0 and p.top_k < len(probs):
        cut = probs[order[p.top_k - 1]]
    if p.top_p < 1:
        kept = [probs[i] for i in order if probs[i] >= cut * (1 - slack)]
        total, mass = sum(kept), 0.0
        for q in kept:
            if mass >= (p.top_p + slack) * total:
                break
            smallest, mass = q, mass + q
        cut = max(cut, smallest)
    cut = max(cut, p.min_p * probs[order[0]])
    return {i for i, q in enumerate(probs) if q >= cut * (1 - slack) and q > 0}


# -- penalties -----------------------------------------------------------------------------------


def test_penalties_shift_the_right_logits():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5], [1.0, 2.0, -1.0, 0.5]])
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),  # no penalties: row untouched even though it has counts
    ]
    counts = [{1: 2, 2: 1}, {0: 3}]
    expected = torch.tensor([[1.0, 2.0 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 0.5], [1.0, 2.0, -1.0, 0.5]])
    before = logits.clone()
    assert torch.allclose(apply_penalties(logits, params, counts), expected)
    assert torch.equal(logits, before)  # input untouched


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    expected = torch.tensor([[1.0, -4.0, 1.0]])
    assert torch.allclose(apply_penalties(logits, params, [{0: 1, 1: 5}]), expected)


def test_penalised_greedy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.5]])
    greedy = SamplingParams(temperature=0, frequency_penalty=0.5)
    out = Sampler().sample(logits, [greedy], [{4: 2}])
    assert out.token_ids.tolist() == [3]  # 3.5 - 2 * 0.5 = 2.5 < 3.0


# -- seeds and batch invariance -------------------------------------------------------------------


def run_steps(logits_per_step, params, seeds, counts=None):
    sampler = Sampler(seed=99)
    gens = [make_generator(s) for s in seeds]
    return torch.stack([sampler.sample(lg, params, counts, gens).token_ids for lg in logits_per_step])


def test_same_seed_same_tokens():
    steps = [random_logits(1, 300, seed=s, scale=1.0) for s in range(20)]
    p = [SamplingParams(temperature=1.0, top_p=0.95)]
    assert torch.equal(run_steps(steps, p, [7]), run_steps(steps, p, [7]))
    assert not torch.equal(run_steps(steps, p, [7]), run_steps(steps, p, [8]))
    assert make_generator(None) is None


@pytest.mark.parametrize("position", [0, 3, 5])
def test_seeded_row_is_batch_invariant(position):
    vocab, n_steps = 300, 20
    mine = SamplingParams(temperature=0.9, top_k=50, seed=7)
    alone_steps = [random_logits(1, vocab, seed=s, scale=1.0) for s in range(n_steps)]
    alone = run_steps(alone_steps, [mine], [7])[:, 0]

    others = [
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.5, min_p=0.1),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(),
    ]
    params = others[:position] + [mine] + others[position:]
    seeds = [None, 1, 2, None, 4]
    seeds = seeds[:position] + [7] + seeds[position:]
    batch_steps = []
    for s, own in enumerate(alone_steps):
        rest = random_logits(len(others), vocab, seed=1000 + s)
        batch_steps.append(torch.cat([rest[:position], own, rest[position:]]))
    counts = [{1: 2}] * len(params)  # penalties on for one other row only
    together = run_steps(batch_steps, params, seeds, counts)[:, position]
    assert torch.equal(alone, together)


# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_match_log_softmax_after_penalties():
    logits = random_logits(3, 40, seed=5)
    counts = [{0: 1}, {}, {}]
    params = [
        SamplingParams(logprobs=True, top_logprobs=5, presence_penalty=1.0),
        SamplingParams(temperature=0, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=0.3, top_k=4),  # asked for nothing
    ]
    out = Sampler(seed=0).sample(logits, params, counts)
    reference = torch.log_softmax(apply_penalties(logits, params, counts), -1)
    assert torch.allclose(out.logprobs, reference.gather(1, out.token_ids[:, None]).squeeze(1))
    values, ids = reference.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ids) and torch.allclose(out.top_logprobs, values)
    assert out.num_top == (5, 2, 0)
    row1 = out.top_logprobs_of(1)
    assert [t for t, _ in row1] == ids[1, :2].tolist()
    assert math.isclose(row1[0][1], values[1, 0].item(), rel_tol=1e-6)
    assert out.top_logprobs_of(2) == []
    assert out.token_ids[1] == ids[1, 0]  # greedy picks the top alternative


def test_no_logprobs_unless_asked():
    out = Sampler(seed=0).sample(random_logits(2, 10), SamplingParams())
    assert out.logprobs is None and out.top_ids is None


def test_shape_errors():
    sampler = Sampler(seed=0)
    with pytest.raises(ValueError, match="SamplingParams"):
        sampler.sample(random_logits(2, 10), [SamplingParams()])
    with pytest.raises(ValueError, match="generators"):
        sampler.sample(random_logits(2, 10), SamplingParams(), generators=[None])
    with pytest.raises(ValueError, match="batch, vocab"):
        sampler.sample(torch.zeros(10), SamplingParams())


# -- stop strings ----------------------------------------------------------------------------------


def test_stop_spanning_deltas_is_cut_and_held_back():
    m = StopStringMatcher(["<END>"])
    first = m.feed("Hello <E")
    assert first.emit == "Hello " and first.held_back == 2 and not first.stopped
    second = m.feed("N")
    assert second.emit == "" and second.held_back == 3
    third = m.feed("D> trailing")
    assert third.stopped and third.stop == "<END>" and third.emit == ""
    assert m.text == "Hello "
    assert m.feed("more").emit == "" and m.feed("more").stopped


def test_false_start_is_released():
    m = StopStringMatcher("<END>")
    assert m.feed("a <EN").emit == "a "
    r = m.feed("X b")
    assert r.emit == "<ENX b" and r.held_back == 0 and not r.stopped


def test_flush_releases_held_text():
    m = StopStringMatcher(["###"])
    assert m.feed("done #").emit == "done "
    assert m.flush() == "#"


def test_earliest_stop_wins():
    m = StopStringMatcher(["world", "lo w"])
    r = m.feed("hello world")
    assert r.stopped and r.stop == "lo w" and r.emit == "hel"
    assert find_stop("abcabc", ["bc", "abc"]) == (0, "abc")
    assert find_stop("xyz", ["a"]) is None
    assert partial_stop_length("foo ab", ["abc", "b"]) == 2


def test_no_stops_streams_everything():
    m = StopStringMatcher(())
    assert m.feed("abc").emit == "abc"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab#<>", max_size=40),
    stops=st.lists(st.text(alphabet="ab#<>", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
@example(text="<b<", stops=["b", "<b<"], cuts=[2])
def test_stop_matcher_agrees_with_whole_text_search(text, stops, cuts):
    """A stop is seen when the delta that completes it arrives (as a server checks after each
    token): the output is cut at the earliest start among the stops complete at the first delta
    that completes any. So `<b` then `<` with stops `b` and `<b<` stops on `b` and gives `<`,
    although `<b<` starts earlier in the whole text: it was not complete yet."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m = StopStringMatcher(stops)
    emitted = []
    for d in deltas:
        r = m.feed(d)
        emitted.append(r.emit)
        assert r.held_back <= max(len(s) for s in stops) - 1
    if not m.stopped:
        emitted.append(m.flush())
    expected, hit = text, False
    for end in bounds[1:]:
        starts = [text[:end].find(s) for s in stops if s in text[:end]]
        if starts:
            expected, hit = text[: min(starts)], True
            break
    assert "".join(emitted) == expected == m.text
    assert m.stopped == hit
