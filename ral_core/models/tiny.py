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
    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=2,
                                  temporal_patch_size=2)
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2VLAdapter(model.eval(), tok, ip, name=f"tiny-{variant}")


LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
IDEFICS3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                      "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


def _llama_text(tok, hidden, layers, heads, kv_heads, eos, pad, bos=None):
    ids = {s: tok.convert_tokens_to_ids(s) for s in (eos, pad)}
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=tok.convert_tokens_to_ids(bos) if bos else None, eos_token_id=ids[eos],
                pad_token_id=ids[pad], tie_word_embeddings=True)


def tiny_llava(hidden=64, layers=2, heads=4, kv_heads=2, vision_layers=2, vision_dim=32, patch=8, crop=64,
               shortest_edge=72, do_pad=False, attn="sdpa", seed=0, tokenizer=None):
    """A tiny random LLaVA-1.5 (CLIP tower, Llama LM with GQA, `default` strategy) and its adapter. The image
    processor resizes the shortest edge to `shortest_edge` and center-crops `crop`² (or pads to square first)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from ral_core.models.llava import LlavaAdapter

    tok = tokenizer or build_tokenizer(LLAVA_SPECIALS, eos="</s>", pad="<pad>")
    tok.bos_token = "<s>"
    vis = dict(model_type="clip_vision_model", hidden_size=vision_dim, intermediate_size=vision_dim * 2,
               num_hidden_layers=vision_layers, num_attention_heads=2, patch_size=patch, image_size=crop,
               projection_dim=vision_dim)
    cfg = LlavaConfig(vision_config=vis, text_config=_llama_text(tok, hidden, layers, heads, kv_heads, "</s>", "<pad>", "<s>"),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(crop // patch) ** 2,
                      vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = LlavaImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop},
                                do_pad=do_pad)
    return LlavaAdapter(model.eval(), tok, ip, name="tiny-llava")


def tiny_idefics3(hidden=64, layers=2, heads=4, kv_heads=2, vision_layers=1, vision_dim=32, patch=8, tile=64,
                  scale_factor=2, longest_edge=128, attn="sdpa", seed=0, tokenizer=None, variant="idefics3"):
    """A tiny random Idefics3 (SigLIP-like tower, pixel shuffle, Llama LM with GQA) and its adapter. Images are
    resized to `longest_edge`, split into `tile`² tiles plus a global image; (tile/patch/scale)² tokens each.
    `variant="smolvlm"` builds the same thing with the SmolVLM2 classes."""
    import torch

    from ral_core.models.idefics3 import Idefics3Adapter

    if variant == "idefics3":
        from transformers import Idefics3Config as Config, Idefics3ForConditionalGeneration as Model
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Proc
    elif variant == "smolvlm":
        from transformers import SmolVLMConfig as Config, SmolVLMForConditionalGeneration as Model
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Proc
    else:
        raise ValueError(variant)

    tok = tokenizer or build_tokenizer(IDEFICS3_SPECIALS, eos="<end_of_utterance>", pad="<|endoftext|>")
    tok.bos_token = "<|im_start|>"
    vis = dict(hidden_size=vision_dim, intermediate_size=vision_dim * 2, num_hidden_layers=vision_layers,
               num_attention_heads=2, patch_size=patch, image_size=tile)
    text = _llama_text(tok, hidden, layers, heads, kv_heads, "<end_of_utterance>", "<|endoftext|>", "<|im_start|>")
    cfg = Config(vision_config=vis, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                 scale_factor=scale_factor, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Model._from_config(cfg, attn_implementation=attn)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = Proc(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile})
    return Idefics3Adapter(model.eval(), tok, ip, name=f"tiny-{variant}")


def tiny_smolvlm(**kwargs):
    """A tiny random SmolVLM2 (model_type `smolvlm`): `tiny_idefics3` with the SmolVLM classes, same sizes."""
    return tiny_idefics3(variant="smolvlm", **kwargs)


TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "idefics3", "smolvlm", "qwen3_5", "gemma3")


def tiny_adapter(family: str, **kwargs):
    """A tiny adapter of any supported family, by name (one of `TINY_FAMILIES`)."""
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return tiny_qwen2_vl(variant=family, **kwargs)
    if family == "llava":
        return tiny_llava(**kwargs)
    if family == "idefics3":
        return tiny_idefics3(**kwargs)
    if family == "smolvlm":
        return tiny_smolvlm(**kwargs)
    if family == "qwen3_5":
        return tiny_qwen3_5(**kwargs)
    if family == "gemma3":
        return tiny_gemma3(**kwargs)
    raise ValueError(f"unknown tiny family '{family}'; choose one of {', '.join(TINY_FAMILIES)}")


# ---- Qwen3.5 and Gemma 3 ------------------------------------------------------------------------------------------

def tiny_qwen3_5(hidden=64, layers=8, heads=4, kv_heads=2, head_dim=32, full_attention_interval=4, vision_depth=1,
                 vision_dim=32, min_pixels=32 * 32, max_pixels=448 * 448, attn="sdpa", seed=0, tokenizer=None):
    """A tiny random Qwen3.5 (hybrid LM: gated-DeltaNet layers with softmax attention every
    `full_attention_interval`-th layer, the last included; Qwen3-VL-style tower, patch 16) and its adapter."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ral_core.models.qwen3_5 import Qwen3_5Adapter

    tok = tokenizer or build_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    # Qwen3.5 rotates a quarter of each head (partial_rotary_factor 0.25) with interleaved t/h/w sections.
    rot_half = int(head_dim * 0.25) // 2
    sec = [rot_half - 2 * (rot_half // 4), rot_half // 4, rot_half // 4]
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4, max_position_embeddings=4096,
                layer_types=["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                             for i in range(layers)],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec,
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vis = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=vision_dim * 2,
               num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    cfg = Qwen3_5Config(text_config=text, vision_config=vis, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16, merge_size=2,
                                  temporal_patch_size=2)
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen3_5Adapter(model.eval(), tok, ip, name="tiny-qwen3_5")


GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]


def tiny_gemma3(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=2,
                vision_layers=1, vision_dim=32, patch=8, image_size=64, tokens_per_image=16, attn="sdpa", seed=0,
                tokenizer=None):
    """A tiny random Gemma 3 (SigLIP tower, avg-pooled to `tokens_per_image` tokens; Gemma 3 LM with sliding-window
    layers, every `sliding_window_pattern`-th layer global, and the bidirectional image-token mask) and its
    adapter. The image processor stretches every image to `image_size`² (pan-and-scan off)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ral_core.models.gemma3 import Gemma3Adapter

    tok = tokenizer
    if tok is None:  # named image tokens (boi/eoi/image_token) as Gemma's tokenizer has them, for Gemma3Processor
        from transformers import PreTrainedTokenizerFast

        base = build_tokenizer(GEMMA3_SPECIALS, eos="<end_of_turn>", pad="<pad>")
        named = {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>"}
        tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, **named,
                                      extra_special_tokens=[s for s in GEMMA3_SPECIALS if s not in named.values()],
                                      boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                      image_token="<image_soft_token>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in GEMMA3_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                query_pre_attn_scalar=head_dim, sliding_window=sliding_window, max_position_embeddings=4096,
                layer_types=["full_attention" if (i + 1) % sliding_window_pattern == 0 else "sliding_attention"
                             for i in range(layers)],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                bos_token_id=ids["<bos>"], eos_token_id=ids["<end_of_turn>"], pad_token_id=ids["<pad>"])
    vis = dict(model_type="siglip_vision_model", hidden_size=vision_dim, intermediate_size=vision_dim * 2,
               num_hidden_layers=vision_layers, num_attention_heads=2, patch_size=patch, image_size=image_size)
    cfg = Gemma3Config(text_config=text, vision_config=vis, mm_tokens_per_image=tokens_per_image,
                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                       image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    # transformers initialises the image projection to zeros, which would make every visual token the same vector
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, vision_dim ** -0.5)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, do_pan_and_scan=False,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Adapter(model.eval(), tok, ip, name="tiny-gemma3")
