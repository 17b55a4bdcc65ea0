"""User data: a JSONL file, one sample per line: {"image": PATH, "question": TEXT, "answer": TEXT,
"boxes": [[x0, y0, x1, y1], ...]?}. Image paths are relative to the file. Errors name the line."""
from __future__ import annotations

import json
from pathlib import Path

from ral_core.errors import RALError
from ral_core.images import load_image


class JsonlDataset:
    def __init__(self, path, check_images: bool = True):
        p = Path(path)
        if not p.is_file():
            raise RALError(f"dataset file '{path}' does not exist; give a .jsonl file")
        self.path, self.rows = p, []
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
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
