"""Idefics3, SmolVLM (v1, model_type idefics3) and SmolVLM2 (model_type smolvlm, same processor, connector and
prompt layout in transformers): the image is resized so its longest edge is `size.longest_edge`, then up to
multiples of the tile size M, cut into rows×cols M×M tiles (row-major) plus an M×M global image. Each M×M
image gives (M/p)² patches; the pixel shuffle merges s×s patch blocks, so tile token k covers the k-th
s·p × s·p block, row-major (read off `Idefics3Connector.pixel_shuffle`)."""
from __future__ import annotations

import numpy as np

from ral_core.models.base import TokenGeometry, VLMAdapter, grid_boxes, register


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

    def process_images(self, images):
        out = self.image_processor(images=[[im] for im in images], return_tensors="pt", return_row_col_info=True)
        rows = [int(r[0]) for r in out["rows"]]
        cols = [int(c[0]) for c in out["cols"]]
        meta = [{"rows": r, "cols": c, "tile": self.tile, "cell": self.cell, "side": self.side}
                for r, c in zip(rows, cols)]
        tensors = {"pixel_values": out["pixel_values"]}
        if "pixel_attention_mask" in out:
            tensors["pixel_attention_mask"] = out["pixel_attention_mask"]
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
