"""Tensor / expert parallelism on this machine: memory per rank, speed, and traffic, N = 1 vs N > 1.

    python benchmarks/parallel.py --model /path/to/synth20b --sizes 1 2 [--expert-parallel]

Each N runs `gptoss bench --json --tensor-parallel-size N` in its own process (so each peak is
its own) and the table compares it with N = 1 run by the same script. On one machine the ranks
share its cores and memory bandwidth, so speed does not grow with N here: what this shows is the
memory each rank holds (about 1/N of the weights plus the replicated router, norms and KV) and
what a step costs in collectives. Across GPUs or machines each rank brings its own bandwidth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def bench(model: str, size: int, expert_parallel: bool, prompt_tokens: int, gen_tokens: int) -> dict:
    command = [sys.executable, "-m", "gptoss.cli", "bench", model, "--json", "--tensor-parallel-size", str(size),
               "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens)]
    if expert_parallel and size > 1:
        command.append("--expert-parallel")
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. from `gptoss synth --preset 20b`)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--expert-parallel", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args()

    results = {n: bench(args.model, n, args.expert_parallel, args.prompt_tokens, args.gen_tokens)
               for n in sorted(set([1] + args.sizes))}
    base = results[1]
    mode = "expert" if args.expert_parallel else "tensor"
    print(f"model {args.model}, {args.prompt_tokens}-token prompt, {args.gen_tokens} decoded tokens, "
          f"{mode} parallel")
    print("| N | rank | own memory GB | mapped file GB | peak RSS GB | prefill tok/s | decode tok/s "
          "| decode vs N=1 | kB sent per decode step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        for m in r["rank_memory"]:
            first = m["rank"] == 0
            speed = (f"{r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | "
                     f"{r['bytes_sent_per_decode_step'] / 1e3:.1f}") if first else " | | | "
            print(f"| {n if first else ''} | {m['rank']} | {m['anon_gb']:.2f} | {m['file_gb']:.2f} | "
                  f"{m['peak_gb']:.2f} | {speed} |")


if __name__ == "__main__":
    main()
