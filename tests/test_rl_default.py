"""A short RAL run on the embedded default model raises the mean reward of the grounding task.

Reward is measured without sampling noise as the expected exact-match reward, mean p(gold answer + EOS),
on the prompts the run trains on (a fixed set of 8 train-split samples given as a user JSONL dataset), from
a fixed seed. Margin: at least +0.03 absolute (measured: see the assertion message)."""
import json

from ral_core.config import build_config
from ral_core.data import GroundingTask
from ral_core.evaluate import expected_reward
from ral_core.trainer import Trainer


def test_short_ral_run_raises_mean_reward(tmp_path):
    samples = GroundingTask(kinds=("cell", "row", "where"), split="train", seed=5).samples(8)
    with open(tmp_path / "data.jsonl", "w") as f:
        for i, s in enumerate(samples):
            s.image.save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "question": s.question, "answer": s.answer,
                                "boxes": [list(b) for b in s.boxes]}) + "\n")
    cfg = build_config("ral", ["model=default", f"output_dir={tmp_path / 'run'}", "steps=8", "lr=1e-4", "seed=0",
                               f"dataset={tmp_path / 'data.jsonl'}", "snapshot_every=0", "save_every=0"])
    assert cfg.lambda_attn > 0 and cfg.updates_per_step >= 2
    t = Trainer(cfg)
    before = expected_reward(t.adapter_for_inference(), samples)
    t.train()
    after = expected_reward(t.adapter_for_inference(), samples)
    print(f"expected reward {before:.4f} → {after:.4f}")
    assert after > before + 0.03, f"expected reward {before:.4f} → {after:.4f}"
