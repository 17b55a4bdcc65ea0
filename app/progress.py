"""Stage reports for the app's long handlers: `gr.Progress` (or any callable(fraction, desc=...)) driven by what
actually happens — loading a model (a hub download reports its bytes), the model's forward passes (encoding the
image + prompt, each generated token, the capture pass, each steered pass of the lever probe), saving the result, and
each figure as its render worker hands it back. Nothing here runs on a timer.

Everything is reported from the handler's own process. Forward hooks fire in the thread that runs the model (the
handler's thread, or the model's inspect batcher); gr.Progress finds its event through context variables, so a report
from another thread runs in a copy of the handler's context. Figures drawn in render worker processes are counted here
as their results come back (`render_pool.call_many`). On ZeroGPU the model work runs in a forked process that cannot
call back, so the handler reports that stage as a whole before the call (`Reporter.begin`).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import weakref
from typing import Callable, Sequence

log = logging.getLogger("ral.app")
_HOOK_LOCK = threading.Lock()

# What each stage is called on the page (the first words of every report of that stage)
LABELS = {"load": "loading the model", "model": "running the model", "save": "saving the result",
          "draw": "drawing figures"}


class Reporter:
    """Reports stages of one request to `progress`. `plan` = [(stage, weight), …] in order: each stage owns a slice
    of the bar in proportion to its weight, and `report(stage, done, text)` (done in 0 … 1) moves within it. The bar
    never moves backwards. Thread-safe; every report is also kept in `log` as (stage, fraction, text)."""

    def __init__(self, progress: Callable | None, plan: Sequence[tuple[str, float]]):
        self._progress = progress
        self._ctx = contextvars.copy_context()  # the handler's: gr.Progress finds its event through it
        self._lock = threading.Lock()
        total = float(sum(w for _, w in plan)) or 1.0
        self._span, at = {}, 0.0
        for stage, w in plan:
            self._span[stage] = (at / total, w / total)
            at += w
        self._frac = 0.0
        self.log: list[tuple[str, float, str]] = []

    def report(self, stage: str, done: float = 0.0, text: str | None = None):
        start, width = self._span.get(stage, (self._frac, 0.0))
        with self._lock:
            self._frac = max(self._frac, min(1.0, start + width * min(max(float(done), 0.0), 1.0)))
            text = text or LABELS.get(stage, stage)
            self.log.append((stage, self._frac, text))
            if self._progress is None:
                return
            try:
                self._ctx.copy().run(self._progress, self._frac, desc=text)
            except Exception:  # noqa: BLE001 — a progress display must never fail the request
                log.debug("progress report failed", exc_info=True)

    begin = report  # reads better for a stage reported once, as a whole

    def stages(self) -> list[str]:
        """The stages reported so far, in order, each once."""
        seen: list[str] = []
        for s, _, _ in self.log:
            if not seen or seen[-1] != s:
                seen.append(s)
        return seen

    def download(self, name: str) -> Callable[[str, float, float | None], None]:
        """A `progress(desc, n, total)` callback for ral_core.hub downloads, reported in the load stage."""
        def cb(desc, n, total):
            if total:
                mb = f"{n / 2**20:,.0f}/{total / 2**20:,.0f} MB" if total > 2**20 else f"{n:g}/{total:g}"
                self.report("load", n / total, f"downloading {name}: {desc or 'files'} {mb}".replace("  ", " "))
            else:
                self.report("load", 0.0, f"downloading {name}: {desc or 'files'}")
        return cb


# ---- the model's forward passes ------------------------------------------------------------------------------------
def _kind(args, kwargs) -> str:
    """What one forward call of a VLM is, from its inputs alone: the teacher-forced capture pass of `inspect`
    (no cache, logits of one position), a lever probe's steered pass (no cache, the answer rows' logits), one
    generation step (one new token on the KV cache) or the prefill that encodes the image and the prompt."""
    if kwargs.get("use_cache") is False:
        keep = kwargs.get("logits_to_keep")
        return "capture" if isinstance(keep, int) and keep == 1 else "score"
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    n = ids.shape[1] if ids is not None and getattr(ids, "ndim", 0) >= 2 else 0
    return "step" if n == 1 else "prefill"


class _Watch:
    """Turns one request's forward calls into reports of the `model` stage. `passes` names the inspections the model
    work runs in order (a pass begins at a prefill, or at a capture right after another capture: a scored answer has
    no generation); each gets an equal part of the stage. `score_total`: steered passes a lever probe will run."""

    def __init__(self, reporter: Reporter, passes: Sequence[str], max_new_tokens: int, score_total: int | None,
                 stage: str):
        self.r, self.passes, self.max_new, self.score_total, self.stage = reporter, list(passes) or [""], \
            max(int(max_new_tokens), 1), score_total, stage
        self.i, self.tokens, self.captured, self.started, self.scored = -1, 0, False, False, 0
        self._lock = threading.Lock()

    def forward(self, kind: str):
        with self._lock:
            if kind == "score":
                self.scored += 1
                tot = self.score_total
                text = f"steering and scoring: pass {self.scored}" + (f"/{tot}" if tot else "")
                self.r.report(self.stage, (self.scored - 1) / tot if tot else 0.0, text)
                return
            if kind == "prefill" or (kind == "capture" and (self.captured or not self.started)) or self.i < 0:
                self.i, self.tokens, self.captured, self.started = self.i + 1, 0, False, True
            p = min(self.i, len(self.passes) - 1)
            name = self.passes[p]
            head = f"{name}: " if name else ""
            if kind == "prefill":
                within, text = 0.0, f"{head}encoding image + prompt"
            elif kind == "step":
                self.tokens += 1
                t = min(self.tokens + 1, self.max_new)
                within, text = 0.15 + 0.65 * t / self.max_new, f"{head}generating token {t}/{self.max_new}"
            else:
                self.captured = True
                within, text = 0.8, f"{head}capturing attention"
            self.r.report(self.stage, (p + within) / len(self.passes), text)


# model → the watches registered now; keyed by the model (not the adapter), so a request's shallow copy of an
# adapter (registry.Served.view) reports through the same hook
_WATCHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def install(adapter):
    """One permanent forward pre-hook on the adapter's model that hands each call to the watches registered now.
    Install it before the model is shared (registry does, at load): a hook is never added while another thread
    runs a forward."""
    model = adapter.model
    with _HOOK_LOCK:
        if model in _WATCHES:
            return
        _WATCHES[model] = ()

    def pre(module, args, kwargs):
        watches = _WATCHES.get(module, ())
        if watches:  # a deepcopy of the model keeps the hook but has no entry: nothing reported
            try:
                kind = _kind(args, kwargs)
                for w in watches:
                    w.forward(kind)
            except Exception:  # noqa: BLE001 — progress must never break a forward
                log.debug("progress hook failed", exc_info=True)
    model.register_forward_pre_hook(pre, with_kwargs=True)


@contextlib.contextmanager
def watch_model(adapters, reporter: Reporter | None, passes: Sequence[str] = ("",), max_new_tokens: int = 16,
                score_total: int | None = None, stage: str = "model"):
    """Report the forward passes of `adapters` (one adapter or several, e.g. Compare's A and B: one watch follows
    them all, in order) as stages while the block runs. In a batch shared with other requests (the inspect batcher)
    the passes reported are the model's, which include this request's."""
    adapters = adapters if isinstance(adapters, (list, tuple)) else [adapters]
    models = list({id(a.model): a.model for a in adapters if getattr(a, "model", None) is not None}.values())
    if reporter is None or not models:
        yield None
        return
    for a in adapters:
        install(a)
    w = _Watch(reporter, passes, max_new_tokens, score_total, stage)
    with _HOOK_LOCK:
        for m in models:
            _WATCHES[m] = _WATCHES.get(m, ()) + (w,)
    try:
        yield w
    finally:
        with _HOOK_LOCK:
            for m in models:
                _WATCHES[m] = tuple(x for x in _WATCHES.get(m, ()) if x is not w)
