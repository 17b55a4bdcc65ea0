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
        "head3_jsd_05_short": ("grounded", over(V1, ground_heads=3, ground_div="jsd", lambda_ground=0.5, steps=10))}
MAIN = ("grounded", "ral", "grounded_v1", "reward", "advantage")
VARIANTS = tuple(a for a in ARMS if a not in MAIN)
ARM_WORDS = {"grounded": "the default recipe (assets/recipes/grounded.yaml)",
             "ral": "plain RAL at the Train tab's length (`--config ral steps=20`)",
             "grounded_v1": "the previous default (the KL target on the head mean of the last layer, λ_ground 0.3; "
                            "older engine)",
             "reward": "RAL plus the SAYO attention reward (weight 0.5) instead of a target term (older engine)",
             "advantage": "the previous default's target weighted by the advantage, λ_ground 1 (older engine)"}
DEFAULT_WORDS = "RAL plus the JSD target on head 3 of the last layer"
JSD_VISIBLE, MASS_VISIBLE, ACC_TOLERANCE, TIME_LIMIT_S = 0.05, 0.10, 0.01, 90.0
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
SETTINGS = ("steps", "lr", "beta", "lambda_attn", "lambda_ground", "ground_div", "ground_on", "ground_layers",
            "ground_heads", "attn_layers", "attn_row", "reward_weights")
CONFIG_DEFAULTS = {"ground_layers": "policy", "ground_heads": "mean"}  # fields older records predate


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
           f"- The default (`grounded`: {DEFAULT_WORDS}) moves the last layer's image attention visibly on the first "
           f"example in {sg['visible']}/{sg['n']} seeds (largest head JSD {sg['jsd_mean']:.3f} on the mean, "
           f"{sg['jsd_min']:.3f} at the least; plain RAL at the same length on the same engine: {sr['visible']}/"
           f"{sr['n']}, {sr['jsd_mean']:.3f}). Its held-out accuracy is {sg['d_mean']:+.2f} pt from `default` on the "
           f"mean (within 1 point in {sg['kept']}/{sg['n']} seeds), plain RAL's {sr['d_mean']:+.2f} pt (within 1 point "
           f"in {sr['kept']}/{sr['n']}): against plain RAL the target term moves held-out accuracy by {t['mean']:+.2f} ± "
           f"{t['se']:.2f} pt, "
           f"paired by seed (n = {t['n']}, p = {_common.fmt_p(t['p'])}). Both halves of the criterion on the mean "
           f"over seeds, every seed visible: {'met' if sg['meets'] else 'not met'}; both halves in every single "
           f"seed: {sg['both']}/{sg['n']}.",
           *([f"- How the default was chosen: seeds {', '.join(str(x['seed']) for x in picked)} ran as the variant "
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
           f"no cost to RAL that {t['n']} paired seeds can detect, not that the default keeps accuracy within a point "
           "with room to spare.",
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
    named = [(w, by_arm(recs, a)) for a, w in (("grounded", "the default"), ("ral", "plain RAL"),
                                               ("grounded_v1", "the previous default (`grounded_v1`, older engine)"))]
    out = [f"- Variants that meet the criterion over ≥ 3 seeds (every seed visible, mean held-out within 1 point): "
           f"{', '.join(met) if met else 'none'}.",
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
                   f"{d(by['head3', 0]):+.2f} pt. A lower lr, or a KL anchor to the reference (beta), did not lower "
                   "the cost in these screens"
                   + (f"; half the steps raised it ({summary(short, base)['d_mean']:+.2f} pt over {len(short)} seeds: "
                      "a guess, not tested here: accuracy lost early in a run is partly won back by its later steps)" if short else "")
                   + ".")
    return out


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
              "changes between those commits add a reward these runs do not use and touch no training path. "
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--collect", action="store_true", help="write the document from the records only")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    log = _common.logger("visible")
    base = base_record()
    if not a.collect:
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
