"""Pixel budgets per family: how each image processor sizes an image (so how many visual tokens it becomes), the one
table of how small images are processed, and the cap behind `ral inspect --max-pixels`.

Small images are the bundled digit grids (84×84 by default, 252×252 at 9×9): the Idefics3/SmolVLM processor upscales
every image to `size.longest_edge` and cuts it into tiles, so an 84×84 grid sent to SmolVLM became 16 tiles of
interpolated pixels plus the global image, 1,088 visual tokens per prompt. An image that fits in one tile now goes in
as that tile. `VLMAdapter.small_image_rule = False` restores the processor's own handling."""
from __future__ import annotations

# family → image-processor call kwargs for an image no larger than one tile (empty: the processor's own settings,
# already proportional or fixed), and why. Visual tokens of the 84×84 task image with each family's released settings
# are in `TASK_TOKENS_84` (checked in tests/test_pixels.py).
SMALL_IMAGES: dict[str, tuple[dict, str]] = {
    "qwen2_vl": ({}, "smart resize to multiples of patch×merge between min_pixels and max_pixels, no tiles: the grid "
                     "is upscaled only to the model's minimum (56² for Qwen2/2.5-VL, 256² for Qwen3-VL)"),
    "qwen3_5": ({}, "Qwen3-VL's image path: upscaled only to the 256² minimum"),
    "idefics3": ({"do_image_splitting": False}, "one tile instead of an upscale to size.longest_edge cut into tiles "
                                                "(SmolVLM: 64 instead of 1,088 tokens; Idefics3: 169 instead of 2,873)"),
    "llava": ({}, "fixed: every image becomes the CLIP input (336² → 576 tokens for LLaVA-1.5)"),
    "gemma3": ({}, "fixed: every image is stretched to 896² → 256 tokens"),
}

# Visual tokens of one 84×84 task image (3×3 grid of 28-px cells) with each family's released processor settings.
TASK_TOKENS_84 = {"qwen2_vl": 9, "qwen2_5_vl": 9, "qwen3_vl": 64, "qwen3_5": 64, "llava": 576, "idefics3": 169,
                  "smolvlm": 64, "gemma3": 256}


def size_value(size, key: str):
    """`size[key]` of an image processor's size (a dict or transformers' SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
