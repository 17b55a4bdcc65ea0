"""The Inspect tab: answer + capture once, then every redraw (layer, token, row, colour scale, the layer × head
summary and its cells, SVG downloads) comes from the stored result (gr.State) and never re-runs a model.
Figures are drawn in the render workers (app.render_pool)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core.errors import RALError
from ral_core.inspection import ROWS
from ral_core.limits import request_seconds

from app import model_work, registry, render_pool
from app.common import (LAST, MEAN, answer_text, check_state, code, example_for, existing, flag, gen_options, guard,
                        image_from_upload, keep_layer, layer_choices, model_progress, new_work, parse_question,
                        pixel_budget, selection, token_choices, zip_dir)
from app.progress import Reporter

SUMMARY_METRICS = [("attention on the image", "image_mass"), ("entropy of the image attention", "entropy")]
INSPECT_PLAN = [("load", 2), ("model", 6), ("save", 1), ("draw", 2)]

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



def _inspect_view(state, layer, token, row, per_head_scale=False, rep: Reporter | None = None) -> InspectView:
    """Overlay and head grid: a figure already in the result's folder (drawn for an earlier pick, or ahead of this
    one) is served as it is; the others are drawn side by side in the render workers, progress counting them as they
    come back. Then the likely next picks are drawn ahead (render_pool.draw_ahead)."""
    res, d = state["result"], Path(state["dir"])
    lay, tok, row = selection(res.layers, layer, token, row)
    shared = not flag(per_head_scale, "the per-head colour scale option")
    if not (d / "result").is_dir():
        raise RALError("this result was cleaned up; run it again")
    over, heads = _figure_jobs(state, lay, tok, row, shared)
    todo = [j for j in (over, heads) if not (REUSE_FIGURES and Path(j[1]).is_file())]
    n = len(todo)
    done = None
    if rep is not None:  # figures served as they were count as done
        rep.report("draw", 0.0, "drawing the overlay and the per-head maps")
        done = lambda k, _: rep.report("draw", (k + 2 - n) / 2, f"drawing figures: {k + 2 - n}/2 done")  # noqa: E731
    render_pool.call_many([(j[0],) + j[2:] for j in todo], done)
    if rep is not None and not n:
        rep.report("draw", 1.0, "drawing figures: 2/2 done")
    over, heads = over[1], heads[1]
    state["view"] = (lay, tok, row, shared)
    render_pool.draw_ahead(_next_picks(state, lay, tok, row, shared))
    m = res.mass_split(layer=lay, token=tok, row=row)
    mass = {"image": m["image"], "question & system text": m["prompt_text"], "earlier answer tokens": m["answer"]}
    return InspectView("", over, heads, mass, [over, heads] + existing(state["zip"]))


def _figure_jobs(state, lay, tok, row, shared) -> tuple[tuple, tuple]:
    """(fn, path it writes, *args) of the overlay and the head grid of one view."""
    d, layers = Path(state["dir"]), state["result"].layers
    rd = str(d / "result")
    return ((render_pool.overlay_job, str(d / render_pool.overlay_name(lay, tok, row)), rd, state["boxes"], lay, tok,
             row, str(d)),
            (render_pool.heads_job, str(d / render_pool.heads_name(layers, lay, tok, row, "png", shared)), rd, lay,
             tok, row, str(d), "png", shared))


REUSE_FIGURES = True  # serve a view's figures from the result's folder when drawn before (bench/scrub_bench.py: off)
AHEAD_VIEWS = 24  # views drawn ahead after each pick (two figures each); the queue is replaced by the next pick


def _next_picks(state, lay, tok, row, shared) -> list[tuple]:
    """The figures a user scrubbing from this view most likely asks for next: the neighbouring tokens and layers,
    then every token at this layer and every layer at this token, then the other row and colour scale."""
    res = state["result"]
    toks, lays = [MEAN] + list(range(res.n_tokens)), [MEAN] + list(res.layers)
    ti, li = toks.index(tok), lays.index(lay)

    def around(seq, i):  # i+1, i-1, i+2, i-2, …
        out = []
        for k in range(1, len(seq)):
            out += [seq[j] for j in (i + k, i - k) if 0 <= j < len(seq)]
        return out

    views = [(lay, t, row, shared) for t in around(toks, ti)[:2]] + [(x, tok, row, shared) for x in around(lays, li)[:2]]
    views += [(lay, t, row, shared) for t in around(toks, ti)[2:]] + [(x, tok, row, shared) for x in around(lays, li)[2:]]
    views += [(lay, tok, r, shared) for r in ROWS if r != row] + [(lay, tok, row, not shared)]
    jobs, seen = [], set()
    for v in views[:AHEAD_VIEWS if REUSE_FIGURES else 0]:
        for j in _figure_jobs(state, *v):
            if j[1] not in seen:
                seen.add(j[1])
                jobs.append(j)
    return jobs


class FilesOut(NamedTuple):
    status: str
    files: Any


@guard(FilesOut)
def inspect_svg(state, request: gr.Request = None) -> FilesOut:
    """SVG versions of the figures on show, added to the downloads (drawn only when asked for)."""
    st = check_state(state, request, "result")
    view = st.get("view") or (st["result"].layers[-1], MEAN, "predicts")
    lay, tok, row, shared = (tuple(view) + (True,))[:4]
    d = Path(st["dir"])
    over, heads = render_pool.call(render_pool.inspect_view, str(d / "result"), st["boxes"], lay, tok, row, str(d),
                                   "svg", shared)
    png = [str(Path(p).with_suffix(".png")) for p in (over, heads)]
    return FilesOut("", existing(*png, over, heads, st["zip"]))



INSPECT_PLAN = [("load", 2), ("model", 6), ("save", 1), ("draw", 2)]


@guard(InspectOut)
def run_inspect(model, image, question, max_new_tokens=16, do_sample=False, temperature=1.0, layer=LAST,
                row="predicts", per_head_scale=False, pixel_budget_px=0, request: gr.Request = None,
                progress=gr.Progress()) -> InspectOut:
    """Answer + capture once, store the result in the session, render the chosen view. Progress: model load (a hub
    download), encoding, each generated token, the capture pass, saving, each figure."""
    rep = Reporter(progress, INSPECT_PLAN)
    img = image_from_upload(image)
    q = parse_question(question)
    opts = gen_options(max_new_tokens, do_sample, temperature)
    budget, clamped = pixel_budget(pixel_budget_px)
    flag(per_head_scale, "the per-head colour scale option")
    spec = registry.resolve(model, request)
    res = model_work.inspect_work(model, spec, img, q, opts, budget, model_progress(rep, "answering and capturing"))
    res.model_name = model
    rep.report("save", 0.0, "saving the result")
    d = new_work(request, "inspections")
    res.save(d / "result")
    ex = example_for(img, q)
    state = {"result": res, "dir": str(d), "boxes": (ex or {}).get("boxes", []), "model": model,
             "expected": (ex or {}).get("answer"), "budget": budget,
             "zip": zip_dir(d / "result", d / "inspection_result")}
    lay = keep_layer(layer, res.layers)
    view = _inspect_view(state, lay, MEAN, row, per_head_scale, rep)
    answer = f"**Answer:** {answer_text(res.answer)} · {res.n_tokens} token(s) · model {code(model)}"
    answer += f" · {res.geometry.n_tokens:,} visual tokens"
    if budget is not None:
        note = res.meta.get("pixel_budget") or ""
        answer += f" · budget {budget:,} px" + (f" ({note})" if note else "")
    if clamped:
        answer += f"  \n{clamped}"
    if res.meta.get("cut_off"):
        answer += f" · ⏱ cut off at the {request_seconds():g} s limit of one request (ask for fewer new tokens)"
    if ex and ex.get("answer"):
        answer += f"  \nExample's expected answer: {code(ex['answer'])} (cyan box: where it is in the image)"
    return InspectOut(view.status, answer,
                      gr.update(choices=token_choices(res.answer_tokens), value=MEAN),
                      gr.update(choices=layer_choices(res.layers), value=lay),
                      view.overlay, view.heads, view.mass, view.files, state)


@guard(InspectView)
def inspect_view(state, layer, token, row="predicts", per_head_scale=False, request: gr.Request = None,
                 progress=gr.Progress()) -> InspectView:
    """Re-render for another layer / token / row / colour scale from the stored result (no model call)."""
    st = check_state(state, request, "result")
    return _inspect_view(st, layer, token, row, per_head_scale, Reporter(progress, [("draw", 1)]))


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
    _, tok, row = selection(res.layers, LAST, token, row)
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


@guard(SummaryOut)
def inspect_summary(state, metric="image_mass", token=MEAN, row="predicts", request: gr.Request = None,
                    progress=gr.Progress()) -> SummaryOut:
    """The layer × head summary of the stored result (visual mass or entropy per layer and head; only the layers
    that were captured: for Qwen3.5 its softmax-attention layers). Nothing run yet: nothing changes."""
    if not state or "result" not in state:
        return SummaryOut("", gr.update(), gr.update(), gr.update())
    st = check_state(state, request, "result")
    path, _ = _summary(st, metric, token, row, Reporter(progress, [("draw", 1)]))
    layers, heads = _cell_choices(st["result"])
    return SummaryOut("", path, gr.update(choices=layers), gr.update(choices=heads))


class NewSummaryOut(NamedTuple):
    status: str
    summary: Any
    cell_layer: Any
    cell_head: Any
    cell: Any


@guard(NewSummaryOut)
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
    _, tok, row = selection(res.layers, LAST, token, row)
    if not (d / "result").is_dir():
        raise RALError("this result was cleaned up; run it again")
    job = _cell_job(st, lay, h, tok, row)
    if REUSE_FIGURES and Path(job[1]).is_file():
        png = job[1]
    else:
        if rep is not None:
            rep.report("draw", 0.0, f"drawing layer {lay}, head {h}")
        png = render_pool.call(job[0], *job[2:])
    render_pool.draw_ahead(_next_cells(st, lay, h, tok, row))
    layers, heads = _cell_choices(res)
    return CellOut("", gr.update(choices=layers, value=str(lay)), gr.update(choices=heads, value=str(h)), png)


def _cell_job(st, lay, h, tok, row) -> tuple:
    """(fn, path it writes, *args) of one head's map."""
    d = Path(st["dir"])
    return (render_pool.overlay_job, str(d / render_pool.overlay_name(lay, tok, row, "png", h)), str(d / "result"),
            st["boxes"], lay, tok, row, str(d), "png", h)


def _next_cells(st, lay, h, tok, row) -> list[tuple]:
    """Head maps a user stepping through heads or layers asks for next: every other head of this layer, nearest
    first, then this head at the neighbouring layers."""
    res = st["result"]
    heads = sorted((x for x in range(res.num_heads) if x != h), key=lambda x: (abs(x - h), x < h))
    li = res.layers.index(lay)
    near = sorted((x for x in range(len(res.layers)) if x != li), key=lambda x: (abs(x - li), x < li))[:2]
    jobs = [_cell_job(st, lay, x, tok, row) for x in heads] + [_cell_job(st, res.layers[x], h, tok, row) for x in near]
    return jobs[:AHEAD_VIEWS if REUSE_FIGURES else 0]


@guard(CellOut)
def inspect_cell(state, layer, head, token=MEAN, row="predicts", request: gr.Request = None,
                 progress=gr.Progress()) -> CellOut:
    """One layer / head's map over the image (the dropdown pair under the summary). Nothing picked: no change."""
    if layer in (None, "") or head in (None, ""):
        return CellOut("", gr.update(), gr.update(), gr.update())
    st = check_state(state, request, "result")
    return _cell_view(st, layer, head, token, row, Reporter(progress, [("draw", 1)]))


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


@guard(CellOut)
def summary_select(state, metric="image_mass", token=MEAN, row="predicts", evt: gr.SelectData = None,
                   request: gr.Request = None, progress=gr.Progress()) -> CellOut:
    """A click on the summary → that cell's layer / head map over the image."""
    st = check_state(state, request, "result")
    rep = Reporter(progress, [("draw", 1)])
    _, geo = _summary(st, metric, token, row, None)
    lay, h = cell_at(geo, getattr(evt, "index", None))
    return _cell_view(st, lay, h, token, row, rep)


