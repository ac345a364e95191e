"""Float-expert checkpoints (fine-tunes, training) and `gptoss quantize`, checked against transformers.

A float checkpoint stores the experts as Hugging Face's dequantized layout (`gate_up_proj`
[E, H, 2I], `down_proj` [E, I, H]); `gptoss quantize` turns it into the published MXFP4 layout
(quantized along the input dimension). Both must load in gptoss and agree with transformers.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss import Model, ModelConfig, mxfp4, ops
from gptoss.checkpoint import CheckpointError, CheckpointReader
from gptoss.cli import main
from gptoss.config import MXFP4_QUANTIZATION_CONFIG, ConfigError
from gptoss.quantize import COPIED_FILES, quantize_checkpoint
from gptoss.synth import write_random_checkpoint

transformers = pytest.importorskip("transformers")  # a test dependency: installed by .ci/run
from hf_reference import hf_model  # noqa: E402

# As tests/test_model_vs_transformers.py: GQA ratio 2, 4 experts, top-2, a short window.
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, head_dim=16, initial_context_length=4096)
CONFIG = ModelConfig(**BASE, num_hidden_layers=2, num_experts=4, experts_per_token=2, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=16, expert_format="float")
TOL = 1e-4
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}\n', "tokenizer_config.json": '{"model_max_length": 131072}\n',
                   "special_tokens_map.json": "{}\n", "chat_template.jinja": "{{ messages }}\n"}


def _to_float32(folder):
    """Store every float tensor of `folder` as float32 with values bf16 cannot hold (a training run's output)."""
    gen = torch.Generator().manual_seed(5)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for key, value in tensors.items():
            if value.is_floating_point():
                tensors[key] = value.float() * (1 + 2 ** -9 * torch.randn(value.shape, generator=gen))
        save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = sum(e.nbytes for e in CheckpointReader(folder).entries.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def folders(request, tmp_path_factory):
    """(float folder, quantized folder) for experts stored in bf16 or fp32."""
    root = tmp_path_factory.mktemp(f"quantize-{request.param}")
    floats = write_random_checkpoint(root / "float", CONFIG, seed=11)
    if request.param == "fp32":
        _to_float32(floats)
    for name, text in TOKENIZER_FILES.items():
        (floats / name).write_text(text)
    quantized = quantize_checkpoint(floats, root / "mxfp4", progress=False)
    return floats, quantized


def _ids():
    torch.manual_seed(0)
    length = 2 * CONFIG.sliding_window + 37  # longer than the window
    return torch.randint(0, CONFIG.vocab_size, (2, length))


def _compare_with_transformers(folder, label):
    ours = Model.from_pretrained(folder, dtype=torch.float32)
    hf = hf_model(folder)
    ids = _ids()
    with torch.no_grad():
        got, expected = ours(ids), hf(ids).logits
    err = (got - expected).abs().max().item()
    print(f"{label}: max |gptoss - transformers| = {err:.2e} (max |logit| {expected.abs().max():.2f})")
    assert err <= TOL
    return ours, got


def test_synth_float_checkpoint_is_the_hugging_face_layout(folders):
    floats, _ = folders
    raw = json.loads((floats / "config.json").read_text())
    assert "quantization_config" not in raw
    assert ModelConfig.from_file(floats / "config.json").expert_format == "float"
    reader = CheckpointReader(floats)
    e, h, i = CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size
    assert reader.entries["model.layers.1.mlp.experts.gate_up_proj"].shape == (e, h, 2 * i)
    assert reader.entries["model.layers.1.mlp.experts.down_proj"].shape == (e, i, h)
    assert not any(key.endswith(("_blocks", "_scales")) for key in reader.keys())
    with pytest.raises(ValueError, match="original layout stores MXFP4 experts only"):
        write_random_checkpoint(floats.parent / "never", CONFIG, layout="original")


def test_float_checkpoint_matches_transformers(folders):
    floats, _ = folders
    ours, _ = _compare_with_transformers(floats, f"float experts ({floats.parent.name})")
    experts = ours.blocks[0].mlp.experts
    assert not experts.is_mxfp4 and experts.gate_up_proj.dtype == torch.float32
    stored = CheckpointReader(floats).get("model.layers.0.mlp.experts.gate_up_proj")
    assert torch.equal(experts.gate_up_proj, stored.float())  # fp32 storage loads without rounding


def test_quantized_checkpoint_matches_transformers(folders):
    floats, quantized = folders
    ours, got = _compare_with_transformers(quantized, f"quantized MXFP4 ({floats.parent.name})")
    experts = ours.blocks[0].mlp.experts
    assert experts.is_mxfp4 and experts.gate_up_blocks.dtype == torch.uint8 and experts.down_scales.dtype == torch.uint8
    # Quantizing moves the logits, but only by MXFP4 rounding of the experts.
    with torch.no_grad():
        before = Model.from_pretrained(floats, dtype=torch.float32)(_ids())
    drift = ((got - before).norm() / before.norm()).item()
    agree = (got.argmax(-1) == before.argmax(-1)).float().mean().item()
    print(f"quantized vs float logits: relative change {drift:.3f}, argmax agreement {agree:.2f}")
    assert 0 < drift < 0.3


def test_quantized_tensors_are_the_published_format(folders):
    floats, quantized = folders
    src, dst = CheckpointReader(floats), CheckpointReader(quantized)
    e, h, i = CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size
    expected_keys = set()
    for key in src.keys():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            expected_keys |= {key + "_blocks", key + "_scales"}
        else:
            expected_keys.add(key)
            assert dst.entries[key].dtype == src.entries[key].dtype
            assert torch.equal(dst.get(key), src.get(key)), key  # copied unchanged
    assert set(dst.keys()) == expected_keys
    for layer in range(CONFIG.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
            blocks, scales = dst.get(p + name + "_blocks"), dst.get(p + name + "_scales")
            assert blocks.dtype == scales.dtype == torch.uint8
            assert blocks.shape == (*shape[:2], shape[2] // 32, 16) and scales.shape == (*shape[:2], shape[2] // 32)
            weight = src.get(p + name).float().transpose(1, 2)  # [E, out, in]: blocks run along the input
            want_blocks, want_scales = mxfp4.quantize(weight, "floor")
            assert torch.equal(blocks, want_blocks) and torch.equal(scales, want_scales)
            # Back within MXFP4 rounding: below 6x the block scale at most half the widest E2M1 gap
            # (one scale), and a value the floor rule saturates at 6x loses less than two.
            back = mxfp4.dequantize(blocks, scales, torch.float32)
            scale = (2.0 ** (scales.double() - 127)).float().repeat_interleave(32, dim=-1)
            assert ((back - weight).abs() <= 2 * scale).all()
            assert (back - weight).norm() / weight.norm() < 0.15
    index = json.loads((quantized / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected_keys
    assert index["metadata"]["total_size"] == sum(entry.nbytes for entry in dst.entries.values())
    config_in = json.loads((floats / "config.json").read_text())
    config_out = json.loads((quantized / "config.json").read_text())
    assert config_out.pop("quantization_config") == MXFP4_QUANTIZATION_CONFIG
    assert config_out == config_in  # every other field as the input had it
    assert ModelConfig.from_file(quantized / "config.json").expert_format == "mxfp4"
    for name in COPIED_FILES:
        assert (quantized / name).read_bytes() == (floats / name).read_bytes(), name


def test_ceil_rule(folders, tmp_path):
    floats, _ = folders
    out = quantize_checkpoint(floats, tmp_path / "ceil", rule="ceil", progress=False)
    key = "model.layers.0.mlp.experts.down_proj"
    weight = CheckpointReader(floats).get(key).float().transpose(1, 2)
    blocks, scales = mxfp4.quantize(weight, "ceil")
    reader = CheckpointReader(out)
    assert torch.equal(reader.get(key + "_blocks"), blocks) and torch.equal(reader.get(key + "_scales"), scales)
    assert not torch.equal(scales, mxfp4.quantize(weight, "floor")[1])
    with pytest.raises(ConfigError, match="unknown MXFP4 scale rule"):
        quantize_checkpoint(floats, tmp_path / "bad", rule="round")
    assert not (tmp_path / "bad").exists()


# -- the command line --------------------------------------------------------------------------

def test_cli_quantize_prints_one_summary_line(folders, tmp_path):
    floats, _ = folders
    out = subprocess.run([sys.executable, "-m", "gptoss.cli", "quantize", str(floats), str(tmp_path / "q")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "MXFP4" in lines[0] and "floor rule" in lines[0] and " -> " in lines[0], lines
    before = sum(e.nbytes for e in CheckpointReader(floats).entries.values())
    after = sum(e.nbytes for e in CheckpointReader(tmp_path / "q").entries.values())
    assert f"{before:,} -> {after:,} bytes" in lines[0] and after < before
    assert "Traceback" not in out.stderr


def _error_cases(floats, quantized, tmp):
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    original = write_random_checkpoint(tmp / "original", dataclasses.replace(CONFIG, expert_format="mxfp4"),
                                       layout="original")
    odd = tmp / "odd"
    odd.mkdir()
    bad = dict(CONFIG.to_hf_dict(), hidden_size=48)
    (odd / "config.json").write_text(json.dumps(bad))
    return {
        "missing": ([str(tmp / "missing"), str(tmp / "o1")], "does not exist"),
        "already-mxfp4": ([str(quantized), str(tmp / "o2")], "already MXFP4, nothing to do"),
        "original": ([str(original), str(tmp / "o3")], "original layout"),
        "out-not-empty": ([str(floats), str(busy)], "exists and is not empty; choose a new folder"),
        "not-multiple-of-32": ([str(odd), str(tmp / "o4")], "hidden_size is 48, not a multiple of 32"),
    }


@pytest.mark.parametrize("case", ["missing", "already-mxfp4", "original", "out-not-empty", "not-multiple-of-32"])
def test_cli_quantize_errors_are_one_line(folders, tmp_path, capsys, case):
    floats, quantized = folders
    argv, message = _error_cases(floats, quantized, tmp_path)[case]
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptoss quantize: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing half-written
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_cli_quantize_error_has_no_traceback_as_a_process(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gptoss.cli", "quantize", str(tmp_path / "missing"),
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("gptoss quantize: error: ") and len(out.stderr.strip().splitlines()) == 1


def test_cli_synth_float_then_inspect(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "f"), "--experts", "float", "--layers", "1"]) == 0
    assert "float experts" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "f" / "config.json").read_text())
    assert main(["inspect", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert "layers      1" in out and "read per decoded token" in out and "U8" not in out
    assert main(["synth", str(tmp_path / "o"), "--experts", "float", "--layout", "original"]) == 2
    assert "original layout stores MXFP4 experts only" in capsys.readouterr().err


def test_inspect_trusts_the_tensors_over_config_json(folders, tmp_path, capsys):
    """A float folder whose config.json still carries a quantization_config (as some tools leave it)."""
    import shutil

    floats, _ = folders
    folder = tmp_path / "f"
    shutil.copytree(floats, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(raw))
    assert main(["inspect", str(folder)]) == 0
    assert "read per decoded token" in capsys.readouterr().out
    assert not Model.from_pretrained(folder, dtype=torch.float32).blocks[0].mlp.experts.is_mxfp4
    with pytest.raises(CheckpointError, match="does not exist"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "out", progress=False)


# -- every kernel path on float experts ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_experts_cpu_kernels_match_reference(folders, monkeypatch, dtype):
    from gptoss.ops import cpu

    floats, _ = folders
    model = Model.from_pretrained(floats, dtype=dtype)
    assert model.blocks[0].mlp.experts.gate_up_proj.dtype == dtype
    ids = _ids()
    with torch.no_grad():
        fast = model(ids).float()
        cache = model.new_cache(batch_size=2)  # the cached path: prefill then one token at a time
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t:t + 1], cache) for t in range(10, 20)]
        ops.use("reference")
        try:
            ref = model(ids).float()
        finally:
            ops.use(None)
    scale = ref.abs().max().item()
    err = (fast - ref).abs().max().item()
    incremental = (torch.cat(steps, dim=1).float() - fast[:, :20]).abs().max().item()
    print(f"{dtype}: cpu kernels ({'built' if cpu.available() else 'unavailable'}) vs reference: "
          f"max {err:.2e}, incremental vs full {incremental:.2e}, max |logit| {scale:.2f}")
    if dtype == torch.float32:
        assert err <= TOL and incremental <= TOL
    else:
        # bf16: the kernels round at other points than torch; a near tie in the router can then
        # pick another expert at a position, so judge the typical position and the argmax.
        per_position = (fast - ref).abs().amax(-1).flatten()
        assert per_position.median().item() <= 0.03 * scale
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        assert incremental <= 0.1 * scale


def test_float_experts_op_and_gradients():
    """ops.moe_experts on float experts: the CPU entry point equals the reference, and it trains."""
    from gptoss import ops
    from gptoss.ops import cpu, reference

    torch.manual_seed(3)
    e, h, i, n = 4, 64, 96, 9
    gate_up = (torch.randn(e, h, 2 * i) * h ** -0.5).requires_grad_()
    down = (torch.randn(e, i, h) * i ** -0.5).requires_grad_()
    weights = ops.ExpertWeights.from_float(gate_up, torch.randn(e, 2 * i) * 0.1, down, torch.randn(e, h) * 0.1)
    x = torch.randn(n, h)
    idx = torch.stack([torch.randperm(e)[:2] for _ in range(n)])
    wts = torch.softmax(torch.randn(n, 2), -1)
    with torch.no_grad():
        torch.testing.assert_close(cpu.moe_experts(x, idx, wts, weights), reference.moe_experts(x, idx, wts, weights),
                                   rtol=0, atol=0)
    reference.moe_experts(x, idx, wts, weights).square().sum().backward()
    assert gate_up.grad is not None and gate_up.grad.abs().sum() > 0 and down.grad.abs().sum() > 0
