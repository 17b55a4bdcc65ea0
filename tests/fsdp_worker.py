"""Run by tests/test_fsdp.py: under torchrun (2 processes, gloo, dist=fsdp) and, for the reference, in one process.

- `equivalence(...)`: one global rollout batch (the same on every process: all sample it from one seed with the model
  gathered), each process updates on its share of the groups (2 epochs, one mini-batch per epoch: the global
  mini-batch is the single process's), returns the full parameters and the loss terms;
- `resume(...)`: 3 uninterrupted steps vs 2 steps + checkpoint + a new Trainer resuming for the 3rd;
- evidence that parameters are really sharded (DTensors, each process holding about half).
"""
import os
import sys
from pathlib import Path

import torch

from ral_core.config import build_config
from ral_core.rewards import reward
from ral_core.trainer import Trainer


@reward("has_digit")
def has_digit(completion, sample):
    """Varies across an untrained model's rollouts, so the update is not trivially zero."""
    return float(any(c.isdigit() for c in completion))


COMMON = ["group_size=4", "max_new_tokens=4", "lr=5e-3", "temperature=1.5", "epochs=2", "max_grad_norm=0.5",
          "reward_weights={has_digit: 1.0}", "lambda_attn=1", "attn_metrics_every=0"]
CONFIGS = {
    # full fine-tuning, RAL + OPAD against a frozen teacher (a copy of the checkpoint: its term acts from the 2nd update)
    "full": lambda d: ["gamma_opad=1", f"teacher={d}-teacher"],
    # LoRA with a k3 KL to the adapter-free model, attention exploration on the last layer
    "lora": lambda d: ["lora_r=4", "beta=0.04", "explore=true", "explore_layers=last", "explore_sigma=1"],
}
# resume only: a bf16 checkpoint under bf16-mixed (fp32 sharded masters all-gathered in bf16, master_weights file)
RESUME_ONLY = {"bf16": lambda d: [f"model={d}-bf16", "precision=bf16-mixed"]}


def world() -> tuple[int, int]:
    """(rank, processes) as torchrun set them (the process group itself starts with the Trainer's Accelerator)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def full_params(t: Trainer) -> dict | None:
    from ral_core.distributed import full_parameters
    if t.fsdp:
        p = full_parameters(t.model)
        return None if p is None else {n: v.detach().clone() for n, v in p}
    return {n: v.detach().cpu().clone() for n, v in t.acc.unwrap_model(t.model).named_parameters()}


def shard_report(t: Trainer) -> dict:
    from torch.distributed.tensor import DTensor
    ps = [p for p in t.model.parameters() if p.requires_grad]
    return {"dtensor": all(isinstance(p, DTensor) for p in ps),
            "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in ps),
            "global": sum(p.numel() for p in ps),
            "opt_local": sum(v.to_local().numel() if isinstance(v, DTensor) else v.numel()
                             for st in t.opt.state.values() for k, v in st.items() if k != "step")}


def equivalence(model_dir, out, name: str, prompts_global: int = 4) -> dict:
    from ral_core.rollout import make_rollouts
    rank, n = world()
    per = prompts_global // n
    cfg = build_config(None, [f"model={model_dir}", f"output_dir={out}/eq-{name}-{n}", f"prompts_per_step={per}",
                              f"minibatch_size={per * 4}", "steps=1", "dist=fsdp", *COMMON,
                              *CONFIGS[name](model_dir)])
    t = Trainer(cfg)
    samples = [t.data.sample(i) for i in range(prompts_global)]
    torch.manual_seed(1234)  # every process samples the whole global batch alike
    extra = {k: getattr(t, k) for k in ("vision_cache", "share_prompt") if hasattr(t, k)}
    with t.precision.autocast(), t._gathered():
        ro = make_rollouts(t.adapter, samples, cfg.group_size, t.rewarder, t.spec, cfg.max_new_tokens,
                           cfg.temperature, cfg.top_p, cfg.advantage_scale, gen_model=t.acc.unwrap_model(t.model),
                           explore=t.explore, **extra)
    t._fill_references(ro)
    G = cfg.group_size
    mine = torch.arange(rank * per * G, (rank + 1) * per * G)
    updates, agg, norms = t.update_phase(ro.select(mine) if n > 1 else ro)
    res = {"params": full_params(t), "updates": updates, "grad_norms": norms, "rewards": ro.rewards.tolist(),
           "terms": {k: [float(x) for x in v] for k, v in agg.items()}, "world": n}
    if t.fsdp:
        res["shards"] = shard_report(t)
    return res


def resume(model_dir, out, name: str) -> dict:
    """3 steps saving at step 2 (save_every=2) vs a new Trainer resuming from that checkpoint for the 3rd step."""
    import shutil
    rank, n = world()
    base = [f"model={model_dir}", "prompts_per_step=2", "minibatch_size=4", "dist=fsdp", "steps=3", "save_every=2",
            "keep_checkpoints=3", *COMMON, *{**CONFIGS, **RESUME_ONLY}[name](model_dir)]
    full = Trainer(build_config(None, base + [f"output_dir={out}/full-{name}"]))
    at2 = {}

    def keep_step2(t, m):
        if t.step == 2:  # after the checkpoint of step 2: the weights it must hold
            at2["params"] = full_params(t)
    full.callbacks.append(keep_step2)
    full.train()
    ck = Path(out) / f"full-{name}" / "checkpoints" / "step-00002"
    cut = Path(out) / f"cut-{name}"
    if rank == 0:  # an interrupted run: its checkpoint of step 2 and the metrics written until then
        shutil.copytree(ck, cut / "checkpoints" / ck.name)
        (cut / "checkpoints" / "latest").write_text(ck.name)
        lines = (Path(out) / f"full-{name}" / "metrics.jsonl").read_text().splitlines()[:2]
        (cut / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    b = Trainer(build_config(None, base + [f"output_dir={cut}"]))
    b.acc.wait_for_everyone()
    b.train(resume=True)
    return {"full": full_params(full), "resumed": full_params(b), "at2": at2["params"],
            "hist_full": [h["reward"] for h in full.history], "hist_resumed": [h["reward"] for h in b.history],
            "ckpt": str(ck)}


def main():
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    rank, _ = world()
    res = {}
    for name in CONFIGS:
        res[f"eq-{name}"] = equivalence(model_dir, out, name)
    for name in sys.argv[3:]:
        res[f"resume-{name}"] = resume(model_dir, out, name)
    if rank == 0:
        torch.save(res, out / "fsdp.pt")
    else:
        torch.save({k: v.get("shards") for k, v in res.items() if isinstance(v, dict)}, out / f"shards{rank}.pt")
    from ral_core.distributed import shutdown
    shutdown()


if __name__ == "__main__":
    main()
