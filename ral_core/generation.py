"""Answering: greedy or sampled generation with structural tokens suppressed, under the request's deadline."""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ral_core.limits import check_deadline, current_deadline, remaining


class FiniteScores(LogitsProcessor):
    """Raises FloatingPointError when a next-token score is NaN or +inf (weights broken by an update): sampling from
    such scores would fail deep inside torch with a message that names no cause. −inf is a suppressed token."""

    def __call__(self, input_ids, scores):
        if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
            raise FloatingPointError("non-finite model outputs while sampling")
        return scores


def generate_answer(adapter, model_inputs, max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0,
                    num_return_sequences=1, check_finite: bool = False):
    """Generate with structural tokens suppressed; returns [N, T] new token ids (EOS/pad after the end).

    Under a request deadline (ral_core.limits.deadline) generation stops when it runs out (transformers'
    max_time), so one request cannot hold the model for longer than its limit. `check_finite`: FiniteScores."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, suppress_tokens=adapter.suppress_token_ids,
              eos_token_id=adapter.eos_token_ids, pad_token_id=adapter.tokenizer.pad_token_id,
              num_return_sequences=num_return_sequences)
    left = remaining()
    if left is not None:
        check_deadline("answering")
        kw["max_time"] = left
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    if check_finite:
        kw["logits_processor"] = [FiniteScores()]
    with torch.no_grad():
        out = adapter.model.generate(**model_inputs, **kw)
    return out[:, model_inputs["input_ids"].shape[1]:]


def cut_off() -> bool:
    """Whether the current request's time limit ran out (generation then stopped early)."""
    d = current_deadline()
    return d is not None and d.expired


def strip_answer(ids: list[int], eos: set[int]) -> list[int]:
    """Answer ids up to the first EOS (a lone EOS is kept so that an empty answer still has a row)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i] if i > 0 else ids[:1]
    return ids
