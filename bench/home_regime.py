"""RAL in its home regime (issue 11): a task and run length where GRPO itself moves held-out greedy accuracy and
the RAL attention term acts on most response rows; then GRPO vs RAL over a λ sweep, paired by seed, with a Holm
correction over every comparison in the document (docs/results_home.md).

Task: `where` on the 3×3 digit grid ("Where is the 7?" → "row 2 column 3"), the default model's weakest kind
(held-out greedy accuracy ≈ 0.2). The answer is four words; the group shares the prefix "row", diverges on the row
number, and every row after the divergence belongs to a smaller prefix class whose advantages do not cancel.

    python bench/home_regime.py --pilot             # cheap pilot: does GRPO move greedy accuracy, does the term act?
    python bench/home_regime.py                     # the sweep: GRPO and RAL λ ∈ {0.5, 1, 5, 25}, 5 seeds each
    python bench/home_regime.py --collect           # rewrite docs/results_home.md from bench/records/home/ only

Every finished run writes one small JSON record (config, curves, evaluation; rounded, sorted keys) under
bench/records/; `--collect` needs nothing else (no model, no torch), so the document regenerates byte-identical on
a fresh clone (tests/test_bench_evidence.py checks that). The plot is regenerated too but not byte-checked
(matplotlib's PNG bytes depend on its version).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import holm, paired_t  # noqa: E402  (the statistics live with the main evidence benchmark)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "bench" / "records"
DOC = ROOT / "docs" / "results_home.md"
TASK = {"task_kinds": ["row"], "grid_rows": 4, "grid_cols": 3, "max_new_tokens": 8}
COMMON = {"prompts_per_step": 8, "group_size": 8, "epochs": 2, "minibatch_size": 32, "temperature": 1.0,
          "lr": 3e-4, "log_attention": True, "save_every": 0, "snapshot_every": 0, "threads": 1,
          "attn_metrics_every": 0}
ARMS = {"grpo": {}, "ral_l0.5": {"lambda_attn": 0.5}, "ral_l1": {"lambda_attn": 1.0}, "ral_l5": {"lambda_attn": 5.0},
        "ral_l25": {"lambda_attn": 25.0}}
# pilot variants (GRPO, one seed): learning rate and sampling temperature
PILOT = {"where_lr1e-4_T1": {"task_kinds": ["where"], "grid_rows": 3, "grid_cols": 3, "max_new_tokens": 10,
                             "lr": 1e-4},
         "where_lr3e-4_T1": {"task_kinds": ["where"], "grid_rows": 3, "grid_cols": 3, "max_new_tokens": 10,
                             "lr": 3e-4},
         "row_lr3e-5_T1": {"task_kinds": ["row"], "grid_rows": 3, "grid_cols": 3, "lr": 3e-5},
         "row_lr3e-5_T1.3": {"task_kinds": ["row"], "grid_rows": 3, "grid_cols": 3, "lr": 3e-5, "temperature": 1.3},
         "row43_lr5e-5_T1": {"lr": 5e-5}, "row43_lr1.5e-4_T1": {"lr": 1.5e-4}}
STEPS, PILOT_STEPS = 60, 60
N_EVAL, N_SAMPLED, EVAL_EVERY, GRAD_EVERY = 300, 100, 15, 5
CURVE_KEYS = ("reward", "attn_target_mass", "ral_rows_zero_var", "ral_rows_cancelled", "ral_rows_acting",
              "ral_effective_weight", "grad_norm", "grad_grpo", "grad_ral_unit", "grad_ratio_unit")


def _r(x, sig: int = 5):
    """Round for a record: floats to `sig` significant digits (records stay small and diff-friendly)."""
    if isinstance(x, float):
        return float(f"{x:.{sig}g}") if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _r(v, sig) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_r(v, sig) for v in x]
    return x


def dump_record(path: Path, rec: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_r(rec), sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def grad_ratio(tr) -> dict:
    """‖∇L_GRPO‖ and ‖∇L_RAL‖ (unit λ) on the step's rollout batch, at the policy after the step's updates (where
    p_θ ≠ p_old, as on every update after the first): the size of the attention term's push per unit λ. Measured
    with the term's own gradient whatever λ the run uses (for GRPO runs: what λ = 1 would have added)."""
    import torch

    from ral_core.losses import LOSSES, LossContext
    from ral_core.rollout import forward_policies
    ro, cfg = tr.last_rollouts, tr.cfg
    params = [p for p in tr.model.parameters() if p.requires_grad]
    with torch.enable_grad():
        r = forward_policies(tr.model, ro, tr.spec, None)
        ctx = LossContext(mask=ro.mask, logp=r["logp"], old_logp=ro.old_logp, advantages=ro.advantages,
                          attn=r["attn"], attn_old=ro.old_attn, norm=cfg.loss_norm, max_len=cfg.max_new_tokens,
                          clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        lg, _ = LOSSES["grpo"](ctx)
        la, _ = LOSSES["ral_attn"](ctx)
        gg = torch.autograd.grad(lg, params, retain_graph=True, allow_unused=True)
        ga = torch.autograd.grad(la, params, allow_unused=True)

    def norm(gs):
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))
    n_g, n_a = norm(gg), norm(ga)
    tr.model.zero_grad(set_to_none=True)
    return {"grad_grpo": n_g, "grad_ral_unit": n_a, "grad_ratio_unit": n_a / n_g if n_g > 0 else float("nan")}


def _eval_task(kinds=None, rows=None, cols=None, split_seed: int = 1234):
    from ral_core.data import GroundingTask
    return GroundingTask(rows or TASK["grid_rows"], cols or TASK["grid_cols"], kinds=tuple(kinds or TASK["task_kinds"]),
                         split="test", seed=split_seed)


def evaluate_adapter(adapter, n_eval: int, n_sampled: int, kinds=None, max_new_tokens=None, rows=None,
                     cols=None) -> dict:
    from evidence import sampled_reward

    from ral_core.evaluate import evaluate
    adapter.model.eval()
    task = _eval_task(kinds, rows, cols)
    ev = evaluate(adapter, task, n_eval)
    out = {k: ev[k] for k in ("accuracy", "target_mass", "target_mass_first", "pointing_hit", "entropy")}
    out["sampled_reward"] = sampled_reward(adapter, task, n_sampled, max_new_tokens or TASK["max_new_tokens"])
    return out


def engine_commit() -> str:
    """The commit of the engine that ran (RAL_ENGINE_COMMIT when the runs use a snapshot of ral_core)."""
    if os.environ.get("RAL_ENGINE_COMMIT"):
        return os.environ["RAL_ENGINE_COMMIT"][:12]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.environ.get(
            "RAL_ENGINE_DIR", ROOT)).stdout.strip()[:12]
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    from ral_core.config import build_config
    from ral_core.evaluate import accuracy
    from ral_core.trainer import Trainer

    out = Path(job["record"])
    if out.exists():
        return json.loads(out.read_text())
    overrides = {**COMMON, **{k: TASK[k] for k in TASK}, **job["overrides"], "steps": job["steps"],
                 "seed": job["seed"], "output_dir": f"/tmp/ral_home/{job['doc']}/{job['arm']}_s{job['seed']}"}
    import shutil
    shutil.rmtree(overrides["output_dir"], ignore_errors=True)
    evals = []

    def callback(tr, m):
        if tr.step % GRAD_EVERY == 0 or tr.step == 1:
            m.update(grad_ratio(tr))
        if tr.step % EVAL_EVERY == 0 and tr.step < job["steps"]:
            a = tr.adapter_for_inference()
            a.model.eval()
            evals.append({"step": tr.step, "accuracy": accuracy(a, _eval_task(*_grid(overrides)),
                                                                job["n_eval"])["accuracy"]})
            tr.model.train()

    t0, c0 = time.time(), time.process_time()
    tr = Trainer(build_config(None, overrides), callbacks=[callback])
    tr.train()
    ev = evaluate_adapter(tr.adapter_for_inference(), job["n_eval"], job["n_sampled"], overrides["task_kinds"],
                          overrides["max_new_tokens"], overrides["grid_rows"], overrides["grid_cols"])
    evals.append({"step": job["steps"], "accuracy": ev["accuracy"]})
    rec = {"doc": job["doc"], "arm": job["arm"], "seed": job["seed"], "engine_commit": engine_commit(),
           "config": {k: overrides[k] for k in sorted(overrides) if k not in ("output_dir", "threads")},
           "eval": ev, "evals": evals, "n_eval": job["n_eval"], "n_sampled": job["n_sampled"],
           "curve": [{"step": m["step"], **{k: m[k] for k in CURVE_KEYS if k in m}} for m in tr.history],
           "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    dump_record(out, rec)
    shutil.rmtree(overrides["output_dir"], ignore_errors=True)
    return rec


def base_record(doc: str, n_eval: int, n_sampled: int, kind_sets=None) -> dict:
    """The starting checkpoint on each task (question-kind set) the runs use: `eval` for TASK, `by_task` for all."""
    out = RECORDS / doc / "base.json"
    rec = json.loads(out.read_text()) if out.exists() else {}
    want = {task_key({**TASK, **k}) for k in (kind_sets or [{}])}
    have = set(rec.get("by_task", {}))
    if want <= have:
        return rec
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
           "engine_commit": engine_commit(), "wall_s": rec.get("wall_s", 0) + time.time() - t0}
    dump_record(out, rec)
    return rec


def plan(args) -> list[dict]:
    doc = "home_pilot" if args.pilot else "home"
    variants = {k: PILOT[k] for k in args.variants.split(",")} if args.pilot else {
        a: ARMS[a] for a in args.arms.split(",")}
    jobs = []
    for s in range(args.seeds):  # seed-major: a cut-short sweep still has every arm at its first seeds
        for name, ov in variants.items():
            jobs.append({"doc": doc, "arm": name, "seed": s, "overrides": ov, "steps": args.steps,
                         "n_eval": args.n_eval, "n_sampled": args.n_sampled,
                         "record": str(RECORDS / doc / f"{name}_s{s}.json")})
    return jobs


# ---- the document (records only) ---------------------------------------------------------------------------
def load_records(doc: str) -> tuple[dict, dict]:
    runs, base = {}, None
    for f in sorted((RECORDS / doc).glob("*.json")):
        r = json.loads(f.read_text())
        if r["arm"] == "base":
            base = r
        else:
            runs.setdefault(r["arm"], {})[r["seed"]] = r
    return base, runs


def _curve_mean(r: dict, key: str) -> float:
    v = [c[key] for c in r["curve"] if c.get(key) is not None]
    return float(np.mean(v)) if v else float("nan")


def _ms(v) -> str:
    v = np.asarray(v, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"


METRICS = [("accuracy", "greedy acc", "eval"), ("sampled_reward", "sampled reward", "eval"),
           ("target_mass", "target mass", "eval")]


def comparisons(runs: dict) -> list[dict]:
    """Every paired comparison the document reports: each RAL arm − GRPO, per seed, on each metric."""
    out = []
    g = runs.get("grpo", {})
    for arm in ARMS:
        if arm == "grpo" or arm not in runs:
            continue
        for key, label, _ in METRICS:
            seeds = [s for s in sorted(runs[arm]) if s in g]
            d = np.array([runs[arm][s]["eval"][key] - g[s]["eval"][key] for s in seeds])
            out.append({"arm": arm, "key": key, "label": label, "d": d, **paired_t(d)})
    adj = holm([c["p"] for c in out])
    for c, a in zip(out, adj):
        c["p_holm"] = a
    return out


def _verdict(c: dict, alpha: float = 0.05) -> str:
    if len(c["d"]) and np.all(c["d"] == 0):
        return "identical to GRPO on every seed"
    if c["p_holm"] < alpha:
        return "better than GRPO" if c["mean"] > 0 else "worse than GRPO"
    return "not distinguishable from GRPO"


def _fmt_p(p: float) -> str:
    return "1" if p >= 0.9995 else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def pilot_lines() -> list[str]:
    base, runs = load_records("home_pilot")
    if not runs:
        return []
    out = ["## Pilot: does GRPO move greedy accuracy, and does the term act?", "",
           f"GRPO, one seed per variant, {next(iter(next(iter(runs.values())).values()))['config']['steps']} steps; "
           "greedy accuracy on the held-out `where` items during training; acting share = mean over all steps of "
           "the share of response rows where the RAL term acts (net advantage of the row's prefix class ≠ 0).", "",
           "| variant | greedy acc by step | Δ greedy acc vs start | sampled reward | acting rows | zero-variance rows "
           "| cancelled rows | ‖∇RAL‖/‖∇GRPO‖ per unit λ |", "|---|---|---|---|---|---|---|---|"]
    b = base["eval"] if base else {}
    for name in PILOT:
        for s, r in sorted(runs.get(name, {}).items()):
            curve = ", ".join(f"{e['step']}: {e['accuracy']:.3f}" for e in r["evals"])
            out.append(f"| {name} | 0: {b.get('accuracy', float('nan')):.3f}, {curve} | "
                       f"{r['eval']['accuracy'] - b.get('accuracy', float('nan')):+.3f} | "
                       f"{r['eval']['sampled_reward']:.3f} | {_curve_mean(r, 'ral_rows_acting'):.3f} | "
                       f"{_curve_mean(r, 'ral_rows_zero_var'):.3f} | {_curve_mean(r, 'ral_rows_cancelled'):.3f} | "
                       f"{_curve_mean(r, 'grad_ratio_unit'):.4f} |")
    return out + [""]


def summarise(doc: str = "home") -> str:
    base, runs = load_records(doc)
    all_recs = [r for rs in runs.values() for r in rs.values()]
    pilot_base, pilot_runs = load_records("home_pilot")
    pilot_recs = [r for rs in pilot_runs.values() for r in rs.values()]
    cfg = all_recs[0]["config"] if all_recs else {}
    cmp = comparisons(runs)
    b = base["eval"] if base else {}
    lines = ["# RAL in its home regime: answers that diverge inside a group", "",
             "Command: `python bench/home_regime.py --pilot` then `python bench/home_regime.py` (each run writes "
             "`bench/records/<doc>/<arm>_s<seed>.json`); `python bench/home_regime.py --collect` rewrites this file "
             "from the committed records alone, byte-identical (tested). The plot is regenerated but not "
             "byte-checked.", ""]
    if all_recs:
        wall = sum(r["wall_s"] for r in all_recs) + sum(r["wall_s"] for r in pilot_recs)
        cpu = sum(r["cpu_s"] for r in all_recs) + sum(r["cpu_s"] for r in pilot_recs)
        lines += [
            f"- Task: `{'/'.join(cfg['task_kinds'])}` on the {cfg['grid_rows']}×{cfg['grid_cols']} digit grid "
            "(\"Where is the 7?\" → \"row 2 column 3\"), from `assets/default_model` (its weakest question kind). "
            "The group shares the first answer word, diverges on the row number, and the rows after the divergence "
            "belong to smaller prefix classes whose advantages do not cancel.",
            f"- Every run: {cfg['steps']} steps of {cfg['prompts_per_step']} prompts × {cfg['group_size']} rollouts "
            f"at temperature {cfg['temperature']:g}, {cfg['epochs']} epochs × "
            f"{-(-cfg['prompts_per_step'] * cfg['group_size'] // cfg['minibatch_size'])} mini-batches of "
            f"{cfg['minibatch_size']} = {cfg['epochs'] * -(-cfg['prompts_per_step'] * cfg['group_size'] // cfg['minibatch_size'])}"
            f" optimizer updates per rollout batch, lr {cfg['lr']:g}, max {cfg['max_new_tokens']} new tokens, "
            f"reward exact match; vision tower frozen.",
            f"- Held-out evaluation: {all_recs[0]['n_eval']} test-split `where` items (handwriting never seen in "
            f"training), greedy; sampled reward from {all_recs[0]['n_sampled']} of them × 4 samples at temperature 1.",
            f"- Seeds: " + ", ".join(f"`{a}` {len(runs[a])}" for a in ARMS if a in runs) + ". Statistics: paired by "
            "seed against GRPO (same seed = same prompts and the same first rollout batch), two-sided paired t-test, "
            f"Holm correction over all {len(cmp)} comparisons of this document; 'better/worse than GRPO' only where "
            "the Holm-adjusted p < 0.05.",
            f"- Compute: {len(all_recs)} sweep runs + {len(pilot_recs)} pilot runs, {cpu / 60:.1f} CPU-minutes "
            f"({wall / 60:.1f} min of worker wall time, one thread per run, 2 workers at a time, on a 2-core machine "
            "shared with other jobs, niced).", ""]
    lines += ["## Summary (generated from the records)", ""]
    g = runs.get("grpo", {})
    if g and base:
        acc = np.array([r["eval"]["accuracy"] for r in g.values()])
        lines.append(f"- (a) GRPO moved held-out greedy accuracy from {b['accuracy']:.3f} to {acc.mean():.3f} "
                     f"({acc.mean() - b['accuracy']:+.3f}, min over seeds {acc.min() - b['accuracy']:+.3f}); sampled "
                     f"reward {b['sampled_reward']:.3f} → "
                     f"{np.mean([r['eval']['sampled_reward'] for r in g.values()]):.3f}.")
    if all_recs:
        acting = [_curve_mean(r, "ral_rows_acting") for r in all_recs]
        lines.append(f"- (b) The RAL term acts on {np.mean(acting):.3f} of the response rows (mean over all steps "
                     f"of all runs; range over runs {min(acting):.3f}–{max(acting):.3f}).")
        ratio = [_curve_mean(r, "grad_ratio_unit") for r in all_recs]
        lines.append(f"- ‖∇RAL‖/‖∇GRPO‖ per unit λ, after each step's updates: {np.mean(ratio):.4f} on average "
                     f"(range over runs {min(ratio):.4f}–{max(ratio):.4f}).")
    sig = [c for c in cmp if c["p_holm"] < 0.05 and not np.all(c["d"] == 0)]
    lines.append("- Differences from GRPO that survive Holm (p_Holm < 0.05): " + (", ".join(
        f"`{c['arm']}` {c['label']} {c['mean']:+.3f} ({'better' if c['mean'] > 0 else 'worse'}, p_Holm "
        f"{_fmt_p(c['p_holm'])})" for c in sig) if sig else "**none**") + ".")
    acc_c = [c for c in cmp if c["key"] == "accuracy"]
    if acc_c:
        best = max(acc_c, key=lambda c: c["mean"])
        lines.append(f"- Largest greedy-accuracy difference: `{best['arm']}` {best['mean']:+.3f} ± {best['se']:.3f} "
                     f"(SE, n={best['n']}; raw p {_fmt_p(best['p'])}, Holm {_fmt_p(best['p_holm'])}).")
    lines.append("- OPAD is not in this document: it needs a teacher checkpoint (`bench/_work/teacher_l6`, ≈ 60 "
                 "CPU-minutes to build) that this machine did not have.")
    lines.append("")
    if runs:
        lines += ["## GRPO vs RAL (λ sweep)", "",
                  "| arm | seeds | " + " | ".join(l for _, l, _ in METRICS) + " | acting rows | effective weight | "
                  "‖∇RAL‖/‖∇GRPO‖ per unit λ |", "|---|---|" + "---|" * (len(METRICS) + 3)]
        lines.append("| base (no RL) | | " + " | ".join(f"{b.get(k, float('nan')):.3f}" for k, _, _ in METRICS)
                     + " | | | |")
        for arm in ARMS:
            if arm not in runs:
                continue
            rs = [runs[arm][s] for s in sorted(runs[arm])]
            lines.append(f"| {arm} | {len(rs)} | " + " | ".join(_ms([r['eval'][k] for r in rs]) for k, _, _ in METRICS)
                         + f" | {_ms([_curve_mean(r, 'ral_rows_acting') for r in rs])} | "
                         f"{_ms([_curve_mean(r, 'ral_effective_weight') for r in rs])} | "
                         f"{np.mean([_curve_mean(r, 'grad_ratio_unit') for r in rs]):.4f} |")
        lines += ["", "Paired differences against GRPO (mean ± SE over seeds; two-sided paired t-test; Holm over all "
                  f"{len(cmp)} rows):", "",
                  "| arm | metric | Δ vs GRPO | per seed | t | p | p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|"]
        for c in cmp:
            lines.append(f"| {c['arm']} | {c['label']} | {c['mean']:+.4f} ± {c['se']:.4f} | "
                         + ", ".join(f"{x:+.3f}" for x in c["d"]) + f" | {c['t']:.2f} | {_fmt_p(c['p'])} | "
                         f"{_fmt_p(c['p_holm'])} | {_verdict(c)} |")
        lines += ["", "![Δ greedy accuracy vs acting share](evidence_home_delta_vs_acting.png)", ""]
        lines += ["Greedy accuracy during training (mean over seeds, held-out items):", "",
                  "| arm | " + " | ".join(f"step {e['step']}" for e in next(iter(runs[next(iter(runs))].values()))["evals"])
                  + " |", "|---|" + "---|" * len(next(iter(runs[next(iter(runs))].values()))["evals"])]
        for arm in ARMS:
            if arm in runs:
                ev = np.array([[e["accuracy"] for e in runs[arm][s]["evals"]] for s in sorted(runs[arm])])
                lines.append(f"| {arm} | " + " | ".join(f"{x:.3f}" for x in ev.mean(0)) + " |")
        lines.append("")
    lines += pilot_lines()
    return "\n".join(lines) + "\n"


def plot(doc: str, out_dir: Path):
    """Δ greedy accuracy vs GRPO (per seed) against the run's acting-row share, one colour per λ."""
    base, runs = load_records(doc)
    if "grpo" not in runs:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for i, arm in enumerate(a for a in ARMS if a != "grpo" and a in runs):
        xs = [_curve_mean(runs[arm][s], "ral_rows_acting") for s in sorted(runs[arm]) if s in runs["grpo"]]
        ys = [runs[arm][s]["eval"]["accuracy"] - runs["grpo"][s]["eval"]["accuracy"] for s in sorted(runs[arm])
              if s in runs["grpo"]]
        ax.scatter(xs, ys, label=arm, s=22, color=plt.get_cmap("tab10").colors[i])
        ax.errorbar([np.mean(xs)], [np.mean(ys)], yerr=[np.std(ys, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else 0],
                    fmt="D", ms=7, color=plt.get_cmap("tab10").colors[i], mec="k")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("share of response rows where the RAL term acts (mean over steps)")
    ax.set_ylabel("Δ greedy accuracy vs GRPO (same seed)")
    ax.set_title("where (3×3): RAL − GRPO per seed; diamonds: mean ± SE", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "evidence_home_delta_vs_acting.png", metadata={"Software": None})
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pilot", action="store_true")
    p.add_argument("--variants", default=",".join(PILOT))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=None, help="default: 5 (sweep), 1 (pilot)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=N_EVAL)
    p.add_argument("--n-sampled", type=int, default=N_SAMPLED)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--collect", action="store_true", help="write the document from the records only")
    p.add_argument("--out", default=str(DOC))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    args.seeds = args.seeds or (1 if args.pilot else 5)
    args.steps = args.steps or (PILOT_STEPS if args.pilot else STEPS)
    if not args.collect:
        jobs = plan(args)
        base_record(jobs[0]["doc"], args.n_eval, args.n_sampled,
                    [j["overrides"] for j in jobs])
        with ProcessPoolExecutor(args.workers) as ex:
            for i, r in enumerate(ex.map(run_one, jobs)):
                print(f"[{i + 1}/{len(jobs)}] {r['arm']} seed {r['seed']}: acc {r['eval']['accuracy']:.3f} "
                      f"reward {r['eval']['sampled_reward']:.3f} acting {_curve_mean(r, 'ral_rows_acting'):.3f} "
                      f"ratio {_curve_mean(r, 'grad_ratio_unit'):.4f} ({r['wall_s']:.0f}s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summarise())
    if not args.no_plot:
        plot("home", out.parent)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
