"""Causal-lever map: which decoder layers' attention actually moves the answer.

For each layer, add +s (toward) or −s (away) to the attention logits from the rows that decide the answer
tokens to the target region's visual keys (weighted by how much of each token lies in the region), at that
layer only, and measure the change in log p(answer) (teacher-forced). Over a batch of samples it also reports
the correlation between natural on-target attention at each layer and p(answer). Exploration pays only at
layers with a large effect."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ral_core.attention import capture, resolve_layers
from ral_core.limits import check_deadline
from ral_core.policy import max_overlap


@dataclass
class LeverMap:
    layers: list[int]
    effect: np.ndarray          # [n_layers] mean Δ log p(answer), toward − away
    effect_sd: np.ndarray
    prob_effect: np.ndarray     # [n_layers] mean Δ p(answer)
    attn_shift: np.ndarray      # [n_layers] mean Δ target mass at the steered layer (did the steering bite?)
    corr: np.ndarray            # [n_layers] corr(natural target mass, p(answer)) over samples
    head_effect: np.ndarray | None = None  # [n_layers, H] with per_head=True
    n_samples: int = 0
    strength: float = 0.0
    meta: dict = field(default_factory=dict)

    def ranked(self) -> list[int]:
        """Layers by |effect|, strongest first."""
        return [self.layers[i] for i in np.argsort(-np.abs(self.effect), kind="stable")]

    def top(self, k: int) -> list[int]:
        return sorted(self.ranked()[:k])

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


def _region_weights(adapter, sample, geometry, n_keys_visual):
    if sample.get("boxes"):
        return [np.asarray(max_overlap(geometry, sample["boxes"]), np.float32)]
    # no target known: each third × third of the image in turn
    W, H = geometry.image_size
    regions = []
    for r in range(3):
        for c in range(3):
            box = (c * W / 3, r * H / 3, (c + 1) * W / 3, (r + 1) * H / 3)
            regions.append(np.asarray(geometry.box_overlap(box), np.float32))
    return regions


@torch.no_grad()
def _sample_effects(adapter, sample, layers, strength, per_head):
    model = adapter.model
    b = adapter.build_inputs([sample["image"]], [sample["question"]], [sample["answer"]], add_eos=False)
    mi, resp = b["model_inputs"], b["response_mask"][0]
    L = resp.shape[0]
    ans_pos = torch.nonzero(resp).squeeze(-1)
    dec_rows = ans_pos - 1  # rows that predict each answer token
    vis = adapter.visual_mask(mi["input_ids"][0])
    H = adapter.num_heads
    out = {"effect": [], "prob": [], "shift": [], "head": []}
    regions = _region_weights(adapter, sample, b["geometry"][0], int(vis.sum()))
    variants = [(layer, h) for layer in layers for h in ([None] + (list(range(H)) if per_head else []))]
    B = 1 + 2 * len(variants)
    batch = {k: (v.expand(B, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 else v) for k, v in mi.items()}
    if "image_grid_thw" in mi:  # Qwen packs patches of every image along dim 0
        batch["pixel_values"] = mi["pixel_values"].repeat(B, 1)
        batch["image_grid_thw"] = mi["image_grid_thw"].repeat(B, 1)
    elif "pixel_values" in mi:
        batch["pixel_values"] = mi["pixel_values"].expand(B, *mi["pixel_values"].shape[1:])
    best = None
    for w in regions:
        check_deadline("finding the levers")  # one batched forward per region: stop between them at the limit
        keyw = torch.zeros(L)
        keyw[vis] = torch.from_numpy(w)
        bias = {layer: torch.zeros(B, H, L, L) for layer in layers}
        for j, (layer, h) in enumerate(variants):
            for sgn, row in ((1.0, 1 + 2 * j), (-1.0, 2 + 2 * j)):
                hs = slice(None) if h is None else slice(h, h + 1)
                bias[layer][row, hs, dec_rows[:, None], :] = sgn * strength * keyw
        rows = dec_rows[None].expand(B, -1)
        with capture(model, layers=layers, rows=rows, bias=bias) as maps:  # logits of the answer rows only
            logits = model(**batch, logits_to_keep=dec_rows, use_cache=False).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, mi["input_ids"][0, ans_pos][None, :, None]
                                                               .expand(B, -1, 1)).squeeze(-1).sum(-1)
        tm = {layer: (maps[layer].mean(1) * keyw).sum(-1).mean(-1) for layer in layers}  # [B] target mass
        eff = {v: float(lp[1 + 2 * j] - lp[2 + 2 * j]) for j, v in enumerate(variants)}
        score = max(abs(eff[(layer, None)]) for layer in layers)
        if best is None or score > best[0]:
            best = (score, eff, lp, tm, w)
    _, eff, lp, tm, w = best
    p = lp.exp()
    for j, (layer, h) in enumerate(variants):
        if h is None:
            out["effect"].append(eff[(layer, None)])
            out["prob"].append(float(p[1 + 2 * j] - p[2 + 2 * j]))
            out["shift"].append(float(tm[layer][1 + 2 * j] - tm[layer][2 + 2 * j]))
    if per_head:
        out["head"] = [[eff[(layer, h)] for h in range(H)] for layer in layers]
    out["natural_mass"] = [float(tm[layer][0]) for layer in layers]
    out["p_answer"] = float(p[0])
    return out


def lever_map(adapter, samples: list[dict], layers="all", strength: float = 3.0, per_head: bool = False) -> LeverMap:
    """Run the steering probe on `samples` (dicts with image, question, answer and optional boxes)."""
    layers = resolve_layers(layers, adapter.num_layers, adapter.attention_layers)
    res = [_sample_effects(adapter, s, layers, strength, per_head) for s in samples]
    eff = np.array([r["effect"] for r in res])
    nat = np.array([r["natural_mass"] for r in res])
    pa = np.array([r["p_answer"] for r in res])
    corr = np.array([_corr(nat[:, i], pa) for i in range(len(layers))])
    return LeverMap(layers=layers, effect=eff.mean(0), effect_sd=eff.std(0), prob_effect=np.mean([r["prob"] for r in res], 0),
                    attn_shift=np.mean([r["shift"] for r in res], 0), corr=corr,
                    head_effect=np.mean([r["head"] for r in res], 0) if per_head else None,
                    n_samples=len(samples), strength=strength)


def _corr(a, b) -> float:
    if len(a) < 3 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
