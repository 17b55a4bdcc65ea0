"""Gemma 3 (Gemma3ForConditionalGeneration): every image is stretched to one fixed square (896² in the released models;
pan-and-scan off), SigLIP cuts it into p×p patches and the projector average-pools them to `mm_tokens_per_image`
tokens (256 = 16×16), so visual token k covers cell (k // s, k % s) of an s×s grid over the whole image.

The language model lets the tokens of one image attend to each other bidirectionally (built from `token_type_ids`)
and alternates sliding-window and global layers; capture reads the masks transformers builds for each layer type,
so both are kept."""
from __future__ import annotations

import math

import torch

from ral_core.models.base import TokenGeometry, VLMAdapter, grid_boxes, register


@register
class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)

    @classmethod
    def fallback_image_processor(cls, path):
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        return Gemma3ImageProcessorPil.from_pretrained(path)

    @property
    def side(self) -> int:
        """Tokens per image side."""
        return math.isqrt(int(self.model.config.mm_tokens_per_image))

    def _tok(self, name: str, default: str) -> str:
        return getattr(self.tokenizer, name, None) or default

    def prompt_ids(self, n_image_tokens, question, extra=None):
        tok = self.tokenizer
        # Gemma3Processor expands the chat template's <start_of_image> into this block.
        img = tok.convert_ids_to_tokens(self.image_token_id) * int(n_image_tokens)
        image = f"\n\n{self._tok('boi_token', '<start_of_image>')}{img}{self._tok('eoi_token', '<end_of_image>')}\n\n"
        text = f"<start_of_turn>user\n{image}{question}<end_of_turn>\n<start_of_turn>model\n"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids

    @property
    def end_of_answer_id(self) -> int:
        # A chat turn ends with <end_of_turn> (the released tokenizers' eos_token is <eos>, which ends the document).
        end = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if end is None or end == self.tokenizer.unk_token_id:
            end = self.tokenizer.eos_token_id
        return end

    def process_images(self, images):
        out = self.image_processor(images=list(images), return_tensors="pt", do_pan_and_scan=False)
        n = int(self.model.config.mm_tokens_per_image)
        meta = [{"side": self.side, "processed": list(out["pixel_values"].shape[-2:])} for _ in images]
        return {"tensors": {"pixel_values": out["pixel_values"]}, "n_tokens": [n] * len(images), "meta": meta}

    def geometry_from_meta(self, image_size, meta):
        # The resize stretches edge to edge, so the pooled s×s grid maps onto the original image as an s×s grid.
        W, H = image_size
        s = meta["side"]
        return TokenGeometry((W, H), grid_boxes(s, s, W / s, H / s),
                             [{"name": "image", "start": 0, "rows": s, "cols": s, "resized": meta["processed"][::-1]}])

    def extra_model_inputs(self, input_ids):
        # Marks image tokens: Gemma 3 builds its bidirectional image-block mask from these.
        return {"token_type_ids": (input_ids == self.image_token_id).to(torch.long)}
