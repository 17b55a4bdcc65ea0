"""Offline builders for tiny real-architecture models: a byte-level BPE tokenizer trained in ~1 s and small
configs of the real transformers classes. Used by tests and by `make default-model` (no hub access)."""
from __future__ import annotations

# The training corpus names the ordinals itself (not the task module): builders never import the task data.
_ORDINALS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _corpus() -> list[str]:
    words = ("What digit is in row column ? Where is the How many s are there Read . Which is larger , or "
             "first second same and user assistant system You are a helpful The answer image question look at "
             "zero one two three four five six seven eight nine ten yes no left right top bottom middle "
             + " ".join(_ORDINALS))
    lines = [words]
    for r in range(1, 10):
        for c in range(1, 10):
            lines.append(f"What digit is in row {r} column {c}? row {r} column {c}")
    lines += [f"How many {d}s are there? Where is the {d}? Read row {d}." for d in range(10)]
    return lines * 4


def build_tokenizer(specials=QWEN_SPECIALS, vocab_size: int = 400, eos="<|im_end|>", pad="<|endoftext|>",
                    ids: dict[str, int] | None = None):
    """A byte-level BPE (every string encodes) with single-digit tokens, wrapped as a fast HF tokenizer, with exactly
    `vocab_size` tokens. The corpus yields ~420; above that the rest are `<unused_k>` entries that no merge produces
    (so text encodes the same at any size). `ids` pins special tokens to given ids (a real config's image/eos ids)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() > vocab_size:  # the byte alphabet and the specials alone do not fit
        raise ValueError(f"vocab_size {vocab_size} is too small: the byte alphabet and {len(specials)} special tokens "
                         f"need {tok.get_vocab_size()}")
    if tok.get_vocab_size() < vocab_size or ids:
        tok = Tokenizer.from_str(json.dumps(_resize_vocab(json.loads(tok.to_str()), vocab_size, ids or {})))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[s for s in specials if s not in (eos, pad)])


def _resize_vocab(spec: dict, size: int, ids: dict[str, int]) -> dict:
    """A serialized BPE tokenizer renumbered to `size` ids: `ids` (token → id) first, the trained tokens in their
    order on the free ids, then `<unused_k>` fillers. Merges name tokens by string, so encoding is unchanged."""
    vocab = spec["model"]["vocab"]
    bad = {t: i for t, i in ids.items() if t not in vocab or not 0 <= i < size}
    if bad or len(set(ids.values())) < len(ids):
        raise ValueError(f"cannot place special tokens at {ids} in a vocabulary of {size} (unknown, out of range or "
                         "shared ids)")
    new = dict(ids)
    free = (i for i in range(size) if i not in set(ids.values()))
    for t in sorted(vocab, key=vocab.get):
        if t not in new:
            new[t] = next(free)
    new.update({f"<unused_{k}>": i for k, i in enumerate(free)})
    spec["model"]["vocab"] = new
    for a in spec["added_tokens"]:
        a["id"] = new[a["content"]]
    return spec


def _deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` written in; nested dicts (text_config, rope_parameters, …) are merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _node(d: dict, path: str) -> tuple[dict, str]:
    """(dict, key) holding 'text_config.x' in a config dict; configs in the older flat layout keep text fields at the
    top."""
    head, _, key = path.rpartition(".")
    node = d.get(head, d) if head else d
    return (node if isinstance(node, dict) else d), key


def _field(d: dict, path: str):
    node, key = _node(d, path)
    return node.get(key)


def _config_dict(config) -> dict:
    """A whole config as a dict: a transformers config, a dict, a config.json path or a directory holding one."""
    import copy
    import json
    from pathlib import Path

    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return copy.deepcopy(config)
    p = Path(config)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())


def _assemble(defaults: dict, fields: dict, config, token_fields: dict[str, str], make_tokenizer, tokenizer,
              vocab_size):
    """(config dict, tokenizer) of a builder. `config` (a whole config, taken as is) or `fields` (merged into the tiny
    `defaults`, so any field of the real config can be set). Without a tokenizer one is built with the config's
    vocab size and the special tokens named by `token_fields` (config path → token) at the config's ids; then those
    fields and the vocab size are written from the tokenizer, so `vocab_size == len(tokenizer)` always holds."""
    src = _config_dict(config) if config is not None else fields  # what the caller asked for
    d = _config_dict(config) if config is not None else _deep_merge(defaults, fields)
    asked = _field(src, "text_config.vocab_size") or vocab_size
    if tokenizer is None:
        pins = {}
        for path, t in token_fields.items():  # the first field naming an id wins it; a clash goes to a free id
            i = _field(src, path)
            if isinstance(i, int) and t not in pins and i not in pins.values():
                pins[t] = i
        tokenizer = make_tokenizer(vocab_size=asked or 400, ids=pins or None)
    elif asked and asked != len(tokenizer):
        raise ValueError(f"vocab_size {asked} differs from the given tokenizer's {len(tokenizer)} tokens")
    node, key = _node(d, "text_config.vocab_size")
    node[key] = len(tokenizer)
    for path, t in token_fields.items():
        node, key = _node(d, path)
        if isinstance(node.get(key), list) or (key in node and node[key] is None):
            continue  # several EOS ids, or no such token (Qwen has no BOS): kept as written
        node[key] = tokenizer.convert_tokens_to_ids(t)
    return d, tokenizer


QWEN_TOKEN_FIELDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                     "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                     "text_config.eos_token_id": "<|im_end|>", "text_config.pad_token_id": "<|endoftext|>",
                     "text_config.bos_token_id": "<|endoftext|>"}


def _mrope_section(head_dim: int) -> list[int]:
    """t/h/w rotary sections summing to head_dim/2."""
    return [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]


def tiny_qwen2_vl(hidden=64, layers=2, heads=4, kv_heads=2, vision_depth=1, vision_dim=32, variant="qwen2_vl",
                  min_pixels=28 * 28, max_pixels=448 * 448, attn="sdpa", seed=0, tokenizer=None, config=None,
                  vocab_size=None, dtype=None, **fields):
    """A random Qwen2-VL / Qwen2.5-VL / Qwen3-VL with the real classes, and its adapter; tiny unless told otherwise.

    Any field of the real config can be set: `text_config={...}`, `vision_config={...}` and top-level fields are
    merged into the tiny defaults (e.g. `text_config={"intermediate_size": 8960, "rope_parameters": {"rope_theta":
    1e6}}`); `config=` takes a whole config (dict, config.json or its directory) as is. The tokenizer has the
    config's vocab size, special tokens at the config's ids. `dtype` builds the weights in that dtype."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    from ral_core.models.qwen2_vl import Qwen2VLAdapter

    t = fields.get("text_config") or {}
    hidden, heads = t.get("hidden_size", hidden), t.get("num_attention_heads", heads)
    hd = t.get("head_dim") or hidden // heads
    text = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(hd)},
                bos_token_id=None, tie_word_embeddings=True)
    patch = 14
    if variant == "qwen2_vl":
        vis = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                   patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
        Config, cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif variant == "qwen2_5_vl":
        vis = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=vision_dim * 2,
                   num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                   fullatt_block_indexes=[0])
        Config, cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    elif variant == "qwen3_vl":
        patch = 16
        text = dict(text, head_dim=hd, rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True))
        vis = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=vision_dim * 2,
                   num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                   num_position_embeddings=64, deepstack_visual_indexes=[0])
        Config, cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    else:
        raise ValueError(variant)
    d, tok = _assemble({"text_config": text, "vision_config": vis}, fields, config, QWEN_TOKEN_FIELDS, build_tokenizer,
                       tokenizer, vocab_size)
    cfg = Config.from_dict(d) if config is not None else Config(**d)
    model = _model(cls, cfg, attn, seed, dtype)
    return _qwen_adapter(Qwen2VLAdapter, model, tok, cfg, min_pixels, max_pixels, f"tiny-{variant}")


def _qwen_adapter(Adapter, model, tok, cfg, min_pixels, max_pixels, name):
    """A Qwen-family model with its chat stop and pad tokens set and an image processor on its vision grid."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    v = cfg.vision_config
    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=v.patch_size,
                                  merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Adapter(model.eval(), tok, ip, name=name)


LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
IDEFICS3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                      "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


def _llama_text(hidden, layers, heads, kv_heads, fields):
    """Tiny Llama text-config defaults (token ids and vocab size come from the tokenizer, in `_assemble`)."""
    t = fields.get("text_config") or {}
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=t.get("hidden_size", hidden) * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=True)


LLAVA_TOKEN_FIELDS = {"image_token_index": "<image>", "text_config.bos_token_id": "<s>",
                      "text_config.eos_token_id": "</s>", "text_config.pad_token_id": "<pad>"}
IDEFICS3_TOKEN_FIELDS = {"image_token_id": "<image>", "text_config.bos_token_id": "<|im_start|>",
                         "text_config.eos_token_id": "<end_of_utterance>", "text_config.pad_token_id": "<|endoftext|>"}


def _model(Model, cfg, attn, seed, dtype):
    import torch
    torch.manual_seed(seed)
    return Model._from_config(cfg, attn_implementation=attn, **({"dtype": dtype} if dtype is not None else {}))


def tiny_llava(hidden=64, layers=2, heads=4, kv_heads=2, vision_layers=2, vision_dim=32, patch=8, crop=64,
               shortest_edge=72, do_pad=False, attn="sdpa", seed=0, tokenizer=None, config=None, vocab_size=None,
               dtype=None, **fields):
    """A random LLaVA-1.5 (CLIP tower, Llama LM with GQA, `default` strategy) and its adapter; tiny unless told
    otherwise (`text_config=`, `vision_config=`, top-level fields or a whole `config=`, as in `tiny_qwen2_vl`). The image
    processor resizes the shortest edge to `shortest_edge` and center-crops to the tower's image size (`crop`), or pads
    to square first."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from ral_core.models.llava import LlavaAdapter

    v = fields.get("vision_config") or {}
    vis = dict(model_type="clip_vision_model", hidden_size=vision_dim, intermediate_size=vision_dim * 2,
               num_hidden_layers=vision_layers, num_attention_heads=2, patch_size=patch, image_size=crop,
               projection_dim=vision_dim)
    top = dict(text_config=_llama_text(hidden, layers, heads, kv_heads, fields), vision_config=vis,
               image_seq_length=(v.get("image_size", crop) // v.get("patch_size", patch)) ** 2,
               vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=True)
    d, tok = _assemble(top, fields, config, LLAVA_TOKEN_FIELDS,
                       lambda **kw: build_tokenizer(LLAVA_SPECIALS, eos="</s>", pad="<pad>", **kw), tokenizer, vocab_size)
    tok.bos_token = "<s>"
    cfg = LlavaConfig.from_dict(d) if config is not None else LlavaConfig(**d)
    model = _model(LlavaForConditionalGeneration, cfg, attn, seed, dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    side = cfg.vision_config.image_size
    ip = LlavaImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": side, "width": side},
                                do_pad=do_pad)
    return LlavaAdapter(model.eval(), tok, ip, name="tiny-llava")


def tiny_idefics3(hidden=64, layers=2, heads=4, kv_heads=2, vision_layers=1, vision_dim=32, patch=8, tile=64,
                  scale_factor=2, longest_edge=128, attn="sdpa", seed=0, tokenizer=None, variant="idefics3",
                  config=None, vocab_size=None, dtype=None, **fields):
    """A random Idefics3 (SigLIP-like tower, pixel shuffle, Llama LM with GQA) and its adapter; tiny unless told
    otherwise (`text_config=`, `vision_config=`, top-level fields or a whole `config=`, as in `tiny_qwen2_vl`). Images
    are resized to `longest_edge`, split into tiles of the tower's image size (`tile`)² plus a global image;
    (tile/patch/scale)² tokens each. `variant="smolvlm"` builds the same thing with the SmolVLM2 classes."""
    from ral_core.models.idefics3 import Idefics3Adapter

    if variant == "idefics3":
        from transformers import Idefics3Config as Config, Idefics3ForConditionalGeneration as Model
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Proc
    elif variant == "smolvlm":
        from transformers import SmolVLMConfig as Config, SmolVLMForConditionalGeneration as Model
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Proc
    else:
        raise ValueError(variant)

    vis = dict(hidden_size=vision_dim, intermediate_size=vision_dim * 2, num_hidden_layers=vision_layers,
               num_attention_heads=2, patch_size=patch, image_size=tile)
    top = dict(vision_config=vis, text_config=_llama_text(hidden, layers, heads, kv_heads, fields),
               scale_factor=scale_factor, tie_word_embeddings=True)
    d, tok = _assemble(top, fields, config, IDEFICS3_TOKEN_FIELDS,
                       lambda **kw: build_tokenizer(IDEFICS3_SPECIALS, eos="<end_of_utterance>", pad="<|endoftext|>",
                                                    **kw), tokenizer, vocab_size)
    tok.bos_token = "<|im_start|>"
    cfg = Config.from_dict(d) if config is not None else Config(**d)
    model = _model(Model, cfg, attn, seed, dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = Proc(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": cfg.vision_config.image_size})
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
                 vision_dim=32, min_pixels=32 * 32, max_pixels=448 * 448, attn="sdpa", seed=0, tokenizer=None,
                 config=None, vocab_size=None, dtype=None, **fields):
    """A random Qwen3.5 (hybrid LM: gated-DeltaNet layers with softmax attention every `full_attention_interval`-th
    layer, the last included; Qwen3-VL-style tower, patch 16) and its adapter; tiny unless told otherwise
    (`text_config=`, `vision_config=`, top-level fields or a whole `config=`, as in `tiny_qwen2_vl`)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from ral_core.models.qwen3_5 import Qwen3_5Adapter

    t = fields.get("text_config") or {}
    head_dim, layers = t.get("head_dim", head_dim), t.get("num_hidden_layers", layers)
    hidden = t.get("hidden_size", hidden)
    # Qwen3.5 rotates a quarter of each head (partial_rotary_factor 0.25) with interleaved t/h/w sections.
    rot_half = int(head_dim * 0.25) // 2
    sec = [rot_half - 2 * (rot_half // 4), rot_half // 4, rot_half // 4]
    text = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4, max_position_embeddings=4096,
                layer_types=["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                             for i in range(layers)],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec,
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25},
                bos_token_id=None)
    vis = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=vision_dim * 2,
               num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    d, tok = _assemble({"text_config": text, "vision_config": vis, "tie_word_embeddings": True}, fields, config,
                       QWEN_TOKEN_FIELDS, build_tokenizer, tokenizer, vocab_size)
    cfg = Qwen3_5Config.from_dict(d) if config is not None else Qwen3_5Config(**d)
    model = _model(Qwen3_5ForConditionalGeneration, cfg, attn, seed, dtype)
    return _qwen_adapter(Qwen3_5Adapter, model, tok, cfg, min_pixels, max_pixels, "tiny-qwen3_5")


GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]
GEMMA3_TOKEN_FIELDS = {"image_token_index": "<image_soft_token>", "boi_token_index": "<start_of_image>",
                       "eoi_token_index": "<end_of_image>", "text_config.bos_token_id": "<bos>",
                       "text_config.eos_token_id": "<end_of_turn>", "text_config.pad_token_id": "<pad>"}


def _gemma3_tokenizer(vocab_size=400, ids=None):
    """The tiny BPE with Gemma's named image tokens (boi/eoi/image_token), as Gemma3Processor expects them."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer(GEMMA3_SPECIALS, vocab_size=vocab_size, eos="<end_of_turn>", pad="<pad>", ids=ids)
    named = {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>"}
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, **named,
                                   extra_special_tokens=[s for s in GEMMA3_SPECIALS if s not in named.values()],
                                   boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                   image_token="<image_soft_token>")


def tiny_gemma3(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=2,
                vision_layers=1, vision_dim=32, patch=8, image_size=64, tokens_per_image=16, attn="sdpa", seed=0,
                tokenizer=None, config=None, vocab_size=None, dtype=None, **fields):
    """A random Gemma 3 (SigLIP tower, avg-pooled to `tokens_per_image` tokens; Gemma 3 LM with sliding-window
    layers, every `sliding_window_pattern`-th layer global, and the bidirectional image-token mask) and its
    adapter; tiny unless told otherwise (`text_config=`, `vision_config=`, top-level fields or a whole `config=`, as
    in `tiny_qwen2_vl`). The image processor stretches every image to the tower's image size (pan-and-scan off)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ral_core.models.gemma3 import Gemma3Adapter

    t = fields.get("text_config") or {}
    head_dim, layers = t.get("head_dim", head_dim), t.get("num_hidden_layers", layers)
    text = dict(hidden_size=hidden, intermediate_size=t.get("hidden_size", hidden) * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                query_pre_attn_scalar=head_dim, sliding_window=sliding_window, max_position_embeddings=4096,
                layer_types=["full_attention" if (i + 1) % sliding_window_pattern == 0 else "sliding_attention"
                             for i in range(layers)],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    vis = dict(model_type="siglip_vision_model", hidden_size=vision_dim, intermediate_size=vision_dim * 2,
               num_hidden_layers=vision_layers, num_attention_heads=2, patch_size=patch, image_size=image_size)
    top = dict(text_config=text, vision_config=vis, mm_tokens_per_image=tokens_per_image, tie_word_embeddings=True)
    d, tok = _assemble(top, fields, config, GEMMA3_TOKEN_FIELDS, _gemma3_tokenizer, tokenizer, vocab_size)
    cfg = Gemma3Config.from_dict(d) if config is not None else Gemma3Config(**d)
    model = _model(Gemma3ForConditionalGeneration, cfg, attn, seed, dtype)
    # transformers initialises the image projection to zeros, which would make every visual token the same vector
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, cfg.vision_config.hidden_size ** -0.5)
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<eos>", "<end_of_turn>", "<pad>")}
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    side = cfg.vision_config.image_size
    ip = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Adapter(model.eval(), tok, ip, name="tiny-gemma3")
