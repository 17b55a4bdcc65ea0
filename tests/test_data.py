import json

import numpy as np
import pytest

from ral_core.data import GroundingTask
from ral_core.data.grounding import _load_digits, split_indices


def test_split_is_by_digit_sample_and_disjoint():
    images, labels = _load_digits()
    sp = split_indices(len(labels))
    assert len(set(sp["train"]) & set(sp["test"])) == 0
    assert len(sp["train"]) + len(sp["test"]) == len(labels) == 1797
    # test grids draw only test handwriting
    test = GroundingTask(split="test")
    assert len(test._imgs) == len(sp["test"])
    assert np.array_equal(test._imgs, images[sp["test"]])


def test_deterministic_and_split_dependent():
    a, b = GroundingTask(seed=3).sample(5), GroundingTask(seed=3).sample(5)
    assert a.question == b.question and a.answer == b.answer
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = GroundingTask(seed=3, split="test").sample(5)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("kind", ["cell", "where", "count", "row", "compare", "pair"])
def test_answers_match_the_grid_and_boxes_hold_the_answer(kind):
    t = GroundingTask(rows=3, cols=4, kinds=(kind,))
    assert t.size == (4 * 28, 3 * 28)
    for i in range(20):
        s = t.sample(i)
        grid = np.array(s.meta["grid"])
        assert s.image.size == t.size and s.boxes
        cells = [(b[1] // 28, b[0] // 28) for b in s.boxes]
        if kind == "cell":
            assert s.answer == str(grid[cells[0]])
        elif kind == "row":
            assert s.answer == " ".join(str(grid[c]) for c in cells)
        elif kind == "count":
            d = int(s.question.split()[2][:-1])
            assert int(s.answer) == (grid == d).sum() == len(cells)
        elif kind == "where":
            d = int(s.question.split()[-1].rstrip("?"))
            assert all(grid[c] == d for c in cells)
        elif kind == "compare":
            a, b = grid[cells[0]], grid[cells[1]]
            assert s.answer == ("same" if a == b else "first" if a > b else "second")
        elif kind == "pair":
            assert cells[0] != cells[1]
            assert s.answer == f"{grid[cells[0]]} {grid[cells[1]]}"
        for (x0, y0, x1, y1) in s.boxes:  # the target cell holds ink
            assert np.asarray(s.image)[y0:y1, x0:x1].max() > 100


def test_bigger_grid_gives_bigger_image_and_bad_args_are_refused():
    assert GroundingTask(rows=5, cols=5).sample(0).image.size == (140, 140)
    with pytest.raises(ValueError, match="unknown task kind"):
        GroundingTask(kinds=("nope",))


# ---- JSONL data sets: every row checked, messages never name the server's folder ------------------------------
def _jsonl(tmp_path, rows, n_images=1):
    from PIL import Image
    for i in range(n_images):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "d.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path / "d.jsonl"


def _refused(path, *want):
    from ral_core.data.jsonl import JsonlDataset
    from ral_core.errors import RALError
    with pytest.raises(RALError) as e:
        JsonlDataset(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path.parent) not in msg, msg
    for w in want:
        assert w in msg, msg
    return msg


def test_every_row_is_checked_and_no_message_names_the_folder(tmp_path):
    good = {"image": "0.png", "question": "What?", "answer": "seven"}
    rows = [good] * 2500
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _refused(_jsonl(tmp_path, rows + [dict(good, image="bad.png")]), "line 2501", "'bad.png'", "not an image")
    _refused(_jsonl(tmp_path, rows + [dict(good, image="gone.png")]), "line 2501", "'gone.png'", "does not exist")


def test_a_row_broken_after_the_check_names_no_folder(tmp_path):
    from ral_core.data.jsonl import JsonlDataset
    from ral_core.errors import RALError
    ds = JsonlDataset(_jsonl(tmp_path, [{"image": "0.png", "question": "Q?", "answer": "A"}]))
    (tmp_path / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(RALError) as e:
        ds.sample(0)
    assert "line 1" in str(e.value) and "'0.png'" in str(e.value) and str(tmp_path) not in str(e.value)


@pytest.mark.parametrize("field,value,kind", [
    ("image", "0.png\u0000x", "NUL"), ("image", "\ud800.png", "lone surrogate"),
    ("question", "What\u0000?", "NUL"), ("answer", "se\u001bven", "control character"),
    ("question", "\udfff", "lone surrogate")])
def test_nul_surrogate_and_control_characters_give_one_line(tmp_path, field, value, kind):
    row = '{"image": "0.png", "question": "Q?", "answer": "A"}'.replace(
        {"image": '"0.png"', "question": '"Q?"', "answer": '"A"'}[field], json.dumps(value))
    _refused(_jsonl(tmp_path, [row]), "line 1", kind, {"image": "image path"}.get(field, field))


def test_rows_can_be_checked_after_their_paths(tmp_path):
    """A caller that checks where paths point first (check_images=False) still checks every row's image."""
    from ral_core.data.jsonl import JsonlDataset
    from ral_core.errors import RALError
    good = {"image": "0.png", "question": "What?", "answer": "seven"}
    (tmp_path / "bad.png").write_bytes(b"not an image")
    ds = JsonlDataset(_jsonl(tmp_path, [good] * 3000 + [dict(good, image="bad.png")]), check_images=False)
    with pytest.raises(RALError, match="line 3001: 'bad.png' is not an image") as e:
        ds.check_image_files()
    assert str(tmp_path) not in str(e.value)


@pytest.mark.parametrize("path,kind", [("d\x00.jsonl", "NUL"), ("d\udcff.jsonl", "lone surrogate"),
                                       ("x" * 5000 + ".jsonl", "does not exist")])
def test_a_bad_data_set_path_gives_one_line(path, kind):
    from ral_core.data.jsonl import JsonlDataset
    from ral_core.errors import RALError
    with pytest.raises(RALError, match=kind):
        JsonlDataset(path)
