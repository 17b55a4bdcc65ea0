"""The stored shape-twin settings (assets/twins/) parse with the real transformers config classes and cut in depth as
the bench expects. No model, no weights, no tokenizer is built here: twins themselves appear only in the bench."""
import pytest

from ral_core.builders.twins import TWINS, describe, twin_config, twin_files

CLASSES = {"idefics3": "Idefics3Config", "qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
           "qwen3_vl": "Qwen3VLConfig", "qwen3_5": "Qwen3_5Config"}


@pytest.mark.parametrize("name", list(TWINS))
def test_twin_config_parses_and_cuts(name):
    import transformers

    family = TWINS[name][1]
    Config = getattr(transformers, CLASSES[family])
    d = describe(name)
    full = Config.from_dict(twin_config(name)).get_text_config()
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads) == (d["hidden"], d["layers"], d["heads"])
    assert full.vocab_size == d["vocab"]
    cut = Config.from_dict(twin_config(name, text_layers=1, vision_depth=1))
    t = cut.get_text_config()
    assert t.num_hidden_layers == 1 and t.hidden_size == d["hidden"] and t.intermediate_size == d["intermediate"]
    if getattr(t, "layer_types", None) is not None and family == "qwen3_5":
        assert t.layer_types == ["full_attention"]  # one cut layer is a softmax-attention layer
    files = twin_files(name)
    assert files["preprocessor"] and files["special_tokens"]
    ids = set(files["special_tokens"].values())
    assert len(ids) == len(files["special_tokens"]) and max(ids) < d["vocab"]
    image_id = files["config"].get("image_token_id")
    assert image_id in ids
