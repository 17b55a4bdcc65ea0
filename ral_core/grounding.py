"""Grounded attention objectives: where the answer's region is, and terms that pull attention there.

A sample may carry target boxes (x0, y0, x1, y1) in original-image pixels. Each adapter's `TokenGeometry` already
maps every visual token to the exact rectangle of the original image it sees (merged patches, tiles, crops, pads;
checked against the image processors in tests/test_geometry.py), so one family-agnostic computation on those
rectangles gives, per visual token:

- `box_weights`: the fraction of the token's rectangle inside the union of the boxes (the on-target mask);
- `box_target`: a target distribution over visual tokens, the boxes' indicator blurred by a Gaussian and
  integrated exactly over each token's rectangle, then normalised.

The two objectives (docs/method.md, "Grounded attention"):

- attention **reward** `attention_box` (SAYO's form): R_a = ½(1 + tanh(log((a + ε)/(v + ε)))), ā the response
  rows' attention averaged over heads, the policy layers and the generated tokens, a its (coverage-weighted) mean
  over the box's visual tokens and v its mean over all visual tokens. It is computed from each rollout's own
  captured attention and added to the reward before group normalisation, so it acts through the advantage like
  any reward. A sample without a box scores 0 on every rollout: a constant within its group, so no effect.
- attention **target** term `ground_<div>` (weight `lambda_ground`): D(q ‖ p_vis) per response row of the policy
  layers (head mean), p_vis the row's attention restricted to the visual tokens and renormalised, q the box target;
  D (`ground_div`) is KL(q ‖ p) (default), JSD, `mass` (−log of p_vis's share inside the boxes: mass inside,
  however spread there) or `auto` (KL for one box, mass for several). The default recipe takes the rows that
  predict each answer token (`attn_row=predicts`, the first-token decision included): with the paper's own rows
  a one-digit answer's deciding row is left out, and in one 20-step run (seed 0) the term then cost 8 points of
  held-out accuracy instead of about 1. Unlike RAL's JSD to the old
  policy the term does not start at its minimum, so it acts on the first update. Which rollouts it acts on:
  `rewarded` (default) — rollouts that earned reward and are not below their group (A > 0, or a group that was
  all right): a correct answer is the evidence that the region served, and the all-right groups of easy
  questions, where A = 0, would otherwise silence the term; a wrong answer is not pushed away from the box,
  since looking at the right region and still answering wrongly says nothing about where else to look.
  `advantage` — weight A (signed, as RAL's term).

Both read "the policy layers, head mean" by default; `ground_layers` (policy | last | all | levers | indices) and
`ground_heads` (mean | head indices: their mean) choose other rows of the same capture for them alone
(policy.PolicySpec), so the target can sit on one head, or on the layers whose attention moves the answer, while
RAL's term keeps attn_layers.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ral_core.errors import RALError
from ral_core.losses import EPS, LossContext, group_advantages, jsd, register_loss

# σ of the box target's blur, in token sides: 0.1 keeps ≈ 0.85 of a lone token's target on it. On a 3×3 token grid a
# wider blur (0.25: 0.64) spreads the target over most of the image, and the KL term then mostly flattens the row
# instead of moving it onto the box (measured on the default model: on-target share flat at 0.25, +0.015 at 0.1).
GROUND_SMOOTH = 0.1
REWARD_EPS = 1e-6           # ε of the attention reward (attention values of one token are ≥ 1e-4 in practice)
GROUND_ON = ("rewarded", "advantage")
GROUND_DIV = ("kl", "jsd", "mass", "auto")


# ---- boxes ------------------------------------------------------------------------------------------------
def parse_boxes(boxes, where: str = "") -> list[tuple[float, float, float, float]]:
    """A box [x0, y0, x1, y1] or a list of them → list of float 4-tuples; malformed or empty boxes get one line."""
    at = f"{where}: " if where else ""
    if boxes is None:
        return []
    if isinstance(boxes, np.ndarray):
        boxes = boxes.tolist()
    if isinstance(boxes, (list, tuple)) and len(boxes) == 4 and all(_is_num(v) for v in boxes):
        boxes = [boxes]
    if not isinstance(boxes, (list, tuple)):
        raise RALError(f"{at}boxes must be a list of [x0, y0, x1, y1] in image pixels (got {_short(boxes)})")
    out = []
    for b in boxes:
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_num(v) for v in b)):
            raise RALError(f"{at}box {_short(b)} must be 4 numbers [x0, y0, x1, y1] in image pixels")
        x0, y0, x1, y1 = (float(v) for v in b)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise RALError(f"{at}box {_short(b)} has a non-finite coordinate")
        if x1 <= x0 or y1 <= y0:
            raise RALError(f"{at}box {_short(b)} is empty: it needs x1 > x0 and y1 > y0 ([x0, y0, x1, y1], pixels)")
        out.append((x0, y0, x1, y1))
    return out


def check_boxes(boxes, image_size, where: str = "") -> list[tuple[float, float, float, float]]:
    """`parse_boxes`, and every box inside the W×H image."""
    out = parse_boxes(boxes, where)
    W, H = image_size
    for b in out:
        if b[0] < 0 or b[1] < 0 or b[2] > W or b[3] > H:
            at = f"{where}: " if where else ""
            raise RALError(f"{at}box {_short(list(b))} lies outside the {W}×{H} image: coordinates are pixels, "
                           f"0 ≤ x ≤ {W} and 0 ≤ y ≤ {H}")
    return out


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ---- box → visual tokens ------------------------------------------------------------------------------------
def _overlap(tokens: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """[K, R] area of token k's rectangle inside rect r."""
    ix = np.clip(np.minimum(tokens[:, None, 2], rects[None, :, 2]) - np.maximum(tokens[:, None, 0], rects[None, :, 0]),
                 0, None)
    iy = np.clip(np.minimum(tokens[:, None, 3], rects[None, :, 3]) - np.maximum(tokens[:, None, 1], rects[None, :, 1]),
                 0, None)
    return ix * iy


def box_weights(geometry, boxes) -> np.ndarray:
    """[n_tokens] fraction of each visual token's rectangle that lies inside the union of `boxes` (exact: the union
    is cut into disjoint cells along the boxes' edges). Zero-area tokens (cropped away) get 0."""
    t = np.asarray(geometry.boxes, np.float64)
    b = np.asarray(parse_boxes(boxes), np.float64).reshape(-1, 4)
    if len(b) == 0:
        return np.zeros(len(t))
    xs, ys = np.unique(b[:, [0, 2]]), np.unique(b[:, [1, 3]])
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    cells = [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for i in range(len(cx)) for j in range(len(cy))
             if ((b[:, 0] <= cx[i]) & (cx[i] < b[:, 2]) & (b[:, 1] <= cy[j]) & (cy[j] < b[:, 3])).any()]
    area = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    inside = _overlap(t, np.asarray(cells, np.float64).reshape(-1, 4)).sum(1)
    return np.where(area > 0, inside / np.maximum(area, 1e-12), 0.0).clip(0, 1)


def _phi_integral(a, b, c, s):
    """∫_a^b Φ((x − c)/s) dx, exactly (the antiderivative of Φ is uΦ(u) + φ(u))."""
    def F(u):
        return u * 0.5 * (1 + _erf(u / math.sqrt(2))) + np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    return s * (F((b - c) / s) - F((a - c) / s))


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def box_target(geometry, boxes, smooth: float = GROUND_SMOOTH) -> np.ndarray:
    """[n_tokens] target distribution: each box's indicator blurred by a Gaussian of σ = `smooth` × the median
    token side (per axis, in original pixels), averaged over each token's exact rectangle, summed over the boxes
    and normalised. smooth=0: the exact coverage fractions of `box_weights`. Zeros when there is no box."""
    t = np.asarray(geometry.boxes, np.float64)
    b = np.asarray(parse_boxes(boxes), np.float64).reshape(-1, 4)
    if len(b) == 0 or len(t) == 0:
        return np.zeros(len(t))
    w, h = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    live = (w > 0) & (h > 0)
    if smooth <= 0:
        v = box_weights(geometry, b)
    else:
        sx, sy = smooth * np.median(w[live]), smooth * np.median(h[live])
        v = np.zeros(len(t))
        ww, hh = np.maximum(w, 1e-12), np.maximum(h, 1e-12)
        for x0, y0, x1, y1 in b:
            fx = (_phi_integral(t[:, 0], t[:, 2], x0, sx) - _phi_integral(t[:, 0], t[:, 2], x1, sx)) / ww
            fy = (_phi_integral(t[:, 1], t[:, 3], y0, sy) - _phi_integral(t[:, 1], t[:, 3], y1, sy)) / hh
            v += np.clip(fx, 0, 1) * np.clip(fy, 0, 1)
    v = np.where(live, v, 0.0)
    s = v.sum()
    return v / s if s > 0 else v


def key_targets(visual: torch.Tensor, geometries, boxes_per_row, smooth: float = GROUND_SMOOTH):
    """Per sequence: (`weights` [N, K] coverage of each key by the boxes, `target` [N, K] the box target over the
    visual keys, `has_box` [N] bool), 0 off the visual keys and on rows without a box."""
    N, K = visual.shape
    w = torch.zeros((N, K), dtype=torch.float32, device=visual.device)
    q = torch.zeros_like(w)
    has = torch.zeros(N, dtype=torch.bool, device=visual.device)
    for i, (geo, boxes) in enumerate(zip(geometries, boxes_per_row)):
        if not boxes:
            continue
        has[i] = True
        w[i, visual[i]] = torch.tensor(box_weights(geo, boxes), dtype=torch.float32, device=visual.device)
        q[i, visual[i]] = torch.tensor(box_target(geo, boxes, smooth), dtype=torch.float32, device=visual.device)
    return w, q, has


# ---- the attention reward -----------------------------------------------------------------------------------
def mean_rows(attn: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Policy rows per layer [N, H|1, T, K] → [N, K]: mean over layers and heads, then over the response tokens."""
    p = torch.stack([a.float().mean(1) for a in attn]).mean(0)  # [N, T, K]
    m = mask.float()
    return (p * m[..., None]).sum(1) / m.sum(1).clamp_min(1)[:, None]


def attention_reward(attn_mean: torch.Tensor, visual: torch.Tensor, weights: torch.Tensor,
                     eps: float = REWARD_EPS) -> torch.Tensor:
    """SAYO's R_a per sequence [N] from its mean attention `attn_mean` [N, K]: a = the coverage-weighted mean over
    the box's visual tokens (the plain mean when the box covers whole tokens), v = the mean over all visual
    tokens; ½(1 + tanh(log((a + ε)/(v + ε)))). 0 for rows without a box."""
    vis = visual.float()
    v = (attn_mean * vis).sum(-1) / vis.sum(-1).clamp_min(1)
    wsum = weights.sum(-1)
    a = (attn_mean * weights).sum(-1) / wsum.clamp_min(EPS)
    r = 0.5 * (1 + torch.tanh(torch.log((a + eps) / (v + eps))))
    return torch.where(wsum > 0, r, torch.zeros_like(r))


def ground_rows(ro) -> list[torch.Tensor]:
    """The rollout policy's rows as the grounded terms read them (config ground_layers / ground_heads)."""
    return getattr(ro, "ground_attn", None) or ro.old_attn


def box_weights_of(ro) -> torch.Tensor | None:
    return getattr(ro, "target_keys", None)


def add_attention_reward(ro, weight: float, attn: list[torch.Tensor] | None = None, adv_scale: str = "std",
                         name: str = "attention_box") -> None:
    """Add weight · R_a to each rollout's reward (from its own captured attention: the grounded terms' rows
    `ro.ground_attn` unless given), log it as a sub-reward, and recompute the group advantages."""
    attn = ground_rows(ro) if attn is None else attn
    w = box_weights_of(ro)
    if not attn or w is None:
        r = torch.zeros_like(ro.rewards)
    else:
        r = attention_reward(mean_rows(attn, ro.mask), ro.visual_keys, w).to(ro.rewards.device)
    ro.sub_rewards[name] = r.cpu()
    ro.rewards = ro.rewards + float(weight) * r.cpu()
    A, ro.zero_var_groups = group_advantages(ro.rewards, ro.group.cpu(), adv_scale)
    ro.advantages = A.to(ro.completion.device)


# ---- the attention target term --------------------------------------------------------------------------------
def rollout_weights(rewards: torch.Tensor, advantages: torch.Tensor, group: torch.Tensor,
                    mode: str = "rewarded") -> torch.Tensor:
    """[N] weight of each rollout in the target term (module docstring): `rewarded` 1 where the rollout earned
    reward and A > 0 or its group was all equal, else 0; `advantage` A."""
    if mode == "advantage":
        return advantages.float()
    if mode != "rewarded":
        raise RALError(f"ground_on must be one of {', '.join(GROUND_ON)} (got {mode!r})")
    r, A = rewards.float().to(advantages.device), advantages.float()
    g = group.to(advantages.device)
    zero_var = torch.zeros_like(A, dtype=torch.bool)
    for k in g.unique():
        m = g == k
        zero_var[m] = bool((A[m] == 0).all())
    return ((r > 0) & ((A > 0) | zero_var)).float()


def visual_rows(attn: list[torch.Tensor], visual: torch.Tensor) -> torch.Tensor:
    """[N, T, K] head- and layer-mean attention rows restricted to the visual keys, renormalised."""
    p = torch.stack([a.float().mean(1) for a in attn]).mean(0)
    p = p * visual[:, None, :].float()
    return p / p.sum(-1, keepdim=True).clamp_min(EPS)


def target_divergence(p_vis: torch.Tensor, q: torch.Tensor, div: str = "kl") -> torch.Tensor:
    """[N, T] per row, q [N, K] broadcast over rows: `kl` KL(q‖p) = Σ q (log q − log p) and `jsd` JSD(p‖q) against
    the box target; `mass` −log Σ_k q_k p_k with q the box coverage (−log of the on-target share: it asks for mass
    inside the boxes and leaves free how it spreads there, e.g. over the three cells of a row)."""
    if div == "mass":
        return -(p_vis * q[:, None, :].float()).sum(-1).clamp_min(EPS).log()
    qq = q[:, None, :].expand_as(p_vis).float()
    if div == "jsd":
        return jsd(p_vis, qq)
    if div != "kl":
        raise RALError(f"ground_div must be one of {', '.join(GROUND_DIV)} (got {div!r})")
    return torch.where(qq > 0, qq * (qq.clamp_min(EPS).log() - p_vis.clamp_min(EPS).log()),
                       torch.zeros_like(qq)).sum(-1)


def _ground_term(div: str):
    def term(ctx: LossContext):
        """Attention target: mean_t w_i · D(q_i ‖ p_vis,θ^t), w_i from `rollout_weights` and q_i the box target
        (both in the batch's `ground`, set by `score_grounding`); rows of samples without a box contribute 0."""
        g = getattr(ctx.batch, "ground", None) or {}
        attn = ctx.attn_ground or ctx.attn
        if "weight" not in g or not attn:
            return ctx.logp.sum() * 0.0, {}
        has = g["target"].sum(-1) > 0
        p = visual_rows(attn, ctx.batch.visual_keys)
        if div == "auto":  # one region: every row may look at all of it; several: a row may read one at a time
            d = torch.where(g["regions"][:, None] > 1, target_divergence(p, ctx.batch.target_keys, "mass"),
                            target_divergence(p, g["target"], "kl"))
        else:
            d = target_divergence(p, ctx.batch.target_keys if div == "mass" else g["target"], div)
        w = (g["weight"].float() * has.float())[:, None]
        with torch.no_grad():
            m = ctx.mask.float() * has[:, None].float()
            shown = float((d * m).sum() / m.sum().clamp_min(1))
        return ctx.reduce(w * d), {f"ground_{div}": shown, "ground_acting": float((w[:, 0] != 0).float().mean())}
    return term


# one registered term per divergence, so the config's ground_div picks by weight (the loss sees only its context)
LOSSES_BY_DIV = {d: _ground_term(d) for d in GROUND_DIV}
for _div in GROUND_DIV:
    register_loss(f"ground_{_div}", weight=lambda cfg, batch, d=_div: getattr(cfg, "lambda_ground", 0.0)
                  if getattr(cfg, "ground_div", "kl") == d else 0.0)(LOSSES_BY_DIV[_div])


def score_grounding(ro, adapter, reward_model=None, adv_scale: str = "std", smooth: float = GROUND_SMOOTH):
    """After the rollout's attention pass: the attention rewards named in `reward_model.attention`, added before
    the advantages are final; and when `reward_model.ground_on` is set (lambda_ground > 0) the target term's box
    targets and rollout weights (`ro.ground`), with `ro.target_keys` the boxes' exact union coverage. Nothing to do
    (and nothing computed) for recipes without grounded terms."""
    ground_on = getattr(reward_model, "ground_on", None)
    rewards = getattr(reward_model, "attention", None) or {}
    if not (ground_on or rewards):
        return
    if ground_on and ro.target_keys is not None:
        rows = ro.group.tolist()
        geos = {g: adapter.geometry(ro.samples[g]["image"]) for g in set(rows) if ro.samples[g].get("boxes")}
        ro.target_keys, q, _ = key_targets(ro.visual_keys, [geos.get(g) for g in rows],
                                           [ro.samples[g].get("boxes") for g in rows], smooth)
        ro.ground = {"target": q, "regions": torch.tensor([len(ro.samples[g].get("boxes") or ()) for g in rows],
                                                          device=q.device)}
    for name, weight in rewards.items():
        add_attention_reward(ro, weight, adv_scale=adv_scale, name=name)
    if ro.ground:
        ro.ground["weight"] = rollout_weights(ro.rewards, ro.advantages, ro.group, ground_on).to(ro.mask.device)


# ---- metrics ---------------------------------------------------------------------------------------------------
def sink_share(attn: list[torch.Tensor], attention_mask: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the response rows' attention on the sink token — the first real (non-pad) position of the sequence,
    where attention that has nowhere to go collects — mean over layers, heads and response tokens."""
    p = torch.stack([a.float().mean(1) for a in attn]).mean(0)  # [N, T, K]
    first = attention_mask.long().argmax(-1)                      # left padding: the first 1
    s = p.gather(-1, first[:, None, None].expand(-1, p.shape[1], 1)).squeeze(-1)
    m = mask.float()
    return float((s * m).sum() / m.sum().clamp_min(1))


def grounding_stats(ro, attn: list[torch.Tensor] | None = None) -> dict:
    """Step metrics of every recipe: `attn_sink_share`, `attn_target_share` (`target_share`) and `ground_no_box`
    (samples of the step without a target box, which no grounded term touches); `attn_target_mass`, the share of
    the whole row on the boxes, comes from `rollout.attention_stats`. The sink share reads the policy rows, the
    target share the rows the grounded terms read."""
    attn, ground = (ro.old_attn, ground_rows(ro)) if attn is None else (attn, attn)
    out = {"ground_no_box": int(sum(1 for s in ro.samples if not s.get("boxes")))}
    if attn:
        out["attn_sink_share"] = sink_share(attn, ro.inputs["attention_mask"], ro.mask)
        if ro.target_keys is not None:
            out["attn_target_share"] = target_share(ground, ro.visual_keys, ro.target_keys, ro.mask)
    return out


def target_share(attn: list[torch.Tensor], visual: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the response rows' image attention inside the boxes (coverage-weighted), over rows of sequences
    that have a box: what the target term moves, whatever the row gives the text."""
    s = (visual_rows(attn, visual) * weights[:, None, :]).sum(-1)
    m = mask.float() * (weights.sum(-1) > 0).float()[:, None]
    return float((s * m).sum() / m.sum().clamp_min(1))
