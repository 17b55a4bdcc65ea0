"""Task images sized per family and the pixel budget: tiny models with each family's released image-processor
settings (patch, tile, merge/pixel-shuffle, resize sizes), so the visual-token counts are the real ones."""
import pytest
import torch
from PIL import Image

from ral_core.data import GroundingTask
from ral_core.models.pixels import SMALL_IMAGES, TASK_TOKENS_84
from ral_core.builders.tiny import tiny_adapter, tiny_gemma3, tiny_idefics3, tiny_llava, tiny_qwen2_vl, tiny_qwen3_5

# Released processor settings: Qwen2-VL/2.5-VL (min 56², max 28²·16384), Qwen3-VL (patch 16, 256² .. 4096²; Qwen3.5
# taken to share them), LLaVA-1.5 (336², patch 14), Idefics3-8B (tile 364, longest 1456, patch 14, shuffle 2),
# SmolVLM-256M/500M (tile 512, longest 2048, patch 16, shuffle 4), Gemma 3 (896², patch 14, 256 tokens).
QWEN2 = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
QWEN3 = dict(min_pixels=256 * 256, max_pixels=4096 * 4096, vision_config={"patch_size": 16})
REAL = {
    "qwen2_vl": lambda: tiny_qwen2_vl(variant="qwen2_vl", **QWEN2),
    "qwen2_5_vl": lambda: tiny_qwen2_vl(variant="qwen2_5_vl", **QWEN2),
    "qwen3_vl": lambda: tiny_qwen2_vl(variant="qwen3_vl", **QWEN3),
    "qwen3_5": lambda: tiny_qwen3_5(**QWEN3),
    "llava": lambda: tiny_llava(patch=14, crop=336, shortest_edge=336),
    "idefics3": lambda: tiny_idefics3(patch=14, tile=364, scale_factor=2, longest_edge=4 * 364),
    "smolvlm": lambda: tiny_adapter("smolvlm", patch=16, tile=512, scale_factor=4, longest_edge=2048),
    "gemma3": lambda: tiny_gemma3(patch=14, image_size=896, tokens_per_image=256),
}
_CACHE = {}


def _real(family):
    if family not in _CACHE:
        _CACHE[family] = REAL[family]()
    return _CACHE[family]


@pytest.mark.parametrize("family", list(REAL))
def test_task_image_tokens_are_bounded(family):
    a, task = _real(family), GroundingTask()
    assert task.size == (84, 84)
    n = task.visual_tokens(a)
    assert n == TASK_TOKENS_84[family] and n <= 576  # LLaVA's fixed 336² input is the largest
    b = a.build_inputs([task.sample(0).image], ["What digit is in row 1 column 1?"])
    assert int(a.visual_mask(b["model_inputs"]["input_ids"]).sum()) == n == b["geometry"][0].n_tokens
    assert a.family in SMALL_IMAGES


@pytest.mark.parametrize("family,official", [("smolvlm", 1088), ("idefics3", 2873)])
def test_small_image_rule_replaces_the_upscaled_tiles(family, official):
    """Without the rule the processor upscales the 84×84 grid to its longest edge and cuts 16 tiles (the issue's
    1,088 tokens for SmolVLM); photos keep the processor's own tiling."""
    a, task = _real(family), GroundingTask()
    a.small_image_rule = False
    try:
        assert task.visual_tokens(a) == official
    finally:
        a.small_image_rule = True
    photo = a.process_images([Image.new("RGB", (1024, 768), "gray")])
    assert photo["meta"][0]["rows"] * photo["meta"][0]["cols"] > 1  # still split into tiles


def test_one_tile_model_runs_and_mixed_batches_match(task):
    """A batch mixing a one-tile image and a tiled photo pads frames as the processor does: each row equals the
    image alone."""
    a = tiny_adapter("idefics3")  # tile 64, longest edge 128
    small, big = Image.new("RGB", (50, 40), "white"), task.sample(1).image  # 84 px > one 64-px tile
    b = a.build_inputs([small, big], ["What digit?"] * 2)
    assert [len(g.groups) for g in b["geometry"]] == [1, 5]  # the global image alone; 2×2 tiles + global
    assert b["model_inputs"]["pixel_values"].shape[:2] == (2, 5)
    with torch.no_grad():
        both = a.model(**b["model_inputs"]).logits[:, -1]
        for i, im in enumerate([small, big]):
            alone = a.model(**a.build_inputs([im], ["What digit?"])["model_inputs"]).logits[0, -1]
            torch.testing.assert_close(both[i], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5", "smolvlm"])
def test_max_pixels_caps_visual_tokens(family):
    a = _real(family)
    photo = Image.new("RGB", (1024, 768), "gray")
    full = a.process_images([photo])["n_tokens"][0]
    try:
        note = a.set_max_pixels(512 * 512)
        capped = a.process_images([photo])["n_tokens"][0]
        b = a.build_inputs([photo], ["q"])  # the prompt and the geometry follow the capped processing
        assert b["geometry"][0].n_tokens == capped == int(a.visual_mask(b["model_inputs"]["input_ids"]).sum())
    finally:
        a.set_max_pixels(None)
    assert capped < full and "visual tokens" in note
    assert a.process_images([photo])["n_tokens"][0] == full
    if family != "smolvlm":  # smart resize: tokens × (patch·merge)² stay within the budget
        assert capped * (a.patch * a.merge) ** 2 <= 512 * 512


def test_max_pixels_on_fixed_size_families_says_so():
    a = _real("llava")
    try:
        note = a.set_max_pixels(100_000)
        assert "fixed size" in note and a.process_images([Image.new("RGB", (640, 480))])["n_tokens"] == [576]
    finally:
        a.set_max_pixels(None)
