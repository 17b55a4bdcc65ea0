"""The Inspect tab's probes of a stored inspection: the causal levers (which layers' attention moves the answer)
and an explored rollout (the greedy answer next to one under a random attention nudge). Each re-runs the model."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core import render
from ral_core.errors import RALError

from app import figures, model_work, registry
from app.common import (BOUNDS, LAST, MEAN, RENDER_LOCK, answer_text, check_state, code, gen_options, guard, in_bounds,
                        model_progress, shown)
from app.progress import Reporter

MAX_SCORED_CHARS = 300  # a typed answer to score: every lever forward carries it
MAX_BOX_CHARS = 200


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


@guard(LeverOut)
def run_levers(state, box="", answer="", strength=3.0, request: gr.Request = None,
               progress=gr.Progress()) -> LeverOut:
    """Steer each layer's attention toward / away from the target region and measure the answer's log-prob."""
    rep = Reporter(progress, [("load", 1), ("model", 8), ("draw", 1)])
    st = check_state(state, request, "result")
    res = st["result"]
    s = in_bounds("strength", strength)
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
    ans, lmap = model_work.levers_work(name, registry.resolve(name, request), sample, s, st.get("budget"),
                             model_progress(rep, "steering each layer"))
    d = Path(st["dir"])
    rep.report("draw", 0.0, "drawing the lever chart")
    with RENDER_LOCK:
        png = str(render.save_figure(render.lever_chart(lmap), d / f"levers_{time.time_ns():x}.png"))
    top = lmap.ranked()[0]
    i = lmap.layers.index(top)
    weakest = lmap.ranked()[-1]
    sign = "more" if lmap.effect[i] > 0 else "less"
    shown = ans if ans.strip() else shown(ans)
    summary = (f"Scoring the answer {code(shown)}, steering toward {where}. **Layer {top} is the strongest lever:** "
               f"pushing its attention toward the target instead of away makes the answer {sign} likely "
               f"(log-probability {lmap.effect[i]:+.2f}, probability {lmap.prob_effect[i]:+.3f}). "
               f"Layer {weakest} matters least ({lmap.effect[lmap.layers.index(weakest)]:+.2f}). "
               "One image only, so the correlation line is not defined (it needs ≥ 3 samples; `ral levers` "
               "measures many).")
    if abs(lmap.effect[i]) < 0.05:
        summary += " All effects are tiny: where this model looks hardly changes this answer."
    exp = st.get("expected")
    if exp and not str(answer or "").strip() and ans.strip() != exp:
        summary += (f" The model's answer is not the example's expected {code(exp)}: type that into 'answer to score' "
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


@guard(ExploreOut)
def run_explored(state, sigma=2.0, layers=LAST, seed=0, max_new_tokens=16, request: gr.Request = None,
                 progress=gr.Progress()) -> ExploreOut:
    """The model's own greedy answer next to one answer with a random attention bias (as exploration samples)."""
    rep = Reporter(progress, [("load", 1), ("model", 8), ("draw", 1)])
    st = check_state(state, request, "result")
    res = st["result"]
    try:
        sg, sdf = float(sigma), float(seed)
    except (TypeError, ValueError):
        raise RALError("σ and the seed must be numbers") from None
    if not 0 < sg <= BOUNDS["sigma"].hi:
        raise RALError(f"σ must be above 0 and at most {BOUNDS['sigma'].hi:g}")
    if not (sdf.is_integer() and 0 <= sdf <= 2**32 - 1):
        raise RALError(f"the seed must be a whole number between 0 and {2**32 - 1:,} (got {seed!r})")
    sd = int(sdf)
    n = gen_options(max_new_tokens, False, 1.0)["max_new_tokens"]
    if layers in (None, "", LAST):
        lay = "last"
    elif layers == "all":
        lay = "all"
    elif str(layers).isdigit() and int(layers) in res.layers:
        lay = [int(layers)]
    else:
        raise RALError(f"layer must be 'last', 'all' or one of {res.layers}")
    name = _model_of(st)
    nat, exp = model_work.explored_work(name, registry.resolve(name, request), res.image, res.question, lay, sg, sd, n,
                              st.get("budget"), model_progress(rep, "answering twice (natural, explored)"))
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
        png = str(render.save_figure(fig, d / f"explored_{time.time_ns():x}.png"))
    where = "all layers" if len(ex_layers) > 1 else f"layer {ex_layers[0]}"
    changed = nat.answer != exp.answer
    answers = (f"**Natural answer:** {answer_text(nat.answer)} · **explored answer:** {answer_text(exp.answer)} "
               f"(random bias on the image attention at {where}, σ = {sg:g}, seed {sd}). " +
               ("The nudge **changed the answer**: this layer's attention is a lever here." if changed else
                "Same answer: the nudge moved where the model looked but not what it said."))
    return ExploreOut("", png, answers)

