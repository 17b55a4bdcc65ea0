"""Cost of the full head knock-out grid (ral_core/causal.py) → bench/results/causal.md.

    .venv/bin/python bench/causal_bench.py            # default model + Qwen2-VL-2B twin (cut to 1 and 2 layers)
    .venv/bin/python bench/causal_bench.py --quick    # smaller twin input, one repeat, prints instead of writing

Ways to fill the same layers × heads grid, timed side by side in one process (one torch thread):
- batched + shared prefix (shipped): one forward per layer through the capture function (`head_scale`), the image
  encoded once, the layers before the knocked-out one run as one row that forks into H rows there;
- batched: the same without the shared prefix (H rows from the input);
- per head: the same path with one variant per forward (chunk 1): 1 + L·H forwards of batch 1;
- naive (default model only): what a hand-made loop does, one forward per head with a pre-hook on o_proj zeroing
  the head's slice, the image re-encoded every time.
The Qwen2-VL-2B twin (real width, random weights, fp32) is cut to 1 and 2 decoder layers with a one-block vision
tower, as bench/real_bench.py does; each forward's time is fitted as a + b·layers from the two depths and the grid
is extrapolated to the published 28 layers. The machine is shared: CPU seconds are recorded next to wall seconds.
"""
from __future__ import annotations

import argparse
import os
import time

import _common as C

C.start()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = C.ROOT
OUT = ROOT / "bench" / "results" / "causal.md"
EXAMPLE = ROOT / "assets" / "examples" / "grid3_cell.png"
QUESTION = "What digit is in row 2 column 1?"
PHOTO = ROOT / "assets" / "examples" / "photos" / "chelsea.jpg"
TWIN, TWIN_LAYERS = "qwen2_vl_2b", 28
# (name, chunk, shared prefix)
MODES = [("batched + shared prefix", None, True), ("batched", None, False), ("per head", 1, False)]
log = C.logger("causal_bench")


def timed_grid(adapter, image, question, ids, chunk, share):
    """knockout() with each forward's wall and CPU seconds (from its progress calls): (result, [(wall, cpu)])."""
    from ral_core.causal import knockout

    marks = [(time.perf_counter(), time.process_time())]
    ko = knockout(adapter, image, question, ids, chunk=chunk, share_prefix=share,
                  progress=lambda k, n: marks.append((time.perf_counter(), time.process_time())))
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    return ko, steps


def naive_grid(adapter, image, question, ids):
    """One forward per head, o_proj pre-hook, pixels in every forward: (delta [L, H, T], wall, cpu)."""
    from ral_core import causal
    from ral_core.attention import decoder_attention_modules

    t0, c0 = time.perf_counter(), time.process_time()
    s = causal._prepare(adapter, image, question, ids)
    mods, H = decoder_attention_modules(adapter.model), adapter.num_heads
    with torch.no_grad():
        base = causal._answer_logp(adapter.model, s.inputs, ids)[0]
        out = np.zeros((len(adapter.attention_layers), H, len(ids)))
        for i, l in enumerate(adapter.attention_layers):
            o = mods[l].o_proj
            D = o.in_features // H
            for h in range(H):
                def zero(_m, args, h=h, D=D):
                    x = args[0].clone()
                    x[..., h * D:(h + 1) * D] = 0
                    return (x,)
                hook = o.register_forward_pre_hook(zero)
                try:
                    out[i, h] = (causal._answer_logp(adapter.model, s.inputs, ids)[0] - base).numpy()
                finally:
                    hook.remove()
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_default(repeats: int) -> dict:
    from ral_core.images import load_image
    from ral_core.inspection import inspect
    from ral_core.models import load_adapter

    a = load_adapter("default")
    im = load_image(EXAMPLE)
    ids = inspect(a, im, QUESTION, max_new_tokens=8).answer_ids
    rows = {}
    for mode, chunk, share in MODES:
        runs = []
        for _ in range(repeats):
            ko, steps = timed_grid(a, im, QUESTION, ids, chunk, share)
            runs.append((ko.seconds, ko.cpu_seconds))
        rows[mode] = {"forwards": ko.forwards, "wall": C.median([r[0] for r in runs]),
                      "cpu": C.median([r[1] for r in runs]), "delta": ko.delta}
    naive = [naive_grid(a, im, QUESTION, ids) for _ in range(repeats)]
    rows["naive"] = {"forwards": 1 + len(a.attention_layers) * a.num_heads, "wall": C.median([n[1] for n in naive]),
                     "cpu": C.median([n[2] for n in naive]), "delta": naive[0][0]}
    err = max(float(np.abs(rows[m]["delta"] - rows["batched"]["delta"]).max()) for m in rows)
    walls = ", ".join(f"{m} {r['wall']:.2f} s" for m, r in rows.items())
    log(f"default: {walls}; max grid difference {err:.1e}")
    return {"layers": len(a.attention_layers), "heads": a.num_heads, "answer_tokens": len(ids),
            "visual_tokens": int(a.geometry(im).n_tokens), "rows": rows, "max_diff": err}


def bench_twin(quick: bool, repeats: int) -> dict:
    from ral_core.builders.twins import build_twin

    side = (224, 168) if quick else (448, 336)
    im = Image.open(PHOTO).convert("RGB").resize(side)
    fits = {}
    for k in (1, 2):
        a = build_twin(TWIN, text_layers=k, vision_depth=1, dtype=torch.float32,
                       tokenizer_cache=str(ROOT / "bench" / "_work" / "real" / "tokenizers"))
        ids = a.encode_answer("a cat", eos=False)
        per = {}
        for mode, chunk, share in MODES:
            walls, cpus = [], []
            for _ in range(repeats):
                ko, steps = timed_grid(a, im, "What animal is in the picture?", ids, chunk, share)
                # steps[0]: image encoding + the base forward; then one step per forward of `chunk` variants
                walls.append([s[0] for s in steps[1:]])
                cpus.append([s[1] for s in steps[1:]])
            per[mode] = {"forwards": ko.forwards, "fwd_wall": C.median([np.median(w) for w in walls]),
                         "fwd_cpu": C.median([np.median(c) for c in cpus]), "first_wall": steps[0][0],
                         "batch": ko.chunk}
        fits[k] = {"per": per, "heads": a.num_heads, "tokens": int(a.build_inputs([im], ["q"])["model_inputs"]
                                                                     ["input_ids"].shape[1]),
                   "visual": int(a.geometry(im).n_tokens)}
        log(f"twin at {k} layer(s): batched forward {per['batched']['fwd_wall']:.3f} s (batch {a.num_heads}), "
            f"per-head forward {per['per head']['fwd_wall']:.3f} s")
        del a
    H = fits[1]["heads"]
    out = {"heads": H, "tokens": fits[1]["tokens"], "visual": fits[1]["visual"], "depths": fits, "image": list(side)}
    for mode, _, _ in MODES:
        for key in ("fwd_wall", "fwd_cpu"):
            f1, f2 = fits[1]["per"][mode][key], fits[2]["per"][mode][key]
            b = max(f2 - f1, 0.0)  # per decoder layer
            out.setdefault(mode, {})[key] = {"a": f1 - b, "b": b, "full": f1 - b + b * TWIN_LAYERS}
    L = TWIN_LAYERS
    out["batched"]["forwards"] = 1 + L
    out["per head"]["forwards"] = 1 + L * H
    for mode in ("batched", "per head"):
        n_var = out[mode]["forwards"] - 1
        out[mode]["grid_cpu"] = out["per head"]["fwd_cpu"]["full"] + n_var * out[mode]["fwd_cpu"]["full"]
    # shared prefix: the forward of layer l's chunk runs l layers at batch 1 and L − l at batch H (slopes measured
    # above), plus the batched forward's fixed part
    b1, bH, aH = (out["per head"]["fwd_cpu"]["b"], out["batched"]["fwd_cpu"]["b"], out["batched"]["fwd_cpu"]["a"])
    sh = out["batched + shared prefix"]
    sh["forwards"] = 1 + L
    sh["grid_cpu"] = out["per head"]["fwd_cpu"]["full"] + sum(aH + b1 * l + bH * (L - l) for l in range(L))
    return out


def report(meta, d, t, quick, busy_before) -> str:
    L = ["# Head knock-out grid: what it costs\n",
         f"Machine: {C.machine_line(meta)}. One torch thread, fp32. "
         + ("**Quick run (smaller twin input, one repeat): not a result.** " if quick else "")
         + "The machine is shared with other jobs while this ran: wall seconds are inflated by contention, so read "
           "the CPU seconds and the ratios; never compare these against numbers from another run.\n",
         "Produced by `bench/causal_bench.py`. The grid: Δ log p of every answer token when one head's output is "
         "zeroed before o_proj (ral_core/causal.py), for every layer × head.\n",
         f"## Default model ({d['layers']} layers × {d['heads']} heads, {d['visual_tokens']} visual tokens, "
         f"{d['answer_tokens']} answer token(s), bundled example grid3_cell)\n",
         "| way | forwards | wall s (median) | CPU s | CPU s per layer of the grid |",
         "|---|---:|---:|---:|---:|"]
    names = {"batched + shared prefix": "batched + shared prefix (shipped): one forward per layer, its earlier "
                                        "layers at batch 1, then H rows",
             "batched": "batched: one forward of batch H per layer, image encoded once",
             "per head": "per head: one forward of batch 1 per head, image encoded once",
             "naive": "naive: one forward per head, o_proj hook, image re-encoded each time"}
    for m, r in d["rows"].items():
        L.append(f"| {names[m]} | {r['forwards']} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['cpu'] / d['layers']:.3f} |")
    L.append(f"\nAll grids agree to {d['max_diff']:.1e} in Δ log p. Shipped vs naive: "
             f"{d['rows']['naive']['cpu'] / d['rows']['batched + shared prefix']['cpu']:.1f}× less CPU time.\n")
    H = t["heads"]
    L += [f"## Qwen2-VL-2B twin (published width, {H} heads, random weights; {t['tokens']} prompt tokens of which "
          f"{t['visual']} visual, photo resized to {t['image'][0]}×{t['image'][1]})\n",
          "Measured at 1 and 2 decoder layers (one-block vision tower); each forward's time fitted as a + b·layers "
          f"and extrapolated to the published {TWIN_LAYERS} layers (grid = base forward + one forward per variant "
          "chunk). The extrapolation uses CPU seconds only: wall seconds under this much contention would extrapolate "
          "the neighbours' load.\n",
          "| way | forwards (28 layers) | per forward, 1 layer (wall / CPU s) | per forward, 2 layers | "
          "per extra layer (CPU s) | full grid, extrapolated (CPU s) | per layer of the grid (CPU s) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for m, _, _ in MODES:
        p1, p2 = t["depths"][1]["per"][m], t["depths"][2]["per"][m]
        r = t[m]
        L.append(f"| {m} (batch {p1['batch']}) | {r['forwards']} | {p1['fwd_wall']:.3f} / {p1['fwd_cpu']:.3f} | "
                 f"{p2['fwd_wall']:.3f} / {p2['fwd_cpu']:.3f} | {r['fwd_cpu']['b']:.3f} | "
                 f"{r['grid_cpu']:.0f} | {r['grid_cpu'] / TWIN_LAYERS:.2f} |")
    ratio = t["per head"]["grid_cpu"] / t["batched"]["grid_cpu"]
    shared = t["per head"]["grid_cpu"] / t["batched + shared prefix"]["grid_cpu"]
    L.append(f"\nCPU time of the full grid, one forward per head / batched: {ratio:.2f}; / batched with the shared "
             f"prefix (shipped): {shared:.2f}. At real width a CPU forward is compute-bound, so batching H variants "
             "into one forward does not make the arithmetic cheaper by itself: it cuts the calls "
             f"({t['batched']['forwards']} instead of {t['per head']['forwards']}) and the vision tower's runs (one). "
             "Running the layers before a chunk's knocked-out layer once (one row, forked into H rows there) removes "
             "about half the layer-forwards: the grid then costs about L²·H/2 layer-rows instead of L²·H. The "
             "shared-prefix row at 28 layers is computed from the measured per-layer slopes at batch 1 and batch H "
             "(the fork's own forwards at 1 and 2 layers are in the table). Not measured here: an accelerator, where "
             f"a batch of {H} short sequences takes about the time of one.\n")
    worst = min([r["cpu"] / r["wall"] for r in d["rows"].values()]
                + [t["depths"][k]["per"][m]["fwd_cpu"] / t["depths"][k]["per"][m]["fwd_wall"]
                   for k in (1, 2) for m in ("batched", "per head")])
    L += C.contention_section(meta, worst, busy_before, C.busy_processes(exclude={os.getpid()}))
    return "\n".join(L) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(1)
    meta = C.machine_info()
    busy = C.busy_processes(exclude={os.getpid()})
    repeats = 1 if args.quick else 3
    d = bench_default(repeats)
    t = bench_twin(args.quick, repeats)
    C.write_report(report(meta, d, t, args.quick, busy), args.out, args.quick, log)


if __name__ == "__main__":
    main()
