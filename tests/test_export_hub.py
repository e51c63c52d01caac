"""`edge-runtime export OWNER/NAME`: the checkpoint downloaded by huggingface_hub, from a local stand-in for the Hub.

The stand-in speaks the part of the Hub's HTTP API that `snapshot_download` uses (read from huggingface_hub 2.x):
the revision's info and recursive tree, HEAD and GET on /resolve/ with the headers the client checks (X-Repo-Commit,
ETag, Content-Length; for LFS files a redirect to another origin, as to the CDN, with X-Linked-Etag and
X-Linked-Size), and the error codes it maps to exceptions. (It sends Range only to resume a file past its first
10 MB chunk, which these files never reach, so the stand-in serves whole files.) Every run gets its own HF_HOME and
HF_HUB_CACHE under tmp_path and no token, so nothing touches the real cache and nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port

REPO = "acme/gemma-4-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GATED = "acme/gemma-4-gated"
# Besides the checkpoint, what a Gemma repo on the Hub may also hold and export never reads.
EXTRAS = {"README.md": b"# a model card\n", "original/params.json": b"{}", "onnx/model.safetensors": b"\0" * 4096}


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False

    def is_lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")


@dataclass
class HubStandIn:
    """The Hub's API on one port and its "CDN" on another (a different origin, so the client follows no redirect
    to it and sends it no token), both answering from `repos`; every request is logged as (method, path)."""

    repos: dict[str, Repo]
    hub: str = ""
    cdn: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)  # CDN files whose first GET stops halfway

    def files_asked_for(self) -> set[str]:
        """Repo files whose metadata or bytes were requested, from the Hub or the CDN."""
        by_sha = {_sha256(data): name for repo in self.repos.values() for name, data in repo.files.items()}
        return {path.split("/resolve/")[1].split("/", 1)[1] if "/resolve/" in path else by_sha[path[len("/cdn/"):]]
                for _, path in self.requests if "/resolve/" in path or path.startswith("/cdn/")}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(state: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def error(self, status: int, code: str, body: bool) -> None:
            self.send(status, {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"},
                      json.dumps({"error": code}).encode(), body)

        def answer(self, body: bool) -> None:
            path = self.path.split("?")[0]
            state.requests.append((self.command, path))
            if match := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
                return self.cdn(match.group(1), body)
            match = (re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                     or re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path))
            if not match or match.group(1) not in state.repos:
                return self.error(404 if match else 400, "RepoNotFound", body)
            repo = state.repos[match.group(1)]
            revision = match.group(3) if path.startswith("/api/") else match.group(2)
            if revision not in ("main", COMMIT):
                return self.error(404, "RevisionNotFound", body)
            if path.startswith("/api/"):
                return self.api(match.group(1), repo, match.group(2), body)
            return self.resolve(repo, match.group(3), body)

        def api(self, repo_id: str, repo: Repo, what: str, body: bool) -> None:
            if what == "revision":
                info = {"id": repo_id, "sha": COMMIT, "gated": "manual" if repo.gated else False,
                        "siblings": [{"rfilename": name} for name in repo.files]}
                return self.send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
            folders = sorted({name.rsplit("/", 1)[0] for name in repo.files if "/" in name})
            tree = [{"type": "directory", "oid": _sha1(f.encode()), "path": f} for f in folders]
            for name, data in repo.files.items():
                entry = {"type": "file", "oid": _sha1(data), "size": len(data), "path": name}
                if repo.is_lfs(name):
                    entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            self.send(200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)

        def resolve(self, repo: Repo, name: str, body: bool) -> None:
            if repo.gated:
                return self.error(401, "GatedRepo", body)
            if name not in repo.files:
                return self.error(404, "EntryNotFound", body)
            data = repo.files[name]
            if repo.is_lfs(name):
                self.send(302, {"Location": f"{state.cdn}/cdn/{_sha256(data)}", "X-Repo-Commit": COMMIT,
                                "X-Linked-Etag": f'"{_sha256(data)}"', "X-Linked-Size": str(len(data))}, b"", body)
            else:
                self.send(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha1(data)}"'}, data, body)

        def cdn(self, sha256: str, body: bool) -> None:
            data = next(d for repo in state.repos.values() for d in repo.files.values() if _sha256(d) == sha256)
            if body and sha256 in state.cut_once:
                state.cut_once.discard(sha256)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            self.send(200, {"ETag": f'"{sha256}"'}, data, body)

    return Handler


@contextmanager
def hub_stand_in(repos: dict[str, Repo]) -> Iterator[HubStandIn]:
    state = HubStandIn(repos)
    servers = [ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(state)) for _ in range(2)]
    state.hub, state.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield state
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def checkpoint_repo(checkpoint: Path) -> Repo:
    return Repo({p.name: p.read_bytes() for p in sorted(checkpoint.iterdir())} | EXTRAS)


def cli(tmp_path: Path, *args: str, endpoint: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`edge-runtime ARGS` with a Hugging Face home of its own, no token and no proxy, speaking to `endpoint`
    (default: a local port nothing listens on, which is what a machine without network sees)."""
    endpoint = endpoint or f"http://127.0.0.1:{free_port()}"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "HUGGING")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    clean.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_ENDPOINT=endpoint,
                 HF_HUB_DISABLE_TELEMETRY="1", EDGE_RUNTIME_CACHE=str(tmp_path / "cache"), NO_PROXY="127.0.0.1", **env)
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True, timeout=300,
                          env=clean, cwd=tmp_path)


def snapshot(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / "models--acme--gemma-4-tiny" / "snapshots" / COMMIT


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.rstrip("\n")


def test_export_by_repo_id_downloads_only_what_export_reads(checkpoints, artifacts, tmp_path):
    source = checkpoints["shared-mqa-wide"]
    repo = checkpoint_repo(source)
    with hub_stand_in({REPO: repo}) as hub:
        cut = _sha256(repo.files["model-00002-of-00020.safetensors"])
        hub.cut_once.add(cut)
        result = cli(tmp_path, "export", REPO, "-o", "art", endpoint=hub.hub)
        assert result.returncode == 0, result.stderr
        assert result.stderr.endswith("wrote art\n")
        downloaded = {p.name for p in snapshot(tmp_path).iterdir()}
        assert downloaded == {p.name for p in source.iterdir()}
        for name in downloaded:
            assert (snapshot(tmp_path) / name).read_bytes() == (source / name).read_bytes()
        assert hub.files_asked_for() == downloaded
        # The connection dropped halfway through a file was retried.
        assert [method for method, path in hub.requests if path == f"/cdn/{cut}"] == ["GET", "GET"]
        # The same artifact as exporting the directory itself.
        files = json.loads((tmp_path / "art" / "manifest.json").read_text())["files"]
        assert files == json.loads((artifacts["shared-mqa-wide"] / "manifest.json").read_text())["files"]

        # Again, into the models directory: the cache answers, only the revision is asked for.
        hub.requests.clear()
        again = cli(tmp_path, "export", REPO, "--revision", "main", "--name", "tiny", endpoint=hub.hub)
        assert again.returncode == 0, again.stderr
        assert again.stderr == f"wrote {tmp_path / 'cache' / 'models' / 'tiny'}; use it with -m tiny\n"
        assert hub.requests == [("GET", f"/api/models/{REPO}/revision/main")]

    # The Hub gone: offline mode finds the complete snapshot in the cache.
    offline = cli(tmp_path, "export", REPO, "-o", "offline-art", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert json.loads((tmp_path / "offline-art" / "manifest.json").read_text())["files"] == files
    # An incomplete snapshot is not exported from.
    (snapshot(tmp_path) / "model-00007-of-00020.safetensors").unlink()
    cache = tmp_path / "hf" / "hub"
    assert one_line_error(cli(tmp_path, "export", REPO, "-o", "never", HF_HUB_OFFLINE="1")) == (
        f"error: {REPO}: cannot reach the Hugging Face Hub (offline mode is on (HF_HUB_OFFLINE)), and it is not "
        f"complete in the Hugging Face cache ({cache}); connect and run this again (files already downloaded are "
        "kept), or pass a local checkpoint directory instead")
    assert not (tmp_path / "never").exists()


def test_hub_errors_are_one_line_with_what_to_do(checkpoints, tmp_path):
    repos = {REPO: checkpoint_repo(checkpoints["shared-gqa"]), GATED: Repo({"config.json": b"{}"}, gated=True)}
    with hub_stand_in(repos) as hub:
        assert one_line_error(cli(tmp_path, "export", "acme/nothing", "-o", "out", endpoint=hub.hub)) == (
            "error: acme/nothing: no such local directory, and no such repo on the Hugging Face Hub (or it is "
            "private: log in with `hf auth login` or set HF_TOKEN); check the id, or pass a local checkpoint "
            "directory instead")
        assert one_line_error(cli(tmp_path, "export", REPO, "--revision", "v9", "-o", "out", endpoint=hub.hub)) == (
            f"error: {REPO} has no revision 'v9' on the Hugging Face Hub; pass an existing branch, tag or commit "
            "with --revision, or pass a local checkpoint directory instead")
        assert one_line_error(cli(tmp_path, "export", GATED, "-o", "out", endpoint=hub.hub)) == (
            f"error: {GATED} is gated: accept its terms on https://huggingface.co/{GATED} and log in with "
            "`hf auth login` (or set HF_TOKEN), or pass a local checkpoint directory instead")
        # A destination export would refuse is refused before the download, not after it.
        hub.requests.clear()
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "notes.txt").write_text("mine")
        assert one_line_error(cli(tmp_path, "export", REPO, "-o", "taken", endpoint=hub.hub)) == (
            "error: taken: already exists; choose another path or pass --force to replace it (only an edge-runtime "
            "artifact is ever replaced)")
        assert hub.requests == [] and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    cache = tmp_path / "hf" / "hub"
    # No Hub listening: what a machine without network sees.
    assert one_line_error(cli(tmp_path, "export", REPO, "-o", "out")) == (
        f"error: {REPO}: cannot reach the Hugging Face Hub (no network?), and it is not complete in the Hugging Face "
        f"cache ({cache}); connect and run this again (files already downloaded are kept), or pass a local "
        "checkpoint directory instead")
    assert one_line_error(cli(tmp_path, "export", REPO, "--revision", "v2", "-o", "out", HF_HUB_OFFLINE="1")) == (
        f"error: {REPO} at revision v2: cannot reach the Hugging Face Hub (offline mode is on (HF_HUB_OFFLINE)), and "
        f"it is not complete in the Hugging Face cache ({cache}); connect and run this again (files already "
        "downloaded are kept), or pass a local checkpoint directory instead")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (("export", "missing/dir/ckpt", "-o", "out"),
     ("error: missing/dir/ckpt: no such checkpoint directory, and not a Hugging Face repo id (owner/name); pass a "
     "local checkpoint directory (config.json + safetensors) or a repo id such as google/gemma-4-E2B-it")),
    (("export", "ckpt", "--revision", "main", "-o", "out"),
     ("error: --revision main: ckpt is a local directory; --revision applies only to a Hugging Face repo id "
     "(owner/name)")),
    (("export", "ckpt", "-o", "out", "--name", "x"),
     ("error: give -o OUT (an artifact directory to create) or --name NAME (in the models directory, for -m NAME), "
     "not both or none")),
    (("export", "ckpt"),
     ("error: give -o OUT (an artifact directory to create) or --name NAME (in the models directory, for -m NAME), "
     "not both or none")),
    (("export", "ckpt", "--name", "../x"),
     ("error: --name '../x': a model name has no '/' and does not start with '.'; pass -o PATH to export anywhere "
     "else")),
])
def test_bad_sources_and_destinations(tmp_path, args, message):
    (tmp_path / "ckpt").mkdir()
    assert one_line_error(cli(tmp_path, *args)) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_huggingface_hub_is_one_line(monkeypatch):
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.export.hub import checkpoint_dir

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(EdgeRuntimeError) as caught:
        checkpoint_dir("acme/gemma-4-tiny")
    assert str(caught.value) == ("downloading acme/gemma-4-tiny needs huggingface_hub: pip install "
                                 "'edge-runtime[export]', or pass a local checkpoint directory instead")
