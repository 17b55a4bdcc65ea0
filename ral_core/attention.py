"""Attention capture that keeps SDPA.

One attention function is registered with transformers under the name ``ral_capture``. It runs the normal
SDPA kernel for every layer, and for the layers being captured it also computes softmax(QKᵀ·scale + mask)
for the requested query rows only, in fp32 and with gradients. The query/key it receives are after RoPE /
M-RoPE and q/k norms, so it is family-agnostic. No L×L matrix is materialised for any layer.

It can also add a bias to the attention logits of chosen layers (steering / exploration); the bias then
changes the forward pass itself, not only the captured rows.
"""
from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ral_core.errors import RALError

IMPL = "ral_capture"


class _Maps(dict):
    """layer → captured rows; `.natural` holds the bias-free rows of biased layers; `.rows_cpu_s` the process CPU
    seconds spent computing the rows, capture's own cost next to the SDPA forward (benchmarks read it)."""
    natural: dict
    rows_cpu_s: float = 0.0


@dataclass
class _State:
    layers: dict[int, int]                   # id(attention module) -> layer index
    rows: torch.Tensor | None                # [B, R] absolute query positions, None = every row
    maps: "_Maps" = field(default_factory=lambda: _Maps())
    bias: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> additive logits bias
    bias_layers: dict[int, int] = field(default_factory=dict)  # modules with a bias or a head scale
    head_scale: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H] multiplier of each head's output
    natural: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> rows without the bias


_STATE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("ral_capture_state", default=None)


def _keep_mask(attention_mask, rows, q_len, k_len, batch, device):
    """Boolean [B, 1|H, R, Lk] 'may attend' mask for the chosen rows."""
    if attention_mask is None:
        # sdpa_mask returns None when the pattern is purely causal: rebuild it for our rows.
        q_pos = rows + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, None, :] <= q_pos[:, :, None])[:, None]
    m = attention_mask
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    m = m.expand(batch, m.shape[1], q_len, k_len)
    idx = rows[:, None, :, None].expand(batch, m.shape[1], rows.shape[1], k_len)
    return m.gather(2, idx)


def _fit_bias(bias, k_len):
    """A bias over the first keys (e.g. the prompt) applies unchanged as the sequence grows."""
    if bias.shape[-1] < k_len:
        bias = torch.nn.functional.pad(bias, (0, k_len - bias.shape[-1]))
    return bias[..., :k_len]


def _row_probs(module, query, key, attention_mask, scaling, rows, bias):
    # fp32 rows also under bf16 autocast (mixed-precision training), where matmul would otherwise run in bf16
    with torch.autocast(query.device.type, enabled=False):
        return _row_probs_fp32(module, query, key, attention_mask, scaling, rows, bias)


def _row_probs_fp32(module, query, key, attention_mask, scaling, rows, bias):
    B, H, Lq, D = query.shape
    k_len = key.shape[2]
    if rows is None:
        rows = torch.arange(Lq, device=query.device)[None].expand(B, Lq)
    rows = rows.to(query.device)
    q = query.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], D))
    k = repeat_kv(key, H // key.shape[1])
    scale = scaling if scaling is not None else D ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        bias = _fit_bias(bias, k_len)
        b = bias.expand(B, H, Lq, k_len) if bias.shape[2] == Lq else bias.expand(B, H, 1, k_len)
        if b.shape[2] == Lq:
            b = b.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], k_len))
        scores = scores + b.float()
    keep = _keep_mask(attention_mask, rows, Lq, k_len, B, query.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)  # [B, H, R, Lk] fp32


def _biased_mask(attention_mask, bias, query, key):
    """Fold an additive logits bias into the SDPA mask (building the causal part when HF passed None)."""
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    dtype = query.dtype
    if attention_mask is None:
        pos = torch.arange(Lq, device=query.device) + (Lk - Lq)
        keep = torch.arange(Lk, device=query.device)[None, :] <= pos[:, None]
        attention_mask = keep[None, None]
    if attention_mask.dtype == torch.bool:
        add = torch.zeros(attention_mask.shape, dtype=dtype, device=query.device)
        add = add.masked_fill(~attention_mask, torch.finfo(dtype).min)
    else:
        add = attention_mask.to(dtype)
    return add + _fit_bias(bias, Lk).to(dtype)


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    st = _STATE.get()
    if st is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    mid = id(module)
    layer = st.layers.get(mid, st.bias_layers.get(mid))
    bias = st.bias.get(layer) if layer is not None and mid in st.bias_layers else None
    sdpa_mask_in = attention_mask
    if bias is not None:
        sdpa_mask_in = _biased_mask(attention_mask, bias, query, key)
        kwargs = {**kwargs, "is_causal": False}
    out = sdpa_attention_forward(module, query, key, value, sdpa_mask_in, scaling=scaling, dropout=dropout, **kwargs)
    scale = st.head_scale.get(layer) if mid in st.bias_layers else None
    if scale is not None:  # [B, Lq, H, D] before the output projection: a head's whole contribution (ral_core/causal.py)
        out = (out[0] * scale.to(out[0].dtype)[:, None, :, None], *out[1:])
    if mid in st.layers:
        c0 = time.process_time()
        st.maps[layer] = _row_probs(module, query, key, attention_mask, scaling, st.rows, bias)
        if bias is not None:
            # the unperturbed attention of the same layer inputs (what exploration pulls toward its targets)
            st.natural[layer] = _row_probs(module, query, key, attention_mask, scaling, st.rows, None)
        st.maps.rows_cpu_s += time.process_time() - c0
    return out


AttentionInterface.register(IMPL, capture_attention_forward)
AttentionMaskInterface.register(IMPL, sdpa_mask)


def unwrap(model):
    """The transformers model under DDP / accelerate / peft wrappers (module identity is what capture keys on)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_attention_modules(model) -> list[torch.nn.Module | None]:
    """The self-attention module of every language-model decoder layer, in layer order; None for layers without
    softmax attention (the linear-attention layers of hybrid models such as Qwen3.5)."""
    model = unwrap(model)
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("language_model", "text_model"):
        if hasattr(lm, attr):
            lm = getattr(lm, attr)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return [getattr(layer, "self_attn", None) for layer in layers]


def enable_capture(model) -> None:
    """Switch the language model to the capture-capable SDPA function (the vision tower keeps its own)."""
    model = unwrap(model)
    text_cfg = model.config.get_text_config()
    if getattr(text_cfg, "_attn_implementation", None) == IMPL:
        return
    try:
        model.set_attn_implementation({"text_config": IMPL})
    except (TypeError, ValueError, KeyError):
        model.set_attn_implementation(IMPL)


def resolve_layers(spec, n_layers: int, attention_layers=None) -> list[int]:
    """'all' | 'last' | int | list of ints → sorted decoder-layer indices.

    `attention_layers` lists the layers with softmax attention (default: all `n_layers`); 'all' and 'last' resolve
    among them and negative ints count back through them (-1 = 'last'), so a hybrid model's linear-attention layers
    are never picked implicitly, and naming one is an error.
    """
    attn = list(range(n_layers)) if attention_layers is None else sorted(int(i) for i in attention_layers)
    if spec is None or spec == "all":
        return attn
    if spec == "last":
        return attn[-1:]
    if isinstance(spec, int):
        spec = [spec]
    out = []
    for s in spec:
        i = int(s)
        j = attn[i] if -len(attn) <= i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"layer {i} is out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
        if j not in attn:
            raise RALError(f"layer {j} is a linear-attention layer with no attention weights to capture; this model "
                           f"has softmax attention only in layers {', '.join(map(str, attn))}")
        out.append(j)
    return sorted(set(out))


@contextmanager
def capture(model, layers="last", rows: torch.Tensor | None = None, bias: dict[int, torch.Tensor] | None = None,
            head_scale: dict[int, torch.Tensor] | None = None):
    """Capture attention rows of chosen decoder layers during the forward passes inside the block.

    `rows` is a [B, R] LongTensor of absolute query positions (None: every row — only for short inputs).
    `bias` maps layer → additive logits bias broadcastable to [B, H, Lq, Lk]; it alters the forward.
    `head_scale` maps layer → [B, H] factors on each head's output before the output projection (0: knocked out).
    Yields a dict layer → [B, H, R, Lk] fp32 probabilities that keep the autograd graph; for biased
    layers the unbiased rows of the same pass are in `maps.natural[layer]`.
    """
    enable_capture(model)
    mods = decoder_attention_modules(model)
    attn = [i for i, m in enumerate(mods) if m is not None]
    idx = resolve_layers(layers, len(mods), attn)
    bias = bias or {}
    head_scale = head_scale or {}
    resolve_layers(list(bias) + list(head_scale), len(mods), attn)  # both act only through softmax attention
    st = _State(layers={id(mods[i]): i for i in idx}, rows=rows, bias=bias, head_scale=head_scale,
                bias_layers={id(mods[i]): i for i in {*bias, *head_scale}})
    token = _STATE.set(st)
    try:
        st.maps.natural = st.natural
        with _checkpointing_replays(model):
            yield st.maps
    finally:
        _STATE.reset(token)


@contextmanager
def paused():
    """No capture (and no bias) for the passes inside, e.g. a shared prompt pass whose rows nobody asked for."""
    token = _STATE.set(None)
    try:
        yield
    finally:
        _STATE.reset(token)


# ---- gradient checkpointing ------------------------------------------------------------------------------------
@contextmanager
def _replay(st: _State | None):
    """During a checkpointed layer's recomputation: the capture state of the original forward again, so the
    recomputed pass applies the same biases and saves the same tensors (its rows go to a throwaway dict: the
    rows the caller holds stay those of the original forward, and their gradients flow through the recompute)."""
    if st is None:
        token = _STATE.set(None)
    else:
        token = _STATE.set(_State(layers=st.layers, rows=st.rows, bias=st.bias, bias_layers=st.bias_layers,
                                  head_scale=st.head_scale))
    try:
        yield
    finally:
        _STATE.reset(token)


def checkpoint_context():
    """`context_fn` for torch.utils.checkpoint (non-reentrant): forward as is, recomputation under `_replay`."""
    return nullcontext(), _replay(_STATE.get())


@contextmanager
def _checkpointing_replays(model):
    """While capturing, layers under gradient checkpointing recompute with `checkpoint_context` (however the
    checkpointing was switched on: transformers, TRL, accelerate). Reentrant checkpointing runs the first forward
    without autograd, so rows captured there could carry no gradient: refused while gradients are on."""
    mods = [m for m in unwrap(model).modules()
            if getattr(m, "gradient_checkpointing", False) and callable(getattr(m, "_gradient_checkpointing_func", None))
            and not getattr(m._gradient_checkpointing_func, "_ral_replays", False)]
    if mods and torch.is_grad_enabled() and any(
            getattr(m._gradient_checkpointing_func, "keywords", {}).get("use_reentrant") for m in mods):
        raise RALError("attention capture needs non-reentrant gradient checkpointing: enable it with "
                       "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default), or "
                       "call ral_core.attention.enable_gradient_checkpointing(model)")
    saved = [m._gradient_checkpointing_func for m in mods]
    for m, fn in zip(mods, saved):
        def replaying(function, *args, _fn=fn, **kwargs):
            return _fn(function, *args, context_fn=checkpoint_context, **kwargs)
        replaying._ral_replays = True
        m._gradient_checkpointing_func = replaying
    try:
        yield
    finally:
        for m, fn in zip(mods, saved):
            m._gradient_checkpointing_func = fn


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing, the kind capture supports: while a `capture` block is open its layers
    recompute under the capture state, so rows, biases and gradients equal those of the unchecked pass."""
    unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
