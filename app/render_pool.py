"""Figures drawn in worker processes: matplotlib holds the GIL and pyplot is global state, so concurrent
requests drawn in threads take turns on one core; worker processes draw them side by side on every core,
outside any model lock. RAL_RENDER_WORKERS=0 draws in-process (one at a time, under common.RENDER_LOCK)."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ral_core import settings

log = logging.getLogger("ral.app")
_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
LOCAL_LOCK = threading.Lock()  # in-process drawing: pyplot's figure registry is not thread-safe
_RESULTS: OrderedDict[tuple, object] = OrderedDict()  # per worker: recently loaded results, by _result_key


def workers() -> int:
    return settings.get("RAL_RENDER_WORKERS")


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
        os.nice(settings.get("RAL_RENDER_NICE"))
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
    with _AHEAD_CV:
        _AHEAD.clear()
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=False, cancel_futures=True)
            _POOL = None


def call(fn, *args, timeout: float = 60.0):
    """fn(*args) in a worker process (in-process when RAL_RENDER_WORKERS=0 or the pool broke)."""
    global _POOL
    if workers():
        try:
            with _Waiting():
                return _pool().submit(fn, *args).result(timeout=timeout)
        except BrokenProcessPool:
            log.warning("a render worker died; drawing in-process and restarting the pool")
            with _POOL_LOCK:
                _POOL = None
    with LOCAL_LOCK:
        return fn(*args)


def call_many(jobs, done=None, timeout: float = 60.0) -> list:
    """[(fn, *args), …] → their results in order, drawn side by side in the workers (in-process one by one when
    RAL_RENDER_WORKERS=0 or the pool broke). `done(k, n)` is called here, in the caller's process, as each finishes:
    the handler's progress counts figures as they come back."""
    global _POOL
    n, results = len(jobs), [None] * len(jobs)
    if workers():
        try:
            with _Waiting():
                futs = {_pool().submit(j[0], *j[1:]): i for i, j in enumerate(jobs)}
                for k, f in enumerate(as_completed(futs, timeout=timeout), 1):
                    results[futs[f]] = f.result()
                    if done is not None:
                        done(k, n)
            return results
        except BrokenProcessPool:
            log.warning("a render worker died; drawing in-process and restarting the pool")
            with _POOL_LOCK:
                _POOL = None
    for k, j in enumerate(jobs, 1):
        with LOCAL_LOCK:
            results[k - 1] = j[0](*j[1:])
        if done is not None:
            done(k, n)
    return results


# ---- jobs (run in a worker; arguments and results are plain data) -------------------------------------------
def _result_key(result_dir: str) -> tuple:
    """The saved result's identity, not only its path: work folders are never reused (app.sessions), and the file's
    inode and write time make a reused path (a folder deleted and made again) a different key as well."""
    st = os.stat(Path(result_dir) / "result.json")
    return result_dir, st.st_ino, st.st_mtime_ns, st.st_size


def _result(result_dir: str):
    from ral_core.inspection import InspectionResult

    key = _result_key(result_dir)
    if key in _RESULTS:
        _RESULTS.move_to_end(key)
        return _RESULTS[key]
    res = _RESULTS[key] = InspectionResult.load(result_dir)
    while len(_RESULTS) > 8:
        _RESULTS.popitem(last=False)
    return res


def _atomic(save, path: Path) -> Path:
    """save(tmp) then rename onto `path`: a request never reads a figure another request is still writing."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: Path) -> str:
    """ral_core.render.save_figure, written atomically; the figure is closed. Result folders are made by
    app.sessions only: a folder swept while a figure was being drawn ahead into it is never made again."""
    from ral_core import render

    return str(_atomic(lambda p: render.save_figure(fig, p, make_dirs=False), Path(path)))


def save_both(fig, stem: Path) -> list[str]:
    """PNG (shown and downloadable) and SVG of one figure; the figure is closed."""
    svg = _atomic(lambda p: fig.savefig(p, bbox_inches="tight"), stem.with_suffix(".svg"))
    return [save_figure(fig, stem.with_suffix(".png")), str(svg)]


def inspect_view(result_dir: str, boxes, lay, tok, row, out_dir: str, fmt: str = "png",
                 shared_scale: bool = True) -> tuple[str, str]:
    """Overlay and per-head grid of a saved inspection → (overlay path, heads path) in `fmt` (png | svg).

    The page shows PNGs; SVGs are drawn only when asked for (drawing both for every view doubled its cost)."""
    return (overlay_job(result_dir, boxes, lay, tok, row, out_dir, fmt),
            heads_job(result_dir, lay, tok, row, out_dir, fmt, shared_scale))


def overlay_name(lay, tok, row, fmt: str = "png", head="mean") -> str:
    """File name of one overlay in its result's folder: the name is the whole view, and result folders are never
    reused (app.sessions), so a file that exists under this name is that view of that result."""
    return f"attention_L{lay}_T{tok}_{row}" + ("" if head in (None, "mean") else f"_H{head}") + f".{fmt}"


def heads_name(layers, lay, tok, row, fmt: str = "png", shared_scale: bool = True) -> str:
    """File name of one per-head grid (the last layer's for 'mean': heads of different layers are unrelated)."""
    grid_layer = layers[-1] if lay == "mean" else lay
    return f"heads_L{grid_layer}_T{tok}_{row}{'' if shared_scale else '_own'}.{fmt}"


def overlay_job(result_dir: str, boxes, lay, tok, row, out_dir: str, fmt: str = "png", head="mean") -> str:
    """Head-mean overlay (or one head's, `head`) of a saved inspection → its path."""
    from ral_core import render

    res, d = _result(result_dir), Path(out_dir)
    return save_figure(render.inspection_overlay(res, layer=lay, head=head, token=tok, row=row, boxes=boxes),
                       d / overlay_name(lay, tok, row, fmt, head))


def heads_job(result_dir: str, lay, tok, row, out_dir: str, fmt: str = "png", shared_scale: bool = True) -> str:
    """Per-head grid of one layer (the last for 'mean': heads of different layers are unrelated) → its path."""
    from ral_core import render

    res, d = _result(result_dir), Path(out_dir)
    grid_layer = res.layers[-1] if lay == "mean" else lay
    return save_figure(render.head_grid(res, grid_layer, token=tok, row=row, shared_scale=shared_scale),
                       d / heads_name(res.layers, lay, tok, row, fmt, shared_scale))


def _ahead_job(fn, path: str, *args):
    """A figure drawn ahead of its click: skipped when it exists or its result is gone (a swept folder is never made
    again by drawing into it)."""
    if Path(path).is_file() or not (Path(args[0]) / "result.json").is_file():
        return None
    return fn(*args)


# ---- drawing ahead: the likely next picks of a view, one figure at a time, behind any figure a click waits for ---
_AHEAD: list = []                 # [(fn, path, *args)], next first; replaced by each view
_AHEAD_CV = threading.Condition()
_BUSY = 0                         # figures a request is waiting for: drawing ahead waits until they are done
_AHEAD_THREAD: threading.Thread | None = None


def draw_ahead(jobs) -> None:
    """Draw [(fn, path, *args), …] in the workers while nobody waits, one at a time, so a click's own figures queue
    behind at most one of them; the list replaces the previous view's. Only with render workers running (drawing
    in-process would take the server's core); stops with shutdown()."""
    global _AHEAD_THREAD
    if not workers() or _POOL is None:
        return
    with _AHEAD_CV:
        _AHEAD[:] = [j for j in jobs if not Path(j[1]).is_file()]
        if _AHEAD_THREAD is None or not _AHEAD_THREAD.is_alive():
            _AHEAD_THREAD = threading.Thread(target=_ahead_loop, name="ral-draw-ahead", daemon=True)
            _AHEAD_THREAD.start()
        _AHEAD_CV.notify_all()


def _ahead_loop():
    while True:
        with _AHEAD_CV:
            while not _AHEAD or _BUSY:
                if not _AHEAD_CV.wait(timeout=30) and not _AHEAD:
                    return  # idle: the next draw_ahead starts a new thread
            job = _AHEAD.pop(0)
            pool = _POOL
        if pool is None:
            continue
        try:
            pool.submit(_ahead_job, *job).result(timeout=120)
        except Exception as e:  # noqa: BLE001 - a figure drawn ahead is only a guess; the click draws it anyway
            log.debug("drawing ahead failed: %s", e)


class _Waiting:
    """A request waits for figures: drawing ahead pauses until it is served."""

    def __enter__(self):
        global _BUSY
        with _AHEAD_CV:
            _BUSY += 1

    def __exit__(self, *exc):
        global _BUSY
        with _AHEAD_CV:
            _BUSY -= 1
            _AHEAD_CV.notify_all()


def summary_job(result_dir: str, metric: str, tok, row, out_dir: str) -> tuple[str, dict]:
    """Layer × head summary (ral_core.render.layer_head_summary) → (PNG path, where its cells are in that PNG).

    The grid's box is measured on the figure as saved (a tight bounding box, padded), so a click's pixel in the PNG
    maps to one (layer, head): {"box": [x0, y0, x1, y1], "size": [w, h], "layers": [...], "heads": H}, also written
    beside the PNG (same name, .json)."""
    import matplotlib.pyplot as plt

    from ral_core import render

    res, d = _result(result_dir), Path(out_dir)
    fig = render.layer_head_summary(res, metric, token=tok, row=row)
    ax = fig.axes[0]  # the grid (the colour bar's axes comes second)
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    pad, dpi = float(plt.rcParams["savefig.pad_inches"]), fig.dpi
    tight = fig.get_tightbbox(rend)  # inches
    x_off, y_top = (tight.x0 - pad) * dpi, (tight.y1 + pad) * dpi
    ext = ax.get_window_extent(rend)  # display pixels, origin at the bottom left
    geo = {"box": [float(v) for v in (ext.x0 - x_off, y_top - ext.y1, ext.x1 - x_off, y_top - ext.y0)],
           "size": [float((tight.width + 2 * pad) * dpi), float((tight.height + 2 * pad) * dpi)],
           "layers": [int(x) for x in res.layers], "heads": int(res.num_heads)}
    path = Path(save_figure(fig, d / f"summary_{metric}_T{tok}_{row}.png"))
    _atomic(lambda p: p.write_text(json.dumps(geo)), path.with_suffix(".json"))  # beside the PNG: what a click hits
    return str(path), geo
