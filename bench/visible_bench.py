"""Does the default training run visibly and honestly move attention? (bench/results/visible.md)

For each arm (a recipe plus overrides) and seed: train from `default` as `ral train` would, then
- Compare the checkpoint against `default` on every bundled grid example (assets/examples/examples.json), as the
  Compare tab does (`ral_core.compare`): the largest last-layer head JSD and the on-target mass A → B of the
  last layer's head-mean map;
- held-out accuracy as `ral eval --n 400` computes it (test split, 3×3, cell/row/where), and `default`'s beside it.
The criterion: a change a person can see (largest last-layer head JSD ≥ 0.05 on the example, or on-target mass up
≥ 0.10) in ≤ 90 s of training on a 2-core machine, with held-out accuracy within 1 point of `default` or above.

Every run records its wall and CPU time: on a shared machine wall time is not the run's cost, CPU time is closer.

    python bench/visible_bench.py                        # every arm, seeds 0 1 2 → visible.md
    python bench/visible_bench.py --arms grounded --seeds 0 1 2 3 4
    python bench/visible_bench.py --collect              # the document from the records alone
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import _common

_common.start()

ROOT = _common.ROOT
RECORDS = ROOT / "bench" / "records" / "visible"
OUT = ROOT / "bench" / "results" / "visible.md"
WORK = ROOT / "bench" / "_work" / "visible"


def over(base: list[str], **kw) -> list[str]:
    """`base` overrides with `kw`'s keys replaced or added (key=value strings, as `ral train` takes them)."""
    keep = [o for o in base if o.split("=", 1)[0] not in kw]
    return keep + [f"{k}={v}" for k, v in kw.items()]


# arm → (recipe, overrides), relative to today's recipes. `grounded` is the default recipe of `ral train` and the
# Train tab; `ral` plain RAL at the same length; `grounded_v1` the previous default (the KL target on the head mean
# of the last layer), and two variants of it for contrast: the attention reward instead of the target term (SAYO's
# form, through the advantages), and the target weighted by the advantage (signed, zero in groups without reward
# variance). A record keeps the overrides it ran with; its resolved config says what ran.
V1 = ["ground_heads=mean", "ground_div=kl", "lambda_ground=0.3", "steps=20"]
ARMS = {"grounded": ("grounded", []), "ral": ("ral", ["steps=20"]), "grounded_v1": ("grounded", V1),
        "reward": ("ral", ["steps=20", "attn_row=predicts", "reward_weights={exact_match: 1.0, attention_box: 0.5}"]),
        "advantage": ("grounded", over(V1, ground_on="advantage", lambda_ground=1)),
        # variants of the previous default tuned for the accuracy half of the criterion (VARIANTS): half the lr with
        # twice λ_ground, a k3 KL to the frozen reference, the −log on-target share instead of KL to the box, the
        # target term on layers 2 and 3, and that term lighter and shorter (an earlier session, older engine) ...
        "half_lr": ("grounded", over(V1, lr=2.5e-5, lambda_ground=0.6)),
        "half_lr_kl": ("grounded", over(V1, lr=2.5e-5, lambda_ground=0.6, beta=0.1)),
        "layers23": ("grounded", over(V1, lr=2.5e-5, lambda_ground=0.6, attn_layers="[2, 3]")),
        "mass": ("grounded", over(V1, ground_div="mass")),
        "layers23_light": ("grounded", over(V1, lr=2.5e-5, attn_layers="[2, 3]")),
        "layers23_short": ("grounded", over(V1, lr=2.5e-5, attn_layers="[2, 3]", steps=10)),
        # ... and this session's: the target on one head of the last layer (ground_heads), the other heads left to
        # answer; lighter, at a lower lr, with a KL anchor; the bounded JSD instead of the KL, stronger, shorter
        "head0": ("grounded", over(V1, ground_heads=0)),
        "head1": ("grounded", over(V1, ground_heads=1)),
        "head2": ("grounded", over(V1, ground_heads=2)),
        "head3": ("grounded", over(V1, ground_heads=3)),
        "head3_light": ("grounded", over(V1, ground_heads=3, lambda_ground=0.1)),
        "head3_lowlr": ("grounded", over(V1, ground_heads=3, lr=2.5e-5, lambda_ground=1)),
        "head3_halflr": ("grounded", over(V1, ground_heads=3, lr=2.5e-5)),
        "head3_kl1": ("grounded", over(V1, ground_heads=3, beta=1)),
        "kl1": ("grounded", over(V1, beta=1)),
        "head3_jsd": ("grounded", over(V1, ground_heads=3, ground_div="jsd")),
        "head3_jsd_05": ("grounded", over(V1, ground_heads=3, ground_div="jsd", lambda_ground=0.5)),
        "head3_jsd_05_lr3": ("grounded", over(V1, ground_heads=3, ground_div="jsd", lambda_ground=0.5, lr=3e-5)),
        "head3_jsd_05_short": ("grounded", over(V1, ground_heads=3, ground_div="jsd", lambda_ground=0.5, steps=10)),
        # the accuracy half with margin: today's default recipe plus one or two changes each. The lower lr again;
        # what trains (LoRA at a LoRA lr, some layers, some modules); rollout temperature; epochs; lr decay and
        # warm-up; batch shape; a KL anchor (beta); the target's weight against the lr; advantage and loss scaling;
        # no 'where' questions in training. g_lr_tiny is a check (no movement), not a recipe.
        "g_lr25": ("grounded", ["lr=2.5e-5"]),
        "g_lora8": ("grounded", ["lora_r=8", "lr=5e-4"]),
        "g_temp07": ("grounded", ["temperature=0.7"]),
        "g_ep1": ("grounded", ["epochs=1"]),
        "g_linear": ("grounded", ["schedule=linear"]),
        "g_cosine": ("grounded", ["schedule=cosine"]),
        "g_lora16_2e3": ("grounded", ["lora_r=16", "lr=2e-3"]),
        "g_tl_layers": ("grounded", ["train_layers=layers"]),
        "g_tl_last": ("grounded", ["train_layers=last"]),
        "g_tl_23": ("grounded", ["train_layers=[2, 3]"]),
        "g_warm3": ("grounded", ["warmup_steps=3"]),
        "g_warm5": ("grounded", ["warmup_steps=5"]),
        "g_warm10": ("grounded", ["warmup_steps=10"]),
        "g_lr1e4": ("grounded", ["lr=1e-4"]),
        "g_lr75": ("grounded", ["lr=7.5e-5"]),
        "g_p32": ("grounded", ["prompts_per_step=32"]),
        "g_g16": ("grounded", ["group_size=16"]),
        "g_temp13": ("grounded", ["temperature=1.3"]),
        "g_beta01": ("grounded", ["beta=0.1"]),
        "g_mb128": ("grounded", ["minibatch_size=128"]),
        "g_steps30": ("grounded", ["steps=30"]),
        "g_ep1_l08": ("grounded", ["epochs=1", "lambda_ground=0.8"]),
        "g_beta005": ("grounded", ["beta=0.05"]),
        "g_beta02": ("grounded", ["beta=0.2"]),
        "g_beta04": ("grounded", ["beta=0.4"]),
        "g_lr25_l1": ("grounded", ["lr=2.5e-5", "lambda_ground=1.0"]),
        "g_lr25_l15": ("grounded", ["lr=2.5e-5", "lambda_ground=1.5"]),
        "g_lr12_l3": ("grounded", ["lr=1.25e-5", "lambda_ground=3.0"]),
        "g_lr_tiny": ("grounded", ["lr=1e-9"]),
        "g_advnone": ("grounded", ["advantage_scale=none"]),
        "g_seqnorm": ("grounded", ["loss_norm=sequence"]),
        "g_nowhere": ("grounded", ["task_kinds=[cell, row]"]),
        # only where the last layer looks trains: its query and key projections, at a higher lr (fewer weights);
        # CANDIDATE below. ral_qk_last_2e4: the same restriction without the target term.
        "g_qk_last_1e4": ("grounded", ["train_layers=last", "train_modules=qk", "lr=1e-4"]),
        "g_qk_last_2e4": ("grounded", ["train_layers=last", "train_modules=qk", "lr=2e-4"]),
        "g_qk_last_5e4": ("grounded", ["train_layers=last", "train_modules=qk", "lr=5e-4"]),
        "g_attn_last_2e4": ("grounded", ["train_layers=last", "train_modules=attention", "lr=2e-4"]),
        "g_qk_all": ("grounded", ["train_modules=qk"]),
        "ral_qk_last_2e4": ("ral", ["steps=20", "train_layers=last", "train_modules=qk", "lr=2e-4"])}
# Every arm on the grounded recipe is pinned to the recipe as it was when these runs were made (full fine-tuning at
# lr 5e-5): the recipe file changed when the candidate below became the default, and an arm must keep meaning the
# runs its records hold. The candidate itself, on that base, resolves to today's recipe.
PREVIOUS = ["train_layers=all", "train_modules=all", "lr=5e-5"]
ARMS = {a: (rec, PREVIOUS + ov if rec == "grounded" else ov) for a, (rec, ov) in ARMS.items()}
MAIN = ("g_qk_last_2e4", "grounded", "ral", "grounded_v1", "reward", "advantage")
VARIANTS = tuple(a for a in ARMS if a not in MAIN)
ARM_WORDS = {"g_qk_last_2e4": "the default recipe since this round (assets/recipes/grounded.yaml: the previous "
                              "default's terms, training only the last layer's query and key projections at lr 2e-4)",
             "grounded": "the previous default (the same terms with full fine-tuning of the language model at lr "
                         "5e-5; assets/recipes/grounded.yaml when these runs were made)",
             "ral": "plain RAL at the Train tab's length (`--config ral steps=20`)",
             "grounded_v1": "the previous default (the KL target on the head mean of the last layer, λ_ground 0.3; "
                            "older engine)",
             "reward": "RAL plus the SAYO attention reward (weight 0.5) instead of a target term (older engine)",
             "advantage": "the previous default's target weighted by the advantage, λ_ground 1 (older engine)"}
DEFAULT_WORDS = "RAL plus the JSD target on head 3 of the last layer"
JSD_VISIBLE, MASS_VISIBLE, ACC_TOLERANCE, TIME_LIMIT_S = 0.05, 0.10, 0.01, 90.0
MARGIN = -0.005  # the accuracy half "with margin": mean held-out at most half a point below `default`
# the recipe this document proposed for the default (the default since: assets/recipes/grounded.yaml), the seeds it
# was chosen on and the seeds run after the choice to confirm it
CANDIDATE, CHOSEN_ON, CONFIRM_ON = "g_qk_last_2e4", (0, 1, 2, 3, 4), (5, 6, 7)
CANDIDATE_WORDS = ("full fine-tuning of only the last decoder layer's query and key projections (`train_layers=last "
                   "train_modules=qk`: where the last layer looks, not what it reads), at lr 2e-4")
N_EVAL = 400


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def held_out(model: str) -> dict:
    from ral_core.data import GroundingTask
    from ral_core.evaluate import accuracy
    from ral_core.models import load_adapter
    return accuracy(load_adapter(model), GroundingTask(kinds=("cell", "row", "where"), split="test"), N_EVAL)


def examples_moved(model: str) -> list[dict]:
    """Compare `default` (A) with `model` (B) on each bundled grid example: the last layer's largest head JSD and
    on-target mass, as the Compare tab's magnitude line states them."""
    from ral_core.compare import EXAMPLES_DIR, compare, magnitude
    from ral_core.images import load_image
    from ral_core.models import load_adapter
    a, b = load_adapter("default"), load_adapter(model)
    out = []
    for e in json.loads((EXAMPLES_DIR / "examples.json").read_text()):
        cmp = compare(a, b, load_image(EXAMPLES_DIR / e["image"]), e["question"], max_new_tokens=12)
        m = magnitude(cmp, layer=a.num_layers - 1, boxes=e.get("boxes"), expected=e.get("answer"))
        out.append({"example": e["image"], "question": e["question"], "head_jsd": m.head_jsd, "layer": m.layer,
                    "head": m.head, "target_a": m.target_a, "target_b": m.target_b, "answer_a": m.answer_a,
                    "answer_b": m.answer_b, "line": m.line()})
    return out


def run_arm(arm: str, seed: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    recipe, overrides = ARMS[arm]
    out = WORK / f"{arm}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(recipe, overrides + [f"seed={seed}", f"output_dir={out}", "threads=1"])
    load_before = _common.loadavg()
    c0, t0 = cpu_s(), time.time()
    tr = Trainer(cfg)
    res = tr.train()
    wall, cpu = time.time() - t0, cpu_s() - c0
    ck = str(tr.latest_checkpoint())
    hist = tr.history
    rec = {"doc": "visible", "arm": arm, "seed": seed, "recipe": recipe, "overrides": overrides,
           "config": cfg.to_dict(), "train_wall_s": wall, "train_cpu_s": cpu, "warnings": res.get("warnings", []),
           "curve": [{k: h.get(k) for k in ("step", "reward", "attn_target_mass", "attn_target_share",
                                            "attn_sink_share", "loss_ground_kl", "loss_ground_jsd",
                                            "loss_ground_mass")} for h in hist],
           "examples": examples_moved(ck), "heldout": held_out(ck), "machine": _common.machine_info(),
           "code": _common.code_version(), "load_before": load_before}
    _common.dump_record(RECORDS / f"{arm}_s{seed}.json", rec)
    return rec


def base_record() -> dict:
    path = RECORDS / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    rec = {"doc": "visible", "arm": "base", "model": "default", "heldout": held_out("default")}
    _common.dump_record(path, rec)
    return rec


def verdict(rec: dict, base: dict) -> dict:
    ex = rec["examples"]
    best = max(ex, key=lambda e: e["head_jsd"])
    mass_up = max((e["target_b"] or 0) - (e["target_a"] or 0) for e in ex)
    d_acc = rec["heldout"]["accuracy"] - base["heldout"]["accuracy"]
    return {"first_jsd": ex[0]["head_jsd"], "max_jsd": best["head_jsd"], "min_jsd": min(e["head_jsd"] for e in ex),
            "mass_up": mass_up, "d_acc": d_acc,
            "visible_first": ex[0]["head_jsd"] >= JSD_VISIBLE or (ex[0]["target_b"] or 0) - (ex[0]["target_a"] or 0)
            >= MASS_VISIBLE, "acc_ok": d_acc >= -ACC_TOLERANCE - 1e-9}


# settings a record's run differed in, read from its resolved config (so a row says what ran, whatever the recipe
# file said at the time)
SETTINGS = ("task_kinds", "steps", "prompts_per_step", "group_size", "minibatch_size", "epochs", "lr", "schedule",
            "warmup_steps", "temperature", "lora_r", "train_layers", "train_modules", "advantage_scale", "loss_norm",
            "beta", "lambda_attn", "lambda_ground", "ground_div", "ground_on", "ground_layers", "ground_heads",
            "attn_layers", "attn_row", "reward_weights")
# fields older records predate
CONFIG_DEFAULTS = {"ground_layers": "policy", "ground_heads": "mean", "train_layers": "all", "train_modules": "all"}


def settings(rec: dict, ref: dict) -> str:
    """The run's settings that differ from `ref` (the default recipe's resolved config)."""
    cfg = {**CONFIG_DEFAULTS, **rec["config"]}
    diff = [f"{k}={cfg.get(k)}" for k in SETTINGS if cfg.get(k) != ref.get(k)]
    return " ".join(diff).replace("|", "/") or "(the default)"


def engine(rec: dict) -> str:
    return "current" if rec.get("code") else "older"


def summary(rs: list[dict], base: dict) -> dict:
    from statistics import mean
    vs = [verdict(r, base) for r in rs]
    return {"n": len(rs), "visible": sum(v["visible_first"] for v in vs), "kept": sum(v["acc_ok"] for v in vs),
            "both": sum(v["visible_first"] and v["acc_ok"] for v in vs),
            "jsd_mean": mean(v["first_jsd"] for v in vs), "jsd_min": min(v["first_jsd"] for v in vs),
            "d_mean": 100 * mean(v["d_acc"] for v in vs), "d_seeds": [100 * v["d_acc"] for v in vs],
            "cpu": mean(r["train_cpu_s"] for r in rs), "wall": max(r["train_wall_s"] for r in rs),
            "meets": len(rs) >= 3 and all(v["visible_first"] for v in vs)
            and mean(v["d_acc"] for v in vs) >= -ACC_TOLERANCE - 1e-9}


def by_arm(recs: list[dict], arm: str) -> list[dict]:
    return sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["seed"])


def reading(recs: list[dict], base: dict) -> list[str]:
    """What the main table says, with its numbers computed from the records."""
    from statistics import mean
    g, r = by_arm(recs, "grounded"), by_arm(recs, "ral")
    if not (g and r):
        return []
    sg, sr = summary(g, base), summary(r, base)
    picked = [x for x in g if x.get("selected_as")]
    fresh = [x for x in g if not x.get("selected_as")]
    ral_by_seed = {x["seed"]: x["heldout"]["accuracy"] for x in r}
    paired = [100 * (x["heldout"]["accuracy"] - ral_by_seed[x["seed"]]) for x in g if x["seed"] in ral_by_seed]
    t = _common.paired_t(paired)
    e0 = [x["examples"][0] for x in g]
    out = ["Reading it:", "",
           f"- The previous default (`grounded`: {DEFAULT_WORDS}, full fine-tuning at lr 5e-5) moves the last layer's image attention visibly on the first "
           f"example in {sg['visible']}/{sg['n']} seeds (largest head JSD {sg['jsd_mean']:.3f} on the mean, "
           f"{sg['jsd_min']:.3f} at the least; plain RAL at the same length on the same engine: {sr['visible']}/"
           f"{sr['n']}, {sr['jsd_mean']:.3f}). Its held-out accuracy is {sg['d_mean']:+.2f} pt from `default` on the "
           f"mean (within 1 point in {sg['kept']}/{sg['n']} seeds), plain RAL's {sr['d_mean']:+.2f} pt (within 1 point "
           f"in {sr['kept']}/{sr['n']}): against plain RAL the target term moves held-out accuracy by {t['mean']:+.2f} ± "
           f"{t['se']:.2f} pt, "
           f"paired by seed (n = {t['n']}, p = {_common.fmt_p(t['p'])}). Both halves of the criterion on the mean "
           f"over seeds, every seed visible: {'met' if sg['meets'] else 'not met'}; both halves in every single "
           f"seed: {sg['both']}/{sg['n']}.",
           *([f"- How the previous default was chosen: seeds {', '.join(str(x['seed']) for x in picked)} ran as the variant "
              f"`{picked[0]['selected_as']}` (the same resolved config), one of the λ_ground values and divergences "
              "screened below on the same seeds; picking the best of several on those seeds flatters it there. Seeds "
              f"{', '.join(str(x['seed']) for x in fresh)} ran after the choice: "
              + _fresh_words(fresh, r, base)] if picked and fresh else []),
           f"- The margin: on the mean over all {sg['n']} seeds the accuracy half {_margin(sg['d_mean'])}"
           + (f", on the seeds run after the choice alone it {_margin(summary(fresh, base)['d_mean'])}" if fresh
              else "")
           + f"; plain RAL at the same length sits at {sr['d_mean']:+.2f} pt. RL at this length and lr lowers greedy "
           "held-out accuracy by about a point by itself, RAL's own term being near silent; what these runs support is "
           "that the target term adds "
           f"no cost to RAL that {t['n']} paired seeds can detect, not that it kept accuracy within a point "
           "with room to spare (the default below does).",
           f"- Training took {sg['cpu']:.0f} s of CPU (one thread) on the mean; wall time was at most "
           f"{sg['wall']:.0f} s with the machine shared (1-minute load about {_load(g)} on 2 CPUs). The run's own "
           "cost is its CPU time: on an idle 2-core machine its wall time is close to that, well inside 90 s (not "
           "measured here: the machine was never idle).",
           f"- What moves is where one head's image attention goes (the JSD is over the visual tokens); the share of "
           f"the whole row that the last layer's head mean gives the target cell stays small "
           f"({min(x['target_b'] for x in e0):.3f}–{max(x['target_b'] for x in e0):.3f} after, from "
           f"{mean(x['target_a'] for x in e0):.3f}), so the on-target-mass route to \"visible\" (+0.10) is out of "
           "reach in a run this short.",
           f"- Held-out noise: the \"where\" questions (n = {base['heldout']['per_kind_n']['where']}, near chance) "
           f"alone span {_where_span(g + r)} questions between seeds of these two recipes (one question is 0.25 pt "
           "of the overall accuracy); a 1-point criterion on one seed is mostly that noise, hence the mean over "
           "seeds.", ""]
    return out


def _margin(d_mean: float) -> str:
    m = d_mean + 100 * ACC_TOLERANCE
    return f"holds by {m:.2f} pt" if m >= -1e-9 else f"misses by {-m:.2f} pt"


def _load(rs: list[dict]) -> str:
    xs = [float(x.split()[0]) for r in rs for x in (r.get("load_before"), r["machine"].get("loadavg")) if x]
    return f"{min(xs):.0f}–{max(xs):.0f}"


def _where_span(rs: list[dict]) -> int:
    hits = [round(r["heldout"]["per_kind"]["where"] * r["heldout"]["per_kind_n"]["where"]) for r in rs]
    return max(hits) - min(hits)


def _fresh_words(fresh: list[dict], ral: list[dict], base: dict) -> str:
    sf = summary(fresh, base)
    ral_by_seed = {x["seed"]: x["heldout"]["accuracy"] for x in ral}
    d = [100 * (x["heldout"]["accuracy"] - ral_by_seed[x["seed"]]) for x in fresh if x["seed"] in ral_by_seed]
    from statistics import mean
    return (f"visible in {sf['visible']}/{sf['n']} (JSD {sf['jsd_mean']:.3f} on the mean, {sf['jsd_min']:.3f} at the "
            f"least), held-out {sf['d_mean']:+.2f} pt on the mean (" + " / ".join(f"{v:+.2f}" for v in sf["d_seeds"])
            + f"), {mean(d):+.2f} pt against plain RAL on the same seeds." if d else ".")


def variants_table(recs: list[dict], base: dict, arms: list[str], ref: dict) -> list[str]:
    """Every other recipe tried, against both halves per seed."""
    if not arms:
        return []
    out = ["## Variants tried", "",
           "Each row: the settings in which the run differed from the default recipe (read from the record's "
           "resolved config), the engine (current: with the snapshot RNG fix; older: records of an earlier session, "
           "before it, whose trajectories differ where snapshots ran), and both halves per seed. \"Both\" counts "
           "seeds that meet both halves.", "",
           "| arm | settings (vs the default) | engine | seeds | first-example JSD (mean, min) | held-out Δ (mean; "
           "per seed) | both | train CPU s (mean) |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = by_arm(recs, arm)
        s = summary(rs, base)
        out.append(f"| {arm} | {settings(rs[0], ref)} | {engine(rs[0])} | {s['n']} | {s['jsd_mean']:.3f}, "
                   f"{s['jsd_min']:.3f} | {s['d_mean']:+.2f} pt; " + " / ".join(f"{d:+.2f}" for d in s["d_seeds"])
                   + f" | {s['both']}/{s['n']} | {s['cpu']:.0f} |")
    return out + [""] + variants_reading(recs, base, arms) + [""]


def variants_reading(recs: list[dict], base: dict, arms: list[str]) -> list[str]:
    """Which arms meet the criterion over ≥ 3 seeds, and where the held-out cost sits per question kind."""
    from statistics import mean
    met = [a for a in arms if summary(by_arm(recs, a), base)["meets"]]
    kinds = base["heldout"]["per_kind"]

    def cost(rs):
        return ", ".join(f"{k} {100 * mean(r['heldout']['per_kind'][k] - v for r in rs):+.1f} pt"
                         for k, v in kinds.items())
    heads = [r for r in recs if r["arm"] in arms and {**CONFIG_DEFAULTS, **r["config"]}["ground_heads"] != "mean"]
    kl_heads = [r for r in heads if r["config"]["ground_div"] == "kl" and r["config"]["lambda_ground"] == 0.3
                and r["config"]["lr"] == 5e-5 and r["config"]["beta"] == 0]
    named = [(w, by_arm(recs, a)) for a, w in (("grounded", "the previous default"), ("ral", "plain RAL"),
                                               ("grounded_v1", "the previous default (`grounded_v1`, older engine)"))]
    margin = [a for a in met if summary(by_arm(recs, a), base)["d_mean"] >= 100 * MARGIN - 1e-9]
    out = [f"- Variants that meet the criterion over ≥ 3 seeds (every seed visible, mean held-out within 1 point): "
           f"{', '.join(met) if met else 'none'}; of them with the margin asked (mean ≥ {100 * MARGIN:+.1f} pt): "
           f"{', '.join(f'{a} ({len(by_arm(recs, a))} seeds)' for a in margin) if margin else 'none'}. Most of these "
           "rows have 1–3 seeds: at ±0.7 pt of seed-to-seed spread, their means mostly differ by noise.",
           "- Where the held-out cost sits, per question kind, vs `default`: "
           + "; ".join(f"{w} {cost(rs)}" for w, rs in named if rs) + "."]
    if kl_heads:
        out.append("- The KL target on one head of the last layer (λ 0.3, one seed each) depends on the head: "
                   + "; ".join(f"head {r['config']['ground_heads']}: JSD {r['examples'][0]['head_jsd']:.3f}, "
                               f"{100 * (r['heldout']['accuracy'] - base['heldout']['accuracy']):+.2f} pt"
                               for r in sorted(kl_heads, key=lambda r: str(r['config']['ground_heads'])))
                   + ". Head 3 moves most.")
    by = {(r["arm"], r["seed"]): r for r in recs}
    d = lambda r: 100 * (r["heldout"]["accuracy"] - base["heldout"]["accuracy"])  # noqa: E731
    if ("head3", 0) in by and ("head3_jsd", 0) in by:
        short = by_arm(recs, "head3_jsd_05_short")
        out.append(f"- On head 3 at the same weight (0.3, seed 0) the bounded JSD cost {d(by['head3_jsd', 0]):+.2f} pt "
                   f"where the KL (whose pull grows as the head's attention on the box shrinks) cost "
                   f"{d(by['head3', 0]):+.2f} pt. In those one-seed screens of the KL target a lower lr, or a KL "
                   "anchor to the reference (beta 1), did not lower the cost"
                   + (f"; half the steps raised it ({summary(short, base)['d_mean']:+.2f} pt over {len(short)} seeds; "
                      "why: see 'Where the cost comes from')" if short else "")
                   + ".")
    tiny = by_arm(recs, "g_lr_tiny")
    if tiny:
        out.append(f"- `g_lr_tiny` (lr 1e-9, a check, not a recipe): held-out {d(tiny[0]):+.2f} pt, largest head JSD "
                   f"{tiny[0]['examples'][0]['head_jsd']:.3f}: training's bookkeeping (checkpoint, reload, scoring) "
                   "costs nothing; the cost is the weights' movement.")
    low = [(a, by_arm(recs, a)) for a in ("head3_halflr", "g_lr25") if by_arm(recs, a)]
    low_seeds = {x["seed"] for x in by_arm(recs, "g_lr25")}
    if low:
        out.append("- The lower-lr oddity over more seeds: " + "; ".join(
            f"`{a}` ({settings(rs[0], {**CONFIG_DEFAULTS, **by_arm(recs, 'grounded')[0]['config']})}) "
            f"{summary(rs, base)['d_mean']:+.2f} pt over seeds {', '.join(str(r['seed']) for r in rs)} "
            f"(cell questions {_items(rs, base, 'cell'):+.1f} on the mean)" for a, rs in low)
           + f". With the KL target at half the lr the loss repeats on every seed, nearly all of it on cell questions; "
             f"with today's JSD target half the lr costs about what the default costs on the same seeds "
             f"({summary([r for r in by_arm(recs, 'grounded') if r['seed'] in low_seeds], base)['d_mean']:+.2f} pt). "
             "It is not seed noise, and not the lr as such: see 'Where the cost comes from'.")
    return out


def _items(rs: list[dict], base: dict, kind: str) -> float:
    """Mean change in the number of `kind` questions answered right, vs `default` (n = 400 held-out)."""
    from statistics import mean
    b = base["heldout"]
    return mean(round(r["heldout"]["per_kind"][kind] * r["heldout"]["per_kind_n"][kind])
                - round(b["per_kind"][kind] * b["per_kind_n"][kind]) for r in rs)


def _weights() -> dict:
    """Weight counts of `default`: all, its language model, and the last layer's query and key projections."""
    from ral_core.models import load_adapter
    from ral_core.vision_cache import is_vision_param
    named = list(load_adapter("default").model.named_parameters())
    last = max(int(n.split(".layers.")[1].split(".")[0]) for n, _ in named
               if ".layers." in n and not is_vision_param(n))
    return {"all": sum(p.numel() for _, p in named),
            "language model": sum(p.numel() for n, p in named if not is_vision_param(n)),
            "last qk": sum(p.numel() for n, p in named if f".layers.{last}.self_attn." in n and not is_vision_param(n)
                           and n.split(".")[-2] in ("q_proj", "k_proj"))}


def candidate_section(recs: list[dict], base: dict) -> list[str]:
    """The default recipe (proposed here, then adopted), on the seeds it was chosen on and on fresh ones."""
    from statistics import mean
    c, g = by_arm(recs, CANDIDATE), {r["seed"]: r for r in by_arm(recs, "grounded")}
    if not c:
        return []
    chosen = [r for r in c if r["seed"] in CHOSEN_ON]
    after = [r for r in c if r["seed"] not in CHOSEN_ON]
    screened = sorted({r["arm"] for r in recs if r["arm"].startswith("g_") and r["arm"] not in (CANDIDATE, "g_lr_tiny")
                       and r["seed"] in CHOSEN_ON})
    b = base["heldout"]["accuracy"]

    def part(rs, words):
        s = summary(rs, base)
        paired = [100 * (r["heldout"]["accuracy"] - g[r["seed"]]["heldout"]["accuracy"]) for r in rs if r["seed"] in g]
        return (f"- {words} (seeds {', '.join(str(r['seed']) for r in rs)}): visible on the first example in "
                f"{s['visible']}/{s['n']} (largest last-layer head JSD {s['jsd_mean']:.3f} on the mean, {s['jsd_min']:.3f} "
                f"at the least; the criterion 0.05), held-out {s['d_mean']:+.2f} pt vs `default` on the mean ("
                + " / ".join(f"{v:+.2f}" for v in s["d_seeds"]) + ")"
                + (f", {mean(paired):+.2f} pt against the previous default on the same seeds" if paired else "") + ".")
    out = [f"## The default recipe: `{CANDIDATE}` (assets/recipes/grounded.yaml)", "",
           f"The previous default recipe with one change in what trains: {CANDIDATE_WORDS}. The terms are the same (GRPO, "
           "RAL's term, the JSD target on head 3 of the last layer, λ_ground 0.4, 20 steps).", ""]
    rs_all = c
    s = summary(rs_all, base)
    out += [part(chosen, f"Chosen against {len(screened)} other variants of the previous default screened on these "
                         "seeds (1–5 seeds each, `g_*` in the table below; picking the best of many flatters it here)")]
    fresh_a = [r for r in after if r["seed"] in CONFIRM_ON]
    fresh_b = [r for r in after if r["seed"] not in CONFIRM_ON]
    if fresh_a:
        out.append(part(fresh_a, "Run after the choice"))
    if fresh_b:
        out.append(part(fresh_b, "Further fresh seeds, also after the choice"))
    paired = [100 * (r["heldout"]["accuracy"] - g[r["seed"]]["heldout"]["accuracy"]) for r in c if r["seed"] in g]
    t = _common.paired_t(paired) if len(paired) >= 2 else None
    met = s["visible"] == s["n"] and s["d_mean"] >= 100 * MARGIN
    out.append(f"- All {s['n']} seeds: visible in {s['visible']}/{s['n']}, held-out {s['d_mean']:+.2f} pt on the mean "
               f"(within 1 point in {s['kept']}/{s['n']}; at or above {100 * MARGIN:+.1f} pt in "
               f"{sum(d >= 100 * MARGIN - 1e-9 for d in s['d_seeds'])}/{s['n']})"
               + (f"; against the previous default, paired by seed, {t['mean']:+.2f} ± {t['se']:.2f} pt (n = {t['n']}, "
                  f"p = {_common.fmt_p(t['p'])}; the seeds of the choice included)" if t else "")
               + f". Both halves of the criterion, the accuracy half with margin (mean at or above "
               f"{100 * MARGIN:+.1f} pt): {'met' if met else 'not met'}. Per question kind vs `default` (questions "
               "right, mean over seeds; n = "
               + ", ".join(f"{k} {v}" for k, v in base["heldout"]["per_kind_n"].items()) + "): "
               + ", ".join(f"{k} {_items(c, base, k):+.1f}" for k in base["heldout"]["per_kind"])
               + "; the previous default on the same seeds: "
               + ", ".join(f"{k} {_items([g[r['seed']] for r in c if r['seed'] in g], base, k):+.1f}"
                           for k in base["heldout"]["per_kind"]) + ".")
    gs = [g[r["seed"]] for r in c if r["seed"] in g]

    def per_example(rs):
        return ", ".join(f"{e['example'].removesuffix('.png')} {mean(r['examples'][i]['head_jsd'] for r in rs):.3f}"
                         for i, e in enumerate(rs[0]["examples"]))

    def changed(rs):
        return sum(e["answer_a"] != e["answer_b"] for r in rs for e in r["examples"])
    out.append(f"- On every bundled example (largest last-layer head JSD, mean over seeds): {per_example(c)}; the head "
               f"that moves most on the first: " + ", ".join(sorted({f"layer {r['examples'][0]['layer']} head "
                                                                     f"{r['examples'][0]['head']}" for r in c}))
               + f". Answers on the bundled examples that differ from `default`'s: {changed(c)} of "
               f"{sum(len(r['examples']) for r in c)}"
               + (f" (the previous default on the same seeds: {per_example(gs)}; {changed(gs)} answers differ)." if gs
                  else "."))
    out += wide_lines(base, recs)
    w = _weights()
    rq = by_arm(recs, "ral_qk_last_2e4")
    if rq:
        sq = summary(rq, base)
        sr = summary(by_arm(recs, "ral"), base)
        out.append(f"- Plain RAL with the same restriction (`ral_qk_last_2e4`, no target term): held-out "
                   f"{sq['d_mean']:+.2f} pt over {sq['n']} seeds (unrestricted plain RAL: {sr['d_mean']:+.2f} over "
                   f"{sr['n']}), largest head JSD {sq['jsd_mean']:.3f}: without the target term nothing visible moves, "
                   "and the target term adds no cost these seeds can detect.")
    out += [f"- Training: {s['cpu']:.0f} s of CPU (one thread) on the mean, wall at most {s['wall']:.0f} s with the "
            f"machine shared; it trains {w['last qk']:,} of the model's {w['all']:,} weights (the last layer's query "
            "and key projections), so the backward pass and the optimizer do less.",
            f"- Why it helps (see 'Where the cost comes from'): the previous default's cost is drift over all the weights RL "
            "updates, taken together; here only the weights that set where the last layer looks can move, and at lr "
            "2e-4 they move the head visibly (JSD about 3× the criterion), while the values, output projections, "
            "MLPs and embeddings, the weights that turn what a layer attends to into an answer, stay as they were. "
            "Around it: " + "; ".join(f"{words} (`{a}`, {sa['n']} seeds): {sa['d_mean']:+.2f} pt, JSD ≥ "
                                       f"{sa['jsd_min']:.3f}" for a, words in (
                                           ("g_qk_last_1e4", "lr 1e-4"), ("g_qk_last_5e4", "lr 5e-4"),
                                           ("g_attn_last_2e4", "the last layer's whole attention block"),
                                           ("g_qk_all", "q/k of every layer at lr 5e-5"),
                                           ("g_tl_layers", "every layer, only the embeddings frozen"))
                                       if by_arm(recs, a) and (sa := summary(by_arm(recs, a), base))) + ".",
            "- Not settled by these runs: other models (the restriction names the HF `q_proj`/`k_proj`/`q_norm`/"
            "`k_norm` weights; a model without them is refused with a message), longer runs, and whether the "
            "Compare picture a person sees is the same kind of change (the head that moves is still head 3 of the "
            "last layer, as today).", ""]
    return out


def diagnostics_section(diag: dict | None, base: dict) -> list[str]:
    """Where the held-out cost comes from, from diagnostics.json (`--diagnose`)."""
    if not diag:
        return []
    from statistics import mean
    b = base["heldout"]
    b_counts = {k: round(v * b["per_kind_n"][k]) for k, v in b["per_kind"].items()}
    tr = diag["trajectories"]
    out = ["## Where the cost comes from", "",
           f"From `python bench/visible_bench.py --diagnose` (bench/records/visible/diagnostics.json; {diag['code']}; "
           f"machine: {_common.machine_line(diag['machine'])}). Each run below trains with a checkpoint every 2 steps "
           "(training itself unchanged: the previous default's step-20 checkpoints score exactly as its records); every "
           "checkpoint is scored as `ral eval --n 400` does.", "",
           "Held-out accuracy along a run, in points vs `default` (cell / row / where: change in questions right):", "",
           "| run | seed | " + " | ".join(f"step {p['step']}" for p in tr[0]["points"]) + " |",
           "|---|---|" + "---|" * len(tr[0]["points"]) + ""]
    for r in tr:
        pts = {p["step"]: p for p in r["points"]}
        cells = []
        for p in tr[0]["points"]:
            q = pts.get(p["step"])
            cells.append("" if q is None else f"{100 * (q['accuracy'] - b['accuracy']):+.2f} ("
                         + "/".join(f"{q['counts'][k] - b_counts[k]:+d}" for k in b_counts) + ")")
        more = [p for p in r["points"] if p["step"] > tr[0]["points"][-1]["step"]]
        out.append(f"| {r['label']} | {r['seed']} | " + " | ".join(cells) + " |"
                   + (" then " + ", ".join(f"step {p['step']} {100 * (p['accuracy'] - b['accuracy']):+.2f} (" + "/".join(
                       f"{p['counts'][k] - b_counts[k]:+d}" for k in b_counts) + ")" for p in more[1::2])
                      if more else ""))
    dflt = [r for r in tr if r["label"] == "default"]
    at2 = [100 * (r["points"][0]["accuracy"] - b["accuracy"]) for r in tr if r["label"] in ("default", "ral")]
    out += ["", f"- The cost is there from the first steps: after 2 steps (8 optimizer updates) the previous default and plain "
                f"RAL are at {mean(at2):+.2f} pt on the mean over these runs, and they stay near −1 after; it does not "
                "grow with the run.",
            "- The oddities are one thing: a transient collapse on cell questions that later RL steps repair (the "
            "cell reward drops, and RL pushes back). At λ_ground 0.5 (seed 1) it reaches its worst at steps 10–12: the "
            "10-step variant (`head3_jsd_05_short`) stops there, the 20-step one after the repair. The KL target at "
            "half the lr goes through it more slowly, and at step 20 it sits in it (−5 pt, all cell questions); run "
            "on, it recovers and then collapses again on row questions. Where a run ends on such a trajectory, not "
            "the lr or the length as such, sets its cost; the bounded JSD target swings less than the KL one."]
    flips = {}
    for r in dflt:
        for k, v in r["flips"].items():
            flips.setdefault(k, []).append(v)
    lost, runs_with = {}, {}
    for i, r in enumerate(dflt):
        for x in r["lost"]:
            key = (x["kind"], x["answer"])
            lost.setdefault(key, []).append(x["trained"])
            runs_with.setdefault(key, set()).add(i)
    common = sorted(((k, v) for k, v in lost.items() if len(runs_with[k]) >= 2), key=lambda kv: -len(kv[1]))
    out.append(f"- Which questions flip (the previous default's step-20 checkpoints, seeds {', '.join(str(r['seed']) for r in dflt)}; "
               "mean per run): " + ", ".join(f"{k} {mean(v + [0] * (len(dflt) - len(v))):.1f}"
                                            for k, v in sorted(flips.items()))
               + ". The 'where' questions (near chance) churn both ways, a dozen each, which is most of the "
                 "seed-to-seed spread; the cell and row losses are a few questions that flip in most runs: "
               + "; ".join(f"{k[0]} '{k[1]}' answered '{'/'.join(sorted(set(v)))}': {len(v)} losses, in "
                           f"{len(runs_with[k])}/{len(dflt)} runs" for k, v in common[:4])
               + " (questions `default` answers right with a small margin).")
    groups = list(dflt[0]["groups"])
    out += ["- Which weights carry it (the previous default's step-20 checkpoints; held-out with one group of weights put back "
            "to `default`, or with only that group trained; mean over the seeds above):", "",
            "| group | drift (L2) | put back: Δ vs default | only it trained: Δ vs default |", "|---|---|---|---|"]
    for gname in groups:
        rows = [r["groups"][gname] for r in dflt]
        out.append(f"| {gname} | {mean(x['drift'] for x in rows):.3f} | "
                   f"{100 * (mean(x['reverted'] for x in rows) - b['accuracy']):+.2f} pt | "
                   f"{100 * (mean(x['only'] for x in rows) - b['accuracy']):+.2f} pt |")
    whole = mean(r["points"][-1]["accuracy"] for r in dflt if r["points"][-1]["step"] == 20)
    gm = {g: {k: 100 * (mean(r["groups"][g][k] for r in dflt) - b["accuracy"]) for k in ("reverted", "only")}
          for g in groups}
    back = max(gm, key=lambda g: gm[g]["reverted"])
    alone = min(gm, key=lambda g: gm[g]["only"])
    drift = mean(sum(r["groups"][g]["drift"] ** 2 for g in groups if g.startswith(("layer", "embed"))) ** 0.5
                 for r in dflt)
    n_lm = _weights()["language model"]
    out += ["", f"All trained: {100 * (whole - b['accuracy']):+.2f} pt. Putting the {back} back recovers the most "
                f"({gm[back]['reverted']:+.2f} pt), yet training only the {back} costs {gm[back]['only']:+.2f} pt, and "
                f"only {alone} {gm[alone]['only']:+.2f} pt: the groups' effects do not add up. The cost is the run's "
                "drift taken together, the attention blocks' part of it in combination with the rest, not one place.",
            "- A random perturbation (every language-model weight ±δ, random signs, as Adam's first updates move "
            f"them; {len(diag['noise'][0]['accuracy'])} draws each): " + ", ".join(
                f"δ {n['delta']:g} (L2 {n['delta'] * n_lm ** 0.5:.2f}): {100 * (mean(n['accuracy']) - b['accuracy']):+.2f} pt"
                for n in diag["noise"])
            + f". A default run's drift has L2 {drift:.2f} over the same weights and costs {100 * (whole - b['accuracy']):+.2f} "
              "pt: random drift of that size costs about half as much, so RL's direction, not only its size, does the "
              "rest."]
    qk = [r for r in tr if r["arm"] == CANDIDATE]
    if qk:
        out.append(f"- The default (`{CANDIDATE}`) along its runs: "
                   + "; ".join(f"seed {r['seed']}: " + ", ".join(f"{100 * (p['accuracy'] - b['accuracy']):+.2f}"
                                                                 for p in r["points"]) for r in qk)
                   + f" (every 2 steps; the lowest {min(100 * (p['accuracy'] - b['accuracy']) for r in qk for p in r['points']):+.2f} pt).")
    return out + [""]


def document(recs: list[dict], base: dict) -> str:
    from ral_core.config import build_config
    ref = {**CONFIG_DEFAULTS, **build_config("grounded").to_dict()}
    lines = ["# Does the default run visibly move attention?", "",
             "Generated by `python bench/visible_bench.py` (records: bench/records/visible/). Each run trains from "
             "`default` with the arm's recipe, then Compares its checkpoint against `default` on the bundled grid "
             "examples (last layer: the largest per-head JSD of the answer rows' image attention, and on-target mass "
             "of the head-mean map) and measures held-out accuracy as `ral eval --n 400` does. Criterion: largest "
             f"last-layer head JSD ≥ {JSD_VISIBLE} (or on-target mass up ≥ {MASS_VISIBLE}) on the first example in "
             f"every seed, held-out accuracy at most {100 * ACC_TOLERANCE:.0f} point below `default` on the mean over "
             f"seeds, training ≤ {TIME_LIMIT_S:.0f} s.", "",
             f"`default` held-out accuracy (n = {N_EVAL}): **{base['heldout']['accuracy']:.4f}** "
             f"{ {k: round(v, 3) for k, v in base['heldout']['per_kind'].items()} }.", ""]
    machines = {_common.machine_line(r["machine"]) for r in recs if r.get("machine")}
    codes = sorted({r["code"].split()[1] for r in recs if r.get("code")})
    dirty = sorted({f.strip(", ") for r in recs if "uncommitted" in r.get("code", "")
                    for f in r["code"].split("uncommitted changes in ", 1)[1].split(", ")})
    loads = [float(x.split()[0]) for r in recs for x in (r.get("load_before"), r["machine"].get("loadavg")) if x]
    lines += [f"Machine: {'; '.join(sorted(machines))}. The machine was shared with three other engineers' work while "
              f"these ran (1-minute load average {min(loads):.1f}–{max(loads):.1f} before/after the runs on 2 CPUs): "
              "wall times are contended; CPU time (one thread) is the run's own cost.", "",
              "Engine: \"current\" records ran on commits " + ", ".join(codes)
              + (f" (some with uncommitted changes in {', '.join(dirty)})" if dirty else "") + ": the training code of "
              "the snapshot RNG fix (commit cdd1dbb) and the grounded layer/head option (0da637e); the ral_core "
              "changes between those commits add a reward these runs do not use and touch no training path, and the "
              "train_layers / train_modules options (f44b701, 5ffac5c; the uncommitted changes in config.py and "
              "train_state.py are those options before their commits) change nothing at their default, all. "
              "\"Older\" records are from the previous session's engine, before the fix "
              "(a run's weights then depended on snapshot_every); they are kept for the screens they document and "
              "are not compared with current ones except as labelled.", ""]
    arms = [a for a in ARMS if any(r["arm"] == a for r in recs)]
    main_arms = [a for a in arms if a not in VARIANTS]
    lines += ["| arm | engine | seeds | visible on the first example | largest last-layer head JSD there (mean, min) | "
              "held-out Δ vs default (mean; per seed) | within 1 pt | train CPU s (mean) |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in main_arms:
        rs = by_arm(recs, arm)
        s = summary(rs, base)
        lines.append(f"| {arm} | {engine(rs[0])} | {s['n']} | {s['visible']}/{s['n']} | {s['jsd_mean']:.3f}, "
                     f"{s['jsd_min']:.3f} | {s['d_mean']:+.2f} pt; " + " / ".join(f"{d:+.2f}" for d in s["d_seeds"])
                     + f" | {s['kept']}/{s['n']} | {s['cpu']:.0f} |")
    lines += ["", "Arms: " + "; ".join(f"`{a}` {ARM_WORDS[a]}" for a in main_arms if a in ARM_WORDS) + ".", ""]
    lines += reading(recs, base)
    lines += candidate_section(recs, base)
    diag = RECORDS / "diagnostics.json"
    lines += diagnostics_section(json.loads(diag.read_text()) if diag.exists() else None, base)
    lines += variants_table(recs, base, [a for a in arms if a in VARIANTS], ref)
    for arm in arms:
        rs = by_arm(recs, arm)
        lines += [f"## {arm} ({engine(rs[0])} engine): {settings(rs[0], ref)}", "",
                  "As run (with the recipe file of the time; the heading's settings, from the records' resolved "
                  "configs, are what differed from today's default): " + "; ".join(
                      f"`ral train --config {rs[0]['recipe']}{''.join(' ' + o for o in ov)}` (seeds "
                      + ", ".join(str(r["seed"]) for r in rs if tuple(r["overrides"]) == ov) + ")"
                      for ov in dict.fromkeys(tuple(r["overrides"]) for r in rs)) + ".", "",
                  "| seed | train wall s | train CPU s | " + " | ".join(
                      f"JSD {e['example'].removesuffix('.png')}" for e in rs[0]["examples"])
                  + " | on-target A → B (first) | held-out | Δ vs default | visible | accuracy kept |",
                  "|---|---|---|" + "---|" * len(rs[0]["examples"]) + "---|---|---|---|---|"]
        for r in rs:
            v = verdict(r, base)
            e0 = r["examples"][0]
            lines.append(f"| {r['seed']} | {r['train_wall_s']:.0f} | {r['train_cpu_s']:.0f} | "
                         + " | ".join(f"{e['head_jsd']:.3f}" for e in r["examples"])
                         + f" | {e0['target_a']:.3f} → {e0['target_b']:.3f} | {r['heldout']['accuracy']:.4f} | "
                         f"{100 * v['d_acc']:+.2f} pt | {'yes' if v['visible_first'] else 'no'} | "
                         f"{'yes' if v['acc_ok'] else 'no'} |")
        s = summary(rs, base)
        lines += ["", f"Mean over {s['n']} seeds: held-out {s['d_mean']:+.2f} pt vs default, largest last-layer head "
                  f"JSD on the first example {s['jsd_mean']:.3f} (min {s['jsd_min']:.3f}), train CPU {s['cpu']:.0f} s; "
                  f"visible on the first example in {s['visible']}/{s['n']} seeds, accuracy kept in {s['kept']}/"
                  f"{s['n']}.", "", f"Magnitude lines (seed {rs[0]['seed']}):", ""]
        lines += [f"- {e['example']}: {e['line']}" for e in rs[0]["examples"]]
        lines.append("")
    return "\n".join(lines) + "\n"


# ---- where the held-out cost comes from (--diagnose → bench/records/visible/diagnostics.json) ----------------------
# trajectories: (label, arm, seed, extra overrides); checkpoints every 2 steps, each evaluated as `ral eval --n 400`
TRAJECTORIES = [("default", "grounded", s, []) for s in range(5)] + [("ral", "ral", s, []) for s in range(3)] + [
    ("default, λ_ground 0.5", "grounded", 1, ["lambda_ground=0.5"]),
    ("KL target at half the lr, 40 steps", "grounded", 0, ["ground_div=kl", "lambda_ground=0.3", "lr=2.5e-5",
                                                           "steps=40"]),
    ("qk of the last layer, lr 2e-4", "g_qk_last_2e4", 0, []), ("qk of the last layer, lr 2e-4", "g_qk_last_2e4", 1, [])]
PARAM_GROUPS = {"embeddings": "embed_tokens", "layer 0": ".layers.0.", "layer 1": ".layers.1.", "layer 2": ".layers.2.",
                "layer 3": ".layers.3.", "attention blocks": ".self_attn.", "MLPs": ".mlp."}
NOISE_DELTAS, NOISE_DRAWS = (5e-5, 2e-4, 5e-4, 1e-3), 4


def _counts(acc: dict) -> dict:
    return {k: round(v * acc["per_kind_n"][k]) for k, v in acc["per_kind"].items()}


def _trajectory(arm: str, seed: int, extra: list[str], task, default_answers) -> dict:
    """Held-out accuracy every 2 steps of one run; on its last checkpoint, which test questions flipped against
    `default` and what putting each parameter group back to `default` (or keeping only it trained) does."""
    import torch
    from ral_core.config import build_config
    from ral_core.evaluate import greedy_answers, normalize, score_answers
    from ral_core.models import load_adapter
    from ral_core.trainer import Trainer
    torch.set_num_threads(1)
    recipe, overrides = ARMS[arm]
    out = WORK / f"diag_{arm}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(recipe, overrides + extra + [f"seed={seed}", f"output_dir={out}", "threads=1", "save_every=2",
                                                    "keep_checkpoints=1000"])
    tr = Trainer(cfg)
    tr.train()
    samples = task.samples(N_EVAL)
    ask = lambda m: greedy_answers(m, [x.image for x in samples], [x.question for x in samples])  # noqa: E731
    points = []
    for ck in sorted((tr.out / "checkpoints").glob("step-*")):
        acc = score_answers(samples, ask(load_adapter(str(ck))))
        points.append({"step": int(ck.name.split("-")[1]), "accuracy": acc["accuracy"], "counts": _counts(acc)})
    last = load_adapter(str(ck))
    answers = ask(last)
    flips = {}
    for x, a0, a1 in zip(samples, default_answers, answers):
        r0, r1 = normalize(a0) == normalize(x.answer), normalize(a1) == normalize(x.answer)
        if r0 != r1:
            key = f"{x.kind} {'right→wrong' if r0 else 'wrong→right'}"
            flips[key] = flips.get(key, 0) + 1
    lost = [{"kind": x.kind, "answer": x.answer, "default": a0, "trained": a1}
            for x, a0, a1 in zip(samples, default_answers, answers)
            if x.kind != "where" and normalize(a0) == normalize(x.answer) != normalize(a1)]
    base_w = {n: p.detach().clone() for n, p in load_adapter("default").model.named_parameters()}
    trained = {n: p.detach().clone() for n, p in last.model.named_parameters()}
    groups = {}
    for g, part in PARAM_GROUPS.items():
        inside = lambda n: part in n and "visual" not in n  # noqa: E731
        row = {"drift": float(sum(((trained[n] - base_w[n]) ** 2).sum() for n in trained if inside(n)) ** 0.5)}
        for mode in ("reverted", "only"):
            with torch.no_grad():
                for n, p in last.model.named_parameters():
                    p.copy_(base_w[n] if inside(n) == (mode == "reverted") else trained[n])
            row[mode] = score_answers(samples, ask(last))["accuracy"]
        groups[g] = row
    shutil.rmtree(out, ignore_errors=True)
    return {"arm": arm, "seed": seed, "extra": extra, "config": cfg.to_dict(), "points": points,
            "reward": [h["reward"] for h in tr.history], "flips": flips, "lost": lost, "groups": groups}


def _noise(task) -> list[dict]:
    """`default` with every language-model weight moved by ±δ (random signs, as Adam's first updates move them)."""
    import torch
    from ral_core.evaluate import accuracy
    from ral_core.models import load_adapter
    from ral_core.vision_cache import is_vision_param
    m = load_adapter("default")
    w0 = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    out = []
    for delta in NOISE_DELTAS:
        accs = []
        for _ in range(NOISE_DRAWS):
            with torch.no_grad():
                for n, p in m.model.named_parameters():
                    sign = torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1
                    p.copy_(w0[n] + (0.0 if is_vision_param(n) else delta) * sign)
            accs.append(accuracy(m, task, N_EVAL)["accuracy"])
        out.append({"delta": delta, "accuracy": accs})
    return out


def diagnose(log) -> None:
    from ral_core.data import GroundingTask
    from ral_core.evaluate import greedy_answers
    from ral_core.models import load_adapter
    task = GroundingTask(kinds=("cell", "row", "where"), split="test")
    samples = task.samples(N_EVAL)
    default_answers = greedy_answers(load_adapter("default"), [x.image for x in samples], [x.question for x in samples])
    load_before = _common.loadavg()
    runs = []
    for label, arm, seed, extra in TRAJECTORIES:
        runs.append({"label": label, **_trajectory(arm, seed, extra, task, default_answers)})
        log(f"diagnose {label} seed {seed}: " + " ".join(f"{p['step']}:{100 * (p['accuracy'] - 0.69):+.2f}"
                                                         for p in runs[-1]["points"]))
    rec = {"doc": "visible", "arm": "diagnostics", "trajectories": runs, "noise": _noise(task),
           "machine": _common.machine_info(), "code": _common.code_version(), "load_before": load_before}
    _common.dump_record(RECORDS / "diagnostics.json", rec)


WIDE_N = 2000  # test-split questions of --wide: five times `ral eval --n 400`'s, its 400 among them


def wide(arms: list[str], seeds: list[int], log) -> None:
    """Held-out accuracy on WIDE_N test questions of each arm's run (trained as run_arm trains it, so the same
    weights): whether a difference on the 400 holds on questions the choice never saw."""
    import torch
    from ral_core.config import build_config
    from ral_core.data import GroundingTask
    from ral_core.evaluate import accuracy
    from ral_core.models import load_adapter
    from ral_core.trainer import Trainer
    torch.set_num_threads(1)
    task = GroundingTask(kinds=("cell", "row", "where"), split="test")
    path = RECORDS / "wide.json"
    rec = json.loads(path.read_text()) if path.exists() else {"doc": "visible", "arm": "wide", "n": WIDE_N, "runs": []}
    if "default" not in rec:
        rec["default"] = accuracy(load_adapter("default"), task, WIDE_N)
    for arm in arms:
        for seed in seeds:
            recipe, overrides = ARMS[arm]
            out = WORK / f"wide_{arm}_s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = build_config(recipe, overrides + [f"seed={seed}", f"output_dir={out}", "threads=1"])
            tr = Trainer(cfg)
            tr.train()
            acc = accuracy(load_adapter(str(tr.latest_checkpoint())), task, WIDE_N)
            rec["runs"] = [r for r in rec["runs"] if (r["arm"], r["seed"]) != (arm, seed)] + [
                {"arm": arm, "seed": seed, "heldout": acc}]
            shutil.rmtree(out, ignore_errors=True)
            log(f"wide {arm} seed {seed}: {acc['accuracy']:.4f} ({100 * (acc['accuracy'] - rec['default']['accuracy']):+.2f} "
                f"pt at n {WIDE_N})")
    rec.update(machine=_common.machine_info(), code=_common.code_version())
    _common.dump_record(path, rec)


def wide_lines(base: dict, recs: list[dict]) -> list[str]:
    """The default and the previous default on WIDE_N held-out questions (wide.json), beside their n 400 figures."""
    from statistics import mean
    path = RECORDS / "wide.json"
    if not path.exists():
        return []
    w = json.loads(path.read_text())
    d0 = w["default"]["accuracy"]
    by = {}
    for r in w["runs"]:
        by.setdefault(r["arm"], {})[r["seed"]] = 100 * (r["heldout"]["accuracy"] - d0)
    seeds = sorted(set(by.get(CANDIDATE, {})) & set(by.get("grounded", {})))
    if not seeds:
        return []
    paired = [by[CANDIDATE][s] - by["grounded"][s] for s in seeds]
    t = _common.paired_t(paired)
    kinds = w["default"]["per_kind_n"]
    return [f"- On {w['n']} held-out questions (test split, the 400 among them; `default` {d0:.4f}; "
            f"{', '.join(f'{k} {v}' for k, v in kinds.items())}), seeds {', '.join(str(s) for s in seeds)}: the "
            f"default {mean(by[CANDIDATE][s] for s in seeds):+.2f} pt ("
            + " / ".join(f"{by[CANDIDATE][s]:+.2f}" for s in seeds) + f"), the previous default "
            f"{mean(by['grounded'][s] for s in seeds):+.2f} pt (" + " / ".join(f"{by['grounded'][s]:+.2f}" for s in seeds)
            + f"); paired by seed {t['mean']:+.2f} ± {t['se']:.2f} pt (p = {_common.fmt_p(t['p'])}). The difference "
            "is not a property of the 400 questions the choice was made on."]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--collect", action="store_true", help="write the document from the records only")
    p.add_argument("--wide", action="store_true", help=f"held-out accuracy of --arms × --seeds on {WIDE_N} test "
                   "questions (wide.json)")
    p.add_argument("--diagnose", action="store_true", help="where the held-out cost comes from: accuracy along runs, "
                   "flipped questions, parameter groups put back, random perturbations (diagnostics.json)")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    log = _common.logger("visible")
    base = base_record()
    if a.diagnose:
        diagnose(log)
    elif a.wide:
        wide(a.arms, a.seeds, log)
    elif not a.collect:
        for arm in a.arms:
            for s in a.seeds:
                rec = run_arm(arm, s)
                v = verdict(rec, base)
                log(f"{arm} seed {s}: {rec['train_wall_s']:.0f} s wall, {rec['train_cpu_s']:.0f} s CPU, first-example "
                    f"JSD {v['first_jsd']:.3f}, held-out {rec['heldout']['accuracy']:.4f} ({100 * v['d_acc']:+.2f} pt)")
    recs = [json.loads(f.read_text()) for f in sorted(RECORDS.glob("*_s*.json"))]
    recs = [r for r in recs if r["arm"] in ARMS]
    _common.write_report(document(recs, base), a.out, False, log)


if __name__ == "__main__":
    sys.exit(main())
