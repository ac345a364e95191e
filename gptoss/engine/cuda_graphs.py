"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (every scheduled sequence adds one token) has fixed shapes once its batch is padded
to a bucket and its block tables to their widest (the context's pages; the window's pages): the
step is copied into static buffers and the forward captured for that bucket is replayed, with no
Python launching kernels and nothing allocated. Padding rows read no keys (length 0) and write
a scratch block the cache manager never hands out. Attention walks the block tables itself
(ops.decode_attention), and the MoE kernels plan their tiles on the device, so nothing in the
step waits on the host. Prefill and mixed steps run eagerly; `--enforce-eager` turns graphs off.
Where there is no CUDA (the tests), the same static step runs without capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss import ops
from gptoss.engine.batch import ForwardBatch
from gptoss.engine.runner import store_kv

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphLayer:
    """One layer's cache in a static decode step: store the new keys, attend through the tables."""

    def __init__(self, k_pool, v_pool, slots, table, first_page, context_lens):
        self.k_pool, self.v_pool, self.slots = k_pool, v_pool, slots
        self.table, self.first_page, self.context_lens = table, first_page, context_lens

    def attend(self, q, k, v, sinks, positions, window):
        store_kv(self.k_pool, self.v_pool, self.slots, k, v)
        return ops.decode_attention(q, self.k_pool, self.v_pool, sinks, positions, self.table, self.first_page,
                                    self.context_lens, window)


class GraphCache:
    def __init__(self, batch: ForwardBatch, pools: list[tuple], sliding_layer: list[bool]):
        no_offset = torch.zeros_like(batch.sliding_first_page)
        self.layers = [GraphLayer(k, v, batch.sliding_slots, batch.sliding_block_table, batch.sliding_first_page,
                                  batch.context_lens) if sliding else
                       GraphLayer(k, v, batch.full_slots, batch.full_block_table, no_offset, batch.context_lens)
                       for (k, v), sliding in zip(pools, sliding_layer)]

    def advance(self, positions) -> None:
        pass


@dataclass
class StaticStep:
    """A bucket's input buffers (its ForwardBatch, padded), and on CUDA its graph and output."""

    batch: ForwardBatch
    graph: object = None
    logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model, pools: list[tuple], sliding_layer: list[bool], block_size: int,
                 full_pages: int, sliding_pages: int, scratch_slots: tuple[int, int], max_batch: int):
        self.model, self.pools, self.sliding_layer = model, pools, sliding_layer
        self.scratch_slots = dict(zip(("full_slots", "sliding_slots"), scratch_slots))
        self.capture = model.device.type == "cuda"
        self.sizes = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        self.steps = {}
        self.replays = 0  # decode steps run from the static buffers
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory
            step = StaticStep(self._static_batch(size, block_size, full_pages, sliding_pages))
            if self.capture:
                self._capture(step)
            self.steps[size] = step

    def _static_batch(self, size: int, block_size: int, full_pages: int, sliding_pages: int) -> ForwardBatch:
        device = self.model.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)  # noqa: E731
        rows = torch.arange(size, device=device)
        return ForwardBatch(zeros(size), zeros(size), torch.arange(size + 1, device=device), zeros(size),
                            zeros(size) + self.scratch_slots["full_slots"],
                            zeros(size) + self.scratch_slots["sliding_slots"],
                            zeros(size, full_pages) - 1, zeros(size, sliding_pages) - 1, zeros(size), rows,
                            block_size)

    def _forward(self, step: StaticStep) -> torch.Tensor:
        return self.model.forward_batch(step.batch, GraphCache(step.batch, self.pools, self.sliding_layer))

    def _capture(self, step: StaticStep) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # compile the Triton kernels and set up cuBLAS before capturing
                self._forward(step)
        torch.cuda.current_stream().wait_stream(stream)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self.pool), torch.no_grad():
            step.logits = self._forward(step)

    def applies(self, batch: ForwardBatch) -> bool:
        """A pure decode step whose tables fit the static ones."""
        if batch.num_tokens != batch.num_seqs or batch.num_seqs > self.sizes[-1]:
            return False
        static = self.steps[self.sizes[-1]].batch
        return (batch.logit_rows.numel() == batch.num_seqs
                and batch.full_block_table.shape[1] <= static.full_block_table.shape[1]
                and batch.sliding_block_table.shape[1] <= static.sliding_block_table.shape[1])

    @torch.no_grad()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, V] of a decode step (see applies), from the smallest bucket that holds it."""
        n = batch.num_seqs
        self.replays += 1
        step = self.steps[next(size for size in self.sizes if size >= n)]
        s = step.batch
        for name in ("token_ids", "positions", "context_lens", "sliding_first_page"):
            getattr(s, name).zero_()
            getattr(s, name)[:n].copy_(getattr(batch, name))
        for name in ("full_slots", "sliding_slots"):
            getattr(s, name).fill_(self.scratch_slots[name])
            getattr(s, name)[:n].copy_(getattr(batch, name))
        for name in ("full_block_table", "sliding_block_table"):
            table = getattr(batch, name)
            getattr(s, name).fill_(-1)
            getattr(s, name)[:n, :table.shape[1]].copy_(table)
        if step.graph is None:
            return self._forward(step)[:n]
        step.graph.replay()
        return step.logits[:n]
