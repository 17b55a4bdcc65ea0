"""What a run or a request takes in: a fresh run never appends to an older run's metrics, yes/no settings given as
text are parsed (never truth-tested: "false" must not sample) or refused in one line, and a data set whose rows
spell the model's control tokens is refused before the first step."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ral_core.config import build_config, parse_bool
from ral_core.errors import RALError

BASE = ["steps=1", "prompts_per_step=2", "group_size=2", "minibatch_size=4", "epochs=1", "max_new_tokens=2",
        "log_attention=false"]


@pytest.mark.parametrize("raw,want", [(True, True), (False, False), (1, True), (0, False), ("true", True),
                                      ("False", False), (" yes ", True), ("no", False), ("on", True), ("OFF", False),
                                      ("1", True), ("0", False), (np.bool_(True), True)])
def test_booleans_are_parsed(raw, want):
    assert parse_bool(raw) is want


@pytest.mark.parametrize("raw", ["maybe", "", "2", 2, 0.5, None, [], "f" * 100])
def test_other_values_are_refused_in_one_line(raw):
    with pytest.raises(RALError, match="do_sample must be true or false") as e:
        parse_bool(raw, "do_sample")
    assert "\n" not in str(e.value) and len(str(e.value)) < 160


def test_config_booleans_given_as_text():
    cfg = build_config("ral", {"freeze_vision": "false", "vision_cache": "0", "log_tensorboard": "yes"})
    assert (cfg.freeze_vision, cfg.vision_cache, cfg.log_tensorboard) == (False, False, True)
    with pytest.raises(RALError, match="'freeze_vision' expects bool"):
        build_config("ral", {"freeze_vision": "maybe"})


def test_do_sample_false_as_text_does_not_sample(tiny_qwen):
    from ral_core.inspection import inspect

    a = tiny_qwen
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    greedy = inspect(a, img, "What digit is in row 1 column 2?", max_new_tokens=4, layers="last")
    for seed in range(3):  # a sampled answer at temperature 5 differs from greedy on some seed
        r = inspect(a, img, "What digit is in row 1 column 2?", max_new_tokens=4, layers="last", do_sample="false",
                    temperature=5.0, seed=seed)
        assert r.answer_ids == greedy.answer_ids and r.meta["do_sample"] is False
    with pytest.raises(RALError, match="do_sample"):
        inspect(a, img, "What?", do_sample="sometimes")


def _killed_first_checkpoint(out):
    """A folder as a run leaves it when killed during its first checkpoint write: metrics of its steps, the
    checkpoint's temporary folder (of a process that is gone), no checkpoint."""
    (out / "checkpoints" / ".tmp-step-1-999999999").mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    return (out / "metrics.jsonl").read_text()


def test_a_fresh_run_never_appends_to_an_older_runs_metrics(tmp_path, tiny_qwen):
    from ral_core.trainer import Trainer

    out = tmp_path / "run"
    before = _killed_first_checkpoint(out)
    t = Trainer(build_config(None, BASE + [f"output_dir={out}"]), adapter=tiny_qwen)
    with pytest.raises(RALError, match="metrics of an earlier run") as e:
        t.train()
    assert "\n" not in str(e.value)
    assert (out / "metrics.jsonl").read_text() == before


def test_ral_train_says_so_in_one_line(tmp_path, capsys):
    from ral_core.cli import main

    out = tmp_path / "run"
    before = _killed_first_checkpoint(out)
    assert main(["train", "--config", "grpo", "--no-figures", *BASE, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics of an earlier run" in err, err
    assert (out / "metrics.jsonl").read_text() == before


def test_a_data_set_with_control_tokens_is_refused_before_step_one(tmp_path):
    from ral_core.builders.tiny import tiny_qwen2_vl
    from ral_core.trainer import Trainer

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "What digit?", "answer": "seven"}] * 4
    rows.append({"image": "a.png", "question": "What<|image_pad|> digit?", "answer": "seven"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(None, BASE + [f"output_dir={tmp_path / 'run'}", f"dataset={tmp_path / 'd.jsonl'}"])
    with pytest.raises(RALError, match=r"d.jsonl line 5: the question contains '<\|image_pad\|>'"):
        Trainer(cfg, adapter=tiny_qwen2_vl(layers=1))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_a_recipe_name_is_the_bundled_recipe_whatever_the_working_folder_holds(tmp_path, monkeypatch):
    """A run's output folder named like a recipe (e.g. runs of `grounded` in ./grounded) must not be read as it."""
    from ral_core.config import build_config
    from ral_core.errors import RALError
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grounded").mkdir()
    (tmp_path / "ral").write_text("lambda_attn: 7\n")
    assert build_config("grounded").lambda_ground > 0
    assert build_config("ral").lambda_attn != 7
    assert build_config("./ral").lambda_attn == 7  # a path is a path
    import pytest
    with pytest.raises(RALError, match="is a folder"):
        build_config("./grounded")


def test_the_app_reads_a_string_boolean_as_written():
    """A client's do_sample "false" must not sample in Inspect / Compare (bool("false") is True)."""
    import pytest

    from app.common import gen_options
    from ral_core.errors import RALError
    assert gen_options(16, "false", 1.0)["do_sample"] is False
    assert gen_options(16, "true", 1.0)["do_sample"] is True
    with pytest.raises(RALError, match="sample must be true or false"):
        gen_options(16, "maybe", 1.0)
