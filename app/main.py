"""The Gradio front end: `build_app()` returns the Blocks, `launch()` serves it (RAL_HOST / RAL_PORT).

Tabs: Inspect (one model, where it looked; which layers' attention moves the answer; an explored rollout),
Compare (two models on the same answer tokens), Train (GRPO / RAL / OPAD / RAL + exploration in a background
thread, live curves and probe snapshots). All work happens in the tab modules (`app.inspect_tab`,
`app.inspect_probes`, `app.compare_tab`, `app.training`); this file is layout and wiring only. Every listener's
inputs and outputs are wired by name (`named`, `outputs`): a handler's parameters and result fields pick the
components, so the wiring cannot drift by position.
"""
from __future__ import annotations

import inspect
import os

import gradio as gr  # app/__init__.py has set GRADIO_ANALYTICS_ENABLED=False and offline mode first

from app import common, compare_tab, gpu, inspect_causal, inspect_probes, inspect_tab, registry, startup, training
from app.common import BOUNDS, LAST, MEAN, plain_markdown, slider_args
from app.uploads import MAX_ZIP_BYTES
from ral_core import settings

CSS = """
.explain { font-size: 0.9em; opacity: 0.85; }
#i-status p, #c-status p, #t-status p { color: #b45309; font-weight: 600; }
.ral-progress p { font-size: 0.95em; }
"""

INTRO = ("# RAL workbench\nSee where a vision-language model looks while it answers. *Attention* is how much "
         "each generated word draws on each earlier input — here, on each patch of the image. Reinforced "
         "Attention Learning (RAL) treats that attention as something to train; this page lets you look at it.")
ROW_CHOICES = [("query that predicts the token", "predicts"), ("the token's own position (RAL policy row)", "own")]
ROW_INFO = "'predicts': what the model looked at while choosing this token. 'own': the row RAL trains."
LAYER_INFO = "The model reads in layers; early ones often look broadly, later ones more selectively."
TOKENS_INFO = "The answer as the model generated it, token by token. Pick one, or the mean over all."
EXPLAIN_OVERLAY = ("**Where the model looked.** Brighter = more of the model's attention went to that patch of "
                   "the image while it produced the chosen token, averaged over all attention heads. The colour "
                   "bar is the share of the whole attention row (image, text and answer together sum to 1).")
EXPLAIN_MASS = ("**Where the attention went.** Of all the attention at this point, the share that went to the "
                "image, to the question and system text, and to the answer tokens written so far.")
EXPLAIN_HEADS = ("**Per-head maps.** Each layer has several attention heads that look independently; one map per "
                 "head, on one shared colour scale. With 'mean over layers' this shows the last layer (heads of "
                 "different layers are unrelated, so they are not averaged).")
EXPLAIN_SUMMARY = ("**Every layer and head at once.** One cell per decoder layer (rows) and attention head (columns): "
                   "how much of its attention went to the image, or how spread out that attention is over the image "
                   "(entropy: 0 = one patch, 1 = evenly everywhere). Click a cell to see that head's map over the "
                   "image, or pick a layer and a head below. Only layers with softmax attention are listed (Qwen3.5 "
                   "mixes in linear-attention layers, which have no attention map).")
BUDGET_INFO = ("The image processor's max pixels per image: fewer pixels → fewer visual tokens → a faster, coarser "
               "map (Qwen: capped smart resize; SmolVLM: fewer tiles; LLaVA / Gemma 3: fixed size, no effect). "
               "0: the model's own setting. e.g. 401408 ≈ 512 Qwen2-VL tokens.")
PHOTOS_NOTE = ("Examples: photos — the bundled models read digit grids only, so their "
               "answers here are empty or meaningless; list a real vision-language model in app/models.yaml")
UNAVAILABLE_NOTE = ("Not available on this server: {} — hub models that are not in its Hugging Face cache, and "
                    "downloading is off. To add one, whoever runs the server puts the model's folder on it and lists "
                    "that folder in app/models.yaml (or the file RAL_MODELS_CONFIG names), e.g. "
                    "`my-model: /models/SmolVLM-256M-Instruct`, then restarts the app.")
EXPLAIN_COMPARE = ("**A | B | B − A.** Model A answers; then both models are fed A's answer token by token, so "
                   "both maps describe exactly the same words. Left and middle share one colour scale. Right: the "
                   "signed difference B − A — red where B looks more than A, blue where less — on that same scale, "
                   "so a small change looks small (or magnified by a factor its title states). The line above the "
                   "figure says how far attention moved in numbers; below 5 % of the scale it says 'no visible "
                   "change'.")
EXPLAIN_RANK = ("Heads whose spread of attention over the image moved most between A and B (Jensen–Shannon "
                "divergence, 0 = identical, ln 2 ≈ 0.69 = no overlap), with the share of attention each head "
                "puts on the image. 'mean over layers' ranks the last layer's heads.")
EXPLAIN_LEVERS = ("**Which layers' attention moves the answer?** The model reads the picture in several layers. For "
                  "each layer on its own, we nudge where it looks — once *toward* the target region, once *away* "
                  "from it (±strength added to its attention scores while it writes the answer) — and measure how "
                  "much more likely the answer becomes. A tall bar: that layer's attention is a lever on the answer "
                  "(red: looking at the target helps, blue: it hurts). A bar near zero: where that layer looks "
                  "hardly matters, so training its attention (RAL) or exploring there will not change answers. "
                  "Right panel: how much the nudge really moved that layer's attention onto the target.")
EXPLAIN_EXPLORED = ("**An explored rollout.** RAL + exploration gives each training rollout a random nudge to where "
                    "the model looks (a bias of spread σ on its attention scores toward the image, at the chosen "
                    "layers), so rollouts of one question differ in *where they look*, and training can reward the "
                    "looks that led to right answers. Left: the model's own greedy answer and attention; right: the "
                    "same question under one random nudge. Both share one colour scale. Different seeds draw "
                    "different nudges.")
TRAIN_INTRO = ("**Train a model here.** The model answers each training question several times (a *group*); every "
               "answer is scored and the model is pushed toward its better-than-average answers (GRPO). **RAL** also "
               "trains *where it looked*: attention that led to good answers is reinforced. The run is private to "
               "this browser tab and stops when you close it; its checkpoint appears as `session: <name>` in "
               "Inspect and Compare.")
UPLOAD_INFO = (f"A .zip (≤ {MAX_ZIP_BYTES // 2**20} MB) holding one `.jsonl` file, one sample per line: "
               '`{"image": "img/1.png", "question": "…", "answer": "…", "boxes": [[x0, y0, x1, y1]]}` '
               "(image paths relative to the JSONL file, `boxes` optional: where the answer is in the image, "
               "used for the on-target curve), plus the images.")
EXPLAIN_CURVES = ("**Live curves.** Reward and accuracy: how often the sampled answers were right. Attention JSD: "
                  "how far each step's updates moved the attention (0 = not at all). On-target mass: the share of "
                  "attention on the region that holds the answer. Where the RAL term can act: answers that share a "
                  "beginning share its attention rows, and their terms add up with the sum of their advantages. The "
                  "term cancels where that sum is zero (a row every answer of the group shares, such as the first "
                  "token's) and is silent in groups where every answer got the same reward; it acts on the rest.")
EXPLAIN_SNAPSHOT = ("**Probe snapshot.** One held-out image, answered greedily before training and every few steps "
                    "(\"snapshot every\"). Watch the bright region move as training changes where the model looks.")


def _explain(text):
    return gr.Markdown(text, elem_classes=["explain"])


def _md(value=None, **kw) -> gr.Markdown:
    """Markdown that shows user and model text: no LaTeX (a '$' in an answer is a dollar); the handlers escape or
    code-span every piece of such text (common.md_text, common.code)."""
    return gr.Markdown(value, latex_delimiters=[], **kw)


def _slider(key: str, value, **kw) -> gr.Slider:
    """A slider whose range and step are the checks' own (common.BOUNDS)."""
    return gr.Slider(value=value, **slider_args(key), **kw)


def named(fn, **components) -> list:
    """`fn`'s inputs by parameter name, in its parameter order (Gradio passes them by position). A missing, extra
    or misspelled name fails here, when the page is built, never as a value in the wrong parameter."""
    params = [n for n in inspect.signature(fn).parameters if n not in ("request", "progress", "evt")]
    names = params[:len(components)]
    if set(components) != set(names):
        raise TypeError(f"{fn.__name__} takes {names} first; wired: {sorted(components)}")
    return [components[n] for n in names]


def outputs(result_cls, **components) -> list:
    """The components for each field of a handler's result (a NamedTuple), in its field order."""
    if set(components) != set(result_cls._fields):
        raise TypeError(f"{result_cls.__name__} has {list(result_cls._fields)}; wired: {sorted(components)}")
    return [components[f] for f in result_cls._fields]


def _on_run(run, q, api_name: str, outs: list, fn, **ins) -> tuple:
    """Run (the API endpoint `api_name`) and Enter in the question box (private) start `fn`; both events."""
    ins = named(fn, **ins)
    return (run.click(fn, ins, outs, api_name=api_name, preprocess=False),
            q.submit(fn, ins, outs, api_visibility="private", preprocess=False))


def _inputs(prefix: str, choices: list[str], two_models: bool, budget: bool = False):
    """Model picker(s), image, question, generation options (and the visual-token budget), run button, status,
    examples."""
    first = registry.initial_model()
    if two_models:
        second = next((c for c in choices if c != first), first)
        models = [gr.Dropdown(choices, value=first, label="Model A (answers)", elem_id=f"{prefix}-model-a"),
                  gr.Dropdown(choices, value=second, label="Model B (scored on A's answer)",
                              elem_id=f"{prefix}-model-b")]
    else:
        models = [gr.Dropdown(choices, value=first, label="Model", elem_id=f"{prefix}-model")]
    missing = registry.unavailable_models()
    if missing:
        gr.Markdown(UNAVAILABLE_NOTE.format(", ".join(f"{n} ({s})" for n, s in missing.items())),
                    elem_id=f"{prefix}-unavailable", elem_classes=["explain"])
    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=230,
                     elem_id=f"{prefix}-image")
    question = gr.Textbox(label="Question", placeholder="e.g. What digit is in row 2 column 1?",
                          elem_id=f"{prefix}-question")
    with gr.Accordion("Generation options", open=False):
        max_new = _slider("max_new_tokens", 16, label="max new tokens")
        sample = gr.Checkbox(False, label="sample instead of greedy decoding")
        temp = _slider("temperature", 1.0, label="temperature (when sampling)")
    extra = []
    if budget:
        extra = [gr.Number(0, precision=0, minimum=0, maximum=common.max_budget(), step=50176,
                           label=f"visual-token budget: max pixels per image (≤ {common.max_budget():,})",
                           info=BUDGET_INFO, elem_id=f"{prefix}-budget")]
    run = gr.Button("Compare" if two_models else "Inspect", variant="primary", elem_id=f"{prefix}-run")
    status = plain_markdown(label="status", elem_id=f"{prefix}-status")
    ex = common.examples()
    grids = [e for e in ex if not e["image"].startswith("photos/")]
    photos = [e for e in ex if e["image"].startswith("photos/")]
    if grids:
        gr.Examples([[e["path"], e["question"]] for e in grids], inputs=[image, question],
                    label="Examples: digit grids")
    if photos:
        gr.Examples([[e["path"], e["question"]] for e in photos], inputs=[image, question],
                    label="Examples: photos" if registry.reads_photos() else PHOTOS_NOTE)
    return (models, image, question, max_new, sample, temp, run, status) + tuple(extra)


def _selectors(prefix: str):
    tokens = gr.Radio([("all tokens (mean)", MEAN)], value=MEAN, label="Answer tokens", info=TOKENS_INFO,
                      elem_id=f"{prefix}-tokens")
    with gr.Row():
        layer = gr.Dropdown(common.layer_choices([]), value=LAST, label="Layer", info=LAYER_INFO,
                            elem_id=f"{prefix}-layer")
        row = gr.Radio(ROW_CHOICES, value="predicts", label="Attention row", info=ROW_INFO)
    return tokens, layer, row


def _inspect_tab(choices):
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            (model,), image, q, max_new, sample, temp, run, status, budget = _inputs("i", choices, False, True)
        with gr.Column(scale=5):
            answer = _md("Pick a model, an image and a question, then press **Inspect**.", label="answer")
            tokens, layer, row = _selectors("i")
            with gr.Row():
                with gr.Column(scale=3):
                    overlay = gr.Image(label="Where the model looked", show_label=False, format="png",
                                       interactive=False, height=380, elem_id="i-overlay")
                    _explain(EXPLAIN_OVERLAY)
                with gr.Column(scale=2):
                    mass = gr.Label(label="Where the attention went", num_top_classes=3, show_heading=False)
                    _explain(EXPLAIN_MASS)
            heads = gr.Image(label="Per-head maps", show_label=False, format="png", interactive=False,
                             elem_id="i-heads")
            head_scale = gr.Checkbox(False, label="each head on its own colour scale (0 … its own max)",
                                     elem_id="i-head-scale")
            _explain(EXPLAIN_HEADS)
            with gr.Accordion("Layer × head summary — click a cell for its map", open=True,
                              elem_id="i-summary-section"):
                _explain(EXPLAIN_SUMMARY)
                metric = gr.Radio(inspect_tab.SUMMARY_METRICS, value="image_mass", label="Each cell shows",
                                  elem_id="i-metric")
                with gr.Row():
                    with gr.Column(scale=4, min_width=480):  # 36 layers × 16 heads: cells ≥ 13 px on a laptop
                        summary = gr.Image(label="Layer × head summary (click a cell)", show_label=False,
                                           format="png", interactive=False, elem_id="i-summary")
                    with gr.Column(scale=2, min_width=240):
                        with gr.Row():
                            cell_layer = gr.Dropdown([], value=None, label="layer", elem_id="i-cell-layer")
                            cell_head = gr.Dropdown([], value=None, label="head", elem_id="i-cell-head")
                        cell = gr.Image(label="That layer and head over the image", show_label=False, format="png",
                                        interactive=False, elem_id="i-cell", height=330)
                summary_status = plain_markdown(elem_id="i-summary-status")
            causal_panel = inspect_causal.layout()  # does it matter? knock-out grid beside the summary
            files = gr.File(label="Downloads: figures (PNG) and the raw result (zip)", file_count="multiple",
                            interactive=False)
            svg = gr.Button("Add SVG versions of these figures", size="sm", elem_id="i-svg")
            with gr.Accordion("Which layers' attention moves the answer? (causal levers)", open=False,
                              elem_id="i-levers-section"):
                _explain(EXPLAIN_LEVERS)
                with gr.Row():
                    lv_box = gr.Textbox(label="target box x0,y0,x1,y1 in pixels (optional)",
                                        placeholder="empty: the example's box, else each ninth of the image")
                    lv_answer = gr.Textbox(label="answer to score (optional)", placeholder="empty: the model's answer")
                    lv_strength = _slider("strength", 3.0, label="nudge strength")
                lv_run = gr.Button("Find the levers", elem_id="i-levers-run")
                lv_chart = gr.Image(label="Levers", show_label=False, format="png", interactive=False,
                                    elem_id="i-levers", height=330)
                lv_summary = _md()
            with gr.Accordion("Show an explored rollout", open=False, elem_id="i-explore-section"):
                _explain(EXPLAIN_EXPLORED)
                with gr.Row():
                    ex_sigma = _slider("sigma", 2.0, label="σ (spread of the random nudge)")
                    ex_layer = gr.Dropdown([("last layer", LAST), ("all layers", "all")], value=LAST,
                                           label="nudged layers")
                    ex_seed = gr.Number(0, precision=0, label="seed", minimum=0)
                ex_run = gr.Button("Show an explored rollout", elem_id="i-explore-run")
                ex_fig = gr.Image(label="natural | explored", show_label=False, format="png", interactive=False,
                                  elem_id="i-explored", height=380)
                ex_answers = _md()
    state = gr.State()
    # Images arrive unprocessed (preprocess=False) so that a non-image upload reaches the handler and gets a
    # clear message instead of failing inside Gradio; the handler opens it with ral_core's safe loader.
    H = inspect_tab
    view_ins = named(H.inspect_view, state=state, layer=layer, token=tokens, row=row, per_head_scale=head_scale)
    s_ins = named(H.inspect_summary, state=state, metric=metric, token=tokens, row=row)
    s_outs = outputs(H.SummaryOut, status=summary_status, summary=summary, cell_layer=cell_layer, cell_head=cell_head)
    c_ins = named(H.inspect_cell, state=state, layer=cell_layer, head=cell_head, token=tokens, row=row)
    c_outs = outputs(H.CellOut, status=summary_status, cell_layer=cell_layer, cell_head=cell_head, cell=cell)
    for ev in _on_run(run, q, "inspect", outputs(H.InspectOut, status=status, answer=answer, tokens=tokens,
                                                 layer=layer, overlay=overlay, heads=heads, mass=mass, files=files,
                                                 state=state),
                      H.run_inspect, model=model, image=image, question=q, max_new_tokens=max_new, do_sample=sample,
                      temperature=temp, layer=layer, row=row, per_head_scale=head_scale, pixel_budget_px=budget):
        ev.then(inspect_probes.explore_layer_choices, state, ex_layer, api_visibility="private",
                show_progress="hidden")
        ev.then(H.new_summary, named(H.new_summary, state=state, metric=metric, token=tokens, row=row),
                outputs(H.NewSummaryOut, status=summary_status, summary=summary, cell_layer=cell_layer,
                        cell_head=cell_head, cell=cell), api_visibility="private", preprocess=False)
    gr.on([tokens.input, layer.select, row.input, head_scale.input], H.inspect_view, view_ins,
          outputs(H.InspectView, status=status, overlay=overlay, heads=heads, mass=mass, files=files),
          api_name="inspect_view", show_progress="minimal")
    gr.on([tokens.input, row.input, metric.input], H.inspect_summary, s_ins, s_outs, api_name="inspect_summary",
          show_progress="minimal", preprocess=False) \
        .then(H.inspect_cell, c_ins, c_outs, api_visibility="private", show_progress="minimal", preprocess=False)
    summary.select(H.summary_select, named(H.summary_select, state=state, metric=metric, token=tokens, row=row),
                   c_outs, api_visibility="private", preprocess=False)
    gr.on([cell_layer.input, cell_head.input], H.inspect_cell, c_ins, c_outs, api_name="inspect_cell",
          preprocess=False)
    svg.click(H.inspect_svg, named(H.inspect_svg, state=state), outputs(H.FilesOut, status=status, files=files),
              api_name="inspect_svg")
    P = inspect_probes
    lv_run.click(P.run_levers, named(P.run_levers, state=state, box=lv_box, answer=lv_answer, strength=lv_strength),
                 outputs(P.LeverOut, status=status, chart=lv_chart, summary=lv_summary), api_name="levers",
                 preprocess=False)
    ex_run.click(P.run_explored, named(P.run_explored, state=state, sigma=ex_sigma, layers=ex_layer, seed=ex_seed,
                                       max_new_tokens=max_new),
                 outputs(P.ExploreOut, status=status, figure=ex_fig, answers=ex_answers), api_name="explored",
                 preprocess=False)
    inspect_causal.wire(causal_panel, state=state, tokens=tokens)
    return model


def _compare_tab(choices):
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            (model_a, model_b), image, q, max_new, sample, temp, run, status = _inputs("c", choices, True)
        with gr.Column(scale=5):
            answers = _md("Pick two models, an image and a question, then press **Compare**.", label="answers")
            magnitude = gr.Textbox(label="How far attention moved", interactive=False, lines=2,
                                   elem_id="c-magnitude")
            tokens, layer, row = _selectors("c")
            magnify = gr.Radio(compare_tab.MAGNIFY_CHOICES, value="1", label="B − A colour range",
                               info="the maps' scale shows a small change as small; a magnification is stated in "
                                    "the panel's title", elem_id="c-magnify")
            figure = gr.Image(label="A | B | B − A", show_label=False, format="png", interactive=False,
                              elem_id="c-figure")
            _explain(EXPLAIN_COMPARE)
            rank = gr.Dataframe(headers=compare_tab.RANK_HEADERS, label="Heads ranked by how far their attention moved",
                                interactive=False, wrap=True)
            _explain(EXPLAIN_RANK)
            causal_panel = inspect_causal.compare_layout()  # ranked by knock-out change too
            files = gr.File(label="Downloads: figure (PNG, SVG) and both raw results (zip)", file_count="multiple",
                            interactive=False)
    state = gr.State()
    C = compare_tab
    _on_run(run, q, "compare", outputs(C.CompareOut, status=status, answers=answers, tokens=tokens, layer=layer,
                                       figure=figure, ranking=rank, files=files, state=state, magnitude=magnitude),
            C.run_compare, model_a=model_a, model_b=model_b, image=image, question=q, max_new_tokens=max_new,
            do_sample=sample, temperature=temp, layer=layer, row=row, magnify=magnify)
    gr.on([tokens.input, layer.select, row.input, magnify.input], C.compare_view,
          named(C.compare_view, state=state, layer=layer, token=tokens, row=row, magnify=magnify),
          outputs(C.CompareView, status=status, figure=figure, ranking=rank, files=files, magnitude=magnitude),
          api_name="compare_view",
          show_progress="minimal")
    inspect_causal.compare_wire(causal_panel, state=state, model_a=model_a, model_b=model_b, layer=layer,
                                tokens=tokens)
    return model_a, model_b


def _train_tab(choices):
    first = registry.initial_model()
    algo0 = training.DEFAULT_ALGORITHM
    # the page starts from the default recipe's calibrated values
    rec = training.recipe_defaults(training.ALGORITHMS[algo0][1], training.ALGORITHMS[algo0][3])
    _explain(TRAIN_INTRO)
    with gr.Accordion("What this server can train (and other hosts)", open=False):
        gr.Markdown(gpu.host_markdown(), elem_id="t-hosts")
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            model = gr.Dropdown(choices, value=first, label="Model to train", elem_id="t-model")
            data = gr.Radio([("bundled digit-grid task", training.BUNDLED), ("my data (zip upload)", training.UPLOAD)],
                            value=training.BUNDLED, label="Data set", elem_id="t-data")
            upload = gr.File(label="Data set zip", file_types=[".zip"], file_count="single", visible=False,
                             elem_id="t-upload")
            upload_info = gr.Markdown(UPLOAD_INFO, visible=False, elem_classes=["explain"])
            algo = gr.Radio([(v[0], k) for k, v in training.ALGORITHMS.items()], value=algo0, label="Algorithm",
                            elem_id="t-algo")
            algo_help = _explain(training.ALGO_HELP[algo0])
            # OPAD's teacher: the bundled task-trained teacher where it is listed, else another model
            teacher = gr.Dropdown(choices, value="teacher" if "teacher" in choices and first != "teacher"
                                  else next((c for c in choices if c != first), first),
                                  label="Teacher (OPAD copies its attention)", visible=False, elem_id="t-teacher")
            steps = _slider("steps", 20, label="steps", info="each: one batch of answers, then 2 "
                              "passes of updates over it", elem_id="t-steps")
            weight = _slider("weight", rec["weight"], label="attention-target weight λ_ground",
                               elem_id="t-weight")
            with gr.Row():
                sigma = _slider("explore_sigma", 1.0, label="exploration σ", visible=False)
                explore_layers = gr.Dropdown(training.EXPLORE_LAYERS, value="levers", label="explored layers",
                                             visible=False)
            with gr.Accordion("More settings", open=False):
                lr = gr.Number(rec["lr"], label=f"learning rate ({BOUNDS['lr'].lo:g} – {BOUNDS['lr'].hi:g})",
                               elem_id="t-lr")
                group = _slider("group_size", rec["group_size"], label="group size (answers per question)")
                prompts = _slider("prompts_per_step", rec["prompts_per_step"], label="questions per step")
                temp = _slider("train_temperature", rec["temperature"], label="sampling temperature")
                max_new = _slider("train_max_new_tokens", rec["max_new_tokens"], label="max new tokens")
                snap = _slider("snapshot_every", 5, label="snapshot every (steps)", elem_id="t-snap")
                seed = gr.Number(0, precision=0, label="seed", minimum=BOUNDS["seed"].lo, maximum=BOUNDS["seed"].hi)
                name = gr.Textbox(label="checkpoint name (optional)", placeholder="e.g. ral-digits; empty: automatic")
        with gr.Column(scale=5):
            with gr.Row(equal_height=True):
                start = gr.Button("Start training", variant="primary", elem_id="t-start", scale=2)
                cancel = gr.Button("Cancel", variant="stop", interactive=False,
                                   elem_id="t-cancel", scale=1)
            status = plain_markdown(elem_id="t-status")
            progress = gr.HTML(training.IDLE, elem_id="t-progress")
            curves = gr.Image(label="Live curves", show_label=False, format="png", interactive=False,
                              elem_id="t-curves", height=440)
            _explain(EXPLAIN_CURVES)
            snapshot = gr.Image(label="Probe snapshot", show_label=False, format="png", interactive=False,
                                elem_id="t-snapshot")
            note = _md(elem_id="t-note")
            _explain(EXPLAIN_SNAPSHOT)
    timer = gr.Timer(1.0, active=False)
    algo.change(training.algorithm_changed, algo, [teacher, sigma, explore_layers, weight, algo_help],
                api_visibility="private", show_progress="hidden")
    data.change(lambda k: (training.dataset_changed(k),) * 2, data, [upload, upload_info], api_visibility="private",
                show_progress="hidden")
    ins = named(training.train_start, dataset_kind=data, upload=upload, algorithm=algo, model=model, teacher=teacher,
                steps=steps, lr=lr, weight=weight, group_size=group, prompts_per_step=prompts, temperature=temp,
                sigma=sigma, explore_layers=explore_layers, max_new_tokens=max_new, snapshot_every=snap, seed=seed,
                name=name)
    page = dict(status=status, progress=progress, curves=curves, snapshot=snapshot, note=note, timer=timer,
                start=start, cancel=cancel)
    return dict(ins=ins, page=page, start=start, cancel=cancel, timer=timer, model=model, teacher=teacher)


def build_app() -> gr.Blocks:
    choices = registry.model_choices()
    with gr.Blocks(title="RAL workbench", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(INTRO)
        if os.environ.get("OAUTH_CLIENT_ID"):  # a Space with `hf_oauth: true`: runs then belong to the HF account
            gr.LoginButton()
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect"):
                i_model = _inspect_tab(choices)
            with gr.Tab("Compare", id="compare"):
                c_a, c_b = _compare_tab(choices)
            with gr.Tab("Train", id="train"):
                t = _train_tab(choices)
        lists = [i_model, c_a, c_b, t["model"], t["teacher"]]  # common.N_MODEL_LISTS, in this order
        outs = outputs(training.TrainView, **t["page"], models=lists[0], models_a=lists[1], models_b=lists[2],
                       models_t=lists[3], models_teacher=lists[4])
        t["start"].click(training.train_start, t["ins"], outs, api_name="train_start", preprocess=False)
        t["timer"].tick(training.train_poll, None, outs, api_name="train_poll", show_progress="hidden",
                        concurrency_limit=None)
        t["cancel"].click(training.train_cancel, None, outs, api_name="train_cancel", concurrency_limit=None)
        # session checkpoints (written by training) join the model lists; the folder goes when the tab closes,
        # after a running training run of that session has stopped
        demo.load(common.model_choices, None, lists, api_visibility="private")
        demo.unload(training.end_session)
    return demo


def launch_kwargs() -> dict:
    """Server settings: RAL_HOST / RAL_PORT (then Gradio's own env, e.g. on Spaces), CSS, examples readable."""
    host, port = startup.address()
    return dict(server_name=host, server_port=port, allowed_paths=[str(common.EXAMPLES_DIR)], css=CSS, footer_links=["api"],
                max_file_size=MAX_ZIP_BYTES)


def serving_threads() -> int:
    """Torch threads for serving: half the cores, so a training run (its own threads) keeps the other half."""
    return settings.get("RAL_THREADS", max(1, min(4, (os.cpu_count() or 2) // 2)))


def launch(**overrides):
    import torch

    from app import render_pool

    from app import sessions

    kw = {**launch_kwargs(), **overrides}
    block = not kw.pop("prevent_thread_lock", False)
    torch.set_num_threads(serving_threads())
    startup.say("starting the figure workers …")
    render_pool.warm_up()
    sessions.start_sweeper()
    startup.say("building the page (the model list: " + ", ".join(registry.model_choices()[:4]) + ") …")
    demo = build_app()
    # Requests run side by side: each model has its own lock and batches concurrent inspects, figures are drawn
    # in worker processes, and every request has a time limit (RAL_REQUEST_SECONDS).
    demo.queue(default_concurrency_limit=settings.get("RAL_CONCURRENCY"))
    try:
        out = demo.launch(**kw, prevent_thread_lock=True)
    except OSError:  # the port was taken after the early check (or by another address family)
        raise SystemExit(startup.busy_port_line(kw["server_name"], kw["server_port"])) from None
    startup.say(f"ready: open http://{kw['server_name']}:{kw['server_port']} (Ctrl+C stops; models load on first use)")
    if block:
        demo.block_thread()
    return out
