"""Train tab handlers without a browser (tiny saved models, steps 2–4), the run queue and its cap, runs in their
own process (killed, cancelled, session ended), dataset zips, and the Inspect tab's lever and explored-rollout
views."""
import io
import os
import json
import shutil
import signal
import stat
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from apphelpers import is_png, req

from ral_core.errors import RALError
from ral_core.rewards import reward


@reward("test_app_has_digit")
def _has_digit(completion, sample):
    """Varies across random rollouts of an untrained model, so training really changes the weights."""
    return float(any(ch.isdigit() for ch in completion))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server is a warning

FAST = dict(group_size=4, prompts_per_step=2, max_new_tokens=4, lr=1e-3, snapshot_every=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("train_env")
    shutil.copytree(tiny_model_dir, d / "tiny_b")  # a teacher that is not the student (same tokenizer)
    (d / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\ntiny-b: {d / 'tiny_b'}\ndefault: default\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAL_MODELS_CONFIG", str(d / "models.yaml"))
        mp.setenv("RAL_SESSIONS_ROOT", str(d / "sessions"))
        mp.setenv("RAL_MAX_RUNS", "1")
        from app import handlers, registry, sessions, training, uploads
        yield SimpleNamespace(dir=d, h=handlers, reg=registry, s=sessions, t=training, up=uploads,
                              example=handlers.examples()[0])
        for run in list(training.QUEUE.latest.values()):
            training.QUEUE.cancel(run)
        registry.clear_cache()




# ---- the child's entry with a twist (module-level: spawn imports this module in the child, where a monkeypatch
# of the test process would not reach) ------------------------------------------------------------------------
def _patch_train_step(at_step, action):
    from ral_core.trainer import Trainer
    real = Trainer.train_step

    def patched(self):
        if self.step == at_step:
            action()
        return real(self)

    Trainer.train_step = patched


def _child_diverging_at_step_3(*args):
    def nan():
        raise FloatingPointError("loss is nan")

    _patch_train_step(3, nan)
    from app.train_worker import main
    main(*args)


def _child_with_a_bug(*args):
    def bug():
        raise KeyError("a bug in the training loop")

    _patch_train_step(0, bug)
    from app.train_worker import main
    main(*args)


def _child_stalling_in_step_3(*args):
    """Stalls in step 3, after the checkpoint of step 2 (saves every 2 steps of 8), until killed."""
    _patch_train_step(2, lambda: time.sleep(600))
    from app.train_worker import main
    main(*args)


def _child_reporting_modules(cfg, *args):
    from app.train_worker import main
    main(cfg, *args)
    gradio = sorted(m for m in sys.modules if m.split(".")[0] == "gradio")
    (Path(cfg.output_dir).parent / "child.json").write_text(json.dumps({
        "pid": os.getpid(), "gradio": gradio, "env": os.environ.get("RAL_TEST_SET_AFTER_START")}))


def start(env, session, algorithm="ral", steps=4, dataset="grounding", upload=None, teacher=None, name="", **kw):
    o = dict(FAST, **kw)
    return env.t.train_start(dataset, upload, algorithm, "tiny-a", teacher, steps, o["lr"], o.get("weight", 1.0),
                             o["group_size"], o["prompts_per_step"], o.get("temperature", 1.0), o.get("sigma", 1.0),
                             o.get("explore_layers", "last"), o["max_new_tokens"], o["snapshot_every"], 0, name,
                             request=req(session))


def run_of(env, session):
    """The newest run of the browser session `session` (runs belong to its owner, 'anon:<hash>')."""
    return env.t.QUEUE.for_session(env.s._session_hash(req(session)))


def wait(env, session, until=lambda run: not run.active, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        run = run_of(env, session)
        if run is not None and until(run):
            return run
        time.sleep(0.05)
    raise AssertionError(f"run of {session} did not reach the state in {timeout} s")


def test_run_curves_snapshot_checkpoint_then_compare(env, monkeypatch):
    label, recipe, extra, wk = env.t.ALGORITHMS["ral"]
    varied = dict(extra, reward_weights={"test_app_has_digit": 1.0})
    monkeypatch.setitem(env.t.ALGORITHMS, "ral", (label, recipe, varied, wk))
    v = start(env, "ta", steps=4, temperature=1.5)
    assert v.status == "" and v.timer.active and v.cancel["interactive"] is True
    run = wait(env, "ta")
    assert run.status == "done" and run.step == 4, run.message
    # trained in a child process, whose metrics came over; it has exited (model and optimizer freed)
    assert run.pid not in (None, os.getpid()) and run.process.exitcode == 0 and len(run.history()) == 4
    assert all("attn_jsd_after_update" in m and "attn_target_mass" in m for m in run.history())  # every curve
    v = env.t.train_poll(request=req("ta"))
    assert v.status == "" and "done: 4 / 4 steps" in v.progress and "session: ral-1" in v.progress
    assert is_png(v.curves) and is_png(v.snapshot) and "Probe image" in v.note
    # the probe shows the head that moved most (a run that pulls one head barely changes the head mean)
    from ral_core.compare import jsd
    from ral_core.inspection import InspectionResult
    snaps = sorted((Path(run.cfg.output_dir) / "snapshots").glob("step-*"))
    a, b = (InspectionResult.load(d / "probe-0") for d in (snaps[0], snaps[-1]))
    moved = jsd(a.head_maps(a.layers[-1]), b.head_maps(b.layers[-1]))
    assert len(snaps) >= 2 and f"head {int(moved.argmax())}, the one whose attention over the image moved most " \
        f"(JSD {moved.max():.3g}" in v.note, v.note
    assert not v.timer.active and v.start["interactive"] is True
    assert "session: ral-1" in v.models["choices"]  # the model lists learn the new checkpoint once
    assert env.t.train_poll(request=req("ta")).models == {"__type__": "update"}
    # snapshots: step 0 (before training) and every 2 steps
    snaps = sorted(p.name for p in (run.dir / "run" / "snapshots").iterdir())
    assert snaps == ["step-00000", "step-00002", "step-00004"]
    # the checkpoint is this session's model: weights, tokenizer, processor, no optimizer state
    ck = env.s.resolve_checkpoint(req("ta"), "ral-1")
    assert (ck / "config.json").is_file() and not list(ck.glob("trainer_state.*"))
    assert env.s.list_checkpoints(req("ta")) == ["ral-1"]
    ex = env.example
    out = env.h.run_compare("tiny-a", "session: ral-1", ex["path"], ex["question"], 3, request=req("ta"))
    assert out.status == "" and "session: ral-1" in out.answers and is_png(out.figure)
    assert max(r[2] for r in out.ranking) > 0  # training moved attention somewhere
    # another session neither lists nor loads it
    assert "session: ral-1" not in env.reg.model_choices(req("tb"))
    refused = env.h.run_compare("tiny-a", "session: ral-1", ex["path"], ex["question"], 3, request=req("tb"))
    assert "no checkpoint" in refused.status
    # a second run in the same session gets the next free name
    v = start(env, "ta", algorithm="grpo", steps=1)
    assert wait(env, "ta").checkpoint == "grpo-1"


def test_cancel_stops_at_a_step_and_keeps_the_checkpoint(env):
    start(env, "tc", steps=300, snapshot_every=100)
    wait(env, "tc", until=lambda r: r.step >= 1)
    v = env.t.train_cancel(request=req("tc"))
    assert "Cancelling" in v.status
    run = wait(env, "tc")
    assert run.status == "cancelled" and 1 <= run.step < 300 and run.checkpoint == "ral-1"
    assert "cancelled after step" in env.t.train_poll(request=req("tc")).progress
    assert env.s.list_checkpoints(req("tc")) == ["ral-1"]
    assert "no training run to cancel" in env.t.train_cancel(request=req("tc")).status


def test_a_run_that_fails_later_keeps_its_last_good_checkpoint(env, monkeypatch):
    monkeypatch.setattr(env.t.QUEUE, "target", _child_diverging_at_step_3)
    start(env, "tnan", steps=8, name="nan-run")  # saves every 2 steps
    run = wait(env, "tnan")
    assert run.status == "failed" and run.step == 2  # rolled back to the last good step
    assert "loss is nan" in run.message and "last good checkpoint (step 2) is kept" in run.message
    assert run.checkpoint == "nan-run"
    ck = env.s.checkpoints_dir(req("tnan")) / "nan-run"
    assert (ck / "config.json").is_file() and not list(ck.glob("trainer_state.*"))
    v = env.t.train_poll(request=req("tnan"))
    assert "loss is nan" in v.status and "session: nan-run" in v.progress
    assert "session: nan-run" in v.models["choices"]


def test_other_algorithms_run(env):
    v = start(env, "to", algorithm="opad", teacher="tiny-b", steps=2, weight=2.0)
    assert v.status == "", v.status
    run = wait(env, "to")
    assert run.status == "done" and run.cfg.gamma_opad == 2.0 and run.checkpoint == "opad-1"
    v = start(env, "to", algorithm="ral_explore", steps=2, sigma=2.0, explore_layers="levers")
    run = wait(env, "to")
    assert run.status == "done" and run.cfg.explore and "explore_sigma" in run.history()[-1]
    v = start(env, "to", algorithm="ral_visual", steps=1, name="mine.v1")
    run = wait(env, "to")
    assert run.cfg.attn_support == "visual" and run.checkpoint == "mine.v1"


def test_run_cap_queues_a_second_run(env):
    start(env, "qa", steps=300, snapshot_every=100)
    assert "already has a training run" in start(env, "qa").status
    wait(env, "qa", until=lambda r: r.status == "running")
    vb = start(env, "qb", steps=1)
    vc = start(env, "qc", steps=1)
    assert "position <b>1</b>" in vb.progress and "position <b>2</b>" in vc.progress
    assert "1 run at a time" in vb.progress and vb.timer.active
    env.t.train_cancel(request=req("qc"))  # leaves the queue at once
    c = run_of(env, "qc")
    assert c.status == "cancelled" and "while waiting" in c.message and c.checkpoint is None
    env.t.train_cancel(request=req("qa"))
    assert wait(env, "qb").status == "done"  # the queued run starts when the slot frees up
    assert run_of(env, "qa").status == "cancelled" and not env.t.QUEUE.running


def test_closing_the_tab_stops_the_run_and_deletes_the_folder(env):
    start(env, "gone", steps=300, snapshot_every=100)
    run = wait(env, "gone", until=lambda r: r.step >= 1)
    d = env.s.session_dir(req("gone"), create=False)
    env.t.end_session(req("gone"))
    assert d.exists()  # the training process is still finishing its step: the folder waits for it
    run.thread.join(60)
    assert run.process.exitcode == 0 and run.status == "cancelled" and run.checkpoint is None and not d.exists()


def test_a_run_trains_in_its_own_process_without_gradio(env, monkeypatch):
    monkeypatch.setattr(env.t.QUEUE, "target", _child_reporting_modules)
    start(env, "twarm", steps=1)  # the fork server (where there is one) exists from here on
    wait(env, "twarm")
    monkeypatch.setenv("RAL_TEST_SET_AFTER_START", "seen")
    start(env, "tproc", steps=2)
    run = wait(env, "tproc")
    child = json.loads((run.dir / "child.json").read_text())
    assert run.status == "done" and child["pid"] == run.pid != os.getpid(), run.message
    assert child["gradio"] == []  # the child imports ral_core only: no web server in the training process
    assert child["env"] == "seen"  # the server's environment as it is when the run starts, not the fork server's
    assert [m["step"] for m in run.history()] == [1, 2] and run.checkpoint == "ral-1"


def test_an_unexpected_error_in_the_child_is_one_line_and_a_logged_trace(env, monkeypatch, capfd):
    monkeypatch.setattr(env.t.QUEUE, "target", _child_with_a_bug)
    from app import train_worker
    if train_worker.CONTEXT.get_start_method() == "forkserver":  # children write to the fork server's stderr: the server's
        from multiprocessing import forkserver        # when the first run started; start a new one under capfd
        forkserver._forkserver._stop()
    start(env, "tbug", steps=2)
    run = wait(env, "tbug")
    assert run.status == "failed" and run.step == 0 and run.checkpoint is None
    assert run.message == "unexpected error (KeyError); the details are in the server log"
    err = capfd.readouterr().err  # the child writes to the server's stderr
    assert "Traceback" in err and "a bug in the training loop" in err


def test_a_killed_training_process_fails_clearly_and_keeps_its_checkpoint(env, monkeypatch):
    monkeypatch.setattr(env.t.QUEUE, "target", _child_stalling_in_step_3)
    start(env, "tkill", steps=8, name="killed")
    run = wait(env, "tkill", until=lambda r: r.step >= 2)
    assert run.status == "running" and run.latest_checkpoint().name == "step-00002"
    os.kill(run.pid, signal.SIGKILL)
    run = wait(env, "tkill", timeout=30)  # never a hung 'running'
    assert run.status == "failed" and run.step == 2
    assert run.message == ("the training process stopped unexpectedly (exit code -9); "
                           "its last checkpoint (step 2) is kept")
    ck = env.s.checkpoints_dir(req("tkill")) / "killed"
    assert run.checkpoint == "killed" and (ck / "config.json").is_file() and not list(ck.glob("trainer_state.*"))
    v = env.t.train_poll(request=req("tkill"))
    assert v.status == f"⚠️ {run.message}" and "session: killed" in v.progress and not v.timer.active
    assert "session: killed" in v.models["choices"] and v.start["interactive"] is True
    assert not env.t.QUEUE.running  # the slot is free again


@pytest.mark.parametrize("change, expect", [
    (dict(steps=0), "steps must be between 1 and 500"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(lr=1.0), "learning rate must be between"),
    (dict(lr="fast"), "learning rate must be a number"),
    (dict(group_size=1), "group size must be between 2 and 16"),
    (dict(temperature=9), "temperature must be between"),
    (dict(weight=0.0), "needs an attention weight above 0"),
    (dict(algorithm="opad"), "OPAD needs a teacher"),
    (dict(algorithm="ral_explore", sigma=0.0), "σ above 0"),
    (dict(algorithm="sgd"), "unknown algorithm"),
    (dict(name="../x"), "cannot be a checkpoint name"),
    (dict(dataset="upload"), "no data set"),
])
def test_bad_values_give_a_message(env, change, expect):
    args = dict(algorithm="ral", steps=3, dataset="grounding", **FAST)
    args.update(change)
    v = start(env, "bad", **args)
    assert v.status.startswith("⚠️") and expect in v.status, v.status
    assert all(x == {"__type__": "update"} for x in v[1:])  # the page keeps what it showed
    assert run_of(env, "bad") is None
    runs = env.s.session_dir(req("bad"), create=False) / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing left behind


def test_unknown_model_and_bad_config(env, monkeypatch):
    v = env.t.train_start("grounding", None, "ral", "/etc", None, 3, 1e-3, 1.0, 4, 2, 1.0, 1.0, "last", 4, 2, 0, "",
                          request=req("bad2"))
    assert "unknown model" in v.status
    # an error from ral_core's own validation reaches the page as its message
    monkeypatch.setitem(env.t.ALGORITHMS, "ral", ("RAL", "ral", {"epochs": 1, "minibatch_size": 64}, "lambda_attn"))
    v = start(env, "bad2")
    assert "exactly zero on the first update" in v.status


# ---- data set zips ---------------------------------------------------------------------------------------
def png_bytes(color=128):
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (color, color, color)).save(buf, "PNG")
    return buf.getvalue()


def make_zip(path, members: dict, links=()):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


def rows(*items):
    return "\n".join(json.dumps(r) for r in items) + "\n"


GOOD = {"data/train.jsonl": rows({"image": "img/a.png", "question": "What digit is in row 1 column 1?", "answer": "1",
                                  "boxes": [[0, 0, 28, 28]]},
                                 {"image": "img/b.png", "question": "Read row 1.", "answer": "2"}),
        "data/img/a.png": png_bytes(10), "data/img/b.png": png_bytes(200)}


def test_uploaded_zip_trains(env, tmp_path):
    z = make_zip(tmp_path / "mydata.zip", GOOD)
    v = start(env, "zip", steps=2, dataset="upload", upload={"path": str(z), "orig_name": "mydata.zip"})
    assert v.status == "", v.status
    run = wait(env, "zip")
    assert run.status == "done" and run.cfg.dataset.endswith("train.jsonl") and "2 samples" in run.data_note
    assert env.s.owns(req("zip"), run.cfg.dataset)  # extracted into the session's run folder


@pytest.mark.parametrize("members, links, expect", [
    ({"../evil.jsonl": "{}"}, (), "points outside the folder"),
    ({"/abs/train.jsonl": "{}"}, (), "absolute path"),
    ({"C:/x/train.jsonl": "{}"}, (), "absolute path"),
    ({"train.jsonl": "{}"}, ("img/link.png",), "link or special file"),
    ({"img/a.png": png_bytes()}, (), "no .jsonl file"),
    ({"a.jsonl": "{}", "b.jsonl": "{}"}, (), "several .jsonl files"),
    ({"train.jsonl": rows({"image": "a.png", "question": "q", "answer": "1"}) + "not json\n", "a.png": png_bytes()},
     (), "train.jsonl line 2: not valid JSON"),
    ({"train.jsonl": rows({"image": "a.png", "question": "q"}), "a.png": png_bytes()}, (), "line 1: missing field"),
    ({"train.jsonl": rows({"image": "../../../../etc/hostname", "question": "q", "answer": "1"})}, (),
     "line 1: the image path must point to a file inside the zip"),
    ({"train.jsonl": rows({"image": "a.png", "question": "q", "answer": "1"}), "a.png": b"not a png"}, (),
     "line 1: 'a.png' is not an image"),
    ({"train.jsonl": rows({"image": "gone.png", "question": "q", "answer": "1"})}, (),
     "line 1: image file 'gone.png' does not exist"),
    # every row is checked, not the first 2,000: a later bad row used to fail in training, naming the server folder
    ({"train.jsonl": rows(*[{"image": "a.png", "question": "q", "answer": "1"}] * 2000,
                          {"image": "late.png", "question": "q", "answer": "1"}), "a.png": png_bytes()}, (),
     "line 2001: image file 'late.png' does not exist"),
])
def test_bad_zips_give_a_message(env, tmp_path, members, links, expect):
    z = make_zip(tmp_path / "up.zip", members, links)
    v = start(env, "badzip", steps=2, dataset="upload", upload={"path": str(z), "orig_name": "up.zip"})
    assert v.status.startswith("⚠️") and expect in v.status, v.status
    assert str(tmp_path) not in v.status and "sessions" not in v.status  # no server paths in messages
    assert run_of(env, "badzip") is None
    assert not (tmp_path / "evil.jsonl").exists() and not list(env.dir.rglob("evil.jsonl"))


def test_zip_limits(env, tmp_path, monkeypatch):
    bad = tmp_path / "notes.zip"
    bad.write_text("this is not a zip")
    v = start(env, "lim", dataset="upload", upload={"path": str(bad), "orig_name": "notes.zip"})
    assert "'notes.zip' is not a valid zip file" in v.status
    bomb = make_zip(tmp_path / "bomb.zip", {"train.jsonl": "{}", "zeros.bin": b"\0" * 200_000})
    assert bomb.stat().st_size < 5_000
    monkeypatch.setattr(env.up, "MAX_UNZIPPED_BYTES", 100_000)
    v = start(env, "lim", dataset="upload", upload={"path": str(bomb), "orig_name": "bomb.zip"})
    assert "zip-bomb guard" in v.status
    with pytest.raises(RALError, match="zip-bomb guard"):
        env.up.extract_zip(bomb, tmp_path / "x", max_unzipped_bytes=50_000)
    assert not (tmp_path / "x").exists()  # nothing left behind
    monkeypatch.setattr(env.up, "MAX_ZIP_BYTES", 1_000)
    big = make_zip(tmp_path / "big.zip", {"train.jsonl": "{}", "r.bin": os.urandom(5000)})
    v = start(env, "lim", dataset="upload", upload={"path": str(big), "orig_name": "big.zip"})
    assert "'big.zip' is" in v.status and "limit; upload a smaller zip" in v.status


# ---- Inspect: levers and explored rollout ------------------------------------------------------------------
@pytest.fixture(scope="module")
def inspected(env):
    ex = env.example
    out = env.h.run_inspect("tiny-a", ex["path"], ex["question"], 3, request=req("iv"))
    assert out.status == ""
    return out.state


def test_lever_view(env, inspected):
    v = env.h.run_levers(inspected, "", "1", 3.0, request=req("iv"))
    assert v.status == "" and is_png(v.chart)
    assert "strongest lever" in v.summary and "example's known answer region" in v.summary
    v2 = env.h.run_levers(inspected, "0,0,42,42", "1", 2.0, request=req("iv"))
    assert v2.status == "" and "the box you typed" in v2.summary and v2.chart != v.chart
    for box, strength, expect in (("1,2,3", 3, "four numbers"), ("0,0,500,500", 3, "inside the image"),
                                  ("a,b,c,d", 3, "four numbers"), ("", 50, "between 0.5 and 10")):
        assert expect in env.h.run_levers(inspected, box, "1", strength, request=req("iv")).status
    assert "run it first" in env.h.run_levers(None, "", "", 3, request=req("iv")).status
    assert "was cleaned up" in env.h.run_levers(inspected, "", "1", 3, request=req("other")).status


def test_explored_view(env, inspected):
    v = env.h.run_explored(inspected, 3.0, "all", 1, 3, request=req("iv"))
    assert v.status == "" and is_png(v.figure) and "Natural answer" in v.answers and "all layers" in v.answers
    v = env.h.run_explored(inspected, 3.0, "1", 1, 3, request=req("iv"))
    assert v.status == "" and "layer 1" in v.answers
    choices = env.h.explore_layer_choices(inspected)["choices"]
    assert ("layer 2", "2") in choices and choices[0] == ("last layer", "last")
    assert "σ must be above 0" in env.h.run_explored(inspected, 0, "last", 0, 3, request=req("iv")).status
    assert "layer must be" in env.h.run_explored(inspected, 1, "9", 0, 3, request=req("iv")).status
    assert "run it first" in env.h.run_explored(None, 1, "last", 0, 3, request=req("iv")).status


def test_app_lists_the_new_endpoints(env):
    from app.main import build_app

    names = {d.api_name for d in build_app().fns.values() if d.api_name}
    assert {"train_start", "train_poll", "train_cancel", "levers", "explored"} <= names


# ---- the run page from a run's state (no training process: the states are set as the reader thread sets them) ----
def _page_run(env, session, tmp_path, note="the bundled digit-grid task", status="running"):
    """A run in the queue's table as its reader thread leaves it, with two logged steps."""
    cfg = SimpleNamespace(steps=4, output_dir=str(tmp_path / "run"))
    run = env.t.Run(f"anon:{session}", cfg, "page", "grpo", tmp_path, note)
    run.status, run.loaded, run.started_at = status, True, time.time() - 12.0
    run._history = [{"step": s, "reward": 0.5, "accuracy": 0.5, "step_time": 0.1} for s in (1, 2)]
    run._step = 2
    env.t.QUEUE.latest[run.session_hash] = run
    return run


def test_a_run_that_fails_while_its_page_is_drawn_still_shows_why(env, tmp_path, monkeypatch):
    """The page reads the run once: a failure between reading and drawing shows on the next poll, never as a stopped
    page with no reason."""
    run = _page_run(env, "d3", tmp_path)
    real = env.t._curves

    def fail_meanwhile(r):
        r.message, r.status = "loss is nan at step 3", "failed"  # as the reader thread: message, then status
        return real(r)
    monkeypatch.setattr(env.t, "_curves", fail_meanwhile)
    v = env.t.train_poll(request=req("d3"))
    assert v.timer.active or "loss is nan" in v.status, (v.status, v.timer.active)
    monkeypatch.setattr(env.t, "_curves", real)
    v = env.t.train_poll(request=req("d3"))
    assert "loss is nan at step 3" in v.status and not v.timer.active and run.status == "failed"


def test_user_text_in_the_curves_title_is_plain_text(env, tmp_path):
    """An upload named like mathtext ('data$x^{$.zip') once failed every poll of its run."""
    _page_run(env, "d4", tmp_path, note="your data set 'data$x^{$.zip' (3 samples)")
    v = env.t.train_poll(request=req("d4"))
    assert v.status == "" and is_png(v.curves), v.status


def test_a_poll_after_the_run_folder_was_swept_links_no_removed_file(env, tmp_path):
    run = _page_run(env, "d7", tmp_path / "runfolder", status="done")
    (tmp_path / "runfolder").mkdir()
    assert is_png(env.t.train_poll(request=req("d7")).curves)
    shutil.rmtree(tmp_path / "runfolder")  # the idle sweep removed the session's folder
    v = env.t.train_poll(request=req("d7"))
    shown = [x for x in (v.curves, v.snapshot) if isinstance(x, str)]
    assert v.status == "" and not shown and "cleaned up" in v.note, (v.status, shown)
    assert str(tmp_path) not in v.progress + v.note and run.status == "done"


def test_the_done_line_gives_total_wall_time_and_collapse_warnings(env, tmp_path):
    run = _page_run(env, "d22", tmp_path, status="done")
    run.ended_at = run.started_at + 42.4
    run._history[-1]["warnings"] = ["mean reward fell from 0.500 to 0.100; the run may be collapsing"]
    v = env.t.train_poll(request=req("d22"))
    assert "in 42 s in all" in v.progress and "s/step" not in v.progress
    assert "⚠️ mean reward fell from 0.500 to 0.100" in v.progress


@pytest.fixture()
def busy_queue(env, tmp_path):
    """The server's one training slot taken by a run that never ends (no process), so new runs wait."""
    q = env.t.QUEUE
    blocker = env.t.Run("anon:blocker", SimpleNamespace(steps=4, output_dir=str(tmp_path)), "b", "grpo", tmp_path, "")
    blocker.status = "running"
    with q.lock:
        q.running.append(blocker)
    yield q
    with q.lock:
        if blocker in q.running:
            q.running.remove(blocker)
        for r in list(q.waiting):
            q.cancel(r)


def test_the_queue_is_bounded_and_waiting_data_stays_packed(env, tmp_path, busy_queue, monkeypatch):
    """A waiting run holds its zip, not its unpacked data; the queue refuses runs past its length and past its
    bytes with one 'queue full' line."""
    monkeypatch.setenv("RAL_MAX_QUEUED", "1")
    monkeypatch.setenv("RAL_MAX_QUEUED_MB", "1")
    z = make_zip(tmp_path / "waits.zip", GOOD)
    v = start(env, "qw1", steps=2, dataset="upload", upload={"path": str(z), "orig_name": "waits.zip"})
    run = run_of(env, "qw1")
    assert v.status == "" and run.status == "queued" and "position <b>1</b>" in v.progress, v.status
    assert (run.dir / "data.zip").is_file() and not (run.dir / "data").exists() and run.data_bytes > 0
    full = start(env, "qw2", steps=2)
    assert "the training queue is full (1 run waiting" in full.status, full.status
    busy_queue.cancel(run)
    monkeypatch.setenv("RAL_MAX_QUEUED", "8")
    monkeypatch.setenv("RAL_MAX_QUEUED_MB", str(run.data_bytes / 2 / 2**20))
    big = start(env, "qw3", steps=2, dataset="upload", upload={"path": str(z), "orig_name": "waits.zip"})
    assert "the training queue is full: the waiting runs' data sets take" in big.status, big.status
    assert run_of(env, "qw3") is None  # nothing of it stays


def test_a_waiting_run_unpacks_its_data_when_it_starts(env, tmp_path, busy_queue):
    z = make_zip(tmp_path / "later.zip", GOOD)
    start(env, "ql", steps=1, dataset="upload", upload={"path": str(z), "orig_name": "later.zip"})
    run = run_of(env, "ql")
    assert run.status == "queued" and not (run.dir / "data").exists()
    with busy_queue.lock:  # the slot frees: the run starts and unpacks
        busy_queue.running.clear()
        busy_queue._pump()
    run = wait(env, "ql")
    assert run.status == "done", run.message
    assert run.cfg.dataset.endswith("train.jsonl") and "2 samples" in run.data_note
    assert not (run.dir / "data.zip").exists()
