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
           G = 8, 32 new tokens, LoRA r = 8 on the language model, 2 updates per rollout batch, one row per
           --twin-layers depth (decoder layers and as many vision blocks; the published 28 and 32 would take about
           an hour per step on 2 cores). Both stacks are cut alike, so the vision : language work ratio stays close
           to the real model's, while the embedding and LM head stay full size. The report says so.
Rounds interleave every row and mode in one process with one torch thread (orders reversed every other round);
Trainer.train_step() is timed (sampling, rewards, old-policy pass, updates) with its CPU split by module (vision
tower, decoder stack, LM head) through forward hooks, and the step counter is not advanced, so every call sees the
same prompts. Ratios pair the modes of one round; the report gives their median and min–max.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
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


TWIN_SETTINGS = ["prompts_per_step=1", "group_size=8", "max_new_tokens=32", "lora_r=8", "minibatch_size=4",
                 "epochs=1", "lambda_attn=1", "lr=1e-4"]


def _common_flags(tmp: str, name: str, mode: str) -> list[str]:
    return [f"output_dir={tmp}/{name}-{mode}", "seed=0", "snapshot_every=0", "save_every=0", "attn_metrics_every=0",
            "threads=1"] + MODES[mode]


def twin_trainer(mode: str, layers: int, dataset: str, tmp: str):
    """A Trainer on the Qwen2-VL-2B twin cut to `layers` decoder layers and as many vision blocks, in `mode`."""
    from ral_core.builders.twins import build_twin
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    ad = build_twin("qwen2_vl_2b", text_layers=layers, vision_depth=layers, seed=0)
    cfg = build_config("ral", ["model=twin", f"dataset={dataset}"] + TWIN_SETTINGS
                       + _common_flags(tmp, f"twin{layers}", mode))
    return Trainer(cfg, adapter=ad)


def default_trainer(mode: str, tmp: str):
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    return Trainer(build_config("ral", ["model=default"] + _common_flags(tmp, "default", mode)))


def trainers(model: str, args, tmp: str):
    """mode → Trainer, all from the same initial weights (`model`: "default" or "twin" at args.twin_layers)."""
    if model == "default":
        return {mode: default_trainer(mode, tmp) for mode in MODES}
    return {mode: twin_trainer(mode, int(args.twin_layers), args.dataset, tmp) for mode in MODES}


class Parts:
    """Process CPU seconds spent inside the vision tower, the decoder stack (split by grad on/off) and the LM head,
    from forward hooks on those modules: where a mode's step time goes, and so what the sharing removes. The rest
    of the step (backward, optimizer, the sampling loop, preprocessing) is the step's CPU time minus these."""

    NAMES = {"visual": "vision", "language_model": "decoder", "lm_head": "head"}

    def __init__(self, model):
        self.cpu = {}
        self.handles = []
        found = {}
        for name, mod in model.named_modules():
            key = name.rsplit(".", 1)[-1]
            if key in self.NAMES and (key not in found or len(name) < len(found[key][0])):
                found[key] = (name, mod)
        for key, (_, mod) in found.items():
            self.handles.append(mod.register_forward_pre_hook(self._pre(self.NAMES[key])))
            self.handles.append(mod.register_forward_hook(self._post()))
        self._open = []

    def _pre(self, part):
        def hook(module, args):
            grad = part == "decoder" and torch.is_grad_enabled()
            self._open.append((part + ("_grad" if grad else ""), time.process_time()))
        return hook

    def _post(self):
        def hook(module, args, out):
            part, t0 = self._open.pop()
            self.cpu[part] = self.cpu.get(part, 0.0) + time.process_time() - t0
        return hook

    def take(self) -> dict:
        out, self.cpu = self.cpu, {}
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def prompt_tokens(trainer) -> int:
    first = trainer._prompts(0)[0]
    return int(trainer.adapter.build_inputs([first["image"]], [first["question"]])["model_inputs"]["input_ids"].shape[1])


def time_step(trainer) -> dict:
    """One timed train_step (same prompts: the step counter is not advanced) with its CPU split into parts."""
    parts = Parts(trainer.model)
    try:
        torch.manual_seed(1234)
        w0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        parts.close()
    p = parts.take()
    p["other"] = cpu - sum(p.values())
    return {"wall": wall, "cpu": cpu, "parts": p, "rollout_wall": m["rollout_time"], "reward": m["reward"]}


def measure(models: list[str], args, tmp: str) -> dict:
    """Rounds interleaved over models and modes (model order and mode order reversed every other round), so that
    the machine's load hits every row and mode alike. The default model's trainers persist (one untimed warm-up
    step each); a twin trainer is built afresh for each timed step (six at once would not fit next to the others'
    work) and its first step is timed, the same step every round."""
    rows = {k: {"runs": {mode: [] for mode in MODES}, "load_start": C.loadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())} for k in models}
    code = C.code_version()
    for k in models:
        rows[k]["code"] = code
    persistent = {}
    if "default" in models:
        persistent = trainers("default", args, tmp)
        rows["default"]["prompt_tokens"] = prompt_tokens(persistent["before"])
        for mode, t in persistent.items():
            t.train_step()  # untimed warm-up: allocator, kernels, lazy init
    n_rounds = {k: (1 if args.smoke else args.rounds if k == "default" else args.twin_rounds) for k in models}
    for r in range(max(n_rounds.values())):
        for key in (models if r % 2 == 0 else models[::-1]):
            if r >= n_rounds[key]:
                continue
            for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                if key == "default":
                    res = time_step(persistent[mode])
                else:
                    t = twin_trainer(mode, int(key.split("_l")[1]), args.dataset, tmp)
                    rows[key].setdefault("prompt_tokens", prompt_tokens(t))
                    res = time_step(t)
                    del t
                    gc.collect()
                res["load"] = C.loadavg()
                rows[key]["runs"][mode].append(res)
                with open(os.path.join(tmp, "raw.json"), "w") as f:  # a run cut short keeps what it measured
                    json.dump(rows, f)
                log(f"round {r} {key} {mode}: {res['cpu']:.2f} s CPU ({res['wall']:.2f} wall), parts "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["parts"].items())) + f", load {res['load']}")
    for key in models:
        rows[key]["load_end"] = C.loadavg()
    return rows


def summarise(key: str, row: dict) -> dict:
    """The stored row: medians, per-round ratios (modes paired within a round) and their spread."""
    runs = row["runs"]
    n = min(len(v) for v in runs.values())
    ratio = {f"{a}/{b}": [runs[a][i]["cpu"] / runs[b][i]["cpu"] for i in range(n)]
             for a, b in (("before", "cache"), ("before", "after"), ("cache", "after"))}
    parts = {mode: {p: C.median([x["parts"].get(p, 0.0) for x in v]) for p in sorted({q for x in v for q in x["parts"]})}
             for mode, v in runs.items()}
    out = {"n": n, "cpu": {m: C.median([x["cpu"] for x in v]) for m, v in runs.items()},
           "wall": {m: C.median([x["wall"] for x in v]) for m, v in runs.items()},
           "cpu_rounds": {m: [x["cpu"] for x in v] for m, v in runs.items()},
           "ratio_rounds": ratio, "ratio": {k: C.median(v) for k, v in ratio.items()},
           "cpu_per_wall": min(x["cpu"] / x["wall"] for v in runs.values() for x in v),
           "parts": parts, "prompt_tokens": row["prompt_tokens"], "date": row["date"],
           "load": row["load_start"], "load_end": row["load_end"], "machine": C.machine_line(),
           "machine_info": C.machine_info(), "code": row.get("code", "unknown"),
           "command": " ".join(["bench/step_bench.py"] + sys.argv[1:])}
    if key == "default":
        out["setting"] = "`ral` recipe: 16 prompts × 8, 12 new tokens, 4 updates"
    else:
        out["setting"] = "1024×768 photo, G = 8, 32 new tokens, LoRA r 8, 2 updates"
        out["twin_layers"] = int(key.split("_l")[1])
    return out


def _spread(xs) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}" if len(xs) > 1 else "one round"


PART_LABELS = (("vision", "vision tower"), ("decoder", "decoder stack, no grad (sampling, old-policy pass)"),
               ("decoder_grad", "decoder stack with grad (update forwards)"), ("head", "LM head"),
               ("other", "rest (backward, optimizer, sampling loop, preprocessing)"))


def section(results: dict, args, meta: dict) -> str:
    machines = sorted({r["machine"] for r in results.values() if r.get("machine")}) or [meta["machine"]]
    codes = sorted({r["code"] for r in results.values() if r.get("code")})
    commands = sorted({r["command"] for r in results.values() if r.get("command")})
    lines = [BEGIN, "## The step's shared work done once (`bench/step_bench.py`)", "",
             f"Command: `make bench-step` (rows kept in `bench/results/step.json`"
             + (f"; these rows: {', '.join(f'`{c}`' for c in commands)}" if commands else "")
             + f") · {'; '.join(machines)} · one "
             "torch thread · fp32" + (f" · measured code: {'; '.join(codes)}" if codes else ""),
             "",
             "A full `Trainer.train_step()` (sampling, rewards, old-policy pass, updates) in three modes on the same "
             "prompts from the same weights: **before** = `vision_cache=false share_prompt=false` (every pass "
             "re-encodes every rollout's image and runs its whole prompt), **cache** = each distinct image encoded "
             "once per step, **after** = the cache plus each group's prompt prefilled once for sampling and computed "
             "once per pass in scoring and updates. Rounds are interleaved over the rows and modes of one process "
             "(orders reversed every other round), and rows measured by separate commands ran at the same time, so "
             "the machine's load hits each alike. Medians of process CPU "
             "seconds (wall in brackets); each ratio is the median of the per-round ratios (modes of the same round "
             "paired), with their min–max.", "",
             "| model | setting | prompt tokens | before | cache | after | before / cache | **before / after** | "
             "rounds | run (UTC), load at start → end, lowest CPU/wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c, w = r["cpu"], r["wall"]
        label = name if name == "default" else f"Qwen2-VL-2B twin, {r['twin_layers']} + {r['twin_layers']} layers"
        if "ratio_rounds" in r:
            rr = r["ratio_rounds"]
            bc = f"{r['ratio']['before/cache']:.2f}× ({_spread(rr['before/cache'])})"
            ba = f"**{r['ratio']['before/after']:.2f}×** ({_spread(rr['before/after'])})"
            load = f"{r['date']}, {r['load']} → {r['load_end']}, {r['cpu_per_wall']:.2f}"
        else:  # a row from before rounds were kept
            bc, ba = f"{c['before'] / c['cache']:.2f}×", f"**{c['before'] / c['after']:.2f}×**"
            load = f"{r['date']}, {r['load']}"
        lines.append(f"| {label} | {r['setting']} | {r['prompt_tokens']} | {c['before']:.2f} ({w['before']:.2f}) | "
                     f"{c['cache']:.2f} ({w['cache']:.2f}) | {c['after']:.2f} ({w['after']:.2f}) | {bc} | {ba} | "
                     f"{r['n']} | {load} |")
    shared = any(r.get("cpu_per_wall", 1.0) < 0.9 for r in results.values())
    lines += ["", ("**Shared machine**: other processes ran during the measurement (CPU/wall below 0.9), so wall "
                   "times are inflated; the CPU-time ratios are the figures to read. " if shared else "")
              + "`share_prompt=auto` (the default) shares where the prompt is at least as long as the answer budget "
              "(`max_new_tokens`): on for every row here."]
    with_parts = {k: r for k, r in results.items() if r.get("parts")}
    if with_parts:
        lines += ["", "### Where the step's CPU time goes, and what each part of the sharing removes", "",
                  "Process CPU seconds inside each module's forward (forward hooks; medians over the rounds), the "
                  "rest being the step's CPU time minus these. before → cache is the vision cache, cache → after the "
                  "shared prompt.", "",
                  "| model | part | before | cache | after | removed by the cache | removed by the shared prompt |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, r in with_parts.items():
            label = name if name == "default" else f"twin {r['twin_layers']} + {r['twin_layers']}"
            P = r["parts"]
            for part, text in PART_LABELS:
                b, c, a = (P[m].get(part, 0.0) for m in ("before", "cache", "after"))
                lines.append(f"| {label} | {text} | {b:.2f} | {c:.2f} | {a:.2f} | {b - c:.2f} | {c - a:.2f} |")
        lines += ["", *depth_reading(with_parts)]
    lines += ["", "The twin is Qwen2-VL-2B at its real width (hidden 1536, 12 heads, vision width 1280, full "
              "151,936-token embedding and head) cut to as many decoder layers and vision blocks as its row says "
              "(of the published 28 and 32), random weights: both stacks are cut alike, so the vision : language "
              "work ratio stays close to the real model's, while the full-size embedding and LM head, and the "
              "per-step work that does not grow with depth, weigh more than at full depth. Each twin step is the "
              "first step of a freshly built trainer (the same step every round); the default model's trainers run "
              "one untimed warm-up step.", END]
    return "\n".join(lines) + "\n"


def depth_reading(rows: dict) -> list[str]:
    """What changes with depth, from two twin rows: the removed and the remaining CPU per added layer pair."""
    twins = sorted((r for r in rows.values() if "twin_layers" in r), key=lambda r: r["twin_layers"])
    if len(twins) < 2:
        return []
    lo, hi = twins[0], twins[-1]
    d = hi["twin_layers"] - lo["twin_layers"]

    def removed(r):
        return r["cpu"]["before"] - r["cpu"]["after"]
    fixed_lo = lo["cpu"]["after"] - (hi["cpu"]["after"] - lo["cpu"]["after"]) / d * lo["twin_layers"]
    per_rm = (removed(hi) - removed(lo)) / d
    per_left = (hi["cpu"]["after"] - lo["cpu"]["after"]) / d
    trend = "rises" if hi["ratio"]["before/after"] > lo["ratio"]["before/after"] else "falls"
    return [f"Depth: from {lo['twin_layers']} + {lo['twin_layers']} to {hi['twin_layers']} + {hi['twin_layers']} "
            f"layers the ratio {trend} ({lo['ratio']['before/after']:.2f}× → {hi['ratio']['before/after']:.2f}×). "
            f"Each added layer pair adds {per_rm:.1f} CPU s of work that the sharing removes (before − after) and "
            f"{per_left:.1f} s that it leaves (after); extrapolated to zero layers, the 'after' step keeps "
            f"{fixed_lo:.1f} s that does not grow with depth (the LM head, the sampling loop, the optimizer). As "
            f"depth grows the ratio tends to the per-layer before : after, {(per_rm + per_left) / per_left:.1f}×; "
            f"the fixed part weighs most at shallow depth." + _parts_reading(twins)
            if per_left > 0 else "Depth: the 'after' step did not grow with depth in this run (noise)."]


def _parts_reading(twins: list[dict]) -> str:
    """Which part of the sharing removes what, from the per-module CPU split of each twin row."""
    out = []
    for r in twins:
        P = r.get("parts")
        if not P:
            continue
        get = lambda m, k: P[m].get(k, 0.0)  # noqa: E731
        removed = r["cpu"]["before"] - r["cpu"]["after"]
        vis = get("before", "vision") - get("cache", "vision")
        enc = get("before", "vision") / get("after", "vision") if get("after", "vision") > 0 else float("nan")
        out.append(f"{r['twin_layers']} + {r['twin_layers']}: {removed:.0f} s removed, {vis:.0f} s ({vis / removed:.0%})"
                   f" of it the vision tower (about {enc:.0f}× its one encode of the photo)")
    if not out:
        return ""
    head = twins[-1]["parts"]["after"].get("head", 0.0)
    return (" Which part removes what (CPU s, medians): " + "; ".join(out) + "; the rest is the prompt's decoder "
            "passes and their backward, removed by the shared prompt. Neither touches the LM head (about "
            f"{head:.0f} s, the same at every depth: the logits of the sampled and scored answer tokens over the full "
            "vocabulary) nor the step's one remaining encode of the photo.")


def publish(results: dict, args) -> str:
    """Merge the measured rows into the rows file (records_path: never the committed one for a report elsewhere),
    rewrite this bench's section of --out, and return the section."""
    rows = records_path(args)
    stored = json.load(open(rows)) if os.path.exists(rows) else {}
    stored.update(results)
    results = {k: stored[k] for k in sorted(stored, key=lambda k: (k != "default", k))}
    os.makedirs(os.path.dirname(os.path.abspath(rows)), exist_ok=True)
    with open(rows, "w") as f:
        json.dump(C.round_floats(results), f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    text = section(results, args, {"machine": C.machine_line()})
    write_section(text, args.out)
    log(f"wrote {rows} and the section of {args.out}")
    return text


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
    p.add_argument("--models", default="default,twin", help="default and/or twin (at each --twin-layers)")
    p.add_argument("--rounds", type=int, default=5, help="rounds for the default model")
    p.add_argument("--twin-rounds", type=int, default=3)
    p.add_argument("--twin-layers", default="1,2", help="decoder layers (= vision blocks) of the twin rows, e.g. 1,2")
    p.add_argument("--smoke", action="store_true", help="one round, prints, writes nothing")
    p.add_argument("--json", default=None, help="the rows file (default: bench/results/step.json for the committed "
                   "train.md, else next to --out)")
    p.add_argument("--section-only", action="store_true",
                   help="rewrite the section of --out from the rows file without measuring (after bench-train)")
    args = p.parse_args()
    if args.section_only:
        write_section(section(json.load(open(records_path(args))), args, {"machine": C.machine_line()}),
                      args.out or TRAIN_MD)
        return
    try:
        layers = [int(x) for x in str(args.twin_layers).split(",") if x.strip()]
    except ValueError:
        p.error(f"--twin-layers takes whole numbers separated by commas (got {args.twin_layers!r})")
    keys = []
    for m in args.models.split(","):
        if m.strip() not in ("default", "twin"):
            p.error(f"--models takes default and/or twin (got {m!r})")
        keys += ["default"] if m.strip() == "default" else [f"twin_l{n}" for n in layers]
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="step_bench_")
    args.dataset = photo_dataset(tmp)
    log(f"raw timings are kept in {tmp}/raw.json as they come")
    raw = measure(keys, args, tmp)
    results = {key: summarise(key, raw[key]) for key in keys}
    if args.out and not args.smoke:
        print(publish(results, args))
    else:
        print(section(results, args, {"machine": C.machine_line()}))


if __name__ == "__main__":
    main()
