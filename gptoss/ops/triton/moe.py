"""MXFP4 experts as two grouped matmuls over the (token, slot) pairs sorted by expert.

    pairs sorted by expert, cut into tiles of BLOCK_M rows of one expert each
    kernel 1: h = clamped_swiglu(x[token] @ gate_up[e]^T + b)   gate/up rows read as packed nibbles
    kernel 2: y[pair] = weight[pair] * (h @ down[e]^T + b)     written back in (token, slot) order
    out = y.view(N, k, H).sum(1)

The weights are read as stored (uint8 blocks [E, rows, K/32, 16] and E8M0 scales) and decoded in
registers: no float copy of an expert ever exists in memory. Tiles are planned on the device
with no host sync, and their count has a static bound, so the launch can be captured in a CUDA
graph. The compute dtype is a parameter (bf16 on sm80+, fp16 on sm75; the tests run fp32 and fp16
under the Triton interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.ops.reference import SWIGLU_ALPHA, ExpertWeights


@triton.jit
def _e2m1(nibble):
    """FP4 E2M1 code -> value: sign, 2 exponent bits, 1 mantissa bit (subnormal 0.5 at exponent 0)."""
    magnitude = nibble & 7
    exponent = magnitude >> 1
    mantissa = (magnitude & 1).to(tl.float32)
    normal = (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
    value = tl.where(exponent == 0, 0.5 * mantissa, normal)
    return tl.where(nibble >= 8, -value, value)


@triton.jit
def _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, rows, row_mask, k_offsets, k_mask,
                     stride_be, stride_br, stride_se, stride_sr):
    """Weight rows `rows` x columns `k_offsets` of one expert, decoded -> [BLOCK_K, BLOCK_N] fp32
    (transposed, ready for x @ w)."""
    k = k_offsets[:, None]
    r = rows[None, :]
    mask = k_mask[:, None] & row_mask[None, :]
    byte = tl.load(blocks_ptr + expert * stride_be + r * stride_br + (k // 32) * 16 + (k % 32) // 2,
                   mask=mask, other=0)
    nibble = tl.where(k % 2 == 0, byte & 15, byte >> 4)
    scale = tl.load(scales_ptr + expert * stride_se + r * stride_sr + k // 32, mask=mask, other=127)
    factor = tl.exp2(scale.to(tl.float32) - 127.0)
    factor = tl.where(scale == 255, float("nan"), factor)
    return _e2m1(nibble) * factor


@triton.jit
def _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its expert, whether it has rows, and the sorted rows it owns."""
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    return tl.load(tile_expert_ptr + tile), start < end, rows, rows < end


@triton.jit
def _gate_up_swiglu_kernel(x_ptr, token_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                           blocks_ptr, scales_ptr, bias_ptr, h_ptr,
                           H, I, limit,
                           stride_xn, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_hn,
                           ALPHA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    expert, busy, rows, row_mask = _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    if busy:
        token = tl.load(token_ptr + rows, mask=row_mask, other=0)
        units = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate units j: rows 2j, 2j+1
        unit_mask = units < I
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            x = tl.load(x_ptr + token[:, None] * stride_xn + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0).to(COMPUTE)
            w_gate = _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, 2 * units, unit_mask, ks, k_mask,
                                      stride_be, stride_br, stride_se, stride_sr).to(COMPUTE)
            w_up = _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, 2 * units + 1, unit_mask, ks, k_mask,
                                    stride_be, stride_br, stride_se, stride_sr).to(COMPUTE)
            acc_gate += tl.dot(x, w_gate, input_precision=PRECISION, out_dtype=tl.float32)
            acc_up += tl.dot(x, w_up, input_precision=PRECISION, out_dtype=tl.float32)
        gate = acc_gate + tl.load(bias_ptr + expert * stride_bias + 2 * units, mask=unit_mask, other=0.0)[None, :]
        up = acc_up + tl.load(bias_ptr + expert * stride_bias + 2 * units + 1, mask=unit_mask, other=0.0)[None, :]
        gate = gate.to(COMPUTE).to(tl.float32)  # the reference rounds the product to the compute dtype
        up = up.to(COMPUTE).to(tl.float32)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        glu = gate * tl.sigmoid(ALPHA * gate)
        h = (up + 1.0) * glu
        tl.store(h_ptr + rows[:, None] * stride_hn + units[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & unit_mask[None, :])


@triton.jit
def _down_scatter_kernel(h_ptr, pair_ptr, weight_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                         blocks_ptr, scales_ptr, bias_ptr, y_ptr,
                         H, I,
                         stride_hn, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_yn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    expert, busy, rows, row_mask = _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    if busy:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output (hidden) units
        col_mask = cols < H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < I
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0).to(COMPUTE)
            w = _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, cols, col_mask, ks, k_mask,
                                 stride_be, stride_br, stride_se, stride_sr).to(COMPUTE)
            acc += tl.dot(h, w, input_precision=PRECISION, out_dtype=tl.float32)
        y = acc + tl.load(bias_ptr + expert * stride_bias + cols, mask=col_mask, other=0.0)[None, :]
        y = y.to(COMPUTE).to(tl.float32)
        weight = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE).to(tl.float32)
        pair = tl.load(pair_ptr + rows, mask=row_mask, other=0)
        tl.store(y_ptr + pair[:, None] * stride_yn + cols[None, :], (y * weight[:, None]).to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


def plan_tiles(expert_indices: torch.Tensor, num_experts: int, block_m: int):
    """Sort the (token, slot) pairs by expert and cut each expert's run into tiles of block_m rows.

    Returns (pair of each sorted row [P], tile expert [T], tile start [T], tile end [T]) where
    T = P // block_m + E is a bound known without looking at the data: unused tiles have
    start == end and do nothing. Everything stays on the device (no .item()).
    """
    flat = expert_indices.reshape(-1)
    pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)  # not bincount: its size syncs
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    row_end = torch.cumsum(counts, 0)
    row_start = row_end - counts
    tiles_of = (counts + block_m - 1) // block_m
    tile_end_cum = torch.cumsum(tiles_of, 0)
    num_tiles = pairs // block_m + num_experts
    t = torch.arange(num_tiles, device=flat.device)
    expert = torch.searchsorted(tile_end_cum, t, right=True).clamp(max=num_experts - 1)
    first_tile = tile_end_cum[expert] - tiles_of[expert]
    start = row_start[expert] + (t - first_tile) * block_m
    end = torch.minimum(start + block_m, row_end[expert])
    used = t < tile_end_cum[-1]
    start = torch.where(used, start, 0)
    end = torch.where(used, end, 0)
    return order, expert.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_precision(compute_dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 stays fp32 ("ieee", not tf32); half types ignore it."""
    return "ieee" if compute_dtype == torch.float32 else "tf32"


def moe_experts(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: ExpertWeights, compute_dtype: torch.dtype | None = None,
                block_m: int | None = None) -> torch.Tensor:
    """The reference `moe_experts` for MXFP4 experts (float experts go to the reference twin)."""
    from gptoss.ops import reference

    if not experts.is_mxfp4 or x.shape[0] == 0:
        return reference.moe_experts(x, expert_indices, expert_weights, experts)
    compute_dtype = compute_dtype or x.dtype
    n, hidden = x.shape
    k = expert_indices.shape[1]
    num_experts, two_i = experts.gate_up_bias.shape
    inter = two_i // 2
    if block_m is None:  # decode: few rows per expert, small tiles; prefill: larger ones
        block_m = 16 if n * k <= 4 * num_experts * 16 else 64
    order, tile_expert, tile_start, tile_end = plan_tiles(expert_indices, num_experts, block_m)
    token = (order // k).to(torch.int32)
    pair = order.to(torch.int32)
    weight = expert_weights.reshape(-1)[order].contiguous()
    work = torch.float32 if compute_dtype == torch.float32 else compute_dtype
    h = torch.empty(n * k, inter, dtype=work, device=x.device)
    y = torch.empty(n * k, hidden, dtype=work, device=x.device)
    x = x.contiguous()
    gub, gus, gubias = experts.gate_up_blocks, experts.gate_up_scales, experts.gate_up_bias.float().contiguous()
    db, ds, dbias = experts.down_blocks, experts.down_scales, experts.down_bias.float().contiguous()
    compute = _TRITON_DTYPES[compute_dtype]
    precision = dot_precision(compute_dtype)
    num_tiles = tile_expert.numel()
    block_n, block_k = 32, 64
    _gate_up_swiglu_kernel[(num_tiles, triton.cdiv(inter, block_n))](
        x, token, tile_expert, tile_start, tile_end, gub, gus, gubias, h,
        hidden, inter, float(experts.swiglu_limit),
        x.stride(0), gub.stride(0), gub.stride(1), gus.stride(0), gus.stride(1), gubias.stride(0), h.stride(0),
        ALPHA=SWIGLU_ALPHA, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, COMPUTE=compute,
        PRECISION=precision)
    _down_scatter_kernel[(num_tiles, triton.cdiv(hidden, block_n))](
        h, pair, weight, tile_expert, tile_start, tile_end, db, ds, dbias, y,
        hidden, inter,
        h.stride(0), db.stride(0), db.stride(1), ds.stride(0), ds.stride(1), dbias.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, COMPUTE=compute,
        PRECISION=precision)
    return y.view(n, k, hidden).sum(1).to(x.dtype)
