"""Partial-credit reward for the home-regime task (bench/home_regime.py): the share of answer positions read right.

Used as `reward_weights={"exact_match": 0.5, "home_rewards:digit_match": 0.5}` (importable with bench/ on sys.path,
as home_regime.py arranges). With exact match alone most groups of this tiny, low-entropy model score all 0 or all 1
(zero reward variance → every advantage 0 → no gradient from GRPO or RAL); credit per digit gives a group variance
whenever its samples differ in any digit.
"""
from ral_core.rewards import extract_answer, normalise


def digit_match(completion: str, sample: dict) -> float:
    """Positions where the predicted word equals the gold word, over the longer of the two lengths (so a dropped or
    extra digit costs credit): "1 1 3" vs gold "1 1 3" → 1; "1 3" → 1/3; "1 1 6" → 2/3."""
    pred, gold = normalise(extract_answer(completion)).split(), normalise(sample["answer"]).split()
    if not gold:
        return float(not pred)
    return sum(p == g for p, g in zip(pred, gold)) / max(len(pred), len(gold))
