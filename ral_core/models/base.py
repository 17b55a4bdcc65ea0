"""What every model family provides: loading, chat-format inputs, where the visual tokens are, and the
exact visual-token → image-rectangle geometry."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ral_core.errors import RALError
from ral_core.vision_cache import distinct_images, image_rows


@dataclass
class TokenGeometry:
    """Where each visual token of one image looks, in original-image pixels.

    `boxes[k]` is (x0, y0, x1, y1) of the k-th visual token in sequence order. `groups` lists the token
    blocks (one for Qwen/LLaVA; one per tile plus the global image for Idefics3) with their grid shape.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray
    groups: list[dict] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(len(self.boxes))

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "boxes": np.asarray(self.boxes, float).tolist(),
                "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenGeometry":
        return cls(tuple(d["image_size"]), np.asarray(d["boxes"], dtype=np.float64), list(d["groups"]))

    def token_at(self, x: float, y: float, group: int = 0) -> int:
        """Index of the token of `group` whose rectangle contains the point (x, y)."""
        g = self.groups[group]
        b = self.boxes[g["start"]:g["start"] + g["rows"] * g["cols"]]
        hit = np.flatnonzero((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3]))
        if len(hit) == 0:
            raise ValueError(f"point ({x}, {y}) is outside every token of group {group}")
        return int(g["start"] + hit[0])

    def box_overlap(self, box) -> np.ndarray:
        """Fraction of each token's rectangle that lies inside `box` (x0, y0, x1, y1)."""
        b = self.boxes
        ix = np.clip(np.minimum(b[:, 2], box[2]) - np.maximum(b[:, 0], box[0]), 0, None)
        iy = np.clip(np.minimum(b[:, 3], box[3]) - np.maximum(b[:, 1], box[1]), 0, None)
        area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9)
        return ix * iy / area


def grid_boxes(rows: int, cols: int, sx: float, sy: float, ox: float = 0.0, oy: float = 0.0,
               clip: tuple[float, float] | None = None) -> np.ndarray:
    """Row-major boxes of a rows×cols grid of cells sx×sy starting at (ox, oy), optionally clipped."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x0, y0 = ox + c.ravel() * sx, oy + r.ravel() * sy
    boxes = np.stack([x0, y0, x0 + sx, y0 + sy], axis=1).astype(np.float64)
    if clip is not None:
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, clip[0])
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, clip[1])
    return boxes


def control_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special added tokens: chat-turn markers, BOS/EOS/pad, image and vision markers."""
    return frozenset(int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)


def user_text_ids(tokenizer, text: str, what: str = "the question", control: frozenset[int] | None = None) -> list[int]:
    """Token ids of user text (a question, an answer to score, a data-set row), refusing in one line text that
    contains NULs, control characters or a spelling of one of the model's control tokens (`control`, default
    `control_ids(tokenizer)`: `<|im_end|>`, `<|image_pad|>`, `<image>`, `<end_of_turn>`, …).

    Refused rather than tokenised apart as plain text: every accepted prompt then holds exactly the ids the model's
    own chat template builds (tokenising the user's text on its own changes how SentencePiece-style tokenizers cut
    the text around it), a chat turn cannot be forged, and a string that spells a control token has no faithful
    plain reading for the model anyway; the message names the token so the user can edit it."""
    from ral_core.limits import check_text_chars

    if not isinstance(text, str):
        raise RALError(f"{what} must be text, got {type(text).__name__}")
    control = control_ids(tokenizer) if control is None else control
    ids = tokenizer(check_text_chars(text, what), add_special_tokens=False)["input_ids"]
    bad = next((i for i in ids if i in control), None)
    if bad is not None:
        raise RALError(f"{what} contains '{tokenizer.convert_ids_to_tokens(bad)}', one of this model's control "
                       "tokens (chat turns, image markers); remove it — user text may not spell them")
    return ids


def _contiguous_input(module, args):
    if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head(model) -> None:
    """Hand the LM head a contiguous input. transformers cuts the last position out of a batch before the head
    (`logits_to_keep=1` in every generate prefill), a non-contiguous [B, 1, H] view, and the CPU matmul then
    broadcasts the head's weight per sequence: with a 151,936 × 1536 bf16 head and B = 8, 26 s and 1.8 GB instead
    of 0.06 s (fp32: 2.4× slower). Found by the real-size bench (bench/real_bench.py)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_ral_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._ral_contiguous = True


class VLMAdapter:
    """Base adapter. Subclasses set `family`, `model_types`, and implement the image-specific parts."""

    family = "base"
    model_types: tuple[str, ...] = ()

    def __init__(self, model, tokenizer, image_processor, name: str = ""):
        self.model, self.tokenizer, self.image_processor, self.name = model, tokenizer, image_processor, name
        contiguous_head(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, path, config):
        """Model, tokenizer and image processor of a saved directory (or cached hub id) via the Auto classes."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        model = AutoModelForImageTextToText.from_pretrained(path)
        try:
            ip = AutoImageProcessor.from_pretrained(path)
        except (ImportError, ValueError, OSError):
            ip = cls.fallback_image_processor(path)
        return cls(model, AutoTokenizer.from_pretrained(path), ip)

    @classmethod
    def fallback_image_processor(cls, path):
        raise RALError(f"no usable image processor in '{path}' (torchvision is not installed here)")

    # ---- family-specific -------------------------------------------------------------------------
    def prompt_ids(self, n_image_tokens, question: str, extra=None) -> list[int]:
        raise NotImplementedError

    def process_images(self, images) -> dict:
        """Pixel tensors for the model plus per-image bookkeeping (`n_tokens`, `meta`)."""
        raise NotImplementedError

    def geometry_from_meta(self, image_size, meta) -> TokenGeometry:
        raise NotImplementedError

    def extra_model_inputs(self, input_ids: torch.Tensor) -> dict:
        return {}

    # ---- pixel budget (ral_core.models.pixels) ----------------------------------------------------
    max_pixels: int | None = None  # cap on each image's pixels before the vision tower; None: the processor's own
    small_image_rule: bool = True  # an image that fits one tile goes in as one tile (pixels.SMALL_IMAGES)

    def set_max_pixels(self, max_pixels: int | None) -> str:
        """Cap the pixels of each image that reach the vision tower (so its visual tokens); None: the processor's
        own setting. Returns one line saying what the cap means for this family."""
        if max_pixels is not None and int(max_pixels) < 1:
            raise RALError(f"max_pixels must be a positive number of pixels (got {max_pixels})")
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        return self.pixel_budget_note()

    def pixel_budget_note(self) -> str:
        return (f"{self.family} processes every image at one fixed size, so a pixel budget does not change its "
                "visual tokens")

    def image_kwargs(self, image) -> dict:
        """Image-processor call kwargs for one image: the family's small-image setting and the pixel budget."""
        return {}

    # ---- shared ------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        tid = getattr(cfg, "image_token_id", None)
        if tid is None:
            tid = getattr(cfg, "image_token_index", None)
        return int(tid)

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def attention_layers(self) -> list[int]:
        """Decoder layers with softmax attention: the ones capture can read, what 'all' means and whose last is
        'last'. Every layer except in hybrid models (Qwen3.5), whose linear-attention layers have no attention map."""
        from ral_core.attention import decoder_attention_modules
        return [i for i, m in enumerate(decoder_attention_modules(self.model)) if m is not None]

    def resolve_layers(self, spec) -> list[int]:
        """'all' | 'last' | int | list of ints → decoder-layer indices among `attention_layers`."""
        from ral_core.attention import resolve_layers
        return resolve_layers(spec, self.num_layers, self.attention_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        e = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
        return sorted(i for i in ids if i is not None)

    @property
    def suppress_token_ids(self) -> list[int]:
        """Structural tokens a model must never sample (image/vision/pad markers)."""
        tok = self.tokenizer
        ids = {self.image_token_id}
        for name in getattr(tok, "all_special_tokens", []):
            if any(s in name for s in ("image", "vision", "video", "pad", "fake_token", "global-img", "row_")):
                ids.add(tok.convert_tokens_to_ids(name))
        ids.discard(None)
        for e in self.eos_token_ids:
            ids.discard(e)
        return sorted(int(i) for i in ids if int(i) < self.model.get_input_embeddings().num_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    def geometry(self, image) -> TokenGeometry:
        proc = self.process_images([image])
        return self.geometry_from_meta(image.size, proc["meta"][0])

    @property
    def control_token_ids(self) -> frozenset[int]:
        """Ids no user text may produce: `control_ids` of the tokenizer plus the structural ones (image token,
        suppressed markers, EOS)."""
        if getattr(self, "_control_ids", None) is None:
            ids = set(control_ids(self.tokenizer))
            ids.update(self.suppress_token_ids, self.eos_token_ids, [self.image_token_id])
            self._control_ids = frozenset(int(i) for i in ids if i is not None)
        return self._control_ids

    def user_text_ids(self, text: str, what: str = "the question") -> list[int]:
        """`user_text_ids(tokenizer, text, what)` with this model's control tokens."""
        return user_text_ids(self.tokenizer, text, what, self.control_token_ids)

    @property
    def end_of_answer_id(self) -> int:
        """The token that closes an answer (the assistant turn)."""
        return self.tokenizer.eos_token_id

    def encode_answer(self, answer: str, eos: bool = True) -> list[int]:
        return self.user_text_ids(answer, "the answer") + ([self.end_of_answer_id] if eos else [])

    def build_inputs(self, images, questions, answers=None, add_eos: bool = True) -> dict:
        """Left-padded model inputs for (image, question[, answer]) triples.

        Returns the model kwargs plus `prompt_lens` (tokens before the answer, per row, unpadded),
        `response_mask` ([B, L] bool, answer tokens incl. EOS) when answers are given, `geometry`, and `distinct`:
        the distinct images (`images`), each row's index among them (`rows`) and their pixel tensors (`tensors`).
        Each distinct image is preprocessed once (a rollout batch shows every image G times); the per-row
        tensors are the same bytes as processing every copy.
        """
        if len(images) != len(questions):
            raise RALError("give one question per image")
        for q in set(questions):  # refused before any image work; a rollout batch repeats each question
            self.user_text_ids(q, "the question")
        uniq, index = distinct_images(images)
        proc = self.process_images(uniq)
        rows = index.tolist()
        seqs, prompt_lens, resp_lens, prompts = [], [], [], {}
        for i, q in enumerate(questions):
            j = rows[i]
            if (j, q) not in prompts:
                prompts[j, q] = self.prompt_ids(proc["n_tokens"][j], q, proc["meta"][j])
            p = prompts[j, q]
            a = self.encode_answer(answers[i], eos=add_eos) if answers is not None else []
            seqs.append(p + a)
            prompt_lens.append(len(p))
            resp_lens.append(len(a))
        L = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        resp = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, s in enumerate(seqs):
            input_ids[i, L - len(s):] = torch.tensor(s)
            attn[i, L - len(s):] = 1
            if resp_lens[i]:
                resp[i, L - resp_lens[i]:] = True
        out = {"input_ids": input_ids, "attention_mask": attn, **image_rows(proc["tensors"], index)}
        out.update(self.extra_model_inputs(input_ids))
        out = self.to_model(out)
        return {"model_inputs": out, "prompt_lens": prompt_lens, "response_mask": resp.to(self.device),
                "geometry": [self.geometry_from_meta(im.size, proc["meta"][j]) for im, j in zip(images, rows)],
                "distinct": {"images": uniq, "rows": index, "tensors": proc["tensors"]}}

    def to_model(self, tensors: dict) -> dict:
        """Model inputs on the model's device, pixel values in its dtype."""
        dev = self.device
        out = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in tensors.items()}
        if "pixel_values" in out and out["pixel_values"].is_floating_point():
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        return out

    def extend_inputs(self, model_inputs: dict, new_ids: torch.Tensor, new_mask: torch.Tensor) -> dict:
        """Model inputs for the prompt followed by generated tokens (teacher-forced re-scoring)."""
        ids = torch.cat([model_inputs["input_ids"], new_ids], dim=1)
        out = dict(model_inputs)
        out["input_ids"] = ids
        out["attention_mask"] = torch.cat([model_inputs["attention_mask"], new_mask.long()], dim=1)
        out.update({k: v.to(ids.device) for k, v in self.extra_model_inputs(ids.cpu()).items()})
        return out


# ---- registry and loading -------------------------------------------------------------------------
_REGISTRY: dict[str, type[VLMAdapter]] = {}


def register(cls):
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


def adapter_for_model_type(model_type: str) -> type[VLMAdapter]:
    from ral_core import models  # noqa: F401  (imports register every family)
    if model_type not in _REGISTRY:
        raise RALError(f"unsupported model family '{model_type}'; supported: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[model_type]


def supported_model_types() -> list[str]:
    from ral_core import models  # noqa: F401
    return sorted(_REGISTRY)


DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "default_model"


def local_model_path(spec: str | os.PathLike) -> str:
    """'default' → the embedded model's folder; an existing model directory → itself; a bad local path → one-line
    error; anything else is returned unchanged for `ral_core.models.resolve_model_path` to treat as a hub id."""
    spec = str(spec)
    if spec in ("", "default"):
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise RALError(f"the embedded default model is missing at {DEFAULT_MODEL_DIR}; run `make default-model`")
        return str(DEFAULT_MODEL_DIR)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir() or not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
            raise RALError(f"'{spec}' is not a model directory (no config.json inside); pass a directory saved "
                           "with save_pretrained, or 'default'")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RALError(f"model path '{spec}' does not exist; pass an existing model directory or 'default'")
    return spec


def load_from_path(path: str, spec=None, device: str | None = None, dtype: torch.dtype | None = None) -> VLMAdapter:
    """The adapter of a model folder already on this machine (`ral_core.models.load_adapter` finds or downloads it
    first); `spec` is the name messages and results show."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keeps CLI/app output to our own lines
    spec = path if spec is None else spec
    if (Path(path) / "adapter_config.json").exists() and not (Path(path) / "config.json").exists():
        return _load_lora(path, spec, device, dtype)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise RALError(f"could not read the model config in '{path}': {str(e).splitlines()[0]}") from None
        raise RALError(f"model '{spec}' is neither a local directory nor in the local Hugging Face cache, and the "
                       "hub is unreachable from here (offline); download it elsewhere and pass its local "
                       "directory with --model DIR") from None
    cls = adapter_for_model_type(config.model_type)
    try:
        adapter = cls.load(path, config)
    except (OSError, ValueError, KeyError) as e:
        raise RALError(f"could not load the {cls.family} model in '{path}': {str(e).splitlines()[0]}") from None
    adapter.name = str(spec)
    if dtype is not None:
        adapter.model.to(dtype)
    if device is not None:
        adapter.model.to(device)
    adapter.model.eval()
    return adapter


def _load_lora(path, spec, device, dtype) -> VLMAdapter:
    """A LoRA checkpoint: load its base model, apply the adapter and merge it (inference only)."""
    import json

    from peft import PeftModel

    p = Path(path)
    base = (p / "ral_base_model.txt").read_text().strip() if (p / "ral_base_model.txt").exists() else \
        json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or "default"
    from ral_core.models import load_adapter  # the base may be 'default' or a hub id, found like any model

    adapter = load_adapter(base, device=device, dtype=dtype)
    adapter.model = PeftModel.from_pretrained(adapter.model, str(p)).merge_and_unload().eval()
    adapter.name = str(spec)
    return adapter
