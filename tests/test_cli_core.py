"""`gptoss synth` and `gptoss inspect`, run as a user runs them."""

import subprocess
import sys


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
