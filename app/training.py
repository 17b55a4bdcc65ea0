"""The Train tab: page values → a validated TrainConfig, the run's page (progress, live curves, the probe snapshot)
and its handlers. Runs themselves queue and train in `app.runs`. No tensor math here.
"""
from __future__ import annotations

import dataclasses
import html
import itertools
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np

from ral_core import render
from ral_core.compare import jsd
from ral_core.config import build_config
from ral_core.errors import RALError
from ral_core.inspection import InspectionResult

from app import figures, registry, sessions
from app.common import BOUNDS, N_MODEL_LISTS, RENDER_LOCK, code, guard, md_text
from app.runs import QUEUE, Run, RunState, max_runs

ALGORITHMS = {  # value → (label, recipe, extra overrides, what the weight slider sets)
    "grounded": ("RAL + attention target (default: a change you can see)", "grounded", {}, "lambda_ground"),
    "grpo": ("GRPO — reward only", "grpo", {}, None),
    "ral": ("RAL — GRPO + attention term", "ral", {}, "lambda_attn"),
    "ral_visual": ("RAL, image tokens only", "ral", {"attn_support": "visual"}, "lambda_attn"),
    "opad": ("OPAD — copy a teacher's attention", "opad", {}, "gamma_opad"),
    "ral_explore": ("RAL + attention exploration", "ral", {"explore": True}, "lambda_attn"),
}
DEFAULT_ALGORITHM = "grounded"
ALGO_HELP = {
    "grounded": "**RAL + attention target** (the default): RAL, plus a term that pulls one attention head of the "
                "last layer toward the question's target region on answers that earned reward (weight λ_ground; "
                "the other heads are not pulled). RAL's own "
                "term compares attention with the sampling policy's, so it is zero on each batch's first update "
                "and small after it: in a run this short it cannot move attention enough to see. Choose **RAL** "
                "below for the paper's recipe alone.",
    "grpo": "**GRPO**: only the reward trains the model; where it looks changes only as a side effect.",
    "ral": "**RAL**: GRPO plus an attention term — the attention pattern of well-rewarded answers is reinforced, "
           "that of poor answers pushed away (weight λ_attn; the paper used 0.5 – 5).",
    "ral_visual": "**RAL, image tokens only**: as RAL, but the attention policy only counts the image patches "
                  "(renormalised), so the term is purely about where in the image the model looks.",
    "opad": "**OPAD**: the model answers, a frozen *teacher* model reads the same answers, and the model is pulled "
            "toward the teacher's attention (weight γ). Works from the first step; the teacher must share the "
            "tokenizer. The bundled `teacher` (6 layers, held-out 0.88 against `default`'s 0.69) moves attention "
            "visibly, but on this task copying where its last layer looks cost about 2 points of accuracy "
            "(docs/results.md).",
    "ral_explore": "**RAL + exploration**: each rollout gets a random nudge to its attention (spread σ) at the chosen "
                   "layers, so a group's answers differ in where they look and RAL can learn from that.",
}
EXPLORE_LAYERS = [("strongest levers (measured first)", "levers"), ("last layer", "last"), ("all layers", "all")]
BUNDLED, UPLOAD = "grounding", "upload"
# train_start's number → its entry in common.BOUNDS (sliders and checks); the recipes' other keys stay as they are
BOUND_OF = {"steps": "steps", "lr": "lr", "weight": "weight", "group_size": "group_size",
            "prompts_per_step": "prompts_per_step", "temperature": "train_temperature", "sigma": "explore_sigma",
            "max_new_tokens": "train_max_new_tokens", "snapshot_every": "snapshot_every", "seed": "seed"}


def recipe_defaults(recipe: str = "ral", weight_key: str = "lambda_attn") -> dict:
    """The recipe's values for the page's fields, clipped into the page's ranges (fallbacks if unreadable);
    `weight` is the recipe's value of what the weight slider sets."""
    out = {"lr": 5e-5, "group_size": 8, "prompts_per_step": 16, "temperature": 1.0, "max_new_tokens": 12,
           "weight": 1.0}
    try:
        cfg = build_config(recipe).to_dict()
    except RALError:
        return out
    cfg["weight"] = cfg.get(weight_key, out["weight"])
    for k in out:
        lo, hi, kind = BOUNDS[BOUND_OF[k]][:3]
        out[k] = kind(min(max(cfg[k], lo), hi))
    return out


# ---- inputs → config -----------------------------------------------------------------------------------
def _number(key: str, value):
    lo, hi, kind, label = BOUNDS[BOUND_OF[key]][:4]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RALError(f"{label} must be a number (got {value!r})") from None
    if v != v or not lo <= v <= hi:
        raise RALError(f"{label} must be between {lo:g} and {hi:g} (got {value!r})")
    if kind is int:
        if not v.is_integer():
            raise RALError(f"{label} must be a whole number (got {value!r})")
        return int(v)
    return v


def _upload_path(value) -> tuple[str, str]:
    """gr.File payload (preprocess off) → (server path, name to show); only what Gradio received is accepted."""
    from app.uploads import accepted_path

    path, name = accepted_path(value, nothing="no data set: upload a zip with a .jsonl file and its images, "
                               "or pick the bundled task")
    return str(path), f"'{name}'"


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")


def _checkpoint_name(request, wanted: str, algorithm: str) -> str:
    taken = set(sessions.list_checkpoints(request))
    wanted = (wanted or "").strip()
    if wanted:
        if not _NAME_OK.match(wanted) or ".." in wanted:
            raise RALError(f"'{wanted}' cannot be a checkpoint name: use letters, digits, '.', '_', '-' "
                           "(up to 60, starting with a letter or digit)")
        if wanted in taken:
            raise RALError(f"this session already has a checkpoint called '{wanted}'; choose another name")
        return wanted
    stem = algorithm.replace("_", "-")
    return next(f"{stem}-{n}" for n in itertools.count(1) if f"{stem}-{n}" not in taken)


def make_config(request, run_dir: Path, dataset_kind, upload, algorithm, model, teacher, steps, lr, weight,
                group_size, prompts_per_step, temperature, sigma, explore_layers, max_new_tokens, snapshot_every,
                seed):
    """Page values → a validated TrainConfig (RALError with a clear message otherwise) and a data note. An uploaded
    data set is not unpacked here (`_data_set` does, when the run starts)."""
    if algorithm not in ALGORITHMS:
        raise RALError(f"unknown algorithm '{algorithm}'; choose one of: {', '.join(ALGORITHMS)}")
    label, recipe, extra, weight_key = ALGORITHMS[algorithm]
    nums = {k: _number(k, v) for k, v in dict(steps=steps, lr=lr, weight=weight, group_size=group_size,
                                                prompts_per_step=prompts_per_step, temperature=temperature,
                                                sigma=sigma, max_new_tokens=max_new_tokens,
                                                snapshot_every=snapshot_every, seed=seed).items()}
    over = dict(extra, model=registry.resolve(model, request), output_dir=str(run_dir / "run"),
                steps=nums["steps"], lr=nums["lr"], group_size=nums["group_size"],
                prompts_per_step=nums["prompts_per_step"], temperature=nums["temperature"],
                max_new_tokens=nums["max_new_tokens"], snapshot_every=nums["snapshot_every"], seed=nums["seed"],
                probe_samples=1, keep_checkpoints=1,
                # a run that fails later keeps its last periodic checkpoint (≤ 4 saves a run, only the newest kept)
                save_every=max(1, nums["steps"] // 4), threads=1, log_tensorboard=False,
                # the attention-JSD curve costs one extra forward per measured step: every step for short runs
                attn_metrics_every=max(1, min(5, nums["steps"] // 20)))
    if weight_key:
        if nums["weight"] <= 0:
            raise RALError(f"{label} needs an attention weight above 0 (0 would be plain GRPO)")
        over[weight_key] = nums["weight"]
    if algorithm == "opad":
        if not teacher:
            raise RALError("OPAD needs a teacher: pick one from the model list")
        over["teacher"] = registry.resolve(teacher, request)
    if algorithm == "ral_explore":
        if nums["sigma"] <= 0:
            raise RALError("exploration needs σ above 0 (σ = 0 perturbs nothing)")
        if explore_layers not in {v for _, v in EXPLORE_LAYERS}:
            raise RALError("exploration layers must be 'levers', 'last' or 'all'")
        over.update(explore_sigma=nums["sigma"], explore_layers=explore_layers)
    if dataset_kind == UPLOAD:
        over["dataset"] = str(run_dir / "data")  # the unpacked JSONL's path replaces it when the run starts
        note = "your data set"
    elif dataset_kind in (BUNDLED, None, ""):
        over["dataset"] = "grounding"
        note = "the bundled digit-grid task"
    else:
        raise RALError("data set must be the bundled task or an uploaded zip")
    return build_config(recipe, over), note


def _data_set(run: Run, upload) -> None:
    """An uploaded data set: checked now as far as it can be without unpacking (size, a zip, member names, the
    declared size), kept beside the run, and unpacked when the run starts. A run that starts at once unpacks it here,
    so its data's problems show at once; a waiting one holds only the zip, and its unpacked size counts against the
    queue's bound."""
    from app.uploads import check_zip, dataset_from_zip

    path, shown = _upload_path(upload)
    run.data_bytes = check_zip(path, shown)
    kept = run.dir / "data.zip"
    shutil.copyfile(path, kept)  # Gradio may clear its upload folder before a waiting run starts

    def prepare():
        jsonl, n = dataset_from_zip(kept, run.dir / "data", shown_name=shown)
        run.cfg = dataclasses.replace(run.cfg, dataset=str(jsonl))
        run.data_note = f"your data set {shown} ({n} samples)"
        kept.unlink(missing_ok=True)
    run.data_note = f"your data set {shown}"
    run.prepare = prepare
    if QUEUE.starts_now():
        prepare()
        run.prepare, run.data_bytes = None, 0


# ---- the Train tab's handlers ----------------------------------------------------------------------------
class TrainView(NamedTuple):
    status: str
    progress: Any   # HTML
    curves: Any     # PNG path
    snapshot: Any   # PNG path
    note: Any       # Markdown under the snapshot
    timer: Any      # gr.Timer update (polls while a run is queued or running)
    start: Any      # Start button update
    cancel: Any     # Cancel button update
    models: Any     # model lists (Inspect, Compare A, Compare B, Train model, Train teacher)
    models_a: Any
    models_b: Any
    models_t: Any
    models_teacher: Any


IDLE = ("<div class='ral-progress'><p>No run yet. Choose the settings on the left and press <b>Start training</b>."
        "</p></div>")


def _bar(frac: float, text: str) -> str:
    pct = max(0.0, min(1.0, frac)) * 100
    return ("<div class='ral-progress' id='t-progress-bar'>"
            "<div style='background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden'>"
            f"<div style='width:{pct:.1f}%;background:#f97316;height:14px'></div></div>"
            f"<p style='margin:4px 0 0 0'>{text}</p></div>")


def _progress(run: Run, st: RunState) -> str:
    total = run.cfg.steps
    if st.status == "queued":
        pos = QUEUE.position(run)
        cap = max_runs()
        return _bar(0, f"⏳ waiting in the queue: position <b>{pos}</b> "
                       f"(this server trains {cap} run{'s' if cap > 1 else ''} at a time)")
    if st.status == "loading":
        return _bar(0, "loading the model and preparing the data…")
    step = st.step
    hist = run.history()
    pace = ""
    if hist and st.status == "running":
        per = sum(m.get("step_time", 0.0) for m in hist[-5:]) / len(hist[-5:])
        pace = f" · {per:.2f} s/step · about {per * (total - step):.0f} s left"
    if run.zerogpu is not None and getattr(run, "gpu_calls", 0):
        pace += f" · {run.gpu_calls} GPU call{'s' if run.gpu_calls > 1 else ''}, {run.gpu_seconds} s declared"
    # the trainer's collapse guard (metrics rows carry its warnings): shown with the bar, whatever the state
    warn = "".join(f"<br>⚠️ {html.escape(w)}" for m in hist for w in m.get("warnings", ()))
    if st.status == "running":
        stop = " · stopping after this step…" if st.stopping else ""
        return _bar(step / total, f"training: step <b>{step}</b> / {total}{pace}{stop}{warn}")
    where = (f" Checkpoint kept as <b>session: {html.escape(st.checkpoint)}</b> — pick it in Inspect or Compare."
             if st.checkpoint else "")
    if st.status == "done":
        wall = ((st.ended_at or time.time()) - st.started_at) if st.started_at else 0.0
        return _bar(1.0, f"✅ done: {step} / {total} steps in {wall:.0f} s in all{pace}.{where}{warn}")
    if st.status == "cancelled":
        return _bar(step / total, f"⏹ {html.escape(st.message)}.{where}{warn}")
    return _bar(step / total, f"⚠️ stopped at step {step}: see the message above.{where}{warn}")


def _render(run: Run, kind: str, key, draw) -> str | None:
    """Re-render one figure only when its key (e.g. the number of logged steps) changed."""
    old = run.rendered.get(kind)
    if old and old[0] == key:
        return old[1]
    with RENDER_LOCK:
        fig = draw()
        path = run.dir / f"{kind}-{run.id}-{time.monotonic_ns()}.png"
        render.save_figure(fig, path)
    if old:
        Path(old[1]).unlink(missing_ok=True)
    run.rendered[kind] = (key, str(path))
    return str(path)


def _curves(run: Run):
    hist = run.history()
    title = f"{ALGORITHMS[run.algorithm][0]} on {run.data_note}"
    return _render(run, "curves", len(hist), lambda: render.training_curves(hist, run.cfg.steps, title))


def _snapshot_dirs(run: Run) -> list[Path]:
    root = Path(run.cfg.output_dir) / "snapshots"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step-*") if (d / "probe-0" / "result.json").is_file())


def _snapshot(run: Run):
    """(PNG, note): the probe's attention before training next to the newest snapshot, one colour scale."""
    snaps = _snapshot_dirs(run)
    if not snaps:
        return None, "The probe's attention appears here once the model is loaded."
    first, last = snaps[0], snaps[-1]
    old = run.rendered.get("snapshot")
    if old and old[0] == last.name:
        return old[1], run.rendered["snapshot-note"][1]
    try:
        a = InspectionResult.load(first / "probe-0")
        b = InspectionResult.load(last / "probe-0") if last != first else a
    except RALError:  # a snapshot still being written: keep what is shown
        return (old[1], run.rendered["snapshot-note"][1]) if old else (None, "")
    s0, s1 = int(first.name.split("-")[1]), int(last.name.split("-")[1])
    layer = a.layers[-1]
    boxes = [tuple(x) for x in run.probe.get("boxes", [])]
    # the head that moved most, as Compare ranks them: a run that pulls one head (the default) changes the head
    # mean by a quarter of that head's change, too little to see
    moved = jsd(a.head_maps(layer), b.head_maps(layer)) if s1 != s0 else None
    head = int(np.argmax(moved)) if moved is not None else "mean"
    which = "mean over heads" if head == "mean" else f"head {head}"
    path = _render(run, "snapshot", last.name, lambda: figures.pair_overlay(
        a, b, f"step {s0}{' (before training)' if s0 == 0 else ''}: answers {a.answer!r}",
        f"step {s1}: answers {b.answer!r}", layer=layer, boxes=boxes, head=head,
        diff_title=f"change of {which}, step {s1} − step {s0}\n(red: looks more, blue: less)" if s1 != s0 else ""))
    q = run.probe.get("question", a.question)
    exp = run.probe.get("answer")
    where = (f"head {head}, the one whose attention over the image moved most (JSD {moved[head]:.3g}, "
             f"{100 * moved[head] / math.log(2):.1f} % of ln 2; the least-moved head: {moved.min():.3g})"
             if moved is not None else "mean over heads")
    note = (f"**Probe image** (held out from training): *{md_text(q)}*" + (f" — expected {code(exp)}" if exp else "") +
            f". Last layer ({layer}), {where}, mean over answer tokens; the first two panels share one colour "
            "scale, the third shows what training changed" + ("; the cyan box marks where the answer is." if boxes
                                                               else "."))
    run.rendered["snapshot-note"] = (last.name, note)
    return path, note


def _models_unchanged():
    return tuple(gr.update() for _ in range(N_MODEL_LISTS))


def _models_refresh(request):
    c = registry.model_choices(request)
    return tuple(gr.update(choices=c) for _ in range(N_MODEL_LISTS))


def _view(run: Run | None, request, status: str = "") -> TrainView:
    if run is None:
        return TrainView(status, IDLE, None, None, "", gr.Timer(active=False), gr.update(interactive=True),
                         gr.update(interactive=False), *_models_unchanged())
    st = run.snapshot()  # one reading for the whole page: a run that ends meanwhile shows next poll, never half
    if st.status == "failed" and not status:
        status = f"⚠️ {st.message}"
    curves, snap, note = None, None, ""
    if st.loaded and run.dir.is_dir():
        with run.render_lock:
            curves = _curves(run)
            snap, note = _snapshot(run)
    elif st.loaded:  # the session's folder was cleaned up after the run: no figure links to a removed file
        note = "This run's figures were cleaned up (the session sat idle); its numbers above are still right."
    models = _models_unchanged()
    if not st.active and st.checkpoint and not run.announced:
        run.announced = True
        models = _models_refresh(request)
    return TrainView(status, _progress(run, st), curves, snap, note, gr.Timer(active=st.active),
                     gr.update(interactive=not st.active), gr.update(interactive=st.active), *models)


@guard(TrainView)
def train_start(dataset_kind=BUNDLED, upload=None, algorithm=DEFAULT_ALGORITHM, model="default", teacher=None, steps=20,
                lr=5e-5, weight=1.0, group_size=8, prompts_per_step=16, temperature=1.0, sigma=1.0,
                explore_layers="levers", max_new_tokens=12, snapshot_every=5, seed=0, name="",
                request: gr.Request = None) -> TrainView:
    """Check the settings, then queue the run (it starts at once when the server has a free slot)."""
    from app import gpu
    gpu.check_training(request, steps)  # ZeroGPU: sign-in and the step cap
    h = sessions._session_hash(request)
    cur = QUEUE.for_session(h)
    if cur is not None and cur.active:
        raise RALError("this session already has a training run; cancel it or wait until it ends")
    ck_name = _checkpoint_name(request, name, algorithm if algorithm in ALGORITHMS else "run")
    run_dir = sessions.new_work_dir(request, "runs")
    try:
        cfg, note = make_config(request, run_dir, dataset_kind, upload, algorithm, model, teacher, steps, lr, weight,
                                group_size, prompts_per_step, temperature, sigma, explore_layers, max_new_tokens,
                                snapshot_every, seed)
        run = Run(h, cfg, ck_name, algorithm, run_dir, note)
        run.zerogpu = gpu.run_context()  # ZeroGPU: the run trains as GPU calls charged to this visitor
        if dataset_kind == UPLOAD:
            _data_set(run, upload)
        QUEUE.submit(run)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return _view(run, request)


@guard(TrainView)
def train_poll(request: gr.Request = None) -> TrainView:
    """The newest run of this session: progress, curves, the probe snapshot (polled by a timer)."""
    return _view(QUEUE.for_session(sessions._session_hash(request)), request)


@guard(TrainView)
def train_cancel(request: gr.Request = None) -> TrainView:
    """Stop at the next step boundary; the checkpoint written there is kept."""
    run = QUEUE.for_session(sessions._session_hash(request))
    if run is None or not run.active:
        raise RALError("no training run to cancel")
    QUEUE.cancel(run)
    return _view(run, request, "Cancelling: the run stops after the current step and keeps its checkpoint.")


def algorithm_changed(algorithm):
    """Show the teacher only for OPAD, σ and exploration layers only for exploration, the weight when used."""
    wk = ALGORITHMS.get(algorithm, (None, None, None, None))[3]
    label = {"lambda_attn": "attention weight λ_attn", "lambda_ground": "attention-target weight λ_ground",
             "gamma_opad": "attention weight γ (OPAD)"}.get(wk, "attention weight")
    return (gr.update(visible=algorithm == "opad"), gr.update(visible=algorithm == "ral_explore"),
            gr.update(visible=algorithm == "ral_explore"), gr.update(visible=wk is not None, label=label),
            ALGO_HELP.get(algorithm, ""))


def dataset_changed(kind):
    return gr.update(visible=kind == UPLOAD)


def end_session(request: gr.Request = None) -> None:
    """The browser session ended: cancel its run and delete its folder (at once, or by the run's reader thread
    once the training process has exited, so the trainer never writes into a deleted folder)."""
    try:
        owner = sessions._session_hash(request)
    except RALError:
        return
    if owner.startswith("hf:"):  # a signed-in user's run and checkpoints outlive the tab (their other tabs see them)
        return
    deferred = QUEUE.end_session(owner)
    if not deferred:
        sessions.cleanup(request)

