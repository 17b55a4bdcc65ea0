import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores shared with other processes: one thread per process is the fast setting here.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_qwen():
    from ral_core.builders.tiny import tiny_qwen2_vl
    return tiny_qwen2_vl(layers=3)


@pytest.fixture(scope="session")
def task():
    from ral_core.data import GroundingTask
    return GroundingTask(kinds=("cell", "where", "count", "row", "compare"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_qwen):
    """A tiny Qwen2-VL saved like a user's local model directory."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_qwen.model.save_pretrained(d)
    tiny_qwen.tokenizer.save_pretrained(d)
    tiny_qwen.image_processor.save_pretrained(d)
    return d


@pytest.fixture()
def model(tiny_qwen):
    """The session's tiny Qwen2-VL for a test that trains it: its weights are put back afterwards."""
    state = {k: v.clone() for k, v in tiny_qwen.model.state_dict().items()}
    yield tiny_qwen
    tiny_qwen.model.load_state_dict(state)


@pytest.fixture(scope="session", autouse=True)
def _uploads_under_basetemp(tmp_path_factory):
    """Gradio's upload folder is the test session's temp root, so files the tests write under tmp_path count as
    browser uploads (the app opens nothing else); files elsewhere stand for the server's own files."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.getbasetemp()))
    yield
    mp.undo()
