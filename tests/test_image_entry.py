"""Images enter as a browser shows them: 16-bit samples scaled (not clipped) to 8 bits, EXIF orientation applied,
through every entry (files, in-memory images, data-set rows)."""
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ral_core.data.jsonl import JsonlDataset
from ral_core.images import check_image, load_image

RAMP = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))  # 16 rows of a 0..65535 ramp


def _png16_rgb(path, a: np.ndarray):
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _expect_ramp(img):
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (16, 64, 3)
    assert abs(a.mean() - 127.5) < 2, a.mean()  # clipping made this ~254
    assert a[0, 0].max() == 0 and a[0, -1].min() == 255 and (np.diff(a[0, :, 0].astype(int)) >= 0).all()


def test_16_bit_grey_png_is_scaled(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "g.png")
    _expect_ramp(load_image(tmp_path / "g.png"))
    with Image.open(tmp_path / "g.png") as im:
        im.load()
        _expect_ramp(check_image(im))  # an image handed over in memory
    _expect_ramp(check_image(Image.fromarray(RAMP.astype(np.int32), mode="I")))


def test_16_bit_rgb_png_is_scaled(tmp_path):
    _png16_rgb(tmp_path / "c.png", np.repeat(RAMP[:, :, None], 3, axis=2))
    _expect_ramp(load_image(tmp_path / "c.png"))


def test_8_bit_images_are_unchanged(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert (np.asarray(load_image(tmp_path / "a.png")) == a).all()
    g = Image.fromarray(a[:, :, 0].astype(np.int32), mode="I")  # 8-bit data in a wide mode stays as is
    assert (np.asarray(check_image(g))[:, :, 0] == a[:, :, 0]).all()


@pytest.mark.parametrize("orientation,turn", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                              (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:5, :10] = 255  # a white corner shows which way the image was turned
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    want = np.asarray(Image.fromarray(a).transpose(turn))
    for got in (load_image(tmp_path / "o.jpg"), check_image(Image.open(tmp_path / "o.jpg"))):
        assert got.size == (want.shape[1], want.shape[0])
        assert np.abs(np.asarray(got).astype(int) - want).mean() < 8


def test_data_set_rows_enter_the_same_way(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "g.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "g.png", "question": "Q?", "answer": "A"}) + "\n")
    _expect_ramp(JsonlDataset(tmp_path / "d.jsonl").sample(0)["image"])
