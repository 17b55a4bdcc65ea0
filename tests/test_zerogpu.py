"""ZeroGPU: with the `spaces` package present on a ZeroGPU Space, every model call of Inspect / Compare / levers /
explored runs inside `spaces.GPU` with a declared duration, with picklable arguments and results. A stand-in
`spaces` module records the calls and round-trips arguments and results through pickle, as the forked GPU
process does."""
import importlib
import pickle
import sys
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


def test_training_is_refused_on_zerogpu(zero_gpu):
    from app import training
    v = training.train_start("grounding", None, "grpo", "tiny-a", None, 2, 1e-3, 1.0, 4, 2, 1.0, 1.0, "last", 4, 2,
                             0, "", request=req("zt"))
    assert "ZeroGPU lends one for seconds" in v.status and "dedicated hardware" in v.status


def test_off_zerogpu_nothing_changes(monkeypatch):
    from app import gpu
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    f = lambda: 1  # noqa: E731
    assert gpu.gpu_task(f) is f and not gpu.on_zerogpu()
