"""Inspect's newer controls and progress, at handler level and in a browser: the visual-token budget (bounded on the
server), per-head colour scales, the layer × head summary and its click-through (a hybrid Qwen3.5 lists only its
softmax-attention layers; 36 layers × 16 heads stays clickable), and gr.Progress stage reports from the handler's own
process (model load, encoding, generation, capture, saving, figures)."""
import json
import math
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from apphelpers import (CHROMIUM, IMG_LOADED, click_grid_cell, inspect_in_browser, is_png, model_list, req,
                        save_model, served_page)

from ral_core.errors import RALError
from ral_core.inspection import InspectionResult
from ral_core.models.base import TokenGeometry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server is a warning
EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLE = EXAMPLES / "grid3_where.png"


class Recorder:
    """Stands in for gr.Progress: records (fraction, desc, process, thread) of every report."""

    def __init__(self):
        self.calls = []

    def __call__(self, frac, desc=None, **_):
        self.calls.append((frac, desc or "", os.getpid(), threading.get_ident()))

    @property
    def descs(self):
        return [c[1] for c in self.calls]

    def first(self, text):
        return next(i for i, d in enumerate(self.descs) if text in d)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """The tiny model and a tiny hybrid Qwen3.5 (8 layers, softmax attention in layers 3 and 7 only) in a model
    list. Figures are drawn in a render worker process (the running pool if an earlier test started one)."""
    from ral_core.builders.tiny import tiny_qwen3_5

    d = tmp_path_factory.mktemp("views_env")
    save_model(tiny_qwen3_5(), d / "qwen35")
    with model_list(d, f"tiny-a: {tiny_model_dir}\nhybrid: {d / 'qwen35'}\n") as mp:
        mp.setenv("RAL_RENDER_WORKERS", "1")  # figures in a worker process: progress must still come from here
        from app import handlers, registry, render_pool, sessions
        registry.clear_cache()
        had_pool = render_pool._POOL is not None
        yield SimpleNamespace(dir=d, h=handlers, registry=registry, sessions=sessions)
        registry.clear_cache()
        if not had_pool:
            render_pool.shutdown()


def _ok(out):
    assert out.status == "", out.status
    return out


def _refused(out, text):
    assert out.status.startswith("⚠️") and text in out.status, out.status
    assert "Traceback" not in out.status and all(v == {"__type__": "update"} for v in out[1:])


# ---- progress ---------------------------------------------------------------------------------------------------
def test_inspect_progress_reports_each_stage_from_the_handler_process(env):
    h = env.h
    env.registry.clear_cache()  # so the model load is a stage of this request
    rec = Recorder()
    out = _ok(h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 4, request=req("p1"), progress=rec))
    d = rec.descs
    order = ["loading the model 'tiny-a'", "encoding image + prompt", "generating token 2/4", "capturing attention",
             "saving the result", "drawing the overlay", "drawing figures: 2/2 done"]
    idx = [rec.first(t) for t in order]
    assert idx == sorted(idx), d
    fr = [c[0] for c in rec.calls]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0) and fr[0] < 0.2
    # the model ran in the inspect batcher's thread and the figures in a render worker process, yet every report
    # was made in this process (gr.Progress lives here)
    assert {c[2] for c in rec.calls} == {os.getpid()}
    assert any(c[3] != threading.get_ident() for c in rec.calls if "generating" in c[1])
    assert is_png(out.overlay) and is_png(out.heads)

    again = Recorder()  # loaded now: no load stage; a per-request budget runs unbatched, in this thread
    _ok(h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 2, pixel_budget_px=50176, request=req("p1"),
                      progress=again))
    assert not any("loading" in x for x in again.descs) and any("capturing" in x for x in again.descs)

    view = Recorder()
    _ok(h.inspect_view(out.state, "0", "mean", "own", request=req("p1"), progress=view))
    assert view.descs[-1] == "drawing figures: 2/2 done"


def test_model_load_reports_a_hub_download(env, monkeypatch):
    """The registry hands the request's reporter to ral_core's download hook: bytes show in the load stage."""
    import ral_core.models as models

    real = models.load_adapter

    def load(spec, *a, progress=None, **k):
        for n in (0, 6 * 2**20, 12 * 2**20):  # what ral_core.hub's bars report while fetching the weights
            progress("model.safetensors", n, 12 * 2**20)
        return real(spec, *a, **k)
    monkeypatch.setattr(models, "load_adapter", load)
    env.registry.clear_cache()
    rec = Recorder()
    _ok(env.h.run_inspect("tiny-a", str(EXAMPLE), "Read row 1.", 2, request=req("dl"), progress=rec))
    got = [c for c in rec.calls if c[1].startswith("downloading")]
    assert [c[1] for c in got] == [f"downloading tiny-a: model.safetensors {n}/12 MB" for n in (0, 6, 12)]
    assert got[0][0] < got[1][0] < got[2][0] <= rec.calls[rec.first("encoding")][0]


def test_compare_levers_explored_report_their_passes(env):
    h = env.h
    rec = Recorder()
    cmp = _ok(h.run_compare("tiny-a", "tiny-a", str(EXAMPLE), "Read row 1.", 2, request=req("p2"), progress=rec))
    for t in ("A answers: encoding", "B answers: generating", "A scored on A's answer: capturing",
              "B scored on A's answer: capturing", "saving both results", "drawing A | B"):
        assert any(t in x for x in rec.descs), (t, rec.descs)
    assert cmp.figure
    _refused(h.run_compare("tiny-a", "hybrid", str(EXAMPLE), "Read row 1.", 2, request=req("p2")),
             "no attention layer in common")

    out = _ok(h.run_inspect("tiny-a", str(EXAMPLE), "Read row 1.", 2, request=req("p2")))  # no known box
    for box, last in (("", "pass 9/9"), ("0,0,40,40", "pass 1/1")):  # each ninth of the image, or the box
        lev = Recorder()
        _ok(h.run_levers(out.state, box, "1", 3.0, request=req("p2"), progress=lev))
        assert [x for x in lev.descs if x.startswith("steering")][-1] == f"steering and scoring: {last}"
        assert lev.descs[-1] == "drawing the lever chart"
    exp = Recorder()
    _ok(h.run_explored(out.state, 1.0, "last", 0, 2, request=req("p2"), progress=exp))
    assert exp.first("natural answer: encoding") < exp.first("explored answer: encoding") < exp.first("drawing")


def test_zerogpu_model_stage_is_reported_whole_before_the_call(env, monkeypatch):
    """On ZeroGPU the model work runs in a forked process: nothing unpicklable goes in, the stage is reported here."""
    h = env.h
    seen = []
    from app import gpu, model_work
    real = model_work.inspect_work

    def work(*args, **kwargs):
        seen.append(args[-1])  # what would be pickled into the GPU process
        return real(*args, **kwargs)
    monkeypatch.setattr(gpu, "on_zerogpu", lambda: True)
    monkeypatch.setattr(model_work, "inspect_work", work)
    rec = Recorder()
    _ok(h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 2, request=req("p3"), progress=rec))
    assert seen == [None] and any("on the GPU" in x for x in rec.descs)
    assert not any("generating token" in x for x in rec.descs) and rec.descs[-1] == "drawing figures: 2/2 done"


# ---- visual-token budget -----------------------------------------------------------------------------------------
def test_budget_is_parsed_and_bounded_on_the_server(env, monkeypatch):
    h = env.h
    monkeypatch.delenv("RAL_MAX_PIXELS", raising=False)
    hi = h.max_budget()
    assert h.pixel_budget(0) == (None, "") and h.pixel_budget(None) == (None, "") and h.pixel_budget(" ") == (None, "")
    assert h.pixel_budget(401408) == (401408, "") and h.pixel_budget("640x480") == (307200, "")
    assert h.pixel_budget(401408.7) == (401408, "")
    n, note = h.pixel_budget(10)
    assert n == h.MIN_BUDGET and "raised" in note
    n, note = h.pixel_budget(10**30)
    assert n == hi and "lowered" in note and f"{hi:,}" in note
    for bad in ("lots", -1, float("nan"), float("inf"), "1e999", True, [1, 2], "1x2x3", "0x5", "9" * 60, {"a": 1}):
        with pytest.raises(RALError, match="visual-token budget must be"):
            h.pixel_budget(bad)


def test_budget_control_in_run_inspect(env, monkeypatch):
    """A bad value is one clear line; a value over this server's limit is clamped here before the adapter sees it,
    changes the visual tokens, and the shared adapter keeps its own setting afterwards."""
    h = env.h
    for bad in ("lots", -5, float("nan"), "1e999"):
        _refused(h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 2, pixel_budget_px=bad, request=req("b1")),
                 "visual-token budget must be")
    _refused(h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 2, per_head_scale="yes", request=req("b1")),
             "must be true or false")

    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (336, 448, 3), dtype=np.uint8))
    full = _ok(h.run_inspect("tiny-a", photo, "Read row 1.", 2, request=req("b1")))
    n_full = full.state["result"].geometry.n_tokens
    adapter = env.registry.get_adapter("tiny-a")
    asked = []
    real = type(adapter).set_max_pixels

    def spy(self, n):
        asked.append(n)
        return real(self, n)
    monkeypatch.setattr(type(adapter), "set_max_pixels", spy)
    monkeypatch.setenv("RAL_MAX_PIXELS", str(224 * 224))
    out = _ok(h.run_inspect("tiny-a", photo, "Read row 1.", 2, pixel_budget_px=10**12, request=req("b1")))
    res = out.state["result"]
    assert asked == [224 * 224] and adapter.max_pixels is None  # clamped before use; put back after the request
    assert res.geometry.n_tokens <= 224 * 224 // 28**2 < n_full
    assert "lowered to 50,176" in out.answer and f"{res.geometry.n_tokens:,} visual tokens" in out.answer
    assert out.state["budget"] == 224 * 224
    # the explored rollout re-runs the model with the inspection's budget: same tokens
    exp = _ok(h.run_explored(out.state, 1.0, "last", 0, 2, request=req("b1")))
    assert asked == [224 * 224] * 2 and exp.figure


# ---- per-head colour scale ------------------------------------------------------------------------------------------
def test_per_head_colour_scale_option(env):
    h = env.h
    out = _ok(h.run_inspect("tiny-a", str(EXAMPLE), "Where is the 2?", 2, request=req("s1")))
    own = _ok(h.inspect_view(out.state, "last", "mean", "predicts", True, request=req("s1")))
    assert is_png(own.heads) and own.heads != out.heads and "_own" in Path(own.heads).name
    assert own.overlay == out.overlay or is_png(own.overlay)
    _refused(h.inspect_view(out.state, "last", "mean", "predicts", "sometimes", request=req("s1")), "true or false")
    svg = _ok(h.inspect_svg(out.state, request=req("s1")))  # the SVGs follow the scale on show
    assert any(p.endswith("_own.svg") for p in svg.files)


# ---- layer × head summary and click-through ------------------------------------------------------------------------
def synthetic(layers, heads, hot=None, grid=(8, 6), size=(320, 240), T=2):
    """An InspectionResult without a model: small random attention, one hot (layer index, head) if asked."""
    (gx, gy), (W, H) = grid, size
    boxes = np.array([[c * W / gx, r * H / gy, (c + 1) * W / gx, (r + 1) * H / gy] for r in range(gy)
                      for c in range(gx)])
    rng = np.random.default_rng(0)
    nv = gx * gy
    vis = (rng.random((len(layers), heads, T + 1, nv)) * 0.1 / nv).astype(np.float32)
    if hot is not None:
        vis[hot[0], hot[1]] *= 8 * nv
    mass = np.zeros((len(layers), heads, T + 1, 3), np.float32)
    mass[..., 0] = vis.sum(-1)
    mass[..., 1] = 1 - mass[..., 0]
    img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    return InspectionResult(model_name="synthetic", question="q?", answer="ab", answer_tokens=["a", "b"],
                            answer_ids=[1, 2], prompt_tokens=["p"], layers=list(layers), num_heads=heads, visual=vis,
                            mass=mass, image=img, geometry=TokenGeometry((W, H), boxes, [
                                {"start": 0, "rows": gy, "cols": gx}]))


def _state_for(env, res, who):
    d = env.sessions.new_work_dir(req(who), "inspections")
    res.save(d / "result")
    return {"result": res, "dir": str(d), "boxes": [], "model": "synthetic", "zip": ""}


def _center(geo, i, j):
    x0, y0, x1, y1 = geo["box"]
    return [x0 + (j + 0.5) * (x1 - x0) / geo["heads"], y0 + (i + 0.5) * (y1 - y0) / len(geo["layers"])]


def test_summary_click_through_at_36_layers_by_16_heads(env):
    h = env.h
    st = _state_for(env, synthetic(range(36), 16, hot=(20, 11)), "c1")
    s = _ok(h.inspect_summary(st, "image_mass", "mean", "predicts", request=req("c1")))
    geo = json.loads(Path(s.summary).with_suffix(".json").read_text())
    with Image.open(s.summary) as im:
        w, ht = im.size
        rgb = np.asarray(im.convert("RGB"))
    assert (w, ht) == (round(geo["size"][0]), round(geo["size"][1])) and w <= 1000 and ht <= 1000
    x0, y0, x1, y1 = geo["box"]
    assert (x1 - x0) / 16 >= 16 and (y1 - y0) / 36 >= 12  # cells big enough to click
    x, y = _center(geo, 20, 11)
    assert rgb[int(y), int(x)].mean() > 150 and rgb[int(y), int(x + (x1 - x0) / 16)].mean() < 120  # the hot cell
    assert len(s.cell_layer["choices"]) == 36 and len(s.cell_head["choices"]) == 16

    cell = _ok(h.summary_select(st, "image_mass", "mean", "predicts", SimpleNamespace(index=[x, y]),
                                request=req("c1")))
    assert cell.cell_layer["value"] == "20" and cell.cell_head["value"] == "11" and is_png(cell.cell)
    assert Path(cell.cell).name.endswith("_H11.png")
    corner = _ok(h.summary_select(st, "image_mass", "mean", "predicts", SimpleNamespace(index=_center(geo, 35, 0)),
                                  request=req("c1")))
    assert (corner.cell_layer["value"], corner.cell_head["value"]) == ("35", "0")
    for evt, text in ((SimpleNamespace(index=[1, 1]), "outside the grid"), (None, "click a cell"),
                      (SimpleNamespace(index="x"), "click a cell")):
        _refused(h.summary_select(st, "image_mass", "mean", "predicts", evt, request=req("c1")), text)
    # the dropdown pair reaches the same map; bad picks are one line
    same = _ok(h.inspect_cell(st, "20", "11", request=req("c1")))
    assert same.cell == cell.cell
    _refused(h.inspect_cell(st, "99", "0", request=req("c1")), "not captured")
    _refused(h.inspect_cell(st, "20", "16", request=req("c1")), "out of range")
    _refused(h.inspect_cell(st, "x", "1", request=req("c1")), "pick a layer and a head")
    _refused(h.inspect_summary(st, "loudness", "mean", "predicts", request=req("c1")), "the summary shows one of")
    ent = _ok(h.inspect_summary(st, "entropy", "0", "own", request=req("c1")))
    assert ent.summary != s.summary and is_png(ent.summary)
    assert "cleaned up" in h.summary_select(st, "image_mass", "mean", "predicts", SimpleNamespace(index=[x, y]),
                                            request=req("intruder")).status


def test_summary_lists_only_softmax_attention_layers_of_qwen3_5(env):
    h = env.h
    out = _ok(h.run_inspect("hybrid", str(EXAMPLE), "Where is the 2?", 2, request=req("q35")))
    res = out.state["result"]
    adapter = env.registry.get_adapter("hybrid")
    assert res.layers == adapter.attention_layers == [3, 7] and adapter.num_layers == 8
    rec = Recorder()  # what the page asks for right after an inspection: the summary, no cell picked yet
    s = _ok(h.new_summary(out.state, "image_mass", "mean", "predicts", request=req("q35"), progress=rec))
    assert rec.descs == ["drawing the layer × head summary (2 layers × 4 heads)", "drew the layer × head summary"]
    assert s.cell is None and s.cell_layer["value"] is None and s.cell_head["value"] is None
    assert [c[1] for c in s.cell_layer["choices"]] == ["3", "7"]
    geo = json.loads(Path(s.summary).with_suffix(".json").read_text())
    assert geo["layers"] == [3, 7]
    cell = _ok(h.summary_select(out.state, "image_mass", "mean", "predicts",
                                SimpleNamespace(index=_center(geo, 1, res.num_heads - 1)), request=req("q35")))
    assert (cell.cell_layer["value"], cell.cell_head["value"]) == ("7", str(res.num_heads - 1))
    listed = [c[0] for c in out.layer["choices"]]
    assert "layer 3" in listed and "layer 7" in listed and not {f"layer {i}" for i in (0, 1, 2, 4, 5, 6)} & set(listed)


# ---- in a browser ------------------------------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: run `make chromium`")
def test_browser_budget_and_summary_click_through(tmp_path_factory, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAL_RENDER_WORKERS", "0")
    d = tmp_path_factory.mktemp("views_browser")
    with served_page(d, tiny_model_dir) as page:
        inspect_in_browser(page, EXAMPLE, "Where is the 2?", budget="99999999999")  # far over: clamped on the server
        page.wait_for_function("() => document.body.innerText.includes('visual-token budget lowered')")
        assert "⚠️" not in page.inner_text("#i-status")
        page.wait_for_function(IMG_LOADED, arg="#i-summary img")
        geo = json.loads(next((d / "sessions").rglob("summary_image_mass_Tmean_predicts.json")).read_text())
        target = (len(geo["layers"]) - 1, 2)  # the last layer, head 2
        click_grid_cell(page, "#i-summary img", geo, *target)
        page.wait_for_function(IMG_LOADED, arg="#i-cell img")
        want = f"layer {geo['layers'][target[0]]}"
        page.wait_for_function(f"() => document.querySelector('#i-cell-layer input').value === {want!r}")
        assert page.input_value("#i-cell-head input") == "head 2"
        assert "⚠️" not in page.inner_text("#i-summary-status")
