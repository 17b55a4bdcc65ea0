"""Run by tests/test_distributed.py under torchrun: a few RAL steps, then each rank dumps its parameters."""
import os
import sys

import torch

from ral_core.config import build_config
from ral_core.distributed import shutdown
from ral_core.rewards import reward
from ral_core.trainer import Trainer


@reward("has_digit")
def has_digit(completion, sample):
    """Varies across an untrained model's rollouts, so the update is not trivially zero."""
    return float(any(c.isdigit() for c in completion))


model_dir, out = sys.argv[1], sys.argv[2]
cfg = build_config(None, [f"model={model_dir}", f"output_dir={out}/run", "steps=2", "prompts_per_step=2",
                          "group_size=4", "minibatch_size=4", "epochs=1", "max_new_tokens=4", "lr=5e-3",
                          "lambda_attn=1", "epochs=2", "temperature=1.5",
                          "reward_weights={has_digit: 1.0}"])
t = Trainer(cfg)
t.train()
rank = t.acc.process_index
params = {n: p.detach().cpu() for n, p in t.acc.unwrap_model(t.model).named_parameters()}
torch.save({"params": params, "world": t.acc.num_processes, "rewards": [m["reward"] for m in t.history],
            "prompts": [s["question"] for s in t._prompts(0)]}, os.path.join(out, f"rank{rank}.pt"))
shutdown()
