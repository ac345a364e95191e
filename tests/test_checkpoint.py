import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss import CheckpointError, ConfigError, Model, ModelConfig
from gptoss.checkpoint import CheckpointReader, checkpoint_key
from gptoss.synth import write_random_checkpoint


@pytest.fixture
def model_copy(tiny_checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def _shard_of(folder, key):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][key]


def _rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_experts_stay_mxfp4_and_tensors_are_memory_mapped(tiny_checkpoint):
    model = Model.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    experts = model.blocks[0].mlp.experts
    assert experts.gate_up_blocks.dtype == torch.uint8 and experts.down_scales.dtype == torch.uint8
    # bf16 on disk and bf16 wanted: the tensor is the file's pages, not a copy.
    reader = CheckpointReader(tiny_checkpoint)
    stored = reader.get("model.embed_tokens.weight")
    assert torch.equal(stored, model.embedding.weight)
    assert not any(p.requires_grad for p in model.parameters())


def _on_a_safetensors_map(t: torch.Tensor) -> bool:
    """Whether the tensor's memory is a mapping of a .safetensors file (Linux /proc/self/maps)."""
    address = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return len(fields) >= 6 and fields[5].endswith(".safetensors")
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_no_mmap_copies_every_tensor_out_of_the_files(tmp_path, layout):
    config = ModelConfig.preset("tiny")
    write_random_checkpoint(tmp_path / "m", config, seed=3, layout=layout)
    mapped = Model.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    copied = Model.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, mmap=False)
    assert _on_a_safetensors_map(mapped.embedding.weight)
    tensors = dict(copied.named_parameters()) | dict(copied.named_buffers())
    assert not [name for name, t in tensors.items() if _on_a_safetensors_map(t)]
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mapped(ids), copied(ids))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="reads /proc/self/smaps (Linux with transparent huge pages)")
def test_weight_maps_ask_for_huge_pages(tmp_path):
    """Every safetensors map carries MADV_HUGEPAGE (VmFlags `hg`), so the pages it reads from disk
    come in 2 MB folios: the experts of a decode step read 1.18x faster from those."""
    write_random_checkpoint(tmp_path / "m", ModelConfig.preset("tiny"), seed=1)
    model = Model.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert _on_a_safetensors_map(model.embedding.weight)
    flags, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line.endswith(".safetensors") and str(tmp_path) in line:
            current = line.split()[-1]
        elif line.startswith("VmFlags:") and current:
            flags[current] = line.split()[1:]
            current = None
    assert flags and all("hg" in f for f in flags.values()), flags


def test_original_layout_splits_fused_qkv():
    config = ModelConfig.preset("tiny")
    assert checkpoint_key("blocks.1.attn.k_proj.weight", "original", config).rows == (64, 96)
    assert checkpoint_key("blocks.1.attn.k_proj.weight", "hf", config).key == "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(KeyError):
        checkpoint_key("blocks.0.mystery", "hf", config)


def test_root_with_only_original_folder_loads(tmp_path):
    config = ModelConfig.preset("tiny")
    write_random_checkpoint(tmp_path / "root" / "original", config, seed=0, layout="original")
    model = Model.from_pretrained(tmp_path / "root", dtype=torch.float32)
    assert model.config == config


def test_missing_tensor_names_it(model_copy):
    key = "model.layers.1.self_attn.sinks"
    _rewrite(_shard_of(model_copy, key), lambda t: t.pop(key))
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.sinks"):
        Model.from_pretrained(model_copy)
    assert index  # the index still names it; the shard decides


def test_unexpected_tensor_names_it_and_its_file(model_copy):
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = _shard_of(model_copy, key)
    _rewrite(shard, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor model\.layers\.0\.extra\.weight in {shard.name}"):
        Model.from_pretrained(model_copy)


def test_wrong_shape_names_tensor_file_and_shapes(model_copy):
    key = "model.layers.0.mlp.experts.down_proj_scales"
    shard = _shard_of(model_copy, key)
    _rewrite(shard, lambda t: t.__setitem__(key, t[key][:, :, :1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"{key} in {shard.name} has shape \[4, 64, 1\], expected \[4, 64, 2\]"):
        Model.from_pretrained(model_copy)


def test_truncated_file_is_named(model_copy):
    shard = _shard_of(model_copy, "lm_head.weight")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated"):
        Model.from_pretrained(model_copy)
    shard.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Model.from_pretrained(model_copy)


def test_missing_shard_and_bad_config(model_copy):
    shard = _shard_of(model_copy, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard.*{shard.name}"):
        Model.from_pretrained(model_copy)
    (model_copy / "config.json").write_text('{"model_type": "gpt_oss", "hidden_size": 30}')
    with pytest.raises(ConfigError, match="hidden_size"):
        Model.from_pretrained(model_copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        Model.from_pretrained(model_copy / "nowhere")


def test_config_that_disagrees_with_tensors(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["num_local_experts"] = 8
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        Model.from_pretrained(model_copy)


LOAD_AND_REPORT = """
import resource, sys, torch
from gptoss import Model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = Model.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
print(base, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_loading_memory_stays_within_budget(tmp_path):
    """Peak RSS while loading stays under 1.2 x checkpoint + 1 GB; loading itself copies nothing."""
    config = ModelConfig(num_hidden_layers=2, num_experts=32, hidden_size=1024, intermediate_size=1024,
                         vocab_size=32768, num_attention_heads=16, num_key_value_heads=2)
    folder = write_random_checkpoint(tmp_path / "m", config, seed=0)
    size_kb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1024
    out = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(folder)], capture_output=True, text=True,
                         check=True, env={**os.environ, "GPTOSS_KERNELS": "reference"})
    base, loaded, after_forward = (int(v) for v in out.stdout.split())
    print(f"checkpoint {size_kb / 1024:.0f} MB; RSS grew {(loaded - base) / 1024:.0f} MB while loading, "
          f"peak {after_forward / 1024:.0f} MB after a forward pass")
    assert loaded - base < 0.2 * size_kb
    assert after_forward < 1.2 * size_kb + 1024 * 1024
