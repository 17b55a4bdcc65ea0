"""The Space as a visitor meets it on ZeroGPU: `app.py` served with the ZeroGPU stand-in (tests/spaces_standin: each
GPU call in a forked worker, pickled in and out) and the sign-in button, driven by a real headless Chromium: sign
in, inspect, a 4-step training run in 2 GPU calls, then Compare `default` against the run's checkpoint.

The browser part has a 90 s budget (every wait gets what is left of it; the run is kept light: 4 questions × 4
answers per step); the server's start-up, mostly imports, is bounded apart. On this repo's shared 2-core machine at a
load average of ≈ 10 the browser part took 50-60 s; the start-up took 40-80 s. At a load average of 4, 3 of about 12
runs came back from the sign-in redirect still signed out (still so after a reload; the cause, inside Gradio's mocked
sign-in, is not found): the test then clicks "Sign in" once more, as a visitor would, and says so in its stages."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from apphelpers import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
EXAMPLE = ROOT / "assets" / "examples" / "grid3_cell.png"
QUESTION = "What digit is in row 2 column 3?"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG_LOADED = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""
BROWSER_BUDGET_S = 90

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: run `make chromium`"),
              pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]


@pytest.fixture()
def space(tmp_path):
    """`app.py` as a ZeroGPU Space on a free local port; yields (url, the stand-in's call log)."""
    (tmp_path / "models.yaml").write_text("default: default\n")
    port, log = free_port(), tmp_path / "gpu_calls.log"
    env = {**os.environ, "RAL_MODELS_CONFIG": str(tmp_path / "models.yaml"), "RAL_SESSIONS_ROOT": str(tmp_path / "s"),
           "RAL_HOST": "127.0.0.1", "RAL_PORT": str(port), "RAL_ZEROGPU_CHUNK_STEPS": "2", "RAL_SMOKE_USER": "smoke",
           "SPACES_STANDIN_LOG": str(log), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    out = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "spaces_standin" / "serve_zerogpu.py")], env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 180:
                    raise AssertionError("the Space did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it forked (its own process group)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        out.close()


def test_space_sign_in_inspect_chunked_run_compare(space, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url, log = space
    t0 = time.time()
    deadline, laps = t0 + BROWSER_BUDGET_S, []

    def left() -> float:  # ms for the next wait: what is left of the budget
        ms = (deadline - time.time()) * 1000
        assert ms > 0, (f"the Space smoke test ran past its {BROWSER_BUDGET_S} s budget (stages: {laps}; load average "
                        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        return ms

    def lap(stage: str):
        laps.append(f"{stage} {time.time() - t0:.1f} s")

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS,
                                                   viewport={"width": 1280, "height": 800})
        try:
            pg = ctx.new_page()
            pg.goto(url, wait_until="load", timeout=left())
            pg.wait_for_selector("#i-run", timeout=left())
            pg.get_by_role("button", name="Sign in with Hugging Face").click(timeout=left())
            try:
                pg.get_by_role("button", name="Logout (smoke)").wait_for(timeout=min(left(), 15_000))
            except PlaywrightTimeout:
                # On a loaded machine the page sometimes comes back from the sign-in redirect still showing
                # "Sign in" (Gradio's mocked sign-in, outside this app); a visitor clicks it again, and so does this
                lap("sign-in clicked again")
                pg.get_by_role("button", name="Sign in with Hugging Face").click(timeout=left())
                pg.get_by_role("button", name="Logout (smoke)").wait_for(timeout=left())
            lap("signed in")

            pg.set_input_files("#i-image input[type=file]", str(EXAMPLE), timeout=left())
            pg.fill("#i-question textarea", QUESTION, timeout=left())
            pg.click("#i-run", timeout=left())
            pg.wait_for_function(IMG_LOADED, arg="#i-overlay img", timeout=left())
            assert "Answer:" in pg.inner_text("body") and "⚠️" not in pg.inner_text("#i-status")
            lap("inspected")

            pg.get_by_role("tab", name="Train").click(timeout=left())
            steps = pg.locator("#t-steps input[type=number]")
            steps.fill("4", timeout=left())
            steps.press("Tab", timeout=left())
            pg.get_by_text("More settings").click(timeout=left())
            for label in ("questions per step", "group size (answers per question)"):  # a light run: 4 × 4
                box = pg.get_by_label(f"number input for {label}")
                box.fill("4", timeout=left())
                box.press("Tab", timeout=left())
            pg.click("#t-start", timeout=left())
            pg.wait_for_function("() => document.querySelector('#t-progress').innerText.includes('done: 4 / 4')",
                                 timeout=left())
            progress = pg.inner_text("#t-progress")
            assert "2 GPU calls" in progress and "session: grounded-1" in progress, progress
            assert "⚠️" not in pg.inner_text("#t-status")
            lap("trained")

            pg.get_by_role("tab", name="Compare").click(timeout=left())
            pg.click("#c-model-a input", timeout=left())
            pg.click('#c-model-a li[aria-label="default"]', timeout=left())
            pg.click("#c-model-b input", timeout=left())
            pg.click('#c-model-b li[aria-label="session: grounded-1"]', timeout=left())
            pg.set_input_files("#c-image input[type=file]", str(EXAMPLE), timeout=left())
            pg.fill("#c-question textarea", QUESTION, timeout=left())
            pg.click("#c-run", timeout=left())
            pg.wait_for_function(IMG_LOADED, arg="#c-figure img", timeout=left())
            assert "⚠️" not in pg.inner_text("#c-status")
            assert (pg.input_value("#c-model-a input"), pg.input_value("#c-model-b input")) == ("default",
                                                                                                "session: grounded-1")
        finally:
            ctx.close()
    calls = [ln.split()[0] for ln in log.read_text().splitlines()]
    assert calls == ["inspect_work", "run_chunk", "run_chunk", "compare_work"], calls  # each in a forked worker
