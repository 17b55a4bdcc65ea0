"""The served-model cache never serves old weights for a reused checkpoint name, LoRA folders included."""
import os

import pytest

from app import registry


@pytest.mark.parametrize("config, weights", [("adapter_config.json", "adapter_model.safetensors"),
                                             ("config.json", "model.safetensors")])
def test_a_rewritten_folder_gets_a_new_key(tmp_path, config, weights):
    ck = tmp_path / "ral-1"
    ck.mkdir()
    (ck / config).write_bytes(b"{}")
    (ck / weights).write_bytes(b"old weights")
    first = registry._key(str(ck))
    assert len(first) > 1, "a checkpoint folder must be keyed by its files, not only its path"
    # the swept name used again by a new run: same path, same config file, new weights
    (ck / weights).unlink()
    (ck / weights).write_bytes(b"new weights, longer")
    os.utime(ck / weights, ns=(1, 1))
    assert registry._key(str(ck)) != first


def test_names_that_are_not_folders_key_by_name():
    assert registry._key("default") == ("default",)
