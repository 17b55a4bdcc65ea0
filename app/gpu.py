"""ZeroGPU (Hugging Face Spaces): each model call runs inside `spaces.GPU`, which lends a GPU for its duration.

On ZeroGPU (the `spaces` package present and SPACES_ZERO_GPU set) the decorated function runs in a forked
process: its arguments and result are pickled, so model work goes through plain functions of names, images and
numbers that return an InspectionResult (numpy + PIL), never CUDA tensors. The declared duration is the request's
time limit plus start-up slack: short declarations are served first from a visitor's quota. Everywhere else
`gpu_task` returns the function unchanged. Training runs are refused on ZeroGPU (minutes, not seconds).
"""
from __future__ import annotations

import os

ZERO_GPU_TRAINING = ("training runs need a GPU for minutes, and ZeroGPU lends one for seconds per call: duplicate "
                     "this Space and pick dedicated hardware in its settings (e.g. an L4 or A10G), or run "
                     "`ral train` on your own machine")


def on_zerogpu() -> bool:
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("1", "true", "yes"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def declared_seconds(*_args, **_kwargs) -> int:
    """What a call declares to ZeroGPU: the per-request limit plus slack for moving the model to the GPU."""
    from ral_core.limits import request_seconds
    return int(min(120, max(5, request_seconds() + 15)))


def gpu_task(fn):
    """`spaces.GPU(duration=declared_seconds)(fn)` on ZeroGPU, else `fn` itself (decorate once, at import)."""
    if not on_zerogpu():
        return fn
    import spaces
    return spaces.GPU(duration=declared_seconds)(fn)
