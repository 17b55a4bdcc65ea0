"""Figures drawn in worker processes: matplotlib holds the GIL and pyplot is global state, so concurrent
requests drawn in threads take turns on one core; worker processes draw them side by side on every core,
outside any model lock. RAL_RENDER_WORKERS=0 draws in-process (one at a time, under handlers' RENDER_LOCK)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

log = logging.getLogger("ral.app")
_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
LOCAL_LOCK = threading.Lock()  # in-process drawing: pyplot's figure registry is not thread-safe
_RESULTS: OrderedDict[str, object] = OrderedDict()  # per worker: recently loaded results


def workers() -> int:
    return max(0, int(os.environ.get("RAL_RENDER_WORKERS", os.cpu_count() or 1)))


def _watch_parent(parent: int):
    """Exit when the server is gone (killed servers would otherwise leave their workers waiting forever)."""
    import time
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _init(parent: int):
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Drawing yields to the server and to training runs (RAL_RENDER_NICE): a burst of figures then costs
    # visitors some latency instead of stalling a run.
    try:
        os.nice(int(os.environ.get("RAL_RENDER_NICE", 4)))
    except (OSError, ValueError):
        pass
    import torch
    torch.set_num_threads(1)


def _pool() -> ProcessPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ProcessPoolExecutor(workers(), mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                                        initargs=(os.getpid(),))
        return _POOL


def warm_up():
    """Start the workers now (they import torch and matplotlib), not on the first visitor's request."""
    if workers():
        list(_pool().map(_ping, range(workers())))


def _ping(_):
    import matplotlib.pyplot  # noqa: F401
    from ral_core import inspection, render  # noqa: F401
    return os.getpid()


def shutdown():
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=False, cancel_futures=True)
            _POOL = None


def call(fn, *args, timeout: float = 60.0):
    """fn(*args) in a worker process (in-process when RAL_RENDER_WORKERS=0 or the pool broke)."""
    global _POOL
    if workers():
        try:
            return _pool().submit(fn, *args).result(timeout=timeout)
        except BrokenProcessPool:
            log.warning("a render worker died; drawing in-process and restarting the pool")
            with _POOL_LOCK:
                _POOL = None
    with LOCAL_LOCK:
        return fn(*args)


# ---- jobs (run in a worker; arguments and results are plain data) -------------------------------------------
def _result(result_dir: str):
    from ral_core.inspection import InspectionResult

    if result_dir in _RESULTS:
        _RESULTS.move_to_end(result_dir)
        return _RESULTS[result_dir]
    res = _RESULTS[result_dir] = InspectionResult.load(result_dir)
    while len(_RESULTS) > 8:
        _RESULTS.popitem(last=False)
    return res


def save_both(fig, stem: Path) -> list[str]:
    """PNG (shown and downloadable) and SVG of one figure; the figure is closed."""
    from ral_core import render

    fig.savefig(stem.with_suffix(".svg"), bbox_inches="tight")
    return [str(render.save_figure(fig, stem.with_suffix(".png"))), str(stem.with_suffix(".svg"))]


def inspect_view(result_dir: str, boxes, lay, tok, row, out_dir: str, fmt: str = "png") -> tuple[str, str]:
    """Overlay and per-head grid of a saved inspection → (overlay path, heads path) in `fmt` (png | svg).

    The page shows PNGs; SVGs are drawn only when asked for (drawing both for every view doubled its cost)."""
    from ral_core import render

    res, d = _result(result_dir), Path(out_dir)
    grid_layer = res.layers[-1] if lay == "mean" else lay  # heads of different layers are unrelated: no mean grid
    over = render.save_figure(render.inspection_overlay(res, layer=lay, token=tok, row=row, boxes=boxes),
                              d / f"attention_L{lay}_T{tok}_{row}.{fmt}")
    heads = render.save_figure(render.head_grid(res, grid_layer, token=tok, row=row),
                               d / f"heads_L{grid_layer}_T{tok}_{row}.{fmt}")
    return str(over), str(heads)
