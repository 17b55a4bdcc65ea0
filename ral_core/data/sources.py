"""A training config's sample source: the bundled task or a user's JSONL data set."""
from ral_core.data.grounding import GroundingTask
from ral_core.data.jsonl import JsonlDataset


def dataset_for(cfg, split: str = "train"):
    """`.sample(i) -> dict(image, question, answer, boxes, kind)` for `cfg.dataset` ('grounding' or a JSONL path)."""
    if cfg.dataset == "grounding":
        task = GroundingTask(rows=cfg.grid_rows, cols=cfg.grid_cols, kinds=tuple(cfg.task_kinds), split=split,
                             seed=cfg.data_seed)

        class _Src:
            def sample(self, i):
                s = task.sample(i)
                return {"image": s.image, "question": s.question, "answer": s.answer, "boxes": s.boxes,
                        "kind": s.kind}
        return _Src()
    return JsonlDataset(cfg.dataset)
