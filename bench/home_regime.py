"""RAL in its home regime: a task and run length where GRPO itself moves held-out greedy accuracy and
the RAL attention term acts on most response rows; then GRPO vs RAL over a λ sweep, OPAD and token distillation,
paired by seed, with a Holm correction over every comparison in the document (docs/results.md, the evidence
document; `make evidence`).

Task: `row` on the 4×3 digit grid ("Read row 4." → "9 7 1") from `assets/default_model`, which was trained on 3×3
grids only (held-out greedy accuracy 0.077 at the start). The answer is three digits; rollouts of a group diverge at
the digit the model is unsure of, and every row after the divergence belongs to a smaller prefix class whose
advantages do not cancel. Reward 0.5 · exact match + 0.5 · share of digits right (bench/home_rewards.py).

Arms (5 seeds each, in two sweeps that differ only in the sampling temperature: `home` T 1.5, `home_t2` T 2):
`grpo`; `ral_l<λ>` for λ ∈ {0.5, 1, 5, 100}; `opad` (γ_opad 1) and `distill` (token-level reverse KL, λ_KL 1), both
with the teacher bench/_work/teacher43: the default model continued 600 supervised steps on 4×3 grids
(`--build-teacher`; the same architecture, so the teacher knows the task).

    python bench/home_regime.py --build-teacher     # the OPAD/distill teacher, if missing (+ its record)
    python bench/home_regime.py --pilot             # cheap pilot: does GRPO move greedy accuracy, does the term act?
    python bench/home_regime.py --doc home          # a sweep: every arm × 5 seeds (runs with a record are skipped;
    python bench/home_regime.py --doc home_t2       #   --rerun redoes them)
    python bench/home_regime.py --collect           # rewrite docs/results.md from bench/records/home*/ only

Every finished run writes one small JSON record (config, curves, evaluation, CPU and wall time; rounded, sorted keys)
under bench/records/; `--collect` needs nothing else (no model, no torch, no teacher), so the document regenerates
byte-identical on a fresh clone (tests/test_bench_evidence.py checks that). The plot is regenerated too but not
byte-checked (matplotlib's PNG bytes depend on its version).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from _common import dump_record, fmt_p, holm, machine_line, paired_t, sampled_reward, start
from ral_core import settings

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "bench" / "records"
DOC = ROOT / "docs" / "results.md"
TASK = {"task_kinds": ["row"], "grid_rows": 4, "grid_cols": 3, "max_new_tokens": 8}
COMMON = {"prompts_per_step": 8, "group_size": 8, "epochs": 2, "minibatch_size": 32, "temperature": 1.5,
          "lr": 1e-4, "reward_weights": {"exact_match": 0.5, "home_rewards:digit_match": 0.5},
          "log_attention": True, "save_every": 0, "snapshot_every": 0, "threads": 1,
          "attn_metrics_every": 0}
ARMS = {"grpo": {}, "ral_l0.5": {"lambda_attn": 0.5}, "ral_l1": {"lambda_attn": 1.0}, "ral_l5": {"lambda_attn": 5.0},
        "ral_l100": {"lambda_attn": 100.0}, "opad": {"gamma_opad": 1.0, "teacher": "@teacher"},
        "distill": {"lambda_token_kl": 1.0, "teacher": "@teacher"}}
RAL_ARMS = [a for a in ARMS if a.startswith("ral_")]
TEACHER_ARMS = [a for a in ARMS if ARMS[a].get("teacher")]
# the OPAD / distillation teacher: the default model continued with supervised steps on 4×3 grids (the same
# architecture, so it knows the task); `make evidence-teacher` builds it with exactly this command
TEACHER = ROOT / "bench" / "_work" / "teacher43"
TEACHER_ARGS = ["--init", "assets/default_model", "--rows", "4", "--cols", "3", "--kinds", "row,cell,where",
                "--steps", "600", "--lr", "5e-4", "--minutes", "40"]
# λ = 100: the measured ‖∇RAL‖/‖∇GRPO‖ per unit λ here is ≈ 0.3 % (pilot), so the paper's 0.5–5 give the term
# ≤ 2 % of GRPO's push; 100 gives it about a third
# pilot variants (GRPO, one seed): learning rate and sampling temperature
EXACT = {"reward_weights": {"exact_match": 1.0}, "temperature": 1.0, "steps": 60}
PILOT = {"where_lr1e-4_T1": {"task_kinds": ["where"], "grid_rows": 3, "grid_cols": 3, "max_new_tokens": 10,
                             "lr": 1e-4, **EXACT},
         "where_lr3e-4_T1": {"task_kinds": ["where"], "grid_rows": 3, "grid_cols": 3, "max_new_tokens": 10,
                             "lr": 3e-4, **EXACT},
         "row_lr3e-5_T1": {"task_kinds": ["row"], "grid_rows": 3, "grid_cols": 3, "lr": 3e-5, **EXACT},
         "row_lr3e-5_T1.3": {"task_kinds": ["row"], "grid_rows": 3, "grid_cols": 3, "lr": 3e-5,
                             **EXACT, "temperature": 1.3},
         "row43_lr5e-5_T1": {"lr": 5e-5, **EXACT}, "row43_lr1.5e-4_T1": {"lr": 1.5e-4, **EXACT},
         "row43_partial_lr1e-4_T1": {"lr": 1e-4, "temperature": 1.0},
         "row43_partial_lr1e-4_T1.5": {"lr": 1e-4, "temperature": 1.5}}
# the sweeps (each its own records folder; one document, one Holm family over both): temperature 1.5 (the pilot's
# choice) and 2.0 (more diverse groups, so the term acts on more rows)
SWEEPS = {"home": {}, "home_t2": {"temperature": 2.0}}
STEPS, PILOT_STEPS = 30, 30
N_EVAL, N_SAMPLED, EVAL_EVERY, GRAD_EVERY = 300, 100, 10, 5
CURVE_KEYS = ("reward", "attn_target_mass", "ral_rows_zero_var", "ral_rows_cancelled", "ral_rows_acting",
              "ral_effective_weight", "grad_norm", "grad_grpo", "grad_ral_unit", "grad_ratio_unit", "grad_opad_unit",
              "grad_kl_unit", "attn_jsd_teacher", "token_rkl")


def grad_ratio(tr, theta_old: list, frac: float) -> dict:
    """‖∇L_GRPO‖ and ‖∇L_RAL‖ (unit λ) on the step's rollout batch, at θ_old + frac·(θ_new − θ_old) with frac =
    1/updates: about where the second optimizer update of the step stands (p_θ ≠ p_old, so the RAL term is not at
    its zero-gradient point; the policy has not yet drifted so far that the ratio clip removes most of GRPO's
    gradient, as it does at θ_new). Measured with the term's own gradient whatever λ the run uses (in GRPO runs:
    what λ = 1 would add). The weights are restored afterwards."""
    import torch

    from ral_core.losses import LOSSES, LossContext
    from ral_core.rollout import forward_policies
    ro, cfg = tr.last_rollouts, tr.cfg
    params = [p for p in tr.model.parameters() if p.requires_grad]
    theta_new = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, o, n in zip(params, theta_old, theta_new):
            p.copy_(o + frac * (n - o))
    try:
        with torch.enable_grad():
            r = forward_policies(tr.model, ro, tr.spec, None,
                                 need_logits=getattr(ro, "teacher_logits", None) is not None)
            ctx = LossContext(mask=ro.mask, logp=r["logp"], old_logp=ro.old_logp, advantages=ro.advantages,
                              attn=r["attn"], attn_old=ro.old_attn, norm=cfg.loss_norm, max_len=cfg.max_new_tokens,
                              clip_low=cfg.clip_low, clip_high=cfg.clip_high)
            lg, _ = LOSSES["grpo"](ctx)
            la, _ = LOSSES["ral_attn"](ctx)
            gg = torch.autograd.grad(lg, params, retain_graph=True, allow_unused=True)
            ga = torch.autograd.grad(la, params, retain_graph=True, allow_unused=True)
            extra = {}  # teacher arms: the OPAD term (attention JSD to the teacher) and token-KL, each at unit weight
            if getattr(ro, "teacher_attn", None):
                ctx.attn_teacher = ro.teacher_attn
                extra["grad_opad_unit"] = torch.autograd.grad(LOSSES["opad_attn"](ctx)[0], params,
                                                              retain_graph=True, allow_unused=True)
            if r.get("logits") is not None and getattr(ro, "teacher_logits", None) is not None:
                ctx.logits, ctx.teacher_logits = r["logits"], ro.teacher_logits
                extra["grad_kl_unit"] = torch.autograd.grad(LOSSES["token_rkl"](ctx)[0], params, allow_unused=True)
    finally:
        with torch.no_grad():
            for p, n in zip(params, theta_new):
                p.copy_(n)
        tr.model.zero_grad(set_to_none=True)

    def norm(gs):
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))
    n_g, n_a = norm(gg), norm(ga)
    return {"grad_grpo": n_g, "grad_ral_unit": n_a, "grad_ratio_unit": n_a / n_g if n_g > 0 else float("nan"),
            **{k: norm(v) for k, v in extra.items()}}


def _eval_task(kinds=None, rows=None, cols=None, split_seed: int = 1234):
    from ral_core.data import GroundingTask
    return GroundingTask(rows or TASK["grid_rows"], cols or TASK["grid_cols"], kinds=tuple(kinds or TASK["task_kinds"]),
                         split="test", seed=split_seed)


def evaluate_adapter(adapter, n_eval: int, n_sampled: int, kinds=None, max_new_tokens=None, rows=None,
                     cols=None) -> dict:
    """Greedy exact-match accuracy and attention metrics on held-out items, plus the exact-match reward of
    temperature-1 samples."""

    from ral_core.evaluate import evaluate
    adapter.model.eval()
    task = _eval_task(kinds, rows, cols)
    ev = evaluate(adapter, task, n_eval)
    out = {k: ev[k] for k in ("accuracy", "target_mass", "target_mass_first", "pointing_hit", "entropy")}
    out["sampled_reward"] = sampled_reward(adapter, task, n_sampled, max_new_tokens or TASK["max_new_tokens"])
    return out


def engine_commit() -> str:
    """The last commit that changed the engine (ral_core/) that ran (RAL_ENGINE_COMMIT when the runs use a
    snapshot of ral_core). Records made before this rule name the repository's HEAD at the time instead."""
    if settings.get("RAL_ENGINE_COMMIT"):
        return settings.get("RAL_ENGINE_COMMIT")[:12]
    try:
        return subprocess.run(["git", "log", "-1", "--format=%H", "--", "ral_core"], capture_output=True, text=True,
                              cwd=settings.get("RAL_ENGINE_DIR", ROOT)).stdout.strip()[:12]
    except OSError:
        return ""


def _grid(ov: dict) -> tuple:
    return ov["task_kinds"], ov["grid_rows"], ov["grid_cols"]


def task_key(ov: dict) -> str:
    """A task's name in records: question kinds and grid, e.g. 'row@4x3'."""
    return f"{'/'.join(ov['task_kinds'])}@{ov['grid_rows']}x{ov['grid_cols']}"


def run_one(job: dict) -> dict:
    """Train one (arm, seed), measure the gradient ratio every GRAD_EVERY steps and greedy accuracy every
    EVAL_EVERY steps, evaluate on held-out handwriting, write the record."""
    start(threads=False)
    import torch
    torch.set_num_threads(1)
    from ral_core.config import build_config
    from ral_core.evaluate import accuracy
    from ral_core.trainer import Trainer

    out = Path(job["record"])
    if out.exists() and not job.get("rerun"):
        return json.loads(out.read_text())
    overrides = {**COMMON, **{k: TASK[k] for k in TASK}, **job["overrides"], "steps": job["steps"],
                 "seed": job["seed"], "output_dir": f"/tmp/ral_home/{job['doc']}/{job['arm']}_s{job['seed']}"}
    if overrides.get("teacher") == "@teacher":
        overrides["teacher"] = str(TEACHER)
    import shutil
    shutil.rmtree(overrides["output_dir"], ignore_errors=True)
    evals = []

    prev = {}

    def callback(tr, m):
        if tr.step % GRAD_EVERY == 0 or tr.step == 1:
            m.update(grad_ratio(tr, prev["theta"], 1 / tr.cfg.updates_per_step))
        prev["theta"] = [p.detach().clone() for p in tr.model.parameters() if p.requires_grad]
        if tr.step % EVAL_EVERY == 0 and tr.step < job["steps"]:
            a = tr.adapter_for_inference()
            a.model.eval()
            evals.append({"step": tr.step, "accuracy": accuracy(a, _eval_task(*_grid(overrides)),
                                                                job["n_eval"])["accuracy"]})
            tr.model.train()

    t0, c0 = time.time(), time.process_time()
    tr = Trainer(build_config(None, overrides), callbacks=[callback])
    prev["theta"] = [p.detach().clone() for p in tr.model.parameters() if p.requires_grad]
    tr.train()
    ev = evaluate_adapter(tr.adapter_for_inference(), job["n_eval"], job["n_sampled"], overrides["task_kinds"],
                          overrides["max_new_tokens"], overrides["grid_rows"], overrides["grid_cols"])
    evals.append({"step": job["steps"], "accuracy": ev["accuracy"]})
    if overrides.get("teacher"):
        overrides["teacher"] = os.path.relpath(overrides["teacher"], ROOT)
    rec = {"doc": job["doc"], "arm": job["arm"], "seed": job["seed"], "engine_commit": engine_commit(),
           "config": {k: overrides[k] for k in sorted(overrides) if k not in ("output_dir", "threads")},
           "eval": ev, "evals": evals, "n_eval": job["n_eval"], "n_sampled": job["n_sampled"],
           "curve": [{"step": m["step"], **{k: m[k] for k in CURVE_KEYS if k in m}} for m in tr.history],
           "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "machine": machine_line()}
    dump_record(out, rec)
    shutil.rmtree(overrides["output_dir"], ignore_errors=True)
    return rec


def base_record(doc: str, n_eval: int, n_sampled: int, kind_sets=None, rerun: bool = False) -> dict:
    """The starting checkpoint on each task (question-kind set) the runs use: `eval` for TASK, `by_task` for all."""
    out = RECORDS / doc / "base.json"
    rec = json.loads(out.read_text()) if out.exists() and not rerun else {}
    want = {task_key({**TASK, **k}) for k in (kind_sets or [{}])}
    have = set(rec.get("by_task", {}))
    if want <= have:
        return rec
    start(threads=False)
    import torch
    torch.set_num_threads(1)
    from ral_core.models import load_adapter
    t0 = time.time()
    a = load_adapter("default")
    by = dict(rec.get("by_task", {}))
    for key in sorted(want - have):
        kinds, grid = key.split("@")
        rows, cols = map(int, grid.split("x"))
        mnt = 10 if "where" in kinds else TASK["max_new_tokens"]
        by[key] = evaluate_adapter(a, n_eval, n_sampled, kinds.split("/"), mnt, rows, cols)
    rec = {"doc": doc, "arm": "base", "model": "assets/default_model", "by_task": by,
           "eval": by.get(task_key(TASK)), "n_eval": n_eval, "n_sampled": n_sampled,
           "engine_commit": engine_commit(), "wall_s": rec.get("wall_s", 0) + time.time() - t0,
           "machine": machine_line()}
    dump_record(out, rec)
    return rec


def build_teacher(rerun: bool = False) -> None:
    """Train the OPAD/distillation teacher (TEACHER_ARGS, a fixed step count well inside its --minutes cap, so the
    checkpoint is reproducible) unless it exists; record its build time (wall and CPU) beside its own training info."""
    import resource
    if (TEACHER / "config.json").exists() and not rerun:
        return
    c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    subprocess.run([sys.executable, "scripts/train_default_model.py", "--out", os.path.relpath(TEACHER, ROOT),
                    *TEACHER_ARGS], check=True, cwd=ROOT)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    (TEACHER / "build_time.json").write_text(json.dumps(
        {"wall_s": round(time.time() - t0, 1), "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1)})
        + "\n")


def teacher_record(n_eval: int, n_sampled: int, rerun: bool = False) -> dict:
    """The teacher on the sweep's own held-out evaluation (the same items and samples as every run), with its
    training facts: bench/records/home_teacher/teacher.json."""
    out = RECORDS / "home_teacher" / "teacher.json"
    if out.exists() and not rerun:
        return json.loads(out.read_text())
    if not (TEACHER / "config.json").exists():
        sys.exit(f"the OPAD/distill teacher {os.path.relpath(TEACHER, ROOT)} is missing: `make evidence-teacher` "
                 "(= python bench/home_regime.py --build-teacher) builds it")
    start(threads=False)
    import torch
    torch.set_num_threads(1)
    from ral_core.models import load_adapter
    info = json.loads((TEACHER / "training_info.json").read_text())
    bt = TEACHER / "build_time.json"
    build = json.loads(bt.read_text()) if bt.exists() else {}
    t0 = time.time()
    ev = evaluate_adapter(load_adapter(str(TEACHER)), n_eval, n_sampled)
    rec = {"doc": "home_teacher", "arm": "teacher", "model": os.path.relpath(TEACHER, ROOT),
           "command": "python scripts/train_default_model.py --out " + os.path.relpath(TEACHER, ROOT) + " "
                      + " ".join(TEACHER_ARGS),
           "training": {k: info[k] for k in ("init", "steps", "steps_planned", "batch_size", "parameters", "task",
                                             "train_wall_s", "torch")},
           "training_test_accuracy": info["test_accuracy"], "lr": info["args"]["lr"],
           "build_wall_s": build.get("wall_s"), "build_cpu_s": build.get("cpu_s"),
           "eval": ev, "n_eval": n_eval, "n_sampled": n_sampled, "eval_wall_s": time.time() - t0,
           "engine_commit": engine_commit(), "machine": machine_line()}
    dump_record(out, rec)
    return rec


def committed_record(rev: str, path: str) -> dict | None:
    """The record at `path` (relative to the repository) as committed at git revision `rev`; None if absent."""
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, cwd=ROOT)
    return json.loads(r.stdout) if r.returncode == 0 else None


def compare_with(rev: str) -> dict:
    """After a rerun: compare every run record with the committed one at git revision `rev` (greedy accuracy, sampled
    reward, target mass; equal = within 1e-4 after rounding), split by whether the engine commit changed; write
    bench/records/home_rerun_check.json for the document."""
    rev_id = subprocess.run(["git", "rev-parse", "--short=12", rev], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    groups = {}
    for doc in ("home_pilot", *SWEEPS):
        for f in sorted((RECORDS / doc).glob("*_s*.json")):
            new = json.loads(f.read_text())
            old = committed_record(rev, os.path.relpath(f, ROOT))
            if old is None:
                continue
            key = "same engine commit" if old.get("engine_commit") == new.get("engine_commit") else "other engine commit"
            d = {k: new["eval"][k] - old["eval"][k] for k, _, _ in METRICS}
            g = groups.setdefault(key, {"records": 0, "identical": 0, "differ": []})
            g["records"] += 1
            if max(abs(v) for v in d.values()) < 1e-4:
                g["identical"] += 1
            else:
                g["differ"].append({"record": f"{doc}/{f.name}", "old_engine": old.get("engine_commit"),
                                    "new_engine": new.get("engine_commit"), "delta": d})
    rec = {"compared_with": rev_id, "groups": groups}
    dump_record(RECORDS / "home_rerun_check.json", rec)
    return rec


def cause_check(rev: str, record: str = "home/ral_l1_s0.json") -> dict:
    """Why do records of an older engine commit differ? Rerun one of them on this engine with the shared prompt
    pass off (share_prompt=false: every row runs its whole prompt, as before ral_core/prefix_share.py) and compare with the record
    committed at `rev`; write bench/records/home_rerun_cause.json for the document."""
    old = committed_record(rev, f"bench/records/{record}")
    if old is None:
        sys.exit(f"no record bench/records/{record} at {rev}")
    doc, name = record.split("/")
    arm, seed = name[:-len(".json")].rsplit("_s", 1)
    out = Path("/tmp/ral_home_cause.json")
    new = run_one({"doc": doc, "arm": arm, "seed": int(seed), "overrides": {**SWEEPS[doc], **ARMS[arm],
                   "share_prompt": False}, "steps": old["config"]["steps"], "n_eval": old["n_eval"],
                   "n_sampled": old["n_sampled"], "rerun": True, "record": str(out)})
    now = json.loads((RECORDS / record).read_text())
    rec = {"record": record, "old_engine": old["engine_commit"], "engine": new["engine_commit"],
           "old": {k: old["eval"][k] for k, _, _ in METRICS},
           "share_prompt_false": {k: new["eval"][k] for k, _, _ in METRICS},
           "share_prompt_auto": {k: now["eval"][k] for k, _, _ in METRICS}}
    rec["reproduces_old"] = all(abs(rec["old"][k] - rec["share_prompt_false"][k]) < 1e-4 for k in rec["old"])
    dump_record(RECORDS / "home_rerun_cause.json", rec)
    return rec


def _cause_line() -> str:
    f = RECORDS / "home_rerun_cause.json"
    if not f.exists():
        return " (the cause of each difference was not traced)"
    c = json.loads(f.read_text())
    fmt = lambda e: ", ".join(f"{k.replace('_', ' ')} {e[k]:.4f}" for k in ("accuracy", "sampled_reward",
                                                                           "target_mass"))
    return (f". Measured on `{c['record']}` (`python bench/home_regime.py --cause-check REV`): on engine "
            f"`{c['engine']}` with the shared prompt pass off (`share_prompt=false`, every row runs its whole prompt as "
            f"on `{c['old_engine']}`) the run " + ("reproduces" if c["reproduces_old"] else "does not reproduce")
            + f" the old record ({fmt(c['share_prompt_false'])} vs {fmt(c['old'])}; with the default sharing: "
            f"{fmt(c['share_prompt_auto'])}): " + (
                "the differences come from the shared prompt pass, whose logits differ from the full pass by float "
                "rounding (≤ 2.3e-7 on parameters after 3 steps, tests/test_step_sharing.py), enough to change a "
                "sampled token and from then on the trajectory" if c["reproduces_old"] else
                "the shared prompt pass alone does not explain it"))


def _rerun_check_line() -> str:
    f = RECORDS / "home_rerun_check.json"
    if not f.exists():
        return ""
    c = json.loads(f.read_text())
    parts = []
    for key, g in sorted(c["groups"].items()):
        acc = [abs(x["delta"]["accuracy"]) for x in g["differ"]]
        parts.append(f"{key}: {g['identical']} of {g['records']} records reproduced exactly"
                     + (f", {len(g['differ'])} differ (greedy accuracy by up to {max(acc):.3f}; "
                        + ", ".join(sorted({"`%s` → `%s`" % (x["old_engine"], x["new_engine"]) for x in g["differ"]}))
                        + ")" if g["differ"] else ""))
    return (f" A full rerun (`make evidence RERUN=--rerun`), compared with the records it replaced (commit "
            f"`{c['compared_with']}`): " + "; ".join(parts) + ". Runs on one engine commit are deterministic on one machine (CPU); "
            "across engine commits small numerical differences can change which tokens are sampled, and from then "
            "on the trajectory" + _cause_line() + ". This document uses the rerun's records only.")


def plan(args) -> list[dict]:
    doc = "home_pilot" if args.pilot else args.doc
    extra = SWEEPS[doc] if doc in SWEEPS else {}
    variants = {k: PILOT[k] for k in args.variants.split(",")} if args.pilot else {
        a: {**extra, **ARMS[a]} for a in args.arms.split(",")}
    jobs = []
    for s in range(args.seeds):  # seed-major: a cut-short sweep still has every arm at its first seeds
        for name, ov in variants.items():
            jobs.append({"doc": doc, "arm": name, "seed": s, "overrides": ov, "steps": ov.get("steps", args.steps),
                         "n_eval": args.n_eval, "n_sampled": args.n_sampled, "rerun": args.rerun,
                         "record": str(RECORDS / doc / f"{name}_s{s}.json")})
    return jobs


# ---- the document (records only) ---------------------------------------------------------------------------
def load_records(doc: str, records: Path | None = None) -> tuple[dict, dict]:
    """(base record or None, {arm: {seed: record}}) of one sweep's folder under `records` (default: the committed
    bench/records/)."""
    runs, base = {}, None
    for f in sorted(((records or RECORDS) / doc).glob("*.json")):
        r = json.loads(f.read_text())
        if r["arm"] == "base":
            base = r
        else:
            runs.setdefault(r["arm"], {})[r["seed"]] = r
    return base, runs


def _curve_mean(r: dict, key: str) -> float:
    v = [c[key] for c in r["curve"] if c.get(key) is not None]
    return float(np.mean(v)) if v else float("nan")


REWARD_NAMES = {"exact_match": "exact match", "home_rewards:digit_match": "share of digits read right "
                "(`bench/home_rewards.py`)"}


def _pilot_share(pilot_runs: dict, key: str, exact: bool) -> float:
    """Mean of a silence share over the pilot runs on the sweep's task with (exact=True) or without exact-match-only
    reward."""
    v = [_curve_mean(r, key) for rs in pilot_runs.values() for r in rs.values()
         if task_key(r["config"]) == task_key(TASK)
         and (r["config"].get("reward_weights", {"exact_match": 1.0}) == {"exact_match": 1.0}) == exact]
    return float(np.mean(v)) if v else float("nan")


def _grad_ratio(r: dict, key: str = "grad_ral_unit") -> float:
    """A run's ‖∇RAL‖/‖∇GRPO‖ per unit λ: Σ‖∇RAL‖ / Σ‖∇GRPO‖ over its measured steps (steps with GRPO gradient 0 —
    every group zero-variance — carry no information and drop out; a mean of per-step ratios would be dominated by
    steps where ‖∇GRPO‖ is nearly 0). key="grad_opad_unit" / "grad_kl_unit": the same for the teacher arms' terms."""
    pts = [(c[key], c["grad_grpo"]) for c in r["curve"] if c.get("grad_grpo") and c.get(key) is not None]
    return sum(a for a, _ in pts) / sum(g for _, g in pts) if pts else float("nan")


# RAL (λ = 1) − GRPO greedy accuracy on the earlier evidence tasks (docs/results_short.md, 12-step runs, 5 seeds), at the
# acting share measured on their starting checkpoint (README 'Where the attention term acts': 64 prompts × 8
# rollouts): drawn as hollow markers beside this document's runs
EARLIER_TASKS = {"read3": (0.23, -0.001), "cell3": (0.0, 0.000)}


def _ms(v) -> str:
    v = np.asarray(v, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"


METRICS = [("accuracy", "greedy acc", "eval"), ("sampled_reward", "sampled reward", "eval"),
           ("target_mass", "target mass", "eval")]


def t_crit(p_two: float, df: int) -> float:
    """The t with two-sided p-value `p_two` at `df` degrees of freedom (bisection on _common.t_two_sided_p)."""
    from _common import t_two_sided_p
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p_two else (lo, mid)
    return (lo + hi) / 2


POWER = 0.8


def ci95(c: dict) -> tuple[float, float]:
    """95 % confidence interval of a paired mean difference: mean ± t(0.975, n − 1) · SE."""
    h = t_crit(0.05, c["n"] - 1) * c["se"] if c["n"] > 1 else float("nan")
    return c["mean"] - h, c["mean"] + h


def detectable(c: dict, alpha: float = 0.05) -> float:
    """The smallest true mean difference a two-sided paired t-test at level `alpha` finds with 80 % power at this
    comparison's n, from its observed SD of differences s_d: (t(1 − α/2, n − 1) + t(0.8, n − 1)) · s_d / √n (the
    usual normal-shift approximation of the noncentral t)."""
    if c["n"] < 2:
        return float("nan")
    return (t_crit(alpha, c["n"] - 1) + t_crit(2 * (1 - POWER), c["n"] - 1)) * c["se"]


def comparisons(sweeps: dict, extra: list | None = None) -> list[dict]:
    """Every paired comparison the document reports: in each sweep, each arm (RAL λ sweep, OPAD, distill) − GRPO per
    seed on each metric, then `extra` (the grounded sweep's, bench/ground_regime.py); Holm-adjusted over all of them
    together (one family per document)."""
    out = []
    for sweep, runs in sweeps.items():
        g = runs.get("grpo", {})
        for arm in ARMS:
            if arm == "grpo" or arm not in runs:
                continue
            for key, label, _ in METRICS:
                seeds = [s for s in sorted(runs[arm]) if s in g]
                d = np.array([runs[arm][s]["eval"][key] - g[s]["eval"][key] for s in seeds])
                out.append({"sweep": sweep, "arm": arm, "key": key, "label": label, "d": d, **paired_t(d)})
    out += extra or []
    adj = holm([c["p"] for c in out])
    for c, a in zip(out, adj):
        c["p_holm"] = a
    return out


def paired_table(cs: list, m: int) -> list[str]:
    """The paired-differences table of one sweep: mean ± SE, per seed, 95 % CI, t, p, Holm p, the smallest difference
    the comparison could detect (80 % power) at α 0.05 and at Holm's first-step level α/m, verdict."""
    out = [f"Paired differences against GRPO (mean ± SE over seeds; 95 % CI, not adjusted for multiplicity; two-sided paired t-test; Holm over all {m} "
           "comparisons of the document; detectable: the smallest true difference found with 80 % power at this n "
           f"and this SD of differences, at α 0.05 / at α 0.05/{m}, Holm's first step):", "",
           "| arm | metric | Δ vs GRPO | per seed | 95 % CI | t | p | p (Holm) | detectable (α 0.05 / Holm) | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        lo, hi = ci95(c)
        out.append(f"| {c['arm']} | {c['label']} | {c['mean']:+.4f} ± {c['se']:.4f} | "
                   + ", ".join(f"{x:+.3f}" for x in c["d"]) + f" | [{lo:+.4f}, {hi:+.4f}] | {c['t']:.2f} | "
                   f"{fmt_p(c['p'])} | {fmt_p(c['p_holm'])} | ±{detectable(c):.4f} / ±{detectable(c, 0.05 / m):.4f} | "
                   f"{_verdict(c)} |")
    return out


def _t(sweep_runs: dict) -> str:
    r = next(iter(next(iter(sweep_runs.values())).values()))
    return f"T = {r['config']['temperature']:g}"


def _direction(c: dict) -> str:
    """'better'/'worse' for accuracy and reward; 'higher'/'lower' for where attention goes (more is not better)."""
    if c["key"] in ("accuracy", "where", "sampled_reward"):
        return "better" if c["mean"] > 0 else "worse"
    return "higher" if c["mean"] > 0 else "lower"


def _verdict(c: dict, alpha: float = 0.05) -> str:
    if len(c["d"]) and np.all(c["d"] == 0):
        return "identical to GRPO on every seed"
    if c["p_holm"] < alpha:
        return f"{_direction(c)} than GRPO"
    return "not distinguishable from GRPO"


def pilot_lines() -> list[str]:
    base, runs = load_records("home_pilot")
    if not runs:
        return []
    out = ["## Pilot: does GRPO move greedy accuracy, and does the term act?", "",
           "GRPO, one seed per variant (`python bench/home_regime.py --pilot`, records in `bench/records/home_pilot/`). "
           "Greedy accuracy on the variant's held-out items during training (step 0 = the starting checkpoint); "
           "acting / zero-variance / cancelled = shares of response rows, mean over all steps (the trainer's "
           "silence diagnostic); reward `exact` = exact match, `0.5 exact + 0.5 digits` adds credit per digit "
           "read right (`bench/home_rewards.py`).", "",
           "| variant | task | reward | lr | T | steps | greedy acc by step | Δ greedy acc | sampled reward (exact) "
           "| acting rows | zero-variance rows | cancelled rows |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_task = (base or {}).get("by_task", {})
    for name in PILOT:
        for s, r in sorted(runs.get(name, {}).items()):
            c = r["config"]
            b = by_task.get(task_key(c), {})
            b_acc = b.get("accuracy", float("nan"))
            rw = "exact" if c.get("reward_weights", {"exact_match": 1.0}) == {"exact_match": 1.0} else \
                "0.5 exact + 0.5 digits"
            curve = ", ".join(f"{e['step']}: {e['accuracy']:.3f}" for e in r["evals"])
            out.append(f"| {name} | `{task_key(c)}` | {rw} | {c['lr']:g} | {c['temperature']:g} | {c['steps']} | "
                       f"0: {b_acc:.3f}, {curve} | {r['eval']['accuracy'] - b_acc:+.3f} | "
                       f"{b.get('sampled_reward', float('nan')):.3f} → {r['eval']['sampled_reward']:.3f} | "
                       f"{_curve_mean(r, 'ral_rows_acting'):.3f} | {_curve_mean(r, 'ral_rows_zero_var'):.3f} | "
                       f"{_curve_mean(r, 'ral_rows_cancelled'):.3f} |")
    def final(name):
        r = runs.get(name, {}).get(0)
        return None if r is None else r["eval"]["accuracy"] - by_task.get(task_key(r["config"]), {}).get("accuracy",
                                                                                                       float("nan"))
    gains = [final(n) for n in PILOT if n.startswith("row43") and final(n) is not None]
    exact43 = [_curve_mean(runs[n][0], "ral_rows_acting") for n in PILOT
               if n.startswith("row43") and "partial" not in n and 0 in runs.get(n, {})]
    where = [(runs[n][0]["config"]["lr"], runs[n][0]["eval"]["accuracy"]) for n in PILOT
             if n.startswith("where") and 0 in runs.get(n, {})]
    last = runs.get("row43_partial_lr1e-4_T1.5", {}).get(0)
    _, home = load_records("home")
    g0 = home.get("grpo", {}).get(0)
    same = (last is not None and g0 is not None and all(abs(last["eval"][k] - g0["eval"][k]) < 1e-4
                                                        for k, _, _ in METRICS))
    out += ["", "Read together: `where` on 3×3 is near chance for this model (9 places; "
            f"{by_task.get('where@3x3', {}).get('accuracy', float('nan')):.2f} greedy) and GRPO's noisy reward drove it "
            "down (" + ", ".join(f"{a:.3f} at lr {lr:g}" for lr, a in where) + " after 60 steps); on `row` 3×3 the "
            "training split is solved (training reward ≈ 1), so nearly every group has zero reward variance and "
            f"nothing moves; on `row` 4×3 GRPO gains {100 * min(gains):.0f}–{100 * max(gains):.0f} points, but with "
            "exact match alone most groups are all-right or all-wrong, so the RAL term acts on "
            f"{max(exact43):.0%} of rows or fewer. Credit per digit gives every group whose samples differ a reward "
            "spread, and temperature 1.5 keeps them differing: the acting share rises to about a half. The sweep's "
            "`grpo` seed 0 repeats the last pilot run with the same settings and "
            + ("gives the same numbers (runs on one engine commit are deterministic on one machine)." if same else
               "gives different numbers (the two records come from different engine commits).")
            if gains and exact43 and where else "", ""]
    return out


ARM_DOC = {"opad": "OPAD", "distill": "distill (token KL)"}
TERM_KEY = {"opad": "grad_opad_unit", "distill": "grad_kl_unit"}


def _arm_ratio(arm: str, rs: list) -> str:
    """The arm's own extra term's ‖∇‖/‖∇GRPO‖ per unit weight (RAL for GRPO and the λ sweep, what λ = 1 adds)."""
    return f"{np.mean([_grad_ratio(r, TERM_KEY.get(arm, 'grad_ral_unit')) for r in rs]):.4f}"


def _sum_time(recs: list, key: str) -> float:
    return float(sum(r.get(key) or 0 for r in recs))


def compute_lines(sweeps: dict, pilot_recs: list, bases: list, teacher: dict | None,
                  extra_rows: list | None = None) -> list[str]:
    """The compute behind the document, from the records alone (`extra_rows`: (label, records) of the grounded sweep
    and the gradient replay)."""
    rows = [("pilot (GRPO)", pilot_recs)]
    for d, runs in sweeps.items():
        for label, arms in (("GRPO + RAL", ["grpo", *RAL_ARMS]), ("OPAD + distill", TEACHER_ARMS)):
            recs = [r for a in arms for r in runs.get(a, {}).values()]
            if recs:
                rows.append((f"`{d}` {label}", recs))
    rows += [r for r in extra_rows or [] if r[1]]
    runs_all = [r for _, rs in rows for r in rs]
    cpu = _sum_time(runs_all, "cpu_s")
    out = ["## Compute (from the records)", "",
           "Every run records its worker's CPU time (`cpu_s`, the process's user + system time) and wall time "
           "(`wall_s`). One thread per run, two runs at a time (`--workers 2`), niced, on a 2-core machine that "
           "other jobs shared while they ran.", "",
           "| part | runs | CPU time (min) | worker wall time (min) | CPU s per run |", "|---|---|---|---|---|"]
    for label, rs in rows:
        out.append(f"| {label} | {len(rs)} | {_sum_time(rs, 'cpu_s') / 60:.1f} | {_sum_time(rs, 'wall_s') / 60:.1f} | "
                   f"{min(r['cpu_s'] for r in rs):.0f}–{max(r['cpu_s'] for r in rs):.0f} |")
    out.append(f"| all runs | {len(runs_all)} | {cpu / 60:.1f} | {_sum_time(runs_all, 'wall_s') / 60:.1f} | |")
    base_wall = _sum_time(bases, "wall_s")
    extra = [f"- Starting-checkpoint evaluations (`base.json`, one per records folder, in the main process before "
             f"the workers start): {base_wall / 60:.1f} min wall (CPU time not recorded)."]
    t_cpu = 0.0
    if teacher:
        t_cpu = teacher.get("build_cpu_s") or 0.0
        extra.append(f"- Teacher build (`make evidence-teacher`, one process, one thread): "
                     f"{teacher['training']['train_wall_s'] / 60:.1f} min of training wall time"
                     + (f"; the whole build {teacher['build_wall_s'] / 60:.1f} min wall, {t_cpu / 60:.1f} CPU-min"
                        if teacher.get("build_cpu_s") else "")
                     + f"; its evaluation {teacher['eval_wall_s'] / 60:.1f} min wall.")
    commits = sorted({r.get("engine_commit", "") for r in runs_all})
    timing = RECORDS / "make_evidence_timing.json"
    t = json.loads(timing.read_text()) if timing.exists() else {}
    measured = t.get("measurements", [t] if t else [])
    if not any(m.get("idle") for m in measured):
        extra.append(f"- How long `make evidence` takes on an idle 2-core machine: **not measured** (no idle machine "
                     f"was available). A lower bound from the records: the teacher build's CPU time plus half the "
                     f"runs' CPU time (two runs at a time on two cores) = {(t_cpu + cpu / 2) / 60:.0f} min, excluding "
                     "the starting-checkpoint and teacher evaluations, whose CPU time is not recorded (approximate: "
                     "CPU time measured while other jobs shared the cores can be somewhat higher than on an idle "
                     "machine)." + ("" if len(commits) == 1 else f" The runs span engine commits {', '.join(commits)}"
                                    ", whose speeds differ, so this bound describes these records, not the current "
                                    "engine."))
    for m in measured:
        b = "**" if m.get("idle") else ""
        extra.append(f"- {b}Measured: `{m['command']}` (every run, the teacher and the evaluations redone) took "
                     f"{m['wall_s'] / 60:.0f} min of wall time{b} on {m['date']}"
                     + (f", engine commit `{m['engine_commit']}`" if m.get("engine_commit") else "")
                     + f", on this 2-core machine {m['load']}" + ("" if m.get("idle") else "; an idle machine is faster")
                     + (f"; {m['cpu_s'] / 60:.0f} CPU-min" if m.get("cpu_s") else "")
                     + (f"; its {m['records_compared']} records equal the committed ones in every field but the "
                        f"timings ({m['records_reproduced']} of {m['records_compared']})"
                        if m.get("records_compared") else "") + ".")
    return out + [""] + extra + [""]


def _machine_line(recs: list) -> str:
    """Which records name their machine (CPU model, flags incl. native bf16, library versions) and which do not."""
    have = sorted({r["machine"] for r in recs if r.get("machine")})
    missing = sum(1 for r in recs if not r.get("machine"))
    return (f"{len(recs) - missing} of {len(recs)} run records name their machine"
            + (": " + "; ".join(f"`{m}`" for m in have) if have else "")
            + (f"; the other {missing} (the `home` sweeps and the pilot, made before this rule) do not: they were made "
               "on this workbench's shared 2-core machine, whose CPU model was not recorded with them." if missing
               else "."))


def _teacher_line(teacher: dict, b: dict, grpo_acc: float) -> str:
    tr, ev = teacher["training"], teacher["eval"]
    own = teacher["training_test_accuracy"]
    per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(own.get("per_kind", {}).items()))
    return (f"- Teacher (OPAD and distill): `{teacher['model']}`, `{tr['init']}` continued for {tr['steps']} supervised "
            f"steps (batch {tr['batch_size']}, lr {teacher['lr']:g}) on {tr['task']['rows']}×{tr['task']['cols']} "
            f"grids, question kinds {', '.join(tr['task']['kinds'])} (its own test split: {per}): **the same "
            f"architecture ({tr['parameters']:,} parameters) trained on the target grid, so the teacher knows the "
            f"task.** On this document's held-out evaluation it reads {ev['accuracy']:.3f} of the rows right "
            f"(greedy; sampled reward {ev['sampled_reward']:.3f}), against the student's {b['accuracy']:.3f} at the "
            f"start and GRPO's {grpo_acc:.3f} after {STEPS} steps; its last layer's target mass is "
            f"{ev['target_mass']:.3f} (student {b['target_mass']:.3f}): it reads the row right without its last "
            f"layer looking at it more. Built by `make evidence-teacher` (= `{teacher['command']}`; a fixed step "
            "count well inside the --minutes cap, so the build is reproducible).")


def summarise() -> str:
    sweeps, base = {}, None
    bases = []
    for doc in SWEEPS:
        b, runs = load_records(doc)
        if runs:
            sweeps[doc] = runs
            base = base or b
            bases += [b] if b else []
    all_recs = [r for runs in sweeps.values() for rs in runs.values() for r in rs.values()]
    pilot_base, pilot_runs = load_records("home_pilot")
    bases += [pilot_base] if pilot_base else []
    pilot_recs = [r for rs in pilot_runs.values() for r in rs.values()]
    tf = RECORDS / "home_teacher" / "teacher.json"
    teacher = json.loads(tf.read_text()) if tf.exists() else None
    cfg = all_recs[0]["config"] if all_recs else {}
    import ground_regime as G  # the grounded sweep and the gradient replay: their sections and comparisons
    cmp = comparisons(sweeps, G.comparisons(RECORDS))
    _, ground_runs = load_records(G.SWEEP)
    _, grad_runs = load_records(G.GRAD_DOC)
    b = base["eval"] if base else {}
    has_teacher = any(a in runs for runs in sweeps.values() for a in TEACHER_ARMS)
    lines = ["# Evidence: GRPO, RAL, grounded attention objectives, OPAD and token distillation", "",
             "Command: `make evidence` (builds the OPAD/distill teacher if it is missing, then runs `python "
             "bench/home_regime.py --pilot`, `--doc home` and `--doc home_t2`, then `python bench/ground_regime.py` "
             "(the grounded sweep on the default task) and `--grad-across` (the RAL gradient at every update); each run writes "
             "`bench/records/<sweep>/<arm>_s<seed>.json` and a run whose record exists is skipped; `make evidence "
             "RERUN=--rerun` redoes everything, teacher included). `make evidence-collect` (= `python "
             "bench/home_regime.py --collect`) rewrites this file from the committed records alone, byte-identical "
             "(tested in `tests/test_bench_evidence.py`). The plot is regenerated too but not byte-checked "
             "(matplotlib's PNG bytes depend on its version).", "",
             "Earlier evidence, in a regime where the term barely acted: [results_short.md](results_short.md) (12-step "
             "runs on five digit-grid tasks, 276 runs; archived: its run cache was not kept, so it cannot be "
             "regenerated, and its statistics were re-derived from its printed numbers) and "
             "[results_long.md](results_long.md) (3× longer runs of its main contrasts).", ""]
    if all_recs:
        ups = cfg['epochs'] * -(-cfg['prompts_per_step'] * cfg['group_size'] // cfg['minibatch_size'])
        g_acc = np.mean([r["eval"]["accuracy"] for runs in sweeps.values() for r in runs.get("grpo", {}).values()])
        commits = {}
        for r in all_recs:
            commits[r.get("engine_commit", "")] = commits.get(r.get("engine_commit", ""), 0) + 1
        lines += [
            f"- Task of the `home` sweeps (the grounded sweep `ground` runs on the default task and has its own "
            f"section below): `{task_key(cfg)}`: read a whole row of a {cfg['grid_rows']}×{cfg['grid_cols']} digit grid "
            "(\"Read row 4.\" → \"9 7 1\"), from `assets/default_model`, which was trained on 3×3 grids only: with "
            "12 cells digits repeat (the 3×3 grids never repeat one) and row 4 is new, so it starts low (it drops "
            "repeated digits: \"1 1 3\" → \"1 3\"). The answer is three digits; rollouts of a group diverge at "
            "the digit the model is unsure of, and every row after the divergence belongs to a smaller prefix class "
            "whose advantages do not cancel.",
            f"- Every run: {cfg['steps']} steps of {cfg['prompts_per_step']} prompts × {cfg['group_size']} rollouts, "
            f"{cfg['epochs']} epochs × {ups // cfg['epochs']} mini-batches of {cfg['minibatch_size']} = {ups} optimizer "
            f"updates per rollout batch, lr {cfg['lr']:g}, max {cfg['max_new_tokens']} new tokens, reward "
            + " + ".join(f"{w:g}·{REWARD_NAMES.get(k, k)}" for k, w in sorted(cfg["reward_weights"].items()))
            + "; vision tower frozen. Two sweeps that differ only in the sampling temperature: "
            + ", ".join(f"`{d}` {_t(r)}" for d, r in sweeps.items()) + ". Why these settings: see the pilot at the "
            f"end (on this task exact match alone left {_pilot_share(pilot_runs, 'ral_rows_zero_var', exact=True):.0%}"
            " of rows in zero-variance groups: the tiny model's samples of one prompt are mostly identical; a higher "
            "temperature keeps groups diverse as the model improves).",
            "- Arms: `grpo`; `ral_l<λ>`: GRPO + λ·RAL (the advantage-weighted attention JSD to the rollout policy); "
            "`opad`: GRPO + γ·OPAD with γ = 1 (mean over response tokens of the JSD between the student's and the "
            "teacher's attention rows, the teacher run teacher-forced on the student's own samples; no advantage); "
            "`distill`: GRPO + 1·token-level reverse KL(student ‖ teacher) over the vocabulary on the same samples "
            "— the control for 'is it the attention, or just the teacher?'.",
        ]
        if teacher:
            lines.append(_teacher_line(teacher, b, g_acc))
        lines += [
            f"- Held-out evaluation: {all_recs[0]['n_eval']} test-split `{task_key(cfg)}` items (handwriting never "
            f"seen in training), greedy; sampled reward = exact match of {all_recs[0]['n_sampled']} of them × 4 "
            "samples at temperature 1.",
            "- Seeds: " + "; ".join(f"`{d}`: " + ", ".join(f"`{a}` {len(runs[a])}" for a in ARMS if a in runs)
                                   for d, runs in sweeps.items())
            + ". Statistics: paired by seed against GRPO of the same sweep (same seed = same prompts and the same "
            "first rollout batch), two-sided paired t-test (exact t distribution), Holm correction over all "
            f"{len(cmp)} comparisons of this document (both `home` sweeps and the grounded sweep `ground`); "
            "'better/worse than GRPO' only where the Holm-adjusted p < 0.05. Each difference also gets its 95 % "
            "confidence interval, mean ± t(0.975, n − 1)·SE (per comparison, not adjusted for multiplicity), and the smallest true difference the comparison could "
            "detect with 80 % power, (t(1 − α/2, n − 1) + t(0.8, n − 1))·s_d/√n with s_d the observed SD of the "
            f"per-seed differences, at α 0.05 and at α 0.05/{len(cmp)} (the level Holm asks of the smallest p; "
            "Holm raises what a comparison can detect, more the more comparisons the document makes).",
            f"- ‖∇term‖/‖∇GRPO‖ per unit weight: every {GRAD_EVERY} steps, the norms of the terms' gradients on the "
            "step's rollout batch at θ_old + (θ_new − θ_old)/updates (about where the step's second update "
            "stands: p_θ ≠ p_old, and the ratio clip has not yet removed most of GRPO's gradient), each term at "
            "unit weight; per run Σ‖∇term‖ / Σ‖∇GRPO‖ over those steps. The term is RAL's (λ = 1) for `grpo` and "
            "the λ sweep, OPAD's (γ = 1) for `opad`, the token KL's for `distill`. **A correction**: one point a "
            "quarter into the step on the full batch misses what the later updates see; the RAL gradient measured at "
            "every update, at its own parameters and on its own mini-batch, is in 'The RAL gradient across the whole "
            "step' below.",
            "- Engine: " + ", ".join(f"{n} runs on commit `{c}`" for c, n in sorted(commits.items()))
            + "." + _engine_check_line(sweeps) + _rerun_check_line() + " **Scope of 'deterministic' and "
            "'reproduced'**: one machine. A rerun on another x86 CPU with the same engine and libraries differed at "
            "step 0 in the 5th significant digit and ended 0.003–0.010 apart in accuracy, so records reproduce only "
            "on the machine (CPU model and flags) and libraries that made them. "
            + _machine_line([*all_recs, *pilot_recs, *[r for rs in ground_runs.values() for r in rs.values()],
                             *[r for rs in grad_runs.values() for r in rs.values()]]), ""]
    lines += ["## Summary (generated from the records)", ""]
    for d, runs in sweeps.items():
        recs = [r for a in ["grpo", *RAL_ARMS] for r in runs.get(a, {}).values()]
        g = runs.get("grpo", {})
        acc = np.array([r["eval"]["accuracy"] for r in g.values()])
        acting = [_curve_mean(r, "ral_rows_acting") for r in recs]
        ratio = [_grad_ratio(r) for r in recs]
        lines.append(
            f"- `{d}` ({_t(runs)}): (a) GRPO moved held-out greedy accuracy from {b['accuracy']:.3f} to "
            f"{acc.mean():.3f} ({acc.mean() - b['accuracy']:+.3f}; smallest gain over seeds "
            f"{acc.min() - b['accuracy']:+.3f}); sampled reward {b['sampled_reward']:.3f} → "
            f"{np.mean([r['eval']['sampled_reward'] for r in g.values()]):.3f}. (b) The RAL term acts on "
            f"{np.mean(acting):.3f} of the response rows (GRPO and RAL runs, mean over all steps; {min(acting):.3f}–"
            f"{max(acting):.3f} over runs; {sum(a >= 0.5 for a in acting)} of {len(acting)} runs ≥ 0.5; counted over "
            "the whole rollout batch" + (G.mb_acting_line(RECORDS) if d == "home" else "") + "). "
            f"‖∇RAL‖/‖∇GRPO‖ per unit λ {np.mean(ratio):.4f} ({min(ratio):.4f}–{max(ratio):.4f}) measured at one "
            f"point a quarter into the step: by that measure the term's push at λ = 100 would be about "
            f"{100 * np.mean(ratio):.0%} of GRPO's" + (G.l100_line(RECORDS) if d == "home" else "") + ".")
    sig = [c for c in cmp if c["p_holm"] < 0.05 and not np.all(c["d"] == 0)]
    lines.append("- **What wins, where, by how much** (differences from GRPO with Holm-adjusted p < 0.05 over all "
                 f"{len(cmp)} comparisons): " + ("; ".join(
                     f"`{c['arm']}` in `{c['sweep']}`: {c['label']} {c['mean']:+.3f} "
                     f"({_direction(c)} than GRPO; p {fmt_p(c['p'])}, p_Holm "
                     f"{fmt_p(c['p_holm'])})" for c in sig) if sig else
                     "**nothing** — no arm (no λ of RAL" + "".join(f", not {ARM_DOC[a]}" for a in TEACHER_ARMS
                                                            if any(a in runs for runs in sweeps.values()))
                     + ("; none of the grounded sweep's arms (RAL, the attention reward, the attention target, "
                        "OPAD with the bundled teacher)" if ground_runs else "")
                     + ") beats or loses to GRPO on greedy accuracy, sampled reward or target mass"
                     + (" ('where' accuracy and the target share of image attention included)" if ground_runs
                        else "")) + ".")
    acc_c = [c for c in cmp if c["key"] == "accuracy" and c["arm"] in RAL_ARMS]
    if acc_c:
        best, worst = max(acc_c, key=lambda c: c["mean"]), min(acc_c, key=lambda c: c["mean"])
        lines.append(f"- RAL − GRPO, greedy accuracy: from {worst['mean']:+.3f} (`{worst['arm']}`, {worst['sweep']}) "
                     f"to {best['mean']:+.3f} (`{best['arm']}`, {best['sweep']}); "
                     f"{sum(c['p_holm'] < 0.05 for c in acc_c)} of {len(acc_c)} survive Holm (smallest raw p "
                     f"{fmt_p(min(c['p'] for c in acc_c))}). Seed-to-seed sd of GRPO itself: "
                     + ", ".join(f"{np.std([r['eval']['accuracy'] for r in runs['grpo'].values()], ddof=1):.3f} "
                                 f"({d})" for d, runs in sweeps.items() if "grpo" in runs) + ".")
    for arm in TEACHER_ARMS:
        ac = [c for c in cmp if c["arm"] == arm]
        if not ac:
            continue
        lines.append(f"- {ARM_DOC[arm]} − GRPO: " + "; ".join(
            f"`{d}` " + ", ".join(f"{c['label']} {c['mean']:+.3f} (p {fmt_p(c['p'])}, Holm {fmt_p(c['p_holm'])})"
                                  for c in ac if c["sweep"] == d) for d in sweeps if any(c["sweep"] == d for c in ac))
            + f". Its term's gradient is {np.mean([_grad_ratio(r, TERM_KEY[arm]) for runs in sweeps.values() for r in runs.get(arm, {}).values()]):.2f}"
            " × GRPO's per unit weight.")
    tm = [c for c in cmp if c["key"] == "target_mass" and c["p"] < 0.05]
    if tm:
        lines.append("- Target mass (the last layer's attention on the target region), arm − GRPO with raw p < 0.05: "
                     + ", ".join(f"`{c['arm']}` ({c['sweep']}) {c['mean']:+.4f} (p {fmt_p(c['p'])}, Holm "
                                 f"{fmt_p(c['p_holm'])})" for c in tm)
                     + f"; of these, {sum(c['p_holm'] < 0.05 for c in tm)} survive Holm.")
    acc_all = [c for c in cmp if c["key"] == "accuracy" and c["sweep"] in sweeps]
    mad = {a: np.mean([np.mean(np.abs(c["d"])) for c in acc_all if c["arm"] == a]) for a in ARMS
           if any(c["arm"] == a for c in acc_all)}
    ratio_all = np.mean([_grad_ratio(r) for r in all_recs]) if all_recs else float("nan")
    lines.append("- An arm's run shares only its first rollout batch with the GRPO run of the same seed: any extra "
                 "term changes the first update, hence every later rollout, so arm − GRPO differences also carry "
                 "trajectory noise. Mean |Δ greedy accuracy| per seed: " + ", ".join(
                     f"`{a}` {v:.3f}" for a, v in mad.items()) + f" — at λ = 0.5 the RAL term's push is "
                 f"≈ {0.5 * ratio_all:.2%} of GRPO's.")
    lines += G.summary_lines(RECORDS, cmp, detectable, ci95)
    lines.append("")
    for d, runs in sweeps.items():
        lines += [f"## Sweep `{d}`: every arm against GRPO, {_t(runs)}", "",
                  "| arm | seeds | " + " | ".join(l for _, l, _ in METRICS) + " | acting rows (whole batch) | effective weight | "
                  "‖∇term‖/‖∇GRPO‖ per unit weight |", "|---|---|" + "---|" * (len(METRICS) + 3)]
        lines.append("| base (no RL) | | " + " | ".join(f"{b.get(k, float('nan')):.3f}" for k, _, _ in METRICS)
                     + " | | | |")
        if teacher:
            lines.append("| teacher (no RL) | | " + " | ".join(f"{teacher['eval'].get(k, float('nan')):.3f}"
                                                              for k, _, _ in METRICS) + " | | | |")
        for arm in ARMS:
            if arm not in runs:
                continue
            rs = [runs[arm][s] for s in sorted(runs[arm])]
            lines.append(f"| {arm} | {len(rs)} | " + " | ".join(_ms([r['eval'][k] for r in rs]) for k, _, _ in METRICS)
                         + f" | {_ms([_curve_mean(r, 'ral_rows_acting') for r in rs])} | "
                         f"{_ms([_curve_mean(r, 'ral_effective_weight') for r in rs])} | {_arm_ratio(arm, rs)} |")
        lines += ["", *paired_table([c for c in cmp if c["sweep"] == d], len(cmp))]
        steps = [e["step"] for e in next(iter(runs[next(iter(runs))].values()))["evals"]]
        lines += ["", "Greedy accuracy during training (mean over seeds, held-out items; step 0 = the starting "
                  "checkpoint):", "", "| arm | step 0 | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for arm in ARMS:
            if arm in runs:
                ev = np.array([[e["accuracy"] for e in runs[arm][s]["evals"]] for s in sorted(runs[arm])])
                lines.append(f"| {arm} | {b.get('accuracy', float('nan')):.3f} | "
                             + " | ".join(f"{x:.3f}" for x in ev.mean(0)) + " |")
        lines.append("")
    if sweeps:
        lines += ["## Δ against the acting share", "",
                  "![Δ greedy accuracy vs acting share](evidence_home_delta_vs_acting.png)", "",
                  "Left: per seed, RAL − GRPO greedy accuracy against the share of response rows where the RAL term "
                  "acted in that run, one colour per λ, one marker per sweep; hollow circles: RAL (λ = 1) on the "
                  "earlier `read3` and `cell3` tasks of [results_short.md](results_short.md), at the acting share "
                  "measured on their starting checkpoint (README). Right: every arm's per-seed difference from GRPO "
                  "(dots) and its mean (bar), both sweeps; OPAD and distill use the teacher, the RAL arms do not.", ""]
        lines += G.section_lines(RECORDS, cmp, len(cmp), paired_table)
        lines += G.grad_lines(RECORDS, sweeps.get("home", {}))
        g_base, _ = load_records(G.SWEEP)
        lines += compute_lines(sweeps, pilot_recs, bases + ([g_base] if g_base else []),
                               teacher if has_teacher else None,
                               [(f"`ground` ({len(ground_runs)} arms; CPU: training only)", [r for rs in ground_runs.values() for r in rs.values()]),
                                ("`ground_grad` replay (CPU: training only)", [r for rs in grad_runs.values() for r in rs.values()])])
    lines += pilot_lines()
    return "\n".join(lines) + "\n"


def _engine_check_line(sweeps: dict) -> str:
    """A record of one GRPO run repeated on a later engine commit (bench/records/home_engine_check/): whether the
    engine changes between the records' commits changed the numbers."""
    out = []
    for f in sorted((RECORDS / "home_engine_check").glob("*.json")):
        r = json.loads(f.read_text())
        o = sweeps.get(r["doc"], {}).get(r["arm"], {}).get(r["seed"])
        if o is None or o.get("engine_commit") == r.get("engine_commit"):
            continue
        same = all(abs(r["eval"][k] - o["eval"][k]) < 1e-4 for k, _, _ in METRICS)
        out.append(f" `{r['arm']}` seed {r['seed']} of `{r['doc']}` rerun on commit `{r['engine_commit']}` "
                   + ("reproduces" if same else "does **not** reproduce") + f" its record from `{o['engine_commit']}` "
                   + "(" + ", ".join(f"{l} {r['eval'][k]:.4f} vs {o['eval'][k]:.4f}" for k, l, _ in METRICS) + ").")
    return "".join(out)


def plot(out_dir: Path):
    """Left: Δ greedy accuracy vs GRPO (per seed) against the run's acting-row share, one colour per λ, one marker
    per sweep. Right: every arm's per-seed Δ (RAL λ sweep, OPAD, distill) per sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, gridspec_kw={"width_ratios": [1.1, 1]})
    colours = plt.get_cmap("tab10").colors
    any_pts = False
    others = [a for a in ARMS if a != "grpo"]
    for j, (mk, doc) in enumerate(zip(("o", "^", "s"), SWEEPS)):
        _, runs = load_records(doc)
        if "grpo" not in runs:
            continue
        for i, arm in enumerate(others):
            if arm not in runs:
                continue
            seeds = [s for s in sorted(runs[arm]) if s in runs["grpo"]]
            xs = [_curve_mean(runs[arm][s], "ral_rows_acting") for s in seeds]
            ys = [runs[arm][s]["eval"]["accuracy"] - runs["grpo"][s]["eval"]["accuracy"] for s in seeds]
            if arm in RAL_ARMS:
                ax.scatter(xs, ys, marker=mk, s=22, color=colours[i], label=f"{arm} ({_t(runs)})")
                any_pts = True
            x0 = i + (j - 0.5) * 0.36
            bx.scatter([x0] * len(ys), ys, marker=mk, s=18, color=colours[i], alpha=0.8,
                       label=_t(runs) if i == 0 else None)
            bx.hlines(np.mean(ys), x0 - 0.15, x0 + 0.15, color="k", lw=1.5)
    if not any_pts:
        plt.close(fig)
        return
    for t, (x, y) in EARLIER_TASKS.items():
        ax.scatter([x], [y], marker="o", facecolors="none", edgecolors="k", s=40)
        ax.annotate(f"{t} (λ 1, 12 steps)", (x, y), fontsize=6.5, xytext=(4, -10), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("share of response rows where the RAL term acts (run mean over steps)")
    ax.set_ylabel("Δ greedy accuracy vs GRPO (same seed)")
    ax.set_title(f"{task_key(TASK)}: RAL − GRPO per seed", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    bx.axhline(0, color="grey", lw=0.8)
    bx.set_xticks(range(len(others)), others, fontsize=7)
    bx.set_ylabel("Δ greedy accuracy vs GRPO (same seed)")
    bx.set_title("every arm − GRPO per seed (bar: mean); o T 1.5, ^ T 2", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "evidence_home_delta_vs_acting.png", metadata={"Software": None})
    plt.close(fig)


def main():
    global RECORDS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pilot", action="store_true")
    p.add_argument("--doc", default="home", choices=list(SWEEPS), help="which sweep (records folder) to run")
    p.add_argument("--variants", default=",".join(PILOT))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=None, help="default: 5 (sweep), 1 (pilot)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=N_EVAL)
    p.add_argument("--n-sampled", type=int, default=N_SAMPLED)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--collect", action="store_true", help="write the document from the records only")
    p.add_argument("--rerun", action="store_true", help="rerun runs (and re-evaluate the base checkpoint and the "
                   "teacher) whose records exist, overwriting them; by default a run with a record is skipped")
    p.add_argument("--build-teacher", action="store_true", help="only build the OPAD/distill teacher (if missing, "
                   "or with --rerun) and write its record")
    p.add_argument("--records", default=str(RECORDS), help="records folder (default: the committed bench/records/)")
    p.add_argument("--compare-with", metavar="REV", help="after a rerun: compare the records with those committed at "
                   "git revision REV (writes bench/records/home_rerun_check.json), then collect")
    p.add_argument("--cause-check", metavar="REV", help="rerun one record that differs from the one committed at "
                   "REV with share_prompt=false and compare (bench/records/home_rerun_cause.json)")
    p.add_argument("--out", default=str(DOC))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    args.seeds = args.seeds or (1 if args.pilot else 5)
    args.steps = args.steps or (PILOT_STEPS if args.pilot else STEPS)
    RECORDS = Path(args.records).resolve()
    if args.compare_with:
        compare_with(args.compare_with)
        args.collect = True
    if args.cause_check:
        cause_check(args.cause_check)
        args.collect = True
    if args.build_teacher:
        build_teacher(args.rerun)
        teacher_record(N_EVAL, N_SAMPLED, args.rerun)
        return
    if not args.collect:
        jobs = plan(args)
        base_record(jobs[0]["doc"], args.n_eval, args.n_sampled,
                    [j["overrides"] for j in jobs], args.rerun)
        if any(ARMS.get(j["arm"], {}).get("teacher") for j in jobs):
            teacher_record(N_EVAL, N_SAMPLED, args.rerun)
        with ProcessPoolExecutor(args.workers) as ex:
            for i, r in enumerate(ex.map(run_one, jobs)):
                print(f"[{i + 1}/{len(jobs)}] {r['arm']} seed {r['seed']}: acc {r['eval']['accuracy']:.3f} "
                      f"reward {r['eval']['sampled_reward']:.3f} acting {_curve_mean(r, 'ral_rows_acting'):.3f} "
                      f"ratio {_curve_mean(r, 'grad_ratio_unit'):.4f} ({r['wall_s']:.0f}s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summarise())
    if not args.no_plot:
        plot(out.parent)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
