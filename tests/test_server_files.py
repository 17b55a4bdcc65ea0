"""No request can make the server open a file of its choosing: only Gradio uploads and the bundled
examples are opened, and every other path gets one message, whether it exists, is a folder or is missing."""
import json
import tempfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from apphelpers import req, served_app

EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_cell.png"


@pytest.fixture(scope="module")
def server_files():
    """A server PNG, a folder and a missing path, all outside Gradio's upload folder (the test temp root)."""
    d = Path(tempfile.mkdtemp(prefix="ral_server_secret_"))
    Image.new("RGB", (64, 64), (200, 10, 10)).save(d / "secret.png")
    (d / "folder").mkdir()
    yield {"image": str(d / "secret.png"), "folder": str(d / "folder"), "missing": str(d / "nothing.png"),
           "traversal": str(Path(tempfile.gettempdir()) / ".." / d.name / "secret.png")}
    import shutil
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("files_env")
    (d / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAL_MODELS_CONFIG", str(d / "models.yaml"))
        mp.setenv("RAL_SESSIONS_ROOT", tempfile.mkdtemp(prefix="ral_files_sessions_"))
        from app import handlers, training
        yield handlers, training


def _values(path):
    return [path, {"path": path}, {"path": path, "orig_name": "cat.png"}, [{"path": path}]]


@pytest.mark.parametrize("kind", ["image", "folder", "missing", "traversal"])
def test_handlers_refuse_server_paths_with_one_message(app, server_files, kind):
    h, t = app
    from app.uploads import NOT_UPLOADED

    for v in _values(server_files[kind]):
        out = h.run_inspect("tiny-a", v, "Read row 1.", 2, request=req("f1"))
        assert out.status == f"⚠️ {NOT_UPLOADED}" and out.state is not None  # state untouched (gr.update)
        out = h.run_compare("tiny-a", "tiny-a", v, "Read row 1.", 2, request=req("f1"))
        assert out.status == f"⚠️ {NOT_UPLOADED}"
        tr = t.train_start("upload", v, "grpo", "tiny-a", None, 2, 1e-3, 1.0, 4, 2, 1.0, 1.0, "last", 4, 2, 0, "",
                           request=req("f1"))
        assert tr.status == f"⚠️ {NOT_UPLOADED}"


def test_examples_and_uploads_still_open(app, tmp_path):
    h, _ = app
    assert h.run_inspect("tiny-a", str(EXAMPLE), "Read row 1.", 2, request=req("f2")).status == ""
    up = tmp_path / "mine.png"  # under the upload folder: what Gradio stores for a browser upload
    Image.open(EXAMPLE).save(up)
    assert h.run_inspect("tiny-a", {"path": str(up), "orig_name": "mine.png"}, "Read row 1.", 2,
                         request=req("f2")).status == ""
    link = tmp_path / "link.png"  # a link inside the upload folder that points at a server file is refused
    link.symlink_to(EXAMPLE.parents[2] / "README.md")
    assert "uploaded through the page" in h.run_inspect("tiny-a", str(link), "q", 2, request=req("f2")).status


def _call(url, api, data, session="attacker"):
    """The browser's own route (queue/join + queue/data), which takes FileData dicts without `meta` as they come."""
    cfg = httpx.get(f"{url}config", timeout=30).json()
    fn = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == api)
    r = httpx.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                         "event_data": None, "trigger_id": None}, timeout=30)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return (True, msg["output"]["data"]) if msg.get("success") else (False, msg["output"])
    raise AssertionError("no result")


def test_served_endpoints_refuse_raw_paths(tmp_path_factory, tiny_model_dir, server_files):
    """Through the real server, on the browser's route: FileData dicts with and without `meta` and bare strings
    naming a server file, folder or missing path. Gradio refuses some itself (an error event); whatever gets
    through to a handler gets our one message; a server file never comes back."""
    from app.uploads import NOT_UPLOADED

    d = tmp_path_factory.mktemp("files_served")
    with served_app(d, tiny_model_dir) as url:
        ours = 0
        for kind in ("image", "folder", "missing"):
            p = server_files[kind]
            for v in ({"path": p}, {"path": p, "meta": {"_type": "gradio.FileData"}}, p):
                for api, data in (("inspect", ["tiny-a", v, "Read row 1.", 2, False, 1.0, "last", "predicts"]),
                                  ("compare", ["tiny-a", "tiny-a", v, "Read row 1.", 2, False, 1.0, "last",
                                               "predicts"]),
                                  ("train_start", ["upload", v, "grpo", "tiny-a", None, 2, 1e-3, 1.0, 4, 2, 1.0, 1.0,
                                                   "last", 4, 2, 0, ""])):
                    ok, out = _call(url, api, data)
                    if ok:  # reached our handler: refused with the one message, nothing computed
                        assert out[0] == f"⚠️ {NOT_UPLOADED}", (api, kind, v, out[0])
                        ours += 1
                    else:
                        assert out.get("error") is None or "secret" not in str(out["error"])
        print("refused by our handlers:", ours)
