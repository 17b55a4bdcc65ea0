"""Benchmark at real sizes: shape twins of SmolVLM-256M, Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B and Qwen3.5-0.8B
(`ral_core/builders/twins.py`: published configs, real classes, random weights) → bench/results/real.md.

    .venv/bin/python bench/real_bench.py                           # CPU, bf16 weights, all twins, all rows (long)
    .venv/bin/python bench/real_bench.py --only qwen2_vl_2b        # one twin (all its rows)
    .venv/bin/python bench/real_bench.py --only qwen2_vl_2b:inspect,smolvlm_256m:capture   # single rows
    .venv/bin/python bench/real_bench.py --force --only …          # rerun rows that are already done
    .venv/bin/python bench/real_bench.py --quick                   # smoke test: short inputs, cut twins, prints
    .venv/bin/python bench/real_bench.py --device cuda --dtype bfloat16   # the GPU table (its own section)

Rows per twin, each measured in a fresh subprocess (one torch thread on the CPU) so peak memory is its own:
  static    parameters (meta device: no memory) and visual tokens of a 1024×768 photo at the published settings
  inspect   `ral inspect` (ral_core.cli.main: 16 generated tokens, capture of every layer, overlay + head grid +
            layer×head summary) on the full-depth twin, with the model-loading step replaced by the twin builder
            (no weights are stored to load); wall time and peak RSS (CUDA: peak allocated)
  capture   capture vs eager `output_attentions` vs plain SDPA, forward under no_grad at 2k, 8k and 16k tokens at the
            twin's real width (hidden, heads, head_dim, vocabulary) with ONE decoder layer with softmax attention and
            a one-block vision tower (a full-depth 16k forward of a 2 B model does not fit 2 cores' time); one process
            per mode; extra peak memory over the loaded model and forward time; eager is run only where its computed
            need fits --eager-limit-gb, else its need is computed. Full-depth figures scale the per-layer ones.
  train     one LoRA RAL step (group 4, 32 new tokens, 2 updates per rollout batch: rollout with the old-policy
            pass, then the trainer's own update phase) at 1 and 2 decoder layers (real width, one-block vision tower),
            with and without gradient checkpointing; time and peak memory, extrapolated per layer to full depth.
Results go to a JSON file row by row (bench/results/real.json; the GPU run: real_cuda.json) and the markdown is
rewritten after every row, so a partial run gives a valid partial table and a rerun skips rows already done.
The inspect and train rows are measured in --rounds rounds (3 on the CPU), each a fresh process, round 1 of every twin
before round 2 so that a shared machine's load falls on all twins alike; the tables give median (min–max) over rounds,
and each round keeps its machine line (CPU model, speed flags incl. native bf16, library versions) and the load
before and after it. A rerun adds missing rounds; a row measured before rounds were kept is replaced, never merged.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import _common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", "_work", "real")
TOK_CACHE = os.path.join(WORK, "tokenizers")  # twins' tokenizers, built once
PHOTO_SRC = os.path.join(ROOT, "assets", "examples", "photos", "chelsea.jpg")
QUESTION = "What animal is in the picture?"
SHOTS = os.path.join(ROOT, "docs", "screenshots")
SHOT_TWIN = "qwen2_vl_2b"
TWIN_ORDER = ["qwen2_vl_2b", "smolvlm_256m", "qwen3_5_0_8b", "qwen3_vl_2b", "qwen2_5_vl_3b"]
CAPTURE_MODES = ["sdpa", "capture", "eager"]
TRAIN_UNITS = [(1, False), (1, True), (2, False), (2, True)]
DEFAULT_ROWS = "static,inspect,capture,train"
ROWS_CAPTURED = 16  # query rows capture keeps (the last ones), as in bench/capture_bench.py
# rows measured in rounds (one fresh process each, rounds of different twins interleaved) and the figures that get a
# median (min–max) over them; capture rows repeat their calls inside one process instead, static rows time nothing
ROUND_FIELDS = {
    "inspect": ("build_s", "wall_s", "cpu_s", "inspect_s", "figures_s", "peak_mb", "build_peak_mb", "model_mb",
                "unit_s"),
    "train": ("rollout_s", "update_s", "rollout_cpu_s", "update_cpu_s", "step_s", "cpu_s", "extra_mb",
              "update_extra_mb", "base_mb", "unit_s"),
}


log = C.logger("real_bench")


# ============================================================================================== worker side

def photo_path() -> str:
    """The bench photo: chelsea.jpg (451×300) center-cropped to 4:3 and resized to 1024×768 (Lanczos)."""
    from PIL import Image

    p = os.path.join(WORK, "photo_1024x768.png")
    if not os.path.exists(p):
        os.makedirs(WORK, exist_ok=True)
        im = Image.open(PHOTO_SRC).convert("RGB")
        w, h = im.size
        cw = min(w, round(h * 4 / 3))
        ch = min(h, round(cw * 3 / 4))
        left, top = (w - cw) // 2, (h - ch) // 2
        im.crop((left, top, left + cw, top + ch)).resize((1024, 768), Image.LANCZOS).save(p + ".tmp.png")
        os.replace(p + ".tmp.png", p)
    return p


class Meter:
    """Peak memory over a region: CUDA peak allocated, or on the CPU the kernel's RSS high-water mark (reset through
    /proc/self/clear_refs), both minus the level just before; and wall time."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, str(device).startswith("cuda")

    def now_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2 ** 20
        return C.proc_status_mb()["VmRSS"]

    def __enter__(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            C.reset_peak_rss()
        self.base = self.now_mb()
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self.peak = C.proc_status_mb()["VmHWM"]
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.extra = self.peak - self.base
        return False


def _setup(args):
    import torch
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def _dtype(args):
    import torch
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]


def _process_peak_mb(device) -> float:
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return C.proc_status_mb()["VmHWM"]


def w_static(args) -> dict:
    from PIL import Image

    from ral_core.builders.twins import build_twin, describe, parameter_count
    from ral_core.trainer import is_vision_param

    a = build_twin(args.twin, meta=True, tokenizer_cache=TOK_CACHE)
    img = Image.open(photo_path()).convert("RGB")
    proc = a.process_images([img])
    n_vision = sum(p.numel() for n, p in a.model.named_parameters() if is_vision_param(n))
    meta = proc["meta"][0]
    g = a.geometry_from_meta(img.size, meta)
    resized = g.groups[0].get("resized") if "resized" in g.groups[0] else None
    L = len(a.prompt_ids(proc["n_tokens"][0], QUESTION, meta))
    return {**describe(args.twin), "params": parameter_count(a), "vision_params": n_vision,
            "visual_tokens": int(proc["n_tokens"][0]), "prompt_tokens": L, "resized": resized,
            "tiles": [meta.get("rows"), meta.get("cols")] if "rows" in meta else None,
            "pixel_note": a.pixel_budget_note() if hasattr(a, "pixel_budget_note") else ""}


def w_inspect(args) -> dict:
    """`ral inspect` itself (argument parsing, inspect(), figures), given the twin instead of loading --model."""
    import ral_core.cli as cli
    from ral_core.builders.twins import build_twin, parameter_count

    torch = _setup(args)
    out = os.path.join(WORK, f"{args.device}-{args.dtype}", args.twin, "inspect")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    depth = dict(text_layers=1, vision_depth=1) if args.quick else {}
    adapter = build_twin(args.twin, dtype=_dtype(args), device=args.device, tokenizer_cache=TOK_CACHE, **depth)
    t_build = time.perf_counter() - t0
    rss_model = C.proc_status_mb()["VmRSS"] if args.device == "cpu" else torch.cuda.memory_allocated() / 2 ** 20
    build_peak = _process_peak_mb(args.device)
    gc.collect()
    if args.device == "cpu":  # the peak of inspect itself (weights resident), not of the random initialisation
        C.reset_peak_rss()
    else:
        torch.cuda.reset_peak_memory_stats()
    timing = {}
    argv = ["--debug", "inspect", "--image", photo_path(), "--question", QUESTION, "--out", out, "--no-progress",
            "--max-new-tokens", str(4 if args.quick else 16), "--per-head-scale"]
    c0, t1 = time.process_time(), time.perf_counter()
    rc = cli.main(argv, adapter=adapter, timings=timing)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c0
    if rc != 0:
        raise RuntimeError(f"ral inspect returned {rc}")
    res = {"rc": rc, "build_s": t_build, "wall_s": wall, "cpu_s": cpu, "inspect_s": timing.get("inspect_s"),
           "figures_s": wall - timing.get("inspect_s", 0.0), "peak_mb": _process_peak_mb(args.device),
           "build_peak_mb": build_peak,
           "model_mb": rss_model, "params": parameter_count(adapter), "argv": ["ral"] + argv[1:],
           "answer_tokens": None, "out": os.path.relpath(out, ROOT)}
    try:
        from ral_core.inspection import InspectionResult
        r = InspectionResult.load(os.path.join(out, "result"))
        res["answer_tokens"] = len(r.answer_ids)
        res["visual_tokens"] = int(r.geometry.n_tokens)
        res["layers_captured"] = len(r.layers)
    except Exception as e:  # noqa: BLE001 — the counts are a nicety
        res["load_note"] = f"{type(e).__name__}: {e}"
    if args.device != "cpu":
        res["peak_rss_mb"] = C.proc_status_mb()["VmHWM"]
    return res


def _inputs(adapter, target: int, image):
    """Model inputs of exactly `target` tokens: the photo plus the question padded with one-token words."""
    base = adapter.build_inputs([image], [QUESTION])["model_inputs"]["input_ids"].shape[1]
    fill = max(0, target - base)
    b = adapter.build_inputs([image], [QUESTION + " one" * fill])
    mi = b["model_inputs"]
    return mi, int(mi["input_ids"].shape[1]), int(adapter.visual_mask(mi["input_ids"][0]).sum())


def eager_layer_need_mb(heads: int, L: int, dtype_bytes: int) -> float:
    """Peak extra of one eager attention layer with output_attentions: scores and their scaled/masked copies in the
    model dtype, the fp32 softmax, its cast back (kept) — about heads·L²·(3·b + 4) bytes."""
    return heads * L * L * (3 * dtype_bytes + 4) / 2 ** 20


def w_capture(args) -> dict:
    from PIL import Image

    from ral_core.attention import capture
    from ral_core.inspection import CAPTURE_ONLY
    from ral_core.builders.twins import build_twin, describe

    torch = _setup(args)
    mode = args.mode
    d = describe(args.twin)
    adapter = build_twin(args.twin, text_layers=1, vision_depth=1, dtype=_dtype(args), device=args.device,
                         tokenizer_cache=TOK_CACHE)
    model = adapter.model
    if mode == "eager":
        model.set_attn_implementation({"text_config": "eager"})
    # a small image (448×336 of the photo: 64–192 visual tokens) so the vision tower, the same in every mode, stays a
    # small part of the forward; the rest of the length is text
    img = Image.open(photo_path()).convert("RGB").resize((448, 336), Image.LANCZOS)
    b = torch.finfo(_dtype(args)).bits // 8
    res = {"mode": mode, "lengths": {}, "heads": d["heads"], "dtype_bytes": b, "rows": ROWS_CAPTURED}
    limit_mb = args.eager_limit_gb * 1024

    def call(mi, L):
        rows = torch.arange(L - ROWS_CAPTURED, L, device=mi["input_ids"].device)[None]
        if mode == "sdpa":
            with torch.no_grad():
                return model(**mi, **CAPTURE_ONLY), None
        if mode == "capture":
            with torch.no_grad(), capture(model, "all", rows) as maps:
                out = model(**mi, **CAPTURE_ONLY)
            return (out, dict(maps)), float(next(iter(maps.values()))[..., :].sum())
        with torch.no_grad():
            out = model(**mi, output_attentions=True, **CAPTURE_ONLY)
        return out, float(out.attentions[-1][:, :, -ROWS_CAPTURED:].float().sum())

    warm = False
    for target in args.lengths:
        mi, L, nv = _inputs(adapter, target, img)
        need = eager_layer_need_mb(d["heads"], L, b)
        entry = {"L": L, "visual": nv, "eager_layer_need_mb": need}
        if mode == "eager" and need > limit_mb:
            entry["skipped"] = f"computed need {need:.0f} MiB > limit {limit_mb:.0f} MiB"
            res["lengths"][str(target)] = entry
            log(f"{args.twin} {mode} L={L}: skipped ({entry['skipped']})")
            continue
        if not warm:  # one warm-up call (lazy initialisation, allocator) at the first length
            keep, _ = call(mi, L)
            del keep
            warm = True
        calls = []
        for _ in range(max(1, args.capture_repeats)):
            with Meter(args.device) as m:
                keep, check = call(mi, L)
            del keep
            gc.collect()
            calls.append({"wall_s": m.wall, "cpu_s": m.cpu, "extra_mb": m.extra})
        # medians in the row's own fields (the report's figures), every call kept for the spread
        entry.update({k: C.median([c[k] for c in calls]) for k in ("wall_s", "cpu_s", "extra_mb")})
        entry.update({"check": check, "calls": calls})
        res["lengths"][str(target)] = entry
        log(f"{args.twin} {mode} L={L}: {entry['wall_s']:.1f} s, extra {entry['extra_mb']:.1f} MiB "
            f"({len(calls)} calls)")
        del mi
        gc.collect()
    return res


def w_train(args) -> dict:
    import train_bench as TB
    from accelerate import Accelerator

    from ral_core.attention import enable_gradient_checkpointing
    from ral_core.config import build_config
    from ral_core.builders.twins import build_twin
    from ral_core.trainer import Trainer

    torch = _setup(args)
    k, ckpt = args.layers, bool(args.ckpt)
    tmp = tempfile.mkdtemp(prefix="real_train_")
    data = os.path.join(tmp, "data.jsonl")
    from PIL import Image
    tw, th = (int(x) for x in args.train_size.split("x"))
    img_path = os.path.join(tmp, f"photo_{tw}x{th}.png")
    Image.open(photo_path()).convert("RGB").resize((tw, th), Image.LANCZOS).save(img_path)
    with open(data, "w") as f:
        f.write(json.dumps({"image": img_path, "question": QUESTION, "answer": "a cat"}) + "\n")
    adapter = build_twin(args.twin, text_layers=k, vision_depth=1, dtype=_dtype(args), device=args.device,
                         tokenizer_cache=TOK_CACHE)
    half = args.dtype != "float32"
    cfg = build_config("ral", {"device": "cuda" if args.device.startswith("cuda") else "cpu",
                               "threads": args.threads, "seed": 0, "steps": 1, "save_every": 0, "snapshot_every": 0,
                               "eval_every": 0, "prompts_per_step": 1, "group_size": 4,
                               "max_new_tokens": 4 if args.quick else 32, "epochs": 2, "minibatch_size": 4,
                               "lora_r": 8, "lora_alpha": 16, "dataset": data, "output_dir": os.path.join(tmp, "run"),
                               "precision": "bf16-mixed" if half else "fp32"})
    assert cfg.updates_per_step == 2 and cfg.lambda_attn > 0
    tr = Trainer(cfg, adapter=adapter, accelerator=Accelerator(cpu=args.device == "cpu"))
    torch.set_num_threads(args.threads)
    if ckpt:
        enable_gradient_checkpointing(tr.model)
    n_train = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    with Meter(args.device) as m_roll:
        with tr.precision.autocast():
            _, ro, synthetic = TB.fixed_batches({"ral": tr})
    peak_roll = m_roll.peak
    with Meter(args.device) as m_upd:
        n_upd = TB.update_phase(tr, ro)
    base = m_roll.base
    shutil.rmtree(tmp, ignore_errors=True)
    return {"layers": k, "ckpt": ckpt, "rollout_s": m_roll.wall, "update_s": m_upd.wall,
            "rollout_cpu_s": m_roll.cpu, "update_cpu_s": m_upd.cpu,
            "step_s": m_roll.wall + m_upd.wall, "cpu_s": m_roll.cpu + m_upd.cpu,
            "extra_mb": max(peak_roll, m_upd.peak) - base, "update_extra_mb": m_upd.extra, "base_mb": base,
            "updates": n_upd, "L": int(ro.inputs["input_ids"].shape[1]), "P": int(ro.P),
            "T": int(ro.completion.shape[1]), "N": len(ro.texts), "trainable": n_train, "synthetic_adv": synthetic,
            "image": args.train_size, "visual": int(ro.visual_keys[0].sum()),
            "precision": tr.precision.mode}


def worker_main(args) -> None:
    fn = {"static": w_static, "inspect": w_inspect, "capture": w_capture, "train": w_train}[args.worker]
    res = fn(args)
    print("RESULT " + json.dumps(res), flush=True)


# ============================================================================================== parent side

def units_for(twin: str, rows: list[str]) -> list[tuple[str, dict]]:
    out = []
    for r in rows:
        if r == "static":
            out.append(("static", {}))
        elif r == "inspect":
            out.append(("inspect", {}))
        elif r == "capture":
            out += [(f"capture:{m}", {"mode": m}) for m in CAPTURE_MODES]
        elif r == "train":
            out += [(f"train:{k}:{'ckpt' if c else 'plain'}", {"layers": k, "ckpt": int(c)}) for k, c in TRAIN_UNITS]
    return out


def plan(args) -> list[tuple[str, str, dict]]:
    """(twin, unit, params): every static row first (cheap), then all rows of Qwen2-VL-2B (the goal twin), then
    inspect and capture of the others twin by twin, then their training rows (the slowest)."""
    twins = [t for t in TWIN_ORDER if t in args.twins]
    sel = args.only_rows
    want = lambda t, r: r in args.rows and (sel.get(t) is None or r in sel[t])  # noqa: E731
    units = [(t, u, p) for t in twins if want(t, "static") for u, p in units_for(t, ["static"])]
    first, rest = [t for t in twins if t == SHOT_TWIN], [t for t in twins if t != SHOT_TWIN]
    for stages, group in (((("inspect", "capture", "train"),), first), ((("inspect", "capture"), ("train",)), rest)):
        for stage in stages:
            for t in group:
                for r in stage:
                    if want(t, r):
                        units += [(t, u, p) for u, p in units_for(t, [r])]
    return units


def run_unit(args, twin, unit, params, logdir) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), RAL_THREADS=str(args.threads))
    if args.device == "cpu":
        env.update(C.MALLOC_ENV)  # freed tensors go back to the OS at once, so RSS follows live memory
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", unit.split(":")[0], "--twin", twin,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--eager-limit-gb", str(args.eager_limit_gb), "--train-size", args.train_size,
           "--capture-repeats", str(args.capture_repeats),
           "--lengths", *map(str, args.lengths)]
    if args.quick:
        cmd.append("--quick")
    for k, v in params.items():
        cmd += [f"--{k}", str(v)]
    if args.nice and args.device == "cpu":
        cmd = ["nice", "-n", str(args.nice)] + cmd
    logf = os.path.join(logdir, f"{twin}-{unit.replace(':', '-')}.log")
    load_before = C.loadavg()
    t0 = time.perf_counter()
    with open(logf, "w") as lf:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, text=True, cwd=ROOT, env=env,
                           timeout=args.unit_timeout)
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
    if p.returncode != 0 or res is None:
        tail = open(logf).read()[-2500:]
        raise RuntimeError(f"{twin} {unit} failed (rc {p.returncode}); log {logf}:\n{tail}")
    res["unit_s"] = time.perf_counter() - t0
    return stamp(res, load_before)


def stamp(res: dict, load_before: str) -> dict:
    """What a row needs beside its figures: when, the load before and after, the machine line (CPU model, speed
    flags incl. native bf16, library versions) and the code it measured."""
    res.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), loadavg_before=load_before,
               loadavg=C.loadavg(), machine=C.machine_line(), code=C.code_version())
    return res


def row_kind(unit: str) -> str:
    return unit.split(":")[0]


def rounds_of(row: dict | None) -> list[dict]:
    """The measured rounds of a row; a row from before rounds were kept has none (it is a single measurement)."""
    return (row or {}).get("rounds") or []


def add_round(row: dict | None, res: dict, unit: str) -> dict:
    """The row with one more round: every round kept (its figures, date, load before/after, machine, code), the row's
    own figures the medians over the rounds, the rest from the latest round. A row without rounds (a single
    measurement from before) is replaced, never merged into."""
    fields = ROUND_FIELDS[row_kind(unit)]
    meta = ("date", "loadavg_before", "loadavg", "machine", "code")
    rounds = rounds_of(row) + [{k: res[k] for k in fields + meta if k in res}]
    out = {k: v for k, v in res.items() if k not in meta}
    for k in fields:
        vals = [r[k] for r in rounds if r.get(k) is not None]
        if vals:
            out[k] = C.median(vals)
    machines = {r.get("machine") for r in rounds}
    out.update(rounds=rounds, date=f"{rounds[0]['date']} – {rounds[-1]['date']}" if len(rounds) > 1 else res["date"],
               loadavg=res["loadavg"],
               machine=machines.pop() if len(machines) == 1 else "; ".join(sorted(str(m) for m in machines)))
    return out


def spread(row: dict | None, field: str, fmt=lambda x: f"{x:.0f}") -> str:
    """A row's figure as 'median (min–max)' over its rounds; one round, or a row from before rounds, as is."""
    if not row or row.get(field) is None:
        return "–"
    vals = [r[field] for r in rounds_of(row) if r.get(field) is not None]
    if len(vals) > 1:
        return f"{fmt(C.median(vals))} ({fmt(min(vals))}–{fmt(max(vals))})"
    return fmt(row[field])


def schedule(todo: list, rounds: int) -> list[tuple[str, str, dict, int]]:
    """(twin, unit, params, round): rows without rounds once, in plan order; rounded rows in interleaved rounds
    (round 1 of every row of a group, then round 2, …) so that contention falls on the rows of a group alike. Groups:
    every twin's inspect row, then Qwen2-VL-2B's training rows, then the other twins' training rows."""
    def group(t, u):
        k = row_kind(u)
        return None if k not in ROUND_FIELDS else (k, k == "train" and t != SHOT_TWIN)

    out, seen = [], []
    for t, u, p in todo:
        g = group(t, u)
        if g is None:
            out.append((t, u, p, 0))
        elif g not in seen:
            seen.append(g)
            members = [x for x in todo if group(x[0], x[1]) == g]
            out += [(mt, mu, mp, r) for r in range(1, rounds + 1) for mt, mu, mp in members]
    return out


def results_json(out: str | None, suffix: str = "", read_only: bool = False) -> str:
    """The rows file: the committed bench/results/real.json for the committed report (and for --report-only, which
    only reads it); a run whose report goes elsewhere keeps its rows next to that report, starting from a copy of
    the committed rows, so a trial run never rewrites the committed measurements."""
    committed = os.path.join(ROOT, "bench", "results", f"real{suffix}.json")
    if read_only or not out or os.path.abspath(out) == os.path.join(ROOT, "bench", "results", f"real{suffix}.md"):
        return committed
    path = os.path.splitext(os.path.abspath(out))[0] + ".json"
    if not os.path.exists(path) and os.path.exists(committed):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(committed, path)
    return path


def load_results(path) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": {}, "rows": {}}


def save_results(path, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def copy_screenshots(res: dict) -> list[str]:
    """The Qwen2-VL-2B twin's overlay, head grid and layer×head summary into docs/screenshots/."""
    os.makedirs(SHOTS, exist_ok=True)
    out = []
    for name in ("overlay", "heads", "layers_heads"):
        src = os.path.join(ROOT, res["out"], f"{name}.png")
        dst = os.path.join(SHOTS, f"real_{SHOT_TWIN}_{name}.png")
        if os.path.exists(src) and not os.path.exists(dst):  # every round draws the same; the first copy stays
            shutil.copyfile(src, dst)
        if os.path.exists(dst):
            out.append(os.path.relpath(dst, ROOT))
    ans = os.path.join(ROOT, res["out"], "answer.txt")
    if os.path.exists(ans):
        res["answer"] = open(ans).read().strip()
    return out


# ============================================================================================== report

def _f(x, nd=0, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{nd}f}{unit}"


def _gb(mib):
    """Memory measured in MiB (2^20 bytes), labelled as such: GiB from 1024 MiB up."""
    return "–" if mib is None else (f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB")


def _twin_rows(w, twins, get, row: str, n_cols: int, line) -> None:
    """One table row per twin from its `row` measurement (line(twin, record) → markdown), else 'not measured yet'."""
    for t in twins:
        r = get(t, row)
        w(line(t, r) if r else f"| {t} | not measured yet |" + " |" * (n_cols - 2))


def _fit(p1, p2, n):
    """Linear extrapolation from 1 and 2 layers to n layers."""
    return p1 + (p2 - p1) * (n - 1)


def _call_ratios(a: dict | None, b: dict | None) -> list[float]:
    """a/b CPU time per measured call (the i-th call of each mode paired); one call: the medians' ratio."""
    if not a or not b:
        return []
    ca, cb = a.get("calls"), b.get("calls")
    if ca and cb:
        return [x["cpu_s"] / y["cpu_s"] for x, y in zip(ca, cb)]
    return [a["cpu_s"] / b["cpu_s"]] if a.get("cpu_s") and b.get("cpu_s") else []


def _call_ratio(a, b) -> str:
    r = _call_ratios(a, b)
    if not r:
        return "–"
    if len(r) == 1:
        return f"{r[0]:.3f} (one call)"
    return f"{C.median(r):.3f} ({min(r):.3f}–{max(r):.3f}, {len(r)} calls)"


def _longest_ratio_text(twins, get) -> str:
    """The capture/SDPA CPU-time ratios at each twin's longest measured length, in one sentence."""
    parts, single = [], False
    for t in twins:
        sd, ca = get(t, "capture:sdpa"), get(t, "capture:capture")
        if not (sd and ca):
            continue
        tgt = max(set(sd["lengths"]) & set(ca["lengths"]), key=int, default=None)
        r = _call_ratios(sd["lengths"].get(tgt), ca["lengths"].get(tgt)) if tgt else []
        if r:
            single |= len(r) == 1
            parts.append((t, int(tgt), [1 / x for x in r]))
    if not parts:
        return ""
    return (" At the longest length capture's one-layer forward took, in CPU time, "
            + "; ".join(f"{_call_ratio_list(r)} SDPA's ({t}, {n:,} tokens)" for t, n, r in parts)
            + (" (rows marked 'one call' are single calls on a shared machine: read them as ±10 %)" if single else "")
            + ".")


def _call_ratio_list(r) -> str:
    return f"{r[0]:.2f}×" if len(r) == 1 else f"{C.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"


def _load1(load: str | None) -> str:
    return (load or "?").split()[0]


def _load_range(r: dict) -> str:
    """The 1-minute load over a row's rounds (before and after each), or at the end of a single measurement."""
    xs = [float(x[k].split()[0]) for x in rounds_of(r) for k in ("loadavg_before", "loadavg") if x.get(k)]
    return f"{min(xs):.1f}–{max(xs):.1f}" if xs else _load1(r.get("loadavg"))


def _n_rounds(r: dict | None) -> str:
    if not r:
        return "–"
    return str(len(rounds_of(r))) if rounds_of(r) else "single, machine not recorded" if not r.get("machine") \
        else "single"


def _pair(a: str, b: str) -> str:
    return a if a == b else f"{a} / {b}"


def rounds_summary(rows: dict, dev: str, dt: str) -> str:
    """Which rows have how many rounds, e.g. 'inspect rows: 3 rounds (qwen2_vl_2b, …); train rows: …'."""
    parts = []
    for kind in ROUND_FIELDS:
        labels = {}  # twin → {label: [units]}
        for k, v in rows.items():
            _, _, twin, unit = k.split("/", 3)
            if k.startswith(f"{dev}/{dt}/") and row_kind(unit) == kind:
                n = len(rounds_of(v))
                label = (f"{n} rounds" if n > 1 else "1 round" if n else
                         "a single measurement, machine not recorded" if not v.get("machine") else "a single measurement")
                labels.setdefault(twin, {}).setdefault(label, []).append(unit)
        by_label = {}
        for twin, ls in labels.items():
            for label, units in ls.items():
                # a twin whose rows of this kind all share the label is named alone
                by_label.setdefault(label, []).append(twin if len(ls) == 1 else f"{twin} {', '.join(units)}")
        if by_label:
            parts.append(f"{kind} rows: " + "; ".join(f"{lab} ({', '.join(names)})" for lab, names in by_label.items()))
    return "; ".join(parts) or "none"


def _full(r1: dict, r2: dict, field: str, n: int, fmt, what: str) -> str:
    """A figure extrapolated from 1 and 2 layers to n (the rows' medians); a second layer that measured no dearer
    than the first is noise, not a negative per-layer cost; † where the two rows' ranges over rounds overlap."""
    a, b = r1.get(field), r2.get(field)
    if a is None or b is None:
        return "–"
    if b <= a:
        return f"– ({what}: 1→2 layers within the noise)"
    ra = [x[field] for x in rounds_of(r1) if x.get(field) is not None]
    rb = [x[field] for x in rounds_of(r2) if x.get(field) is not None]
    overlap = len(ra) > 1 and len(rb) > 1 and min(rb) <= max(ra)
    return fmt(_fit(a, b, n)) + (" †" if overlap else "")


def _ckpt_text(twins, get) -> str:
    """What checkpointing does to the update phase of the 2B–3B Qwen twins, from the rows' medians."""
    grow, cost = [], []
    for t in twins:
        if not t.startswith("qwen") or t == "qwen3_5_0_8b":
            continue
        r = {(k, c): get(t, f"train:{k}:{c}") for k in (1, 2) for c in ("plain", "ckpt")}
        if all(r.values()):
            grow.append((r[2, "plain"]["update_extra_mb"] - r[1, "plain"]["update_extra_mb"],
                         r[2, "ckpt"]["update_extra_mb"] - r[1, "ckpt"]["update_extra_mb"]))
            cost += [r[k, "ckpt"]["update_cpu_s"] / r[k, "plain"]["update_cpu_s"] for k in (1, 2)]
    if not grow:
        return "(its rows are not measured yet)."
    rng = lambda xs, nd=0: f"{min(xs):.{nd}f}–{max(xs):.{nd}f}"  # noqa: E731
    return (f"changes the update phase's memory growth per decoder layer of the 2B–3B Qwen twins from "
            f"{rng([g[0] for g in grow])} MiB to {rng([g[1] for g in grow])} MiB at these sequence lengths "
            f"(4 × 170–250 tokens), for {rng(cost, 2)}× the update phase's CPU time (medians over the rounds).")


def _step_peak_text(twins, get) -> str:
    xs = [get(t, f"train:{k}:{c}")["extra_mb"] for t in twins for k in (1, 2) for c in ("plain", "ckpt")
          if get(t, f"train:{k}:{c}")]
    return f"a step's extra peak is {_gb(min(xs))}–{_gb(max(xs))}" if xs else "not measured yet"


def report(data: dict, args) -> str:
    rows, meta = data["rows"], data.get("meta", {})
    dev, dt = args.device, args.dtype
    key = lambda t, u: f"{dev}/{dt}/{t}/{u}"  # noqa: E731
    get = lambda t, u: rows.get(key(t, u))  # noqa: E731
    L = []
    w = L.append
    gpu = dev != "cpu"
    w(f"# Real sizes: shape twins of real VLMs on {'a GPU' if gpu else 'this CPU'} ({dev}, {dt} weights)"
      + (" — QUICK smoke run, not measurements" if args.quick else ""))
    w("")
    w(f"- Command: `make bench-real` = `{meta.get('command', 'HF_HUB_OFFLINE=1 .venv/bin/python bench/real_bench.py')}`"
      " (rows are written as they finish; a rerun skips done rows, `--only TWIN[:ROW]` / `--force` redo some)"
      + ("; rows redone later: " + "; ".join(f"`{x}`" for x in meta.get("reruns", [])) if meta.get("reruns") else ""))
    w(f"- Machine: {meta.get('machine', '–')}")
    by_machine = {}
    for k, v in rows.items():
        if k.startswith(f"{dev}/{dt}/"):
            by_machine.setdefault(v.get("machine"), []).append(k.split("/", 2)[2])
    unrecorded = ("not recorded (measured before each row kept its machine line; nproc 2, CPU `AMD EPYC`, flags "
                  "unknown)")
    if set(by_machine) != {meta.get("machine")}:
        w("- Rows by the machine that measured them: " + "; ".join(
            f"{m or unrecorded}: {len(v)} row(s) ({', '.join(v)})"
            for m, v in sorted(by_machine.items(), key=lambda kv: kv[0] is None)))
    w("- Rounds: " + rounds_summary(rows, dev, dt) + ". The machine was **shared** while these ran: 2 cores, with "
      "other engineers' benchmarks and test suites on the other core (at times on both); every measuring process ran "
      "one torch thread (under nice 5 where the command says so). Wall times carry that contention; compare CPU "
      "times. Each round's finish time and 1-minute load before → after: the last section.")
    if meta.get("bf16_speed") and not gpu:
        w(f"- {C.bf16_line(meta['bf16_speed'])}; measured {meta.get('bf16_speed_date', '')}, load "
          f"{meta.get('bf16_speed_load', '?')}. CPU times of the bf16 rows below hold only for a CPU with native bf16 "
          "(`avx512_bf16` / `amx_bf16`): on another 2-core `AMD EPYC` machine without it, bf16 matmuls ran 2.9× "
          "slower than fp32 and the Qwen2-VL-2B inspect row took over 6.8 CPU-minutes. Compare CPU times only between "
          "machines with the same flags.")
    w(f"- Twins (`ral_core/builders/twins.py`, settings and sources in `assets/twins/`): the real transformers class at "
      "the published config, **random weights**, the family's image processor at the published settings, a tokenizer "
      "with the real vocabulary size and special-token ids. Answers are therefore noise; sizes, token counts, memory "
      "and time are the real models'. Weights in "
      f"{dt}{' (as the checkpoints are published; fp32 would need 4 × parameters bytes: 14 GiB for the 3B, more than this shared 23.5 GiB machine can spare)' if dt == 'bfloat16' and not gpu else ''}; "
      f"{args.threads} torch thread(s) per measuring process; every row in a fresh process.")
    w(f"- Photo: `assets/examples/photos/chelsea.jpg` center-cropped to 4:3 and resized to 1024×768; question "
      f"\"{QUESTION}\".")
    w("")
    twins = [t for t in TWIN_ORDER]

    # ---- sizes
    w("## Sizes and visual tokens (1024×768 photo, published processor settings)")
    w("")
    w("| twin (hub repo) | parameters (vision) | decoder: layers (softmax-attention) × hidden, heads / KV × head_dim | "
      "vocab | visual tokens | prompt tokens | how the photo is cut |")
    w("|---|---:|---|---:|---:|---:|---|")
    def size_row(t, s):
        cut = (f"{s['tiles'][0]}×{s['tiles'][1]} tiles of 512² + global image, 64 tokens each" if s.get("tiles")
               else f"resized to {s['resized'][0]}×{s['resized'][1]} px" if s.get("resized") else "")
        return (f"| {t} (`{s['repo']}`) | {s['params'] / 1e9:.3f} B ({s['vision_params'] / 1e6:.0f} M) | {s['layers']} "
                f"({s['attn_layers']}) × {s['hidden']}, {s['heads']} / {s['kv_heads']} × {s['head_dim']} | "
                f"{s['vocab']:,} | **{s['visual_tokens']:,}** | {s['prompt_tokens']:,} | {cut} |")
    _twin_rows(w, twins, get, "static", 7, size_row)
    w("")

    # ---- inspect
    w("## `ral inspect` on the full-depth twins (16 new tokens, capture of every layer, 3 figures)")
    w("")
    w("| twin | rounds | inspect wall s (inspect() / figures) | CPU time s | model build (not in wall) | peak "
      + ("GPU memory" if gpu else "RSS") + " | weights in memory | answer tokens | visual tokens | layers captured |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    _twin_rows(w, twins, get, "inspect", 10, lambda t, r: (
        f"| {t} | {_n_rounds(r)} | **{spread(r, 'wall_s')}** ({_f(r.get('inspect_s'), 0)} / "
        f"{_f(r.get('figures_s'), 1)}) | {spread(r, 'cpu_s')} | {r['build_s']:.0f} s | **{spread(r, 'peak_mb', _gb)}** | "
        f"{_gb(r['model_mb'])} | {_f(r.get('answer_tokens'))} | {_f(r.get('visual_tokens'))} | "
        f"{_f(r.get('layers_captured'))} |"))
    w("")
    w("Wall, CPU time and peak: median (min–max) over the rounds, each round a fresh process, the twins' rounds "
      "interleaved (round 1 of every twin, then round 2, …); inspect() / figures and the build: medians. 'single': "
      "one measurement from before rounds were kept.")
    w("")
    w("Wall = `ral_core.cli.main(['inspect', …])` from argument parsing to the last figure written: image processing, "
      "greedy generation of 16 tokens (a random model never stops early), the capture pass over prompt + answer with "
      "every decoder layer's rows for the answer tokens (no logits), saving the result, the overlay, the per-head grid "
      "(own colour scale per head) and the layer×head summary. The loader is the one thing replaced (the twin builder "
      "instead of `load_adapter`, there being no weights to load); building the random model is listed apart. Peak "
      "= the process's high-water mark during the inspect call (counter reset after the model was built; the weights "
      "are resident, so it includes them).")
    w("")

    # ---- capture
    w("## Capture vs eager `output_attentions` at real width")
    w("")
    w("Measured on the twin cut to **one decoder layer with softmax attention** (real hidden size, heads, KV heads, "
      "head_dim, MLP and vocabulary) and a one-block vision tower, forward under no_grad with logits for the last "
      "position only; input: the photo at 448×336 (64–192 visual tokens, so the vision tower, the same in every "
      "mode, stays small) plus the question padded with text to the length; one warm-up call, then "
      f"{args.capture_repeats} measured calls per length (rows measured before repeats were kept: one call, marked), "
      "each mode in its own process (returning allocator: RSS follows live memory, page faults included in "
      f"the times). The s columns are wall-clock medians; the capture/SDPA ratio pairs the modes' i-th calls in "
      "process CPU time (the processes ran one after another on a shared machine, so wall times drift). Capture "
      f"keeps the last {ROWS_CAPTURED} query rows of every layer. Extra (median over calls) = peak over the loaded "
      "model. Eager was run where its computed need (heads·L²·(3·b+4) bytes for one layer: scores, their scaled and "
      f"masked copies, the fp32 softmax and the kept maps) was under {args.eager_limit_gb:g} GiB; elsewhere the "
      "column gives that computed need. **Full depth** scales per layer: capture adds its rows per softmax layer "
      f"(heads × {ROWS_CAPTURED} × L × 4 B); eager keeps every layer's maps (heads × L² × b) on top of the one-layer "
      "peak.")
    w("")
    w("| twin | tokens (visual) | SDPA s | capture s | eager s | capture/SDPA CPU time: median (min–max) over calls | "
      "extra over the loaded model, 1 layer: "
      "SDPA / capture / eager | over SDPA, 1 layer: capture / eager | full depth, over SDPA: capture / eager | "
      "capture/eager (full depth, over SDPA) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    goal = None
    for t in twins:
        cs = {m: get(t, f"capture:{m}") for m in CAPTURE_MODES}
        s = get(t, "static")
        if not any(cs.values()) or not s:
            w(f"| {t} | not measured yet | | | | | | | | |")
            continue
        lens = sorted({int(x) for c in cs.values() if c for x in c["lengths"]})
        for tgt in lens:
            e = {m: (cs[m] or {}).get("lengths", {}).get(str(tgt)) for m in CAPTURE_MODES}
            any_e = next(x for x in e.values() if x)
            n_tok, nv = any_e["L"], any_e["visual"]
            H, b, n_attn = s["heads"], (cs["capture"] or cs["sdpa"] or cs["eager"])["dtype_bytes"], s["attn_layers"]
            sd, ca, ea = e["sdpa"], e["capture"], e["eager"]
            ea_meas = ea and "extra_mb" in ea
            e1 = ea["extra_mb"] if ea_meas else eager_layer_need_mb(H, n_tok, b)
            # over plain SDPA: what capture's rows / eager's maps add to the same forward
            cap1 = ca["extra_mb"] - sd["extra_mb"] if ca and sd else None
            eag1 = (ea["extra_mb"] - sd["extra_mb"]) if ea_meas and sd else (None if ea_meas else e1)
            rows_mb = H * ROWS_CAPTURED * n_tok * 4 / 2 ** 20
            cap_full = max(cap1, 0.0) + (n_attn - 1) * rows_mb if cap1 is not None else None
            eag_full = eag1 + (n_attn - 1) * H * n_tok * n_tok * b / 2 ** 20 if eag1 is not None else None
            ratio = cap_full / eag_full if cap_full is not None and eag_full else None
            if t == SHOT_TWIN and tgt == max(lens) and ratio is not None:
                goal = (n_tok, cap_full, eag_full, ratio, ea_meas, n_attn, rows_mb, cap1)
            w(f"| {t} | {n_tok:,} ({nv:,}) | {_f(sd and sd['wall_s'], 1)} | {_f(ca and ca['wall_s'], 1)} | "
              f"{_f(ea['wall_s'], 1) if ea_meas else '– (not run)'} | "
              f"{_call_ratio(ca, sd)} | {_gb(sd and sd['extra_mb'])} / "
              f"{_gb(ca and ca['extra_mb'])} / {_gb(e1)}{'' if ea_meas else ' (computed)'} | "
              f"{_f(cap1, 1, ' MiB') if cap1 is not None else '–'} / {_gb(eag1)}{'' if ea_meas else ' (computed)'} | "
              f"{_gb(cap_full)} / {_gb(eag_full)} | {('1/' + format(1 / ratio, ',.0f')) if ratio else '–'} |")
    w("")
    w("Over SDPA, one layer: capture's rows are heads × 16 × L × 4 B (at 16k tokens and 12 heads: 12 MiB), within the "
      "run-to-run noise of the SDPA forward's own activations (MLP intermediates of L × intermediate, which every mode "
      "has). Full depth, over SDPA: capture = the one-layer difference (at least 0) + the rows of the other softmax "
      "layers; eager = the one-layer difference (measured, or the computed need where not run) + the maps the other "
      "layers keep (heads × L² × b each).")
    w("")

    # ---- train
    w("## One LoRA RAL training step (group 4, 32 new tokens, 2 updates per rollout batch)")
    w("")
    w(f"Recipe `ral` (λ_attn 1, last softmax layer, head mean) with LoRA r 8 on q/k/v/o, one prompt (the photo at "
      f"{args.train_size.replace('x', '×')}, chosen so the rows fit this CPU's time; the 1024×768 photo has ~5× the visual "
      "tokens) × 4 "
      "rollouts of 32 new tokens, 2 epochs × 1 mini-batch of 4 = 2 optimizer updates; precision "
      f"{'bf16-mixed (frozen weights bf16, LoRA and optimizer fp32, bf16 autocast)' if dt != 'float32' else 'fp32'}. "
      "Step = rollout (sampling with the vision tower, rewards, the no-grad old-policy pass with capture) + the "
      "trainer's update phase (`Trainer.update_phase`, via bench/train_bench.py's helpers; synthetic group-centred "
      "advantages because a random model earns no reward, as in train_bench). Measured at 1 and 2 decoder layers "
      "(real width, one-block vision tower) in fresh processes, one step each (no warm-up); **full depth** = linear "
      "extrapolation per decoder layer of the update phase (CPU time, its peak over the trainer's resident "
      "memory) and of the rollout (where 2 layers cost more than 1; its per-layer cost is small next to generation's "
      "fixed cost and the noise of this shared machine); the vision tower's remaining blocks are not included. "
      "Extra peak = the highest RSS over the step minus the RSS with model, LoRA and optimizer resident.")
    w("")
    w("Step s, its CPU s and the extra peak: median (min–max) over the rounds (each a fresh process; the rounds of a "
      "twin's four rows, and of the other twins' rows, interleaved); rollout + update and the update phase's peak: "
      "medians. The full-depth columns extrapolate the medians, in CPU time (wall time on this shared machine carries "
      "the other processes' load); † marks a figure whose 1- and 2-layer rows' ranges over rounds overlap: one "
      "layer's cost is within the round-to-round noise of a single cold step (no warm-up), so read it as a rough "
      "size. 'single': one measurement from before rounds were kept; one figure in the rounds column: both layer "
      "counts have it.")
    w("")
    w("| twin | checkpointing | rounds (1 / 2 layers) | tokens / sequence: prompt (visual) + new | 1 layer: step s "
      "(rollout + update; CPU s) / extra peak (update phase) | 2 layers: same | full depth (layers): update phase "
      "CPU s / its extra peak | full depth: rollout CPU s |")
    w("|---|---|---:|---:|---:|---:|---:|---:|")
    for t in twins:
        s = get(t, "static")
        for ck in ("plain", "ckpt"):
            r1, r2 = get(t, f"train:1:{ck}"), get(t, f"train:2:{ck}")
            if not (r1 or r2):
                if ck == "plain":
                    w(f"| {t} | not measured yet | | | | | | |")
                continue
            f1 = lambda x: f"{x:.1f}"  # noqa: E731
            cell = lambda r: (f"{spread(r, 'step_s', f1)} ({r['rollout_s']:.1f} + {r['update_s']:.1f}; CPU "  # noqa: E731
                              f"{spread(r, 'cpu_s', f1)}) / {spread(r, 'extra_mb', _gb)} ({_gb(r['update_extra_mb'])})"
                              if r else "–")
            full_u = full_r = "–"
            if r1 and r2 and s:
                n = s["layers"]
                full_u = (_full(r1, r2, "update_cpu_s", n, lambda x: f"{x:.0f}", "time") + " / "
                          + _full(r1, r2, "update_extra_mb", n, _gb, "memory") + f" ({n})")
                full_r = _full(r1, r2, "rollout_cpu_s", n, lambda x: f"{x:.0f}", "time")
            rr = r1 or r2
            w(f"| {t} | {'on (non-reentrant)' if ck == 'ckpt' else 'off'} | {_pair(_n_rounds(r1), _n_rounds(r2))} | "
              f"{rr['P']:,} ({rr.get('visual', '?')}) + {rr['T']} | "
              f"{cell(r1)} | {cell(r2)} | {full_u} | {full_r} |")
    w("")

    # ---- goals
    w("## Goals")
    w("")
    r = get(SHOT_TWIN, "inspect")
    if r:
        w(f"- `ral inspect` on the Qwen2-VL-2B twin with a 1024×768 photo **completes**: {spread(r, 'wall_s')} s "
          f"wall ({spread(r, 'cpu_s')} s CPU; rounds: {_n_rounds(r)}), peak {spread(r, 'peak_mb', _gb)}, "
          f"{_f(r.get('visual_tokens'))} visual tokens.")
    else:
        w("- `ral inspect` on the Qwen2-VL-2B twin: not measured yet.")
    if goal:
        n_tok, cf, ef, ratio, meas, n_attn, rows_mb, cap1 = goal
        w(f"- Capture's extra memory at {n_tok:,} tokens ≤ 1/50 of eager's (Qwen2-VL-2B twin, {n_attn} layers, over "
          f"plain SDPA): {_gb(cf)} vs {_gb(ef)} = 1/{1 / ratio:,.0f} → **{'met' if ratio <= 1 / 50 else 'MISSED'}** "
          f"(capture: {cap1:.1f} MiB measured on one layer, {rows_mb:.1f} MiB of rows per further layer; eager "
          f"{'measured on one layer and scaled' if meas else 'computed: one layer alone needs more than this machine has'}"
          "). Counting the forward's own activations too (extra over the loaded model), capture's peak stays near the "
          "SDPA forward's, see the table.")
    else:
        w("- Capture vs eager at 16k on the Qwen2-VL-2B twin: not measured yet.")
    w("")
    # ---- screenshots
    if not gpu:
        w("## Screenshots (Qwen2-VL-2B twin, random weights)")
        w("")
        shots = [f for f in ("overlay", "heads", "layers_heads")
                 if os.path.exists(os.path.join(SHOTS, f"real_{SHOT_TWIN}_{f}.png"))]
        if shots and r:
            import shlex
            argv = [os.path.relpath(x, ROOT) if os.path.isabs(x) else x for x in r["argv"]]
            w(f"`{shlex.join(argv)}` with the loader replaced by the twin (random weights: the maps show an "
              "untrained model's attention, the layout and readability are what these show). Last decoder layer, mean "
              "over the answer tokens.")
            w("")
            for f in shots:
                w(f"![{f}](../../docs/screenshots/real_{SHOT_TWIN}_{f}.png)")
                w("")
        else:
            w("Not made yet (they come with the Qwen2-VL-2B inspect row).")
            w("")
    if not gpu and not args.quick:
        w("## Reading it (this run)")
        w("")
        w("- **Capture vs eager.** What capture adds to a plain SDPA forward is its rows, heads × 16 × L × 4 B per "
          "softmax layer (12–16 MiB per layer at 16k tokens, within the noise of the forward's own activations); eager "
          "`output_attentions` needs 20–40 GiB for *one* layer at 16k tokens (scores, their copies, the fp32 softmax and "
          "the kept map), so none of these models can return eager maps at 16k on a 24 GiB device, and at full depth the "
          "kept maps alone are 40–320 GiB." + _longest_ratio_text(twins, get))
        w("- **Checkpointing** " + _ckpt_text(twins, get) + " With one or two layers measured, per-layer "
          "differences of a few MiB (and of Qwen3.5's linear-attention layer) are within the noise, so read the "
          "extrapolations as sizes, not exact values.")
        w("- **The rollout's LM-head peak, found here and fixed**: the first run of these rows peaked in the rollout at "
          "1.8–2.4 GiB over resident memory for the Qwen twins (0.27 GiB for SmolVLM), about one bf16 copy of the "
          "LM-head matrix per sequence of the group. A memory profile traced it to generate's prefill: the "
          "last-position slice `hidden[:, -1:, :]` of a batch is not contiguous, so `F.linear` on the CPU went through "
          "`matmul` → `bmm` with the weight expanded and copied to [4, hidden, vocab] (1.74 GiB for Qwen2-VL-2B), which "
          "also made the prefill slow (65 of a rollout's 84 s on the 1-layer Qwen2-VL-2B twin). Every adapter's head "
          "now gets a contiguous input (`ral_core/models/base.contiguous_head`; measured alone: bf16, 151,936 × 1536 "
          "head, batch 8: 25.8 s → 0.06 s). The training rows above are after the fix and on the trainer's own "
          "rollout path (image cache, shared prompts): " + _step_peak_text(twins, get) + ".")
        ins = [(t, get(t, "inspect")) for t in twins if get(t, "inspect")]
        w("- **Contention**: wall time depends on what else ran; the inspect rows took "
          + "; ".join(f"{t} {spread(r, 'wall_s')} s wall / {spread(r, 'cpu_s')} s CPU (1-minute load "
                      f"{_load_range(r)})" for t, r in ins)
          + ". Compare CPU times across rows, not wall times.")
        w("")
    w("## Contention: rounds and load")
    w("")
    w("This 2-core machine was shared with other work during the runs (other engineers' benchmarks and test "
      "suites); wall times are inflated accordingly (CPU time next to wall where it matters). Rows measured in rounds: "
      "each round's finish time and the 1-minute load average before → after it:")
    w("")
    mine = [(k.split("/", 2)[2], v) for k, v in rows.items() if k.startswith(f"{dev}/{dt}/")]
    for name, v in mine:
        if rounds_of(v):
            w(f"- {name}: " + "; ".join(f"{x.get('date', '?')} {_load1(x.get('loadavg_before'))} → "
                                        f"{_load1(x.get('loadavg'))}" for x in rounds_of(v)))
    w("")
    once = [f"{name} {v.get('loadavg', '?')}" for name, v in mine if not rounds_of(v)]
    if once:
        w("Rows measured in one process (static rows time nothing; capture rows repeat their calls inside it), load "
          "average (1/5/15 minutes) when the row finished: " + "; ".join(once) + ".")
        w("")
    return "\n".join(L) + "\n"


# ============================================================================================== main

def parse_only(spec: str | None):
    """'qwen2_vl_2b,smolvlm_256m:inspect' → (twins, {twin: rows or None})."""
    from ral_core.builders.twins import twin_names
    if not spec:
        return list(TWIN_ORDER), {}
    twins, sel = [], {}
    for part in spec.split(","):
        t, _, row = part.strip().partition(":")
        if t not in twin_names():
            raise SystemExit(f"--only: unknown twin '{t}'; choose from {', '.join(twin_names())}")
        if t not in twins:
            twins.append(t)
        if row:
            sel.setdefault(t, set()).add(row)
        else:
            sel[t] = None
    return twins, {t: (sorted(v) if v else None) for t, v in sel.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--only", default=None, help="twins and rows to run: TWIN or TWIN:ROW, comma separated "
                    "(rows: static, inspect, capture, train)")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the inspect and train rows, each a fresh "
                    "process, interleaved across twins; figures are median (min–max) over rounds; a rerun adds the "
                    "missing rounds (default: 3 on the CPU; 1 on CUDA, where scripts/gpu_check.sh runs within a "
                    "fixed time budget)")
    ap.add_argument("--quick", action="store_true", help="smoke test: cut twins, 512/1024 tokens, 4 new tokens; "
                    "results in bench/_work/real/quick.json, report printed")
    ap.add_argument("--force", action="store_true", help="rerun rows that are already in the results file")
    ap.add_argument("--out", default=None, help="markdown (default bench/results/real.md; cuda: real_cuda.md)")
    ap.add_argument("--json", default=None, help="row results (default bench/results/real.json; cuda: real_cuda.json)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="capture lengths (2048 8192 16384)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--capture-repeats", type=int, default=3, help="measured calls per mode and length in the "
                    "capture rows (after one warm-up); ratios are given as median (min–max) over calls")
    ap.add_argument("--train-size", default="448x336", help="photo size WxH of the training rows (448x336: "
                    "64–192 visual tokens; the 1024×768 photo would multiply the step time on this CPU)")
    ap.add_argument("--nice", type=int, default=0, help="run the measuring processes under nice -n N (CPU)")
    ap.add_argument("--eager-limit-gb", type=float, default=None,
                    help="run eager only where one layer's computed need is below this (CPU 6.5, GPU 24)")
    ap.add_argument("--unit-timeout", type=float, default=3600, help="seconds per row before it is abandoned")
    ap.add_argument("--deadline", default=None, help="HH:MM (UTC): start no row after this time")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the results file, run nothing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--twin", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.eager_limit_gb is None:
        args.eager_limit_gb = 6.5 if args.device == "cpu" else 24.0
    if args.lengths is None:
        args.lengths = [512, 1024] if args.quick else [2048, 8192, 16384]
    if args.rounds is None:
        args.rounds = 3 if args.device == "cpu" else 1
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: give 1 or more rounds")
    if args.worker:
        return worker_main(args)
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    if args.quick:
        args.json = args.json or os.path.join(WORK, f"quick{suffix}.json")
    args.out = None if args.quick and not args.out else (args.out or os.path.join(ROOT, "bench", "results",
                                                                                   f"real{suffix}.md"))
    args.json = args.json or results_json(args.out, suffix, read_only=args.report_only)
    args.rows = [r.strip() for r in args.rows.split(",")]
    args.twins, args.only_rows = parse_only(args.only)
    photo_path()
    data = load_results(args.json)
    import torch
    if args.report_only:
        md = report(data, args)
        with open(args.out, "w") as f:
            f.write(md)
        log(f"wrote {os.path.relpath(args.out, ROOT)} from {os.path.relpath(args.json, ROOT)}")
        return 0
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python bench/real_bench.py " + " ".join(argv or sys.argv[1:])
    reruns = data.get("meta", {}).get("reruns", [])
    if args.only or args.force or args.rows != DEFAULT_ROWS.split(","):
        # a partial rerun keeps the full run's command and is listed apart
        reruns = reruns + [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cmd}"]
        cmd = data.get("meta", {}).get("command", cmd)
    data["meta"] = {"command": cmd, "reruns": reruns,
                    "machine": C.machine_line()
                    + (f", GPU {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""),
                    "bf16_speed": C.bf16_matmul_speed(rounds=1 if args.quick else 5) if args.device == "cpu" else None,
                    "bf16_speed_date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "bf16_speed_load": C.loadavg()}
    logdir = os.path.join(WORK, "logs")
    os.makedirs(logdir, exist_ok=True)
    todo = schedule(plan(args), args.rounds)
    failed, started, dead = [], set(), set()
    for twin, unit, params, rnd in todo:
        key = f"{args.device}/{args.dtype}/{twin}/{unit}"
        row = None if args.force and key not in started else data["rows"].get(key)
        if key in dead or (row is not None and (rnd == 0 or len(rounds_of(row)) >= rnd)):
            continue
        if args.deadline:
            hh, mm = map(int, args.deadline.split(":"))
            now = time.gmtime()
            if (now.tm_hour, now.tm_min) >= (hh, mm):
                log(f"deadline {args.deadline} UTC reached; stopping before {twin} {unit}")
                break
        tag = f" round {rnd}/{args.rounds}" if rnd else ""
        log(f"{twin} {unit}{tag} …")
        try:
            res = run_unit(args, twin, unit, params, logdir)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"FAILED: {e}")
            failed.append(f"{twin} {unit}{tag}")
            dead.add(key)  # its later rounds would fail alike; the row keeps what it had
            continue
        started.add(key)
        if unit == "inspect" and twin == SHOT_TWIN and args.device == "cpu" and not args.quick:
            res["screenshots"] = copy_screenshots(res)
        data["rows"][key] = add_round(row, res, unit) if rnd else res
        save_results(args.json, data)
        md = report(data, args)
        if args.out:
            with open(args.out, "w") as f:
                f.write(md)
        log(f"{twin} {unit}{tag} done in {res['unit_s']:.0f} s")
    md = report(data, args)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        log(f"wrote {os.path.relpath(args.out, ROOT)}")
    else:
        print(md)
    if failed:
        log("failed rows: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
