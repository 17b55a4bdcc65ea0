"""Every `RAL_*` environment variable in one table: name, kind, default and meaning. All code reads them through
`get` (at call time, so a server or a test may change them), and README's table is generated from `SETTINGS`:

    python -m ral_core.settings --markdown

A value that cannot be read is one RALError line naming the variable. An empty value counts as unset. Settings
configure a process from outside; code never writes them to pass a flag to itself."""
from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ral_core.errors import RALError


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str                    # int | float | bool | text | path
    default: Any                 # a value, a function of nothing (read at call time), or None (unset)
    meaning: str
    shown_default: str = ""      # the README's default column where the value is computed
    low: float | None = None     # smallest allowed number
    area: str = "engine"         # engine | server | bench


def _cores() -> int:
    return os.cpu_count() or 1


_ALL = [
    # ---- engine (ral_core, the CLI) ---------------------------------------------------------------------------
    Setting("RAL_ALLOW_DOWNLOAD", "bool", None,
            "download a hub id that is not in the local Hugging Face cache (true/false); unset: only on a Hugging "
            "Face Space (SPACE_ID set)", "unset (Space: on)"),
    Setting("RAL_THREADS", "int", None,
            "torch threads per process: the CLI's, the server's model work, a child training run's",
            "CLI: min(4, cores); server: cores ÷ 2 (1 to 4)", low=1),
    Setting("RAL_MAX_QUESTION_CHARS", "int", 2_000, "longest question in characters (checked before tokenising)",
            low=1),
    Setting("RAL_MAX_QUESTION_TOKENS", "int", 256, "longest question in tokens", low=1),
    Setting("RAL_REQUEST_SECONDS", "float", 10.0,
            "time limit of one request's model work (app; under 0.5 s counts as 0.5 s)", low=0.001),
    Setting("RAL_MAX_DATASET_LINES", "int", 100_000, "most lines of a JSONL data set", low=1),
    Setting("RAL_MAX_LINE_CHARS", "int", 16_384, "longest line of a JSONL data set, in characters", low=1),
    Setting("RAL_ZEROGPU_MAX_STEPS", "int", 40, "ZeroGPU: most training steps of one run", low=1),
    Setting("RAL_ZEROGPU_RUN_SECONDS", "int", 240, "ZeroGPU: declared GPU seconds of one run, all calls together",
            low=1),
    Setting("RAL_ZEROGPU_CALL_SECONDS", "int", 120, "ZeroGPU: ceiling of one GPU call's declared duration", low=1),
    Setting("RAL_ZEROGPU_CHUNK_STEPS", "int", 4, "ZeroGPU: training steps per GPU call", low=1),
    # ---- server (app/) ------------------------------------------------------------------------------------------
    Setting("RAL_HOST", "text", None, "address the server listens on (else GRADIO_SERVER_NAME)", "127.0.0.1",
            area="server"),
    Setting("RAL_PORT", "int", None, "port the server listens on (else GRADIO_SERVER_PORT)", "7860", low=1,
            area="server"),
    Setting("RAL_CONCURRENCY", "int", 32, "requests the server's queue runs at once", low=1, area="server"),
    Setting("RAL_MODELS_CONFIG", "path", None, "YAML list of the models the server offers", "app/models.yaml",
            area="server"),
    Setting("RAL_MODEL_CACHE", "int", 3, "models a server process keeps loaded", low=1, area="server"),
    Setting("RAL_MAX_PIXELS", "int", 2048 * 2048, "most pixels per image a request may ask the model to see",
            "2048² = 4,194,304", low=1, area="server"),
    Setting("RAL_MAX_UPLOAD_MB", "float", 50.0, "largest uploaded data-set zip, in MB (unpacked: 4×)", low=0.001,
            area="server"),
    Setting("RAL_MAX_RUNS", "int", 1, "training runs the server runs at once (the rest wait in its queue)", low=1,
            area="server"),
    Setting("RAL_MAX_QUEUED", "int", 8, "training runs that may wait in the server's queue (more: 'queue full')",
            low=0, area="server"),
    Setting("RAL_MAX_QUEUED_MB", "float", 1024.0, "uploaded data the waiting runs may hold, unpacked, in MB (each is "
            "unpacked only when its run starts)", low=0, area="server"),
    Setting("RAL_SESSIONS_ROOT", "path", lambda: Path(tempfile.gettempdir()) / "ral_sessions",
            "folder of the sessions' work folders (figures, uploads, runs)", "ral_sessions in the temp folder",
            area="server"),
    Setting("RAL_SESSION_MAX_AGE_S", "float", 24 * 3600.0, "a session folder unused this long is removed", low=0,
            area="server"),
    Setting("RAL_API_SESSION_IDLE_S", "float", 600.0,
            "a session that never opened the page (REST / gradio_client) is removed after this idle time", low=0,
            area="server"),
    Setting("RAL_SESSIONS_MAX_MB", "float", 2048.0, "all session folders together; the oldest idle are trimmed",
            low=0, area="server"),
    Setting("RAL_RENDER_WORKERS", "int", _cores, "figure-drawing processes (0: draw in the server process)",
            "CPU cores", low=0, area="server"),
    Setting("RAL_RENDER_NICE", "int", 4, "niceness added to the drawing processes (yield to the server)", low=0,
            area="server"),
    # ---- bench and scripts ---------------------------------------------------------------------------------------
    Setting("RAL_SHOT_STEPS", "int", 8, "app/screenshots.py: training steps of the Train tab screenshot", low=1,
            area="bench"),
    Setting("RAL_ENGINE_COMMIT", "text", None,
            "bench/home_regime.py: the engine commit the records name (else the last commit that changed ral_core/)",
            "git log", area="bench"),
    Setting("RAL_ENGINE_DIR", "path", None, "bench/home_regime.py: the checkout whose engine commit is read",
            "this repo", area="bench"),
]
SETTINGS: dict[str, Setting] = {s.name: s for s in _ALL}
_UNSET = object()


def _parse(s: Setting, raw: str):
    from ral_core.config import parse_bool

    if s.kind == "bool":
        return parse_bool(raw, f"environment variable {s.name}")
    if s.kind in ("int", "float"):
        try:
            v = float(raw) if s.kind == "float" else int(raw.strip())
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or (s.low is not None and v < s.low):
            what = "whole number" if s.kind == "int" else "number"
            floor = "" if s.low is None else f" ≥ {s.low:g}"
            raise RALError(f"environment variable {s.name} must be a {what}{floor}, got {raw[:40]!r}")
        return v
    return Path(raw).expanduser() if s.kind == "path" else raw


def get(name: str, default: Any = _UNSET):
    """The value of environment variable `name` now, parsed by its kind; unset or empty: `default` if given,
    else the declared default (called if it is a function)."""
    s = SETTINGS.get(name)
    if s is None:
        raise KeyError(f"{name} is not declared in ral_core.settings")
    raw = os.environ.get(name, "")
    if raw.strip():
        return _parse(s, raw)
    d = s.default if default is _UNSET else default
    return d() if callable(d) else d


def markdown() -> str:
    """README's table of settings."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in _ALL:
        d = s.shown_default or ("unset" if s.default is None else f"{s.default:g}" if isinstance(s.default, float)
                                else f"{s.default:,}" if isinstance(s.default, int) else str(s.default))
        rows.append(f"| `{s.name}` | {d} | {s.meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m ral_core.settings --markdown")
    sys.stdout.write(markdown())
