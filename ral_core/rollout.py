"""Group rollouts: G samples per prompt, rewards, group-normalised advantages, and the rollout policy's
token log-probs and attention from one no-grad teacher-forced pass under capture (never from generate())."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ral_core.attention import capture
from ral_core.inspection import generate_answer
from ral_core.losses import attention_policy, entropy, token_logprobs
from ral_core.prefix_share import group_generate, shared_prompt_forward, shares_with_grad, worth_sharing
from ral_core.vision_cache import VisionCache, distinct_images


@dataclass
class PolicySpec:
    """Which attention rows form the policy (DESIGN.md §1)."""

    layers: list[int]
    row: str = "own"         # own: the query at token t, self removed (paper) · predicts: the query at t−1
    support: str = "all"     # all earlier positions · visual: visual tokens only, renormalised
    per_head: bool = False


@dataclass
class ExploreSpec:
    """Attention exploration: per rollout, a bias b ~ N(0, σ²) on the attention logits of `layers` toward the
    visual keys (or all prompt keys), shared across heads or per head, added to every generated row."""

    layers: list[int]
    sigma: float = 1.0
    per_head: bool = False
    keys: str = "visual"     # visual | all
    row: str = "predicts"    # rows the exploration term acts on (predicts includes the first-token decision)
    support: str = "all"

    def sample_bias(self, visual: torch.Tensor, prompt_mask: torch.Tensor, n_heads: int, generator=None) -> dict:
        """layer → [N, H|1, 1, P] bias over prompt keys (zero on pads and, with keys=visual, on text)."""
        if self.sigma <= 0:
            return {}  # inert: no bias and no random draws, so σ = 0 is exactly the run without exploration
        N, P = visual.shape
        allowed = (visual if self.keys == "visual" else prompt_mask.bool()).float()
        out = {}
        for layer in self.layers:
            h = n_heads if self.per_head else 1
            b = torch.randn((N, h, 1, P), generator=generator) * self.sigma
            out[layer] = b.to(visual.device) * allowed[:, None, None, :]
        return out


@dataclass
class Rollouts:
    inputs: dict                 # model inputs of prompt + completion, [N, P+T]
    P: int
    completion: torch.Tensor     # [N, T]
    mask: torch.Tensor           # [N, T] response tokens (through the first EOS)
    texts: list[str]
    group: torch.Tensor          # [N] prompt index
    samples: list[dict]          # one per prompt
    rewards: torch.Tensor = None
    sub_rewards: dict = field(default_factory=dict)
    advantages: torch.Tensor = None
    old_logp: torch.Tensor = None
    old_attn: list = field(default_factory=list)
    ref_logp: torch.Tensor = None
    teacher_attn: list = field(default_factory=list)
    teacher_logits: torch.Tensor = None
    key_valid: torch.Tensor = None   # [N, T, K]
    visual_keys: torch.Tensor = None  # [N, K]
    row_class: torch.Tensor = None    # [N, T] prefix class of each response row (prefix_classes), −1 off the response
    temperature: float = 1.0          # the sampling temperature: every log-prob of the loss is taken under it
    target_keys: torch.Tensor = None  # [N, K] overlap of each key with the sample's target boxes
    explore_bias: dict = field(default_factory=dict)  # layer -> [N, H|1, 1, P] (the sampled perturbation)
    explored_attn: list = field(default_factory=list)  # behaviour attention p̃ at the explore layers
    natural_attn_old: list = field(default_factory=list)  # the same rows without the bias
    zero_var_groups: int = 0
    vision: VisionCache | None = None   # each distinct image's features, encoded once this step (issue 13)
    image_rows: torch.Tensor = None     # [N] each sequence's image among `vision`'s
    share_prompt: bool = False          # teacher-forced passes compute each group's prompt once (prefix_share)

    def select(self, idx: torch.Tensor) -> "Rollouts":
        """A mini-batch of sequences (all tensors indexed on dim 0)."""
        def pick(v):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(self.group):
                return v[idx]
            if isinstance(v, list) and v and torch.is_tensor(v[0]):
                return [x[idx] for x in v]
            if isinstance(v, dict) and v and all(torch.is_tensor(x) for x in v.values()):
                return {k: x[idx] for k, x in v.items()}
            return v
        inputs = {k: pick(v) for k, v in self.inputs.items()}
        inputs.update(_select_images(self.inputs, idx))
        fields = {k: pick(getattr(self, k)) for k in self.__dataclass_fields__ if k != "inputs"}
        fields["texts"] = [self.texts[i] for i in idx.tolist()]
        return Rollouts(inputs=inputs, **fields)


def _select_images(inputs: dict, idx: torch.Tensor) -> dict:
    """Qwen packs every image's patches into one [sum patches, D] tensor: select per sequence."""
    if "image_grid_thw" not in inputs:
        return {}
    counts = inputs["image_grid_thw"].prod(-1)
    starts = torch.cumsum(counts, 0) - counts
    pv = torch.cat([inputs["pixel_values"][starts[i]:starts[i] + counts[i]] for i in idx.tolist()])
    return {"pixel_values": pv, "image_grid_thw": inputs["image_grid_thw"][idx]}


def target_key_weights(visual: torch.Tensor, geometries, samples) -> torch.Tensor | None:
    """[N, K]: for visual keys, the fraction of the token's rectangle inside any target box; else 0."""
    if not any(s.get("boxes") for s in samples):
        return None
    w = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
    for i, (geo, s) in enumerate(zip(geometries, samples)):
        if not s.get("boxes"):
            continue
        ov = torch.tensor(max_overlap(geo, s["boxes"]), dtype=torch.float32, device=visual.device)
        w[i, visual[i]] = ov
    return w


def max_overlap(geometry, boxes):
    import numpy as np
    return np.max([geometry.box_overlap(b) for b in boxes], axis=0)


def key_validity(inputs: dict, visual: torch.Tensor, P: int, T: int, support: str) -> torch.Tensor:
    """[N, T, K] keys the policy row of response token t may put mass on: real (not pad) keys before the token's
    position P + t (DESIGN.md §1). For the 'own' row (query at P + t) that drops its self entry, the paper's
    formula; the 'predicts' row (query at P + t − 1) keeps every key it sees, itself included."""
    K = inputs["input_ids"].shape[1]
    pos = torch.arange(T, device=visual.device) + P
    earlier = torch.arange(K, device=visual.device)[None, None, :] < pos[None, :, None]
    valid = earlier & inputs["attention_mask"].bool()[:, None, :]
    if support == "visual":
        valid = valid & visual[:, None, :]
    return valid


def forward_policies(model, ro: Rollouts, spec: PolicySpec | None, explore: "ExploreSpec | None" = None,
                     need_logits: bool = False, use_bias: bool = True) -> dict:
    """One teacher-forced pass over prompt + completion. Captures rows P−1 … P+T−1 of every needed layer once
    and derives: `logp` [N, T] of the sampled tokens under the sampling temperature, `logits` (divided by it),
    `attn` (the RAL/OPAD policy per spec layer), and with exploration `explored` (rows under the rollout's bias)
    and `natural` (the same rows without it)."""
    N, T = ro.completion.shape
    P = ro.P
    dev = ro.completion.device
    layers = sorted(set(spec.layers if spec else []) | set(explore.layers if explore else []))
    bias = ro.explore_bias if (explore is not None and use_bias and ro.explore_bias) else None
    cached = ro.vision is not None and ro.vision.serves(model)
    if cached and ro.share_prompt and bias is None and (not torch.is_grad_enabled() or shares_with_grad(model)):
        # each group's prompt once; this pass holds positions P−1 … P+T−1, so rows and kept logits count from P−1
        rows = torch.arange(T + 1, device=dev)[None].expand(N, T + 1)
        with capture(model, layers=layers, rows=rows) as maps:
            out = shared_prompt_forward(model, ro.inputs, ro.group, P, ro.vision, ro.image_rows,
                                        keep=torch.arange(T, device=dev))
    else:
        rows = torch.arange(P - 1, P + T, device=dev)[None].expand(N, T + 1)
        # logits only for the T rows that predict the response (P−1 … P+T−2), not [N, P+T, vocab]; no KV cache
        keep = torch.arange(P - 1, P + T - 1, device=dev)
        inputs = ro.vision.model_inputs(ro.inputs, ro.image_rows) if cached else ro.inputs
        with capture(model, layers=layers, rows=rows, bias=bias) as maps:
            out = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()
    # the policy that sampled is softmax(logits / T): the ratio, the KL and the gradient must refer to it (as TRL's)
    res = {"logp": token_logprobs(logits, ro.completion, ro.temperature),
           "logits": logits / ro.temperature if need_logits else None, "attn": [], "explored": [], "natural": []}

    def policy(m, s):
        sel = m[:, :, 1:] if s.row == "own" else m[:, :, :-1]
        return attention_policy(sel, key_validity(ro.inputs, ro.visual_keys, P, T, s.support), s.per_head)
    if spec is not None:
        res["attn"] = [policy(maps[layer], spec) for layer in spec.layers]
    if explore is not None:
        res["explored"] = [policy(maps[layer], explore) for layer in explore.layers]
        res["natural"] = [policy(maps.natural.get(layer, maps[layer]), explore) for layer in explore.layers]
    return res


def policy_forward(model, rollouts: Rollouts, spec: PolicySpec | None, need_logits: bool = False):
    """(log-probs [N, T], attention policy per spec layer [N, H|1, T, K], logits [N, T, V] or None)."""
    r = forward_policies(model, rollouts, spec, need_logits=need_logits)
    return r["logp"], r["attn"], r["logits"]


def prefix_classes(completion: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, row: str) -> torch.Tensor:
    """[N, T] id of each response row's prefix class (−1 off the response). The attention row of token t is a
    function of the prompt and the prefix its query sees: tokens ≤ t for the 'own' row (its query is token t),
    tokens < t for the 'predicts' row (query t − 1; at t = 0 the prompt alone, shared by the whole group). Rows of
    one group with the same such prefix are one row, shared."""
    N, T = completion.shape
    off = 1 if row == "own" else 0
    seqs, m, g = completion.tolist(), mask.bool().tolist(), group.tolist()
    ids: dict = {}
    out = torch.full((N, T), -1, dtype=torch.long)
    for i in range(N):
        for t in range(T):
            if m[i][t]:
                out[i, t] = ids.setdefault((g[i], tuple(seqs[i][:t + off])), len(ids))
    return out.to(completion.device)


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
    """Where the RAL term can act (DESIGN.md §1), as shares of the response rows that sum to 1:
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
        uniq, image_rows = distinct_images(images)
        vision = VisionCache.encode(adapter, uniq, model=gm)
    group = torch.arange(len(samples)).repeat_interleave(G)
    share = vision is not None and not bias and worth_sharing(share_prompt, mi["input_ids"].shape[1], max_new_tokens)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p)
    with capture(gm, layers=[], bias=bias):
        if share:
            comp = group_generate(adapter, mi, group, vision, image_rows, **kw)
        else:
            comp = generate_answer(adapter, vision.model_inputs(mi, image_rows) if vision is not None else mi, **kw)
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
    ro.old_logp, ro.old_attn = r["logp"], r["attn"]
    ro.explored_attn, ro.natural_attn_old = r["explored"], r["natural"]
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
