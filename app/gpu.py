"""ZeroGPU (Hugging Face Spaces): model work runs inside `spaces.GPU`, which lends a GPU for the call's duration.

On ZeroGPU (the `spaces` package present and SPACES_ZERO_GPU set) a decorated function runs in a forked process: its
arguments and result are pickled, so model work goes through plain functions of names, images and numbers that
return an InspectionResult (numpy + PIL), never CUDA tensors. The declared duration is the request's time limit
plus start-up slack: short declarations are served first from a visitor's quota. Everywhere else `gpu_task`
returns the function unchanged.

Training runs as a sequence of GPU calls of a few steps each (`train_chunk`, ral_core/chunked.py): between calls
the whole run state is on the CPU of this process, which never touches CUDA itself. On ZeroGPU a run needs
Hugging Face sign-in (the visitor's own GPU quota pays for it) and stays within the RAL_ZEROGPU_* limits.
"""
from __future__ import annotations

import contextvars
import os

from ral_core import chunked
from ral_core.errors import RALError

ZERO_GPU_SIGN_IN = ("training on this Space's free GPU (ZeroGPU) needs a Hugging Face account, whose daily GPU quota "
                    "pays for the run: press 'Sign in with Hugging Face' (free accounts get 5 GPU minutes a day), or "
                    "run `ral train` on your own machine")


def on_zerogpu() -> bool:
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("1", "true", "yes"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def declared_seconds(*_args, **_kwargs) -> int:
    """What a model call declares to ZeroGPU: the per-request limit plus slack for moving the model to the GPU."""
    from ral_core.limits import request_seconds
    return int(min(120, max(5, request_seconds() + 15)))


def gpu_task(fn, duration=declared_seconds):
    """`spaces.GPU(duration=duration)(fn)` on ZeroGPU, else `fn` itself (decorate once, at import)."""
    if not on_zerogpu():
        return fn
    import spaces
    return spaces.GPU(duration=duration)(fn)


# one training call: k steps from the carried state; its duration is computed from the same inputs
train_chunk = gpu_task(chunked.run_chunk, duration=chunked.declared_seconds)


# ---- training runs on ZeroGPU ---------------------------------------------------------------------------------------
STATE_MB = 2048  # most state a ZeroGPU run hands back and forth per call (pickled through one pipe each way)


def check_training(request, steps) -> None:
    """Before a run is queued on ZeroGPU: a signed-in visitor, a run within the step cap (`steps` as the page sent
    it: a value that is not a number is left to the settings' own check)."""
    if not on_zerogpu():
        return
    from app.sessions import signed_in_user
    if signed_in_user(request) is None:
        raise RALError(ZERO_GPU_SIGN_IN)
    try:
        n = float(steps)
    except (TypeError, ValueError):
        return
    if n == n:
        chunked.ChunkLimits.from_env().check_run(n)


def run_context() -> contextvars.Context | None:
    """On ZeroGPU, the starting request's context (ZeroGPU reads the visitor from it to charge their quota), for the
    run's GPU calls made later from the queue's thread; None elsewhere."""
    return contextvars.copy_context() if on_zerogpu() else None


def follow_chunked(run) -> dict:
    """Train `run` (an app.runs.Run) as ZeroGPU calls from this thread; its steps, probe and status land on the run as
    the child process's messages would. Returns the end as {status, step, message} (message without what is kept:
    the queue says that)."""
    limits = chunked.ChunkLimits.from_env()
    # a model too large to carry whole between calls (26 GB of fp32 weights + AdamW for a 2 B model) trains LoRA
    job = chunked.ChunkJob(run.cfg.to_dict(), call_ceiling_s=limits.call_seconds, snapshots=True,
                           max_state_mb=STATE_MB, auto_lora=8)
    ctx = getattr(run, "zerogpu", None) or contextvars.copy_context()

    def call(*args):
        return ctx.run(train_chunk, *args)

    run.status = "running"
    for ev in chunked.run_chunked(job, call, limits, cancel=run.cancel):
        if ev.kind == "chunk":
            if ev.probe is not None:
                run.probe = ev.probe
            run._history.extend(ev.metrics)
            run._step = ev.step
            run.loaded = True
            run.gpu_calls, run.gpu_seconds = ev.calls, ev.gpu_seconds
            continue
        status = {"done": "done", "cancelled": "cancelled"}.get(ev.status, "failed")
        return {"status": status, "step": ev.step, "message": ev.reason}
    return {"status": "failed", "step": run.step, "message": "the run ended without a last word"}


# ---- what each host can do (README's table is this one: tests/test_zerogpu.py compares them) -------------------------
HOSTS = [  # (key, host, models, runs, expected RAL step time)
    ("cpu_space", "**CPU Space** (free: 2 vCPU, 16 GB)",
     "`default` and other tiny models; SmolVLM-256M for Inspect (a 2-3 B model takes minutes per answer, past the "
     "10 s request limit)",
     "Train-tab runs in a background process through the server's queue, within the page's setting ranges",
     "`default`, the Train tab's settings (16 prompts × 8 rollouts, 4 updates): **0.7 s CPU time** per step "
     "(1.1-1.3 s wall), measured on this repo's shared 2-core machine under load"),
    ("zerogpu", "**ZeroGPU** (free GPU; a run needs Hugging Face sign-in)",
     "up to ≈ 3 B (bf16; Inspect and Compare are one GPU call each)",
     "**chunked**: GPU calls of 4 steps (`RAL_ZEROGPU_CHUNK_STEPS`), state on the CPU between calls; ≤ 40 steps and "
     "≤ 240 declared GPU seconds per run, ≤ 120 s per call (the `RAL_ZEROGPU_*` settings) — within a free account's "
     "5 minutes a day",
     "`default`: ≈ 0.5 s, **computed** (≈ 46,000 tensor ops per step, counted on the CPU, × ≈ 10 µs per eager GPU "
     "kernel; no faster than the CPU). Qwen2-VL-2B LoRA (one 448×336 photo, 4 rollouts × 32 tokens, 2 updates): "
     "≈ 0.5 s, **computed** (21 TFLOP at 400 TFLOP/s = 0.05 s, 99 GB of decode weight reads at 3.35 TB/s = 0.03 s, "
     "≈ 40,000 kernel launches estimated from the layer count ≈ 0.4 s), plus the model's load in every call; not "
     "measured on a GPU yet"),
    ("gpu_space", "**Dedicated GPU** (a Space with T4 / L4 / A10G / A100, or any GPU server)",
     "up to ≈ 3 B for LoRA on 24 GB; full fine-tuning of a 2 B model needs fp32 masters + AdamW (16 B per "
     "parameter, ≈ 35 GB): an 80 GB GPU",
     "as on the CPU Space (one process per run, no per-call limit; `RAL_MAX_RUNS` at once)",
     "as ZeroGPU's computed figures, without the per-call load"),
    ("own", "**Own machine**", "anything transformers loads (hub ids, local folders)",
     "`ral train` with resume, `accelerate launch` / `torchrun` on N GPUs (DDP, FSDP2; see *On N GPUs*)",
     "CPU: Qwen2-VL-2B LoRA with gradient checkpointing ≈ **80 s of CPU** per step on 1 thread (update phase 59 s + "
     "rollout 21 s: medians of 3 rounds at 1 and 2 layers, extrapolated to 28 layers, `bench/results/real.md`; the "
     "rollout's per-layer cost is within the noise); GPU: `scripts/gpu_check.sh` measures it"),
]


def hosts_markdown() -> str:
    rows = ["| host | models | runs | expected RAL step time |", "|---|---|---|---|"]
    rows += [f"| {h} | {m} | {r} | {t} |" for _, h, m, r, t in HOSTS]
    return "\n".join(rows)


def this_host() -> str:
    """Which row of HOSTS this server is. Never asks CUDA on ZeroGPU (its main process must not touch it)."""
    if on_zerogpu():
        return "zerogpu"
    import torch
    gpu = torch.cuda.is_available()
    if os.environ.get("SPACE_ID"):
        return "gpu_space" if gpu else "cpu_space"
    return "gpu_space" if gpu else "own"


def host_markdown() -> str:
    """The Train tab's note: this server's row first, then the whole table."""
    key = this_host()
    name = next(h for k, h, *_ in HOSTS if k == key)
    extra = (" Sign in to train; each run is a series of GPU calls charged to your daily quota, and Cancel acts "
             "between calls." if key == "zerogpu" else "")
    return (f"This server runs as {name}.{extra} GPU step times are computed, not measured, until "
            f"`scripts/gpu_check.sh` measures them on a GPU.\n\n{hosts_markdown()}")
