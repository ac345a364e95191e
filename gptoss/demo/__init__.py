"""The demo model that ships inside gptoss: a small gpt-oss trained by `gptoss.demo.train`.

It has the exact gpt-oss architecture and the real o200k_harmony vocabulary, so everything
that runs the published checkpoints runs it. Its folder (config.json, MXFP4 safetensors,
tokenizer.json, generation_config.json) is stored as one xz archive beside this file and
unpacked once into the cache folder; `demo_model_path()` returns that folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

NAME = "gpt-oss-demo"
ARCHIVE = Path(__file__).with_name(f"{NAME}.tar.xz")


class DemoModelError(RuntimeError):
    """The demo model is missing from this install or could not be unpacked."""


def _cache_root() -> Path:
    from gptoss.cache import cache_root

    return cache_root() / "demo"


def demo_model_path() -> Path:
    """The unpacked demo model folder (unpacked on the first call, atomically)."""
    if not ARCHIVE.exists():
        raise DemoModelError(f"this gptoss install has no demo model ({ARCHIVE.name} is missing); "
                             "pass a model folder instead")
    digest = hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()[:12]
    parent = _cache_root() / digest
    folder = parent / NAME
    if (folder / "config.json").exists():
        return folder
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=parent))
        with tarfile.open(ARCHIVE, "r:xz") as tar:
            tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        try:
            os.replace(staging / NAME, folder)
        except OSError:  # another process unpacked it first
            if not (folder / "config.json").exists():
                raise
        shutil.rmtree(staging, ignore_errors=True)
    except (OSError, tarfile.TarError) as exc:
        raise DemoModelError(f"could not unpack the demo model into {parent}: {exc}; "
                             "set GPTOSS_CACHE to a writable folder") from None
    return folder


def pack(folder: str | Path, archive: str | Path = ARCHIVE) -> Path:
    """Store a model folder as the shipped archive (files at `gpt-oss-demo/NAME`, xz level 9)."""
    folder, archive = Path(folder), Path(archive)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=f"{NAME}/{path.name}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return archive
