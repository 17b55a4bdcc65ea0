"""Screenshots of the running app for the README: `python -m app.screenshots [OUT_DIR]`.

Serves the app on a free local port with the configured models (RAL_MODELS_CONFIG or app/models.yaml, first
model preselected), drives Debian's /usr/bin/chromium at 1280×800 and writes
  inspect.png  an Inspect result (first answer token),
  levers.png   Inspect's causal-lever chart and an explored rollout,
  inspect_photo.png  Inspect on a bundled photo with the models listed (offline: the digit-grid models only, so the
               photo examples carry their note and the answer is empty),
  train.png    the Train tab mid-run (RAL, RAL_SHOT_STEPS steps, default 8, snapshot every 2),
  compare.png  the preselected pair (app/models.yaml: default vs default-trained) on a bundled digit grid.
"""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from app.main import build_app, launch_kwargs
from ral_core import settings

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""
CHANGED = "sel => {{ const s = ({img})(sel); return s && s !== {old!r} }}"


EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


def ask(pg, tab: str, image: str, question: str) -> None:
    """A bundled example's image and question into the Inspect (`i`) or Compare (`c`) inputs, as a user uploads
    and types them (a click on an example row fills them a moment later, racing the Run click)."""
    pg.set_input_files(f"#{tab}-image input[type=file]", str(EXAMPLES / image))
    pg.fill(f"#{tab}-question textarea", question)


def main(out="docs/screenshots", chromium="/usr/bin/chromium") -> int:
    import tempfile

    from playwright.sync_api import sync_playwright

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app().queue()
    demo.launch(**{**launch_kwargs(), "server_name": "127.0.0.1", "server_port": port},
                prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=chromium, args=ARGS,
                                                       viewport={"width": 1280, "height": 800})
            pg = ctx.new_page()
            pg.set_default_timeout(180_000)
            pg.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            pg.wait_for_selector("#i-run")
            ask(pg, "i", "grid3_where.png", "Where is the 2?")
            pg.click("#i-run")
            src = pg.wait_for_function(IMG, arg="#i-overlay img").json_value()
            pg.wait_for_function(IMG, arg="#i-heads img")
            if pg.locator("#i-tokens label").count() > 1:  # show the first answer token rather than the mean
                pg.locator("#i-tokens label").nth(1).click()
                pg.wait_for_function(CHANGED.format(img=IMG, old=src), arg="#i-overlay img")
            time.sleep(1.0)  # let the head grid settle
            pg.screenshot(path=str(out / "inspect.png"), full_page=True)

            src = pg.locator("#i-overlay img").get_attribute("src")
            ask(pg, "i", "photos/chelsea.jpg", "What animal is in the picture?")
            pg.click("#i-run")
            pg.wait_for_function(CHANGED.format(img=IMG, old=src), arg="#i-overlay img")
            pg.wait_for_function(IMG, arg="#i-summary img")
            time.sleep(1.0)
            pg.screenshot(path=str(out / "inspect_photo.png"), full_page=True)

            src = pg.locator("#i-overlay img").get_attribute("src")
            ask(pg, "i", "grid3_where.png", "Where is the 2?")  # the levers of a question the models can read
            pg.click("#i-run")
            pg.wait_for_function(CHANGED.format(img=IMG, old=src), arg="#i-overlay img")
            pg.click("#i-levers-section button")  # open both accordions, run them
            pg.click("#i-levers-run")
            pg.wait_for_function(IMG, arg="#i-levers img")
            pg.click("#i-explore-section button")
            pg.click("#i-explore-run")
            pg.wait_for_function(IMG, arg="#i-explored img")
            time.sleep(1.0)
            top = pg.locator("#i-levers-section").bounding_box()
            bottom = pg.locator("#i-explore-section").bounding_box()
            y0 = max(0, pg.evaluate("window.scrollY") + top["y"] - 10)
            height = min(1700, bottom["y"] + bottom["height"] - top["y"] + 20)
            pg.screenshot(path=str(out / "levers.png"), full_page=True,
                          clip={"x": max(0, top["x"] - 10), "y": y0, "width": top["width"] + 20, "height": height})

            steps = str(settings.get("RAL_SHOT_STEPS"))
            pg.get_by_role("tab", name="Train").click()
            pg.locator("#t-steps input[type=number]").fill(steps)
            pg.locator("#t-steps input[type=number]").press("Tab")
            pg.get_by_text("More settings").click()
            pg.locator("#t-snap input[type=number]").fill("2")
            pg.locator("#t-snap input[type=number]").press("Tab")
            pg.get_by_text("More settings").click()
            pg.click("#t-start")
            pg.wait_for_function("() => /step [3-9]|step \\d\\d|done/.test("
                                 "document.querySelector('#t-progress').innerText)", timeout=1_800_000)
            pg.wait_for_function(IMG, arg="#t-snapshot img")
            time.sleep(1.5)
            pg.evaluate("window.scrollTo(0, 0)")
            pg.screenshot(path=str(out / "train.png"), full_page=True)
            pg.wait_for_function("() => /done|stopped|cancelled/.test(document.querySelector('#t-progress').innerText)",
                                 timeout=1_800_000)

            pg.get_by_role("tab", name="Compare").click()
            ask(pg, "c", "grid3_cell.png", "What digit is in row 2 column 1?")
            pg.click("#c-run")
            pg.wait_for_function(IMG, arg="#c-figure img")
            time.sleep(1.0)
            pg.screenshot(path=str(out / "compare.png"), full_page=True)
            ctx.close()
    finally:
        demo.close()
    print(f"wrote inspect.png, inspect_photo.png, levers.png, train.png and compare.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
