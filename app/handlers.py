"""Event handlers of the app, callable without a browser (tests pass a stand-in request with `session_hash`).

No tensor math here: models run through `ral_core.inspection` / `ral_core.compare`, pictures come from
`ral_core.render`. Changing the layer, token or row re-renders from the stored result (gr.State) and never
re-runs a model. Every user-facing failure becomes one readable line in the status box (plus a toast).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core import render
from ral_core.compare import compare, comparison_figure
from ral_core.errors import RALError
from ral_core.images import check_image, load_image
from ral_core.inspection import ROWS, inspect, inspect_explored
from ral_core.levers import lever_map
from ral_core.limits import check_question_length, deadline, request_seconds

from app import figures, gpu, registry, render_pool, sessions, uploads
from app.progress import Reporter, watch_model

log = logging.getLogger("ral.app")
MEAN, LAST = "mean", "last"  # selector values besides layer / token indices
RENDER_LOCK = render_pool.LOCAL_LOCK  # in-process drawing: pyplot's figure registry is global state
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
MAX_SCORED_CHARS = 300  # a typed answer to score: every lever forward carries it
MAX_BOX_CHARS = 200
# Visual-token budget (the processor's max pixels per image, `VLMAdapter.set_max_pixels`, as `ral inspect --max-pixels`):
# a request's value is never trusted: it is parsed here and clamped to [MIN_BUDGET, max_budget()].
MIN_BUDGET = 112 * 112  # 16 Qwen2-VL tokens (28 px each); Idefics3/SmolVLM: one tile at any budget below a tile
DEFAULT_MAX_BUDGET = 2048 * 2048  # SmolVLM's own longest edge; Qwen2-VL: 5,349 tokens
SUMMARY_METRICS = [("attention on the image", "image_mass"), ("entropy of the image attention", "entropy")]


# ---- examples ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def examples() -> list[dict]:
    """Bundled examples with an absolute `path` and a pixel hash (to recognise them after upload)."""
    items = []
    for f in ("examples.json", "photos.json"):  # digit grids (scripts/make_examples.py), real photos (licences in photos/)
        try:
            items += json.loads((EXAMPLES_DIR / f).read_text())
        except (OSError, ValueError):
            pass
    out = []
    for it in items:
        p = EXAMPLES_DIR / it["image"]
        if p.is_file():
            out.append(dict(it, path=str(p), digest=_digest(load_image(p))))
    return out


def _digest(image) -> str:
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


def _example_for(image, question: str) -> dict | None:
    """The bundled example with these pixels *and* this question (its expected answer and box belong to it)."""
    d, q = _digest(image), " ".join(str(question).split()).casefold()
    return next((e for e in examples() if e["digest"] == d and " ".join(e["question"].split()).casefold() == q),
                None)


# ---- helpers -------------------------------------------------------------------------------------------
def _guard(out_cls):
    """Turn any failure into out_cls(status message, no change for every other output)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                out = fn(*args, **kwargs)
            except (RALError, ValueError) as e:  # ValueError: a selection the stored result does not have
                msg = str(e)
            except Exception as e:  # noqa: BLE001 — last resort: the trace goes to the log, not the page
                log.exception("handler %s failed", fn.__name__)
                msg = f"unexpected error ({type(e).__name__}); the details are in the server log"
            else:
                return out
            gr.Warning(html.escape(msg, quote=False))
            return out_cls(f"⚠️ {msg}", *(gr.update() for _ in out_cls._fields[1:]))
        return wrapper
    return deco


def _image_from_upload(value) -> Any:
    """gr.Image payload (dict, preprocess off), a path or a PIL image (Python callers) → a checked RGB image.

    Only files Gradio received from a browser, or the bundled examples, are opened (uploads.accepted_path);
    messages name the upload, never the server's temp path."""
    if hasattr(value, "size") and hasattr(value, "convert"):
        return check_image(value)
    path, name = uploads.accepted_path(value, [e["path"] for e in examples()],
                                       nothing="no image: upload one or pick an example")
    try:
        return load_image(path)
    except RALError as e:
        raise RALError(str(e).replace(f"'{path}'", f"'{name}'").replace(str(path), name)) from None


def _gen_options(max_new_tokens, do_sample, temperature) -> dict:
    try:
        n, t = int(max_new_tokens), float(temperature)
    except (TypeError, ValueError):
        raise RALError("max new tokens and temperature must be numbers") from None
    if not 1 <= n <= 64:
        raise RALError("max new tokens must be between 1 and 64")
    if do_sample and not 0.05 <= t <= 2.0:
        raise RALError("temperature must be between 0.05 and 2")
    return dict(max_new_tokens=n, do_sample=bool(do_sample), temperature=t if do_sample else 1.0)


def _question(q) -> str:
    """Cheap checks first (type, characters): a 1,000,000-character question is refused before tokenising."""
    return check_question_length("" if q is None else q)


_limit = request_seconds  # seconds one request may hold a model


def max_budget() -> int:
    """The most pixels per image a request may ask for (RAL_MAX_PIXELS, else DEFAULT_MAX_BUDGET)."""
    try:
        return max(MIN_BUDGET, int(os.environ.get("RAL_MAX_PIXELS") or DEFAULT_MAX_BUDGET))
    except ValueError:
        return DEFAULT_MAX_BUDGET


def pixel_budget(value) -> tuple[int | None, str]:
    """A request's visual-token budget → (max pixels per image, or None for the model's own setting; a note when it
    was clamped). 0 or empty: the model's own setting. Also takes 'WxH'. Never trusted: bounded to
    [MIN_BUDGET, max_budget()] here, whatever the page's control allowed."""
    msg = ("the visual-token budget must be a whole number of pixels per image (e.g. 401408 or 640x480), "
           "or 0 for the model's own setting")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or len(str(value)) > 40:
        raise RALError(msg)
    try:
        if isinstance(value, str):
            parts = value.strip().lower().replace(",", "").replace("_", "").replace("*", "x").split("x")
            nums = [float(x) for x in parts]
            if len(nums) > 2 or (len(nums) == 2 and min(nums) <= 0):
                raise ValueError
            v = nums[0] * (nums[1] if len(nums) == 2 else 1)
        else:
            v = float(value)
    except (ValueError, OverflowError):
        raise RALError(msg) from None
    if not math.isfinite(v) or v < 0:
        raise RALError(msg)
    if v == 0:
        return None, ""
    n, hi = int(v), max_budget()
    if n < MIN_BUDGET:
        return MIN_BUDGET, f"visual-token budget raised to {MIN_BUDGET:,} pixels, the least this server accepts"
    if n > hi:
        return hi, f"visual-token budget lowered to {hi:,} pixels, the most this server allows"
    return n, ""


@contextlib.contextmanager
def _pixel_cap(adapter, budget: int | None):
    """The request's pixel budget on the shared adapter for one model call; hold `adapter.lock` (every model use
    does, the inspect batcher too), so no other request sees it. Yields the family's note on what it means."""
    if budget is None:
        yield ""
        return
    old = adapter.max_pixels
    try:
        yield adapter.set_max_pixels(budget)
    finally:
        adapter.max_pixels = old


def _reporter(progress, plan) -> Reporter:
    return Reporter(progress, plan)


def _model_progress(rep: Reporter, what: str):
    """What the model work gets to report with: the reporter itself, or None on ZeroGPU, where the work runs in
    another process (nothing there can call back): then the stage is reported here, as a whole, before the call."""
    if gpu.on_zerogpu():
        rep.begin("model", 0.0, f"{what} on the GPU (load, encode, generate, capture)")
        return None
    return rep


def _shown(tok: str) -> str:
    return tok.replace(" ", "␣").replace("\n", "⏎") or "∅"


def token_choices(tokens: list[str]) -> list[tuple[str, str]]:
    return [("all tokens (mean)", MEAN)] + [(f"{i + 1}: {_shown(t)}", str(i)) for i, t in enumerate(tokens)]


def layer_choices(layers: list[int]) -> list[tuple[str, str]]:
    return [("last layer", LAST), ("mean over layers", MEAN)] + [(f"layer {x}", str(x)) for x in layers]


def _keep_layer(layer, layers) -> str:
    """The user's layer choice, kept across runs when the new result has that layer."""
    return layer if layer in (LAST, MEAN) or (str(layer).isdigit() and int(layer) in layers) else LAST


def _answer_text(answer: str) -> str:
    return f"`{answer}`" if answer else "(empty or whitespace only)"


def _sel(layers, layer, token, row):
    """UI values → selection for ral_core ('mean' or int)."""
    if row not in ROWS:
        raise RALError(f"row must be one of {ROWS}")
    lay = layers[-1] if layer in (None, "", LAST) else MEAN if layer == MEAN else int(layer)
    tok = MEAN if token in (None, "", MEAN) else int(token)
    return lay, tok, row


_save = render_pool.save_both


def _zip(src: Path, dest_stem: Path) -> str:
    return shutil.make_archive(str(dest_stem), "zip", root_dir=src)


def _existing(*paths) -> list[str]:
    return [p for p in paths if Path(p).is_file()]


def _check_state(state, request, key):
    if not state or key not in state:
        raise RALError("nothing to show yet: run it first")
    if not sessions.owns(request, state["dir"]) or not Path(state["dir"]).is_dir():  # never re-created after clean-up
        raise RALError("this result was cleaned up (the session ended or sat idle); run it again")
    return state


N_MODEL_LISTS = 5  # Inspect, Compare A, Compare B, Train model, Train teacher


def model_choices(request: gr.Request = None):
    """Page load: mark the session as a browser page (its folder lives until the tab closes) and refresh the
    model lists (listed names plus this session's checkpoints)."""
    if request is not None and getattr(request, "session_hash", None):
        sessions.mark_page(request)
    c = registry.model_choices(request)
    return tuple(gr.update(choices=c) for _ in range(N_MODEL_LISTS))


# ---- Inspect -------------------------------------------------------------------------------------------
class InspectView(NamedTuple):
    status: str
    overlay: Any   # PNG path
    heads: Any     # PNG path
    mass: Any      # {part: share} for gr.Label
    files: Any     # download paths


class InspectOut(NamedTuple):
    status: str
    answer: Any    # Markdown
    tokens: Any    # update for the token Radio
    layer: Any     # update for the layer Dropdown
    overlay: Any
    heads: Any
    mass: Any
    files: Any
    state: Any     # {"result": InspectionResult, "dir": str, "boxes": list, "zip": str}


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with RENDER_LOCK:
            return fn(*args, **kwargs)
    return wrapper


def _flag(value, what: str) -> bool:
    """A checkbox value as sent (preprocess off): True / False (or absent), nothing else."""
    if value in (None, False, True):
        return bool(value)
    raise RALError(f"{what} must be true or false")


def _inspect_view(state, layer, token, row, per_head_scale=False, rep: Reporter | None = None) -> InspectView:
    """Overlay and head grid, drawn side by side in the render workers; progress counts them as they come back."""
    res, d = state["result"], Path(state["dir"])
    lay, tok, row = _sel(res.layers, layer, token, row)
    shared = not _flag(per_head_scale, "the per-head colour scale option")
    if not (d / "result").is_dir():
        raise RALError("this result was cleaned up; run it again")
    rd = str(d / "result")
    jobs = [(render_pool.overlay_job, rd, state["boxes"], lay, tok, row, str(d)),
            (render_pool.heads_job, rd, lay, tok, row, str(d), "png", shared)]
    done = None
    if rep is not None:
        rep.report("draw", 0.0, "drawing the overlay and the per-head maps")
        done = lambda k, n: rep.report("draw", k / n, f"drawing figures: {k}/{n} done")  # noqa: E731
    over, heads = render_pool.call_many(jobs, done)
    state["view"] = (lay, tok, row, shared)
    m = res.mass_split(layer=lay, token=tok, row=row)
    mass = {"image": m["image"], "question & system text": m["prompt_text"], "earlier answer tokens": m["answer"]}
    return InspectView("", over, heads, mass, [over, heads] + _existing(state["zip"]))


class FilesOut(NamedTuple):
    status: str
    files: Any


@_guard(FilesOut)
def inspect_svg(state, request: gr.Request = None) -> FilesOut:
    """SVG versions of the figures on show, added to the downloads (drawn only when asked for)."""
    st = _check_state(state, request, "result")
    view = st.get("view") or (st["result"].layers[-1], MEAN, "predicts")
    lay, tok, row, shared = (tuple(view) + (True,))[:4]
    d = Path(st["dir"])
    over, heads = render_pool.call(render_pool.inspect_view, str(d / "result"), st["boxes"], lay, tok, row, str(d),
                                   "svg", shared)
    png = [str(Path(p).with_suffix(".png")) for p in (over, heads)]
    return FilesOut("", _existing(*png, over, heads, st["zip"]))


def _adapter(name, spec, rep: Reporter | None):
    """The loaded model, reporting its load (and a hub download's progress) when it is not loaded yet."""
    if rep is not None and not registry.is_loaded(spec):
        rep.report("load", 0.0, f"loading the model '{name}'")
        adapter = registry.get_adapter_for_spec(name, spec, progress=rep.download(name))
        rep.report("load", 1.0, f"loaded the model '{name}'")
        return adapter
    return registry.get_adapter_for_spec(name, spec)


@gpu.gpu_task
def _inspect_work(name, spec, img, q, opts, budget=None, progress=None):
    """Model work of one inspection (on ZeroGPU: inside spaces.GPU, arguments and result pickled; `progress` is
    then None). A request with its own pixel budget runs on its own (with the model's lock held), not batched."""
    adapter = _adapter(name, spec, progress)
    n = opts["max_new_tokens"]
    with watch_model(adapter, progress, ("answer",), n):
        if opts["do_sample"] or gpu.on_zerogpu() or budget is not None:  # a sampled answer has its own seed
            with deadline(_limit()), adapter.lock, _pixel_cap(adapter, budget) as note:
                res = inspect(adapter, img, q, **opts)
            res.meta["pixel_budget"] = note
            return res
        return registry.batcher(adapter).submit(img, q, n, seconds=_limit())


@gpu.gpu_task
def _levers_work(name, spec, sample, strength, budget=None, progress=None):
    adapter = _adapter(name, spec, progress)
    regions = 1 if sample.get("boxes") else 9  # ral_core.levers: the target box, or each ninth of the image
    with deadline(_limit()), adapter.lock, _pixel_cap(adapter, budget), \
            watch_model(adapter, progress, score_total=regions):
        if not sample["answer"]:  # a whitespace-only answer is still the model's answer: score it as generated
            sample = dict(sample, answer=adapter.tokenizer.decode(sample.pop("answer_ids"), skip_special_tokens=True))
        sample.pop("answer_ids", None)
        if not sample["answer"]:
            raise RALError("the model's answer is empty, so there is nothing to score; type an answer to score")
        return sample["answer"], lever_map(adapter, [sample], layers="all", strength=strength)


@gpu.gpu_task
def _explored_work(name, spec, image, question, layers, sigma, seed, n, budget=None, progress=None):
    adapter = _adapter(name, spec, progress)
    with deadline(_limit()), adapter.lock, _pixel_cap(adapter, budget), \
            watch_model(adapter, progress, ("natural answer", "explored answer"), n):
        return inspect_explored(adapter, image, question, layers=layers, sigma=sigma, seed=seed, max_new_tokens=n)


COMPARE_PASSES = ("A answers", "B answers", "A scored on A's answer", "B scored on A's answer")


@gpu.gpu_task
def _compare_work(names, specs, img, q, opts, progress=None):
    a = _adapter(names[0], specs[0], progress)
    b = _adapter(names[1], specs[1], progress)  # the same model twice is one object; compare() only reads
    first, second = sorted((a, b), key=id)  # a fixed order, so two compares never deadlock (RLock: a is b is fine)
    with deadline(_limit()), first.lock, second.lock, \
            watch_model([a, b], progress, COMPARE_PASSES, opts["max_new_tokens"]):  # one watch, compare()'s order
        return compare(a, b, img, q, **opts)


INSPECT_PLAN = [("load", 2), ("model", 6), ("save", 1), ("draw", 2)]


@_guard(InspectOut)
def run_inspect(model, image, question, max_new_tokens=16, do_sample=False, temperature=1.0, layer=LAST,
                row="predicts", per_head_scale=False, pixel_budget_px=0, request: gr.Request = None,
                progress=gr.Progress()) -> InspectOut:
    """Answer + capture once, store the result in the session, render the chosen view. Progress: model load (a hub
    download), encoding, each generated token, the capture pass, saving, each figure."""
    rep = _reporter(progress, INSPECT_PLAN)
    img = _image_from_upload(image)
    q = _question(question)
    opts = _gen_options(max_new_tokens, do_sample, temperature)
    budget, clamped = pixel_budget(pixel_budget_px)
    _flag(per_head_scale, "the per-head colour scale option")
    spec = registry.resolve(model, request)
    res = _inspect_work(model, spec, img, q, opts, budget, _model_progress(rep, "answering and capturing"))
    res.model_name = model
    rep.report("save", 0.0, "saving the result")
    d = sessions.new_work_dir(request, "inspections")
    res.save(d / "result")
    ex = _example_for(img, q)
    state = {"result": res, "dir": str(d), "boxes": (ex or {}).get("boxes", []), "model": model,
             "expected": (ex or {}).get("answer"), "budget": budget,
             "zip": _zip(d / "result", d / "inspection_result")}
    lay = _keep_layer(layer, res.layers)
    view = _inspect_view(state, lay, MEAN, row, per_head_scale, rep)
    answer = f"**Answer:** {_answer_text(res.answer)} · {res.n_tokens} token(s) · model `{model}`"
    answer += f" · {res.geometry.n_tokens:,} visual tokens"
    if budget is not None:
        note = res.meta.get("pixel_budget") or ""
        answer += f" · budget {budget:,} px" + (f" ({note})" if note else "")
    if clamped:
        answer += f"  \n{clamped}"
    if res.meta.get("cut_off"):
        answer += f" · ⏱ cut off at the {_limit():g} s limit of one request (ask for fewer new tokens)"
    if ex and ex.get("answer"):
        answer += f"  \nExample's expected answer: `{ex['answer']}` (cyan box: where it is in the image)"
    return InspectOut(view.status, answer,
                      gr.update(choices=token_choices(res.answer_tokens), value=MEAN),
                      gr.update(choices=layer_choices(res.layers), value=lay),
                      view.overlay, view.heads, view.mass, view.files, state)


@_guard(InspectView)
def inspect_view(state, layer, token, row="predicts", per_head_scale=False, request: gr.Request = None,
                 progress=gr.Progress()) -> InspectView:
    """Re-render for another layer / token / row / colour scale from the stored result (no model call)."""
    st = _check_state(state, request, "result")
    return _inspect_view(st, layer, token, row, per_head_scale, _reporter(progress, [("draw", 1)]))


# ---- Inspect: layer × head summary, click a cell for its map ----------------------------------------------------
class SummaryOut(NamedTuple):
    status: str
    summary: Any      # PNG path
    cell_layer: Any   # update for the cell's layer Dropdown
    cell_head: Any    # update for the cell's head Dropdown


class CellOut(NamedTuple):
    status: str
    cell_layer: Any
    cell_head: Any
    cell: Any         # PNG path: that layer / head over the image


def _metric(metric) -> str:
    m = MEAN if metric in (None, "") else metric
    m = "image_mass" if m == MEAN else m
    if m not in dict((v, k) for k, v in SUMMARY_METRICS):
        raise RALError(f"the summary shows one of: {', '.join(v for _, v in SUMMARY_METRICS)}")
    return m


def _summary(st, metric, token, row, rep: Reporter | None) -> tuple[str, dict]:
    """The summary's PNG and where its cells are, drawn once per (metric, token, row) and kept in the result's
    folder (the layout, not the request, says which cell a click hits)."""
    res, d = st["result"], Path(st["dir"])
    _, tok, row = _sel(res.layers, LAST, token, row)
    m = _metric(metric)
    png, side = d / f"summary_{m}_T{tok}_{row}.png", d / f"summary_{m}_T{tok}_{row}.json"
    if png.is_file() and side.is_file():
        return str(png), json.loads(side.read_text())
    if not (d / "result").is_dir():
        raise RALError("this result was cleaned up; run it again")
    if rep is not None:
        rep.report("draw", 0.0, f"drawing the layer × head summary ({len(res.layers)} layers × {res.num_heads} heads)")
    path, geo = render_pool.call(render_pool.summary_job, str(d / "result"), m, tok, row, str(d))
    if rep is not None:
        rep.report("draw", 1.0, "drew the layer × head summary")
    return path, geo


def _cell_choices(res):
    return ([(f"layer {x}", str(x)) for x in res.layers], [(f"head {h}", str(h)) for h in range(res.num_heads)])


@_guard(SummaryOut)
def inspect_summary(state, metric="image_mass", token=MEAN, row="predicts", request: gr.Request = None,
                    progress=gr.Progress()) -> SummaryOut:
    """The layer × head summary of the stored result (visual mass or entropy per layer and head; only the layers
    that were captured: for Qwen3.5 its softmax-attention layers). Nothing run yet: nothing changes."""
    if not state or "result" not in state:
        return SummaryOut("", gr.update(), gr.update(), gr.update())
    st = _check_state(state, request, "result")
    path, _ = _summary(st, metric, token, row, _reporter(progress, [("draw", 1)]))
    layers, heads = _cell_choices(st["result"])
    return SummaryOut("", path, gr.update(choices=layers), gr.update(choices=heads))


class NewSummaryOut(NamedTuple):
    status: str
    summary: Any
    cell_layer: Any
    cell_head: Any
    cell: Any


@_guard(NewSummaryOut)
def new_summary(state, metric="image_mass", token=MEAN, row="predicts", request: gr.Request = None,
                progress=gr.Progress()) -> NewSummaryOut:
    """After an inspection (the page chains it; API clients that never look at it cost no drawing): its summary,
    and no cell picked (the last pick belonged to the previous result)."""
    out = inspect_summary(state, metric, token, row, request=request, progress=progress)
    if out.status or out.summary == gr.update():
        return NewSummaryOut(out.status, *(gr.update() for _ in range(4)))
    return NewSummaryOut("", out.summary, {**out.cell_layer, "value": None}, {**out.cell_head, "value": None}, None)


def _cell_view(st, layer, head, token, row, rep: Reporter | None) -> CellOut:
    res, d = st["result"], Path(st["dir"])
    try:
        lay, h = int(str(layer)), int(str(head))
    except ValueError:
        raise RALError("pick a layer and a head (or click a cell of the summary)") from None
    if lay not in res.layers:
        raise RALError(f"layer {lay} was not captured; captured layers: {res.layers}")
    if not 0 <= h < res.num_heads:
        raise RALError(f"head {h} is out of range: the model has {res.num_heads} heads (0..{res.num_heads - 1})")
    _, tok, row = _sel(res.layers, LAST, token, row)
    if not (d / "result").is_dir():
        raise RALError("this result was cleaned up; run it again")
    if rep is not None:
        rep.report("draw", 0.0, f"drawing layer {lay}, head {h}")
    png = render_pool.call(render_pool.overlay_job, str(d / "result"), st["boxes"], lay, tok, row, str(d), "png", h)
    layers, heads = _cell_choices(res)
    return CellOut("", gr.update(choices=layers, value=str(lay)), gr.update(choices=heads, value=str(h)), png)


@_guard(CellOut)
def inspect_cell(state, layer, head, token=MEAN, row="predicts", request: gr.Request = None,
                 progress=gr.Progress()) -> CellOut:
    """One layer / head's map over the image (the dropdown pair under the summary). Nothing picked: no change."""
    if layer in (None, "") or head in (None, ""):
        return CellOut("", gr.update(), gr.update(), gr.update())
    st = _check_state(state, request, "result")
    return _cell_view(st, layer, head, token, row, _reporter(progress, [("draw", 1)]))


def cell_at(geo: dict, index) -> tuple[int, int]:
    """A click at pixel `index` = [x, y] of the summary PNG → (layer, head), from the grid's box in that PNG."""
    try:
        x, y = (float(v) for v in index)
    except (TypeError, ValueError):
        raise RALError("click a cell of the layer × head summary") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise RALError("click a cell of the layer × head summary")
    x0, y0, x1, y1 = geo["box"]
    L, H = len(geo["layers"]), int(geo["heads"])
    if not (x0 <= x < x1 and y0 <= y < y1):
        raise RALError("that click is outside the grid: click a cell of the layer × head summary")
    i = min(int((y - y0) / (y1 - y0) * L), L - 1)
    j = min(int((x - x0) / (x1 - x0) * H), H - 1)
    return geo["layers"][i], j


@_guard(CellOut)
def summary_select(state, metric="image_mass", token=MEAN, row="predicts", evt: gr.SelectData = None,
                   request: gr.Request = None, progress=gr.Progress()) -> CellOut:
    """A click on the summary → that cell's layer / head map over the image."""
    st = _check_state(state, request, "result")
    rep = _reporter(progress, [("draw", 1)])
    _, geo = _summary(st, metric, token, row, None)
    lay, h = cell_at(geo, getattr(evt, "index", None))
    return _cell_view(st, lay, h, token, row, rep)


# ---- Inspect: causal levers ----------------------------------------------------------------------------
class LeverOut(NamedTuple):
    status: str
    chart: Any     # PNG path
    summary: Any   # Markdown


def _box(text, image) -> list[tuple[float, float, float, float]]:
    """'x0,y0,x1,y1' in image pixels → one box (empty text → no box)."""
    if text is None or not str(text).strip():
        return []
    if len(str(text)) > MAX_BOX_CHARS:
        raise RALError("the target box must be four numbers x0,y0,x1,y1; that text is far too long")
    W, H = image.size
    msg = (f"the target box must be four numbers x0,y0,x1,y1 in pixels of the {W}×{H} image "
           f"(e.g. 0,0,{W // 3},{H // 3})")
    try:
        vals = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise RALError(msg) from None
    if len(vals) != 4:
        raise RALError(msg)
    x0, y0, x1, y1 = vals
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise RALError(msg + "; it must lie inside the image with x0 < x1 and y0 < y1")
    return [(x0, y0, x1, y1)]


def _model_of(state) -> str:
    return state.get("model") or state["result"].model_name


@_guard(LeverOut)
def run_levers(state, box="", answer="", strength=3.0, request: gr.Request = None,
               progress=gr.Progress()) -> LeverOut:
    """Steer each layer's attention toward / away from the target region and measure the answer's log-prob."""
    rep = _reporter(progress, [("load", 1), ("model", 8), ("draw", 1)])
    st = _check_state(state, request, "result")
    res = st["result"]
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise RALError("the nudge strength must be a number") from None
    if not 0.5 <= s <= 10:
        raise RALError("the nudge strength must be between 0.5 and 10")
    if len(str(answer or "")) > MAX_SCORED_CHARS:
        raise RALError(f"the answer to score is {len(str(answer)):,} characters; the limit is {MAX_SCORED_CHARS} — "
                       "shorten it")
    ans = str(answer or "").strip() or res.answer
    boxes = _box(box, res.image)
    where = "the box you typed"
    if not boxes and st.get("boxes"):
        boxes, where = [tuple(b) for b in st["boxes"]], "the example's known answer region (cyan box)"
    elif not boxes:
        where = "the ninth of the image where steering mattered most (no target box given)"
    sample = {"image": res.image, "question": res.question, "answer": ans, "boxes": boxes,
              "answer_ids": list(res.answer_ids)}
    name = _model_of(st)
    ans, lmap = _levers_work(name, registry.resolve(name, request), sample, s, st.get("budget"),
                             _model_progress(rep, "steering each layer"))
    d = Path(st["dir"])
    rep.report("draw", 0.0, "drawing the lever chart")
    with RENDER_LOCK:
        png = str(render.save_figure(render.lever_chart(lmap), d / f"levers_{len(list(d.glob('levers_*')))}.png"))
    top = lmap.ranked()[0]
    i = lmap.layers.index(top)
    weakest = lmap.ranked()[-1]
    sign = "more" if lmap.effect[i] > 0 else "less"
    shown = ans if ans.strip() else _shown(ans)
    summary = (f"Scoring the answer `{shown}`, steering toward {where}. **Layer {top} is the strongest lever:** "
               f"pushing its attention toward the target instead of away makes the answer {sign} likely "
               f"(log-probability {lmap.effect[i]:+.2f}, probability {lmap.prob_effect[i]:+.3f}). "
               f"Layer {weakest} matters least ({lmap.effect[lmap.layers.index(weakest)]:+.2f}). "
               "One image only, so the correlation line is not defined (it needs ≥ 3 samples; `ral levers` "
               "measures many).")
    if abs(lmap.effect[i]) < 0.05:
        summary += " All effects are tiny: where this model looks hardly changes this answer."
    exp = st.get("expected")
    if exp and not str(answer or "").strip() and ans.strip() != exp:
        summary += (f" The model's answer is not the example's expected `{exp}`: type that into 'answer to score' "
                    "to see which layers' attention would help the right answer.")
    return LeverOut("", png, summary)


# ---- Inspect: an explored rollout ------------------------------------------------------------------------
class ExploreOut(NamedTuple):
    status: str
    figure: Any    # PNG path: natural | explored
    answers: Any   # Markdown


def explore_layer_choices(state):
    """Layer choices for the explored rollout, after an inspection."""
    layers = state["result"].layers if state and "result" in state else []
    return gr.update(choices=[("last layer", LAST), ("all layers", "all")] + [(f"layer {x}", str(x)) for x in layers])


@_guard(ExploreOut)
def run_explored(state, sigma=2.0, layers=LAST, seed=0, max_new_tokens=16, request: gr.Request = None,
                 progress=gr.Progress()) -> ExploreOut:
    """The model's own greedy answer next to one answer with a random attention bias (as exploration samples)."""
    rep = _reporter(progress, [("load", 1), ("model", 8), ("draw", 1)])
    st = _check_state(state, request, "result")
    res = st["result"]
    try:
        sg, sdf = float(sigma), float(seed)
    except (TypeError, ValueError):
        raise RALError("σ and the seed must be numbers") from None
    if not 0 < sg <= 5:
        raise RALError("σ must be above 0 and at most 5")
    if not (sdf.is_integer() and 0 <= sdf <= 2**32 - 1):
        raise RALError(f"the seed must be a whole number between 0 and {2**32 - 1:,} (got {seed!r})")
    sd = int(sdf)
    n = _gen_options(max_new_tokens, False, 1.0)["max_new_tokens"]
    if layers in (None, "", LAST):
        lay = "last"
    elif layers == "all":
        lay = "all"
    elif str(layers).isdigit() and int(layers) in res.layers:
        lay = [int(layers)]
    else:
        raise RALError(f"layer must be 'last', 'all' or one of {res.layers}")
    name = _model_of(st)
    nat, exp = _explored_work(name, registry.resolve(name, request), res.image, res.question, lay, sg, sd, n,
                              st.get("budget"), _model_progress(rep, "answering twice (natural, explored)"))
    rep.report("draw", 0.0, "drawing natural | explored")
    ex_layers = exp.meta["explore_layers"]
    show = ex_layers[0] if len(ex_layers) == 1 else MEAN
    shown = f"layer {show}" if show != MEAN else "mean over layers"
    d = Path(st["dir"])
    with RENDER_LOCK:
        fig = figures.pair_overlay(
            nat, exp, f"natural: answers {nat.answer!r}\n{shown}, mean over heads & tokens",
            f"explored (σ={sg:g}, seed {sd}): answers {exp.answer!r}\n{shown}, same colour scale",
            layer=show, boxes=st.get("boxes", []))
        png = str(render.save_figure(fig, d / f"explored_{len(list(d.glob('explored_*')))}.png"))
    where = "all layers" if len(ex_layers) > 1 else f"layer {ex_layers[0]}"
    changed = nat.answer != exp.answer
    answers = (f"**Natural answer:** {_answer_text(nat.answer)} · **explored answer:** {_answer_text(exp.answer)} "
               f"(random bias on the image attention at {where}, σ = {sg:g}, seed {sd}). " +
               ("The nudge **changed the answer**: this layer's attention is a lever here." if changed else
                "Same answer: the nudge moved where the model looked but not what it said."))
    return ExploreOut("", png, answers)


# ---- Compare -------------------------------------------------------------------------------------------
class CompareView(NamedTuple):
    status: str
    figure: Any    # PNG path: A | B | B − A
    ranking: Any   # rows for the head table
    files: Any


class CompareOut(NamedTuple):
    status: str
    answers: Any
    tokens: Any
    layer: Any
    figure: Any
    ranking: Any
    files: Any
    state: Any     # {"cmp": Comparison, "dir": str, "zip": str}


RANK_HEADERS = ["rank", "head", "JSD between A and B", "A: image share", "B: image share"]


@_locked
def _compare_view(state, layer, token, row, rep: Reporter | None = None) -> CompareView:
    cmp, d = state["cmp"], Path(state["dir"])
    lay, tok, row = _sel(cmp.layers, layer, token, row)
    if rep is not None:
        rep.report("draw", 0.0, "drawing A | B | B − A and ranking the heads")
    rank_layer = cmp.layers[-1] if lay == MEAN else lay  # per-head ranking needs one layer
    files = _save(comparison_figure(cmp, layer=lay, token=tok, row=row), d / f"compare_L{lay}_T{tok}_{row}")
    rows = []
    for i, (h, v) in enumerate(cmp.ranked_heads(rank_layer, token=tok, row=row)):
        ma = cmp.a.mass_split(layer=rank_layer, head=h, token=tok, row=row)["image"]
        mb = cmp.b.mass_split(layer=rank_layer, head=h, token=tok, row=row)["image"]
        rows.append([i + 1, f"layer {rank_layer} head {h}", float(f"{v:.3g}"), round(ma, 3), round(mb, 3)])
    return CompareView("", files[0], rows, files + _existing(state["zip"]))


@_guard(CompareOut)
def run_compare(model_a, model_b, image, question, max_new_tokens=16, do_sample=False, temperature=1.0,
                layer=LAST, row="predicts", request: gr.Request = None, progress=gr.Progress()) -> CompareOut:
    """A answers; A and B are both scored teacher-forced on A's answer; each model's free answer is shown."""
    rep = _reporter(progress, [("load", 2), ("model", 10), ("save", 1), ("draw", 2)])
    img = _image_from_upload(image)
    q = _question(question)
    opts = _gen_options(max_new_tokens, do_sample, temperature)
    cmp = _compare_work((model_a, model_b), (registry.resolve(model_a, request), registry.resolve(model_b, request)),
                        img, q, opts, _model_progress(rep, "A answers, both are scored"))
    if not cmp.layers:
        raise RALError(f"the two models have no attention layer in common (A: layers {cmp.a.layers}, B: layers "
                       f"{cmp.b.layers}), so their maps cannot be compared layer by layer; pick models of one shape")
    rep.report("save", 0.0, "saving both results")
    d = sessions.new_work_dir(request, "compare")
    cmp.a.save(d / "results" / "model_a")
    cmp.b.save(d / "results" / "model_b")
    state = {"cmp": cmp, "dir": str(d), "zip": _zip(d / "results", d / "comparison_results")}
    lay = _keep_layer(layer, cmp.layers)
    view = _compare_view(state, lay, MEAN, row, rep)
    answers = (f"**A (`{model_a}`) answers:** {_answer_text(cmp.free_answer_a)}  \n"
               f"**B (`{model_b}`) answers:** {_answer_text(cmp.free_answer_b)}  \n"
               f"Both maps below are measured on A's answer tokens, fed to both models.")
    if not cmp.same_tokens:
        answers += "  \n(B's tokeniser splits that answer differently: only 'all tokens (mean)' is comparable.)"
    return CompareOut(view.status, answers, gr.update(choices=token_choices(cmp.a.answer_tokens), value=MEAN),
                      gr.update(choices=layer_choices(cmp.layers), value=lay),
                      view.figure, view.ranking, view.files, state)


@_guard(CompareView)
def compare_view(state, layer, token, row="predicts", request: gr.Request = None,
                 progress=gr.Progress()) -> CompareView:
    """Re-render the comparison for another layer / token / row (no model call)."""
    return _compare_view(_check_state(state, request, "cmp"), layer, token, row, _reporter(progress, [("draw", 1)]))


def end_session(request: gr.Request = None):
    """Delete the session folder (the app wires `training.end_session`, which also stops a running run)."""
    sessions.cleanup(request)
