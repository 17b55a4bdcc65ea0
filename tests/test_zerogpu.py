"""ZeroGPU: with the `spaces` package present on a ZeroGPU Space, every model call of Inspect / Compare / levers /
explored runs inside `spaces.GPU` with a declared duration, with picklable arguments and results, and a training run
is a sequence of GPU calls for a signed-in visitor. Two stand-ins for `spaces`: one here that round-trips arguments
and results through pickle in this process, and tests/spaces_standin/spaces.py, which forks a worker per call as
ZeroGPU does (nothing the worker changes comes back; only CPU tensors may cross; aborted calls and quotas)."""
import importlib
import importlib.util
import pickle
import re
import sys
import time
import types
from pathlib import Path

import pytest

from apphelpers import req

EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_cell.png"


@pytest.fixture()
def zero_gpu(monkeypatch, tmp_path, tiny_model_dir):
    calls = []

    def GPU(duration=60):
        def deco(fn):
            def run(*args, **kwargs):
                seconds = duration(*args, **kwargs) if callable(duration) else duration
                calls.append((fn.__name__, seconds))
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # what crosses into the GPU process
                return pickle.loads(pickle.dumps(fn(*args, **kwargs)))    # and back
            return run
        return deco

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("RAL_REQUEST_SECONDS", "20")
    (tmp_path / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\n")
    monkeypatch.setenv("RAL_MODELS_CONFIG", str(tmp_path / "models.yaml"))
    monkeypatch.setenv("RAL_SESSIONS_ROOT", str(tmp_path / "sessions"))
    import app.handlers as h
    import app.model_work as work
    importlib.reload(work)  # gpu_task decorates at import
    yield h, calls
    monkeypatch.delenv("SPACES_ZERO_GPU")
    importlib.reload(work)


def test_model_calls_run_inside_spaces_gpu(zero_gpu):
    h, calls = zero_gpu
    out = h.run_inspect("tiny-a", str(EXAMPLE), "Read row 1.", 3, request=req("z"))
    assert out.status == "" and calls == [("inspect_work", 35)]
    cmp = h.run_compare("tiny-a", "tiny-a", str(EXAMPLE), "Read row 1.", 3, request=req("z"))
    lev = h.run_levers(out.state, "", "1", 3.0, request=req("z"))
    exp = h.run_explored(out.state, 1.0, "last", 0, 3, request=req("z"))
    assert cmp.status == "" and lev.status == "" and exp.status == "", (cmp.status, lev.status, exp.status)
    assert [c[0] for c in calls] == ["inspect_work", "compare_work", "levers_work", "explored_work"]


# ---- training runs as GPU calls (ral_core/chunked.py through the forking stand-in, tests/spaces_standin) ----------
STANDIN = Path(__file__).resolve().parent / "spaces_standin" / "spaces.py"
TRAIN = dict(dataset_kind="grounding", upload=None, algorithm="grpo", model="tiny-a", teacher=None, steps=4, lr=1e-3,
             weight=1.0, group_size=4, prompts_per_step=2, temperature=1.0, sigma=1.0, explore_layers="last",
             max_new_tokens=4, snapshot_every=2, seed=0, name="")


def _signed_in(user, session_hash):
    sess = {"oauth_info": {"userinfo": {"preferred_username": user}, "expires_at": time.time() + 3600}}
    return types.SimpleNamespace(session_hash=session_hash, request=types.SimpleNamespace(session=sess))


@pytest.fixture()
def zero_gpu_fork(monkeypatch, tmp_path, tiny_model_dir):
    """The stand-in that forks a worker per call (what ZeroGPU does), as the `spaces` module."""
    spec = importlib.util.spec_from_file_location("spaces", STANDIN)
    spaces = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spaces)
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("RAL_ZEROGPU_CHUNK_STEPS", "2")
    (tmp_path / "models.yaml").write_text(f"tiny-a: {tiny_model_dir}\n")
    monkeypatch.setenv("RAL_MODELS_CONFIG", str(tmp_path / "models.yaml"))
    monkeypatch.setenv("RAL_SESSIONS_ROOT", str(tmp_path / "sessions"))
    import app.gpu as gpu
    import app.model_work as work
    importlib.reload(gpu)  # train_chunk is decorated at import
    importlib.reload(work)
    from app import training
    yield training, spaces
    monkeypatch.delenv("SPACES_ZERO_GPU")
    importlib.reload(gpu)
    importlib.reload(work)


def _wait(training, request, seconds=120):
    from app.runs import QUEUE
    from app import sessions
    t0 = time.time()
    while time.time() - t0 < seconds:
        run = QUEUE.for_session(sessions._session_hash(request))
        if run is not None and not run.active:
            return run, training.train_poll(request=request)
        time.sleep(0.2)
    raise AssertionError("the run did not end")


def test_training_needs_sign_in_on_zerogpu(zero_gpu_fork):
    training, spaces = zero_gpu_fork
    v = training.train_start(**TRAIN, request=req("anon"))
    assert v.status.startswith("⚠️") and "needs a Hugging Face account" in v.status and "Sign in" in v.status
    v = training.train_start(**{**TRAIN, "steps": 41}, request=_signed_in("alice", "a1"))
    assert "at most 40 steps (this one has 41)" in v.status
    assert spaces.CALLS == []  # nothing reached the GPU


def test_signed_in_run_trains_in_gpu_calls_without_cuda_here(zero_gpu_fork, monkeypatch):
    """4 steps in 2 GPU calls (forked workers, state pickled through this process), checkpoint registered; this
    process's torch.cuda is forbidden throughout (the workers get it back)."""
    import torch
    training, spaces = zero_gpu_fork

    def forbidden(*a, **k):
        raise AssertionError("torch.cuda used in the main process")

    for name in ("is_available", "init", "_lazy_init", "device_count", "get_rng_state_all", "set_rng_state_all"):
        spaces.CUDA_RESTORE[name] = getattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, forbidden)
    alice = _signed_in("alice", "a2")
    v = training.train_start(**TRAIN, request=alice)
    assert v.status == "", v.status
    run, view = _wait(training, alice)
    assert run.status == "done" and run.step == 4, (run.status, run.message)
    assert [n for n, _ in spaces.CALLS] == ["run_chunk", "run_chunk"] and spaces.CALLS[0][1] == 120
    assert 0 < spaces.CALLS[1][1] < 120  # the second call declares from the first one's measured steps
    assert "2 GPU calls" in view.progress and "done: 4 / 4 steps" in view.progress
    assert run.checkpoint and run.probe.get("question")
    from app import sessions
    assert run.checkpoint in sessions.list_checkpoints(alice)
    snaps = sorted(p.name for p in (Path(run.cfg.output_dir) / "snapshots").iterdir())
    assert snaps == ["step-00000", "step-00002", "step-00004"]  # before, every 2 steps, after


def test_platform_abort_ends_the_run_with_one_line(zero_gpu_fork):
    training, spaces = zero_gpu_fork
    spaces.ABORT_CALLS.add(2)
    bob = _signed_in("bob", "b1")
    training.train_start(**TRAIN, request=bob)
    run, view = _wait(training, bob)
    assert run.status == "failed" and run.step == 2
    assert view.status.startswith("⚠️ the platform aborted GPU call 2 after its declared") and "\n" not in view.status
    # the kept checkpoint is the newest complete one on disk: step 2's, or step 4's when the killed call had already
    # written it before the platform's kill (a race the stand-in reproduces, as the real platform can)
    kept = re.search(r"the last good checkpoint \(step (\d+)\) is kept", view.status)
    assert kept and int(kept.group(1)) in (2, 4) and run.checkpoint, view.status


def test_a_model_too_large_to_carry_trains_lora_and_lists_it(zero_gpu_fork, monkeypatch):
    """Over the state limit a ZeroGPU run trains LoRA adapters; the adapter checkpoint is listed and loads as a
    model in Inspect and Compare."""
    training, spaces = zero_gpu_fork
    from app import gpu, registry, sessions
    monkeypatch.setattr(gpu, "STATE_MB", 0.01)  # below the tiny model's full state
    carol = _signed_in("carol", "c1")
    training.train_start(**{**TRAIN, "steps": 2}, request=carol)
    run, view = _wait(training, carol)
    assert run.status == "done" and run.checkpoint, run.message
    ck = sessions.resolve_checkpoint(carol, run.checkpoint)
    assert (ck / "adapter_config.json").is_file() and not (ck / "config.json").exists()
    name = registry.SESSION_PREFIX + run.checkpoint
    assert name in registry.model_choices(carol)
    assert registry.get_adapter(name, carol).model is not None


def test_readme_host_table_is_the_train_tabs():
    from app import gpu
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert gpu.hosts_markdown() in readme
    assert gpu.host_markdown().startswith("This server runs as **Own machine**") or "Space" in gpu.host_markdown()


def test_off_zerogpu_nothing_changes(monkeypatch):
    from app import gpu
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    f = lambda: 1  # noqa: E731
    assert gpu.gpu_task(f) is f and not gpu.on_zerogpu()
