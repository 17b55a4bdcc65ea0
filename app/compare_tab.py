"""The Compare tab: model A answers, A and B are both scored teacher-forced on A's answer, and every redraw comes
from the stored comparison (no model call)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core.compare import comparison_figure, magnify_factor, magnitude, parse_magnify
from ral_core.errors import RALError

from app import model_work, registry, render_pool
from app.common import (LAST, MEAN, RENDER_LOCK, answer_text, check_state, code, existing, gen_options, guard,
                        image_from_upload, keep_layer, layer_choices, model_progress, new_work, parse_question,
                        selection, token_choices, zip_dir)
from app.common import example_for
from app.progress import Reporter


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with RENDER_LOCK:
            return fn(*args, **kwargs)
    return wrapper


class CompareView(NamedTuple):
    status: str
    figure: Any    # PNG path: A | B | B − A
    ranking: Any   # rows for the head table
    files: Any
    magnitude: Any  # one line: how far attention moved, and the B − A panel's colour range


class CompareOut(NamedTuple):
    status: str
    answers: Any
    tokens: Any
    layer: Any
    figure: Any
    ranking: Any
    files: Any
    state: Any     # {"cmp": Comparison, "dir": str, "zip": str, "boxes": list, "expected": str | None}
    magnitude: Any


# The B − A panel's colour range: the maps' own by default (a small change looks small); a magnification says so.
MAGNIFY_CHOICES = [("the maps' scale", "1"), ("×2", "2"), ("×5", "5"), ("×10", "10"),
                   ("auto: the largest change fills the range", "auto")]


def magnitude_text(m, k: float) -> str:
    """The magnitude line, then what the difference panel's colours mean."""
    panel = (f"B − A panel: on the maps' scale (colour range ±{m.scale:.2g}, the same as A and B)" if k == 1 else
             f"B − A panel: magnified ×{k:g} (colour range ±{m.scale / k:.2g}; the maps' scale is ±{m.scale:.2g})")
    return f"{m.line()}\n{panel}"


RANK_HEADERS = ["rank", "head", "JSD between A and B", "A: image share", "B: image share"]


@_locked
def _compare_view(state, layer, token, row, magnify="1", rep: Reporter | None = None) -> CompareView:
    cmp, d = state["cmp"], Path(state["dir"])
    lay, tok, row = selection(cmp.layers, layer, token, row)
    magnify = parse_magnify(magnify)
    boxes, expected = state.get("boxes") or [], state.get("expected")
    m = magnitude(cmp, layer=lay, token=tok, row=row, boxes=boxes, expected=expected)
    k = magnify_factor(magnify, m.max_change, m.scale)
    if rep is not None:
        rep.report("draw", 0.0, "drawing A | B | B − A and ranking the heads")
    rank_layer = cmp.layers[-1] if lay == MEAN else lay  # per-head ranking needs one layer
    fig = comparison_figure(cmp, layer=lay, token=tok, row=row, magnify=k, boxes=boxes, expected=expected)
    files = render_pool.save_both(fig, d / f"compare_L{lay}_T{tok}_{row}_x{k:g}")
    rows = []
    for i, (h, v) in enumerate(cmp.ranked_heads(rank_layer, token=tok, row=row)):
        ma = cmp.a.mass_split(layer=rank_layer, head=h, token=tok, row=row)["image"]
        mb = cmp.b.mass_split(layer=rank_layer, head=h, token=tok, row=row)["image"]
        rows.append([i + 1, f"layer {rank_layer} head {h}", float(f"{v:.3g}"), round(ma, 3), round(mb, 3)])
    return CompareView("", files[0], rows, files + existing(state["zip"]), magnitude_text(m, k))


@guard(CompareOut)
def run_compare(model_a, model_b, image, question, max_new_tokens=16, do_sample=False, temperature=1.0,
                layer=LAST, row="predicts", magnify="1", request: gr.Request = None,
                progress=gr.Progress()) -> CompareOut:
    """A answers; A and B are both scored teacher-forced on A's answer; each model's free answer is shown."""
    rep = Reporter(progress, [("load", 2), ("model", 10), ("save", 1), ("draw", 2)])
    parse_magnify(magnify)  # a bad value is refused before any model work
    img = image_from_upload(image)
    q = parse_question(question)
    opts = gen_options(max_new_tokens, do_sample, temperature)
    cmp = model_work.compare_work((model_a, model_b), (registry.resolve(model_a, request), registry.resolve(model_b, request)),
                        img, q, opts, model_progress(rep, "A answers, both are scored"))
    if not cmp.layers:
        raise RALError(f"the two models have no attention layer in common (A: layers {cmp.a.layers}, B: layers "
                       f"{cmp.b.layers}), so their maps cannot be compared layer by layer; pick models of one shape")
    rep.report("save", 0.0, "saving both results")
    d = new_work(request, "compare")
    cmp.a.save(d / "results" / "model_a")
    cmp.b.save(d / "results" / "model_b")
    ex = example_for(img, q) or {}  # a bundled example: its expected answer and target box, as in Inspect
    state = {"cmp": cmp, "dir": str(d), "zip": zip_dir(d / "results", d / "comparison_results"),
             "boxes": ex.get("boxes") or [], "expected": ex.get("answer")}
    lay = keep_layer(layer, cmp.layers)
    view = _compare_view(state, lay, MEAN, row, magnify, rep)
    answers = (f"**A ({code(model_a)}) answers:** {answer_text(cmp.free_answer_a)}  \n"
               f"**B ({code(model_b)}) answers:** {answer_text(cmp.free_answer_b)}  \n"
               f"Both maps below are measured on A's answer tokens, fed to both models.")
    if not cmp.same_tokens:
        answers += "  \n(B's tokeniser splits that answer differently: only 'all tokens (mean)' is comparable.)"
    if ex.get("answer"):
        answers += f"  \nExample's expected answer: {answer_text(ex['answer'])} (cyan box: where it is in the image)"
    return CompareOut(view.status, answers, gr.update(choices=token_choices(cmp.a.answer_tokens), value=MEAN),
                      gr.update(choices=layer_choices(cmp.layers), value=lay),
                      view.figure, view.ranking, view.files, state, view.magnitude)


@guard(CompareView)
def compare_view(state, layer, token, row="predicts", magnify="1", request: gr.Request = None,
                 progress=gr.Progress()) -> CompareView:
    """Re-render the comparison for another layer / token / row / magnification (no model call)."""
    return _compare_view(check_state(state, request, "cmp"), layer, token, row, magnify,
                         Reporter(progress, [("draw", 1)]))

