"""A stand-in for Hugging Face's `spaces` package as it behaves on ZeroGPU, for tests and for serving the app locally
as a ZeroGPU Space (`PYTHONPATH=tests/spaces_standin SPACES_ZERO_GPU=true python app.py`).

`@GPU(duration=…)` runs each call in a forked worker process: the arguments and the result cross by pickle, and
nothing else comes back (whatever the worker changes in memory is lost). `duration` is a number or a function of
the call's inputs; a worker that runs past it is killed and the call fails with "GPU task aborted", as on ZeroGPU.
Only CPU tensors may cross (a CUDA tensor in a result would be a handle into a GPU the caller does not hold).

Knobs for tests: CALLS records (function name, declared seconds) per call (also appended to the file named by
SPACES_STANDIN_LOG, when set); QUOTA_LEFT (seconds, None = unlimited)
refuses a call that declares more than is left, with ZeroGPU's wording; ABORT_CALLS holds call numbers (1-based)
whose worker is killed mid-way; CUDA_RESTORE maps torch.cuda attribute names to the functions a forked worker puts
back (a test that forbids CUDA in the main process patches them there).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import time

CALLS: list[tuple[str, float]] = []
QUOTA_LEFT: float | None = None
ABORT_CALLS: set[int] = set()
CUDA_RESTORE: dict = {}

try:
    from gradio import Error as _Error  # what the real package raises
except ImportError:  # pragma: no cover
    _Error = RuntimeError


def _non_cpu_tensor(obj, depth=0):
    """Where a tensor that is not on the CPU hides in `obj` (None if nowhere)."""
    import dataclasses
    import torch
    if depth > 50:
        return None
    if isinstance(obj, torch.Tensor):
        return str(obj.device) if obj.device.type != "cpu" else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            found = _non_cpu_tensor(v, depth + 1)
            if found:
                return found
    return None


def _crossing(obj, what: str) -> bytes:
    found = _non_cpu_tensor(obj)
    if found:
        raise TypeError(f"ZeroGPU stand-in: {what} holds a tensor on {found}; only CPU tensors may cross")
    return pickle.dumps(obj)


def _worker(fn, payload: bytes, conn) -> None:
    import torch
    for name, f in CUDA_RESTORE.items():  # the GPU worker is where CUDA may be used
        setattr(torch.cuda, name, f)
    try:
        args, kwargs = pickle.loads(payload)
        out = ("ok", _crossing(fn(*args, **kwargs), "the result"))
    except BaseException as e:  # noqa: BLE001 — everything goes back to the caller
        try:
            out = ("err", pickle.dumps(e))
        except Exception:  # noqa: BLE001
            out = ("err", pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}")))
    conn.send_bytes(pickle.dumps(out))
    conn.close()
    os._exit(0)  # no atexit handlers of the parent (pytest, gradio) in the worker


def GPU(fn=None, duration=60, **_kwargs):
    def deco(f):
        @functools.wraps(f)
        def call(*args, **kwargs):
            global QUOTA_LEFT
            seconds = duration(*args, **kwargs) if callable(duration) else duration
            CALLS.append((f.__name__, seconds))
            n = len(CALLS)
            if os.environ.get("SPACES_STANDIN_LOG"):  # a served app's calls, for a test in another process
                with open(os.environ["SPACES_STANDIN_LOG"], "a") as log:
                    log.write(f"{f.__name__} {seconds}\n")
            if QUOTA_LEFT is not None:
                if seconds > QUOTA_LEFT:
                    raise _Error(f"You have exceeded your GPU quota ({QUOTA_LEFT:.0f}s left vs. {seconds:.0f}s "
                                 "requested). Try again in 23:59:00")
                QUOTA_LEFT -= seconds
            payload = _crossing((args, kwargs), "the arguments")
            ctx = multiprocessing.get_context("fork")
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(f, payload, send), daemon=True)
            proc.start()
            send.close()
            try:
                limit = 0.2 if n in ABORT_CALLS else seconds
                t0 = time.monotonic()
                if not recv.poll(limit):
                    proc.kill()
                    proc.join()
                    raise _Error("GPU task aborted")
                try:
                    kind, data = pickle.loads(recv.recv_bytes())
                except EOFError:
                    proc.join()
                    raise _Error("GPU task aborted") from None
                proc.join(max(1.0, seconds - (time.monotonic() - t0)))
            finally:
                recv.close()
            if kind == "err":
                raise pickle.loads(data)
            return pickle.loads(data)
        return call
    return deco(fn) if callable(fn) else deco


def reset() -> None:
    global QUOTA_LEFT
    CALLS.clear()
    ABORT_CALLS.clear()
    CUDA_RESTORE.clear()
    QUOTA_LEFT = None
