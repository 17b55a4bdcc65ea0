"""Bounds on the work one request may cause: question length (a cheap character cap, then tokens against the
model's context) and a per-request deadline that generation and loops consult.

A 1,000,000-character question once held the model lock for > 12 min; these checks refuse it in
microseconds with a message that says what to do. The deadline is a context variable, so it follows the
request through the engine without being passed down every call (and each thread or task gets its own)."""
from __future__ import annotations

import contextvars
import math
import re
import time
from contextlib import contextmanager

from ral_core import settings
from ral_core.errors import RALError


# Checked before tokenising: tokenising itself is what took minutes for huge inputs. Read at import, so a bad value
# is refused when the engine starts.
MAX_QUESTION_CHARS = settings.get("RAL_MAX_QUESTION_CHARS")
MAX_QUESTION_TOKENS = settings.get("RAL_MAX_QUESTION_TOKENS")
# A few seconds per request keep one user from holding the model for everyone (the app may override).
REQUEST_SECONDS = settings.get("RAL_REQUEST_SECONDS")


def request_seconds() -> float:
    """The per-request limit now: RAL_REQUEST_SECONDS read at call time (a server or a test may change it), at
    least 0.5 s; an unreadable value falls back to the one checked at import."""
    try:
        return max(0.5, settings.get("RAL_REQUEST_SECONDS"))
    except RALError:
        return REQUEST_SECONDS


# ---- questions ----------------------------------------------------------------------------------------------
# C0/C1 control characters other than tab and newlines, and lone surrogates (which no UTF-8 encoder accepts).
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text_chars(text: str, what: str = "the question") -> str:
    """`text` unchanged, or a RALError naming the first NUL, control character or lone surrogate in it."""
    m = _BAD_CHARS.search(text)
    if m:
        c = ord(m.group())
        kind = "a NUL character" if c == 0 else ("a lone surrogate" if 0xD800 <= c <= 0xDFFF else "a control character")
        raise RALError(f"{what} contains {kind} (U+{c:04X}) at character {m.start() + 1}; remove it")
    return text


def check_question_length(question) -> str:
    """The stripped question; refuses non-text, empty and over-long questions and control characters without a
    tokenizer."""
    if not isinstance(question, str):
        raise RALError(f"the question must be text, got {type(question).__name__}")
    if len(question) > MAX_QUESTION_CHARS:
        raise RALError(f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,} — "
                       "shorten it")
    check_text_chars(question)
    q = question.strip()
    if not q:
        raise RALError("the question is empty; type a question about the image")
    return q


def context_length(model_or_adapter) -> int | None:
    """Positions the language model can attend over (text config's max_position_embeddings), if known."""
    cfg = getattr(model_or_adapter, "config", None)
    if cfg is None and hasattr(model_or_adapter, "model"):
        cfg = getattr(model_or_adapter.model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_question(tokenizer, question, max_tokens: int | None = None, context: int | None = None,
                   reserved: int = 0) -> str:
    """The stripped question, or a RALError when it is too long to be one request's work.

    `tokenizer`: a tokenizer, or an adapter (its tokenizer; `context` then defaults to its model's context
    length). `max_tokens`: the cap (default RAL_MAX_QUESTION_TOKENS, 256). `context` and `reserved`: the
    question must fit in `context` positions next to the `reserved` ones (prompt template, visual tokens and
    new tokens; see `reserved_tokens`)."""
    q = check_question_length(question)
    if hasattr(tokenizer, "prompt_ids"):  # an adapter: its control tokens are refused too
        context = context if context is not None else context_length(tokenizer)
        n = len(tokenizer.user_text_ids(q, "the question"))
    else:
        n = len(tokenizer(q, add_special_tokens=False)["input_ids"])
    limit = MAX_QUESTION_TOKENS if max_tokens is None else int(max_tokens)
    if n > limit:
        raise RALError(f"the question is {n:,} tokens; the limit is {limit:,} — shorten it")
    if context is not None and n + reserved > context:
        raise RALError(f"the question ({n:,} tokens) with the image and the answer ({reserved:,} tokens) does not "
                       f"fit the model's context of {context:,} tokens — shorten the question, use a smaller "
                       "image or fewer new tokens")
    return q


def reserved_tokens(adapter, image, max_new_tokens: int) -> int:
    """Positions of one request other than the question: the prompt template with the image's visual tokens,
    plus the answer's new tokens. Runs the image processor once (no model)."""
    proc = adapter.process_images([image])
    return len(adapter.prompt_ids(proc["n_tokens"][0], "", proc["meta"][0])) + int(max_new_tokens)


# ---- per-request deadline -------------------------------------------------------------------------------------
class Deadline:
    """An absolute time limit of `seconds` from now (monotonic clock)."""

    def __init__(self, seconds: float):
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"a deadline needs a positive number of seconds, got {seconds}")
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self, what: str = "the request"):
        if self.expired:
            raise RALError(f"{what} took longer than the {self.seconds:g} s limit for one request; ask for less "
                           "(a shorter question, fewer new tokens, layers or samples) or use the command line, "
                           "which has no limit")


_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("ral_deadline", default=None)


@contextmanager
def deadline(seconds: float | None):
    """Run the block under a deadline of `seconds` (None: no limit). Nested deadlines never extend an outer
    one: the earlier end wins."""
    if seconds is None:
        yield _CURRENT.get()
        return
    d = Deadline(seconds)
    outer = _CURRENT.get()
    if outer is not None and outer.end < d.end:
        d = outer
    token = _CURRENT.set(d)
    try:
        yield d
    finally:
        _CURRENT.reset(token)


def current_deadline() -> Deadline | None:
    return _CURRENT.get()


def remaining() -> float | None:
    """Seconds left under the current deadline (None when there is none): pass as generate(max_time=...)."""
    d = _CURRENT.get()
    return None if d is None else d.remaining()


def check_deadline(what: str = "the request"):
    """Raise a RALError if the current deadline has passed; call between iterations of long loops."""
    d = _CURRENT.get()
    if d is not None:
        d.check(what)
