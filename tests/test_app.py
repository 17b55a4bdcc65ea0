"""App handlers without a browser: Inspect, Compare, bad inputs, session isolation, model list."""
import math
import os
import shutil
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from apphelpers import is_png, model_list, req, save_model

from ral_core.compare import jsd
from ral_core.errors import RALError
from ral_core.inspection import InspectionResult

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server is a warning


@pytest.fixture(scope="module")
def app_env(tmp_path_factory, tiny_model_dir, tiny_qwen):
    """Two tiny saved models listed in a temp RAL_MODELS_CONFIG, sessions under a temp root."""
    from ral_core.builders.tiny import tiny_qwen2_vl

    d = tmp_path_factory.mktemp("app_env")
    save_model(tiny_qwen2_vl(layers=3, seed=1, tokenizer=tiny_qwen.tokenizer), d / "tiny_b")
    with model_list(d, f"tiny-a: {tiny_model_dir}\ntiny-b: tiny_b\ndefault: default\n"):
        from app import handlers, registry, sessions
        yield SimpleNamespace(dir=d, handlers=handlers, registry=registry, sessions=sessions,
                              example=handlers.examples()[0])
        registry.clear_cache()




def test_model_list_names_only(app_env):
    reg = app_env.registry
    assert reg.model_choices() == ["tiny-a", "tiny-b", "default"] and reg.initial_model() == "tiny-a"
    assert reg.resolve("tiny-b") == str((app_env.dir / "tiny_b").resolve())  # relative to the yaml
    for bad in ("/etc", "../tiny_b", str(app_env.dir / "tiny_b"), "session: x"):
        with pytest.raises(RALError):
            reg.resolve(bad)


def test_inspect_then_rerender_from_state_only(app_env, monkeypatch, tmp_path):
    h, ex = app_env.handlers, app_env.example
    out = h.run_inspect("tiny-a", ex["path"], ex["question"], 4, request=req("s1"))
    assert out.status == "" and "Answer:" in out.answer and "expected answer" in out.answer
    res = out.state["result"]
    assert out.tokens["choices"][0][1] == "mean" and len(out.tokens["choices"]) == res.n_tokens + 1
    assert out.layer["value"] == "last" and ("layer 2", "2") in out.layer["choices"]
    assert is_png(out.overlay) and is_png(out.heads)
    assert math.isclose(sum(out.mass.values()), 1.0, abs_tol=1e-4)
    assert {p.rsplit(".", 1)[1] for p in out.files} == {"png", "zip"}
    svg = h.inspect_svg(out.state, request=req("s1"))
    assert svg.status == "" and {p.rsplit(".", 1)[1] for p in svg.files} == {"png", "svg", "zip"}
    assert "cleaned up" in h.inspect_svg(out.state, request=req("other")).status
    zpath = next(p for p in out.files if p.endswith(".zip"))
    zipfile.ZipFile(zpath).extractall(tmp_path / "z")
    back = InspectionResult.load(tmp_path / "z")
    np.testing.assert_array_equal(back.visual, res.visual)

    # changing layer / token / row must never touch a model again
    def boom(*a, **k):
        raise AssertionError("the model was re-run")
    from app import model_work
    monkeypatch.setattr(model_work, "inspect", boom)
    monkeypatch.setattr(app_env.registry, "get_adapter", boom)
    monkeypatch.setattr(app_env.registry, "serve", boom)
    for layer, token, row in (("mean", "0", "own"), ("0", "mean", "predicts"), ("last", str(res.n_tokens - 1), "own")):
        v = h.inspect_view(out.state, layer, token, row, request=req("s1"))
        assert v.status == "" and is_png(v.overlay) and v.overlay != out.overlay
        assert math.isclose(sum(v.mass.values()), 1.0, abs_tol=1e-4)
    v = h.inspect_view(out.state, "7", "mean", "predicts", request=req("s1"))
    assert "not captured" in v.status


def test_compare_shared_answer_and_ranked_heads(app_env):
    h, ex = app_env.handlers, app_env.example
    out = h.run_compare("tiny-a", "tiny-b", ex["path"], ex["question"], 4, request=req("s2"))
    assert out.status == "", out.status
    cmp = out.state["cmp"]
    assert cmp.a.answer_ids == cmp.b.answer_ids and cmp.a.meta["forced"] and cmp.b.meta["forced"]
    assert "tiny-a" in out.answers and "tiny-b" in out.answers and is_png(out.figure)
    d = [r[2] for r in out.ranking]
    assert len(out.ranking) == cmp.a.num_heads and d == sorted(d, reverse=True)
    assert any(v > 0 for v in d)  # different weights: attention moved somewhere
    v = h.compare_view(out.state, "0", "0", "own", request=req("s2"))
    assert v.status == "" and is_png(v.figure) and v.ranking[0][1].startswith("layer 0")
    same = h.run_compare("tiny-a", "tiny-a", ex["path"], ex["question"], 4, request=req("s2"))
    assert max(r[2] for r in same.ranking) < 1e-9  # a model against itself moves nothing


def test_jsd():
    p, q = np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 2.0, 2.0])  # q unnormalised on purpose
    assert jsd(p, p) == pytest.approx(0, abs=1e-12) and jsd(p, q) == pytest.approx(math.log(2))
    assert jsd(p, [0.2, 0.3, 0.4, 0.1]) == pytest.approx(jsd([0.2, 0.3, 0.4, 0.1], p))


def test_bad_inputs_give_a_message_not_a_trace(app_env, tmp_path):
    h, ex = app_env.handlers, app_env.example
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (4100, 4100)).save(tmp_path / "huge.png")
    cases = {
        "not an image file": ("tiny-a", str(tmp_path / "notes.png"), "q"),
        "over the limit": ("tiny-a", str(tmp_path / "huge.png"), "q"),
        "no image": ("tiny-a", None, "q"),
        "question is empty": ("tiny-a", ex["path"], "   "),
        "unknown model": ("/etc", ex["path"], "q"),
    }
    for expect, (model, image, q) in cases.items():
        out = h.run_inspect(model, image, q, request=req("s3"))
        assert out.status.startswith("⚠️") and expect in out.status, out.status
        assert all(v == {"__type__": "update"} for v in out[1:])  # the page keeps what it showed
        assert str(tmp_path) not in out.status  # names the upload, not the server path
        c = h.run_compare("tiny-a", model, image, q, request=req("s3"))
        assert c.status.startswith("⚠️")
    upload = {"path": str(tmp_path / "notes.png"), "orig_name": "holiday.png"}  # what the browser sends
    assert "'holiday.png' is not an image" in h.run_inspect("tiny-a", upload, "q", request=req("s3")).status
    assert "max new tokens" in h.run_inspect("tiny-a", ex["path"], "q", 0, request=req("s3")).status
    assert "run it first" in h.inspect_view(None, "last", "mean", "predicts", request=req("s3")).status
    assert "run it first" in h.compare_view(None, "last", "mean", "predicts", request=req("s3")).status


def test_sessions_are_private(app_env, tiny_model_dir):
    s, reg = app_env.sessions, app_env.registry
    a, b = req("alice"), req("bob")
    da, db = s.session_dir(a), s.session_dir(b)
    assert da != db and da.parent == db.parent and "alice" not in str(da)
    ck = s.checkpoints_dir(a) / "ck1"
    shutil.copytree(tiny_model_dir, ck)
    assert s.list_checkpoints(a) == ["ck1"] and s.list_checkpoints(b) == []
    assert s.resolve_checkpoint(a, "ck1") == ck.resolve()
    with pytest.raises(RALError, match="no checkpoint"):
        s.resolve_checkpoint(b, "ck1")
    for bad in ("../ck1", "..", "ck1/..", "/etc", f"../../{da.name}/checkpoints/ck1", "", "a b"):
        with pytest.raises(RALError):
            s.resolve_checkpoint(a, bad)
    (s.checkpoints_dir(b) / "link").symlink_to(ck)  # a link into another session is not bob's checkpoint
    with pytest.raises(RALError):
        s.resolve_checkpoint(b, "link")
    assert s.list_checkpoints(b) == []
    assert s.owns(a, ck / "config.json") and not s.owns(b, ck / "config.json")

    # the session's checkpoints are models for that session only
    assert "session: ck1" in reg.model_choices(a) and "session: ck1" not in reg.model_choices(b)
    ex = app_env.example
    ok = app_env.handlers.run_inspect("session: ck1", ex["path"], ex["question"], 2, request=a)
    assert ok.status == "" and "session: ck1" in ok.answer
    refused = app_env.handlers.run_inspect("session: ck1", ex["path"], ex["question"], 2, request=b)
    assert "no checkpoint" in refused.status
    # a stored result is only rendered for the session that owns its folder
    assert "was cleaned up" in app_env.handlers.inspect_view(ok.state, "last", "mean", "predicts", request=b).status

    s.cleanup(a)
    assert not da.exists() and db.exists()
    old = s.session_dir(req("carol"))
    os.utime(old, (1, 1))
    assert s.sweep(max_age=3600) >= 1 and not old.exists() and db.exists()


def test_build_app_lists_endpoints(app_env):
    from app.main import build_app

    demo = build_app()
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"inspect", "inspect_view", "compare", "compare_view"} <= names


def test_user_text_is_never_markup_on_the_page(app_env):
    """Answers to score, model output and status lines show as text: no emphasis, link, image, HTML or LaTeX from
    what a user typed (rendered here with a CommonMark parser, as the page's Markdown does)."""
    from markdown_it import MarkdownIt

    from app.common import code, md_text, plain_markdown
    md = MarkdownIt("commonmark")
    tricky = "7 ``**b**` [l](http://e.x) <img src=x onerror=alert(1)> $$x$$ _i_ &amp;"
    for text in (tricky, "`", "1. one", "- two", "# three"):
        assert md.render(code(text)).count("<code>") == 1
        out = md.render(md_text(text))
        assert not any(t in out for t in ("<strong>", "<em>", "<a ", "<img", "<h1", "<ol", "<ul", "<li")), out
    assert md.render(plain_markdown().postprocess(f"⚠️ unknown model '{tricky}'")).count("<img") == 0
    ex, h = app_env.example, app_env.handlers
    r = SimpleNamespace(session_hash="md")
    st = h.run_inspect("tiny-a", ex["path"], ex["question"], 2, request=r).state
    out = h.run_levers(st, "", tricky, 3.0, request=r)
    assert out.status == "", out.status
    html = md.render(out.summary)
    assert "<a " not in html and "<img" not in html and "**b**" in html, html
