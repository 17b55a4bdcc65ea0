"""Does this head matter? Causal checks beside the attention maps: head knock-out, region blocking and sinks.

A heatmap shows where a head looked, not whether that look produced the answer. These checks change the forward
pass itself, through the same registered attention function that capture uses (ral_core/attention.py), so every
family keeps its SDPA kernel: no eager switch, which changes some models' outputs on its own.

- **Head knock-out** (`knockout`): for every softmax-attention layer × head, the change in each answer token's
  log-probability (teacher-forced on the answer) when that head's output is zeroed before the output projection
  (`head_scale` 0 for that head in that layer, applied to the attention function's output). Zero-ablation rather
  than mean-ablation: one inspection has no data set to take a head's mean output over (a mean over the positions
  of the same sequence would keep part of the very signal being removed), and zero is exactly "the head's
  contribution removed" for every family (no family adds a bias after the heads are concatenated, and Qwen3.5's
  output gate multiplies the zero). Its known cost: a zero output is off the head's usual range, so an effect can be
  larger than under mean-ablation; read the grid as an upper bound on how much the answer needs the head.
  Batching: every row of a batch is one (layer, head) variant, each carrying its own per-layer [B, H] scale, so the
  full grid costs 1 + ⌈layers·heads / chunk⌉ forwards (chunk = heads by default: one forward of batch H per layer),
  against 1 + layers·heads for one forward per head. The image is encoded once (`VisionCache`) for all of them, and
  the layers before a chunk's first knocked-out layer run as one row that forks into the chunk's rows there (the
  variants are identical up to it), which halves the layer-forwards of the grid.
- **Region blocking** (`block_region`): the answer rows (the query that predicts each answer token and the answer
  tokens' own rows) may not attend to the visual tokens that see a box, in chosen layers: an additive −inf logits
  bias on those (row, key) pairs. Reports each answer token's log-probability change (teacher-forced) and the new
  greedy answer, decoded token by token under the same block.
- **Sinks** and the **logit lens** read a result without intervening: ral_core/readings.py (re-exported here).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ral_core.attention import capture
from ral_core.errors import RALError
from ral_core.limits import check_deadline
# sinks and the logit lens read a result without intervening; they live in readings.py and are part of this API
from ral_core.readings import (SINK_EPS, SINK_MIN_SHARE, LogitLens, Sinks, _text_model, detect_sinks,  # noqa: F401
                               logit_lens, without_sinks)

INTERVENTION = "zero"          # the head's output before the output projection is set to 0
CAUSAL_FILE = "causal.json"
FORMAT = "ral-causal/1"


# ---- scoring inputs ---------------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """One (image, question, answer) prepared once for many intervened forwards."""
    inputs: dict                  # one-row model inputs of prompt + answer
    prompt: dict                  # one-row model inputs of the prompt alone
    P: int                        # prompt length
    ids: list[int]                # answer ids
    vision: object | None         # VisionCache, or None (rows then carry their own pixels)
    adapter: object
    image: object
    question: str

    def batch(self, n: int) -> dict:
        """The same row n times."""
        if self.vision is not None:
            rows = {k: (v.expand(n, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 else v)
                    for k, v in self.vision.strip(self.inputs).items()}
            return self.vision.model_inputs(rows, torch.zeros(n, dtype=torch.long))
        if n == 1:
            return self.inputs
        b = self.adapter.build_inputs([self.image] * n, [self.question] * n)["model_inputs"]
        return _extend(self.adapter, b, [self.ids] * n)


def _extend(adapter, mi, ids_rows):
    dev = mi["input_ids"].device
    new = torch.tensor(ids_rows, dtype=torch.long, device=dev).reshape(len(ids_rows), -1)
    return adapter.extend_inputs(mi, new, torch.ones_like(new))


def _prepare(adapter, image, question: str, answer_ids: list[int]) -> _Scored:
    from ral_core.vision_cache import VisionCache

    if not answer_ids:
        raise RALError("the answer is empty; there is no answer token to score")
    mi = adapter.build_inputs([image], [question])["model_inputs"]
    full = _extend(adapter, mi, [list(answer_ids)])
    try:
        vision = VisionCache.encode(adapter, [image])
    except (AttributeError, ValueError, TypeError):
        vision = None  # a family whose features cannot be handed back: every row then encodes its own image
    return _Scored(full, mi, mi["input_ids"].shape[1], list(answer_ids), vision, adapter, image, question)


def _answer_logp(model, inputs: dict, ids: list[int]) -> torch.Tensor:
    """[B, T] log p of each answer token at the rows that predict it (the last T+1 positions, minus the last)."""
    T = len(ids)
    out = model(**inputs, logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :T].float()
    tgt = torch.tensor(ids, device=logits.device)[None, :, None].expand(logits.shape[0], T, 1)
    return torch.log_softmax(logits, -1).gather(-1, tgt).squeeze(-1)


def _tokens(adapter, ids):
    return [adapter.tokenizer.decode([int(v)]) for v in ids]


class _Deltas:
    """JSON round trip of a record whose arrays are `base_logp` and `delta` (lists on disk)."""

    def to_dict(self) -> dict:
        return {**asdict(self), "base_logp": self.base_logp.tolist(), "delta": self.delta.tolist()}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{**d, "base_logp": np.asarray(d["base_logp"], np.float64), "delta": cls._delta(d["delta"], d)})

    @staticmethod
    def _delta(v, d: dict) -> np.ndarray:
        return np.asarray(v, np.float64)


# ---- head knock-out -----------------------------------------------------------------------------------------------
@dataclass
class Knockout(_Deltas):
    """Δ log p of every answer token when one head is knocked out, for every captured layer × head."""
    layers: list[int]
    num_heads: int
    answer_ids: list[int]
    answer_tokens: list[str]
    base_logp: np.ndarray         # [T] log p of each answer token, no intervention
    delta: np.ndarray             # [n_layers, H, T] knocked-out minus base
    forwards: int = 0             # forwards the grid took (base included)
    chunk: int = 0                # variants per forward
    intervention: str = INTERVENTION
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    shared_prefix: bool = False   # the layers before each chunk's first knocked-out layer ran once per chunk

    @property
    def naive_forwards(self) -> int:
        """One forward per head, plus the base."""
        return 1 + len(self.layers) * self.num_heads

    def effect(self, token="mean") -> np.ndarray:
        """[n_layers, H] Δ log p of one answer token (0-based) or the mean over the answer."""
        if token is None or token == "mean":
            return self.delta.mean(-1)
        t = int(token)
        if not 0 <= t < self.delta.shape[-1]:
            raise ValueError(f"token {t} out of range: the answer has {self.delta.shape[-1]} token(s)")
        return self.delta[..., t]

    def cell(self, layer: int, head: int, token="mean") -> float:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no knock-out; layers: {self.layers}")
        if not 0 <= int(head) < self.num_heads:
            raise ValueError(f"head {head} out of range: the model has {self.num_heads} heads")
        return float(self.effect(token)[self.layers.index(layer), int(head)])

    def ranked(self, token="mean", n: int | None = None) -> list[tuple[int, int, float]]:
        """(layer, head, Δ) from the most harmful knock-out (most negative Δ) up."""
        e = self.effect(token)
        order = np.argsort(e, axis=None, kind="stable")
        out = [(self.layers[i // self.num_heads], int(i % self.num_heads), float(e.flat[i])) for i in order]
        return out[:n] if n else out

    @staticmethod
    def _delta(v, d: dict) -> np.ndarray:
        return np.asarray(v, np.float64).reshape(len(d["layers"]), d["num_heads"], -1)


@contextmanager
def _fork_at(model, layer: int, n: int):
    """Inside the block, a one-row forward becomes n identical rows at the input of decoder layer `layer`: the
    variants of a chunk differ only from their knocked-out layer on, so the layers before it run once."""
    def fork(_m, args, kwargs):
        if args:
            return (args[0].repeat(n, *([1] * (args[0].dim() - 1))), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": h.repeat(n, *([1] * (h.dim() - 1)))}
    handle = _text_model(model).layers[layer].register_forward_pre_hook(fork, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def knockout(adapter, image, question: str, answer_ids: list[int], layers="all", chunk: int | None = None,
             progress=None, share_prefix: bool = True) -> Knockout:
    """Knock out each head of `layers` (zero its output before the output projection) and score the answer.

    `chunk`: variants per forward (default: the number of heads, one forward per layer). `share_prefix`: the layers
    before a chunk's first knocked-out layer run once for the chunk (one row, forked into a row per variant there),
    where the family's forward allows it (tried on the first chunk). `progress(done, total)` is called after each
    forward."""
    model = adapter.model
    layer_idx = adapter.resolve_layers(layers)
    H = adapter.num_heads
    chunk = int(chunk or H)
    if chunk < 1:
        raise RALError("chunk must be at least 1 variant per forward")
    c0, t0 = time.process_time(), time.perf_counter()
    s = _prepare(adapter, image, question, answer_ids)
    variants = [(l, h) for l in layer_idx for h in range(H)]
    n_fwd = 1 + math.ceil(len(variants) / chunk)
    share = bool(share_prefix)
    with torch.no_grad():
        base = _answer_logp(model, s.batch(1), s.ids)[0]
        if progress:
            progress(1, n_fwd)
        delta = torch.zeros(len(layer_idx), H, len(s.ids))
        for k, start in enumerate(range(0, len(variants), chunk)):
            check_deadline("the knock-out grid")  # a request's time limit holds between forwards
            part = variants[start:start + chunk]
            scale = {}
            for i, (l, h) in enumerate(part):
                scale.setdefault(l, torch.ones(len(part), H, device=adapter.device))[i, h] = 0.0
            lp = None
            if share:  # one row up to the chunk's first knocked-out layer, then a row per variant
                try:
                    with capture(model, layers=[], head_scale=scale), _fork_at(model, part[0][0], len(part)):
                        lp = _answer_logp(model, s.batch(1), s.ids)
                    assert lp.shape[0] == len(part)
                except (RuntimeError, IndexError, ValueError, AssertionError):
                    # this family's forward uses batch-1 tensors past the fork: every row from the input instead
                    share, lp = False, None
            if lp is None:
                with capture(model, layers=[], head_scale=scale):
                    lp = _answer_logp(model, s.batch(len(part)), s.ids)
            for i, (l, h) in enumerate(part):
                delta[layer_idx.index(l), h] = (lp[i] - base).cpu()
            if progress:
                progress(k + 2, n_fwd)
    return Knockout(layers=layer_idx, num_heads=H, answer_ids=list(s.ids), answer_tokens=_tokens(adapter, s.ids),
                    base_logp=base.cpu().double().numpy(), delta=delta.double().numpy(), forwards=n_fwd, chunk=chunk,
                    seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, shared_prefix=share)


# ---- region blocking ------------------------------------------------------------------------------------------------
@dataclass
class Blocking(_Deltas):
    """The answer rows kept from the visual tokens of a box in some layers: what that does to the answer."""
    boxes: list                   # [[x0, y0, x1, y1]] image pixels
    layers: list[int]
    blocked_tokens: list[int]     # visual-token indices (in the map's order) the answer rows could not see
    answer_tokens: list[str]
    base_logp: np.ndarray         # [T]
    delta: np.ndarray             # [T] blocked minus base, on the original answer (teacher-forced)
    answer: str                   # the original answer
    new_answer: str               # greedy answer under the block
    new_answer_ids: list[int] = field(default_factory=list)

    @property
    def mean_delta(self) -> float:
        return float(np.mean(self.delta))

    @property
    def changed(self) -> bool:
        return self.new_answer != self.answer

    def line(self) -> str:
        box = "; ".join(",".join(f"{v:g}" for v in b) for b in self.boxes)
        return (f"blocking the answer's attention to {len(self.blocked_tokens)} visual token(s) in box {box} at "
                f"layer(s) {_span(self.layers)}: Δ log p {self.mean_delta:+.3g} per answer token; greedy answer "
                f"{self.answer!r} → {self.new_answer!r}" + (" (changed)" if self.changed else " (unchanged)"))



def _span(layers) -> str:
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers))


def parse_layers(text: str, what: str = "layers"):
    """'all' | 'last' | 'none' (→ None) | '0,3,-1' → a layer spec for `adapter.resolve_layers`; else one line."""
    t = str(text).strip().lower()
    if t in ("all", "last"):
        return t
    if t == "none":
        return None
    try:
        out = [int(v) for v in t.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or len(t) > 200:
        raise RALError(f"{what} must be 'all', 'last', 'none' or layer numbers such as 0,3,-1; "
                       f"got {str(text)[:60]!r}")
    return out


def box_tokens(geometry, boxes, min_cover: float = 0.0) -> np.ndarray:
    """Indices of the visual tokens whose rectangle lies inside the boxes by more than `min_cover` of its area
    (default: any overlap)."""
    from ral_core.grounding import box_weights
    return np.flatnonzero(box_weights(geometry, boxes) > min_cover)


def block_bias(visual_positions: torch.Tensor, blocked: np.ndarray, L: int, first_row: int) -> torch.Tensor:
    """[1, 1, L, L] additive bias: −inf from query rows ≥ `first_row` to the blocked visual keys, 0 elsewhere."""
    bias = torch.zeros(1, 1, L, L)
    keys = visual_positions[torch.as_tensor(blocked, dtype=torch.long)]
    bias[0, 0, first_row:, keys.cpu()] = float("-inf")
    return bias


def block_region(adapter, image, question: str, answer_ids: list[int], boxes, layers="all", min_cover: float = 0.0,
                 max_new_tokens: int = 16) -> Blocking:
    """Block the answer rows' attention to the visual tokens of `boxes` (image pixels) at `layers`: Δ log p of each
    answer token (teacher-forced) and the greedy answer under the block."""
    from ral_core.grounding import check_boxes

    boxes = check_boxes(boxes, image.size, "the box")
    if not boxes:
        raise RALError("give a box to block: x0,y0,x1,y1 in image pixels")
    layer_idx = adapter.resolve_layers(layers)
    s = _prepare(adapter, image, question, answer_ids)
    geometry = adapter.geometry(image)
    blocked = box_tokens(geometry, boxes, min_cover)
    if len(blocked) == 0:
        raise RALError("the box covers no visual token; draw a larger box")
    vis = torch.nonzero(adapter.visual_mask(s.inputs["input_ids"][0])).flatten()
    if len(vis) != geometry.n_tokens:
        raise RALError(f"the prompt holds {len(vis)} visual tokens but the geometry {geometry.n_tokens}")
    model = adapter.model
    L = s.inputs["input_ids"].shape[1]
    bias = block_bias(vis, blocked, L, s.P - 1).to(adapter.device)
    with torch.no_grad():
        base = _answer_logp(model, s.batch(1), s.ids)[0]
        with capture(model, layers=[], bias={l: bias for l in layer_idx}):
            lp = _answer_logp(model, s.batch(1), s.ids)[0]
    new_ids = greedy_blocked(adapter, s, vis, blocked, layer_idx, max_new_tokens)
    tok = adapter.tokenizer
    return Blocking(boxes=[list(b) for b in boxes], layers=layer_idx, blocked_tokens=[int(v) for v in blocked],
                    answer_tokens=_tokens(adapter, s.ids), base_logp=base.cpu().double().numpy(),
                    delta=(lp - base).cpu().double().numpy(),
                    answer=tok.decode(s.ids, skip_special_tokens=True).strip(),
                    new_answer=tok.decode(new_ids, skip_special_tokens=True).strip(), new_answer_ids=new_ids)


def greedy_blocked(adapter, s: _Scored, vis: torch.Tensor, blocked, layer_idx, max_new_tokens: int) -> list[int]:
    """Greedy decoding (structural tokens suppressed, as `generate_answer`) with the block on every answer row. One
    full forward per token, without a KV cache: the block's query rows start at the prompt's last position, which a
    cached prefill and its one-row decode steps cannot share one bias tensor for."""
    model = adapter.model
    P, prompt = s.P, s.prompt
    suppress = torch.tensor(adapter.suppress_token_ids, dtype=torch.long)
    eos = set(adapter.eos_token_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(int(max_new_tokens)):
            check_deadline("the blocked answer")
            full = _extend(adapter, prompt, [out]) if out else prompt
            L = full["input_ids"].shape[1]
            inputs = s.vision.model_inputs(s.vision.strip(full), torch.zeros(1, dtype=torch.long)) \
                if s.vision is not None else full
            bias = block_bias(vis, blocked, L, P - 1).to(adapter.device)
            with capture(model, layers=[], bias={l: bias for l in layer_idx}):
                logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[0, -1].float()
            if len(suppress):
                logits[suppress.to(logits.device)] = float("-inf")
            nxt = int(logits.argmax())
            if nxt in eos:
                break
            out.append(nxt)
    return out


# ---- the saved record, beside the inspection result -----------------------------------------------------------------
@dataclass
class CausalResult:
    knockout: Knockout | None = None
    blocks: list[Blocking] = field(default_factory=list)
    sinks: Sinks | None = None
    lens: LogitLens | None = None
    meta: dict = field(default_factory=dict)

    def save(self, result_dir) -> Path:
        """Written as causal.json into a saved inspection result's folder (`InspectionResult.save`)."""
        d = Path(result_dir)
        d.mkdir(parents=True, exist_ok=True)
        rec = {"format": FORMAT, "meta": self.meta,
               "knockout": self.knockout.to_dict() if self.knockout else None,
               "blocks": [b.to_dict() for b in self.blocks], "sinks": self.sinks.to_dict() if self.sinks else None,
               "lens": self.lens.to_dict() if self.lens else None}
        p = d / CAUSAL_FILE
        p.write_text(json.dumps(rec, indent=1))
        return p

    @classmethod
    def load(cls, result_dir) -> "CausalResult":
        p = Path(result_dir) / CAUSAL_FILE
        try:
            rec = json.loads(p.read_text())
            assert rec.get("format") == FORMAT
            return cls(knockout=Knockout.from_dict(rec["knockout"]) if rec.get("knockout") else None,
                       blocks=[Blocking.from_dict(b) for b in rec.get("blocks") or []],
                       sinks=Sinks.from_dict(rec["sinks"]) if rec.get("sinks") else None,
                       lens=LogitLens.from_dict(rec["lens"]) if rec.get("lens") else None, meta=rec.get("meta") or {})
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise RALError(f"'{result_dir}' holds no causal checks ({CAUSAL_FILE}); run `ral causal` first") from None


def run_checks(adapter, result, image, boxes=(), knock_layers="all", block_layers="all", chunk=None,
               max_new_tokens: int = 16, progress=None) -> CausalResult:
    """All three checks for one inspection result: knock-out grid, blocking of each given box (one block for the
    union of `boxes`), sinks."""
    ko = knockout(adapter, image, result.question, result.answer_ids, layers=knock_layers, chunk=chunk,
                  progress=progress) if knock_layers else None
    blocks = []
    if boxes:
        blocks.append(block_region(adapter, image, result.question, result.answer_ids, [list(b) for b in boxes],
                                   layers=block_layers, max_new_tokens=max_new_tokens))
    return CausalResult(knockout=ko, blocks=blocks, sinks=detect_sinks(result), meta={"model_name": result.model_name})


# ---- two models ---------------------------------------------------------------------------------------------------
def heads_moved_and_mattered(cmp, ko_a: Knockout, ko_b: Knockout, layer, token="mean", row="predicts") -> list[dict]:
    """Heads of one layer ranked two ways between models A and B: how far their attention moved (JSD of the head's
    visual maps, ral_core/compare.py) and how much their knock-out effect changed (|Δ_B − Δ_A|, log p per answer
    token). Both grids must score the same answer tokens (A's answer, as Compare scores both models on it)."""
    if ko_a.answer_ids != ko_b.answer_ids:
        raise RALError("the two knock-out grids were scored on different answers; score B on A's answer")
    moved = dict(cmp.ranked_heads(layer, token=token, row=row))
    ea, eb = ko_a.effect(token)[ko_a.layers.index(layer)], ko_b.effect(token)[ko_b.layers.index(layer)]
    change = np.abs(eb - ea)
    rank_moved = {h: i + 1 for i, (h, _) in enumerate(sorted(moved.items(), key=lambda kv: -kv[1]))}
    rank_change = {int(h): i + 1 for i, h in enumerate(np.argsort(-change, kind="stable"))}
    rows = [{"layer": layer, "head": h, "jsd": float(moved[h]), "rank_moved": rank_moved[h],
             "knockout_a": float(ea[h]), "knockout_b": float(eb[h]), "knockout_change": float(change[h]),
             "rank_effect_change": rank_change[h]} for h in range(len(ea))]
    return sorted(rows, key=lambda r: r["rank_effect_change"])
