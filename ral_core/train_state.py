"""Trainer state (optimizer, LR scheduler, RNG streams) as safetensors + JSON, never pickle: a checkpoint
folder written by someone else can be resumed without running their code.

Layout in a checkpoint folder: `trainer_state.safetensors` holds every tensor and numpy array;
`trainer_state.json` holds the rest as a JSON tree in which tensors, arrays, tuples and dicts with
non-string keys are tagged objects (`{"__tensor__": key}` …). Decoding knows only those tags, so a hostile
file can at worst fail to load."""
from __future__ import annotations

import contextvars
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ral_core.errors import RALError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_PICKLE = "trainer_state.pt"
FORMAT = "ral-trainer-state"
VERSION = 1
# Set by ral_core.distributed.full_state around a multi-process save: every process's RNG streams in rank order, so
# that each process of a resumed run continues its own stream (one stream for all would resume only rank 0 exactly).
RANK_RNG: contextvars.ContextVar[list | None] = contextvars.ContextVar("ral_rank_rng", default=None)


# ---- a JSON tree plus a flat tensor dict -------------------------------------------------------------------
def _encode(obj, tensors: dict, key: str):
    """Replace tensors/arrays by references into `tensors`; tag tuples and non-string-keyed dicts so that
    decoding restores the exact Python types (torch compares param_groups by value, RNG needs tuples)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        # raw bytes + dtype/shape: exact for every numpy dtype, including uint32 (not a safetensors type)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).view(np.uint8).reshape(-1).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = [(k, _encode(v, tensors, f"{key}.{k}")) for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return dict(items)
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"cannot store dict keys of types {sorted({type(k).__name__ for k in obj})} at {key}")
        return {"__dict__": [[k, v] for k, v in items]}
    raise TypeError(f"cannot store a {type(obj).__name__} in the trainer state (at {key}) without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        raw = tensors[obj["__ndarray__"]].numpy()
        return raw.view(np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---- RNG streams ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(st: dict):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"].to(torch.uint8))
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in st["cuda"]])


# ---- save / load -------------------------------------------------------------------------------------------
def save_state(directory, step: int, optimizer, scheduler, history_len: int) -> None:
    """Write the trainer state of `step` into `directory` (an unpublished temp folder: no atomicity here)."""
    from safetensors.torch import save_file

    d = Path(directory)
    tensors: dict = {}
    tree = {"format": FORMAT, "version": VERSION, "step": int(step), "history_len": int(history_len),
            "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer"),
            "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler"),
            "rng": _encode(rng_state(), tensors, "rng")}
    if RANK_RNG.get():
        tree["rng_ranks"] = _encode(RANK_RNG.get(), tensors, "rng_ranks")
    save_file(tensors, str(d / STATE_TENSORS))
    (d / STATE_JSON).write_text(json.dumps(tree))


def load_state(directory, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG streams from `directory`; returns {"step", "history_len"}.
    A folder with only the old pickle `trainer_state.pt` is refused without opening it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / STATE_JSON).is_file() or not (d / STATE_TENSORS).is_file():
        if (d / LEGACY_PICKLE).exists():
            raise RALError(f"checkpoint '{d}' stores its trainer state as a pickle ({LEGACY_PICKLE}), which can run "
                           "code when opened, so it is refused; resume from a checkpoint written by this version")
        raise RALError(f"checkpoint '{d}' has no trainer state ({STATE_JSON} + {STATE_TENSORS}); "
                       "it cannot be resumed (its weights still load as a model)")
    try:
        tree = json.loads((d / STATE_JSON).read_text())
        tensors = load_file(str(d / STATE_TENSORS))
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if tree.get("version") != VERSION:
            raise ValueError(f"format version {tree.get('version')}, this version reads {VERSION}")
        st = {k: _decode(tree[k], tensors) for k in ("optimizer", "scheduler", "rng")}
        st["rng"] = _rank_rng(tree, tensors, st["rng"])
        step, history_len = int(tree["step"]), int(tree["history_len"])
    except (ValueError, KeyError, TypeError, OSError, RecursionError, SafetensorError) as e:
        raise RALError(f"the trainer state in checkpoint '{d}' is unreadable ({e}); resume from another "
                       "checkpoint") from None
    try:
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RALError(f"the trainer state in checkpoint '{d}' does not match this run's optimizer "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); resume with the same config") from None
    return {"step": step, "history_len": history_len}


def _rank_rng(tree: dict, tensors: dict, default: dict) -> dict:
    """This process's RNG streams: its own when the checkpoint holds one per process of a run of this size."""
    import torch.distributed as dist
    if "rng_ranks" not in tree or not (dist.is_available() and dist.is_initialized()):
        return default
    ranks = _decode(tree["rng_ranks"], tensors)
    return ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else default


# ---- leftovers of killed writers ----------------------------------------------------------------------------
def _start_time(pid: int) -> float | None:
    """Wall-clock start of a live process (Linux /proc), None if it is gone or a zombie; inf if unknown."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # someone else's live process
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # killed but not reaped: it writes nothing any more
            return None
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return float("-inf")  # cannot tell: treat as a live writer


def remove_stale_tmp(ck_root) -> list[Path]:
    """Delete `.tmp-step-*-<pid>` folders of checkpoint writes that were killed mid-way: their process is gone,
    or the pid now belongs to a process that started after the folder was last written (a restarted
    container reuses pids, often its own). A write in flight is never touched."""
    removed = []
    root = Path(ck_root)
    if not root.is_dir():
        return removed
    for p in root.glob(".tmp-step-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            started = _start_time(pid)
            stale = started is None or started > p.stat().st_mtime + 2  # 2 s: btime is whole seconds
        except (IndexError, ValueError):
            stale = True  # not a name this code writes
        except OSError:
            continue  # vanished meanwhile
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
