"""What `python -m app` says while it starts, and a busy port as one line (before the slow imports)."""
from __future__ import annotations

import os
import socket
import sys
import time

from ral_core import settings

_T0 = time.monotonic()


def address() -> tuple[str, int]:
    """RAL_HOST / RAL_PORT, then Gradio's own variables (e.g. on Spaces), then 127.0.0.1:7860."""
    host = settings.get("RAL_HOST") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    return host, settings.get("RAL_PORT") or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)


def say(text: str) -> None:
    """One start-up line with the seconds since the process began (loading takes tens of seconds on 2 cores)."""
    print(f"[{time.monotonic() - _T0:5.1f} s] {text}", file=sys.stderr, flush=True)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closing socket is free
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def busy_port_line(host: str, port: int) -> str:
    return (f"port {port} on {host} is in use: stop the program that holds it, or choose another port, "
            f"e.g. RAL_PORT={port + 1} make demo")


def check_port() -> None:
    """Exit with one line (status 2) when the server's port is taken, before anything slow is loaded."""
    host, port = address()
    if port and port_in_use(host, port):
        print(busy_port_line(host, port), file=sys.stderr)
        raise SystemExit(2)
