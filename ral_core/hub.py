"""Hub ids (`org/name`, optionally `@revision`) → local model folders.

The local Hugging Face cache is always used. Downloading happens only where it is allowed (`allow_download=True`,
`RAL_ALLOW_DOWNLOAD=1`, or on a Hugging Face Space unless `RAL_ALLOW_DOWNLOAD=0`), through huggingface_hub's own
`snapshot_download` and progress bars. Only data files are fetched (JSON, safetensors, tokenizer files), never
pickles or Python code, and a model whose config asks for its own code is refused before its weights are fetched.
Every failure is one `RALError` line that says what to do. Importing this module does not import torch.
"""
from __future__ import annotations

import contextvars
import errno
import io
import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from ral_core.errors import RALError

ENV = "RAL_ALLOW_DOWNLOAD"
# Data only: config/processor/tokenizer/chat-template JSON, safetensors weights, sentencepiece *.model, BPE merges
# *.txt and *.jinja chat templates (rendered in transformers' sandbox). Pickled weights (*.bin, *.pt, *.pkl) and
# *.py never match, so nothing downloaded can run code on load.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
# Top-level files only: repos keep ONNX/GGUF exports and other variants (often GBs) in sub-folders.
IGNORE_PATTERNS = ["*/*"]
EXAMPLE = "HuggingFaceTB/SmolVLM-256M-Instruct"
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]{1,200})?$")
_ONLINE_LOCK = threading.Lock()
_NO_SAFETENSORS = ("'{spec}' has no complete safetensors weights on the hub (this workbench never downloads pickled "
                   "*.bin/*.pt weights, which can run code when loaded); choose a repo that ships *.safetensors")


def is_hub_id(spec) -> bool:
    """`name`, `org/name` or either with `@revision` (a branch, tag or commit)."""
    s = str(spec)
    return bool(_HUB_ID.match(s)) and ".." not in s and "--" not in s.split("@")[0]


def split_spec(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' → ('org/name', 'rev'); no '@' → revision None (the default branch)."""
    repo, _, rev = str(spec).partition("@")
    return repo, rev or None


_ALLOW: contextvars.ContextVar[bool | None] = contextvars.ContextVar("ral_allow_download", default=None)


@contextmanager
def allowing_downloads(allow: bool | None):
    """Within the block, loads that pass no `allow_download` of their own answer `allow` (None: no change): how a
    command's --allow-download reaches the loads made deep inside it (the trainer's model and teacher)."""
    token = _ALLOW.set(_ALLOW.get() if allow is None else bool(allow))
    try:
        yield
    finally:
        _ALLOW.reset(token)


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """An explicit argument wins; else an enclosing `allowing_downloads`; else RAL_ALLOW_DOWNLOAD (true/false);
    unset, downloads are on only on a Hugging Face Space (SPACE_ID is set there), whose visitors cannot copy a
    model folder onto the host."""
    from ral_core import settings
    from ral_core.config import parse_bool

    if allow_download is not None:
        return parse_bool(allow_download, "allow_download")  # a request's "false" must not download
    if _ALLOW.get() is not None:
        return _ALLOW.get()
    v = settings.get(ENV)
    return bool(os.environ.get("SPACE_ID")) if v is None else v


def cached_path(spec: str) -> str | None:
    """The complete local snapshot of a hub id in the Hugging Face cache, or None (no network use)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, rev = split_spec(spec)
    try:
        folder = snapshot_download(repo, revision=rev, local_files_only=True, allow_patterns=ALLOW_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS)
    except (LocalEntryNotFoundError, OSError, ValueError):  # incomplete snapshots are LocalEntryNotFoundErrors too
        return None
    return folder if _complete(folder) else None


def listable(spec: str) -> bool:
    """Whether a model list should offer `spec`: 'default' and local paths always (they fail loudly if broken);
    a hub id only when it can load here, i.e. it is cached or downloads are allowed."""
    s = str(spec)
    if s in ("", "default") or not is_hub_id(s) or Path(s).expanduser().exists():
        return True
    return downloads_allowed() or cached_path(s) is not None


def resolve(spec: str, allow_download: bool | None = None, progress: Callable[[str, float, float | None], None] |
            None = None, tqdm_class=None, model_types: Iterable[str] | None = None) -> str:
    """Local folder of hub id `spec`: from the cache, else downloaded where `downloads_allowed(allow_download)`.

    `progress(desc, n, total)` is called as the download advances (e.g. to drive `gr.Progress`); `tqdm_class`
    replaces the progress bars (default: tqdm on stderr). `model_types`, when given, lists the families that can
    load; others are refused from their config.json, before any weights are fetched.
    """
    repo, rev = split_spec(spec)
    folder = cached_path(spec)
    if folder is not None:
        check_config(Path(folder) / "config.json", spec, model_types)
        return folder
    if not downloads_allowed(allow_download):
        raise RALError(f"model '{spec}' is neither a local directory nor in the local Hugging Face cache, and the hub "
                       "is unreachable from here (offline); download it elsewhere and pass its local directory with "
                       f"--model DIR, or allow downloading (--allow-download or {ENV}=1) on a host with internet")
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    bars = tqdm_class or _bar_class(progress)
    try:
        with _online():
            # One metadata request first: it fails fast without network (file requests retry with back-off),
            # and names a missing repo or revision.
            info = HfApi().model_info(repo, revision=rev or constants.DEFAULT_REVISION,
                                     timeout=constants.HF_HUB_ETAG_TIMEOUT)
            names = [s.rfilename for s in info.siblings or []]
            # Then config.json alone: a model that needs its own code, or a family we cannot load, is refused
            # before any weights are fetched.
            check_config(hf_hub_download(repo, "config.json", revision=rev), spec, model_types)
            if not any(n.endswith(".safetensors") and "/" not in n for n in names):
                raise RALError(_NO_SAFETENSORS.format(spec=spec))
            folder = snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS,
                                       ignore_patterns=IGNORE_PATTERNS, tqdm_class=bars)
    except RALError:
        raise
    except Exception as e:  # noqa: BLE001 — every download failure becomes one line
        raise RALError(failure_message(e, spec)) from None
    if not _complete(folder):
        raise RALError(_NO_SAFETENSORS.format(spec=spec))
    return folder


def check_config(config_file, spec: str, model_types: Iterable[str] | None = None) -> dict:
    """Refuse a model that needs its own Python code (never `trust_remote_code`) or a family we cannot load."""
    try:
        cfg = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as e:
        raise RALError(f"'{spec}' has no readable config.json ({e.__class__.__name__}); it is not a transformers "
                       "model folder") from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    mt = cfg.get("model_type")
    if "auto_map" in cfg or mt not in CONFIG_MAPPING_NAMES:
        why = "its config.json has auto_map" if "auto_map" in cfg else f"model type '{mt}' is not built into transformers"
        raise RALError(f"'{spec}' needs its own Python code ({why}), like vikhyatk/moondream2; this workbench never "
                       f"runs code from a model repo (no trust_remote_code): choose a natively supported model, "
                       f"e.g. {EXAMPLE}")
    if model_types is not None and mt not in set(model_types):
        raise RALError(f"unsupported model family '{mt}' ('{spec}'); supported: {', '.join(sorted(model_types))}")
    return cfg


def failure_message(e: BaseException, spec: str) -> str:
    """One line that says what to do about a failed download of `spec`."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, rev = split_spec(spec)
    page = f"{constants.ENDPOINT}/{repo}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and status in (401, 403)):
        return (f"'{repo}' is gated or private (HTTP {status}): accept the licence on the model page {page} while "
                "signed in, then set HF_TOKEN to an access token of that account")
    if isinstance(e, RevisionNotFoundError):
        return f"'{repo}' has no revision '{rev}': pass an existing branch, tag or commit after '@', or none for main"
    if isinstance(e, RepositoryNotFoundError):
        return (f"no model '{repo}' on the hub ({constants.ENDPOINT}): check the id (org/name); for a private repo "
                "set HF_TOKEN")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, FileNotFoundError):
        return f"'{spec}' has no config.json: it is not a transformers model repo"
    chain, c = [], e
    while c is not None and len(chain) < 10:
        chain.append(c)
        c = c.__cause__ or c.__context__
    if any(isinstance(c, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)) for c in chain):
        return (f"no network: cannot reach {constants.ENDPOINT} to download '{spec}'; set {ENV} only on a host with "
                "internet, or download the model on another machine and pass its folder with --model DIR")
    if isinstance(e, HfHubHTTPError):
        return f"the hub answered HTTP {status} for '{spec}'; try again later"
    os_err = next((c for c in chain if isinstance(c, OSError) and c.errno is not None), None)
    cache = constants.HF_HUB_CACHE
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"not enough disk space to download '{spec}' into {cache}: free some space or set HF_HOME to a "
                "folder on a larger disk")
    if os_err is not None:
        return (f"cannot write '{spec}' into the Hugging Face cache {cache} ({os_err.strerror}): set HF_HOME to a "
                "writable folder")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"could not download '{spec}': {type(e).__name__}: {first}"


@contextmanager
def _online():
    """Lift HF_HUB_OFFLINE (set by the Makefile, CLI and app) for one call. huggingface_hub reads it into
    `constants.HF_HUB_OFFLINE` at import, and transformers asks `huggingface_hub.is_offline_mode()`, which returns
    that constant, so patching it covers both; the environment (and child processes) stay offline."""
    from huggingface_hub import constants

    with _ONLINE_LOCK:
        old = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = old


def _complete(folder) -> bool:
    """config.json plus safetensors weights, every shard of a sharded checkpoint present."""
    p = Path(folder)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return False
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((p / s).is_file() for s in shards)
    return True


def _bar_class(progress):
    """Plain tqdm bars on stderr (transformers' `disable_progress_bar()` also silences huggingface_hub's own
    class), or, with a `progress` callback, silent bars that report every update to it."""
    from tqdm.std import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            if progress is not None:
                kwargs.update(file=io.StringIO(), disable=False)
            elif os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on"):
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            if progress is not None:
                progress(str(self.desc or ""), float(self.n), None if self.total is None else float(self.total))
            return out

    return Bar
