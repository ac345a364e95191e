"""How the CPU kernel library is compiled: shared by setup.py (at install time, without importing
gptoss or torch) and by the fallback build at first use. Standard library only."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("kernels.cpp")
# The source carries its own SIMD targets (one build runs on any x86-64 CPU), so no -march.
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp"]
LDFLAGS = ["-shared", "-fopenmp"]


def source_hash(source: Path = SOURCE) -> str:
    """Identifies a build (kernels.cpp, the parts it includes, the flags); compiled into the library
    as its tag, so a library built from other sources is noticed at load."""
    digest = hashlib.sha256(" ".join(CXXFLAGS + LDFLAGS).encode())
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def compile_library(out: Path, source: Path = SOURCE, compiler: str | None = None) -> None:
    """Compile `source` into the shared library `out`; raises RuntimeError with the compiler's last line."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + f".{os.getpid()}.tmp")
    command = [compiler, *CXXFLAGS, f'-DGPTOSS_SOURCE_HASH="{source_hash(source)}"', str(source), *LDFLAGS,
               "-o", str(partial)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run the C++ compiler {compiler!r} ({e.strerror}); install g++ or clang++, "
                           f"or set CXX") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else result.returncode}")
    os.replace(partial, out)  # atomic: a concurrent process sees no file or the whole new one
