"""The Inspect tab's "does it matter?" panel in a real headless Chromium: inspect a bundled example, knock out every
head, click a cell of the grid and see that head's map with its knock-out effect (the saved record's number), then
the map without the sink tokens."""
import json
from pathlib import Path

import pytest

from apphelpers import BROWSER_MARKS, IMG_LOADED, click_grid_cell, inspect_in_browser, served_page

EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_cell.png"
pytestmark = BROWSER_MARKS


def test_click_a_knockout_cell_and_see_its_effect(tmp_path_factory, tiny_model_dir, monkeypatch):
    from ral_core.causal import CausalResult

    monkeypatch.setenv("RAL_RENDER_WORKERS", "0")
    d = tmp_path_factory.mktemp("causal_browser")
    with served_page(d, tiny_model_dir) as page:
        inspect_in_browser(page, EXAMPLE, "What digit is in row 2 column 1?")
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
        click_grid_cell(page, "#i-causal-grid img", geo, len(geo["layers"]) - 1, head)
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
