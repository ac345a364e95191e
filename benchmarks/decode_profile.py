"""Where one decode step goes: time per hot operation of a real checkpoint, at batch 1.

    python benchmarks/decode_profile.py PATH [--prompt-tokens 128] [--steps 16] [--threads 2]
        [--no-mmap] [--dense-int8]

Wraps `ops.linear`, `ops.moe_experts` and `ops.attention` with timers, decodes `--steps` tokens
after a prompt through the serving engine's step (as `gptoss bench` and the server do) and prints,
per operation, milliseconds per token, the bytes of weights it reads and the bandwidth that makes;
"everything else" is the step time the three do not cover (norms, rotary, routing, the cache,
sampling, Python). The memory-mapped weights are faulted in first; `--no-mmap` and `--dense-int8`
load the model as the CLI options of those names do.
The reference read is the median of plain reads taken between the steps (see gptoss.bench).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from gptoss import ops
from gptoss.bench import page_sizes, read_buffer, read_gb_per_s, touch_every_page
from gptoss.engine.engine import LLMEngine
from gptoss.model import Model
from gptoss.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-mmap", dest="mmap", action="store_false", help="copy the weights out of the file map")
    parser.add_argument("--dense-int8", action="store_true", help="int8 attention projections and lm_head")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = Model.from_pretrained(args.path, dtype=torch.bfloat16, mmap=args.mmap, dense_int8=args.dense_int8)
    seconds: dict[str, float] = defaultdict(float)
    nbytes: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    recording = False

    c = model.config
    projection_names: dict[tuple, str] = {}
    for shape, label in (((c.num_attention_heads * c.head_dim, c.hidden_size), "q_proj"),
                         ((c.num_key_value_heads * c.head_dim, c.hidden_size), "k_proj, v_proj"),
                         ((c.hidden_size, c.num_attention_heads * c.head_dim), "o_proj"),
                         ((c.num_experts, c.hidden_size), "router"), ((c.vocab_size, c.hidden_size), "lm_head")):
        projection_names[shape] = f"{projection_names[shape]}, {label}" if shape in projection_names else label

    def timed(name, fn, bytes_of, by_projection=False):
        """`by_projection`: one row per kind of weight (a[1]), so per-call costs show on the small ones."""
        def wrapper(*a, **kw):
            if not recording:
                return fn(*a, **kw)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            t1 = time.perf_counter()
            shape = tuple(a[1].shape)
            key = f"{name}: {projection_names.get(shape, shape)}" if by_projection else name
            seconds[key] += t1 - t0
            nbytes[key] += bytes_of(*a)
            calls[key] += 1
            seconds["(profiler)"] += time.perf_counter() - t1  # its own bookkeeping, taken off the step
            return out
        return wrapper

    def linear_bytes(x, weight, bias=None):
        return weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)

    def int8_bytes(x, weight, scale, bias=None):
        return weight.numel() * weight.element_size() + scale.numel() * scale.element_size() + (
            bias.numel() * bias.element_size() if bias is not None else 0)

    def expert_bytes(x, indices, weights, experts):
        used = indices.unique()
        per_expert = sum(t[0].numel() * t.element_size() for t in (
            experts.gate_up_blocks, experts.gate_up_scales, experts.down_blocks, experts.down_scales))
        return used.numel() * per_expert

    def attention_bytes(q, k, v, *rest):
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    ops.linear = timed("linear", ops.linear, linear_bytes, by_projection=True)
    ops.linear_int8 = timed("int8 linear", ops.linear_int8, int8_bytes, by_projection=True)
    ops.moe_experts = timed("MXFP4 experts", ops.moe_experts, expert_bytes)
    ops.attention = timed("attention", ops.attention, attention_bytes)

    prompt = torch.randint(0, 199998, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        touch_every_page(model)
        # The serving engine's step, as `gptoss bench` and the server run it (paged cache, sampler).
        engine = LLMEngine(model, kv_cache_size=args.prompt_tokens + args.steps + 64, max_num_seqs=1,
                           max_batched_tokens=args.prompt_tokens)
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=10 ** 6, ignore_eos=True))
        for _ in range(5):  # the prefill, then warm-up steps
            engine.step()
        probe, reads, total = read_buffer(1 << 29), [], 0.0
        for step in range(args.steps):
            recording = True
            start = time.perf_counter()
            engine.step()
            total += time.perf_counter() - start
            recording = False
            if step % 4 == 0:
                reads.append(read_gb_per_s(probe))
    bandwidth = statistics.median(reads)
    total -= seconds.pop("(profiler)")

    n = args.steps
    print(f"decode step: {1000 * total / n:.1f} ms = {n / total:.2f} tokens/s at {args.prompt_tokens} tokens of "
          f"context, {torch.get_num_threads()} threads, kernels {ops.backend_name()}; "
          f"plain read {bandwidth:.1f} GB/s (median between the steps); the step reads "
          f"{sum(nbytes.values()) / n / 1e9:.2f} GB -> {sum(nbytes.values()) / total / 1e9:.1f} GB/s = "
          f"{100 * sum(nbytes.values()) / total / 1e9 / bandwidth:.0f}% of it")
    pages = page_sizes()
    if pages:
        print(f"resident in 2 MB pages: file maps {pages['file_2mb_gb']:.2f} of {pages['file_gb']:.2f} GB, "
              f"own memory {pages['anon_2mb_gb']:.2f} of {pages['anon_gb']:.2f} GB")
    print("| operation | calls/token | ms/token | us/call | share | GB/token | GB/s |")
    print("|---|---|---|---|---|---|---|")
    covered = 0.0
    for name in seconds:
        s, b = seconds[name] / n, nbytes[name] / n
        covered += s
        print(f"| {name} | {calls[name] // n} | {1000 * s:.1f} | {1e6 * seconds[name] / calls[name]:.0f} | "
              f"{100 * s * n / total:.0f}% | {b / 1e9:.3f} | {b / s / 1e9:.1f} |")
    rest = total / n - covered
    print(f"| everything else | | {1000 * rest:.1f} | | {100 * rest * n / total:.0f}% | | |")


if __name__ == "__main__":
    main()
