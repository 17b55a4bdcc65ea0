"""Training runs as a sequence of GPU calls of k steps each, for hosts that lend a GPU per call (Hugging Face
ZeroGPU: `spaces.GPU` runs a function in a forked worker, pickles its arguments and result, and copies nothing
back).

Between calls the whole run is plain CPU data (`RunState`): the trainable weights (LoRA adapters or the full
model's fp32 masters), the AdamW and scheduler state, every RNG stream, the step, the data position and the metrics
so far. `run_chunk` (the function a host wraps in its GPU call) rebuilds the Trainer from the config, loads that
state, trains k steps, writes a checkpoint and hands the new state back; so a run split into calls equals the
same run unsplit, bit for bit on one machine. `run_chunked` drives the calls from the CPU side: it never touches
CUDA, streams each finished call, stops between calls on cancel, and ends with one clear line when a call is
refused or aborted by the platform — the checkpoint of the last finished call stays.

Each call declares its duration (`declared_seconds`, a function of the call's own inputs, as `spaces.GPU` takes
it): the model set-up plus k times the slowest step measured in the previous call, with 30 % + 10 s of slack,
at most `call_ceiling_s`. ZeroGPU does not document its per-call maximum (public reports: about 300 s for
signed-in visitors) and serves shorter declarations first, so the default ceiling is 120 s; k shrinks for a call
whose k steps would not fit under it. The first call has no measurement yet and declares the ceiling.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ral_core import settings
from ral_core.errors import RALError

SLACK_FACTOR = 1.3   # on the measured time: a GPU shared with other calls is not always as fast as the last one
SLACK_S = 10.0       # attaching the GPU and moving the model onto it, before the first step


# ---- limits a visitor's run lives within ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkLimits:
    """What one run may use on a per-call GPU host. The defaults fit a free Hugging Face account's daily ZeroGPU
    quota (5 minutes in the Spaces documentation, December 2026) with a minute left for Inspect and Compare."""

    max_steps: int = 40          # RAL_ZEROGPU_MAX_STEPS: steps per run
    run_seconds: int = 240       # RAL_ZEROGPU_RUN_SECONDS: declared GPU seconds per run, all calls together
    call_seconds: int = 120      # RAL_ZEROGPU_CALL_SECONDS: ceiling of one call's declared duration
    chunk_steps: int = 4         # RAL_ZEROGPU_CHUNK_STEPS: steps per call (fewer where they would not fit)

    @classmethod
    def from_env(cls) -> "ChunkLimits":
        d = cls()
        return cls(settings.get("RAL_ZEROGPU_MAX_STEPS", d.max_steps),
                   settings.get("RAL_ZEROGPU_RUN_SECONDS", d.run_seconds),
                   settings.get("RAL_ZEROGPU_CALL_SECONDS", d.call_seconds),
                   settings.get("RAL_ZEROGPU_CHUNK_STEPS", d.chunk_steps))

    def check_run(self, steps) -> None:
        """Refuse, before any GPU call, a run that cannot fit."""
        if steps > self.max_steps:
            raise RALError(f"a run on this Space's ZeroGPU may have at most {self.max_steps} steps (this one has "
                           f"{steps:g}): lower the steps, or run it on a dedicated GPU or your own machine")


# ---- what crosses between calls -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """The run's fixed inputs (plain values: they pickle into every call)."""

    config: dict                  # TrainConfig.to_dict(); device 'auto' takes the GPU inside the call
    call_ceiling_s: int = 120
    first_call_s: int | None = None  # a first call's declaration when a step time is known beforehand
    snapshots: bool = False       # attention snapshots of the probe before the first and after the last step too
    max_state_mb: int = 0         # most MB of trainable weights + AdamW state a run may carry between calls (0: any)
    auto_lora: int = 0            # over that: train LoRA adapters of this rank instead (0: refuse the run)

    @property
    def steps(self) -> int:
        return int(self.config["steps"])


@dataclasses.dataclass
class RunState:
    """A run between two calls, all on the CPU."""

    step: int
    data_position: int              # index of the next training sample (the trainer reads samples by index)
    trainable: dict                 # parameter name → fp32 CPU tensor (the masters the optimizer updates)
    optimizer: dict                 # AdamW state_dict, tensors on the CPU
    scheduler: dict
    rng: dict                       # python / numpy / torch CPU / CUDA generators (CPU byte tensors)
    history: list                   # metrics of every finished step
    checkpoint: str | None = None   # the checkpoint the last call wrote
    setup_s: float = 0.0            # measured in the last call: building the trainer and loading this state
    step_s: float = 0.0             # the slowest step of the last call
    overrides: dict = dataclasses.field(default_factory=dict)  # config changes the first call made (auto LoRA)


@dataclasses.dataclass
class ChunkResult:
    state: RunState
    metrics: list                   # this call's steps
    seconds: float                  # wall time inside the call
    probe: dict | None = None       # the first call's snapshot probe: question, answer, boxes


def check_crossing(obj, where: str = "value") -> None:
    """Refuse anything that cannot cross a process boundary by pickle, or a tensor that is not on the CPU (a CUDA
    tensor returned from a GPU worker would be a handle into a GPU the caller does not hold)."""
    _walk_tensors(obj, where)
    try:
        pickle.dumps(obj)
    except Exception as e:  # noqa: BLE001 — whatever pickle refuses, the message names it
        raise RALError(f"{where} cannot cross to the GPU worker: {type(e).__name__}: {e}") from None


def _walk_tensors(obj, where: str, depth: int = 0):
    if depth > 50:
        return
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise RALError(f"{where} holds a tensor on '{obj.device}'; only CPU tensors may cross between GPU calls")
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk_tensors(getattr(obj, f.name), f"{where}.{f.name}", depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk_tensors(v, f"{where}[{k!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk_tensors(v, f"{where}[{i}]", depth + 1)


def _cpu(obj):
    """A deep copy with every tensor on the CPU (types kept: RNG states need their tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return copy.deepcopy(obj)


# ---- the duration a call declares ----------------------------------------------------------------------------------
def declared_seconds(job: ChunkJob, state: RunState | None, k: int) -> int:
    """The duration a call of `k` steps declares (the same inputs as `run_chunk`, as spaces.GPU passes them)."""
    if state is None or state.step_s <= 0:
        est = job.first_call_s if job.first_call_s else job.call_ceiling_s
        return int(min(job.call_ceiling_s, max(1, est)))
    est = (state.setup_s + k * state.step_s) * SLACK_FACTOR + SLACK_S
    return int(min(job.call_ceiling_s, max(1, math.ceil(est))))


def steps_that_fit(job: ChunkJob, state: RunState | None, k: int) -> int:
    """At most `k` steps, fewer when k measured steps would not fit under the call ceiling (at least 1)."""
    if state is None or state.step_s <= 0:
        return max(1, k)
    room = (job.call_ceiling_s - SLACK_S) / SLACK_FACTOR - state.setup_s
    return max(1, min(k, int(room // state.step_s)))


# ---- inside one GPU call ----------------------------------------------------------------------------------------
def capture_state(trainer, setup_s: float = 0.0, step_s: float = 0.0, checkpoint: str | None = None) -> RunState:
    """The trainer's whole run state, copied onto the CPU."""
    from ral_core.train_state import rng_state
    model = trainer.acc.unwrap_model(trainer.model)
    trainable = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    return RunState(step=int(trainer.step), data_position=_data_position(trainer.cfg, trainer.step),
                    trainable=trainable, optimizer=_cpu(trainer.opt.state_dict()),
                    scheduler=_cpu(trainer.sched.state_dict()), rng=_cpu(rng_state()),
                    history=copy.deepcopy(trainer.history), checkpoint=checkpoint, setup_s=setup_s, step_s=step_s)


def load_state(trainer, state: RunState) -> None:
    """Put a captured state into a freshly built trainer of the same config (weights, optimizer, scheduler, RNG)."""
    from ral_core.train_state import set_rng_state
    if state.data_position != _data_position(trainer.cfg, state.step):
        raise RALError(f"the carried run state is inconsistent (data position {state.data_position} at step "
                       f"{state.step}); start the run again")
    model = trainer.acc.unwrap_model(trainer.model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state.trainable) or any(params[n].shape != t.shape for n, t in state.trainable.items()):
        raise RALError("the carried run state does not match this model's trainable weights; start the run again")
    with torch.no_grad():
        for n, t in state.trainable.items():
            params[n].copy_(t)
    trainer.opt.load_state_dict(state.optimizer)
    trainer.sched.load_state_dict(state.scheduler)
    set_rng_state(state.rng)
    trainer.step = state.step
    trainer.history = copy.deepcopy(state.history)


def state_mb(trainer) -> float:
    """MB a run carries between calls: its fp32 trainable weights and AdamW's two moments for each."""
    n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return n * 12 / 2**20


def _size(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _fit_state(job: ChunkJob, trainer, cfg):
    """The first call: a run whose state would be too large to hand back between calls trains LoRA adapters instead
    (job.auto_lora), or is refused before any step."""
    mb = state_mb(trainer)
    if mb <= job.max_state_mb:
        return trainer, cfg, {}
    if not job.auto_lora or cfg.lora_r > 0:
        raise RALError(f"this run would carry {_size(mb)} of weights and optimizer state between GPU calls (at most "
                       f"{_size(job.max_state_mb)} here): train it with LoRA (lora_r=8), or on a dedicated GPU or your "
                       "own machine")
    from ral_core.trainer import Trainer
    overrides = {"lora_r": job.auto_lora}
    del trainer
    cfg = dataclasses.replace(cfg, **overrides)
    trainer = Trainer(cfg)
    trainer.notes.append(f"LoRA r={job.auto_lora}: full fine-tuning would carry {_size(mb)} between GPU calls")
    return trainer, cfg, overrides


def _probe(trainer) -> dict:
    try:
        p = trainer.probe_samples()[0]
    except (RALError, IndexError, KeyError):
        return {}
    return {"question": p["question"], "answer": p["answer"], "boxes": [list(b) for b in p.get("boxes") or []]}


def _data_position(cfg, step: int) -> int:
    return int(step) * int(cfg.prompts_per_step)


def run_chunk(job: ChunkJob, state: RunState | None, k: int) -> ChunkResult:
    """One GPU call: rebuild the trainer, load `state` (None: a new run), train up to `k` steps, write a
    checkpoint, and return the new state on the CPU."""
    from ral_core.config import TrainConfig
    from ral_core.trainer import Trainer

    t0 = time.perf_counter()
    overrides = dict(state.overrides) if state is not None else {}
    cfg = TrainConfig(**{**job.config, **overrides})
    trainer = Trainer(cfg)
    if state is None and job.max_state_mb:
        trainer, cfg, overrides = _fit_state(job, trainer, cfg)
    out = Path(cfg.output_dir)
    if state is None:
        if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
            raise RALError(f"'{out}' already holds checkpoints of another run; choose a new output folder")
        out.mkdir(parents=True, exist_ok=True)
        import yaml
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        notes = getattr(trainer, "notes", None) or []
        if notes:
            with open(out / "run.log", "a") as f:
                f.write("".join(f"step 0: {n}\n" for n in notes))
        if job.snapshots:
            trainer.snapshot()  # step 0: where the probe's attention starts
    else:
        load_state(trainer, state)
    setup_s = time.perf_counter() - t0
    metrics, slowest = [], 0.0
    for _ in range(max(0, min(k, cfg.steps - trainer.step))):
        ts = time.perf_counter()
        try:
            m = trainer.train_step()
        except FloatingPointError as e:
            raise RALError(f"training stopped: {e}; lower lr or check the data") from None
        trainer.step += 1
        m["step"] = trainer.step
        trainer.history.append(m)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        if cfg.snapshot_every and trainer.step % cfg.snapshot_every == 0:
            trainer.snapshot()
        metrics.append(m)
        slowest = max(slowest, time.perf_counter() - ts)
    if job.snapshots and trainer.step >= cfg.steps and metrics and \
            not (out / "snapshots" / f"step-{trainer.step:05d}").is_dir():
        trainer.snapshot()  # always an after-picture, also for runs shorter than the snapshot interval
    ck = trainer.save_checkpoint()
    new = capture_state(trainer, setup_s=setup_s, step_s=slowest, checkpoint=str(ck) if ck else None)
    new.overrides = overrides
    result = ChunkResult(new, metrics, time.perf_counter() - t0, _probe(trainer) if state is None else None)
    _walk_tensors(result, "the call's result")
    return result


# ---- the CPU side: a run as a sequence of calls ----------------------------------------------------------------------
@dataclasses.dataclass
class ChunkEvent:
    """What the page shows after each call ('chunk') and once at the end ('end')."""

    kind: str                 # chunk | end
    status: str               # running | done | cancelled | stopped | failed
    step: int
    total: int
    calls: int
    gpu_seconds: int          # declared so far (what a ZeroGPU quota is charged)
    metrics: list             # this call's steps ('chunk'); [] at the end
    checkpoint: str | None
    message: str = ""         # the whole line ('end'): why it ended and what is kept
    reason: str = ""          # why it ended, without what is kept (for a page that says that itself)
    state: RunState | None = None
    probe: dict | None = None


def platform_reason(e: BaseException, call_no: int, declared: int) -> str:
    """Why a GPU call the host refused or cut short failed (ZeroGPU raises gradio errors whose text says which)."""
    raw = getattr(e, "message", None)  # gradio's Error keeps the text there (its str() adds quotes)
    text = " ".join(str(raw if isinstance(raw, str) else e).split())[:200] or type(e).__name__
    low = text.lower()
    if "quota" in low:
        return f"the GPU quota of this account is used up ({text}); try again when it refills"
    if "abort" in low:
        return (f"the platform aborted GPU call {call_no} after its declared {declared} s; try fewer steps per call "
                "or a smaller model")
    if "no gpu" in low or "not available" in low:
        return f"no GPU was free for call {call_no} ({text}); try again in a minute"
    return f"GPU call {call_no} failed ({type(e).__name__}: {text})"


def run_chunked(job: ChunkJob, call: Callable[[ChunkJob, RunState | None, int], ChunkResult],
                limits: ChunkLimits | None = None, cancel=None, state: RunState | None = None,
                ) -> Iterator[ChunkEvent]:
    """Drive a run as GPU calls: `call` is `run_chunk` as the host wraps it (spaces.GPU on ZeroGPU, itself
    elsewhere). Yields a 'chunk' event after every finished call and one 'end' event. Runs on the CPU: it only
    moves the pickled state from one call to the next."""
    limits = limits or ChunkLimits(call_seconds=job.call_ceiling_s)
    total, calls, spent = job.steps, 0, 0
    limits.check_run(total)

    def end(status: str, reason: str = "") -> ChunkEvent:
        step = state.step if state else 0
        kept = (f"the checkpoint of step {step} is kept" if state and state.checkpoint else "nothing was trained")
        message = f"{reason}; {kept}" if reason else ""
        return ChunkEvent("end", status, step, total, calls, spent, [], state.checkpoint if state else None,
                          message, reason, state)

    while True:
        step = state.step if state else 0
        if step >= total:
            yield end("done")
            return
        if cancel is not None and cancel.is_set():
            yield end("cancelled", f"cancelled after step {step}")
            return
        k = steps_that_fit(job, state, min(limits.chunk_steps, total - step))
        secs = declared_seconds(job, state, k)
        while spent + secs > limits.run_seconds and k > 1:
            k -= 1
            secs = declared_seconds(job, state, k)
        if spent + secs > limits.run_seconds:
            yield end("stopped", f"this run used its GPU time ({spent} of {limits.run_seconds} s declared) at step "
                                 f"{step}")
            return
        check_crossing((job, state, k), "the call's arguments")
        try:
            res = call(job, state, k)
        except RALError as e:
            spent += secs
            yield end("failed", str(e))
            return
        except Exception as e:  # noqa: BLE001 — the platform's own errors (quota, abort) arrive as any type
            spent += secs
            yield end("stopped", platform_reason(e, calls + 1, secs))
            return
        check_crossing(res, "the call's result")
        calls += 1
        spent += secs
        state = res.state
        yield ChunkEvent("chunk", "running", state.step, total, calls, spent, res.metrics, state.checkpoint,
                         state=state, probe=res.probe)
