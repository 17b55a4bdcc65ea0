"""`ral compare` (figure, heads table, magnitude line) and `ral train`'s figures and progress bar, end to end on the
embedded default model."""
import csv
import json

import pytest
from PIL import Image

from ral_core.cli import main
from ral_core.compare import EXAMPLES_DIR

EX = json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]  # a digit grid with its answer and box


def test_ral_compare_writes_figure_heads_and_magnitude(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "default", "default", "--image", str(EXAMPLES_DIR / EX["image"]), "--question",
               EX["question"], "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    line = (out / "magnitude.txt").read_text().strip()
    assert line in text and line.startswith("Attention moved: largest head JSD 0 (0.0 % of ln 2)")
    assert "on-target mass A" in line and f"(expected {EX['answer']!r})" in line  # the bundled example's box/answer
    assert "no visible change" in line  # a model against itself
    m = json.loads((out / "magnitude.json").read_text())
    assert m["head_jsd"] == 0 and m["visible"] is False and m["target_a"] == m["target_b"]
    rows = list(csv.DictReader(open(out / "heads.csv")))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
    with Image.open(out / "compare.png") as im:
        assert im.width > 900
    assert (out / "results" / "model_a" / "result.json").is_file()


def test_ral_compare_magnify_and_box(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "default", "default", "--image", str(EXAMPLES_DIR / EX["image"]), "--question", "Read row 3.",
               "--box", "0,0,28,28", "--magnify", "auto", "--token", "1", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr()
    assert "on-target mass A" in (out / "magnitude.txt").read_text()
    assert "(expected" not in (out / "magnitude.txt").read_text()  # not a bundled example: no expected answer


@pytest.mark.parametrize("extra,msg", [
    (["--magnify", "0.5"], "magnify must be 'auto' or a factor from 1"),
    (["--box", "1,2,3"], "--box must be four numbers"),
    (["--layer", "top"], "--layer must be a layer number"),
    (["--layer", "40"], "--layer 40 is not a layer both models captured"),
    (["--token", "99"], "--token 99 is out of range"),
])
def test_ral_compare_bad_input_is_one_line(tmp_path, capsys, extra, msg):
    rc = main(["compare", "default", "default", "--image", str(EXAMPLES_DIR / EX["image"]), "--question",
               EX["question"], "--out", str(tmp_path / "o"), "--no-progress"] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and msg in err, err


def test_max_pixels_zero_means_the_models_own(tmp_path, capsys):
    rc = main(["inspect", "--image", str(EXAMPLES_DIR / EX["image"]), "--question", EX["question"], "--max-pixels",
               "0", "--out", str(tmp_path / "i"), "--no-progress"])
    assert rc == 0
    assert "--max-pixels 0: the model's own setting" in capsys.readouterr().err


def test_ral_train_writes_curves_and_probe_figure(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", "ral", f"output_dir={out}", "steps=2", "prompts_per_step=2", "group_size=2",
               "max_new_tokens=4", "snapshot_every=0", "save_every=0", "probe_samples=1", "attn_metrics_every=2"])
    text = capsys.readouterr()
    assert rc == 0, text
    assert (out / "curves.png").is_file() and (out / "probe_before_after.png").is_file()
    m = json.loads((out / "probe_before_after.json").read_text())
    assert m["line"] in text.out and m["line"].startswith("Attention moved:")
    assert "on-target mass A" in m["line"]  # the grounding probe has a box
    # the bar: JSD only on the step where it was measured (step 2 of attn_metrics_every=2), never a made-up 0 on step 1
    frames = text.err.replace("\r", "\n").splitlines()
    step1 = [f for f in frames if "1/2 [" in f and "reward=" in f]
    step2 = [f for f in frames if "2/2 [" in f and "reward=" in f]
    assert step1 and step2, text.err
    assert not any("jsd=" in f for f in step1) and all("jsd=" in f for f in step2)
