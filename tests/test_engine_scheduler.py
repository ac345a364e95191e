"""Continuous batching (Scheduler + KVCacheManager) driven by fake model steps, without a model."""

import math
import random

from gptoss.engine.kv_cache import KVCacheManager
from gptoss.engine.scheduler import Scheduler
from gptoss.engine.sequence import Sequence, Status
from gptoss.sampling import SamplingParams


def make_seq(prompt, max_tokens, request_id=""):
    return Sequence(list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens),
                    request_id=request_id, max_tokens=max_tokens)


def fake_token(seq: Sequence) -> int:
    """A token that says which request and which output index it is, to catch lost or repeated ones."""
    return 1000 * (seq.arrival % 1000) + len(seq.output_token_ids)


def expected_output(seq: Sequence) -> list[int]:
    return [1000 * (seq.arrival % 1000) + i for i in range(seq.max_tokens)]


def check_batch(scheduler: Scheduler, batch) -> None:
    """What must hold for every scheduled step, before the model runs."""
    kv = scheduler.kv
    assert sum(item.num_tokens for item in batch) <= scheduler.max_batched_tokens
    assert len({id(item.seq) for item in batch}) == len(batch)  # a sequence runs once per step
    assert len(batch) <= scheduler.max_num_seqs
    assert len(scheduler.running) <= scheduler.max_num_seqs
    for item in batch:
        seq = item.seq
        assert seq.status is Status.RUNNING and seq in scheduler.running
        assert 1 <= item.num_tokens <= seq.num_uncomputed
        end = seq.num_computed + item.num_tokens
        # Blocks for every page the step writes, in both pools.
        assert len(seq.full_blocks) == math.ceil(end / kv.block_size)
        for p in range(seq.num_computed // kv.block_size, (end - 1) // kv.block_size + 1):
            # A block being written belongs to this sequence alone and is not in the prefix cache.
            assert kv.full.refs[seq.full_blocks[p]] == 1 and kv.full.hash_of[seq.full_blocks[p]] is None
            assert kv.sliding.refs[seq.sliding_blocks[p]] == 1
            assert kv.sliding.hash_of[seq.sliding_blocks[p]] is None
        # ... and the sliding pages the first new token can see.
        for p in range(kv.first_visible_page(seq.num_computed), seq.num_computed // kv.block_size):
            assert p in seq.sliding_blocks
    check_refs(scheduler)


def check_refs(scheduler: Scheduler) -> None:
    """Each block's refcount is the number of running sequences that hold it; waiting ones hold none."""
    kv = scheduler.kv
    for seq in scheduler.waiting:
        assert seq.full_blocks == [] and seq.sliding_blocks == {} and seq.num_computed == 0
    for pool, table in ((kv.full, lambda s: s.full_blocks), (kv.sliding, lambda s: s.sliding_blocks.values())):
        held = {}
        for seq in scheduler.running:
            for block in table(seq):
                held[block] = held.get(block, 0) + 1
        assert [pool.refs[b] for b in range(pool.num_blocks)] == [held.get(b, 0) for b in range(pool.num_blocks)]


def fake_step(scheduler: Scheduler):
    batch = scheduler.schedule()
    check_batch(scheduler, batch)
    sampled = {id(item.seq): fake_token(item.seq) for item in batch if item.samples}
    finished = scheduler.finish_step(batch, sampled)
    check_refs(scheduler)
    return batch, finished


def run_to_end(scheduler: Scheduler, limit: int = 10_000) -> int:
    steps = 0
    while scheduler.has_work():
        fake_step(scheduler)
        steps += 1
        assert steps < limit, "no progress"
    return steps


def assert_all_blocks_back(kv: KVCacheManager) -> None:
    assert kv.full.refs == [0] * kv.full.num_blocks and kv.sliding.refs == [0] * kv.sliding.num_blocks
    assert kv.full.num_available == kv.full.num_blocks and kv.sliding.num_available == kv.sliding.num_blocks
    assert kv.usage() == 0.0


def test_token_budget_is_respected_every_step():
    rng = random.Random(0)
    kv = KVCacheManager(num_full_blocks=2000, num_sliding_blocks=1000, block_size=16, window=128)
    scheduler = Scheduler(kv, max_num_seqs=8, max_batched_tokens=64)
    seqs = [make_seq([rng.randrange(500) for _ in range(rng.randint(1, 300))], rng.randint(1, 20))
            for _ in range(20)]
    for s in seqs:
        scheduler.add(s)
    steps = 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        check_batch(scheduler, batch)
        assert batch, "work left but nothing scheduled"
        used = sum(i.num_tokens for i in batch)
        assert used <= 64
        if used < 64:  # a step runs short only when there is nothing more it may take
            assert len(batch) == len(scheduler.running)
            assert all(i.num_tokens == i.seq.num_uncomputed for i in batch)
            assert not scheduler.waiting or len(scheduler.running) == scheduler.max_num_seqs
        scheduler.finish_step(batch, {id(i.seq): fake_token(i.seq) for i in batch if i.samples})
        steps += 1
    assert all(s.is_finished and s.output_token_ids == expected_output(s) for s in seqs)
    total = sum(len(s.prompt_token_ids) + len(s.output_token_ids) - 1 for s in seqs)
    assert steps >= total / 64
    assert_all_blocks_back(kv)


def test_a_long_prompt_is_chunked_and_running_streams_keep_decoding():
    kv = KVCacheManager(num_full_blocks=1000, num_sliding_blocks=200, block_size=16, window=128)
    scheduler = Scheduler(kv, max_num_seqs=8, max_batched_tokens=64)
    streams = [make_seq(range(i, i + 5), max_tokens=100) for i in range(3)]
    for s in streams:
        scheduler.add(s)
    fake_step(scheduler)  # the three short prompts in one step; they decode from now on
    assert all(len(s.output_token_ids) == 1 for s in streams)

    long = make_seq(range(1000), max_tokens=3)
    scheduler.add(long)
    chunks = []
    while long.in_prefill:
        before = {id(s): len(s.output_token_ids) for s in streams}
        batch, _ = fake_step(scheduler)
        sizes = {id(item.seq): item.num_tokens for item in batch}
        # Every running stream gets its decode token in every step of the long prefill.
        assert all(sizes[id(s)] == 1 for s in streams)
        assert all(len(s.output_token_ids) == before[id(s)] + 1 for s in streams)
        chunks.append(sizes[id(long)])
        assert sum(sizes.values()) <= 64
    assert chunks == [61] * 16 + [1000 - 61 * 16]
    assert len(long.output_token_ids) == 1  # the last chunk sampled its first token
    run_to_end(scheduler)
    assert all(s.output_token_ids == expected_output(s) for s in streams + [long])
    assert_all_blocks_back(kv)


def test_max_num_seqs_is_respected():
    kv = KVCacheManager(1000, 500, 16, 128)
    scheduler = Scheduler(kv, max_num_seqs=3, max_batched_tokens=512)
    seqs = [make_seq(range(10 + i), max_tokens=4 + i % 3) for i in range(10)]
    for s in seqs:
        scheduler.add(s)
    most = 0
    while scheduler.has_work():
        batch, _ = fake_step(scheduler)
        assert len(scheduler.running) <= 3 and len(batch) <= 3
        most = max(most, len(batch))
    assert most == 3
    assert all(s.output_token_ids == expected_output(s) for s in seqs)
    assert_all_blocks_back(kv)


def test_requests_join_and_leave_at_every_step():
    kv = KVCacheManager(2000, 1000, 16, 128)
    scheduler = Scheduler(kv, max_num_seqs=64, max_batched_tokens=4096)
    seqs = []
    for step in range(30):
        # A new request arrives before every step and runs in that very step.
        new = make_seq(range(step, step + 3 + step % 7), max_tokens=1 + step % 5)
        seqs.append(new)
        scheduler.add(new)
        running_before = list(scheduler.running)
        batch, finished = fake_step(scheduler)
        in_batch = {id(item.seq) for item in batch}
        assert id(new) in in_batch
        # Everything that was running ran again: nobody waits on anybody.
        assert all(id(s) in in_batch for s in running_before)
        # Those that finished left the running batch in this step, with all their tokens.
        for s in finished:
            assert s not in scheduler.running and s.is_finished
            assert s.output_token_ids == expected_output(s) and s.full_blocks == []
        assert all(not s.is_finished for s in scheduler.running)
        if step >= 5:
            assert finished, "requests of 1-5 tokens finish every step once the pipeline is full"
    run_to_end(scheduler)
    assert all(s.output_token_ids == expected_output(s) for s in seqs)
    assert_all_blocks_back(kv)


def test_waiting_requests_join_as_soon_as_a_slot_frees():
    kv = KVCacheManager(1000, 500, 16, 128)
    scheduler = Scheduler(kv, max_num_seqs=2, max_batched_tokens=512)
    a, b, c = make_seq([1, 2], 2), make_seq([3, 4], 5), make_seq([5, 6], 2)
    for s in (a, b, c):
        scheduler.add(s)
    fake_step(scheduler)
    assert scheduler.running == [a, b] and list(scheduler.waiting) == [c]
    _, finished = fake_step(scheduler)
    assert finished == [a]
    batch, _ = fake_step(scheduler)  # the very next step admits c
    assert [item.seq for item in batch] == [b, c]


def test_preemption_sends_the_newest_back_to_the_front_and_it_resumes():
    # 8 blocks of 4 tokens; three requests of 8 + 10 tokens need 5 blocks each at the end.
    kv = KVCacheManager(num_full_blocks=8, num_sliding_blocks=100, block_size=4, window=8, prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=4, max_batched_tokens=64)
    seqs = [make_seq(range(10 * i, 10 * i + 8), max_tokens=10, request_id=f"r{i}") for i in range(3)]
    late = make_seq(range(100, 104), max_tokens=2, request_id="late")
    for s in seqs:
        scheduler.add(s)
    fake_step(scheduler)
    assert scheduler.running == seqs and kv.full.num_available == 2
    scheduler.add(late)

    preempted_seen = []
    steps = 0
    while scheduler.has_work():
        running_before = list(scheduler.running)
        outputs_before = {id(s): list(s.output_token_ids) for s in seqs}
        batch = scheduler.schedule()
        check_batch(scheduler, batch)
        preempted = [s for s in running_before if s.status is Status.WAITING]
        if preempted:
            newest = max(running_before, key=lambda s: s.arrival)
            assert newest in preempted  # the newest goes first
            for s in preempted:
                assert s.full_blocks == [] and s.sliding_blocks == {} and s.num_computed == 0
                assert s.output_token_ids == outputs_before[id(s)]  # its tokens so far are kept
                if id(s) not in {id(item.seq) for item in batch}:
                    # Back at the front of the queue, ahead of the request that came later.
                    waiting = [id(w) for w in scheduler.waiting]
                    assert id(s) in waiting
                    if late.status is Status.WAITING:
                        assert waiting.index(id(s)) < waiting.index(id(late))
            preempted_seen += [s.request_id for s in preempted]
        sampled = {id(item.seq): fake_token(item.seq) for item in batch if item.samples}
        scheduler.finish_step(batch, sampled)
        check_refs(scheduler)
        steps += 1
        assert steps < 500
    assert scheduler.num_preemptions > 0 and "r2" in preempted_seen
    assert "r0" not in preempted_seen  # the oldest is never the victim while others run
    for s in seqs + [late]:
        assert s.is_finished and s.finish_reason == "length"
        assert s.output_token_ids == expected_output(s)  # nothing lost or repeated on resume
    assert_all_blocks_back(kv)


def test_the_newest_running_request_is_preempted_and_goes_back_to_the_front_of_the_queue():
    kv = KVCacheManager(num_full_blocks=8, num_sliding_blocks=100, block_size=4, window=8, prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=8, max_batched_tokens=64)
    # r0 fills its second page exactly; r1..r3 have room left in theirs.
    seqs = [make_seq(range(10 * i, 10 * i + (8 if i == 0 else 6)), max_tokens=4, request_id=f"r{i}")
            for i in range(4)]
    for s in seqs:
        scheduler.add(s)
    fake_step(scheduler)
    assert kv.full.num_available == 0  # 4 x 2 blocks
    queued = make_seq(range(50, 54), max_tokens=1, request_id="queued")
    scheduler.add(queued)
    # r0 needs page 2 for its next token; there is none left. Of r1, r2, r3 the newest goes.
    r0, r1, r2, r3 = seqs
    batch, _ = fake_step(scheduler)
    assert scheduler.num_preemptions == 1
    assert [item.seq.request_id for item in batch] == ["r0", "r1", "r2"]
    assert [s.request_id for s in scheduler.waiting] == ["r3", "queued"]  # ahead of the queue
    assert r3.status is Status.WAITING and r3.full_blocks == [] and r3.sliding_blocks == {}
    assert r3.num_computed == 0 and r3.output_token_ids == expected_output(r3)[:1]
    assert len(r0.full_blocks) == 3
    run_to_end(scheduler)
    for s in seqs + [queued]:
        assert s.output_token_ids == expected_output(s)
    assert_all_blocks_back(kv)


def test_preemption_with_prefix_caching_resumes_from_its_own_cached_pages():
    kv = KVCacheManager(num_full_blocks=10, num_sliding_blocks=100, block_size=4, window=8)
    scheduler = Scheduler(kv, max_num_seqs=4, max_batched_tokens=64)
    seqs = [make_seq(range(20 * i, 20 * i + 12), max_tokens=12) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    resumed_from = []
    while scheduler.has_work():
        preempted = {id(s) for s in scheduler.waiting if s.output_token_ids}
        batch = scheduler.schedule()
        check_batch(scheduler, batch)
        resumed_from += [item.seq.num_computed for item in batch if id(item.seq) in preempted]
        scheduler.finish_step(batch, {id(i.seq): fake_token(i.seq) for i in batch if i.samples})
        check_refs(scheduler)
    assert scheduler.num_preemptions > 0 and resumed_from
    # Complete pages stay in the prefix cache (tail evicted first): a resumed request skips them.
    # Here r1 is preempted with 5 complete pages; r0 then needs one more block, which evicts
    # r1's last page, so r1 resumes from 16 tokens. (Evicting its first page would waste them all.)
    assert all(n % 4 == 0 for n in resumed_from)
    assert 16 in resumed_from
    assert all(s.output_token_ids == expected_output(s) for s in seqs)
    # Cached tokens are counted at the first admission only, before any output.
    assert all(s.num_cached_prompt_tokens == 0 for s in seqs)
    assert_all_blocks_back(kv)


def test_abort_frees_blocks():
    kv = KVCacheManager(100, 100, 16, 32)
    scheduler = Scheduler(kv, max_num_seqs=1, max_batched_tokens=64)
    a = make_seq(range(40), max_tokens=50, request_id="a")
    b = make_seq(range(10), max_tokens=5, request_id="b")
    c = make_seq(range(10), max_tokens=5, request_id="c")
    for s in (a, b, c):
        scheduler.add(s)
    for _ in range(3):
        fake_step(scheduler)
    assert a.full_blocks and kv.full.num_used == 3

    assert scheduler.abort("b") is b  # waiting: just leaves the queue
    assert b.is_finished and b.finish_reason == "abort" and list(scheduler.waiting) == [c]
    assert scheduler.abort("a") is a  # running: its blocks go back
    assert a.is_finished and a.finish_reason == "abort" and a.full_blocks == [] and a.sliding_blocks == {}
    assert scheduler.running == [] and kv.full.num_used == 0 and kv.sliding.num_used == 0
    assert scheduler.abort("a") is None and scheduler.abort("nobody") is None
    check_refs(scheduler)
    run_to_end(scheduler)
    assert c.output_token_ids == expected_output(c)
    assert b.output_token_ids == [] and len(a.output_token_ids) == 3
    assert_all_blocks_back(kv)


def test_abort_during_a_step_is_not_freed_twice():
    kv = KVCacheManager(100, 100, 16, 32)
    scheduler = Scheduler(kv, max_num_seqs=4, max_batched_tokens=64)
    a, b = make_seq(range(20), 5, "a"), make_seq(range(20), 5, "b")
    scheduler.add(a)
    scheduler.add(b)
    fake_step(scheduler)
    batch = scheduler.schedule()
    scheduler.abort("a")  # e.g. the client went away while the model ran
    sampled = {id(item.seq): fake_token(item.seq) for item in batch if item.samples}
    scheduler.finish_step(batch, sampled)
    assert len(a.output_token_ids) == 1 and a.finish_reason == "abort"
    assert all(r >= 0 for r in kv.full.refs + kv.sliding.refs)
    check_refs(scheduler)
    run_to_end(scheduler)
    assert b.output_token_ids == expected_output(b)
    assert_all_blocks_back(kv)


def test_a_crowd_with_shared_prefixes_and_preemptions_returns_every_block():
    rng = random.Random(3)
    kv = KVCacheManager(num_full_blocks=24, num_sliding_blocks=60, block_size=16, window=32)
    scheduler = Scheduler(kv, max_num_seqs=6, max_batched_tokens=96)
    system = [rng.randrange(500) for _ in range(70)]
    seqs = []
    for step in range(200):
        if step < 40 and step % 2 == 0:
            tail = [rng.randrange(500) for _ in range(rng.randint(1, 60))]
            prompt = (system + tail) if rng.random() < 0.6 else tail
            seqs.append(make_seq(prompt, max_tokens=rng.randint(1, 40)))
            scheduler.add(seqs[-1])
        if not scheduler.has_work():
            break
        fake_step(scheduler)
    run_to_end(scheduler)
    assert scheduler.num_preemptions > 0
    assert any(s.num_cached_prompt_tokens > 0 for s in seqs)
    for s in seqs:
        assert s.is_finished and s.output_token_ids == expected_output(s)
        assert s.num_cached_prompt_tokens < len(s.prompt_token_ids)
    assert_all_blocks_back(kv)
