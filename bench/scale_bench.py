"""Benchmark + model: one RAL step of a 7B VLM (Qwen2-VL-7B / Qwen2.5-VL-7B shape) on 8 GPUs with FSDP.

    .venv/bin/python bench/scale_bench.py --out bench/results/scale.md            # CPU: ~5-10 min, 1 thread
    .venv/bin/python bench/scale_bench.py --device cuda --lengths 1024 4096 8192 --out bench/results/scale_gpu.md
    .venv/bin/python bench/scale_bench.py --smoke                                   # width 512, prints

Measured here: ONE decoder layer at the real width (hidden 3584, 28 heads, 4 KV heads, MLP 18944, M-RoPE) inside a
real `Qwen2VLForConditionalGeneration` (vision tower and vocabulary kept tiny so that they cost nothing), batch 1, at
a few sequence lengths almost all visual tokens, in five modes (bench/capture_bench.Worker):
  sdpa / capture           no-grad forward without / with capture of the last R rows: the old-log-prob pass GRPO
                           needs anyway with ≥ 2 updates per batch / the same pass when it also stores p_old (RAL)
  sdpa_bwd / capture_bwd   forward + backward of the training pass without / with the captured rows and a loss on
                           them (what the RAL term adds to a GRPO update)
  eager_bwd                the same with eager attention and output_attentions (the L×L maps of every layer)
Time: wall and process CPU time of one call after a warm-up (CPU: 1 torch thread; CPU/wall ≪ 1 = contention).
Memory: CPU: peak RSS growth during the call (glibc set to return freed memory at once, _common.MALLOC_ENV);
CUDA: torch.cuda.max_memory_allocated growth. Both include the layer's gradients in the backward modes.
The 28-layer numbers are the measured layer × 28 (the layers are identical; embeddings, lm_head and the vision tower
are modelled, not measured). The rest of the report is arithmetic from the shapes, stated with its assumptions.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import _common as C
from capture_bench import ROOT, Worker, log

# Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct language model and vision tower (config.json of the hub repos)
SHAPE = dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
             tied=False, vis_blocks=32, vis_width=1280, vis_mlp=5120, vis_patch=14, vis_temporal=2, merge=2)
MODES = ["sdpa", "capture", "sdpa_bwd", "capture_bwd", "eager_bwd"]
GiB = 1024 ** 3


# ---------------------------------------------------------------------------------------------------- measured
class LayerWorker(Worker):
    """capture_bench's worker on one real-width decoder layer, on `device` (inputs moved there, bf16 on CUDA)."""

    def __init__(self, mode, model_cfg, n_rows, device):
        super().__init__(mode, model_cfg, n_rows)
        self.device = device
        if device != "cpu":
            self.model.to(device)

    def build(self, target):
        x = super().build(target)
        if self.device != "cpu" and not x.get("_moved"):
            t = self.torch
            x["mi"] = {k: (v.to(self.device) if t.is_tensor(v) else v) for k, v in x["mi"].items()}
            x["vis"], x["rows"], x["_moved"] = x["vis"].to(self.device), x["rows"].to(self.device), True
        return x

    def measure(self, target: int) -> dict:
        torch = self.torch
        x = self.build(target)
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        cuda = self.device != "cpu"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            C.reset_peak_rss()
            base = C.proc_status_mb()["VmRSS"] * 2 ** 20
        self.rows_cpu = 0.0  # CPU time inside capture's own row computation (capture_bench.Worker counts it)
        c0, t0 = time.process_time(), time.perf_counter()
        keep, _ = self.call(target)
        if cuda:
            torch.cuda.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        peak = torch.cuda.max_memory_allocated() if cuda else C.proc_status_mb()["VmHWM"] * 2 ** 20
        del keep
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        return {**x["info"], "mode": self.mode, "wall": t1 - t0, "cpu": c1 - c0, "extra_gib": (peak - base) / GiB,
                "rows_cpu": self.rows_cpu}


def measure(args) -> dict:
    import torch
    torch.manual_seed(0)
    s = SHAPE
    width = dict(hidden=512, heads=8, kv_heads=2, inter=1536) if args.smoke else \
        dict(hidden=s["hidden"], heads=s["heads"], kv_heads=s["kv_heads"], inter=s["intermediate"])
    cfg = dict(hidden=width["hidden"], layers=1, heads=width["heads"], kv_heads=width["kv_heads"], vision_depth=1,
               vision_dim=32, text_config={"intermediate_size": width["inter"]})
    if args.device == "cuda":
        cfg["lm_dtype"] = "bfloat16"
    res: dict = {"width": width, "rows": args.rows, "device": args.device, "runs": {}}
    workers = {}
    for m in MODES:
        workers[m] = LayerWorker(m, cfg, args.rows, args.device)
        workers[m].measure(args.lengths[0])  # warm-up (lazy initialisation, allocator)
        log(f"[measure] {m}: warm")
    n_params = sum(p.numel() for n, p in workers["sdpa"].model.named_parameters() if ".layers.0." in n)
    res["layer_params"] = n_params
    for L in args.lengths:
        for r in range(args.repeats):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for m in order:
                out = workers[m].measure(L)
                res["runs"].setdefault(str(L), {}).setdefault(m, []).append(out)
                log(f"[measure] L={out['L']} {m}: {out['wall']:.2f}s wall, {out['cpu']:.2f}s cpu, "
                    f"+{out['extra_gib']:.3f} GiB")
    return res


# ------------------------------------------------------------------------------------------------------ model
def params(s=SHAPE) -> dict:
    h, kv, I, V = s["hidden"], s["kv_heads"] * s["head_dim"], s["intermediate"], s["vocab"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * I + 2 * h  # q(+b), k/v(+b), o, gate/up/down, 2 norms
    lm = s["layers"] * layer + V * h * (1 if s["tied"] else 2) + h
    w, vm = s["vis_width"], s["vis_mlp"]
    block = (3 * w * w + 3 * w) + (w * w + w) + 2 * w * vm + vm + w + 4 * w  # qkv, proj, fc1/fc2, 2 norms
    patch = 3 * s["vis_temporal"] * s["vis_patch"] ** 2 * w
    merger = (w * 4) ** 2 + w * 4 + w * 4 * h + h + 2 * w
    vision = s["vis_blocks"] * block + patch + merger
    return {"layer": layer, "lm": lm, "vision": vision, "total": lm + vision}


def model(meas: dict | None, args) -> dict:
    """Per-GPU memory and per-step work of one RAL step (numbers and the assumptions they rest on)."""
    s, P = SHAPE, params()
    g, N, T, K = args.gpus, args.rollouts_per_gpu, args.response, args.prompt
    L = K + T
    tokens = N * L
    out = {"params": P, "L": L, "tokens_per_gpu": tokens}
    train = P["lm"]  # vision tower frozen (freeze_vision, the default)
    mem = {}
    mem["params fp32 shards (masters, all weights; FSDP2 needs one dtype per unit)"] = 4 * P["total"] / g
    mem["grads fp32 shards (trained LM)"] = 4 * train / g
    mem["AdamW exp_avg + exp_avg_sq fp32 shards"] = 8 * train / g
    mem["units gathered at once in bf16 (current + prefetched layer)"] = 2 * 2 * P["layer"]
    mem["rollouts: whole model gathered in bf16 (ral_core.distributed.gathered)"] = 2 * P["total"]
    kv_bytes = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2  # K and V, bf16
    mem["rollouts: KV cache of N sequences of L tokens (bf16)"] = N * L * kv_bytes
    out["kv_per_token"] = kv_bytes
    # activations of the training pass: measured per token and layer (fp32 on CPU → ×½ for bf16), else none
    act = None
    if meas:
        act = activation_slope(meas, "sdpa_bwd")
        rows = activation_slope(meas, "capture_bwd")
        out["act_per_token_layer_measured"] = act
        out["capture_per_token_layer_measured"] = None if rows is None or act is None else rows - act
    scale = 0.5 if (meas and meas["device"] == "cpu") else 1.0
    mb = args.micro
    if act:
        mem[f"activations, training pass, micro-batch of {mb} × {L} tokens, 28 layers (measured slope"
            + (", fp32 → bf16 ½" if scale != 1 else "") + ")"] = act * scale * mb * L * s["layers"]
    # capture rows: [B, H, R, L] fp32 probabilities per captured layer, kept for backward (softmax output + scores)
    R = T + 1
    rows_fwd = 4 * s["heads"] * R * L
    out["rows_bytes_per_seq_layer"] = rows_fwd
    # copies of the [H, R, L] fp32 row tensor the training pass keeps (scores, mask, probabilities, …): measured
    copies = 2.0
    if meas and out.get("capture_per_token_layer_measured"):
        copies = out["capture_per_token_layer_measured"] / (4 * meas["width"]["heads"] * meas["rows"])
    out["row_copies"] = copies
    what = f"{copies:.1f} fp32 copies, measured with a visual-mass loss" if meas else "2 fp32 copies, assumed"
    mem[f"capture rows with grad, last layer, micro-batch of {mb} ({what})"] = copies * rows_fwd * mb
    mem[f"capture rows with grad, all 28 layers, micro-batch of {mb}"] = copies * rows_fwd * mb * s["layers"]
    # p_old per rollout: [1 or H, T, K'] fp32 per policy layer (+ key validity [T, K'] bool)
    pold_mean = 4 * T * L
    pold_heads = 4 * s["heads"] * T * L
    out["p_old_per_rollout"] = {"head-mean, 1 layer": pold_mean, "per head, 1 layer": pold_heads,
                                "head-mean, 28 layers": pold_mean * 28, "per head, 28 layers": pold_heads * 28,
                                "key validity (bool)": T * L}
    mem[f"p_old of the {N} rollouts, head-mean, last layer"] = N * (pold_mean + T * L)
    out["mem"] = mem
    # work (FLOPs): 2 per weight and token forward (decoder layers; lm_head only on the T answer rows, as
    # forward_policies keeps only those logits), backward 2× the forward; attention 4·L·h per token and layer forward
    # (QKᵀ and AV), causal: half the keys on average
    fwd_tok = 2 * s["layers"] * P["layer"] + 2 * s["vocab"] * s["hidden"] * T / L + 4 * s["layers"] * L * s["hidden"] / 2
    flops = {}
    flops["old log-probs / p_old pass (no grad, 1 forward)"] = fwd_tok * tokens
    flops[f"training, {args.epochs} epochs (forward + backward = 3 forwards)"] = 3 * fwd_tok * tokens * args.epochs
    flops["capture rows, last layer, fwd (+2× bwd in training)"] = 2 * s["heads"] * s["head_dim"] * R * L * N * (
        1 + 3 * args.epochs)
    flops[f"attention-metrics forward (every {args.metrics_every} steps, amortised)"] = fwd_tok * tokens / max(
        1, args.metrics_every)
    flops["OPAD teacher forward (same size teacher, if on)"] = fwd_tok * tokens
    out["flops"] = flops
    # generation: decode is memory-bound: each step reads the gathered bf16 weights once plus the KV cache
    read = 2 * P["total"] + N * L * kv_bytes / 2  # average cache length L/2
    out["decode_step_s"] = read / (args.hbm_tbs * 1e12)
    out["decode_s"] = T * out["decode_step_s"]
    out["gather_s"] = (g - 1) / g * 2 * P["total"] / (args.link_gbs * 1e9)
    out["per_layer_gather_bytes"] = 2 * P["layer"]
    return out


def rows_share(meas: dict, args) -> str:
    """Capture's own row work as a share of the capture forward's CPU time, measured, and scaled to R answer rows."""
    shares = []
    for modes in meas["runs"].values():
        xs = modes.get("capture")
        if xs:
            shares.append(C.median([x.get("rows_cpu", 0.0) for x in xs]) / C.median([x["cpu"] for x in xs]))
    if not shares:
        return ""
    lo, hi = min(shares), max(shares)
    k = (args.response + 1) / meas["rows"]
    return (f"; measured above, capture's own row work is {100 * lo:.1f}–{100 * hi:.1f} % of a layer's forward CPU time "
            f"for {meas['rows']} rows (≈ {100 * lo * k:.1f}–{100 * hi * k:.1f} % for {args.response + 1} rows, linear in "
            "R), and the whole-pass differences capture vs sdpa are within the timing noise")


def tot_fwd(mdl: dict, args) -> float:
    """Seconds of the old-log-prob pass, the training passes and the amortised metrics forward at --mfu-tflops."""
    f = mdl["flops"]
    keys = [k for k in f if not k.startswith("OPAD")]
    return sum(f[k] for k in keys) / (args.mfu_tflops * 1e12)


def activation_slope(meas: dict, mode: str) -> float | None:
    """Bytes per token per layer: the growth of the call's peak between the shortest and the longest length."""
    runs = meas["runs"]
    Ls = sorted(int(k) for k in runs)
    if len(Ls) < 2 or mode not in runs[str(Ls[0])]:
        return None
    a, b = runs[str(Ls[0])][mode], runs[str(Ls[-1])][mode]
    la, lb = a[0]["L"], b[0]["L"]
    ea, eb = min(x["extra_gib"] for x in a), min(x["extra_gib"] for x in b)
    return (eb - ea) * GiB / (lb - la)


# ----------------------------------------------------------------------------------------------------- report
def fmt_b(x: float) -> str:
    if x >= 0.1 * GiB:
        return f"{x / GiB:.2f} GiB"
    return f"{x / 2 ** 20:.1f} MiB" if x >= 2 ** 20 else f"{x / 1024:.0f} KiB"


def report(meas: dict | None, mdl: dict, info: dict, args, command: str) -> str:
    s, P = SHAPE, mdl["params"]
    L = [f"# One RAL step of a 7B VLM on {args.gpus} GPUs with FSDP: memory and time\n",
         f"`{command}` · {info['date']} · {C.machine_line(info)} · load average at start {info.get('loadavg', '?')}"
         + (f", at the end {info['loadavg_after']}" if info.get("loadavg_after") else "") + "\n",
         "Shape: Qwen2-VL-7B / Qwen2.5-VL-7B — language model hidden 3584, 28 layers, 28 query heads, 4 KV heads "
         f"(head dim 128), MLP 18944, vocabulary 152,064 (untied); vision tower 32 blocks of width 1280. From the shapes: "
         f"{P['layer'] / 1e6:.0f} M parameters per decoder layer, language model {P['lm'] / 1e9:.2f} B, vision "
         f"{P['vision'] / 1e9:.2f} B, total {P['total'] / 1e9:.2f} B.\n",
         f"Step assumed below: per GPU {args.rollouts_per_gpu} rollouts (e.g. 1 prompt × G = 8; "
         f"{args.gpus * args.rollouts_per_gpu} per step), prompt {args.prompt} tokens (mostly visual), "
         f"answer {args.response} tokens (L = {mdl['L']}), {args.epochs} epochs over the batch in micro-batches of "
         f"{args.micro}, vision frozen (default), full fine-tuning, dist=fsdp with bf16-mixed, RAL on the last "
         "layer with head-mean rows (the defaults).\n"]
    if meas:
        w = meas["width"]
        L += [f"## Measured here: one decoder layer at real width ({meas['device']})\n",
              f"One `Qwen2VLForConditionalGeneration` decoder layer, hidden {w['hidden']}, {w['heads']} heads, "
              f"{w['kv_heads']} KV heads, MLP {w['inter']} ({meas['layer_params'] / 1e6:.0f} M parameters), "
              + ("fp32, 1 CPU thread" if meas["device"] == "cpu" else "bf16") + f", batch 1, capture of the last "
              f"{meas['rows']} rows (the answer rows), a loss on them in the backward modes. Tiny vision tower and "
              "vocabulary (their cost is not part of these numbers). ×28 = the 28-layer language model, by "
              "multiplication, not measured.\n",
              "Peak growth of a backward mode includes the layer's fp32 gradients "
              f"({fmt_b(4 * meas['layer_params'])}, sharded 8 ways under FSDP); the next column leaves them out. "
              "'rows CPU s': time inside capture's own row computation (forward).\n",
              "| tokens | mode | wall s | CPU s | rows CPU s | ×28 layers, CPU s | peak growth | without grads | ×28 |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for Lk, modes in meas["runs"].items():
            for m in MODES:
                xs = modes.get(m)
                if not xs:
                    continue
                wall = C.median([x["wall"] for x in xs])
                cpu = C.median([x["cpu"] for x in xs])
                ex = min(x["extra_gib"] for x in xs)
                act = ex - (4 * meas["layer_params"] / GiB if m.endswith("_bwd") else 0)
                rc = C.median([x.get("rows_cpu", 0.0) for x in xs])
                L.append(f"| {xs[0]['L']} | {m} | {wall:.2f} | {cpu:.2f} | {rc:.3f} | {28 * cpu:.0f} | {ex:.3f} GiB | "
                         f"{act:.3f} GiB | {28 * act:.2f} GiB |")
        L.append("")
        clock = "cpu" if meas["device"] == "cpu" else "wall"
        n_rounds = min(len(xs) for modes in meas["runs"].values() for xs in modes.values())
        L.append(f"Ratios at each length ({'process CPU time: robust to the neighbours on this shared machine' if clock == 'cpu' else 'wall time'}), "
                 "taken per round (the modes of one round side by side) and given as median (min–max) over "
                 f"{n_rounds} round(s): capture/sdpa (the p_old pass), capture_bwd/sdpa_bwd (the training pass), "
                 "eager_bwd/capture_bwd:\n")

        def per_round(modes, a, b):
            r = [x[clock] / y[clock] for x, y in zip(modes[a], modes[b])]
            return (f"{C.median(r):.3f}× ({min(r):.3f}–{max(r):.3f})" if len(r) > 1 else f"{r[0]:.3f}× (one round)")
        for Lk, modes in meas["runs"].items():
            ex = {m: min(x["extra_gib"] for x in modes[m]) for m in modes}
            L.append(f"- {modes['sdpa'][0]['L']} tokens: time {per_round(modes, 'capture', 'sdpa')}, "
                     f"{per_round(modes, 'capture_bwd', 'sdpa_bwd')}, {per_round(modes, 'eager_bwd', 'capture_bwd')}; "
                     f"peak growth capture_bwd − sdpa_bwd {fmt_b((ex['capture_bwd'] - ex['sdpa_bwd']) * GiB)}, "
                     f"eager_bwd − sdpa_bwd {fmt_b((ex['eager_bwd'] - ex['sdpa_bwd']) * GiB)}")
        worst = min(x["cpu"] / x["wall"] for modes in meas["runs"].values() for xs in modes.values() for x in xs)
        L.append(f"\nLowest CPU/wall of a timed call: {worst:.2f} (1.00 = the core to itself; this machine's 2 "
                 "cores are shared, read CPU seconds when it is low).\n")
        if mdl.get("act_per_token_layer_measured"):
            a = mdl["act_per_token_layer_measured"]
            c = mdl.get("capture_per_token_layer_measured")
            L.append(f"Activation memory of the training pass, from the growth between the shortest and longest "
                     f"length: {a / 1024:.0f} KiB per token per layer"
                     + (" in fp32 (≈ half in bf16)" if meas["device"] == "cpu" else "")
                     + (f"; capture adds {c / 1024:.1f} KiB per token per layer (its rows grow with R × L)"
                        if c is not None else "") + ".\n")
    L += ["## Memory per GPU (model)\n", "| what | per GPU |", "|---|---:|"]
    for k, v in mdl["mem"].items():
        L.append(f"| {k} | {fmt_b(v)} |")
    st = sum(v for k, v in mdl["mem"].items() if "shards" in k)
    m = mdl["mem"]
    roll = st + sum(v for k, v in m.items() if k.startswith("rollouts"))
    upd = st + sum(v for k, v in m.items() if k.startswith(("units", "activations")) or "last layer, micro" in k)
    L += ["", f"Peak per GPU: ≈ {fmt_b(roll)} while sampling (shards + gathered model + KV cache), ≈ {fmt_b(upd)} "
          "in an update (shards + gathered layers + one micro-batch's activations + the last layer's rows) — "
          "within an 80 GiB GPU. A frozen reference model (beta > 0 without LoRA) or an OPAD teacher of the same size "
          f"adds its fp32 shards, {fmt_b(4 * P['total'] / args.gpus)} each.\n",
          f"Steady state (shards): {fmt_b(st)}. During rollouts add the gathered model and the KV cache; during "
          "updates the gathered units, the activations of one micro-batch and the capture rows. The gathered model "
          "for sampling is what ZeRO-3 / TRL generation does too; it needs the GPU to hold one bf16 copy "
          f"({fmt_b(2 * P['total'])}) next to the shards.\n",
          f"Capture rows: per sequence and captured layer [H={s['heads']}, R={args.response + 1}, L={mdl['L']}] fp32 = "
          f"{fmt_b(mdl['rows_bytes_per_seq_layer'])}, kept with grad only for the policy layers (default: the last), "
          "never an L×L map (eager would keep 28 × H × L × L per sequence: "
          f"{fmt_b(28 * s['heads'] * mdl['L'] ** 2 * 2)} in bf16).\n",
          "Old-attention storage p_old per rollout (kept from the rollout to the last update of the batch; "
          "`ro.old_attn`, fp32):\n"]
    for k, v in mdl["p_old_per_rollout"].items():
        L.append(f"- {k}: {fmt_b(v)}")
    L += ["", "## Work per GPU and step (model)\n", "| pass | TFLOP per GPU |", "|---|---:|"]
    for k, v in mdl["flops"].items():
        L.append(f"| {k} | {v / 1e12:.1f} |")
    tr = sum(v for k, v in mdl["flops"].items() if k.startswith("training"))
    L += ["", f"At {args.mfu_tflops:.0f} TFLOP/s sustained per GPU (an assumption: ~40 % of an H100's bf16 dense peak) "
          f"the training passes take ≈ {tr / (args.mfu_tflops * 1e12):.1f} s and the old-log-prob pass "
          f"≈ {mdl['flops']['old log-probs / p_old pass (no grad, 1 forward)'] / (args.mfu_tflops * 1e12):.1f} s.",
          f"Sampling: each decode step reads the gathered bf16 weights ({fmt_b(2 * P['total'])}) and the KV cache "
          f"({fmt_b(mdl['kv_per_token'])} per token); at {args.hbm_tbs} TB/s that is ≈ {mdl['decode_step_s'] * 1e3:.1f} "
          f"ms per step, ≈ {mdl['decode_s']:.1f} s for {args.response} tokens (memory-bound; a vLLM engine does "
          f"better). Gathering the model once per step moves {fmt_b((args.gpus - 1) / args.gpus * 2 * P['total'])} "
          f"into each GPU: ≈ {mdl['gather_s']:.2f} s at {args.link_gbs} GB/s. FSDP re-gathers each layer "
          f"({fmt_b(mdl['per_layer_gather_bytes'])} bf16) in every forward and backward, overlapped with compute.\n",
          f"Step total ≈ {mdl['gather_s'] + mdl['decode_s'] + tot_fwd(mdl, args):.1f} s per step without OPAD "
          "(gather + sampling + old-log-prob pass + training, no vision tower, perfect overlap of FSDP traffic); of "
          "it the capture rows are "
          f"{mdl['flops']['capture rows, last layer, fwd (+2× bwd in training)'] / 1e12:.1f} TFLOP of "
          f"{sum(mdl['flops'].values()) / 1e12:.0f}" + (rows_share(meas, args) if meas else "") + ".\n",
          "What RAL adds to a GRPO step with ≥ 2 updates per batch: the old-log-prob pass exists anyway (TRL computes "
          "`old_per_token_logps` in exactly this regime), so p_old costs only its capture rows; the training pass "
          "adds the rows of the policy layers and the JSD; the attention-metrics forward (`attn_metrics_every`) and "
          "OPAD's teacher forward are the only whole extra forwards.\n",
          "## What this does not cover\n",
          "- Nothing here ran on a GPU or over NCCL: FSDP itself was tested with 2 CPU processes (tests/test_fsdp.py). "
          "Run this script with `--device cuda` on a GPU to replace the CPU layer numbers (bf16, SDPA kernels).",
          "- The layer numbers are multiplied by 28; embeddings, lm_head (152,064 × 3584 logits only for the answer "
          "rows) and the vision tower (frozen, encoded once per distinct image per step) are modelled, not measured.",
          "- Activation checkpointing is off (README: FSDP's wrapper would re-run layers outside the capture); with "
          "non-reentrant transformers checkpointing the activation row shrinks to about one layer's worth.", ""]
    return "\n".join(L)


def _command(argv) -> str:
    return " ".join(["HF_HUB_OFFLINE=1", os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                     else sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv or sys.argv[1:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (CPU: 256 512 1024)")
    ap.add_argument("--rows", type=int, default=64, help="captured rows (answer tokens + 1) in the measurement")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-measure", action="store_true", help="only the model (no layer measurement)")
    ap.add_argument("--smoke", action="store_true", help="width 512, one short length; prints, writes nothing")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--rollouts-per-gpu", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1280, help="prompt tokens per rollout (mostly visual)")
    ap.add_argument("--response", type=int, default=256, help="answer tokens per rollout")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--micro", type=int, default=2, help="sequences per backward pass")
    ap.add_argument("--metrics-every", type=int, default=5)
    ap.add_argument("--mfu-tflops", type=float, default=400.0)
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="GPU memory bandwidth (H100 SXM 3.35, H200 4.8)")
    ap.add_argument("--link-gbs", type=float, default=300.0, help="all-gather bandwidth per GPU (NVLink, effective)")
    ap.add_argument("--json", default=None, help="also dump the measurements and the model here")
    ap.add_argument("--from-json", default=None, help="re-render the report from a --json dump (no measuring)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cpu" and not (args.no_measure or args.from_json) and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # RSS must follow live tensors (bench/_common.MALLOC_ENV), one thread: set before Python's allocator starts
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                  {**os.environ, **C.MALLOC_ENV, **C.THREAD_ENV, "HF_HUB_OFFLINE": "1"})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    if args.device == "cpu":
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU visible")
    if args.smoke:
        args.lengths, args.repeats = args.lengths or [128, 256], args.repeats or 1
    else:
        args.lengths = args.lengths or ([256, 512, 1024] if args.device == "cpu" else [1024, 2048, 4096, 8192])
        args.repeats = args.repeats or 3  # every ratio from ≥ 3 interleaved rounds, with its spread
    info = C.machine_info()
    if args.from_json:
        with open(args.from_json) as f:
            dump = json.load(f)
        meas, info = dump["measured"], dump.get("info", info)
    else:
        meas = None if args.no_measure else measure(args)
        info["loadavg_after"] = C.loadavg()
    mdl = model(meas, args)
    command = dump.get("command", _command(argv)) if args.from_json else _command(argv)
    md = report(meas, mdl, info, args, command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": meas, "model": mdl, "info": info, "command": command}, f, indent=1, default=str)
    C.write_report(md, args.out, args.smoke, log)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
