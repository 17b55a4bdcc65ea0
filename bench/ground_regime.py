"""Grounded attention on the default model's own task: GRPO vs RAL vs the attention reward vs the attention target
vs OPAD with the bundled teacher, paired by seed (a section of docs/results.md; records bench/records/ground/), and
the gradient of the RAL term measured at every optimizer update of a step (records bench/records/ground_grad/).

Task and settings: the default recipe's (assets/recipes/grounded.yaml): 3×3 digit grids, question kinds cell, row and
where, the boxes the task gives, 20 steps of 16 prompts × 8 rollouts, 2 epochs × 2 mini-batches of 64, lr 5e-5,
T 1, exact-match reward. Arms (each GRPO plus one thing):
`grpo`; `ral` (λ 1, the paper's rows, as assets/recipes/ral.yaml); `reward` (SAYO's attention reward through the
advantages, weight 0.5); `target` (the attention-target term, settings pinned here: they equal grounded.yaml's when
this sweep was run, and the recipe may change later); `grounded` (the previous default recipe's RAL + one-head JSD target, full
fine-tuning, pinned likewise); `grounded_qk` (the default recipe: the same terms, only the last layer's q/k trained); `opad` (γ 1, teacher assets/teacher_model, its weights' hash in each record).

    python bench/ground_regime.py                    # the sweep (8 seeds; runs with a record are skipped)
    python bench/ground_regime.py --grad-across      # replay `home` grpo and ral_l100 with the per-update probe
    python bench/home_regime.py --collect            # the whole document, this section included

`UpdateProbe` (used by both) wraps the trainer's mini-batch loss: before chosen updates it measures, at the update's
own parameters and on the mini-batch it steps on, the norms of GRPO's gradient and of each attention term's at unit
weight and their cosine, and at every update the RAL term's silence shares on that mini-batch (what the update sees,
not the whole batch). It adds no randomness and leaves the gradients the update uses untouched.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import home_regime as H
from _common import dump_record, fmt_p, loadavg, machine_info, machine_line, sampled_reward, start

ROOT = H.ROOT
RECORDS = ROOT / "bench" / "records"
SWEEP, GRAD_DOC = "ground", "ground_grad"
TASK = {"task_kinds": ["cell", "row", "where"], "grid_rows": 3, "grid_cols": 3, "max_new_tokens": 12}
COMMON = {"prompts_per_step": 16, "group_size": 8, "epochs": 2, "minibatch_size": 64, "temperature": 1.0,
          "lr": 5e-5, "loss_norm": "token", "beta": 0.0, "reward_weights": {"exact_match": 1.0}, "steps": 20,
          "attn_layers": "last", "attn_support": "all", "attn_per_head": False, "log_attention": True,
          "save_every": 0, "snapshot_every": 0, "attn_metrics_every": 0, "threads": 1}
TEACHER = "assets/teacher_model"


def teacher_sha() -> str:
    """The bundled teacher's weights, by content: a record of an OPAD run names the teacher it ran with, because the
    folder name stays when scripts/build_teacher_model.py replaces the teacher."""
    import hashlib
    return hashlib.sha256((ROOT / TEACHER / "model.safetensors").read_bytes()).hexdigest()


def _kept(out: Path, arm: str, rerun) -> dict | None:
    """The record at `out` when it stands (exists, no rerun asked, its teacher still the bundled one), else None."""
    if not out.exists() or rerun:
        return None
    rec = json.loads(out.read_text())
    return None if _stale(rec, arm) else rec


def _stale(rec: dict, arm: str) -> bool:
    """A record whose teacher is not the bundled one today (or unnamed) no longer measures this arm."""
    uses = "teacher" in ARMS.get(arm, {}) or arm == "base"
    return uses and rec.get("teacher_sha256") != teacher_sha()
# the target term's settings, pinned (= assets/recipes/grounded.yaml when the sweep ran; its layers and heads were
# the engine's defaults then, the policy layer and the head mean, pinned too: the records' runs reproduce with them)
TARGET = {"lambda_ground": 0.3, "ground_div": "kl", "ground_on": "rewarded", "attn_row": "predicts",
          "ground_layers": "policy", "ground_heads": "mean"}
# the default recipe's target term as it is now (assets/recipes/grounded.yaml: RAL λ 1 plus the bounded JSD target on
# one head of the last layer), pinned here too, so the sweep measures the default a user gets beside the older target
GROUNDED = {"lambda_attn": 1.0, "lambda_ground": 0.4, "ground_div": "jsd", "ground_on": "rewarded",
            "attn_row": "predicts", "ground_layers": "policy", "ground_heads": 3}
# the default since then: the same terms, training only the last layer's query and key projections at lr 2e-4
GROUNDED_QK = {**GROUNDED, "train_layers": "last", "train_modules": "qk", "lr": 2e-4}
ARMS = {"grpo": {}, "ral": {"lambda_attn": 1.0, "attn_row": "own"},
        "reward": {"reward_weights": {"exact_match": 1.0, "attention_box": 0.5}, "attn_row": "predicts"},
        "target": TARGET, "grounded": GROUNDED, "grounded_qk": GROUNDED_QK,
        "opad": {"gamma_opad": 1.0, "teacher": TEACHER}}
SEEDS, N_EVAL, N_SAMPLED = 8, 400, 100
PROBE_EVERY = 5            # the gradient probe runs at step 1 and every 5th step, at each of the step's updates
# the bundled example every arm's seed-0 checkpoint is compared on against `default` (assets/examples/)
EXAMPLE = 0
# the `home` arms replayed with the probe (the λ = 100 arm: the largest term; GRPO: what λ = 1 would add)
GRAD_ARMS, GRAD_SEEDS = ("grpo", "ral_l100"), 5


def _norm(gs) -> float:
    import torch
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b) if x is not None and y is not None))


def param_group(name: str, last: int) -> str:
    """Where a parameter sits: the last decoder layer's query/key projections (the only weights of that layer the
    attention rows depend on), the rest of the last layer, the earlier decoder layers, everything else."""
    if f"layers.{last}." in name:
        return "last q/k" if ("q_proj" in name or "k_proj" in name or "q_norm" in name or "k_norm" in name) else \
            "last other"
    return "earlier layers" if ".layers." in name and "visual" not in name else "embeddings / head / other"


class UpdateProbe:
    """Measure each optimizer update where it happens (see the module docstring). `steps`: the (1-based) steps whose
    updates get the gradient probe; every update gets the mini-batch silence shares."""

    def __init__(self, tr, steps: set[int]):
        self.tr, self.steps, self.rows, self.silence = tr, steps, [], []
        self._orig, self._step, self._update = tr._loss, 0, 0
        tr._loss = self._loss
        names = [n for n, p in tr.model.named_parameters() if p.requires_grad]
        last = tr.adapter.num_layers - 1
        self.groups = [param_group(n, last) for n in names]

    def _loss(self, mb):
        step = self.tr.step + 1
        if step != self._step:
            self._step, self._update = step, 0
        self._update += 1
        if mb.row_class is not None:
            from ral_core.rollout import silence_stats
            s = silence_stats(mb.row_class, mb.advantages, mb.group)
            if s:
                self.silence.append({"step": step, "update": self._update, **s})
        if step in self.steps:
            self.rows.append({"step": step, "update": self._update, **self.measure(mb)})
        return self._orig(mb)

    def measure(self, mb) -> dict:
        """‖∇GRPO‖, ‖∇term‖ at unit weight for RAL and the run's own attention terms, cos(∇GRPO, ∇term), and where
        each gradient lands (share of its squared norm per parameter group)."""
        import torch

        from ral_core.losses import LOSSES, LossContext, term_weights
        from ral_core.policy import forward_policies
        tr, cfg = self.tr, self.tr.cfg
        params = [p for p in tr.model.parameters() if p.requires_grad]
        with torch.enable_grad(), tr.precision.autocast():
            r = forward_policies(tr.model, mb, tr.spec, tr.explore, need_logits=cfg.lambda_token_kl > 0)
            ctx = LossContext.of(mb, r, cfg)
            w = term_weights(cfg, mb)
            names = ["grpo", "ral_attn"] + [n for n, v in w.items() if v and n not in ("grpo", "ral_attn", "kl")]
            losses = {n: LOSSES[n](ctx)[0] for n in names}
        grads = {n: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
                 for n, v in losses.items() if v.requires_grad}
        g = grads["grpo"]
        out = {"grad_grpo": _norm(g)}
        for n, gt in grads.items():
            out[f"grad_{n}"] = _norm(gt)
            if n == "grpo":
                continue
            d = out["grad_grpo"] * out[f"grad_{n}"]
            out[f"cos_{n}"] = _dot(g, gt) / d if d > 0 else None
        # the weighted total as the update sees it (before the loss's window weight and the clip)
        tot = []
        for i in range(len(params)):
            parts = [w[n] * gt[i] for n, gt in grads.items() if w.get(n) and gt[i] is not None]
            if parts:
                tot.append(sum(parts))
        out["grad_total"] = _norm(tot)
        for n in ("grpo", "ral_attn"):
            if n in grads:
                sq = {}
                for grp, gi in zip(self.groups, grads[n]):
                    if gi is not None:
                        sq[grp] = sq.get(grp, 0.0) + float((gi.double() ** 2).sum())
                tot_sq = sum(sq.values())
                out[f"where_{n}"] = {k: v / tot_sq for k, v in sorted(sq.items())} if tot_sq > 0 else {}
        return out


def engine_now() -> str:
    """The engine the runs load: the last commit that changed ral_core/, plus '+dirty' when the shared working tree
    has uncommitted ral_core/ changes. Taken once, before the workers import ral_core; a record written later names
    this, not whatever was committed while it ran."""
    import subprocess
    c = H.engine_commit()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ral_core"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
    except OSError:
        dirty = ""
    return c + ("+dirty" if dirty else "")


def _task():
    from ral_core.data import GroundingTask
    return GroundingTask(TASK["grid_rows"], TASK["grid_cols"], kinds=tuple(TASK["task_kinds"]), split="test")


def evaluate_adapter(adapter) -> dict:
    """As `ral eval --n 400` (greedy, the same test items, per kind, attention metrics of the last layer) plus the
    exact-match reward of temperature-1 samples."""
    from ral_core.evaluate import evaluate
    adapter.model.eval()
    ev = evaluate(adapter, _task(), N_EVAL)
    out = {k: ev[k] for k in ("accuracy", "per_kind", "target_mass", "target_share", "target_mass_first",
                              "pointing_hit", "entropy")}
    out["sampled_reward"] = sampled_reward(adapter, _task(), N_SAMPLED, TASK["max_new_tokens"])
    return out


def example_compare(adapter_b, name: str, figure: Path | None = None) -> dict:
    """Compare `default` (A) with `adapter_b` (B) on the bundled example as the Compare tab does (last layer, rows
    that predict each answer token, the maps' own scale): its magnitude line and numbers; the figure if asked."""
    import copy

    from ral_core.compare import EXAMPLES_DIR, compare, comparison_figure, magnitude
    from ral_core.images import load_image
    from ral_core.models import load_adapter
    e = json.loads((EXAMPLES_DIR / "examples.json").read_text())[EXAMPLE]
    a = load_adapter("default")
    b = copy.copy(adapter_b)
    b.name = name
    b.model.eval()
    cmp = compare(a, b, load_image(EXAMPLES_DIR / e["image"]), e["question"], max_new_tokens=12)
    last = a.num_layers - 1
    m = magnitude(cmp, layer=last, boxes=e.get("boxes"), expected=e.get("answer"))
    if figure is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = comparison_figure(cmp, layer=last, boxes=e.get("boxes"), expected=e.get("answer"))
        fig.text(0.5, 0.005, m.line(), ha="center", va="bottom", fontsize=7, wrap=True)
        fig.savefig(figure, metadata={"Software": None})
        plt.close(fig)
    return {"example": e["image"], "question": e["question"], "head_jsd": m.head_jsd, "head": m.head,
            "layer": m.layer, "target_a": m.target_a, "target_b": m.target_b, "answer_a": m.answer_a,
            "answer_b": m.answer_b, "change_share": m.change_share, "visible": m.visible, "line": m.line()}


def _train(overrides: dict, probe_steps: set[int]):
    import torch
    torch.set_num_threads(1)
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    shutil.rmtree(overrides["output_dir"], ignore_errors=True)
    t0, c0 = time.time(), time.process_time()
    tr = Trainer(build_config(None, overrides))
    probe = UpdateProbe(tr, probe_steps)
    tr.train()
    return tr, probe, time.time() - t0, time.process_time() - c0


CURVE = ("reward", "accuracy", "attn_target_mass", "attn_target_share", "attn_sink_share", "ral_rows_zero_var",
         "ral_rows_cancelled", "ral_rows_acting", "ral_effective_weight", "grad_norm", "ground_no_box",
         "reward_attention_box", "loss_ral_attn", "loss_ground_kl", "loss_opad_attn")


def run_one(job: dict) -> dict:
    """Train one (arm, seed) of the sweep with the probe, evaluate on held-out handwriting, compare with `default`
    on the bundled example (seed 0 also draws the figure), write the record."""
    start(threads=False)
    out = Path(job["record"])
    if (kept := _kept(out, job["arm"], job.get("rerun"))) is not None:
        return kept
    load0 = loadavg()
    ov = {**COMMON, **TASK, **ARMS[job["arm"]], "seed": job["seed"],
          "output_dir": f"/tmp/ral_ground/{job['arm']}_s{job['seed']}"}
    steps = {1, *range(PROBE_EVERY, ov["steps"] + 1, PROBE_EVERY)}
    tr, probe, wall, cpu = _train(ov, steps)
    a = tr.adapter_for_inference()
    ev = evaluate_adapter(a)
    fig = ROOT / "docs" / f"evidence_ground_compare_{job['arm']}.png" if job["seed"] == 0 and job.get(
        "figure", True) else None
    ex = example_compare(a, f"{job['arm']} seed {job['seed']} ({ov['steps']} steps)", fig)
    head = {"doc": SWEEP, "arm": job["arm"], "seed": job["seed"]}
    if "teacher" in ARMS[job["arm"]]:
        head["teacher_sha256"] = teacher_sha()
    return _save(out, head, job, ov, tr, probe, ev, wall, cpu, load0, n_eval=N_EVAL, n_sampled=N_SAMPLED, example=ex)


def _save(out: Path, head: dict, job: dict, ov: dict, tr, probe, ev: dict, wall: float, cpu: float, load0,
          **extra) -> dict:
    """Write one run's record (its settings, curve, per-update probe rows, cost and machine) and drop its run
    folder."""
    rec = {**head, "engine_commit": job.get("engine") or H.engine_commit(),
           "config": {k: ov[k] for k in sorted(ov) if k not in ("output_dir", "threads")}, "eval": ev, **extra,
           "curve": [{"step": m["step"], **{k: m[k] for k in CURVE if k in m}} for m in tr.history],
           "updates": probe.rows, "silence_mb": probe.silence,
           "wall_s": wall, "cpu_s": cpu, "machine": machine_line(), "machine_info": machine_info(), "loadavg_start": load0}
    dump_record(out, rec)
    shutil.rmtree(ov["output_dir"], ignore_errors=True)
    return rec


def grad_one(job: dict) -> dict:
    """Replay one `home` run (bench/home_regime.py's settings) on this engine with the per-update probe at step 1
    and every 5th step; the record keeps its final evaluation beside the original record's."""
    start(threads=False)
    out = Path(job["record"])
    if out.exists() and not job.get("rerun"):
        return json.loads(out.read_text())
    load0 = loadavg()
    arm, seed = job["arm"], job["seed"]
    ov = {**H.COMMON, **H.TASK, **H.SWEEPS["home"], **H.ARMS[arm], "steps": H.STEPS, "seed": seed,
          "output_dir": f"/tmp/ral_ground/home_{arm}_s{seed}"}
    tr, probe, wall, cpu = _train(ov, {1, *range(PROBE_EVERY, H.STEPS + 1, PROBE_EVERY)})
    ev = H.evaluate_adapter(tr.adapter_for_inference(), H.N_EVAL, H.N_SAMPLED)
    return _save(out, {"doc": GRAD_DOC, "arm": arm, "seed": seed, "replays": f"home/{arm}_s{seed}.json"}, job, ov,
                 tr, probe, ev, wall, cpu, load0)


def base_record(rerun: bool = False) -> dict:
    out = RECORDS / SWEEP / "base.json"
    if (kept := _kept(out, "base", rerun)) is not None:
        return kept
    start(threads=False)
    import torch
    torch.set_num_threads(1)
    from ral_core.models import load_adapter
    t0 = time.time()
    ev = {m: evaluate_adapter(load_adapter(p)) for m, p in (("default", "default"), ("teacher", TEACHER))}
    rec = {"doc": SWEEP, "arm": "base", "eval": ev["default"], "teacher_eval": ev["teacher"], "teacher_sha256": teacher_sha(),
           "n_eval": N_EVAL, "n_sampled": N_SAMPLED, "engine_commit": H.engine_commit(), "wall_s": time.time() - t0,
           "machine": machine_line(), "machine_info": machine_info()}
    dump_record(out, rec)
    return rec


def plan(args) -> list[dict]:
    if args.grad_across:
        return [{"arm": a, "seed": s, "rerun": args.rerun, "record": str(RECORDS / GRAD_DOC / f"home_{a}_s{s}.json")}
                for s in range(args.seeds or GRAD_SEEDS) for a in GRAD_ARMS]
    return [{"arm": a, "seed": s, "rerun": args.rerun, "record": str(RECORDS / SWEEP / f"{a}_s{s}.json")}
            for s in range(args.seeds or SEEDS) for a in args.arms.split(",")]  # seed-major


# ---- the document's sections (records only) ----------------------------------------------------------------------
METRICS = [("accuracy", "greedy acc"), ("where", "'where' acc"), ("sampled_reward", "sampled reward"),
           ("target_mass", "target mass"), ("target_share", "target share of image attention")]
ARM_TEXT = {"grpo": "GRPO alone", "ral": "+ RAL, λ 1 (the paper's rows, `attn_row` own)",
            "reward": "+ SAYO attention reward `attention_box`, weight 0.5, through the advantages (`attn_row` "
                      "predicts)",
            "target": "+ attention-target term: λ_ground {lambda_ground:g}, `ground_div` {ground_div}, `ground_on` "
                      "{ground_on}, `attn_row` {attn_row}, the last layer's head mean (pinned in the bench: "
                      "`assets/recipes/grounded.yaml`'s target when the sweep ran; a later default recipe with other "
                      "target settings, e.g. one head or a JSD, is not what this arm measures)",
            "grounded": "+ RAL λ {lambda_attn:g} and the previous default recipe's target term (pinned in the bench): "
                        "λ_ground {lambda_ground:g}, `ground_div` {ground_div}, `ground_on` {ground_on}, head "
                        "{ground_heads} of the last layer; full fine-tuning of the language model at lr {lr:g}",
            "grounded_qk": "+ the default recipe (`assets/recipes/grounded.yaml`, pinned in the bench): `grounded`'s terms, "
                           "training only the last layer's query and key projections (`train_layers` "
                           "{train_layers}, `train_modules` {train_modules}) at lr {lr:g}",
            "opad": "+ OPAD, γ 1, teacher `{teacher}`"}
TERM = {"ral": "ral_attn", "target": "ground_kl", "grounded": "ground_jsd", "grounded_qk": "ground_jsd",
        "opad": "opad_attn"}
WEIGHT = {"ral": "lambda_attn", "target": "lambda_ground", "grounded": "lambda_ground", "grounded_qk": "lambda_ground",
          "opad": "gamma_opad"}


def _metric(r: dict, key: str) -> float:
    return r["eval"]["per_kind"]["where"] if key == "where" else r["eval"][key]




def comparisons(records: Path) -> list[dict]:
    """Each arm − GRPO per seed on each metric of the grounded sweep (Holm-adjusted by the document, with the rest)."""
    from _common import paired_t
    _, runs = H.load_records(SWEEP, records)
    g, out = runs.get("grpo", {}), []
    for arm in ARMS:
        if arm == "grpo" or arm not in runs:
            continue
        seeds = [s for s in sorted(runs[arm]) if s in g]
        for key, label in METRICS:
            d = np.array([_metric(runs[arm][s], key) - _metric(g[s], key) for s in seeds])
            out.append({"sweep": SWEEP, "arm": arm, "key": key, "label": label, "d": d, **paired_t(d)})
    return out


def _mb_acting(r: dict) -> list[float]:
    return [x["ral_rows_acting"] for x in r.get("silence_mb", [])]


def _ratio(rows: list, term: str, update: int | None = None) -> float:
    """Σ‖∇term‖ / Σ‖∇GRPO‖ over the probed updates (at one update index, or all)."""
    pts = [(u[f"grad_{term}"], u["grad_grpo"]) for u in rows if u.get(f"grad_{term}") is not None
           and u.get("grad_grpo") and (update is None or u["update"] == update)]
    return sum(a for a, _ in pts) / sum(b for _, b in pts) if pts else float("nan")


def _mean(v) -> float:
    v = [x for x in v if x is not None and x == x]
    return float(np.mean(v)) if v else float("nan")


def _rng(v, f="{:.3f}") -> str:
    v = [x for x in v if x is not None and x == x]
    return f"{f.format(min(v))}–{f.format(max(v))}" if v else "n/a"


def _check_line(records: Path) -> str:
    """bench/records/ground_engine_check.json: records rerun on one clean engine, compared with the committed ones."""
    f = records / "ground_engine_check.json"
    if not f.exists():
        return ""
    c = json.loads(f.read_text())
    same = [r for r in c["runs"] if all(abs(r["rerun"][k] - r["record_eval"][k]) < 1e-4 for k in r["rerun"])]
    return (" Those fields were written when each run ended and name the last commit that had changed ral_core/ by "
            "then; the sweep's workers had loaded ral_core/ once, when the sweep started. Rerun afterwards on a clean "
            f"tree at `{c['runs'][0]['rerun_engine']}` (`bench/records/ground_engine_check.json`), "
            + ", ".join(f"`{r['record']}`" for r in c["runs"]) + (
                " reproduce" if len(same) == len(c["runs"]) else f": {len(same)} of {len(c['runs'])} reproduce")
            + " their records exactly (greedy accuracy, sampled reward, target mass and share, the example's largest "
            "head JSD), on the same machine.")


def teacher_text(base: dict) -> str:
    """How the teacher the records ran with was built (its training_info.json, when its weights are still the bundled
    ones) and its weights' hash."""
    sha = base.get("teacher_sha256", "")
    info_f = ROOT / TEACHER / "training_info.json"
    info = json.loads(info_f.read_text()) if info_f.exists() else {}
    if not sha or info.get("weights_sha256") != sha:
        return f"weights sha256 `{sha[:12] or 'not recorded'}`"
    a = info.get("args", {})
    how = (f"`{a['init']}` continued" if a.get("init") else "trained from scratch") + (
        f", {a.get('layers')} decoder layers" if a.get("layers") else "")
    return (f"{how}, {info['steps']} supervised steps on this task by `{info.get('command', '')}`; weights sha256 "
            f"`{sha[:12]}`")


def section_lines(records: Path, cmp: list, m: int, paired_table) -> list[str]:
    """The grounded sweep's section: settings, every arm, the paired table (CI, detectable difference), the
    per-update gradient of each arm's own term, and the Compare picture per arm."""
    base, runs = H.load_records(SWEEP, records)
    if not runs or base is None:
        return []
    g = runs.get("grpo", {})
    cfg = next(iter(next(iter(runs.values())).values()))["config"]
    ups = cfg["epochs"] * -(-cfg["prompts_per_step"] * cfg["group_size"] // cfg["minibatch_size"])
    b, t = base["eval"], base["teacher_eval"]
    arm_cfg = {a: next(iter(rs.values()))["config"] for a, rs in runs.items()}
    mixed = sorted({f"{a}_s{sd}" for a, rs in runs.items() if "teacher" in ARMS.get(a, {}) for sd, r in rs.items()
                    if r.get("teacher_sha256") != base.get("teacher_sha256")})
    if mixed:  # the teacher's folder name is reused when it is rebuilt: never put two teachers' runs in one row
        raise SystemExit(f"records {mixed} ran with another teacher than the base record's; rerun them "
                         "(python bench/ground_regime.py --arms opad)")
    out = ["## Sweep `ground`: grounded attention on the default model's own task", "",
           f"`python bench/ground_regime.py` (records in `bench/records/{SWEEP}/`). The default recipe's task and "
           f"settings (`assets/recipes/grounded.yaml`): `{H.task_key(cfg)}`, the boxes the task gives for each question "
           f"(the cell, the row's cells, the place asked for), {cfg['steps']} steps of {cfg['prompts_per_step']} "
           f"prompts × {cfg['group_size']} rollouts, {cfg['epochs']} epochs × {ups // cfg['epochs']} mini-batches of "
           f"{cfg['minibatch_size']} = {ups} optimizer updates per rollout batch, lr {cfg['lr']:g}, T "
           f"{cfg['temperature']:g}, max {cfg['max_new_tokens']} new tokens, reward exact match; vision tower frozen; "
           "no snapshots. Each arm is GRPO plus one thing:", ""]
    for a in ARMS:
        if a in runs:
            out.append(f"- `{a}` ({len(runs[a])} seeds): " + ARM_TEXT[a].format(**{**arm_cfg[a], "teacher":
                                                                                     arm_cfg[a].get("teacher", "")}))
    out += ["", f"Held-out evaluation as `ral eval --n {base['n_eval']}` computes it (test split, greedy; 'where' "
            "accuracy on its 'where' items); target mass = the last "
            "layer's attention (head mean) of the rows that predict each answer token on the target boxes, as a share "
            "of the whole row (it includes the text), and target share = the same as a share of the row's image "
            "attention (what the target term pulls on); sampled "
            f"reward = exact match of {base['n_sampled']} items × 4 samples at T 1. The starting checkpoint "
            f"`default`: accuracy {b['accuracy']:.3f}, 'where' {b['per_kind']['where']:.3f}, sampled reward "
            f"{b['sampled_reward']:.3f}, target mass {b['target_mass']:.4f}. The bundled OPAD teacher "
            f"(`{TEACHER}`, {teacher_text(base)}) on the same items: accuracy "
            f"{t['accuracy']:.3f}, 'where' {t['per_kind']['where']:.3f}, target mass {t['target_mass']:.4f} — "
            + ("**it knows barely more than the student**, so OPAD here distils the attention of a near-equal "
               "model." if t["accuracy"] - b["accuracy"] < 0.05 else "it knows the task better than the student"
               + ("." if t["target_mass"] >= b["target_mass"] else
                  f", yet its last layer puts less of its attention on the target box than the student's "
                  f"({t['target_mass']:.4f} vs {b['target_mass']:.4f}): what it knows is not where its last layer "
                  "looks, and OPAD pulls the student's last layer (read at the same relative depth) toward that map.")),
            "", "| arm | seeds | greedy acc | 'where' acc | sampled reward | target mass | target share | acting rows (per update) "
            "| acting rows (whole batch) | example: largest head JSD | example: target mass A → B | training CPU s per run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| default (no RL) | | {b['accuracy']:.3f} | {b['per_kind']['where']:.3f} | {b['sampled_reward']:.3f} | "
            f"{b['target_mass']:.4f} | {b['target_share']:.4f} | | | | | |",
            f"| teacher (no RL) | | {t['accuracy']:.3f} | {t['per_kind']['where']:.3f} | {t['sampled_reward']:.3f} | "
            f"{t['target_mass']:.4f} | {t['target_share']:.4f} | | | | | |"]
    for a in ARMS:
        if a not in runs:
            continue
        rs = [runs[a][s] for s in sorted(runs[a])]
        ex = [r["example"] for r in rs]
        out.append(f"| {a} | {len(rs)} | " + " | ".join(H._ms([_metric(r, k) for r in rs]) for k in
                                                         ("accuracy", "where", "sampled_reward"))
                   + f" | {np.mean([_metric(r, 'target_mass') for r in rs]):.4f} ± "
                   f"{np.std([_metric(r, 'target_mass') for r in rs], ddof=1):.4f} | "
                   f"{np.mean([_metric(r, 'target_share') for r in rs]):.4f} ± "
                   f"{np.std([_metric(r, 'target_share') for r in rs], ddof=1):.4f} | "
                   f"{H._ms([_mean(_mb_acting(r)) for r in rs])} | {H._ms([H._curve_mean(r, 'ral_rows_acting') for r in rs])} | "
                   f"{_mean([e['head_jsd'] for e in ex]):.4f} ({_rng([e['head_jsd'] for e in ex], '{:.4f}')}) | "
                   f"{ex[0]['target_a']:.4f} → {_mean([e['target_b'] for e in ex]):.4f} "
                   f"({_rng([e['target_b'] for e in ex], '{:.4f}')}) | {_rng([r['cpu_s'] for r in rs], '{:.0f}')} |")
    out += ["", "Acting rows: the share of response rows where the RAL term can act (not in a zero-variance group, class "
            "advantages not cancelling), computed per mini-batch as each optimizer update sees it (a prefix class split "
            "across mini-batches does not cancel there) and averaged over every update; beside it the whole-batch share "
            "the trainer logs. Example: Compare of each seed's checkpoint against `default` on the bundled example "
            "(`assets/examples/`, see the pictures below), last layer, mean over seeds (range).", ""]
    out += paired_table([c for c in cmp if c["sweep"] == SWEEP], m)
    # each arm's own term against GRPO, per update index
    rows = [(a, r) for a in TERM if a in runs for r in runs[a].values()]
    if rows:
        out += ["", "Each arm's own term at every optimizer update of the probed steps (step 1 and every "
                f"{PROBE_EVERY}th), measured where the update happens (its parameters, its mini-batch): Σ‖∇term‖ / "
                "Σ‖∇GRPO‖ at unit weight over seeds and steps, and cos(∇term, ∇GRPO) (mean; range over updates). "
                "Times the arm's weight, the share of the push the term adds.", "",
                "| arm | term | weight | update 1 | update 2 | update 3 | update 4 | whole step | × weight | cos (mean; range) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for a in TERM:
            if a not in runs:
                continue
            term, w = TERM[a], arm_cfg[a][WEIGHT[a]]
            us = [u for r in runs[a].values() for u in r["updates"]]
            cos = [u.get(f"cos_{term}") for u in us]
            out.append(f"| {a} | `{term}` | {w:g} | " + " | ".join(f"{_ratio(us, term, k):.4f}" for k in range(1, ups + 1))
                       + f" | {_ratio(us, term):.4f} | {w * _ratio(us, term):.4f} | {_mean(cos):+.3f}; "
                       f"{_rng(cos, '{:+.3f}')} |")
    engines = {}
    for rs in runs.values():
        for r in rs.values():
            engines[r["engine_commit"]] = engines.get(r["engine_commit"], 0) + 1
    out += ["", "Engine: the records' `engine_commit` fields say " + ", ".join(
        f"{n} runs on commit `{c}`" for c, n in sorted(engines.items()))
            + "; every record names its machine (CPU model, flags, native bf16, library versions)." + _check_line(records)]
    loads = [float(r["machine_info"]["loadavg"].split()[0]) for rs in runs.values() for r in rs.values()
             if r.get("machine_info")]
    if loads:
        out += ["", f"Load: two runs at a time, one thread each, niced; the 1-minute load average when each run ended "
                f"was {min(loads):.1f}–{max(loads):.1f} (this job alone keeps it near 2): the 2-core machine was shared "
                "with other jobs, so wall times are inflated; the records' CPU times (training only) are closer to the cost. "
                "The measured `make evidence` times under 'Compute' predate this sweep and the gradient replay."]
    out += ["", "### One Compare picture per arm", "",
            "Seed 0's checkpoint of each arm (B) against `default` (A) on the same bundled example, as the Compare tab "
            "draws it (last layer, mean over heads, the rows that predict each answer token, B − A on the maps' own "
            "scale), with the magnitude line the tab prints:", ""]
    for a in ARMS:
        r = runs.get(a, {}).get(0)
        if r is not None:
            out += [f"- `{a}`: {r['example']['line']}", "",
                    f"  ![Compare, {a} seed 0 vs default](evidence_ground_compare_{a}.png)", ""]
    return out


def _l100(records: Path):
    """The replayed λ = 100 arm's updates, and its λ."""
    _, runs = H.load_records(GRAD_DOC, records)
    arms = [a for a in runs if next(iter(runs[a].values()))["config"].get("lambda_attn", 0) > 0]
    if not arms:
        return None, 0.0
    a = arms[-1]
    return [u for r in runs[a].values() for u in r["updates"]], next(iter(runs[a].values()))["config"]["lambda_attn"]


def l100_line(records: Path) -> str:
    us, lam = _l100(records)
    if not us:
        return ""
    per = [lam * _ratio(us, "ral_attn", k) for k in sorted({u["update"] for u in us})]
    return (f"; measured at every update of the step instead (the λ = {lam:g} arm replayed on this engine, 'The RAL "
            f"gradient across the whole step' below) it is {lam * _ratio(us, 'ral_attn'):.2f} × GRPO's over the step "
            "(" + ", ".join(f"update {k + 1}: {v:.2f}" for k, v in enumerate(per)) + ")")


def mb_acting_line(records: Path) -> str:
    """The `home` replay's acting share as the updates see it (per mini-batch) beside the whole-batch share."""
    _, runs = H.load_records(GRAD_DOC, records)
    recs = [r for rs in runs.values() for r in rs.values()]
    mb = [x["ral_rows_acting"] for r in recs for x in r["silence_mb"]]
    if not mb:
        return ""
    return (f"; as the optimizer updates see it, per mini-batch of {recs[0]['config']['minibatch_size']} (a prefix "
            f"class split between mini-batches no longer cancels), the replay below measures {_mean(mb):.3f} "
            f"({_rng(mb)} over updates) against {_mean([H._curve_mean(r, 'ral_rows_acting') for r in recs]):.3f} over "
            "the whole batch in the same runs")


def _f(key: str, v: float) -> str:
    return f"{v:+.4f}" if key.startswith("target") else f"{v:+.3f}"


def summary_lines(records: Path, cmp: list, detectable, ci95) -> list[str]:
    """The summary's bullets for the grounded sweep, what each comparison could detect, and the gradient replay."""
    out = []
    base, runs = H.load_records(SWEEP, records)
    gc = [c for c in cmp if c["sweep"] == SWEEP]
    if runs and base and "grpo" in runs:
        b, g = base["eval"], list(runs["grpo"].values())
        n = min(len(rs) for rs in runs.values())
        parts = []
        for a in ARMS:
            cs = [c for c in gc if c["arm"] == a]
            if cs:
                parts.append(f"`{a}` " + ", ".join(
                    f"{c['label']} {_f(c['key'], c['mean'])} [{_f(c['key'], ci95(c)[0])}, {_f(c['key'], ci95(c)[1])}]"
                    for c in cs))
        sig = [c for c in gc if c["p_holm"] < 0.05]
        out.append(f"- `ground` (the default model's own task and the default recipe's settings, ≥ {n} seeds per arm): "
                   f"GRPO moved greedy accuracy {b['accuracy']:.3f} → "
                   f"{np.mean([r['eval']['accuracy'] for r in g]):.3f} and 'where' {b['per_kind']['where']:.3f} → "
                   f"{np.mean([r['eval']['per_kind']['where'] for r in g]):.3f} in {g[0]['config']['steps']} steps. "
                   "Each arm − GRPO, mean [95 % CI, not adjusted for multiplicity]: " + "; ".join(parts) + ". "
                   + (f"{len(sig)} of {len(gc)} survive Holm: " + ", ".join(
                       f"`{c['arm']}` {c['label']} {c['mean']:+.4f} (p_Holm {fmt_p(c['p_holm'])})" for c in sig)
                      + "." if sig else f"None of these {len(gc)} survives Holm.") + " Seed 0's checkpoint against "
                   "`default` on the bundled example, largest last-layer head JSD: " + ", ".join(
                       f"`{a}` {runs[a][0]['example']['head_jsd']:.4f}" for a in ARMS if 0 in runs.get(a, {})) + ".")
    acc = [c for c in cmp if c["key"] in ("accuracy", "where") and c["n"] > 1]
    if acc:
        m = len(cmp)
        by = {}
        for c in acc:
            by.setdefault((c["sweep"], c["label"], c["n"]), []).append(c)
        out.append("- **What the comparisons could detect** (80 % power, from each comparison's own SD of per-seed "
                   f"differences; α 0.05 / α 0.05/{m}, Holm's first step; range over the arms): " + "; ".join(
                       f"`{sw}` {lab} (n {n}) ±{min(detectable(c) for c in cs):.3f}–{max(detectable(c) for c in cs):.3f}"
                       f" / ±{min(detectable(c, 0.05 / m) for c in cs):.3f}–{max(detectable(c, 0.05 / m) for c in cs):.3f}"
                       for (sw, lab, n), cs in by.items())
                   + ". 'Not distinguishable from GRPO' means no more than that: differences below these could not "
                   "have been seen. Every arm's comparison would detect a gain of 3 points (the published RAL and EASE "
                   "gains are 2.5–3) at Holm's level in: " + (", ".join(
                       f"`{sw}` {lab}" for (sw, lab, n), cs in by.items()
                       if max(detectable(c, 0.05 / m) for c in cs) <= 0.03) or "none of these") + "; at α 0.05 in: "
                   + (", ".join(f"`{sw}` {lab}" for (sw, lab, n), cs in by.items()
                                if max(detectable(c) for c in cs) <= 0.03) or "none of these") + ".")
    us, lam = _l100(records)
    if us:
        late = [u for u in us if u["update"] > 1]
        cos = [u.get("cos_ral_attn") for u in late]
        share = _mean([u.get("where_ral_attn", {}).get("last q/k", 0.0) for u in late])
        out.append(f"- **The RAL gradient across the whole step** (the `home` λ = {lam:g} arm replayed with a probe at "
                   f"every update): λ·‖∇RAL‖/‖∇GRPO‖ is 0 at update 1 and "
                   + ", ".join(f"{lam * _ratio(us, 'ral_attn', k):.2f} at update {k}" for k in
                               sorted({u['update'] for u in late}))
                   + f" ({lam * _ratio(late, 'ral_attn'):.2f} over updates 2–4, {lam * _ratio(us, 'ral_attn'):.2f} over "
                   "the whole step with update 1). Its direction is "
                   + ("on average orthogonal to" if abs(_mean(cos)) < 0.1 else "at an angle to")
                   + f" GRPO's (cos {_mean(cos):+.3f}, {_rng(cos, '{:+.3f}')} over updates) and "
                   f"{share:.0%} of its squared norm sits in the last layer's query/key projections (the rest reaches "
                   "the earlier layers and the embeddings through the queries and keys that layer reads). Why "
                   "accuracy is unchanged even there: that section (the norms, the clip, where the gradient lands).")
    return out


def home_delta(home_runs: dict, arm: str, key: str) -> float:
    """Mean per-seed arm − GRPO difference of one metric in the `home` records."""
    g, r = home_runs.get("grpo", {}), home_runs.get(arm, {})
    d = [r[s]["eval"][key] - g[s]["eval"][key] for s in r if s in g]
    return float(np.mean(d)) if d else float("nan")


def grad_lines(records: Path, home_runs: dict) -> list[str]:
    """‖∇RAL‖/‖∇GRPO‖ across the whole step (every update) in the `home` replay, why accuracy does not move even at
    λ = 100, and the acting shares as the updates see them."""
    _, runs = H.load_records(GRAD_DOC, records)
    if not runs:
        return []
    recs = [r for rs in runs.values() for r in rs.values()]
    cfg = recs[0]["config"]
    ups = cfg["epochs"] * -(-cfg["prompts_per_step"] * cfg["group_size"] // cfg["minibatch_size"])
    lam = {a: next(iter(rs.values()))["config"].get("lambda_attn", 0.0) for a, rs in runs.items()}
    engines = sorted({r["engine_commit"] for r in recs})
    pairs = [(r, home_runs.get(r["arm"], {}).get(r["seed"])) for r in recs]
    same = [o is not None and all(abs(r["eval"][k] - o["eval"][k]) < 1e-4 for k in ("accuracy", "sampled_reward",
                                                                                  "target_mass")) for r, o in pairs]
    old_engines = ", ".join(sorted({f"`{o['engine_commit']}`" for _, o in pairs if o}))
    out = ["## The RAL gradient across the whole step (`home`, every update)", "",
           f"`python bench/ground_regime.py --grad-across` replays `home`'s {', '.join(f'`{a}`' for a in runs)} "
           f"({', '.join(str(len(rs)) for rs in runs.values())} seeds) with the settings above on engine "
           f"{', '.join(f'`{e}`' for e in engines)} (the `home` records come from "
           f"{old_engines}); "
           + (f"all {len(recs)} replays end with their record's greedy accuracy, sampled reward and target mass "
              "(within 1e-4), so the probe measured the records' own trajectories" if all(same) else
              f"{sum(same)} of {len(recs)} replays end with their record's greedy accuracy, sampled reward and "
              "target mass (within 1e-4); the others took other trajectories on this engine")
           + f"; records in `bench/records/{GRAD_DOC}/`. At step 1 and every {PROBE_EVERY}th step, before each of the step's {ups} "
           "updates, at that update's own parameters and on the mini-batch it steps on: ‖∇GRPO‖, ‖∇RAL‖ at λ = 1, "
           "their cosine, where each gradient lands, and ‖∇ of the run's whole loss‖ (the trainer clips it to "
           f"{cfg.get('max_grad_norm', 1.0):g}). The summary's earlier figure came from one point per step (a quarter "
           "into the step, on the full batch).", "",
           "| arm | λ | update 1 | update 2 | update 3 | update 4 | updates 2–4 | whole step | λ × updates 2–4 | "
           "λ × whole step | cos(∇RAL, ∇GRPO) | updates clipped |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, rs in runs.items():
        us = [u for r in rs.values() for u in r["updates"]]
        late = [u for u in us if u["update"] > 1]
        cos = [u.get("cos_ral_attn") for u in late]
        clipped = [u["grad_total"] > 1.0 for u in us]
        out.append(f"| {a} | {lam[a]:g} | " + " | ".join(f"{_ratio(us, 'ral_attn', k):.4f}" for k in range(1, ups + 1))
                   + f" | {_ratio(late, 'ral_attn'):.4f} | {_ratio(us, 'ral_attn'):.4f} | "
                   f"{lam[a] * _ratio(late, 'ral_attn'):.3f} | {lam[a] * _ratio(us, 'ral_attn'):.3f} | {_mean(cos):+.3f} "
                   f"({_rng(cos, '{:+.3f}')}) | {sum(clipped)} of {len(clipped)} |")
    out += ["", "(‖∇RAL‖/‖∇GRPO‖ at λ = 1: Σ over seeds and probed steps of ‖∇RAL‖ over Σ‖∇GRPO‖ at each update "
            "index; 'whole step' includes update 1, where the term is exactly 0 (p_θ = p_old there); the cosine over "
            "updates 2–4. Updates clipped: the whole loss's gradient norm above "
            "the trainer's max_grad_norm, at every probed update.)", ""]
    # where the gradients land
    big = [a for a in runs if lam[a] > 0]
    if big:
        a = big[-1]
        us = [u for r in runs[a].values() for u in r["updates"] if u.get("where_ral_attn")]
        groups = sorted({k for u in us for k in u["where_ral_attn"]} | {k for u in us for k in u["where_grpo"]})
        out += [f"Where the gradients land (`{a}`, share of each gradient's squared norm by parameter group, mean over "
                "updates 2–4 of the probed steps):", "", "| parameter group | ∇GRPO | ∇RAL |", "|---|---|---|"]
        for k in groups:
            out.append(f"| {k} | {_mean([u['where_grpo'].get(k, 0.0) for u in us]):.3f} | "
                       f"{_mean([u['where_ral_attn'].get(k, 0.0) for u in us]):.3f} |")
        tot = [u["grad_total"] for u in us]
        gg = [u["grad_grpo"] for u in us]
        mx = cfg.get("max_grad_norm", 1.0)
        scale = [min(1.0, mx / u["grad_total"]) / min(1.0, mx / u["grad_grpo"]) for u in us if u["grad_total"] > 0]
        cos = [u.get("cos_ral_attn") for u in us]
        lam_a = lam[a]
        out += ["", f"In `{a}` the whole loss's gradient norm at updates 2–4 is {_mean(tot):.3f} ({_rng(tot)}) against "
                f"GRPO's own {_mean(gg):.3f} ({_rng(gg)}); the trainer clips it to {mx:g}, so the RAL term also "
                f"shortens GRPO's step: by the clip alone GRPO's part of the update is {_mean(scale):.3f} × what it "
                f"would be without the term ({_rng(scale)}; the loss's window weight, ≈ 1, left out).", "",
                f"Why greedy accuracy does not move even at λ = {lam_a:g}, from these measurements: the term's gradient "
                f"is {lam_a * _ratio(us, 'ral_attn'):.2f} × GRPO's at updates 2–4 but "
                + (f"on average orthogonal to it (mean cos {_mean(cos):+.3f}; single updates {_rng(cos, '{:+.2f}')}), "
                   "so over a step it neither adds to nor takes from GRPO's direction beyond the clip's "
                   f"{1 - _mean(scale):.0%}" if abs(_mean(cos)) < 0.1 else
                   f"at cos {_mean(cos):+.3f} to it") + "; the term is a function of the last layer's attention rows only, so what it can change is where that "
                f"layer looks ({_mean([u['where_ral_attn'].get('last q/k', 0.0) for u in us]):.0%} of its squared norm "
                "directly on that layer's query/key weights, against "
                f"{_mean([u['where_grpo'].get('last q/k', 0.0) for u in us]):.1%} of GRPO's; the rest on the earlier "
                "layers and embeddings that feed those queries and keys), and the `home` records show that change is "
                "small and does not reach the answer: `ral_l100` − `grpo` target mass "
                f"{home_delta(home_runs, a, 'target_mass'):+.4f}, greedy accuracy "
                f"{home_delta(home_runs, a, 'accuracy'):+.4f} (the paired table above).", ""]
    # acting shares as the updates see them
    out += ["Acting shares as the updates see them (per mini-batch of "
            f"{cfg['minibatch_size']}, every update of every step) against the whole-batch share the records above "
            "report (the trainer's per-step diagnostic):", "",
            "| arm | acting rows, per update (mean; range over updates) | acting rows, whole batch (mean) | "
            "effective weight, per update | effective weight, whole batch |", "|---|---|---|---|---|"]
    for a, rs in runs.items():
        mb = [x["ral_rows_acting"] for r in rs.values() for x in r["silence_mb"]]
        ew = [x["ral_effective_weight"] for r in rs.values() for x in r["silence_mb"]]
        out.append(f"| {a} | {_mean(mb):.3f} ({_rng(mb)}) | {_mean([H._curve_mean(r, 'ral_rows_acting') for r in rs.values()]):.3f} | "
                   f"{_mean(ew):.3f} | {_mean([H._curve_mean(r, 'ral_effective_weight') for r in rs.values()]):.3f} |")
    # the replays' outcome beside the records'
    out += ["", "The replays' held-out greedy accuracy after 30 steps (this engine) beside the `home` records' "
            "(engine `826ed9eac2c6`), per seed:", "", "| arm | replay | record |", "|---|---|---|"]
    for a, rs in runs.items():
        rec = home_runs.get(a, {})
        out.append(f"| {a} | " + ", ".join(f"{rs[s]['eval']['accuracy']:.3f}" for s in sorted(rs)) + " | "
                   + ", ".join(f"{rec[s]['eval']['accuracy']:.3f}" for s in sorted(rs) if s in rec) + " |")
    if "grpo" in runs and big:
        s = sorted(set(runs["grpo"]) & set(runs[big[-1]]))
        d = [runs[big[-1]][i]["eval"]["accuracy"] - runs["grpo"][i]["eval"]["accuracy"] for i in s]
        out += ["", f"Replay `{big[-1]}` − `grpo` per seed: " + ", ".join(f"{x:+.3f}" for x in d)
                + f" (mean {np.mean(d):+.3f}; " + ("the records' own numbers, " if all(same) else "")
                + "not tested again: the contrast is tested on the records above).", ""]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=None, help=f"default {SEEDS} (sweep), {GRAD_SEEDS} (--grad-across)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--grad-across", action="store_true", help="replay `home` grpo and ral_l100 with the probe")
    p.add_argument("--rerun", action="store_true", help="redo runs whose record exists")
    args = p.parse_args()
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(ARMS)}")
    jobs = plan(args)
    engine = engine_now()
    for j in jobs:
        j["engine"] = engine
    if not args.grad_across:
        base_record(args.rerun)
    fn = grad_one if args.grad_across else run_one
    with ProcessPoolExecutor(args.workers) as ex:
        for i, r in enumerate(ex.map(fn, jobs)):
            print(f"[{i + 1}/{len(jobs)}] {r['doc']} {r['arm']} seed {r['seed']}: acc {r['eval']['accuracy']:.3f} "
                  f"reward {r['eval']['sampled_reward']:.3f} target mass {r['eval']['target_mass']:.4f} "
                  f"({r['cpu_s']:.0f} CPU s, {r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
