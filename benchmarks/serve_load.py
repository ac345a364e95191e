"""Load test of `gptoss serve`: throughput, time to first token and inter-token latency under
1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve_load.py MODEL_PATH                      # starts a server on a free port
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME
    options: --concurrency 1 8 32  --requests-per-client 2  --prompt-tokens 128  --max-tokens 64
             --endpoint completions|chat  --json

    python benchmarks/serve_load.py MODEL_PATH --mix --baseline 4aee2a4   # before/after, same run

Each client sends its requests one after another, streaming, with `ignore_eos` so every request
generates exactly its output length: --max-tokens, or with --mix a chat-like workload where each
request draws its prompt length log-uniformly from 16..1024 tokens and its output from 16..256
(the same draws for every level and for the baseline). --baseline GIT_REF also starts a server
from that commit (a git worktree) and runs the same load against it, one server at a time, then
prints both tables and the ratio of output tokens/s. Prompts are random token ids (different per request, so
the prefix cache does not shortcut the prefill). The default endpoint is /v1/completions, where
every token arrives as its own chunk; with /v1/chat/completions a random-weight model's harmony
headers produce no chunks, which blurs TTFT and ITL.

Columns: output tokens per second over the level's wall time, requests per second, and the
50th/90th/99th percentiles of time to first token (request sent -> first text chunk) and of
inter-token latency (gap between consecutive chunks, divided by the tokens they carry when the
usage says some chunks held more than one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestStats:
    ttft: float
    gaps: list[float]
    tokens: int
    latency: float


@dataclass
class LevelResult:
    clients: int
    requests: int
    wall: float
    tokens: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        k = (len(ordered) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    def as_dict(self) -> dict:
        out = {"clients": self.clients, "requests": self.requests, "errors": self.errors,
               "output_tokens": self.tokens, "wall_s": round(self.wall, 3),
               "output_tok_per_s": round(self.tokens / self.wall, 2), "req_per_s": round(self.requests / self.wall, 3)}
        for name, values in (("ttft_ms", self.ttft), ("itl_ms", self.itl)):
            for q in (0.5, 0.9, 0.99):
                out[f"{name}_p{int(q * 100)}"] = round(1000 * self.percentile(values, q), 2)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_checkout(ref: str) -> str:
    """A git worktree of `ref` beside the system temp folder (reused if present)."""
    root = os.path.join(tempfile.gettempdir(), f"gptoss-baseline-{ref}")
    if not os.path.isdir(root):
        subprocess.run(["git", "worktree", "add", "--detach", root, ref], check=True, capture_output=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    return root


def start_server(path: str, args, code: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """`gptoss serve` on a free port, from this checkout or from the folder `code`."""
    port = free_port()
    name = "bench"
    command = [sys.executable, "-m", "gptoss.cli", "serve", path, "--port", str(port), "--served-model-name", name,
               "--max-num-seqs", str(max(args.concurrency)), "--log-level", "warning"]
    if args.kv_cache_size:
        command += ["--kv-cache-size", args.kv_cache_size]
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = code
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=code)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, name
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not become ready in 600 s")


def request_shape(args, rng: random.Random) -> tuple[int, int]:
    """(prompt tokens, output tokens) of one request."""
    if not args.mix:
        return args.prompt_tokens, args.max_tokens
    return round(math.exp(rng.uniform(math.log(16), math.log(1024)))), round(math.exp(rng.uniform(math.log(16),
                                                                                                  math.log(256))))


async def one_request(client: httpx.AsyncClient, args, model: str, rng: random.Random) -> RequestStats:
    prompt_tokens, max_tokens = request_shape(args, rng)
    prompt = [rng.randrange(1000, 150000) for _ in range(prompt_tokens)]
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0}
    if args.endpoint == "chat":
        text = " ".join(str(t) for t in prompt)
        path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {**body, "prompt": prompt}
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if choice.get("text") or any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
                    times.append(time.perf_counter())
    end = time.perf_counter()
    if not times:
        raise RuntimeError("no text arrived")
    gaps = [b - a for a, b in zip(times, times[1:])]
    spread = max(tokens - 1, 1) / max(len(gaps), 1)  # tokens per gap when some chunks held several
    return RequestStats(times[0] - start, [g / spread for g in gaps], tokens, end - start)


async def run_level(url: str, model: str, clients: int, args, seed: int) -> LevelResult:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=args.headers) as client:
        await one_request(client, args, model, random.Random(seed))  # warm-up
        result = LevelResult(clients, 0, 0.0, 0)

        async def client_loop(index: int):
            rng = random.Random(seed * 1000 + index)
            for _ in range(args.requests_per_client):
                try:
                    stats = await one_request(client, args, model, rng)
                except Exception as exc:  # counted, reported, and the run goes on
                    result.errors += 1
                    print(f"request failed: {exc}", file=sys.stderr)
                    continue
                result.requests += 1
                result.tokens += stats.tokens
                result.ttft.append(stats.ttft)
                result.itl += stats.gaps

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        result.wall = time.perf_counter() - start
        return result


def format_table(results: list[LevelResult], args) -> str:
    shape = ("prompts 16-1024 tokens, outputs 16-256 (log-uniform)" if args.mix
             else f"prompt {args.prompt_tokens} tokens, output {args.max_tokens} tokens")
    lines = [f"endpoint /v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}, "
             f"{shape}, {args.requests_per_client} requests per client",
             f"{'clients':>7} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'req/s':>7}   "
             f"{'TTFT ms p50 / p90 / p99':>26}   {'ITL ms p50 / p90 / p99':>24}"]
    for r in results:
        d = r.as_dict()
        lines.append(f"{r.clients:>7} {r.requests:>5} {r.errors:>4} {d['output_tok_per_s']:>10.1f} "
                     f"{d['req_per_s']:>7.2f}   "
                     f"{d['ttft_ms_p50']:>8.1f} /{d['ttft_ms_p90']:>7.1f} /{d['ttft_ms_p99']:>7.1f}   "
                     f"{d['itl_ms_p50']:>7.1f} /{d['itl_ms_p90']:>6.1f} /{d['itl_ms_p99']:>6.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="model folder (starts a server); or give --url")
    parser.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name at --url (default: the first listed)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mix", action="store_true", help="chat-like mix of prompt and output lengths")
    parser.add_argument("--baseline", default=None, metavar="GIT_REF",
                        help="also measure a server started from this commit, in the same run")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--kv-cache-size", default=None, help="for the server this script starts")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per level")
    args = parser.parse_args()
    if not args.path and not args.url:
        parser.error("give a model folder or --url")
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    if args.url:
        if args.baseline:
            parser.error("--baseline starts its own servers: give a model folder, not --url")
        url = args.url.rstrip("/")
        model = args.model or httpx.get(url + "/v1/models", headers=args.headers).json()["data"][0]["id"]
        runs = {"": measure(url, model, args)}
    else:
        runs = {}
        if args.baseline:
            runs[f"baseline {args.baseline}"] = serve_and_measure(args, baseline_checkout(args.baseline))
        runs["this checkout" if args.baseline else ""] = serve_and_measure(args, None)
    for label, results in runs.items():
        if args.json:
            for r in results:
                print(json.dumps({"server": label or "this checkout", **r.as_dict()}))
        else:
            print(f"\n{label}" if label else "", format_table(results, args), sep="\n" if label else "")
    if args.baseline and not args.json:
        before, after = runs.values()
        print("\noutput tokens/s, this checkout / baseline: " + ", ".join(
            f"{a.clients} clients {(a.tokens / a.wall) / (b.tokens / b.wall):.2f}x" for b, a in zip(before, after)))
    return 1 if any(r.errors for results in runs.values() for r in results) else 0


def measure(url: str, model: str, args) -> list[LevelResult]:
    return [asyncio.run(run_level(url, model, c, args, seed=args.seed + c)) for c in args.concurrency]


def serve_and_measure(args, code: str | None) -> list[LevelResult]:
    proc, url, model = start_server(os.path.abspath(args.path), args, code)
    try:
        return measure(url, model, args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
