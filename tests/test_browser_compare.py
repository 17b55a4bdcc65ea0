"""A real headless Chromium opens the app with the shipped model list (app/models.yaml): Compare preselects the
bundled before/after pair, states how far attention moved and draws the difference on the maps' own scale; the
magnified view says by how much."""
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apphelpers import BROWSER_MARKS, IMG_LOADED, browser_page, free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "grid3_where.png"  # bundled: expected answer and target box known
CHANGED = "sel => {{ const s = ({img})(sel); return s && s !== {old!r} }}"

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAL_MODELS_CONFIG", str(ROOT / "app" / "models.yaml"))  # the list a visitor gets
        mp.setenv("RAL_ALLOW_DOWNLOAD", "0")
        sess = tempfile.mkdtemp(prefix="ral_test_sessions_")
        mp.setenv("RAL_SESSIONS_ROOT", sess)
        from app.main import build_app

        demo = build_app().queue()
        port = free_port()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
        try:
            # ready once Inspect's Run is there: Compare renders when its tab is opened
            with browser_page(tmp_path_factory.mktemp("chromium_profile"), f"http://127.0.0.1:{port}/") as pg:
                yield pg
        finally:
            demo.close()
            shutil.rmtree(sess, ignore_errors=True)


def _difference_panel(page) -> np.ndarray:
    """The B − A image panel of the figure as RGB (the right third, without its colour bar and titles)."""
    png = page.locator("#c-figure img").screenshot()
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)
    h, w, _ = rgb.shape
    return rgb[int(0.30 * h):int(0.92 * h), int(0.70 * w):int(0.86 * w)]


def _tint(panel: np.ndarray) -> float:
    """How far the most coloured pixel is from gray (max − min channel), leaving out the cyan target box and the 3 px
    around it (its anti-aliased edges)."""
    r, g, b = panel[..., 0], panel[..., 1], panel[..., 2]
    box = (r < 80) & (g > 170) & (b > 190)
    near = box.copy()
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            near |= np.roll(np.roll(box, dy, 0), dx, 1)
    chroma = panel.max(-1) - panel.min(-1)
    return float(np.where(near, 0, chroma).max())


def test_compare_opens_on_the_bundled_pair_and_tells_how_far_attention_moved(page):
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#c-run")
    assert page.input_value("#c-model-a input") == "default"
    assert page.input_value("#c-model-b input") == "default-trained"
    page.set_input_files("#c-image input[type=file]", str(EXAMPLE))
    page.fill("#c-question textarea", "Where is the 2?")
    page.click("#c-run")
    src = page.wait_for_function(IMG_LOADED, arg="#c-figure img").json_value()
    line = page.input_value("#c-magnitude textarea")
    assert "⚠️" not in page.inner_text("#c-status")
    for part in ("largest head JSD", "% of ln 2", "on-target mass A", "answers A", "expected 'row 1 column 1'",
                 "on the maps' scale"):
        assert part in line, (part, line)
    honest = _tint(_difference_panel(page))

    page.get_by_label("auto: the largest change fills the range").check()
    page.wait_for_function(CHANGED.format(img=IMG_LOADED, old=src), arg="#c-figure img")
    line = page.input_value("#c-magnitude textarea")
    assert "magnified ×" in line, line
    magnified = _tint(_difference_panel(page))
    # on the maps' scale the bundled pair's change is a faint tint; magnified, its largest change is at full colour
    assert magnified > 60 and honest < 0.6 * magnified, (honest, magnified)
