"""`gptoss bench`: prefill and decode speed at batch 1, against the machine's memory bandwidth.

It runs the serving engine's own step (flat batch, paged KV cache, sampling), so what it times
is what a server does for one request.

Decode reads every active weight once per token, so tokens/s x bytes per token is the bandwidth
the model uses; dividing by the bandwidth measured here (a large read-only reduction) tells how
close to the physical limit it runs. On a CPU that reference read is taken between the decode
steps and the median kept: a shared machine's bandwidth moves by 1.5x within minutes (31 to 57
GB/s on the 2-core machine this project is measured on), so a read taken after the run, or the
best of a few, can compare the decode with another machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from gptoss import parallel
from gptoss.engine.distributed import load_model
from gptoss.engine.engine import LLMEngine
from gptoss.footprint import footprint
from gptoss.model import Model
from gptoss.sampling import SamplingParams


@dataclass
class BenchResult:
    model: str
    threads: int
    kernels: str
    dense_int8: bool
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    bytes_per_token: int
    decode_gb_per_s: float
    measured_bandwidth_gb_per_s: float
    bandwidth_fraction: float
    tensor_parallel_size: int = 1
    rank_memory: list[dict] | None = None  # per rank: resident GB (anonymous, file-backed) and peak
    bytes_sent_per_decode_step: int = 0  # by rank 0 into the collectives, with tensor parallelism
    bandwidth_between_steps: bool = False  # the reference read: the median of reads between the decode steps

    def as_dict(self) -> dict:
        return asdict(self)


def _proc_kb_fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The `key: N kB` lines of a /proc file that are in `keys`, in bytes."""
    fields = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0]) * 1024
    return fields


def process_memory(pid: int | str = "self") -> dict:
    """Resident memory of a process in GB: its own pages (anon), file pages it maps, and the peak."""
    fields = _proc_kb_fields(f"/proc/{pid}/status", ("RssAnon", "RssFile", "VmHWM"))
    return {"anon_gb": fields.get("RssAnon", 0) / 1e9, "file_gb": fields.get("RssFile", 0) / 1e9,
            "peak_gb": fields.get("VmHWM", 0) / 1e9}


def page_sizes(pid: int | str = "self") -> dict:
    """GB of a process's resident memory in 2 MB pages: file pages mapped whole (FilePmdMapped)
    and its own pages (AnonHugePages), against all of each. A stream crosses a 4 KB page every
    64 lines, and each crossing costs a TLB walk and a cold start of the hardware prefetcher."""
    keys = ("Rss", "Anonymous", "AnonHugePages", "FilePmdMapped")
    try:
        sums = dict.fromkeys(keys, 0) | _proc_kb_fields(f"/proc/{pid}/smaps_rollup", keys)
    except OSError:
        return {}
    file_rss = sums["Rss"] - sums["Anonymous"]
    return {"file_gb": file_rss / 1e9, "file_2mb_gb": sums["FilePmdMapped"] / 1e9,
            "anon_gb": sums["Anonymous"] / 1e9, "anon_2mb_gb": sums["AnonHugePages"] / 1e9}


def read_buffer(nbytes: int = 1 << 30, device="cpu") -> torch.Tensor:
    """A buffer far larger than the caches, its pages faulted in, for `read_gb_per_s`."""
    buf = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()
    return buf


def read_gb_per_s(buf: torch.Tensor, repeats: int = 1) -> float:
    """GB/s of a multithreaded read of `buf` (the best of `repeats` passes); on a GPU, of its memory.

    On a CPU each pass takes the faster of torch's sum and the kernels' read probe (16 streams side
    by side per thread): on a 2-core Xeon the probe read 28 GB/s where the sum read 21-26, and a
    fraction of a weaker read would flatter the decode step."""
    on_cpu = buf.device.type == "cpu"
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize
    if on_cpu:
        from gptoss.ops import cpu
    reads = [buf.sum] + ([lambda: cpu.read_probe(buf)] if on_cpu and cpu.available() else [])
    best = float("inf")
    for _ in range(repeats):
        for read in reads:
            sync()
            start = time.perf_counter()
            read()
            sync()
            best = min(best, time.perf_counter() - start)
    return buf.numel() * buf.element_size() / best / 1e9


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, device="cpu") -> float:
    """GB/s of a multithreaded read of a buffer far larger than the caches (best of `repeats`);
    on a GPU, of its memory."""
    return read_gb_per_s(read_buffer(nbytes, torch.device(device)), repeats)


def touch_every_page(model: torch.nn.Module, page: int = 4096) -> None:
    """Read one byte of every page of every weight, so none is read from disk while timing."""
    for tensor in model.state_dict().values():
        flat = tensor.reshape(-1).view(torch.uint8) if tensor.is_contiguous() else None
        if flat is not None and flat.numel():
            flat[::page].sum()


def bytes_per_token(path: str, model: Model) -> int:
    """The checkpoint's bytes per decoded token, less what --dense-int8 saves on the modules it quantized."""
    from gptoss.model import Int8Linear

    saved = sum(m.bf16_bytes - m.weight.numel() - m.scale.numel() * 4
                for m in model.modules() if isinstance(m, Int8Linear))
    return footprint(path).bytes_per_token - saved


def run_bench(path: str, prompt_tokens: int = 512, gen_tokens: int = 64, threads: int | None = None,
              progress: bool = True, dense_int8: bool = False, tensor_parallel_size: int = 1,
              expert_parallel: bool = False, device: str = "cpu", cuda_graphs: bool | None = None,
              mmap: bool = True) -> BenchResult:
    from gptoss import ops

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model(path, dtype=torch.bfloat16, progress=progress, dense_int8=dense_int8, device=device,
                       tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel, mmap=mmap)
    load_s = time.perf_counter() - start
    per_token = bytes_per_token(path, model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(model.config.vocab_size, 199998), (prompt_tokens,), generator=gen).tolist()

    def engine_for(tokens: int) -> LLMEngine:  # the server's engine, holding one request
        return LLMEngine(model, kv_cache_size=tokens + 64, max_num_seqs=1, max_batched_tokens=max(tokens, 1),
                         cuda_graphs=cuda_graphs)

    steps = range(gen_tokens + 1)
    if progress:
        from gptoss.progress import track
        steps = track(steps, description="prefill + decode")
    decode_times = []
    reads = []  # GB/s of the reference read, taken every 8 decode steps (CPU)
    probe = read_buffer(1 << 29) if model.device.type == "cpu" else None
    greedy = SamplingParams(temperature=0, max_tokens=gen_tokens + 1, ignore_eos=True)
    with torch.inference_mode():
        touch_every_page(model)  # time the model, not the disk: fault the memory-mapped weights in
        warm = engine_for(1)  # builds the CPU kernels on first use: not timed
        warm.add_request(prompt[:1], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        warm.run_until_done()
        engine = engine_for(prompt_tokens + gen_tokens + 1)
        engine.add_request(prompt, greedy)
        for step in steps:  # step 0 is the prefill (one chunk), then one decode per step
            t0 = time.perf_counter()
            engine.step()
            if step == 0:
                prefill_s = time.perf_counter() - t0
                sent = parallel.bytes_sent()
            else:
                decode_times.append(time.perf_counter() - t0)
            if probe is not None and step % 8 == 0:  # beside the steps, not inside their timing
                reads.append(read_gb_per_s(probe))
        sent_per_step = (parallel.bytes_sent() - sent) // max(1, gen_tokens)
    # The first decode steps warm caches and thread pools; report the steady state.
    steady = decode_times[len(decode_times) // 8:] or decode_times
    decode_tps = len(steady) / sum(steady)
    ranks = getattr(model, "ranks", None)
    pids = ["self"] + ([p.pid for p in ranks.workers.procs] if ranks is not None and ranks.workers else [])
    memory = [dict(rank=r, **process_memory(pid)) for r, pid in enumerate(pids)]
    if ranks is not None:
        ranks.close()
    del probe
    bandwidth = statistics.median(reads) if reads else measure_read_bandwidth(device=model.device)
    decode_gbs = decode_tps * per_token / 1e9
    return BenchResult(
        model=str(path), threads=torch.get_num_threads(), kernels=ops.backend_name(model.device), dense_int8=dense_int8,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, load_s=load_s,
        prefill_tokens_per_s=prompt_tokens / prefill_s, decode_tokens_per_s=decode_tps,
        bytes_per_token=per_token, decode_gb_per_s=decode_gbs,
        measured_bandwidth_gb_per_s=bandwidth, bandwidth_fraction=decode_gbs / bandwidth,
        tensor_parallel_size=tensor_parallel_size, rank_memory=memory, bytes_sent_per_decode_step=sent_per_step,
        bandwidth_between_steps=bool(reads),
    )


def format_result(r: BenchResult) -> str:
    during = " (median, between the decode steps)" if r.bandwidth_between_steps else ""
    return "\n".join([
        f"model        {r.model}   ({r.threads} threads, kernels: {r.kernels}"
        f"{', dense int8' if r.dense_int8 else ''}, loaded in {r.load_s:.1f} s)",
        f"prefill      {r.prefill_tokens_per_s:8.1f} tokens/s   ({r.prompt_tokens} tokens)",
        f"decode       {r.decode_tokens_per_s:8.2f} tokens/s   ({r.gen_tokens} tokens)",
        f"per token    {r.bytes_per_token / 1e9:8.3f} GB read -> {r.decode_gb_per_s:.1f} GB/s",
        f"bandwidth    {r.measured_bandwidth_gb_per_s:8.1f} GB/s read here{during} -> decode uses "
        f"{100 * r.bandwidth_fraction:.0f}% of it",
        *([f"ranks        {r.tensor_parallel_size}: " + ", ".join(
            f"rank {m['rank']} {m['anon_gb']:.2f} GB own + {m['file_gb']:.2f} GB mapped" for m in r.rank_memory),
           f"traffic      {r.bytes_sent_per_decode_step / 1e3:8.1f} kB into collectives per decode step (rank 0)"]
          if r.tensor_parallel_size > 1 else []),
    ])
