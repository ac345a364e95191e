"""This tree's CPU kernels against another revision's, in one process, on a real checkpoint.

    python benchmarks/kernels_ab.py PATH [--baseline REV] [--rounds 8] [--threads 2]

Builds the kernels of git revision REV (default HEAD) into a temporary folder, loads both
libraries and alternates them round by round, so both see the same machine (a shared machine's
bandwidth drifts by 20% within minutes; runs minutes apart cannot be compared). Per round, with
the weights read cold (each layer's tensors are far apart; the experts change every round):
the 24 layers' MXFP4 experts of one token, every attention projection of one token, and whole
decode steps through the engine. Prints the median and best GB/s (tokens/s for the steps).
The revision must have this tree's C interface (ABI_VERSION in gptoss/ops/cpu); across an
interface change, alternate `gptoss bench` runs of the two checkouts instead.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = "gptoss/ops/cpu"


def build_revision(rev: str, folder: Path) -> Path:
    """The kernels of `rev` compiled into folder/_kernels.so (same flags as an install)."""
    from gptoss.ops.cpu.build import compile_library

    names = subprocess.run(["git", "ls-tree", "--name-only", rev, KERNEL_DIR + "/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".cpp", ".h")):
            data = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout
            (folder / Path(name).name).write_bytes(data)
    out = folder / "_kernels.so"
    compile_library(out, source=folder / "kernels.cpp")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a checkpoint folder (e.g. `gptoss synth ./random-20b --preset 20b`)")
    parser.add_argument("--baseline", default="HEAD", help="git revision whose kernels to compare with")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="decode steps per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gptoss import ops
    from gptoss.bench import touch_every_page
    from gptoss.engine.engine import LLMEngine
    from gptoss.model import Model
    from gptoss.ops import cpu
    from gptoss.sampling import SamplingParams

    if cpu._load() is None:
        raise SystemExit(f"the CPU kernels of this tree are unavailable: {cpu.unavailable_reason()}")
    tmp = Path(tempfile.mkdtemp(prefix="gptoss-ab-"))
    baseline = cpu._open(build_revision(args.baseline, tmp))
    cpu._declare(baseline)
    libraries = {"this tree": cpu._lib, args.baseline: baseline}

    model = Model.from_pretrained(args.path, dtype=torch.bfloat16)
    touch_every_page(model)
    config = model.config
    x = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    experts = [block.mlp.experts.weights() for block in model.blocks]
    e0 = model.blocks[0].mlp.experts
    per_expert = sum(t[0].numel() * t.element_size()
                     for t in (e0.gate_up_blocks, e0.gate_up_scales, e0.down_blocks, e0.down_scales))
    k = config.experts_per_token
    weights = torch.full((1, k), 1.0 / k)
    projections = [getattr(b.attn, n).weight for b in model.blocks for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projection_bytes = sum(w.numel() * w.element_size() for w in projections)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]).to(torch.bfloat16) for w in projections}

    engines = {}
    with torch.inference_mode():
        for name, lib in libraries.items():
            cpu._lib = lib
            engine = LLMEngine(model, kv_cache_size=4096, max_num_seqs=1, max_batched_tokens=256)
            engine.add_request(list(range(1000, 1128)),
                               SamplingParams(temperature=0, max_tokens=10 ** 6, ignore_eos=True))
            engine.step()  # the prefill
            engines[name] = engine

        results: dict[str, dict[str, list[float]]] = {n: {"experts": [], "projections": [], "decode": []}
                                                      for n in libraries}
        first = 0
        for r in range(args.rounds):
            for name, lib in libraries.items():
                cpu._lib = lib
                first = (first + k) % config.num_experts
                chosen = [torch.arange(first + 7 * layer, first + 7 * layer + k)[None] % config.num_experts
                          for layer in range(len(experts))]
                start = time.perf_counter()
                for idx, ew in zip(chosen, experts):
                    ops.moe_experts(x, idx, weights, ew)
                results[name]["experts"].append(len(experts) * k * per_expert / (time.perf_counter() - start) / 1e9)
                start = time.perf_counter()
                for w in projections:
                    ops.linear(inputs[w.shape[1]], w)
                results[name]["projections"].append(projection_bytes / (time.perf_counter() - start) / 1e9)
                start = time.perf_counter()
                for _ in range(args.steps):
                    engines[name].step()
                results[name]["decode"].append(args.steps / (time.perf_counter() - start))

    print(f"{args.path}, {args.threads} threads, {args.rounds} alternating rounds (median / best)")
    print("| kernels | MXFP4 experts GB/s | attention projections GB/s | decode tokens/s |")
    print("|---|---|---|---|")
    for name, res in results.items():
        cells = [f"{statistics.median(v):.1f} / {max(v):.1f}" if key != "decode" else
                 f"{statistics.median(v):.2f} / {max(v):.2f}" for key, v in res.items()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    a, b = (statistics.median(results[n]["decode"]) for n in libraries)
    print(f"decode: this tree / {args.baseline} = {a / b:.3f}x")


if __name__ == "__main__":
    main()
