"""The gpt-oss transformer in plain torch.

    x = embedding(tokens)
    for each block:  x = x + attention(rmsnorm(x));  x = x + moe(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

Attention: GQA with q/k/v/o biases, YaRN RoPE, a learned sink logit per head, and a 128-token
sliding window on even layers. MoE: top-k routing with softmax after top-k, clamped SwiGLU
experts stored in MXFP4. The two hot operations, `ops.attention` and `ops.moe_experts`, are
functions so that fast kernels can stand in for the plain-torch references.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gptoss import ops, parallel
from gptoss.checkpoint import (CheckpointError, CheckpointReader, checkpoint_key, detect_layout,
                               with_stored_expert_format)
from gptoss.config import ConfigError, ModelConfig
from gptoss.parallel import Shard


class Linear(nn.Linear):
    """nn.Linear whose product goes through ops.linear, where the fast kernels plug in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """A Linear quantized at load for --dense-int8: int8 weights (stored + 128) and a scale per row.

    Halves the bytes a decode step reads from the attention projections and lm_head, like
    llama.cpp's q8_0 files; activations are rounded to int8 per block of 32 in the product.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = ops.quantize_rows_int8(linear.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.bf16_bytes = linear.weight.numel() * linear.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_int8(x, self.weight, self.scale, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # x / sqrt(mean(x^2) + eps) * weight, in fp32


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies with YaRN (no truncation), and the attention factor for cos/sin."""
    d, theta, factor = config.head_dim, config.rope_theta, config.rope_scaling_factor
    extrapolation = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)
    interpolation = extrapolation / factor

    def correction_dim(rotations: float) -> float:
        return d * math.log(config.initial_context_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(correction_dim(config.rope_ntk_beta), 0.0)
    high = min(correction_dim(config.rope_ntk_alpha), d - 1.0)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


class Rotary(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, T, 1, D/2] for absolute positions [B, T], once per forward for every layer."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        return ((freqs.cos() * self.attention_factor)[:, :, None, :],
                (freqs.sin() * self.attention_factor)[:, :, None, :])


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, T, H, D] rotated in the NeoX half-split form (ops.rotary)."""
    return ops.rotary(x, *cos_sin)


class Attention(nn.Module):
    """With several ranks, this rank's heads (parallel.Shard): q/k/v column-parallel, o row-parallel."""

    def __init__(self, config: ModelConfig, layer: int, shard: Shard = Shard()):
        super().__init__()
        self.n_q, self.n_kv = len(shard.q_heads(config)), len(shard.kv_heads(config))
        self.head_dim = d = config.head_dim
        self.window = config.window_of(layer)
        self.q_proj = Linear(config.hidden_size, self.n_q * d)
        self.k_proj = Linear(config.hidden_size, self.n_kv * d)
        self.v_proj = Linear(config.hidden_size, self.n_kv * d)
        self.o_proj = Linear(self.n_q * d, config.hidden_size)
        self.sinks = nn.Parameter(torch.zeros(self.n_q))

    def forward(self, x, positions, rope, cache: "LayerCache | None"):
        return parallel.all_reduce(self.local_forward(x, positions, rope, cache))

    def local_forward(self, x, positions, rope, cache):
        b, t, _ = x.shape
        if self.n_q == 0:  # more ranks than heads: this one adds only its share of the bias (zero)
            return self.o_proj.bias.to(x.dtype).expand(b, t, -1).clone()
        q = apply_rotary(self.q_proj(x).view(b, t, self.n_q, self.head_dim), rope)
        k = apply_rotary(self.k_proj(x).view(b, t, self.n_kv, self.head_dim), rope)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if cache is None:
            out = ops.attention(q, k, v, self.sinks, positions, positions, self.window)
        else:  # the cache stores the new keys and attends over what it holds (a ring, or the engine's pages)
            out = cache.attend(q, k, v, self.sinks, positions, self.window)
        return self.o_proj(out.reshape(b, t, self.n_q * self.head_dim))


class Experts(nn.Module):
    """The experts of one layer, kept as stored: MXFP4 blocks and scales plus biases, or (for
    fine-tunes and training, `expert_format="float"`) float matrices in the Hugging Face layout,
    which are parameters that autograd trains through the reference ops."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        e0, e1 = shard.experts(config)
        i0, i1 = shard.intermediate(config)
        e, h, i = e1 - e0, config.hidden_size, i1 - i0
        self.first_expert, self.num_local_experts, self.local_intermediate = e0, e, i
        self.swiglu_limit = config.swiglu_limit
        self.is_mxfp4 = config.expert_format == "mxfp4"
        if self.is_mxfp4:
            self.register_buffer("gate_up_blocks", torch.zeros(e, 2 * i, h // 32, 16, dtype=torch.uint8))
            self.register_buffer("gate_up_scales", torch.zeros(e, 2 * i, h // 32, dtype=torch.uint8))
            self.register_buffer("gate_up_bias", torch.zeros(e, 2 * i))
            self.register_buffer("down_blocks", torch.zeros(e, h, i // 32, 16, dtype=torch.uint8))
            self.register_buffer("down_scales", torch.zeros(e, h, i // 32, dtype=torch.uint8))
            self.register_buffer("down_bias", torch.zeros(e, h))
        else:
            self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))  # [E, in, out], gate/up interleaved
            self.gate_up_bias = nn.Parameter(torch.zeros(e, 2 * i))
            self.down_proj = nn.Parameter(torch.zeros(e, i, h))
            self.down_bias = nn.Parameter(torch.zeros(e, h))

    def weights(self) -> ops.ExpertWeights:
        if self.is_mxfp4:
            return ops.ExpertWeights(self.gate_up_blocks, self.gate_up_scales, self.gate_up_bias,
                                     self.down_blocks, self.down_scales, self.down_bias, self.swiglu_limit)
        return ops.ExpertWeights.from_float(self.gate_up_proj, self.gate_up_bias, self.down_proj,
                                            self.down_bias, self.swiglu_limit)


class MoE(nn.Module):
    """The router is whole on every rank; the experts are this rank's (parallel.Shard): a slice of
    each expert's intermediate dimension, or with expert parallelism whole experts."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.experts_per_token = config.experts_per_token
        self.expert_parallel = shard.expert_parallel and not shard.is_whole
        self.router = Linear(config.hidden_size, config.num_experts)
        self.experts = Experts(config, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        indices, weights = ops.route(self.router(flat), self.experts_per_token)
        if self.expert_parallel:
            out = self._local_experts(flat, indices, weights)
        elif self.experts.local_intermediate == 0:  # more ranks than blocks: only the bias share
            bias = self.experts.down_bias.to(flat.dtype)[indices]  # [N, k, H], zero off rank 0
            out = (bias * weights[..., None].to(flat.dtype)).sum(1)
        else:
            out = ops.moe_experts(flat, indices, weights, self.experts.weights())
        return parallel.all_reduce(out).view_as(x)

    def _local_experts(self, flat, indices, weights) -> torch.Tensor:
        """The (token, slot) pairs routed to this rank's experts, one row each, summed per token."""
        local = indices - self.experts.first_expert
        mine = (local >= 0) & (local < self.experts.num_local_experts)
        out = torch.zeros_like(flat)
        if mine.any():
            token, slot = torch.nonzero(mine, as_tuple=True)
            rows = ops.moe_experts(flat[token], local[token, slot][:, None], weights[token, slot][:, None],
                                   self.experts.weights())
            out.index_add_(0, token, rows)
        return out


class VocabEmbedding(nn.Embedding):
    """The embedding rows of this rank's vocabulary slice; other ids give zero (summed over ranks)."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        self.first, last = shard.vocab(config)
        self.whole = shard.is_whole
        super().__init__(last - self.first, config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return super().forward(ids)
        local = ids - self.first
        mine = (local >= 0) & (local < self.num_embeddings)
        x = super().forward(local.clamp(0, max(self.num_embeddings - 1, 0))) if self.num_embeddings else \
            self.weight.new_zeros(*ids.shape, self.embedding_dim)
        return parallel.all_reduce(x * mine[..., None].to(x.dtype))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, shard: Shard = Shard()):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer, shard)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, shard)

    def forward(self, x, positions, rope, cache=None):
        x = x + self.attn(self.attn_norm(x), positions, rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class Model(nn.Module):
    """The whole model, or with `shard` one rank's part of it (gptoss.parallel): then every rank
    runs the same forward, and the logits come back on rank 0 (None on the others)."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.config, self.shard = config, shard
        self.embedding = VocabEmbedding(config, shard)
        self.rotary = Rotary(config)
        self.blocks = nn.ModuleList(TransformerBlock(config, i, shard) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, self.embedding.num_embeddings, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(self, input_ids: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V].

        With a cache (KVCache, or the engine's paged one), the tokens continue each row's sequence
        and their keys/values are stored. `last_only` computes the lm_head for the last position
        of each row: logits [B, 1, V]. (The engine's flat steps use `forward_batch`.)
        """
        x = self.hidden_states(input_ids, cache, positions)
        return self.logits(self.norm(x[:, -1:] if last_only else x))

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """lm_head over the last dimension; with several ranks each computes its vocabulary slice
        and rank 0 gets them all."""
        if self.shard.is_whole:
            return self.lm_head(x)
        full = parallel.gather_rows(self.lm_head(x.reshape(-1, x.shape[-1])), self.config.vocab_size)
        return None if full is None else full.view(*x.shape[:-1], -1)

    def forward_batch(self, batch, cache) -> torch.Tensor:
        """One engine step (`gptoss.engine.batch.ForwardBatch`): the N tokens run as N rows of one
        token each, attention reading each row's own keys through `cache`. Returns the logits of
        `batch.logit_rows` [R, V]."""
        x = self.hidden_states(batch.token_ids[:, None], cache, batch.positions[:, None])
        return self.logits(self.norm(x[batch.logit_rows, 0]))

    def hidden_states(self, input_ids: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last block [B, T, H] (before the final norm and lm_head)."""
        b, t = input_ids.shape
        if positions is None:
            start = cache.lengths if cache is not None else torch.zeros(b, dtype=torch.long, device=input_ids.device)
            positions = start[:, None] + torch.arange(t, device=input_ids.device)
        x = self.embedding(input_ids)
        rope = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, rope, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(positions)
        return x

    @torch.no_grad()
    def quantize_dense_int8(self) -> None:
        """--dense-int8: the attention projections and lm_head become Int8Linear (the router stays)."""
        for block in self.blocks:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.attn, name, Int8Linear(getattr(block.attn, name)))
        self.lm_head = Int8Linear(self.lm_head)

    def new_cache(self, batch_size: int = 1) -> "KVCache":
        return KVCache(self.config, batch_size, self.dtype, self.device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.bfloat16, progress: bool = False,
                        dense_int8: bool = False, revision: str | None = None, shard: Shard = Shard(),
                        mmap: bool = True) -> "Model":
        """Load a Hugging Face or `original/` checkpoint folder, or a Hub id (`openai/gpt-oss-20b`,
        downloaded into the Hugging Face cache, see gptoss.hub).

        Tensors are memory-mapped; those already in the wanted dtype on the CPU are used in place.
        Experts stay MXFP4. Any missing, unexpected or misshaped tensor raises CheckpointError
        before a model is returned. `dense_int8` quantizes the attention projections and lm_head
        (see Int8Linear); the CPU int8 kernels need AVX-512 VNNI, elsewhere it is refused. With
        `shard`, only this rank's slice of each tensor is read (gptoss.parallel). `mmap=False` copies
        every tensor out of the file map into the process's own memory and drops the file's pages
        (llama.cpp's --no-mmap): slower to load and the whole model must fit in RAM; the copies
        sit in 4 KB pages, where the maps get 2 MB ones, so decode is slower (docs/cpu-kernels.md).
        """
        from gptoss.hub import resolve

        path = resolve(path, revision)
        folder, layout, config = detect_layout(path)
        reader = CheckpointReader(folder)
        config = with_stored_expert_format(reader, layout, config)
        ops.select(device)  # decide the kernels (and build or report them) now, not mid-forward
        with torch.device("meta"):
            model = cls(config, shard)
            expected = cls(config).state_dict() if not shard.is_whole else model.state_dict()
        plan = {name: checkpoint_key(name, layout, config) for name in expected}
        _check_plan(reader, plan, expected, config)

        names = list(plan)
        if progress:
            from gptoss.progress import track
            names = track(names, description=f"Loading {Path(path).name}")
        state = {}
        for name in names:
            ref = plan[name]
            tensor = reader.get(ref.key)
            if ref.rows is not None:
                tensor = tensor[ref.rows[0]:ref.rows[1]]
            part = shard.slice(name, tensor, config)
            want = part.dtype if part.dtype == torch.uint8 else dtype
            state[name] = part.to(device=device, dtype=want)
            copy = not shard.is_whole or not mmap
            if copy and state[name].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                # A rank keeps its slice (and --no-mmap its tensors), not the file's pages under it.
                state[name] = state[name].clone(memory_format=torch.contiguous_format)
            if copy:
                reader.release(ref.key)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary.inv_freq = yarn_inv_freq(config)[0].to(device)
        model.eval().requires_grad_(False)
        if dense_int8:
            check_dense_int8(torch.device(device), config)
            model.quantize_dense_int8()
        return model


def check_dense_int8(device: torch.device, config: ModelConfig) -> None:
    """--dense-int8 runs on CPUs with the int8 kernels; elsewhere it would be slower than bf16."""
    from gptoss.ops import cpu

    if device.type != "cpu":
        raise ConfigError("--dense-int8 is a CPU option; on a GPU the dense weights stay bf16")
    if not cpu.dense_int8_supported():
        raise ConfigError("--dense-int8 needs a CPU with AVX-512 VNNI and VBMI (and the gptoss CPU kernels); "
                         "this one runs the bf16 weights faster: leave the option out")
    for name, width in (("hidden_size", config.hidden_size), ("q_dim", config.q_dim)):
        if width % 32:
            raise ConfigError(f"--dense-int8 needs {name} to be a multiple of 32, not {width}")


def _check_plan(reader: CheckpointReader, plan: dict, expected: dict, config: ModelConfig) -> None:
    problems = []
    used = set()
    for name, ref in plan.items():
        used.add(ref.key)
        if ref.key not in reader:
            problems.append(f"missing tensor {ref.key} (for {name})")
            continue
        entry = reader.entries[ref.key]
        shape = list(expected[name].shape)
        if ref.rows is not None:
            shape = [config.q_dim + 2 * config.kv_dim] + shape[1:]
        if list(entry.shape) != shape:
            problems.append(f"tensor {ref.key} in {entry.file.name} has shape {list(entry.shape)}, "
                            f"expected {shape}")
        elif (entry.dtype == torch.uint8) != (expected[name].dtype == torch.uint8):
            problems.append(f"tensor {ref.key} in {entry.file.name} has dtype {entry.dtype}, "
                            f"expected {'uint8' if expected[name].dtype == torch.uint8 else 'a float type'}")
    for key in sorted(set(reader.keys()) - used):
        problems.append(f"unexpected tensor {key} in {reader.entries[key].file.name}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(f"checkpoint {reader.folder} does not match its config.json:\n  {shown}{more}")


class LayerCache:
    """Keys and values of one layer for a batch of rows.

    Sliding-window layers keep a ring of `window` slots (slot = position % window), so their
    memory stays fixed; full layers grow by doubling. `pos` holds each slot's position, -1 if empty.
    """

    def __init__(self, batch: int, window: int, n_kv: int, head_dim: int, dtype, device):
        self.window = window
        capacity = window if window > 0 else 16
        self.k = torch.zeros(batch, capacity, n_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.filled = 0  # full layers: slots [0, filled) have been written

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def update(self, k, v, positions):
        """Store the new keys/values; return the keys, values, positions (and key rows) the queries see.

        Stored first and read in place, except a chunk of several tokens on a ring: it may
        overwrite slots that its own first queries still need, so those see old + new. The key
        rows (for a paged cache, see ops.attention) are None: keys are [B, S, ...] here.
        """
        if self.window and k.shape[1] > 1:
            seen = (torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1),
                    torch.cat([self.pos, positions], dim=1), None)
            self._store(k, v, positions)
            return seen
        self._store(k, v, positions)
        used = self.capacity if self.window else self.filled
        return self.k[:, :used], self.v[:, :used], self.pos[:, :used], None

    def attend(self, q, k, v, sinks, positions, window):
        keys, values, key_pos, key_rows = self.update(k, v, positions)
        return ops.attention(q, keys, values, sinks, positions, key_pos, window, key_rows)

    def _store(self, k, v, positions):
        """Write every real token (padding sits at position -1) to its slot."""
        real = positions >= 0
        if self.window:
            # Of a chunk longer than the ring, only each row's last `window` positions survive.
            real &= positions > positions.max(dim=1, keepdim=True).values - self.window
            slots = positions % self.window
        else:
            needed = int(positions.max().item()) + 1
            if needed > self.capacity:
                self._grow(max(needed, 2 * self.capacity))
            self.filled = max(self.filled, needed)
            slots = positions
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions)[real]
        slots = slots[real]
        self.k[rows, slots] = k[real]
        self.v[rows, slots] = v[real]
        self.pos[rows, slots] = positions[real]

    def _grow(self, capacity: int):
        extra = capacity - self.capacity
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], extra, *self.k.shape[2:])], dim=1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], extra, *self.v.shape[2:])], dim=1)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], extra), -1)], dim=1)


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype, device):
        self.layers = [LayerCache(batch_size, config.window_of(i), config.num_key_value_heads, config.head_dim,
                                  dtype, device) for i in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def advance(self, positions: torch.Tensor) -> None:
        self.lengths = positions[:, -1] + 1
