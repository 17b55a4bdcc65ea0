"""The prompt (image + question) computed once per group instead of once per rollout .

All G rollouts of a group share their prompt, so its keys and values in every layer are the same G times:
- `group_generate`: each group's prompt is prefilled once and its KV cache indexed out to the G samples, which
  then decode from it (transformers' `num_return_sequences` prefills G copies);
- `shared_prompt_forward`: the teacher-forced pass of the old-policy scoring and of every update. The prompt
  (all but its last token) runs once per distinct group in the batch, with gradient; its cache is indexed out to
  the rows (autograd sums the rows' gradients back into the one prompt pass) and each row runs only its last
  prompt token and its completion on top. The rows the attention terms use (queries P−1 … P+T−1) are exactly
  the queries of that second pass. This is the Prefix Grouper idea (arXiv 2506.05433) on transformers' own KV
  cache, so every family's attention code, masks and our capture run unchanged.

Both take the image features from a `VisionCache` (the prompt pass is where the image is read). Not shared (the
callers use full sequences): prompts under a per-rollout attention bias (exploration changes the prompt's hidden
states per rollout).
"""
from __future__ import annotations

import inspect

import torch

from ral_core.attention import decoder_attention_modules, paused, unwrap
from ral_core.generation import generate_answer

_STATE_DICTS = ("conv_states", "recurrent_states")  # linear-attention layers (Qwen3.5) keep recurrent state


SHARE_RATIO = 1  # share_prompt=auto shares a prompt at least as long as the answer budget (bench/results/train.md:
# on the digit model, 29-token prompts and 12 new tokens, a step was 1.15× faster with the image cache alone and
# 2.02× with shared prompts too)


def worth_sharing(mode, prompt_len: int, new_tokens: int) -> bool:
    """Whether to share prompts under `share_prompt` mode auto | true | false (a bool is taken as true/false).
    A shared pass costs a second model call per pass, which a prompt shorter than the answer does not repay."""
    mode = str(mode).lower()
    return mode == "true" or (mode == "auto" and prompt_len - 1 >= SHARE_RATIO * (new_tokens + 1))


def sharing_plan(vision_cache: bool, share_prompt: str, vision_frozen: bool, fsdp: bool,
                 explore: bool) -> tuple[bool, str, list[str]]:
    """What a run shares, from its config and setting: (image cache on, share_prompt mode, notes for the run log).
    The cache needs a vision path without gradient; under FSDP a shared prompt's KV cache would carry gradient
    into its layers around their outputs, where FSDP hooks the re-gather for backward, so each sequence computes
    its own prompt there (images are still encoded once)."""
    cache = vision_cache and vision_frozen
    mode = share_prompt if (cache and not fsdp) else "false"
    notes = []
    if vision_cache and not cache:
        notes.append("vision-feature cache off: the vision path is trained (freeze_vision=false), so every "
                     "pass encodes its images itself")
    if fsdp and share_prompt != "false":
        notes.append("dist=fsdp: each sequence computes its own prompt (a shared prompt's cache would carry "
                     "gradient past FSDP's re-gather hooks); images are still encoded once per step")
    if mode != "false" and explore:
        notes.append("exploration: each rollout's prompt runs under its own attention bias, so prompts are "
                     "not shared within a group (images are still encoded once)")
    return cache, mode, notes


def shares_with_grad(model) -> bool:
    """Whether a prompt pass can be shared under autograd. Not in hybrid models (Qwen3.5): their linear-attention
    layers update the cached recurrent state in place, which the backward pass of the rows on top still needs;
    there only no-grad passes (sampling, old-policy scoring) share the prompt. Nor under gradient checkpointing
    (transformers turns the cache off while training with it)."""
    if any(getattr(m, "gradient_checkpointing", False) for m in unwrap(model).modules()):
        return False  # a checkpointed layer recomputes in the backward and would append to the shared cache again
    return all(m is not None for m in decoder_attention_modules(model))


def groups_of(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct group, in order of first appearance; [N] index of each row's group in it)."""
    pos, first, inv = {}, [], []
    for i, x in enumerate(group.tolist()):
        if x not in pos:
            pos[x] = len(first)
            first.append(i)
        inv.append(pos[x])
    return torch.tensor(first, dtype=torch.long), torch.tensor(inv, dtype=torch.long)


def _seq_keys(inputs: dict) -> list[str]:
    """Per-token model inputs ([B, L, …]): input ids, attention mask, token types."""
    B, L = inputs["input_ids"].shape
    return [k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, L)]


def select_rows(inputs: dict, rows: torch.Tensor) -> dict:
    """Rows `rows` of pixel-free model inputs (per-row tensors indexed on dim 0, the rest as is)."""
    B = inputs["input_ids"].shape[0]
    return {k: (v[rows.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B else v)
            for k, v in inputs.items()}


def index_cache(cache, index: torch.Tensor) -> None:
    """Rows `index` of every layer's cached state, in place (repeats allowed; indexing keeps the autograd graph)."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            v = getattr(layer, name, None)
            if torch.is_tensor(v) and v.dim() > 0:
                setattr(layer, name, v[index.to(v.device)])
        for name in _STATE_DICTS:
            d = getattr(layer, name, None)
            if isinstance(d, dict):
                for k, v in d.items():
                    if torch.is_tensor(v):
                        d[k] = v[index.to(v.device)]


def rope_positions(model, inputs: dict):
    """The position ids a full forward of `inputs` uses where the model derives them from the whole sequence
    (Qwen's M-RoPE from the image grid); None where they follow the token index (the cache offset gives those)."""
    inner = getattr(unwrap(model), "model", None)
    if inner is None or not callable(getattr(inner, "compute_3d_position_ids", None)):
        return None
    params = inspect.signature(inner.compute_3d_position_ids).parameters
    kw = {k: inputs.get(k) for k in params
          if k not in ("self", "input_ids", "inputs_embeds", "attention_mask", "cache", "kwargs")}
    emb = torch.empty((*inputs["input_ids"].shape, 1), device=inputs["input_ids"].device)
    return inner.compute_3d_position_ids(input_ids=inputs["input_ids"], inputs_embeds=emb,
                                         attention_mask=inputs.get("attention_mask"), cache=None, **kw)


def prefix_cache(model, inputs: dict, vision, image_rows: torch.Tensor, first: torch.Tensor, upto: int,
                 positions=None):
    """KV cache of the first `upto` tokens of rows `first` (one per group), image features from `vision`."""
    pre = select_rows(vision.strip(inputs), first)
    seq = _seq_keys(pre)
    pre = {k: (v[:, :upto] if k in seq else v) for k, v in pre.items()}
    pre["mm_encoder_outputs"] = vision.outputs(image_rows[first.to(image_rows.device)])
    if positions is not None:
        pre["position_ids"] = positions[..., first.to(positions.device), :upto]
    with paused():  # the prompt's own rows are not captured (the rows asked for are in the pass on top)
        return model(**pre, use_cache=True, logits_to_keep=1).cache


@torch.no_grad()
def group_generate(adapter, model_inputs: dict, group: torch.Tensor, vision, image_rows: torch.Tensor,
                   **gen_kw) -> torch.Tensor:
    """Sample every row of `model_inputs` ([N, P]; rows of one group share their prompt) from one prefill per
    group. Returns [N, T] new tokens, as `generation.generate_answer`."""
    model = adapter.model
    first, inv = groups_of(group)
    P = model_inputs["input_ids"].shape[1]
    cache = prefix_cache(model, model_inputs, vision, image_rows, first, P - 1)
    index_cache(cache, inv)
    inner = getattr(unwrap(model), "model", None)
    if torch.is_tensor(getattr(inner, "rope_deltas", None)):  # M-RoPE offsets the decode steps read, per row
        inner.rope_deltas = inner.rope_deltas[inv.to(inner.rope_deltas.device)]
    dec = {k: model_inputs[k] for k in _seq_keys(model_inputs)}
    return generate_answer(adapter, {**dec, "cache": cache}, **gen_kw)


def shared_prompt_forward(model, inputs: dict, group: torch.Tensor, P: int, vision, image_rows: torch.Tensor,
                          keep: torch.Tensor | None = None):
    """Model output for `inputs` ([N, P+T]) with each group's first P−1 prompt tokens computed once. The output
    covers positions P−1 … P+T−1 only: capture rows and `keep` are relative to P−1."""
    first, inv = groups_of(group)
    positions = rope_positions(model, inputs)
    cache = prefix_cache(model, inputs, vision, image_rows, first, P - 1, positions)
    index_cache(cache, inv)
    seq = _seq_keys(inputs)
    cont = {k: (v if k == "attention_mask" else v[:, P - 1:]) for k, v in inputs.items() if k in seq}
    if positions is not None:
        cont["position_ids"] = positions[..., P - 1:]
    kw = {"logits_to_keep": keep} if keep is not None else {}
    return model(**cont, cache=cache, use_cache=True, **kw)
