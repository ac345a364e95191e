"""One model step as plain tensors: the scheduler's decision, flattened, with nothing padded.

The N new tokens of the B scheduled sequences lie end to end; sequence b owns rows
`query_start[b]:query_start[b + 1]`. Each pool (the full-attention layers' and the sliding
layers') has a block table: the block of each page of each sequence, -1 where a page is not
held. Being plain data, a batch can be sent to other ranks or replayed in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss.ops.reference import table_keys


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    query_start: torch.Tensor  # [B + 1]
    context_lens: torch.Tensor  # [B]: tokens in the cache once this step's keys are stored
    full_slots: torch.Tensor  # [N]: full-pool row (block * block_size + offset) each new token writes
    sliding_slots: torch.Tensor  # [N]: the same in the sliding pool
    full_block_table: torch.Tensor  # [B, pages]: block of each page, -1 past the sequence's end
    sliding_block_table: torch.Tensor  # [B, pages]: block of page sliding_first_page[b] + j, -1 if not held
    sliding_first_page: torch.Tensor  # [B]: the first page the step's earliest query can see
    logit_rows: torch.Tensor  # [R]: rows whose next-token logits are wanted
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def to(self, device) -> "ForwardBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return ForwardBatch(**moved)

    def seq_of_row(self) -> torch.Tensor:
        """[N]: which sequence each row belongs to."""
        counts = self.query_start[1:] - self.query_start[:-1]
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=counts.device), counts)

    def key_index(self, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool rows [N, S], positions [N, S], -1 where empty) of the keys each row may read:
        its own sequence's held pages (attention masks the future and what left the window)."""
        table = self.sliding_block_table if sliding else self.full_block_table
        first = self.sliding_first_page if sliding else torch.zeros_like(self.context_lens)
        rows, pos = table_keys(table, first, self.context_lens, self.block_size)
        seq = self.seq_of_row()
        return rows[seq], pos[seq]
