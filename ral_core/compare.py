"""Compare two models on the same image, question and answer tokens.

Model A answers freely; A and B are then both scored teacher-forced on A's answer (`forced_answer`), so
their attention rows describe the same tokens and can be subtracted. Each model's own free answer is kept.

How far attention moved is stated in numbers (`magnitude`) and drawn honestly (`comparison_figure`): the B − A
panel uses the A/B maps' own colour range unless a magnification is asked for, and then says by how much.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

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



# "No visible change": the largest |B − A| of the head-mean maps is below this share of the maps' own colour range.
# On the B − A panel (RdBu_r at alpha 0.75 over the gray image) a change of 5 % of the range tints a token by at most
# 8/255 in any channel away from the zero colour, about the smallest step one sees between neighbouring patches;
# 10 % gives 17/255, which is plainly visible. So below 5 % the honest panel looks blank, and the line says so.
VISIBLE_SHARE = 0.05
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


@dataclass
class Magnitude:
    """How far attention moved between A and B for one selection, in numbers (see `line`)."""
    layer: int                  # the layer of the per-head JSD (the selected one; the last one for 'mean')
    head: int                   # the head whose image attention moved most there
    head_jsd: float             # its JSD (natural log, 0 … ln 2)
    max_change: float           # largest |B − A| over visual tokens of the shown head-mean maps
    scale: float                # the maps' own colour range (max of A's and B's maps)
    answer_a: str
    answer_b: str
    target_a: float | None = None   # on-target mass (share of the attention row in the target boxes), if any
    target_b: float | None = None
    expected: str | None = None
    selection: str = ""

    @property
    def share_of_ln2(self) -> float:
        return self.head_jsd / math.log(2)

    @property
    def change_share(self) -> float:
        """max |B − A| as a share of the maps' colour range (what the honest B − A panel shows at full colour)."""
        return self.max_change / self.scale if self.scale > 0 else 0.0

    @property
    def visible(self) -> bool:
        return self.change_share >= VISIBLE_SHARE

    def line(self) -> str:
        """One line: largest head JSD (share of ln 2), on-target mass A → B, the answers, visible or not."""
        parts = [f"largest head JSD {self.head_jsd:.3g} ({100 * self.share_of_ln2:.1f} % of ln 2) at layer "
                 f"{self.layer} head {self.head}"]
        if self.target_a is not None:
            parts.append(f"on-target mass A {self.target_a:.3f} → B {self.target_b:.3f} "
                         f"({self.target_b - self.target_a:+.3f})")
        ans = f"answers A {self.answer_a!r}, B {self.answer_b!r}"
        if self.expected is not None:
            ans += f" (expected {self.expected!r})"
        parts.append(ans)
        pct = 100 * self.change_share
        if self.visible:
            parts.append(f"largest change in the B − A map: {pct:.0f} % of the maps' scale")
        else:
            parts.append(f"no visible change (largest change in the B − A map: {pct:.1f} % of the maps' scale, "
                         f"below {100 * VISIBLE_SHARE:.0f} %)")
        return "Attention moved: " + " · ".join(parts)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(share_of_ln2=self.share_of_ln2, change_share=self.change_share, visible=self.visible,
                 visible_threshold=VISIBLE_SHARE, line=self.line())
        return d


def _layer_for_heads(cmp: Comparison, layer) -> int:
    """Per-head numbers need one layer: the selected one, or the last common one for 'mean'."""
    if layer in (None, "mean"):
        return cmp.layers[-1]
    layer = int(layer)
    return cmp.layers[layer] if layer < 0 else layer


def target_mass(values: np.ndarray, geometry, boxes) -> float:
    """Share of the attention row on visual tokens inside any of `boxes`, each token weighted by its overlap."""
    ov = np.max([geometry.box_overlap(b) for b in boxes], axis=0)
    return float((np.asarray(values, np.float64) * ov).sum())


def magnitude(cmp: Comparison, layer="mean", token="mean", row="predicts", boxes=(), expected=None) -> Magnitude:
    """The numbers behind the one-line summary, for the same selection the figure shows."""
    va, vb = cmp.maps(layer=layer, token=token, row=row)
    hl = _layer_for_heads(cmp, layer)
    head, jsd_max = cmp.ranked_heads(hl, token=token, row=row)[0]
    boxes = [tuple(float(x) for x in b) for b in (boxes or ())]
    ta = tb = None
    if boxes:
        ta, tb = target_mass(va, cmp.a.geometry, boxes), target_mass(vb, cmp.b.geometry, boxes)
    lay = "mean over layers" if layer in (None, "mean") else f"layer {hl}"
    from ral_core.render import token_label
    return Magnitude(layer=hl, head=head, head_jsd=jsd_max, max_change=float(np.abs(vb - va).max()),
                     scale=float(max(va.max(), vb.max())), answer_a=cmp.free_answer_a, answer_b=cmp.free_answer_b,
                     target_a=ta, target_b=tb, expected=expected,
                     selection=f"{lay}, mean over heads — {token_label(cmp.a, token)}")


def parse_magnify(value) -> float | str:
    """'auto', or a factor ≥ 1 (1: the maps' own scale)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        k = float(value)
    except (TypeError, ValueError):
        k = float("nan")
    if not (math.isfinite(k) and 1 <= k <= 1e6):
        raise RALError(f"magnify must be 'auto' or a factor from 1 to 1000000 (1: the maps' own scale); got {value!r}")
    return k


def magnify_factor(magnify, max_change: float, scale: float) -> float:
    """The factor the B − A panel's colour range is divided by. 'auto': the largest change fills the range,
    rounded down to 2 significant digits so the stated factor is never more than was applied."""
    k = parse_magnify(magnify)
    if k != "auto":
        return k
    if max_change <= 0 or scale <= 0:
        return 1.0
    raw = max(scale / max_change, 1.0)
    digits = 10 ** (math.floor(math.log10(raw)) - 1)
    return max(math.floor(raw / digits) * digits, 1.0)


def comparison_figure(cmp: Comparison, layer="mean", token="mean", row="predicts", magnify=1, boxes=(),
                      expected=None):
    """A | B on one shared colour scale, then the signed difference B − A (red: B looks there more) on the same
    scale, or on that scale divided by `magnify` (a factor ≥ 1 or 'auto'), which its title then states.
    `boxes` (the example's target) are outlined on every panel."""
    import matplotlib.pyplot as plt

    from ral_core import render

    va, vb = cmp.maps(layer=layer, token=token, row=row)
    vmax = float(max(va.max(), vb.max())) or 1e-9
    k = magnify_factor(magnify, float(np.abs(vb - va).max()), vmax)
    img, geo = cmp.a.image, cmp.a.geometry
    boxes = [tuple(float(x) for x in b) for b in (boxes or ())]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.4), dpi=100)
    sel = (f"{'mean over layers' if layer in (None, 'mean') else f'layer {layer}'}, mean over heads — "
           f"{render.token_label(cmp.a, token)}")
    if expected is not None:
        sel += f" · expected answer {expected!r}" + (" (cyan box: where it is)" if boxes else "")
    for ax, v, r, tag in ((axes[0], va, cmp.a, "A"), (axes[1], vb, cmp.b, "B")):
        render.overlay(img, geo, v, title=f"{tag}: {r.model_name}", vmin=0, vmax=vmax, ax=ax, boxes=boxes)
    if k == 1:
        title = "B − A on the maps' scale\n(red: B looks more, blue: less)"
    else:
        title = f"B − A magnified ×{k:g} (colour range ±{vmax / k:.2g})\n(red: B looks more, blue: less)"
    render.diff_overlay(img, geo, va, vb, title=title, ax=axes[2], lim=vmax / k, boxes=boxes)
    fig.suptitle(sel, fontsize=10, parse_math=False)
    return fig


def heads_table(cmp: Comparison, layer="mean", token="mean", row="predicts") -> list[dict]:
    """The heads-moved table: per head of one layer (the selected one, the last for 'mean'), most moved first."""
    hl = _layer_for_heads(cmp, layer)
    out = []
    for i, (h, v) in enumerate(cmp.ranked_heads(hl, token=token, row=row)):
        out.append({"rank": i + 1, "layer": hl, "head": h, "jsd": v,
                    "image_a": cmp.a.mass_split(layer=hl, head=h, token=token, row=row)["image"],
                    "image_b": cmp.b.mass_split(layer=hl, head=h, token=token, row=row)["image"]})
    return out


def bundled_example(image, question: str) -> dict | None:
    """The bundled example (assets/examples) with these pixels and this question, for its expected answer and
    target boxes; None for anything else."""
    import hashlib

    from ral_core.images import load_image

    def digest(im):
        return hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest()

    q = " ".join(str(question).split()).casefold()
    want = digest(image.convert("RGB"))
    for f in ("examples.json", "photos.json"):
        try:
            items = json.loads((EXAMPLES_DIR / f).read_text())
        except (OSError, ValueError):
            continue
        for it in items:
            if " ".join(it.get("question", "").split()).casefold() != q:
                continue
            try:  # read as every image enters (EXIF orientation, 16-bit scaling), like the image it is matched to
                if digest(load_image(EXAMPLES_DIR / it["image"])) == want:
                    return it
            except RALError:
                continue
    return None
