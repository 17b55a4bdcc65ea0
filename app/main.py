"""The Gradio front end: `build_app()` returns the Blocks, `launch()` serves it (RAL_HOST / RAL_PORT).

Tabs: Inspect (one model, where it looked), Compare (two models on the same answer tokens), Train (coming).
All work happens in `app.handlers`; this file is layout and wiring only.
"""
from __future__ import annotations

import os

import gradio as gr  # app/__init__.py has set GRADIO_ANALYTICS_ENABLED=False and offline mode first

from app import handlers, registry
from app.handlers import LAST, MEAN, RANK_HEADERS

CSS = """
.explain { font-size: 0.9em; opacity: 0.85; }
#i-status p, #c-status p { color: #b45309; font-weight: 600; }
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
EXPLAIN_COMPARE = ("**A | B | B − A.** Model A answers; then both models are fed A's answer token by token, so "
                   "both maps describe exactly the same words. Left and middle share one colour scale. Right: the "
                   "signed difference B − A — red where B looks more than A, blue where less.")
EXPLAIN_RANK = ("Heads whose spread of attention over the image moved most between A and B (Jensen–Shannon "
                "divergence, 0 = identical, ln 2 ≈ 0.69 = no overlap), with the share of attention each head "
                "puts on the image. 'mean over layers' ranks the last layer's heads.")
TRAIN_NOTE = ("### Training is coming\nTraining from the browser (GRPO with the RAL attention loss, and on-policy "
              "attention distillation) is being built on the training engine, which is not finished yet, so this "
              "tab does nothing today. When it lands, runs and checkpoints will live in your private session "
              "folder and the checkpoints will appear as `session: …` models in Inspect and Compare.")


def _explain(text):
    return gr.Markdown(text, elem_classes=["explain"])


def _inputs(prefix: str, choices: list[str], two_models: bool):
    """Model picker(s), image, question, generation options, run button, status, examples."""
    first = registry.initial_model()
    if two_models:
        second = next((c for c in choices if c != first), first)
        models = [gr.Dropdown(choices, value=first, label="Model A (answers)", elem_id=f"{prefix}-model-a"),
                  gr.Dropdown(choices, value=second, label="Model B (scored on A's answer)",
                              elem_id=f"{prefix}-model-b")]
    else:
        models = [gr.Dropdown(choices, value=first, label="Model", elem_id=f"{prefix}-model")]
    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=230,
                     elem_id=f"{prefix}-image")
    question = gr.Textbox(label="Question", placeholder="e.g. What digit is in row 2 column 1?",
                          elem_id=f"{prefix}-question")
    with gr.Accordion("Generation options", open=False):
        max_new = gr.Slider(1, 64, value=16, step=1, label="max new tokens")
        sample = gr.Checkbox(False, label="sample instead of greedy decoding")
        temp = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (when sampling)")
    run = gr.Button("Compare" if two_models else "Inspect", variant="primary", elem_id=f"{prefix}-run")
    status = gr.Markdown(label="status", elem_id=f"{prefix}-status")
    ex = handlers.examples()
    if ex:
        gr.Examples([[e["path"], e["question"]] for e in ex], inputs=[image, question], label="Examples")
    return models, image, question, max_new, sample, temp, run, status


def _selectors(prefix: str):
    tokens = gr.Radio([("all tokens (mean)", MEAN)], value=MEAN, label="Answer tokens", info=TOKENS_INFO,
                      elem_id=f"{prefix}-tokens")
    with gr.Row():
        layer = gr.Dropdown(handlers.layer_choices([]), value=LAST, label="Layer", info=LAYER_INFO,
                            elem_id=f"{prefix}-layer")
        row = gr.Radio(ROW_CHOICES, value="predicts", label="Attention row", info=ROW_INFO)
    return tokens, layer, row


def _inspect_tab(choices):
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            (model,), image, q, max_new, sample, temp, run, status = _inputs("i", choices, False)
        with gr.Column(scale=5):
            answer = gr.Markdown("Pick a model, an image and a question, then press **Inspect**.", label="answer")
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
            _explain(EXPLAIN_HEADS)
            files = gr.File(label="Downloads: figures (PNG, SVG) and the raw result (zip)", file_count="multiple",
                            interactive=False)
    state = gr.State()
    # Images arrive unprocessed (preprocess=False) so that a non-image upload reaches the handler and gets a
    # clear message instead of failing inside Gradio; the handler opens it with ral_core's safe loader.
    outs = [status, answer, tokens, layer, overlay, heads, mass, files, state]
    ins = [model, image, q, max_new, sample, temp, layer, row]
    run.click(handlers.run_inspect, ins, outs, api_name="inspect", preprocess=False)
    q.submit(handlers.run_inspect, ins, outs, api_visibility="private", preprocess=False)
    gr.on([tokens.input, layer.input, row.input], handlers.inspect_view, [state, layer, tokens, row],
          [status, overlay, heads, mass, files], api_name="inspect_view", show_progress="minimal")
    return model


def _compare_tab(choices):
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            (model_a, model_b), image, q, max_new, sample, temp, run, status = _inputs("c", choices, True)
        with gr.Column(scale=5):
            answers = gr.Markdown("Pick two models, an image and a question, then press **Compare**.",
                                  label="answers")
            tokens, layer, row = _selectors("c")
            figure = gr.Image(label="A | B | B − A", show_label=False, format="png", interactive=False,
                              elem_id="c-figure")
            _explain(EXPLAIN_COMPARE)
            rank = gr.Dataframe(headers=RANK_HEADERS, label="Heads ranked by how far their attention moved",
                                interactive=False, wrap=True)
            _explain(EXPLAIN_RANK)
            files = gr.File(label="Downloads: figure (PNG, SVG) and both raw results (zip)", file_count="multiple",
                            interactive=False)
    state = gr.State()
    outs = [status, answers, tokens, layer, figure, rank, files, state]
    ins = [model_a, model_b, image, q, max_new, sample, temp, layer, row]
    run.click(handlers.run_compare, ins, outs, api_name="compare", preprocess=False)
    q.submit(handlers.run_compare, ins, outs, api_visibility="private", preprocess=False)
    gr.on([tokens.input, layer.input, row.input], handlers.compare_view, [state, layer, tokens, row],
          [status, figure, rank, files], api_name="compare_view", show_progress="minimal")
    return model_a, model_b


def build_app() -> gr.Blocks:
    choices = registry.model_choices()
    with gr.Blocks(title="RAL workbench", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect"):
                i_model = _inspect_tab(choices)
            with gr.Tab("Compare", id="compare"):
                c_a, c_b = _compare_tab(choices)
            with gr.Tab("Train", id="train"):
                gr.Markdown(TRAIN_NOTE)
        # session checkpoints (written by training) join the model lists; the folder goes when the tab closes
        demo.load(handlers.model_choices, None, [i_model, c_a, c_b], api_visibility="private")
        demo.unload(handlers.end_session)
    return demo


def launch_kwargs() -> dict:
    """Server settings: RAL_HOST / RAL_PORT (then Gradio's own env, e.g. on Spaces), CSS, examples readable."""
    return dict(server_name=os.environ.get("RAL_HOST") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                server_port=int(os.environ.get("RAL_PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860),
                allowed_paths=[str(handlers.EXAMPLES_DIR)], css=CSS, footer_links=["api"])


def launch(**overrides):
    import torch

    torch.set_num_threads(int(os.environ.get("RAL_THREADS", min(4, os.cpu_count() or 1))))
    demo = build_app()
    demo.queue(default_concurrency_limit=1)
    return demo.launch(**{**launch_kwargs(), **overrides})
