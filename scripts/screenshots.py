"""Retake the README's screenshots of the real app (docs/screenshots/inspect.png, compare.png, train.png).

The app is served in this process with the model list a visitor gets (app/models.yaml), offline, and driven by a
headless Chromium (Debian's /usr/bin/chromium, as the browser tests): Inspect on the first bundled example, Compare
of the bundled pair (`default` against `default-trained`) on the same example, and the Train tab's default run
to its end. Rerun it whenever the page or a bundled model changes, so that the pictures show what a user sees.

    HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False .venv/bin/python scripts/screenshots.py [--only compare,inspect]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
EXAMPLES = ROOT / "assets" / "examples"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
IMG_LOADED = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""
VIEWS = ("inspect", "compare", "train")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shot(page, name: str, out: Path) -> None:
    page.wait_for_timeout(500)  # let the last image paint
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"wrote {out / f'{name}.png'}")


def inspect_view(page, example: dict, out: Path) -> None:
    page.get_by_role("tab", name="Inspect").click()
    page.set_input_files("#i-image input[type=file]", str(EXAMPLES / example["image"]))
    page.fill("#i-question textarea", example["question"])
    page.click("#i-run")
    page.wait_for_function(IMG_LOADED, arg="#i-overlay img")
    _shot(page, "inspect", out)


def compare_view(page, example: dict, out: Path) -> None:
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#c-run")
    page.set_input_files("#c-image input[type=file]", str(EXAMPLES / example["image"]))
    page.fill("#c-question textarea", example["question"])
    page.click("#c-run")
    page.wait_for_function(IMG_LOADED, arg="#c-figure img")
    print("Compare:", page.input_value("#c-magnitude textarea"))
    _shot(page, "compare", out)


def train_view(page, out: Path, timeout_s: float = 600) -> None:
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#t-start")
    page.click("#t-start")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the page polls the run; its progress line says 'done: N / N steps'
        if "done:" in page.inner_text("#t-progress"):
            break
        page.wait_for_timeout(2000)
    else:
        raise SystemExit(f"the default run did not finish in {timeout_s:.0f} s")
    page.wait_for_timeout(3000)  # the last poll draws the final curves and snapshot
    _shot(page, "train", out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(VIEWS), help=f"comma-separated views to retake: {', '.join(VIEWS)}")
    p.add_argument("--out", default=str(SHOTS), help="folder for the PNGs (default: docs/screenshots)")
    a = p.parse_args(argv)
    views = [v.strip() for v in a.only.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if bad:
        print(f"unknown view(s) {', '.join(bad)}: choose from {', '.join(VIEWS)}", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is absent: run `make chromium` first", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["RAL_MODELS_CONFIG"] = str(ROOT / "app" / "models.yaml")
    os.environ["RAL_ALLOW_DOWNLOAD"] = "0"
    sessions = tempfile.mkdtemp(prefix="ral_shots_")
    os.environ["RAL_SESSIONS_ROOT"] = sessions
    example = json.loads((EXAMPLES / "examples.json").read_text())[0]
    from playwright.sync_api import sync_playwright

    from app.main import build_app

    demo = build_app().queue()
    port = _port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS,
                                                       viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.wait_for_selector("#i-run")
            for v in views:
                {"inspect": lambda: inspect_view(page, example, out), "compare": lambda: compare_view(page, example, out),
                 "train": lambda: train_view(page, out)}[v]()
            ctx.close()
    finally:
        demo.close()
        shutil.rmtree(sessions, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
