"""Why did `distill` on `read3` give sd 0.000 over 5 seeds (greedy accuracy, sampled reward, target mass) in
docs/results_short.md? A measurement, not a guess.

The original teacher (`bench/_work/teacher_l6`, 60 CPU-minutes) is not on this machine, so a stand-in teacher is
built in about a minute: the default model continued for a few hundred supervised steps on the same 3×3 kinds
(`scripts/train_default_model.py --init assets/default_model`). With it, the evidence benchmark's `read3` runs
(same COMMON settings, 12 steps) are repeated for `grpo` and `distill` on 3 seeds each, and we record:
- whether the seed reaches the sampler: the first rollout batch's texts per seed (distinct across seeds?);
- the first step's gradient norms of the token-KL term and the GRPO term (the update direction's make-up) and the
  cosine between seeds' first-step total gradients;
- per seed the 150 held-out greedy answers, so identical accuracies can be told apart from identical answers.

    python bench/home_distill_check.py      # writes bench/records/distill_check/*.json and prints a summary
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, dump_record, machine_line, start
from evidence import COMMON, TASK_FIELDS, TASKS

OUT = ROOT / "bench" / "records" / "distill_check"
TEACHER = Path("/tmp/ral_distill_teacher")
SEEDS, STEPS, N_EVAL = (0, 1, 2), 12, 150


def build_teacher(steps: int = 300):
    if (TEACHER / "config.json").exists():
        return
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--out", str(TEACHER),
                    "--init", str(ROOT / "assets" / "default_model"), "--kinds", "cell,row,where", "--steps",
                    str(steps), "--lr", "5e-4", "--eval-every", "0", "--n-eval", "150", "--minutes", "20"],
                   check=True, cwd=ROOT)


def first_step_gradients(tr) -> dict:
    """The step-1 gradient of each loss term (weights as in the run) at the rollout policy, on the first
    rollout batch, flattened."""
    import torch

    from ral_core.losses import LOSSES, LossContext
    from ral_core.rollout import forward_policies, make_rollouts
    cfg = tr.cfg
    ro = make_rollouts(tr.adapter, tr._prompts(0), cfg.group_size, tr.rewarder, tr.spec, cfg.max_new_tokens,
                       cfg.temperature, cfg.top_p, cfg.advantage_scale, gen_model=tr.model)
    tr._fill_references(ro)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    r = forward_policies(tr.model, ro, tr.spec, None, need_logits=cfg.lambda_token_kl > 0)
    ctx = LossContext(mask=ro.mask, logp=r["logp"], old_logp=ro.old_logp, advantages=ro.advantages,
                      attn=r["attn"], attn_old=ro.old_attn, logits=r["logits"], teacher_logits=ro.teacher_logits,
                      norm=cfg.loss_norm, max_len=cfg.max_new_tokens)
    out = {"texts": ro.texts[:16], "reward": float(ro.rewards.mean())}
    grads = {}
    for name, w in (("grpo", 1.0), ("token_rkl", cfg.lambda_token_kl)):
        if w == 0:
            continue
        val, _ = LOSSES[name](ctx)
        g = torch.autograd.grad(w * val, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                 for x, p in zip(g, params)]).double()
        out[f"grad_{name}"] = float(grads[name].norm())
    total = sum(grads.values())
    return out, total


def run(method: str, seed: int, teacher: str, lam: float = 1.0) -> tuple[dict, object]:
    start(threads=False)
    import torch
    torch.set_num_threads(1)
    from ral_core.config import build_config
    from ral_core.data import GroundingTask
    from ral_core.evaluate import evaluate, greedy_answers
    from ral_core.train_state import seed_all
    from ral_core.trainer import Trainer
    from evidence import sampled_reward
    t = TASKS["read3"]
    ov = {**COMMON, **{k: t[k] for k in TASK_FIELDS}, "steps": STEPS, "seed": seed,
          "output_dir": f"/tmp/ral_distill_check/{method}_s{seed}"}
    if method == "distill":
        ov.update({"lambda_token_kl": lam, "teacher": teacher})
    import shutil
    shutil.rmtree(ov["output_dir"], ignore_errors=True)
    t0 = time.time()
    tr = Trainer(build_config(None, ov))
    probe, g = first_step_gradients(tr)
    tr.model.zero_grad(set_to_none=True)
    seed_all(seed)  # the probe drew random numbers: restart the run's RNG as a fresh Trainer would have it
    tr.train()
    a = tr.adapter_for_inference()
    a.model.eval()
    task = GroundingTask(t["grid_rows"], t["grid_cols"], kinds=tuple(t["task_kinds"]), split="test", seed=1234)
    ev = evaluate(a, task, N_EVAL)
    samples = task.samples(N_EVAL)
    answers = greedy_answers(a, [s.image for s in samples], [s.question for s in samples], t["max_new_tokens"])
    rec = {"method": method, "seed": seed, "config": {k: v for k, v in ov.items() if k != "output_dir"},
           "probe_step1": probe, "eval": {"accuracy": ev["accuracy"], "target_mass": ev["target_mass"],
                                          "sampled_reward": sampled_reward(a, task, N_EVAL // 4, t["max_new_tokens"])},
           "answers": answers, "train_reward": [m["reward"] for m in tr.history],
           "token_rkl": [m.get("token_rkl") for m in tr.history], "grad_norm": [m.get("grad_norm") for m in tr.history],
           "params": None, "wall_s": time.time() - t0}
    theta = torch.cat([p.detach().flatten() for p in a.model.parameters()]).double()
    shutil.rmtree(ov["output_dir"], ignore_errors=True)
    return rec, (g, theta)


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--lambda-kl", type=float, default=1.0, help="weight of the token KL (the benchmark's: 1)")
    a = ap.parse_args()
    build_teacher()
    teacher_info = json.loads((TEACHER / "training_info.json").read_text())
    recs, vecs = {}, {}
    sfx = "" if a.lambda_kl == 1.0 else f"_kl{a.lambda_kl:g}"
    methods = ("distill", "grpo") if not sfx else ("distill",)
    for method in methods:
        for s in SEEDS:
            rec, vec = run(method, s, str(TEACHER), a.lambda_kl)
            recs[(method, s)], vecs[(method, s)] = rec, vec
            dump_record(OUT / f"{method}{sfx}_s{s}.json",
                        {**{k: v for k, v in rec.items() if k != "params"}, "machine": machine_line()})
            print(method, s, rec["eval"], rec["probe_step1"].get("grad_grpo"), rec["probe_step1"].get("grad_token_rkl"),
                  f"{rec['wall_s']:.0f}s", flush=True)
    summary = {"teacher": {"steps": teacher_info["steps"], "test_accuracy": teacher_info["test_accuracy"]["accuracy"],
                           "init": "assets/default_model"}}
    for method in methods:
        rs = [recs[(method, s)] for s in SEEDS]
        ans = [r["answers"] for r in rs]
        differ = sum(len({a[i] for a in ans}) > 1 for i in range(N_EVAL))
        g = [vecs[(method, s)][0] for s in SEEDS]
        th = [vecs[(method, s)][1] for s in SEEDS]
        cos = [float(g[i] @ g[j] / (g[i].norm() * g[j].norm())) for i in range(3) for j in range(i + 1, 3)]
        dist = [float((th[i] - th[j]).norm()) for i in range(3) for j in range(i + 1, 3)]
        summary[method] = {
            "accuracy": [r["eval"]["accuracy"] for r in rs], "sampled_reward": [r["eval"]["sampled_reward"] for r in rs],
            "target_mass": [r["eval"]["target_mass"] for r in rs], "items_whose_greedy_answer_differs_across_seeds":
                differ, "first_batch_texts_distinct_across_seeds": len({tuple(r["probe_step1"]["texts"]) for r in rs}),
            "grad_norm_step1": {k: [r["probe_step1"].get(f"grad_{k}") for r in rs] for k in ("grpo", "token_rkl")},
            "cosine_step1_total_gradient_between_seeds": cos, "final_param_distance_between_seeds": dist}
    summary["lambda_token_kl"] = a.lambda_kl
    dump_record(OUT / f"summary{sfx}.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
