"""ZeroGPU (Hugging Face Spaces): model work runs inside `spaces.GPU`, which lends a GPU for the call's duration.

On ZeroGPU (the `spaces` package present and SPACES_ZERO_GPU set) a decorated function runs in a forked process: its
arguments and result are pickled, so model work goes through plain functions of names, images and numbers that
return an InspectionResult (numpy + PIL), never CUDA tensors. The declared duration is the request's time limit
plus start-up slack: short declarations are served first from a visitor's quota. Everywhere else `gpu_task`
returns the function unchanged.

Training runs as a sequence of GPU calls of a few steps each (`train_chunk`, ral_core/chunked.py): between calls
the whole run state is on the CPU of this process, which never touches CUDA itself. On ZeroGPU a run needs
Hugging Face sign-in (the visitor's own GPU quota pays for it) and stays within the RAL_ZEROGPU_* limits.
"""
from __future__ import annotations

import contextvars
import os

from ral_core import chunked
from ral_core.errors import RALError

# the refusal the Train tab showed on ZeroGPU before runs were chunked (kept until the tab calls check_training)
ZERO_GPU_TRAINING = ("training runs need a GPU for minutes, and ZeroGPU lends one for seconds per call: duplicate "
                     "this Space and pick dedicated hardware in its settings (e.g. an L4 or A10G), or run "
                     "`ral train` on your own machine")
ZERO_GPU_SIGN_IN = ("training on this Space's free GPU (ZeroGPU) needs a Hugging Face account, whose daily GPU quota "
                    "pays for the run: press 'Sign in with Hugging Face' (free accounts get 5 GPU minutes a day), or "
                    "run `ral train` on your own machine")


def on_zerogpu() -> bool:
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("1", "true", "yes"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def declared_seconds(*_args, **_kwargs) -> int:
    """What a model call declares to ZeroGPU: the per-request limit plus slack for moving the model to the GPU."""
    from ral_core.limits import request_seconds
    return int(min(120, max(5, request_seconds() + 15)))


def gpu_task(fn, duration=declared_seconds):
    """`spaces.GPU(duration=duration)(fn)` on ZeroGPU, else `fn` itself (decorate once, at import)."""
    if not on_zerogpu():
        return fn
    import spaces
    return spaces.GPU(duration=duration)(fn)


# one training call: k steps from the carried state; its duration is computed from the same inputs
train_chunk = gpu_task(chunked.run_chunk, duration=chunked.declared_seconds)


# ---- training runs on ZeroGPU ---------------------------------------------------------------------------------------
def check_training(request, steps: int) -> None:
    """Before a run is queued on ZeroGPU: a signed-in visitor, a run within the step cap."""
    if not on_zerogpu():
        return
    from app.sessions import signed_in_user
    if signed_in_user(request) is None:
        raise RALError(ZERO_GPU_SIGN_IN)
    chunked.ChunkLimits.from_env().check_run(int(steps))


def run_context() -> contextvars.Context | None:
    """On ZeroGPU, the starting request's context (ZeroGPU reads the visitor from it to charge their quota), for the
    run's GPU calls made later from the queue's thread; None elsewhere."""
    return contextvars.copy_context() if on_zerogpu() else None


def follow_chunked(run) -> dict:
    """Train `run` (an app.runs.Run) as ZeroGPU calls from this thread; its steps, probe and status land on the run as
    the child process's messages would. Returns the end as {status, step, message} (message without what is kept:
    the queue says that)."""
    limits = chunked.ChunkLimits.from_env()
    job = chunked.ChunkJob(run.cfg.to_dict(), call_ceiling_s=limits.call_seconds, snapshots=True)
    ctx = getattr(run, "zerogpu", None) or contextvars.copy_context()

    def call(*args):
        return ctx.run(train_chunk, *args)

    run.status = "running"
    for ev in chunked.run_chunked(job, call, limits, cancel=run.cancel):
        if ev.kind == "chunk":
            if ev.probe is not None:
                run.probe = ev.probe
            run._history.extend(ev.metrics)
            run._step = ev.step
            run.loaded = True
            run.gpu_calls, run.gpu_seconds = ev.calls, ev.gpu_seconds
            continue
        status = {"done": "done", "cancelled": "cancelled"}.get(ev.status, "failed")
        return {"status": status, "step": ev.step, "message": ev.reason}
    return {"status": "failed", "step": run.step, "message": "the run ended without a last word"}
