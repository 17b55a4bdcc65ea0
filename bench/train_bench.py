"""Benchmark: cost of a RAL training step next to a GRPO step on the same rollout batch.

    .venv/bin/python bench/train_bench.py --out bench/results/train.md      # ≈ 5–8 min on 2 shared cores
    .venv/bin/python bench/train_bench.py --smoke                           # tiny models, 1 repeat, prints

Models: the embedded default model (`load_adapter("default")`, assets/default_model; when it is missing a
random stand-in with the default architecture is used and the report says so) and a medium random Qwen2-VL
(hidden 512, 8 decoder layers, 8 heads, 4 KV heads) built offline by `tiny_qwen2_vl`.

Configs: the shipped recipes `grpo` and `ral` (8 prompts × 8 rollouts, 12 new tokens, 2 epochs × 2 mini-batches
of 32 = 4 optimizer updates per rollout batch, lr 1e-4, bundled grounding task), identical except
  GRPO  lambda_attn = 0, log_attention = false  → no attention capture anywhere (the fair baseline)
  RAL   lambda_attn = 1, paper policy: last decoder layer, head mean, all earlier positions, own row
Each mode gets its own copy of the model and its own Trainer/optimizer (same initial weights).

Measured, all in this one process with one torch thread, modes interleaved (ABAB…, order alternating per pair):
  update phase  one rollout batch built once (fixed seed, under the RAL capture so it carries p_old); GRPO gets
                the same batch without the attention fields. The update phase is the loop of Trainer.train_step
                (mini-batches × epochs: policy_forward → loss terms → backward → clip → AdamW step), replayed here
                with the trainer's own `_loss`, accelerator, optimizer and scheduler.
  full step     Trainer.train_step(): sampling + rewards + old-policy pass + the updates + (RAL only, because
                it has a PolicySpec) the post-update attention metrics pass. The RNG is reseeded to the same
                value before each call and the step counter is not advanced, so both modes see the same prompts.
                A third variant, GRPO with log_attention = true (the recipe default), shows what the metrics
                capture costs on its own.
Wall time (perf_counter) and process CPU time (process_time) are both recorded; with one thread, CPU/wall well
below 1 means another process was taking the core. Ratios are taken from the same run only.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import shlex
import sys
import tempfile
import time

import _common as C

C.start()  # before torch is imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIUM = dict(hidden=512, layers=8, heads=8, kv_heads=4, vision_depth=1, vision_dim=64)
# the architecture of scripts/train_default_model.py (its argparse defaults); used only when the default is missing
DEFAULT_STANDIN = dict(hidden=128, layers=4, heads=4, kv_heads=2, vision_depth=2, vision_dim=64)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vision_depth=1, vision_dim=32)
TARGET = 1.15


log = C.logger("train_bench")


# ------------------------------------------------------------------------------------------------ setup

def make_adapter(kind: str):
    """('default' | 'medium' | 'smoke') → (adapter, label, note)."""
    from ral_core.models import load_adapter
    from ral_core.models.base import DEFAULT_MODEL_DIR
    from ral_core.builders.tiny import tiny_qwen2_vl

    if kind == "default":
        if (DEFAULT_MODEL_DIR / "config.json").exists():
            return load_adapter("default", device="cpu"), "default (assets/default_model)", ""
        a = tiny_qwen2_vl(**DEFAULT_STANDIN, seed=0)
        return a, "default STAND-IN (random)", ("assets/default_model was missing: a random model with the default "
                                               "architecture (scripts/train_default_model.py defaults) was timed. Rerun the same command once it exists "
                                               "(`make bench-train`): the trained model answers in a few tokens, so its "
                                               "sequences are shorter and the rollout takes a larger share of a step")
    if kind == "medium":
        return tiny_qwen2_vl(**MEDIUM, seed=0), "medium (random)", ""
    return tiny_qwen2_vl(**SMOKE, seed=0), "smoke (random)", ""


def make_trainers(adapter, args, tmp, prompts):
    from accelerate import Accelerator

    from ral_core.config import build_config
    from ral_core.trainer import Trainer

    common = {"device": "cpu", "threads": 1, "seed": 0, "steps": 1000, "save_every": 0, "snapshot_every": 0,
              "eval_every": 0, "prompts_per_step": prompts, "group_size": args.group,
              "max_new_tokens": args.new_tokens, "epochs": args.epochs,
              "minibatch_size": max(1, prompts * args.group // args.minibatches)}
    cfgs = {
        "grpo": build_config("grpo", {**common, "log_attention": False, "output_dir": os.path.join(tmp, "g")}),
        "ral": build_config("ral", {**common, "output_dir": os.path.join(tmp, "r")}),
        "grpo_log": build_config("grpo", {**common, "log_attention": True, "output_dir": os.path.join(tmp, "gl")}),
    }
    # the recipes must differ only where intended
    base = {k: v for k, v in cfgs["grpo"].to_dict().items() if k not in ("output_dir", "log_attention")}
    for name in ("ral", "grpo_log"):
        other = {k: v for k, v in cfgs[name].to_dict().items() if k not in ("output_dir", "log_attention")}
        diff = {k for k in base if base[k] != other[k]}
        allowed = {"lambda_attn", "attn_layers", "attn_row", "attn_support", "attn_per_head"}
        assert diff <= allowed, f"grpo and {name} recipes differ in {diff - allowed}"
    assert cfgs["ral"].lambda_attn > 0 and cfgs["ral"].updates_per_step >= 2
    acc = Accelerator(cpu=True)
    trainers = {}
    for name, cfg in cfgs.items():
        trainers[name] = Trainer(cfg, adapter=copy.deepcopy(adapter), accelerator=acc)
    torch.set_num_threads(1)
    assert (trainers["grpo"].spec is None and trainers["ral"].spec is not None
            and trainers["ral"].spec.layers == [adapter.num_layers - 1]), "unexpected PolicySpec"
    return trainers


def fixed_batches(trainers, seed=1234):
    """One rollout batch from the RAL trainer's (still initial) model; GRPO gets it without attention fields."""
    from ral_core.rollout import make_rollouts

    tr = trainers["ral"]
    cfg = tr.cfg
    torch.manual_seed(seed)
    ro = make_rollouts(tr.adapter, tr._prompts(0), cfg.group_size, tr.rewarder, tr.spec, cfg.max_new_tokens,
                       cfg.temperature, cfg.top_p, cfg.advantage_scale, gen_model=tr.acc.unwrap_model(tr.model),
                       vision_cache=tr.vision_cache, share_prompt=tr.share_prompt)  # as Trainer.train_step does
    synthetic = bool((ro.advantages == 0).all())
    if synthetic:
        # a random model earns no reward, so every advantage is 0 and the updates would not move the weights;
        # the cost is the same either way, but give the batch group-centred advantages so the weights move
        # as in real training
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(len(ro.texts), generator=gen)
        for gi in ro.group.unique():
            m = ro.group == gi
            a[m] = (a[m] - a[m].mean()) / (a[m].std() + 1e-4)
        ro.advantages = a.to(ro.advantages.device)
    ro_g = dataclasses.replace(ro, old_attn=[], key_valid=None, row_class=None)
    if ro.vision is not None and "grpo" in trainers:  # the GRPO trainer's own model encodes the step's images
        from ral_core.vision_cache import VisionCache, distinct_images
        g = trainers["grpo"]
        uniq, _ = distinct_images([p["image"] for p in tr._prompts(0)])
        ro_g.vision = VisionCache.encode(g.adapter, uniq, model=g.acc.unwrap_model(g.model))
    return ro_g, ro, synthetic


def update_phase(tr, ro) -> int:
    """The trainer's own update phase on a given batch; returns the number of optimizer updates."""
    return tr.update_phase(ro)[0]


def timed(fn):
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, out


def interleaved(fns: dict, repeats: int, budget_s: float, min_repeats: int = 3):
    """Rounds over all modes, order rotated each round; stops early (≥ min_repeats) when the budget is spent."""
    names = list(fns)
    res = {n: {"wall": [], "cpu": [], "out": []} for n in names}
    t_start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2 == 1:
            order = order[::-1]
        for n in order:
            w, c, o = timed(fns[n])
            res[n]["wall"].append(w)
            res[n]["cpu"].append(c)
            res[n]["out"].append(o)
        if r + 1 >= min_repeats and time.perf_counter() - t_start > budget_s:
            break
    return res


def pair_ratios(a, b):
    return [x / y for x, y in zip(a, b) if y > 0]


# ------------------------------------------------------------------------------------------------ one model

def bench_model(kind: str, args) -> dict:
    t_model = time.perf_counter()
    adapter, label, note = make_adapter(kind)
    model = adapter.model
    n_params = sum(p.numel() for p in model.parameters())
    from ral_core.trainer import is_vision_param
    n_train = sum(p.numel() for n, p in model.named_parameters() if not is_vision_param(n))
    text_cfg = model.config.get_text_config()
    arch = (f"hidden {text_cfg.hidden_size}, {text_cfg.num_hidden_layers} layers, {text_cfg.num_attention_heads} "
            f"heads / {text_cfg.num_key_value_heads} KV")
    with tempfile.TemporaryDirectory() as tmp:
        prompts = args.medium_prompts if kind == "medium" else args.prompts
        trainers = make_trainers(adapter, args, tmp, prompts)
        del adapter, model
        ro_g, ro_r, synthetic = fixed_batches(trainers)
        L = int(ro_r.inputs["input_ids"].shape[1])
        info = {"label": label, "note": note, "arch": arch, "params": n_params, "lm_params": n_train,
                "L": L, "P": ro_r.P, "T": int(ro_r.completion.shape[1]),
                "visual": int(ro_r.visual_keys[0].sum()), "N": len(ro_r.texts),
                "resp_len": float(ro_r.mask.float().sum(1).mean()),
                "adv_nonzero": float((ro_r.advantages != 0).float().mean()), "synthetic_adv": synthetic,
                "updates": trainers["ral"].cfg.updates_per_step, "prompts": prompts,
                "minibatch": trainers["ral"].cfg.minibatch_size}
        log(f"{label}: {n_params / 1e6:.2f}M params, L={L} (P={ro_r.P}, T={info['T']}), N={info['N']}, "
            f"{info['updates']} updates/batch")

        # --- update phase on the same batch
        fns = {"grpo": lambda: update_phase(trainers["grpo"], ro_g), "ral": lambda: update_phase(trainers["ral"], ro_r)}
        for f in fns.values():  # warm-up
            f()
        up = interleaved(fns, args.repeats, args.budget_update)
        assert all(n == info["updates"] for m in up.values() for n in m["out"])
        info["update"] = {m: {"wall": C.median(v["wall"]), "cpu": C.median(v["cpu"]), "n": len(v["wall"]),
                              "cpu_wall": C.median([c / w for c, w in zip(v["cpu"], v["wall"])])}
                          for m, v in up.items()}
        info["update_ratio_wall"] = info["update"]["ral"]["wall"] / info["update"]["grpo"]["wall"]
        info["update_ratio_cpu"] = info["update"]["ral"]["cpu"] / info["update"]["grpo"]["cpu"]
        info["update_pair_ratio_cpu"] = C.median(pair_ratios(up["ral"]["cpu"], up["grpo"]["cpu"]))
        log(f"  update phase: GRPO {info['update']['grpo']['wall'] * 1e3:.0f} ms, RAL "
            f"{info['update']['ral']['wall'] * 1e3:.0f} ms (wall), ratio wall {info['update_ratio_wall']:.3f} "
            f"cpu {info['update_ratio_cpu']:.3f}, n={info['update']['grpo']['n']}")

        # --- full train_step
        def step_fn(name):
            def f():
                torch.manual_seed(4321)
                return trainers[name].train_step()
            return f
        fns = {n: step_fn(n) for n in ("grpo", "ral", "grpo_log")}
        for f in fns.values():  # warm-up
            f()
        fs = interleaved(fns, args.step_repeats, args.budget_step)
        info["step"] = {}
        for m, v in fs.items():
            outs = v["out"]
            info["step"][m] = {"wall": C.median(v["wall"]), "cpu": C.median(v["cpu"]), "n": len(v["wall"]),
                               "cpu_wall": C.median([c / w for c, w in zip(v["cpu"], v["wall"])]),
                               "rollout_wall": C.median([o["rollout_time"] for o in outs]),
                               "resp_len": C.median([o["response_len"] for o in outs])}
            info["step"][m]["steps_per_s"] = 1.0 / info["step"][m]["wall"]
            info["step"][m]["steps_per_cpu_s"] = 1.0 / info["step"][m]["cpu"]
        info["step_ratio_wall"] = info["step"]["ral"]["wall"] / info["step"]["grpo"]["wall"]
        info["step_ratio_cpu"] = info["step"]["ral"]["cpu"] / info["step"]["grpo"]["cpu"]
        info["step_pair_ratio_cpu"] = C.median(pair_ratios(fs["ral"]["cpu"], fs["grpo"]["cpu"]))
        info["steplog_ratio_cpu"] = info["step"]["grpo_log"]["cpu"] / info["step"]["grpo"]["cpu"]
        log(f"  full step: GRPO {info['step']['grpo']['wall']:.2f} s, RAL {info['step']['ral']['wall']:.2f} s, "
            f"GRPO+log {info['step']['grpo_log']['wall']:.2f} s (wall), ratio cpu {info['step_ratio_cpu']:.3f}")
        del trainers
    gc.collect()
    info["seconds"] = time.perf_counter() - t_model
    return info


# ------------------------------------------------------------------------------------------------ report

def verdict(r) -> str:
    u, s = r["update_ratio_cpu"], r["step_ratio_cpu"]
    ok_u, ok_s = u <= TARGET, s <= TARGET
    return (f"update phase {u:.3f}× ({'meets' if ok_u else 'MISSES'} ≤ {TARGET}×), full step {s:.3f}× "
            f"({'meets' if ok_s else 'MISSES'})")


def report(results, meta, command, args, wall_total, busy_before, busy_after) -> str:
    L = []
    L.append("# RAL step vs GRPO step (CPU)\n")
    L.append(f"Command: `{command}`  ")
    L.append(f"Date: {meta['date']} · machine: {C.machine_line(meta)} · one torch thread · fp32 · "
             f"total run {wall_total / 60:.1f} min\n")
    L.append("Batch: recipes `grpo` / `ral` (bundled grounding task, " + f"{args.group} rollouts per prompt, "
             f"{args.new_tokens} new tokens max, {args.epochs} epochs) with, per model, "
             + "; ".join(f"{r['label']}: {r['prompts']} prompts × {args.group} = {r['N']} rollouts in mini-batches "
                         f"of {r['minibatch']} → {r['updates']} optimizer updates per rollout batch" for r in results)
             + ". GRPO: "
             "`lambda_attn=0 log_attention=false` (no capture at all). RAL: `lambda_attn=1`, last layer, head mean, "
             "all earlier positions, own row (paper).\n")
    L.append("## Main table (medians; ratio = RAL / GRPO from this run, on process CPU time)\n")
    L.append("| model | params (LM trainable) | tokens / sequence (visual) | GRPO ms / update phase | RAL ms / update "
             "phase | ratio update | GRPO full step s | RAL full step s | ratio full step | GRPO steps/s (CPU-time basis) | "
             "RAL steps/s (CPU-time basis) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        u, s = r["update"], r["step"]
        L.append(f"| {r['label']} — {r['arch']} | {r['params'] / 1e6:.2f}M ({r['lm_params'] / 1e6:.2f}M) | "
                 f"{r['L']} ({r['visual']}) | {u['grpo']['wall'] * 1e3:.0f} ({u['grpo']['cpu'] * 1e3:.0f}) | "
                 f"{u['ral']['wall'] * 1e3:.0f} ({u['ral']['cpu'] * 1e3:.0f}) | "
                 f"**{r['update_ratio_cpu']:.3f}×** | {s['grpo']['wall']:.2f} ({s['grpo']['cpu']:.2f}) | "
                 f"{s['ral']['wall']:.2f} ({s['ral']['cpu']:.2f}) | "
                 f"**{r['step_ratio_cpu']:.3f}×** | {s['grpo']['steps_per_s']:.2f} ({s['grpo']['steps_per_cpu_s']:.2f}) | "
                 f"{s['ral']['steps_per_s']:.2f} ({s['ral']['steps_per_cpu_s']:.2f}) |")
    L.append("\nms and s are wall-clock medians with the median process CPU time in brackets; ratios use process CPU time (robust to other processes on this "
             "shared machine); wall-clock ratios are in the detail table. steps/s = 1 / median wall time of "
             "`Trainer.train_step()` (sampling + old-policy pass + updates + metrics); in brackets 1 / median CPU time, what "
             "one uncontended core would give.\n")

    L.append("## Detail\n")
    L.append("| model | mode | what | wall median | CPU median | CPU/wall | n | ratio vs GRPO (wall / CPU / median of "
             "pairwise CPU) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in results:
        u, s = r["update"], r["step"]
        for m in ("grpo", "ral"):
            rat = "—" if m == "grpo" else (f"{r['update_ratio_wall']:.3f} / {r['update_ratio_cpu']:.3f} / "
                                          f"{r['update_pair_ratio_cpu']:.3f}")
            L.append(f"| {r['label']} | {m.upper()} | update phase ({r['updates']} updates) | "
                     f"{u[m]['wall'] * 1e3:.0f} ms | {u[m]['cpu'] * 1e3:.0f} ms | {u[m]['cpu_wall']:.2f} | "
                     f"{u[m]['n']} | {rat} |")
        for m, name in (("grpo", "GRPO"), ("ral", "RAL"), ("grpo_log", "GRPO + log_attention")):
            if m == "grpo":
                rat = "—"
            elif m == "ral":
                rat = f"{r['step_ratio_wall']:.3f} / {r['step_ratio_cpu']:.3f} / {r['step_pair_ratio_cpu']:.3f}"
            else:
                rat = (f"{s[m]['wall'] / s['grpo']['wall']:.3f} / {r['steplog_ratio_cpu']:.3f} / —")
            L.append(f"| {r['label']} | {name} | full train_step (rollout {s[m]['rollout_wall']:.2f} s, "
                     f"response {s[m]['resp_len']:.1f} tok) | {s[m]['wall']:.2f} s | {s[m]['cpu']:.2f} s | "
                     f"{s[m]['cpu_wall']:.2f} | {s[m]['n']} | {rat} |")
    L.append("")
    L.append("Per model: " + "; ".join(
        f"{r['label']}: {r['N']} sequences of {r['L']} tokens (prompt {r['P']} incl. {r['visual']} visual, "
        f"completion width {r['T']}, mean response {r['resp_len']:.1f} tok in the fixed batch), "
        + ("synthetic group-centred advantages (the model earned no reward, all A were 0)" if r["synthetic_adv"]
           else f"{100 * r['adv_nonzero']:.0f}% rollouts with non-zero advantage") + f", measured in {r['seconds']:.0f} s"
        for r in results) + ".\n")
    for r in results:
        if r["note"]:
            L.append(f"**Note:** {r['note']}.\n")

    worst = min(min(v["cpu_wall"] for v in r["update"].values()) for r in results)
    worst = min(worst, min(min(v["cpu_wall"] for v in r["step"].values()) for r in results))
    L += C.contention_section(meta, worst, busy_before, busy_after)

    L.append("## Target ≤ 1.15×\n")
    for r in results:
        u, st, lg = r["update_ratio_cpu"], r["step_ratio_cpu"], r["steplog_ratio_cpu"]
        L.append(f"- {r['label']}: {verdict(r)}. In the full step, GRPO with `log_attention=true` (the same "
                 f"old-policy capture and post-update metrics pass, no attention term) already costs {lg:.3f}× plain "
                 f"GRPO; RAL over that is {st / lg:.3f}× (the attention term in the updates; {u:.3f}× on the update "
                 "phase alone).")
    L.append("")
    L.append("Repeat-to-repeat spread on this shared machine is a few per cent even on CPU time (compare the "
             "ratio of medians with the median of pairwise ratios in the detail table), so differences below "
             "~5 % are not resolved (two runs of this command minutes apart moved the ratios by up to 4 points).\n")
    L.append(args.notes_md)
    return "\n".join(L) + "\n"


NOTES = """### Where the RAL overhead comes from

Per mini-batch, RAL adds to GRPO's forward + backward: (1) in the last decoder layer only, the capture function
computes softmax(QKᵀ) for the T response rows in fp32 ([N, H, T, L]) next to the SDPA kernel, and its backward;
(2) the head mean, masking and renormalisation to the policy [N, 1, T, L] and the JSD against p_old, forward and
backward. Both are O(N·H·T·L) against the decoder's O(N·L·layers·hidden²), so the relative overhead falls with
model width/depth and grows with sequence length and number of heads. Outside the update loop, a RAL
`train_step` also captures the same rows in the no-grad old-policy pass and runs one more no-grad forward after
the updates for the attention metrics (`attn_jsd_after_update`, entropy, visual/target mass); GRPO with
`log_attention=true` (the recipe default) pays those two as well, which the "GRPO + log_attention" row isolates.

### Reading it

The ≤ 1.15× target is about the RAL step against the GRPO step on the same batch: that is the update-phase ratio.
Where the full `train_step` ratio is higher, the excess is the attention *metrics* (the post-update no-grad
forward over the whole batch, run whenever the trainer has a PolicySpec), not the RAL term: its share is largest
for small models, where one extra forward is a large part of a short step. Ways to remove it, if wanted: compute
the post-update attention metrics every k steps, or from the last update's forward (weights one update older), or
a switch RAL runs can use too (today `log_attention=false` removes them only when no attention term is on).
"""


# ------------------------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown report path (default: print only)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, small batch, one repeat; prints")
    ap.add_argument("--models", default="default,medium")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch (recipe value)")
    ap.add_argument("--medium-prompts", type=int, default=4, help="prompts per batch for the medium model "
                    "(half the recipe, to keep the run under ~8 min on this CPU)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minibatches", type=int, default=2, help="mini-batches per epoch (recipe: 64 / 32 = 2)")
    ap.add_argument("--repeats", type=int, default=9, help="max interleaved update-phase pairs per model")
    ap.add_argument("--step-repeats", type=int, default=5, help="max interleaved full-step rounds per model")
    ap.add_argument("--budget-update", type=float, default=90.0, help="s per model for update-phase repeats")
    ap.add_argument("--budget-step", type=float, default=90.0, help="s per model for full-step repeats")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.prompts, args.group = "smoke", 2, 4
        args.repeats = args.step_repeats = 1
    args.notes_md = NOTES
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    command = "HF_HUB_OFFLINE=1 .venv/bin/python bench/train_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = C.machine_info()
    busy_before = C.busy_processes(exclude={os.getpid()})
    t0 = time.perf_counter()
    results = []
    for kind in args.models.split(","):
        results.append(bench_model(kind.strip(), args))
    busy_after = C.busy_processes(exclude={os.getpid()})
    md = report(results, meta, command, args, time.perf_counter() - t0, busy_before, busy_after)
    C.write_report(md, args.out, args.smoke, log)
    if any(math.isnan(r["update_ratio_cpu"]) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
