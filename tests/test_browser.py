"""A real headless Chromium (Debian's /usr/bin/chromium, never `playwright install`) drives the Inspect tab."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apphelpers import BROWSER_MARKS, IMG_LOADED, browser_page, inspect_in_browser, served_app

EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_where.png"
pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_model_dir):
    with served_app(tmp_path_factory.mktemp("browser_app"), tiny_model_dir) as u:
        yield u


@pytest.fixture(scope="module")
def page(url, tmp_path_factory):
    with browser_page(tmp_path_factory.mktemp("chromium_profile"), url, height=800) as pg:
        yield pg


def test_inspect_upload_run_change_layer(page, tmp_path):
    src = inspect_in_browser(page, EXAMPLE, "Where is the 2?")
    heads = page.wait_for_function(IMG_LOADED, arg="#i-heads img").json_value()
    assert "Answer:" in page.inner_text("body") and "⚠️" not in page.inner_text("#i-status")

    page.click("#i-layer input")
    page.click('#i-layer li[aria-label="layer 0"]')
    for sel, old in (("#i-overlay img", src), ("#i-heads img", heads)):  # both re-rendered for layer 0
        page.wait_for_function(f"sel => {{ const s = ({IMG_LOADED})(sel); return s && s !== {old!r} }}", arg=sel)
    assert page.input_value("#i-layer input") == "layer 0"

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("L"), np.float32)
    assert shot.shape == (800, 1280) and shot.std() > 20  # not a blank page
    over = np.asarray(Image.open(io.BytesIO(page.locator("#i-overlay img").screenshot())).convert("L"), np.float32)
    assert over.shape[0] > 150 and over.std() > 20  # the overlay image really rendered


def test_inspect_a_bundled_photo(page):
    """A real photograph (assets/examples/photos, CC0) through the page: the overlay keeps the photo's shape."""
    photo = EXAMPLE.parent / "photos" / "chelsea.jpg"
    page.set_input_files("#i-image input[type=file]", str(photo))
    page.fill("#i-question textarea", "What animal is in the picture?")
    old = page.locator("#i-overlay img").get_attribute("src") if page.locator("#i-overlay img").count() else None
    page.click("#i-run")
    page.wait_for_function(f"sel => {{ const s = ({IMG_LOADED})(sel); return s && s !== {old!r} }}",
                           arg="#i-overlay img")
    assert "Answer:" in page.inner_text("body") and "⚠️" not in page.inner_text("#i-status")
    over = np.asarray(Image.open(io.BytesIO(page.locator("#i-overlay img").screenshot())).convert("RGB"), np.float32)
    assert over.shape[0] > 150 and over.std() > 20


def test_one_redraw_per_pick(page):
    """Each layer or row pick sends exactly one redraw request (a Dropdown's `input` fired twice per pick)."""
    import json
    import time

    joins = []
    page.on("request", lambda r: joins.append(json.loads(r.post_data or "{}").get("fn_index"))
            if "queue/join" in r.url else None)
    page.set_input_files("#i-image input[type=file]", str(EXAMPLE))
    page.fill("#i-question textarea", "Where is the 2?")
    page.click("#i-run")
    page.wait_for_function("() => document.querySelector('#i-status').innerText.trim() === '' && "
                           "document.body.innerText.includes('Answer:')")
    time.sleep(1.0)
    def settle(n):
        """Wait for n requests (a loaded machine sends them late), then long enough to see any duplicate."""
        deadline = time.monotonic() + 20
        while len(joins) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)

    for pick in ("layer 1", "mean over layers", "last layer"):
        joins.clear()
        page.click("#i-layer input")
        page.click(f'#i-layer li[aria-label="{pick}"]')
        settle(1)
        assert len(joins) == 1, (pick, joins)
        assert page.input_value("#i-layer input") == pick
    own = page.get_by_label("the token's own position (RAL policy row)")
    other = page.get_by_label("query that predicts the token")
    target = other if own.is_checked() else own
    joins.clear()
    target.check()
    settle(3)  # the cell's request follows the summary's answer
    # the row also sets the layer × head summary (its redraw and the clicked cell's): three different requests, none twice
    assert target.is_checked() and len(joins) == 3 and len(set(joins)) == 3, joins


def test_train_tab_runs_and_lists_the_checkpoint(page):
    """Start → the timer polls → curves, probe snapshot and 'done' appear; the checkpoint joins the model list."""
    page.get_by_role("tab", name="Train").click()
    # the default run is the one that visibly moves attention, and the page says why and where plain RAL is
    assert "RAL + attention target" in page.inner_text("#t-algo") and "Choose **RAL**" not in page.inner_text("body")
    assert "Choose RAL below" in page.inner_text("body")
    steps = page.locator("#t-steps input[type=number]")
    steps.fill("3")
    steps.press("Tab")
    page.click("#t-start")
    page.wait_for_function(IMG_LOADED, arg="#t-curves img")
    page.wait_for_function("() => document.querySelector('#t-progress').innerText.includes('done: 3 / 3 steps')",
                           timeout=120_000)
    page.wait_for_function(IMG_LOADED, arg="#t-snapshot img")
    assert "session: grounded-1" in page.inner_text("#t-progress") and "⚠️" not in page.inner_text("#t-status")
    assert "Probe image" in page.inner_text("#t-note")
    page.get_by_role("tab", name="Inspect").click()
    page.click("#i-model input")
    page.wait_for_selector('#i-model li[aria-label="session: grounded-1"]')
    page.keyboard.press("Escape")
