"""Training from the browser: a server-wide FIFO queue of runs (at most RAL_MAX_RUNS at once, default 1), each
run in its own child process (`app.train_worker`, calling `ral_core.trainer.Trainer`), and the Train tab's handlers.

A child process, not a thread: a tiny model's training loop is Python-bound, and in a thread it shared the GIL
with Gradio's event loop and every request's handler (20 concurrent inspects slowed it 4×); a process gets the
cores from the OS. A thread per run here reads the child's messages (steps, metrics, status) into the `Run` the
page polls, and registers the checkpoint when the child is done. A child that dies without a word becomes a
failed run that keeps its last periodic checkpoint; children are daemons and leave with the server.

A run lives in the session's private `runs/<n>/` folder (config, metrics, snapshots, the trainer's own
checkpoints, an uploaded data set). When it ends (done, or cancelled after ≥ 1 step) its last checkpoint is
copied — weights, tokenizer, processor, no optimizer state — into the session's `checkpoints/<name>/`, where it
is listed as the model `session: <name>` in Inspect, Compare and Train. No tensor math here.
"""
from __future__ import annotations

import functools
import html
import itertools
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core.config import build_config
from ral_core.errors import RALError
from ral_core.inspection import InspectionResult

from app import figures, registry, sessions, train_worker
from app.handlers import N_MODEL_LISTS, RENDER_LOCK

log = logging.getLogger("ral.app.train")

ALGORITHMS = {  # value → (label, recipe, extra overrides, what the weight slider sets)
    "grpo": ("GRPO — reward only", "grpo", {}, None),
    "ral": ("RAL — GRPO + attention term", "ral", {}, "lambda_attn"),
    "ral_visual": ("RAL, image tokens only", "ral", {"attn_support": "visual"}, "lambda_attn"),
    "opad": ("OPAD — copy a teacher's attention", "opad", {}, "gamma_opad"),
    "ral_explore": ("RAL + attention exploration", "ral", {"explore": True}, "lambda_attn"),
}
ALGO_HELP = {
    "grpo": "**GRPO**: only the reward trains the model; where it looks changes only as a side effect.",
    "ral": "**RAL**: GRPO plus an attention term — the attention pattern of well-rewarded answers is reinforced, "
           "that of poor answers pushed away (weight λ_attn; the paper used 0.5 – 5).",
    "ral_visual": "**RAL, image tokens only**: as RAL, but the attention policy only counts the image patches "
                  "(renormalised), so the term is purely about where in the image the model looks.",
    "opad": "**OPAD**: the model answers, a frozen *teacher* model reads the same answers, and the model is pulled "
            "toward the teacher's attention (weight γ). Works from the first step; the teacher must share the "
            "tokenizer.",
    "ral_explore": "**RAL + exploration**: each rollout gets a random nudge to its attention (spread σ) at the chosen "
                   "layers, so a group's answers differ in where they look and RAL can learn from that.",
}
EXPLORE_LAYERS = [("strongest levers (measured first)", "levers"), ("last layer", "last"), ("all layers", "all")]
# (min, max, type) for every number the page sends; the recipes' other keys stay as they are
RANGES = {"steps": (1, 500, int), "lr": (1e-7, 1e-2, float), "weight": (0.0, 10.0, float),
          "group_size": (2, 16, int), "prompts_per_step": (1, 16, int), "temperature": (0.1, 2.0, float),
          "sigma": (0.0, 5.0, float), "max_new_tokens": (1, 32, int), "snapshot_every": (1, 100, int),
          "seed": (0, 2**31 - 1, int)}
LABELS = {"steps": "steps", "lr": "learning rate", "weight": "attention weight", "group_size": "group size",
          "prompts_per_step": "prompts per step", "temperature": "temperature", "sigma": "exploration σ",
          "max_new_tokens": "max new tokens", "snapshot_every": "snapshot every", "seed": "seed"}
BUNDLED, UPLOAD = "grounding", "upload"
ACTIVE_STATES = ("queued", "loading", "running")


def recipe_defaults(recipe: str = "ral") -> dict:
    """The recipe's values for the page's fields, clipped into the page's ranges (fallbacks if unreadable)."""
    out = {"lr": 5e-5, "group_size": 8, "prompts_per_step": 16, "temperature": 1.0, "max_new_tokens": 12,
           "lambda_attn": 1.0}
    try:
        cfg = build_config(recipe).to_dict()
    except RALError:
        return out
    key = {"lambda_attn": "weight"}
    for k in out:
        lo, hi, kind = RANGES[key.get(k, k)]
        out[k] = kind(min(max(cfg[k], lo), hi))
    return out


def max_runs() -> int:
    try:
        return max(1, int(os.environ.get("RAL_MAX_RUNS", "1")))
    except ValueError:
        return 1


# ---- one run -------------------------------------------------------------------------------------------
_MP = train_worker.CONTEXT
CRASH = "the training process stopped unexpectedly (exit code {code})"


class Run:
    _ids = itertools.count(1)

    def __init__(self, session_hash: str, cfg, name: str, algorithm: str, run_dir: Path, data_note: str):
        self.id = next(self._ids)
        self.session_hash, self.cfg, self.name, self.algorithm = session_hash, cfg, name, algorithm
        self.dir, self.data_note = run_dir, data_note
        self.status, self.message = "queued", ""
        self.cancel = threading.Event()
        self._signals = None                 # (cancel, gone) multiprocessing Events while the child lives
        self.session_ended = False
        self.checkpoint: str | None = None   # registered name once copied into checkpoints/
        self.announced = False               # model lists refreshed after the checkpoint appeared
        self.probe: dict = {}
        self.queued_at, self.started_at, self.ended_at = time.time(), None, None
        self.rendered: dict[str, tuple] = {}  # figure kind → (key, png path)
        self.render_lock = threading.Lock()  # overlapping polls of one session render one at a time
        self.thread: threading.Thread | None = None  # the parent's reader: progress in, clean-up after the child
        self.process = None                  # the child process that trains
        self.pid: int | None = None
        self.loaded = False                  # the trainer exists (model loaded, snapshots may appear)
        self._step = 0
        self._history: list[dict] = []       # metrics of every step, as the child reports them

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    @property
    def step(self) -> int:
        return self._step

    def history(self) -> list[dict]:
        return list(self._history)

    def latest_checkpoint(self) -> Path | None:
        """The trainer's newest complete checkpoint, read from disk (the child may be gone)."""
        f = Path(self.cfg.output_dir) / "checkpoints" / "latest"
        try:
            return f.parent / f.read_text().strip()
        except OSError:
            return None


class RunQueue:
    """Server-wide FIFO of training runs with a cap on how many train at once."""

    def __init__(self):
        self.lock = threading.RLock()
        self.waiting: deque[Run] = deque()
        self.running: list[Run] = []
        self.latest: dict[str, Run] = {}   # session hash → its newest run
        self.target = train_worker.main    # what the child runs (module-level: pickled by reference)

    def for_session(self, session_hash: str) -> Run | None:
        return self.latest.get(session_hash)

    def submit(self, run: Run) -> None:
        with self.lock:
            cur = self.latest.get(run.session_hash)
            if cur is not None and cur.active:
                raise RALError("this session already has a training run; cancel it or wait until it ends")
            self.latest[run.session_hash] = run
            self.waiting.append(run)
            self._pump()

    def position(self, run: Run) -> int:
        """1-based place in the waiting line (0 when not waiting)."""
        with self.lock:
            try:
                return list(self.waiting).index(run) + 1
            except ValueError:
                return 0

    def cancel(self, run: Run) -> None:
        with self.lock:
            run.cancel.set()
            if run._signals:
                run._signals[0].set()  # the child stops at the next step boundary
            if run in self.waiting:
                self.waiting.remove(run)
                run.status, run.ended_at = "cancelled", time.time()
                run.message = "cancelled while waiting in the queue; nothing was trained"

    def end_session(self, session_hash: str) -> bool:
        """Cancel the session's run; True when its process is still finishing (the reader deletes the folder
        once the child has exited, so nothing writes into a deleted folder)."""
        with self.lock:
            run = self.latest.pop(session_hash, None)
            if run is None:
                return False
            run.session_ended = True
            if run._signals:
                run._signals[1].set()  # no final snapshot: the folder is deleted once the child exits
            self.cancel(run)
            return run in self.running

    def _pump(self) -> None:
        with self.lock:
            while self.waiting and len(self.running) < max_runs():
                run = self.waiting.popleft()
                self.running.append(run)
                run.status, run.started_at = "loading", time.time()  # includes the child's start-up (imports)
                run.thread = threading.Thread(target=self._work, args=(run,), name=f"ral-train-{run.id}", daemon=True)
                run.thread.start()

    def _work(self, run: Run) -> None:
        """Start the child, turn its messages into the run's state, then register its checkpoint."""
        end = None
        try:
            end = self._follow(run)
            # the status last: a poll that sees the run over also sees its checkpoint and the whole message
            if end is None:  # killed, segfault, out of memory: no last word from the child
                run.message = CRASH.format(code=run.process.exitcode)
                self._keep_last_good(run, crashed=True)
                run.status = "failed"
            elif end["status"] == "failed":
                run.message = end["message"]
                self._keep_last_good(run)
                run.status = "failed"
            else:
                if run.step > 0 and not run.session_ended:
                    run.checkpoint = self._register(run, run.latest_checkpoint())
                if end["status"] == "cancelled":
                    run.message = (f"cancelled after step {run.step}" if run.step else
                                   "cancelled before the first step; nothing was trained")
                run.status = end["status"]
        except Exception as e:  # noqa: BLE001 — the page gets one line, the log gets the trace
            log.exception("training run %s failed", run.id)
            run.status = "failed"
            run.message = f"unexpected error ({type(e).__name__}); the details are in the server log"
        finally:
            run.ended_at, run._signals = time.time(), None
            with self.lock:
                if run in self.running:
                    self.running.remove(run)
                self._pump()
            if run.session_ended:
                sessions.cleanup(run.session_hash)

    def _follow(self, run: Run) -> dict | None:
        """Run the child to its end; its "end" message, or None when it died without one."""
        # Events only while the child lives: each holds named semaphores, freed when the Events are dropped
        run._signals = cancel, gone = _MP.Event(), _MP.Event()
        if run.cancel.is_set():  # set before the Events existed (QUEUE.cancel sets both once they do)
            cancel.set()
        if run.session_ended:
            gone.set()
        recv, send = _MP.Pipe(duplex=False)
        proc = _MP.Process(target=train_worker.start, name=f"ral-train-{run.id}", daemon=True,  # ends with the server
                           args=(self.target, dict(os.environ), run.cfg, _reward_modules(run.cfg), send, cancel, gone))
        try:
            proc.start()
        except BaseException:
            recv.close()
            raise
        finally:
            send.close()  # the child holds the only writer: its exit ends recv with EOFError
        run.process, run.pid = proc, proc.pid
        end = None
        try:
            while end is None:
                try:
                    kind, payload = recv.recv()
                except (EOFError, OSError):
                    break
                if kind == "step":
                    run._history.append(payload)
                    run._step = int(payload["step"])
                elif kind == "loaded":
                    run.probe, run.loaded = payload, True
                elif kind == "running":
                    run.status = "running"
                elif kind == "end":
                    end = payload
                    # a failed step is rolled back to the last checkpoint: keep the numbers up to there
                    run._step = int(end["step"])
                    run._history = [m for m in run._history if m.get("step", 0) <= run._step]
        finally:
            recv.close()
            proc.join()
        if end is not None and proc.exitcode:
            log.warning("training process of run %s exited with code %s after its last message", run.id,
                        proc.exitcode)
        return end

    def _keep_last_good(self, run: Run, crashed: bool = False) -> None:
        """A failed run keeps the work done so far: its last periodic checkpoint is registered like a final one."""
        if run.session_ended or run.checkpoint:
            return
        ck = run.latest_checkpoint()
        try:
            run.checkpoint = self._register(run, ck)
        except OSError:
            log.exception("could not keep the last checkpoint of run %s", run.id)
            return
        step = (ck.name.split("-")[-1].lstrip("0") or "0") if run.checkpoint else ""
        if crashed:
            run.message += (f"; its last checkpoint (step {step}) is kept" if run.checkpoint else
                            "; it had not written a checkpoint yet, so nothing was kept")
        elif run.checkpoint:
            run.message += f" — the last good checkpoint (step {step}) is kept"

    @staticmethod
    def _register(run: Run, ck: Path | None) -> str | None:
        """Copy the final checkpoint (no optimizer state) into the session's checkpoints/<name>/."""
        if ck is None or not (ck / "config.json").is_file():
            return None
        base = sessions.checkpoints_dir(run.session_hash)
        tmp = base / f".tmp-{run.name}-{run.id}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ck, tmp, ignore=shutil.ignore_patterns("trainer_state.*"))
        final = base / run.name
        if final.exists():  # a name taken meanwhile: keep both
            final = base / f"{run.name}-{run.id}"
        os.replace(tmp, final)
        return final.name


def _reward_modules(cfg) -> list[str]:
    """Modules that registered the config's rewards in this process (not ral_core's own): the child imports
    them, so rewards added by the server's own code work there too."""
    from ral_core.rewards import REWARDS

    mods = {getattr(REWARDS.get(name), "__module__", None) for name in cfg.reward_weights}
    return sorted(m for m in mods if m and m != "__main__" and not m.startswith("ral_core"))


QUEUE = RunQueue()


def _busy(key: str) -> bool:
    """Whether the session with this folder key has a waiting or running run (its folder must not be swept)."""
    with QUEUE.lock:
        runs = list(QUEUE.running) + list(QUEUE.waiting)
    return any(sessions.session_key(r.session_hash) == key for r in runs)


sessions.set_busy_check(_busy)


# ---- inputs → config -----------------------------------------------------------------------------------
def _number(key: str, value):
    lo, hi, kind = RANGES[key]
    label = LABELS[key]
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
    """Page values → a validated TrainConfig (RALError with a clear message otherwise) and a data note."""
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
        from app.uploads import dataset_from_zip
        path, shown = _upload_path(upload)
        jsonl, n = dataset_from_zip(path, run_dir / "data", shown_name=shown)
        over["dataset"] = str(jsonl)
        note = f"your data set {shown} ({n} samples)"
    elif dataset_kind in (BUNDLED, None, ""):
        over["dataset"] = "grounding"
        note = "the bundled digit-grid task"
    else:
        raise RALError("data set must be the bundled task or an uploaded zip")
    return build_config(recipe, over), note


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


def _progress(run: Run) -> str:
    total = run.cfg.steps
    if run.status == "queued":
        pos = QUEUE.position(run)
        cap = max_runs()
        return _bar(0, f"⏳ waiting in the queue: position <b>{pos}</b> "
                       f"(this server trains {cap} run{'s' if cap > 1 else ''} at a time)")
    if run.status == "loading":
        return _bar(0, "loading the model and preparing the data…")
    step = run.step
    hist = run.history()
    pace = ""
    if hist:
        per = sum(m.get("step_time", 0.0) for m in hist[-5:]) / len(hist[-5:])
        pace = f" · {per:.2f} s/step"
        if run.status == "running":
            pace += f" · about {per * (total - step):.0f} s left"
    if run.status == "running":
        stop = " · stopping after this step…" if run.cancel.is_set() else ""
        return _bar(step / total, f"training: step <b>{step}</b> / {total}{pace}{stop}")
    where = (f" Checkpoint kept as <b>session: {html.escape(run.checkpoint)}</b> — pick it in Inspect or Compare."
             if run.checkpoint else "")
    if run.status == "done":
        return _bar(1.0, f"✅ done: {step} / {total} steps{pace}.{where}")
    if run.status == "cancelled":
        return _bar(step / total, f"⏹ {html.escape(run.message)}.{where}")
    return _bar(step / total, f"⚠️ stopped at step {step}: see the message above.{where}")


def _render(run: Run, kind: str, key, draw) -> str | None:
    """Re-render one figure only when its key (e.g. the number of logged steps) changed."""
    old = run.rendered.get(kind)
    if old and old[0] == key:
        return old[1]
    from ral_core import render
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
    return _render(run, "curves", len(hist), lambda: figures.training_curves(hist, run.cfg.steps, title))


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
    path = _render(run, "snapshot", last.name, lambda: figures.pair_overlay(
        a, b, f"step {s0}{' (before training)' if s0 == 0 else ''}: answers {a.answer!r}",
        f"step {s1}: answers {b.answer!r}", layer=layer, boxes=boxes,
        diff_title=f"change, step {s1} − step {s0}\n(red: looks more, blue: less)" if s1 != s0 else ""))
    q = html.escape(run.probe.get("question", a.question))
    exp = run.probe.get("answer")
    note = (f"**Probe image** (held out from training): *{q}*" + (f" — expected `{exp}`" if exp else "") +
            f". Last layer ({layer}), mean over heads and answer tokens; the first two panels share one colour "
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
    if run.status == "failed" and not status:
        status = f"⚠️ {run.message}"
    with run.render_lock:
        curves = _curves(run) if run.loaded else None
        snap, note = _snapshot(run) if run.loaded else (None, "")
    models = _models_unchanged()
    if not run.active and run.checkpoint and not run.announced:
        run.announced = True
        models = _models_refresh(request)
    return TrainView(status, _progress(run), curves, snap, note, gr.Timer(active=run.active),
                     gr.update(interactive=not run.active), gr.update(interactive=run.active), *models)


def _guarded(fn):
    @functools.wraps(fn)  # keeps the signature: Gradio passes the request where `request` sits
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RALError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001
            log.exception("handler %s failed", fn.__name__)
            msg = f"unexpected error ({type(e).__name__}); the details are in the server log"
        gr.Warning(html.escape(msg, quote=False))
        return TrainView(f"⚠️ {msg}", *(gr.update() for _ in TrainView._fields[1:]))
    return wrapper


@_guarded
def train_start(dataset_kind=BUNDLED, upload=None, algorithm="ral", model="default", teacher=None, steps=20,
                lr=5e-5, weight=1.0, group_size=8, prompts_per_step=16, temperature=1.0, sigma=1.0,
                explore_layers="levers", max_new_tokens=12, snapshot_every=5, seed=0, name="",
                request: gr.Request = None) -> TrainView:
    """Check the settings, then queue the run (it starts at once when the server has a free slot)."""
    from app.gpu import ZERO_GPU_TRAINING, on_zerogpu
    if on_zerogpu():
        raise RALError(ZERO_GPU_TRAINING)
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
        QUEUE.submit(run)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return _view(run, request)


@_guarded
def train_poll(request: gr.Request = None) -> TrainView:
    """The newest run of this session: progress, curves, the probe snapshot (polled by a timer)."""
    return _view(QUEUE.for_session(sessions._session_hash(request)), request)


@_guarded
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
    label = {"lambda_attn": "attention weight λ_attn",
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
