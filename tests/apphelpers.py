"""Shared helpers for the app tests: a launched app on a free local port, fake requests, PNG checks."""
import shutil
import socket
import tempfile
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(d, tiny_model_dir):
    """The real app on 127.0.0.1:<free port>, listing a tiny model and the default one; yields its URL."""
    (d / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\ndefault: default\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAL_MODELS_CONFIG", str(d / "models.yaml"))
        # outside Gradio's upload folder (the test temp root, see conftest), as on a real server
        sess = tempfile.mkdtemp(prefix="ral_test_sessions_")
        mp.setenv("RAL_SESSIONS_ROOT", sess)
        (d / "sessions").unlink(missing_ok=True)
        (d / "sessions").symlink_to(sess)
        from app.main import build_app

        demo = build_app().queue()
        port = free_port()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
            shutil.rmtree(sess, ignore_errors=True)


def req(h):
    return SimpleNamespace(session_hash=h)


def is_png(path):
    with Image.open(path) as im:
        return im.format == "PNG" and im.width > 100
