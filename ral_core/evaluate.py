"""Greedy answering and exact-match accuracy on the grounding task (deterministic)."""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import torch

from ral_core.attention import capture, resolve_layers
from ral_core.data.grounding import GroundingTask
from ral_core.generation import generate_answer
from ral_core.policy import max_overlap


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
            new = generate_answer(adapter, b["model_inputs"], max_new_tokens)
            out += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return out


def accuracy(adapter, task: GroundingTask, n: int, batch_size: int = 32) -> dict:
    """Exact-match accuracy (normalised) on samples 0..n-1 of `task`, overall and per question kind."""
    samples = task.samples(n)
    preds = greedy_answers(adapter, [s.image for s in samples], [s.question for s in samples], batch_size=batch_size)
    return score_answers(samples, preds)


def score_answers(samples, preds) -> dict:
    """Exact-match accuracy of `preds` against the samples' answers, overall and per question kind."""
    hits, counts = defaultdict(int), defaultdict(int)
    for s, p in zip(samples, preds):
        counts[s.kind] += 1
        hits[s.kind] += normalize(p) == normalize(s.answer)
    return {"accuracy": sum(hits.values()) / max(len(samples), 1), "n": len(samples),
            "per_kind": {k: hits[k] / counts[k] for k in sorted(counts)},
            "per_kind_n": {k: counts[k] for k in sorted(counts)}}


@torch.no_grad()
def attention_metrics(adapter, samples, answers, layer: int = -1, batch_size: int = 32) -> dict:
    """Where the model looks while producing `answers` (teacher-forced): rows that predict each answer token,
    one layer, head mean. Target = the sample's boxes. Means over samples; `*_first` use only the row that
    decides the first answer token."""
    layer = resolve_layers([layer], adapter.num_layers, adapter.attention_layers)[0]
    acc = defaultdict(list)
    for i in range(0, len(samples), batch_size):
        chunk, ans = samples[i:i + batch_size], answers[i:i + batch_size]
        ans = [a if a.strip() else " " for a in ans]
        b = adapter.build_inputs([s.image for s in chunk], [s.question for s in chunk], ans, add_eos=False)
        mi, resp = b["model_inputs"], b["response_mask"]
        L = resp.shape[1]
        n_ans = resp.sum(1)
        R = int(n_ans.max())
        j = torch.arange(R)[None]
        rows = (L - n_ans[:, None] - 1 + torch.minimum(j, n_ans[:, None] - 1)).to(mi["input_ids"].device)
        with capture(adapter.model, layers=[layer], rows=rows) as maps:
            adapter.model(**mi, logits_to_keep=1, use_cache=False)  # only the maps are read: no [B, L, vocab]
        a = maps[layer].mean(1)  # [B, R, L] head mean
        vis = adapter.visual_mask(mi["input_ids"])
        for k, s in enumerate(chunk):
            v = a[k][:, vis[k]].cpu().numpy()[: int(n_ans[k])]  # [A, Nv]
            img = v.sum(-1)
            share = v / np.maximum(img[:, None], 1e-12)
            ov = max_overlap(b["geometry"][k], s.boxes) if s.boxes else np.zeros(v.shape[1])
            tgt = (v * ov).sum(-1)
            ent = -(share * np.log(np.maximum(share, 1e-12))).sum(-1)
            hit = ov[share.argmax(-1)] > 0.5
            for name, val in (("target_mass", tgt), ("target_share", tgt / np.maximum(img, 1e-12)),
                              ("pointing_hit", hit.astype(float)), ("entropy", ent), ("image_mass", img)):
                acc[name].append(float(val.mean()))
                acc[name + "_first"].append(float(val[0]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def evaluate(adapter, task: GroundingTask, n: int, layer: int = -1, batch_size: int = 32) -> dict:
    """Accuracy (greedy, exact match) plus attention metrics on the model's own answers."""
    samples = task.samples(n)
    preds = greedy_answers(adapter, [s.image for s in samples], [s.question for s in samples], batch_size=batch_size)
    out = {**score_answers(samples, preds), "layer": layer}
    out.update(attention_metrics(adapter, samples, preds, layer=layer, batch_size=batch_size))
    return out


@torch.no_grad()
def expected_reward(adapter, samples, batch_size: int = 32) -> float:
    """Mean p(gold answer + EOS) under the model, teacher-forced: the exact expected exact-match reward of
    temperature-1 sampling (up to answers that differ only in case/spacing), without sampling noise."""
    model = adapter.model
    was = model.training
    model.eval()
    ps = []
    for i in range(0, len(samples), batch_size):
        ch = samples[i:i + batch_size]
        b = adapter.build_inputs([s.image for s in ch], [s.question for s in ch], [s.answer for s in ch])
        mi, resp = b["model_inputs"], b["response_mask"]
        # answers sit at the end (left padding): logits only for the rows that predict the last K tokens
        K = int(resp.sum(1).max()) + 1
        logits = model(**mi, logits_to_keep=K, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        tok = logp.gather(-1, mi["input_ids"][:, -K + 1:, None]).squeeze(-1)
        ps.append((tok * resp[:, -K + 1:]).sum(1).exp())
    model.train(was)
    return float(torch.cat(ps).mean())


COLLAPSE_WINDOW = 5  # steps whose mean reward is compared: the run's first ones against its latest ones


class CollapseGuard:
    """Watches a run for collapse: the mean reward of the latest `window` steps below half that of the first
    `window`, or a probe answered right at a snapshot and wrong at a later one. Each kind is warned of once per run,
    with its step and a suggestion to lower the learning rate; `warnings` keeps them. A warning already in the
    history's metric rows (a resumed run, or a run continued in chunks by a fresh trainer) is not given again."""

    KINDS = {"reward": "mean reward fell", "probe": "was answered right at step"}  # kind → its text's mark

    def __init__(self, lr: float, window: int = COLLAPSE_WINDOW):
        self.lr, self.window = lr, window
        self.warnings: list[str] = []
        self._pending: list[str] = []
        self._right: dict[int, int] = {}  # probe index → step at which it was last answered right
        self._given: set[str] = set()
        self._read = 0  # history rows already searched for earlier warnings

    def _warn(self, kind: str, text: str) -> None:
        if kind not in self._given:
            self._given.add(kind)
            self._pending.append(f"{text}; the run may be collapsing: try a lower learning rate (lr is {self.lr:g})")

    def probe(self, step: int, i: int, answer: str, expected: str) -> None:
        """The greedy answer to probe `i` at `step` (a snapshot)."""
        if normalize(answer) == normalize(expected):
            self._right[i] = step
        elif i in self._right:
            self._warn("probe", f"probe {i} was answered right at step {self._right[i]} and wrong at step {step} "
                                f"('{answer}' instead of '{expected}')")

    def check(self, history: list[dict]) -> list[str]:
        """New warnings after the last step of `history` (metrics rows with `step`, `reward`, maybe `warnings`)."""
        self._given |= {k for h in history[self._read:-1] for text in h.get("warnings", ())
                        for k, mark in self.KINDS.items() if mark in text}
        self._read = max(self._read, len(history) - 1)
        w = self.window
        if len(history) >= 2 * w:
            start = float(np.mean([h["reward"] for h in history[:w]]))
            recent = float(np.mean([h["reward"] for h in history[-w:]]))
            if start > 0 and recent < 0.5 * start:
                self._warn("reward", f"mean reward fell from {start:.3f} (steps {history[0]['step']}–"
                                     f"{history[w - 1]['step']}) to {recent:.3f} (steps {history[-w]['step']}–"
                                     f"{history[-1]['step']})")
        out, self._pending = self._pending, []
        self.warnings += out
        return out
