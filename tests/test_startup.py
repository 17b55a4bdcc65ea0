"""`python -m app` (what `make demo` runs) on a busy port says so in one line at once; a start says what it loads
and when it is ready."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path, port):
    env = dict(os.environ, RAL_PORT=str(port), RAL_HOST="127.0.0.1", RAL_SESSIONS_ROOT=str(tmp_path / "sessions"),
               RAL_RENDER_WORKERS="1", PYTHONUNBUFFERED="1")
    env.pop("GRADIO_SERVER_PORT", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_busy_port_is_one_line(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=_env(tmp_path, port), capture_output=True,
                           text=True, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert f"port {port} on 127.0.0.1 is in use" in lines[0] and f"RAL_PORT={port + 1}" in lines[0]
    assert "Traceback" not in p.stderr + p.stdout and time.monotonic() - t0 < 30  # before the slow imports


@pytest.mark.slow
def test_start_up_says_what_it_loads_and_when_it_is_ready(tmp_path):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=_env(tmp_path, port), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    said = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line and p.poll() is not None:
                break
            said.append(line.strip())
            if "ready:" in line:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it serves when it says so
                break
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    text = "\n".join(said)
    assert "starting the RAL workbench" in said[0], text
    order = ["starting the RAL workbench", "starting the figure workers", "building the page", "ready: open "
             f"http://127.0.0.1:{port}"]
    found = [next(i for i, s in enumerate(said) if o in s) for o in order]
    assert found == sorted(found), text
