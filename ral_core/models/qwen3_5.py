"""Qwen3.5: the Qwen3-VL image path (Qwen2-VL processor, patch 16, 2×2 merge: the geometry of `qwen2_vl`) in front of a
hybrid language model. Only the decoder layers whose `config.layer_types` entry is `full_attention` (every 4th by
default, the last included) have softmax attention; the others are gated-DeltaNet linear attention with no attention
matrix to capture. `attention_layers` names the former, so 'all' and 'last' resolve among them."""
from __future__ import annotations

from ral_core.models.base import register
from ral_core.models.qwen2_vl import Qwen2VLAdapter


@register
class Qwen3_5Adapter(Qwen2VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)

    def prompt_ids(self, n_image_tokens, question, extra=None):
        ids = super().prompt_ids(n_image_tokens, question, extra)
        # Qwen3.5 thinks by default; its chat template with enable_thinking=False closes an empty think block, which
        # is the answer-only (RAL-zero) mode. Tokenizers without the think tokens (tiny test models) skip it.
        if "<think>" in self.tokenizer.get_vocab():
            ids += self.tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
        return ids
