"""The Inspect tab's "does it matter?" panel: knock out every head of the stored inspection (ral_core/causal.py), a
grid of the answer's log-probability change beside the layer × head summary (click a cell: that head's map and its
effect), blocking the answer's attention to the target box, and sink tokens flagged on the map with a toggle that
renormalises it without them. Running the checks re-runs the model; every redraw comes from the saved record."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core import causal, render
from ral_core.errors import RALError
from ral_core.limits import deadline, request_seconds

from app import gpu, registry
from app.common import (LAST, MEAN, RENDER_LOCK, answer_text, check_state, flag, guard, model_progress,
                        plain_markdown, selection)
from app.inspect_probes import _box, _model_of
from app.inspect_tab import cell_at
from app.model_work import served
from app.progress import Reporter, watch_model

EXPLAIN = ("**Does this head matter?** A map shows where a head looked, not whether the answer needed it. *Knock out "
           "every head* zeroes one head's output at a time (all others intact) and measures the answer's "
           "log-probability: blue cells are heads the answer needs, red ones heads that held it back; ≈ 0: the "
           "head's look did not produce this answer. Click a cell for that head's map and its effect. *Blocking* "
           "keeps the answer from attending to the target box (the example's, or the one you type) and shows the "
           "new greedy answer. Dashed green: sink tokens that soak up most heads' attention; tick the box to see "
           "the map without them.")


@gpu.gpu_task
def causal_work(name, spec, image, question, answer_ids, boxes, n, budget=None, progress=None, block_layers="all"):
    """Knock-out grid, and blocking of `boxes` when given (the model's lock held, under the request's time limit)."""
    s = served(name, spec, progress)
    passes = 1 + len(s.adapter.attention_layers) + (2 if boxes else 0)  # scored forwards: base, one per layer, block
    with deadline(request_seconds()), s.lock, watch_model(s.adapter, progress, ("knock-out grid",), n,
                                                          score_total=passes):
        adapter, _ = s.view(name, budget)
        ko = causal.knockout(adapter, image, question, answer_ids)
        blocks = [causal.block_region(adapter, image, question, answer_ids, boxes, layers=block_layers,
                                      max_new_tokens=n)] if boxes else []
    return ko, blocks


class CausalOut(NamedTuple):
    status: str
    grid: Any       # PNG path: the knock-out grid (click a cell)
    summary: Any    # Markdown
    blocking: Any   # PNG path, or None without a box


class CausalCellOut(NamedTuple):
    status: str
    cell: Any       # PNG path: that head's map, its effect in the title
    effect: Any     # Markdown


def _grid_geometry(fig) -> dict:
    """Where the grid's axes sit in the saved PNG (tight bounding box, padded): what a click's pixel hits."""
    import matplotlib.pyplot as plt

    ax = fig.axes[0]
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    pad, dpi = float(plt.rcParams["savefig.pad_inches"]), fig.dpi
    tight = fig.get_tightbbox(rend)
    x_off, y_top = (tight.x0 - pad) * dpi, (tight.y1 + pad) * dpi
    ext = ax.get_window_extent(rend)
    return {"box": [float(v) for v in (ext.x0 - x_off, y_top - ext.y1, ext.x1 - x_off, y_top - ext.y0)]}


def _draw_grid(st, ko, token) -> str:
    d = Path(st["dir"])
    with RENDER_LOCK:
        fig = render.knockout_grid(ko, token=token)
        geo = _grid_geometry(fig)
        png = render.save_figure(fig, d / f"knockout_T{token}_{time.time_ns():x}.png")
    st["causal_geo"] = dict(geo, layers=list(ko.layers), heads=int(ko.num_heads))
    png.with_suffix(".json").write_text(json.dumps(st["causal_geo"]))  # what a click hits, beside the PNG
    return str(png)


def _summary(ko, blocks, sinks) -> str:
    top = ko.ranked(n=3)
    parts = [f"**Knock-out grid:** {len(ko.layers)} layers × {ko.num_heads} heads in {ko.forwards} forwards "
             f"(one per head would take {ko.naive_forwards}), {ko.seconds:.1f} s."]
    if top and top[0][2] < 0:
        parts.append("The answer needs most: " + ", ".join(f"layer {l} head {h} ({d:+.3f})" for l, h, d in top
                                                           if d < 0) + " (Δ log p per answer token).")
    if float(abs(ko.effect()).max()) < 0.01:
        parts.append("No single head matters much for this answer (every |Δ log p| < 0.01).")
    for b in blocks:
        parts.append(f"**Blocking:** the answer's attention to the box ({len(b.blocked_tokens)} visual token(s), "
                     f"layer(s) {causal._span(b.layers)}): Δ log p {b.mean_delta:+.3g} per answer token; greedy "
                     f"answer {answer_text(b.answer)} → {answer_text(b.new_answer)}"
                     + (" (**changed**)." if b.changed else " (unchanged)."))
    parts.append(f"**Sinks:** {len(sinks.tokens)} visual token(s) outlined (dashed green)." if sinks.tokens else
                 "**Sinks:** none among the visual tokens (no token takes > 30 % of the row in most heads).")
    return " ".join(parts)


@guard(CausalOut)
def run_causal(state, box="", block_layers="all", token=MEAN, request: gr.Request = None,
               progress=gr.Progress()) -> CausalOut:
    """Knock out each head of every captured layer on the stored answer; block the target box at `block_layers`
    ('all', 'last' or numbers); find the sinks."""
    rep = Reporter(progress, [("load", 1), ("model", 8), ("draw", 1)])
    st = check_state(state, request, "result")
    res = st["result"]
    _, tok, _ = selection(res.layers, LAST, token, "predicts")
    boxes = _box(box, res.image) or [tuple(b) for b in st.get("boxes") or []]
    blk = causal.parse_layers(block_layers or "all", "the layers to block")
    if blk is None:
        boxes = []
    name = _model_of(st)
    n = max(1, min(len(res.answer_ids) + 4, 32))
    ko, blocks = causal_work(name, registry.resolve(name, request), res.image, res.question, list(res.answer_ids),
                             [list(b) for b in boxes], n, st.get("budget"),
                             model_progress(rep, "knocking out every head"), blk)
    sinks = causal.detect_sinks(res)
    c = causal.CausalResult(knockout=ko, blocks=blocks, sinks=sinks, meta={"model_name": name})
    rd = Path(st["dir"]) / "result"
    if not rd.is_dir():
        raise RALError("this result was cleaned up; run it again")
    c.save(rd)
    st["causal"] = c
    rep.report("draw", 0.0, "drawing the knock-out grid")
    grid = _draw_grid(st, ko, tok)
    block_png = None
    if blocks:
        with RENDER_LOCK:
            block_png = str(render.save_figure(render.blocking_overlay(res, blocks[0]),
                                               Path(st["dir"]) / f"blocking_{time.time_ns():x}.png"))
    return CausalOut("", grid, _summary(ko, blocks, sinks), block_png)


def _stored(st) -> causal.CausalResult:
    c = st.get("causal")
    if c is None:
        try:
            c = causal.CausalResult.load(Path(st["dir"]) / "result")
        except RALError:
            raise RALError("press 'Knock out every head' first") from None
        st["causal"] = c
    return c


def _cell(st, layer, head, token, clean) -> CausalCellOut:
    res, c = st["result"], _stored(st)
    ko = c.knockout
    _, tok, _ = selection(res.layers, LAST, token, "predicts")
    clean = flag(clean, "the 'without sinks' option")
    if layer not in ko.layers or not 0 <= int(head) < ko.num_heads:
        raise RALError(f"pick a cell of the grid: layers {ko.layers}, heads 0..{ko.num_heads - 1}")
    sinks = c.sinks or causal.detect_sinks(res)
    with RENDER_LOCK:
        png = str(render.save_figure(render.head_effect_overlay(res, ko, layer, int(head), token=tok, sinks=sinks,
                                                                clean=clean),
                                     Path(st["dir"]) / f"causal_cell_{time.time_ns():x}.png"))
    st["causal_cell"] = (layer, int(head))
    d = ko.cell(layer, int(head), tok)
    rank = [(l, h) for l, h, _ in ko.ranked(tok)].index((layer, int(head))) + 1
    verdict = ("the answer needs this head" if d < -0.01 else "this head held the answer back" if d > 0.01 else
               "the answer hardly depends on this head alone")
    n = len(ko.layers) * ko.num_heads
    return CausalCellOut("", png, f"**Layer {layer}, head {head}:** knocking it out changes log p of the answer by "
                                  f"**{d:+.4f}** per token ({verdict}; rank {rank} of {n}).")


@guard(CausalCellOut)
def causal_select(state, token=MEAN, clean=False, evt: gr.SelectData = None, request: gr.Request = None
                  ) -> CausalCellOut:
    """A click on the knock-out grid → that head's map and its knock-out effect."""
    st = check_state(state, request, "result")
    geo = st.get("causal_geo")
    if not geo:
        raise RALError("press 'Knock out every head' first")
    layer, head = cell_at(geo, getattr(evt, "index", None))
    return _cell(st, layer, head, token, clean)


@guard(CausalCellOut)
def causal_redraw(state, token=MEAN, clean=False, request: gr.Request = None) -> CausalCellOut:
    """The picked cell again, for another answer token or with / without the sink tokens. None picked: no change."""
    st = check_state(state, request, "result")
    if not st.get("causal_cell"):
        return CausalCellOut("", gr.update(), gr.update())
    return _cell(st, *st["causal_cell"], token, clean)


@guard(CausalOut)
def causal_regrid(state, token=MEAN, request: gr.Request = None) -> CausalOut:
    """The knock-out grid for another answer token, from the saved record (no model call). Not run yet: no change."""
    st = check_state(state, request, "result")
    if not st.get("causal_geo"):
        return CausalOut("", gr.update(), gr.update(), gr.update())
    _, tok, _ = selection(st["result"].layers, LAST, token, "predicts")
    return CausalOut("", _draw_grid(st, _stored(st).knockout, tok), gr.update(), gr.update())


# ---- layout and wiring (called from app/main.py inside the Inspect tab) ----------------------------------------
def layout() -> dict:
    """The panel's components, in an accordion under the layer × head summary."""
    with gr.Accordion("Does this head matter? Head knock-out, region blocking, sinks", open=False,
                      elem_id="i-causal-section"):
        gr.Markdown(EXPLAIN, elem_classes=["explain"])
        with gr.Row():
            box = gr.Textbox(label="region to block: x0,y0,x1,y1 in pixels (optional)",
                             placeholder="empty: the example's box (none for other images: no blocking)",
                             elem_id="i-causal-box")
            block_layers = gr.Textbox("all", label="layers where it is blocked", max_lines=1,
                                      info="'all', 'last', 'none' or numbers such as 0,2", elem_id="i-causal-layers")
            run = gr.Button("Knock out every head", elem_id="i-causal-run")
        status = plain_markdown(elem_id="i-causal-status")
        summary = gr.Markdown(elem_id="i-causal-summary", latex_delimiters=[])  # model text: '$' is a dollar
        with gr.Row():
            with gr.Column(scale=3, min_width=400):
                grid = gr.Image(label="Knock-out grid (click a cell)", show_label=False, format="png",
                                interactive=False, elem_id="i-causal-grid")
            with gr.Column(scale=2, min_width=240):
                clean = gr.Checkbox(False, label="show the map without the sink tokens (renormalised)",
                                    elem_id="i-causal-clean")
                cell = gr.Image(label="That head's map and its knock-out effect", show_label=False, format="png",
                                interactive=False, elem_id="i-causal-cell", height=330)
                effect = gr.Markdown(elem_id="i-causal-effect", latex_delimiters=[])
        blocking = gr.Image(label="Blocking the region", show_label=False, format="png", interactive=False,
                            elem_id="i-causal-blocking", height=330)
    return {"box": box, "block_layers": block_layers, "run": run, "status": status, "summary": summary, "grid": grid,
            "clean": clean, "cell": cell, "effect": effect, "blocking": blocking}


def wire(c: dict, state, tokens) -> None:
    out = [c["status"], c["grid"], c["summary"], c["blocking"]]
    cell_out = [c["status"], c["cell"], c["effect"]]
    c["run"].click(run_causal, [state, c["box"], c["block_layers"], tokens], out, api_name="causal",
                   preprocess=False)
    c["grid"].select(causal_select, [state, tokens, c["clean"]], cell_out, api_visibility="private",
                     preprocess=False)
    c["clean"].input(causal_redraw, [state, tokens, c["clean"]], cell_out, api_name="causal_cell", preprocess=False)
    tokens.input(causal_regrid, [state, tokens], out, api_visibility="private", show_progress="minimal",
                 preprocess=False).then(causal_redraw, [state, tokens, c["clean"]], cell_out,
                                        api_visibility="private", show_progress="minimal", preprocess=False)


# ---- Compare: did the heads that moved also change what they do for the answer? ---------------------------------
KO_HEADERS = ["rank by knock-out change", "head", "A: Δ log p knocked out", "B: Δ log p knocked out",
              "|B − A|", "rank by attention moved (JSD)"]


class CompareKnockoutOut(NamedTuple):
    status: str
    ranking: Any    # rows under KO_HEADERS


@gpu.gpu_task
def compare_knockout_work(names, specs, image, question, ids_a, ids_b, layer, progress=None):
    """Both models' knock-out grids of one layer, each on its own tokens of A's answer (one model at a time)."""
    out = []
    for name, spec, ids in zip(names, specs, (ids_a, ids_b)):
        s = served(name, spec, progress)
        with deadline(request_seconds()), s.lock, watch_model(s.adapter, progress, ("knock-out",), 1, score_total=2):
            out.append(causal.knockout(s.view(name)[0], image, question, ids, layers=[layer]))
    return out


@guard(CompareKnockoutOut)
def run_compare_knockout(state, model_a, model_b, layer=LAST, token=MEAN, request: gr.Request = None,
                         progress=gr.Progress()) -> CompareKnockoutOut:
    """Knock out every head of the shown layer in A and B (on A's answer): the heads ranked by how much their
    knock-out effect changed, next to their rank by how far their attention moved."""
    rep = Reporter(progress, [("load", 1), ("model", 8)])
    st = check_state(state, request, "cmp")
    cmp = st["cmp"]
    lay, tok, _ = selection(cmp.layers, layer, token, "predicts")
    lay = cmp.layers[-1] if lay == MEAN else lay
    names = [model_a, model_b]
    if any(not isinstance(n, str) or not n for n in names):
        raise RALError("pick models A and B as they were compared")
    if (cmp.a.model_name, cmp.b.model_name) != (model_a, model_b):  # the results carry the names they were run as
        raise RALError("the model pickers changed since this comparison: press Compare again first")
    ka, kb = compare_knockout_work(names, [registry.resolve(n, request) for n in names], cmp.a.image, cmp.a.question,
                                   list(cmp.a.answer_ids), list(cmp.b.answer_ids), lay,
                                   model_progress(rep, "knocking out every head of both models"))
    rows = causal.heads_moved_and_mattered(cmp, ka, kb, lay, token=tok)
    return CompareKnockoutOut("", [[r["rank_effect_change"], f"layer {lay} head {r['head']}",
                                    round(r["knockout_a"], 4), round(r["knockout_b"], 4),
                                    round(r["knockout_change"], 4), r["rank_moved"]] for r in rows])


def compare_layout() -> dict:
    with gr.Accordion("Did the heads that moved change what they do? (knock-out in A and B)", open=False,
                      elem_id="c-causal-section"):
        gr.Markdown("Knocks out every head of the shown layer in both models, on A's answer, and ranks the heads by "
                    "how much the answer's log-probability change under knock-out differs between A and B, next to "
                    "their rank by how far their attention moved. A head that moved but whose knock-out effect did "
                    "not change moved where it does not matter for this answer.", elem_classes=["explain"])
        run = gr.Button("Knock out every head of A and B", elem_id="c-causal-run")
        status = plain_markdown(elem_id="c-causal-status")
        ranking = gr.Dataframe(headers=KO_HEADERS, interactive=False, wrap=True, elem_id="c-causal-ranking")
    return {"run": run, "status": status, "ranking": ranking}


def compare_wire(c: dict, state, model_a, model_b, layer, tokens) -> None:
    c["run"].click(run_compare_knockout, [state, model_a, model_b, layer, tokens], [c["status"], c["ranking"]],
                   api_name="compare_knockout", preprocess=False)
