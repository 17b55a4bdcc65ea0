"""Write a few held-out task samples to assets/examples/ (PNG + examples.json with questions/answers)."""
import json
from pathlib import Path

from ral_core.data import GroundingTask

out = Path(__file__).resolve().parents[1] / "assets" / "examples"
out.mkdir(parents=True, exist_ok=True)
rows = []
for name, task, i in [("grid3_cell", GroundingTask(kinds=("cell",), split="test", seed=7), 0),
                      ("grid3_row", GroundingTask(kinds=("row",), split="test", seed=7), 1),
                      ("grid3_where", GroundingTask(kinds=("where",), split="test", seed=7), 2),
                      ("grid4_cell", GroundingTask(rows=4, cols=4, kinds=("cell",), split="test", seed=7), 3)]:
    s = task.sample(i)
    s.image.save(out / f"{name}.png")
    rows.append({"image": f"{name}.png", "question": s.question, "answer": s.answer, "boxes": s.boxes})
(out / "examples.json").write_text(json.dumps(rows, indent=1))
print(f"wrote {len(rows)} examples to {out}")
