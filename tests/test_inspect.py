"""Inspection result, rendering without the model, and the `ral inspect` CLI with its bad-input messages."""
import numpy as np
import pytest
import torch
from PIL import Image

from ral_core import render
from ral_core.attention import capture
from ral_core.cli import main
from ral_core.errors import RALError
from ral_core.images import load_image
from ral_core.inspection import InspectionResult, inspect


@pytest.fixture(scope="module")
def result(tiny_qwen, task):
    s = task.sample(0)
    return inspect(tiny_qwen, s.image, s.question, max_new_tokens=4), s


def test_result_rows_match_a_direct_capture(tiny_qwen, result):
    res, s = result
    L, H, R, Nv = res.visual.shape
    assert (L, H, R) == (3, 4, res.n_tokens + 1) and Nv == res.geometry.n_tokens == 9
    # rows are probabilities: image + prompt text + answer mass sum to 1
    np.testing.assert_allclose(res.mass.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.visual.sum(-1), res.mass[..., 0], atol=1e-5)
    # recompute the last answer token's own row at the last layer independently
    b = tiny_qwen.build_inputs([s.image], [s.question])
    full = tiny_qwen.extend_inputs(b["model_inputs"], torch.tensor([res.answer_ids]), torch.ones(1, res.n_tokens))
    pos = full["input_ids"].shape[1] - 1
    with torch.no_grad(), capture(tiny_qwen.model, layers=[2], rows=torch.tensor([[pos]])) as maps:
        tiny_qwen.model(**full)
    vis = tiny_qwen.visual_mask(full["input_ids"][0])
    np.testing.assert_allclose(res.visual[2, :, -1], maps[2][0, :, 0, vis].numpy(), atol=1e-6)


def test_save_load_aggregate_render_without_model(result, tmp_path):
    res, s = result
    res.save(tmp_path / "r")
    back = InspectionResult.load(tmp_path / "r")
    assert back.answer_tokens == res.answer_tokens and back.layers == res.layers
    np.testing.assert_array_equal(back.visual, res.visual)
    m = back.visual_map(layer=1, head=2, token=0)
    np.testing.assert_allclose(m, res.visual[1, 2, 0])
    np.testing.assert_allclose(back.visual_map(), res.visual[:, :, :res.n_tokens].mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(back.visual_map(token=0, row="own"), res.visual[:, :, 1].mean(axis=(0, 1)), rtol=1e-6)
    assert 0 <= back.target_mass(s.boxes[0]) <= back.mass_split()["image"] + 1e-6
    for name, fig in [("o.png", render.inspection_overlay(back, layer=2)), ("h.svg", render.head_grid(back, 2)),
                      ("d.png", render.diff_overlay(back.image, back.geometry, m, m[::-1]))]:
        p = render.save_figure(fig, tmp_path / name)
        assert p.stat().st_size > 1000
    with pytest.raises(ValueError, match="not captured"):
        back.visual_map(layer=7)
    with pytest.raises(ValueError, match="out of range"):
        back.visual_map(token=99)


def test_heatmap_paints_each_token_in_its_box(result):
    res, _ = result
    v = np.zeros(res.geometry.n_tokens)
    v[4] = 1.0  # the centre cell of the 3×3 grid
    heat = render.token_heatmap(v, res.geometry)
    ys, xs = np.nonzero(heat)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (28, 56, 28, 56)


def test_forced_answer_and_bias_steering(tiny_qwen, task):
    s = task.sample(1)
    a = inspect(tiny_qwen, s.image, s.question, forced_answer="7")
    assert a.answer == "7" and a.meta["forced"]
    b = tiny_qwen.build_inputs([s.image], [s.question])
    vis = tiny_qwen.visual_mask(b["model_inputs"]["input_ids"])[0]
    bias = torch.zeros(1, 1, 1, vis.shape[0])
    first = int(torch.nonzero(vis)[0])
    bias[..., first] = 6.0  # steer every layer toward the first visual token
    steered = inspect(tiny_qwen, s.image, s.question, forced_answer="7", bias={i: bias for i in range(3)})
    assert steered.visual[:, :, :, 0].mean() > 5 * a.visual[:, :, :, 0].mean()


def test_empty_question_is_refused(tiny_qwen, task):
    with pytest.raises(RALError, match="empty"):
        inspect(tiny_qwen, task.sample(0).image, "   ")


def test_load_image_refuses_bad_files(tmp_path):
    with pytest.raises(RALError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(RALError, match="not an image"):
        load_image(tmp_path / "t.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(RALError, match="corrupt|not an image"):
        load_image(tmp_path / "cut.png")
    Image.new("1", (5000, 5000)).save(tmp_path / "bomb.png")  # tiny file, 25 Mpx
    with pytest.raises(RALError, match="over the limit"):
        load_image(tmp_path / "bomb.png")
    assert load_image(tmp_path / "ok.png").mode == "RGB"


def test_cli_inspect_end_to_end(tiny_model_dir, task, tmp_path, capsys):
    task.sample(2).image.save(tmp_path / "img.png")
    rc = main(["inspect", "--image", str(tmp_path / "img.png"), "--question", "What digit is in row 1 column 1?",
               "--model", str(tiny_model_dir), "--layer", "1", "--head", "0", "--out", str(tmp_path / "out")])
    assert rc == 0
    for f in ("overlay.png", "heads.png", "head0.png", "answer.txt", "result/result.json",
              "result/attention.safetensors"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert "answer:" in capsys.readouterr().out
    assert InspectionResult.load(tmp_path / "out" / "result").layers == [0, 1, 2]


@pytest.mark.parametrize("args,msg", [
    (["--image", "/no/such.png"], "does not exist"),
    (["--image", "@TXT"], "not an image"),
    (["--image", "@BOMB"], "over the limit"),
    (["--question", " "], "empty"),
    (["--model", "/no/such/dir"], "does not exist"),
    (["--model", "someone/unknown-model"], "hub is unreachable"),
    (["--model", "@BERT"], "unsupported model family"),
    (["--layer", "9"], "out of range"),
])
def test_cli_bad_input_one_clear_line(args, msg, tiny_model_dir, tmp_path, capsys):
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "t.png").write_text("text")
    Image.new("1", (6000, 6000)).save(tmp_path / "bomb.png")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    subs = {"@TXT": str(tmp_path / "t.png"), "@BOMB": str(tmp_path / "bomb.png"), "@BERT": str(bert)}
    base = {"--image": str(tmp_path / "ok.png"), "--question": "hi", "--model": str(tiny_model_dir),
            "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = subs.get(v, v)
    rc = main(["inspect"] + [x for kv in base.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
