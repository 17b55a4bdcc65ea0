"""One inspection: the answer to (image, question) and where the model looked while producing it.

`inspect()` generates (SDPA, no capture), then runs one teacher-forced pass under capture for the rows
P-1 … P+T-1 (P = prompt length, T = answer tokens). Row j is the query that *predicts* answer token j;
row j+1 is token j's *own* row (the paper's RAL policy row). The typed `InspectionResult` keeps, per layer
and head, those rows' attention to every visual token plus the mass on image / prompt text / answer, so it
can be saved, aggregated and rendered without re-running the model.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ral_core.attention import capture, resolve_layers
from ral_core.config import parse_bool
from ral_core.errors import RALError
from ral_core.generation import cut_off, generate_answer, strip_answer
from ral_core.limits import check_question
from ral_core.models.base import TokenGeometry
from ral_core.policy import ExploreSpec

ROWS = ("predicts", "own")
MASS_PARTS = ("image", "prompt_text", "answer")
# The capture pass needs the maps only: the LM head on one position instead of all (full logits are [1, L, vocab]:
# 1.17 GiB at 4k tokens for a 151,936-token vocabulary in bf16) and no KV cache. Every family's forward takes both.
CAPTURE_ONLY = {"logits_to_keep": 1, "use_cache": False}


@dataclass
class InspectionResult:
    model_name: str
    question: str
    answer: str
    answer_tokens: list[str]
    answer_ids: list[int]
    prompt_tokens: list[str]
    layers: list[int]
    num_heads: int
    visual: np.ndarray   # [n_layers, H, T+1, Nv] attention of rows P-1..P+T-1 to each visual token
    mass: np.ndarray     # [n_layers, H, T+1, 3] attention mass on image / prompt text / answer so far
    image: Image.Image
    geometry: TokenGeometry
    meta: dict = field(default_factory=dict)

    # ---- selection and aggregation (no model needed) ----------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.answer_tokens)

    def _rows(self, token, row: str):
        if row not in ROWS:
            raise ValueError(f"row must be one of {ROWS}")
        off = 0 if row == "predicts" else 1
        if token is None or token == "mean":
            return slice(off, off + self.n_tokens)
        t = int(token)
        if not 0 <= t < self.n_tokens:
            raise ValueError(f"token {t} out of range: the answer has {self.n_tokens} token(s)")
        return slice(t + off, t + off + 1)

    def _layer_idx(self, layer):
        if layer is None or layer == "mean":
            return slice(None)
        layer = int(layer)
        if layer < 0:
            layer = self.layers[layer] if -len(self.layers) <= layer else layer
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured; captured layers: {self.layers}")
        i = self.layers.index(layer)
        return slice(i, i + 1)

    def _select(self, arr, layer, head, token, row):
        a = arr[self._layer_idx(layer)]
        if head is not None and head != "mean":
            h = int(head)
            if not 0 <= h < self.num_heads:
                raise ValueError(f"head {h} out of range: the model has {self.num_heads} heads")
            a = a[:, h:h + 1]
        return a[:, :, self._rows(token, row)]

    def visual_map(self, layer="mean", head="mean", token="mean", row="predicts") -> np.ndarray:
        """Attention to each visual token [Nv], averaged over the unselected layers/heads/tokens."""
        return self._select(self.visual, layer, head, token, row).mean(axis=(0, 1, 2))

    def head_maps(self, layer, token="mean", row="predicts") -> np.ndarray:
        """[H, Nv] per-head maps for one layer (heads of different layers are unrelated: no layer mean)."""
        if layer is None or layer == "mean":
            raise ValueError("per-head maps need one layer, not the mean over layers")
        return self._select(self.visual, layer, None, token, row)[0].mean(axis=1)

    def mass_split(self, layer="mean", head="mean", token="mean", row="predicts") -> dict[str, float]:
        m = self._select(self.mass, layer, head, token, row).mean(axis=(0, 1, 2))
        return {k: float(v) for k, v in zip(MASS_PARTS, m)}

    def target_mass(self, box, **sel) -> float:
        """Attention mass on visual tokens inside `box`, weighting each token by its overlap."""
        return float((self.visual_map(**sel) * self.geometry.box_overlap(box)).sum())

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, out_dir) -> Path:
        from safetensors.numpy import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"visual": np.ascontiguousarray(self.visual, np.float32),
                   "mass": np.ascontiguousarray(self.mass, np.float32)}, str(out / "attention.safetensors"))
        self.image.save(out / "image.png")
        meta = {k: getattr(self, k) for k in ("model_name", "question", "answer", "answer_tokens", "answer_ids",
                                              "prompt_tokens", "layers", "num_heads", "meta")}
        meta["geometry"] = self.geometry.to_dict()
        meta["format"] = "ral-inspection/1"
        (out / "result.json").write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, out_dir) -> "InspectionResult":
        from safetensors.numpy import load_file

        d = Path(out_dir)
        try:
            meta = json.loads((d / "result.json").read_text())
            arrays = load_file(str(d / "attention.safetensors"))
            image = Image.open(d / "image.png").convert("RGB")
        except (OSError, ValueError, KeyError) as e:
            raise RALError(f"'{out_dir}' is not a saved inspection result ({e})") from None
        geometry = TokenGeometry.from_dict(meta.pop("geometry"))
        meta.pop("format", None)
        return cls(visual=arrays["visual"], mass=arrays["mass"], image=image, geometry=geometry, **meta)


def inspect(adapter, image: Image.Image, question: str, max_new_tokens: int = 16, layers="all",
            do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
            forced_answer: str | None = None, bias: dict | None = None) -> InspectionResult:
    """Answer `question` about `image` and capture the answer tokens' attention at `layers`.

    `forced_answer` scores a given answer instead of generating (used to compare two models on the same
    tokens). `bias` (layer → logits bias) steers attention during both generation and capture.
    """
    do_sample = parse_bool(do_sample, "do_sample")  # a request's "false" must not sample
    if forced_answer is None and not do_sample and not bias:
        torch.manual_seed(seed)  # as before the sampled path: callers' later draws do not depend on the path
        r = inspect_many(adapter, [image], [question], max_new_tokens, layers)[0]
        r.meta = {"forced": False, "do_sample": False, "seed": seed, "cut_off": r.meta["cut_off"]}
        return r
    question = check_question(adapter, question)
    layer_idx = resolve_layers(layers, adapter.num_layers, adapter.attention_layers)
    b = adapter.build_inputs([image], [question])
    mi = b["model_inputs"]
    if forced_answer is not None:
        ids = adapter.encode_answer(forced_answer, eos=False)
        if not ids:
            raise RALError("the forced answer is empty; give at least one token")
        stopped = False
    else:
        torch.manual_seed(seed)
        with capture(adapter.model, layers=[], bias=bias) if bias else nullcontext():
            gen = generate_answer(adapter, mi, max_new_tokens, do_sample, temperature, top_p)
        ids = strip_answer(gen[0].tolist(), set(adapter.eos_token_ids))
        stopped = _stopped(gen, 0, max_new_tokens, adapter)
    meta = {"forced": forced_answer is not None, "do_sample": do_sample, "seed": seed, "cut_off": stopped}
    return _results(adapter, [image], [question], b, [ids], layer_idx, bias, [meta])[0]


def inspect_many(adapter, images: list, questions: list[str], max_new_tokens: int = 16,
                 layers="all") -> list[InspectionResult]:
    """`inspect()` for several (image, question) pairs in one batched greedy generation and one capture pass
    (what a server does with concurrent requests). Each result equals `inspect()` of its pair alone up to
    float rounding of the padded batch."""
    if len(images) != len(questions) or not images:
        raise RALError("inspect_many needs as many images as questions (at least one)")
    qs = [check_question(adapter, q) for q in questions]
    layer_idx = resolve_layers(layers, adapter.num_layers, adapter.attention_layers)
    b = adapter.build_inputs(list(images), qs)
    gen = generate_answer(adapter, b["model_inputs"], max_new_tokens, do_sample=False)
    eos = set(adapter.eos_token_ids)
    ids = [strip_answer(g.tolist(), eos) for g in gen]
    metas = [{"forced": False, "do_sample": False, "seed": 0, "batch": len(qs),
              "cut_off": _stopped(gen, i, max_new_tokens, adapter)} for i in range(len(qs))]
    return _results(adapter, images, qs, b, ids, layer_idx, None, metas)


def _stopped(gen: torch.Tensor, i: int, max_new_tokens: int, adapter) -> bool:
    """Whether row i's generation was cut short by the request's deadline (not by EOS or the token budget)."""
    return cut_off() and gen.shape[1] < max_new_tokens and not set(adapter.eos_token_ids) & set(gen[i].tolist())


def _results(adapter, images, qs, built, ids: list[list[int]], layer_idx: list[int], bias,
             metas) -> list[InspectionResult]:
    """One teacher-forced capture pass over every (prompt, answer ids) row → one InspectionResult per row."""
    mi = built["model_inputs"]
    N, P = mi["input_ids"].shape
    T = max(len(x) for x in ids)
    new = torch.full((N, T), adapter.tokenizer.pad_token_id, dtype=torch.long, device=mi["input_ids"].device)
    new_mask = torch.zeros_like(new)
    for i, x in enumerate(ids):
        new[i, :len(x)] = torch.tensor(x, device=new.device)
        new_mask[i, :len(x)] = 1
    full = adapter.extend_inputs(mi, new, new_mask)
    rows = torch.arange(P - 1, P + T, device=new.device)[None].expand(N, T + 1)
    with torch.no_grad(), capture(adapter.model, layers=layer_idx, rows=rows, bias=bias) as maps:
        adapter.model(**full, **CAPTURE_ONLY)
    tok, out = adapter.tokenizer, []
    for i, x in enumerate(ids):
        t = len(x)
        keep = full["attention_mask"][i].bool()
        vis_pos = adapter.visual_mask(full["input_ids"][i]) & keep
        ans_pos = torch.zeros_like(vis_pos)
        ans_pos[P:P + t] = True
        text_pos = ~vis_pos & ~ans_pos & keep
        visual, mass = [], []
        for layer in layer_idx:
            a = maps[layer][i][:, :t + 1]  # [H, t+1, L]
            visual.append(a[:, :, vis_pos])
            mass.append(torch.stack([a[:, :, vis_pos].sum(-1), a[:, :, text_pos].sum(-1), a[:, :, ans_pos].sum(-1)],
                                    -1))
        prompt = [int(v) for v, k in zip(mi["input_ids"][i].tolist(), mi["attention_mask"][i].tolist()) if k]
        out.append(InspectionResult(
            model_name=adapter.name, question=qs[i], answer=tok.decode(x, skip_special_tokens=True).strip(),
            answer_tokens=[tok.decode([v]) for v in x], answer_ids=[int(v) for v in x],
            prompt_tokens=[tok.decode([v]) for v in prompt], layers=layer_idx, num_heads=adapter.num_heads,
            visual=torch.stack(visual).float().cpu().numpy(), mass=torch.stack(mass).float().cpu().numpy(),
            image=images[i].convert("RGB"), geometry=built["geometry"][i], meta=metas[i]))
    return out


def inspect_explored(adapter, image: Image.Image, question: str, layers="last", sigma: float = 2.0, seed: int = 0,
                     max_new_tokens: int = 16, per_head: bool = False) -> tuple[InspectionResult, InspectionResult]:
    """The natural inspection and one explored rollout: a bias b ~ N(0, σ²) on the attention logits toward the
    visual keys at `layers` (as attention exploration samples it during training), greedy answer under it."""
    natural = inspect(adapter, image, question, max_new_tokens=max_new_tokens)
    b = adapter.build_inputs([image], [question.strip()])["model_inputs"]
    spec = ExploreSpec(resolve_layers(layers, adapter.num_layers, adapter.attention_layers), sigma=sigma,
                       per_head=per_head)
    g = torch.Generator().manual_seed(seed)
    bias = spec.sample_bias(adapter.visual_mask(b["input_ids"]), b["attention_mask"], adapter.num_heads, generator=g)
    explored = inspect(adapter, image, question, max_new_tokens=max_new_tokens, bias=bias)
    explored.meta.update({"explore_layers": spec.layers, "explore_sigma": sigma, "explore_seed": seed})
    return natural, explored
