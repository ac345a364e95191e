"""The MXFP4 experts on each family of kernels this CPU runs, at gpt-oss-20b shapes.

    python benchmarks/int8_experts.py [--threads N] [--quick]

Rows: decode (1 token, its 4 experts of one layer: 17 MB of MXFP4 read) and prefill (128 tokens,
every expert of a layer), on
  - the int8-activation kernels: avx512-vnni (VNNI + VBMI), avx-vnni, avx2 (vpmaddubsw),
  - the exact fp32-activation kernels: avx512 and avx2 (what an AVX2 laptop ran before).
Layers cycle through a pool larger than the last-level cache, so decode reads memory, as in a
real step. Each case keeps its best of interleaved rounds (a shared machine only adds time), and
the last column is each row's speed over the exact avx2 kernel of the same case, measured in
the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import TOPK, Cycle, calls_for, expert_bytes, random_experts, timed  # noqa: E402

from gptoss.ops import cpu  # noqa: E402

H = 2880
E = 32
# (label, isa, int8 activations, AVX-VNNI allowed)
FAMILIES = (("int8 avx512-vnni", "avx512bf16", "always", True), ("int8 avx-vnni", "avx2", "always", True),
            ("int8 avx2 (vpmaddubsw)", "avx2", "always", False), ("exact fp32 avx512", "avx512", "never", True),
            ("exact fp32 avx2", "avx2", "never", True))


def runnable(isa: str, mode: str, avx_vnni: bool, label: str) -> bool:
    if isa not in cpu.supported_isas():
        return False
    if label.startswith("int8 avx512"):
        return cpu.has_vnni_vbmi()
    if label.startswith("int8 avx-vnni"):
        return cpu.has_avx_vnni()
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer layers")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if not cpu.available():
        raise SystemExit(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    layers = Cycle(random_experts(2 if args.quick else 3, g))
    budget = 0.3 if args.quick else 0.6
    pick = torch.Generator().manual_seed(1)

    def route(n):
        return torch.stack([torch.randperm(E, generator=pick)[:TOPK] for _ in range(n)])

    cases = {}
    for n in (1, 128):
        x = torch.randn(n, H, generator=g).bfloat16()
        w = torch.softmax(torch.randn(n, TOPK, generator=g), -1).bfloat16()
        idx = Cycle([route(n) for _ in range(16)])
        used = TOPK if n == 1 else E
        name = "decode, 1 token x 4 experts" if n == 1 else "prefill, 128 tokens x 32 experts"
        cases[name] = (lambda x=x, w=w, idx=idx: cpu.moe_experts(x, idx(), w, layers()),
                       expert_bytes(layers.items[0], used))
    families = [f for f in FAMILIES if runnable(f[1], f[2], f[3], f[0])]
    before = (cpu.isa(), cpu.int8_activations())
    best = {(case, f[0]): float("inf") for case in cases for f in families}
    try:
        for _ in range(args.rounds):
            for label, isa, mode, avx_vnni in families:
                cpu.set_isa(isa)
                cpu.set_int8_activations(mode)
                cpu.use_avx_vnni(avx_vnni)
                for case, (fn, _) in cases.items():
                    calls = calls_for(fn, budget / args.rounds)
                    best[case, label] = min(best[case, label], timed(fn, calls))
    finally:
        cpu.set_isa(before[0])
        cpu.set_int8_activations(before[1])
        cpu.use_avx_vnni(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MXFP4 experts at gpt-oss-20b shapes\n")
    print("| case | kernels | ms | GB/s of MXFP4 read | speed vs exact fp32 avx2 |")
    print("|---|---|---:|---:|---:|")
    for case, (_, nbytes) in cases.items():
        base = best[case, "exact fp32 avx2"]
        for label, *_ in families:
            t = best[case, label]
            print(f"| {case} | {label} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {base / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
