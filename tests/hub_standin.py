"""A stand-in for the Hugging Face Hub on loopback: the endpoints `huggingface_hub` calls to list
and download a model repository (repo info, tree, resolve with HEAD and byte ranges), with the
Hub's error headers. Point HF_ENDPOINT at `url`."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse, parse_qs


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)
    gated: bool = False  # files and tree need a token (the Hub's behaviour for gated models)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs) -> "Repo":
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, **kwargs)


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    token: str = "hf_standin_token"
    # path -> for each of its next GETs, the bytes of the body sent before the connection drops
    drops: dict[str, list[int]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def start(self) -> "HubStandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                standin._handle(self, head=True)

            def do_GET(self):
                standin._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> list[str]:
        """Paths whose bytes were requested with GET on the resolve endpoint."""
        return [p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in self.requests
                if m == "GET" and "/resolve/" in p]

    # -- the endpoints ---------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            repo = self._repo(h, repo_id)
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                revision = "/".join(rest[1:]) or "main"
                if self._commit(h, repo, revision) is None:
                    return
                return self._json(h, self._info(repo_id, repo, parse_qs(url.query).get("blobs") == ["true"]))
            if rest[0] == "tree" and len(rest) >= 2:
                if not self._authorized(h, repo_id, repo) or self._commit(h, repo, rest[1]) is None:
                    return
                prefix = "/".join(rest[2:])
                return self._json(h, self._tree(repo, prefix))
            return self._error(h, 404, "EntryNotFound", "no such endpoint")
        if "resolve" in parts and parts.index("resolve") == 2 and len(parts) >= 5:
            repo_id = "/".join(parts[:2])
            repo = self._repo(h, repo_id)
            if repo is None or not self._authorized(h, repo_id, repo):
                return
            commit = self._commit(h, repo, parts[3])
            if commit is None:
                return
            file = "/".join(parts[4:])
            if file not in repo.files:
                return self._error(h, 404, "EntryNotFound", f"{file} does not exist on {parts[3]}")
            return self._file(h, repo, file, head)
        self._error(h, 404, "RepoNotFound", "not found")

    def _repo(self, h, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found")
        return repo

    def _authorized(self, h, repo_id: str, repo: Repo) -> bool:
        if repo.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to "
                                             f"it and be authenticated to access it. Please log in.")
            return False
        return True

    def _commit(self, h, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches or revision == repo.commit:
            return repo.commit
        self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    @staticmethod
    def _oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @staticmethod
    def _lfs(path: str) -> bool:
        return path.endswith((".safetensors", ".bin"))

    def _info(self, repo_id: str, repo: Repo, blobs: bool) -> dict:
        siblings = []
        for path, data in repo.files.items():
            entry = {"rfilename": path}
            if blobs:
                entry.update(size=len(data), blobId=self._oid(data))
                if self._lfs(path):
                    entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": 134}
            siblings.append(entry)
        return {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": repo.commit, "private": False, "gated": "manual" if repo.gated else False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
                "lastModified": "2026-08-05T00:00:00.000Z", "createdAt": "2026-08-05T00:00:00.000Z",
                "siblings": siblings}

    def _tree(self, repo: Repo, prefix: str) -> list[dict]:
        entries, folders = [], set()
        for path, data in repo.files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "oid": self._oid(data), "size": len(data), "path": path}
            if self._lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)] + entries

    def _file(self, h, repo: Repo, path: str, head: bool) -> None:
        data = repo.files[path]
        etag = hashlib.sha256(data).hexdigest() if self._lfs(path) else self._oid(data)
        start, end, status = 0, len(data) - 1, 200
        wanted = h.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and not head:
            first, _, last = wanted[6:].partition("-")
            start = int(first or 0)
            end = min(int(last), len(data) - 1) if last else len(data) - 1
            status = 206
        body = data[start:end + 1]
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", repo.commit)
        if self._lfs(path):
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if head:
            return
        cuts = self.drops.get(path)
        if cuts:  # send part of the body, then drop the connection
            h.wfile.write(body[:cuts.pop(0)])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(body)

    @staticmethod
    def _json(h, payload) -> None:
        body = json.dumps(payload).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def _error(h, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
