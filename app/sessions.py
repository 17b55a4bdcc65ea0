"""Per-browser-session private working directories.

Each Gradio session (gr.Request.session_hash) gets `<root>/<sha256(session_hash)[:32]>/`; the folder name is
a hash so it never reveals the session hash, and nothing here takes a path from the browser: callers pass
the request, plus at most a bare checkpoint *name* that is checked against this session's own folder.

Layout (training code can rely on it):
    inspections/<n>/   saved InspectionResults, figures and zips (only the newest KEEP are kept)
    compare/<n>/       comparison figures
    runs/              training runs (for the trainer)
    checkpoints/<name>/ model directories saved with save_pretrained (listed as models for this session)

Folders are deleted when the browser session ends (demo.unload) and swept by age (RAL_SESSION_MAX_AGE_S).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ral_core.errors import RALError

KINDS = ("inspections", "compare", "runs", "checkpoints")
KEEP = 5  # newest work folders kept per kind (bounded disk per session)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_last_sweep = 0.0


def root() -> Path:
    return Path(os.environ.get("RAL_SESSIONS_ROOT") or Path(tempfile.gettempdir()) / "ral_sessions")


def max_age_s() -> float:
    return float(os.environ.get("RAL_SESSION_MAX_AGE_S", 24 * 3600))


def _session_hash(request) -> str:
    h = request if isinstance(request, str) else getattr(request, "session_hash", None)
    if not h:
        raise RALError("no browser session: reload the page")
    return str(h)


def session_key(request) -> str:
    return hashlib.sha256(_session_hash(request).encode()).hexdigest()[:32]


def session_dir(request, create: bool = True) -> Path:
    """This session's private folder (created on first use, mtime refreshed so the age sweep spares it)."""
    d = root() / session_key(request)
    if create:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.utime(d)
        _maybe_sweep()
    return d


def kind_dir(request, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    d = session_dir(request) / kind
    d.mkdir(exist_ok=True)
    return d


def new_work_dir(request, kind: str) -> Path:
    """A fresh numbered folder under `kind`; older ones beyond KEEP are removed."""
    base = kind_dir(request, kind)
    nums = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
    for n in nums[:max(0, len(nums) - KEEP + 1)]:
        shutil.rmtree(base / str(n), ignore_errors=True)
    d = base / str((nums[-1] + 1) if nums else 1)
    d.mkdir()
    return d


def owns(request, path) -> bool:
    """Whether `path` lies inside this session's folder (symlinks resolved)."""
    try:
        return Path(path).resolve().is_relative_to(session_dir(request, create=False).resolve())
    except (OSError, RALError):
        return False


def checkpoints_dir(request) -> Path:
    """Where training saves this session's model folders (save_pretrained); they become `session: <name>`."""
    return kind_dir(request, "checkpoints")


def runs_dir(request) -> Path:
    """Where training keeps this session's run logs and metrics."""
    return kind_dir(request, "runs")


def list_checkpoints(request) -> list[str]:
    """Names of this session's saved model directories (those with a config.json)."""
    d = session_dir(request, create=False) / "checkpoints"
    if not d.is_dir():
        return []
    base = d.resolve()
    return sorted(p.name for p in d.iterdir()
                  if _NAME.match(p.name) and p.resolve().parent == base and (p / "config.json").is_file())


def resolve_checkpoint(request, name: str) -> Path:
    """This session's checkpoint folder called `name`; refuses paths, traversal and other sessions' names."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RALError(f"'{name}' is not a checkpoint name (letters, digits, '.', '_', '-'; no paths)")
    base = (session_dir(request, create=False) / "checkpoints").resolve()
    p = (base / name).resolve()
    if p.parent != base or not (p / "config.json").is_file():
        raise RALError(f"this session has no checkpoint called '{name}'")
    return p


def cleanup(request) -> None:
    """Delete this session's folder (called when the browser session ends)."""
    try:
        shutil.rmtree(session_dir(request, create=False), ignore_errors=True)
    except RALError:
        pass


def sweep(max_age: float | None = None) -> int:
    """Delete session folders untouched for longer than `max_age` seconds; returns how many."""
    max_age = max_age_s() if max_age is None else max_age
    r, n, now = root(), 0, time.time()
    if not r.is_dir():
        return 0
    for d in r.iterdir():
        try:
            if d.is_dir() and re.fullmatch(r"[0-9a-f]{32}", d.name) and now - d.stat().st_mtime > max_age:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        except OSError:
            pass
    return n


def _maybe_sweep(every_s: float = 600.0) -> None:
    global _last_sweep
    if time.time() - _last_sweep > every_s:
        _last_sweep = time.time()
        sweep()
