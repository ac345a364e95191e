"""Checkpoints on disk: memory-mapped safetensors reading, sharded writing, and the name maps.

The two layouts (Hugging Face root and `original/`) name the same tensors differently; the
tables below map each parameter of `gptoss.model.Model` to its key in either layout.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from gptoss.config import ConfigError, ModelConfig
from gptoss.tokenizer import ENDOFTEXT, STARTOFTEXT


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor and file."""


HF, ORIGINAL = "hf", "original"
LAYOUTS = (HF, ORIGINAL)

# parameter of gptoss.model.Model      Hugging Face key                 original/ key
GLOBAL_KEYS = {
    "embedding.weight":                  ("model.embed_tokens.weight",    "embedding.weight"),
    "norm.weight":                       ("model.norm.weight",            "norm.scale"),
    "lm_head.weight":                    ("lm_head.weight",               "unembedding.weight"),
}
# Inside block N: HF keys start "model.layers.N.", original keys "block.N.".
# "[q]", "[k]", "[v]" name the row ranges of the fused original qkv tensor.
BLOCK_KEYS = {
    "attn_norm.weight":                  ("input_layernorm.weight",              "attn.norm.scale"),
    "attn.q_proj.weight":                ("self_attn.q_proj.weight",             "attn.qkv.weight[q]"),
    "attn.q_proj.bias":                  ("self_attn.q_proj.bias",               "attn.qkv.bias[q]"),
    "attn.k_proj.weight":                ("self_attn.k_proj.weight",             "attn.qkv.weight[k]"),
    "attn.k_proj.bias":                  ("self_attn.k_proj.bias",               "attn.qkv.bias[k]"),
    "attn.v_proj.weight":                ("self_attn.v_proj.weight",             "attn.qkv.weight[v]"),
    "attn.v_proj.bias":                  ("self_attn.v_proj.bias",               "attn.qkv.bias[v]"),
    "attn.o_proj.weight":                ("self_attn.o_proj.weight",             "attn.out.weight"),
    "attn.o_proj.bias":                  ("self_attn.o_proj.bias",               "attn.out.bias"),
    "attn.sinks":                        ("self_attn.sinks",                     "attn.sinks"),
    "mlp_norm.weight":                   ("post_attention_layernorm.weight",     "mlp.norm.scale"),
    "mlp.router.weight":                 ("mlp.router.weight",                   "mlp.gate.weight"),
    "mlp.router.bias":                   ("mlp.router.bias",                     "mlp.gate.bias"),
    "mlp.experts.gate_up_blocks":        ("mlp.experts.gate_up_proj_blocks",     "mlp.mlp1_weight.blocks"),
    "mlp.experts.gate_up_scales":        ("mlp.experts.gate_up_proj_scales",     "mlp.mlp1_weight.scales"),
    "mlp.experts.gate_up_bias":          ("mlp.experts.gate_up_proj_bias",       "mlp.mlp1_bias"),
    "mlp.experts.down_blocks":           ("mlp.experts.down_proj_blocks",        "mlp.mlp2_weight.blocks"),
    "mlp.experts.down_scales":           ("mlp.experts.down_proj_scales",        "mlp.mlp2_weight.scales"),
    "mlp.experts.down_bias":             ("mlp.experts.down_proj_bias",          "mlp.mlp2_bias"),
    # Float experts (fine-tunes, gptoss training): Hugging Face layout only.
    "mlp.experts.gate_up_proj":          ("mlp.experts.gate_up_proj",            None),
    "mlp.experts.down_proj":             ("mlp.experts.down_proj",               None),
}
_BLOCK_PREFIX = {HF: "model.layers.{}.", ORIGINAL: "block.{}."}
_FUSED = re.compile(r"^(.*)\[([qkv])\]$")


@dataclass(frozen=True)
class KeyRef:
    """Where one parameter lives in a checkpoint: a key, and for fused qkv a row range."""

    key: str
    rows: tuple[int, int] | None = None


def checkpoint_key(name: str, layout: str, config: ModelConfig) -> KeyRef:
    """Map a parameter name of the model (e.g. 'blocks.3.attn.q_proj.weight') to its checkpoint key."""
    column = LAYOUTS.index(layout)
    if name in GLOBAL_KEYS:
        return KeyRef(GLOBAL_KEYS[name][column])
    match = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if not match or match.group(2) not in BLOCK_KEYS:
        raise KeyError(f"no checkpoint key is known for parameter {name}")
    layer, local = int(match.group(1)), match.group(2)
    if BLOCK_KEYS[local][column] is None:
        raise CheckpointError(f"the {layout} layout has no tensor for {name}: it stores MXFP4 experts only")
    key = _BLOCK_PREFIX[layout].format(layer) + BLOCK_KEYS[local][column]
    fused = _FUSED.match(key)
    if not fused:
        return KeyRef(key)
    q, kv = config.q_dim, config.kv_dim
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[fused.group(2)]
    return KeyRef(fused.group(1), rows)


# -- reading --------------------------------------------------------------------------------

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one .safetensors header, checking that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {header_len} "
                                  f"bytes in a file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {exc}") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name} claims {end - begin} bytes for shape {list(shape)} "
                                  f"{info['dtype']} ({nbytes} bytes)")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the "
                                  f"file has {size} bytes; download it again")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, nbytes)
    return entries


class CheckpointReader:
    """All tensors of a checkpoint folder, memory-mapped: reading costs no copy."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in self._shard_files():
            for name, entry in read_safetensors_header(file).items():
                if name in self.entries:
                    raise CheckpointError(f"tensor {name} is stored twice: in {self.entries[name].file.name} "
                                          f"and {file.name}")
                self.entries[name] = entry

    def _shard_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
            files = sorted({self.folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) {missing} that are not in {self.folder}")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {self.folder}")
        return files

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> Iterable[str]:
        return self.entries.keys()

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored, backed by the file's pages (copy-on-write)."""
        entry = self.entries[key]
        if entry.file not in self._maps:
            with open(entry.file, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                # Pages this map reads in from disk then come in 2 MB folios, mapped whole: a decode
                # step's experts (four of 32 per layer, each read once) read 27.3 GB/s from those
                # against 20.5 from 4 KB pages and 23.1 from a 4 KB anonymous copy
                # (docs/cpu-kernels.md). Pages already cached keep the size they were read in.
                mapped.madvise(mmap.MADV_HUGEPAGE)
            self._maps[entry.file] = mapped
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._maps[entry.file], dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
        return flat.view(entry.dtype).reshape(entry.shape)

    def release(self, key: str) -> None:
        """Drop the file pages under a tensor that has been copied (a rank's slice): they are read
        again from the file if anything touches them, since nothing ever writes to the map."""
        entry = self.entries[key]
        mapped = self._maps.get(entry.file)
        if mapped is None or entry.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = entry.start - entry.start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, start, entry.start + entry.nbytes - start)


def detect_layout(folder: Path) -> tuple[Path, str, ModelConfig]:
    """(folder holding the weights, layout, config) for a HF root, an `original/` folder, or a root
    that holds only `original/`."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"model path {folder} does not exist (for a model on the Hugging Face Hub, give its id "
                              f"as owner/name, e.g. openai/gpt-oss-20b)")
    if not folder.is_dir():
        raise CheckpointError(f"model path {folder} is not a folder; pass the folder holding config.json")
    if not (folder / "config.json").exists() and (folder / "original" / "config.json").exists():
        folder = folder / "original"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{folder} has no config.json: is it a gpt-oss model folder?")
    config = ModelConfig.from_file(config_path)
    eos = _generation_eos(folder)
    if eos and tuple(eos) != config.eos_token_ids:
        import dataclasses
        config = dataclasses.replace(config, eos_token_ids=tuple(eos))
    raw = json.loads(config_path.read_text())
    layout = HF if isinstance(raw, dict) and ("model_type" in raw or "num_local_experts" in raw) else ORIGINAL
    return folder, layout, config


def with_stored_expert_format(reader: CheckpointReader, layout: str, config: ModelConfig) -> ModelConfig:
    """The config with the expert format the tensors have: MXFP4 blocks or float matrices
    (config.json may not say, or say otherwise)."""
    import dataclasses

    float_key = checkpoint_key("blocks.0.mlp.experts.gate_up_proj", layout, config).key if layout == HF else None
    found = "float" if float_key is not None and float_key in reader else "mxfp4"
    return config if found == config.expert_format else dataclasses.replace(config, expert_format=found)


def _generation_eos(folder: Path) -> list[int] | None:
    """eos_token_id of generation_config.json (beside config.json or, for `original/`, above it)."""
    for candidate in (folder / "generation_config.json", folder.parent / "generation_config.json"):
        if candidate.exists():
            try:
                eos = json.loads(candidate.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise ConfigError(f"{candidate} is not a valid generation config: {exc}") from None
            eos = [eos] if isinstance(eos, int) else eos
            if eos and all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
                return eos
            return None
    return None


# -- writing --------------------------------------------------------------------------------

def write_generation_config(folder: Path, config: ModelConfig) -> None:
    """generation_config.json as the published checkpoints have it (the engine's stop ids)."""
    generation = {"bos_token_id": STARTOFTEXT, "eos_token_id": list(config.eos_token_ids), "pad_token_id": ENDOFTEXT}
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def to_checkpoint_tensors(named: dict[str, torch.Tensor], layout: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Model parameter names -> checkpoint keys, fusing q/k/v for the original layout."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in named.items():
        ref = checkpoint_key(name, layout, config)
        if ref.rows is None:
            out[ref.key] = tensor
        else:
            fused.setdefault(ref.key, []).append((ref.rows[0], tensor))
    for key, parts in fused.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    return out


class ShardedWriter:
    """Writes one safetensors shard per call, then the index: memory holds one shard at a time."""

    def __init__(self, folder: str | Path, num_shards: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._written = 0

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self._written += 1
        name = f"model-{self._written:05d}-of-{self.num_shards:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.folder / name),
                  metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_bytes += tensor.numel() * tensor.element_size()

    def finish(self) -> None:
        if self._written != self.num_shards:
            raise RuntimeError(f"wrote {self._written} shards, announced {self.num_shards}")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


