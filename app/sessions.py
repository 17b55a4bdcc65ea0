"""Per-browser-session private working directories.

Each Gradio session (gr.Request.session_hash) gets `<root>/<sha256(session_hash)[:32]>/`; the folder name is
a hash so it never reveals the session hash, and nothing here takes a path from the browser: callers pass
the request, plus at most a bare checkpoint *name* that is checked against this session's own folder.

Layout (training code can rely on it):
    inspections/<id>/  saved InspectionResults, figures and zips (the newest KEEP are kept)
    compare/<id>/      comparison figures
    runs/<id>/         training runs (for the trainer)
    checkpoints/<name>/ model directories saved with save_pretrained (listed as models for this session)

Clean-up: a browser page's folder goes when its tab closes (demo.unload) and is never re-created after; a
session that never opened the page (REST / gradio_client calls) goes after RAL_API_SESSION_IDLE_S idle (10 min);
every folder goes after RAL_SESSION_MAX_AGE_S without use (24 h); and when all folders together pass
RAL_SESSIONS_MAX_MB the oldest idle ones are trimmed (re-creatable figures first, a page's checkpoints last).
Folders are 0700 whatever the umask. A session with a training run is never swept.

Work folders get names that are never reused (creation time + randomness, created atomically), so anything keyed by
a folder's path (the render workers' loaded results) can never mistake a new result for an old one. A request holds
its folder (`using`) while it runs: a held folder is never trimmed or swept, nor is one used in the last GRACE_S
(a burst of one session's requests keeps its folders), up to KEEP_MAX per kind.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ral_core import settings
from ral_core.errors import RALError

KINDS = ("inspections", "compare", "runs", "checkpoints")
KEEP = 5  # newest work folders kept per kind (bounded disk per session)
KEEP_MAX = 4 * KEEP  # folders per kind kept even in a burst (held ones aside)
GRACE_S = 30.0  # a work folder used this recently is not trimmed while the kind holds ≤ KEEP_MAX
_LEASES: dict[str, int] = {}  # work folder → requests holding it now
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_last_sweep = 0.0
log = logging.getLogger("ral.app")
_STATE_LOCK = threading.Lock()
_PAGES: OrderedDict[str, float] = OrderedDict()   # session keys that opened the page (have a tab to close)
_ENDED: OrderedDict[str, float] = OrderedDict()   # page sessions whose tab closed: never re-created
_BOUND = 100_000  # remembered keys (oldest forgotten first)
_busy_check = lambda key: False  # noqa: E731 — replaced by training: sessions with a run are never swept


def root() -> Path:
    return settings.get("RAL_SESSIONS_ROOT")


def max_age_s() -> float:
    return settings.get("RAL_SESSION_MAX_AGE_S")


def api_idle_s() -> float:
    return settings.get("RAL_API_SESSION_IDLE_S")


def max_bytes() -> int:
    return int(settings.get("RAL_SESSIONS_MAX_MB") * 2**20)


def set_busy_check(fn) -> None:
    """fn(session_key) → True while that session has a training run (its folder must stay)."""
    global _busy_check
    _busy_check = fn


def _remember(table: OrderedDict, key: str) -> None:
    with _STATE_LOCK:
        table[key] = time.time()
        table.move_to_end(key)
        while len(table) > _BOUND:
            table.popitem(last=False)


def mark_page(request) -> None:
    """This session opened the page in a browser (demo.load): its folder lives until the tab closes."""
    _remember(_PAGES, session_key(request))


def is_page(key: str) -> bool:
    return key in _PAGES


def _mkdir_private(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)  # mkdir's mode is cut by the umask


def signed_in_user(request) -> str | None:
    """The Hugging Face username when the Space has HF sign-in (`hf_oauth: true`) and the visitor signed in.

    Read from the server-side session that Gradio's OAuth routes fill (a signed cookie), never from anything
    the client sends in the request body; expired sign-ins count as signed out."""
    if isinstance(request, str):
        return None
    inner = getattr(request, "request", None)
    try:
        sess = getattr(inner, "session", None)  # starlette asserts when no SessionMiddleware is installed
    except AssertionError:
        return None
    info = sess.get("oauth_info") if isinstance(sess, dict) or hasattr(sess, "get") else None
    if not isinstance(info, dict):
        return None
    exp = info.get("expires_at")
    if isinstance(exp, (int, float)) and exp < time.time():
        return None
    user = (info.get("userinfo") or {}).get("preferred_username")
    return str(user) if user else None


def _session_hash(request) -> str:
    """Who owns the work: 'hf:<username>' for a signed-in visitor (all their tabs share runs and checkpoints),
    else the browser session's hash (chosen by the client: it separates browsers, it authenticates no one)."""
    if isinstance(request, str):  # an owner string handed back (e.g. by a training run)
        if not request:
            raise RALError("no browser session: reload the page")
        return request
    user = signed_in_user(request)
    if user:
        return f"hf:{user}"
    h = getattr(request, "session_hash", None)
    if not h:
        raise RALError("no browser session: reload the page")
    return f"anon:{h}"  # a client that picks the session hash 'hf:alice' still never gets alice's folder


def session_key(request) -> str:
    return hashlib.sha256(_session_hash(request).encode()).hexdigest()[:32]


def session_dir(request, create: bool = True) -> Path:
    """This session's private folder (created on first use, mtime refreshed so the age sweep spares it)."""
    key = session_key(request)
    d = root() / key
    if create:
        if key in _ENDED:
            raise RALError("this browser session has ended; reload the page to start a new one")
        _mkdir_private(root())
        _mkdir_private(d)
        os.utime(d)
        _maybe_sweep()
    return d


def kind_dir(request, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    d = session_dir(request) / kind
    _mkdir_private(d)
    return d


def _unique_name() -> str:
    """Never reused, and sorts by creation time (fixed-width hex nanoseconds, then randomness)."""
    return f"{time.time_ns():016x}-{secrets.token_hex(6)}"


def new_work_dir(request, kind: str) -> Path:
    """A fresh folder under `kind` with a never-reused name (mkdir is the atomic claim); older ones beyond KEEP are
    trimmed unless held or recently used."""
    with new_work(request, kind) as d:
        return d


@contextlib.contextmanager
def new_work(request, kind: str):
    """`new_work_dir`, held for the request (`using`) from before the trim that makes room for it."""
    base = kind_dir(request, kind)
    d = base / _unique_name()
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    with using(d):
        _trim_kind(base, d)
        yield d


@contextlib.contextmanager
def using(path):
    """Hold a work folder while a request reads or writes it: it is never trimmed or swept meanwhile, and its use
    time is refreshed."""
    key = str(Path(path))
    with _STATE_LOCK:
        _LEASES[key] = _LEASES.get(key, 0) + 1
    try:
        with contextlib.suppress(OSError):
            os.utime(key)
        yield Path(path)
    finally:
        with _STATE_LOCK:
            n = _LEASES.pop(key) - 1
            if n:
                _LEASES[key] = n


def _held(path: Path) -> bool:
    return str(path) in _LEASES


def _held_session(key: str) -> bool:
    """Whether a request holds a folder of the session with this folder key."""
    top = str(root() / key)
    with _STATE_LOCK:
        return any(p == top or p.startswith(top + os.sep) for p in _LEASES)


def _trim_kind(base: Path, newest: Path) -> None:
    """Keep the newest KEEP folders of one kind; older ones go unless held, or used in the last GRACE_S while the
    kind holds ≤ KEEP_MAX."""
    try:
        dirs = sorted((p for p in base.iterdir() if p.is_dir() and p != newest), key=lambda p: p.name)
    except OSError:
        return
    old, now = dirs[:max(0, len(dirs) - KEEP + 1)], time.time()
    extra = len(dirs) + 1 - KEEP_MAX  # over the hard cap: the oldest unheld go even if recently used
    for p in old:
        if _held(p):
            continue
        try:
            recent = now - p.stat().st_mtime < GRACE_S
        except OSError:
            continue
        if recent and extra <= 0:
            continue
        shutil.rmtree(p, ignore_errors=True)
        extra -= 1


def owns(request, path) -> bool:
    """Whether `path` lies inside this session's folder (symlinks resolved)."""
    try:
        return Path(path).resolve().is_relative_to(session_dir(request, create=False).resolve())
    except (OSError, RALError):
        return False


def checkpoints_dir(request) -> Path:
    """Where training saves this session's model folders (save_pretrained); they become `session: <name>`."""
    return kind_dir(request, "checkpoints")


def list_checkpoints(request) -> list[str]:
    """Names of this session's saved model directories (those with a config.json)."""
    d = session_dir(request, create=False) / "checkpoints"
    if not d.is_dir():
        return []
    base = d.resolve()
    return sorted(p.name for p in d.iterdir()
                  if _NAME.match(p.name) and p.resolve().parent == base and
                  ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()))


def resolve_checkpoint(request, name: str) -> Path:
    """This session's checkpoint folder called `name`; refuses paths, traversal and other sessions' names."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RALError(f"'{name}' is not a checkpoint name (letters, digits, '.', '_', '-'; no paths)")
    base = (session_dir(request, create=False) / "checkpoints").resolve()
    p = (base / name).resolve()
    if p.parent != base or not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise RALError(f"this session has no checkpoint called '{name}'")
    return p


def cleanup(request) -> None:
    """Delete this session's folder (its tab closed); it is never re-created afterwards. A signed-in user's
    folder outlives the tab (their other tabs and later visits use it) and goes by the age sweep."""
    try:
        if str(_session_hash(request)).startswith("hf:"):
            return
        key = session_key(request)
    except RALError:
        return
    _remember(_ENDED, key)
    with _STATE_LOCK:
        _PAGES.pop(key, None)
    shutil.rmtree(root() / key, ignore_errors=True)


def _size(d: Path) -> int:
    n = 0
    for dirpath, _, files in os.walk(d):
        for f in files:
            try:
                n += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return n


def sweep(max_age: float | None = None) -> int:
    """Delete idle session folders (see the module docstring); returns how many whole folders went."""
    max_age = max_age_s() if max_age is None else max_age
    r, n, now = root(), 0, time.time()
    if not r.is_dir():
        return 0
    live = []
    for d in r.iterdir():
        try:
            if not (d.is_dir() and re.fullmatch(r"[0-9a-f]{32}", d.name)) or _busy_check(d.name) \
                    or _held_session(d.name):
                continue
            idle = now - d.stat().st_mtime
            if idle > max_age or (not is_page(d.name) and idle > api_idle_s()):
                shutil.rmtree(d, ignore_errors=True)
                n += 1
            else:
                live.append((d.stat().st_mtime, d))
        except OSError:
            pass
    n += _trim(sorted(live), now)
    return n


def _trim(live: list[tuple[float, Path]], now: float, min_idle: float = 60.0) -> int:
    """Over the size cap: drop the oldest idle folders' figures, then idle API sessions, then idle pages."""
    cap = max_bytes()
    sizes = {d: _size(d) for _, d in live}
    total = sum(sizes.values())
    if total <= cap:
        return 0
    idle = [d for t, d in live if now - t > min_idle and not _held_session(d.name)]
    n = 0
    for d in idle:  # 1) re-creatable work (inspections, comparisons)
        for kind in ("inspections", "compare"):
            shutil.rmtree(d / kind, ignore_errors=True)
        new = _size(d)
        total -= sizes[d] - new
        sizes[d] = new
        if total <= cap:
            return n
    for pages in (False, True):  # 2) whole idle sessions, API ones first, a page's checkpoints last
        for d in idle:
            if is_page(d.name) == pages and d.exists():
                log.warning("session folders over RAL_SESSIONS_MAX_MB: removing idle session %s", d.name[:8])
                shutil.rmtree(d, ignore_errors=True)
                total -= sizes[d]
                n += 1
                if total <= cap:
                    return n
    return n


def _maybe_sweep(every_s: float = 60.0) -> None:
    global _last_sweep
    if time.time() - _last_sweep > every_s:
        _last_sweep = time.time()
        sweep()


def start_sweeper(every_s: float = 60.0) -> threading.Thread:
    """A daemon thread that sweeps even when no request comes (API sessions then still go after their idle time)."""
    def loop():
        while True:
            time.sleep(every_s)
            try:
                sweep()
            except Exception:  # noqa: BLE001 — a failed sweep must not stop the next one
                log.exception("session sweep failed")
    t = threading.Thread(target=loop, name="ral-session-sweeper", daemon=True)
    t.start()
    return t
