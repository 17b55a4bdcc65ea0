"""Compare tells the truth: the B − A panel on the maps' own scale, a stated magnification, and one magnitude line
computed from the results (no model: results are built from arrays)."""
import math

import numpy as np
import pytest
from PIL import Image

from ral_core import compare as C
from ral_core.errors import RALError
from ral_core.inspection import InspectionResult
from ral_core.models.base import TokenGeometry, grid_boxes


def result(vis, name="m", answer="7", px=28, rows=3, cols=3):
    """An inspection of a rows×cols grid of px-pixel tokens; `vis` is [layers, heads, T+1, Nv]."""
    vis = np.asarray(vis, np.float32)
    L, H, R, _ = vis.shape
    img = Image.new("RGB", (cols * px, rows * px), (120, 120, 120))
    geo = TokenGeometry((cols * px, rows * px), grid_boxes(rows, cols, px, px),
                        [{"name": "image", "start": 0, "rows": rows, "cols": cols}])
    im = vis.sum(-1)
    mass = np.stack([im, 1 - im, np.zeros_like(im)], -1)
    return InspectionResult(name, "q?", answer, [answer], [5], ["x"], list(range(L)), H, vis, mass, img, geo)


def pair(delta=0.0015, heads=2, layers=2, seed=0):
    """A: a smooth map peaking at 0.08 on token 4; B: A plus ±delta on two tokens (a small real change)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.01, 0.03, size=(layers, heads, 2, 9))
    base[..., 4] = 0.08
    moved = base.copy()
    moved[..., 0] += delta
    moved[..., 8] -= delta
    return C.Comparison(a=result(base, "A"), b=result(moved, "B"), free_answer_a="7", free_answer_b="7")


def diff_clim(fig):
    return fig.axes[2].images[-1].get_clim()


def test_difference_panel_uses_the_maps_scale_by_default():
    cmp = pair(delta=0.0015)
    va, vb = cmp.maps()
    fig = C.comparison_figure(cmp)
    lo, hi = diff_clim(fig)
    scale = max(va.max(), vb.max())
    assert hi == pytest.approx(scale) and lo == pytest.approx(-scale)  # not ±0.0015 (auto-scaled to the change)
    assert fig.axes[2].images[-1].get_clim() != pytest.approx((-0.0015, 0.0015))
    assert "maps' scale" in fig.axes[2].get_title()
    assert fig.axes[0].images[-1].get_clim()[1] == pytest.approx(scale)
    import matplotlib.pyplot as plt
    plt.close(fig)


@pytest.mark.parametrize("magnify,factor", [(4, 4.0), ("4", 4.0), ("auto", None)])
def test_magnify_states_its_factor_in_the_title(magnify, factor):
    import matplotlib.pyplot as plt
    cmp = pair(delta=0.0015)
    va, vb = cmp.maps()
    scale = float(max(va.max(), vb.max()))
    fig = C.comparison_figure(cmp, magnify=magnify)
    lo, hi = diff_clim(fig)
    if factor is None:  # auto: the largest change nearly fills the range, and the factor applied is the one stated
        factor = scale / hi
        assert 0.0015 <= hi <= 0.0015 * 1.1
    assert hi == pytest.approx(scale / factor)
    assert f"magnified ×{factor:g}" in fig.axes[2].get_title()
    plt.close(fig)


def test_bad_magnify_is_one_clear_line():
    for bad in ("0.5", "x", float("nan"), -2):
        with pytest.raises(RALError, match="magnify must be 'auto' or a factor"):
            C.parse_magnify(bad)


def test_magnitude_line_small_change_is_called_invisible():
    cmp = pair(delta=0.0015)  # 2 % of the 0.08 map peak
    m = C.magnitude(cmp)
    assert m.change_share == pytest.approx(0.0015 / m.scale, rel=1e-4)
    assert not m.visible
    line = m.line()
    assert "no visible change" in line and "% of ln 2" in line and "answers A '7', B '7'" in line
    big = C.magnitude(pair(delta=0.02))
    assert big.visible and "no visible change" not in big.line()
    assert big.head_jsd > m.head_jsd > 0


def test_magnitude_numbers_match_their_definitions():
    cmp = pair(delta=0.01)
    m = C.magnitude(cmp, layer=1, boxes=[(0, 0, 28, 28)], expected="7")
    d = C.jsd(cmp.a.head_maps(1), cmp.b.head_maps(1))
    assert m.layer == 1 and m.head == int(np.argmax(d)) and m.head_jsd == pytest.approx(float(d.max()))
    assert m.share_of_ln2 == pytest.approx(m.head_jsd / math.log(2))
    va, vb = cmp.maps(layer=1)
    assert m.target_a == pytest.approx(float(va[0])) and m.target_b == pytest.approx(float(vb[0]))  # token 0's box
    assert m.target_b - m.target_a == pytest.approx(0.01, rel=1e-3)
    line = m.line()
    assert "on-target mass A" in line and "(+0.010)" in line and "expected '7'" in line
    assert C.magnitude(cmp, layer="mean").layer == 1  # mean over layers: heads of the last layer
    assert "on-target" not in C.magnitude(cmp).line()  # no target box: no on-target claim


def test_figure_draws_the_target_box_and_expected_answer():
    import matplotlib.pyplot as plt
    fig = C.comparison_figure(pair(), boxes=[(0, 28, 28, 56)], expected="1")
    for ax in fig.axes[:3]:
        assert any(isinstance(p, plt.Rectangle) for p in ax.patches)
    assert "expected answer '1'" in fig._suptitle.get_text()
    plt.close(fig)


def test_user_text_in_titles_is_not_math():
    """A model name or answer with dollars is drawn as typed (mathtext would raise or eat it)."""
    import matplotlib.pyplot as plt
    cmp = pair()
    cmp.a.model_name = "$x^2$ and $\\frac"
    fig = C.comparison_figure(cmp, expected="$5")
    fig.canvas.draw()  # a broken '$\\frac' would raise here under mathtext
    plt.close(fig)


def test_heads_table_ranks_by_jsd():
    rows = C.heads_table(pair(delta=0.01, heads=3))
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["jsd"] >= rows[1]["jsd"] >= rows[2]["jsd"]
    assert rows[0]["layer"] == 1


def test_bundled_example_is_recognised():
    import json
    ex = json.loads((C.EXAMPLES_DIR / "examples.json").read_text())[0]
    img = Image.open(C.EXAMPLES_DIR / ex["image"])
    assert C.bundled_example(img, "  " + ex["question"].upper())["answer"] == ex["answer"]
    assert C.bundled_example(img, "something else") is None
