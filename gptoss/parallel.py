"""Tensor and expert parallelism over torch.distributed: which slice of the model each rank holds,
and the few collectives the model needs.

    attention   q heads split (with the kv heads they read; sinks with their heads), o row-parallel
    experts     intermediate dimension split in whole 32-value MXFP4 blocks (gate_up column-,
                down row-parallel), or with expert_parallel whole experts per rank
    vocabulary  embedding and lm_head rows split; logits gathered on rank 0, which samples

The residual stream is whole on every rank: one all-reduce after the attention output projection
and one after the MoE. Splits may be uneven (2880 = 90 blocks over 4 ranks), and a rank may hold
nothing of a part (8 ranks, 4 heads): it then adds zero. Biases of row-parallel layers live on
rank 0. At world size 1 every function here is the identity and no process group exists.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

MXFP4_BLOCK = 32


class ParallelError(RuntimeError):
    """A rank died, hung or failed: the model cannot run without it."""


def split(count: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when `count` units are dealt to `parts` as evenly as can be."""
    return index * count // parts, (index + 1) * count // parts


@dataclass(frozen=True)
class Shard:
    """Which part of the model this rank holds (rank 0 of 1: all of it)."""

    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")

    @property
    def is_whole(self) -> bool:
        return self.world_size == 1

    @property
    def owns_biases(self) -> bool:
        """Row-parallel biases are added once, by rank 0."""
        return self.rank == 0

    def q_heads(self, config) -> list[int]:
        if self.world_size <= config.num_key_value_heads:  # whole kv groups per rank
            k0, k1 = split(config.num_key_value_heads, self.world_size, self.rank)
            group = config.num_attention_heads // config.num_key_value_heads
            return list(range(k0 * group, k1 * group))
        return list(range(*split(config.num_attention_heads, self.world_size, self.rank)))

    def kv_heads(self, config) -> list[int]:
        """The kv head each local q head reads, once per group when the local q heads form whole
        groups of equal size, else one per q head (a kv head is then copied to both ranks that
        share it, and the local group size is 1)."""
        group = config.num_attention_heads // config.num_key_value_heads
        wanted = [q // group for q in self.q_heads(config)]
        distinct = sorted(set(wanted))
        if distinct and len(wanted) % len(distinct) == 0:
            local_group = len(wanted) // len(distinct)
            if wanted == [k for k in distinct for _ in range(local_group)]:
                return distinct
        return wanted

    def intermediate(self, config) -> tuple[int, int]:
        """[start, end) of the expert intermediate dimension, in whole MXFP4 blocks."""
        if self.expert_parallel:
            return 0, config.intermediate_size
        b0, b1 = split(config.intermediate_size // MXFP4_BLOCK, self.world_size, self.rank)
        return b0 * MXFP4_BLOCK, b1 * MXFP4_BLOCK

    def experts(self, config) -> tuple[int, int]:
        if not self.expert_parallel:
            return 0, config.num_experts
        return split(config.num_experts, self.world_size, self.rank)

    def vocab(self, config) -> tuple[int, int]:
        return split(config.vocab_size, self.world_size, self.rank)

    # -- the slice of each checkpoint tensor -------------------------------------------------
    def slice(self, name: str, tensor: torch.Tensor, config) -> torch.Tensor:
        """This rank's part of parameter `name` (a model state-dict name) read as `tensor`.
        Views of a memory-mapped file: only the slice is copied when it is loaded."""
        if self.is_whole:
            return tensor
        local = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        d = config.head_dim
        if name in ("embedding.weight", "lm_head.weight"):
            return tensor[slice(*self.vocab(config))]
        if local in ("attn.q_proj.weight", "attn.q_proj.bias"):
            return tensor[_head_rows(self.q_heads(config), d)]
        if local in ("attn.k_proj.weight", "attn.k_proj.bias", "attn.v_proj.weight", "attn.v_proj.bias"):
            return tensor[_head_rows(self.kv_heads(config), d)]
        if local == "attn.o_proj.weight":
            return tensor[:, _head_rows(self.q_heads(config), d)]
        if local == "attn.sinks":
            return tensor[self.q_heads(config)]
        if local in ("attn.o_proj.bias",):
            return tensor if self.owns_biases else torch.zeros_like(tensor)
        if not local.startswith("mlp.experts."):
            return tensor  # norms, router: whole on every rank
        part = local.rsplit(".", 1)[-1]
        if self.expert_parallel:
            return tensor[slice(*self.experts(config))]
        i0, i1 = self.intermediate(config)
        if part in ("gate_up_blocks", "gate_up_scales", "gate_up_bias"):
            return tensor[:, 2 * i0:2 * i1]
        if part in ("down_blocks", "down_scales"):
            return tensor[:, :, i0 // MXFP4_BLOCK:i1 // MXFP4_BLOCK]
        if part == "gate_up_proj":  # float experts [E, H, 2I]
            return tensor[:, :, 2 * i0:2 * i1]
        if part == "down_proj":  # [E, I, H]
            return tensor[:, i0:i1]
        if part == "down_bias":
            return tensor if self.owns_biases else torch.zeros_like(tensor)
        raise KeyError(f"no shard rule for {name}")


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


# -- the process group ----------------------------------------------------------------------------

class _Group:
    """The process group of this process, once `init` has run; steps and heartbeats share a lock."""

    group = None  # the group the model's collectives use (short timeout)
    load_group = None  # the group that waits for every rank to load (long timeout)
    lock = threading.Lock()
    rank = 0
    world_size = 1
    step_timeout = 15.0
    bytes_sent = 0  # payload this rank has put into collectives (for benchmarks/parallel.py)


def lock() -> threading.Lock:
    """Held while rank 0 sends a step and runs its collectives (the heartbeat must not interleave)."""
    return _Group.lock


def step_timeout() -> float:
    return _Group.step_timeout


def bytes_sent() -> int:
    """Tensor payload this rank has put into collectives so far (rank 0 also sends each batch)."""
    return _Group.bytes_sent


def world_size() -> int:
    return _Group.world_size


def rank() -> int:
    return _Group.rank


def init(rank_: int, world: int, *, init_method: str = "env://", backend: str = "gloo",
         join_timeout: float | None = None, load_timeout: float = 900.0, step_timeout: float | None = None) -> None:
    """Join the group: every rank does so first thing, so a rank missing after `join_timeout`
    (GPTOSS_JOIN_TIMEOUT, 60 s) has failed to start. Loading may then take minutes (`ready()`
    waits `load_timeout`); after it every collective fails after `step_timeout` seconds
    (GPTOSS_STEP_TIMEOUT, 15) instead of waiting forever."""
    _Group.rank, _Group.world_size = rank_, world
    _Group.step_timeout = step_timeout or float(os.environ.get("GPTOSS_STEP_TIMEOUT", "15"))
    join_timeout = join_timeout or float(os.environ.get("GPTOSS_JOIN_TIMEOUT", "60"))
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world,
                                timeout=timedelta(seconds=join_timeout))
    except RuntimeError as exc:  # DistStoreError and friends: a rank never came
        raise ParallelError(f"rank {rank_}: the {world} ranks did not all join within {join_timeout:.0f} s: "
                            f"{str(exc).splitlines()[0]}") from exc
    _Group.load_group = dist.new_group(list(range(world)), timeout=timedelta(seconds=load_timeout))
    _Group.group = dist.group.WORLD


def ready() -> None:
    """Every rank has loaded its shard: from now on a rank that does not answer is an error."""
    _collective(dist.barrier, group=_Group.load_group)
    _Group.group = dist.new_group(list(range(_Group.world_size)), timeout=timedelta(seconds=_Group.step_timeout))


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tidy
            pass
    _Group.group, _Group.rank, _Group.world_size = None, 0, 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in fp32 for half types: exact enough, and gloo sums floats everywhere)."""
    if _Group.world_size == 1:
        return x
    wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x.contiguous()
    _Group.bytes_sent += wide.numel() * wide.element_size()
    _collective(dist.all_reduce, wide, group=_Group.group)
    return wide.to(x.dtype) if wide is not x else wide


def gather_rows(x: torch.Tensor, total: int) -> torch.Tensor | None:
    """Concatenate each rank's columns of x [R, local] on rank 0 -> [R, total]; None elsewhere."""
    if _Group.world_size == 1:
        return x
    widest = -(-total // _Group.world_size) + 1
    padded = x.new_zeros(x.shape[0], widest)
    padded[:, :x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(_Group.world_size)] if _Group.rank == 0 else None
    _Group.bytes_sent += padded.numel() * padded.element_size()
    _collective(dist.gather, padded, parts, dst=0, group=_Group.group)
    if _Group.rank != 0:
        return None
    widths = [b - a for a, b in (split(total, _Group.world_size, r) for r in range(_Group.world_size))]
    return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)


def broadcast(value):
    """Rank 0's picklable `value` on every rank (the step's ForwardBatch, or a command)."""
    if _Group.world_size == 1:
        return value
    box = [value]
    tensors = getattr(value, "__dict__", {}).values()
    _Group.bytes_sent += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    _collective(dist.broadcast_object_list, box, src=0, group=_Group.group)
    return box[0]


def _collective(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo: a peer closed its connection, or did not answer in time
        raise ParallelError(f"rank {_Group.rank}: a collective with the other ranks failed: {exc}") from exc


def pin_threads(rank_: int, world: int) -> None:
    """On CPU each rank gets its share of the cores (a rank per core set, not all fighting)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return
    share = [c for i, c in enumerate(cores) if i * world // len(cores) == rank_] if len(cores) >= world \
        else [cores[rank_ % len(cores)]]
    os.sched_setaffinity(0, share)
    torch.set_num_threads(len(share))
