"""Models by Hub id, against a stand-in for the Hugging Face Hub on loopback (tests/hub_standin.py):
only what gptoss reads is fetched, downloads resume, the cache serves offline, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss import hub
from gptoss.hub import HubError

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn, Repo  # noqa: E402

NAME = "openai/gpt-oss-tiny"


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_checkpoint):
    """The tiny synth checkpoint in the published layout: the HF safetensors at the root, plus an
    `original/` copy and a `metal/` file that gptoss must not download."""
    from gptoss.config import ModelConfig
    from gptoss.synth import write_random_checkpoint
    from gptoss.tokenizer import write_tokenizer_json

    write_tokenizer_json(tiny_checkpoint)
    files = Repo.from_folder(tiny_checkpoint).files
    original = write_random_checkpoint(tmp_path_factory.mktemp("orig") / "o", ModelConfig.preset("tiny"), seed=0,
                                       layout="original")
    files.update({f"original/{p.name}": p.read_bytes() for p in original.iterdir() if p.is_file()})
    files["metal/model.bin"] = b"\0" * 4096
    files["README.md"] = b"# tiny\n"
    return files


@pytest.fixture
def standin(published):
    llama = {"config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
             "model.safetensors": published["model-00001-of-00003.safetensors"]}
    server = HubStandIn({NAME: Repo(dict(published)), "acme/gated-tiny": Repo(dict(published), gated=True),
                         "acme/llama": Repo(llama), "acme/notes": Repo({"README.md": b"hello"})}).start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(standin, tmp_path, monkeypatch):
    """Environment of a user whose HF_ENDPOINT is the stand-in and whose cache is empty."""
    env = {"HF_ENDPOINT": standin.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    return env


def gptoss(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptoss.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def wanted(files) -> set[str]:
    return {p for p in files if "/" not in p and p not in ("README.md", "special_tokens_map.json",
                                                           "tokenizer_config.json")}


def test_download_fetches_only_what_gptoss_reads(standin, hub_env, published, tmp_path):
    out = gptoss("download", NAME, env=hub_env)
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip())
    assert folder == tmp_path / "hf" / "hub" / "models--openai--gpt-oss-tiny" / "snapshots" / Repo({}).commit
    assert sorted(standin.fetched()) == sorted(wanted(published))
    assert {p.name for p in folder.iterdir()} == wanted(published)
    total = sum(len(published[p]) for p in wanted(published))
    # One line before: what will be fetched and what not, with sizes; one bar; one line after.
    assert f"fetching {NAME} (main, 0123456): {len(wanted(published))} files, {total / 1e6:.2f} MB" in out.stderr
    assert "not fetched: README.md, metal/, original/, special_tokens_map.json, tokenizer_config.json" in out.stderr
    assert f"Downloading {NAME}" in out.stderr and f"{total / 1e6:.1f} MB" in out.stderr
    assert f"downloaded {NAME} ({total / 1e6:.2f} MB in" in out.stderr
    Path("test-artifacts").mkdir(exist_ok=True)
    Path("test-artifacts/hub-download.txt").write_text(f"$ gptoss download {NAME}\n{out.stderr}{out.stdout}"
                                                       f"fetched: {sorted(standin.fetched())}\n")
    # A second download finds everything cached and fetches nothing.
    before = len(standin.fetched())
    again = gptoss("download", NAME, env=hub_env)
    assert again.returncode == 0 and len(standin.fetched()) == before and "fetching" not in again.stderr


def test_run_by_name_then_offline_from_the_cache(standin, hub_env):
    out = gptoss("generate", NAME, "--prompt", "Hello", "--max-tokens", "3", "--temperature", "0", env=hub_env)
    assert out.returncode == 0, out.stderr
    online = out.stdout
    assert "fetching" in out.stderr
    seen = len(standin.requests)
    offline = gptoss("generate", NAME, "--prompt", "Hello", "--max-tokens", "3", "--temperature", "0",
                     env={**hub_env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online and len(standin.requests) == seen  # not one request
    # No network at all (nothing listens at the endpoint): the cache, with a note.
    dead = gptoss("generate", NAME, "--prompt", "Hello", "--max-tokens", "3", "--temperature", "0",
                  env={**hub_env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert dead.returncode == 0, dead.stderr
    assert dead.stdout == online and "cannot be reached; using the cached" in dead.stderr


def test_llm_and_model_take_a_hub_id_and_revision(standin, hub_env):
    from gptoss import LLM
    from gptoss.model import Model

    llm = LLM(NAME, progress=False)
    assert llm.path.name == Repo({}).commit and llm.generate("Hi", max_tokens=2, temperature=0).token_ids
    model = Model.from_pretrained(NAME, revision=Repo({}).commit)
    assert model.config.num_hidden_layers == llm.model.config.num_hidden_layers
    with pytest.raises(HubError, match="no revision 'v9'"):
        LLM(NAME, revision="v9")


def resumed_at(byte_range: str | None) -> int:
    assert byte_range and byte_range.startswith("bytes=") and byte_range.endswith("-"), byte_range
    return int(byte_range[6:-1])


def test_a_dropped_connection_resumes_where_it_stopped(standin, hub_env):
    shard = "model-00003-of-00003.safetensors"
    standin.drops[shard] = [25_000_000]  # the connection drops after 25 MB; huggingface_hub retries
    folder = hub.download(NAME, progress=False)
    assert (folder / shard).read_bytes() == standin.repos[NAME].files[shard]
    ranges = [r for m, p, r in standin.requests if m == "GET" and p.endswith(shard)]
    assert len(ranges) == 2 and ranges[0] is None and 0 < resumed_at(ranges[1]) <= 25_000_000


def test_an_interrupted_download_keeps_finished_files_for_the_next_run(standin, hub_env, published):
    """huggingface_hub resumes a file inside one run (above) but drops a partial file when it gives
    up: the next run fetches only the files that were not finished."""
    shard = "model-00003-of-00003.safetensors"
    standin.drops[shard] = [30_000_000] + [0] * 5  # the network goes away for good after 30 MB (6 tries)
    first = gptoss("download", NAME, env=hub_env)
    assert first.returncode == 2 and "Traceback" not in first.stderr
    assert "was lost while downloading" in first.stderr and "run the same command again to resume" in first.stderr
    before = standin.fetched()
    assert set(before) == wanted(published)
    second = gptoss("download", NAME, env=hub_env)
    assert second.returncode == 0, second.stderr
    assert "already cached" in second.stderr
    assert standin.fetched()[len(before):] == [shard]  # nothing else again
    assert (Path(second.stdout.strip()) / shard).read_bytes() == standin.repos[NAME].files[shard]


def test_inspect_reads_only_config_and_headers(standin, hub_env, tiny_checkpoint):
    out = gptoss("inspect", NAME, env=hub_env)
    assert out.returncode == 0, out.stderr
    local = gptoss("inspect", str(tiny_checkpoint))
    # Every figure (parameters, bytes by dtype, bytes per token) is the one the local files give.
    assert out.stdout.splitlines()[1:] == local.stdout.splitlines()[1:]
    assert f"{NAME} on the Hub (main, 0123456)" in out.stdout
    # Safetensors only through range requests of their headers; nothing large.
    for method, path, byte_range in standin.requests:
        if path.endswith(".safetensors") and method == "GET":
            assert byte_range is not None and byte_range.startswith("bytes=")
    assert standin.fetched().count("config.json") == 1
    got = sum(int(r.split("-")[1]) - int(r[6:].split("-")[0]) + 1 for m, p, r in standin.requests
              if m == "GET" and r)
    assert got < 400_000


@pytest.mark.parametrize("name, env, message", [
    ("acme/nothing-here", {}, "no model acme/nothing-here on the Hub"),
    ("acme/gated-tiny", {}, "acme/gated-tiny is gated: accept its terms at"),
    ("acme/llama", {}, "acme/llama is not a gpt-oss checkpoint: its config.json says model_type is 'llama'"),
    ("acme/notes", {}, "acme/notes is not a gpt-oss checkpoint: it has no config.json"),
    (NAME, {"HF_HUB_OFFLINE": "1"}, "is not in the Hugging Face cache"),
    (NAME, {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),
])
def test_errors_are_one_line_saying_what_to_do(standin, hub_env, name, env, message):
    out = gptoss("chat", name, env={**hub_env, **env})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) <= 2, out.stderr
    assert not any(p.endswith(".safetensors") for p in standin.fetched())


def test_revision_that_does_not_exist(standin, hub_env):
    out = gptoss("download", NAME, "--revision", "v2", env=hub_env)
    assert out.returncode == 2 and f"{NAME} has no revision 'v2'" in out.stderr and "Traceback" not in out.stderr


def test_a_gated_repo_with_a_token_downloads(standin, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", standin.token)
    folder = hub.download("acme/gated-tiny", progress=False)
    assert (folder / "config.json").exists()


def test_too_little_disk_is_refused_before_downloading(standin, hub_env, monkeypatch):
    import shutil

    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(HubError, match=r"needs 59\.\d+ MB more in .*, but only 1\.00 MB is free"):
        hub.download(NAME, progress=False)
    assert standin.fetched() == []


def test_local_paths_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("openai/gpt-oss-20b") and not hub.is_hub_id("./model") and not hub.is_hub_id("a/b/c")
    (tmp_path / "openai" / "gpt-oss-20b").mkdir(parents=True)
    assert not hub.is_hub_id("openai/gpt-oss-20b")  # an existing folder wins
    out = gptoss("download", "./model")
    assert out.returncode == 2 and "is not a Hub model id" in out.stderr
    out = gptoss("inspect", str(tmp_path), "--revision", "main")
    assert out.returncode == 2 and "--revision applies to a Hub id" in out.stderr
