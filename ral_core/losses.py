"""Losses with one signature and one registry.

Every term is `fn(ctx: LossContext) -> (scalar, metrics)`. The trainer sums `weight · term` over the
terms its config enables. Shapes: N sequences, T response positions, K keys.

The attention policy (DESIGN.md §1): for response token t, a row of the chosen decoder layer(s), head-mean
(or per head), over earlier positions, self entry removed, renormalised; support 'all' or 'visual'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

EPS = 1e-12


# ---- attention policy and divergences ----------------------------------------------------------------
def attention_policy(rows: torch.Tensor, key_valid: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Captured rows [N, H, T, K] → distributions [N, H|1, T, K] over `key_valid` [N, T, K] keys."""
    a = rows if per_head else rows.mean(dim=1, keepdim=True)
    a = a * key_valid[:, None].to(a.dtype)
    return a / a.sum(-1, keepdim=True).clamp_min(EPS)


class _JSD(torch.autograd.Function):
    """JSD(p‖q) over the last dim, natural log, fp32. The backward is the analytic ½·ln(2p/(p+q)), which is
    exactly 0 where p == q — the zero-gradient trap is a property of the loss, not of rounding."""

    @staticmethod
    def forward(ctx, p, q):
        p, q = p.float(), q.float()
        m = 0.5 * (p + q)
        lp, lq, lm = p.clamp_min(EPS).log(), q.clamp_min(EPS).log(), m.clamp_min(EPS).log()
        kl_p = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1)
        kl_q = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q)).sum(-1)
        ctx.save_for_backward(p, q, lp, lm)
        return 0.5 * (kl_p + kl_q)

    @staticmethod
    def backward(ctx, g):
        p, q, lp, lm = ctx.saved_tensors
        gp = torch.where(p > 0, 0.5 * (lp - lm), torch.zeros_like(p)) * g[..., None]
        gq = None
        if ctx.needs_input_grad[1]:
            lq = q.clamp_min(EPS).log()
            gq = torch.where(q > 0, 0.5 * (lq - lm), torch.zeros_like(q)) * g[..., None]
        return gp, gq


def jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _JSD.apply(p, q)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * p.clamp_min(EPS).log(), torch.zeros_like(p)).sum(-1)


# ---- aggregation -----------------------------------------------------------------------------------------
def aggregate(x: torch.Tensor, mask: torch.Tensor, norm: str = "token") -> torch.Tensor:
    """Reduce per-token values [N, T] over response tokens.

    token: mean over all response tokens of the batch · sequence: mean over sequences of each sequence's
    token mean (original GRPO) · dr_grpo: sum / (N · T_max), a constant normaliser (Dr. GRPO).
    """
    m = mask.to(x.dtype)
    if norm == "token":
        return (x * m).sum() / m.sum().clamp_min(1.0)
    if norm == "sequence":
        return ((x * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()
    if norm == "dr_grpo":
        return (x * m).sum() / float(x.shape[0] * x.shape[1])
    raise ValueError(f"unknown normalisation '{norm}'; choose token, sequence or dr_grpo")


# ---- context and registry -----------------------------------------------------------------------------
@dataclass
class LossContext:
    mask: torch.Tensor                      # [N, T] response tokens
    logp: torch.Tensor | None = None        # [N, T] current log-probs of the sampled tokens
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # [N]
    attn: list[torch.Tensor] = field(default_factory=list)          # per layer [N, H|1, T, K] current policy
    attn_old: list[torch.Tensor] = field(default_factory=list)      # same, from the rollout policy
    attn_teacher: list[torch.Tensor] = field(default_factory=list)  # same, from a frozen teacher
    attn_natural: list[torch.Tensor] = field(default_factory=list)   # exploration: unperturbed current rows
    attn_explored: list[torch.Tensor] = field(default_factory=list)  # exploration: behaviour rows p̃_i
    logits: torch.Tensor | None = None          # [N, T, V] (token-level distillation only)
    teacher_logits: torch.Tensor | None = None
    norm: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2


LossFn = Callable[[LossContext], tuple[torch.Tensor, dict]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn
    return deco


@register_loss("grpo")
def grpo(ctx: LossContext):
    """Clipped ratio surrogate with sequence-level advantages."""
    ratio = torch.exp(ctx.logp - ctx.old_logp)
    A = ctx.advantages[:, None]
    clipped = ratio.clamp(1 - ctx.clip_low, 1 + ctx.clip_high)
    per_tok = -torch.minimum(ratio * A, clipped * A)
    with torch.no_grad():
        m = ctx.mask.float()
        was_clipped = ((ratio * A) > (clipped * A)).float()
        metrics = {"clip_frac": float((was_clipped * m).sum() / m.sum().clamp_min(1)),
                   "ratio_mean": float((ratio * m).sum() / m.sum().clamp_min(1))}
    return aggregate(per_tok, ctx.mask, ctx.norm), metrics


@register_loss("kl")
def kl_k3(ctx: LossContext):
    """k3 estimator of KL(π_θ ‖ π_ref): exp(r) − r − 1 with r = log π_ref − log π_θ."""
    r = ctx.ref_logp - ctx.logp
    k3 = torch.exp(r) - r - 1
    val = aggregate(k3, ctx.mask, ctx.norm)
    return val, {"kl": float(val.detach())}


def _per_token_jsd(ps, qs) -> torch.Tensor:
    """Mean over layers and heads of JSD per token → [N, T]."""
    return torch.stack([jsd(p, q).mean(1) for p, q in zip(ps, qs)]).mean(0)


@register_loss("ral_attn")
def ral_attention(ctx: LossContext):
    """RAL: mean_t A · JSD(p_θ^t ‖ sg(p_old^t)). Zero gradient on the first update after a rollout."""
    d = _per_token_jsd(ctx.attn, [q.detach() for q in ctx.attn_old])
    val = aggregate(ctx.advantages[:, None] * d, ctx.mask, ctx.norm)
    return val, {"attn_jsd_old": float(aggregate(d.detach(), ctx.mask, "token"))}


@register_loss("opad_attn")
def opad_attention(ctx: LossContext):
    """On-policy attention distillation: mean_t JSD(p_student^t ‖ p_teacher^t), no advantage."""
    d = _per_token_jsd(ctx.attn, [q.detach() for q in ctx.attn_teacher])
    val = aggregate(d, ctx.mask, ctx.norm)
    return val, {"attn_jsd_teacher": float(val.detach())}


@register_loss("token_rkl")
def token_reverse_kl(ctx: LossContext):
    """Token-level reverse KL(student ‖ teacher) over the full vocabulary (the plain-distillation baseline)."""
    ls = torch.log_softmax(ctx.logits.float(), -1)
    lt = torch.log_softmax(ctx.teacher_logits.float(), -1).detach()
    kl = (ls.exp() * (ls - lt)).sum(-1)
    val = aggregate(kl, ctx.mask, ctx.norm)
    return val, {"token_rkl": float(val.detach())}


@register_loss("explore")
def explore_attention(ctx: LossContext):
    """Attention exploration: mean_t Σ_i A_i · JSD(p_θ^t ‖ sg(p̃_i^t)), p_θ the unperturbed attention on the same
    sequence and p̃_i the rollout's explored (biased) attention. The targets differ across a group, so the term
    does not cancel on shared rows and acts from the first update, on the decisive row too."""
    d = _per_token_jsd(ctx.attn_natural, [q.detach() for q in ctx.attn_explored])
    val = aggregate(ctx.advantages[:, None] * d, ctx.mask, ctx.norm)
    return val, {"explore_jsd": float(aggregate(d.detach(), ctx.mask, "token"))}
