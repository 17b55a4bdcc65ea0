"""Group rollouts: G samples per prompt, rewards, group-normalised advantages, and the rollout policy's
token log-probs and attention from one no-grad teacher-forced pass under capture (never from generate()); the
step metrics read from them (attention, silence, exploration)."""
from __future__ import annotations

import torch

from ral_core.attention import capture
from ral_core.generation import generate_answer
from ral_core.grounding import grounding_stats, score_grounding
from ral_core.losses import aggregate, entropy, group_advantages, jsd
from ral_core.policy import (ExploreSpec, PolicySpec, Rollouts, forward_policies, key_validity, prefix_classes,
                             target_key_weights)
from ral_core.prefix_share import group_generate, worth_sharing
from ral_core.vision_cache import VisionCache


def class_advantage(row_class: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """[N, T] net advantage Σ_{i∈c} A_i of each response row's prefix class c (0 off the response). The RAL terms
    of a class add up to J_c · Σ_{i∈c} A_i, J_c its (shared) JSD: this is the weight the term acts with there."""
    valid = row_class >= 0
    ids = row_class[valid]
    A = advantages.double()[:, None].expand(row_class.shape)[valid]
    S = torch.zeros(int(ids.max()) + 1 if ids.numel() else 0, dtype=torch.float64, device=A.device)
    S.index_add_(0, ids, A)
    out = torch.zeros(row_class.shape, dtype=torch.float64, device=A.device)
    out[valid] = S[ids]
    return out


def silence_stats(row_class: torch.Tensor, advantages: torch.Tensor, group: torch.Tensor, tol: float = 1e-5) -> dict:
    """Where the RAL term can act (the zero-gradient trap), as shares of the response rows that sum to 1:
    `ral_rows_zero_var` (the group's rewards were all equal, so every A = 0), `ral_rows_cancelled` (other groups,
    |Σ_{i∈c} A_i| ≤ tol: the whole group shares the row, e.g. the first answer token's 'predicts' row) and
    `ral_rows_acting`; `ral_effective_weight` = Σ_c |Σ_{i∈c} A_i| / Σ_rows |A_i| (1: nothing cancels); and
    `rows_prefix_shared`, the share whose row another rollout shares (mostly with the same sign of A, so their
    terms add: this is not where the term is silent). Exact for a token-weighted loss whose class lies in one
    micro-batch; loss_norm=sequence (weights 1/|o_i|) or a class split across micro-batches cancels approximately.
    With exploration the rows also differ by each rollout's bias; these shares describe the unperturbed rows."""
    valid = row_class >= 0
    n = int(valid.sum())
    if n == 0:
        return {}
    A = advantages.double()
    zero_group = torch.zeros_like(A, dtype=torch.bool)
    for g in group.unique():
        m = group == g
        zero_group[m] = bool((A[m] == 0).all())
    zero = (zero_group[:, None] & valid)
    net = class_advantage(row_class, advantages).abs()
    acting = valid & ~zero & (net > tol)
    cancelled = valid & ~zero & ~acting
    ids = row_class[valid]
    size = torch.bincount(ids)[ids]
    total = (A.abs()[:, None] * valid).sum()
    # each class counted once: its rows share |Σ A|, so sum |Σ A| / class size over its rows
    eff = float((net[valid] / size).sum() / total) if total > 0 else 0.0
    return {"ral_rows_zero_var": float(zero.sum()) / n, "ral_rows_cancelled": float(cancelled.sum()) / n,
            "ral_rows_acting": float(acting.sum()) / n, "ral_effective_weight": eff,
            "rows_prefix_shared": float((size > 1).sum()) / n}


@torch.no_grad()
def make_rollouts(adapter, samples: list[dict], group_size: int, reward_model, spec: PolicySpec | None,
                  max_new_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                  adv_scale: str = "std", gen_model=None, explore: ExploreSpec | None = None,
                  vision_cache: bool = False, share_prompt="false") -> Rollouts:
    """Sample G completions per prompt and score them; fill old log-probs/attention under capture. With
    `explore`, each rollout samples under its own attention bias, which stays part of its state.

    `vision_cache`: each distinct image is encoded once for the whole step (generation, scoring, every update;
    valid while the vision path gets no gradient). `share_prompt` auto | true | false (with the cache): each
    group's prompt is prefilled once for sampling and computed once per pass in scoring and updates (not under an
    exploration bias, which differs per rollout; auto: where the prompt is long enough to repay it). Sampled tokens
    and old log-probs equal the plain path's (tests/test_step_sharing.py)."""
    G = group_size
    images = [s["image"] for s in samples for _ in range(G)]
    b = adapter.build_inputs(images, [s["question"] for s in samples for _ in range(G)])
    gm = gen_model if gen_model is not None else adapter.model
    was_training = gm.training
    gm.eval()
    bias = {}
    mi = b["model_inputs"]
    if explore is not None:
        bias = explore.sample_bias(adapter.visual_mask(mi["input_ids"]), mi["attention_mask"], adapter.num_heads)
    vision = image_rows = None
    if vision_cache:
        d = b["distinct"]  # build_inputs processed each distinct image once: the tower reads those pixels
        image_rows = d["rows"]
        vision = VisionCache.encode(adapter, d["images"], model=gm, tensors=d["tensors"])
    group = torch.arange(len(samples)).repeat_interleave(G)
    share = vision is not None and not bias and worth_sharing(share_prompt, mi["input_ids"].shape[1], max_new_tokens)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p)
    with capture(gm, layers=[], bias=bias):
        if share:
            comp = group_generate(adapter, mi, group, vision, image_rows, **kw, check_finite=True)
        else:
            comp = generate_answer(adapter, vision.model_inputs(mi, image_rows) if vision is not None else mi, **kw,
                                   check_finite=True)
    ro = rollouts_from_completions(adapter, samples, G, comp, reward_model, spec, adv_scale, gm, built=b,
                                   explore=explore, explore_bias=bias, temperature=temperature, vision=vision,
                                   image_rows=image_rows, share_prompt=share)
    gm.train(was_training)
    return ro


@torch.no_grad()
def rollouts_from_completions(adapter, samples, group_size, comp: torch.Tensor, reward_model, spec,
                              adv_scale: str = "std", model=None, built=None, explore: ExploreSpec | None = None,
                              explore_bias: dict | None = None, temperature: float = 1.0,
                              vision: VisionCache | None = None, image_rows: torch.Tensor | None = None,
                              share_prompt: bool = False) -> Rollouts:
    """Everything after sampling: mask through the first EOS, rewards, advantages, old log-probs (at the sampling
    `temperature`) and the old attention policy from one teacher-forced pass. `comp` is [N, T] with
    N = len(samples) · group_size."""
    G = group_size
    b = built or adapter.build_inputs([s["image"] for s in samples for _ in range(G)],
                                      [s["question"] for s in samples for _ in range(G)])
    mi = b["model_inputs"]
    P = mi["input_ids"].shape[1]
    model = model if model is not None else adapter.model
    eos = torch.tensor(adapter.eos_token_ids, device=comp.device)
    is_eos = torch.isin(comp, eos)
    after = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = ~after
    comp = comp.masked_fill(after, adapter.tokenizer.pad_token_id)
    tok = adapter.tokenizer
    texts = [tok.decode(c[m].tolist(), skip_special_tokens=True).strip() for c, m in zip(comp, mask)]
    group = torch.arange(len(samples), device=comp.device).repeat_interleave(G)
    inputs = adapter.extend_inputs(mi, comp, mask)
    ro = Rollouts(inputs=inputs, P=P, completion=comp, mask=mask, texts=texts, group=group, samples=samples,
                  temperature=temperature, vision=vision, share_prompt=share_prompt and vision is not None,
                  image_rows=None if image_rows is None else image_rows.to(comp.device))
    if reward_model is not None:
        scores = [reward_model(t, samples[int(g)]) for t, g in zip(texts, group.tolist())]
        ro.rewards = torch.tensor([s[0] for s in scores], dtype=torch.float32)
        ro.sub_rewards = {k: torch.tensor([s[1][k] for s in scores]) for k in scores[0][1]}
    else:
        ro.rewards = torch.zeros(len(texts))
    A, ro.zero_var_groups = group_advantages(ro.rewards, group.cpu(), adv_scale)
    ro.advantages = A.to(comp.device)
    ro.visual_keys = adapter.visual_mask(inputs["input_ids"])
    ro.target_keys = target_key_weights(ro.visual_keys, b["geometry"], [samples[int(g)] for g in group.tolist()])
    if spec is not None:
        ro.key_valid = key_validity(inputs, ro.visual_keys, P, comp.shape[1], spec.support)
        ro.row_class = prefix_classes(comp, mask, group, spec.row)
    ro.explore_bias = explore_bias or {}
    r = forward_policies(model, ro, spec, explore)
    ro.old_logp, ro.old_attn, ro.ground_attn = r["logp"], r["attn"], r["ground"]
    ro.explored_attn, ro.natural_attn_old = r["explored"], r["natural"]
    score_grounding(ro, adapter, reward_model, adv_scale)  # attention rewards and targets need the pass above
    return ro


def attention_stats(attn: list[torch.Tensor], ro: Rollouts) -> dict:
    """Entropy, visual mass and (with target masks) on-target mass of the policy rows, over response tokens."""
    if not attn:
        return {}
    m = ro.mask.float()
    p = torch.stack([a.mean(1) for a in attn]).mean(0)  # [N, T, K]
    ent = entropy(p)
    vis = (p * ro.visual_keys[:, None, :].float()).sum(-1)
    out = {"attn_entropy": float((ent * m).sum() / m.sum().clamp_min(1)),
           "attn_visual_mass": float((vis * m).sum() / m.sum().clamp_min(1))}
    if ro.target_keys is not None:
        tgt = (p * ro.target_keys[:, None, :]).sum(-1)
        out["attn_target_mass"] = float((tgt * m).sum() / m.sum().clamp_min(1))
    if ro.row_class is not None:
        out.update(silence_stats(ro.row_class, ro.advantages, ro.group))
    return out


def rollout_metrics(ro: Rollouts, spec: PolicySpec | None, explore: ExploreSpec | None) -> dict:
    """What a step's rollout batch says: reward (mean, std, each sub-reward), accuracy, advantages, groups without
    reward variance, response length; exploration's and the rollout policy's attention statistics (free: read
    from the rollout's own pass)."""
    out = {"reward": float(ro.rewards.mean()),
           "accuracy": float(ro.sub_rewards.get("exact_match", ro.rewards).mean()),
           "reward_std": float(ro.rewards.std()), "adv_abs_mean": float(ro.advantages.abs().mean()),
           "zero_var_groups": ro.zero_var_groups, "groups": len(ro.samples),
           "response_len": float(ro.mask.float().sum(1).mean()),
           **{f"reward_{k}": float(v.mean()) for k, v in ro.sub_rewards.items()}}
    if explore is not None:
        out.update(explore_stats(ro, explore))
    if spec is not None:
        out.update(attention_stats(ro.old_attn, ro))
    out.update(grounding_stats(ro))
    return out


@torch.no_grad()
def attention_moved(model, ro: Rollouts, spec: PolicySpec, explore: ExploreSpec | None) -> float:
    """JSD(updated ‖ rollout policy) on the same rows, over response tokens: how far a step's updates moved the
    attention (one extra forward)."""
    attn_new = forward_policies(model, ro, spec, explore)["attn"]
    d = torch.stack([jsd(a, b).mean(1) for a, b in zip(attn_new, ro.old_attn)]).mean(0)
    return float(aggregate(d, ro.mask, "token"))


def explore_stats(ro: Rollouts, spec: ExploreSpec) -> dict:
    """σ, mean |b| on perturbed keys, JSD(explored ‖ natural) at rollout time, natural on-target mass at the
    decisive row and the correlation of explored on-target mass with reward."""
    out = {"explore_sigma": spec.sigma}
    if ro.explore_bias:
        b = torch.stack([v.abs().mean(dim=(1, 2)) for v in ro.explore_bias.values()]).mean(0)  # [N, P]
        nz = torch.stack([(v != 0).float().mean(dim=(1, 2)) for v in ro.explore_bias.values()]).mean(0)
        out["explore_bias_abs"] = float(b.sum() / nz.sum().clamp_min(1))
    if ro.explored_attn:
        d = torch.stack([jsd(a, n).mean(1) for a, n in zip(ro.explored_attn, ro.natural_attn_old)]).mean(0)
        out["explore_jsd_natural"] = float(aggregate(d, ro.mask, "token"))
        if ro.target_keys is not None:
            ex = torch.stack([a.mean(1)[:, 0] for a in ro.explored_attn]).mean(0)  # decisive row [N, K]
            nat = torch.stack([a.mean(1)[:, 0] for a in ro.natural_attn_old]).mean(0)
            tm_ex = (ex * ro.target_keys).sum(-1)
            out["natural_target_mass_decisive"] = float((nat * ro.target_keys).sum(-1).mean())
            if tm_ex.std() > 1e-12 and ro.rewards.std() > 1e-12:
                out["explore_target_reward_corr"] = float(torch.corrcoef(torch.stack([tm_ex.cpu(), ro.rewards]))[0, 1])
    return out
