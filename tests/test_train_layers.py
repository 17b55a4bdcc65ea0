"""train_layers / train_modules: full fine-tuning of only some decoder layers of the language model, and of only
some modules of them (the rest frozen, unchanged by training), and one-line refusals of bad values."""
import pytest
import torch

from ral_core.config import build_config
from ral_core.errors import RALError
from ral_core.rewards import reward
from ral_core.train_state import prepare_student
from ral_core.trainer import Trainer, is_vision_param


@reward("test_layers_digit")
def _mentions_digit(completion, sample):
    """Varies across random rollouts, so an untrained model's advantages are non-zero."""
    return float(any(ch.isdigit() for ch in completion))


BASE = ["steps=2", "prompts_per_step=2", "group_size=4", "minibatch_size=4", "epochs=2", "max_new_tokens=4",
        "lr=5e-3", "temperature=1.5", "lambda_attn=1", "reward_weights={test_layers_digit: 1.0}"]


def _layer(name: str):
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts and not is_vision_param(name) else None


def _trained(tmp_path, model_dir, name, *extra):
    t = Trainer(build_config(None, BASE + [f"output_dir={tmp_path / name}", f"model={model_dir}", *extra]))
    model = t.acc.unwrap_model(t.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t.train()
    return {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}


def test_only_the_chosen_layers_change(tmp_path, tiny_model_dir):
    changed = _trained(tmp_path, tiny_model_dir, "last", "train_layers=last")
    last = max(_layer(n) for n in changed if _layer(n) is not None)
    assert any(v for n, v in changed.items() if _layer(n) == last)
    moved = sorted(n for n, v in changed.items() if v and _layer(n) != last)
    assert not moved  # embeddings (tied to the output head), final norm, other layers, vision: all unchanged
    changed = _trained(tmp_path, tiny_model_dir, "first", "train_layers=[0]")
    assert any(v for n, v in changed.items() if _layer(n) == 0)
    assert not [n for n, v in changed.items() if v and _layer(n) != 0]


def test_qk_trains_only_the_query_and_key_projections_of_the_chosen_layer(tmp_path, tiny_model_dir):
    changed = _trained(tmp_path, tiny_model_dir, "qk", "train_layers=last", "train_modules=qk")
    last = max(_layer(n) for n in changed if _layer(n) is not None)
    qk = {n for n in changed if _layer(n) == last and n.split(".")[-2] in ("q_proj", "k_proj")}
    assert qk and all(changed[n] for n in qk if n.endswith("weight"))
    assert not [n for n, v in changed.items() if v and n not in qk]  # v, o, MLP, norms, other layers: unchanged


def test_attention_keeps_every_layers_attention_block_trainable(tiny_qwen):
    import copy
    model, *_ = prepare_student(copy.deepcopy(tiny_qwen.model), build_config(None, ["train_modules=attention"]), "cpu")
    grad = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {_layer(n) for n in grad if grad[n]} == {0, 1, 2}
    assert all(".self_attn." in n for n in grad if grad[n])
    assert all(grad[n] for n in grad if ".self_attn." in n and not is_vision_param(n))


def test_layers_trains_every_decoder_layer_and_freezes_the_embeddings(tiny_qwen):
    import copy
    model, *_ = prepare_student(copy.deepcopy(tiny_qwen.model), build_config(None, ["train_layers=layers"]), "cpu")
    grad = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(grad[n] for n in grad if _layer(n) is not None)
    assert [n for n in grad if "embed_tokens" in n] and not any(grad[n] for n in grad if "embed_tokens" in n)
    assert not any(grad[n] for n in grad if _layer(n) is None)
    model, *_ = prepare_student(copy.deepcopy(tiny_qwen.model), build_config(None, []), "cpu")  # default: all
    assert all(p.requires_grad for n, p in model.named_parameters() if not is_vision_param(n))


@pytest.mark.parametrize("value, words", [("foo", "train_layers must be all, layers, last"),
                                          ("[1, 1]", "lists a layer twice"),
                                          ("1.5", "train_layers must be"),
                                          ("[]", "train_layers must be")])
def test_bad_values_are_refused_in_one_line(value, words):
    with pytest.raises(RALError) as e:
        build_config(None, [f"train_layers={value}"])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_modules_and_lora_are_refused_in_one_line():
    with pytest.raises(RALError, match="train_modules must be all, attention or qk"):
        build_config(None, ["train_modules=mlp"])
    with pytest.raises(RALError, match="leave train_layers at all"):
        build_config(None, ["train_layers=last", "lora_r=4"])
    with pytest.raises(RALError, match="leave train_modules at all"):
        build_config(None, ["train_modules=qk", "lora_r=4"])


def test_a_layer_the_model_lacks_is_refused(tiny_qwen):
    import copy
    for value in ("7", "[0, -9]"):
        with pytest.raises(RALError, match="does not exist; the model has 3 decoder layers"):
            prepare_student(copy.deepcopy(tiny_qwen.model), build_config(None, [f"train_layers={value}"]), "cpu")
