"""The embedded default model loads offline, answers, and still has the held-out accuracy it was saved with."""
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ral_core.data.grounding import GroundingTask  # noqa: E402
from ral_core.evaluate import accuracy, greedy_answers, normalize  # noqa: E402
from ral_core.models.base import DEFAULT_MODEL_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(),
                                reason="default model not built (make default-model)")
N = 96


@pytest.fixture(scope="module")
def adapter():
    from ral_core.models import load_adapter
    torch.set_num_threads(1)
    return load_adapter("default")


@pytest.fixture(scope="module")
def info():
    return json.loads((DEFAULT_MODEL_DIR / "training_info.json").read_text())


def _task(info, split="test"):
    t = info["task"]
    return GroundingTask(t["rows"], t["cols"], t["cell_px"], kinds=tuple(t["kinds"]), split=split, seed=t["seed"])


def test_files_small_and_safetensors():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file()}
    assert "model.safetensors" in files and "config.json" in files and "training_info.json" in files
    assert sum(files.values()) <= 30e6


def test_answers_an_example(adapter, info):
    s = _task(info).sample(0)
    (ans,) = greedy_answers(adapter, [s.image], [s.question])
    assert isinstance(ans, str) and ans  # a non-empty answer with no structural tokens
    assert "<|" not in ans
    if s.kind == "cell":
        assert normalize(ans).isdigit()


def test_heldout_accuracy_matches_training_info(adapter, info):
    r = accuracy(adapter, _task(info), N)
    saved = info["test_accuracy"]["accuracy"]
    assert r["n"] == N and set(r["per_kind"]) <= set(info["task"]["kinds"])
    assert r["accuracy"] > 0.25
    # Samples 0..N-1 are a prefix of the saved evaluation set: allow ~3.5 binomial standard errors.
    tol = 3.5 * math.sqrt(saved * (1 - saved) / N) + 0.02
    assert abs(r["accuracy"] - saved) <= tol, (r, saved)


def test_accuracy_is_deterministic(adapter, info):
    t = _task(info)
    assert accuracy(adapter, t, 16) == accuracy(adapter, t, 16)
