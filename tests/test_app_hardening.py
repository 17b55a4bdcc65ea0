"""Many users, the app side: session folders (0700, never re-created, swept, capped), owners (signed-in users),
page facts (examples by image and question), bounded work (time limits, cheap refusals) and batched serving."""
import os
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from apphelpers import req

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


@pytest.fixture()
def env(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\n")
    monkeypatch.setenv("RAL_MODELS_CONFIG", str(tmp_path / "models.yaml"))
    monkeypatch.setenv("RAL_SESSIONS_ROOT", str(tmp_path / "sessions"))
    from app import handlers, registry, sessions
    monkeypatch.setattr(sessions, "_PAGES", type(sessions._PAGES)())
    monkeypatch.setattr(sessions, "_ENDED", type(sessions._ENDED)())
    return SimpleNamespace(h=handlers, s=sessions, reg=registry, root=tmp_path / "sessions")


def _example(name="grid3_cell.png"):
    import json
    return next(e for e in json.loads((EXAMPLES / "examples.json").read_text()) if e["image"] == name)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_folders_are_private_whatever_the_umask(env):
    old = os.umask(0o022)
    try:
        out = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=req("u1"))
    finally:
        os.umask(old)
    assert out.status == ""
    d = Path(out.state["dir"])
    for p in (env.root, d.parents[1], d.parent, d):  # root, session, inspections/, inspections/<n>/
        assert _mode(p) == 0o700, (p, oct(_mode(p)))


def test_a_closed_tab_is_never_recreated(env):
    r = req("tab")
    env.h.model_choices(r)  # demo.load: a browser page
    out = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=r)
    folder = env.s.session_dir(r, create=False)
    assert folder.is_dir()
    env.s.cleanup(r)  # demo.unload
    assert not folder.exists()
    late = env.h.inspect_view(out.state, "0", "mean", "own", request=r)  # a redraw that arrives after the close
    assert "cleaned up" in late.status and not folder.exists()
    again = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=r)
    assert "session has ended; reload the page" in again.status and not folder.exists()


def test_api_sessions_go_when_idle_pages_stay(env, monkeypatch):
    api, page = req("rest-client"), req("browser")
    env.h.model_choices(page)
    for r in (api, page):
        assert env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=r).status == ""
    a, p = env.s.session_dir(api, create=False), env.s.session_dir(page, create=False)
    monkeypatch.setenv("RAL_API_SESSION_IDLE_S", "30")
    past = time.time() - 60
    for d in (a, p):
        os.utime(d, (past, past))
    assert env.s.sweep() == 1
    assert not a.exists() and p.is_dir()  # the REST session went; the open page keeps its work
    env.s.session_dir(api)  # a REST client that comes back simply gets a fresh folder
    # a session with a training run is never swept, whatever its age
    monkeypatch.setattr(env.s, "_busy_check", lambda key: key == p.name)
    os.utime(p, (0, 0))
    env.s.sweep(max_age=1)
    assert p.is_dir()


def test_size_cap_trims_figures_first_then_idle_sessions(env, monkeypatch):
    page, api, active = req("p"), req("a"), req("now")
    env.h.model_choices(page)
    for r in (page, api):
        ck = env.s.checkpoints_dir(r) / "ck"
        ck.mkdir()
        (ck / "config.json").write_text("{}")
        (ck / "model.safetensors").write_bytes(b"\0" * 300_000)
        env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=r)
    env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=active)
    old = time.time() - 3600
    for r in (page, api):
        os.utime(env.s.session_dir(r, create=False), (old, old))
    keep = env.s._size(env.s.session_dir(page, create=False) / "checkpoints") + \
        env.s._size(env.s.session_dir(active, create=False)) + 20_000
    monkeypatch.setenv("RAL_SESSIONS_MAX_MB", str(keep / 2**20))  # room for one checkpoint and the active session
    env.s.sweep()
    pd, ad = env.s.session_dir(page, create=False), env.s.session_dir(api, create=False)
    assert not (pd / "inspections").exists()  # re-creatable figures went first
    assert not ad.exists()  # then the idle API session
    assert (pd / "checkpoints" / "ck" / "config.json").is_file()  # a page's checkpoints last
    assert env.s.session_dir(active, create=False).is_dir()  # a session in use is never touched


def _signed_in(user, session_hash, expires=None):
    sess = {"oauth_info": {"userinfo": {"preferred_username": user}, "expires_at": expires or time.time() + 3600}}
    return SimpleNamespace(session_hash=session_hash, request=SimpleNamespace(session=sess))


def test_signed_in_users_own_their_work_across_tabs(env):
    tab1, tab2 = _signed_in("alice", "t1"), _signed_in("alice", "t2")
    bob, forged = _signed_in("bob", "t3"), req("hf:alice")  # a client may pick any session hash
    ck = env.s.checkpoints_dir(tab1) / "mine"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    assert env.s.list_checkpoints(tab2) == ["mine"]
    assert env.s.list_checkpoints(bob) == [] and env.s.list_checkpoints(forged) == []
    assert env.s.list_checkpoints(_signed_in("alice", "t4", expires=time.time() - 1)) == []  # expired sign-in
    env.s.cleanup(tab1)  # closing one tab keeps the user's work
    assert env.s.list_checkpoints(tab2) == ["mine"]
    assert env.s.signed_in_user(req("x")) is None


def test_examples_match_by_image_and_question(env):
    ex = _example("grid3_cell.png")
    img = str(EXAMPLES / ex["image"])
    same = env.h.run_inspect("tiny-a", img, ex["question"], 2, request=req("e"))
    other = env.h.run_inspect("tiny-a", img, "Read row 1.", 2, request=req("e"))
    assert "expected answer" in same.answer and same.state["boxes"]
    assert "expected answer" not in other.answer and other.state["boxes"] == [] and other.state["expected"] is None


def test_a_huge_question_is_refused_at_once(env):
    t0 = time.perf_counter()
    out = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "x" * 1_000_000, 2, request=req("big"))
    assert "1,000,000 characters" in out.status and time.perf_counter() - t0 < 0.5


def test_the_time_limit_cuts_generation(env, monkeypatch):
    """A model slowed to 0.1 s per forward under a 0.6 s limit: the answer is cut off, the request returns."""
    adapter = env.reg.get_adapter("tiny-a")
    h = adapter.model.register_forward_hook(lambda *a: time.sleep(0.1))
    monkeypatch.setenv("RAL_REQUEST_SECONDS", "0.6")
    try:
        t0 = time.perf_counter()
        out = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_row.png"), "Read row 1.", 64, request=req("slow"))
        took = time.perf_counter() - t0
    finally:
        h.remove()
    assert out.status == "" and "cut off at the 0.6 s limit" in out.answer, (out.status, out.answer)
    assert out.state["result"].n_tokens < 64 and took < 3.0


def test_concurrent_inspects_are_batched_and_equal_to_single(env):
    from ral_core.images import load_image
    from ral_core.inspection import inspect

    served = env.reg.serve("tiny-a", env.reg.resolve("tiny-a"))
    adapter, b = served.adapter, served.batcher()
    qs = ["Read row 1.", "What digit is in row 2 column 3?", "Where is the 7?", "Read row 3."]
    imgs = [load_image(EXAMPLES / n) for n in ("grid3_cell.png", "grid3_row.png", "grid3_where.png", "grid3_row.png")]
    n0 = len(b.batches)
    with served.lock:  # hold the model so that all four queue up, as under load
        out = [None] * 4
        ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, b.submit(imgs[i], qs[i], 6))) for i in range(4)]
        for t in ts:
            t.start()
        time.sleep(0.3)
    for t in ts:
        t.join(30)
    assert max(b.batches[n0:]) >= 2  # served together
    for img, q, res in zip(imgs, qs, out):
        one = inspect(adapter, img, q, max_new_tokens=6)
        assert res.answer_ids == one.answer_ids
        assert abs(res.visual - one.visual).max() < 1e-5 and abs(res.mass - one.mass).max() < 1e-5


def test_a_request_that_waits_past_its_limit_is_refused(env):
    from ral_core.errors import RALError
    from ral_core.images import load_image

    served = env.reg.serve("tiny-a", env.reg.resolve("tiny-a"))
    b = served.batcher()
    err = []

    def late():
        try:
            b.submit(load_image(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, seconds=0.2)
        except RALError as e:
            err.append(str(e))
    with served.lock:
        t = threading.Thread(target=late)
        t.start()
        time.sleep(0.5)
    t.join(10)
    assert err and "busy for longer than the 0.2 s limit" in err[0]


def test_hub_models_are_listed_only_where_they_can_load(env, tmp_path, monkeypatch):
    (tmp_path / "models.yaml").write_text("default: default\nsmol: HuggingFaceTB/SmolVLM-256M-Instruct\n")
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "0")
    assert list(env.reg.configured_models()) == ["default"]
    monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "1")
    assert list(env.reg.configured_models()) == ["default", "smol"]


def test_render_workers_exit_with_a_killed_server(tmp_path):
    """A server killed with SIGKILL leaves no render worker behind."""
    import signal
    import subprocess
    import sys

    code = ("import os, sys, time\nos.environ['RAL_RENDER_WORKERS'] = '2'\nfrom app import render_pool\n"
            "render_pool.warm_up()\nprint(*render_pool._pool()._processes, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    try:
        workers = [int(x) for x in p.stdout.readline().split()]
        assert len(workers) == 2 and all(Path(f"/proc/{w}").exists() for w in workers)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    t0 = time.time()
    while any(map(alive, workers)) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not any(map(alive, workers))


def test_training_child_and_fork_server_exit_with_a_killed_server():
    """A server killed with SIGKILL leaves neither a training process nor the fork server behind."""
    import signal
    import subprocess
    import sys

    # the fork server without its preload (3.5 s of imports that change nothing here)
    code = ("import os, time\nfrom app import train_worker as w\nc1, c2 = w.CONTEXT.Event(), w.CONTEXT.Event()\n"
            "getattr(w.CONTEXT, 'set_forkserver_preload', lambda m: None)([])\n"
            "p = w.CONTEXT.Process(target=w.start, args=(w._watch, dict(os.environ), c1, c2), daemon=True)\n"
            "p.start()\nfrom multiprocessing import forkserver\n"
            "print(w.CONTEXT.get_start_method(), p.pid, forkserver._forkserver._forkserver_pid, flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    try:
        method, *pids = p.stdout.readline().split()
        pids = [int(x) for x in pids if x != "None"]
        assert len(pids) == (2 if method == "forkserver" else 1) and all(Path(f"/proc/{x}").exists() for x in pids)
        time.sleep(0.5)
        assert all(_alive(x) for x in pids)  # the child waits for its server, it does not exit by itself
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    t0 = time.time()
    while any(map(_alive, pids)) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not any(map(_alive, pids))


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_swept_session_never_gets_an_older_figure(env, monkeypatch):
    """After the real idle sweep removed a session's folder, its next inspection draws its own result, never the
    one a render worker still holds for the old folder (folder numbering used to restart at 1)."""
    import numpy as np
    from PIL import Image

    from app import render_pool
    monkeypatch.setenv("RAL_RENDER_WORKERS", "1")  # one worker: every figure of both requests is drawn by it
    monkeypatch.setenv("RAL_API_SESSION_IDLE_S", "30")
    render_pool.shutdown()
    try:
        r = req("d1")
        a = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=r)
        folder = env.s.session_dir(r, create=False)
        old = time.time() - 3600
        os.utime(folder, (old, old))
        assert env.s.sweep() >= 1 and not folder.exists() and a.status == ""
        photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (336, 448, 3), dtype=np.uint8))
        b = env.h.run_inspect("tiny-a", photo, "Read row 1.", 2, request=r)
        assert b.status == "", b.status
        lay = b.state["result"].layers[-1]
        own = render_pool.overlay_job(str(Path(b.state["dir"]) / "result"), [], lay, "mean", "predicts",
                                      str(env.root.parent))  # drawn here, from b's own saved result
        np.testing.assert_array_equal(np.asarray(Image.open(b.overlay)), np.asarray(Image.open(own)))
    finally:
        render_pool.shutdown()


def test_concurrent_requests_of_one_session_lose_nothing(env, monkeypatch):
    """16 requests of one session at once (inspects beyond the folders kept, redraws, summaries, compares): none
    fails, and every figure returned is there when all are done."""
    monkeypatch.setenv("RAL_RENDER_WORKERS", "0")
    r = req("d2")
    img = str(EXAMPLES / "grid3_cell.png")
    base = env.h.run_inspect("tiny-a", img, "Read row 1.", 2, request=r)
    assert base.status == ""
    qs = ["Read row 1.", "Read row 2.", "Read row 3.", "Where is the 7?"]
    calls = [lambda i=i: env.h.run_inspect("tiny-a", img, qs[i % 4], 2, request=r) for i in range(8)]
    calls += [lambda t=t: env.h.inspect_view(base.state, "last", t, "own", request=r) for t in ("mean", "0", "1")]
    calls += [lambda m=m: env.h.inspect_summary(base.state, m, "mean", "predicts", request=r)
              for m in ("image_mass", "entropy")]
    calls += [lambda: env.h.inspect_svg(base.state, request=r)]
    calls += [lambda: env.h.run_compare("tiny-a", "tiny-a", img, "Read row 2.", 2, request=r) for _ in range(2)]
    assert len(calls) >= 16
    out = [None] * len(calls)
    ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, calls[i]())) for i in range(len(calls))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert all(o is not None and o.status == "" for o in out), [o and o.status for o in out]
    for o in out:
        for f in ("overlay", "heads", "summary", "figure"):
            if isinstance(getattr(o, f, None), str):
                assert Path(getattr(o, f)).is_file(), (f, getattr(o, f))


def test_a_figure_drawn_ahead_into_a_swept_folder_does_not_make_it_again(env, monkeypatch):
    """Drawing ahead races the idle sweep: when the folder goes while the figure is being drawn (after its result
    was read), the write fails (the guess is dropped) and the swept folder stays gone."""
    import shutil

    from app import render_pool
    from ral_core import render
    r = req("d3")
    a = env.h.run_inspect("tiny-a", str(EXAMPLES / "grid3_cell.png"), "Read row 1.", 2, request=r)
    assert a.status == "", a.status
    draw = render.inspection_overlay

    def swept_meanwhile(*args, **kw):
        fig = draw(*args, **kw)
        shutil.rmtree(a.state["dir"])
        return fig
    monkeypatch.setattr(render, "inspection_overlay", swept_meanwhile)
    with pytest.raises(FileNotFoundError):
        render_pool.overlay_job(str(Path(a.state["dir"]) / "result"), [], a.state["result"].layers[-1], 0,
                                "predicts", a.state["dir"])
    assert not Path(a.state["dir"]).exists()
