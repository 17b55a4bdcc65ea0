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
_LOAD_LOCK = threading.RLock()  # loading and the cache; each loaded model has its own `adapter.lock`
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
    from ral_core.hub import listable

    out = {} if "default" in raw else {"default": "default"}
    for name, spec in raw.items():
        spec = str(spec)
        if spec != "default" and not Path(spec).is_absolute() and (path.parent / spec).exists():
            spec = str((path.parent / spec).resolve())
        if listable(spec):  # a hub id only where it can load: cached, or downloads allowed (e.g. on a Space)
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
    """Load (or reuse) the adapter for a listed name. Use the model only with `adapter.lock` held (or through
    `batcher(adapter)`): requests for different models run in parallel, requests for one model take turns."""
    return get_adapter_for_spec(name, resolve(name, request))


def is_loaded(spec: str) -> bool:
    """Whether the model of this spec is loaded already (a request then has no load stage to report)."""
    return spec in _CACHE


def get_adapter_for_spec(name: str, spec: str, progress=None):
    """`get_adapter` for a spec already resolved (and so checked) by `resolve`. `progress(desc, n, total)` follows a
    hub download (ral_core.hub)."""
    with _LOAD_LOCK:
        if spec in _CACHE:
            _CACHE.move_to_end(spec)
            adapter = _CACHE[spec]
        else:
            from ral_core.models import load_adapter

            from app.progress import install

            # bf16 on a GPU (e.g. a Space), fp32 on CPU
            adapter = load_adapter(spec, device="auto", dtype="auto", progress=progress)
            adapter.lock, adapter.batcher = threading.RLock(), None
            install(adapter)  # the progress hook, before any other thread can run the model
            _CACHE[spec] = adapter
            while len(_CACHE) > max(CACHE_SIZE, 1):
                _retire(_CACHE.popitem(last=False)[1])
    adapter.name = name  # what results and titles show: the listed name, never a server path
    return adapter


def batcher(adapter):
    """The adapter's inspect batcher (concurrent greedy inspections of one model run as one batch)."""
    from ral_core.batching import InspectBatcher

    with _LOAD_LOCK:
        if getattr(adapter, "batcher", None) is None:
            adapter.batcher = InspectBatcher(adapter, adapter.lock)
        return adapter.batcher


def _retire(adapter):
    if getattr(adapter, "batcher", None) is not None:
        adapter.batcher.close()


def clear_cache():
    with _LOAD_LOCK:
        for a in _CACHE.values():
            _retire(a)
        _CACHE.clear()
