"""The bundled before/after pair (assets/trained_model, listed second in app/models.yaml so Compare opens on it) and
the twin builder behind the README's real-size screenshots."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "assets" / "trained_model"


def test_bundled_trained_model_is_listed_second_and_documented():
    models = yaml.safe_load((ROOT / "app" / "models.yaml").read_text())
    names = list(models)
    assert names[:2] == ["default", "default-trained"]  # Compare's A and B: the first two listed
    assert (ROOT / "app" / models["default-trained"]).resolve() == TRAINED
    info = json.loads((TRAINED / "training_info.json").read_text())
    assert info["base_model"] == "default" and isinstance(info["seed"], int) and info["recipe"]
    assert info["weights_sha256"] == hashlib.sha256((TRAINED / "model.safetensors").read_bytes()).hexdigest()
    assert info["command"].startswith("ral train --config ")
    assert sum(f.stat().st_size for f in TRAINED.iterdir()) < 5 * 2**20  # small, like assets/default_model


def test_bundled_trained_model_is_default_after_training():
    from safetensors.numpy import load_file

    from ral_core.models import load_adapter
    a = load_file(str(ROOT / "assets" / "default_model" / "model.safetensors"))
    b = load_file(str(TRAINED / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # trained: not a copy
    ad = load_adapter(str(TRAINED))
    assert ad.num_layers == load_adapter("default").num_layers


def test_build_twin_writes_a_loadable_model_folder(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_twin", ROOT / "scripts" / "build_twin.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    assert bt.main(["--list"]) == 0 and "qwen2_vl_2b" in capsys.readouterr().out
    assert bt.main(["nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown twin 'nope'" in capsys.readouterr().err
    out = tmp_path / "smol"
    assert bt.main(["smolvlm_256m", "--out", str(out), "--text-layers", "1", "--vision-depth", "1"]) == 0
    from ral_core.builders.twins import twin_files
    from ral_core.models import load_adapter
    ad = load_adapter(str(out))
    pub = twin_files("smolvlm_256m")["config"]
    assert ad.model.config.text_config.hidden_size == pub["text_config"]["hidden_size"]
    assert len(ad.tokenizer) == pub["text_config"]["vocab_size"]
    assert json.loads((out / "twin_info.json").read_text())["weights"].startswith("random")
    assert bt.main(["smolvlm_256m", "--out", str(out)]) == 2  # never writes into a full folder
