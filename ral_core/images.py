"""Safe image loading: every failure is a RALError that says what to fix."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ral_core.errors import RALError

MAX_PIXELS = 4096 * 4096  # guards against decompression bombs; well above any VLM's input size
# Qwen2/2.5/3-VL's smart_resize refuses ratios over 200:1 (a raw transformers error); 50:1 leaves a margin and
# every supported family (Qwen, LLaVA, Idefics3/SmolVLM) was checked to process images up to it.
MAX_ASPECT = 50
# Every processor accepts even 1×1 (it upsamples), but a side under 8 px holds nothing to look at.
MIN_SIDE = 8


def _check_size(w: int, h: int, max_pixels: int, what: str = "the image"):
    if w < 1 or h < 1:
        raise RALError(f"{what} is empty (0 pixels); give a real image")
    if w * h > max_pixels:
        raise RALError(f"{what} is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                       "downscale it first")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise RALError(f"{what} is {w}×{h} pixels, an aspect ratio of {max(w, h) / min(w, h):.0f}:1; the limit is "
                       f"{MAX_ASPECT}:1 (what every supported model accepts) — crop or pad it closer to square")
    if min(w, h) < MIN_SIDE:
        raise RALError(f"{what} is {w}×{h} pixels; each side must be at least {MIN_SIDE} px — give a larger image")


def check_image(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image as RGB, refusing sizes a model cannot take (empty, too many pixels, too thin, too narrow)."""
    _check_size(*img.size, max_pixels)
    return img.convert("RGB")


def load_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB, refusing missing, non-image, corrupt and oversized files."""
    p = Path(path)
    if not p.exists():
        raise RALError(f"image file '{path}' does not exist; check the path")
    if not p.is_file():
        raise RALError(f"'{path}' is not a file; give the path of a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _check_size(*im.size, max_pixels, what=f"the image '{path}'")  # before decoding any pixels
                im.load()
                return check_image(im, max_pixels)
    except RALError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RALError(f"the image '{path}' is too large (decompression-bomb guard); downscale it first") from None
    except UnidentifiedImageError:
        raise RALError(f"'{path}' is not an image file PIL can read; give a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RALError(f"the image '{path}' is corrupt or truncated ({e}); re-export it") from None
