"""Shape twins of real vision-language models: the published `config.json` and preprocessing settings (stored in
`assets/twins/<name>/`, with a SOURCE.md saying where each number comes from), built offline with the real
transformers class and random weights, the family's real image processor and a tokenizer with the real vocabulary
size and special-token ids (`ral_core.builders.tiny` builders). No weights are stored: a twin has a real model's
shapes and costs, not its answers. Used by the bench (`bench/real_bench.py`), never by the tests.

    from ral_core.builders.twins import build_twin
    adapter = build_twin("qwen2_vl_2b", dtype=torch.bfloat16)                 # full depth, ~2.2 B parameters
    small = build_twin("qwen2_vl_2b", text_layers=1, vision_depth=1)          # real width, one decoder layer

`text_layers` / `vision_depth` cut the depth (real width kept) for per-layer measurements; for Qwen3.5 the cut keeps
the last `text_layers` entries of `layer_types`, so one layer is a softmax-attention layer.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

TWINS_DIR = Path(__file__).resolve().parents[2] / "assets" / "twins"

# name → (hub repo id of the model it copies, builder family)
TWINS: dict[str, tuple[str, str]] = {
    "smolvlm_256m": ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3"),
    "qwen2_vl_2b": ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
    "qwen2_5_vl_3b": ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl"),
    "qwen3_vl_2b": ("Qwen/Qwen3-VL-2B-Instruct", "qwen3_vl"),
    "qwen3_5_0_8b": ("Qwen/Qwen3.5-0.8B", "qwen3_5"),
}


def twin_names() -> list[str]:
    return list(TWINS)


def _check(name: str) -> None:
    if name not in TWINS:
        raise ValueError(f"unknown twin '{name}'; choose one of {', '.join(TWINS)}")


def twin_files(name: str) -> dict:
    """The stored settings of a twin: {'config': …, 'preprocessor': …, 'processor': … or {}} (dicts as published)."""
    _check(name)
    d = TWINS_DIR / name
    read = lambda f: json.loads((d / f).read_text()) if (d / f).exists() else {}  # noqa: E731
    return {"config": read("config.json"), "preprocessor": read("preprocessor_config.json"),
            "processor": read("processor_config.json"), "special_tokens": read("special_tokens.json")}


def _text(cfg: dict) -> dict:
    """The text part of a config (nested `text_config`, or the top level in the older flat Qwen2-VL layout)."""
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg


def twin_config(name: str, text_layers: int | None = None, vision_depth: int | None = None) -> dict:
    """The published config, optionally cut to `text_layers` decoder layers and `vision_depth` vision blocks (width,
    heads, vocabulary unchanged)."""
    cfg = copy.deepcopy(twin_files(name)["config"])
    family = TWINS[name][1]
    t, v = _text(cfg), cfg["vision_config"]
    if text_layers is not None:
        n = int(t["num_hidden_layers"])
        k = max(1, min(int(text_layers), n))
        t["num_hidden_layers"] = k
        if "layer_types" in t:  # hybrid (Qwen3.5): the last k entries, so k = 1 is one softmax-attention layer
            t["layer_types"] = t["layer_types"][n - k:]
        if "max_window_layers" in t:
            t["max_window_layers"] = min(int(t["max_window_layers"]), k)
    if vision_depth is not None:
        key = "num_hidden_layers" if family == "idefics3" else "depth"
        k = max(1, min(int(vision_depth), int(v[key])))
        v[key] = k
        if "fullatt_block_indexes" in v:  # Qwen2.5-VL: windowed blocks with full attention at these indexes
            v["fullatt_block_indexes"] = sorted({i for i in v["fullatt_block_indexes"] if i < k} | {k - 1})
        if v.get("deepstack_visual_indexes"):  # Qwen3-VL: features of these blocks feed the first decoder layers
            keep = [i for i in v["deepstack_visual_indexes"] if i < k] or [k - 1]
            v["deepstack_visual_indexes"] = keep[:int(t["num_hidden_layers"])]
    if text_layers is not None and v.get("deepstack_visual_indexes"):
        v["deepstack_visual_indexes"] = v["deepstack_visual_indexes"][:int(t["num_hidden_layers"])]
    return cfg


def _qwen_image_processor(pre: dict):
    """Qwen2-VL's image processor (PIL build: torchvision is not installed) with the published pixel range, patch,
    merge and normalisation. Qwen2/2.5-VL publish min_pixels/max_pixels, Qwen3-VL/3.5 a `size` dict."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    size = pre.get("size") or {}
    lo = int(pre.get("min_pixels") or size["shortest_edge"])
    hi = int(pre.get("max_pixels") or size["longest_edge"])
    ip = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi, patch_size=pre["patch_size"],
                                  merge_size=pre["merge_size"], temporal_patch_size=pre["temporal_patch_size"],
                                  image_mean=pre["image_mean"], image_std=pre["image_std"])
    ip.size = {"shortest_edge": lo, "longest_edge": hi}
    return ip


def _idefics3_image_processor(pre: dict):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    keys = ("do_convert_rgb", "do_image_splitting", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean",
            "image_std", "max_image_size", "resample", "rescale_factor", "size")
    return Idefics3ImageProcessorPil(**{k: pre[k] for k in keys if k in pre})


def build_twin(name: str, text_layers: int | None = None, vision_depth: int | None = None, dtype=None,
               attn: str = "sdpa", seed: int = 0, device=None, meta: bool = False, tokenizer_cache=None):
    """The twin's adapter: real model class at the published shapes (random weights, `seed`), the family's image
    processor at the published settings, a tokenizer of the config's vocabulary size with the family's special
    tokens at the config's ids. `meta=True` builds the weights on the meta device (shapes and parameter counts, no
    memory, cannot run). `tokenizer_cache`: a folder where the built tokenizer is kept and reused (a 150 k-entry
    vocabulary takes seconds to assemble)."""
    import contextlib

    import torch

    from ral_core.builders.tiny import (IDEFICS3_SPECIALS, QWEN_SPECIALS, build_tokenizer, tiny_idefics3, tiny_qwen2_vl,
                                      tiny_qwen3_5)

    repo, family = TWINS[name] if name in TWINS else _check(name)
    files = twin_files(name)
    cfg = twin_config(name, text_layers, vision_depth)
    vocab = int(_text(cfg).get("vocab_size") or cfg["vocab_size"])
    tok = None
    if tokenizer_cache is not None and (Path(tokenizer_cache) / name / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast.from_pretrained(str(Path(tokenizer_cache) / name))
    if tok is None or len(tok) != vocab:
        # the family's special tokens at the ids of the published tokenizer (special_tokens.json), the rest filler
        if family == "idefics3":
            tok = build_tokenizer(IDEFICS3_SPECIALS, vocab_size=vocab, eos="<end_of_utterance>", pad="<|endoftext|>",
                                  ids=files["special_tokens"])
        else:
            tok = build_tokenizer(QWEN_SPECIALS, vocab_size=vocab, ids=files["special_tokens"])
        if tokenizer_cache is not None:
            tok.save_pretrained(str(Path(tokenizer_cache) / name))
    kw = dict(config=cfg, attn=attn, seed=seed, dtype=dtype, tokenizer=tok)
    # random initialisation straight on the device (a GPU initialises billions of weights in a moment)
    ctx = torch.device("meta" if meta else device) if (meta or device is not None) else contextlib.nullcontext()
    with ctx:
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            a = tiny_qwen2_vl(variant=family, **kw)
        elif family == "qwen3_5":
            a = tiny_qwen3_5(**kw)
        elif family == "idefics3":
            a = tiny_idefics3(variant="idefics3", **kw)
        else:  # pragma: no cover
            raise ValueError(family)
    pre = files["preprocessor"]
    a.image_processor = _idefics3_image_processor(pre) if family == "idefics3" else _qwen_image_processor(pre)
    if family == "idefics3":
        seq = files["processor"].get("image_seq_len")
        if seq is not None and seq != a.image_seq_len:
            raise ValueError(f"{name}: processor image_seq_len {seq} differs from the config's {a.image_seq_len}")
    a.name = f"twin:{name} (random weights, shapes of {repo})"
    if device is not None and not meta:
        a.model.to(device)
    return a


def parameter_count(adapter) -> int:
    return sum(p.numel() for p in adapter.model.parameters())


def describe(name: str) -> dict:
    """Shape facts of a twin from its stored config (no model built)."""
    cfg = twin_files(name)["config"]
    t = _text(cfg)
    layers = int(t["num_hidden_layers"])
    types = t.get("layer_types")
    attn_layers = sum(x == "full_attention" for x in types) if types else layers
    heads = int(t["num_attention_heads"])
    return {"name": name, "repo": TWINS[name][0], "family": TWINS[name][1], "hidden": int(t["hidden_size"]),
            "layers": layers, "attn_layers": attn_layers, "heads": heads,
            "kv_heads": int(t.get("num_key_value_heads") or heads),
            "head_dim": int(t.get("head_dim") or int(t["hidden_size"]) // heads),
            "intermediate": int(t["intermediate_size"]), "vocab": int(t.get("vocab_size") or cfg.get("vocab_size"))}
