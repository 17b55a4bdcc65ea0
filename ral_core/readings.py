"""Readings of one inspection that do not intervene: visual attention sinks and the logit lens over image tokens.

- **Sinks** (`detect_sinks`): Gu et al. 2025, "When Attention Sink Emerges in Language Models: An Empirical View"
  (ICLR 2025), score a token k by the share of (layer, head) pairs whose mean attention on k exceeds ε (ε = 0.3 in
  the paper). We apply that rule to the visual tokens, with the captured answer rows as the queries: a visual token
  is a sink when more than `min_share` of the captured heads give it more than ε of their row on average. The step
  metric `attn_sink_share` (ral_core/grounding.py) is a different, positional rule (mass on the first real token);
  the two are not interchangeable. `without_sinks` renormalises a map over the other visual tokens.
- **Logit lens** (`logit_lens`): each decoder layer's hidden state at the visual tokens through the final norm and
  the LM head. The causal checks that do intervene are in ral_core/causal.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ral_core.attention import capture, unwrap
from ral_core.errors import RALError

SINK_EPS = 0.3                 # Gu et al. 2025's ε: a head "sinks" into a token that takes more than this of its row
SINK_MIN_SHARE = 0.5           # a token is a sink when more than this share of the captured heads do so


# ---- sinks ----------------------------------------------------------------------------------------------------------
@dataclass
class Sinks:
    tokens: list[int]             # visual-token indices flagged as sinks
    share: np.ndarray             # [Nv] share of captured (layer, head) pairs that put more than ε on the token
    eps: float
    min_share: float

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "share": np.asarray(self.share).tolist(), "eps": self.eps,
                "min_share": self.min_share}

    @classmethod
    def from_dict(cls, d: dict) -> "Sinks":
        return cls(list(d["tokens"]), np.asarray(d["share"], np.float64), float(d["eps"]), float(d["min_share"]))


def detect_sinks(result, eps: float = SINK_EPS, min_share: float = SINK_MIN_SHARE, row: str = "predicts") -> Sinks:
    """Visual sink tokens of an InspectionResult (module docstring: Gu et al. 2025's rule on the answer rows): per
    captured layer and head, the mean attention of the answer rows on each visual token; a token is a sink when more
    than `min_share` of the (layer, head) pairs put more than `eps` on it."""
    if not 0 < eps < 1 or not 0 <= min_share < 1:
        raise RALError("sink thresholds: ε must lie in (0, 1) and the share of heads in [0, 1)")
    v = np.asarray(result.visual[:, :, result._rows("mean", row)], np.float64).mean(axis=2)  # [nL, H, Nv]
    share = (v > eps).reshape(-1, v.shape[-1]).mean(axis=0)
    return Sinks(tokens=[int(i) for i in np.flatnonzero(share > min_share)], share=share, eps=eps, min_share=min_share)


def without_sinks(values: np.ndarray, sinks) -> np.ndarray:
    """A map with the sink tokens removed and the rest rescaled to the map's total: where the attention that did not
    go into the sinks went, on the same scale as the raw map."""
    v = np.asarray(values, np.float64).copy()
    idx = list(sinks.tokens if isinstance(sinks, Sinks) else sinks)
    total = v.sum()
    v[idx] = 0.0
    rest = v.sum()
    return v * (total / rest) if rest > 0 else v


# ---- logit lens over the image tokens ----------------------------------------------------------------------------
@dataclass
class LogitLens:
    """Each decoder layer's hidden state at every visual token read through the final norm and the LM head
    (nostalgebraist 2020, "interpreting GPT: the logit lens"): the token it is closest to saying, per patch."""
    layers: list[int]
    top_ids: np.ndarray           # [n_layers, Nv] top token per visual token
    top_prob: np.ndarray          # [n_layers, Nv] its probability
    words: list[list[str]]        # [n_layers][Nv] the top tokens as text

    def to_dict(self) -> dict:
        return {"layers": self.layers, "top_ids": self.top_ids.tolist(), "top_prob": self.top_prob.tolist(),
                "words": self.words}

    @classmethod
    def from_dict(cls, d: dict) -> "LogitLens":
        return cls(list(d["layers"]), np.asarray(d["top_ids"], np.int64), np.asarray(d["top_prob"], np.float64),
                   [list(w) for w in d["words"]])


def _text_model(model):
    """The language model (its `layers` and final `norm`) under a VLM wrapper."""
    lm = unwrap(model)
    lm = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    for attr in ("language_model", "text_model"):
        lm = getattr(lm, attr, lm)
    return lm


def logit_lens(adapter, image, question: str, layers=None) -> LogitLens:
    """The logit lens at the visual tokens of the prompt for `layers` (default: every decoder layer, linear-attention
    ones included). The last layer's lens is the model's own next-token distribution at those positions."""
    model = adapter.model
    lm = _text_model(model)
    n = len(lm.layers)
    idx = set()
    for layer in range(n) if layers is None else layers:
        j = int(layer) + n if int(layer) < 0 else int(layer)
        if not 0 <= j < n:
            raise RALError(f"logit-lens layer {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
        idx.add(j)
    idx = sorted(idx)
    mi = adapter.build_inputs([image], [question])["model_inputs"]
    vis = adapter.visual_mask(mi["input_ids"][0])
    kept: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_m, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            kept[i] = h[0, vis].detach()
        return hook
    hooks = [lm.layers[i].register_forward_hook(keep(i)) for i in idx]
    try:
        with torch.no_grad(), capture(model, layers=[]):  # no capture asked: the forward as inspect runs it
            model(**mi, logits_to_keep=1, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    head = model.get_output_embeddings()
    cap = getattr(adapter.text_config, "final_logit_softcapping", None)
    ids, probs = [], []
    with torch.no_grad():
        for i in idx:
            logits = head(lm.norm(kept[i])).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            p, t = torch.softmax(logits, -1).max(-1)
            ids.append(t.cpu().numpy())
            probs.append(p.cpu().double().numpy())
    tok = adapter.tokenizer
    top = np.stack(ids)
    return LogitLens(layers=idx, top_ids=top, top_prob=np.stack(probs),
                     words=[[tok.decode([int(v)]) for v in row] for row in top])
