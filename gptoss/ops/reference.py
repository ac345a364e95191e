"""Plain-torch reference twins of the hot operations.

Every fast kernel (cpu/, triton/) keeps the signature of its twin here and is tested against it.
They favour clarity over speed, but never dequantize more than one expert at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss import mxfp4


@dataclass
class ExpertWeights:
    """One layer's experts as stored: MXFP4 matrices (blocks and scales), or float matrices in the
    Hugging Face layout (`gate_up_proj`, `down_proj`; the blocks and scales are then None)."""

    gate_up_blocks: torch.Tensor | None  # uint8 [E, 2I, H/32, 16], gate and up rows interleaved
    gate_up_scales: torch.Tensor | None  # uint8 [E, 2I, H/32]
    gate_up_bias: torch.Tensor  # [E, 2I]
    down_blocks: torch.Tensor | None  # uint8 [E, H, I/32, 16]
    down_scales: torch.Tensor | None  # uint8 [E, H, I/32]
    down_bias: torch.Tensor  # [E, H]
    swiglu_limit: float = 7.0
    gate_up_proj: torch.Tensor | None = None  # float [E, H, 2I] (input dimension first)
    down_proj: torch.Tensor | None = None  # float [E, I, H]

    @classmethod
    def from_float(cls, gate_up_proj, gate_up_bias, down_proj, down_bias, swiglu_limit=7.0) -> "ExpertWeights":
        return cls(None, None, gate_up_bias, None, None, down_bias, swiglu_limit, gate_up_proj, down_proj)

    @property
    def is_mxfp4(self) -> bool:
        return self.gate_up_proj is None

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias.shape[0]

    def matrices(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]) in `dtype`: dequantized, or the float ones transposed."""
        if self.is_mxfp4:
            return (mxfp4.dequantize(self.gate_up_blocks[e], self.gate_up_scales[e], dtype),
                    mxfp4.dequantize(self.down_blocks[e], self.down_scales[e], dtype))
        return self.gate_up_proj[e].to(dtype).T, self.down_proj[e].to(dtype).T


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b: the dense projections (attention, router, lm_head)."""
    return torch.nn.functional.linear(x, weight, bias)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (uint8 round(w * 127 / max|row|) + 128, fp32 scale max|row| / 127 [N])."""
    w = weight.float()
    amax = w.abs().amax(-1, keepdim=True)
    inv = int8_inverse_step(amax)
    return (torch.round(w * inv) + 128).to(torch.uint8), (amax / 127.0).squeeze(-1)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` for --dense-int8 weights, on x rounded to int8 per block of 32 (as the kernel does)."""
    w = (weight.float() - 128) * scale.float()[:, None]
    y = torch.nn.functional.linear(round_to_int8_blocks(x.float()), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in fp32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated in the NeoX half-split form: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


SWIGLU_ALPHA = 1.702


def swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU on interleaved [gate0, up0, gate1, up1, ...] columns."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(SWIGLU_ALPHA * gate)
    return (up + 1) * glu


def int8_inverse_step(amax: torch.Tensor) -> torch.Tensor:
    """127 / amax, or 0 where amax is 0 or so small (< 3.7e-37) that it overflows: those blocks become 0."""
    inv = torch.full_like(amax, 127.0) / amax  # tensor / tensor: IEEE division (`127.0 / t` is not exact)
    return torch.where((amax > 0) & torch.isfinite(inv), inv, torch.zeros_like(amax))


def round_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x with each block of 32 rounded to int8 steps of max|block| / 127 (llama.cpp's q8_0).

    The CPU kernels' expert path for bfloat16 models multiplies these integers with the MXFP4
    weights exactly; this is that rounding, for the tests that compare the two.
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)  # NaN if the block holds one: it then stays NaN
    inv = int8_inverse_step(amax)
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(x.shape).to(x.dtype)


def moe_experts(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: ExpertWeights, int8_activations: bool = False) -> torch.Tensor:
    """sum_k expert_weights[n, k] * Expert_{expert_indices[n, k]}(x[n]) for x [N, H] -> [N, H].

    With `int8_activations` the inputs of both projections go through `round_to_int8_blocks`.
    Differentiable for float experts: training runs through it.
    """
    rounded = round_to_int8_blocks if int8_activations else (lambda t: t)
    out = torch.zeros_like(x)
    for e in expert_indices.unique().tolist():
        token, slot = torch.nonzero(expert_indices == e, as_tuple=True)
        w_gate_up, w_down = experts.matrices(e, x.dtype)
        h = rounded(x[token]) @ w_gate_up.T + experts.gate_up_bias[e].to(x.dtype)
        y = rounded(swiglu(h, experts.swiglu_limit)) @ w_down.T + experts.down_bias[e].to(x.dtype)
        out.index_add_(0, token, y * expert_weights[token, slot, None].to(x.dtype))
    return out


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the raw router logits, then softmax over only those k -> (indices, weights)."""
    top_logits, top_indices = torch.topk(router_logits, k, dim=-1, sorted=True)
    weights = torch.softmax(top_logits.float(), dim=-1).to(router_logits.dtype)
    return top_indices, weights


def table_keys(block_table: torch.Tensor, first_page: torch.Tensor, context_lens: torch.Tensor,
               block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool rows [B, P * block_size], positions [B, P * block_size], -1 where empty) of the keys
    in each sequence's pages: entry j of block_table[b] holds page first_page[b] + j (-1: not
    held), and only positions below context_lens[b] exist."""
    b, width = block_table.shape
    offset = torch.arange(block_size, device=block_table.device)
    pages = first_page[:, None] + torch.arange(width, device=block_table.device)
    pos = (pages[:, :, None] * block_size + offset).reshape(b, -1)
    rows = (block_table[:, :, None] * block_size + offset).reshape(b, -1)
    valid = (block_table[:, :, None] >= 0).expand(-1, -1, block_size).reshape(b, -1) & (pos < context_lens[:, None])
    return torch.where(valid, rows, -1), torch.where(valid, pos, -1)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, sinks: torch.Tensor,
                     q_pos: torch.Tensor, block_table: torch.Tensor, first_page: torch.Tensor,
                     context_lens: torch.Tensor, window: int) -> torch.Tensor:
    """`attention` for one query per sequence, q [B, 1, Hq, D], over the pools [blocks, block_size,
    Hkv, D] through the block tables (see table_keys): every shape is fixed by the batch size and
    the table width, so a CUDA graph can replay it."""
    rows, pos = table_keys(block_table, first_page, context_lens, k_pool.shape[1])
    return attention(q, k_pool.reshape(-1, *k_pool.shape[2:]), v_pool.reshape(-1, *v_pool.shape[2:]), sinks,
                     q_pos, pos, window, rows)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
              key_rows: torch.Tensor | None = None, seq_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with a learned sink per head, GQA, causal and optional sliding window.

    q [B, T, Hq, D], k/v [B, S, Hkv, D], sinks [Hq], q_pos [B, T] and k_pos [B, S] absolute
    positions (k_pos < 0 marks an empty cache slot). Query i sees key j when
    pos_j <= pos_i and, with window > 0, pos_i - window < pos_j. Returns [B, T, Hq, D].
    With `key_rows` [B, S], k and v are a paged cache [..., Hkv, D] and key j of row b is its row
    key_rows[b, j] (ignored where k_pos < 0). `seq_starts` [S + 1], with key_rows, says that rows
    seq_starts[i]:seq_starts[i + 1] share their keys (one sequence): a hint for kernels that tile
    queries (triton/), which never changes the result.
    """
    if key_rows is not None:
        rows = key_rows.clamp(min=0)
        k = k.reshape(-1, *k.shape[-2:])[rows]
        v = v.reshape(-1, *v.shape[-2:])[rows]
    b, t, n_q, d = q.shape
    n_kv = k.shape[2]
    group = n_q // n_kv
    # [B, Hkv, group, T, D] x [B, Hkv, 1, D, S]: query head h reads kv head h // group.
    qg = q.float().reshape(b, t, n_kv, group, d).permute(0, 2, 3, 1, 4)
    kg = k.float().permute(0, 2, 3, 1).unsqueeze(2)
    scores = (qg @ kg) * d ** -0.5  # [B, Hkv, group, T, S]
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    if window > 0:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    sink = sinks.float().reshape(1, n_kv, group, 1, 1).expand(b, n_kv, group, t, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    vg = v.float().permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, S, D]
    out = probs @ vg  # [B, Hkv, group, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, n_q, d).to(q.dtype)
