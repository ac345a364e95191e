"""`gptoss serve` as a subprocess on a free loopback port, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from gptoss.engine.distributed import free_port


@contextlib.contextmanager
def serving(arguments: list[str], log_path: Path, startup_timeout: float = 300):
    """Start `gptoss serve ARGUMENTS --port P`, wait for /health, yield (url, proc, log); on exit stop
    it and check that its log holds no traceback."""
    port = free_port()
    command = [sys.executable, "-m", "gptoss.cli", "serve", *arguments, "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not become ready in {startup_timeout}s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield SimpleNamespace(url=url, proc=proc, log=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()
