"""What it costs to reach a kernel through `gptoss.ops`, per call, at decode size.

    python benchmarks/ops_dispatch.py                       # this checkout
    python benchmarks/ops_dispatch.py --baseline 2f564a7    # and a git ref, in the same run

Each op is timed twice on the same one-token inputs: through `gptoss.ops` (dispatch + kernel)
and through `gptoss.ops.cpu` (the kernel's own wrapper, without the dispatch); the difference is
what the dispatch layer adds. The second column is the whole cost of a small kernel call.
The inputs are tiny, so the kernel's own time is small and the difference stands out. The
table also counts the `gptoss.ops` calls one decode step makes through a gpt-oss-20b-shaped stack
of 24 layers (tiny widths), which multiplies the per-call cost into a per-token one.
With --baseline the same script runs against a git worktree of the ref in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def best_time(fn, repeat: int = 7, number: int = 2000) -> float:
    """Seconds per call, the best of `repeat` rounds (a shared machine only ever adds time)."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def calls_per_decode_step() -> int:
    """gptoss.ops calls in one decode step of a 24-layer model (the 20b's depth, tiny widths)."""
    from gptoss import ops
    from gptoss.config import ModelConfig
    from gptoss.model import Model
    from gptoss.synth import write_random_checkpoint

    config = ModelConfig(num_hidden_layers=24, num_experts=8, experts_per_token=4, hidden_size=64,
                         intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=512)
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(folder, config)
        model = Model.from_pretrained(folder, dtype=torch.float32)
    names = ("linear", "rms_norm", "rotary", "linear_int8", "moe_experts", "attention")
    counter = {"calls": 0}
    originals = {name: getattr(ops, name) for name in names}

    def counting(fn):
        def wrapped(*args, **kwargs):
            counter["calls"] += 1
            return fn(*args, **kwargs)
        return wrapped

    import gptoss.model as model_module
    for name in names:
        setattr(ops, name, counting(originals[name]))
    try:
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), cache=cache)
            counter["calls"] = 0
            model(torch.tensor([[4]]), cache=cache)
    finally:
        for name in names:
            setattr(ops, name, originals[name])
    del model_module
    return counter["calls"]


def measure() -> dict:
    from gptoss import ops
    from gptoss.ops import cpu

    torch.set_num_threads(1)
    if not cpu.available():
        raise SystemExit(f"the CPU kernels are unavailable here: {cpu.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, generator=g, dtype=torch.bfloat16)
    w = torch.randn(8, 256, generator=g, dtype=torch.bfloat16)
    norm_w = torch.ones(256, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 4, 16, generator=g, dtype=torch.bfloat16)
    cos, sin = torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8)
    k = torch.randn(1, 8, 2, 16, generator=g, dtype=torch.bfloat16)
    sinks = torch.zeros(4)
    q_pos, k_pos = torch.tensor([[7]]), torch.arange(8)[None]
    cases = {
        "linear": (lambda: ops.linear(x, w), lambda: cpu.linear(x, w)),
        "rms_norm": (lambda: ops.rms_norm(x, norm_w, 1e-5), lambda: cpu.rms_norm(x, norm_w, 1e-5)),
        "rotary": (lambda: ops.rotary(q, cos, sin), lambda: cpu.rotary(q, cos, sin)),
        "attention": (lambda: ops.attention(q, k, k, sinks, q_pos, k_pos, 0),
                      lambda: cpu.attention(q, k, k, sinks, q_pos, k_pos, 0)),
    }
    rows = {}
    for name, (through_ops, direct) in cases.items():
        rows[name] = (best_time(through_ops), best_time(direct))
    return {"rows": rows, "calls": calls_per_decode_step()}


def table(title: str, result: dict) -> str:
    lines = [f"{title}", "| op | through gptoss.ops (µs) | gptoss.ops.cpu directly (µs) | dispatch adds (µs) |",
             "|---|---:|---:|---:|"]
    added = []
    for name, (through_ops, direct) in result["rows"].items():
        added.append(through_ops - direct)
        lines.append(f"| {name} | {through_ops * 1e6:.2f} | {direct * 1e6:.2f} | {(through_ops - direct) * 1e6:.2f} |")
    mean = sum(added) / len(added)
    lines.append(f"\n{result['calls']} gptoss.ops calls per decode step (24 layers): "
                 f"~{mean * result['calls'] * 1e6:.0f} µs of dispatch per token at {mean * 1e6:.2f} µs a call")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="GIT_REF", help="also measure this commit (a git worktree)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the baseline's subprocess
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure()))
        return 0
    results = [("this checkout", measure())]
    if args.baseline:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from serve_load import baseline_checkout

        root = baseline_checkout(args.baseline)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": root}, cwd=root, check=True)
        results.append((f"baseline {args.baseline}", json.loads(out.stdout.strip().splitlines()[-1])))
    for title, result in results:
        print(table(title, result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
