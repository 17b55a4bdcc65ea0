"""Figures that scale with the image and the token count (no model: results are built from arrays), and the
`ral inspect` figure, pixel-budget and progress options."""
import numpy as np
import pytest
from PIL import Image

from ral_core import render
from ral_core.cli import main
from ral_core.inspection import InspectionResult
from ral_core.models.base import TokenGeometry, grid_boxes


def synth(W=1024, H=768, rows=27, cols=36, layers=2, heads=12, T=2, seed=0, loud=(0,)):
    """A saved-looking inspection of a W×H image seen as a rows×cols token grid; heads in `loud` attend ~20× more."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.add.outer(np.linspace(40, 200, H), np.linspace(0, 50, W)).astype(np.uint8)).convert("RGB")
    geo = TokenGeometry((W, H), grid_boxes(rows, cols, W / cols, H / rows),
                        [{"name": "image", "start": 0, "rows": rows, "cols": cols}])
    vis = rng.dirichlet(np.ones(rows * cols), size=(layers, heads, T + 1)) * 0.02
    vis[:, list(loud)] *= 20
    img_mass = vis.sum(-1)
    mass = np.stack([img_mass, (1 - img_mass) * 0.7, (1 - img_mass) * 0.3], -1)
    return InspectionResult("synth", "q?", "a b", ["a", " b"], [1, 2], ["x"], list(range(layers)), heads,
                            vis.astype(np.float32), mass.astype(np.float32), img, geo)


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def _axes_px(ax):
    bb = ax.get_window_extent()
    return round(bb.width), round(bb.height)


def test_overlay_keeps_the_photo_aspect_at_a_readable_size(tmp_path):
    fig = render.inspection_overlay(synth(), layer=1)
    assert _axes_px(fig.axes[0]) == (900, 675)  # long side 900 px, 4:3 kept (was ~340 px whatever the photo)
    w, h = _png_size(render.save_figure(fig, tmp_path / "photo.png"))
    assert 900 < w < 1100 and 675 < h < 800
    small = render.inspection_overlay(synth(84, 84, 3, 3, heads=4), layer=1)
    assert _axes_px(small.axes[0]) == (336, 336)  # the digit grids stay about as they were (481×372 before)
    w, h = _png_size(render.save_figure(small, tmp_path / "digits.png"))
    assert 400 < w < 520 and 340 < h < 460
    portrait = render.inspection_overlay(synth(600, 1500, 30, 12, heads=2), layer=0)
    assert _axes_px(portrait.axes[0]) == (360, 900)


def test_token_borders_are_sharp():
    """The token map is painted at the display resolution and drawn nearest: across a token border the colour jumps
    from one value to the next, with no blended pixels."""
    r = synth(1024, 768, 27, 36, layers=1, heads=1)
    v = np.zeros(r.geometry.n_tokens)
    k = 13 * 36 + 17  # a token in the middle
    v[k] = 1.0
    fig = render.overlay(Image.new("RGB", (1024, 768), (128, 128, 128)), r.geometry, v, vmin=0, vmax=1)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.images[-1].get_interpolation() == "nearest"
    assert ax.images[-1].get_array().shape == (675, 900)  # one heat pixel per screen pixel
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    bb = ax.get_window_extent()
    top = rgba.shape[0] - int(round(bb.y1))
    x0 = int(round(bb.x0))
    row = rgba[top + int((13.5 / 27) * 675), x0 + 2:x0 + 898]  # a row through the token, inside the frame
    hot, cold = row[int(17.5 / 36 * 900)], row[5]
    is_hot = (np.abs(row - hot).sum(1) <= 3)
    is_cold = (np.abs(row - cold).sum(1) <= 3)
    assert (~is_hot & ~is_cold).sum() == 0  # no in-between colours at the borders
    assert abs(is_hot.sum() - 900 / 36) <= 1  # the token is as wide as it is on screen (25 px)
    render.plt.close(fig)


def test_overlay_into_given_axes_still_works(tmp_path):
    """app/figures.py and compare.py draw overlays into their own subplots."""
    r = synth(layers=1, heads=2)
    fig, axes = render.plt.subplots(1, 2, figsize=(9, 4), dpi=100)
    v = r.visual_map()
    render.overlay(r.image, r.geometry, v, title="a", vmin=0, ax=axes[0])
    render.diff_overlay(r.image, r.geometry, v, v[::-1], ax=axes[1])
    assert axes[0].images[-1].get_interpolation() == "nearest"
    assert render.save_figure(fig, tmp_path / "pair.png").stat().st_size > 1000


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_title().startswith("head ")]


def test_head_grid_columns_and_panel_size():
    r = synth(heads=12)
    fig = render.head_grid(r, 1)
    panels = _panels(fig)
    assert len(panels) == 12
    xs = sorted({round(ax.get_window_extent().x0) for ax in panels})
    ys = sorted({round(ax.get_window_extent().y0) for ax in panels})
    assert (len(xs), len(ys)) == (4, 3)
    w, h = _axes_px(panels[0])
    assert w / 36 >= 9.5 and abs(w / h - 4 / 3) < 0.02  # ~10 px per token (was 4-5 px at 12 heads)
    wide = render.head_grid(r, 1, max_cols=6)
    assert len({round(ax.get_window_extent().x0) for ax in _panels(wide)}) == 6
    few = render.head_grid(synth(84, 84, 3, 3, heads=4), 1)
    assert _axes_px(_panels(few)[0]) == (200, 200)  # small token grids get a legible minimum
    render.plt.close("all")


def test_per_head_colour_scale():
    r = synth(heads=6, loud=(2,))
    maps = r.head_maps(1)
    shared = render.head_grid(r, 1)
    for ax in _panels(shared):
        assert ax.images[-1].get_clim() == (0.0, pytest.approx(float(maps.max())))
    own = render.head_grid(r, 1, shared_scale=False)
    for h, ax in enumerate(_panels(own)):
        assert ax.images[-1].get_clim() == (0.0, 1.0)
        np.testing.assert_allclose(ax.images[-1].get_array().max(), 1.0)  # every head reaches the top of its scale
        assert f"max {maps[h].max():.2g}" in ax.get_title()
    # on the shared scale the loud head washes out the others; on their own scales they do not
    quiet = [ax.images[-1].get_array().max() for h, ax in enumerate(_panels(shared)) if h != 2]
    assert max(quiet) < 0.2 * float(maps.max())
    render.plt.close("all")


def test_layer_head_summary_at_16_heads_36_layers(tmp_path):
    r = synth(rows=6, cols=8, layers=36, heads=16, loud=(3,))
    vals = render.layer_head_values(r)
    np.testing.assert_allclose(vals, r.mass[:, :, :2, 0].mean(-1), rtol=1e-6)  # mean over the answer rows
    fig = render.layer_head_summary(r)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), vals)
    w, h = _axes_px(fig.axes[0])
    assert w / 16 >= 16 and h / 36 >= 12  # cells big enough to see
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:2] == ["0", "1"]
    pw, ph = _png_size(render.save_figure(fig, tmp_path / "s.png"))
    assert pw < 1000 and ph < 1000
    assert render.save_figure(render.layer_head_summary(r, metric="entropy"), tmp_path / "s.svg").stat().st_size > 1000
    with pytest.raises(ValueError, match="metric"):
        render.layer_head_values(r, metric="nope")


def test_entropy_is_normalised():
    r = synth(rows=4, cols=4, layers=1, heads=2)
    r.visual[0, 0] = 0.0
    r.visual[0, 0, :, 5] = 0.3  # head 0: all on one token
    r.visual[0, 1] = 0.5 / 16  # head 1: spread evenly
    np.testing.assert_allclose(render.layer_head_values(r, "entropy"), [[0.0, 1.0]], atol=1e-6)


def test_size_px_is_a_box_the_figure_fits_in(tmp_path):
    r = synth()
    for name, fig in (("o", render.inspection_overlay(r, layer=1, size_px=(800, 400))),
                      ("h", render.head_grid(r, 1, size_px=(800, 400))),
                      ("s", render.layer_head_summary(r, size_px=(800, 400)))):
        w, h = _png_size(render.save_figure(fig, tmp_path / f"{name}.png"))
        assert w <= 800 and h <= 400, (name, w, h)
    fig = render.inspection_overlay(r, layer=1, size_px=(800, 400))
    w, h = _axes_px(fig.axes[0])
    assert abs(w / h - 4 / 3) < 0.02 and h > 300  # aspect kept, the height used


# ---- ral inspect options ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("photo") / "photo.png"
    synth(448, 336, 1, 1).image.save(p)
    return p


def _inspect(tiny_model_dir, photo, out, *extra):
    return main(["inspect", "--image", str(photo), "--question", "What is in the picture?", "--model",
                 str(tiny_model_dir), "--max-new-tokens", "3", "--out", str(out), *extra])


def test_cli_figure_options(tiny_model_dir, photo, tmp_path, capsys):
    assert _inspect(tiny_model_dir, photo, tmp_path / "a") == 0
    out = capsys.readouterr()
    assert "visual tokens: 192 " in out.out and out.err == ""  # 448×336 → 16×12; no bars when not a terminal
    for f in ("overlay.png", "heads.png", "layers_heads.png"):
        assert (tmp_path / "a" / f).stat().st_size > 1000
    assert _inspect(tiny_model_dir, photo, tmp_path / "b", "--format", "svg", "--figsize", "700,500",
                    "--per-head-scale", "--max-pixels", "224x168") == 0
    out = capsys.readouterr()
    assert "visual tokens: 48 " in out.out and "at most 48 visual tokens" in out.err  # 8×6 after the budget
    assert (tmp_path / "b" / "overlay.svg").read_text().lstrip().startswith("<?xml")
    assert "own max" in (tmp_path / "b" / "heads.svg").read_text()
    assert not (tmp_path / "b" / "overlay.png").exists()


def test_cli_progress_bars(tiny_model_dir, photo, tmp_path, capsys):
    assert _inspect(tiny_model_dir, photo, tmp_path / "p", "--progress") == 0
    err = capsys.readouterr().err
    for step in ("load model", "encode image + prompt", "capture attention", "render figures"):
        assert step in err
    assert _inspect(tiny_model_dir, photo, tmp_path / "q", "--no-progress") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args,msg", [(["--figsize", "12"], "not W,H"), (["--figsize", "50,50"], "not W,H"),
                                      (["--max-pixels", "-5"], "not a pixel count"),
                                      (["--max-pixels", "3x"], "not a pixel count"),
                                      (["--format", "jpg"], "invalid choice")])
def test_cli_bad_figure_options(tiny_model_dir, photo, tmp_path, capsys, args, msg):
    assert _inspect(tiny_model_dir, photo, tmp_path / "x", *args) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_diff_overlay_defaults_to_the_maps_scale():
    """A change of 2 % of the map keeps 2 % of the colour range (a range fitted to the change painted it at full
    colour); an explicit `lim` is used as given."""
    r = synth(84, 84, 3, 3, layers=1, heads=1)
    a = np.full(9, 0.05)
    b = a.copy()
    b[0] += 0.001
    fig = render.diff_overlay(r.image, r.geometry, a, b)
    assert fig.axes[0].images[-1].get_clim() == pytest.approx((-0.051, 0.051))
    render.plt.close(fig)
    fig = render.diff_overlay(r.image, r.geometry, a, b, lim=0.01)
    assert fig.axes[0].images[-1].get_clim() == pytest.approx((-0.01, 0.01))
    render.plt.close(fig)


def test_token_titles_count_from_one():
    """Figure titles count answer tokens as the page's token buttons do ('1: a'), from 1."""
    r = synth(layers=1, heads=2)  # answer tokens 'a', ' b'
    assert render.token_label(r, 0) == "answer token 1 of 2: 'a'"
    fig = render.inspection_overlay(r, token=1)
    assert "answer token 2 of 2" in fig.axes[0].get_title()
    render.plt.close(fig)


def test_training_curves_label_equal_curves_and_show_points_for_short_runs():
    hist = [{"step": 1, "reward": 0.5, "accuracy": 0.5}, {"step": 2, "reward": 0.75, "accuracy": 0.75}]
    fig = render.training_curves(hist, total_steps=2)
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and "equal at every step" in ax.get_legend().get_texts()[0].get_text()
    assert ax.lines[0].get_linestyle() == "None" and ax.get_xlim() == (0.5, 2.5)  # points, a padded axis
    render.plt.close(fig)
    hist = [{"step": s, "reward": 0.1 * s, "accuracy": 0.05 * s, "attn_jsd_after_update": 1e-3} for s in range(1, 9)]
    hist[3].pop("attn_jsd_after_update")  # measured on some steps only
    fig = render.training_curves(hist, total_steps=8)
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].lines[0].get_linestyle() == "-"
    assert list(fig.axes[1].lines[0].get_xdata()) == [1, 2, 3, 5, 6, 7, 8]
    render.plt.close(fig)
