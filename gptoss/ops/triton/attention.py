"""Attention with a learned sink per head, GQA and the sliding window, over the engine's paged KV.

The engine runs N rows of one query each; row n reads the keys key_rows[n, :] of the flat pools
(its sequence's pages, from the block tables) at positions k_pos[n, :] (-1: empty). Two kernels:

* decode (every sequence has one row): one program per (row, kv head, split of the keys) holds
  the whole query group as its M dimension; the splits' partial softmaxes are merged with the
  sink afterwards, so a long context is read by many programs at once;
* prefill (some sequence has several rows): flash-attention over tiles of BLOCK_M rows of one
  sequence, which share their keys; causal and window masks come from the positions.

Both keep the softmax online, starting from the sink (a logit every query sees, with no value):
m = sink, l = 1, acc = 0. The dense form (key_rows None, k/v [B, S, ...]) is turned into the same
paged form. The compute dtype is a parameter; scores and the softmax are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.ops.triton.moe import _TRITON_DTYPES, dot_precision


@triton.jit
def _visible(k_pos, q_pos, WINDOW: tl.constexpr):
    ok = (k_pos >= 0) & (k_pos <= q_pos)
    if WINDOW > 0:
        ok = ok & (k_pos > q_pos - WINDOW)
    return ok


@triton.jit
def _decode_key_index(s, n, rows_ptr, kpos_ptr, stride_rn, stride_pn, table_ptr, first_ptr, ctx_ptr, stride_tn,
                      num_keys, BLOCK_SIZE: tl.constexpr, TABLES: tl.constexpr):
    """Pool row and position of key s of row n (-1: none): read from key_rows/k_pos, or with TABLES
    worked out from the row's block table (entry j holds page first_page + j)."""
    in_range = s < num_keys
    if TABLES:
        block = tl.load(table_ptr + n * stride_tn + s // BLOCK_SIZE, mask=in_range, other=-1)
        pos = (tl.load(first_ptr + n) + s // BLOCK_SIZE) * BLOCK_SIZE + s % BLOCK_SIZE
        held = in_range & (block >= 0) & (pos < tl.load(ctx_ptr + n))
        return tl.where(held, block * BLOCK_SIZE + s % BLOCK_SIZE, 0), tl.where(held, pos, -1)
    row = tl.load(rows_ptr + n * stride_rn + s, mask=in_range, other=0)
    return row, tl.load(kpos_ptr + n * stride_pn + s, mask=in_range, other=-1)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, kpos_ptr, qpos_ptr, m_ptr, l_ptr, acc_ptr,
                   table_ptr, first_ptr, ctx_ptr, S, scale,
                   stride_qn, stride_qh, stride_kr, stride_kh, stride_rn, stride_pn, stride_tn,
                   stride_mn, stride_mh, stride_an, stride_ah, stride_as,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, TABLES: tl.constexpr,
                   WINDOW: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_mask = tl.arange(0, GROUP_PAD) < GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=head_mask[:, None], other=0.0)
    q = q.to(COMPUTE)
    q_pos = tl.load(qpos_ptr + n)
    num_keys = S
    if TABLES:  # only the pages the sequence holds so far: the loop stops at its length, not the table's
        num_keys = tl.minimum(S, tl.maximum(tl.load(ctx_ptr + n) - tl.load(first_ptr + n) * BLOCK_SIZE, 0))
    per_split = tl.cdiv(tl.cdiv(num_keys, SPLITS), BLOCK_N) * BLOCK_N
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, D), tl.float32)
    first = split * per_split
    for s0 in range(first, first + per_split, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        row, k_pos = _decode_key_index(s, n, rows_ptr, kpos_ptr, stride_rn, stride_pn, table_ptr, first_ptr,
                                       ctx_ptr, stride_tn, num_keys, BLOCK_SIZE, TABLES)
        ok = _visible(k_pos, q_pos, WINDOW) & (s < first + per_split) & (s < num_keys)
        row = tl.where(ok, row, 0)
        k = tl.load(k_ptr + row[:, None] * stride_kr + kv_head * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k.to(COMPUTE)), input_precision=PRECISION, out_dtype=tl.float32) * scale
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - safe[:, None])
        correction = tl.exp(m - safe)
        v = tl.load(v_ptr + row[:, None] * stride_kr + kv_head * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(COMPUTE), v.to(COMPUTE), input_precision=PRECISION,
                                                 out_dtype=tl.float32)
        l = l * correction + tl.sum(p, 1)
        m = m_new
    tl.store(m_ptr + n * stride_mn + heads * stride_mh + split, m, mask=head_mask)
    tl.store(l_ptr + n * stride_mn + heads * stride_mh + split, l, mask=head_mask)
    tl.store(acc_ptr + n * stride_an + heads[:, None] * stride_ah + split * stride_as + d[None, :], acc,
             mask=head_mask[:, None])


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, kpos_ptr, qpos_ptr, sinks_ptr, out_ptr,
                    tile_start_ptr, tile_end_ptr, S, scale,
                    stride_qn, stride_qh, stride_kr, stride_kh, stride_rn, stride_pn, stride_on, stride_oh,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    WINDOW: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    if start < end:
        kv_head = head // GROUP
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        d = tl.arange(0, D)
        q = tl.load(q_ptr + rows[:, None] * stride_qn + head * stride_qh + d[None, :], mask=row_mask[:, None],
                    other=0.0).to(COMPUTE)
        q_pos = tl.load(qpos_ptr + rows, mask=row_mask, other=0)
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m = tl.zeros((BLOCK_M,), tl.float32) + sink  # the sink: seen by every query, adds no value
        l = tl.full((BLOCK_M,), 1.0, tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for s0 in range(0, S, BLOCK_N):
            s = s0 + tl.arange(0, BLOCK_N)
            in_range = s < S
            k_pos = tl.load(kpos_ptr + start * stride_pn + s, mask=in_range, other=-1)  # shared by the tile
            row = tl.load(rows_ptr + start * stride_rn + s, mask=in_range, other=0)
            any_key = (k_pos >= 0) & in_range
            row = tl.where(any_key, row, 0)
            k = tl.load(k_ptr + row[:, None] * stride_kr + kv_head * stride_kh + d[None, :], mask=any_key[:, None],
                        other=0.0)
            scores = tl.dot(q, tl.trans(k.to(COMPUTE)), input_precision=PRECISION, out_dtype=tl.float32) * scale
            ok = _visible(k_pos[None, :], q_pos[:, None], WINDOW) & any_key[None, :]
            scores = tl.where(ok, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            correction = tl.exp(m - m_new)
            v = tl.load(v_ptr + row[:, None] * stride_kr + kv_head * stride_kh + d[None, :], mask=any_key[:, None],
                        other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(COMPUTE), v.to(COMPUTE), input_precision=PRECISION,
                                                     out_dtype=tl.float32)
            l = l * correction + tl.sum(p, 1)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + rows[:, None] * stride_on + head * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None])


def _plan_row_tiles(seq_starts: torch.Tensor, block_m: int, num_rows: int):
    """Tiles of at most block_m consecutive rows of one sequence: (start [T], end [T]), T bounded
    by num_rows // block_m + sequences; unused tiles are empty."""
    starts, ends = seq_starts[:-1], seq_starts[1:]
    counts = ends - starts
    tiles_of = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles_of, 0)
    num_tiles = num_rows // block_m + counts.numel()
    t = torch.arange(num_tiles, device=seq_starts.device)
    seq = torch.searchsorted(cum, t, right=True).clamp(max=counts.numel() - 1)
    start = starts[seq] + (t - (cum[seq] - tiles_of[seq])) * block_m
    end = torch.minimum(start + block_m, ends[seq])
    used = t < cum[-1]
    return torch.where(used, start, 0).to(torch.int32), torch.where(used, end, 0).to(torch.int32)


def _as_paged(q, k, v, q_pos, k_pos):
    """Dense [B, T, ...] queries over [B, S, ...] keys -> the paged form (one query per row)."""
    b, t = q.shape[:2]
    s = k.shape[1]
    rows = (torch.arange(b, device=q.device)[:, None] * s + torch.arange(s, device=q.device)).repeat_interleave(t, 0)
    return (q.reshape(b * t, 1, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
            q_pos.reshape(b * t, 1), k_pos.repeat_interleave(t, 0), rows, torch.arange(b + 1, device=q.device) * t)


def _kernels_handle(q: torch.Tensor) -> bool:
    """A head size the kernels tile (a power of two, at least 16) and at least one query."""
    head_dim = q.shape[-1]
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and q.shape[0] > 0


def _decode(q3, k, v, sinks, q_pos, window, splits, compute_dtype, *, rows=None, k_pos=None,
            table=None, first_page=None, context_lens=None, block_size=1):
    """The decode kernel over keys given by row (rows/k_pos [N, S]) or by block table ([N, P]);
    the splits' partial softmaxes merged with the sink. Returns [N, Hq, D] fp32."""
    n, n_q, head_dim = q3.shape
    n_kv = k.shape[1]
    group = n_q // n_kv
    tables = table is not None
    num_keys = table.shape[1] * block_size if tables else rows.shape[1]
    splits = splits or max(1, min(16, triton.cdiv(num_keys, 512)))
    m = torch.empty(n, n_q, splits, dtype=torch.float32, device=q3.device)
    l = torch.empty_like(m)
    acc = torch.empty(n, n_q, splits, head_dim, dtype=torch.float32, device=q3.device)
    dummy = q_pos  # the addressing mode not used still needs a pointer
    rows, k_pos = (dummy, dummy) if tables else (rows, k_pos)
    table, first_page, context_lens = (table, first_page, context_lens) if tables else (dummy, dummy, dummy)
    _decode_kernel[(n, n_kv, splits)](
        q3, k, v, rows, k_pos, q_pos, m, l, acc, table, first_page, context_lens, num_keys, head_dim ** -0.5,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), rows.stride(0), k_pos.stride(0), table.stride(0),
        m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_N=32, SPLITS=splits,
        BLOCK_SIZE=block_size, TABLES=tables, WINDOW=window, COMPUTE=_TRITON_DTYPES[compute_dtype],
        PRECISION=dot_precision(compute_dtype))
    sink = sinks.float().reshape(1, n_q, 1)
    top = torch.maximum(m.amax(-1, keepdim=True), sink)
    weights = torch.exp(m - top)  # exp(-inf) = 0 for splits that saw no key
    total = (weights * l).sum(-1) + torch.exp(sink - top)[..., 0]
    return (weights[..., None] * acc).sum(2) / total[..., None]


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, sinks: torch.Tensor,
                     q_pos: torch.Tensor, block_table: torch.Tensor, first_page: torch.Tensor,
                     context_lens: torch.Tensor, window: int, compute_dtype: torch.dtype | None = None,
                     splits: int | None = None) -> torch.Tensor:
    """The reference `decode_attention`: one query per sequence over its pages, through the block
    tables; fixed shapes, no host sync (CUDA graphs replay it)."""
    from gptoss.ops import reference

    if not _kernels_handle(q):
        return reference.decode_attention(q, k_pool, v_pool, sinks, q_pos, block_table, first_page, context_lens,
                                          window)
    n, _, n_q, head_dim = q.shape
    merged = _decode(q.reshape(n, n_q, head_dim), k_pool.reshape(-1, *k_pool.shape[2:]),
                     v_pool.reshape(-1, *v_pool.shape[2:]), sinks, q_pos.reshape(n).contiguous(), window, splits,
                     compute_dtype or q.dtype, table=block_table.contiguous(), first_page=first_page.contiguous(),
                     context_lens=context_lens.contiguous(), block_size=k_pool.shape[1])
    return merged.to(q.dtype).reshape(q.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
              key_rows: torch.Tensor | None = None, seq_starts: torch.Tensor | None = None,
              compute_dtype: torch.dtype | None = None, splits: int | None = None) -> torch.Tensor:
    """The reference `attention` (same arguments). `seq_starts` [B + 1] (the batch's query_start)
    says which rows share a sequence: without it every row is its own (decode)."""
    from gptoss.ops import reference

    if not _kernels_handle(q):
        return reference.attention(q, k, v, sinks, q_pos, k_pos, window, key_rows)
    shape = q.shape
    if key_rows is None:
        q, k, v, q_pos, k_pos, key_rows, seq_starts = _as_paged(q, k, v, q_pos, k_pos)
    else:
        k, v = k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:])
    n, _, n_q, head_dim = q.shape
    compute_dtype = compute_dtype or q.dtype
    q3 = q.reshape(n, n_q, head_dim)
    q_pos1 = q_pos.reshape(n).contiguous()
    key_rows, k_pos = key_rows.contiguous(), k_pos.contiguous()
    if seq_starts is None or seq_starts.numel() - 1 == n:  # one query per sequence: decode
        merged = _decode(q3, k, v, sinks, q_pos1, window, splits, compute_dtype, rows=key_rows, k_pos=k_pos)
        return merged.to(q.dtype).reshape(shape)
    out = torch.empty(n, n_q, head_dim, dtype=q.dtype, device=q.device)
    block_m = 16 if n <= 16 * (seq_starts.numel() - 1) else 64
    tile_start, tile_end = _plan_row_tiles(seq_starts.to(torch.int64), block_m, n)
    _prefill_kernel[(tile_start.numel(), n_q)](
        q3, k, v, key_rows, k_pos, q_pos1, sinks.float().contiguous(), out, tile_start, tile_end,
        key_rows.shape[1], head_dim ** -0.5,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), key_rows.stride(0), k_pos.stride(0),
        out.stride(0), out.stride(1),
        GROUP=n_q // k.shape[1], D=head_dim, BLOCK_M=block_m, BLOCK_N=32, WINDOW=window,
        COMPUTE=_TRITON_DTYPES[compute_dtype], PRECISION=dot_precision(compute_dtype))
    return out.reshape(shape)
