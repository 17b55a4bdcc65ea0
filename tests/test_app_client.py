"""The app served in-process on a free local port, driven by gradio_client through its api_names."""
from pathlib import Path

import pytest
from PIL import Image

from apphelpers import served_app

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # from gradio's queue
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_cell.png"



@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("client_app")


@pytest.fixture(scope="module")
def url(app_dir, tiny_model_dir):
    with served_app(app_dir, tiny_model_dir) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    from gradio_client import Client
    return Client(url, verbose=False)


def png_ok(path):
    with Image.open(path) as im:
        return im.width > 100 and im.height > 100


def test_endpoints_are_named(client):
    names = set(client.view_api(return_format="dict")["named_endpoints"])
    assert {"/inspect", "/inspect_view", "/inspect_svg", "/compare", "/compare_view", "/levers", "/explored", "/train_start",
            "/train_poll", "/train_cancel"} <= names


def test_inspect_then_view(client):
    from gradio_client import handle_file

    status, answer, tokens, layer, overlay, heads, mass, files = client.predict(
        "tiny-a", handle_file(EXAMPLE), "What digit is in row 2 column 1?", 3, False, 1.0, "last", "predicts",
        api_name="/inspect")
    assert status == "" and "Answer:" in answer and png_ok(overlay) and png_ok(heads)
    assert {c["label"] for c in mass["confidences"]} >= {"image"} and len(files) == 3  # 2 PNGs + the raw result
    status, files = client.predict(api_name="/inspect_svg")  # vector versions only when asked for
    assert status == "" and sorted(Path(f).suffix for f in files) == [".png", ".png", ".svg", ".svg", ".zip"]
    # the stored result lives in this client's session: re-render without re-running
    status, overlay2, heads2, mass2, _ = client.predict("mean", "0", "own", api_name="/inspect_view")
    assert status == "" and png_ok(overlay2) and Path(overlay2).read_bytes() != Path(overlay).read_bytes()


def test_compare_returns_images(client):
    from gradio_client import handle_file

    out = client.predict("tiny-a", "tiny-a", handle_file(EXAMPLE), "Read row 1.", 3, False, 1.0, "last", "predicts",
                         api_name="/compare")
    status, answers, tokens, layer, figure, ranking, files, magnitude = out
    assert status == "" and "tiny-a" in answers and png_ok(figure) and len(ranking["data"]) >= 1
    assert "largest head JSD" in magnitude and "on the maps' scale" in magnitude
    status, figure2, ranking2, files2, magnitude2 = client.predict("0", "mean", "predicts", "5",
                                                                   api_name="/compare_view")
    assert status == "" and png_ok(figure2) and "magnified ×5" in magnitude2


def test_bad_upload_is_a_message(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    out = client.predict("tiny-a", handle_file(bad), "q", 3, False, 1.0, "last", "predicts", api_name="/inspect")
    assert out[0].startswith("⚠️") and "notes.txt" in out[0] and "not an image" in out[0]


def test_training_run_then_its_checkpoint_in_compare(client, url, app_dir):
    """A 5-step run from the API; its checkpoint is a model for this client's session only."""
    import time

    import httpx
    from gradio_client import Client, handle_file

    out = client.predict("grounding", None, "ral", "tiny-a", None, 5, 1e-3, 1.0, 4, 2, 1.0, 1.0, "last", 4, 2, 0,
                         "api-run", api_name="/train_start")
    assert out[0] == "", out[0]
    t0 = time.time()
    while "done" not in out[1]:
        assert time.time() - t0 < 120 and not out[0], (out[0], out[1])
        time.sleep(0.3)
        out = client.predict(api_name="/train_poll")
    status, progress, curves, snapshot = out[:4]
    assert "5 / 5 steps" in progress and "session: api-run" in progress and png_ok(curves) and png_ok(snapshot)

    cmp = client.predict("tiny-a", "session: api-run", handle_file(EXAMPLE), "Read row 1.", 3, False, 1.0, "last",
                         "predicts", api_name="/compare")
    assert cmp[0] == "" and "session: api-run" in cmp[1] and png_ok(cmp[4])

    # another browser session can neither use nor download it
    other = Client(url, verbose=False)
    refused = other.predict("tiny-a", "session: api-run", handle_file(EXAMPLE), "Read row 1.", 3, False, 1.0,
                            "last", "predicts", api_name="/compare")
    assert refused[0].startswith("⚠️") and "no checkpoint" in refused[0]
    (cfg,) = (app_dir / "sessions").glob("*/checkpoints/api-run/config.json")
    for path in (cfg, cfg.parent / "model.safetensors"):
        r = httpx.get(f"{url}gradio_api/file={path}")
        assert r.status_code in (403, 404), r.status_code
    assert "cancel" in other.predict(api_name="/train_cancel")[0]  # nothing of A's to cancel from B


def test_uploaded_zip_is_checked(client, tmp_path):
    """A zip uploaded through the server reaches the handler; an unsafe one is refused with a message."""
    import zipfile

    from gradio_client import handle_file

    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("../../escape.jsonl", "{}")
    out = client.predict("upload", handle_file(z), "grpo", "tiny-a", None, 2, 1e-3, 1.0, 4, 2, 1.0, 1.0, "last", 4, 2,
                         0, "", api_name="/train_start")
    assert out[0].startswith("⚠️") and "points outside the folder" in out[0] and "/tmp" not in out[0]
