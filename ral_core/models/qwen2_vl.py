"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution (smart resize to a multiple of patch×merge) and a
merge×merge patch merge, so visual token k covers one merge×merge block of the resized image, row-major."""
from __future__ import annotations

import torch

from ral_core.models.base import TokenGeometry, VLMAdapter, grid_boxes, register
from ral_core.models.pixels import size_value


@register
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

    @classmethod
    def fallback_image_processor(cls, path):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil.from_pretrained(path)

    @property
    def merge(self) -> int:
        return int(self.image_processor.merge_size)

    @property
    def patch(self) -> int:
        return int(self.image_processor.patch_size)

    def prompt_ids(self, n_image_tokens, question, extra=None):
        tok = self.tokenizer
        head = tok("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)["input_ids"]
        tail = tok(f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        return head + [self.image_token_id] * int(n_image_tokens) + tail

    def _pixel_range(self) -> tuple[int, int]:
        """(min, max) pixels of the smart resize, after the pixel budget."""
        size = self.image_processor.size
        lo, hi = int(size_value(size, "shortest_edge")), int(size_value(size, "longest_edge"))
        if self.max_pixels is not None:
            hi = max(min(hi, self.max_pixels), (self.patch * self.merge) ** 2)  # at least one token
            lo = min(lo, hi)
        return lo, hi

    def image_kwargs(self, image):
        # Smart resize already sizes small images by their pixels (pixels.SMALL_IMAGES): only the budget applies.
        if self.max_pixels is None:
            return {}
        lo, hi = self._pixel_range()
        return {"size": {"shortest_edge": lo, "longest_edge": hi}}

    def pixel_budget_note(self):
        f = self.patch * self.merge
        _, hi = self._pixel_range()
        return (f"at most {hi} pixels per image (smart resize to multiples of {f} px) → at most {hi // f ** 2} visual "
                "tokens")

    def process_images(self, images):
        images = list(images)
        out = self.image_processor(images=images, return_tensors="pt", **self.image_kwargs(images[0]))
        thw = out["image_grid_thw"]
        m2 = self.merge ** 2
        meta = [{"grid_thw": [int(x) for x in t]} for t in thw]
        return {"tensors": {"pixel_values": out["pixel_values"], "image_grid_thw": thw},
                "n_tokens": [int(t.prod()) // m2 for t in thw], "meta": meta}

    def geometry_from_meta(self, image_size, meta):
        _, gh, gw = meta["grid_thw"]
        W, H = image_size
        rh, rw = gh * self.patch, gw * self.patch  # resized size in pixels
        rows, cols = gh // self.merge, gw // self.merge
        f = self.patch * self.merge
        boxes = grid_boxes(rows, cols, f * W / rw, f * H / rh)
        return TokenGeometry((W, H), boxes, [{"name": "image", "start": 0, "rows": rows, "cols": cols,
                                              "resized": [rw, rh]}])

    def extra_model_inputs(self, input_ids):
        # M-RoPE needs to know which positions are image tokens.
        return {"mm_token_type_ids": (input_ids == self.image_token_id).to(torch.long)}
