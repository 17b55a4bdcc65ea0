"""Greedy answering and exact-match accuracy on the grounding task (deterministic)."""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from ral_core.data.grounding import GroundingTask


def normalize(text: str) -> str:
    """Compare answers without caring about case or runs of whitespace."""
    return re.sub(r"\s+", " ", text.strip().lower())


@torch.no_grad()
def greedy_answers(adapter, images, questions, max_new_tokens: int = 12, batch_size: int = 32) -> list[str]:
    """Greedy-decoded answers (new tokens only, special tokens dropped, stripped), in input order."""
    model, tok = adapter.model, adapter.tokenizer
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(images), batch_size):
            b = adapter.build_inputs(list(images[i:i + batch_size]), list(questions[i:i + batch_size]))
            mi = b["model_inputs"]
            gen = model.generate(**mi, do_sample=False, max_new_tokens=max_new_tokens,
                                 suppress_tokens=adapter.suppress_token_ids or None,
                                 eos_token_id=adapter.eos_token_ids, pad_token_id=tok.pad_token_id)
            new = gen[:, mi["input_ids"].shape[1]:]
            out += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return out


def accuracy(adapter, task: GroundingTask, n: int, batch_size: int = 32) -> dict:
    """Exact-match accuracy (normalised) on samples 0..n-1 of `task`, overall and per question kind."""
    samples = task.samples(n)
    preds = greedy_answers(adapter, [s.image for s in samples], [s.question for s in samples], batch_size=batch_size)
    hits, counts = defaultdict(int), defaultdict(int)
    for s, p in zip(samples, preds):
        counts[s.kind] += 1
        hits[s.kind] += normalize(p) == normalize(s.answer)
    total = sum(hits.values())
    return {"accuracy": total / max(n, 1), "n": n,
            "per_kind": {k: hits[k] / counts[k] for k in sorted(counts)},
            "per_kind_n": {k: counts[k] for k in sorted(counts)}}
