"""Token → image-rectangle geometry checked against what the image processor actually produces, mapping processed
patches to visual tokens in the order the model consumes them."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402

from ral_core.models import load_adapter  # noqa: E402
from ral_core.inspection import inspect  # noqa: E402
from ral_core.models.idefics3 import Idefics3Adapter  # noqa: E402
from ral_core.builders.tiny import TINY_FAMILIES, tiny_adapter, tiny_idefics3, tiny_llava, tiny_smolvlm  # noqa: E402

torch.set_num_threads(1)

BUILDERS = {
    "qwen2_vl": lambda: tiny_adapter("qwen2_vl"),
    "qwen2_5_vl": lambda: tiny_adapter("qwen2_5_vl"),
    "qwen3_vl": lambda: tiny_adapter("qwen3_vl"),
    "llava": lambda: tiny_llava(shortest_edge=72, crop=64),             # resize + center crop
    "llava_pad": lambda: tiny_llava(do_pad=True, shortest_edge=64),      # pad to square, no crop (LLaVA-1.5 style)
    "llava_small": lambda: tiny_llava(shortest_edge=56, crop=64),       # crop larger than the resized image
    "idefics3": lambda: tiny_idefics3(patch=8, scale_factor=4, tile=128, longest_edge=256),   # tiles + global
    "idefics3_single": lambda: tiny_idefics3(patch=8, scale_factor=4, tile=128, longest_edge=128),  # global only
    "idefics3_s2": lambda: tiny_idefics3(),                              # scale factor 2, 16 tokens per tile
    "smolvlm": lambda: tiny_smolvlm(patch=8, scale_factor=4, tile=128, longest_edge=256),     # SmolVLM2 classes
    "qwen3_5": lambda: tiny_adapter("qwen3_5"),                          # Qwen3-VL image path, patch 16
    "gemma3": lambda: tiny_adapter("gemma3"),                            # stretch to 64², 8×8 patches pooled to 4×4
    "gemma3_pool1": lambda: tiny_adapter("gemma3", tokens_per_image=64),  # one token per patch (no pooling)
}
CROPPING = {"llava", "llava_small"}
SIZES = [(150, 97), (83, 131), (300, 120)]  # landscape, portrait, wide; none a multiple of a patch
_CACHE = {}


def _adapter(name):
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
    return _CACHE[name]


def token_response(a, t0, t1) -> torch.Tensor:
    """Per visual token (sequence order), the largest change between two processed images."""
    d = (t1["pixel_values"].float() - t0["pixel_values"].float()).abs()
    if a.family in ("qwen2_vl", "qwen3_5"):  # the merger fuses each run of merge² consecutive patch rows into one token
        return d.amax(1).reshape(-1, a.merge ** 2).amax(1)
    if a.family == "gemma3":  # SigLIP patches row-major, then the projector's k×k average pool, row-major
        d = d[0].amax(0)
        s = a.side
        return d.reshape(s, d.shape[0] // s, s, d.shape[1] // s).amax((1, 3)).flatten()
    if a.family == "llava":  # CLIP conv patches, flattened row-major; the default strategy drops CLS
        p = a.patch
        d = d[0].amax(0)
        h, w = d.shape[0] // p, d.shape[1] // p
        return d[:h * p, :w * p].reshape(h, p, w, p).amax((1, 3)).flatten()
    if a.family == "idefics3":  # per frame: patches row-major, then the model's own pixel shuffle
        p, s = a.model.config.vision_config.patch_size, a.model.config.scale_factor
        d = d[0].amax(1)  # [frames, M, M]
        n = d.shape[-1] // p
        patches = d.reshape(-1, n, p, n, p).amax((2, 4)).reshape(d.shape[0], n * n, 1)
        return a.model.model.connector.pixel_shuffle(patches, s).amax(-1).flatten()
    raise AssertionError(a.family)


def _token_pixels(a) -> int:
    """Side of one visual token in processed-image pixels."""
    return {"qwen2_vl": lambda: a.patch * a.merge, "qwen3_5": lambda: a.patch * a.merge, "llava": lambda: a.patch,
            "idefics3": lambda: a.cell, "gemma3": lambda: a.image_processor.size["height"] // a.side}[a.family]()


def _target(geo, W, H):
    """Token(s) seeing the point (0.62W, 0.38H): one per group that contains it, and their common rectangle."""
    x, y = 0.62 * W, 0.38 * H
    toks = []
    for g in range(len(geo.groups)):
        try:
            toks.append(geo.token_at(x, y, g))
        except ValueError:
            pass
    b = geo.boxes[toks]
    return toks, np.array([b[:, 0].max(), b[:, 1].max(), b[:, 2].min(), b[:, 3].min()])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("filt", ["nearest", "native"])
def test_content_seen_by_its_token(name, size, filt):
    a = copy.copy(_adapter(name))
    W, H = size
    if filt == "nearest":
        # The coordinate map of a PIL resize does not depend on the filter; NEAREST removes kernel bleed, so the
        # check can be exact: every other token sees no change at all.
        a.image_processor = copy.deepcopy(a.image_processor)
        a.image_processor.resample = PILImageResampling.NEAREST
    blank = Image.new("RGB", size, 0)
    geo = a.geometry(blank)
    toks, box = _target(geo, W, H)
    assert len(toks) == (2 if a.family == "idefics3" and len(geo.groups) > 1 else 1)
    if filt == "nearest":  # one processed pixel (of the coarsest group) plus one original pixel of slack
        px = geo.boxes[toks] / _token_pixels(a)
        mx, my = 1 + (px[:, 2] - px[:, 0]).max(), 1 + (px[:, 3] - px[:, 1]).max()
    else:  # leave room for the kernel's reach (bicubic 2, Lanczos 3 processed pixels)
        mx, my = 0.2 * (box[2] - box[0]), 0.2 * (box[3] - box[1])
    img = blank.copy()
    ImageDraw.Draw(img).rectangle([int(np.ceil(box[0] + mx)), int(np.ceil(box[1] + my)),
                                   int(np.floor(box[2] - mx)) - 1, int(np.floor(box[3] - my)) - 1], fill=(255, 255, 255))
    r = token_response(a, a.process_images([blank])["tensors"], a.process_images([img])["tensors"])
    assert r.numel() == geo.n_tokens
    if filt == "nearest":
        assert torch.nonzero(r > 0).flatten().tolist() == sorted(toks)
    else:  # real filter: the target tokens respond fully, every other token at most with faint ringing
        assert sorted(toks) == sorted(int(t) for t in torch.nonzero(r >= 0.5 * r.max()).flatten())
        others = torch.ones_like(r, dtype=torch.bool)
        others[toks] = False
        assert r[others].max() <= 0.25 * r[toks].min()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_token_box_is_exact(name, size):
    """Fill each token's box (rounded inward to whole pixels; half a pixel more for Idefics3's chained resizes): the
    token sees it, and no token whose box misses the filled rectangle sees anything. Catches ~1-pixel errors."""
    a = copy.copy(_adapter(name))
    a.image_processor = copy.deepcopy(a.image_processor)
    a.image_processor.resample = PILImageResampling.NEAREST  # see test_content_seen_by_its_token
    blank = Image.new("RGB", size, 0)
    geo = a.geometry(blank)
    B = geo.boxes
    base = a.process_images([blank])["tensors"]
    m = 0.5 if a.family == "idefics3" else 0.0  # one NEAREST resize maps pixel centres exactly; chains round
    checked = 0
    for t in range(geo.n_tokens):
        x0, y0 = (int(np.ceil(v + m)) for v in B[t, :2])
        x1, y1 = (int(np.floor(v - m)) for v in B[t, 2:])
        if x1 <= x0 or y1 <= y0:
            continue
        img = blank.copy()
        ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
        hits = set(torch.nonzero(token_response(a, base, a.process_images([img])["tensors"]) > 0).flatten().tolist())
        touching = (np.minimum(B[:, 2], x1) > np.maximum(B[:, 0], x0)) & (np.minimum(B[:, 3], y1) > np.maximum(B[:, 1], y0))
        assert t in hits and hits <= set(np.flatnonzero(touching).tolist()), (t, sorted(hits))
        checked += 1
    assert checked >= geo.n_tokens // 2


def _tiles(boxes, W, H):
    """Boxes (zero-area ones ignored) inside the image, pairwise disjoint and covering it."""
    b = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    ix = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    overlap = (ix * iy).sum() - ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
    return abs(overlap) < 1e-6 * W * H and abs(area - W * H) < 1e-6 * W * H


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_boxes_count_bounds_and_tiling(name, size):
    a = _adapter(name)
    W, H = size
    img = Image.new("RGB", size, (40, 90, 160))
    batch = a.build_inputs([img], ["Where is the 3?"])
    geo = batch["geometry"][0]
    assert geo.n_tokens == int(a.visual_mask(batch["model_inputs"]["input_ids"]).sum())
    assert sum(g["rows"] * g["cols"] for g in geo.groups) == geo.n_tokens
    b = geo.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    groups = [g for g in geo.groups if g["name"] == "global"] or geo.groups
    if a.family == "idefics3" and len(geo.groups) > 1:
        groups = groups + [{"start": 0, "rows": 1, "cols": geo.groups[-1]["start"]}]  # all tiles together
    for g in groups:
        gb = b[g["start"]:g["start"] + g["rows"] * g["cols"]]
        if name in CROPPING:  # a center crop: the boxes tile the visible window, not the image
            x0, y0, x1, y1 = gb[:, 0].min(), gb[:, 1].min(), gb[:, 2].max(), gb[:, 3].max()
            assert _tiles(gb - [x0, y0, x0, y0], x1 - x0, y1 - y0)
            assert (x1 - x0 < W - 1e-6) or (y1 - y0 < H - 1e-6) or name == "llava_small"
        else:
            assert _tiles(gb, W, H), g
    if a.family == "idefics3":  # the prompt layout is the one Idefics3Processor writes
        from transformers import Idefics3Processor
        proc = Idefics3Processor(a.image_processor, a.tokenizer, image_seq_len=a.image_seq_len)
        text = f"{a.tokenizer.bos_token}User:<image>Where is the 3?<end_of_utterance>\nAssistant:"
        ids = proc(images=[img], text=[text])["input_ids"][0]
        assert list(ids) == batch["model_inputs"]["input_ids"][0].tolist()
    if a.family == "gemma3":  # the prompt layout is the one Gemma3Processor writes for the chat template's image
        from transformers import Gemma3Processor
        proc = Gemma3Processor(a.image_processor, a.tokenizer, image_seq_length=geo.n_tokens)
        text = (f"{a.tokenizer.bos_token}<start_of_turn>user\n<start_of_image>Where is the 3?<end_of_turn>\n"
                "<start_of_turn>model\n")
        out = proc(images=[img], text=[text])
        assert list(out["input_ids"][0]) == batch["model_inputs"]["input_ids"][0].tolist()
        assert list(out["token_type_ids"][0]) == batch["model_inputs"]["token_type_ids"][0].tolist()
        torch.testing.assert_close(torch.as_tensor(np.asarray(out["pixel_values"])),
                                   batch["model_inputs"]["pixel_values"], rtol=0, atol=0)
    if a.model.config.model_type == "smolvlm":  # SmolVLMProcessor itself needs num2words; its layout function
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
        m = a.process_images([img])["meta"][0]
        assert a.image_prompt(m["rows"], m["cols"]) == get_image_prompt_string(
            m["rows"], m["cols"], a.image_seq_len, "<fake_token_around_image>", "<image>", "<global-img>")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    a = tiny_adapter(family)
    for part in (a.model, a.tokenizer, a.image_processor):
        part.save_pretrained(tmp_path)
    b = load_adapter(str(tmp_path))
    assert type(b) is type(a) and b.family == a.family
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 150, 3), dtype=np.uint8))
    x, y = a.build_inputs([img], ["Where?"], ["two"]), b.build_inputs([img], ["Where?"], ["two"])
    assert torch.equal(x["model_inputs"]["input_ids"], y["model_inputs"]["input_ids"])
    np.testing.assert_array_equal(x["geometry"][0].boxes, y["geometry"][0].boxes)
    with torch.no_grad():
        la, lb = a.model(**x["model_inputs"]).logits, b.model(**y["model_inputs"]).logits
    assert torch.allclose(la, lb, atol=1e-6)


def test_saved_smolvlm_loads_and_inspects(tmp_path):
    """A SmolVLM2 directory (its saved `image_processor_type` is the torchvision class, as on the hub) loads
    without torchvision and inspects."""
    a = tiny_smolvlm()
    for part in (a.model, a.tokenizer, a.image_processor):
        part.save_pretrained(tmp_path)
    b = load_adapter(str(tmp_path))
    assert type(b) is Idefics3Adapter and b.model.config.model_type == "smolvlm"
    assert type(b.model).__name__ == "SmolVLMForConditionalGeneration"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 150, 3), dtype=np.uint8))
    res = inspect(b, img, "Where is the 3?", max_new_tokens=2)
    assert res.visual.shape[-1] == res.geometry.n_tokens == int(b.visual_mask(
        b.build_inputs([img], ["Where is the 3?"])["model_inputs"]["input_ids"]).sum())
    np.testing.assert_allclose(res.mass.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.visual.sum(-1), res.mass[..., 0], atol=1e-5)
    assert 0 < res.visual_map().sum() <= 1 + 1e-5
