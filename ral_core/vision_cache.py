"""Each distinct image of a rollout batch encoded once per step.

One RL step runs the frozen vision tower on the same image in generation, in the old-policy pass and in every
update, G times each (every rollout carries its own copy of the pixels). `VisionCache` runs the tower (and the
projector / merger) once per distinct image and hands the features to every later pass through transformers'
`mm_encoder_outputs` argument, so the language model sees exactly the tensors it would have computed itself. It
is valid only while nothing in the vision path gets a gradient (`vision_frozen`); the trainer switches it off,
with a note in the run log, when the tower is trained.

The frozen passes reuse the features where their tower is the student's: the same module (LoRA's reference, the
adapters off) or equal weights (`tower_fingerprint`: a deep-copied reference, a teacher that kept the student's
tower). A teacher with a tower of its own runs it once per distinct image (`VisionCache.for_model`). Before any
of this, `build_inputs` preprocesses each distinct image once (`distinct_images`, `image_rows`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import weakref
from itertools import chain

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
    """(the distinct images in first-seen order, [N] index of each input image among them). Copies of one object
    are matched by identity; the pixels are hashed only where two objects have the same mode and size (a rollout
    batch repeats each prompt's object G times, so a step hashes nothing)."""
    images = list(images)
    objs = list({id(im): im for im in images}.values())
    shape = {id(im): (getattr(im, "mode", None), getattr(im, "size", None)) for im in objs}
    count: dict = {}
    for s in shape.values():
        count[s] = count.get(s, 0) + 1
    key_of = {id(im): image_key(im) if shape[id(im)][0] is not None and count[shape[id(im)]] > 1 else id(im)
              for im in objs}
    keys, uniq, index = {}, [], []
    for im in images:
        k = key_of[id(im)]
        if k not in keys:
            keys[k] = len(uniq)
            uniq.append(im)
        index.append(keys[k])
    return uniq, torch.tensor(index, dtype=torch.long)


def image_rows(tensors: dict, index: torch.Tensor) -> dict:
    """Pixel tensors of distinct images (`process_images(...)["tensors"]`) → one image per row, row i showing image
    `index[i]`: Qwen's patches packed [Σ patches, D] are cut per image by `image_grid_thw`; every other family's
    tensors have one leading entry per image. Unchanged where every row shows its own image."""
    n = len(index)
    if torch.equal(index, torch.arange(n)):
        return tensors
    if "image_grid_thw" in tensors:
        thw = tensors["image_grid_thw"]
        counts = thw.prod(-1).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        pv = tensors["pixel_values"]
        return {**tensors, "pixel_values": torch.cat([pv[starts[i]:starts[i] + counts[i]] for i in index.tolist()]),
                "image_grid_thw": thw[index]}
    return {k: v[index] for k, v in tensors.items()}


def _encoder_owner(model):
    """The module with `get_image_features` (the VLM's base model), under DDP / peft wrappers."""
    m = unwrap(model)
    for cand in (getattr(m, "model", None), m):
        if cand is not None and callable(getattr(cand, "get_image_features", None)):
            return cand
    raise AttributeError(f"{type(m).__name__} has no get_image_features")


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # owner module → (state key, digest)
_CONFIG_METADATA = {"text_config", "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"}


def _is_local(t: torch.Tensor) -> bool:
    """A tensor whose bytes this process holds (not meta, not a DTensor shard)."""
    return not t.is_meta and type(t.data) is torch.Tensor


def tower_fingerprint(model) -> str | None:
    """Digest of what `model`'s vision path computes: its class, its vision config and attention implementation,
    and every vision parameter and buffer (name, dtype, shape, device, bytes); None where the bytes are not all
    here (sharded, meta). Equal digests give bit-identical image features. Kept per module and recomputed when a
    tensor of it changes (its version counter or storage), so a frozen tower is hashed once."""
    try:
        owner = _encoder_owner(model)
    except AttributeError:
        return None
    tensors = [(n, t) for n, t in chain(owner.named_parameters(), owner.named_buffers()) if is_vision_param(n)]
    if not tensors or not all(_is_local(t) for _, t in tensors):
        return None
    state = tuple((n, id(t), t._version, t.data_ptr()) for n, t in tensors)
    memo = _FINGERPRINTS.get(owner)
    if memo is not None and memo[0] == state:
        return memo[1]
    cfg = owner.config
    top = {k: v for k, v in cfg.to_dict().items() if k not in _CONFIG_METADATA}
    vcfg = getattr(cfg, "vision_config", None)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([type(owner).__name__, top, getattr(vcfg, "_attn_implementation", None)],
                        sort_keys=True, default=str).encode())
    for n, t in tensors:
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|{t.device}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    _FINGERPRINTS[owner] = (state, h.hexdigest())
    return h.hexdigest()


def _per_image(values, n: int) -> list:
    """Split a pooled output (a tuple/list of per-image tensors, or a tensor with one row per image) per image."""
    if torch.is_tensor(values):
        return list(values.unbind(0)) if values.shape[0] == n else None
    return list(values) if len(values) == n else None


class VisionCache:
    """Vision features of distinct images, encoded once (no gradient), for any rows that show them."""

    def __init__(self, model, pooled: list, deepstack: list | None, tensor_pooled: bool, out_type,
                 pixels: dict | None = None):
        self.owner = _encoder_owner(model)
        self.pooled, self.deepstack, self.tensor_pooled, self.out_type = pooled, deepstack, tensor_pooled, out_type
        self.pixels = pixels  # the distinct images' pixel tensors, for a teacher's own tower (`for_model`)
        self.encodings = len(pooled)  # tower runs: one per distinct image

    @classmethod
    @torch.no_grad()
    def encode(cls, adapter, images, model=None, tensors: dict | None = None) -> "VisionCache":
        """Run the vision path of `model` (default: the adapter's) once over `images` (distinct ones); `tensors`:
        their pixel tensors when already processed (`build_inputs(...)["distinct"]`)."""
        model = model if model is not None else adapter.model
        tensors = adapter.process_images(images)["tensors"] if tensors is None else tensors
        return cls._run(model, tensors, len(images))

    @classmethod
    def _run(cls, model, pixels: dict, n: int) -> "VisionCache":
        owner = _encoder_owner(model)
        base = unwrap(model)
        dev = next(base.parameters()).device
        tensors = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in pixels.items()}
        if "pixel_values" in tensors and tensors["pixel_values"].is_floating_point():
            tensors["pixel_values"] = tensors["pixel_values"].to(base.dtype)  # as VLMAdapter.to_model
        params = inspect.signature(owner.get_image_features).parameters
        kw = {k: v for k, v in tensors.items() if k in params}
        out = owner.get_image_features(**kw, return_dict=True)
        pooled = _per_image(out.pooler_output, n)
        if pooled is None:
            raise ValueError(f"{type(owner).__name__}: cannot split the image features per image")
        deep = getattr(out, "deepstack_features", None)
        deepstack = [_per_image(layer, n) for layer in deep] if deep else None
        return cls(model, pooled, deepstack, torch.is_tensor(out.pooler_output), type(out), pixels)

    def serves(self, model) -> bool:
        """Whether these features are `model`'s own: its vision path is this cache's module, or one with the same
        weights (`tower_fingerprint`). Otherwise `model` encodes the images itself (`for_model`)."""
        try:
            if _encoder_owner(model) is self.owner:
                return True
        except AttributeError:
            return False
        fp = tower_fingerprint(model)
        return fp is not None and fp == tower_fingerprint(self.owner)

    @torch.no_grad()
    def for_model(self, model) -> "VisionCache | None":
        """The features as `model` computes them: these where they are its own, else its tower run once over the
        same distinct images' pixels (a teacher with a tower of its own); None where that tower cannot run apart
        from its model (sharded: FSDP gathers its weights only inside the model's own forward), or no pixels
        were kept: `model` then reads every row's pixels itself."""
        if self.serves(model):
            return self
        if self.pixels is None or tower_fingerprint(model) is None:
            return None
        return VisionCache._run(model, self.pixels, len(self.pooled))

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


def reuse_notes(student, frozen: dict) -> list[str]:
    """Run-log lines naming each frozen model ({what: model}) whose vision tower is not the student's: it encodes
    the step's distinct images itself, once each (every rollout's image where it is sharded)."""
    mine = tower_fingerprint(student)
    notes = []
    for what, m in frozen.items():
        if m is None:
            continue
        try:
            same = _encoder_owner(m) is _encoder_owner(student)
        except AttributeError:
            continue
        if same:
            continue
        fp = tower_fingerprint(m)
        if fp is None:
            notes.append(f"the {what}'s vision tower is sharded, so it encodes every rollout's image itself")
        elif fp != mine:
            notes.append(f"the {what}'s vision tower differs from the student's (other weights, dtype or device), so "
                         "it encodes each distinct image of a step itself, once")
    return notes
