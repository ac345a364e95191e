"""What a checkpoint holds and what one decoded token must read from memory.

Decode at batch 1 is memory-bound: tokens/s <= bandwidth / bytes per token. A token reads
every dense tensor, the router, `experts_per_token` of each layer's experts, one embedding row
and the whole lm_head.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gptoss.checkpoint import CheckpointReader, checkpoint_key, detect_layout, dtype_name, with_stored_expert_format
from gptoss.config import ModelConfig


@dataclass
class Footprint:
    config: ModelConfig
    layout: str
    folder: Path
    bytes_by_dtype: dict[str, int]
    bytes_per_token: int

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())


def parameter_names(config: ModelConfig) -> list[str]:
    from gptoss.model import Model
    import torch

    with torch.device("meta"):
        return list(Model(config).state_dict())


def bytes_read_per_token(config: ModelConfig, reader: CheckpointReader, layout: str) -> int:
    total = 0
    for name in parameter_names(config):
        ref = checkpoint_key(name, layout, config)
        entry = reader.entries[ref.key]
        nbytes = entry.nbytes
        if ref.rows is not None:
            nbytes = nbytes * (ref.rows[1] - ref.rows[0]) // entry.shape[0]
        if ".mlp.experts." in name:
            nbytes = nbytes * config.experts_per_token // config.num_experts
        elif name == "embedding.weight":
            nbytes //= config.vocab_size
        total += nbytes
    return total


def footprint(path: str | Path) -> Footprint:
    folder, layout, config = detect_layout(Path(path))
    return footprint_of(folder, layout, config, CheckpointReader(folder))


def footprint_of(folder, layout: str, config: ModelConfig, reader) -> Footprint:
    """`reader` needs only `entries` (name -> TensorEntry) and `in`: the headers, not the data."""
    # MXFP4 blocks or float matrices: the tensors say which, whatever config.json claims.
    config = with_stored_expert_format(reader, layout, config)
    by_dtype = Counter()
    for entry in reader.entries.values():
        by_dtype[dtype_name(entry.dtype)] += entry.nbytes
    return Footprint(config, layout, folder, dict(by_dtype), bytes_read_per_token(config, reader, layout))
