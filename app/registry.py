"""Server-side model list (names → paths, from app/models.yaml or $RAL_MODELS_CONFIG), a small per-process
LRU of loaded adapters, and one lock around model use (one process serves every browser session)."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import yaml

from ral_core.errors import RALError

from app import sessions

DEFAULT_CONFIG = Path(__file__).with_name("models.yaml")
SESSION_PREFIX = "session: "  # choices for the browser session's own checkpoints (training writes them)
MODEL_LOCK = threading.RLock()  # generation/capture are not re-entrant per model and share CPU threads
_CACHE: OrderedDict[str, object] = OrderedDict()
CACHE_SIZE = int(os.environ.get("RAL_MODEL_CACHE", "3"))


def config_path() -> Path:
    return Path(os.environ.get("RAL_MODELS_CONFIG") or DEFAULT_CONFIG)


def configured_models() -> dict[str, str]:
    """name → spec for load_adapter, in file order; 'default' is put first when the file does not list it."""
    path = config_path()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RALError(f"cannot read the model list '{path}': {e}") from None
    if not isinstance(raw, dict):
        raise RALError(f"the model list '{path}' must map names to paths")
    out = {} if "default" in raw else {"default": "default"}
    for name, spec in raw.items():
        spec = str(spec)
        if spec != "default" and not Path(spec).is_absolute() and (path.parent / spec).exists():
            spec = str((path.parent / spec).resolve())
        out[str(name)] = spec
    return out


def initial_model() -> str:
    """The preselected model: the first one listed."""
    return next(iter(configured_models()))


def model_choices(request=None) -> list[str]:
    names = list(configured_models())
    if request is not None:
        names += [SESSION_PREFIX + c for c in sessions.list_checkpoints(request)]
    return names


def resolve(name: str, request=None) -> str:
    """A browser-chosen name → a load_adapter spec; anything not on the list is refused."""
    if request is not None and isinstance(name, str) and name.startswith(SESSION_PREFIX):
        return str(sessions.resolve_checkpoint(request, name[len(SESSION_PREFIX):]))
    models = configured_models()
    if name not in models:
        raise RALError(f"unknown model '{name}'; choose one of: {', '.join(models)}")
    return models[name]


def get_adapter(name: str, request=None):
    """Load (or reuse) the adapter for a listed name. Call with MODEL_LOCK held."""
    spec = resolve(name, request)
    if spec in _CACHE:
        _CACHE.move_to_end(spec)
        adapter = _CACHE[spec]
    else:
        from ral_core.models import load_adapter

        adapter = _CACHE[spec] = load_adapter(spec, device="auto")  # a GPU when the host (e.g. a Space) has one
        while len(_CACHE) > max(CACHE_SIZE, 1):
            _CACHE.popitem(last=False)
    adapter.name = name  # what results and titles show: the listed name, never a server path
    return adapter


def clear_cache():
    with MODEL_LOCK:
        _CACHE.clear()
