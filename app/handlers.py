"""Event handlers of the app, callable without a browser (tests pass a stand-in request with `session_hash`).

No tensor math here: models run through `ral_core.inspection` / `ral_core.compare`, pictures come from
`ral_core.render`. Changing the layer, token or row re-renders from the stored result (gr.State) and never
re-runs a model. Every user-facing failure becomes one readable line in the status box (plus a toast).
"""
from __future__ import annotations

import functools
import hashlib
import html
import json
import logging
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

log = logging.getLogger("ral.app")
MEAN, LAST = "mean", "last"  # selector values besides layer / token indices
RENDER_LOCK = render_pool.LOCAL_LOCK  # in-process drawing: pyplot's figure registry is global state
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
MAX_SCORED_CHARS = 300  # a typed answer to score: every lever forward carries it
MAX_BOX_CHARS = 200


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


def _inspect_view(state, layer, token, row) -> InspectView:
    res, d = state["result"], Path(state["dir"])
    lay, tok, row = _sel(res.layers, layer, token, row)
    if not (d / "result").is_dir():
        raise RALError("this result was cleaned up; run it again")
    over, heads = render_pool.call(render_pool.inspect_view, str(d / "result"), state["boxes"], lay, tok, row, str(d))
    state["view"] = (lay, tok, row)
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
    lay, tok, row = st.get("view") or (st["result"].layers[-1], MEAN, "predicts")
    d = Path(st["dir"])
    over, heads = render_pool.call(render_pool.inspect_view, str(d / "result"), st["boxes"], lay, tok, row, str(d),
                                   "svg")
    png = [str(Path(p).with_suffix(".png")) for p in (over, heads)]
    return FilesOut("", _existing(*png, over, heads, st["zip"]))


@gpu.gpu_task
def _inspect_work(name, spec, img, q, opts):
    """Model work of one inspection (on ZeroGPU: inside spaces.GPU, arguments and result pickled)."""
    adapter = registry.get_adapter_for_spec(name, spec)
    if opts["do_sample"] or gpu.on_zerogpu():  # a sampled answer has its own seed: not batched with others
        with deadline(_limit()), adapter.lock:
            return inspect(adapter, img, q, **opts)
    return registry.batcher(adapter).submit(img, q, opts["max_new_tokens"], seconds=_limit())


@gpu.gpu_task
def _levers_work(name, spec, sample, strength):
    adapter = registry.get_adapter_for_spec(name, spec)
    with deadline(_limit()), adapter.lock:
        if not sample["answer"]:  # a whitespace-only answer is still the model's answer: score it as generated
            sample = dict(sample, answer=adapter.tokenizer.decode(sample.pop("answer_ids"), skip_special_tokens=True))
        sample.pop("answer_ids", None)
        if not sample["answer"]:
            raise RALError("the model's answer is empty, so there is nothing to score; type an answer to score")
        return sample["answer"], lever_map(adapter, [sample], layers="all", strength=strength)


@gpu.gpu_task
def _explored_work(name, spec, image, question, layers, sigma, seed, n):
    adapter = registry.get_adapter_for_spec(name, spec)
    with deadline(_limit()), adapter.lock:
        return inspect_explored(adapter, image, question, layers=layers, sigma=sigma, seed=seed, max_new_tokens=n)


@gpu.gpu_task
def _compare_work(names, specs, img, q, opts):
    a, b = (registry.get_adapter_for_spec(n, s) for n, s in zip(names, specs))  # the same model twice is one object; compare() only reads
    first, second = sorted((a, b), key=id)  # a fixed order, so two compares never deadlock (RLock: a is b is fine)
    with deadline(_limit()), first.lock, second.lock:
        return compare(a, b, img, q, **opts)


@_guard(InspectOut)
def run_inspect(model, image, question, max_new_tokens=16, do_sample=False, temperature=1.0, layer=LAST,
                row="predicts", request: gr.Request = None) -> InspectOut:
    """Answer + capture once, store the result in the session, render the chosen view."""
    img = _image_from_upload(image)
    q = _question(question)
    opts = _gen_options(max_new_tokens, do_sample, temperature)
    res = _inspect_work(model, registry.resolve(model, request), img, q, opts)
    res.model_name = model
    d = sessions.new_work_dir(request, "inspections")
    res.save(d / "result")
    ex = _example_for(img, q)
    state = {"result": res, "dir": str(d), "boxes": (ex or {}).get("boxes", []), "model": model,
             "expected": (ex or {}).get("answer"),
             "zip": _zip(d / "result", d / "inspection_result")}
    lay = _keep_layer(layer, res.layers)
    view = _inspect_view(state, lay, MEAN, row)
    answer = f"**Answer:** {_answer_text(res.answer)} · {res.n_tokens} token(s) · model `{model}`"
    if res.meta.get("cut_off"):
        answer += f" · ⏱ cut off at the {_limit():g} s limit of one request (ask for fewer new tokens)"
    if ex and ex.get("answer"):
        answer += f"  \nExample's expected answer: `{ex['answer']}` (cyan box: where it is in the image)"
    return InspectOut(view.status, answer,
                      gr.update(choices=token_choices(res.answer_tokens), value=MEAN),
                      gr.update(choices=layer_choices(res.layers), value=lay),
                      view.overlay, view.heads, view.mass, view.files, state)


@_guard(InspectView)
def inspect_view(state, layer, token, row="predicts", request: gr.Request = None) -> InspectView:
    """Re-render for another layer / token / row from the stored result (no model call)."""
    return _inspect_view(_check_state(state, request, "result"), layer, token, row)


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
def run_levers(state, box="", answer="", strength=3.0, request: gr.Request = None) -> LeverOut:
    """Steer each layer's attention toward / away from the target region and measure the answer's log-prob."""
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
    ans, lmap = _levers_work(name, registry.resolve(name, request), sample, s)
    d = Path(st["dir"])
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
def run_explored(state, sigma=2.0, layers=LAST, seed=0, max_new_tokens=16, request: gr.Request = None) -> ExploreOut:
    """The model's own greedy answer next to one answer with a random attention bias (as exploration samples)."""
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
    nat, exp = _explored_work(name, registry.resolve(name, request), res.image, res.question, lay, sg, sd, n)
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
def _compare_view(state, layer, token, row) -> CompareView:
    cmp, d = state["cmp"], Path(state["dir"])
    lay, tok, row = _sel(cmp.layers, layer, token, row)
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
                layer=LAST, row="predicts", request: gr.Request = None) -> CompareOut:
    """A answers; A and B are both scored teacher-forced on A's answer; each model's free answer is shown."""
    img = _image_from_upload(image)
    q = _question(question)
    opts = _gen_options(max_new_tokens, do_sample, temperature)
    cmp = _compare_work((model_a, model_b), (registry.resolve(model_a, request), registry.resolve(model_b, request)),
                        img, q, opts)
    d = sessions.new_work_dir(request, "compare")
    cmp.a.save(d / "results" / "model_a")
    cmp.b.save(d / "results" / "model_b")
    state = {"cmp": cmp, "dir": str(d), "zip": _zip(d / "results", d / "comparison_results")}
    lay = _keep_layer(layer, cmp.layers)
    view = _compare_view(state, lay, MEAN, row)
    answers = (f"**A (`{model_a}`) answers:** {_answer_text(cmp.free_answer_a)}  \n"
               f"**B (`{model_b}`) answers:** {_answer_text(cmp.free_answer_b)}  \n"
               f"Both maps below are measured on A's answer tokens, fed to both models.")
    if not cmp.same_tokens:
        answers += "  \n(B's tokeniser splits that answer differently: only 'all tokens (mean)' is comparable.)"
    return CompareOut(view.status, answers, gr.update(choices=token_choices(cmp.a.answer_tokens), value=MEAN),
                      gr.update(choices=layer_choices(cmp.layers), value=lay),
                      view.figure, view.ranking, view.files, state)


@_guard(CompareView)
def compare_view(state, layer, token, row="predicts", request: gr.Request = None) -> CompareView:
    """Re-render the comparison for another layer / token / row (no model call)."""
    return _compare_view(_check_state(state, request, "cmp"), layer, token, row)


def end_session(request: gr.Request = None):
    """Delete the session folder (the app wires `training.end_session`, which also stops a running run)."""
    sessions.cleanup(request)
