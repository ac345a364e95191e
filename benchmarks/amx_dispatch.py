"""Prefill with and without AMX, alternating in one process: what each AMX use buys.

    python benchmarks/amx_dispatch.py PATH [--tokens 512] [--rounds 3] [--threads 2]

On a CPU with AMX two things run on the AMX tiles: the model's `linear` sends bf16 products of
`cpu.AMX_MATMUL_MIN_ROWS` rows or more to torch's matmul (oneDNN, AMX-BF16), and the int8 tile
products of the MXFP4 experts take their block sums with `tdpbusd` (AMX-INT8, gptoss/ops/cpu/amx.h;
the same output bits). Each round runs one prefill of `--tokens` tokens three ways: neither, the
dense dispatch only, both. Prints tokens/s, the ratios and how far the last token's logits moved.
Without AMX all three are the same code.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptoss.bench import touch_every_page
from gptoss.model import Model
from gptoss.ops import cpu

SETUPS = (("kernels, no AMX", False, False), ("dense products on torch's AMX matmul", True, False),
          ("and the experts' int8 block sums on AMX", True, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_amx, expert_amx = cpu.has_amx_bf16(), cpu.has_amx()
    model = Model.from_pretrained(args.path, dtype=torch.bfloat16)
    ids = torch.randint(0, 199998, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    speed: dict[str, list[float]] = {name: [] for name, _, _ in SETUPS}
    logits = {}
    with torch.inference_mode():
        touch_every_page(model)
        for round_ in range(args.rounds):
            for name, dense, experts in SETUPS:
                cpu._amx_bf16 = dense and dense_amx
                cpu.use_amx(experts and expert_amx)
                start = time.perf_counter()
                logits[name] = model(ids, model.new_cache(1), last_only=True).float()
                speed[name].append(args.tokens / (time.perf_counter() - start))
                print(f"round {round_ + 1}: {name}: {speed[name][-1]:.1f} tokens/s", flush=True)
    cpu._amx_bf16 = dense_amx
    cpu.use_amx(expert_amx)
    base = SETUPS[0][0]
    print(f"AMX-BF16 for torch's matmul: {dense_amx}; AMX-INT8 for the kernels: {expert_amx}; "
          f"{torch.get_num_threads()} threads, {args.tokens}-token prefill")
    print("| prefill | best tokens/s | median tokens/s | best / no AMX | logits moved (max) | same argmax |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in SETUPS:
        s = sorted(speed[name])
        moved = (logits[name] - logits[base]).abs().max().item()
        print(f"| {name} | {s[-1]:.1f} | {s[len(s) // 2]:.1f} | {s[-1] / max(speed[base]):.2f}x | {moved:.3g} | "
              f"{bool(logits[name].argmax() == logits[base].argmax())} |")


if __name__ == "__main__":
    main()
