"""gptoss against llama.cpp on this CPU: the same random gpt-oss-20b checkpoint, the same threads.

    python benchmarks/cpu_vs_llamacpp.py [--preset 20b] [--threads 2] [--rounds 2]

Steps (all build outputs live in a cache folder outside the repository, reused on later runs):
1. `gptoss synth --preset 20b` writes a random-weight checkpoint (MXFP4 experts, bf16 dense) with
   a tokenizer.json made from the o200k vocabulary.
2. llama.cpp is built from the `llama-cpp-python` sdist on PyPI, which vendors it
   (`llama-bench` only, native CPU flags).
3. Its `convert_hf_to_gguf.py` converts the same checkpoint, keeping the experts in MXFP4 and the
   dense tensors in bf16, so both read the same bytes per token.
4. `llama-bench -p N -n M` and `gptoss bench --json` run alternately, `--rounds` times each;
   the best and the median run of each are reported with the ratios gptoss / llama.cpp.

llama-bench's tg test decodes from an empty context; gptoss bench decodes after the prompt.
At 512 tokens of context attention is under 1% of the bytes read, so the two compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def ensure_checkpoint(cache: Path, preset: str) -> Path:
    folder = cache / f"random-{preset}"
    if not (folder / "tokenizer.json").exists():
        log(f"writing a random {preset} checkpoint to {folder}")
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        run([sys.executable, "-m", "gptoss.cli", "synth", str(folder), "--preset", preset])
    return folder


def ensure_llama_cpp(cache: Path) -> Path:
    """Build llama-bench from the llama.cpp that llama-cpp-python vendors; returns its source folder."""
    root = cache / "llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    name = LLAMA_CPP_PYTHON.replace("-", "_").replace("==", "-")
    src = root / name / "vendor" / "llama.cpp"
    bench = src / "build" / "bin" / "llama-bench"
    if bench.exists():
        return src
    sdist = root / f"{name}.tar.gz"
    if not sdist.exists():
        log(f"downloading the {LLAMA_CPP_PYTHON} sdist")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
             "-d", str(root)])
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    log("building llama-bench (several minutes on 2 cores)")
    run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        cwd=src, stdout=subprocess.DEVNULL)
    run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", "llama-bench"], cwd=src,
        stdout=subprocess.DEVNULL)
    return src


def ensure_gguf(cache: Path, checkpoint: Path, llama_src: Path) -> Path:
    gguf = cache / f"{checkpoint.name}-mxfp4-bf16.gguf"
    if not gguf.exists():
        log(f"converting {checkpoint.name} to GGUF (MXFP4 experts, bf16 dense)")
        env = {**os.environ, "PYTHONPATH": str(llama_src / "gguf-py")}
        tmp = gguf.with_suffix(".partial")
        run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile", str(tmp),
             "--outtype", "bf16"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(gguf)
    return gguf


def warm_page_cache(paths: list[Path], huge_pages: bool) -> float:
    """Read the files into the page cache as each engine's own loader reads them from a cold cache;
    returns the seconds it took.

    The checkpoint and the GGUF (13.8 GB each for the 20b) do not both fit a 24 GB page cache, so
    each engine's files are dropped from the cache and read again right before its run: neither is
    timed reading the disk. Both engines memory-map their files; gptoss's maps ask for huge pages
    (`huge_pages`), so what they read in comes in 2 MB pages, and llama.cpp's maps take what the
    kernel gives by default. Reading through the same kind of map here leaves the pages as each
    engine would have them.
    """
    import mmap

    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            mapped.madvise(mmap.MADV_HUGEPAGE)
        for offset in range(0, len(mapped), mmap.PAGESIZE):
            mapped[offset]
        mapped.close()
    return time.perf_counter() - start


def bench_llama(llama_src: Path, gguf: Path, prompt: int, gen: int, threads: int) -> dict:
    out = run([str(llama_src / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n",
               str(gen), "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True)
    results = json.loads(out.stdout)
    speeds = {}
    for r in results:
        kind = "prefill" if r["n_prompt"] > 0 else "decode"
        speeds[kind] = r["avg_ts"]
    return speeds


def bench_gptoss(checkpoint: Path, prompt: int, gen: int, threads: int, dense_int8: bool = False) -> dict:
    out = run([sys.executable, "-m", "gptoss.cli", "bench", str(checkpoint), "--prompt-tokens", str(prompt),
               "--gen-tokens", str(gen), "--threads", str(threads), "--json"] + (["--dense-int8"] if dense_int8 else []),
              capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"prefill": r["prefill_tokens_per_s"], "decode": r["decode_tokens_per_s"], "load_s": r["load_s"],
            "kernels": r["kernels"], "bandwidth": r["measured_bandwidth_gb_per_s"]}


def print_table(name: str, ours: list[dict], theirs: list[dict], pp: str, tg: str) -> None:
    """Best run of each side and their ratio, then the medians' (a shared machine's bandwidth moves
    between runs, so the two can differ)."""
    print(f"| test | {name} tokens/s best (median) | llama.cpp tokens/s best (median) | ratio of bests (of medians) |")
    print("|---|---|---|---|")
    for label, key in ((pp, "prefill"), (tg, "decode")):
        a, b = max(o[key] for o in ours), max(t[key] for t in theirs)
        ma, mb = statistics.median(o[key] for o in ours), statistics.median(t[key] for t in theirs)
        print(f"| {label} | {a:.2f} ({ma:.2f}) | {b:.2f} ({mb:.2f}) | {a / b:.2f}x ({ma / mb:.2f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dense-int8", action="store_true",
                        help="also run gptoss with --dense-int8 (reported separately: llama.cpp keeps bf16 here)")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("GPTOSS_CACHE", Path.home() / ".cache" / "gptoss")) / "bench")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    checkpoint = ensure_checkpoint(args.cache, args.preset)
    llama_src = ensure_llama_cpp(args.cache.parent)
    gguf = ensure_gguf(args.cache, checkpoint, llama_src)

    ours, theirs, ours_int8 = [], [], []
    shards = sorted(checkpoint.glob("*.safetensors"))
    for i in range(args.rounds):
        warmed = warm_page_cache(shards, huge_pages=True)
        log(f"round {i + 1}/{args.rounds}: gptoss (page cache warmed in {warmed:.0f} s)")
        ours.append(bench_gptoss(checkpoint, args.prompt_tokens, args.gen_tokens, args.threads))
        log(f"  prefill {ours[-1]['prefill']:.2f}, decode {ours[-1]['decode']:.2f} tokens/s "
            f"(plain read {ours[-1]['bandwidth']:.1f} GB/s)")
        if args.dense_int8:
            log(f"round {i + 1}/{args.rounds}: gptoss --dense-int8")
            ours_int8.append(bench_gptoss(checkpoint, args.prompt_tokens, args.gen_tokens, args.threads, True))
            log(f"  prefill {ours_int8[-1]['prefill']:.2f}, decode {ours_int8[-1]['decode']:.2f} tokens/s")
        warmed = warm_page_cache([gguf], huge_pages=False)
        log(f"round {i + 1}/{args.rounds}: llama.cpp (page cache warmed in {warmed:.0f} s)")
        theirs.append(bench_llama(llama_src, gguf, args.prompt_tokens, args.gen_tokens, args.threads))
        log(f"  prefill {theirs[-1]['prefill']:.2f}, decode {theirs[-1]['decode']:.2f} tokens/s")

    pp, tg = f"pp{args.prompt_tokens}", f"tg{args.gen_tokens}"
    print(f"\ngpt-oss-{args.preset} (random weights, MXFP4 experts, bf16 dense), {args.threads} threads, "
          f"{args.rounds} alternating runs each; gptoss kernels: {ours[0]['kernels']}; plain read during "
          f"gptoss's decode {min(o['bandwidth'] for o in ours):.1f}-{max(o['bandwidth'] for o in ours):.1f} GB/s")
    print_table("gptoss", ours, theirs, pp, tg)
    if ours_int8:
        print(f"\ngptoss --dense-int8 (attention and lm_head int8 with a scale per row, experts MXFP4), "
              f"against the same llama.cpp runs (bf16 dense):")
        print_table("gptoss --dense-int8", ours_int8, theirs, pp, tg)
    print(f"\ngptoss load time (warm page cache): {min(o['load_s'] for o in ours):.1f} s"
          + (f"; with --dense-int8 {min(o['load_s'] for o in ours_int8):.1f} s" if ours_int8 else ""))


if __name__ == "__main__":
    main()
