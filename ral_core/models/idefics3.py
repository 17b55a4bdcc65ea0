"""Idefics3, SmolVLM (v1, model_type idefics3) and SmolVLM2 (model_type smolvlm, same processor, connector and
prompt layout in transformers): the image is resized so its longest edge is `size.longest_edge`, then up to
multiples of the tile size M, cut into rows×cols M×M tiles (row-major) plus an M×M global image. Each M×M
image gives (M/p)² patches; the pixel shuffle merges s×s patch blocks, so tile token k covers the k-th
s·p × s·p block, row-major (read off `Idefics3Connector.pixel_shuffle`)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ral_core.models.base import TokenGeometry, VLMAdapter, grid_boxes, register
from ral_core.models.pixels import SMALL_IMAGES, size_value


def _stack_padded(items: list[torch.Tensor]) -> torch.Tensor:
    """Per-image [frames, …] tensors → [B, max frames, …], padded with all-zero frames as the processor pads a batch
    (the model drops all-zero frames)."""
    n = max(t.shape[0] for t in items)
    return torch.stack([torch.cat([t, t.new_zeros((n - t.shape[0],) + tuple(t.shape[1:]))]) for t in items])


@register
class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")

    @property
    def tile(self) -> int:
        return int(self.image_processor.max_image_size["longest_edge"])

    @property
    def cell(self) -> int:
        """Side of one visual token in tile pixels: patch × pixel-shuffle scale."""
        return int(self.model.config.vision_config.patch_size) * int(self.model.config.scale_factor)

    @property
    def side(self) -> int:
        """Tokens per tile side."""
        p, s = int(self.model.config.vision_config.patch_size), int(self.model.config.scale_factor)
        return (self.tile // p) // s

    @property
    def image_seq_len(self) -> int:
        return self.side ** 2

    def image_prompt(self, rows: int, cols: int) -> str:
        """The text the Idefics3/SmolVLM processor substitutes for one `<image>`."""
        img = self.tokenizer.convert_ids_to_tokens(self.image_token_id) * self.image_seq_len
        fake, glob = "<fake_token_around_image>", "<global-img>"
        if rows == 0 and cols == 0:
            return f"{fake}{glob}{img}{fake}"
        s = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{img}" for c in range(cols)) + "\n" for r in range(rows))
        return s + f"\n{fake}{glob}{img}{fake}"

    def prompt_ids(self, n_image_tokens, question, extra=None):
        tok = self.tokenizer
        rows, cols = (extra or {}).get("rows", 0), (extra or {}).get("cols", 0)
        text = f"{tok.bos_token or ''}User:{self.image_prompt(rows, cols)}{question}<end_of_utterance>\nAssistant:"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n = sum(i == self.image_token_id for i in ids)
        if n != int(n_image_tokens):
            raise ValueError(f"prompt has {n} image tokens, expected {n_image_tokens}")
        return ids

    def image_kwargs(self, image):
        M = self.tile
        if self.small_image_rule and max(image.size) <= M:  # pixels.SMALL_IMAGES: one tile, not an upscale into many
            return dict(SMALL_IMAGES["idefics3"][0])
        if self.max_pixels is None:
            return {}
        L = M * (math.isqrt(self.max_pixels) // M)  # tiles are M×M: the longest edge in whole tiles
        own = size_value(self.image_processor.size, "longest_edge")
        return {"do_image_splitting": False} if L <= M else {"size": {"longest_edge": min(L, int(own or L))}}

    def pixel_budget_note(self):
        M, L = self.tile, self.tile * (math.isqrt(self.max_pixels or 0) // self.tile)
        if self.max_pixels is None:
            return "no pixel budget: the processor's own size"
        if L <= M:
            return f"one {M}×{M} tile per image → {self.image_seq_len} visual tokens"
        n = (L // M) ** 2
        return (f"longest edge {L} px → at most {n} tiles of {M}×{M} plus the global image → at most "
                f"{(n + 1) * self.image_seq_len} visual tokens")

    def process_images(self, images):
        images = list(images)
        kws = [self.image_kwargs(im) for im in images]
        groups: dict[str, list[int]] = {}
        for i, kw in enumerate(kws):
            groups.setdefault(repr(sorted(kw.items())), []).append(i)
        outs = {}
        for idx in groups.values():  # one processor call per setting (small images and photos may share a batch)
            out = self.image_processor(images=[[images[i]] for i in idx], return_tensors="pt",
                                       return_row_col_info=True, **kws[idx[0]])
            for j, i in enumerate(idx):
                outs[i] = {k: out[k][j] for k in ("pixel_values", "pixel_attention_mask") if k in out}
                outs[i]["rows"], outs[i]["cols"] = int(out["rows"][j][0]), int(out["cols"][j][0])
        rows = [outs[i]["rows"] for i in range(len(images))]
        cols = [outs[i]["cols"] for i in range(len(images))]
        meta = [{"rows": r, "cols": c, "tile": self.tile, "cell": self.cell, "side": self.side}
                for r, c in zip(rows, cols)]
        tensors = {k: _stack_padded([outs[i][k] for i in range(len(images))])
                   for k in ("pixel_values", "pixel_attention_mask") if k in outs[0]}
        return {"tensors": tensors, "n_tokens": [(r * c + 1) * self.image_seq_len for r, c in zip(rows, cols)],
                "meta": meta}

    def geometry_from_meta(self, image_size, meta):
        W, H = image_size
        R, C, M, cell, n = meta["rows"], meta["cols"], meta["tile"], meta["cell"], meta["side"]
        boxes, groups = [], []
        if R or C:
            # The resized image is exactly R·M × C·M (both edges rounded up to multiples of M), and both
            # PIL resizes map edges to edges, so resized pixel u ↦ original u·W/(C·M).
            sx, sy = W / (C * M), H / (R * M)
            for r in range(R):
                for c in range(C):
                    groups.append({"name": f"tile_r{r + 1}_c{c + 1}", "start": len(boxes) * n * n, "rows": n,
                                   "cols": n, "tile": [r, c]})
                    boxes.append(grid_boxes(n, n, cell * sx, cell * sy, c * M * sx, r * M * sy))
        groups.append({"name": "global", "start": len(boxes) * n * n, "rows": n, "cols": n})
        boxes.append(grid_boxes(n, n, cell * W / M, cell * H / M))
        b = np.concatenate(boxes)
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, W)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, H)
        return TokenGeometry((W, H), b, groups)
