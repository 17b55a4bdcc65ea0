"""Inspect latency on the embedded default model: `inspect()` (generate + one capture pass over all layers)
and re-rendering from the stored result, per example image. Writes bench/results/inspect.md."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _common as C
from _common import ROOT

C.start()  # before torch is imported


def timed(fn, n):
    walls, cpus = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "inspect.md"))
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    from ral_core import render
    from ral_core.images import load_image
    from ral_core.inspection import inspect
    from ral_core.models import load_adapter

    t0 = time.perf_counter()
    adapter = load_adapter("default")
    load_s = time.perf_counter() - t0
    rows = []
    for ex in json.loads((ROOT / "assets" / "examples" / "examples.json").read_text()):
        img = load_image(ROOT / "assets" / "examples" / ex["image"])
        inspect(adapter, img, ex["question"])  # warm-up
        w, c = timed(lambda: inspect(adapter, img, ex["question"]), args.repeats)
        res = inspect(adapter, img, ex["question"])
        rw, rc = timed(lambda: render.figure_bytes(render.inspection_overlay(res, layer=res.layers[-1], token=0)),
                       args.repeats)
        rows.append((ex["image"], res.n_tokens, res.geometry.n_tokens, w, c, rw, rc))
    lines = ["# Inspect latency (default model, CPU, one thread)", "",
             f"Command: `python {' '.join(sys.argv)}` · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
             f"{C.machine_line()} · model load {load_s:.2f} s · median of {args.repeats}", "",
             "| example | answer tokens | visual tokens | inspect() ms (CPU) | re-render overlay ms (CPU) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {t} | {v} | {w * 1e3:.0f} ({c * 1e3:.0f}) | {rw * 1e3:.0f} ({rc * 1e3:.0f}) |"
              for n, t, v, w, c, rw, rc in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
