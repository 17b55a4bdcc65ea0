"""Safe image loading: every failure is a RALError that says what to fix."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ral_core.errors import RALError

MAX_PIXELS = 4096 * 4096  # guards against decompression bombs; well above any VLM's input size


def check_image(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    w, h = img.size
    if w < 1 or h < 1:
        raise RALError("the image is empty (0 pixels); give a real image")
    if w * h > max_pixels:
        raise RALError(f"the image is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                       "downscale it first")
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
                w, h = im.size
                if w * h > max_pixels:
                    raise RALError(f"the image '{path}' is {w}×{h} = {w * h:,} pixels, over the limit of "
                                   f"{max_pixels:,}; downscale it first")
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
