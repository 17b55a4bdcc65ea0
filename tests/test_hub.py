"""Hub models through huggingface_hub's real download code, against a loopback fake of the hub's HTTP API.

The fake serves just what `snapshot_download` / `hf_hub_download` ask for: model info
(`/api/models/{repo}/revision/{rev}`), the file tree (`/api/models/{repo}/tree/{rev}`) and file resolution
(`HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag`, `Content-Length`), plus the hub's error
headers (`X-Error-Code: GatedRepo | RepoNotFound | RevisionNotFound | EntryNotFound`). Downloads run in
subprocesses with `HF_ENDPOINT` pointing at it (huggingface_hub reads it at import), `HF_HUB_OFFLINE=1` as the
Makefile sets it, and a fresh `HF_HOME`.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO = "ral-test/tiny-vlm"


class FakeHub:
    """repo id → {'sha', 'files': {path: bytes}, 'gated'}; every request is logged as (method, path)."""

    def __init__(self):
        self.repos, self.log = {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # Bounded lifetime: however the test session ends, the server stops within 15 minutes.
        self.timer = threading.Timer(900, self.close)
        self.timer.daemon = True
        self.timer.start()

    def close(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo, files: dict, gated=False):
        sha = hashlib.sha1(repo.encode()).hexdigest()  # one 40-hex commit per repo
        self.repos[repo] = {"sha": sha, "files": dict(files), "gated": gated}

    def requested(self, method=None, since=0):
        return [p for m, p in self.log[since:] if method in (None, m)]

    def _serve(self, h, body):
        path = unquote(urlparse(h.path).path)
        self.log.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            r = self._repo(h, repo, rev)
            if r is None:
                return
            if kind == "revision":
                data = {"id": repo, "sha": r["sha"], "private": False, "gated": "manual" if r["gated"] else False,
                        "siblings": [{"rfilename": f} for f in r["files"]]}
            else:
                data = [self._tree_entry(f, b) for f, b in r["files"].items()]
            return self._send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, fname = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            r = self._repo(h, repo, rev, resolve=True)
            if r is None:
                return
            if fname not in r["files"]:
                return self._send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                              "X-Repo-Commit": r["sha"]}, body)
            data = r["files"][fname]
            return self._send(h, 200, data, {"X-Repo-Commit": r["sha"], "ETag": f'"{_etag(fname, data)}"',
                                             "Content-Type": "application/octet-stream"}, body)
        self._send(h, 404, b"not found", {}, body)

    def _repo(self, h, repo, rev, resolve=False):
        r = self.repos.get(repo)
        if r is None:
            self._send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound",
                                                         "X-Error-Message": "Repository not found"}, h.command == "GET")
            return None
        if rev not in ("main", r["sha"]):
            self._send(h, 404, b"Revision not found", {"X-Error-Code": "RevisionNotFound"}, h.command == "GET")
            return None
        if resolve and r["gated"]:  # like the hub: the model card/info is public, the files are not
            self._send(h, 401, b"gated", {"X-Error-Code": "GatedRepo",
                                          "X-Error-Message": "Access to this model is restricted"}, h.command == "GET")
            return None
        return r

    @staticmethod
    def _tree_entry(fname, data):
        e = {"type": "file", "path": fname, "size": len(data), "oid": _git_oid(data)}
        if _is_lfs(fname):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    @staticmethod
    def _send(h, code, data, headers, body):
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


def _is_lfs(fname):
    return fname.endswith((".safetensors", ".bin", ".onnx"))


def _git_oid(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _etag(fname, data):
    return hashlib.sha256(data).hexdigest() if _is_lfs(fname) else _git_oid(data)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def fake_hub(tiny_model_dir):
    """The conftest's tiny Qwen2-VL (saved with save_pretrained) under several repos that each exercise one case."""
    model = _files(tiny_model_dir)
    cfg = json.loads(model["config.json"])
    decoys = {"pytorch_model.bin": b"PICKLE" * 10, "modeling_evil.py": b"raise SystemExit('ran remote code')\n",
              "onnx/model.onnx": b"ONNX" * 10, "onnx/config.json": b"{}", "README.md": b"# tiny\n"}
    hub = FakeHub()
    hub.add(REPO, {**model, **decoys})
    hub.add("ral-test/gated-vlm", model, gated=True)
    remote = {**cfg, "model_type": "moondream1", "auto_map": {"AutoConfig": "hf_moondream.HFMoondreamConfig"}}
    hub.add("ral-test/remote-code", {**model, "config.json": json.dumps(remote).encode(),
                                     "hf_moondream.py": decoys["modeling_evil.py"]})
    hub.add("ral-test/bert", {"config.json": b'{"model_type": "bert"}', "model.safetensors": model["model.safetensors"]})
    hub.add("ral-test/pickles-only", {k: v for k, v in {**model, **decoys}.items() if not k.endswith(".safetensors")})
    yield hub
    hub.close()


def _env(tmp_path, endpoint, allow=None, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "SPACE_ID", "RAL_ALLOW_DOWNLOAD", "HF_HOME",
                                                            "HF_HUB_CACHE", "HF_ENDPOINT")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3",
               OMP_NUM_THREADS="1", RAL_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    if allow is not None:
        env["RAL_ALLOW_DOWNLOAD"] = allow
    return env


RESOLVE = """
import sys
from ral_core import hub
from ral_core.errors import RALError
try:
    print(hub.resolve(sys.argv[1], model_types=sys.argv[2].split(",")))
except RALError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _resolve(spec, env):
    """`hub.resolve` in a fresh process (what load_adapter calls for a hub id): rc, stdout, stderr, seconds."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RESOLVE, spec, "qwen2_vl,idefics3,llava"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.strip(), p.stderr.strip(), time.perf_counter() - t


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_downloads_loads_and_inspects_through_the_fake_hub(fake_hub, task, tmp_path):
    """`ral inspect --model org/name --allow-download` with HF_HUB_OFFLINE=1 set: huggingface_hub downloads the
    data files only (no pickles, no code, no sub-folders), the model loads from the cache and inspects an image."""
    task.sample(2).image.save(tmp_path / "img.png")
    env = _env(tmp_path, fake_hub.url)
    p = subprocess.run([sys.executable, "-m", "ral_core.cli", "inspect", "--model", REPO, "--allow-download",
                        "--image", str(tmp_path / "img.png"), "--question", "What digit is in row 1 column 1?",
                        "--max-new-tokens", "4", "--out", str(tmp_path / "out")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "answer:" in p.stdout
    for f in ("overlay.png", "heads.png", "answer.txt", "result/result.json"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    got = [x.split("/resolve/", 1)[1].split("/", 1)[1] for x in fake_hub.requested("GET") if f"/{REPO}/resolve/" in x]
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert not [x for x in got if x.endswith((".bin", ".py", ".md")) or "/" in x], got  # top-level data only
    snap = next((tmp_path / "hf" / "hub" / "models--ral-test--tiny-vlm" / "snapshots").iterdir())
    assert {"config.json", "model.safetensors"} <= {f.name for f in snap.iterdir()}
    assert not [f for f in snap.rglob("*") if f.suffix in (".bin", ".py", ".onnx")]
    # the progress display ran (huggingface_hub's thread map over the files, on stderr)
    assert "Fetching" in p.stderr

    # Second run: no allow switch, the hub unreachable → served from the cache without a request.
    n = len(fake_hub.log)
    rc, out, err, _ = _resolve(REPO, _env(tmp_path, "http://127.0.0.1:9"))
    assert rc == 0 and Path(out) == snap, err
    assert len(fake_hub.log) == n


def test_offline_without_the_switch_is_one_line_and_sends_nothing(fake_hub, tmp_path):
    n = len(fake_hub.log)
    rc, out, err, _ = _resolve(REPO, _env(tmp_path, fake_hub.url))
    line = _one_line(err)
    assert rc == 2 and "nor in the local Hugging Face cache" in line and "RAL_ALLOW_DOWNLOAD=1" in line
    assert "--allow-download" in line and len(fake_hub.log) == n
    rc, _, err, _ = _resolve(REPO, _env(tmp_path, fake_hub.url, allow="0", SPACE_ID="someone/space"))
    assert rc == 2 and "offline" in _one_line(err) and len(fake_hub.log) == n


@pytest.mark.parametrize("spec,expect", [
    ("ral-test/gated-vlm", ["gated", "accept the licence", "HF_TOKEN", "/ral-test/gated-vlm"]),
    ("ral-test/no-such-model", ["no model 'ral-test/no-such-model' on the hub", "check the id"]),
    (REPO + "@v9", ["has no revision 'v9'"]),
    ("ral-test/remote-code", ["needs its own Python code", "auto_map", "moondream2", "trust_remote_code"]),
    ("ral-test/bert", ["unsupported model family 'bert'"]),
    ("ral-test/pickles-only", ["no complete safetensors weights", "pickled"]),
])
def test_each_download_failure_is_one_line(fake_hub, tmp_path, spec, expect):
    repo = spec.split("@")[0]
    n = len(fake_hub.log)
    rc, out, err, _ = _resolve(spec, _env(tmp_path, fake_hub.url, allow="1"))
    line = _one_line(err)
    assert rc == 2 and all(e in line for e in expect), line
    got = [Path(p).name for p in fake_hub.requested("GET", since=n) if "/resolve/" in p]
    assert not [g for g in got if g.endswith((".py", ".bin"))], got  # never code or pickles, in any case
    if spec in ("ral-test/remote-code", "ral-test/bert", "ral-test/pickles-only"):  # refused before any weights
        assert got == ["config.json"], got
        assert not list((tmp_path / "hf").rglob("*.safetensors"))
    if repo not in fake_hub.repos or "@" in spec or "gated" in spec:
        assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_no_network_is_one_quick_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err, secs = _resolve(REPO, _env(tmp_path, f"http://127.0.0.1:{port}", allow="1"))
    line = _one_line(err)
    assert rc == 2 and line.startswith("error: no network") and "RAL_ALLOW_DOWNLOAD only on a host with internet" in line
    assert "pass its folder" in line and secs < 30


def test_progress_callback_and_cache_reuse_in_process(fake_hub, tmp_path, monkeypatch):
    """The app's path: load_adapter(hub id, allow_download=True, progress=…) in this process, then again offline
    from the cache. huggingface_hub copied HF_ENDPOINT/HF_HOME into module constants at import: patch those."""
    from huggingface_hub import constants

    from ral_core import hub
    from ral_core.models import load_adapter

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("RAL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not hub.listable(REPO) and hub.listable("default")
    seen = []
    a = load_adapter(REPO, allow_download=True, progress=lambda d, n, t: seen.append((d, n, t)))
    assert a.name == REPO and a.num_layers == 3 and constants.HF_HUB_OFFLINE is True  # offline mode restored
    files = [s for s in seen if s[0].startswith("Fetching")]
    assert files and files[-1][1] == files[-1][2] > 0  # every file fetched, reported to the callback
    assert any(d.startswith("Download") and n > 0 for d, n, _ in seen)  # bytes too
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert hub.listable(REPO) and hub.cached_path(REPO)
    assert load_adapter(REPO, dtype="auto").model.dtype.is_floating_point


def test_downloads_allowed_switches(monkeypatch):
    from ral_core import hub

    for k in ("RAL_ALLOW_DOWNLOAD", "SPACE_ID"):
        monkeypatch.delenv(k, raising=False)
    assert not hub.downloads_allowed() and hub.downloads_allowed(True)
    monkeypatch.setenv("SPACE_ID", "someone/space")  # on a Space: on, unless the owner set it to 0
    assert hub.downloads_allowed() and not hub.downloads_allowed(False)
    monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "0")
    assert not hub.downloads_allowed()
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "1")
    assert hub.downloads_allowed()


def test_disk_and_permission_errors_say_what_to_do():
    import errno

    from ral_core import hub

    full = hub.failure_message(OSError(errno.ENOSPC, "No space left on device"), REPO)
    assert "not enough disk space" in full and "HF_HOME" in full
    denied = hub.failure_message(PermissionError(errno.EACCES, "Permission denied"), REPO)
    assert "cannot write" in denied and "Permission denied" in denied and "HF_HOME" in denied


def test_unwritable_cache_is_one_line(fake_hub, tmp_path):
    """A real write failure: HF_HOME below a regular file (root ignores chmod, so a file stands in)."""
    (tmp_path / "file").write_text("x")
    env = _env(tmp_path, fake_hub.url, allow="1")
    env["HF_HOME"] = str(tmp_path / "file" / "hf")
    rc, _, err, _ = _resolve(REPO, env)
    line = _one_line(err)
    assert rc == 2 and "cannot write" in line and "HF_HOME" in line, line


def test_dtype_auto(monkeypatch):
    import torch

    from ral_core.errors import RALError
    from ral_core.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(None) is None
    with pytest.raises(RALError, match="unknown dtype"):
        resolve_dtype("int8")
