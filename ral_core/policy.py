"""The attention policy: which rows form it (`PolicySpec`), exploration's bias on it (`ExploreSpec`), the rollout
batch it is read from (`Rollouts`), the keys each row may weigh (`key_validity`), the distribution itself
(`attention_policy`) and the teacher-forced pass that yields it with the token log-probs (`forward_policies`).

The policy row of response token t: a row of the chosen decoder layer(s), head-mean (or per head), over the
positions before t ('own': the query at token t, self removed, the paper's row; 'predicts': the query at t − 1),
renormalised; support 'all' or 'visual' (docs/method.md). The grounded terms (grounding.py) may read other layers and
a subset of the heads (`ground_layers`, `ground_heads`) from the same capture; RAL's and OPAD's terms keep `layers`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ral_core.attention import capture, resolve_layers
from ral_core.errors import RALError
from ral_core.losses import EPS, token_logprobs
from ral_core.prefix_share import shared_prompt_forward, shares_with_grad
from ral_core.vision_cache import VisionCache


@dataclass
class PolicySpec:
    """Which attention rows form the policy (module docstring)."""

    layers: list[int]
    row: str = "own"         # own: the query at token t, self removed (paper) · predicts: the query at t−1
    support: str = "all"     # all earlier positions · visual: visual tokens only, renormalised
    per_head: bool = False
    ground_layers: list[int] | None = None  # the grounded terms' layers (None: `layers`)
    ground_heads: list[int] | None = None   # the heads whose mean they read (None: all)

    @property
    def capture_layers(self) -> list[int]:
        return sorted(set(self.layers) | set(self.ground_layers or ()))


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
    ground_attn: list = field(default_factory=list)  # the rollout policy's rows as the grounded terms read them
    ref_logp: torch.Tensor = None
    teacher_attn: list = field(default_factory=list)
    teacher_logits: torch.Tensor = None
    key_valid: torch.Tensor = None   # [N, T, K]
    visual_keys: torch.Tensor = None  # [N, K]
    row_class: torch.Tensor = None    # [N, T] prefix class of each response row (prefix_classes), −1 off the response
    temperature: float = 1.0          # the sampling temperature: every log-prob of the loss is taken under it
    target_keys: torch.Tensor = None  # [N, K] overlap of each key with the sample's target boxes
    ground: dict = field(default_factory=dict)  # attention target term: box target [N, K] and weight [N] (grounding)
    explore_bias: dict = field(default_factory=dict)  # layer -> [N, H|1, 1, P] (the sampled perturbation)
    explored_attn: list = field(default_factory=list)  # behaviour attention p̃ at the explore layers
    natural_attn_old: list = field(default_factory=list)  # the same rows without the bias
    zero_var_groups: int = 0
    vision: VisionCache | None = None   # each distinct image's features, encoded once this step
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


def max_overlap(geometry, boxes):
    """Per visual token, the largest fraction of its rectangle inside one of `boxes`."""
    return np.max([geometry.box_overlap(b) for b in boxes], axis=0)


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


def key_validity(inputs: dict, visual: torch.Tensor, P: int, T: int, support: str) -> torch.Tensor:
    """[N, T, K] keys the policy row of response token t may put mass on: real (not pad) keys before the token's
    position P + t. For the 'own' row (query at P + t) that drops its self entry, the paper's formula; the
    'predicts' row (query at P + t − 1) keeps every key it sees, itself included."""
    K = inputs["input_ids"].shape[1]
    pos = torch.arange(T, device=visual.device) + P
    earlier = torch.arange(K, device=visual.device)[None, None, :] < pos[None, :, None]
    valid = earlier & inputs["attention_mask"].bool()[:, None, :]
    if support == "visual":
        valid = valid & visual[:, None, :]
    return valid


def attention_policy(rows: torch.Tensor, key_valid: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Captured rows [N, H, T, K] → distributions [N, H|1, T, K] over `key_valid` [N, T, K] keys."""
    a = rows if per_head else rows.mean(dim=1, keepdim=True)
    a = a * key_valid[:, None].to(a.dtype)
    return a / a.sum(-1, keepdim=True).clamp_min(EPS)


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


def matched_layers(layers: list[int], student, teacher) -> list[int]:
    """Student layer indices → the teacher's layers at the same relative depth (last ↔ last), so OPAD compares
    like with like when the teacher is deeper. `student` / `teacher`: a layer count, or the list of layers with
    softmax attention (hybrid models), along which depth is then counted."""
    s = list(range(student)) if isinstance(student, int) else list(student)
    t = list(range(teacher)) if isinstance(teacher, int) else list(teacher)
    return [t[min(len(t) - 1, max(0, round((s.index(i) + 1) * len(t) / len(s)) - 1))] for i in layers]


def uses_grounding(cfg) -> bool:
    from ral_core.rewards import ATTENTION_REWARDS
    return cfg.lambda_ground > 0 or any(k in ATTENTION_REWARDS for k in cfg.reward_weights)


def ground_selection(cfg, adapter, layers: list[int], levers: Callable[[], list[int]] | None = None
                     ) -> tuple[list[int] | None, list[int] | None]:
    """(ground layers, ground heads) of a config, None where they are the policy's own (`layers`, all heads).
    `levers()`: the top layers of the causal-lever map (the trainer's probe, as for explore_layers=levers)."""
    gl, gh = getattr(cfg, "ground_layers", "policy"), getattr(cfg, "ground_heads", "mean")
    if gl == "policy":
        g_layers = None
    elif gl == "levers":
        if levers is None:
            raise RALError("ground_layers=levers needs the trainer's lever probe; name the layers instead, e.g. "
                           "ground_layers=[2, 3]")
        g_layers = levers()
    else:
        try:
            g_layers = resolve_layers(gl, adapter.num_layers, adapter.attention_layers)
        except ValueError as e:
            raise RALError(f"ground_layers: {e}") from None
    heads = None
    if gh != "mean":
        heads = sorted(int(h) for h in (gh if isinstance(gh, (list, tuple)) else [gh]))
        if heads[-1] >= adapter.num_heads:
            raise RALError(f"ground_heads: head {heads[-1]} is out of range: the model has {adapter.num_heads} "
                           f"attention heads (0..{adapter.num_heads - 1})")
        if len(heads) == adapter.num_heads:
            heads = None  # all of them: the plain head mean
    return (None if g_layers == layers else g_layers), heads


def policy_specs(cfg, adapter, teacher=None, levers: Callable[[], list[int]] | None = None
                 ) -> tuple[PolicySpec | None, PolicySpec | None]:
    """(the student's policy spec, the teacher's: the same rows at the matched depth), or Nones where the config
    neither trains nor logs attention. The grounded terms' own layers and heads (config ground_layers /
    ground_heads) are resolved only where a grounded term is on."""
    if not (cfg.uses_policy_attention or cfg.log_attention):
        return None, None
    spec = PolicySpec(resolve_layers(cfg.attn_layers, adapter.num_layers, adapter.attention_layers),
                      cfg.attn_row, cfg.attn_support, cfg.attn_per_head)
    if uses_grounding(cfg):
        spec.ground_layers, spec.ground_heads = ground_selection(cfg, adapter, spec.layers, levers)
    if teacher is None:
        return spec, spec
    if cfg.attn_per_head and teacher.num_heads != adapter.num_heads:
        raise RALError(f"attn_per_head needs a teacher with the student's {adapter.num_heads} heads "
                       f"(it has {teacher.num_heads}); set attn_per_head=false")
    # depth is matched along the softmax-attention layers
    return spec, dataclasses.replace(spec, layers=matched_layers(spec.layers, adapter.attention_layers,
                                                                 teacher.attention_layers),
                                     ground_layers=None, ground_heads=None)


def forward_policies(model, ro: Rollouts, spec: PolicySpec | None, explore: ExploreSpec | None = None,
                     need_logits: bool = False, use_bias: bool = True) -> dict:
    """One teacher-forced pass over prompt + completion. Captures rows P−1 … P+T−1 of every needed layer once
    and derives: `logp` [N, T] of the sampled tokens under the sampling temperature, `logits` (divided by it),
    `attn` (the RAL/OPAD policy per spec layer), `ground` (the rows the grounded terms read: `attn` itself unless
    the spec names its own layers or heads; then per ground layer [N, 1, T, K], the chosen heads' mean), and with
    exploration `explored` (rows under the rollout's bias) and `natural` (the same rows without it)."""
    N, T = ro.completion.shape
    P = ro.P
    dev = ro.completion.device
    layers = sorted(set(spec.capture_layers if spec else []) | set(explore.layers if explore else []))
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
           "logits": logits / ro.temperature if need_logits else None, "attn": [], "ground": [], "explored": [],
           "natural": []}

    def policy(m, s, heads=None):
        sel = m[:, :, 1:] if s.row == "own" else m[:, :, :-1]
        if heads is not None:
            sel = sel[:, heads]
        return attention_policy(sel, key_validity(ro.inputs, ro.visual_keys, P, T, s.support),
                                s.per_head and heads is None)
    if spec is not None:
        res["attn"] = [policy(maps[layer], spec) for layer in spec.layers]
        if spec.ground_layers is None and spec.ground_heads is None:
            res["ground"] = res["attn"]
        else:
            res["ground"] = [policy(maps[layer], spec, spec.ground_heads or list(range(maps[layer].shape[1])))
                             for layer in (spec.ground_layers or spec.layers)]
    if explore is not None:
        res["explored"] = [policy(maps[layer], explore) for layer in explore.layers]
        res["natural"] = [policy(maps.natural.get(layer, maps[layer]), explore) for layer in explore.layers]
    return res


@torch.no_grad()
def fill_references(ro: Rollouts, ref_model, teacher, teacher_spec: PolicySpec | None, need_logits: bool) -> None:
    """The frozen passes over a rollout batch: the KL reference's log-probs (`ref_model`: None without the KL term)
    and the teacher adapter's attention policy and logits (None without a teacher)."""
    if ref_model is not None:
        ro.ref_logp, _, _ = policy_forward(ref_model, _own_vision(ro, ref_model), None)
    if teacher is not None:
        _, ro.teacher_attn, ro.teacher_logits = policy_forward(teacher.model, _own_vision(ro, teacher.model),
                                                               teacher_spec, need_logits=need_logits)


def _own_vision(ro: Rollouts, model) -> Rollouts:
    """`ro` with image features as `model`'s tower gives them: the step's own where that tower is the student's
    (same module or weights), else `model`'s tower run once per distinct image rather than once per row (where it
    cannot run apart, `model` reads every row's pixels: `VisionCache.for_model`)."""
    if ro.vision is None or ro.vision.serves(model):
        return ro
    own = ro.vision.for_model(model)
    return ro if own is None else dataclasses.replace(ro, vision=own)


def policy_forward(model, rollouts: Rollouts, spec: PolicySpec | None, need_logits: bool = False):
    """(log-probs [N, T], attention policy per spec layer [N, H|1, T, K], logits [N, T, V] or None)."""
    r = forward_policies(model, rollouts, spec, need_logits=need_logits)
    return r["logp"], r["attn"], r["logits"]
