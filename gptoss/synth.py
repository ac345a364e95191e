"""Random-weight checkpoints with the real names and shapes, for tests and benchmarks.

Every parameter is random (biases, sinks and norm weights included: zeros would hide bugs), at
scales that keep activations finite through every layer. Experts are random MXFP4 codes with
scales chosen so each matrix has about unit gain, or (`config.expert_format == "float"`, Hugging
Face layout only) random bf16 matrices of about unit gain in the dequantized layout that
fine-tunes and `gptoss quantize` start from. Writing streams one layer at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from gptoss import mxfp4
from gptoss.checkpoint import HF, LAYOUTS, ORIGINAL, ShardedWriter, to_checkpoint_tensors, write_generation_config
from gptoss.config import ModelConfig

# RMS of a uniformly random E2M1 code: sqrt(mean(v^2)) over the 16 values.
_E2M1_RMS = math.sqrt(sum(v * v for v in mxfp4.E2M1_VALUES) / 16)


def _normal(gen: torch.Generator, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)


def random_mxfp4(gen: torch.Generator, rows: int, cols: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes with per-block scales near 1/sqrt(cols) gain: (blocks, scales) of [E, rows, cols]."""
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
    exponent = round(math.log2(1.0 / (_E2M1_RMS * math.sqrt(cols))))
    jitter = torch.randint(-1, 1, (experts, rows, cols // 32), generator=gen, dtype=torch.int32)
    scales = (mxfp4.SCALE_BIAS + exponent + jitter).to(torch.uint8)
    return blocks, scales


def layer_tensors(config: ModelConfig, layer: int, seed: int) -> dict[str, torch.Tensor]:
    """One block's parameters, named as in gptoss.model.Model."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer + 1)
    h, e, i = config.hidden_size, config.num_experts, config.intermediate_size
    q, kv = config.q_dim, config.kv_dim
    p = f"blocks.{layer}."
    t = {
        p + "attn_norm.weight": _normal(gen, h, std=0.1, mean=1.0),
        p + "attn.q_proj.weight": _normal(gen, q, h, std=h ** -0.5),
        p + "attn.q_proj.bias": _normal(gen, q, std=0.1),
        p + "attn.k_proj.weight": _normal(gen, kv, h, std=h ** -0.5),
        p + "attn.k_proj.bias": _normal(gen, kv, std=0.1),
        p + "attn.v_proj.weight": _normal(gen, kv, h, std=h ** -0.5),
        p + "attn.v_proj.bias": _normal(gen, kv, std=0.1),
        p + "attn.o_proj.weight": _normal(gen, h, q, std=q ** -0.5),
        p + "attn.o_proj.bias": _normal(gen, h, std=0.1),
        p + "attn.sinks": _normal(gen, config.num_attention_heads, std=1.0),
        p + "mlp_norm.weight": _normal(gen, h, std=0.1, mean=1.0),
        p + "mlp.router.weight": _normal(gen, e, h, std=h ** -0.5),
        p + "mlp.router.bias": _normal(gen, e, std=0.5),
        p + "mlp.experts.gate_up_bias": _normal(gen, e, 2 * i, std=0.1),
        p + "mlp.experts.down_bias": _normal(gen, e, h, std=0.1),
    }
    if config.expert_format == "float":
        # [E, in, out] as Hugging Face stores them (gate and up interleaved on the last axis).
        t[p + "mlp.experts.gate_up_proj"] = _normal(gen, e, h, 2 * i, std=h ** -0.5)
        t[p + "mlp.experts.down_proj"] = _normal(gen, e, i, h, std=i ** -0.5)
        return t
    t[p + "mlp.experts.gate_up_blocks"], t[p + "mlp.experts.gate_up_scales"] = random_mxfp4(gen, 2 * i, h, e)
    t[p + "mlp.experts.down_blocks"], t[p + "mlp.experts.down_scales"] = random_mxfp4(gen, h, i, e)
    return t


def global_tensors(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    h, v = config.hidden_size, config.vocab_size
    return {
        "embedding.weight": _normal(gen, v, h, std=1.0),
        "norm.weight": _normal(gen, h, std=0.1, mean=1.0),
        "lm_head.weight": _normal(gen, v, h, std=h ** -0.5),
    }


def write_random_checkpoint(out: str | Path, config: ModelConfig, seed: int = 0, layout: str = HF,
                            progress: bool = False) -> Path:
    """Write a random-weight checkpoint folder at `out`; one shard per layer plus one for the rest.

    The experts follow `config.expert_format`: MXFP4 blocks and scales, or float matrices (the
    Hugging Face layout only; its config.json then has no quantization_config).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == ORIGINAL and config.expert_format != "mxfp4":
        raise ValueError("the original layout stores MXFP4 experts only; write float experts in the hf layout")
    out = Path(out)
    writer = ShardedWriter(out, num_shards=config.num_hidden_layers + 1)
    # Shard k holds layer k; the last one the embedding, final norm and lm_head.
    shards = range(config.num_hidden_layers + 1)
    if progress:
        from gptoss.progress import track
        shards = track(shards, description=f"Writing {out.name}")
    for shard in shards:
        named = layer_tensors(config, shard, seed) if shard < config.num_hidden_layers else global_tensors(config, seed)
        writer.write_shard(to_checkpoint_tensors(named, layout, config))
    writer.finish()
    config_dict = config.to_hf_dict() if layout == HF else config.to_original_dict()
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    if layout == HF:
        write_generation_config(out, config)
    return out


__all__ = ["write_random_checkpoint", "layer_tensors", "global_tensors", "HF", "ORIGINAL"]
