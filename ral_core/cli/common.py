"""Options and helpers the `ral` commands share: model options and loading, progress bars, pixel budgets."""
from __future__ import annotations

import argparse
import contextlib
import sys


def add_model_options(p):
    p.add_argument("--allow-download", action="store_true",
                   help="download a hub id that is not in the local cache (also RAL_ALLOW_DOWNLOAD=1; on by default "
                        "on a Hugging Face Space)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on a CUDA GPU, float32 on the CPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr for the long steps (model load, image+prompt encoding, generation, "
                        "capture, rendering); default: on when stderr is a terminal, off in logs and pipes")


def load_model(a, device=None):
    if getattr(a, "adapter", None) is not None:  # built by the caller of main() (a benchmark's shape twin)
        return a.adapter
    from ral_core.models import load_adapter
    with Steps(a).step("load model"):
        return load_adapter(a.model, device=device, dtype=a.dtype, allow_download=a.allow_download or None)


class Steps:
    """One tqdm bar on stderr per long step. A ticker thread redraws the open bar every second, so a step without
    updates (loading a 2B model, a long prefill) still shows that it is running and for how long."""

    def __init__(self, a):
        p = getattr(a, "progress", None)
        self.on = sys.stderr.isatty() if p is None else bool(p)

    @contextlib.contextmanager
    def step(self, desc: str, total=None, unit: str = "it"):
        import threading

        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, disable=not self.on, file=sys.stderr, dynamic_ncols=True,
                   bar_format=None if total else "{desc}: {elapsed}")
        stop = threading.Event()

        def tick():
            while not stop.wait(1.0):
                bar.refresh()
        if self.on:
            threading.Thread(target=tick, daemon=True).start()
        try:
            yield bar
        finally:
            stop.set()
            bar.close()

    @contextlib.contextmanager
    def inspect(self, model, max_new_tokens: int):
        """Bars for the model calls inside `inspect()`, told apart by their inputs: the first call encodes the image
        and the prompt, one-token calls are generation steps (the KV cache holds the rest), a later full-length
        call is the teacher-forced capture pass."""
        state = {"n": 0, "ctx": None, "bar": None}

        def enter(desc, total=None, unit="it"):
            leave()
            state["ctx"] = self.step(desc, total, unit)
            state["bar"] = state["ctx"].__enter__()

        def leave():
            if state["ctx"] is not None:
                state["ctx"].__exit__(None, None, None)
                state["ctx"] = state["bar"] = None

        def pre(_mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            length = ids.shape[1] if ids is not None else 0
            if state["n"] == 0:
                enter("encode image + prompt")
            elif length != 1:
                enter("capture attention")
            elif state["n"] == 1:
                enter("generate", total=max_new_tokens, unit="tok")
                state["bar"].update(1)  # the first token came out of the encoding pass
            state["n"] += 1

        def post(_mod, args, kwargs, _out):
            if state["bar"] is not None and state["bar"].total:
                state["bar"].update(1)

        hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
                 model.register_forward_hook(post, with_kwargs=True)]
        try:
            yield
        finally:
            leave()
            for h in hooks:
                h.remove()


def pixel_count(text: str) -> int:
    """'401408' or '640x480' (also 640*480) → a positive number of pixels; '0' → 0, the model's own setting."""
    if text.strip() == "0":
        return 0
    try:
        parts = [int(v) for v in text.lower().replace("*", "x").split("x")]
        n = parts[0] * (parts[1] if len(parts) == 2 else 1)
        assert len(parts) <= 2 and min(parts) > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a pixel count (N or WxH, positive; 0: the model's own)") from None
    return n


def figure_size(text: str) -> tuple[int, int]:
    """'1600,1200' → (1600, 1200) pixels, each side 100..10000."""
    try:
        w, h = (int(v) for v in text.replace("x", ",").split(","))
        assert 100 <= w <= 10_000 and 100 <= h <= 10_000
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not W,H in pixels (each 100..10000)") from None
    return w, h


def apply_pixel_budget(a, adapter):
    """--max-pixels: a cap, or 0 for the model's own setting (what the app's 0 means)."""
    if a.max_pixels is None:
        return
    note = adapter.set_max_pixels(a.max_pixels or None)
    if not a.max_pixels:
        note = "the model's own setting"
    print(f"--max-pixels {a.max_pixels}: {note}", file=sys.stderr)
