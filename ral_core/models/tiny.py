"""Offline builders for tiny real-architecture models: a byte-level BPE tokenizer trained in ~1 s and small
configs of the real transformers classes. Used by tests and by `make default-model` (no hub access)."""
from __future__ import annotations

from ral_core.data.grounding import ORDINALS

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _corpus() -> list[str]:
    words = ("What digit is in row column ? Where is the How many s are there Read . Which is larger , or "
             "first second same and user assistant system You are a helpful The answer image question look at "
             "zero one two three four five six seven eight nine ten yes no left right top bottom middle "
             + " ".join(ORDINALS))
    lines = [words]
    for r in range(1, 10):
        for c in range(1, 10):
            lines.append(f"What digit is in row {r} column {c}? row {r} column {c}")
    lines += [f"How many {d}s are there? Where is the {d}? Read row {d}." for d in range(10)]
    return lines * 4


def build_tokenizer(specials=QWEN_SPECIALS, vocab_size: int = 400, eos="<|im_end|>", pad="<|endoftext|>"):
    """A byte-level BPE (every string encodes) with single-digit tokens, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[s for s in specials if s not in (eos, pad)])


def tiny_qwen2_vl(hidden=64, layers=2, heads=4, kv_heads=2, vision_depth=1, vision_dim=32, variant="qwen2_vl",
                  min_pixels=28 * 28, max_pixels=448 * 448, attn="sdpa", seed=0, tokenizer=None):
    """A tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL with the real classes, and its adapter."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ral_core.models.qwen2_vl import Qwen2VLAdapter

    tok = tokenizer or build_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    hd = hidden // heads
    sec = [hd // 2 - 2 * (hd // 6), hd // 6, hd // 6]  # t/h/w rotary sections summing to head_dim/2
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    patch = 14
    if variant == "qwen2_vl":
        vis = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                   patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vis, **common), Qwen2VLForConditionalGeneration
    elif variant == "qwen2_5_vl":
        vis = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=vision_dim * 2,
                   num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                   fullatt_block_indexes=[0])
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vis, **common), Qwen2_5_VLForConditionalGeneration
    elif variant == "qwen3_vl":
        patch = 16
        text3 = dict(text, head_dim=hd, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": sec, "mrope_interleaved": True})
        vis = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=vision_dim * 2,
                   num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                   num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg, cls = Qwen3VLConfig(text_config=text3, vision_config=vis, **common), Qwen3VLForConditionalGeneration
    else:
        raise ValueError(variant)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    f = patch * 2
    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=2,
                                  temporal_patch_size=2)
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    del f
    return Qwen2VLAdapter(model.eval(), tok, ip, name=f"tiny-{variant}")
