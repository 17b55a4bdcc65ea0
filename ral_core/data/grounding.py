"""The bundled grounding task: grids of real handwritten digits (UCI digits) with questions whose answer
depends on known regions, so we know where the model *should* look.

Train/test split is by digit sample (test handwriting is never seen in training). Everything is
deterministic from (split, seed, index).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DIGITS_PATH = ASSETS / "digits" / "digits.npz"
TASK_KINDS = ("cell", "where", "count", "row", "compare", "marked", "pair")
ORDINALS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Sample:
    """One task sample. Boxes are (x0, y0, x1, y1) in image pixels, the regions that hold the answer."""

    image: Image.Image
    question: str
    answer: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    kind: str = "cell"
    meta: dict = field(default_factory=dict)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS_PATH) as d:
        return d["images"], d["labels"]


def split_indices(n: int, test_fraction: float = 0.25, seed: int = 0) -> dict[str, np.ndarray]:
    """Split digit samples (not grids) so test handwriting never appears in training grids."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}


class GroundingTask:
    """Digit-grid questions. `kinds` picks the question types; `rows`×`cols` sets the grid (more cells →
    more visual tokens); `cell_px` is the side of one cell in pixels (28 = one Qwen2-VL merged token).

    The images are small (84×84 at 3×3); each family's adapter sizes them for its processor (one tile for
    Idefics3/SmolVLM instead of 16 upscaled ones; see `ral_core.models.pixels.SMALL_IMAGES`), so a prompt costs a few
    dozen visual tokens, not a thousand: `visual_tokens(adapter)` says how many."""

    def __init__(self, rows: int = 3, cols: int = 3, cell_px: int = 28, kinds=("cell",), split: str = "train",
                 seed: int = 0, unique: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        bad = [k for k in kinds if k not in TASK_KINDS]
        if bad:
            raise ValueError(f"unknown task kind(s) {bad}; choose from {list(TASK_KINDS)}")
        if not (1 <= rows <= 9 and 1 <= cols <= 9):
            raise ValueError("rows and cols must be between 1 and 9")
        if unique and rows * cols > 10:
            unique = False  # cannot place more than 10 distinct digits
        self.rows, self.cols, self.cell_px, self.kinds = rows, cols, cell_px, tuple(kinds)
        self.split, self.seed, self.unique = split, seed, unique
        images, labels = _load_digits()
        idx = split_indices(len(labels))[split]
        self._imgs, self._labels = images[idx], labels[idx]
        self._by_label = [np.flatnonzero(self._labels == d) for d in range(10)]

    @property
    def size(self) -> tuple[int, int]:
        return self.cols * self.cell_px, self.rows * self.cell_px

    def cell_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        p = self.cell_px
        return (c * p, r * p, (c + 1) * p, (r + 1) * p)

    def _render_digit(self, img8: np.ndarray) -> np.ndarray:
        inner = self.cell_px - 4
        im = Image.fromarray((img8.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8))
        im = im.resize((inner, inner), Image.BILINEAR)
        cell = np.zeros((self.cell_px, self.cell_px), np.uint8)
        cell[2:2 + inner, 2:2 + inner] = np.asarray(im)
        return cell

    def sample(self, index: int) -> Sample:
        # Seeds differ per split so the two splits also differ in layouts.
        rng = np.random.default_rng([self.seed, index, 1 if self.split == "test" else 0])
        n = self.rows * self.cols
        digits = rng.permutation(10)[:n] if self.unique else rng.integers(0, 10, n)
        canvas = np.zeros((self.rows * self.cell_px, self.cols * self.cell_px), np.uint8)
        for k, d in enumerate(digits):
            r, c = divmod(k, self.cols)
            pick = rng.choice(self._by_label[d])
            p = self.cell_px
            canvas[r * p:(r + 1) * p, c * p:(c + 1) * p] = self._render_digit(self._imgs[pick])
        # White ink on black reads as "ink = signal", which is easier for tiny vision towers to pick up.
        image = Image.fromarray(canvas).convert("RGB")
        grid = digits.reshape(self.rows, self.cols)
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        return self._question(kind, grid, image, rng)

    def _question(self, kind, grid, image, rng) -> Sample:
        R, C = grid.shape
        r, c = int(rng.integers(R)), int(rng.integers(C))
        meta = {"grid": grid.tolist()}
        if kind == "cell":
            return Sample(image, f"What digit is in row {r + 1} column {c + 1}?", str(grid[r, c]),
                          [self.cell_box(r, c)], kind, meta)
        if kind == "where":
            d = int(grid[r, c])
            hits = np.argwhere(grid == d)
            ans = " and ".join(f"row {a + 1} column {b + 1}" for a, b in hits.tolist())
            return Sample(image, f"Where is the {d}?", ans, [self.cell_box(int(a), int(b)) for a, b in hits], kind, meta)
        if kind == "count":
            d = int(grid[r, c])
            hits = np.argwhere(grid == d)
            return Sample(image, f"How many {d}s are there?", str(len(hits)),
                          [self.cell_box(int(a), int(b)) for a, b in hits], kind, meta)
        if kind == "row":
            return Sample(image, f"Read row {r + 1}.", " ".join(str(int(x)) for x in grid[r]),
                          [self.cell_box(r, k) for k in range(C)], kind, meta)
        if kind == "marked":
            # the target is found by what it looks like (a frame), not by its grid coordinates
            arr = np.asarray(image).copy()
            x0, y0, x1, y1 = self.cell_box(r, c)
            arr[y0:y0 + 2, x0:x1] = arr[y1 - 2:y1, x0:x1] = 160
            arr[y0:y1, x0:x0 + 2] = arr[y0:y1, x1 - 2:x1] = 160
            return Sample(Image.fromarray(arr), "What digit is in the marked cell?", str(grid[r, c]),
                          [self.cell_box(r, c)], kind, meta)
        if kind in ("compare", "pair"):
            r2, c2 = r, c
            while (r2, c2) == (r, c) and R * C > 1:
                r2, c2 = int(rng.integers(R)), int(rng.integers(C))
            if kind == "pair":
                # two regions and a two-token answer: rollouts that differ on the first digit look at the
                # second cell from different prefixes, so the attention term is not cancelled there
                return Sample(image, f"Read row {r + 1} column {c + 1} and row {r2 + 1} column {c2 + 1}.",
                              f"{grid[r, c]} {grid[r2, c2]}", [self.cell_box(r, c), self.cell_box(r2, c2)], kind,
                              meta)
            a, b = int(grid[r, c]), int(grid[r2, c2])
            ans = "same" if a == b else ("first" if a > b else "second")
            return Sample(image, f"Which is larger, row {r + 1} column {c + 1} or row {r2 + 1} column {c2 + 1}?",
                          ans, [self.cell_box(r, c), self.cell_box(r2, c2)], kind, meta)
        raise ValueError(kind)

    def samples(self, n: int, start: int = 0) -> list[Sample]:
        return [self.sample(start + i) for i in range(n)]

    def visual_tokens(self, adapter) -> int:
        """Visual tokens one task image becomes with `adapter` (all samples share the image size)."""
        return int(adapter.process_images([self.sample(0).image])["n_tokens"][0])
