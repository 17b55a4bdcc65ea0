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
# arm → (recipe, overrides); `grounded` is the default recipe of `ral train` and the Train tab
# and two grounded variants for contrast: the attention reward instead of the target term (SAYO's form, through the
# advantages), and the target term weighted by the advantage (signed, zero in groups without reward variance)
ARMS = {"grounded": ("grounded", []), "ral": ("ral", ["steps=20"]),
        "reward": ("ral", ["steps=20", "attn_row=predicts", "reward_weights={exact_match: 1.0, attention_box: 0.5}"]),
        "advantage": ("grounded", ["ground_on=advantage", "lambda_ground=1"]),
        # variants tuned for the accuracy half of the criterion (VARIANTS): half the lr with twice λ_ground (meant to
        # halve the GRPO drift and keep the target term's step; gradient clipping makes the two less separable), a
        # k3 KL to the frozen reference, the −log on-target share instead of KL to the box, the target term on
        # layers 2 and 3, and that term lighter and shorter
        "half_lr": ("grounded", ["lr=2.5e-5", "lambda_ground=0.6"]),
        "half_lr_kl": ("grounded", ["lr=2.5e-5", "lambda_ground=0.6", "beta=0.1"]),
        "layers23": ("grounded", ["lr=2.5e-5", "lambda_ground=0.6", "attn_layers=[2, 3]"]),
        "mass": ("grounded", ["ground_div=mass"]),
        "layers23_light": ("grounded", ["lr=2.5e-5", "lambda_ground=0.3", "attn_layers=[2, 3]"]),
        "layers23_short": ("grounded", ["lr=2.5e-5", "lambda_ground=0.3", "attn_layers=[2, 3]", "steps=10"])}
VARIANTS = ("half_lr", "half_lr_kl", "mass", "layers23", "layers23_light", "layers23_short")
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
    c0, t0 = cpu_s(), time.time()
    tr = Trainer(cfg)
    res = tr.train()
    wall, cpu = time.time() - t0, cpu_s() - c0
    ck = str(tr.latest_checkpoint())
    hist = tr.history
    rec = {"doc": "visible", "arm": arm, "seed": seed, "recipe": recipe, "overrides": overrides,
           "config": cfg.to_dict(), "train_wall_s": wall, "train_cpu_s": cpu, "warnings": res.get("warnings", []),
           "curve": [{k: h.get(k) for k in ("step", "reward", "attn_target_mass", "attn_target_share",
                                            "attn_sink_share", "loss_ground_kl", "loss_ground_mass")} for h in hist],
           "examples": examples_moved(ck), "heldout": held_out(ck), "machine": _common.machine_info()}
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


def reading(recs: list[dict], base: dict) -> list[str]:
    """What the table says, with its numbers computed from the records."""
    from statistics import mean

    def arm(a):
        rs = [r for r in recs if r["arm"] == a]
        return [verdict(r, base) for r in rs], rs
    if not all(any(r["arm"] == a for r in recs) for a in ("grounded", "ral")):
        return []
    (g, gr), (r, rr) = arm("grounded"), arm("ral")
    dg, dr = 100 * mean(v["d_acc"] for v in g), 100 * mean(v["d_acc"] for v in r)
    ral_by_seed = {x["seed"]: x["heldout"]["accuracy"] for x in rr}
    paired = [100 * (x["heldout"]["accuracy"] - ral_by_seed[x["seed"]]) for x in gr if x["seed"] in ral_by_seed]
    t = _common.paired_t(paired)
    kept = sum(v["acc_ok"] for v in g)
    e0 = [x["examples"][0] for x in gr]
    out = ["Reading it:", "",
           f"- The grounded default moves the last layer's image attention visibly on the first example in "
           f"{sum(v['visible_first'] for v in g)}/{len(g)} seeds (plain RAL at the same length: "
           f"{sum(v['visible_first'] for v in r)}/{len(r)}). Its held-out accuracy is {dg:+.2f} pt from `default` on "
           f"the mean (within 1 point in {kept}/{len(g)} seeds), plain RAL's {dr:+.2f} pt: the target term costs "
           f"{t['mean']:+.2f} ± {t['se']:.2f} pt against plain RAL, paired by seed (n = {t['n']}, p = "
           f"{_common.fmt_p(t['p'])}). On the mean the accuracy half of the criterion is "
           f"{'met' if dg >= -100 * ACC_TOLERANCE - 1e-9 else 'not met'}.",
           f"- What moves is where the image attention goes (the JSD is over the visual tokens); the share of the whole "
           f"row that the last layer gives the target cell stays small ({min(x['target_b'] for x in e0):.3f}–"
           f"{max(x['target_b'] for x in e0):.3f} after, from {mean(x['target_a'] for x in e0):.3f}): the last layer's "
           "answer rows give the image little of their attention, before and after.",
           "- The attention reward alone (SAYO's form, through the advantages) and the advantage-weighted target act "
           "only through reward differences within a group; in 20 steps neither makes the change visible.", ""]
    return out


def variants_table(recs: list[dict], base: dict, arms: list[str]) -> list[str]:
    """The recipes tried for the accuracy half of the criterion, each against both halves per seed."""
    from statistics import mean
    if not arms:
        return []
    out = ["## Variants tried", "",
           "Tuned for the accuracy half of the criterion, each from the grounded recipe with the overrides shown. "
           "\"Both\" counts seeds that meet both halves (visible on the first example and held-out within 1 point).",
           "", "| arm | overrides of `grounded` | seeds | first-example JSD (mean, min) | held-out Δ (mean; per seed) | "
           "both | train CPU s (mean) |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["seed"])
        vs = [verdict(r, base) for r in rs]
        out.append(f"| {arm} | {' '.join(rs[0]['overrides'])} | {len(rs)} | {mean(v['first_jsd'] for v in vs):.3f}, "
                   f"{min(v['first_jsd'] for v in vs):.3f} | {100 * mean(v['d_acc'] for v in vs):+.2f} pt; "
                   + " / ".join(f"{100 * v['d_acc']:+.2f}" for v in vs)
                   + f" | {sum(v['visible_first'] and v['acc_ok'] for v in vs)}/{len(rs)} | "
                   f"{mean(r['train_cpu_s'] for r in rs):.0f} |")
    return out + [""] + variants_reading(recs, base, arms) + [""]


def variants_reading(recs: list[dict], base: dict, arms: list[str]) -> list[str]:
    """Whether any variant beats the default, paired by seed, and where the held-out cost sits."""
    from statistics import mean
    by = {(r["arm"], r["seed"]): r for r in recs}
    acc = lambda r: 100 * r["heldout"]["accuracy"]  # noqa: E731
    rows = []
    for arm in arms:
        seeds = [s for (a, s) in by if a == arm and ("grounded", s) in by]
        if seeds:
            rows.append((arm, mean(acc(by[arm, s]) - acc(by["grounded", s]) for s in seeds), len(seeds)))
    met = [a for a in arms if all(verdict(r, base)["visible_first"] and verdict(r, base)["acc_ok"]
                                  for r in recs if r["arm"] == a)
           and sum(r["arm"] == a for r in recs) >= 3]
    kinds = base["heldout"]["per_kind"]
    tuned = [r for r in recs if r["arm"] in ("grounded", *arms)]
    cost = {k: 100 * mean(r["heldout"]["per_kind"][k] - v for r in tuned) for k, v in kinds.items()}
    ral_cost = {k: 100 * mean(r["heldout"]["per_kind"][k] - v for r in recs if r["arm"] == "ral")
                for k, v in kinds.items()}
    out = [f"- Meets both halves in every seed (≥ 3 seeds): {', '.join(met) if met else 'none'}. Against the grounded "
           "default on the same seeds (paired): " + "; ".join(f"{a} {d:+.2f} pt (n = {n})" for a, d, n in rows) + ".",
           "- Where the cost sits, per question kind (mean over the grounded default and the variants, vs `default`): "
           + ", ".join(f"{k} {v:+.1f} pt" for k, v in cost.items()) + "; plain RAL: "
           + ", ".join(f"{k} {v:+.1f} pt" for k, v in ral_cost.items())
           + ": the target term's cost falls on cell and row questions, plain RAL's on \"where\". No variant gains "
           f"more than {max(d for _, d, _ in rows):+.2f} pt on the default on the same seeds (the one-seed rows are "
           "screens), so the default recipe stays as it is."]
    l23 = [r for r in recs if r["arm"] in arms and "attn_layers=[2, 3]" in r["overrides"]]
    g = [r for r in recs if r["arm"] == "grounded"]
    if l23 and g:
        jsd = lambda rs, i: mean(r["examples"][i]["head_jsd"] for r in rs)  # noqa: E731
        rest = lambda rs: mean(e["head_jsd"] for r in rs for e in r["examples"][1:])  # noqa: E731
        out.append(f"- The target on layers 2 and 3 moves the last layer further on the first example (mean JSD "
                   f"{jsd(l23, 0):.3f} over its {len(l23)} runs, the default {jsd(g, 0):.3f}) but less on the other "
                   f"bundled examples (mean {rest(l23):.3f}, the default {rest(g):.3f}).")
    return out


def document(recs: list[dict], base: dict) -> str:
    from statistics import mean
    lines = ["# Does the default run visibly move attention?", "",
             "Generated by `python bench/visible_bench.py` (records: bench/records/visible/). Each run trains from "
             "`default` with the arm's recipe, then Compares its checkpoint against `default` on the bundled grid "
             "examples (last layer: the largest per-head JSD of the answer rows' image attention, and on-target mass "
             "of the head-mean map) and measures held-out accuracy as `ral eval --n 400` does. Criterion: largest "
             f"last-layer head JSD ≥ {JSD_VISIBLE} (or on-target mass up ≥ {MASS_VISIBLE}) on the first example, "
             f"held-out accuracy at most {100 * ACC_TOLERANCE:.0f} point below `default`, training ≤ "
             f"{TIME_LIMIT_S:.0f} s.", "",
             f"`default` held-out accuracy (n = {N_EVAL}): **{base['heldout']['accuracy']:.4f}** "
             f"{ {k: round(v, 3) for k, v in base['heldout']['per_kind'].items()} }.", ""]
    machines = {_common.machine_line(r["machine"]) for r in recs if r.get("machine")}
    lines += [f"Machine: {'; '.join(sorted(machines))}. The machine was shared with other work while these ran: wall "
              "times are contended; CPU time (one thread) is the run's own cost.", ""]
    arms = [a for a in ARMS if any(r["arm"] == a for r in recs)]
    main_arms = [a for a in arms if a not in VARIANTS]
    lines += ["| arm | seeds | visible on the first example | largest last-layer head JSD there (mean, min) | "
              "held-out Δ vs default (mean; per seed) | train CPU s (mean) |", "|---|---|---|---|---|---|"]
    for arm in main_arms:
        rs = sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["seed"])
        vs = [verdict(r, base) for r in rs]
        lines.append(f"| {arm} | {len(rs)} | {sum(v['visible_first'] for v in vs)}/{len(rs)} | "
                     f"{mean(v['first_jsd'] for v in vs):.3f}, {min(v['first_jsd'] for v in vs):.3f} | "
                     f"{100 * mean(v['d_acc'] for v in vs):+.2f} pt; "
                     + " / ".join(f"{100 * v['d_acc']:+.2f}" for v in vs)
                     + f" | {mean(r['train_cpu_s'] for r in rs):.0f} |")
    lines.append("")
    lines += reading(recs, base)
    lines += variants_table(recs, base, [a for a in arms if a in VARIANTS])
    for arm in arms:
        rs = sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["seed"])
        recipe, ov = rs[0]["recipe"], rs[0]["overrides"]
        lines += [f"## {arm}: `ral train --config {recipe}{''.join(' ' + o for o in ov)}`", "",
                  "| seed | train wall s | train CPU s | " + " | ".join(
                      f"JSD {e['example'].removesuffix('.png')}" for e in rs[0]["examples"])
                  + " | on-target A → B (first) | held-out | Δ vs default | visible | accuracy kept |",
                  "|---|---|---|" + "---|" * len(rs[0]["examples"]) + "---|---|---|---|---|"]
        vs = []
        for r in rs:
            v = verdict(r, base)
            vs.append(v)
            e0 = r["examples"][0]
            lines.append(f"| {r['seed']} | {r['train_wall_s']:.0f} | {r['train_cpu_s']:.0f} | "
                         + " | ".join(f"{e['head_jsd']:.3f}" for e in r["examples"])
                         + f" | {e0['target_a']:.3f} → {e0['target_b']:.3f} | {r['heldout']['accuracy']:.4f} | "
                         f"{100 * v['d_acc']:+.2f} pt | {'yes' if v['visible_first'] else 'no'} | "
                         f"{'yes' if v['acc_ok'] else 'no'} |")
        accs = [r["heldout"]["accuracy"] for r in rs]
        lines += ["", f"Mean over {len(rs)} seeds: held-out {mean(accs):.4f} "
                  f"({100 * (mean(accs) - base['heldout']['accuracy']):+.2f} pt vs default), largest last-layer head "
                  f"JSD on the first example {mean(v['first_jsd'] for v in vs):.3f} (min "
                  f"{min(v['first_jsd'] for v in vs):.3f}), train CPU {mean(r['train_cpu_s'] for r in rs):.0f} s; "
                  f"visible on the first example in {sum(v['visible_first'] for v in vs)}/{len(rs)} seeds, accuracy "
                  f"kept in {sum(v['acc_ok'] for v in vs)}/{len(rs)}.", ""]
        lines += ["Magnitude lines (seed " + str(rs[0]["seed"]) + "):", ""]
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
