"""What every tab shares: the one error guard, parsing and bounds of the page's values, the bundled examples,
result folders and selectors, and the page-load handler. No tensor math and no model calls here."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import html
import inspect
import json
import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ral_core import settings
from ral_core.config import parse_bool
from ral_core.errors import RALError
from ral_core.images import check_image, load_image
from ral_core.inspection import ROWS
from ral_core.limits import check_question_length

from app import gpu, registry, render_pool, sessions, uploads
from app.progress import Reporter

log = logging.getLogger("ral.app")
MEAN, LAST = "mean", "last"  # selector values besides layer / token indices
RENDER_LOCK = render_pool.LOCAL_LOCK  # in-process drawing: pyplot's figure registry is global state
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
N_MODEL_LISTS = 5  # Inspect, Compare A, Compare B, Train model, Train teacher
_HELD: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("ral_held", default=None)


# ---- bounds of every number the page sends: the sliders are built from them and every request is checked ----------
class Bound(NamedTuple):
    lo: float
    hi: float
    kind: type
    label: str
    step: float | None = None  # the slider's step (None: a number box)


BOUNDS = {
    # Inspect / Compare
    "max_new_tokens": Bound(1, 64, int, "max new tokens", 1),
    "temperature": Bound(0.05, 2.0, float, "temperature", 0.05),
    "strength": Bound(0.5, 10, float, "the nudge strength", 0.5),
    "sigma": Bound(0.1, 5, float, "σ", 0.1),  # checked as 0 < σ ≤ hi: the slider starts at its lowest useful value
    # Train
    "steps": Bound(1, 500, int, "steps", 1),
    "lr": Bound(1e-7, 1e-2, float, "learning rate"),
    "weight": Bound(0.0, 10.0, float, "attention weight", 0.1),
    "group_size": Bound(2, 16, int, "group size", 1),
    "prompts_per_step": Bound(1, 16, int, "prompts per step", 1),
    "train_temperature": Bound(0.1, 2.0, float, "temperature", 0.05),
    "explore_sigma": Bound(0.0, 5.0, float, "exploration σ", 0.1),
    "train_max_new_tokens": Bound(1, 32, int, "max new tokens", 1),
    "snapshot_every": Bound(1, 100, int, "snapshot every", 1),
    "seed": Bound(0, 2**31 - 1, int, "seed"),
}


def slider_args(key: str) -> dict:
    """gr.Slider's minimum / maximum / step from BOUNDS (so the page offers exactly what the checks accept)."""
    b = BOUNDS[key]
    return dict(minimum=b.lo, maximum=b.hi, step=b.step)


# ---- text fields from a client: checked before anything echoes them -------------------------------------------------
FIELD_CHARS = 200  # any text field not listed below (names, selectors, numbers sent as text)
OWN_CHECKS = {"question", "pixel_budget_px", "image", "upload"}  # their own parsers check them, with their messages
FIELDS = {"answer": ("answer to score", 300), "box": ("target box", 200), "model": ("model name", FIELD_CHARS),
          "model_a": ("name of model A", FIELD_CHARS), "model_b": ("name of model B", FIELD_CHARS),
          "teacher": ("teacher's name", FIELD_CHARS), "name": ("checkpoint name", 60)}
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_field(name: str, value: str) -> str:
    """One text field as a client sent it: too long, or holding a NUL, a control character or a lone surrogate →
    one line that names the field (never the text itself)."""
    label, limit = FIELDS.get(name, (name.replace("_", " "), FIELD_CHARS))
    if len(value) > limit:
        raise RALError(f"the {label} is {len(value):,} characters; the limit is {limit:,} — shorten it")
    bad = _NOT_TEXT.search(value)
    if bad:
        c = ord(bad.group())
        what = "a lone surrogate (not text)" if 0xD800 <= c <= 0xDFFF else "a NUL character" if c == 0 else \
            "a control character"
        raise RALError(f"the {label} contains {what} (U+{c:04X}); remove it")
    return value


def _check_fields(sig: inspect.Signature, args, kwargs) -> None:
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return  # Gradio calls with what the listener wires; a Python caller's mistake fails in the call itself
    for name, value in bound.arguments.items():
        if isinstance(value, str) and name not in OWN_CHECKS:
            check_field(name, value)


# ---- the one error guard -----------------------------------------------------------------------------------------
def guard(out_cls):
    """Turn any failure into out_cls(status message, no change for every other output): one line on the page (and
    a toast), the trace only in the server log. Every text argument is checked first (`check_field`)."""
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)  # keeps the signature: Gradio passes the request where `request` sits
        def wrapper(*args, **kwargs):
            stack = contextlib.ExitStack()
            token = _HELD.set(stack)
            try:
                with stack:  # the work folders this request holds are let go when it returns
                    _check_fields(sig, args, kwargs)
                    out = fn(*args, **kwargs)
            except (RALError, ValueError) as e:  # ValueError: a selection the stored result does not have
                msg = str(e)
            except Exception as e:  # noqa: BLE001 — last resort: the trace goes to the log, not the page
                log.exception("handler %s failed", fn.__name__)
                msg = f"unexpected error ({type(e).__name__}); the details are in the server log"
            else:
                return out
            finally:
                _HELD.reset(token)
            gr.Warning(html.escape(msg, quote=False))
            return out_cls(f"⚠️ {msg}", *(gr.update() for _ in out_cls._fields[1:]))
        return wrapper
    return deco


# ---- examples ----------------------------------------------------------------------------------------------------
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


def example_for(image, question: str) -> dict | None:
    """The bundled example with these pixels *and* this question (its expected answer and box belong to it)."""
    d, q = _digest(image), " ".join(str(question).split()).casefold()
    return next((e for e in examples() if e["digest"] == d and " ".join(e["question"].split()).casefold() == q),
                None)


# ---- parsing the page's values -----------------------------------------------------------------------------------
def image_from_upload(value) -> Any:
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


def in_bounds(key: str, value, what: str | None = None) -> float:
    """A number within BOUNDS[key] (RALError with the range otherwise)."""
    b = BOUNDS[key]
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RALError(f"{what or b.label} must be a number") from None
    if not (math.isfinite(v) and b.lo <= v <= b.hi):
        raise RALError(f"{what or b.label} must be between {b.lo:g} and {b.hi:g}")
    return v


def gen_options(max_new_tokens, do_sample, temperature) -> dict:
    do_sample = parse_bool(do_sample, "sample")  # a client's "false" must not sample (bool("false") is True)
    try:
        n, t = int(max_new_tokens), float(temperature)
    except (TypeError, ValueError):
        raise RALError("max new tokens and temperature must be numbers") from None
    n = int(in_bounds("max_new_tokens", n))
    if do_sample:
        t = in_bounds("temperature", t)
    return dict(max_new_tokens=n, do_sample=bool(do_sample), temperature=t if do_sample else 1.0)


def parse_question(q) -> str:
    """Cheap checks first (type, characters): a 1,000,000-character question is refused before tokenising."""
    return check_question_length("" if q is None else q)


def flag(value, what: str) -> bool:
    """A checkbox value as sent (preprocess off): True / False (or absent), nothing else."""
    if value in (None, False, True):
        return bool(value)
    raise RALError(f"{what} must be true or false")


# Visual-token budget (the processor's max pixels per image, `VLMAdapter.set_max_pixels`, as `ral inspect --max-pixels`):
# a request's value is never trusted: it is parsed here and clamped to [MIN_BUDGET, max_budget()].
MIN_BUDGET = 112 * 112  # 16 Qwen2-VL tokens (28 px each); Idefics3/SmolVLM: one tile at any budget below a tile
DEFAULT_MAX_BUDGET = 2048 * 2048  # SmolVLM's own longest edge; Qwen2-VL: 5,349 tokens


def max_budget() -> int:
    """The most pixels per image a request may ask for (RAL_MAX_PIXELS, else DEFAULT_MAX_BUDGET)."""
    try:
        return max(MIN_BUDGET, settings.get("RAL_MAX_PIXELS", DEFAULT_MAX_BUDGET))
    except ValueError:
        return DEFAULT_MAX_BUDGET


def pixel_budget(value) -> tuple[int | None, str]:
    """A request's visual-token budget → (max pixels per image, or None for the model's own setting; a note when it
    was clamped). 0 or empty: the model's own setting. Also takes 'WxH'. Never trusted: bounded to
    [MIN_BUDGET, max_budget()] here, whatever the page's control allowed."""
    msg = ("the visual-token budget must be a whole number of pixels per image (e.g. 401408 or 640x480), "
           "or 0 for the model's own setting")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or len(str(value)) > 40:
        raise RALError(msg)
    try:
        if isinstance(value, str):
            parts = value.strip().lower().replace(",", "").replace("_", "").replace("*", "x").split("x")
            nums = [float(x) for x in parts]
            if len(nums) > 2 or (len(nums) == 2 and min(nums) <= 0):
                raise ValueError
            v = nums[0] * (nums[1] if len(nums) == 2 else 1)
        else:
            v = float(value)
    except (ValueError, OverflowError):
        raise RALError(msg) from None
    if not math.isfinite(v) or v < 0:
        raise RALError(msg)
    if v == 0:
        return None, ""
    n, hi = int(v), max_budget()
    if n < MIN_BUDGET:
        return MIN_BUDGET, f"visual-token budget raised to {MIN_BUDGET:,} pixels, the least this server accepts"
    if n > hi:
        return hi, f"visual-token budget lowered to {hi:,} pixels, the most this server allows"
    return n, ""


# ---- progress ------------------------------------------------------------------------------------------------------
def model_progress(rep: Reporter, what: str):
    """What the model work gets to report with: the reporter itself, or None on ZeroGPU, where the work runs in
    another process (nothing there can call back): then the stage is reported here, as a whole, before the call."""
    if gpu.on_zerogpu():
        rep.begin("model", 0.0, f"{what} on the GPU (load, encode, generate, capture)")
        return None
    return rep


# ---- selectors and stored results -----------------------------------------------------------------------------------
def shown(tok: str) -> str:
    return tok.replace(" ", "␣").replace("\n", "⏎") or "∅"


def token_choices(tokens: list[str]) -> list[tuple[str, str]]:
    return [("all tokens (mean)", MEAN)] + [(f"{i + 1}: {shown(t)}", str(i)) for i, t in enumerate(tokens)]


def layer_choices(layers: list[int]) -> list[tuple[str, str]]:
    return [("last layer", LAST), ("mean over layers", MEAN)] + [(f"layer {x}", str(x)) for x in layers]


def keep_layer(layer, layers) -> str:
    """The user's layer choice, kept across runs when the new result has that layer."""
    return layer if layer in (LAST, MEAN) or (str(layer).isdigit() and int(layer) in layers) else LAST


# ---- user text in Markdown: always as text, never as markup -------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~$&])")  # what can start markup inside a line ('$': LaTeX)
_MD_LEAD = re.compile(r"^(\s*)(\d+(?=[.)])|[-+=])")  # a list or heading marker where the text starts a line


def md_text(text: str) -> str:
    """`text` for Markdown prose, every character shown as itself (CommonMark backslash escapes; lines joined)."""
    t = _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))
    m = _MD_LEAD.match(t)
    if m and m.group(2)[0].isdigit():  # '1.' → '1\.': a number, not a list
        return t[:m.end()] + "\\" + t[m.end():]
    return _MD_LEAD.sub(r"\1\\\2", t) if m else t


def code(text: str) -> str:
    """`text` as an inline code span that no backtick, markup or HTML in it can end or turn into markup."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or text.startswith(" ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def answer_text(answer: str) -> str:
    return code(answer) if answer else "(empty or whitespace only)"


def plain_markdown(**kw) -> gr.Markdown:
    """A status line: its value is text, shown as written (escaped for Markdown on its way out). An instance, not a
    subclass: Gradio would write a type stub beside a module that subclasses a component."""
    box = gr.Markdown(latex_delimiters=[], **kw)
    show = box.postprocess
    box.postprocess = lambda value: show(md_text(value) if isinstance(value, str) else value)
    return box


def selection(layers, layer, token, row):
    """UI values → selection for ral_core ('mean' or int)."""
    if row not in ROWS:
        raise RALError(f"row must be one of {ROWS}")
    lay = layers[-1] if layer in (None, "", LAST) else MEAN if layer == MEAN else int(layer)
    tok = MEAN if token in (None, "", MEAN) else int(token)
    return lay, tok, row


def zip_dir(src: Path, dest_stem: Path) -> str:
    """The raw result as a download, stored, not deflated: on the default model with a photo, deflating saved 8 % of
    240 KB for 6× the CPU (7 ms against 1 ms, every request)."""
    out = Path(f"{dest_stem}.zip")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(Path(src).rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(src))
    return str(out)


def existing(*paths) -> list[str]:
    return [p for p in paths if Path(p).is_file()]


def _hold(cm):
    """Enter `cm` (a work folder held) until the guarded handler returns."""
    stack = _HELD.get()
    if stack is None:
        raise RuntimeError("work folders are held only inside a guarded handler")
    return stack.enter_context(cm)


def new_work(request, kind: str) -> Path:
    """A fresh work folder of this session, held until the handler returns (never trimmed under a running request)."""
    return _hold(sessions.new_work(request, kind))


def check_state(state, request, key):
    """The stored result of this session, its folder held until the handler returns."""
    if not state or key not in state:
        raise RALError("nothing to show yet: run it first")
    gone = RALError("this result was cleaned up (the session ended or sat idle); run it again")
    if not sessions.owns(request, state["dir"]):
        raise gone
    _hold(sessions.using(state["dir"]))  # held first, then checked: no trim can come between
    if not Path(state["dir"]).is_dir():  # never re-created after clean-up
        raise gone
    return state


def model_choices(request: gr.Request = None):
    """Page load: mark the session as a browser page (its folder lives until the tab closes) and refresh the
    model lists (listed names plus this session's checkpoints)."""
    if request is not None and getattr(request, "session_hash", None):
        sessions.mark_page(request)
    c = registry.model_choices(request)
    return tuple(gr.update(choices=c) for _ in range(N_MODEL_LISTS))
