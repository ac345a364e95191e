"""The model runner: one forward over the scheduled tokens, flat, on paged KV tensors.

The scheduler's pure-Python block tables become a `ForwardBatch` here: the N new tokens end to
end (no padding: every layer computes exactly N rows), their positions, the pool slot each
token's keys/values go to, and each sequence's block tables. A layer stores its new keys/values
first and attention reads the pools in place, each row through its own sequence's pages, so a
step copies no cached K/V.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from gptoss import ops, parallel
from gptoss.engine.batch import ForwardBatch
from gptoss.engine.kv_cache import KVCacheManager
from gptoss.engine.scheduler import ScheduledSeq
from gptoss.model import Model
from gptoss.sampling import SampleOutput, Sampler


def store_kv(k_pool, v_pool, slots, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a step's keys/values [N, 1, Hkv, D] to their pool slots; the pools as [rows, Hkv, D]."""
    flat_k = k_pool.view(-1, *k.shape[2:])
    flat_v = v_pool.view(-1, *v.shape[2:])
    flat_k[slots] = k.reshape(-1, *k.shape[2:])
    flat_v[slots] = v.reshape(-1, *v.shape[2:])
    return flat_k, flat_v


class PagedLayer:
    """The cache of one layer for one step: stores the step's keys/values, then attends over the
    pool in place, each row through its own sequence's pages."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                 key_rows: torch.Tensor, key_positions: torch.Tensor, seq_starts: torch.Tensor):
        self.k_pool, self.v_pool, self.slots, self.seq_starts = k_pool, v_pool, slots, seq_starts
        self.key_rows, self.key_positions = key_rows, key_positions

    def attend(self, q, k, v, sinks, positions, window):
        flat_k, flat_v = store_kv(self.k_pool, self.v_pool, self.slots, k, v)
        return ops.attention(q, flat_k, flat_v, sinks, positions, self.key_positions, window, self.key_rows,
                             self.seq_starts)


class PagedCache:
    """Per-layer views of the pools for one batch; the key index is built once per pool kind."""

    def __init__(self, batch: ForwardBatch, pools: list[tuple[torch.Tensor, torch.Tensor]], sliding_layer: list[bool]):
        index = {kind: batch.key_index(kind) for kind in set(sliding_layer)}
        self.layers = [PagedLayer(k, v, batch.sliding_slots if sliding else batch.full_slots, *index[sliding],
                                  batch.query_start)
                       for (k, v), sliding in zip(pools, sliding_layer)]

    def advance(self, positions) -> None:  # the block tables already say where everything is
        pass


def sliding_layers(model: Model) -> list[bool]:
    return [model.config.window_of(i) > 0 for i in range(model.config.num_hidden_layers)]


def allocate_pools(model: Model, num_full: int, num_sliding: int, block_size: int) -> list[tuple]:
    """(K, V) pools [blocks, block_size, kv heads, head_dim] per layer, of this rank's kv heads."""
    pools = []
    for block, sliding in zip(model.blocks, sliding_layers(model)):
        blocks = num_sliding if sliding else num_full
        k = torch.zeros(blocks, block_size, block.attn.n_kv, block.attn.head_dim, dtype=model.dtype,
                        device=model.device)
        pools.append((k, torch.zeros_like(k)))
    return pools


def _padded(rows: list[list[int]], fill: int = -1) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


class ModelRunner:
    def __init__(self, model: Model, kv: KVCacheManager, seed: int | None = None, cuda_graphs: bool | None = None,
                 max_num_seqs: int = 32):
        """`cuda_graphs`: replay decode steps from CUDA graphs (gptoss.engine.cuda_graphs); None
        decides (on for CUDA devices with one rank); True on a CPU runs the same static steps."""
        self.model = model
        self.kv = kv
        self.sliding_layer = sliding_layers(model)
        self.ranks = getattr(model, "ranks", None)  # the other ranks, with tensor parallelism
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda" and self.ranks is None
        scratch = 1 if cuda_graphs else 0  # a block per pool that padding rows of a graph write
        sizes = (kv.full.num_blocks + scratch, kv.sliding.num_blocks + scratch, kv.block_size)
        self.pools = allocate_pools(model, *sizes)
        self.graphs = None
        if cuda_graphs:
            from gptoss.engine.cuda_graphs import DecodeGraphs

            bs, config = kv.block_size, model.config
            full_pages = min(-(-config.context_length // bs), kv.full.num_blocks)
            sliding_pages = -(-config.sliding_window // bs) + 2
            self.graphs = DecodeGraphs(model, self.pools, self.sliding_layer, bs, full_pages, sliding_pages,
                                       (kv.full.num_blocks * bs, kv.sliding.num_blocks * bs), max_num_seqs)
        if self.ranks is not None:
            with parallel.lock():
                self.ranks.send(("pools", *sizes))
        self.sampler = Sampler(seed)
        self.expert_rows = 0  # token rows the model computed (each goes through every layer's experts)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype, sliding: bool) -> int:
        layers = sum(1 for i in range(config.num_hidden_layers) if (config.window_of(i) > 0) == sliding)
        return 2 * layers * block_size * config.kv_dim * torch.empty((), dtype=dtype).element_size()

    def build_batch(self, batch: list[ScheduledSeq], extra_logit_rows: Sequence[int] = ()) -> ForwardBatch:
        """The scheduler's decision as plain tensors; logits come for the sampling rows, then for
        `extra_logit_rows` (prompt positions whose logprobs a request asked for)."""
        bs = self.kv.block_size
        tokens, positions, full_slots, sliding_slots, logit_rows = [], [], [], [], []
        starts, context, full_tables, sliding_tables, sliding_first = [0], [], [], [], []
        for item in batch:
            seq, start, n = item.seq, item.seq.num_computed, item.num_tokens
            new = range(start, start + n)
            tokens += seq.token_ids[start:start + n]
            positions += new
            full_slots += [seq.full_blocks[p // bs] * bs + p % bs for p in new]
            sliding_slots += [seq.sliding_blocks[p // bs] * bs + p % bs for p in new]
            starts.append(starts[-1] + n)
            context.append(start + n)
            full_tables.append(seq.full_blocks)
            first = self.kv.first_visible_page(start)
            sliding_first.append(first)
            sliding_tables.append([seq.sliding_blocks.get(p, -1) for p in range(first, -(-(start + n) // bs))])
            if item.samples:
                logit_rows.append(starts[-1] - 1)
        logit_rows += extra_logit_rows
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return ForwardBatch(as_tensor(tokens), as_tensor(positions), as_tensor(starts), as_tensor(context),
                            as_tensor(full_slots), as_tensor(sliding_slots), _padded(full_tables),
                            _padded(sliding_tables), as_tensor(sliding_first), as_tensor(logit_rows), bs)

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [R, V] of the batch's logit rows; stores the new keys/values."""
        if self.ranks is None:
            batch = batch.to(self.model.device)
            if self.graphs is not None and self.graphs.applies(batch):
                return self.graphs.run(batch)
            return self.model.forward_batch(batch, PagedCache(batch, self.pools, self.sliding_layer))
        with parallel.lock():  # the heartbeat waits: the ranks see the batch, then its collectives
            self.ranks.send(batch)
            batch = batch.to(self.model.device)
            return self.ranks.run(self.model.forward_batch, batch, PagedCache(batch, self.pools, self.sliding_layer))

    @staticmethod
    def prompt_logprob_rows(batch: list[ScheduledSeq]) -> list[tuple]:
        """(seq, position, flat row) of each prompt position in this step whose next-token logprob
        its request asked for and does not have yet (a recomputed prefix is not counted twice)."""
        rows, offset = [], 0
        for item in batch:
            seq, start, n = item.seq, item.seq.num_computed, item.num_tokens
            if seq.prompt_logprobs is not None:
                last = len(seq.prompt_token_ids) - 1
                for position in range(max(start, len(seq.prompt_logprobs) - 1), min(start + n, last)):
                    rows.append((seq, position, offset + position - start))
            offset += n
        return rows

    @staticmethod
    def record_prompt_logprobs(rows: list[tuple], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i, (seq, position, _) in enumerate(rows):
            token = seq.prompt_token_ids[position + 1]
            k = seq.params.prompt_logprobs
            top = []
            if k:
                values, ids = logprobs[i].topk(k)
                top = list(zip(ids.tolist(), values.tolist()))
            seq.prompt_logprobs.append((token, float(logprobs[i, token]), top))

    @torch.no_grad()
    def run(self, batch: list[ScheduledSeq]) -> dict[int, tuple[int, SampleOutput, int]]:
        """Forward the batch; returns id(seq) -> (token, sample output, row) for rows that sample."""
        prompt_rows = self.prompt_logprob_rows(batch)
        flat = self.build_batch(batch, [row for _, _, row in prompt_rows])
        self.expert_rows += flat.num_tokens
        logits = self.forward(flat)
        seqs = [item.seq for item in batch if item.samples]
        if prompt_rows:
            self.record_prompt_logprobs(prompt_rows, logits[len(seqs):])
            logits = logits[:len(seqs)]
        if not seqs:
            return {}
        params = [s.params for s in seqs]
        counts = [Counter(s.output_token_ids) for s in seqs] if any(p.uses_penalties for p in params) else None
        masks = self.constraint_masks(seqs, logits.shape[-1])
        out = self.sampler.sample(logits.float(), params, counts, [s.generator for s in seqs], masks)
        tokens = out.token_ids.tolist()
        for i in masks[1] if masks else ():
            seqs[i].constraint.advance(tokens[i])
        return {id(s): (tokens[i], out, i) for i, s in enumerate(seqs)}

    @staticmethod
    def constraint_masks(seqs: list, vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
        """(bitmask [B, V/32], constrained rows) for the rows with a structured-output constraint."""
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if not rows:
            return None
        from gptoss.structured import new_bitmask

        bitmask = new_bitmask(len(seqs), vocab_size)
        for i in rows:
            seqs[i].constraint.fill_mask(bitmask, i)
        return bitmask, rows
