"""What the page says about models it cannot use: hub models that cannot load here are named with how to add a
folder (never a command-line flag), and photo examples carry a note while only the digit-grid models are listed."""
import json

import pytest

from app import registry


def _page_texts(demo) -> str:
    return json.dumps(demo.config, default=str, ensure_ascii=False)


@pytest.fixture
def models_file(tmp_path, monkeypatch):
    def write(text):
        f = tmp_path / "models.yaml"
        f.write_text(text)
        monkeypatch.setenv("RAL_MODELS_CONFIG", str(f))
        monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "0")
        return f
    return write


def test_a_hub_model_that_cannot_load_is_named_with_how_to_add_a_folder(models_file):
    models_file("default: default\nsmol: HuggingFaceTB/SmolVLM-256M-Instruct\n")
    assert list(registry.configured_models()) == ["default"]
    assert registry.unavailable_models() == {"smol": "HuggingFaceTB/SmolVLM-256M-Instruct"}
    from app.main import build_app
    page = _page_texts(build_app())
    assert "Not available on this server: smol (HuggingFaceTB/SmolVLM-256M-Instruct)" in page
    assert "app/models.yaml" in page and "RAL_MODELS_CONFIG" in page and "--model" not in page


def test_loading_errors_name_no_command_line_flag(monkeypatch):
    """The hub's own offline / no-network messages, as a browser user gets them from the server."""
    monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "0")
    with pytest.raises(Exception) as e:
        registry.serve("x", "HuggingFaceTB/SmolVLM-256M-Instruct")
    msg = str(e.value)
    assert "cache" in msg and "--model" not in msg and "--allow-download" not in msg and "app/models.yaml" in msg
    net = ("no network: cannot reach https://huggingface.co to download 'a/b'; set RAL_ALLOW_DOWNLOAD only on a host "
           "with internet, or download the model on another machine and pass its folder with --model DIR")
    assert "--model" not in registry.for_browser(net) and "app/models.yaml" in registry.for_browser(net)


def test_photo_examples_carry_a_note_while_only_digit_models_are_listed(models_file, tiny_model_dir):
    from app.main import PHOTOS_NOTE, build_app
    models_file("default: default\ntrained: " + str(registry.DEFAULT_CONFIG.parent / "../assets/trained_model") + "\n")
    assert not registry.reads_photos()
    assert PHOTOS_NOTE in _page_texts(build_app())
    models_file(f"default: default\nmine: {tiny_model_dir}\n")  # a model of the user's own: maybe a real VLM
    assert registry.reads_photos()
    page = _page_texts(build_app())
    assert PHOTOS_NOTE not in page and "Examples: photos" in page


def test_a_bad_magnification_is_one_line_before_any_model_work():
    from app import compare_tab
    out = compare_tab.run_compare("default", "default", None, "q", magnify="0.5")
    assert out.status.startswith("⚠️") and "magnify must be 'auto' or a factor" in out.status
    assert out.status.count("\n") == 0
