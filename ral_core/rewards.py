"""Named reward functions. Each takes (completion, sample) and returns sub-scores in [0, 1]; a weighted
sum of the chosen ones is the reward, and every sub-score is logged.

`sample` is a dict with at least `answer`; optionally `boxes`, `question`, `choices`.

Attention rewards (`ATTENTION_REWARDS`) score where a rollout looked, not what it wrote: they need its captured
attention, so `RewardModel` leaves them out of the text score and the rollout adds them after its attention pass,
before the group advantages (`ral_core.grounding.add_attention_reward`).
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

from ral_core.errors import RALError

RewardFn = Callable[[str, dict], float]
REWARDS: dict[str, RewardFn] = {}
# name → what it scores; computed from each rollout's own response→image attention and the sample's boxes
ATTENTION_REWARDS = {"attention_box": "SAYO attention reward: ½(1 + tanh(log((a + ε)/(v + ε)))), a the mean attention "
                                      "on the target box's visual tokens, v the mean over all visual tokens"}
_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


def reward(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn
    return deco


def normalise(s: str) -> str:
    return " ".join(str(s).strip().lower().rstrip(".").split())


def extract_answer(text: str) -> str:
    """The text inside <answer>…</answer> if present, else the whole completion."""
    m = _TAG.search(text)
    return m.group(1) if m else text


@reward("exact_match")
def exact_match(completion: str, sample: dict) -> float:
    return float(normalise(extract_answer(completion)) == normalise(sample["answer"]))


@reward("word_match")
def word_match(completion: str, sample: dict) -> float:
    """Partial credit: the share of the reference answer's words given at their own position, over the longer of
    the two answers (so missing and extra words both cost). "7 2 4" for "7 2 1" scores 2/3; "row 2 column 1" for
    "row 1 column 1" 3/4. Denser than exact match where groups are all wrong or all right."""
    got, ref = normalise(extract_answer(completion)).split(), normalise(sample["answer"]).split()
    if not ref:
        return float(not got)
    return sum(a == b for a, b in zip(got, ref)) / max(len(got), len(ref))


@reward("choice")
def choice(completion: str, sample: dict) -> float:
    """Multiple-choice letter: the first standalone A–Z letter of the answer matches."""
    m = re.search(r"\b([A-Z])\b", extract_answer(completion).strip().upper())
    return float(bool(m) and m.group(1) == str(sample["answer"]).strip().upper()[:1])


@reward("number")
def number(completion: str, sample: dict, rel_tol: float = 0.0, abs_tol: float = 1e-6) -> float:
    """The first number in the answer equals the reference within a tolerance (sample['tolerance'])."""
    m = re.search(r"-?\d+(?:\.\d+)?", extract_answer(completion))
    try:
        ref = float(sample["answer"])
    except (TypeError, ValueError):
        return 0.0
    if not m:
        return 0.0
    tol = max(abs_tol, float(sample.get("tolerance", 0.0)), rel_tol * abs(ref))
    return float(abs(float(m.group(0)) - ref) <= tol)


@reward("format")
def answer_format(completion: str, sample: dict) -> float:
    """1 when the completion is exactly one <answer>…</answer> block (the paper's 0.1-weight term)."""
    return float(bool(re.fullmatch(r"\s*<answer>.*?</answer>\s*", completion, re.S | re.I)))


def _box(s):
    return [float(v) for v in s]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@reward("iou")
def box_iou(completion: str, sample: dict) -> float:
    """IoU of the first box '[x0, y0, x1, y1]' in the answer with the best-matching target box."""
    m = re.search(r"\[?\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)",
                  extract_answer(completion))
    if not m or not sample.get("boxes"):
        return 0.0
    pred = _box(m.groups())
    return max(iou(pred, _box(b)) for b in sample["boxes"])


def resolve(name: str) -> RewardFn:
    """A registered name or a user function given as 'module:function'."""
    if name in REWARDS:
        return REWARDS[name]
    if name in ATTENTION_REWARDS:
        raise RALError(f"'{name}' scores a rollout's attention, not its text: it is added by the trainer's rollouts "
                       "(reward_weights), not by a text reward call")
    if ":" in name:
        mod, fn = name.split(":", 1)
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise RALError(f"cannot import reward '{name}': {e}; give 'module:function' importable from here") from None
        if not callable(f):
            raise RALError(f"reward '{name}' is not callable")
        return f
    raise RALError(f"unknown reward '{name}'; choose from {sorted(REWARDS) + sorted(ATTENTION_REWARDS)} or give "
                   "'module:function'")


class RewardModel:
    """Weighted sum of named rewards; `weights` maps name → weight (paper: exact 0.9 + format 0.1)."""

    def __init__(self, weights: dict[str, float], ground_on: str | None = None):
        """`ground_on`: which rollouts the attention-target term acts on (config ground_on; None: the term is off),
        read when the rollout scores its attention against the boxes (grounding.score_grounding)."""
        self.ground_on = ground_on
        if not weights:
            raise RALError("no reward given; e.g. reward_weights={exact_match: 1.0}")
        self.weights = {k: float(v) for k, v in weights.items() if k not in ATTENTION_REWARDS}
        self.attention = {k: float(v) for k, v in weights.items() if k in ATTENTION_REWARDS}
        self.fns = {k: resolve(k) for k in self.weights}

    def __call__(self, completion: str, sample: dict) -> tuple[float, dict[str, float]]:
        subs = {}
        for k, f in self.fns.items():
            try:
                subs[k] = float(f(completion, sample))
            except Exception as e:  # a user reward crashing must name itself, not kill the run silently
                raise RALError(f"reward '{k}' failed on completion {completion!r}: {type(e).__name__}: {e}") from None
        return sum(self.weights[k] * v for k, v in subs.items()), subs
