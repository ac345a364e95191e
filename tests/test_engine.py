"""The engine with a model: continuous batching must not change what a request returns."""

import dataclasses
import random

import pytest
import torch

from gptoss import Model, ModelConfig
from gptoss.engine.engine import LLMEngine, RequestError, parse_size
from gptoss.engine.runner import ModelRunner
from gptoss.sampling import SamplingParams
from gptoss.synth import write_random_checkpoint

VOCAB = 512
# Real head widths, tiny everything else; window 32 = two 16-token pages.
SMALL = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=VOCAB, num_hidden_layers=4, layer_types=(),
                            sliding_window=32)
# The real 128-token window.
WIDE = dataclasses.replace(SMALL, num_hidden_layers=2, layer_types=(), sliding_window=128)


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("engine") / "small", SMALL, seed=3)


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return Model.from_pretrained(small_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def model_bf16(small_checkpoint):
    return Model.from_pretrained(small_checkpoint, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("engine") / "wide", WIDE, seed=4)
    return Model.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return Model.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def reference_greedy(model, prompt, n):
    """The plain loop: the whole prompt in one forward, then one token at a time, on a KVCache."""
    cache = model.new_cache()
    tokens = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache, last_only=True)
        for _ in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), cache)
    return tokens


def random_prompts(lengths, seed=0, vocab=VOCAB):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def run(engine, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [engine.add_request(p, q, f"r{i}") for i, (p, q) in enumerate(zip(prompts, params))]
    engine.run_until_done()
    assert all(s.is_finished for s in seqs)
    return [s.output_token_ids for s in seqs]


def assert_cache_empty(engine):
    assert engine.kv.full.num_used == 0 and engine.kv.sliding.num_used == 0
    assert engine.kv.full.refs == [0] * engine.kv.full.num_blocks
    assert engine.kv.sliding.refs == [0] * engine.kv.sliding.num_blocks


# -- the engine computes what the plain loop computes ---------------------------------------

@pytest.mark.parametrize("which", ["small", "wide", "tiny"])
@pytest.mark.parametrize("budget", [32, 512])
def test_engine_greedy_matches_the_plain_loop(request, which, budget):
    model = request.getfixturevalue({"small": "model", "wide": "wide_model", "tiny": "tiny_model"}[which])
    window = model.config.sliding_window
    vocab = min(model.config.vocab_size, 50_000)
    # Shorter and longer than the window; with budget 32 the long ones take several chunks.
    lengths = [1, 7, 16, 33, window + 1, 2 * window + 5, 150]
    prompts = random_prompts(lengths, seed=1, vocab=vocab)
    engine = LLMEngine(model, kv_cache_size=8192, max_batched_tokens=budget)
    got = run(engine, prompts, greedy(10))
    assert got == [reference_greedy(model, p, 10) for p in prompts]
    assert_cache_empty(engine)


def test_a_long_prompt_does_not_stall_running_streams(model):
    engine = LLMEngine(model, kv_cache_size=8192, max_batched_tokens=64)
    short = engine.add_request([1, 2, 3], greedy(40), "short")
    engine.step()
    engine.step()
    long_prompt = random_prompts([600], seed=2)[0]
    long = engine.add_request(long_prompt, greedy(5), "long")
    prefill_steps = 0
    while long.in_prefill:
        outputs = engine.step()
        assert [o.request_id for o in outputs if o.request_id == "short"] == ["short"]
        prefill_steps += 1
    assert prefill_steps >= 600 // 64  # chunked, sharing every step with the running stream
    engine.run_until_done()
    assert short.output_token_ids == reference_greedy(model, [1, 2, 3], 40)
    assert long.output_token_ids == reference_greedy(model, long_prompt, 5)


# -- batching invariance ------------------------------------------------------------------------

def _alone_and_among_31(model):
    target = random_prompts([45], seed=7)[0]
    params = greedy(24)
    alone_engine = LLMEngine(model, kv_cache_size=8192)
    alone = run(alone_engine, [target], params)[0]

    rng = random.Random(11)
    others = random_prompts([rng.randint(1, 150) for _ in range(31)], seed=12)
    others_params = [greedy(rng.randint(20, 40)) for _ in others]
    engine = LLMEngine(model, kv_cache_size=16384, max_num_seqs=32, max_batched_tokens=256)
    sizes, with_target, mixed = [], [], []
    forward = engine.runner.forward

    def counting_forward(batch):  # one call = one model forward over the whole step
        sizes.append(batch.num_seqs)
        return forward(batch)

    engine.runner.forward = counting_forward
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        chunks = {item.seq.request_id: item.num_tokens for item in batch}
        if chunks.get("target") == 1 and max(chunks.values()) > 1:
            mixed.append(chunks)  # the target decodes in the same forward as someone's prefill
        return batch

    engine.scheduler.schedule = spy
    try:
        # Half of the crowd comes first, the target in the middle, the rest arrives while it runs,
        # so its decodes share steps with other requests' prefill chunks and decodes.
        early = [engine.add_request(p, q, f"o{i}") for i, (p, q) in enumerate(zip(others[:15], others_params))]
        seq = engine.add_request(target, params, "target")
        engine.step()
        engine.step()
        late = [engine.add_request(p, q, f"o{i + 15}") for i, (p, q) in
                enumerate(zip(others[15:], others_params[15:]))]
        steps = 2
        while engine.has_unfinished():
            running = not seq.is_finished
            engine.step()
            if running:
                with_target.append(sizes[-1])
            steps += 1
    finally:
        engine.runner.forward = forward
    assert len(sizes) == steps  # one model forward per step, whatever the batch
    assert max(with_target) == 32  # ...and one forward served the target among 31 others
    assert with_target.count(32) >= 5
    assert mixed
    assert_cache_empty(engine)
    crowd = [s.output_token_ids for s in early + late]
    return alone, seq.output_token_ids, crowd, others, others_params


def test_batching_invariance_alone_or_among_31_others(model):
    alone, together, crowd, others, others_params = _alone_and_among_31(model)
    assert together == alone
    assert alone == reference_greedy(model, random_prompts([45], seed=7)[0], 24)
    # Every member of the crowd too returns what it returns on its own.
    assert crowd == [reference_greedy(model, p, q.max_tokens) for p, q in zip(others, others_params)]


def test_batching_invariance_in_bfloat16(model_bf16):
    alone, together, _, _, _ = _alone_and_among_31(model_bf16)
    assert together == alone


# -- memory pressure, prefix caching ------------------------------------------------------------

@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_tiny_cache_gives_the_same_tokens(model, prefix_caching):
    prompts = random_prompts([30, 25, 40, 18, 33, 28], seed=5)
    params = greedy(20)
    roomy = run(LLMEngine(model, kv_cache_size=8192), prompts, params)
    # 8 blocks of 16 tokens, each request grows to 38-60 tokens (3-4 blocks): they cannot all fit.
    engine = LLMEngine(model, kv_cache_size=128, max_num_seqs=6, prefix_caching=prefix_caching)
    tight = run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert tight == roomy
    assert roomy == [reference_greedy(model, p, 20) for p in prompts]
    assert_cache_empty(engine)


def test_prefix_caching_reuses_blocks_and_changes_nothing(model):
    shared = random_prompts([100], seed=9)[0]  # longer than the 32-token window: 6 full pages
    first_prompt, second_prompt = shared + [1, 2], shared + [3, 4, 5]
    engine = LLMEngine(model, kv_cache_size=8192)
    first = run(engine, [first_prompt], greedy(8))[0]
    second = engine.add_request(second_prompt, greedy(8), "second")
    engine.run_until_done()
    assert second.num_cached_prompt_tokens == 96
    uncached_engine = LLMEngine(model, kv_cache_size=8192, prefix_caching=False)
    uncached = run(uncached_engine, [first_prompt, second_prompt], greedy(8))
    assert [first, second.output_token_ids] == uncached
    assert uncached == [reference_greedy(model, p, 8) for p in (first_prompt, second_prompt)]
    assert not uncached_engine.kv.full.by_hash and not uncached_engine.kv.full.evictable

    # The very same prompt again: everything but the last page's worth is reused.
    again = engine.add_request(second_prompt, greedy(8), "again")
    engine.run_until_done()
    assert again.num_cached_prompt_tokens == 96 and again.output_token_ids == second.output_token_ids
    assert_cache_empty(engine)


def test_prefix_shared_with_a_running_request(model):
    shared = random_prompts([70], seed=10)[0]
    engine = LLMEngine(model, kv_cache_size=8192, max_batched_tokens=64)
    first = engine.add_request(shared + [9], greedy(30), "first")
    while first.in_prefill or len(first.output_token_ids) < 3:
        engine.step()
    second = engine.add_request(shared + [8, 7], greedy(10), "second")
    engine.step()
    assert second.num_cached_prompt_tokens == 64  # first's pages, while first still runs
    assert not first.is_finished
    engine.run_until_done()
    assert first.output_token_ids == reference_greedy(model, shared + [9], 30)
    assert second.output_token_ids == reference_greedy(model, shared + [8, 7], 10)
    assert_cache_empty(engine)


# -- sampling, abort, errors --------------------------------------------------------------------

def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model):
    target = random_prompts([20], seed=13)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=10)
    alone = run(LLMEngine(model), [target], params)[0]
    rng = random.Random(0)
    others = random_prompts([rng.randint(1, 80) for _ in range(7)], seed=14)
    mixed_params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12) if i % 2 else
                    SamplingParams(temperature=1.0, max_tokens=9) for i in range(7)]
    mixed = run(LLMEngine(model, max_batched_tokens=64), others[:3] + [target] + others[3:],
                mixed_params[:3] + [params] + mixed_params[3:])
    assert mixed[3] == alone
    # And under preemption (the request is recomputed, its generator is not replayed).
    engine = LLMEngine(model, kv_cache_size=96, max_num_seqs=8)
    tight = run(engine, others[:3] + [target], mixed_params[:3] + [params])
    assert engine.scheduler.num_preemptions > 0
    assert tight[3] == alone
    # A different seed gives different tokens (the seed is really used).
    assert run(LLMEngine(model), [target], dataclasses.replace(params, seed=12))[0] != alone


def test_abort_mid_generation_frees_its_blocks(model):
    prompts = random_prompts([40, 70, 20], seed=15)
    engine = LLMEngine(model, kv_cache_size=8192)
    seqs = [engine.add_request(p, greedy(30), f"r{i}") for i, p in enumerate(prompts)]
    for _ in range(5):
        engine.step()
    victim = seqs[1]
    assert len(victim.output_token_ids) == 5 and not victim.is_finished
    held_full, held_sliding = len(victim.full_blocks), len(victim.sliding_blocks)
    used_full, used_sliding = engine.kv.full.num_used, engine.kv.sliding.num_used
    assert held_full == 5  # 75 tokens computed
    assert engine.abort("r1") is victim
    assert victim.is_finished and victim.finish_reason == "abort"
    assert victim.full_blocks == [] and victim.sliding_blocks == {}
    assert engine.kv.full.num_used == used_full - held_full
    assert engine.kv.sliding.num_used == used_sliding - held_sliding
    assert engine.abort("r1") is None
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert "r1" not in {o.request_id for o in outputs}
    assert len(victim.output_token_ids) == 5
    for i in (0, 2):
        assert seqs[i].output_token_ids == reference_greedy(model, prompts[i], 30)
    assert_cache_empty(engine)


def test_bad_requests_are_refused_clearly(model):
    engine = LLMEngine(model, kv_cache_size=64)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], greedy(1))
    with pytest.raises(RequestError, match=r"\[0, 512\)"):
        engine.add_request([1, 512], greedy(1))
    with pytest.raises(RequestError, match=r"\[0, 512\)"):
        engine.add_request([-1, 5], greedy(1))
    with pytest.raises(RequestError, match="the prompt has 64 tokens; this server holds at most 64 tokens"):
        engine.add_request(list(range(64)), greedy(1))
    assert not engine.has_unfinished()  # nothing was queued
    assert issubclass(RequestError, ValueError)

    # A prompt that fits gets what room is left, no more.
    seq = engine.add_request(list(range(60)), greedy(100))
    engine.run_until_done()
    assert seq.output_token_ids == reference_greedy(model, list(range(60)), 4)
    assert seq.finish_reason == "length"

    # The context length (64 * 32 = 2048 here) bounds a request as well as the cache.
    roomy = LLMEngine(model, kv_cache_size=8192)
    assert roomy.context_length == 2048
    with pytest.raises(RequestError, match="the prompt has 3000 tokens; this server holds at most 2048 tokens"):
        roomy.add_request([0] * 3000, greedy(1))
    with pytest.raises(RequestError, match="at most 2048"):
        roomy.add_request([0] * 2048, greedy(1))
    assert roomy.add_request([0] * 2047, greedy(10)).max_tokens == 1


def test_parse_size():
    assert parse_size("4GB") == ("bytes", 4_000_000_000)
    assert parse_size("512MiB") == ("bytes", 512 * 1024 ** 2)
    assert parse_size("65536") == ("tokens", 65536)
    assert parse_size(65536) == ("tokens", 65536)
    assert parse_size(" 2 GiB ") == ("bytes", 2 * 1024 ** 3)
    assert parse_size("1.5gb") == ("bytes", 1_500_000_000)
    assert parse_size("100kb") == ("bytes", 100_000)
    assert parse_size("4096 tokens") == ("tokens", 4096)
    assert parse_size(None) is None
    for bad in ["lots", "", "GB", "-1GB", "4XB", "4 G B", "1e9", "12 tokenz", "0x100"]:
        with pytest.raises(ValueError, match="cannot read the size"):
            parse_size(bad)


def test_kv_cache_size_in_bytes_is_a_budget(model):
    engine = LLMEngine(model, kv_cache_size="2MiB", max_num_seqs=4)
    assert 2 * 1024 ** 2 - ModelRunner.bytes_per_block(model.config, 16, model.dtype, False) \
        < engine.kv_cache_bytes <= 2 * 1024 ** 2
    # Allocated tensors are what was accounted for.
    allocated = sum(k.numel() * k.element_size() * 2 for k, _ in engine.runner.pools)
    assert allocated == engine.kv_cache_bytes
    tokens = LLMEngine(model, kv_cache_size="1000")
    assert tokens.kv_cache_tokens == 1008  # whole 16-token pages
    with pytest.raises(ValueError, match="too small"):
        LLMEngine(model, kv_cache_size="1KB")


def test_a_step_computes_exactly_its_real_tokens(model, monkeypatch):
    """A prefill chunk beside decodes: every layer's experts see the step's N tokens, no padding."""
    from gptoss import ops

    expert_rows, scheduled = [], []
    moe = ops.moe_experts
    monkeypatch.setattr(ops, "moe_experts", lambda x, *args: (expert_rows.append(x.shape[0]), moe(x, *args))[1])
    engine = LLMEngine(model, kv_cache_size=8192, max_batched_tokens=207)
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        scheduled.append(sum(item.num_tokens for item in batch))
        return batch

    engine.scheduler.schedule = spy
    for i, prompt in enumerate(random_prompts([5, 9, 3, 7, 12, 4, 6], seed=5)):
        engine.add_request(prompt, greedy(6), f"short{i}")
    engine.step()  # the seven short prompts prefill; from here on they decode
    engine.add_request(random_prompts([400], seed=6)[0], greedy(2), "long")
    engine.run_until_done()
    assert 207 in scheduled  # 7 decodes + a 200-token chunk of the long prompt in one step
    layers = model.config.num_hidden_layers
    assert expert_rows == [n for n in scheduled if n for _ in range(layers)]
    assert engine.runner.expert_rows == sum(scheduled) == engine.stats.batch_tokens == engine.stats.expert_rows


def test_stop_token_ids_outside_the_vocabulary_are_refused(model):
    engine = LLMEngine(model, kv_cache_size=256)
    with pytest.raises(RequestError, match="not token ids of this model"):
        engine.add_request([1, 2, 3], SamplingParams(stop_token_ids=(model.config.vocab_size + 5,)))


def test_prompt_logprobs_match_a_plain_forward_and_survive_chunking(model):
    """Each prompt token's logprob given the ones before it, as the model's own logits say; the
    same when the prompt is prefilled in small chunks, and never read from the prefix cache."""
    prompt = list(range(5, 80))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).float()[0]
    expected = torch.log_softmax(logits, -1)
    for budget in (512, 16):
        engine = LLMEngine(model, kv_cache_size=8192, max_batched_tokens=budget)
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2))  # warms the prefix cache
        engine.run_until_done()
        seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        first = next(o for o in outputs if o.request_id == seq.request_id)
        assert first.cached_tokens == 0 and first.prompt_logprobs is not None
        entries = first.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position, entry in enumerate(entries[1:]):
            assert entry.token_id == prompt[position + 1]
            assert abs(entry.logprob - expected[position, entry.token_id].item()) < 1e-3
            assert [t for t, _ in entry.top] == expected[position].topk(3).indices.tolist()
