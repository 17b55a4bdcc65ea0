"""Safe image loading: every failure is a RALError that says what to fix."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


# Integer modes wider than 8 bits (16-bit PNG/TIFF greyscale): PIL's convert("RGB") clips them at 255.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as a browser shows it, in 8-bit RGB: EXIF orientation applied, and 16-bit samples scaled to 8 bits
    (not clipped: PIL alone turns a 0..65535 gradient nearly all white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_INT_MODES:
        a = np.asarray(img, dtype=np.float64)
        # "I" also holds 8-bit data widened by some decoders: scale only what exceeds 8 bits
        top = 65535.0 if img.mode != "I" or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def check_image(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image as RGB (see `to_rgb`), refusing sizes a model cannot take (empty, too many pixels, too thin, too
    narrow). Every image the engine, the CLI, the app and data sets take passes through here."""
    _check_size(*img.size, max_pixels)
    try:
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise RALError(f"the image cannot be converted to RGB ({e}); re-export it as PNG or JPEG") from None


@contextmanager
def _opened(path, max_pixels: int, shown: str | None):
    """The image file opened with its size checked from the header (no pixels decoded yet); every failure, inside
    the block too, becomes one RALError that names the file as `shown` (default: `path`)."""
    p, name = Path(path), str(path) if shown is None else shown
    try:
        exists, is_file = p.exists(), p.is_file()
    except (OSError, ValueError):  # an embedded NUL, a name too long for the file system
        exists = is_file = False
    if not exists:
        raise RALError(f"image file '{name}' does not exist; check the path")
    if not is_file:
        raise RALError(f"'{name}' is not a file; give the path of a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _check_size(*im.size, max_pixels, what=f"the image '{name}'")
                yield im
    except RALError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RALError(f"the image '{name}' is too large (decompression-bomb guard); downscale it first") from None
    except UnidentifiedImageError:
        raise RALError(f"'{name}' is not an image file PIL can read; give a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RALError(f"the image '{name}' is corrupt or truncated ({e}); re-export it") from None


def load_image(path, max_pixels: int = MAX_PIXELS, shown: str | None = None) -> Image.Image:
    """Open an image file as RGB (see `to_rgb`), refusing missing, non-image, corrupt and oversized files.
    `shown`: the name messages give the file (default: `path`), so a server's folders need not appear."""
    with _opened(path, max_pixels, shown) as im:
        im.load()
        return to_rgb(im)


def check_image_file(path, max_pixels: int = MAX_PIXELS, shown: str | None = None) -> tuple[int, int]:
    """(width, height) of an image file from its header alone, with `load_image`'s refusals for missing, non-image
    and badly sized files: cheap enough to check every row of a large data set up front."""
    with _opened(path, max_pixels, shown) as im:
        return im.size
