"""Each distinct image of a rollout batch encoded once per step.

One RL step runs the frozen vision tower on the same image in generation, in the old-policy pass and in every
update, G times each (every rollout carries its own copy of the pixels). `VisionCache` runs the tower (and the
projector / merger) once per distinct image and hands the features to every later pass through transformers'
`mm_encoder_outputs` argument, so the language model sees exactly the tensors it would have computed itself. It
is valid only while nothing in the vision path gets a gradient (`vision_frozen`); the trainer switches it off,
with a note in the run log, when the tower is trained.
"""
from __future__ import annotations

import hashlib
import inspect

import torch

from ral_core.attention import unwrap

VISION_PREFIXES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "connector", "merger")
# inputs that only the vision encoder reads; positions (image_grid_thw) and masks stay with the language model
_LM_KEEPS = {"image_grid_thw", "video_grid_thw"}


def is_vision_param(name: str) -> bool:
    return any(p in VISION_PREFIXES for p in name.split("."))


def vision_frozen(model) -> bool:
    """Whether no parameter of the vision path (tower, projector, merger) requires a gradient."""
    return not any(p.requires_grad for n, p in unwrap(model).named_parameters() if is_vision_param(n))


def image_key(image) -> str:
    """Content key of a PIL image: the same pixels are the same image, whichever object carries them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def distinct_images(images) -> tuple[list, torch.Tensor]:
    """(the distinct images in first-seen order, [N] index of each input image among them)."""
    keys, uniq, index = {}, [], []
    for im in images:
        k = image_key(im)
        if k not in keys:
            keys[k] = len(uniq)
            uniq.append(im)
        index.append(keys[k])
    return uniq, torch.tensor(index, dtype=torch.long)


def _encoder_owner(model):
    """The module with `get_image_features` (the VLM's base model), under DDP / peft wrappers."""
    m = unwrap(model)
    for cand in (getattr(m, "model", None), m):
        if cand is not None and callable(getattr(cand, "get_image_features", None)):
            return cand
    raise AttributeError(f"{type(m).__name__} has no get_image_features")


def _per_image(values, n: int) -> list:
    """Split a pooled output (a tuple/list of per-image tensors, or a tensor with one row per image) per image."""
    if torch.is_tensor(values):
        return list(values.unbind(0)) if values.shape[0] == n else None
    return list(values) if len(values) == n else None


class VisionCache:
    """Vision features of distinct images, encoded once (no gradient), for any rows that show them."""

    def __init__(self, model, pooled: list, deepstack: list | None, tensor_pooled: bool, out_type):
        self.owner = _encoder_owner(model)
        self.pooled, self.deepstack, self.tensor_pooled, self.out_type = pooled, deepstack, tensor_pooled, out_type
        self.encodings = len(pooled)  # tower runs: one per distinct image

    @classmethod
    @torch.no_grad()
    def encode(cls, adapter, images, model=None) -> "VisionCache":
        """Run the vision path of `model` (default: the adapter's) once over `images` (distinct ones)."""
        model = model if model is not None else adapter.model
        owner = _encoder_owner(model)
        tensors = adapter.to_model(adapter.process_images(images)["tensors"])
        params = inspect.signature(owner.get_image_features).parameters
        kw = {k: v for k, v in tensors.items() if k in params}
        out = owner.get_image_features(**kw, return_dict=True)
        n = len(images)
        pooled = _per_image(out.pooler_output, n)
        if pooled is None:
            raise ValueError(f"{type(owner).__name__}: cannot split the image features per image")
        deep = getattr(out, "deepstack_features", None)
        deepstack = [_per_image(layer, n) for layer in deep] if deep else None
        return cls(model, pooled, deepstack, torch.is_tensor(out.pooler_output), type(out))

    def serves(self, model) -> bool:
        """Whether these features are `model`'s own (a teacher or another model encodes its images itself)."""
        try:
            return _encoder_owner(model) is self.owner
        except AttributeError:
            return False

    def outputs(self, index: torch.Tensor) -> dict:
        """`mm_encoder_outputs` for rows showing distinct images `index` ([n] positions into the cache)."""
        idx = index.tolist()
        pooled = [self.pooled[i] for i in idx]
        kw = {"pooler_output": torch.stack(pooled) if self.tensor_pooled else tuple(pooled)}
        if self.deepstack is not None:
            kw["deepstack_features"] = [tuple(layer[i] for i in idx) for layer in self.deepstack]
        return {"image": self.out_type(**kw)}

    def strip(self, inputs: dict) -> dict:
        """`inputs` without the tensors only the vision encoder reads."""
        params = inspect.signature(self.owner.get_image_features).parameters
        return {k: v for k, v in inputs.items() if not (k in params and k not in _LM_KEEPS)}

    def model_inputs(self, inputs: dict, index: torch.Tensor) -> dict:
        """`inputs` with the pixel tensors replaced by the cached features of distinct images `index` (per row)."""
        return {**self.strip(inputs), "mm_encoder_outputs": self.outputs(index)}
