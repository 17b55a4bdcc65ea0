"""Losses with one signature and one registry.

Every term is `fn(ctx: LossContext) -> (scalar, metrics)`, registered with the function that reads its weight
from the config (`register_loss(name, weight=...)`); the trainer sums `weight · term` over the terms whose
weight is non-zero, so a new term needs its registry entry and nothing else. Shapes: N sequences, T response
positions, K keys.

The attention distributions the terms compare are made in ral_core/policy.py.

Normalisation (`loss_norm`) and TRL 1.16 (`GRPOTrainer._compute_loss`, one loss_type each). Per micro-batch j
of an accumulation window of n_W micro-batches (the last window of an epoch may hold fewer), x the per-token
loss, m the response mask:

    ours      TRL       the micro-batch's share of the window's loss
    token     dapo      Σ_j x·m / (tokens of the rollout batch · the window's share of its sequences)
    bnpo      bnpo      (Σ_j x·m / Σ_j m) / n_W                      (each micro-batch's own token mean)
    sequence  grpo      mean_i (Σ_t x·m / |o_i|) / n_W               (original GRPO)
    dr_grpo   dr_grpo   Σ_j x·m / (B_j · max_new_tokens) / n_W       (a constant normaliser)

`aggregate` gives the micro-batch value, `window_weight` the factor to its share; the trainer and
tests/test_trl_reference.py (reference values made with TRL itself) use both. 'token' equals TRL's dapo when the
micro-batches are equal in size (TRL's always are): TRL divides by the generation batch's tokens × n_W / its
micro-batches. The rollout batch plays TRL's generation batch, `epochs` its num_iterations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

EPS = 1e-12


# ---- divergences --------------------------------------------------------------------------------------
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


# ---- advantages and aggregation ---------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group: torch.Tensor, scale: str = "std", eps: float = 1e-4):
    """(r − mean_g) / (std_g + eps); groups with zero reward variance get 0. Returns (A, n_zero_var_groups)."""
    A = torch.zeros_like(rewards)
    zero = 0
    for g in group.unique():
        m = group == g
        r = rewards[m]
        std = r.std() if r.numel() > 1 else torch.tensor(0.0)
        if float(std) < 1e-8:
            zero += 1
            continue
        A[m] = (r - r.mean()) / (std + eps) if scale == "std" else r - r.mean()
    return A, zero


LOSS_NORMS = {"token": "dapo", "bnpo": "bnpo", "sequence": "grpo", "dr_grpo": "dr_grpo"}  # ours → TRL loss_type


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(ids) under the sampling policy softmax(logits / temperature), in fp32 (as TRL scores rollouts)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


def aggregate(x: torch.Tensor, mask: torch.Tensor, norm: str = "token", max_len: int | None = None) -> torch.Tensor:
    """Reduce per-token values [N, T] of one micro-batch over its response tokens (module docstring).

    token, bnpo: mean over the micro-batch's response tokens · sequence: mean over sequences of each sequence's
    token mean · dr_grpo: sum / (N · max_len), max_len the maximum completion length (not the padded width).
    """
    m = mask.to(x.dtype)
    if norm in ("token", "bnpo"):
        return (x * m).sum() / m.sum().clamp_min(1.0)
    if norm == "sequence":
        return ((x * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()
    if norm == "dr_grpo":
        if not max_len:
            raise ValueError("dr_grpo normalises by the maximum completion length: pass max_len (max_new_tokens)")
        return (x * m).sum() / float(x.shape[0] * max_len)
    raise ValueError(f"unknown normalisation '{norm}'; choose token, bnpo, sequence or dr_grpo")


@dataclass(frozen=True)
class Window:
    """One gradient-accumulation window, as the normalisation sees it."""
    micro: int            # micro-batches in it (the last window of an epoch may hold fewer than grad_accum)
    share: float          # its sequences / the rollout batch's
    batch_tokens: float   # response tokens of the rollout batch (per process: the mean over processes)

    @classmethod
    def of(cls, chunks: list, n_sequences: int, batch_tokens: float) -> "Window":
        """The window made of `chunks` (index tensors) of a rollout batch of `n_sequences`."""
        return cls(micro=len(chunks), share=sum(len(c) for c in chunks) / n_sequences, batch_tokens=batch_tokens)


def accumulation_windows(chunks: list, grad_accum: int) -> list[list]:
    """Consecutive groups of `grad_accum` micro-batches; the last group holds the rest."""
    return [chunks[i:i + grad_accum] for i in range(0, len(chunks), grad_accum)]


def window_weight(norm: str, mask: torch.Tensor, window: Window) -> float:
    """Factor that turns a micro-batch's `aggregate` into its share of the window's loss, so that the gradients
    summed over the window are TRL's. It divides by the real number of micro-batches in the window, never by
    grad_accum, so a partial last window weighs as much as a full one."""
    if norm == "token":
        # aggregate divided by this micro-batch's tokens; TRL's dapo divides the sum by the window's share of the
        # rollout batch's tokens
        return float(mask.sum()) / max(window.batch_tokens * window.share, 1.0)
    return 1.0 / window.micro


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
    attn_ground: list[torch.Tensor] = field(default_factory=list)   # current rows the grounded terms read
    attn_teacher: list[torch.Tensor] = field(default_factory=list)  # same, from a frozen teacher
    attn_natural: list[torch.Tensor] = field(default_factory=list)   # exploration: unperturbed current rows
    attn_explored: list[torch.Tensor] = field(default_factory=list)  # exploration: behaviour rows p̃_i
    logits: torch.Tensor | None = None          # [N, T, V] (token-level distillation only)
    teacher_logits: torch.Tensor | None = None
    norm: str = "token"                     # token | bnpo | sequence | dr_grpo (module docstring)
    max_len: int | None = None              # dr_grpo: the maximum completion length (max_new_tokens)
    clip_low: float = 0.2
    clip_high: float = 0.2
    batch: object = None                    # the mini-batch (policy.Rollouts): what else a term needs (boxes, …)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return aggregate(x, self.mask, self.norm, self.max_len)

    @classmethod
    def of(cls, batch, forward: dict, cfg) -> "LossContext":
        """The context of one mini-batch (policy.Rollouts) and its training forward (policy.forward_policies)
        under a TrainConfig."""
        return cls(mask=batch.mask, logp=forward["logp"], old_logp=batch.old_logp, ref_logp=batch.ref_logp,
                   advantages=batch.advantages, attn=forward["attn"], attn_ground=forward.get("ground", []),
                   attn_old=batch.old_attn,
                   attn_teacher=batch.teacher_attn, attn_natural=forward["natural"], attn_explored=batch.explored_attn,
                   logits=forward["logits"], teacher_logits=batch.teacher_logits, norm=cfg.loss_norm,
                   max_len=cfg.max_new_tokens, clip_low=cfg.clip_low, clip_high=cfg.clip_high, batch=batch)


LossFn = Callable[[LossContext], tuple[torch.Tensor, dict]]
LOSSES: dict[str, LossFn] = {}
WEIGHTS: dict[str, Callable] = {}  # name → weight(cfg, batch): the term's weight in a TrainConfig run


def register_loss(name: str, weight: Callable | None = None):
    """Register a term; `weight(cfg, batch) -> float` reads its weight in a TrainConfig run (None: a term the
    trainer does not use, only callers that pass their own weights to combined_loss)."""
    def deco(fn):
        LOSSES[name] = fn
        if weight is not None:
            WEIGHTS[name] = weight
        return fn
    return deco


def term_weights(cfg, batch) -> dict[str, float]:
    """Each registered term's weight for one mini-batch, in registration order (the order the loss sums in)."""
    return {name: w(cfg, batch) for name, w in WEIGHTS.items()}


@register_loss("grpo", weight=lambda cfg, batch: 1.0)
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
    return ctx.reduce(per_tok), metrics


@register_loss("kl", weight=lambda cfg, batch: cfg.beta)
def kl_k3(ctx: LossContext):
    """k3 estimator of KL(π_θ ‖ π_ref): exp(r) − r − 1 with r = log π_ref − log π_θ."""
    r = ctx.ref_logp - ctx.logp
    k3 = torch.exp(r) - r - 1
    val = ctx.reduce(k3)
    return val, {"kl": float(val.detach())}


def _per_token_jsd(ps, qs) -> torch.Tensor:
    """Mean over layers and heads of JSD per token → [N, T]."""
    return torch.stack([jsd(p, q).mean(1) for p, q in zip(ps, qs)]).mean(0)


@register_loss("ral_attn", weight=lambda cfg, batch: cfg.lambda_attn)
def ral_attention(ctx: LossContext):
    """RAL: mean_t A · JSD(p_θ^t ‖ sg(p_old^t)). Zero gradient on the first update after a rollout."""
    d = _per_token_jsd(ctx.attn, [q.detach() for q in ctx.attn_old])
    val = ctx.reduce(ctx.advantages[:, None] * d)
    return val, {"attn_jsd_old": float(aggregate(d.detach(), ctx.mask, "token"))}


@register_loss("opad_attn", weight=lambda cfg, batch: cfg.gamma_opad)
def opad_attention(ctx: LossContext):
    """On-policy attention distillation: mean_t JSD(p_student^t ‖ p_teacher^t), no advantage."""
    d = _per_token_jsd(ctx.attn, [q.detach() for q in ctx.attn_teacher])
    val = ctx.reduce(d)
    return val, {"attn_jsd_teacher": float(val.detach())}


@register_loss("token_rkl", weight=lambda cfg, batch: cfg.lambda_token_kl)
def token_reverse_kl(ctx: LossContext):
    """Token-level reverse KL(student ‖ teacher) over the full vocabulary (the plain-distillation baseline)."""
    ls = torch.log_softmax(ctx.logits.float(), -1)
    lt = torch.log_softmax(ctx.teacher_logits.float(), -1).detach()
    kl = (ls.exp() * (ls - lt)).sum(-1)
    val = ctx.reduce(kl)
    return val, {"token_rkl": float(val.detach())}


@register_loss("explore", weight=lambda cfg, batch: cfg.explore_weight if batch.explore_bias else 0.0)
def explore_attention(ctx: LossContext):
    """Attention exploration: mean_t Σ_i A_i · JSD(p_θ^t ‖ sg(p̃_i^t)), p_θ the unperturbed attention on the same
    sequence and p̃_i the rollout's explored (biased) attention. The targets differ across a group, so the term
    does not cancel on shared rows and acts from the first update, on the decisive row too."""
    d = _per_token_jsd(ctx.attn_natural, [q.detach() for q in ctx.attn_explored])
    val = ctx.reduce(ctx.advantages[:, None] * d)
    return val, {"explore_jsd": float(aggregate(d.detach(), ctx.mask, "token"))}


def combined_loss(ctx: LossContext, weights: dict[str, float]) -> tuple[torch.Tensor, dict]:
    """Σ weight · term over the terms with a non-zero weight (one micro-batch, before `window_weight`); each
    term's value is logged as `loss_<name>`."""
    total, metrics = 0.0, {}
    for name, w in weights.items():
        if w == 0:
            continue
        val, m = LOSSES[name](ctx)
        total = total + w * val
        metrics[f"loss_{name}"] = float(val.detach())
        metrics.update(m)
    return total, metrics
