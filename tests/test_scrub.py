"""Scrubbing: a pick seen before draws nothing, the likely next picks are drawn ahead in the render workers, and in a
real headless Chromium each pick of an answer token, a layer, the colour scale or a head (the map under the
layer × head summary) shows its new picture quickly
(click → new image loaded, measured in the page). The browser bound is loose for a loaded machine;
bench/scrub_bench.py states the real figure."""
import os
import statistics
import time
from pathlib import Path

import pytest

from apphelpers import is_png, model_list, req, served_app

CHROMIUM = "/usr/bin/chromium"
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_where.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

browser = [pytest.mark.browser,
           pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: run `make chromium`"),
           pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]

LOADED = """sel => { const i = document.querySelector(sel);
    return i && i.complete && i.naturalWidth > 100 ? i.getAttribute('src') : null }"""
CHANGED = f"([sel, old]) => {{ const s = ({LOADED})(sel); return s && s !== old ? s : null }}"


def inspect_in_page(page, model="default", image=EXAMPLE, question="Where is the 2?"):
    """Pick `model`, run Inspect on `image`, wait for both figures."""
    page.click("#i-model input")
    page.click(f'#i-model li[aria-label="{model}"]')
    page.set_input_files("#i-image input[type=file]", str(image))
    page.fill("#i-question textarea", question)
    page.click("#i-run")
    page.wait_for_function("() => document.querySelector('#i-status').innerText.trim() === '' && "
                           "document.body.innerText.includes('Answer:')", timeout=300_000)
    page.wait_for_function(LOADED, arg="#i-overlay img")
    page.wait_for_function(LOADED, arg="#i-heads img")


def _choose(page, sel: str, label: str) -> None:
    """Pick `label` as a user does from the keyboard: type it into the dropdown and press Enter (a list opened
    near the page's bottom edge is redrawn under a mouse click)."""
    page.fill(f"{sel} input", label)
    page.keyboard.press("Enter")


def _labels(page, sel: str) -> list[str]:
    page.locator(sel).scroll_into_view_if_needed()
    page.click(f"{sel} input")
    names = page.locator(f"{sel} li").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    page.keyboard.press("Escape")
    return names


def picks(page, n_tokens: int, layers: list[str], heads: list[str] = ()):
    """(what, click, image that must change): every answer token, every layer, the colour scale, every head of the
    summary's layer (its map under the layer × head summary), twice over (each pick shows a view other than the one
    on show: 'last layer' is the highest numbered one)."""
    tok = lambda i: (f"token {i}", lambda: page.locator("#i-tokens label").nth(i).click(), "#i-overlay img")  # noqa: E731
    head = lambda h: (f"head {h}", lambda: _choose(page, "#i-cell-head", h), "#i-cell img")  # noqa: E731

    def layer(name):
        def click():
            page.click("#i-layer input")
            page.click(f'#i-layer li[aria-label="{name}"]')
        return name, click, "#i-overlay img"

    scale = ("colour scale", lambda: page.click("#i-head-scale input"), "#i-heads img")
    seq = [tok(i) for i in range(1, n_tokens)] + [tok(0)]
    seq += [layer(x) for x in ["mean over layers"] + layers[:-1] + ["last layer"]] + [scale, scale]
    seq += [head(h) for h in heads]
    return seq + seq


def scrub(page, settle_s: float = 3.0) -> list[float]:
    """Seconds from each click to its new picture, loaded in the page; `settle_s` after the inspection is the user
    looking at the first picture (figures of the likely next picks are drawn meanwhile)."""
    time.sleep(settle_s)
    n_tokens = page.locator("#i-tokens label").count()
    names = _labels(page, "#i-layer")
    layers = sorted((x for x in names if x.startswith("layer ")), key=lambda x: int(x.split()[1]))
    page.wait_for_function(LOADED, arg="#i-summary img")  # the summary fills the head map's layer and head choices
    page.wait_for_function("() => document.querySelector('#i-summary-status').innerText.trim() === ''")
    time.sleep(1.0)  # its choices reach the dropdowns after the image: a list opened before is redrawn under the click
    _choose(page, "#i-cell-layer", _labels(page, "#i-cell-layer")[-1])  # no head picked yet: no map, nothing timed
    heads = _labels(page, "#i-cell-head")
    out = []
    for what, click, sel in picks(page, n_tokens, layers, heads):
        old = page.evaluate(LOADED, sel)
        t0 = time.perf_counter()
        click()
        page.wait_for_function(CHANGED, arg=[sel, old], polling=10, timeout=60_000)
        out.append(time.perf_counter() - t0)
        assert "⚠️" not in page.inner_text("#i-status"), what
    return out


@pytest.fixture()
def env(tmp_path, tiny_model_dir):
    with model_list(tmp_path, f"tiny-a: {tiny_model_dir}\n") as mp:
        from app import handlers, registry, render_pool

        yield mp, handlers, render_pool
        render_pool.shutdown()
        registry.clear_cache()


def drawn(render_pool, monkeypatch) -> list:
    """Every figure job handed to the render pool from now on (their functions' names)."""
    jobs, real = [], render_pool.call_many
    monkeypatch.setattr(render_pool, "call_many", lambda js, *a, **k: jobs.extend(j[0].__name__ for j in js)
                        or real(js, *a, **k))
    return jobs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pick_seen_before_is_served_without_drawing(env, monkeypatch):
    mp, h, render_pool = env
    mp.setenv("RAL_RENDER_WORKERS", "0")  # in-process: nothing is drawn ahead
    out = h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 3, request=req("sc1"))
    assert out.status == "", out.status
    jobs = drawn(render_pool, monkeypatch)
    a = h.inspect_view(out.state, "0", "0", "own", request=req("sc1"))
    assert a.status == "" and jobs == ["overlay_job", "heads_job"] and is_png(a.overlay) and is_png(a.heads)
    jobs.clear()
    b = h.inspect_view(out.state, "last", "mean", "predicts", request=req("sc1"))  # the inspection's own view
    again = h.inspect_view(out.state, "0", "0", "own", request=req("sc1"))
    assert jobs == [] and (b.overlay, b.heads) == (out.overlay, out.heads)
    assert (again.overlay, again.heads, again.mass) == (a.overlay, a.heads, a.mass)
    h.inspect_view(out.state, "0", "0", "own", True, request=req("sc1"))  # own colour scale: a new head grid only
    assert jobs == ["heads_job"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_head_map_seen_before_is_served_without_drawing_and_the_next_heads_are_queued(env, monkeypatch):
    mp, h, render_pool = env
    mp.setenv("RAL_RENDER_WORKERS", "0")
    out = h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 3, request=req("sc3"))
    assert out.status == "", out.status
    calls, real = [], render_pool.call
    monkeypatch.setattr(render_pool, "call", lambda fn, *a, **k: calls.append(fn.__name__) or real(fn, *a, **k))
    queued = []
    monkeypatch.setattr(render_pool, "draw_ahead", lambda jobs: queued.append([Path(j[1]).name for j in jobs]))
    last = out.state["result"].layers[-1]
    a = h.inspect_cell(out.state, str(last), "1", request=req("sc3"))
    assert a.status == "" and is_png(a.cell) and calls == ["overlay_job"]
    again = h.inspect_cell(out.state, str(last), "1", request=req("sc3"))
    assert again.cell == a.cell and calls == ["overlay_job"]  # served from the result's folder
    heads = out.state["result"].num_heads
    assert queued[0][:2] == [f"attention_L{last}_Tmean_predicts_H{x}.png" for x in (2, 0)][:min(2, heads - 1)]
    assert len(queued[0]) == heads - 1 + min(2, len(out.state["result"].layers) - 1)


def test_next_picks_start_with_the_neighbours(env):
    from app.inspect_tab import AHEAD_VIEWS, _next_picks

    res = type("R", (), {"n_tokens": 6, "layers": [0, 1, 2, 3]})()
    state = {"result": res, "dir": "/nowhere", "boxes": []}
    names = [Path(j[1]).name for j in _next_picks(state, 1, 2, "predicts", True)]
    assert names[:4] == ["attention_L1_T3_predicts.png", "heads_L1_T3_predicts.png",
                         "attention_L1_T1_predicts.png", "heads_L1_T1_predicts.png"]
    assert names[4:8] == ["attention_L2_T2_predicts.png", "heads_L2_T2_predicts.png",
                          "attention_L0_T2_predicts.png", "heads_L0_T2_predicts.png"]
    assert {f"attention_L1_T{t}_predicts.png" for t in ["mean", 0, 1, 3, 4, 5]} <= set(names)  # every token
    assert {f"attention_L{x}_T2_predicts.png" for x in ["mean", 0, 2, 3]} <= set(names)  # every layer
    assert len(names) == len(set(names)) <= 2 * AHEAD_VIEWS


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_next_token_is_drawn_ahead_in_the_workers(env, monkeypatch):
    mp, h, render_pool = env
    mp.setenv("RAL_RENDER_WORKERS", "1")
    render_pool.shutdown()
    out = h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 3, request=req("sc2"))
    assert out.status == "", out.status
    nxt = Path(out.state["dir"]) / "attention_L{}_T0_predicts.png".format(out.state["result"].layers[-1])
    deadline = time.monotonic() + 60
    while not nxt.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    jobs = drawn(render_pool, monkeypatch)
    v = h.inspect_view(out.state, "last", "0", "predicts", request=req("sc2"))
    assert v.status == "" and v.overlay == str(nxt) and "overlay_job" not in jobs


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_model_dir):
    from playwright.sync_api import sync_playwright

    with served_app(tmp_path_factory.mktemp("scrub_app"), tiny_model_dir) as url, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium_profile")),
                                                   executable_path=CHROMIUM, args=ARGS,
                                                   viewport={"width": 1280, "height": 900})
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(url, wait_until="load")
        pg.wait_for_selector("#i-run")
        yield pg
        ctx.close()


@browser[0]
@browser[1]
@browser[2]
def test_scrubbing_tokens_layers_scale_and_heads_is_quick(page):
    inspect_in_page(page)
    secs = scrub(page)
    p50 = statistics.median(secs)
    print(f"\nclick → new picture, {len(secs)} clicks: p50 {p50 * 1e3:.0f} ms, max {max(secs) * 1e3:.0f} ms, "
          f"load {os.getloadavg()[0]:.1f}")
    assert len(secs) >= 20
    assert p50 <= 1.0, sorted(secs)  # the goal is 0.5 s on an idle machine; loose here for a loaded one
