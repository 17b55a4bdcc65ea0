"""Shared helpers for the app tests: a launched app on a free local port, a headless Chromium page on it, fake
requests, PNG checks."""
from pathlib import Path
import shutil
import socket
import tempfile
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from PIL import Image

# Debian's Chromium, never `playwright install` (the machine is offline)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG_LOADED = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""
BROWSER_MARKS = [pytest.mark.browser,
                 pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: run `make chromium`"),
                 pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_model(built, folder):
    """A built tiny model saved like a user's local model directory."""
    for part in (built.model, built.tokenizer, built.image_processor):
        part.save_pretrained(folder)


@contextmanager
def model_list(d, text: str):
    """For the block, the app lists the models of `text` (d/models.yaml) and keeps sessions under d/sessions; yields
    the MonkeyPatch for further settings."""
    (d / "models.yaml").write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAL_MODELS_CONFIG", str(d / "models.yaml"))
        mp.setenv("RAL_SESSIONS_ROOT", str(d / "sessions"))
        yield mp


@contextmanager
def served_app(d, tiny_model_dir):
    """The real app on 127.0.0.1:<free port>, listing a tiny model and the default one; yields its URL."""
    (d / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\ndefault: default\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAL_MODELS_CONFIG", str(d / "models.yaml"))
        # outside Gradio's upload folder (the test temp root, see conftest), as on a real server
        sess = tempfile.mkdtemp(prefix="ral_test_sessions_")
        mp.setenv("RAL_SESSIONS_ROOT", sess)
        (d / "sessions").unlink(missing_ok=True)
        (d / "sessions").symlink_to(sess)
        from app.main import build_app

        demo = build_app().queue()
        port = free_port()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
            shutil.rmtree(sess, ignore_errors=True)


@contextmanager
def browser_page(profile, url, height=900):
    """A headless Chromium page (own profile folder) at `url`, once the Inspect tab's Run button is there."""
    from playwright.sync_api import sync_playwright  # imported late: without Chromium the tests skip, not fail

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=ARGS,
                                                   viewport={"width": 1280, "height": height})
        try:
            pg = ctx.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(url, wait_until="load")  # not "networkidle": Gradio keeps a connection open
            pg.wait_for_selector("#i-run")
            yield pg
        finally:
            ctx.close()


@contextmanager
def served_page(d, tiny_model_dir):
    """`served_app` with a browser page on it (profile under `d`)."""
    with served_app(d, tiny_model_dir) as url, browser_page(d / "profile", url) as page:
        yield page


def inspect_in_browser(page, image, question: str, budget: str | None = None) -> str:
    """Upload `image`, ask `question` (with a visual-token budget if given), press Run; the attention map's src
    once it has loaded."""
    page.set_input_files("#i-image input[type=file]", str(image))
    page.fill("#i-question textarea", question)
    if budget is not None:
        page.fill("#i-budget input", budget)
    page.click("#i-run")
    return page.wait_for_function(IMG_LOADED, arg="#i-overlay img").json_value()


def click_grid_cell(page, sel, geo, i, j):
    """Click the centre of grid cell (row i, column j) of the PNG shown at `sel`, wherever the page scaled it."""
    x0, y0, x1, y1 = geo["box"]
    cx, cy = x0 + (j + 0.5) * (x1 - x0) / geo["heads"], y0 + (i + 0.5) * (y1 - y0) / len(geo["layers"])
    page.locator(sel).scroll_into_view_if_needed()
    left, top, bw, bh, nw, nh = page.evaluate(f"""() => {{ const i = document.querySelector({sel!r});
        const r = i.getBoundingClientRect();
        return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight] }}""")
    k = min(bw / nw, bh / nh, 1)
    page.mouse.click(left + (bw - nw * k) / 2 + cx * k, top + (bh - nh * k) / 2 + cy * k)


def req(h):
    return SimpleNamespace(session_hash=h)


def is_png(path):
    with Image.open(path) as im:
        return im.format == "PNG" and im.width > 100
