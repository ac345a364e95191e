"""The model runner: one batched forward over the scheduled sequences, on paged KV tensors.

The scheduler's pure-Python block tables become index tensors here: for each layer kind, the
pool rows every row's queries may read (cached pages, then the new tokens) with their positions
(-1 where empty), and the slot each new token's keys/values go to. A layer stores its new
keys/values first and attention reads the pools in place, so a step copies no cached K/V. Rows
are padded to the longest chunk; padding tokens sit at position -1, which nothing can see and
nothing stores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from gptoss.engine.kv_cache import KVCacheManager
from gptoss.engine.scheduler import ScheduledSeq
from gptoss.model import Model
from gptoss.sampling import SampleOutput, Sampler


@dataclass
class PoolIndex:
    """Per-step indices into one pool, shared by its layers.

    rows [B, S]: the pool row (block * block_size + offset) of every key a row's queries may read,
    its cached pages then its new tokens; positions [B, S]: their positions, -1 where empty or
    padding; slots [B, T]: where each new token's key/value is stored, -1 for padding.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor


class PagedLayer:
    """The cache of one layer for one step, with the model's LayerCache.update() interface."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, index: PoolIndex):
        self.k_pool, self.v_pool, self.index = k_pool, v_pool, index

    def update(self, k, v, positions):
        """Store the new keys/values, then let attention read the pool in place through index.rows."""
        flat_k = self.k_pool.view(-1, *k.shape[2:])
        flat_v = self.v_pool.view(-1, *v.shape[2:])
        slots = self.index.slots.reshape(-1)
        keep = slots >= 0
        flat_k[slots[keep]] = k.reshape(-1, *k.shape[2:])[keep]
        flat_v[slots[keep]] = v.reshape(-1, *v.shape[2:])[keep]
        return flat_k, flat_v, self.index.positions, self.index.rows


class PagedCache:
    def __init__(self, layers: list[PagedLayer]):
        self.layers = layers

    def advance(self, positions) -> None:  # the block tables already say where everything is
        pass


class ModelRunner:
    def __init__(self, model: Model, kv: KVCacheManager, seed: int | None = None):
        self.model = model
        self.kv = kv
        config = model.config
        self.sliding_layer = [config.window_of(i) > 0 for i in range(config.num_hidden_layers)]
        shape = (config.num_key_value_heads, config.head_dim)
        bs = kv.block_size
        self.pools = []
        for sliding in self.sliding_layer:
            blocks = kv.sliding.num_blocks if sliding else kv.full.num_blocks
            k = torch.zeros(blocks, bs, *shape, dtype=model.dtype, device=model.device)
            self.pools.append((k, torch.zeros_like(k)))
        self.sampler = Sampler(seed)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype, sliding: bool) -> int:
        layers = sum(1 for i in range(config.num_hidden_layers) if (config.window_of(i) > 0) == sliding)
        return 2 * layers * block_size * config.kv_dim * torch.empty((), dtype=dtype).element_size()

    def _index(self, batch: list[ScheduledSeq], width: int, sliding: bool, new_positions: torch.Tensor) -> PoolIndex:
        bs = self.kv.block_size
        gather_pages, stores = [], []
        for item in batch:
            seq, computed = item.seq, item.seq.num_computed
            if sliding:
                pages = [p for p in range(self.kv.first_visible_page(computed), -(-computed // bs))
                         if p in seq.sliding_blocks]
                table = seq.sliding_blocks
            else:
                pages = list(range(-(-computed // bs)))
                table = dict(enumerate(seq.full_blocks))
            gather_pages.append([(p, table[p]) for p in pages])
            row = [table[p // bs] * bs + p % bs for p in range(computed, computed + item.num_tokens)]
            stores.append(row + [-1] * (width - len(row)))
        num_pages = max((len(g) for g in gather_pages), default=0)
        page_ids = torch.tensor([[p for p, _ in g] + [-1] * (num_pages - len(g)) for g in gather_pages],
                                dtype=torch.long).reshape(len(batch), num_pages)
        blocks = torch.tensor([[b for _, b in g] + [0] * (num_pages - len(g)) for g in gather_pages],
                              dtype=torch.long).reshape(len(batch), num_pages)
        computed = torch.tensor([item.seq.num_computed for item in batch])
        slot_pos = page_ids[:, :, None] * bs + torch.arange(bs)
        valid = (page_ids[:, :, None] >= 0) & (slot_pos < computed[:, None, None])
        positions = torch.where(valid, slot_pos, -1).reshape(len(batch), num_pages * bs)
        rows = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(len(batch), num_pages * bs)
        slots = torch.tensor(stores, dtype=torch.long)
        device = self.model.device
        return PoolIndex(torch.cat([rows, slots], dim=1).to(device),
                         torch.cat([positions, new_positions], dim=1).to(device), slots.to(device))

    @torch.no_grad()
    def run(self, batch: list[ScheduledSeq]) -> dict[int, tuple[int, SampleOutput, int]]:
        """Forward the batch; returns id(seq) -> (token, sample output, row) for rows that sample."""
        width = max(item.num_tokens for item in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.full((len(batch), width), -1, dtype=torch.long)
        for r, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed
            tokens = seq.token_ids[start:start + item.num_tokens]
            ids[r, :len(tokens)] = torch.tensor(tokens)
            positions[r, :len(tokens)] = torch.arange(start, start + len(tokens))
        indexes = {kind: self._index(batch, width, kind, positions) for kind in set(self.sliding_layer)}
        cache = PagedCache([PagedLayer(k, v, indexes[sliding])
                            for (k, v), sliding in zip(self.pools, self.sliding_layer)])
        device = self.model.device
        last = torch.tensor([item.num_tokens - 1 for item in batch], device=device)
        logits = self.model(ids.to(device), cache, positions=positions.to(device), logit_index=last)[:, 0]

        rows = [r for r, item in enumerate(batch) if item.samples]
        if not rows:
            return {}
        seqs = [batch[r].seq for r in rows]
        params = [s.params for s in seqs]
        counts = [Counter(s.output_token_ids) for s in seqs] if any(p.uses_penalties for p in params) else None
        out = self.sampler.sample(logits[rows].float(), params, counts, [s.generator for s in seqs])
        tokens = out.token_ids.tolist()
        return {id(s): (tokens[i], out, i) for i, s in enumerate(seqs)}
