"""Paged KV-cache bookkeeping with prefix caching, in pure Python (the tensors live in the runner).

A sequence's tokens are cut into pages of `block_size`. Each page of computed tokens maps to a
block in two pools:

* the full pool, for layers with full attention: every page of the sequence;
* the sliding pool, for sliding-window layers: only the pages the window can still see, so
  between steps a sequence holds at most about `window` positions there however long it grows.
  A step writes all its new tokens there; the pages that fall out of the window are released
  right after it (kept findable for the prefix cache).

A page that is completely computed gets a hash of its tokens and of every token before it.
When its last holder lets go, the block stays in the pool, evictable, so that a later request
starting with the same tokens (a system prompt, earlier turns, a preempted request resuming)
takes it back instead of recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from gptoss.engine.sequence import Sequence


class BlockPool:
    """Reference-counted blocks; unreferenced blocks with a hash stay findable until evicted (LRU)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of[block]]
            self.hash_of[block] = None
        self.refs[block] = 1
        return block

    def lookup(self, page_hash: int) -> int | None:
        return self.by_hash.get(page_hash)

    def acquire(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.hash_of[block] is None:
                self.free.append(block)
            else:
                self.evictable[block] = None

    def register(self, block: int, page_hash: int) -> None:
        """Make a fully computed block findable by its page hash (first block with a hash wins)."""
        if self.hash_of[block] is None and page_hash not in self.by_hash:
            self.hash_of[block] = page_hash
            self.by_hash[page_hash] = block


class KVCacheManager:
    def __init__(self, num_full_blocks: int, num_sliding_blocks: int, block_size: int, window: int,
                 prefix_caching: bool = True):
        self.block_size = block_size
        self.window = window
        self.full = BlockPool(num_full_blocks)
        self.sliding = BlockPool(num_sliding_blocks)
        self.prefix_caching = prefix_caching
        self._hashes: dict[int, list[int]] = {}  # id(seq) -> hash of each complete page

    # -- page geometry ---------------------------------------------------------------------
    def _page(self, position: int) -> int:
        return position // self.block_size

    def first_visible_page(self, position: int) -> int:
        """The first page a query at `position` can see through the sliding window."""
        return self._page(max(position - self.window + 1, 0))

    def page_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        hashes = self._hashes.setdefault(id(seq), [])
        tokens = seq.token_ids
        while (len(hashes) + 1) * self.block_size <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]))))
        return hashes[: num_tokens // self.block_size]

    # -- admission with prefix caching -------------------------------------------------------
    def admit(self, seq: Sequence) -> int:
        """Take the longest cached prefix of `seq` (leaving at least one token to compute)."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        hashes = self.page_hashes(seq, len(seq) - 1)
        pages = 0
        while pages < len(hashes) and self.full.lookup(hashes[pages]) is not None:
            pages += 1
        # The sliding layers must still hold the window before the first uncached token.
        while pages > 0 and not all(self.sliding.lookup(hashes[p]) is not None
                                    for p in range(self.first_visible_page(pages * self.block_size), pages)):
            pages -= 1
        for p in range(pages):
            block = self.full.lookup(hashes[p])
            self.full.acquire(block)
            seq.full_blocks.append(block)
        for p in range(self.first_visible_page(pages * self.block_size) if pages else 0, pages):
            block = self.sliding.lookup(hashes[p])
            self.sliding.acquire(block)
            seq.sliding_blocks[p] = block
        seq.num_computed = pages * self.block_size
        return seq.num_computed

    # -- growth --------------------------------------------------------------------------------
    def _needed(self, seq: Sequence, num_new: int) -> tuple[list[int], list[int]]:
        end = seq.num_computed + num_new
        full_pages = list(range(len(seq.full_blocks), self._page(end - 1) + 1))
        sliding_pages = [p for p in range(self._page(seq.num_computed), self._page(end - 1) + 1)
                         if p not in seq.sliding_blocks]
        return full_pages, sliding_pages

    def can_reserve(self, seq: Sequence, num_new: int) -> bool:
        full_pages, sliding_pages = self._needed(seq, num_new)
        droppable = sum(1 for p in seq.sliding_blocks if p < self.first_visible_page(seq.num_computed))
        return (len(full_pages) <= self.full.num_available
                and len(sliding_pages) <= self.sliding.num_available + droppable)

    def reserve(self, seq: Sequence, num_new: int) -> bool:
        """Blocks for the next `num_new` tokens of `seq`; False (and nothing taken) if they don't fit."""
        if not self.can_reserve(seq, num_new):
            return False
        self._drop_pages_out_of_window(seq, seq.num_computed)
        full_pages, sliding_pages = self._needed(seq, num_new)
        seq.full_blocks.extend(self.full.allocate() for _ in full_pages)
        for p in sliding_pages:
            seq.sliding_blocks[p] = self.sliding.allocate()
        return True

    def _drop_pages_out_of_window(self, seq: Sequence, position: int) -> None:
        first = self.first_visible_page(position)
        for p in [p for p in seq.sliding_blocks if p < first]:
            self.sliding.release(seq.sliding_blocks.pop(p))

    def commit(self, seq: Sequence) -> None:
        """After a step computed tokens up to seq.num_computed: make complete pages findable, and
        let go of the sliding pages that the next token can no longer see."""
        if self.prefix_caching:
            for page, page_hash in enumerate(self.page_hashes(seq, seq.num_computed)):
                self.full.register(seq.full_blocks[page], page_hash)
                if page in seq.sliding_blocks:
                    self.sliding.register(seq.sliding_blocks[page], page_hash)
        self._drop_pages_out_of_window(seq, seq.num_computed)

    def free(self, seq: Sequence) -> None:
        # Last page first: a cached prefix is only usable from its first page on, so the tail of a
        # sequence must be the first to be evicted, not its head.
        for block in reversed(seq.full_blocks):
            self.full.release(block)
        for page in sorted(seq.sliding_blocks, reverse=True):
            self.sliding.release(seq.sliding_blocks[page])
        seq.full_blocks.clear()
        seq.sliding_blocks.clear()
        self._hashes.pop(id(seq), None)

    def usage(self) -> float:
        """Fraction of the full pool in use by running sequences (cached, evictable blocks are free)."""
        return self.full.num_used / max(self.full.num_blocks, 1)
