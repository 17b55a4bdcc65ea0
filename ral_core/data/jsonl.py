"""User data: a JSONL file, one sample per line: {"image": PATH, "question": TEXT, "answer": TEXT,
"boxes": [[x0, y0, x1, y1], ...]?}. Image paths are relative to the file. Errors name the line.
Size is bounded (lines, characters per line, question length) so that reading a data set is bounded work."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ral_core.errors import RALError
from ral_core.images import load_image

MAX_LINES = 100_000       # env RAL_MAX_DATASET_LINES
MAX_LINE_CHARS = 16_384   # env RAL_MAX_LINE_CHARS; a sample is a path, a question and a short answer


def _limit(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, default))
    except ValueError:
        v = 0
    if v < 1:
        raise RALError(f"environment variable {name} must be a positive whole number, got {os.environ.get(name)!r}")
    return v


def _lines(p: Path, max_lines: int, max_chars: int):
    """(number, text) of each line, read one bounded line at a time: a huge file or a single endless line is
    refused after reading at most max_chars + 1 characters of it."""
    with open(p, encoding="utf-8", errors="replace", newline=None) as f:
        n = 0
        while True:
            line = f.readline(max_chars + 2)  # + newline, + 1 to see an over-long line
            if not line:
                return
            n += 1
            if n > max_lines:
                raise RALError(f"{p.name} has more than {max_lines:,} lines, the limit (RAL_MAX_DATASET_LINES) — "
                               "use a sample of it or split it")
            text = line.rstrip("\n")
            if len(text) > max_chars:
                raise RALError(f"{p.name} line {n} is longer than {max_chars:,} characters, the limit "
                               "(RAL_MAX_LINE_CHARS) — one line is one sample: image path, question, answer")
            yield n, text


class JsonlDataset:
    def __init__(self, path, check_images: bool = True, max_lines: int | None = None,
                 max_line_chars: int | None = None):
        from ral_core.limits import MAX_QUESTION_CHARS

        p = Path(path)
        if not p.is_file():
            raise RALError(f"dataset file '{path}' does not exist; give a .jsonl file")
        max_lines = max_lines or _limit("RAL_MAX_DATASET_LINES", MAX_LINES)
        max_chars = max_line_chars or _limit("RAL_MAX_LINE_CHARS", MAX_LINE_CHARS)
        self.path, self.rows = p, []
        for n, line in _lines(p, max_lines, max_chars):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RALError(f"{p.name} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RALError(f"{p.name} line {n}: expected an object with image, question, answer")
            missing = [k for k in ("image", "question", "answer") if not str(row.get(k, "")).strip()]
            if missing:
                raise RALError(f"{p.name} line {n}: missing field(s) {', '.join(missing)}")
            if len(str(row["question"])) > MAX_QUESTION_CHARS:
                raise RALError(f"{p.name} line {n}: the question is {len(str(row['question'])):,} characters; the "
                               f"limit is {MAX_QUESTION_CHARS:,} — shorten it")
            img = (p.parent / str(row["image"])).resolve()
            if check_images and not img.is_file():
                raise RALError(f"{p.name} line {n}: image '{row['image']}' not found (looked in {img.parent})")
            boxes = row.get("boxes") or []
            if not (isinstance(boxes, list) and all(isinstance(b, list) and len(b) == 4 and
                                                    all(isinstance(v, (int, float)) for v in b) for b in boxes)):
                raise RALError(f"{p.name} line {n}: boxes must be a list of [x0, y0, x1, y1] numbers")
            self.rows.append({"image_path": img, "question": str(row["question"]), "answer": str(row["answer"]),
                              "boxes": [tuple(b) for b in boxes], "line": n})
        if not self.rows:
            raise RALError(f"dataset file '{path}' has no samples")

    def __len__(self):
        return len(self.rows)

    def sample(self, index: int) -> dict:
        r = self.rows[index % len(self.rows)]
        try:
            image = load_image(r["image_path"])
        except RALError as e:
            raise RALError(f"{self.path.name} line {r['line']}: {e}") from None
        return {"image": image, "question": r["question"], "answer": r["answer"], "boxes": r["boxes"],
                "kind": "jsonl"}
