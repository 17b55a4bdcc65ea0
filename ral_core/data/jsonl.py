"""User data: a JSONL file, one sample per line: {"image": PATH, "question": TEXT, "answer": TEXT,
"boxes": [[x0, y0, x1, y1], ...]?}. Image paths are relative to the file. Errors name the line.
Size is bounded (lines, characters per line, question length) so that reading a data set is bounded work."""
from __future__ import annotations

import json
from pathlib import Path

from ral_core import settings
from ral_core.errors import RALError
from ral_core.images import check_image_file, load_image


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
    """The rows of a JSONL data set, every one checked when read: JSON, required fields, text free of NULs,
    control characters and lone surrogates, the question's length, boxes, and (`check_images`) each image's header.
    Messages name the file, the line and the image path as the row gives it, never the folder it lies in."""

    def __init__(self, path, check_images: bool = True, max_lines: int | None = None,
                 max_line_chars: int | None = None):
        from ral_core.limits import check_text_chars

        p = Path(check_text_chars(str(path), "the dataset path"))
        try:
            found = p.is_file()
        except OSError:  # e.g. a name longer than the file system takes
            found = False
        if not found:
            raise RALError(f"dataset file '{path}' does not exist; give a .jsonl file")
        max_lines = max_lines or settings.get("RAL_MAX_DATASET_LINES")
        max_chars = max_line_chars or settings.get("RAL_MAX_LINE_CHARS")
        self.path, self.rows = p, []
        for n, line in _lines(p, max_lines, max_chars):
            if line.strip():
                self.rows.append(_row(p, n, line, check_images))
        if not self.rows:
            raise RALError(f"dataset file '{path}' has no samples")

    def __len__(self):
        return len(self.rows)

    def check_image_files(self) -> None:
        """Every row's image from its header: present, an image, of a size a model takes (seconds for a large data
        set). For a caller that must first check where the paths point: construct with check_images=False, check
        the paths, then call this."""
        for r in self.rows:
            try:
                check_image_file(r["image_path"], shown=r["image"])
            except RALError as e:
                raise RALError(f"{self.path.name} line {r['line']}: {e}") from None

    def check_text(self, model) -> None:
        """Refuse (one line naming the row) a question or answer that spells one of the model's control tokens, for
        every row, before a run starts rather than at the step that draws the row. `model`: an adapter, or just
        its tokenizer (enough to check a queued run's data before its model is loaded)."""
        from ral_core.models.base import control_ids, user_text_ids

        tok = getattr(model, "tokenizer", model)
        control = model.control_token_ids if hasattr(model, "control_token_ids") else control_ids(tok)
        fields = [(r, k) for r in self.rows for k in ("question", "answer")]
        for i in range(0, len(fields), 512):  # batched: a fast tokenizer encodes a list in one call
            chunk = fields[i:i + 512]
            enc = tok([r[k] for r, k in chunk], add_special_tokens=False)["input_ids"]
            for (r, k), ids in zip(chunk, enc):
                if control.intersection(ids):
                    try:
                        user_text_ids(tok, r[k], f"the {k}", control)
                    except RALError as e:
                        raise RALError(f"{self.path.name} line {r['line']}: {e}") from None

    def sample(self, index: int) -> dict:
        r = self.rows[index % len(self.rows)]
        try:
            image = load_image(r["image_path"], shown=r["image"])
        except RALError as e:
            raise RALError(f"{self.path.name} line {r['line']}: {e}") from None
        from ral_core.grounding import check_boxes  # the image's size is known only once it is read
        check_boxes(r["boxes"], image.size, where=f"{self.path.name} line {r['line']}")
        return {"image": image, "question": r["question"], "answer": r["answer"], "boxes": r["boxes"],
                "kind": "jsonl"}


def _row(p: Path, n: int, line: str, check_images: bool) -> dict:
    """One checked row of `p` (line `n`)."""
    from ral_core.limits import MAX_QUESTION_CHARS, check_text_chars

    where = f"{p.name} line {n}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RALError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise RALError(f"{where}: expected an object with image, question, answer")
    missing = [k for k in ("image", "question", "answer") if not str(row.get(k, "")).strip()]
    if missing:
        raise RALError(f"{where}: missing field(s) {', '.join(missing)}")
    text = {k: str(row[k]) for k in ("image", "question", "answer")}
    for k, v in text.items():
        try:
            check_text_chars(v, f"the {'image path' if k == 'image' else k}")
        except RALError as e:
            raise RALError(f"{where}: {e}") from None
    if len(text["question"]) > MAX_QUESTION_CHARS:
        raise RALError(f"{where}: the question is {len(text['question']):,} characters; the limit is "
                       f"{MAX_QUESTION_CHARS:,} — shorten it")
    shown = text["image"][:200]
    try:
        img = (p.parent / text["image"]).resolve()
    except (OSError, ValueError, RuntimeError):
        raise RALError(f"{where}: image path '{shown}' is not a usable file name") from None
    size = None
    if check_images:
        try:
            size = check_image_file(img, shown=shown)
        except RALError as e:
            raise RALError(f"{where}: {e}") from None
    from ral_core.grounding import parse_boxes  # `box` (one) or `boxes` (several) in image pixels
    if "box" in row and "boxes" in row:
        raise RALError(f"{where}: give either box or boxes, not both")
    boxes = parse_boxes(row.get("box", row.get("boxes")), where=where)
    if size is not None and boxes:  # the header's size; EXIF may turn the image, so sample() checks exactly
        from ral_core.grounding import check_boxes
        try:
            check_boxes(boxes, size, where=where)
        except RALError as e:
            try:
                check_boxes(boxes, size[::-1], where=where)
            except RALError:
                raise e from None
    return {"image_path": img, "image": shown, "question": text["question"], "answer": text["answer"],
            "boxes": boxes, "line": n}
