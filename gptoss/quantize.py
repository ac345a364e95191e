"""`gptoss quantize`: a float-expert Hugging Face checkpoint -> the published MXFP4 layout.

Fine-tunes and gptoss's own training write the experts as float matrices in the Hugging Face
dequantized layout (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H], input dimension first).
The published checkpoints store them as MXFP4 along the INPUT dimension:

    gate_up_proj [E, H, 2I] -> transpose [E, 2I, H] -> gate_up_proj_blocks [E, 2I, H/32, 16],
                                                        gate_up_proj_scales [E, 2I, H/32]
    down_proj    [E, I, H]  -> transpose [E, H, I]  -> down_proj_blocks [E, H, I/32, 16],
                                                        down_proj_scales [E, H, I/32]

Biases and every other tensor are copied unchanged (same dtype). The input is read memory-mapped
and written one layer per shard, so memory holds about one layer at a time.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch

from gptoss import mxfp4
from gptoss.checkpoint import HF, CheckpointError, CheckpointReader, ShardedWriter, detect_layout
from gptoss.config import MXFP4_QUANTIZATION_CONFIG, ConfigError

# Files of a Hugging Face model folder that travel with the weights.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json")
# float key suffix -> (blocks suffix, scales suffix)
_EXPERT_MATRICES = {
    "mlp.experts.gate_up_proj": ("mlp.experts.gate_up_proj_blocks", "mlp.experts.gate_up_proj_scales"),
    "mlp.experts.down_proj": ("mlp.experts.down_proj_blocks", "mlp.experts.down_proj_scales"),
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def quantize_checkpoint(in_dir: str | Path, out_dir: str | Path, rule: str = "floor", progress: bool = True) -> Path:
    """Write `out_dir`: the float-expert checkpoint `in_dir` with MXFP4 experts, as published.

    `rule` picks the block scale: "floor" (the OCP spec rule, the one OpenAI's checkpoints use) or
    "ceil" (triton_kernels' default, which never clips a block's maximum). Returns `out_dir`.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if rule not in mxfp4.RULES:
        raise ConfigError(f"unknown MXFP4 scale rule {rule!r}; choose 'floor' (OCP, as published) or 'ceil'")
    folder, reader, config = _open_float_checkpoint(in_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new folder for the quantized checkpoint")
    _check_expert_tensors(reader, config)

    # Shard N holds layer N; the last shard everything outside the layers (embedding, norm, lm_head).
    groups: dict[int, list[str]] = {}
    rest: list[str] = []
    for key in sorted(reader.keys()):
        match = _LAYER_KEY.match(key)
        if match:
            groups.setdefault(int(match.group(1)), []).append(key)
        else:
            rest.append(key)
    shards: list[list[str]] = [groups[n] for n in sorted(groups)] + ([rest] if rest else [])

    created = not out_dir.exists()
    try:
        writer = ShardedWriter(out_dir, num_shards=len(shards))
        items = shards
        if progress:
            from gptoss.progress import track
            items = track(shards, description=f"Quantizing {in_dir.name}")
        for keys in items:
            writer.write_shard(_quantized_shard(reader, keys, rule))
        writer.finish()
        raw = json.loads((folder / "config.json").read_text())
        raw["quantization_config"] = copy.deepcopy(MXFP4_QUANTIZATION_CONFIG)
        (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out_dir / name)
    except BaseException:
        if created:  # never leave half a checkpoint behind in a folder we made
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def quantize_experts(weight: torch.Tensor, rule: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """Float experts [E, in, out] -> MXFP4 (blocks [E, out, in/32, 16], scales [E, out, in/32]).

    One expert at a time, so the float32 working copy is one expert's matrix, not the layer's.
    """
    e, k, n = weight.shape
    blocks = torch.empty(e, n, k // mxfp4.BLOCK, mxfp4.BLOCK // 2, dtype=torch.uint8)
    scales = torch.empty(e, n, k // mxfp4.BLOCK, dtype=torch.uint8)
    for x in range(e):
        blocks[x], scales[x] = mxfp4.quantize(weight[x].T, rule)
    return blocks, scales


def _quantized_shard(reader: CheckpointReader, keys: list[str], rule: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        tensor = reader.get(key)
        suffix = _LAYER_KEY.sub("", key)
        if suffix in _EXPERT_MATRICES:
            prefix = key[: len(key) - len(suffix)]
            blocks_name, scales_name = _EXPERT_MATRICES[suffix]
            out[prefix + blocks_name], out[prefix + scales_name] = quantize_experts(tensor, rule)
        else:
            out[key] = tensor
    return out


def _open_float_checkpoint(in_dir: Path):
    """(weights folder, reader, config) of a Hugging Face checkpoint with float experts, or a clear error."""
    if not in_dir.exists():
        raise CheckpointError(f"{in_dir} does not exist; pass the Hugging Face folder of a float-expert checkpoint "
                              "(config.json and .safetensors with mlp.experts.gate_up_proj / down_proj)")
    if not in_dir.is_dir():
        raise CheckpointError(f"{in_dir} is not a folder; pass the folder holding config.json")
    config_path = in_dir / "config.json"
    if config_path.is_file():
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = None  # detect_layout reports it
        if isinstance(raw, dict):
            for name in ("hidden_size", "intermediate_size"):
                value = raw.get(name)
                if isinstance(value, int) and value % mxfp4.BLOCK:
                    raise ConfigError(f"{config_path}: {name} is {value}, not a multiple of {mxfp4.BLOCK}; MXFP4 "
                                      f"shares one scale per {mxfp4.BLOCK} input values, so these experts cannot be "
                                      "stored as MXFP4 (keep the float checkpoint)")
    folder, layout, config = detect_layout(in_dir)
    if layout != HF:
        raise CheckpointError(f"{folder} holds the original layout, whose experts are always MXFP4: nothing to "
                              "quantize; gptoss quantize reads a Hugging Face folder with float experts")
    reader = CheckpointReader(folder)
    if any(key.endswith(("_proj_blocks", "_proj_scales")) for key in reader.keys()):
        raise CheckpointError(f"{folder} is already MXFP4, nothing to do: it stores the experts as blocks and "
                              "scales, as published; load it directly")
    return folder, reader, config


def _check_expert_tensors(reader: CheckpointReader, config) -> None:
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    want = {"mlp.experts.gate_up_proj": (e, h, 2 * i), "mlp.experts.down_proj": (e, i, h)}
    problems = []
    for layer in range(config.num_hidden_layers):
        for suffix, shape in want.items():
            key = f"model.layers.{layer}.{suffix}"
            entry = reader.entries.get(key)
            if entry is None:
                problems.append(f"missing tensor {key}")
            elif entry.shape != shape:
                problems.append(f"tensor {key} in {entry.file.name} has shape {list(entry.shape)}, "
                                f"expected {list(shape)} ([experts, in, out] as Hugging Face stores them)")
            elif not entry.dtype.is_floating_point:
                problems.append(f"tensor {key} in {entry.file.name} has dtype {entry.dtype}, expected a float type")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(f"{reader.folder} is not a float-expert checkpoint that matches its config.json:"
                              f"\n  {shown}{more}")


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of tensor data in a checkpoint folder (headers only are read)."""
    return sum(entry.nbytes for entry in CheckpointReader(folder).entries.values())


__all__ = ["quantize_checkpoint", "quantize_experts", "checkpoint_bytes", "COPIED_FILES"]
