"""Compare two models on the same image, question and answer tokens.

Model A answers freely; A and B are then both scored teacher-forced on A's answer (`forced_answer`), so
their attention rows describe the same tokens and can be subtracted. Each model's own free answer is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ral_core.errors import RALError
from ral_core.inspection import InspectionResult, inspect


def jsd(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Jensen–Shannon divergence (natural log, ≤ ln 2) between distributions along the last axis.
    Inputs are renormalised first, so raw attention weights over a subset of positions are fine."""
    p = np.clip(np.asarray(p, np.float64), 0, None)
    q = np.clip(np.asarray(q, np.float64), 0, None)
    p = p / np.maximum(p.sum(-1, keepdims=True), eps)
    q = q / np.maximum(q.sum(-1, keepdims=True), eps)
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.where(a > 0, a * (np.log(np.maximum(a, eps)) - np.log(np.maximum(b, eps))), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@dataclass
class Comparison:
    a: InspectionResult   # model A teacher-forced on the shared answer
    b: InspectionResult   # model B teacher-forced on the same answer
    free_answer_a: str
    free_answer_b: str

    @property
    def same_geometry(self) -> bool:
        ga, gb = self.a.geometry, self.b.geometry
        return ga.n_tokens == gb.n_tokens and np.allclose(ga.boxes, gb.boxes)

    @property
    def same_tokens(self) -> bool:
        return self.a.answer_ids == self.b.answer_ids

    @property
    def layers(self) -> list[int]:
        """Layers captured for both models."""
        return [layer for layer in self.a.layers if layer in self.b.layers]

    def _check(self, token):
        if not self.same_geometry:
            raise RALError("the two models cut the image into different visual tokens (different image "
                           "processing), so their maps cannot be subtracted; compare models of the same family")
        if token not in (None, "mean") and not self.same_tokens:
            raise RALError("the two models tokenise the answer differently; choose 'all tokens (mean)'")

    def maps(self, layer="mean", token="mean", row="predicts") -> tuple[np.ndarray, np.ndarray]:
        """Head-mean visual maps of A and B for the same selection."""
        self._check(token)
        return (self.a.visual_map(layer=layer, token=token, row=row),
                self.b.visual_map(layer=layer, token=token, row=row))

    def head_shift(self, layer, token="mean", row="predicts") -> np.ndarray:
        """[H] JSD between A's and B's per-head visual distributions at `layer` (renormalised over the image)."""
        self._check(token)
        if self.a.num_heads != self.b.num_heads:
            raise RALError(f"the models have different head counts ({self.a.num_heads} vs {self.b.num_heads}); "
                           "per-head comparison needs the same architecture")
        return jsd(self.a.head_maps(layer, token=token, row=row), self.b.head_maps(layer, token=token, row=row))

    def ranked_heads(self, layer, token="mean", row="predicts") -> list[tuple[int, float]]:
        """(head, JSD) pairs, the head whose visual attention moved most first."""
        d = self.head_shift(layer, token=token, row=row)
        return [(int(h), float(d[h])) for h in np.argsort(-d, kind="stable")]


def compare(adapter_a, adapter_b, image, question: str, max_new_tokens: int = 16, layers="all",
            do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> Comparison:
    """A generates; A and B are scored teacher-forced on A's answer; B's own free answer is kept too."""
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
    free_a = inspect(adapter_a, image, question, layers="last", **gen)
    # unstripped text, so a whitespace-only answer is still compared on the tokens A produced
    text = adapter_a.tokenizer.decode(free_a.answer_ids, skip_special_tokens=True)
    if not text:
        raise RALError("model A gave an empty answer, so there are no answer tokens to compare on; "
                       "try another question or more new tokens")
    free_b = inspect(adapter_b, image, question, layers="last", **gen)
    # Both re-scored from the same answer text, so equal tokenisers give identical token ids.
    a = inspect(adapter_a, image, question, layers=layers, forced_answer=text)
    b = inspect(adapter_b, image, question, layers=layers, forced_answer=text)
    return Comparison(a=a, b=b, free_answer_a=free_a.answer, free_answer_b=free_b.answer)


def comparison_figure(cmp: Comparison, layer="mean", token="mean", row="predicts"):
    """A | B on one shared colour scale, then the signed difference B − A (red: B looks there more)."""
    import matplotlib.pyplot as plt

    from ral_core import render

    va, vb = cmp.maps(layer=layer, token=token, row=row)
    vmax = float(max(va.max(), vb.max())) or 1e-9
    img, geo = cmp.a.image, cmp.a.geometry
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), dpi=100)
    sel = (f"{'mean over layers' if layer in (None, 'mean') else f'layer {layer}'}, mean over heads — "
           f"{render.token_label(cmp.a, token)}")
    for ax, v, r, tag in ((axes[0], va, cmp.a, "A"), (axes[1], vb, cmp.b, "B")):
        render.overlay(img, geo, v, title=f"{tag}: {r.model_name}", vmin=0, vmax=vmax, ax=ax)
    render.diff_overlay(img, geo, va, vb, title="B − A (red: B looks more, blue: less)", ax=axes[2])
    fig.suptitle(sel, fontsize=10)
    return fig
