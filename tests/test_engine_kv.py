"""The paged KV-cache bookkeeping (BlockPool, KVCacheManager), without a model."""

import math

import pytest

from gptoss.engine.kv_cache import BlockPool, KVCacheManager
from gptoss.engine.sequence import Sequence
from gptoss.sampling import SamplingParams

PARAMS = SamplingParams(temperature=0)


def make_seq(tokens, max_tokens=1 << 20):
    return Sequence(list(tokens), PARAMS, max_tokens=max_tokens)


def compute(kv: KVCacheManager, seq: Sequence, num: int) -> None:
    """One fake model step of `num` tokens for `seq`: reserve, 'compute', commit."""
    assert kv.reserve(seq, num)
    seq.num_computed += num
    kv.commit(seq)


def holders(kv: KVCacheManager, seqs):
    """Block -> number of sequences holding it, per pool."""
    full, sliding = {}, {}
    for seq in seqs:
        for b in seq.full_blocks:
            full[b] = full.get(b, 0) + 1
        for b in seq.sliding_blocks.values():
            sliding[b] = sliding.get(b, 0) + 1
    return full, sliding


def assert_refs_match(kv: KVCacheManager, seqs):
    full, sliding = holders(kv, seqs)
    for pool, held in ((kv.full, full), (kv.sliding, sliding)):
        for block in range(pool.num_blocks):
            assert pool.refs[block] == held.get(block, 0), f"block {block}: refs {pool.refs[block]}"
        assert pool.num_used == len(held)
        # Every block is in exactly one place: held, free, or evictable.
        free, evictable = set(pool.free), set(pool.evictable)
        assert len(free) == len(pool.free) and not free & evictable and not free & set(held)
        assert not evictable & set(held)
        assert len(free) + len(evictable) + len(held) == pool.num_blocks


# -- BlockPool ---------------------------------------------------------------------------------

def test_block_pool_allocate_release_and_refcounts():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert pool.num_available == 0 and pool.num_used == 4
    assert all(pool.refs[b] == 1 for b in blocks)

    a = blocks[0]
    pool.acquire(a)  # a second holder
    assert pool.refs[a] == 2
    pool.release(a)
    assert pool.refs[a] == 1 and pool.num_available == 0  # still held once
    pool.release(a)
    assert pool.refs[a] == 0 and pool.num_available == 1
    assert list(pool.free) == [a] and not pool.evictable  # no hash: plainly free

    for b in blocks[1:]:
        pool.release(b)
    assert pool.num_available == 4 and pool.num_used == 0
    assert pool.refs == [0, 0, 0, 0]


def test_hashed_blocks_become_evictable_and_are_found_again():
    pool = BlockPool(3)
    a = pool.allocate()
    pool.register(a, 1234)
    assert pool.lookup(1234) == a and pool.hash_of[a] == 1234
    pool.release(a)
    # Unreferenced but hashed: counted as available, yet still findable.
    assert pool.refs[a] == 0 and a in pool.evictable and a not in pool.free
    assert pool.num_available == 3 and pool.num_used == 0
    assert pool.lookup(1234) == a

    pool.acquire(a)  # taken back from the prefix cache
    assert pool.refs[a] == 1 and a not in pool.evictable and pool.num_available == 2
    pool.acquire(a)
    assert pool.refs[a] == 2
    pool.release(a)
    pool.release(a)
    assert a in pool.evictable and pool.lookup(1234) == a

    # Free blocks are used before any cached block is evicted.
    b, c = pool.allocate(), pool.allocate()
    assert a not in (b, c) and pool.lookup(1234) == a
    d = pool.allocate()  # now the cached block must go
    assert d == a and pool.lookup(1234) is None and pool.hash_of[a] is None and pool.refs[a] == 1
    assert pool.num_available == 0


def test_eviction_is_least_recently_used_first():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    for i, b in enumerate(blocks):
        pool.register(b, 100 + i)
    for b in blocks:  # released in order 0, 1, 2, 3
        pool.release(b)
    # Use block 0 again: it becomes the most recently used.
    pool.acquire(pool.lookup(100))
    pool.release(pool.lookup(100))

    order = [pool.allocate() for _ in range(4)]
    assert order == [blocks[1], blocks[2], blocks[3], blocks[0]]
    assert all(pool.lookup(100 + i) is None for i in range(4))
    assert not pool.by_hash


def test_register_first_block_with_a_hash_wins():
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 7)
    pool.register(b, 7)  # same content computed twice: the first stays the cached one
    assert pool.lookup(7) == a and pool.hash_of[b] is None
    pool.register(a, 8)  # a block keeps its first hash
    assert pool.hash_of[a] == 7 and pool.lookup(8) is None
    pool.release(b)
    assert b in pool.free and b not in pool.evictable  # unhashed: plainly free
    pool.release(a)
    assert a in pool.evictable
    # Once the cached block is evicted, another block may take the hash.
    c, d = pool.allocate(), pool.allocate()  # the free blocks first
    assert {c, d} == {b, 2} and pool.lookup(7) == a
    e = pool.allocate()
    assert e == a and pool.lookup(7) is None
    pool.register(d, 7)
    assert pool.lookup(7) == d


# -- KVCacheManager ---------------------------------------------------------------------------

def test_reserve_commit_free_accounting():
    kv = KVCacheManager(num_full_blocks=10, num_sliding_blocks=10, block_size=16, window=16)
    seq = make_seq(range(40))
    assert kv.reserve(seq, 40)
    assert len(seq.full_blocks) == 3  # pages 0, 1, 2
    assert sorted(seq.sliding_blocks) == [0, 1, 2]  # the step writes all its tokens
    assert kv.full.num_used == 3 and kv.sliding.num_used == 3
    assert_refs_match(kv, [seq])

    seq.num_computed = 40
    kv.commit(seq)
    # The next token (position 40) sees positions 25..40: pages 1 and 2 only.
    assert kv.first_visible_page(40) == 1
    assert sorted(seq.sliding_blocks) == [1, 2]
    assert kv.full.num_used == 3 and kv.sliding.num_used == 2
    # The two complete pages are findable in both pools (page 0 of the sliding pool, released, too).
    hashes = kv.page_hashes(seq, 40)
    assert len(hashes) == 2
    assert [kv.full.lookup(h) for h in hashes] == seq.full_blocks[:2]
    assert kv.sliding.lookup(hashes[1]) == seq.sliding_blocks[1]
    assert kv.sliding.lookup(hashes[0]) is not None and kv.sliding.refs[kv.sliding.lookup(hashes[0])] == 0
    assert_refs_match(kv, [seq])

    # Decode: one token at a time, a new page only when crossing a page boundary.
    for i in range(9):
        seq.append_token(500 + i)
        compute(kv, seq, 1)
        assert len(seq.full_blocks) == math.ceil(seq.num_computed / 16)
        assert_refs_match(kv, [seq])
    assert seq.num_computed == 49 and len(seq.full_blocks) == 4

    kv.free(seq)
    assert seq.full_blocks == [] and seq.sliding_blocks == {}
    assert kv.full.refs == [0] * 10 and kv.sliding.refs == [0] * 10
    assert kv.full.num_available == 10 and kv.sliding.num_available == 10
    assert kv.usage() == 0.0


def test_usage_counts_only_held_blocks():
    kv = KVCacheManager(8, 8, 16, 32)
    seq = make_seq(range(64))
    compute(kv, seq, 64)
    assert kv.usage() == 4 / 8
    kv.free(seq)
    assert kv.usage() == 0.0  # cached, evictable blocks are free for new requests


def test_prefix_hit_via_admit():
    kv = KVCacheManager(20, 20, block_size=16, window=32)
    first = make_seq(range(50))
    compute(kv, first, 50)

    second = make_seq(list(range(48)) + [900, 901, 902, 903])  # shares pages 0..2 (48 tokens)
    assert kv.admit(second) == 48
    assert second.num_computed == 48
    assert second.full_blocks == first.full_blocks[:3]
    # The window of the first uncached token (position 48) starts at 17: pages 1 and 2.
    assert sorted(second.sliding_blocks) == [1, 2]
    assert all(second.sliding_blocks[p] == first.sliding_blocks[p] for p in (1, 2))
    assert all(kv.full.refs[b] == 2 for b in second.full_blocks)
    assert_refs_match(kv, [first, second])

    # The rest of the prompt goes into fresh blocks; shared ones are never written.
    assert kv.reserve(second, 4)
    assert len(second.full_blocks) == 4 and second.full_blocks[3] not in first.full_blocks
    second.num_computed += 4
    kv.commit(second)
    assert_refs_match(kv, [first, second])

    kv.free(first)
    kv.free(second)
    assert_refs_match(kv, [])


def test_admit_never_takes_the_whole_prompt():
    kv = KVCacheManager(20, 20, block_size=16, window=32)
    first = make_seq(range(48))
    compute(kv, first, 48)  # three complete, registered pages
    kv.free(first)

    same = make_seq(range(48))
    assert kv.admit(same) == 32  # page 2 would leave nothing to compute: the last token must run
    assert same.num_uncomputed == 16

    kv.free(same)
    longer = make_seq(range(49))
    assert kv.admit(longer) == 48 and longer.num_uncomputed == 1

    kv.free(longer)
    short = make_seq(range(16))
    assert kv.admit(short) == 0 and short.num_computed == 0 and short.full_blocks == []
    kv.free(short)
    assert_refs_match(kv, [])


def test_admit_reuses_only_a_matching_prefix():
    kv = KVCacheManager(20, 20, block_size=16, window=32)
    first = make_seq(range(64))
    compute(kv, first, 64)
    kv.free(first)
    other = make_seq([1] + list(range(1, 64)))  # differs in the first token: no page matches
    assert kv.admit(other) == 0
    kv.free(other)
    mid = make_seq(list(range(20)) + [999] + list(range(21, 64)))  # differs in page 1
    assert kv.admit(mid) == 16
    kv.free(mid)
    assert_refs_match(kv, [])


def test_admit_does_nothing_without_prefix_caching():
    kv = KVCacheManager(20, 20, block_size=16, window=32, prefix_caching=False)
    first = make_seq(range(64))
    compute(kv, first, 64)
    assert not kv.full.by_hash and not kv.sliding.by_hash
    kv.free(first)
    assert len(kv.full.free) == 20 and not kv.full.evictable
    again = make_seq(range(64))
    assert kv.admit(again) == 0 and again.full_blocks == []


def test_prefix_with_evicted_sliding_pages_is_cut_to_what_the_sliding_pool_holds():
    # The sliding pool holds exactly the four pages of `first`, so one more allocation evicts.
    kv = KVCacheManager(num_full_blocks=20, num_sliding_blocks=4, block_size=16, window=32)
    first = make_seq(range(64))
    compute(kv, first, 64)
    hashes = kv.page_hashes(first, 64)
    kv.free(first)
    assert all(kv.sliding.lookup(h) is not None for h in hashes)

    # Touch pages 0..2 so that page 3 is the least recently used, then evict it.
    for h in hashes[:3]:
        block = kv.sliding.lookup(h)
        kv.sliding.acquire(block)
        kv.sliding.release(block)
    evicted = kv.sliding.lookup(hashes[3])
    taken = kv.sliding.allocate()
    assert taken == evicted and kv.sliding.lookup(hashes[3]) is None
    kv.sliding.release(taken)

    second = make_seq(list(range(64)) + list(range(300, 316)))
    # The full pool still holds all four pages...
    assert all(kv.full.lookup(h) is not None for h in hashes)
    # ...but at 64 the window (positions 33..64) needs page 3 of the sliding layers: cut to 48,
    # whose window (positions 17..48) needs pages 1 and 2, still cached.
    assert kv.admit(second) == 48
    assert len(second.full_blocks) == 3
    assert sorted(second.sliding_blocks) == [1, 2]
    assert [second.sliding_blocks[p] for p in (1, 2)] == [kv.sliding.lookup(h) for h in hashes[1:3]]
    assert_refs_match(kv, [second])
    kv.free(second)

    # With the window pages of every prefix gone, nothing is reused at all.
    for _ in range(4):
        kv.sliding.allocate()
    assert not kv.sliding.by_hash
    third = make_seq(list(range(64)) + [5])
    assert kv.admit(third) == 0 and third.full_blocks == [] and third.sliding_blocks == {}
    assert all(kv.full.refs[kv.full.lookup(h)] == 0 for h in hashes)


@pytest.mark.parametrize("chunk", [128, 100, 37])
def test_sliding_blocks_stay_bounded_on_a_long_sequence(chunk):
    window, bs = 128, 16
    kv = KVCacheManager(num_full_blocks=200, num_sliding_blocks=40, block_size=bs, window=window)
    seq = make_seq(range(1000))
    decode_bound = math.ceil(window / bs) + 1  # 9
    prefill_bound = 2 * window // bs + 2  # 18
    most_prefill = 0
    while seq.in_prefill:  # chunked prefill
        num = min(chunk, seq.num_uncomputed)
        assert kv.reserve(seq, num)
        most_prefill = max(most_prefill, len(seq.sliding_blocks))
        assert len(seq.sliding_blocks) <= prefill_bound
        assert kv.sliding.num_used == len(seq.sliding_blocks)
        seq.num_computed += num
        kv.commit(seq)
        assert len(seq.sliding_blocks) <= decode_bound
    seq.append_token(1)
    while len(seq) < 2000:  # decode
        assert kv.reserve(seq, 1)
        assert len(seq.sliding_blocks) <= decode_bound
        seq.num_computed += 1
        kv.commit(seq)
        assert len(seq.sliding_blocks) <= decode_bound
        # Exactly the pages the next token can see.
        first = kv.first_visible_page(seq.num_computed)
        assert sorted(seq.sliding_blocks) == list(range(first, (seq.num_computed - 1) // bs + 1))
        assert len(seq.full_blocks) == math.ceil(seq.num_computed / bs)
        seq.append_token(len(seq) % 500)
    assert most_prefill > decode_bound or chunk < window  # big chunks do need the extra room
    assert_refs_match(kv, [seq])
    kv.free(seq)
    assert_refs_match(kv, [])


def test_can_reserve_is_false_when_the_full_pool_is_exhausted_and_nothing_is_taken():
    kv = KVCacheManager(num_full_blocks=4, num_sliding_blocks=20, block_size=16, window=32)
    seq = make_seq(range(100))
    assert kv.can_reserve(seq, 64)
    assert not kv.can_reserve(seq, 65)  # five pages, four blocks
    assert not kv.reserve(seq, 65)
    assert seq.full_blocks == [] and seq.sliding_blocks == {}
    assert kv.full.num_available == 4 and kv.sliding.num_available == 20
    assert_refs_match(kv, [])

    # With some blocks held, a failed reserve keeps exactly what was there.
    compute(kv, seq, 40)
    before_full, before_sliding = list(seq.full_blocks), dict(seq.sliding_blocks)
    refs_full, refs_sliding = list(kv.full.refs), list(kv.sliding.refs)
    assert not kv.reserve(seq, 60)  # would need pages 3..6
    assert seq.full_blocks == before_full and seq.sliding_blocks == before_sliding
    assert kv.full.refs == refs_full and kv.sliding.refs == refs_sliding
    assert kv.reserve(seq, 24)  # exactly fills page 3
    assert kv.full.num_available == 0
    assert not kv.can_reserve(seq, 25)


def test_can_reserve_is_false_when_the_sliding_pool_is_exhausted_and_nothing_is_taken():
    kv = KVCacheManager(num_full_blocks=20, num_sliding_blocks=2, block_size=16, window=128)
    other = make_seq(range(16))
    compute(kv, other, 16)  # holds one sliding block
    seq = make_seq(range(48))
    assert not kv.can_reserve(seq, 32)  # two sliding pages, one block left
    assert not kv.reserve(seq, 32)
    assert seq.full_blocks == [] and kv.full.num_used == 1  # the full pool, which had room, is untouched
    assert kv.sliding.num_used == 1
    assert kv.reserve(seq, 16)
    assert_refs_match(kv, [other, seq])


def test_a_freed_sequence_is_evicted_from_its_last_page_first():
    # A cached prefix is usable from its first page on: losing page 0 would waste every other page.
    kv = KVCacheManager(num_full_blocks=4, num_sliding_blocks=20, block_size=16, window=32)
    first = make_seq(range(64))
    compute(kv, first, 64)
    blocks = list(first.full_blocks)
    kv.free(first)
    assert list(kv.full.evictable) == blocks[::-1]
    taken = kv.full.allocate()
    assert taken == blocks[3]  # memory pressure takes the last page
    again = make_seq(list(range(64)) + [7])
    assert kv.admit(again) == 48 and again.full_blocks == blocks[:3]
    kv.free(again)
    kv.full.release(taken)
    assert_refs_match(kv, [])
