"""The Inspect tab's "does it matter?" panel in a real headless Chromium: inspect a bundled example, knock out every
head, click a cell of the grid and see that head's map with its knock-out effect (the saved record's number), then
the map without the sink tokens."""
import json
from pathlib import Path

import pytest

from apphelpers import served_app

CHROMIUM = "/usr/bin/chromium"
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_cell.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG_LOADED = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: run `make chromium`"),
              pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]


def _click_cell(page, sel, geo, i, j):
    """Click the centre of grid cell (row i, column j) of the PNG shown at `sel`, wherever the page scaled it."""
    x0, y0, x1, y1 = geo["box"]
    cx, cy = x0 + (j + 0.5) * (x1 - x0) / geo["heads"], y0 + (i + 0.5) * (y1 - y0) / len(geo["layers"])
    page.locator(sel).scroll_into_view_if_needed()
    left, top, bw, bh, nw, nh = page.evaluate(f"""() => {{ const i = document.querySelector({sel!r});
        const r = i.getBoundingClientRect();
        return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight] }}""")
    k = min(bw / nw, bh / nh, 1)
    page.mouse.click(left + (bw - nw * k) / 2 + cx * k, top + (bh - nh * k) / 2 + cy * k)


def test_click_a_knockout_cell_and_see_its_effect(tmp_path_factory, tiny_model_dir, monkeypatch):
    from playwright.sync_api import sync_playwright

    from ral_core.causal import CausalResult

    monkeypatch.setenv("RAL_RENDER_WORKERS", "0")
    d = tmp_path_factory.mktemp("causal_browser")
    with served_app(d, tiny_model_dir) as url, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(d / "profile"), executable_path=CHROMIUM, args=ARGS,
                                                   viewport={"width": 1280, "height": 900})
        try:
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            page.goto(url, wait_until="load")
            page.wait_for_selector("#i-run")
            page.set_input_files("#i-image input[type=file]", str(EXAMPLE))
            page.fill("#i-question textarea", "What digit is in row 2 column 1?")
            page.click("#i-run")
            page.wait_for_function(IMG_LOADED, arg="#i-overlay img")
            page.click("#i-causal-section button")  # open the accordion
            page.click("#i-causal-run")
            page.wait_for_function(IMG_LOADED, arg="#i-causal-grid img")
            page.wait_for_function("() => document.querySelector('#i-causal-summary').innerText.includes('forwards')")
            assert "⚠️" not in page.inner_text("#i-causal-status") and "⚠️" not in page.inner_text("#i-status")
            assert "Blocking" in page.inner_text("#i-causal-summary")  # the example's box, blocked
            page.wait_for_function(IMG_LOADED, arg="#i-causal-blocking img")

            geo_file = next((d / "sessions").rglob("knockout_T*.json"))
            geo = json.loads(geo_file.read_text())
            record = CausalResult.load(geo_file.parent / "result")
            layer, head = geo["layers"][-1], 1
            _click_cell(page, "#i-causal-grid img", geo, len(geo["layers"]) - 1, head)
            first = page.wait_for_function(IMG_LOADED, arg="#i-causal-cell img").json_value()
            page.wait_for_function(f"() => document.querySelector('#i-causal-effect').innerText"
                                   f".includes('Layer {layer}, head {head}')")
            effect = page.inner_text("#i-causal-effect")
            assert f"{record.knockout.cell(layer, head):+.4f}" in effect, effect
            assert "⚠️" not in page.inner_text("#i-causal-status")

            page.click("#i-causal-clean input")  # the same head without the sink tokens: a redraw
            page.wait_for_function(f"sel => {{ const s = ({IMG_LOADED})(sel); return s && s !== {first!r} }}",
                                   arg="#i-causal-cell img")
            assert "⚠️" not in page.inner_text("#i-causal-status")
        finally:
            ctx.close()
