"""CPU kernels against their plain-torch reference twins at gpt-oss-20b shapes.

    python benchmarks/cpu_kernels.py [--threads N] [--quick]

For each case: time per call, weight bytes read / time (GB/s) and the speed-up over the
reference run in the same process. Weights cycle through pools larger than the last-level cache,
so the numbers are memory bandwidth, not cache bandwidth (this matters on CPUs with a big L3).

Shared machines are noisy: kernel and reference run in interleaved rounds and each keeps its best
round; "probe" is a plain read of memory timed in the same rounds, the bandwidth there was to use.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptoss import mxfp4
from gptoss.ops import cpu, reference

H, I, E, TOPK = 2880, 2880, 32, 4
VOCAB, Q_DIM, N_KV, N_Q, HEAD_DIM = 201088, 4096, 8, 64, 64


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def calls_for(fn, budget: float) -> int:
    """How many calls fit in `budget` seconds (at least 1), after a warm-up call."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(100, int(budget / max(once, 1e-6))))


class Cycle:
    """Hands out the items of a pool in turn, so consecutive calls read different memory."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def random_experts(layers: int, generator: torch.Generator) -> list[reference.ExpertWeights]:
    """Layers of random MXFP4 experts with realistic scales (quantized from small normal weights)."""
    out = []
    for _ in range(layers):
        # Quantizing 20 GB of floats would be slow: quantize one expert and permute bytes per layer.
        w_gu = torch.randn(1, 2 * I, H, generator=generator) * 0.02
        w_dn = torch.randn(1, H, I, generator=generator) * 0.02
        gub, gus = mxfp4.quantize(w_gu)
        dnb, dns = mxfp4.quantize(w_dn)
        gub = gub.expand(E, -1, -1, -1).clone()
        dnb = dnb.expand(E, -1, -1, -1).clone()
        gub.view(-1)[:] = gub.view(-1)[torch.randperm(gub.numel(), generator=generator)]
        dnb.view(-1)[:] = dnb.view(-1)[torch.randperm(dnb.numel(), generator=generator)]
        out.append(reference.ExpertWeights(
            gub, gus.expand(E, -1, -1).clone(), torch.randn(E, 2 * I, generator=generator).bfloat16() * 0.1,
            dnb, dns.expand(E, -1, -1).clone(), torch.randn(E, H, generator=generator).bfloat16() * 0.1))
    return out


def expert_bytes(ew: reference.ExpertWeights, n_experts: int) -> int:
    per = sum(t[0].numel() * t.element_size() for t in (ew.gate_up_blocks, ew.gate_up_scales, ew.down_blocks,
                                                        ew.down_scales))
    return per * n_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller pools")
    parser.add_argument("--isa", default=None, help="force a kernel path (avx512bf16, avx512, avx2, scalar)")
    parser.add_argument("--ref-time", type=float, default=None, help="seconds per reference case")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (best one kept)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    if not cpu.available():
        raise SystemExit(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    build = time.perf_counter() - start
    if args.isa:
        cpu.set_isa(args.isa)
    min_time = 1.0 if args.quick else 2.0
    ref_time = args.ref_time if args.ref_time is not None else min_time
    pool_bytes = 600e6 if args.quick else 1.2e9
    g = torch.Generator().manual_seed(0)
    rows = []

    probe_buf = torch.randint(0, 256, (int(max(pool_bytes / 2, 6e8)),), dtype=torch.uint8, generator=g)

    def probe():
        return cpu.read_probe(probe_buf)

    def case(name, bytes_read, fast, ref, rounds=None):
        rounds = rounds or args.rounds
        n_fast = calls_for(fast, min_time / rounds)
        n_ref = calls_for(ref, ref_time / rounds) if ref is not None else 0
        n_probe = calls_for(probe, 0.05)
        t_fast = t_ref = t_probe = float("inf")
        for _ in range(rounds):
            t_fast = min(t_fast, timed(fast, n_fast))
            if ref is not None:
                t_ref = min(t_ref, timed(ref, n_ref))
            t_probe = min(t_probe, timed(probe, n_probe))
        gbps = lambda t: bytes_read / t / 1e9 if bytes_read else float("nan")  # noqa: E731
        rows.append((name, t_fast, gbps(t_fast), t_ref, gbps(t_ref), t_ref / t_fast, probe_buf.numel() / t_probe / 1e9))
        print(f"  {name}: {t_fast * 1e3:.3f} ms", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {cpu.isa()} "
          f"(extension ready in {build:.1f} s)", flush=True)

    # Read bandwidth: the probe itself, and torch reading the same bytes.
    case("read probe (plain read of memory)", probe_buf.numel(), probe, lambda: probe_buf.view(torch.int64).sum())

    # lm_head GEMV: 1.16 GB, larger than any cache on its own.
    lm_head = torch.randn(VOCAB, H, generator=g).bfloat16() * 0.02
    x1 = torch.randn(1, H, generator=g).bfloat16()
    case("lm_head GEMV 201088x2880 bf16", lm_head.numel() * 2, lambda: cpu.linear(x1, lm_head),
         lambda: reference.linear(x1, lm_head))
    del lm_head

    # q_proj GEMV: 23.6 MB, cycled through a pool of copies.
    copies = max(2, int(pool_bytes // (Q_DIM * H * 2)))
    q_pool = Cycle([torch.randn(Q_DIM, H, generator=g).bfloat16() for _ in range(copies)])
    q_bias = torch.randn(Q_DIM, generator=g).bfloat16()
    case("q_proj GEMV 4096x2880 bf16 (+bias)", Q_DIM * H * 2, lambda: cpu.linear(x1, q_pool(), q_bias),
         lambda: reference.linear(x1, q_pool(), q_bias))
    for m in (4, 6, 8, 128, 512):  # the reference is torch's matmul: oneDNN, on AMX tiles where the CPU has them
        xm = torch.randn(m, H, generator=g).bfloat16()
        case(f"q_proj {m} rows bf16", Q_DIM * H * 2, lambda: cpu.linear(xm, q_pool(), q_bias),
             lambda: reference.linear(xm, q_pool(), q_bias))
    x1f = x1.float()
    qf = Cycle([t.float() for t in q_pool.items[: max(2, copies // 2)]])
    case("q_proj GEMV 4096x2880 fp32", Q_DIM * H * 4, lambda: cpu.linear(x1f, qf()),
         lambda: reference.linear(x1f, qf()))
    for m in (8, 9, 128):  # fp32 from 9 rows goes to torch's BLAS (cpu.FP32_MATMUL_MIN_ROWS): the kernels' tiles
        xmf = torch.randn(m, H, generator=g)
        case(f"q_proj {m} rows fp32", Q_DIM * H * 4, lambda: cpu.linear(xmf, qf()),
             lambda: reference.linear(xmf, qf()))
    del q_pool, qf

    # MoE decode: one token, 4 experts of one layer, layers cycled (each layer 425 MB of experts).
    layers = random_experts(2 if args.quick else 3, g)
    lay = Cycle(layers)
    gen_idx = torch.Generator().manual_seed(1)

    def pick(n):
        return torch.stack([torch.randperm(E, generator=gen_idx)[:TOPK] for _ in range(n)])

    w1 = torch.softmax(torch.randn(1, TOPK, generator=g), -1).bfloat16()
    idx_pool = Cycle([pick(1) for _ in range(64)])
    case("MoE decode: 1 token, 4 experts MXFP4", expert_bytes(layers[0], TOPK),
         lambda: cpu.moe_experts(x1, idx_pool(), w1, lay()),
         lambda: reference.moe_experts(x1, idx_pool(), w1, lay()))
    case("MoE decode fp32 activations", expert_bytes(layers[0], TOPK),
         lambda: cpu.moe_experts(x1f, idx_pool(), w1.float(), lay()),
         lambda: reference.moe_experts(x1f, idx_pool(), w1.float(), lay()))
    x4 = torch.randn(4, H, generator=g).bfloat16()
    w4 = torch.softmax(torch.randn(4, TOPK, generator=g), -1).bfloat16()
    idx4 = Cycle([pick(4) for _ in range(64)])
    case("MoE decode: batch of 4 tokens (<=16 experts)", expert_bytes(layers[0], len(idx4.items[0].unique())),
         lambda: cpu.moe_experts(x4, idx4(), w4, lay()), lambda: reference.moe_experts(x4, idx4(), w4, lay()))

    # MoE prefill: 128 tokens, top-4 of 32 experts: every expert used, read once.
    xp = torch.randn(128, H, generator=g).bfloat16()
    wp = torch.softmax(torch.randn(128, TOPK, generator=g), -1).bfloat16()
    idxp = pick(128)
    case("MoE prefill: 128 tokens, 32 experts", expert_bytes(layers[0], len(idxp.unique())),
         lambda: cpu.moe_experts(xp, idxp, wp, lay()),
         lambda: reference.moe_experts(xp, idxp, wp, lay()), rounds=2)
    del layers, lay

    # Attention decode: 4096 cached positions (full layer) and a 128-slot window ring.
    for ctx, window in ((4096, 0), (128, 128)):
        kv_bytes = ctx * N_KV * HEAD_DIM * 2 * 2
        n = max(2, int(pool_bytes // 2 // kv_bytes))
        caches = Cycle([(torch.randn(1, ctx, N_KV, HEAD_DIM, generator=g).bfloat16(),
                         torch.randn(1, ctx, N_KV, HEAD_DIM, generator=g).bfloat16()) for _ in range(min(n, 64))])
        q = torch.randn(1, 1, N_Q, HEAD_DIM, generator=g).bfloat16()
        sinks = torch.randn(N_Q, generator=g).bfloat16()
        k_pos = torch.arange(ctx)[None]
        q_pos = torch.tensor([[ctx - 1]])

        def fast(caches=caches, q=q, sinks=sinks, k_pos=k_pos, q_pos=q_pos, window=window):
            k, v = caches()
            return cpu.attention(q, k, v, sinks, q_pos, k_pos, window)

        def ref(caches=caches, q=q, sinks=sinks, k_pos=k_pos, q_pos=q_pos, window=window):
            k, v = caches()
            return reference.attention(q, k, v, sinks, q_pos, k_pos, window)

        case(f"attention decode, {ctx} keys, window {window}", kv_bytes, fast, ref)

    # Attention prefill: 512 new tokens, causal, full layer.
    t = 512
    k = torch.randn(1, t, N_KV, HEAD_DIM, generator=g).bfloat16()
    v = torch.randn(1, t, N_KV, HEAD_DIM, generator=g).bfloat16()
    q = torch.randn(1, t, N_Q, HEAD_DIM, generator=g).bfloat16()
    sinks = torch.randn(N_Q, generator=g).bfloat16()
    pos = torch.arange(t)[None]
    case("attention prefill, 512 tokens causal", None, lambda: cpu.attention(q, k, v, sinks, pos, pos, 0),
         lambda: reference.attention(q, k, v, sinks, pos, pos, 0))

    print()
    print(f"{'case':46} {'kernel ms':>10} {'GB/s':>6} {'ref ms':>10} {'ref GB/s':>8} {'speed-up':>8} {'probe GB/s':>10}")
    for name, tf, gf, tr, gr, ratio, pr in rows:
        print(f"{name:46} {tf * 1e3:10.3f} {gf:6.1f} {tr * 1e3:10.3f} {gr:8.1f} {ratio:7.1f}x {pr:10.1f}")


if __name__ == "__main__":
    main()
