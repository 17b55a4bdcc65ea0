"""Benchmark: one full RAL training step with and without the step's shared work done once.

    .venv/bin/python bench/step_bench.py --out bench/results/train.md      # writes its own section of train.md
    .venv/bin/python bench/step_bench.py --smoke                           # tiny model, prints

Modes, each a fresh Trainer from the same initial weights and seed, on the same prompts:
  before   vision_cache=false, share_prompt=false: every pass re-encodes every rollout's image and runs its whole
           prompt (the step before ral_core/vision_cache.py and ral_core/prefix_share.py);
  cache    vision_cache=true, share_prompt=false: each distinct image encoded once per step;
  after    vision_cache=true, share_prompt=true: the cache, plus each group's prompt prefilled once for sampling and
           computed once per pass in scoring and updates (prefix_share).
Models:
  default  the embedded digit model, the shipped `ral` recipe (16 prompts × 8, 12 new tokens, 4 updates per batch);
  twin     the Qwen2-VL-2B shape twin (ral_core/builders/twins.py: real width, random weights) with a 1024×768 photo,
           G = 8, 32 new tokens, LoRA r = 8 on the language model, 2 updates per rollout batch. Its depth is cut to
           --twin-layers decoder layers and as many vision blocks (the published 28 and 32 would take about an hour
           per step on 2 cores); both stacks are cut alike, so the vision : language work ratio stays close to the
           real model's, while the embedding and LM head stay full size. The report says so.
Modes alternate (ABC, CBA, …) in one process with one torch thread; Trainer.train_step() is timed (sampling,
rewards, old-policy pass, updates) and the step counter is not advanced, so every call sees the same prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import _common as C

C.start()  # before torch is imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"before": ["vision_cache=false", "share_prompt=false"],
         "cache": ["vision_cache=true", "share_prompt=false"],
         "after": ["vision_cache=true", "share_prompt=true"]}
BEGIN, END = "<!-- step_bench: begin -->", "<!-- step_bench: end -->"
RECORDS = os.path.join(ROOT, "bench", "results", "step.json")  # per-model rows; a rerun of one model replaces its row
TRAIN_MD = os.path.join(ROOT, "bench", "results", "train.md")


def records_path(args) -> str:
    """Where the rows are kept: the committed bench/results/step.json only for the committed train.md; a report
    written elsewhere keeps its rows next to itself, so a trial run never rewrites the committed measurements."""
    if args.json:
        return args.json
    if not args.out or os.path.abspath(args.out) == os.path.abspath(TRAIN_MD):
        return RECORDS
    return os.path.splitext(args.out)[0] + ".step.json"


log = C.logger()


def photo_dataset(directory: str, size=(1024, 768)) -> str:
    """A JSONL dataset of one bundled photo cropped to 4:3 and resized to `size`, with a one-word answer."""
    from PIL import Image
    im = Image.open(os.path.join(ROOT, "assets", "examples", "photos", "coffee.jpg")).convert("RGB")
    w, h = im.size
    tw = min(w, h * 4 // 3)
    th = tw * 3 // 4
    im = im.crop(((w - tw) // 2, (h - th) // 2, (w - tw) // 2 + tw, (h - th) // 2 + th)).resize(size)
    im.save(os.path.join(directory, "photo.png"))
    path = os.path.join(directory, "photo.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"image": "photo.png", "question": "What is in the cup?", "answer": "coffee"}) + "\n")
    return path


def trainers(model: str, args, tmp: str):
    """mode → Trainer, all from the same initial weights."""
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    out = {}
    for mode, flags in MODES.items():
        common = [f"output_dir={tmp}/{model}-{mode}", "seed=0", "snapshot_every=0", "save_every=0",
                  "attn_metrics_every=0", "threads=1"] + flags
        if model == "default":
            cfg = build_config("ral", ["model=default"] + common)
            out[mode] = Trainer(cfg)
        else:
            from ral_core.builders.twins import build_twin
            ad = build_twin("qwen2_vl_2b", text_layers=args.twin_layers, vision_depth=args.twin_layers, seed=0)
            cfg = build_config("ral", [f"model={model}", f"dataset={args.dataset}", "prompts_per_step=1",
                                       "group_size=8", "max_new_tokens=32", "lora_r=8", "minibatch_size=4",
                                       "epochs=1", "lambda_attn=1", "lr=1e-4"] + common)
            out[mode] = Trainer(cfg, adapter=ad)
    return out


def measure(ts: dict, rounds: int) -> dict:
    times = {m: [] for m in ts}
    cpu = {m: [] for m in ts}
    order = list(ts)
    for r in range(rounds):
        for mode in (order if r % 2 == 0 else order[::-1]):
            torch.manual_seed(1234)
            w0, c0 = time.perf_counter(), time.process_time()
            m = ts[mode].train_step()
            times[mode].append(time.perf_counter() - w0)
            cpu[mode].append(time.process_time() - c0)
            log(f"  round {r} {mode}: {times[mode][-1]:.2f} s wall, {cpu[mode][-1]:.2f} s CPU, "
                f"rollout {m['rollout_time']:.2f} s, reward {m['reward']:.3f}")
    return {"wall": {m: C.median(v) for m, v in times.items()}, "cpu": {m: C.median(v) for m, v in cpu.items()},
            "n": rounds}


def section(results: dict, args, meta: dict) -> str:
    cuts = " and ".join(str(v["twin_layers"]) for k, v in results.items() if k != "default") or args.twin_layers
    lines = [BEGIN, "## The step's shared work done once (`bench/step_bench.py`)", "",
             f"Command: `make bench-step` (rows kept in `bench/results/step.json`; `--models twin` reruns one row) · "
             f"{'; '.join(sorted({r['machine'] for r in results.values() if r.get('machine')})) or meta['machine']}"
             " · one torch thread · fp32", "",
             "A full `Trainer.train_step()` (sampling, rewards, old-policy pass, updates) in three modes, alternating "
             "in one process on the same prompts from the same weights: **before** = `vision_cache=false "
             "share_prompt=false` (every pass re-encodes every rollout's image and runs its whole prompt), "
             "**cache** = each distinct image encoded once per step, **after** = the cache plus each group's prompt "
             "prefilled once for sampling and computed once per pass in scoring and updates. Medians of process "
             "CPU seconds (wall in brackets).", "",
             "| model | setting | prompt tokens | before | cache | after | before / cache | **before / after** | "
             "rounds | run (UTC), load at start |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c, w = r["cpu"], r["wall"]
        label = name if name == "default" else f"Qwen2-VL-2B twin, {r['twin_layers']} + {r['twin_layers']} layers"
        lines.append(f"| {label} | {r['setting']} | {r['prompt_tokens']} | {c['before']:.2f} ({w['before']:.2f}) | "
                     f"{c['cache']:.2f} ({w['cache']:.2f}) | {c['after']:.2f} ({w['after']:.2f}) | "
                     f"{c['before'] / c['cache']:.2f}× | **{c['before'] / c['after']:.2f}×** | {r['n']} | "
                     f"{r['date']}, {r['load']} |")
    lines += ["", "CPU/wall well below 1 means other processes shared the cores; the ratios compare modes of the "
              "same run. "
              "`share_prompt=auto` (the default) shares where the prompt is at least as long as the answer budget "
              "(`max_new_tokens`): on for both rows here.",
              f"The twin is Qwen2-VL-2B at its real width (hidden 1536, 12 heads, vision width 1280, full 151,936-token "
              f"embedding and head) cut to {cuts} decoder layer(s) and as many vision block(s) "
              "of the published 28 and 32, random weights: both stacks are cut alike, so the vision : language work "
              "ratio stays close to the real model's, while the full-size embedding and head weigh more than at full "
              "depth.", END]
    return "\n".join(lines) + "\n"


def write_section(text: str, out: str) -> None:
    old = open(out).read() if os.path.exists(out) else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(out, "w") as f:
        f.write(new)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="markdown file to write this bench's section into (train.md)")
    p.add_argument("--models", default="default,twin")
    p.add_argument("--rounds", type=int, default=4, help="rounds for the default model")
    p.add_argument("--twin-rounds", type=int, default=1)
    p.add_argument("--twin-layers", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None, help="the rows file (default: bench/results/step.json for the committed "
                   "train.md, else next to --out)")
    p.add_argument("--section-only", action="store_true",
                   help="rewrite the section of --out from bench/results/step.json without measuring (after bench-train)")
    args = p.parse_args()
    if args.section_only:
        write_section(section(json.load(open(records_path(args))), args, {"machine": C.machine_line()}),
                      args.out or TRAIN_MD)
        return
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="step_bench_")
    args.dataset = photo_dataset(tmp)
    results = {}
    for model in args.models.split(","):
        log(f"{model}:")
        t_model, load_model = time.time(), C.loadavg()
        ts = trainers("default" if model == "default" else "twin", args, tmp)
        ro_inputs = ts["before"].adapter.build_inputs(
            [ts["before"]._prompts(0)[0]["image"]], [ts["before"]._prompts(0)[0]["question"]])["model_inputs"]
        r = measure(ts, 1 if args.smoke else (args.rounds if model == "default" else args.twin_rounds))
        r["prompt_tokens"] = int(ro_inputs["input_ids"].shape[1])
        r["setting"] = ("`ral` recipe: 16 prompts × 8, 12 new tokens, 4 updates" if model == "default" else
                        "1024×768 photo, G = 8, 32 new tokens, LoRA r 8, 2 updates")
        if model != "default":
            r["twin_layers"] = args.twin_layers
        r["date"], r["load"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_model)), load_model
        r["machine"] = C.machine_line()
        results[model if model == "default" else f"twin_l{args.twin_layers}"] = r
        del ts
    if args.out and not args.smoke:
        rows = records_path(args)
        stored = json.load(open(rows)) if os.path.exists(rows) else {}
        stored.update(results)
        stored = {("twin_l1" if k == "twin" else k): v for k, v in stored.items()}
        results = {k: stored[k] for k in sorted(stored, key=lambda k: (k != "default", k))}
        with open(rows, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    meta = {"machine": C.machine_line()}
    text = section(results, args, meta)
    print(text)
    if args.out and not args.smoke:
        write_section(text, args.out)


if __name__ == "__main__":
    main()
