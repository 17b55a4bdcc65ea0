"""LLaVA-1.5 style models: a CLIP vision tower on one fixed-size square image (optional pad-to-square, resize of
the shortest edge, center crop), one visual token per patch, row-major, CLS dropped by the "default" strategy."""
from __future__ import annotations

import numpy as np

from ral_core.models.base import TokenGeometry, VLMAdapter, grid_boxes, register


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def resized_hw(ip, h: int, w: int, size=None) -> tuple[int, int]:
    """(height, width) that a transformers PIL image processor's `resize` produces for an h×w input; mirrors
    `PilBackend.resize` branch by branch, using the same transformers helpers so the rounding is identical."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    size = ip.size if size is None else size
    se, le = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if se and le:
        return tuple(get_size_with_aspect_ratio((h, w), se, le))
    if se:
        shape_only = np.broadcast_to(np.zeros((), np.uint8), (1, h, w))  # the helper only reads the shape
        return tuple(get_resize_output_image_size(shape_only, size=se, default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))
    if _get(size, "max_height") and _get(size, "max_width"):
        return tuple(get_image_size_for_max_height_width((h, w), _get(size, "max_height"), _get(size, "max_width")))
    return int(_get(size, "height")), int(_get(size, "width"))


@register
class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)

    @property
    def patch(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def keeps_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "full"

    def prompt_ids(self, n_image_tokens, question, extra=None):
        tok = self.tokenizer
        text = f"USER: {tok.convert_ids_to_tokens(self.image_token_id) * int(n_image_tokens)}\n{question} ASSISTANT:"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids

    def _meta(self, W: int, H: int) -> dict:
        """Per-axis affine map processed pixel → original pixel: x = (u + crop_off) · scale − pad_off."""
        ip = self.image_processor
        pad_x = pad_y = 0
        h, w = H, W
        if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):  # LLaVA pads before resizing
            m = max(H, W)
            pad_x, pad_y = ((m - W) // 2, 0) if H > W else (0, (m - H) // 2)
            h = w = m
        rh, rw = resized_hw(ip, h, w) if ip.do_resize else (h, w)
        if ip.do_center_crop:
            ch, cw = int(ip.crop_size.height), int(ip.crop_size.width)
            off_y, off_x = (rh - ch) // 2, (rw - cw) // 2  # np center_crop's offsets; negative = zero padding
        else:
            ch, cw, off_y, off_x = rh, rw, 0, 0
        p = self.patch
        return {"processed": [cw, ch], "resized": [rw, rh], "crop_offset": [off_x, off_y],
                "pad_offset": [pad_x, pad_y], "scale": [w / rw, h / rh], "grid": [ch // p, cw // p], "patch": p}

    def process_images(self, images):
        out = self.image_processor(images=list(images), return_tensors="pt")
        pv = out["pixel_values"]
        meta = [self._meta(*im.size) for im in images]
        p = self.patch
        n = (pv.shape[-2] // p) * (pv.shape[-1] // p) + int(self.keeps_cls)
        return {"tensors": {"pixel_values": pv}, "n_tokens": [n] * len(images), "meta": meta}

    def geometry_from_meta(self, image_size, meta):
        W, H = image_size
        rows, cols = meta["grid"]
        p = meta["patch"]
        (ox, oy), (px, py), (sx, sy) = meta["crop_offset"], meta["pad_offset"], meta["scale"]
        b = grid_boxes(rows, cols, p, p, ox, oy)  # in resized-image pixels
        b[:, [0, 2]] = b[:, [0, 2]] * sx - px
        b[:, [1, 3]] = b[:, [1, 3]] * sy - py
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, W)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, H)
        groups = [{"name": "image", "start": 0, "rows": rows, "cols": cols, "resized": meta["resized"]}]
        if self.keeps_cls:  # CLS comes first and summarises the whole visible region
            vis = np.array([[b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]])
            b = np.concatenate([vis, b])
            groups = [{"name": "cls", "start": 0, "rows": 1, "cols": 1}, {**groups[0], "start": 1}]
        return TokenGeometry((W, H), b, groups)
