"""Install gptoss the way users do: build the wheel, install it into a fresh virtual environment,
and run the demo model from there (an editable install would hide files missing from the wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("gptoss-*.whl")
    return path


def test_wheel_holds_the_demo_model_and_the_kernel_source_and_stays_small(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "gptoss/demo/gpt-oss-demo.tar.xz" in names
    assert "gptoss/ops/cpu/kernels.cpp" in names
    size = wheel.stat().st_size
    print(f"\nwheel {wheel.name}: {size / 1e6:.1f} MB")
    assert size < MAX_WHEEL_BYTES


def test_installed_wheel_answers_with_the_demo_model(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The dependencies (torch and the rest) come from this environment; gptoss only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    script = ("import gptoss, sys; from gptoss import LLM; assert 'site-packages' in gptoss.__file__, gptoss.__file__;"
              "r = LLM().chat([{'role': 'user', 'content': 'What is 482 + 391?'}], temperature=0);"
              "print(r.text)")
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert "873" in run.stdout
