"""The engine: cache manager and scheduler without a model, then the whole loop on a small model."""

import dataclasses

import pytest
import torch

from gptoss import Model, ModelConfig
from gptoss.engine.engine import LLMEngine, RequestError, parse_size
from gptoss.engine.kv_cache import BlockPool, KVCacheManager
from gptoss.engine.scheduler import Scheduler
from gptoss.engine.sequence import Sequence
from gptoss.sampling import SamplingParams
from gptoss.synth import write_random_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=6)


# -- pure Python ------------------------------------------------------------------------------

def test_block_pool_refcounts_and_evictable_prefix_blocks():
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 111)
    pool.release(a)  # hashed: stays findable, but counts as available
    assert pool.lookup(111) == a and pool.num_available == 2
    pool.acquire(a)
    assert pool.num_available == 1
    pool.release(a)
    pool.release(b)
    c1, c2, c3 = pool.allocate(), pool.allocate(), pool.allocate()  # free blocks first, then evict a
    assert {c1, c2, c3} == {0, 1, 2} and pool.lookup(111) is None


def _fake_step(scheduler, token=7):
    batch = scheduler.schedule()
    sampled = {id(item.seq): token for item in batch if item.samples}
    scheduler.finish_step(batch, sampled)
    return batch


def test_sliding_pool_holds_only_the_window_during_a_long_decode():
    kv = KVCacheManager(num_full_blocks=200, num_sliding_blocks=40, block_size=16, window=128)
    scheduler = Scheduler(kv, max_num_seqs=4, max_batched_tokens=64)
    seq = Sequence(list(range(500)), SamplingParams(max_tokens=1000), max_tokens=1000)
    scheduler.add(seq)
    most = 0
    for _ in range(700):
        _fake_step(scheduler)
        most = max(most, len(seq.sliding_blocks))
        if not seq.in_prefill:
            assert len(seq.sliding_blocks) <= 128 // 16 + 2
    assert len(seq.full_blocks) == -(-seq.num_computed // 16)
    assert most <= 2 * (128 // 16) + 2


def test_long_prompt_is_chunked_and_shares_steps_with_decodes():
    kv = KVCacheManager(1000, 200, 16, 128)
    scheduler = Scheduler(kv, max_num_seqs=8, max_batched_tokens=32)
    short = Sequence([1, 2, 3], SamplingParams(max_tokens=50), max_tokens=50)
    scheduler.add(short)
    _fake_step(scheduler)  # short is decoding now
    long = Sequence(list(range(300)), SamplingParams(max_tokens=5), max_tokens=5)
    scheduler.add(long)
    for _ in range(5):
        batch = _fake_step(scheduler)
        sizes = {id(item.seq): item.num_tokens for item in batch}
        assert sizes[id(short)] == 1  # the running stream keeps decoding
        assert sizes[id(long)] == 31  # the prompt goes through in budget-sized chunks
        assert sum(sizes.values()) <= 32


def test_preemption_frees_blocks_and_the_request_resumes():
    kv = KVCacheManager(num_full_blocks=6, num_sliding_blocks=40, block_size=4, window=8, prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=4, max_batched_tokens=64)
    seqs = [Sequence(list(range(i, i + 6)), SamplingParams(max_tokens=8), max_tokens=8) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    for _ in range(200):
        if not scheduler.has_work():
            break
        _fake_step(scheduler)
    assert scheduler.num_preemptions > 0
    assert all(s.is_finished and len(s.output_token_ids) == 8 for s in seqs)
    assert kv.full.num_available == 6 and kv.sliding.num_available == 40


def test_prefix_cache_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(100, 100, 4, 8)
    scheduler = Scheduler(kv, max_num_seqs=4, max_batched_tokens=64)
    first = Sequence(list(range(16)), SamplingParams(max_tokens=1), max_tokens=1)
    scheduler.add(first)
    _fake_step(scheduler)
    again = Sequence(list(range(16)), SamplingParams(max_tokens=1), max_tokens=1)
    scheduler.add(again)
    batch = _fake_step(scheduler)
    assert again.num_cached_prompt_tokens == 12 and batch[0].num_tokens == 4


def test_parse_size():
    assert parse_size("65536") == ("tokens", 65536)
    assert parse_size("4GB") == ("bytes", 4_000_000_000)
    assert parse_size("512MiB") == ("bytes", 512 * 1024 ** 2)
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


# -- with a model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=1024, num_hidden_layers=3, layer_types=())
    folder = write_random_checkpoint(tmp_path_factory.mktemp("engine") / "m", config, seed=2)
    return Model.from_pretrained(folder, dtype=torch.float32)


def reference_greedy(model, prompt, n):
    cache = model.new_cache()
    tokens = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache, last_only=True)
        for _ in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), cache)
    return tokens


def prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (int(torch.randint(3, 60, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def run(engine, batch, params=GREEDY):
    seqs = [engine.add_request(p, params, f"r{i}") for i, p in enumerate(batch)]
    engine.run_until_done()
    return [s.output_token_ids for s in seqs]


def test_engine_matches_the_plain_greedy_loop(model):
    batch = prompts(4) + [list(range(40))]  # 40 > window 8: several pages, chunked prefill
    got = run(LLMEngine(model, kv_cache_size=2048, max_batched_tokens=16), batch)
    assert got == [reference_greedy(model, p, 6) for p in batch]


def test_batching_invariance_alone_or_among_31_others(model):
    target = list(range(100, 130))
    alone = run(LLMEngine(model, kv_cache_size=4096), [target])[0]
    crowd = prompts(31, seed=5)
    together = run(LLMEngine(model, kv_cache_size=4096, max_num_seqs=32), crowd[:15] + [target] + crowd[15:])
    assert together[15] == alone


def test_preemption_under_a_tiny_cache_gives_the_same_tokens(model):
    batch = [list(range(i * 40, i * 40 + 32)) for i in range(6)]  # two pages each, a third to decode
    roomy = run(LLMEngine(model, kv_cache_size=4096), batch)
    engine = LLMEngine(model, kv_cache_size=160, max_num_seqs=6)
    tight = run(engine, batch)
    assert engine.scheduler.num_preemptions > 0
    assert tight == roomy


def test_prefix_caching_reuses_blocks_and_changes_nothing(model):
    shared = list(range(200, 260))
    engine = LLMEngine(model, kv_cache_size=4096)
    run(engine, [shared + [1, 2]])
    seq = engine.add_request(shared + [3, 4, 5], GREEDY, "second")
    engine.run_until_done()
    assert seq.num_cached_prompt_tokens == 48  # three full 16-token pages of the 60 shared tokens
    uncached = run(LLMEngine(model, kv_cache_size=4096, prefix_caching=False), [shared + [3, 4, 5]])[0]
    assert seq.output_token_ids == uncached


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=6)
    alone = run(LLMEngine(model), [[5, 6, 7]], params)[0]
    mixed = run(LLMEngine(model), prompts(5) + [[5, 6, 7]], params)[-1]
    assert mixed == alone


def test_abort_frees_the_cache(model):
    engine = LLMEngine(model, kv_cache_size=1024)
    engine.add_request(list(range(50)), SamplingParams(max_tokens=100), "gone")
    engine.step()
    engine.abort("gone")
    assert not engine.has_unfinished()
    assert engine.kv.full.num_used == 0 and engine.kv.sliding.num_used == 0


def test_bad_requests_are_refused_clearly(model):
    engine = LLMEngine(model, kv_cache_size=64)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(RequestError, match=r"\[0, 1024\)"):
        engine.add_request([5000], GREEDY)
    with pytest.raises(RequestError, match="at most 64 tokens"):
        engine.add_request(list(range(100)), GREEDY)
