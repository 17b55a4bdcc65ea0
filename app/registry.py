"""Server-side model list (names → paths, from app/models.yaml or $RAL_MODELS_CONFIG) and a small per-process
LRU of served models: each a `Served` record holding the core adapter, the lock around its use (one process
serves every browser session) and its inspect batcher. Nothing is attached to the adapter itself."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ral_core import settings
from ral_core.errors import RALError

from app import sessions

DEFAULT_CONFIG = Path(__file__).with_name("models.yaml")
SESSION_PREFIX = "session: "  # choices for the browser session's own checkpoints (training writes them)
_LOAD_LOCK = threading.RLock()  # loading and the cache; each served model has its own `lock`
_CACHE: OrderedDict[tuple, "Served"] = OrderedDict()  # by _key
CACHE_SIZE = settings.get("RAL_MODEL_CACHE")


def config_path() -> Path:
    return settings.get("RAL_MODELS_CONFIG", DEFAULT_CONFIG)


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


@dataclass
class Served:
    """One loaded model as the server holds it. Use the model only with `lock` held (or through `batcher()`):
    requests for different models run in parallel, requests for one model take turns."""
    adapter: object
    lock: threading.RLock = field(default_factory=threading.RLock)
    _batcher: object = None

    def batcher(self):
        """The inspect batcher (concurrent greedy inspections of this model run as one batch), started on first use."""
        from ral_core.batching import InspectBatcher

        with _LOAD_LOCK:
            if self._batcher is None:
                self._batcher = InspectBatcher(self.adapter, self.lock)
            return self._batcher

    def view(self, name: str, max_pixels: int | None = None):
        """The adapter as one request sees it: its listed name and pixel budget on a shallow copy (model, tokenizer
        and processor shared), so no other request ever sees them. Returns (adapter, the budget's note)."""
        a = copy.copy(self.adapter)
        a.name = name  # what results and titles show: the listed name, never a server path
        note = a.set_max_pixels(max_pixels) if max_pixels is not None else ""
        return a, note

    def retire(self):
        if self._batcher is not None:
            self._batcher.close()


def get_adapter(name: str, request=None):
    """The loaded adapter for a listed name (tests and tools; request handlers use `serve`)."""
    return serve(name, resolve(name, request)).adapter


def _key(spec: str) -> tuple:
    """A model folder's identity, not only its path: a session's checkpoint name can be used again after its folder
    was swept, and the new weights must never be served from the old entry."""
    folder = Path(spec)
    if not folder.is_dir():
        return (spec,)  # 'default' or a hub id: not a folder a session can rewrite
    stamp = []
    # every file that decides the weights (a full model's config and shards, a LoRA's adapter files)
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        try:
            st = f.stat()
        except OSError:
            continue
        stamp.append((f.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return (spec, *stamp)


def is_loaded(spec: str) -> bool:
    """Whether the model of this spec is loaded already (a request then has no load stage to report)."""
    return _key(spec) in _CACHE


def serve(name: str, spec: str, progress=None) -> Served:
    """The served model for a spec already resolved (and so checked) by `resolve`, loaded on first use.
    `progress(desc, n, total)` follows a hub download (ral_core.hub)."""
    key = _key(spec)
    with _LOAD_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        from ral_core.models import load_adapter

        from app.progress import install

        # bf16 on a GPU (e.g. a Space), fp32 on CPU
        try:
            adapter = load_adapter(spec, device="auto", dtype="auto", progress=progress)
        except RALError as e:
            raise RALError(for_browser(str(e))) from None
        adapter.name = name  # a spec never shows: results of the shared adapter carry a listed name
        install(adapter)  # the progress hook, before any other thread can run the model
        served = _CACHE[key] = Served(adapter)
        while len(_CACHE) > max(CACHE_SIZE, 1):
            _CACHE.popitem(last=False)[1].retire()
        return served


def for_browser(message: str) -> str:
    """A loading error as a browser user can act on it: the command line's '--model DIR' and '--allow-download'
    mean, on a server, a folder listed in the model list and the server's download switch."""
    import re
    m = re.sub(r"pass its (local directory|folder) with --model DIR",
               "list its folder in app/models.yaml (or the file RAL_MODELS_CONFIG names)", message)
    m = m.replace("(--allow-download or RAL_ALLOW_DOWNLOAD=1)", "(RAL_ALLOW_DOWNLOAD=1 where the server runs)")
    return m.replace("--model DIR", "a model folder listed in app/models.yaml")


def unavailable_models() -> dict[str, str]:
    """Listed models that cannot load here (hub ids neither cached nor downloadable): name → hub id. The page
    shows them as not available, with how to add a local folder instead."""
    try:
        raw = yaml.safe_load(config_path().read_text()) or {}
        listed = configured_models()
    except (OSError, yaml.YAMLError, RALError):
        return {}
    return {str(n): str(s) for n, s in raw.items() if str(n) not in listed} if isinstance(raw, dict) else {}


def reads_photos() -> bool:
    """Whether any listed model can answer about a photograph: the bundled models (assets/) read digit grids only."""
    bundled = Path(__file__).resolve().parents[1] / "assets"
    return any(spec != "default" and not Path(spec).resolve().is_relative_to(bundled)
               for spec in configured_models().values())


def clear_cache():
    with _LOAD_LOCK:
        for s in _CACHE.values():
            s.retire()
        _CACHE.clear()
