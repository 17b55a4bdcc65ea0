"""Benchmark: attention capture (ral_core.attention.capture) vs eager `output_attentions=True` vs plain SDPA.

    .venv/bin/python bench/capture_bench.py --out bench/results/capture.md [--lengths 512 1024 2048] [--repeats 5]
    .venv/bin/python bench/capture_bench.py --smoke          # small model, one short length, 1 repeat, prints
    .venv/bin/python bench/capture_bench.py --logits-only    # ~1.5 min: the inspect capture pass with full logits
                                                             # vs without (4096 tokens, 151,936-token vocabulary);
                                                             # rewrites only its section of the results file

Model: a real `Qwen2VLForConditionalGeneration` with random weights (hidden 512, 8 decoder layers, 8 heads,
2 KV heads, a deliberately small vision tower so that the common vision cost does not hide the decoder
attention cost), fp32 on CPU, batch 1. Inputs: one image whose visual-token grid fills most of the target
length, plus a question padded with one-token words to reach the target length exactly.

Modes (each in its own worker process, one torch thread):
  sdpa         plain SDPA forward under no_grad (no capture)
  capture      SDPA + capture of all decoder layers, last 16 query rows, forward under no_grad
  eager        eager attention, output_attentions=True, forward under no_grad
  sdpa_bwd     SDPA forward + backward of an LM loss on the last 16 logits
  capture_bwd  capture forward + backward of the same LM loss + a loss on the captured rows (visual mass)
  eager_bwd    eager output_attentions forward + backward of the same two losses (rows taken from the L×L maps)

Timing: persistent worker per mode, default allocator; after one warm-up per (mode, length) the parent asks
the workers in rotated interleaved order (ABC, BCA, CAB, ...) for one timed call each; reports the median
wall time and the median process CPU time (CPU/wall ≪ 1 means another process took the core).
Memory: a second set of workers, started with glibc settings that return freed blocks to the OS at once
(bench/_common.MALLOC_ENV); before each call the peak-RSS counter is reset (/proc/self/clear_refs ← 5) and
extra peak = VmHWM after the call − VmRSS just before it (inputs built, model loaded, previous outputs freed).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import _common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FWD_MODES = ["sdpa", "capture", "eager"]
BWD_MODES = ["sdpa_bwd", "capture_bwd", "eager_bwd"]
ALL_MODES = FWD_MODES + BWD_MODES
LOGIT_MODES = ["inspect_full", "inspect_lean"]  # --logits-only: the inspect capture pass with / without logits
REAL_VOCAB = 151_936  # Qwen2-VL / Qwen2.5-VL

MEDIUM = dict(hidden=512, layers=8, heads=8, kv_heads=2, vision_depth=1, vision_dim=64)
SMALL = dict(hidden=64, layers=2, heads=4, kv_heads=2, vision_depth=1, vision_dim=32)


# ----------------------------------------------------------------------------------------------- worker side

class Worker:
    def __init__(self, mode: str, model_cfg: dict, n_rows: int):
        import torch

        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        from ral_core.builders.tiny import tiny_qwen2_vl

        self.torch = torch
        self.mode = mode
        self.n_rows = n_rows
        model_cfg = dict(model_cfg)
        vocab, dtype = model_cfg.pop("lm_vocab", None), model_cfg.pop("lm_dtype", None)
        self.ad = tiny_qwen2_vl(**model_cfg, max_pixels=64 * 64 * 28 * 28, seed=0)
        self.model = self.ad.model
        if vocab:  # a real-size vocabulary on a tiny-width model: the logits then dominate the capture pass
            self.model.resize_token_embeddings(vocab, mean_resizing=False)
        if dtype:
            self.model.to(getattr(torch, dtype))
        self.note: dict = {}
        if mode.startswith("eager"):
            self.model.set_attn_implementation({"text_config": "eager"})
            assert self.model.config.get_text_config()._attn_implementation == "eager"
        self.n_layers = self.ad.num_layers
        self.inputs: dict[int, dict] = {}
        self.rows_cpu = 0.0  # capture's own work (the extra softmax rows), process CPU time from inside the call

    def build(self, target: int) -> dict:
        """Inputs of exactly `target` tokens: an image of r×c visual tokens plus a padded question."""
        if target in self.inputs:
            return self.inputs[target]
        import numpy as np
        from PIL import Image

        ad = self.ad
        overhead = len(ad.prompt_ids(0, ""))
        base_q = "What digit is in row 3 column 4?"
        n_q = len(ad.tokenizer(base_q, add_special_tokens=False)["input_ids"])
        vis_budget = max(4, int(0.97 * (target - overhead - n_q)))
        r = max(2, int(math.sqrt(vis_budget)))
        c = max(2, vis_budget // r)
        img = Image.fromarray((np.random.RandomState(target).rand(r * 28, c * 28, 3) * 255).astype("uint8"))
        fill = target - overhead - n_q - r * c
        q = base_q + " one" * max(0, fill)  # " one" is one token in the offline BPE
        b = ad.build_inputs([img], [q])
        mi = b["model_inputs"]
        ids = mi["input_ids"]
        L = int(ids.shape[1])
        vis = ids[0] == ad.image_token_id
        rows = self.torch.arange(L - self.n_rows, L)[None]
        info = {"target": target, "L": L, "n_visual": int(vis.sum()), "grid": [r, c],
                "ids_hash": int((ids[0].long() * self.torch.arange(1, L + 1)).sum()) % 1000003}
        self.inputs[target] = {"mi": mi, "vis": vis, "rows": rows, "info": info}
        return self.inputs[target]

    def _attn_loss(self, rows_probs, vis):
        """−log of the attention mass the captured rows put on visual tokens, averaged; and per-layer means."""
        torch = self.torch
        loss, per_layer = 0.0, []
        for p in rows_probs:  # [B, H, R, Lk]
            mass = p[..., vis].sum(-1)  # [B, H, R]
            per_layer.append(float(mass.detach().mean()))
            loss = loss - torch.log(mass + 1e-6).mean()
        return loss / len(rows_probs), per_layer

    def call(self, target: int):
        """One measured call of this worker's mode; returns what must stay alive until the memory reading."""
        torch = self.torch
        from ral_core.attention import capture

        x = self.build(target)
        mi, vis, rows = x["mi"], x["vis"], x["rows"]
        R = self.n_rows
        check = None
        if self.mode == "sdpa":
            with torch.no_grad():
                out = self.model(**mi)
            keep = out
        elif self.mode == "capture":
            with torch.no_grad(), capture(self.model, "all", rows) as maps:
                out = self.model(**mi)
            self.rows_cpu += maps.rows_cpu_s
            _, check = self._attn_loss([maps[i] for i in range(self.n_layers)], vis)
            keep = (out, dict(maps))
        elif self.mode in LOGIT_MODES:
            # the inspect capture pass (ral_core.inspection): all layers, the last rows; with full logits (as it
            # once ran) or with the keyword arguments inspect passes now (CAPTURE_ONLY: logits of one position)
            from ral_core.inspection import CAPTURE_ONLY
            kw = CAPTURE_ONLY if self.mode == "inspect_lean" else {}
            with torch.no_grad(), capture(self.model, "all", rows) as maps:
                out = self.model(**mi, **kw)
            _, check = self._attn_loss([maps[i] for i in range(self.n_layers)], vis)
            self.note = {"logits_shape": list(out.logits.shape), "logits_dtype": str(out.logits.dtype),
                         "vocab": int(self.model.config.get_text_config().vocab_size)}
            keep = (out, dict(maps))
        elif self.mode == "eager":
            with torch.no_grad():
                out = self.model(**mi, output_attentions=True)
            _, check = self._attn_loss([a[:, :, -R:].float() for a in out.attentions], vis)
            keep = out
        else:
            lm = lambda o: -o.logits[0, -R:].float().log_softmax(-1)[:, 0].mean()  # noqa: E731
            if self.mode == "sdpa_bwd":
                out = self.model(**mi)
                loss = lm(out)
            elif self.mode == "capture_bwd":
                with capture(self.model, "all", rows) as maps:
                    out = self.model(**mi)
                self.rows_cpu += maps.rows_cpu_s
                al, _ = self._attn_loss([maps[i] for i in range(self.n_layers)], vis)
                loss = lm(out) + al
            elif self.mode == "eager_bwd":
                out = self.model(**mi, output_attentions=True)
                al, _ = self._attn_loss([a[:, :, -R:].float() for a in out.attentions], vis)
                loss = lm(out) + al
            else:
                raise ValueError(self.mode)
            loss.backward()
            g = [p.grad.norm().item() for p in self.model.parameters() if p.grad is not None]
            check = [float(loss.detach()), math.sqrt(sum(v * v for v in g))]
            keep = (out, loss)
        return keep, check

    def run(self, target: int, purpose: str) -> dict:
        torch = self.torch
        x = self.build(target)
        gc.collect()
        self.model.zero_grad(set_to_none=True)
        ok_reset = C.reset_peak_rss() if purpose == "mem" else False
        rss0 = C.proc_status_mb()["VmRSS"]
        self.rows_cpu = 0.0
        c0, t0 = time.process_time(), time.perf_counter()
        keep, check = self.call(target)
        t1, c1 = time.perf_counter(), time.process_time()
        st = C.proc_status_mb()
        del keep
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        return {**x["info"], **self.note, "mode": self.mode, "wall": t1 - t0, "cpu": c1 - c0, "rss0": rss0,
                "hwm": st["VmHWM"], "extra_mb": st["VmHWM"] - rss0, "peak_reset": ok_reset, "check": check,
                "rows_cpu": self.rows_cpu,
                "threads": torch.get_num_threads()}


def worker_main(mode: str, model_cfg: dict, n_rows: int) -> None:
    # Keep a private copy of stdout for the protocol; everything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    w = Worker(mode, model_cfg, n_rows)
    proto.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        res = w.run(int(cmd["target"]), cmd["purpose"])
        proto.write(json.dumps(res) + "\n")


# ----------------------------------------------------------------------------------------------- parent side

class Proc:
    def __init__(self, mode, purpose, model_cfg, n_rows, logdir):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **C.THREAD_ENV)
        if purpose in ("mem", "smoke"):
            env.update(C.MALLOC_ENV)
        self.log_path = os.path.join(logdir, f"{purpose}-{mode}.log")
        self.log = open(self.log_path, "w")
        self.mode, self.purpose = mode, purpose
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", mode,
                                   "--model-json", json.dumps(model_cfg), "--rows", str(n_rows)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  cwd=ROOT, env=env)

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            self.log.flush()
            tail = open(self.log_path).read()[-3000:]
            raise RuntimeError(f"worker {self.purpose}/{self.mode} died (rc={self.p.poll()}):\n{tail}")
        return json.loads(line)

    def wait_ready(self):
        return self._read()

    def run(self, target, purpose=None):
        self.p.stdin.write(json.dumps({"cmd": "run", "target": target, "purpose": purpose or self.purpose}) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
        self.log.close()


def start(modes, purpose, model_cfg, n_rows, logdir):
    procs = {m: Proc(m, purpose, model_cfg, n_rows, logdir) for m in modes}
    pids = {}
    for m, p in procs.items():
        pids[m] = p.wait_ready()["pid"]
    return procs, pids


log = C.logger()


def bench(args) -> dict:
    model_cfg = SMALL if args.smoke else MEDIUM
    modes = args.modes
    logdir = tempfile.mkdtemp(prefix="capture_bench_")
    t_start = time.perf_counter()
    info = C.machine_info()
    info["busy_before"] = C.busy_processes(exclude={os.getpid()})
    timing = {L: {m: [] for m in modes} for L in args.lengths}
    warm = {L: {} for L in args.lengths}
    mem = {L: {m: [] for m in modes} for L in args.lengths}

    # ---- timing: persistent workers, interleaved, rotated order
    log(f"[timing] starting {len(modes)} workers (logs in {logdir})")
    procs, pids = start(modes, "smoke" if args.smoke else "time", model_cfg, args.rows, logdir)
    try:
        for L in args.lengths:
            for m in modes:
                warm[L][m] = procs[m].run(L)
            log(f"[timing] L≈{L}: warm-up done ({warm[L][modes[0]]['L']} tokens)")
            n_rounds = max(args.repeats, args.bwd_repeats if any(m in BWD_MODES for m in modes) else 0)
            for r in range(n_rounds):
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                for m in order:
                    if r >= (args.bwd_repeats if m in BWD_MODES else args.repeats):
                        continue
                    res = procs[m].run(L)
                    timing[L][m].append(res)
                log(f"[timing] L≈{L}: round {r + 1}/{n_rounds} " + " ".join(
                    f"{m}={timing[L][m][-1]['wall'] * 1e3:.0f}ms" for m in order if len(timing[L][m]) > r))
    finally:
        if not args.smoke:
            for p in procs.values():
                p.close()

    # ---- memory: fresh workers with the returning allocator (smoke: the same workers, to save start-up time)
    if not args.smoke:
        log("[memory] starting workers")
        procs, _ = start(modes, "mem", model_cfg, args.rows, logdir)
    try:
        for m in modes:  # warm-up once per worker (lazy initialisation), at the shortest length
            procs[m].run(args.lengths[0], "mem")
        for L in args.lengths:
            for m in modes:
                mem[L][m] = [procs[m].run(L, "mem") for _ in range(args.mem_repeats)]
            log(f"[memory] L≈{L}: " + " ".join(f"{m}={max(x['extra_mb'] for x in mem[L][m]):.1f}MiB" for m in modes))
    finally:
        for p in procs.values():
            p.close()
    _note_end(info, t_start)
    return {"info": info, "timing": timing, "warm": warm, "mem": mem, "model_cfg": model_cfg, "modes": modes,
            "args": vars(args)}


def _note_end(info: dict, t_start: float) -> None:
    """How busy the machine was when the run ended, for the contention check."""
    info["busy_after"] = C.busy_processes(exclude={os.getpid()})
    info["loadavg_after"] = C.loadavg()
    info["elapsed_s"] = time.perf_counter() - t_start


# ----------------------------------------------------------------------------------------------- report

def _fmt(x, nd=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def report(res, command) -> str:
    info, timing, mem, warm = res["info"], res["timing"], res["mem"], res["warm"]
    modes = res["modes"]
    lengths = list(timing)
    cfg = res["model_cfg"]
    a = res["args"]
    med_w = {L: {m: C.median([x["wall"] for x in timing[L][m]]) * 1e3 for m in modes} for L in lengths}
    med_c = {L: {m: C.median([x["cpu"] for x in timing[L][m]]) * 1e3 for m in modes} for L in lengths}
    min_c = {L: {m: min(x["cpu"] for x in timing[L][m]) * 1e3 for m in modes} for L in lengths}
    ext = {L: {m: max(x["extra_mb"] for x in mem[L][m]) for m in modes} for L in lengths}
    cpu_wall = {L: {m: [x["cpu"] / x["wall"] for x in timing[L][m]] for m in modes} for L in lengths}
    worst = min(min(v) for d in cpu_wall.values() for v in d.values())
    med_cw = C.median([r for d in cpu_wall.values() for v in d.values() for r in v])
    contended = worst < 0.9
    ext_min = {L: {m: min(x["extra_mb"] for x in mem[L][m]) for m in modes} for L in lengths}
    toks = {L: warm[L][modes[0]] for L in lengths}
    has = lambda *ms: all(m in modes for m in ms)  # noqa: E731

    def rounds(L, a_, b_, key="cpu", src=timing):
        """a/b per round (the same round's calls paired: the interleaving puts them side by side)."""
        n = min(len(src[L][a_]), len(src[L][b_]))
        return [src[L][a_][i][key] / src[L][b_][i][key] for i in range(n)]

    def spread(xs, nd=3):
        xs = [x for x in xs if x == x and math.isfinite(x)]
        if not xs:
            return "–"
        return (f"{C.median(xs):.{nd}f} ({min(xs):.{nd}f}–{max(xs):.{nd}f})" if len(xs) > 1 else
                f"{xs[0]:.{nd}f} (one round)")

    lines = []
    w = lines.append
    w("# Attention capture vs eager `output_attentions` vs plain SDPA" + (" (SMOKE run)" if a["smoke"] else ""))
    w("")
    w(f"- Command: `{command}`")
    w(f"- Date: {info['date']}; total run time {info['elapsed_s']:.0f} s")
    w(f"- Machine: {C.machine_line(info)}; load average before {info['loadavg']}, after {info['loadavg_after']}")
    w(f"- Model: `Qwen2VLForConditionalGeneration`, random weights, fp32 CPU, batch 1: hidden {cfg['hidden']}, "
      f"{cfg['layers']} decoder layers, {cfg['heads']} heads ({cfg['kv_heads']} KV heads), vision tower depth "
      f"{cfg['vision_depth']} dim {cfg['vision_dim']} (kept small so the shared vision cost does not dilute the "
      f"decoder-attention comparison). Capture: all {cfg['layers']} layers, last {a['rows']} query rows.")
    w(f"- One torch thread per worker (`torch.set_num_threads(1)`, OMP/MKL = 1). Times: median of {a['repeats']} "
      f"forward calls ({a['bwd_repeats']} for forward+backward) after one warm-up, modes interleaved in rotated "
      f"order within each length (ABC, BCA, CAB, …), each mode in its own persistent worker process. A ratio is "
      f"taken per round (the two modes' calls of the same round) and given as the median (min–max) over rounds.")
    w("")
    w("## Inputs")
    w("")
    w("| target | real tokens | visual tokens (grid) | text tokens |")
    w("|---:|---:|---:|---:|")
    for L in lengths:
        t = toks[L]
        w(f"| {L} | {t['L']} | {t['n_visual']} ({t['grid'][0]}×{t['grid'][1]}) | {t['L'] - t['n_visual']} |")
    hashes = {(L, m): warm[L][m]["ids_hash"] for L in lengths for m in modes}
    same = all(len({hashes[(L, m)] for m in modes}) == 1 for L in lengths)
    w("")
    w(f"All workers built identical inputs: {'yes' if same else '**NO**'} (hash of input_ids compared).")
    w("")

    for group, title in ((FWD_MODES, "Forward only (no_grad)"),
                         (BWD_MODES, "Forward + backward (LM loss on the last rows' logits; capture/eager add a loss "
                                     "on the captured rows)")):
        if not has(*group):
            continue
        w(f"## {title}")
        w("")
        w("| tokens | SDPA ms | capture ms | eager ms | capture/SDPA CPU time per round: median (min–max) | "
          "capture/SDPA wall (medians) | SDPA extra MiB | capture extra MiB | eager extra MiB | capture − SDPA MiB | "
          "capture/eager extra mem per call: median (min–max) |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for L in lengths:
            s, c, e = (med_w[L][m] for m in group)
            ms, mc, me = (ext[L][m] for m in group)
            w(f"| {toks[L]['L']} | {_fmt(s)} | {_fmt(c)} | {_fmt(e)} | {spread(rounds(L, group[1], group[0]))} | "
              f"{c / s:.3f} | {_fmt(ms, 1)} | {_fmt(mc, 1)} | {_fmt(me, 1)} | {_fmt(mc - ms, 1)} | "
              f"{spread(rounds(L, group[1], group[2], 'extra_mb', mem), 4)} |")
        w("")
    if has(*BWD_MODES):
        w("Extra memory of the backward modes includes the parameter gradients (allocated afresh in every call: "
          "the workers set `.grad` to None between calls) and everything autograd saves.")
        w("")

    # ---- targets
    Lmax = lengths[-1]
    w("## Targets")
    w("")
    if a["smoke"]:
        w("(Smoke run: small model and short input; these verdicts only show that the report works.)")
        w("")
    verdicts = []
    if has("capture", "eager"):
        rr = rounds(Lmax, "capture", "eager", "extra_mb", mem)
        ok = max(rr) <= 0.1
        verdicts.append(ok)
        w(f"- Capture extra memory ≤ 1/10 of eager's at the longest length ({toks[Lmax]['L']} tokens"
          f"{'' if Lmax == 2048 else '; the target is stated for 2048'}): {ext[Lmax]['capture']:.1f} MiB vs "
          f"{ext[Lmax]['eager']:.1f} MiB (largest calls); per call {spread(rr, 4)} → "
          f"**{'met' if ok else 'MISSED'}**{' in every call' if ok and len(rr) > 1 else ''}.")
    if has("capture", "sdpa"):
        for L in lengths:
            rw = med_w[L]["capture"] / med_w[L]["sdpa"]
            rr = rounds(L, "capture", "sdpa")
            rc = C.median(rr)
            rm = min_c[L]["capture"] / min_c[L]["sdpa"]
            if not contended:
                verdict = "met" if rw <= 1.10 else "MISSED"
            elif rc <= 1.10 and rm <= 1.10:
                verdict = "met on CPU time" + ("" if rw <= 1.10 else " (wall ratio contended)")
            elif rc > 1.10 and rm > 1.10:
                verdict = "MISSED"
            else:
                verdict = "inconclusive: the CPU-time estimators disagree under contention"
            w(f"- Capture time ≤ 1.10× plain SDPA at {toks[L]['L']} tokens: CPU per round {spread(rr)}× over "
              f"{len(rr)} rounds, ratio of the CPU minima {rm:.3f}×, wall medians {rw:.3f}× "
              f"({med_c[L]['capture'] - med_c[L]['sdpa']:+.0f} ms CPU) → **{verdict}**.")
        w("- Capture's own work, timed inside the call (process CPU time spent computing the captured rows, "
          "forward only, all layers; median): " + "; ".join(
              f"{toks[L]['L']}: {C.median([x['rows_cpu'] for x in timing[L]['capture']]) * 1e3:.1f} ms = "
              f"{C.median([x['rows_cpu'] for x in timing[L]['capture']]) * 1e3 / med_c[L]['sdpa'] * 100:.1f}% of SDPA's "
              "forward CPU time" for L in lengths)
          + ". This is the intrinsic overhead; differences between the end-to-end medians beyond it are noise.")
        if contended:
            w(f"  (The workers got a median {med_cw:.2f} of a core (CPU/wall), lowest {worst:.2f}: wall times are "
              "contended, so the verdicts use process CPU time; the median and the minimum over the interleaved "
              "repeats are both shown because cache and memory-bandwidth sharing still perturb CPU time.)")
    if has("capture_bwd", "sdpa_bwd"):
        parts = [f"{toks[L]['L']}: CPU per round {spread(rounds(L, 'capture_bwd', 'sdpa_bwd'))}×, "
                 f"{med_w[L]['capture_bwd'] / med_w[L]['sdpa_bwd']:.3f}× wall medians" for L in lengths]
        w(f"- (No target, for information) forward+backward time, capture vs SDPA: " + "; ".join(parts) + ".")
    for fw, lab in ((FWD_MODES, "forward"), (BWD_MODES, "forward+backward")):
        if has(*fw):
            sd, cp, eg = fw
            d_c, d_e = ext[Lmax][cp] - ext[Lmax][sd], ext[Lmax][eg] - ext[Lmax][sd]
            if d_e > 0:
                w(f"- (For information) attention-specific memory at {toks[Lmax]['L']} tokens, {lab}: "
                  f"capture − SDPA = {d_c:.1f} MiB vs eager − SDPA = {d_e:.1f} MiB ({d_c / d_e:.4f}).")
    w("")

    # ---- contention
    w("## CPU time vs wall time (contention check)")
    w("")
    w("Each worker uses one thread, so process CPU time / wall time ≈ 1.0 when it had a core to itself; lower "
      "means it waited for the CPU (another process, e.g. a training job, was running). Per cell: median CPU/wall "
      "over the timed calls (min in brackets).")
    w("")
    w("| tokens | " + " | ".join(modes) + " |")
    w("|---:|" + "---:|" * len(modes))
    for L in lengths:
        cells = [f"{C.median(cpu_wall[L][m]):.2f} ({min(cpu_wall[L][m]):.2f})" for m in modes]
        w(f"| {toks[L]['L']} | " + " | ".join(cells) + " |")
    w("")
    if worst >= 0.95:
        w(f"Lowest CPU/wall of any timed call: {worst:.2f}: the workers got their core; wall times are trustworthy.")
    else:
        w(f"Lowest CPU/wall of any timed call: {worst:.2f}: **some calls were slowed by other processes**. The "
          "CPU-time ratios are the better guide then (a 1-thread process's CPU time does not count the time it "
          "waits, though cache sharing can still inflate it); the interleaving keeps the ratios side by side.")
    for key, label in (("busy_before", "before"), ("busy_after", "after")):
        if info.get(key):
            w(f"- Busy processes {label} the run: " + "; ".join(f"`{x}`" for x in info[key]))
    w("")

    # ---- memory method + sanity
    w("## How memory was measured")
    w("")
    if a["smoke"]:
        w("(Smoke run: timing and memory share one worker set, all started with the returning allocator.)")
        w("")
    w("Each mode runs in a separate fresh worker process started with glibc `MALLOC_MMAP_THRESHOLD_=65536 "
      "MALLOC_TRIM_THRESHOLD_=131072 MALLOC_ARENA_MAX=2`, so that large tensor buffers are mmap'ed and returned to "
      "the OS when freed (RSS then follows live tensors; without this glibc keeps freed blocks and the deltas are "
      "noise). Per call: inputs built and model loaded beforehand, previous outputs freed, `gc.collect()`; the "
      "kernel's peak-RSS counter is reset by writing `5` to `/proc/self/clear_refs`; **extra peak = VmHWM after "
      "the call − VmRSS just before it**. Outputs (logits, captured rows, eager's `attentions`) are still alive "
      "at the reading, so they count. One warm-up call per worker at the shortest length, then "
      f"{a['mem_repeats']} measured call(s) per length" + (
          f"; the table shows the largest, and the spread (max − min) across calls was at most "
          f"{max(ext[L][m] - ext_min[L][m] for L in lengths for m in modes):.1f} MiB" if a["mem_repeats"] > 1 else "")
      + ". Timings come from the other worker set with the default allocator, because the returning allocator "
      "costs extra page faults. (tracemalloc does not see torch's tensor allocations, hence RSS.)")
    w("")
    if has("sdpa", "eager") and len(lengths) >= 2:
        H, nl = cfg["heads"], cfg["layers"]
        w("Sanity check — eager's extra memory over SDPA should grow ~quadratically with length (it keeps "
          f"{nl} layers × {H} heads × L² fp32 probabilities = {nl * H * 4} · L² bytes, plus transient scores):")
        w("")
        w("| tokens | eager − SDPA MiB | expected kept maps MiB (layers·heads·L²·4 B) | ratio |")
        w("|---:|---:|---:|---:|")
        for L in lengths:
            n = toks[L]["L"]
            d = ext[L]["eager"] - ext[L]["sdpa"]
            exp = nl * H * n * n * 4 / 2 ** 20
            w(f"| {n} | {d:.1f} | {exp:.1f} | {d / exp:.2f} |")
        L0, L1 = lengths[0], lengths[-1]
        d0 = ext[L0]["eager"] - ext[L0]["sdpa"]
        d1 = ext[L1]["eager"] - ext[L1]["sdpa"]
        if d0 > 0 and d1 > 0:
            k = math.log(d1 / d0) / math.log(toks[L1]["L"] / toks[L0]["L"])
            w("")
            w(f"Fitted exponent between {toks[L0]['L']} and {toks[L1]['L']} tokens: eager − SDPA ∝ L^{k:.2f} "
              f"(2 = quadratic).")
        if has("capture"):
            w("")
            w("Capture's own extra over SDPA (capture − SDPA) should be linear and small: the kept rows are "
              f"{nl} layers × {H} heads × {a['rows']} rows × L × 4 B = "
              + ", ".join(f"{nl * H * a['rows'] * toks[L]['L'] * 4 / 2 ** 20:.1f} MiB at {toks[L]['L']}"
                          for L in lengths) + ".")
        w("")

    # ---- correctness cross-check
    w("## Cross-check: capture and eager compute the same rows")
    w("")
    for L in lengths:
        parts = []
        if has("capture", "eager"):
            a_, b_ = warm[L]["capture"]["check"], warm[L]["eager"]["check"]
            parts.append(f"forward: per-layer mean visual mass of the captured rows, max |capture − eager| = "
                         f"{max(abs(x - y) for x, y in zip(a_, b_)):.2e}")
        if has("capture_bwd", "eager_bwd"):
            a_, b_ = warm[L]["capture_bwd"]["check"], warm[L]["eager_bwd"]["check"]
            parts.append(f"backward: loss {a_[0]:.6f} vs {b_[0]:.6f}, global grad norm {a_[1]:.6f} vs {b_[1]:.6f}")
        if parts:
            w(f"- {toks[L]['L']} tokens — " + "; ".join(parts))
    w("")
    w("## Raw data")
    w("")
    w("| tokens | mode | wall ms (median) | CPU ms (median) | wall ms (all) | extra MiB (all measured) |")
    w("|---:|---|---:|---:|---|---|")
    for L in lengths:
        for m in modes:
            w(f"| {toks[L]['L']} | {m} | {med_w[L][m]:.0f} | {med_c[L][m]:.0f} | "
              + " ".join(f"{x['wall'] * 1e3:.0f}" for x in timing[L][m]) + " | "
              + " ".join(f"{x['extra_mb']:.1f}" for x in mem[L][m]) + " |")
    w("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- --logits-only

SECTION_BEGIN = "<!-- logits-only: begin (written by bench/capture_bench.py --logits-only; a full run keeps it) -->"
SECTION_END = "<!-- logits-only: end -->"


def bench_logits(args) -> dict:
    """Peak memory of the inspect capture pass with full logits vs without, per dtype, on the returning allocator.
    Modes alternate within each repeat; the first call of each worker (at the shortest length) is a warm-up."""
    logdir = tempfile.mkdtemp(prefix="capture_bench_logits_")
    t_start = time.perf_counter()
    info = C.machine_info()
    info["busy_before"] = C.busy_processes(exclude={os.getpid()})
    res = {}
    for dtype in args.dtypes:
        cfg = dict(SMALL, lm_vocab=args.vocab, lm_dtype=dtype)
        log(f"[logits] {dtype}: starting workers (logs in {logdir})")
        procs, _ = start(LOGIT_MODES, "mem", cfg, args.rows, logdir)
        try:
            for m in LOGIT_MODES:
                procs[m].run(min(512, args.lengths[0]), "mem")
            res[dtype] = {L: {m: [] for m in LOGIT_MODES} for L in args.lengths}
            for L in args.lengths:
                for r in range(args.mem_repeats):
                    for m in (LOGIT_MODES if r % 2 == 0 else LOGIT_MODES[::-1]):
                        res[dtype][L][m].append(procs[m].run(L, "mem"))
                log(f"[logits] {dtype} L≈{L}: " + " ".join(
                    f"{m}={max(x['extra_mb'] for x in res[dtype][L][m]):.1f}MiB" for m in LOGIT_MODES))
        finally:
            for p in procs.values():
                p.close()
    _note_end(info, t_start)
    return {"info": info, "mem": res, "model_cfg": SMALL, "args": vars(args)}


def report_logits(res, command) -> str:
    info, a, cfg = res["info"], res["args"], res["model_cfg"]
    lines = [SECTION_BEGIN]
    w = lines.append
    w("## Logits only where used: the inspect capture pass" + (" (SMOKE run)" if a["smoke"] else ""))
    w("")
    w(f"- Command: `{command}` (this section only; the rest of the file comes from the full run above)")
    w(f"- Date: {info['date']}; run time {info['elapsed_s']:.0f} s; machine: {C.machine_line(info)}; load average "
      f"before {info['loadavg']}, after {info['loadavg_after']}")
    w(f"- Model: `Qwen2VLForConditionalGeneration`, random weights, tiny width (hidden {cfg['hidden']}, "
      f"{cfg['layers']} decoder layers, {cfg['heads']} heads) with a real-size vocabulary of {a['vocab']:,} tokens "
      "(embeddings resized, LM head tied), batch 1, one torch thread. The pass is the one `inspect()` runs: SDPA with "
      f"capture of all {cfg['layers']} layers, the last {a['rows']} query rows, no_grad — once with full logits (as "
      "before), once with `ral_core.inspection.CAPTURE_ONLY` (`logits_to_keep=1`, `use_cache=False`), which inspect "
      "and inspect_many now pass.")
    w(f"- Memory: each mode in its own worker with the returning allocator (see 'How memory was measured'); extra "
      f"peak = VmHWM after the call − VmRSS before it, the logits and maps still alive; {a['mem_repeats']} measured "
      "call(s) per mode, alternating; the largest is shown (spread in brackets). Times are the same calls' medians "
      "(returning allocator: page faults included; for information).")
    w("")
    w("| dtype | tokens | logits returned | extra peak MiB, full logits | extra peak MiB, no logits | saved MiB | "
      "[1, L, vocab] logits MiB (computed) | wall ms full → lean | same maps |")
    w("|---|---:|---|---:|---:|---:|---:|---:|---|")
    figure = None
    for dtype, per_len in res["mem"].items():
        for L, runs in per_len.items():
            full, lean = runs["inspect_full"], runs["inspect_lean"]
            ef, el = max(x["extra_mb"] for x in full), max(x["extra_mb"] for x in lean)
            sf = ef - min(x["extra_mb"] for x in full)
            sl = el - min(x["extra_mb"] for x in lean)
            n = full[0]["L"]
            size = 2 if dtype in ("bfloat16", "float16") else 4
            expect = n * full[0]["vocab"] * size / 2 ** 20
            same = max(abs(p - q) for p, q in zip(full[0]["check"], lean[0]["check"]))
            w(f"| {dtype} | {n:,} | {full[0]['logits_shape']} → {lean[0]['logits_shape']} | {ef:.1f} ({sf:.1f}) | "
              f"{el:.1f} ({sl:.1f}) | **{ef - el:.1f}** | {expect:.1f} | "
              f"{C.median([x['wall'] for x in full]) * 1e3:.0f} → {C.median([x['wall'] for x in lean]) * 1e3:.0f} | "
              f"{'yes' if same == 0 else f'max |Δ| {same:.1e}'} |")
            if dtype == "bfloat16" and L == max(per_len):
                figure = (n, ef, el, expect)
    w("")
    if figure:
        n, ef, el, expect = figure
        w(f"At {n:,} tokens in bf16 (the dtype a GPU loads real checkpoints in), the capture pass of `inspect` "
          f"peaked at {el:.1f} MiB above its starting RSS instead of {ef:.1f} MiB: **{ef - el:.0f} MiB "
          f"({(ef - el) / 1024:.2f} GiB) saved**, the [1, L, vocab] logits ({expect:.0f} MiB) it no longer computes. "
          "'Same maps': per-layer visual mass of the captured rows, lean minus full.")
    w(f"- Busy processes before: " + ("; ".join(f"`{x}`" for x in info["busy_before"]) or "none")
      + "; after: " + ("; ".join(f"`{x}`" for x in info["busy_after"]) or "none"))
    w(SECTION_END)
    return "\n".join(lines)


def splice_section(path: str, section: str | None, base: str | None = None) -> str:
    """The results file with the --logits-only section replaced (or appended); `base` (a fresh full report) keeps
    the section of the file on disk."""
    old = open(path).read() if os.path.exists(path) else ""
    if section is None:  # a full run: carry the existing section over
        i, j = old.find(SECTION_BEGIN), old.find(SECTION_END)
        section = old[i:j + len(SECTION_END)] if i >= 0 and j > i else None
        old = base
    else:
        i, j = old.find(SECTION_BEGIN), old.find(SECTION_END)
        if i >= 0 and j > i:
            old = old[:i].rstrip("\n") + "\n" + old[j + len(SECTION_END):].lstrip("\n")
    if not section:
        return old
    return old.rstrip("\n") + "\n\n" + section + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="markdown file to write (default: bench/results/capture.md; "
                                                "--smoke prints instead)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="target token counts (512 1024 2048)")
    ap.add_argument("--repeats", type=int, default=None, help="timed forward calls per mode and length (7)")
    ap.add_argument("--bwd-repeats", type=int, default=None, help="timed forward+backward calls (3)")
    ap.add_argument("--mem-repeats", type=int, default=3, help="measured memory calls per mode and length")
    ap.add_argument("--modes", nargs="+", default=ALL_MODES, choices=ALL_MODES)
    ap.add_argument("--rows", type=int, default=16, help="captured query rows (the last ones)")
    ap.add_argument("--smoke", action="store_true", help="small model, one short length, 1 repeat")
    ap.add_argument("--json", default=None, help="also dump raw results here")
    ap.add_argument("--logits-only", action="store_true", help="only measure the inspect capture pass with full "
                    "logits vs without (4096 tokens, real-size vocabulary) and rewrite that section of --out")
    ap.add_argument("--vocab", type=int, default=REAL_VOCAB, help="--logits-only: vocabulary size (151936)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="--logits-only: model dtypes")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.model_json), args.rows)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.logits_only:
        return main_logits(args, argv)
    if args.smoke:
        args.lengths = args.lengths or [128]
        args.repeats = args.repeats or 1
        args.bwd_repeats = args.bwd_repeats or 1
        args.mem_repeats = 1
    else:
        args.lengths = args.lengths or [512, 1024, 2048]
        args.repeats = args.repeats or 7
        args.bwd_repeats = args.bwd_repeats or 3
        args.out = args.out or os.path.join("bench", "results", "capture.md")
    args.lengths = sorted(args.lengths)
    command = _command(argv)
    res = bench(args)
    md = report(res, command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        md = splice_section(args.out, None, md + "\n")  # keep the --logits-only section
        with open(args.out, "w") as f:
            f.write(md)
        log(f"wrote {args.out}")
    else:
        print(md)


def _command(argv) -> str:
    return " ".join(["HF_HUB_OFFLINE=1", os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                     else sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv or sys.argv[1:]))


def main_logits(args, argv):
    """--logits-only: a few minutes instead of the full bench's ~10; rewrites only its own section of --out."""
    args.lengths = sorted(args.lengths or ([512] if args.smoke else [4096]))
    args.mem_repeats = 1 if args.smoke else max(args.mem_repeats, 3)
    if args.smoke:
        args.vocab = min(args.vocab, 32_000)
    elif not args.out:
        args.out = os.path.join("bench", "results", "capture.md")
    res = bench_logits(args)
    section = report_logits(res, _command(argv))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.out:
        md = splice_section(args.out, section)
        with open(args.out, "w") as f:
            f.write(md)
        log(f"wrote the logits section of {args.out}")
    else:
        print(section)


if __name__ == "__main__":
    main()
