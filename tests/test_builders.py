"""Offline builders at any shape: every config field reaches the real config, a whole config loads as is, and the
tokenizer has exactly the requested vocabulary with the family's special tokens (tiny sizes only here)."""
import json

import pytest
import torch

from ral_core.builders.tiny import (GEMMA3_SPECIALS, IDEFICS3_SPECIALS, LLAVA_SPECIALS, QWEN_SPECIALS, TINY_FAMILIES,
                                  build_tokenizer, tiny_adapter, tiny_qwen2_vl)

SPECIALS = {"qwen2_vl": QWEN_SPECIALS, "qwen2_5_vl": QWEN_SPECIALS, "qwen3_vl": QWEN_SPECIALS, "qwen3_5": QWEN_SPECIALS,
            "llava": LLAVA_SPECIALS, "idefics3": IDEFICS3_SPECIALS, "smolvlm": IDEFICS3_SPECIALS,
            "gemma3": GEMMA3_SPECIALS}
TEXT = "What digit is in row 2 column 3? Read row 1."


def _forward_ok(a, task):
    s = task.sample(0)
    b = a.build_inputs([s.image], [s.question], [s.answer])
    with torch.no_grad():
        logits = a.model(**b["model_inputs"]).logits
    assert logits.shape[-1] == len(a.tokenizer) and torch.isfinite(logits).all()


def test_builder_fields_reach_the_config(task):
    a = tiny_qwen2_vl(text_config={"intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 4,
                                   "rope_parameters": {"rope_theta": 1_000_000.0}},
                      vision_config={"num_heads": 4, "mlp_ratio": 3, "embed_dim": 48}, vocab_size=600)
    t, v = a.model.config.text_config, a.model.config.vision_config
    assert (t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (96, 8, 4)
    assert t.rope_parameters["rope_theta"] == 1_000_000.0
    assert sum(t.rope_parameters["mrope_section"]) == (64 // 8) // 2  # sections follow the new head size
    assert (v.num_heads, v.mlp_ratio, v.embed_dim) == (4, 3, 48)
    mlp = a.model.model.language_model.layers[0].mlp
    assert mlp.gate_proj.out_features == 96  # the weights really have the shape, not just the config
    assert t.vocab_size == len(a.tokenizer) == 600
    _forward_ok(a, task)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_takes_fields_and_vocab(family, task):
    a = tiny_adapter(family, vocab_size=1000, text_config={"intermediate_size": 80})
    t = a.model.config.get_text_config()
    assert t.intermediate_size == 80 and t.vocab_size == len(a.tokenizer) == 1000
    assert a.model.get_input_embeddings().num_embeddings == 1000
    assert set(SPECIALS[family]) <= set(a.tokenizer.all_special_tokens)
    assert a.tokenizer.convert_ids_to_tokens(a.image_token_id) in SPECIALS[family]
    _forward_ok(a, task)


def test_tokenizer_has_exactly_the_requested_size():
    small, big = build_tokenizer(vocab_size=400), build_tokenizer(vocab_size=5000)
    assert len(small) == 400 and len(big) == 5000 and len(big.get_vocab()) == 5000
    assert sorted(big.get_vocab().values()) == list(range(5000))  # every id is used once
    assert big(TEXT)["input_ids"] == small(TEXT)["input_ids"]  # the extra entries never change how text encodes
    assert big.decode(big(TEXT)["input_ids"]) == TEXT
    assert set(QWEN_SPECIALS) <= set(big.all_special_tokens) and big.eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(vocab_size=100)


def test_special_tokens_land_at_a_real_configs_ids():
    ids = {"<|image_pad|>": 4955, "<|im_end|>": 4945, "<|endoftext|>": 4943}
    tok = build_tokenizer(vocab_size=5000, ids=ids)
    assert len(tok) == 5000 and {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    assert tok(f"{TEXT}<|image_pad|>")["input_ids"][-1] == 4955
    with pytest.raises(ValueError, match="cannot place"):
        build_tokenizer(vocab_size=5000, ids={"<|image_pad|>": 5000})


def test_config_dict_and_json_round_trip(tmp_path, task):
    a = tiny_qwen2_vl(text_config={"intermediate_size": 72, "rope_parameters": {"rope_theta": 5e5}}, vocab_size=700)
    d = a.model.config.to_dict()
    b = tiny_qwen2_vl(config=d)
    assert b.model.config.to_dict() == d
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()
    a.model.config.save_pretrained(tmp_path)
    c = tiny_qwen2_vl(config=tmp_path)  # a directory holding config.json
    assert c.model.config.to_dict() == d
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["intermediate_size"] == 72
    _forward_ok(c, task)


def test_flat_hub_layout_loads_as_is(task):
    """Hub configs of Qwen2-VL keep text fields at the top level (rope_scaling, ids near the end of the vocab)."""
    flat = {"model_type": "qwen2_vl", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 3000, "rope_theta": 1e6,
            "image_token_id": 2955, "video_token_id": 2956, "vision_start_token_id": 2952,
            "vision_end_token_id": 2953, "eos_token_id": 2945, "bos_token_id": 2943,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},
            "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 4}}
    a = tiny_qwen2_vl(config=flat)
    t = a.model.config.text_config
    assert (t.hidden_size, t.intermediate_size, t.vocab_size, len(a.tokenizer)) == (64, 160, 3000, 3000)
    assert a.image_token_id == 2955 == a.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert t.eos_token_id == 2945 == a.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert a.model.config.vision_config.mlp_ratio == 4
    _forward_ok(a, task)


def test_defaults_unchanged():
    """The tiny defaults are what tests and the default model were built with: same shapes and special-token ids."""
    a = tiny_qwen2_vl()
    t = a.model.config.text_config
    assert (len(a.tokenizer), t.intermediate_size, t.rope_parameters["rope_theta"]) == (400, 128, 10000.0)
    assert t.bos_token_id is None and a.image_token_id == QWEN_SPECIALS.index("<|image_pad|>")


def test_a_given_tokenizer_must_match_the_vocab(tiny_qwen):
    with pytest.raises(ValueError, match="differs"):
        tiny_qwen2_vl(tokenizer=tiny_qwen.tokenizer, vocab_size=999)


def test_builders_live_apart_from_adapters_and_task():
    """`ral_core.models` holds adapters only, and building a model never imports the task data."""
    import pathlib
    import subprocess
    import sys

    models = pathlib.Path(__file__).resolve().parents[1] / "ral_core" / "models"
    assert not {"tiny.py", "twins.py"} & {p.name for p in models.iterdir()}
    code = ("import sys, ral_core.builders.tiny, ral_core.builders.twins; "
            "print([m for m in sys.modules if m.startswith('ral_core.data')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
