"""Reference values for tests/test_trl_reference.py, computed once by TRL 1.16's own code (run with trl==1.16.0
installed: `pip install trl==1.16.0`; nothing in ral_core/ or tests/ imports TRL).

Two parts, both on fixed random tensors (seed 0):
- log-probs: TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, what GRPOTrainer scores the policy, the
  old policy and the reference with) on hidden states and an LM-head weight, at a temperature ≠ 1;
- the loss: `GRPOTrainer._compute_loss` (the real method, called on a minimal stand-in trainer whose log-prob pass
  returns the fixed per-token log-probs) for loss types grpo, bnpo, dapo and dr_grpo, β = 0 and 0.04, over one
  generation batch of 5 micro-batches with gradient accumulation 2 (windows of 2, 2 and a partial 1), exactly as
  transformers' Trainer feeds it (current_gradient_accumulation_steps = micro-batches in the window). Saved: each
  micro-batch's loss and the gradient w.r.t. its per-token log-probs.

Writes tests/data/trl_reference.safetensors and tests/data/trl_reference.json (versions, settings).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data"
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
BETAS = (0.0, 0.04)
M, B, T = 5, 3, 6            # micro-batches per generation batch, sequences per micro-batch, padded width
GAS = 2                      # gradient accumulation steps: windows of 2, 2 and 1 micro-batches
MAX_COMPLETION = 8           # > T: dr_grpo's normaliser is the maximum completion length, not the width
EPS_LOW, EPS_HIGH = 0.2, 0.28
TEMPERATURE = 0.7
V, D, L = 11, 5, 7           # log-prob part: vocabulary, hidden size, sequence length


def inputs(g: torch.Generator) -> dict:
    """One generation batch: [M, B, T] tensors, response masks of varying length (one empty-after-1 row)."""
    lengths = torch.randint(1, T + 1, (M, B), generator=g)
    lengths[0, 0], lengths[4, 2] = T, 1
    mask = (torch.arange(T)[None, None, :] < lengths[..., None]).long()
    old = -torch.rand(M, B, T, generator=g) * 3 - 0.05
    # ratios up to e^±0.6: outside [1 − 0.2, 1 + 0.28], so both clip sides are exercised
    logp = old + (torch.rand(M, B, T, generator=g) - 0.5) * 1.2
    ref = old + (torch.rand(M, B, T, generator=g) - 0.5) * 0.8
    adv = torch.randn(M, B, generator=g)
    return {"mask": mask, "old_logp": old, "logp": logp, "ref_logp": ref, "advantages": adv}


def stand_in(loss_type: str, beta: float, accelerator):
    """The attributes `_compute_loss` reads, with transformers' Trainer state for one training micro-batch."""
    from trl import GRPOTrainer
    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.__dict__.update(
        loss_type=loss_type, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, importance_sampling_level="token",
        off_policy_mask_threshold=None, top_entropy_quantile=1.0, use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=MAX_COMPLETION,
        model=SimpleNamespace(training=True), accelerator=accelerator, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(steps_per_generation=M, delta=None, use_bias_correction_kl=False))
    return tr


def loss_reference(data: dict) -> dict:
    from accelerate import Accelerator
    from trl import GRPOTrainer
    acc = Accelerator(cpu=True)
    out = {}
    windows = [list(range(i, min(i + GAS, M))) for i in range(0, M, GAS)]
    num_items = data["mask"].sum()  # the generation batch's completion tokens, as TRL computes it once per batch
    for lt in LOSS_TYPES:
        for beta in BETAS:
            tr = stand_in(lt, beta, acc)
            losses, grads = torch.zeros(M, dtype=torch.float64), torch.zeros(M, B, T, dtype=torch.float64)
            for w in windows:
                tr.current_gradient_accumulation_steps = len(w)
                for j in w:
                    logp = data["logp"][j].clone().requires_grad_(True)
                    tr._get_per_token_logps_and_entropies = (
                        lambda *a, _lp=logp, **k: (_lp, torch.zeros_like(_lp), None))
                    batch = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long),
                             "prompt_mask": torch.ones(B, 1, dtype=torch.long),
                             "completion_ids": torch.zeros(B, T, dtype=torch.long),
                             "completion_mask": data["mask"][j], "advantages": data["advantages"][j],
                             "old_per_token_logps": data["old_logp"][j], "ref_per_token_logps": data["ref_logp"][j],
                             "num_items_in_batch": num_items}
                    loss = GRPOTrainer._compute_loss(tr, None, batch)
                    loss.backward()
                    losses[j], grads[j] = float(loss.detach()), logp.grad.double()
            out[f"{lt}/beta{beta}/loss"] = losses
            out[f"{lt}/beta{beta}/grad"] = grads
    return out


def logprob_reference(g: torch.Generator) -> dict:
    """TRL's fused LM head at TEMPERATURE on a tiny stand-in causal LM (a fixed backbone output and LM head)."""
    from trl.trainer.utils import add_fused_lm_head
    from transformers import PretrainedConfig

    hidden = torch.randn(2, L, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    ids = torch.randint(0, V, (2, L), generator=g)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig()
            self.base_model = lambda **kw: SimpleNamespace(last_hidden_state=hidden)
            self.lm_head = torch.nn.Linear(D, V, bias=False)
            self.lm_head.weight.data.copy_(weight)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, **kw):
            raise AssertionError("only the fused path is used")

    lm = LM()
    add_fused_lm_head(lm, temperature=TEMPERATURE)
    with torch.no_grad():
        logps = lm(input_ids=ids, labels=ids, fused_lm_head=True).log_probs  # [2, L-1]: token k+1 from position k
    return {"lp/hidden": hidden, "lp/weight": weight, "lp/ids": ids, "lp/logps": logps}


def main():
    import accelerate
    import transformers
    import trl
    g = torch.Generator().manual_seed(0)
    data = inputs(g)
    tensors = {f"in/{k}": v for k, v in data.items()}
    tensors.update(loss_reference(data))
    tensors.update(logprob_reference(g))
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "trl_reference.safetensors"))
    meta = {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "made_by": "scripts/make_trl_reference.py",
            "entry_points": ["trl.GRPOTrainer._compute_loss", "trl.trainer.utils.add_fused_lm_head"],
            "loss_types": list(LOSS_TYPES), "betas": list(BETAS), "micro_batches": M, "batch_size": B, "width": T,
            "gradient_accumulation_steps": GAS, "steps_per_generation": M, "max_completion_length": MAX_COMPLETION,
            "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "temperature": TEMPERATURE}
    (OUT / "trl_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {OUT / 'trl_reference.safetensors'} ({len(tensors)} tensors) with trl {trl.__version__}")


if __name__ == "__main__":
    main()
