"""The GPU path on one GPU, in one run of a few minutes: correctness, then speed beside transformers.

    python benchmarks/gpu.py                       # on an H100/H200: gpt-oss-20b shapes, random weights
    python benchmarks/gpu.py --device cpu --preset tiny --batches 1 2 --prefill 64 --no-transformers  # dry run

1. writes `gptoss synth --preset 20b` to --out (local disk) unless it is there;
2. checks each Triton kernel against its torch twin on the GPU (MXFP4 experts, decode and prefill
   attention over a paged cache), then the model's logits on the kernels against the reference path;
3. decode tokens/s at each batch size (prompts of 128 tokens, all sequences decoding), prefill
   tokens/s of one --prefill-token prompt, peak GPU memory;
4. the bandwidth bound: bytes read per decoded token (`gptoss inspect`) over a measured read of
   GPU memory, and the share of it batch-1 decode reaches;
5. transformers' GptOssForCausalLM on the same GPU and checkpoint: batch-1 decode and the prefill.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_kernels(device: torch.device) -> list[tuple[str, float]]:
    """Relative max error of each kernel against its twin, on small shapes, on `device`."""
    from gptoss import mxfp4
    from gptoss.ops import reference
    from gptoss.ops.reference import ExpertWeights
    from gptoss.ops.triton import attention, moe

    gen = torch.Generator().manual_seed(0)
    errors = []

    def rel(got, want):
        return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1)).item()

    e, h, i, n, k = 8, 256, 128, 77, 4
    gub, gus = mxfp4.quantize(torch.randn(e, 2 * i, h, generator=gen) * h ** -0.5)
    db, ds = mxfp4.quantize(torch.randn(e, h, i, generator=gen) * i ** -0.5)
    experts = ExpertWeights(gub.to(device), gus.to(device), (torch.randn(e, 2 * i, generator=gen) * 0.1).to(device),
                            db.to(device), ds.to(device), (torch.randn(e, h, generator=gen) * 0.1).to(device))
    x = torch.randn(n, h, generator=gen).to(device)
    indices, weights = reference.route(torch.randn(n, e, generator=gen).to(device), k)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = moe.moe_experts(x.to(dtype), indices, weights.to(dtype), experts, compute_dtype=dtype)
        want = reference.moe_experts(x.to(dtype).float(), indices, weights.to(dtype).float(), experts)
        errors.append((f"moe_experts {str(dtype)[6:]}", rel(got, want)))
    b, t, s, hq, hkv, d = 3, 70, 300, 16, 2, 64
    q = torch.randn(b, t, hq, d, generator=gen).to(device)
    keys = torch.randn(b, s, hkv, d, generator=gen).to(device)
    values = torch.randn(b, s, hkv, d, generator=gen).to(device)
    sinks = torch.randn(hq, generator=gen).to(device)
    k_pos = torch.arange(s, device=device).repeat(b, 1)
    q_pos = torch.arange(s - t, s, device=device).repeat(b, 1)
    for window in (0, 128):
        for name, rows in (("prefill", slice(None)), ("decode", slice(-1, None))):
            want = reference.attention(q[:, rows], keys, values, sinks, q_pos[:, rows], k_pos, window)
            got = attention.attention(q[:, rows].bfloat16(), keys.bfloat16(), values.bfloat16(), sinks,
                                      q_pos[:, rows], k_pos, window, compute_dtype=torch.bfloat16)
            errors.append((f"attention {name} window {window} bf16", rel(got, want)))
    return errors


def engine_decode(model, batch: int, prompt_tokens: int, gen_tokens: int) -> float:
    """Output tokens/s while `batch` sequences all decode."""
    from gptoss.engine.engine import LLMEngine
    from gptoss.sampling import SamplingParams

    engine = LLMEngine(model, kv_cache_size=batch * (prompt_tokens + gen_tokens + 32), max_num_seqs=batch,
                       max_batched_tokens=max(batch * prompt_tokens, 16))
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 199_000, (prompt_tokens,), generator=gen).tolist(), params)
    engine.step()  # every prompt in one step
    for _ in range(3):  # warm-up decodes
        engine.step()
    synchronize(model.device)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += len(engine.step())
    synchronize(model.device)
    return tokens / (time.perf_counter() - start)


def engine_prefill(model, tokens: int) -> float:
    from gptoss.engine.engine import LLMEngine
    from gptoss.sampling import SamplingParams

    best = float("inf")
    for _ in range(2):
        engine = LLMEngine(model, kv_cache_size=tokens + 64, max_num_seqs=1, max_batched_tokens=tokens,
                           cuda_graphs=False)  # prefill runs eagerly anyway: capture no decode graphs
        engine.add_request(list(range(1000, 1000 + tokens)), SamplingParams(temperature=0, max_tokens=1))
        synchronize(model.device)
        start = time.perf_counter()
        engine.step()
        synchronize(model.device)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def transformers_speed(path: Path, device: torch.device, prefill: int, gen_tokens: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=str(device))
    ids = torch.randint(0, 199_000, (1, prefill), device=device)
    prompt = ids[:, :128]
    with torch.inference_mode():
        model(ids[:, :16])
        synchronize(device)
        start = time.perf_counter()
        model(ids)
        synchronize(device)
        prefill_tps = prefill / (time.perf_counter() - start)
        model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
        synchronize(device)
        decode_tps = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)
    del model
    return decode_tps, prefill_tps


def main() -> None:
    from gptoss import ops
    from gptoss.bench import bytes_per_token, measure_read_bandwidth
    from gptoss.config import ModelConfig
    from gptoss.model import Model
    from gptoss.synth import write_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gptoss-synth"))
    parser.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    began = time.perf_counter()

    path = args.out / args.preset
    if not (path / "config.json").exists():
        write_random_checkpoint(path, ModelConfig.preset(args.preset), seed=0)
        print(f"wrote {path} in {time.perf_counter() - began:.0f} s", flush=True)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}; kernels: {ops.backend_name(device)}", flush=True)
        for name, err in check_kernels(device):
            print(f"  {name:34s} relative max error {err:.1e}", flush=True)

    model = Model.from_pretrained(path, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 199_000, (2, 200), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        fast = model(ids).float()
        ops.use("reference")
        slow = model(ids).float()
        ops.use(None)
    agree = (fast.argmax(-1) == slow.argmax(-1)).float().mean().item()
    err = ((fast - slow).abs().max() / slow.abs().max()).item()
    print(f"logits on {ops.backend_name(device)} vs reference: relative max error {err:.1e}, same argmax at "
          f"{100 * agree:.1f}% of positions", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = [(f"decode, batch {b}", engine_decode(model, b, 128, args.gen_tokens)) for b in args.batches]
    rows.append((f"prefill, {args.prefill} tokens", engine_prefill(model, args.prefill)))
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    per_token = bytes_per_token(str(path), model)
    bandwidth = measure_read_bandwidth(device=device)
    bound = bandwidth * 1e9 / per_token
    theirs = {}
    if not args.no_transformers:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            decode, prefill = transformers_speed(path, device, args.prefill, args.gen_tokens)
            theirs = {"decode, batch 1": decode, f"prefill, {args.prefill} tokens": prefill}
        except Exception as exc:  # report, do not lose the table above
            print(f"transformers failed: {type(exc).__name__}: {exc}")
    print(f"\n{args.preset} (random weights) on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f": {per_token / 1e9:.2f} GB per token, read bandwidth {bandwidth:.0f} GB/s -> bound {bound:.0f} tok/s")
    print("| test | gptoss tok/s | transformers tok/s | gptoss / transformers |")
    print("|---|---|---|---|")
    for name, value in rows:
        other = theirs.get(name)
        ratio = f"{value / other:.2f}x" if other else ""
        print(f"| {name} | {value:.1f} | {f'{other:.1f}' if other else ''} | {ratio} |")
    print(f"batch-1 decode at {100 * rows[0][1] / bound:.0f}% of the bandwidth bound; batch {args.batches[-1]} / "
          f"batch 1 = {rows[len(args.batches) - 1][1] / rows[0][1]:.1f}x; peak GPU memory {peak:.1f} GB; "
          f"{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
