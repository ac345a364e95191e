"""`gptoss synth` and `gptoss inspect`, run as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest


def gptoss(*args):
    return subprocess.run([sys.executable, "-m", "gptoss.cli", *args], capture_output=True, text=True)


def test_synth_then_inspect(tmp_path):
    out = gptoss("synth", str(tmp_path / "m"), "--preset", "tiny", "--layers", "3", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert "3 layers" in out.stdout
    info = gptoss("inspect", str(tmp_path / "m"))
    assert info.returncode == 0, info.stderr
    assert "layers      3" in info.stdout and "read per decoded token" in info.stdout
    assert "U8" in info.stdout and "BF16" in info.stdout


def test_synth_original_layout(tmp_path):
    out = gptoss("synth", str(tmp_path / "o"), "--layout", "original")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "config.json").exists()
    assert "original layout" in gptoss("inspect", str(tmp_path / "o")).stdout


def test_inspect_of_a_missing_folder_is_one_clear_line(tmp_path):
    out = gptoss("inspect", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_synth_refuses_to_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    out = gptoss("synth", str(tmp_path / "m"))
    assert out.returncode == 2 and "not empty" in out.stderr
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    out = gptoss("synth", str(tmp_path / "n"), "--layers", "0")
    assert out.returncode == 2 and "--layers" in out.stderr


# -- bad arguments get one clear line, not a traceback --------------------------------------------

def _refused(out, *words):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def test_bad_generate_prompts_are_refused(tiny_checkpoint):
    _refused(gptoss("generate", str(tiny_checkpoint), "--prompt", ""), "--prompt is empty")
    long_prompt = " word" * 5000  # past the tiny preset's context
    _refused(gptoss("generate", str(tiny_checkpoint), "--prompt", long_prompt), "tokens per request")


def test_bad_serve_arguments_are_refused_before_serving(tiny_checkpoint):
    _refused(gptoss("serve", str(tiny_checkpoint), "--port", "70000"), "1 to 65535")
    _refused(gptoss("serve", str(tiny_checkpoint), "--device", "tpu"), "not a torch device")
    import torch
    if not torch.cuda.is_available():
        _refused(gptoss("serve", str(tiny_checkpoint), "--device", "cuda"), "--device cpu")
    _refused(gptoss("serve", str(tiny_checkpoint), "--kv-cache-size", "10"), "holds 16 tokens", "at least")


def test_bench_refuses_more_tokens_than_the_context(tiny_checkpoint):
    from gptoss.config import ModelConfig

    context = ModelConfig.preset("tiny").context_length
    _refused(gptoss("bench", str(tiny_checkpoint), "--prompt-tokens", str(context), "--gen-tokens", "8"),
             f"context of {context} tokens")


def test_bench_reads_its_reference_bandwidth_between_the_decode_steps(tiny_checkpoint):
    """The plain read that decode is compared with is taken beside it (every 8 steps, the median),
    not after the run: a shared machine's bandwidth moves within minutes."""
    import json

    out = gptoss("bench", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "24", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bandwidth_between_steps"] is True
    assert result["measured_bandwidth_gb_per_s"] > 0
    assert result["bandwidth_fraction"] == result["decode_gb_per_s"] / result["measured_bandwidth_gb_per_s"]
    text = gptoss("bench", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "8")
    assert "(median, between the decode steps)" in text.stdout


def test_chat_drops_a_message_that_fails_and_goes_on(tiny_checkpoint):
    """A message too long for the context is refused once; it does not stay in the conversation
    and make every later message fail too."""
    stdin = " word" * 3000 + "\nHello\nHow are you?\n"
    out = subprocess.run([sys.executable, "-m", "gptoss.cli", "chat", str(tiny_checkpoint), "--max-tokens", "4",
                          "--temperature", "0"], input=stdin, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stderr = " ".join(out.stderr.split())  # the console wraps long lines
    assert stderr.count("error:") == 1 and "not added to the conversation" in stderr, out.stderr
    assert out.stdout.count("finish:") == 2  # both later messages were answered


def test_synth_works_offline_with_no_vocabulary_configured(tmp_path):
    """No TIKTOKEN_ENCODINGS_BASE and an empty cache: the vocabulary comes from the demo model's
    tokenizer.json inside the package, so the checkpoint gets its tokenizer.json and runs."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["GPTOSS_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "gptoss.cli", "synth", str(tmp_path / "m")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "tokenizer.json").exists(), out.stdout + out.stderr
    run = subprocess.run([sys.executable, "-m", "gptoss.cli", "generate", str(tmp_path / "m"), "--prompt", "Hi",
                          "--max-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr


def test_serve_on_a_folder_without_a_model_names_the_missing_config(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["GPTOSS_CACHE"] = str(tmp_path / "empty-cache")
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "gptoss.cli", "serve", str(tmp_path / "empty")], capture_output=True,
                         text=True, env=env, timeout=120)
    _refused(out, "config.json")
    assert "vocabulary" not in out.stderr


def test_kernel_builds_are_keyed_by_their_source_and_shared(tmp_path):
    """Two checkouts (or venvs) with the same kernel source use one build: the second start
    compiles nothing."""
    import os
    import shutil

    from gptoss.ops.cpu import build

    copies = []
    for name in ("a", "b"):
        folder = tmp_path / name / "cpu"
        shutil.copytree(build.SOURCE.parent, folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        copies.append(folder)
    assert build.source_hash(copies[0] / "kernels.cpp") == build.source_hash(copies[1] / "kernels.cpp")
    (copies[1] / "attention.h").write_text((copies[1] / "attention.h").read_text() + "\n// changed\n")
    assert build.source_hash(copies[0] / "kernels.cpp") != build.source_hash(copies[1] / "kernels.cpp")
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache"), "GPTOSS_KERNELS_LIBRARY": "build"}
    code = "from gptoss.ops import cpu; assert cpu.available(), cpu.unavailable_reason(); print(cpu.library_path())"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "building" in first.stderr and "building" not in second.stderr
    assert first.stdout == second.stdout


def test_generate_with_no_mmap_gives_the_same_text(tiny_checkpoint):
    """--no-mmap loads copies of the weights: the same greedy completion as the mapped files."""
    runs = [gptoss("generate", str(tiny_checkpoint), "--prompt", "Hi", "--max-tokens", "6", "--temperature", "0",
                   *extra) for extra in ((), ("--no-mmap",))]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout == runs[1].stdout


@pytest.mark.parametrize("extra", [[], ["--no-mmap", "--dense-int8"]])
def test_decode_profile_names_each_projection_and_the_page_sizes(tiny_checkpoint, extra):
    """benchmarks/decode_profile.py, where a decode step's time goes: one row per kind of
    projection (per-call costs show on the small ones), and how much of the weights sits in 2 MB
    pages, for the memory-mapped and the copied (--no-mmap) model."""
    from gptoss.ops import cpu

    if "--dense-int8" in extra and not cpu.dense_int8_supported():
        pytest.skip("this CPU has no AVX-512 VNNI/VBMI")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_profile.py"
    out = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), "--prompt-tokens", "8", "--steps", "2",
                          "--threads", "1", *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    linear = "int8 linear" if extra else "linear"
    for row in (f"| {linear}: q_proj, o_proj |", f"| {linear}: k_proj, v_proj |", "| linear: router |",
                f"| {linear}: lm_head |", "| MXFP4 experts |", "| attention |", "| everything else |"):
        assert row in out.stdout, (row, out.stdout)
    assert "resident in 2 MB pages: file maps" in out.stdout


def test_page_sizes_of_this_process():
    from gptoss.bench import page_sizes

    sizes = page_sizes()
    assert set(sizes) == {"file_gb", "file_2mb_gb", "anon_gb", "anon_2mb_gb"}
    assert 0 <= sizes["file_2mb_gb"] <= sizes["file_gb"] and 0 <= sizes["anon_2mb_gb"] <= sizes["anon_gb"]
    assert sizes["anon_gb"] > 0
