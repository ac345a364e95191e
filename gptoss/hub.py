"""Models by name: a Hugging Face Hub id (`openai/gpt-oss-20b`) becomes a folder in the Hub cache.

Resolved with `huggingface_hub`, so the cache is the one transformers and vLLM share and
HF_HOME / HF_HUB_CACHE / HF_TOKEN / HF_HUB_OFFLINE / HF_ENDPOINT mean what they mean there. Only
what gptoss reads is fetched: config, generation config, tokenizer and one weight layout (the
Hugging Face safetensors at the root; `original/` only when the root has none; never `metal/`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json")
MODEL_CONFIGS = ("config.json", "original/config.json")
DISK_MARGIN = 256 * 2**20  # left free after a download


class HubError(RuntimeError):
    """A model name that cannot be resolved: the message says what to do."""


def is_hub_id(name: str | os.PathLike) -> bool:
    """`owner/name` that is not an existing local path."""
    text = os.fspath(name)
    return bool(HUB_ID.match(text)) and not Path(text).exists() and ".." not in text


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (read at call time, not import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), library_name="gptoss")


# -- what to fetch -------------------------------------------------------------------------------

@dataclass
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    fetch: dict[str, int]  # path -> bytes, what gptoss reads
    skip: dict[str, int]  # path -> bytes, the rest of the repository
    cached: set[str] = field(default_factory=set)  # of `fetch`, already complete in the cache

    @property
    def fetch_bytes(self) -> int:
        return sum(self.fetch.values())

    @property
    def missing_bytes(self) -> int:
        return sum(n for p, n in self.fetch.items() if p not in self.cached)

    def summary(self) -> str:
        skipped = sorted({p.split("/")[0] + "/" if "/" in p else p for p in self.skip})
        cached = f", {_size(self.fetch_bytes - self.missing_bytes)} of it already cached" if self.cached else ""
        text = (f"{self.repo_id} ({self.revision}, {self.commit[:7]}): {len(self.fetch)} files, "
                f"{_size(self.fetch_bytes)}{cached}")
        if self.skip:
            text += f"; not fetched: {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''} " \
                    f"({len(self.skip)} files, {_size(sum(self.skip.values()))})"
        return text


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def select_files(sizes: dict[str, int]) -> dict[str, int]:
    """The files gptoss reads: the root's safetensors layout, else `original/`'s."""
    root_weights = [p for p in sizes if "/" not in p and p.endswith(".safetensors")]
    if root_weights:
        wanted = set(root_weights) | {"config.json", "model.safetensors.index.json"}
    else:
        wanted = {p for p in sizes if p.startswith("original/") and "/" not in p[len("original/"):]
                  and (p.endswith(".safetensors") or p.endswith(".json"))}
    wanted |= set(SMALL_FILES)
    return {p: n for p, n in sizes.items() if p in wanted}


def plan_download(repo_id: str, revision: str | None = None) -> DownloadPlan:
    """Ask the Hub what the repository holds (one request), and check it is a gpt-oss checkpoint."""
    from huggingface_hub import try_to_load_from_cache

    revision = revision or "main"
    with _hub_errors(repo_id, revision):
        info = _api().repo_info(repo_id, revision=revision, files_metadata=True)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    fetch = select_files(sizes)
    if not any(p.endswith(".safetensors") for p in fetch) or not any(p in MODEL_CONFIGS for p in fetch):
        raise HubError(f"{repo_id} is not a gpt-oss checkpoint: it has no config.json with safetensors weights "
                       f"(at its root or in original/); gptoss runs openai/gpt-oss-20b, openai/gpt-oss-120b "
                       f"and their fine-tunes")
    plan = DownloadPlan(repo_id, revision, info.sha, fetch, {p: n for p, n in sizes.items() if p not in fetch})
    cache = str(hub_cache())
    for path in fetch:
        if isinstance(try_to_load_from_cache(repo_id, path, cache_dir=cache, revision=info.sha), str):
            plan.cached.add(path)
    return plan


def _check_model_config(repo_id: str, plan: DownloadPlan) -> None:
    """Fetch the (small) config first: a repo that is not gpt-oss is refused before any weights."""
    from gptoss.config import ConfigError, ModelConfig

    name = "config.json" if "config.json" in plan.fetch else "original/config.json"
    path = _fetch_one(plan, name, bar=None)
    try:
        ModelConfig.from_file(path)
    except ConfigError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise HubError(f"{repo_id} is not a gpt-oss checkpoint: its {name} says {reason}") from None


def _check_disk(plan: DownloadPlan) -> None:
    folder = hub_cache()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = plan.missing_bytes
    if need + DISK_MARGIN > free:
        raise HubError(f"{plan.repo_id} needs {_size(need)} more in {folder}, but only {_size(free)} is free; "
                       f"free some space or point HF_HUB_CACHE (or HF_HOME) at a larger disk")


# -- fetching ------------------------------------------------------------------------------------

class _ByteBar:
    """One progress bar for the whole model; each file's download (a tqdm look-alike made by
    huggingface_hub) adds its bytes to it."""

    def __init__(self, description: str, total: int):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task(description, total=total)

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self.task, nbytes)


def _file_bytes(advance):
    """A tqdm look-alike for huggingface_hub to drive while it fetches one file: every byte goes
    to `advance` (the whole model's bar, or nowhere)."""

    class FileBytes:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            if initial:  # bytes kept from a dropped connection
                advance(initial)

        def update(self, n=1):
            advance(n or 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

    return FileBytes


def _fetch_one(plan: DownloadPlan, path: str, bar: _ByteBar | None) -> str:
    from huggingface_hub import hf_hub_download

    with _hub_errors(plan.repo_id, plan.revision):
        # The branch name (not the commit) so that the cache records refs/<revision> for offline use.
        return hf_hub_download(plan.repo_id, path, revision=plan.revision, cache_dir=str(hub_cache()),
                               endpoint=_endpoint(), library_name="gptoss",
                               tqdm_class=_file_bytes(bar.advance if bar else lambda n: None))


def download(repo_id: str, revision: str | None = None, *, progress: bool = True,
             log=lambda line: print(line, file=sys.stderr, flush=True)) -> Path:
    """Fetch what gptoss reads of `repo_id` into the Hub cache (resuming partial files) and return
    the snapshot folder. Offline (HF_HUB_OFFLINE, or the Hub unreachable), the cached snapshot."""
    if _offline():
        return cached_snapshot(repo_id, revision, reason="HF_HUB_OFFLINE is set")
    try:
        plan = plan_download(repo_id, revision)
    except _Unreachable as exc:
        folder = cached_snapshot(repo_id, revision, reason=f"the Hub at {_endpoint()} cannot be reached ({exc})")
        log(f"note: the Hub at {_endpoint()} cannot be reached; using the cached {repo_id} in {folder}")
        return folder
    missing = [p for p in plan.fetch if p not in plan.cached]
    if missing:
        log(f"fetching {plan.summary()}")
        _check_disk(plan)
        configs = [p for p in missing if p in MODEL_CONFIGS]
        if configs:
            _check_model_config(repo_id, plan)
        missing = [p for p in missing if p not in configs]
        started = time.perf_counter()
        bar = _ByteBar(f"Downloading {repo_id}", plan.missing_bytes) if progress else None
        if bar:
            bar.progress.start()
            bar.advance(sum(plan.fetch[p] for p in configs))
        try:
            with ThreadPoolExecutor(max_workers=min(4, max(1, len(missing)))) as pool:
                for _ in pool.map(lambda p: _fetch_one(plan, p, bar), missing):
                    pass
        except KeyboardInterrupt:
            raise HubError(f"download of {repo_id} interrupted; run the same command again to resume it") from None
        except _Unreachable as exc:
            raise HubError(f"the connection to {_endpoint()} was lost while downloading {repo_id} ({exc}); run "
                           f"the same command again to resume") from None
        finally:
            if bar:
                bar.progress.stop()
        seconds = time.perf_counter() - started
        log(f"downloaded {repo_id} ({_size(plan.missing_bytes)} in {seconds:.1f} s)")
    folder = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / plan.commit
    _check_complete(folder, plan.fetch, repo_id)
    return folder


class _Unreachable(Exception):
    pass


def cached_snapshot(repo_id: str, revision: str | None, *, reason: str) -> Path:
    """The cached snapshot of `repo_id` at `revision` (a branch, tag or commit), with no request."""
    revision = revision or "main"
    storage = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    commit = revision
    ref = storage / "refs" / revision
    if ref.exists():
        commit = ref.read_text().strip()
    folder = storage / "snapshots" / commit
    if not (folder / "config.json").exists() and not (folder / "original" / "config.json").exists():
        raise HubError(f"{repo_id} ({revision}) is not in the Hugging Face cache ({hub_cache()}) and {reason}; "
                       f"run `gptoss download {repo_id}` with network access first")
    sizes = {str(p.relative_to(folder)): 0 for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    _check_complete(folder, select_files(sizes), repo_id)
    return folder


def _check_complete(folder: Path, files, repo_id: str) -> None:
    from gptoss.checkpoint import CheckpointError, CheckpointReader, detect_layout

    try:
        weights, _, _ = detect_layout(folder)
        CheckpointReader(weights)
    except CheckpointError as exc:
        raise HubError(f"the cached {repo_id} in {folder} is incomplete ({exc}); run `gptoss download {repo_id}` "
                       f"with network access to finish it") from None


def resolve(name: str | os.PathLike, revision: str | None = None, *, progress: bool = True) -> Path:
    """A local folder as given; a Hub id downloaded (or found in the cache) and its folder."""
    if not is_hub_id(name):
        if revision is not None:
            raise HubError(f"--revision applies to a Hub id (owner/name), and {os.fspath(name)} is a local path")
        return Path(name)
    return download(os.fspath(name), revision, progress=progress)


# -- errors --------------------------------------------------------------------------------------

class _hub_errors:
    """huggingface_hub's exceptions -> one-line HubErrors (and _Unreachable for no network)."""

    def __init__(self, repo_id: str, revision: str):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (HubError, KeyboardInterrupt)):
            return False
        from huggingface_hub import errors

        repo, page = self.repo_id, f"{_endpoint()}/{self.repo_id}"
        if isinstance(exc, errors.GatedRepoError):
            raise HubError(f"{repo} is gated: accept its terms at {page} and set HF_TOKEN to a token of that "
                           f"account (or run `hf auth login`)") from None
        if isinstance(exc, errors.RevisionNotFoundError):
            raise HubError(f"{repo} has no revision {self.revision!r}; give a branch, tag or commit that exists "
                           f"(the default is main)") from None
        if isinstance(exc, errors.RepositoryNotFoundError):
            raise HubError(f"no model {repo} on the Hub ({_endpoint()}): check the name, or set HF_TOKEN if it "
                           f"is private") from None
        if isinstance(exc, errors.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else "an error"
            if status == 401:
                raise HubError(f"the Hub refused access to {repo} (401): set HF_TOKEN to a valid token") from None
            raise HubError(f"the Hub answered {status} for {repo}; try again later") from None
        unreachable = (errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)
        for client in ("httpx2", "httpx"):  # whichever HTTP client this huggingface_hub uses
            try:
                unreachable += (__import__(client).TransportError,)
            except (ImportError, AttributeError):
                pass
        if isinstance(exc, unreachable):
            raise _Unreachable(str(exc) or type(exc).__name__) from None
        if isinstance(exc, OSError):
            raise HubError(f"could not write {repo} into {hub_cache()}: {exc}") from None
        return False


# -- inspecting without downloading ----------------------------------------------------------------

class _RemoteTensors:
    """The tensor table of a checkpoint on the Hub, read from the safetensors headers alone."""

    def __init__(self, entries: dict):
        self.entries = entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries


def remote_footprint(repo_id: str, revision: str | None = None):
    """`gptoss.footprint.Footprint` of a Hub model from its config and safetensors headers (a few
    kB of range requests), so `gptoss inspect NAME` needs no download."""
    import math

    import torch

    from gptoss.checkpoint import _DTYPES, TensorEntry, detect_layout
    from gptoss.footprint import footprint, footprint_of

    if _offline():
        return footprint(cached_snapshot(repo_id, revision, reason="HF_HUB_OFFLINE is set"))
    try:
        plan = plan_download(repo_id, revision)
    except _Unreachable as exc:
        return footprint(cached_snapshot(repo_id, revision, reason=f"the Hub cannot be reached ({exc})"))
    _check_model_config(repo_id, plan)
    name = "config.json" if "config.json" in plan.fetch else "original/config.json"
    folder, layout, config = detect_layout(Path(_fetch_one(plan, name, None)).parent)
    entries = {}
    api = _api()
    for path in sorted(p for p in plan.fetch if p.endswith(".safetensors")):
        with _hub_errors(repo_id, plan.revision):
            header = api.parse_safetensors_file_metadata(repo_id, path, revision=plan.commit)
        for key, info in header.tensors.items():
            dtype = _DTYPES.get(info.dtype)
            if dtype is None:
                raise HubError(f"{repo_id}: tensor {key} in {path} has dtype {info.dtype}, which gpt-oss does not use")
            nbytes = math.prod(info.shape) * torch.empty((), dtype=dtype).element_size()
            entries[key] = TensorEntry(Path(path), dtype, tuple(info.shape), info.data_offsets[0], nbytes)
    return footprint_of(f"{repo_id} on the Hub ({plan.revision}, {plan.commit[:7]})", layout, config,
                        _RemoteTensors(entries))
