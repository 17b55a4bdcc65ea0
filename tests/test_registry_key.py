"""The served-model cache never serves old weights for a reused checkpoint name, LoRA folders included."""
import os

from app import registry


def _write(folder, name, data):
    (folder / name).write_bytes(data)


def test_a_rewritten_lora_folder_gets_a_new_key(tmp_path):
    ck = tmp_path / "ral-1"
    ck.mkdir()
    _write(ck, "adapter_config.json", b"{}")
    _write(ck, "adapter_model.safetensors", b"old weights")
    first = registry._key(str(ck))
    assert len(first) > 1, "a LoRA folder (no config.json) must be keyed by its files, not only its path"
    # the swept name used again by a new run: same path, new weights file
    (ck / "adapter_model.safetensors").unlink()
    _write(ck, "adapter_model.safetensors", b"new weights, longer")
    os.utime(ck / "adapter_model.safetensors", ns=(1, 1))
    assert registry._key(str(ck)) != first


def test_a_rewritten_full_model_gets_a_new_key(tmp_path):
    ck = tmp_path / "ral-1"
    ck.mkdir()
    _write(ck, "config.json", b"{}")
    _write(ck, "model.safetensors", b"a")
    first = registry._key(str(ck))
    _write(ck, "model.safetensors", b"bb")
    assert registry._key(str(ck)) != first
    assert registry._key("default") == ("default",)
