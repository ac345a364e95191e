"""Prefill with many-row bf16 products in torch's matmul (AMX tiles) against the kernels, alternating.

    python benchmarks/amx_dispatch.py PATH [--tokens 512] [--rounds 3] [--threads 2]

On a CPU with AMX-BF16 the model's `linear` sends bf16 products of `cpu.AMX_MATMUL_MIN_ROWS` rows
or more to torch's matmul (oneDNN on the AMX tiles); this runs one prefill of `--tokens` tokens each
way per round, in one process (a shared machine drifts), and prints tokens/s, the best ratio and
how far the last token's logits moved. On a CPU without AMX both columns run the same code.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptoss.bench import touch_every_page
from gptoss.model import Model
from gptoss.ops import cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    has_amx = cpu.has_amx_bf16()
    model = Model.from_pretrained(args.path, dtype=torch.bfloat16)
    ids = torch.randint(0, 199998, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    speed: dict[bool, list[float]] = {False: [], True: []}
    logits = {}
    with torch.inference_mode():
        touch_every_page(model)
        for round_ in range(args.rounds):
            for amx in (False, True):
                cpu._amx_bf16 = amx and has_amx
                start = time.perf_counter()
                logits[amx] = model(ids, model.new_cache(1), last_only=True).float()
                speed[amx].append(args.tokens / (time.perf_counter() - start))
                print(f"round {round_ + 1}: {'torch matmul' if amx else 'kernels'} {speed[amx][-1]:.1f} tokens/s",
                      flush=True)
    cpu._amx_bf16 = has_amx
    moved = (logits[True] - logits[False]).abs().max().item()
    print(f"CPU has AMX-BF16: {has_amx}; {torch.get_num_threads()} threads, {args.tokens}-token prefill")
    print("| dense products | best tokens/s | median tokens/s |")
    print("|---|---|---|")
    for amx, name in ((False, "kernels"), (True, "torch matmul from %d rows" % cpu.AMX_MATMUL_MIN_ROWS)):
        s = sorted(speed[amx])
        print(f"| {name} | {s[-1]:.1f} | {s[len(s) // 2]:.1f} |")
    print(f"ratio (best) {max(speed[True]) / max(speed[False]):.2f}x; last-token logits moved by at most {moved:.3g}, "
          f"same argmax: {bool(logits[True].argmax() == logits[False].argmax())}")


if __name__ == "__main__":
    main()
