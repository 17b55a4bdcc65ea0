"""Screenshots of the running app for the README: `python -m app.screenshots [OUT_DIR]`.

Serves the app on a free local port with the configured models (RAL_MODELS_CONFIG or app/models.yaml, first
model preselected), drives Debian's /usr/bin/chromium at 1280×800 and writes inspect.png and compare.png.
"""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from app.main import build_app, launch_kwargs

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""
CHANGED = "sel => {{ const s = ({img})(sel); return s && s !== {old!r} }}"


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
            pg.get_by_text("Where is the 2?").first.click()  # an example: fills image + question
            pg.click("#i-run")
            src = pg.wait_for_function(IMG, arg="#i-overlay img").json_value()
            pg.wait_for_function(IMG, arg="#i-heads img")
            if pg.locator("#i-tokens label").count() > 1:  # show the first answer token rather than the mean
                pg.locator("#i-tokens label").nth(1).click()
                pg.wait_for_function(CHANGED.format(img=IMG, old=src), arg="#i-overlay img")
            time.sleep(1.0)  # let the head grid settle
            pg.screenshot(path=str(out / "inspect.png"), full_page=True)
            pg.get_by_role("tab", name="Compare").click()
            pg.get_by_text("Read row 1.").last.click()
            pg.click("#c-run")
            pg.wait_for_function(IMG, arg="#c-figure img")
            time.sleep(1.0)
            pg.screenshot(path=str(out / "compare.png"), full_page=True)
            ctx.close()
    finally:
        demo.close()
    print(f"wrote {out / 'inspect.png'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
