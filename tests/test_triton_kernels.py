"""The Triton kernels against their torch twins, under the Triton interpreter on CPU tensors.

Triton's interpreter computes tl.dot right for fp32 and fp16 inputs (not bf16), so the compute
dtype is a parameter and both are tested. On a GPU, benchmarks/gpu.py checks the same kernels
compiled against their twins.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run in numpy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import triton  # noqa: E402, F401  (the test extras install it: a missing one fails, it does not skip)

from gptoss import mxfp4  # noqa: E402
from gptoss.engine.batch import ForwardBatch  # noqa: E402
from gptoss.ops import reference  # noqa: E402
from gptoss.ops.reference import ExpertWeights  # noqa: E402
from gptoss.ops.triton import attention as triton_attention  # noqa: E402
from gptoss.ops.triton import moe as triton_moe  # noqa: E402
from gptoss.ops.triton import norm_rope  # noqa: E402

# numpy in the interpreter warns where exp2 overflows to inf (a NaN scale, sigmoid of a large gate): intended
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}  # relative to the output's largest value


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp(min=1.0)
    err = ((got.float() - want.float()).abs().max() / scale).item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} (allowed {TOLERANCE[dtype]:.0e})"


# -- RMSNorm and rotary --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_and_rotary_match_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(3, 5, 96, generator=gen) * 3).to(dtype)  # 96: not a power of two
    weight = torch.randn(96, generator=gen)
    close(norm_rope.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)
    q = torch.randn(2, 7, 6, 32, generator=gen).to(dtype)
    angles = torch.randn(2, 7, 1, 16, generator=gen)
    cos, sin = angles.cos() * 1.3, angles.sin() * 1.3
    close(norm_rope.rotary(q, cos, sin), reference.rotary(q, cos, sin), dtype)
    assert norm_rope.rotary(q, cos, sin).dtype == dtype


# -- MXFP4 experts ----------------------------------------------------------------------------------

def random_experts(num_experts: int, hidden: int, inter: int, seed: int = 0) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5
    gub, gus = mxfp4.quantize(gate_up)
    db, ds = mxfp4.quantize(down)
    return ExpertWeights(gub, gus, torch.randn(num_experts, 2 * inter, generator=gen) * 0.1, db, ds,
                         torch.randn(num_experts, hidden, generator=gen) * 0.1, swiglu_limit=7.0)


def reference_moe(x, indices, weights, experts, dtype):
    """The twin, on inputs rounded to the compute dtype (what the kernel reads)."""
    return reference.moe_experts(x.to(dtype).float(), indices, weights.to(dtype).float(), experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,k,block_m", [(1, 4, None), (5, 2, 16), (17, 4, 16), (40, 2, 64), (33, 4, 16)])
def test_moe_matches_reference(dtype, tokens, k, block_m):
    """Token counts that are not a multiple of the tile, and hidden 96 (not a multiple of BLOCK_K)."""
    experts = random_experts(8, 96, 64, seed=tokens)
    gen = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, 96, generator=gen) * 2
    indices, weights = reference.route(torch.randn(tokens, 8, generator=gen), k)
    got = triton_moe.moe_experts(x.to(dtype), indices, weights.to(dtype), experts, compute_dtype=dtype,
                                 block_m=block_m)
    assert got.dtype == dtype
    close(got, reference_moe(x, indices, weights, experts, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_expert_with_no_tokens_and_one_with_all(dtype):
    experts = random_experts(4, 64, 32, seed=3)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(4))
    indices = torch.tensor([[0, 2]] * 20)  # experts 1 and 3 get nothing; 0 and 2 get every token
    weights = torch.full((20, 2), 0.5)
    got = triton_moe.moe_experts(x.to(dtype), indices, weights.to(dtype), experts, compute_dtype=dtype, block_m=16)
    close(got, reference_moe(x, indices, weights, experts, dtype), dtype)


def test_moe_nan_scale_gives_nan_like_the_reference():
    experts = random_experts(2, 64, 32, seed=5)
    experts.down_scales[1, 3, 0] = mxfp4.SCALE_NAN
    x = torch.randn(3, 64)
    indices, weights = torch.tensor([[1, 0], [0, 1], [0, 0]]), torch.full((3, 2), 0.5)
    got = triton_moe.moe_experts(x, indices, weights, experts, compute_dtype=torch.float32)
    want = reference.moe_experts(x, indices, weights, experts)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    close(torch.nan_to_num(got), torch.nan_to_num(want), torch.float32)


def test_tile_plan_covers_every_pair_once():
    indices = torch.tensor([[3, 0], [3, 1], [3, 0], [2, 3], [3, 0]])
    order, expert, start, end = triton_moe.plan_tiles(indices, 5, block_m=2)
    assert expert.numel() == 10 // 2 + 5  # the static bound: a CUDA graph can hold the launch
    rows = [r for s, e in zip(start.tolist(), end.tolist()) for r in range(s, e)]
    assert sorted(rows) == list(range(10))
    flat = indices.reshape(-1)[order]
    for t in range(expert.numel()):
        assert all(flat[r] == expert[t] for r in range(start[t], end[t]))


# -- attention over the paged cache ---------------------------------------------------------------

BLOCK = 16


def paged_batch(context_lens: list[int], new_tokens: list[int], n_kv: int, head_dim: int, seed: int = 0):
    """Pools of shuffled blocks holding each sequence's keys, the ForwardBatch index of a step whose
    sequence b adds its last new_tokens[b] tokens (a page partly filled at its end), and the table."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // BLOCK) for n in context_lens]
    blocks = torch.randperm(sum(pages) + 3, generator=gen)
    k_pool = torch.randn(blocks.numel(), BLOCK, n_kv, head_dim, generator=gen)
    v_pool = torch.randn_like(k_pool)
    tables, used = [], 0
    for p in pages:
        tables.append(blocks[used:used + p].tolist())
        used += p
    width = max(pages)
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    starts = torch.tensor([0] + new_tokens).cumsum(0)
    positions = torch.cat([torch.arange(n - t, n) for n, t in zip(context_lens, new_tokens)])
    n = positions.numel()
    batch = ForwardBatch(torch.zeros(n, dtype=torch.long), positions, starts, torch.tensor(context_lens),
                         positions, positions, table, table, torch.zeros(len(pages), dtype=torch.long),
                         torch.zeros(0, dtype=torch.long), BLOCK)
    key_rows, key_pos = batch.key_index(sliding=False)  # the window is masked by position, as in the model
    return k_pool, v_pool, positions, key_rows, key_pos, starts, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("n_q,n_kv,head_dim", [(4, 4, 16), (8, 2, 32), (4, 1, 16)])
def test_decode_attention_matches_reference(dtype, window, n_q, n_kv, head_dim):
    """One query per sequence at lengths 1, 127, 128, 129 and 300 (windows cut, pages part full),
    with the keys split over several programs."""
    lens = [1, 127, 128, 129, 300]
    k_pool, v_pool, positions, key_rows, key_pos, _, _ = paged_batch(lens, [1] * len(lens), n_kv, head_dim)
    gen = torch.Generator().manual_seed(n_q)
    q = torch.randn(len(lens), 1, n_q, head_dim, generator=gen)
    sinks = torch.randn(n_q, generator=gen)
    cast = [t.to(dtype) for t in (q, k_pool, v_pool)]
    want = reference.attention(*[t.float() for t in cast], sinks, positions[:, None], key_pos, window, key_rows)
    for splits in (1, 3):
        got = triton_attention.attention(*cast, sinks, positions[:, None], key_pos, window, key_rows,
                                         compute_dtype=dtype, splits=splits)
        assert got.dtype == dtype
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 128])
def test_decode_through_block_tables_matches_reference(dtype, window):
    """The CUDA-graph form: the kernel walks each sequence's block table itself (a table wider than
    any sequence, padding rows of length 0, and a sliding table starting at a later page)."""
    lens = [1, 127, 128, 129, 300, 0]
    n_kv, n_q, head_dim = 2, 8, 32
    k_pool, v_pool, positions, _, _, _, table = paged_batch(lens[:-1], [1] * 5, n_kv, head_dim, seed=4)
    table = torch.cat([table, torch.full((5, 3), -1)], 1)  # room for longer sequences
    table = torch.cat([table, torch.full((1, table.shape[1]), -1)])  # a padding row: no pages
    context = torch.tensor(lens)
    positions = torch.cat([positions, torch.zeros(1, dtype=torch.long)])
    first = torch.zeros(6, dtype=torch.long)
    if window:  # the sliding pool's table starts at the first page the window can see
        first = torch.clamp((context - window) // BLOCK, min=0)
        table = torch.stack([torch.cat([row[f:], torch.full((int(f),), -1)]) for row, f in zip(table, first)])
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 1, n_q, head_dim, generator=gen)
    sinks = torch.randn(n_q, generator=gen)
    cast = [t.to(dtype) for t in (q, k_pool, v_pool)]
    want = reference.decode_attention(*[t.float() for t in cast], sinks, positions[:, None], table, first, context,
                                      window)
    for splits in (1, 4):
        got = triton_attention.decode_attention(*cast, sinks, positions[:, None], table, first, context, window,
                                                compute_dtype=dtype, splits=splits)
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 128])
def test_prefill_attention_matches_reference(dtype, window):
    """Chunks of several queries per sequence (a whole prompt of 129, the tail of a cached 300, a
    single decode row) in one flat batch; tiles of 16 and 64 rows."""
    lens, new = [129, 300, 40, 7], [129, 37, 1, 7]
    n_q, n_kv, head_dim = 8, 2, 16
    k_pool, v_pool, positions, key_rows, key_pos, starts, _ = paged_batch(lens, new, n_kv, head_dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(positions.numel(), 1, n_q, head_dim, generator=gen)
    sinks = torch.randn(n_q, generator=gen)
    cast = [t.to(dtype) for t in (q, k_pool, v_pool)]
    want = reference.attention(*[t.float() for t in cast], sinks, positions[:, None], key_pos, window, key_rows)
    got = triton_attention.attention(*cast, sinks, positions[:, None], key_pos, window, key_rows, starts,
                                     compute_dtype=dtype)
    close(got, want, dtype)


def test_dense_attention_matches_reference():
    """The un-paged form (the model without the engine): batches of T queries over S keys."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(2, 9, 4, 16, generator=gen), torch.randn(2, 20, 2, 16, generator=gen), \
        torch.randn(2, 20, 2, 16, generator=gen)
    sinks = torch.randn(4, generator=gen)
    k_pos = torch.arange(20).repeat(2, 1)
    k_pos[1, 15:] = -1  # empty cache slots
    q_pos = torch.stack([torch.arange(11, 20), torch.arange(6, 15)])
    for window in (0, 4):
        want = reference.attention(q, k, v, sinks, q_pos, k_pos, window)
        close(triton_attention.attention(q, k, v, sinks, q_pos, k_pos, window), want, torch.float32)


# -- the whole engine on the kernels ---------------------------------------------------------------

def test_engine_greedy_tokens_on_the_triton_kernels(tmp_path):
    """The engine's flat batches (prefill chunks and decode) through both Triton kernels give the
    tokens of the reference path."""
    from gptoss import LLM, ops
    from gptoss.cli import main
    from gptoss.ops import triton as gpu

    assert main(["synth", str(tmp_path / "m"), "--preset", "tiny", "--seed", "9"]) == 0
    prompts = [[1, 5, 9, 200, 7, 33] * 3, [44, 3, 2]]

    def tokens():
        llm = LLM(tmp_path / "m", dtype=torch.float32, max_batched_tokens=16)
        return [r.token_ids for r in llm.generate(prompts, temperature=0, max_tokens=6, ignore_eos=True)]

    ops.use("reference")
    try:
        want = tokens()
        ops._chosen["cpu"] = gpu.make_backend(torch.float16, "triton (interpreter)")
        assert ops.backend_name() == "triton (interpreter)"
        assert tokens() == want
    finally:
        ops.use(None)


# -- choosing the kernels -----------------------------------------------------------------------------

def test_a_cuda_device_without_the_kernels_says_why(monkeypatch, caplog):
    """This CPU-only torch sees no GPU: the reference path, with one line saying why (an error
    under GPTOSS_REQUIRE_KERNELS=1). The CLI refuses --device cuda before loading anything."""
    import logging

    from gptoss import ops
    from gptoss.cli import main
    from gptoss.ops import triton as gpu

    assert gpu.unavailable_reason(torch.device("cuda")) == "this torch sees no CUDA device"
    monkeypatch.delenv("GPTOSS_REQUIRE_KERNELS", raising=False)  # CI sets it (for the CPU kernels)
    ops.use(None)
    try:
        with caplog.at_level(logging.WARNING, logger="gptoss"):
            assert ops.select("cuda") is ops.REFERENCE
        assert "GPU kernels off: this torch sees no CUDA device" in caplog.text
        ops.use(None)
        monkeypatch.setenv("GPTOSS_REQUIRE_KERNELS", "1")
        with pytest.raises(RuntimeError, match="GPU kernels cannot run"):
            ops.select("cuda")
    finally:
        ops.use(None)
    assert main(["generate", "--prompt", "hi", "--device", "cuda"]) == 2


# -- decode steps as CUDA graphs replay them ---------------------------------------------------------

@pytest.mark.parametrize("kernels", ["cpu", "triton"])
def test_static_decode_steps_give_the_eager_tokens(tmp_path, kernels):
    """The static decode step a CUDA graph captures (buckets of padded rows, tables walked by the
    kernel) gives the tokens of the eager step: 5 sequences (a bucket of 8 with 3 padding rows),
    prompts past the 128-token window, decoding across page boundaries."""
    from gptoss import LLM, ops
    from gptoss.cli import main
    from gptoss.ops import triton as gpu

    assert main(["synth", str(tmp_path / "m"), "--preset", "tiny", "--seed", "11"]) == 0
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50_000, (n,), generator=gen).tolist() for n in (1, 20, 127, 140, 300)]

    def tokens(graphs: bool):
        llm = LLM(tmp_path / "m", dtype=torch.float32, max_num_seqs=8, cuda_graphs=graphs)
        assert (llm.engine.runner.graphs is not None) == graphs
        out = [r.token_ids for r in llm.generate(prompts, temperature=0, max_tokens=20, ignore_eos=True)]
        if graphs:  # every step after the prompts' was a static one
            assert llm.engine.runner.graphs.replays >= 19
        return out

    ops.use(None)
    try:
        if kernels == "triton":
            ops._chosen["cpu"] = gpu.make_backend(torch.float16, "triton (interpreter)")
        assert tokens(True) == tokens(False)
    finally:
        ops.use(None)
