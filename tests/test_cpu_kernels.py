"""The C++ CPU kernels against their plain-torch reference twins, on every ISA path this CPU runs.

The first test run builds the extension (about half a minute); later runs load it from the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss import mxfp4, ops
from gptoss.ops import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

ALL_ISAS = ("avx512bf16", "avx512", "avx2", "scalar")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Run the test once per instruction-set path; skip those this CPU lacks."""
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU has no {request.param}")
    before = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(before)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: 1e-4 of the output's scale; bf16: a few bf16 roundings (2^-8 = 0.4%)."""
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2
    scale = ref.float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------------- api


def test_isa_api():
    assert cpu.available()
    supported = cpu.supported_isas()
    assert supported[-1] == "scalar" and cpu.isa() in supported
    before = cpu.isa()
    try:
        for name in supported:
            cpu.set_isa(name)
            assert cpu.isa() == name
        with pytest.raises(RuntimeError, match="unknown ISA"):
            cpu.set_isa("sse9")
        missing = [name for name in ALL_ISAS if name not in supported]
        for name in missing:
            with pytest.raises(RuntimeError, match="does not support"):
                cpu.set_isa(name)
    finally:
        cpu.set_isa(before)


def test_env_var_forces_isa():
    code = "from gptoss.ops import cpu; print(cpu.isa())"
    env = dict(os.environ, GPTOSS_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "scalar"


def test_build_failure_falls_back_to_reference(tmp_path):
    """No library and no compiler: one warning, then every op runs the plain-torch reference."""
    code = (
        "import torch\n"
        "from gptoss import ops\n"
        "from gptoss.ops import cpu\n"
        "x, w = torch.randn(2, 64), torch.randn(8, 64)\n"
        "assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))\n"
        "ops.linear(x, w)\n"
        "assert not cpu.available() and cpu.isa() == 'reference'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), GPTOSS_CACHE=str(tmp_path / "cache"),
               GPTOSS_KERNELS_LIBRARY="build")  # as if the install had built no library
    env.pop("GPTOSS_CPU_ISA", None)
    env.pop("GPTOSS_REQUIRE_KERNELS", None)
    required = subprocess.run([sys.executable, "-c", code], env={**env, "GPTOSS_REQUIRE_KERNELS": "1"},
                              capture_output=True, text=True, cwd=REPO, timeout=300)
    assert required.returncode != 0 and "GPTOSS_REQUIRE_KERNELS is set" in required.stderr
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    warnings = [line for line in out.stderr.splitlines() if "using the plain-torch reference" in line]
    assert len(warnings) == 1, out.stderr


def test_dispatch_is_decided_once_per_device_and_honours_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "linear", lambda *a: calls.append("linear") or reference.linear(*a))
    x, w = torch.randn(1, 64), torch.randn(8, 64)
    ops.use(None)  # decide again, now that cpu.linear is the spy
    ops.linear(x, w)
    assert calls == ["linear"] and ops.backend_name().startswith("cpu-")
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")  # read when a backend is chosen, not per call
    ops.linear(x, w)
    assert calls == ["linear", "linear"]
    ops.use(None)  # a fresh decision reads the environment
    ops.linear(x, w)
    assert calls == ["linear", "linear"] and ops.backend_name() == "reference (plain torch)"
    monkeypatch.delenv("GPTOSS_KERNELS")
    ops.use("reference")
    ops.linear(x, w)
    assert len(calls) == 2
    ops.use(None)
    ops.linear(x, w)
    assert len(calls) == 3


def test_autograd_falls_back_to_reference():
    x = torch.randn(2, 64, requires_grad=True)
    w = torch.randn(8, 64)
    ops.linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1))


# ------------------------------------------------------------------------------------------- mxfp4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_decode_all_bytes_and_extreme_scales(isa, dtype):
    # Every byte value (16 blocks of 16 bytes) under scales 0, 1, 2, 127, 128, 253, 254 and 255 (NaN).
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    scale_values = torch.tensor([0, 1, 2, 127, 128, 253, 254, 255], dtype=torch.uint8)
    blocks = blocks.expand(len(scale_values), 16, 16).contiguous()
    scales = scale_values[:, None].expand(-1, 16).contiguous()
    # Also a row that mixes scales block by block, and an odd number of blocks (not a multiple of 4).
    mixed_scales = torch.tensor([[0, 254, 127, 1, 255, 120, 130, 2, 3, 250, 126, 127, 128]], dtype=torch.uint8)
    mixed_blocks = torch.randint(0, 256, (1, 13, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for b, s in ((blocks, scales), (mixed_blocks, mixed_scales)):
        out = cpu.mxfp4_dequantize(b, s, dtype)
        ref = mxfp4.dequantize(b, s, dtype)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(out.signbit() & ~out.isnan(), ref.signbit() & ~ref.isnan())  # -0 stays -0


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 37, 64), (2, 5, 100), (3, 67, 48), (4, 33, 2880),
                                   (5, 19, 96), (37, 41, 160), (1, 257, 16),
                                   # one row streams each weight row: whole chunks and every kind of tail
                                   (1, 9, 2880), (1, 5, 200), (1, 3, 131), (1, 6, 256),
                                   # many rows: the tile products (odd K: the widened fp32 one)
                                   (12, 40, 96), (40, 64, 64), (9, 7, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(isa, dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = cpu.linear(x, w, b)
    close(out, reference.linear(x.float(), w.float(), None if b is None else b.float()), dtype)
    close(out, reference.linear(x, w, b), dtype)


@pytest.mark.parametrize("side_by_side", [False, True])
@pytest.mark.parametrize("n,k", [(1, 32), (3, 131), (4, 64), (15, 200), (16, 2880), (37, 96), (64, 33), (257, 16)])
def test_decode_gemv_rows_side_by_side(isa, side_by_side, n, k):
    """One bf16 row of x: 16 (then 4, then 1) weight rows read side by side, or one row at a time;
    both against the fp32 reference, every kind of row and K tail."""
    was = cpu.gemv_side_by_side()
    cpu.use_gemv_side_by_side(side_by_side)
    try:
        g = torch.Generator().manual_seed(n * 100 + k)
        x = torch.randn(1, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()
        out = cpu.linear(x, w, b)
        close(out, reference.linear(x.float(), w.float(), b.float()), torch.bfloat16)
    finally:
        cpu.use_gemv_side_by_side(was)


def test_linear_keeps_leading_dims(isa):
    x = torch.randn(2, 3, 64).bfloat16()
    w = torch.randn(10, 64).bfloat16()
    out = cpu.linear(x, w)
    assert out.shape == (2, 3, 10)
    close(out, reference.linear(x.float(), w.float()), torch.bfloat16)


@pytest.mark.parametrize("amx", [False, True])
def test_model_linear_dispatch(monkeypatch, amx):
    """The model's linear: many fp32 rows, and many bf16 rows on an AMX CPU, go to torch's matmul
    (exactly the reference); everything else to the kernels (exactly cpu.linear)."""
    monkeypatch.setattr(cpu, "_amx_bf16", amx)
    assert ops._cpu_backend().linear is cpu.dispatch_linear
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(48, 64, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    for dtype, min_rows, to_torch_here in ((torch.bfloat16, cpu.AMX_MATMUL_MIN_ROWS, amx),
                                           (torch.float32, cpu.FP32_MATMUL_MIN_ROWS, True)):
        wd, bd = w.to(dtype), b.to(dtype)
        for rows in (1, min_rows - 1, min_rows, 40):
            x = torch.randn(rows, 64, generator=g).to(dtype)
            to_torch = to_torch_here and rows >= min_rows
            want = reference.linear(x, wd, bd) if to_torch else cpu.linear(x, wd, bd)
            assert torch.equal(cpu.dispatch_linear(x, wd, bd), want), (dtype, rows)
            assert torch.equal(cpu.dispatch_linear(x[None], wd, bd), want[None])  # leading dims count as rows
    x = torch.randn(40, 64, generator=g).bfloat16()
    assert torch.equal(cpu.dispatch_linear(x, w, b.float()), cpu.linear(x, w, b.float()))  # fp32 bias: the kernels


def test_amx_flag_reads_cpuinfo():
    assert cpu.has_amx_bf16() == ("amx_bf16" in Path("/proc/cpuinfo").read_text().split()
                                  if Path("/proc/cpuinfo").exists() else False)


# ---------------------------------------------------------------------------------- norm and rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 17, 2880), (5, 7)])
def test_rms_norm(dtype, weight_dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 5).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(weight_dtype)
    out = cpu.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape
    close(out, reference.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,d", [(1, 1, 64, 64), (2, 9, 8, 64), (1, 3, 2, 16)])
def test_rotary(dtype, b, t, h, d):
    g = torch.Generator().manual_seed(b + t + h + d)
    x = torch.randn(b, t, h, d, generator=g).to(dtype)
    freqs = (torch.arange(t).float() + 4000)[None, :, None] * torch.rand(d // 2, generator=g)
    cos, sin = freqs.cos()[:, :, None].expand(b, t, 1, d // 2), freqs.sin()[:, :, None].expand(b, t, 1, d // 2)
    close(cpu.rotary(x, cos, sin), reference.rotary(x, cos, sin), dtype)


# --------------------------------------------------------------------------------------- dense int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_int8_is_the_reference(dtype):
    w = (torch.randn(37, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 37)[:, None])
    w[5] = 0  # an all-zero row: scale 0, bytes 128
    w = w.to(dtype)
    q, scale = cpu.quantize_rows_int8(w)
    q_ref, scale_ref = reference.quantize_rows_int8(w)
    assert q.dtype == torch.uint8 and torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert (q[5] == 128).all() and scale[5] == 0
    assert q.min() >= 1  # round(w * 127 / max|w|) stays in [-127, 127]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 9, 40])
@pytest.mark.parametrize("n,k", [(37, 32), (64, 96), (33, 2880), (5, 160), (6, 224)])
def test_linear_int8(isa, dtype, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    q, scale = reference.quantize_rows_int8(torch.randn(n, k, generator=g))
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    out = cpu.linear_int8(x, q, scale, bias)
    ref = reference.linear_int8(x.float(), q, scale, bias.float())
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol * ref.abs().max().item())


def test_linear_int8_a_row_alone_or_in_a_batch(isa):
    """The matrix-vector kernel (1 row) and the many-row path give the same sums."""
    g = torch.Generator().manual_seed(1)
    q, scale = reference.quantize_rows_int8(torch.randn(64, 2880, generator=g))
    x = torch.randn(2, 20, 2880, generator=g)
    batch = cpu.linear_int8(x, q, scale)
    assert batch.shape == (2, 20, 64)
    alone = cpu.linear_int8(x[:1, :1], q, scale)
    torch.testing.assert_close(batch[:1, :1], alone, rtol=0, atol=2e-6 * alone.abs().max().item())


# ------------------------------------------------------------------------------------------ experts


def make_experts(e: int, h: int, i: int, bias_dtype: torch.dtype, seed: int, limit: float = 7.0):
    g = torch.Generator().manual_seed(seed)
    gub, gus = mxfp4.quantize(torch.randn(e, 2 * i, h, generator=g) * 0.3)
    dnb, dns = mxfp4.quantize(torch.randn(e, h, i, generator=g) * 0.3)
    return reference.ExpertWeights(gub, gus, torch.randn(e, 2 * i, generator=g).to(bias_dtype),
                                   dnb, dns, torch.randn(e, h, generator=g).to(bias_dtype), limit)


def fp32_experts(ew: reference.ExpertWeights) -> reference.ExpertWeights:
    return reference.ExpertWeights(ew.gate_up_blocks, ew.gate_up_scales, ew.gate_up_bias.float(), ew.down_blocks,
                                   ew.down_scales, ew.down_bias.float(), ew.swiglu_limit)


def route(n: int, e: int, topk: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    return reference.route(logits.to(dtype), topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 37])
@pytest.mark.parametrize("e,topk", [(1, 1), (5, 1), (5, 2), (6, 4)])
@pytest.mark.parametrize("h,i", [(96, 64), (160, 32)])
def test_moe_experts(isa, dtype, n, e, topk, h, i):
    seed = n * 7 + e * 3 + topk + h + i
    ew = make_experts(e, h, i, dtype, seed)
    x = (torch.randn(n, h, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)
    idx, wts = route(n, e, topk, seed, dtype)
    out = cpu.moe_experts(x, idx, wts, ew)
    close(out, reference.moe_experts(x.float(), idx, wts.float(), fp32_experts(ew)), dtype)
    if dtype == torch.bfloat16:
        close(out, reference.moe_experts(x, idx, wts, ew), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_repeated_and_duplicate_experts(isa, dtype):
    """Tokens share experts, one token lists an expert twice, and some experts see > 4 tokens."""
    ew = make_experts(3, 64, 96, torch.float32, 5, limit=1.5)
    n = 11
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    idx = torch.tensor([[0, 1], [1, 0], [2, 2], [0, 0]] + [[1, 2]] * 7)
    wts = torch.softmax(torch.randn(n, 2, generator=torch.Generator().manual_seed(3)), -1).to(dtype)
    out = cpu.moe_experts(x, idx, wts, ew)
    close(out, reference.moe_experts(x.float(), idx, wts.float(), ew), dtype)


def test_moe_wide_scales_and_zero_blocks(isa):
    """Scales far from 127 and all-zero blocks (which take the smallest scale, 0)."""
    g = torch.Generator().manual_seed(9)
    w_gu = torch.randn(2, 64, 64, generator=g) * torch.logspace(-12, 12, 64)[None, None, :]
    w_gu[:, :, :32] = 0
    w_dn = torch.randn(2, 64, 32, generator=g) * 1e-6
    gub, gus = mxfp4.quantize(w_gu)
    dnb, dns = mxfp4.quantize(w_dn)
    assert (gus == 0).any()
    ew = reference.ExpertWeights(gub, gus, torch.zeros(2, 64), dnb, dns, torch.zeros(2, 64), 1e30)
    x = torch.randn(3, 64, generator=g) * torch.logspace(6, -6, 64)
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    wts = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    close(cpu.moe_experts(x, idx, wts, ew), reference.moe_experts(x, idx, wts, ew), torch.float32)


# The int8-activation path: against the reference fed the same int8 rounding, on each family of
# int8 kernels this CPU runs (AVX-512 VNNI + VBMI; AVX-VNNI; AVX2's vpmaddubsw).
needs_int8 = pytest.mark.skipif(not cpu.int8_activations_supported(), reason="this CPU has no int8 kernels")
INT8_PATHS = ("avx512-vnni", "avx-vnni", "avx2")


@pytest.fixture(params=INT8_PATHS)
def int8_always(request):
    """One int8 kernel family, with int8 activations for every input (fp32 too)."""
    path, supported = request.param, cpu.supported_isas()
    if path == "avx512-vnni":
        isa = next((name for name in ("avx512bf16", "avx512") if name in supported), None)
        runs = isa is not None and cpu.has_vnni_vbmi()
    else:
        isa = "avx2" if "avx2" in supported else None
        runs = isa is not None and (path == "avx2" or cpu.has_avx_vnni())
    if not runs:
        pytest.skip(f"this CPU has no {path} int8 kernels")
    before_isa, before_mode = cpu.isa(), cpu.int8_activations()
    cpu.set_isa(isa)
    cpu.use_avx_vnni(path != "avx2")
    cpu.set_int8_activations("always")
    assert cpu.int8_kernels() == path
    yield path
    cpu.set_isa(before_isa)
    cpu.use_avx_vnni(True)
    cpu.set_int8_activations(before_mode)


def test_round_to_int8_blocks():
    x = torch.tensor([[0.0] * 32 + [1.0, -0.5, 0.25] + [0.0] * 29 + [127.0, 63.5, -1.4] + [0.0] * 29])
    r = reference.round_to_int8_blocks(x)
    assert torch.equal(r[0, :32], torch.zeros(32))  # an all-zero block stays zero
    assert r[0, 32] == 1.0  # the block's largest value is exact
    assert abs(r[0, 33] + 64 / 127) < 1e-7 and abs(r[0, 34] - 32 / 127) < 1e-7  # -63.5 ties to -64
    assert r[0, 64] == 127.0 and r[0, 65] == 64.0 and r[0, 66] == -1.0  # 63.5 ties to even


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 40])
@pytest.mark.parametrize("h,i", [(96, 64), (160, 32), (608, 544), (2880, 64)])
def test_moe_int8_activations_match_the_reference(int8_always, n, h, i):
    """1..4 tokens per expert take the matrix-vector kernel, more the byte tiles; odd block counts."""
    seed = n + h + i
    ew = make_experts(4, h, i, torch.float32, seed)
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(seed)) * 2
    idx, wts = route(n, 4, 2, seed, torch.float32)
    out = cpu.moe_experts(x, idx, wts, ew)
    ref = reference.moe_experts(x, idx, wts, ew, int8_activations=True)
    assert_int8_close(out, ref)


def assert_int8_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to fp32 summation order, except where an activation sat on a rounding midpoint.

    The kernel's gate_up output differs from the reference's in the last bits, so now and then a
    SwiGLU output rounds to the neighbouring int8 step (max|block| / 127): that token's row moves
    by about that much. Nine tokens in ten must match to fp32 accuracy.
    """
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3 * scale)
    moved_rows = int(((out - ref).abs().amax(-1) > 1e-5 * scale).sum())  # one allowed among a handful
    assert moved_rows <= max(1, out.shape[0] // 10), f"{moved_rows} of {out.shape[0]} rows moved"


@pytest.mark.skipif(not cpu.has_amx(), reason="this CPU has no AMX tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,i", [(40, 96, 64), (37, 160, 32), (70, 2880, 64), (9, 608, 544)])
def test_moe_int8_tiles_on_amx_are_the_vector_kernels_bit_for_bit(dtype, n, h, i):
    """The many-token int8 product takes its block sums on AMX: same integers, same fp32 epilogue,
    so the same output bits as the vector kernel (tails of 16 tokens included)."""
    before_isa, before_mode = cpu.isa(), cpu.int8_activations()
    cpu.set_isa(next(name for name in ("avx512bf16", "avx512") if name in cpu.supported_isas()))
    cpu.set_int8_activations("always")
    try:
        ew = make_experts(3, h, i, dtype, n + h)
        x = (torch.randn(n, h, generator=torch.Generator().manual_seed(n)) * 2).to(dtype)
        idx, wts = route(n, 3, 2, n + i, dtype)
        amx = cpu.moe_experts(x, idx, wts, ew)
        cpu.use_amx(False)
        vector = cpu.moe_experts(x, idx, wts, ew)
    finally:
        cpu.use_amx(True)
        cpu.set_isa(before_isa)
        cpu.set_int8_activations(before_mode)
    assert torch.equal(amx, vector)


def test_moe_int8_is_the_same_alone_and_in_a_batch(int8_always):
    """A token gets the same output through the matrix-vector kernel (alone) and a tile (batch)."""
    ew = make_experts(2, 2880, 64, torch.float32, 1)
    x = torch.randn(33, 2880, generator=torch.Generator().manual_seed(1))
    idx = torch.zeros(33, 1, dtype=torch.long)
    wts = torch.ones(33, 1)
    batch = cpu.moe_experts(x, idx, wts, ew)
    alone = cpu.moe_experts(x[:1], idx[:1], wts[:1], ew)
    torch.testing.assert_close(batch[:1], alone, rtol=1e-6, atol=1e-6 * alone.abs().max().item())


def test_moe_int8_extreme_scales_and_zero_blocks(int8_always):
    g = torch.Generator().manual_seed(9)
    w_gu = torch.randn(2, 64, 64, generator=g) * torch.logspace(-12, 12, 64)[None, None, :]
    w_gu[:, :, :32] = 0
    gub, gus = mxfp4.quantize(w_gu)
    dnb, dns = mxfp4.quantize(torch.randn(2, 64, 32, generator=g) * 1e-6)
    ew = reference.ExpertWeights(gub, gus, torch.zeros(2, 64), dnb, dns, torch.zeros(2, 64), 1e30)
    x = torch.randn(7, 64, generator=g) * torch.logspace(6, -6, 64)
    x[2, :32] = 0  # an all-zero activation block
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]] * 2 + [[1, 0]])
    wts = torch.rand(7, 2, generator=g)
    out = cpu.moe_experts(x, idx, wts, ew)
    ref = reference.moe_experts(x, idx, wts, ew, int8_activations=True)
    assert_int8_close(out, ref)


def test_moe_int8_nan_propagates_and_tiny_blocks_flush_to_zero(int8_always):
    """A NaN activation gives NaN (as the reference), a block below 3.7e-37 rounds to zeros (as the reference)."""
    ew = make_experts(2, 64, 64, torch.float32, 7)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    x[0, 5] = float("nan")
    x[1, :32] = 0
    x[1, 3] = 1e-38
    idx, wts = torch.tensor([[0], [1], [0]]), torch.ones(3, 1)
    out = cpu.moe_experts(x, idx, wts, ew)
    ref = reference.moe_experts(x, idx, wts, ew, int8_activations=True)
    assert out[0].isnan().all() and ref[0].isnan().all()
    torch.testing.assert_close(out[1:], ref[1:], rtol=1e-5, atol=1e-5 * ref[1:].abs().max().item())
    assert reference.round_to_int8_blocks(x[1:2])[0, :32].eq(0).all()


def test_quantize_rows_int8_refuses_non_finite_weights():
    w = torch.randn(4, 64)
    w[2, 7] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        cpu.quantize_rows_int8(w)


@needs_int8
def test_int8_activation_modes():
    before = cpu.int8_activations()
    assert before == "bf16"  # the default: bfloat16 models take the int8 path, fp32 stays exact
    ew = make_experts(2, 96, 64, torch.float32, 3)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(3))
    idx, wts = route(2, 2, 1, 3, torch.float32)
    exact = reference.moe_experts(x, idx, wts, ew)
    try:
        for mode in ("never", "bf16"):
            cpu.set_int8_activations(mode)
            close(cpu.moe_experts(x, idx, wts, ew), exact, torch.float32)
        cpu.set_int8_activations("always")
        assert not torch.allclose(cpu.moe_experts(x, idx, wts, ew), exact, rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match="choose never, bf16 or always"):
            cpu.set_int8_activations("sometimes")
    finally:
        cpu.set_int8_activations(before)
    code = "from gptoss.ops import cpu; print(cpu.int8_activations())"
    env = {**os.environ, "GPTOSS_INT8_ACTIVATIONS": "never"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "never"


def test_moe_rejects_bad_expert_index():
    ew = make_experts(2, 32, 32, torch.float32, 0)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.moe_experts(torch.randn(1, 32), torch.tensor([[2]]), torch.ones(1, 1), ew)


# ---------------------------------------------------------------------------------------- attention


def attention_case(b, t, s, n_q, n_kv, d, dtype, seed, holes=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, n_q, d, generator=g).to(dtype)
    k = torch.randn(b, s, n_kv, d, generator=g).to(dtype)
    v = torch.randn(b, s, n_kv, d, generator=g).to(dtype)
    sinks = torch.randn(n_q, generator=g).to(dtype)
    # Row r holds positions shifted by r; the new queries are the last t positions.
    k_pos = torch.arange(s)[None].repeat(b, 1) + torch.arange(b)[:, None]
    if holes and s > 2:
        k_pos[0, 1] = -1  # empty cache slots
        k_pos[-1, -3] = -1
    q_pos = k_pos[:, -t:].clone() if t <= s else torch.arange(t)[None].repeat(b, 1)
    q_pos = torch.where(q_pos < 0, q_pos.max(), q_pos)
    return q, k, v, sinks, q_pos, k_pos


# (rows, queries, keys, query heads, kv heads, head dim): GQA ratios 1, 2 and 8, head dims that take
# the generic path (8, 20) and the AVX-512 group kernel (16, 48, 64), decode and multi-query rows.
ATTENTION_CASES = [
    (1, 1, 1, 2, 2, 64), (1, 1, 40, 8, 1, 64), (2, 1, 7, 4, 2, 64), (2, 1, 40, 16, 2, 48),
    (1, 1, 33, 8, 8, 16), (2, 3, 40, 4, 2, 64), (1, 16, 33, 16, 2, 64), (2, 1, 40, 8, 1, 8),
    (1, 3, 21, 4, 2, 20), (1, 1, 129, 64, 8, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,s,n_q,n_kv,d", ATTENTION_CASES)
@pytest.mark.parametrize("window", [0, 4])
def test_attention(isa, dtype, b, t, s, n_q, n_kv, d, window):
    q, k, v, sinks, q_pos, k_pos = attention_case(b, t, s, n_q, n_kv, d, dtype, seed=b + t + s + n_q + d)
    out = cpu.attention(q, k, v, sinks, q_pos, k_pos, window)
    ref = reference.attention(q.float(), k.float(), v.float(), sinks.float(), q_pos, k_pos, window)
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 4])
def test_attention_reads_a_paged_cache_in_place(isa, dtype, window):
    """Keys scattered over a pool of pages, found through key_rows, equal the gathered keys."""
    b, t, s, n_q, n_kv, d = 2, 3, 40, 8, 2, 64
    q, k, v, sinks, q_pos, k_pos = attention_case(b, t, s, n_q, n_kv, d, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    pool_rows = 128
    key_rows = torch.randperm(pool_rows, generator=g)[:b * s].reshape(b, s)
    k_pool = torch.randn(pool_rows, n_kv, d, generator=g).to(dtype)
    v_pool = torch.randn(pool_rows, n_kv, d, generator=g).to(dtype)
    k_pool[key_rows], v_pool[key_rows] = k, v
    key_rows[k_pos < 0] = -1  # empty slots may point nowhere
    out = cpu.attention(q, k_pool, v_pool, sinks, q_pos, k_pos, window, key_rows)
    close(out, reference.attention(q.float(), k.float(), v.float(), sinks.float(), q_pos, k_pos, window), dtype)
    close(reference.attention(q, k_pool, v_pool, sinks, q_pos, k_pos, window, key_rows),
          reference.attention(q, k, v, sinks, q_pos, k_pos, window), dtype)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.attention(q, k_pool, v_pool, sinks, q_pos, k_pos, window, key_rows.clamp(min=0) + pool_rows)


def test_attention_query_that_sees_nothing_gives_zero(isa):
    """All keys in the future or empty: the sink takes all the probability."""
    q, k, v, sinks, _, _ = attention_case(1, 1, 6, 4, 2, 16, torch.float32, 0, holes=False)
    k_pos = torch.tensor([[-1, -1, -1, 3, 4, 5]])
    q_pos = torch.tensor([[2]])
    out = cpu.attention(q, k, v, sinks, q_pos, k_pos, 0)
    ref = reference.attention(q, k, v, sinks, q_pos, k_pos, 0)
    assert torch.equal(out, torch.zeros_like(out))
    close(out, ref, torch.float32)


def test_attention_large_logits_are_stable(isa):
    q, k, v, sinks, q_pos, k_pos = attention_case(1, 1, 30, 4, 2, 16, torch.float32, 3)
    q = q * 40
    sinks = sinks * 50
    close(cpu.attention(q, k, v, sinks, q_pos, k_pos, 0), reference.attention(q, k, v, sinks, q_pos, k_pos, 0),
          torch.float32)


# ------------------------------------------------------------------------------------------- model


def test_model_forward_matches_reference(tiny_checkpoint, monkeypatch):
    """The tiny model, prefill then two decode steps with a cache, kernels against the reference."""
    from gptoss.model import Model

    model = Model.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))

    def run():
        cache = model.new_cache(2)
        logits = [model(tokens[:, :9], cache=cache, last_only=True)]
        for i in (9, 10):
            logits.append(model(tokens[:, i:i + 1], cache=cache))
        return torch.cat(logits, dim=1)

    with torch.no_grad():
        fast = run()
        ops.use("reference")
        try:
            slow = run()
        finally:
            ops.use(None)
    close(fast, slow, torch.float32)


def test_read_probe_reads_every_byte():
    """The bandwidth probe (16 streams side by side per 1 MB chunk) touches every byte once: its
    result is the XOR of all 8-byte words, a chunk's bytes past its 16 x 64-byte streams folded in
    one at a time."""
    import numpy as np

    for nbytes in ((3 << 20) + 4096, (1 << 20) + 1000 * 64 + 24):
        buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
        last = nbytes % (1 << 20)
        tail = last - last // 1024 * 1024
        data = buf.numpy()
        want = int(np.bitwise_xor.reduce(data[: nbytes - tail].view(np.uint64)))
        for byte in data[nbytes - tail:]:
            want ^= int(byte)
        assert cpu.read_probe(buf) & (2**64 - 1) == want
