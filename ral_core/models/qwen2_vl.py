"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution (smart resize to a multiple of patch×merge) and a
merge×merge patch merge, so visual token k covers one merge×merge block of the resized image, row-major."""
from __future__ import annotations

import torch

from ral_core.models.base import TokenGeometry, VLMAdapter, grid_boxes, register


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

    def process_images(self, images):
        out = self.image_processor(images=list(images), return_tensors="pt")
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
