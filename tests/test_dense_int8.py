"""--dense-int8: the model with int8 attention projections and lm_head, and the CLI options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptoss.config import ConfigError
from gptoss.model import Int8Linear, Model
from gptoss.ops import cpu

needs_int8 = pytest.mark.skipif(not cpu.dense_int8_supported(), reason="this CPU has no AVX-512 VNNI/VBMI")


@needs_int8
def test_dense_int8_model_is_close_to_bf16(tiny_checkpoint):
    bf16 = Model.from_pretrained(tiny_checkpoint)
    int8 = Model.from_pretrained(tiny_checkpoint, dense_int8=True)
    quantized = [name for name, m in int8.named_modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == 4 * bf16.config.num_hidden_layers + 1 and "lm_head" in quantized
    assert not isinstance(int8.blocks[0].mlp.router, Int8Linear)  # routing stays bf16
    tokens = torch.randint(0, 199998, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = bf16(tokens).float(), int8(tokens).float()
    # int8 rounding of weights and activations, about bf16's size; a position whose router sat on a
    # near-tie may pick another expert, so the typical position is held to the bound, not every one.
    per_position = (a - b).abs().amax(-1) / a.abs().max()
    assert per_position.median() < 0.05, per_position
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


@needs_int8
def test_dense_int8_decodes_with_the_cache_like_a_full_forward(tiny_checkpoint):
    model = Model.from_pretrained(tiny_checkpoint, dense_int8=True)
    tokens = torch.randint(0, 199998, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).float()
        cache = model.new_cache(1)
        steps = [model(tokens[:, :10], cache)] + [model(tokens[:, i:i + 1], cache) for i in (10, 11)]
    stepped = torch.cat(steps, dim=1).float()
    per_position = (full - stepped).abs().amax(-1) / full.abs().max()
    assert per_position.max() < 0.05, per_position


def test_dense_int8_is_refused_clearly_where_it_cannot_run(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu, "dense_int8_supported", lambda: False)
    with pytest.raises(ConfigError, match="AVX-512 VNNI"):
        Model.from_pretrained(tiny_checkpoint, dense_int8=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss.cli", *args], capture_output=True, text=True, timeout=300)


@needs_int8
def test_bench_json_with_and_without_dense_int8(tiny_checkpoint):
    results = {}
    for extra in ([], ["--dense-int8"]):
        out = run_cli("bench", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "4", "--threads", "1",
                      "--json", *extra)
        assert out.returncode == 0, out.stderr
        results[bool(extra)] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results.values():
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["threads"] == 1
    assert results[True]["dense_int8"] and not results[False]["dense_int8"]
    # The lm_head (vocab x 64) and projections read half the bytes (plus a scale per row).
    assert results[True]["bytes_per_token"] < 0.75 * results[False]["bytes_per_token"]


@needs_int8
def test_generate_with_dense_int8(tiny_checkpoint):
    out = run_cli("generate", str(tiny_checkpoint), "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0",
                  "--dense-int8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_bench_rejects_bad_counts(tiny_checkpoint):
    out = run_cli("bench", str(tiny_checkpoint), "--gen-tokens", "0")
    assert out.returncode == 2 and "--gen-tokens must be at least 1" in out.stderr
