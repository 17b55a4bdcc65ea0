"""Scrubbing in the browser: seconds from a click (another answer token, layer or colour scale) to its new picture,
loaded in a real headless Chromium, on the served app. Two modes per result, each on a fresh inspection:
'drawn on click' (every pick draws its figures, as before) and 'now' (figures of earlier picks are served again and
the likely next picks are drawn ahead while the user looks; app/inspect_tab.py). Results: the default model on a
digit grid and a 1,000-token photo on a SmolVLM-256M twin (scripts/build_twin.py, random weights: sizes, not answers).
Appends (or replaces) its section of bench/results/inspect.md.

    python bench/scrub_bench.py --twin /tmp/twin_s   # built by: python scripts/build_twin.py smolvlm_256m \\
                                                     #   --out /tmp/twin_s --text-layers 1 --vision-depth 1 --dtype float32
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from _common import ROOT

C.start()

HEADING = "## Scrubbing: click → new picture in the browser"
PHOTO = ROOT / "assets" / "examples" / "photos" / "coffee.jpg"
GRID = ROOT / "assets" / "examples" / "grid3_where.png"


def big_photo(d: Path) -> Path:
    """A bundled photo enlarged to 2048 × 2048: SmolVLM's processor cuts it into 4 × 4 tiles + the whole image,
    17 × 64 = 1,088 visual tokens."""
    from PIL import Image

    p = d / "photo_2048.png"
    with Image.open(PHOTO) as im:
        im.convert("RGB").resize((2048, 2048), Image.LANCZOS).save(p)
    return p


def serve(d: Path, twin: str | None):
    from apphelpers import free_port

    (d / "models.yaml").write_text("default: default\n" + (f"twin: {twin}\n" if twin else ""))
    # the server this process hosts reads its model list and sessions folder from its environment, as the test
    # helpers' served app does
    os.environ.update(RAL_MODELS_CONFIG=str(d / "models.yaml"),
                      RAL_SESSIONS_ROOT=tempfile.mkdtemp(prefix="ral_scrub_sessions_"))
    from app.main import build_app

    demo = build_app().queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def _browser_helpers_on_path():
    """The browser helpers (tests/apphelpers.py, tests/test_scrub.py) are shared with the tests, which live apart."""
    for d in (ROOT / "tests", ROOT):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))


def main():
    _browser_helpers_on_path()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--twin", help="folder of a SmolVLM-256M twin (scripts/build_twin.py); omitted: default model only")
    p.add_argument("--settle", type=float, default=3.0, help="seconds the user looks at the first picture")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "inspect.md"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    from app import inspect_tab
    from test_scrub import ARGS, CHROMIUM, inspect_in_page, scrub

    cases = [("default model, digit grid (9 visual tokens)", "default", GRID, "Where is the 2?")]
    work = Path(tempfile.mkdtemp(prefix="ral_scrub_"))
    if args.twin:
        cases.append(("SmolVLM-256M twin, 2048² photo", "twin", big_photo(work), "What is in the picture?"))
    demo, url = serve(work, args.twin)
    rows = []
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(work / "profile"), executable_path=CHROMIUM, args=ARGS,
                                                        viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.set_default_timeout(300_000)
            page.goto(url, wait_until="load")
            page.wait_for_selector("#i-run")
            for name, model, image, question in cases:
                for mode, reuse in (("drawn on click", False), ("now", True)):
                    inspect_tab.REUSE_FIGURES = reuse
                    inspect_in_page(page, model, image, question)
                    found = re.search(r"([\d,]+) visual tokens", page.inner_text("body"))
                    vis = found.group(1) if found else "?"
                    load0 = os.getloadavg()[0]
                    secs = scrub(page, args.settle)
                    rows.append((name, vis, mode, len(secs), statistics.median(secs), max(secs), load0,
                                 os.getloadavg()[0]))
                    print(rows[-1], flush=True)
            ctx.close()
    finally:
        demo.close()
    lines = [HEADING, "",
             f"Command: `python {' '.join(sys.argv)}` · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
             f"{C.machine_line()}", "",
             f"Headless Chromium on the served app (tests/test_scrub.py's picks: every answer token, every layer, the "
             f"per-head colour scale, every head of the last layer's map under the layer × head summary, twice over), {args.settle:g} s after the inspection before the first click. "
             "Click → the new image loaded in the page; p50 and max over the clicks. Load: 1-min load average "
             "before and after (2 cores; above 2 the machine was shared and the figures are contended).", "",
             "| result | visual tokens | mode | clicks | p50 ms | max ms | load before → after |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {v} | {m} | {k} | {p50 * 1e3:.0f} | {mx * 1e3:.0f} | {l0:.1f} → {l1:.1f} |"
              for n, v, m, k, p50, mx, l0, l1 in rows]
    out = Path(args.out)
    old = out.read_text() if out.is_file() else ""
    keep = old.split(HEADING)[0].rstrip() if HEADING in old else old.rstrip()
    out.write_text((keep + "\n\n" if keep else "") + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
