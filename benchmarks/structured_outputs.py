"""What structured outputs cost: the grammar library alone (llguidance, which gptoss uses, against
xgrammar when it is installed), then decode through the engine with and without a constraint.

    python benchmarks/structured_outputs.py [--model PATH] [--batch 1 32] [--tokens 64]

Without --model a random tiny checkpoint is written to a temporary folder. Both halves run in this
process, one after the other, so the ratios are fair on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptoss.bench import touch_every_page

SCHEMA = {  # a typical extraction schema
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"enum": ["work", "home", "other"]}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "address"], "additionalProperties": False,
}
# For decode speed a constraint that stays open for the whole run: a long string inside JSON.
OPEN_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100000}},
               "required": ["text"], "additionalProperties": False}


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def walk(fill, allowed_of, consume, steps: int, seed: int = 0) -> list[float]:
    """Times of `fill` (the library computing the next-token mask) along a random path of allowed
    tokens; picking the token is not timed."""
    rng = random.Random(seed)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        allowed = allowed_of()
        if not allowed or not consume(rng.choice(allowed)):
            break
    return times


def allowed_ids(bitmask_row: torch.Tensor) -> list[int]:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten().nonzero().flatten().tolist()


def bench_llguidance(text_encoding, vocab: int) -> dict:
    import llguidance
    from llguidance.tiktoken import lltokenizer_from_encoding
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    start = time.perf_counter()
    tokenizer = lltokenizer_from_encoding(text_encoding, n_vocab=vocab, eos_token=200002)
    init = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    compile_s = timed(lambda: llguidance.LLMatcher.validate_grammar(grammar, tokenizer), 3)
    matcher_s = timed(lambda: llguidance.LLMatcher(tokenizer, grammar), 3)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    bitmask = allocate_token_bitmask(1, vocab)

    times = walk(lambda: fill_next_token_bitmask(matcher, bitmask, 0),
                 lambda: [] if matcher.is_stopped() else allowed_ids(bitmask[0]), matcher.consume_token, 60)
    return {"init": init, "compile": compile_s, "matcher": matcher_s, "mask": statistics.median(times),
            "mask_p90": sorted(times)[int(0.9 * (len(times) - 1))]}


def bench_xgrammar(text_encoding, vocab: int) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    start = time.perf_counter()
    encoded = []
    for i in range(vocab):
        try:
            encoded.append(text_encoding.decode_single_token_bytes(i))
        except KeyError:
            encoded.append(b"")
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[200002])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    init = time.perf_counter() - start
    schema = json.dumps(SCHEMA)
    compile_s = timed(lambda: compiler.compile_json_schema(schema, any_whitespace=False), 3)
    compiled = compiler.compile_json_schema(schema, any_whitespace=False)
    matcher_s = timed(lambda: xgr.GrammarMatcher(compiled), 3)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    times = walk(lambda: matcher.fill_next_token_bitmask(bitmask, 0),
                 lambda: [] if matcher.is_terminated() else allowed_ids(bitmask[0]), matcher.accept_token, 60)
    return {"init": init, "compile": compile_s, "matcher": matcher_s, "mask": statistics.median(times),
            "mask_p90": sorted(times)[int(0.9 * (len(times) - 1))]}


def run_batch(llm, batch: int, tokens: int, constrained: bool) -> float:
    options = {"json_schema": OPEN_SCHEMA} if constrained else {}
    start = time.perf_counter()
    streams = [llm.generate_stream(f"Request {i}:", temperature=1.0, seed=i, max_tokens=tokens,
                                   ignore_eos=True, **options) for i in range(batch)]
    for s in streams:
        s.collect()
    return time.perf_counter() - start


def bench_decode(llm, batch: int, tokens: int, constrained: bool) -> float:
    """Decode tokens/s of `batch` requests: (tokens + 1) generated minus 1 generated, so the
    prefill and the first token cancel out."""
    return batch * tokens / (run_batch(llm, batch, tokens + 1, constrained) - run_batch(llm, batch, 1, constrained))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random tiny one)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gptoss import LLM
    from gptoss.tokenizer import tiktoken_encoding

    text_encoding = tiktoken_encoding(args.model)
    vocab = 201088
    print("grammar library, a typical extraction schema (compact JSON), o200k_harmony vocabulary:")
    rows = [("llguidance", bench_llguidance(text_encoding, vocab)), ("xgrammar", bench_xgrammar(text_encoding, vocab))]
    print(f"| library | tokenizer init | schema compile | new matcher | mask / token (median) | p90 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        if r is None:
            print(f"| {name} | not installed | | | | |")
            continue
        print(f"| {name} | {r['init'] * 1e3:.0f} ms | {r['compile'] * 1e3:.2f} ms | {r['matcher'] * 1e3:.2f} ms "
              f"| {r['mask'] * 1e6:.0f} us | {r['mask_p90'] * 1e6:.0f} us |")

    folder = args.model
    if folder is None:
        from gptoss.config import ModelConfig
        from gptoss.synth import write_random_checkpoint

        folder = write_random_checkpoint(Path(tempfile.mkdtemp()) / "tiny", ModelConfig.preset("tiny"), seed=0)
    llm = LLM(folder, max_num_seqs=max(args.batch), kv_cache_size=max(args.batch) * (args.tokens + 64) + 1024)
    touch_every_page(llm.model)  # no page of the weights is first read while timing
    run_batch(llm, 1, 2, True)  # nor is the tokenizer set up for grammars
    llm.structurer.tokenizer  # built once, not timed
    print(f"\ndecode through the engine, {Path(folder).name}, {args.tokens} tokens per request:")
    print("| batch | free tok/s | constrained tok/s | cost per step |")
    print("|---|---|---|---|")
    for batch in args.batch:
        bench_decode(llm, batch, 4, False)  # warm up
        free = bench_decode(llm, batch, args.tokens, False)
        constrained = bench_decode(llm, batch, args.tokens, True)
        step_free, step_constrained = batch / free, batch / constrained
        print(f"| {batch} | {free:.1f} | {constrained:.1f} | +{(step_constrained - step_free) * 1e3:.2f} ms "
              f"({(step_constrained / step_free - 1) * 100:+.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
