"""The model runner: one batched forward over the scheduled sequences, on paged KV tensors.

The scheduler's pure-Python block tables become index tensors here: for each layer kind, which
cached blocks every row reads (and the position of each slot, -1 where empty) and which slot
each new token's keys/values go to. Rows are padded to the longest chunk; padding tokens sit at
position -1, which nothing can see and nothing stores.
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
    """Per-step indices into one pool: gather [B, P] blocks, their slot positions [B, P*bs], store slots [B, T]."""

    blocks: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor


class PagedLayer:
    """The cache of one layer for one step, with the model's LayerCache.update() interface."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, index: PoolIndex):
        self.k_pool, self.v_pool, self.index = k_pool, v_pool, index

    def update(self, k, v, positions):
        """The cached pages gathered and followed by the new keys/values; those are then stored."""
        b = k.shape[0]
        cached_k = self.k_pool[self.index.blocks].reshape(b, -1, *k.shape[2:])
        cached_v = self.v_pool[self.index.blocks].reshape(b, -1, *v.shape[2:])
        seen = (torch.cat([cached_k, k], dim=1), torch.cat([cached_v, v], dim=1),
                torch.cat([self.index.positions, positions], dim=1))
        self._store(k, v)
        return seen

    def _store(self, k, v):
        slots = self.index.slots.reshape(-1)
        keep = slots >= 0
        flat_k = self.k_pool.view(-1, *k.shape[2:])
        flat_v = self.v_pool.view(-1, *v.shape[2:])
        flat_k[slots[keep]] = k.reshape(-1, *k.shape[2:])[keep]
        flat_v[slots[keep]] = v.reshape(-1, *v.shape[2:])[keep]


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

    def _index(self, batch: list[ScheduledSeq], width: int, sliding: bool) -> PoolIndex:
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
        device = self.model.device
        return PoolIndex(blocks.to(device), positions.to(device), torch.tensor(stores, dtype=torch.long, device=device))

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
        indexes = {kind: self._index(batch, width, kind) for kind in set(self.sliding_layer)}
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
