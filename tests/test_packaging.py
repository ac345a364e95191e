"""Install gptoss the way users do: build the wheel, install it into a fresh virtual environment,
and run the demo model from there (an editable install would hide files missing from the wheel).

The wheel carries the CPU kernel library, built at install time: a fresh install with an empty
cache runs the native kernels at once, with no compile before the first token."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 20 * 1024 * 1024
FIRST_TOKEN_SECONDS = 10.0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("gptoss-*.whl")
    return path


def test_wheel_holds_the_demo_model_and_the_kernels_and_stays_small(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "gptoss/demo/gpt-oss-demo.tar.xz" in names
    assert "gptoss/ops/cpu/kernels.cpp" in names
    assert "gptoss/ops/cpu/_kernels.so" in names  # built at install time, not at first use
    assert "gptoss/server/ui/index.html" in names  # the chat page
    # No Python or torch ABI in the library: one wheel per platform.
    assert wheel.name.endswith(".whl") and "-py3-none-" in wheel.name, wheel.name
    size = wheel.stat().st_size
    print(f"\nwheel {wheel.name}: {size / 1e6:.1f} MB")
    assert size < MAX_WHEEL_BYTES


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "venv"
    # The dependencies (torch and the rest) come from this environment; gptoss only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    return python


def test_installed_wheel_runs_the_native_kernels_from_an_empty_cache(venv_python, tmp_path):
    script = ("import gptoss; from gptoss import ops; from gptoss.ops import cpu;"
              "print(gptoss.__file__); print(ops.backend_name()); print(cpu.library_path())")
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache"), "GPTOSS_REQUIRE_KERNELS": "1"}
    env.pop("GPTOSS_KERNELS_LIBRARY", None)
    run = subprocess.run([str(venv_python), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr
    module, backend, library = run.stdout.split()
    print(f"\n{backend} from {library}")
    assert "site-packages" in module and backend.startswith("cpu-")
    assert library.startswith(str(Path(module).parent)), "the kernels came from a build, not from the wheel"
    assert not (tmp_path / "cache" / "ext").exists()  # nothing was compiled


def test_installed_wheel_reaches_the_first_token_quickly(venv_python, tiny_checkpoint, tmp_path):
    """`gptoss generate` on a tiny checkpoint, empty cache: process start to the first output byte."""
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache"), "GPTOSS_REQUIRE_KERNELS": "1"}
    env.pop("GPTOSS_KERNELS_LIBRARY", None)
    gptoss = venv_python.parent / "gptoss"
    start = time.perf_counter()
    process = subprocess.Popen([str(gptoss), "generate", str(tiny_checkpoint), "--prompt", "Hello there",
                                "--temperature", "0", "--max-tokens", "8"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    first = process.stdout.read(1)
    first_token = time.perf_counter() - start
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and first, stderr.decode()
    print(f"\nfirst output {first_token:.2f} s after the process started")
    assert first_token < FIRST_TOKEN_SECONDS


def test_installed_wheel_answers_with_the_demo_model(venv_python, tmp_path):
    python = venv_python
    script = ("import gptoss, sys; from gptoss import LLM; assert 'site-packages' in gptoss.__file__, gptoss.__file__;"
              "r = LLM().chat([{'role': 'user', 'content': 'What is 482 + 391?'}], temperature=0);"
              "print(r.text)")
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert "873" in run.stdout
