"""The update loop (GRPO / RAL / OPAD / token distillation) on accelerate: rollouts → several optimizer
updates per rollout batch → metrics, checkpoints, snapshots. Readable in one sitting on purpose."""
from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from ral_core import distributed
from ral_core.attention import resolve_layers
from ral_core.config import TrainConfig
from ral_core.data.sources import dataset_for
from ral_core.errors import RALError
from ral_core.evaluate import CollapseGuard
from ral_core.inspection import inspect
from ral_core.levers import lever_map
from ral_core.losses import LossContext, Window, accumulation_windows, combined_loss, term_weights, window_weight
from ral_core.models import load_adapter
from ral_core.policy import ExploreSpec, fill_references, forward_policies, matched_layers, policy_specs  # noqa: F401
from ral_core.prefix_share import sharing_plan
from ral_core.rewards import RewardModel
from ral_core.rollout import attention_moved, make_rollouts, rollout_metrics
from ral_core.train_state import (accelerator_for, append_metrics, check_output_dir, latest_checkpoint, load_teacher,
                                  optimizer_for, prepare_student, read_checkpoint, seed_all, tensorboard_writer,
                                  truncate_metrics, write_checkpoint)
from ral_core.vision_cache import VISION_PREFIXES, is_vision_param, reuse_notes, vision_frozen  # noqa: F401

LEVER_PROBES = 8            # training samples the lever map of explore_layers=levers is measured on …
LEVER_PROBE_START = 10_000  # … taken from sample indices the first steps' prompts do not use
SHUFFLE_SEED_STRIDE = 1_000_003  # mini-batches of step s shuffled with seed · stride + s: distinct (seed, s) pairs


class Trainer:
    """`Trainer(cfg).train()` runs the loop. Callbacks get (trainer, metrics) after every step; set
    `trainer.cancel` (a threading.Event) to stop at the next step boundary with a checkpoint."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callable] | None = None, adapter=None,
                 accelerator=None):
        self.cfg = cfg = cfg.validate()
        self.callbacks = list(callbacks or [])
        self.cancel = threading.Event()
        self.acc = accelerator_for(cfg, accelerator)
        self.out = Path(cfg.output_dir)
        seed_all(cfg.seed + self.acc.process_index)
        # the models: the student as trained, its frozen reference and the teacher beside it
        self.adapter = adapter or load_adapter(cfg.model, device=str(self.acc.device))
        model, self.precision, self._saved_dtypes, self.ref_model = prepare_student(self.adapter.model, cfg,
                                                                                    self.acc.device)
        self.teacher = load_teacher(cfg, self.adapter, self.acc.device, self.precision)
        self.adapter.model = model
        # the attention policy, the task, exploration
        self.spec, self.teacher_spec = policy_specs(cfg, self.adapter, self.teacher, levers=self._lever_top)
        self.rewarder = RewardModel(cfg.reward_weights, ground_on=cfg.ground_on if cfg.lambda_ground > 0 else None)
        self.data = dataset_for(cfg)
        if hasattr(self.data, "check_text"):  # control tokens in a row: refused now, not at the step that draws it
            self.data.check_text(self.adapter)
        self.explore = ExploreSpec(self._explore_layers(), cfg.explore_sigma, cfg.explore_per_head, cfg.explore_keys,
                                   cfg.explore_row) if cfg.explore else None
        # distribution and shared work, then the optimizer over what is left trainable
        self.fsdp = distributed.use_fsdp(cfg.dist, self.acc)
        if self.fsdp:  # FSDP2 by us (accelerate's CPU mode would silently run DDP): before the optimizer sees params
            model = self._shard(model)
        self.vision_cache, self.share_prompt, self.notes = sharing_plan(
            cfg.vision_cache, cfg.share_prompt, vision_frozen(model), self.fsdp, self.explore is not None)
        if self.vision_cache:  # the frozen passes reuse the step's image features where their tower is the student's
            self.notes += reuse_notes(model, {"reference model": self.ref_model,
                                              "teacher": getattr(self.teacher, "model", None)})
        self.opt, self.sched = optimizer_for(model, cfg)
        if self.fsdp:
            self.model = model
            distributed.shard_optimizer_state(self.opt)
        else:
            self.model, self.opt = self.acc.prepare(model, self.opt)
        self.step, self.history, self.status = 0, [], "ready"
        self.guard = CollapseGuard(cfg.lr)

    # ---- setup helpers --------------------------------------------------------------------------------
    def _shard(self, model):
        """dist=fsdp: every model of the run sharded over the processes (ral_core/distributed.py)."""
        if self.cfg.snapshot_every:
            raise RALError("snapshot_every is not supported with dist=fsdp yet (snapshots run on one process); "
                           "inspect a saved checkpoint instead")
        for m in (self.ref_model, self.teacher.model if self.teacher is not None else None):
            if m is not None:
                distributed.shard(m, self.precision.compute)
        return distributed.shard(model, self.precision.compute)

    def _explore_layers(self) -> list[int]:
        """'levers': the layers whose attention moves the answer most on a few training samples."""
        if self.cfg.explore_layers != "levers":
            return resolve_layers(self.cfg.explore_layers, self.adapter.num_layers, self.adapter.attention_layers)
        return self._lever_top()

    def _lever_top(self) -> list[int]:
        """The top explore_top_k layers of the causal-lever map (measured once; ground_layers=levers reads it too)."""
        if getattr(self, "levers", None) is None:
            data = getattr(self, "data", None)
            data = dataset_for(self.cfg) if data is None else data  # the grounded terms ask before self.data is set
            probe = [data.sample(LEVER_PROBE_START + i) for i in range(LEVER_PROBES)]
            with self.precision.autocast():
                self.levers = lever_map(self.adapter, probe, strength=self.cfg.explore_lever_strength)
        return self.levers.top(min(self.cfg.explore_top_k, len(self.adapter.attention_layers)))

    def _gathered(self):
        return distributed.gathered(self.model) if self.fsdp else contextlib.nullcontext()

    # ---- one step -------------------------------------------------------------------------------------
    def _prompts(self, step: int) -> list[dict]:
        n = self.cfg.prompts_per_step  # each process its own n of the step's n · processes
        return [self.data.sample((step * self.acc.num_processes + self.acc.process_index) * n + i) for i in range(n)]

    def _loss(self, mb) -> tuple[torch.Tensor, dict]:
        """The training forward of mini-batch `mb` and Σ weight · term over the registered loss terms."""
        r = forward_policies(self.model, mb, self.spec, self.explore, need_logits=self.cfg.lambda_token_kl > 0)
        return combined_loss(LossContext.of(mb, r, self.cfg), term_weights(self.cfg, mb))

    def _fill_references(self, ro):
        lora_ref = self.ref_model is None and self.cfg.beta > 0 and self.cfg.lora_r > 0  # the base: adapters off
        with self.acc.unwrap_model(self.model).disable_adapter() if lora_ref else contextlib.nullcontext():
            fill_references(ro, self.model if lora_ref else self.ref_model, self.teacher, self.teacher_spec,
                            need_logits=self.cfg.lambda_token_kl > 0)

    def update_phase(self, ro) -> tuple[int, dict, list]:
        """`epochs` passes of shuffled mini-batches over one rollout batch (≥ 2 optimizer updates when an
        attention term is on), `grad_accum` mini-batches per update; each one's loss is weighted to its share of
        its window (losses.window_weight, TRL 1.16's normalisation). Returns (updates, per-term metric lists,
        grad norms)."""
        cfg, N, agg, n_updates, grad_norms = self.cfg, len(ro.texts), {}, 0, []
        self.model.train()
        g = torch.Generator().manual_seed(cfg.seed * SHUFFLE_SEED_STRIDE + self.step)
        # response tokens of the rollout batch, the mean over processes (TRL: num_items_in_batch / num_processes)
        batch_tokens = float(self.acc.gather(ro.mask.sum()[None]).float().mean())
        for _ in range(cfg.epochs):
            chunks = list(torch.randperm(N, generator=g).split(cfg.minibatch_size))
            for window in accumulation_windows(chunks, cfg.grad_accum):
                win = Window.of(window, N, batch_tokens)
                for idx in window:
                    mb = ro.select(idx.to(ro.completion.device))
                    with self.precision.autocast():  # the backward runs outside it, as autocast wants
                        loss, m = self._loss(mb)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
                    self.acc.backward(loss * window_weight(cfg.loss_norm, mb.mask, win))
                    for k, v in m.items():
                        agg.setdefault(k, []).append(v)
                if cfg.max_grad_norm > 0:
                    gn = float(self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                        cfg.max_grad_norm))
                    grad_norms.append(gn)
                    if not math.isfinite(gn):
                        raise FloatingPointError(f"non-finite gradient norm at step {self.step}")
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                n_updates += 1
        return n_updates, agg, grad_norms

    def train_step(self) -> dict:
        """Sample and score one rollout batch, add the reference/teacher passes, update, measure."""
        cfg, t0 = self.cfg, time.perf_counter()
        if self.explore is not None and cfg.explore_schedule == "linear":
            self.explore.sigma = cfg.explore_sigma * (1 - self.step / cfg.steps)
        try:
            with self.precision.autocast(), self._gathered():  # dist=fsdp: sampling with the model gathered once
                ro = make_rollouts(self.adapter, self._prompts(self.step), cfg.group_size, self.rewarder, self.spec,
                                   cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.advantage_scale,
                                   gen_model=self.acc.unwrap_model(self.model), explore=self.explore,
                                   vision_cache=self.vision_cache, share_prompt=self.share_prompt)
        except FloatingPointError as e:  # the sampler's finiteness check (generation.FiniteScores)
            raise FloatingPointError(f"{e} at step {self.step}") from None
        with self.precision.autocast():
            self._fill_references(ro)
        t_roll = time.perf_counter() - t0
        n_updates, agg, grad_norms = self.update_phase(ro)
        metrics = {"step": self.step, **rollout_metrics(ro, self.spec, self.explore), "updates": n_updates,
                   "lr": float(self.sched.get_last_lr()[0]), **{k: float(np.mean(v)) for k, v in agg.items()}}
        if grad_norms:
            metrics["grad_norm"] = float(np.mean(grad_norms))
        if self.spec is not None and cfg.attn_metrics_every and (self.step + 1) % cfg.attn_metrics_every == 0:
            with self.precision.autocast():  # how far this step's updates moved the attention: one more forward
                metrics["attn_jsd_after_update"] = attention_moved(self.model, ro, self.spec, self.explore)
        metrics["rollout_time"] = t_roll
        metrics["step_time"] = time.perf_counter() - t0
        self.last_rollouts = ro
        return metrics

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        cfg, main, t_start = self.cfg, self.acc.is_main_process, time.perf_counter()
        if main:
            check_output_dir(self.out, resume)
        if resume:
            self.load_checkpoint()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._log_notes(self.notes)
        tb = tensorboard_writer(self.out) if (main and cfg.log_tensorboard) else None
        self.status, last_good = "running", None
        try:
            while self.step < cfg.steps:
                if self.cancel.is_set():
                    self.status = "cancelled"
                    break
                try:
                    m = self.train_step()
                except FloatingPointError as e:
                    if last_good is not None:
                        self.load_checkpoint(last_good)
                    self.status = "nan"
                    raise RALError(f"training stopped: {e}. The last good checkpoint is kept in "
                                   f"'{self.out / 'checkpoints'}'; lower lr or check the data") from None
                self.step += 1
                m["step"] = self.step
                self.history.append(m)
                if cfg.snapshot_every and self.step % cfg.snapshot_every == 0 and main:
                    self.snapshot()  # (also shows the collapse guard each probe's answer)
                if warnings := self.guard.check(self.history):
                    m["warnings"] = warnings
                if main:
                    self._log_notes(warnings)
                    append_metrics(self.out, m, tb)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    last_good = self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, m)
            if self.status == "running":
                self.status = "done"
            self.save_checkpoint()
        finally:
            if tb:
                tb.close()
        return {"status": self.status, "step": self.step, "output_dir": str(self.out),
                "final": self.history[-1] if self.history else {}, "warnings": list(self.guard.warnings),
                "wall_time": time.perf_counter() - t_start}

    def _log_notes(self, notes: list[str]) -> None:
        if notes:
            with open(self.out / "run.log", "a") as f:
                f.write("".join(f"step {self.step}: {n}\n" for n in notes))

    # ---- snapshots and checkpoints ----------------------------------------------------------------------
    def probe_samples(self) -> list[dict]:
        src = dataset_for(self.cfg, split="test") if self.cfg.dataset == "grounding" else self.data
        return [src.sample(i) for i in range(self.cfg.probe_samples)]

    def snapshot(self):
        """Attention of fixed probe samples (greedy answer, all layers) saved under snapshots/step-N/. Run under a
        forked RNG: inspect() reseeds torch's global generator, and a run's weights must not depend on how often
        it was watched (snapshot_every)."""
        was = self.model.training
        self.model.eval()
        devices = [self.acc.device] if self.acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for i, s in enumerate(self.probe_samples()):
                with self.precision.autocast():
                    r = inspect(self.adapter_for_inference(), s["image"], s["question"], self.cfg.max_new_tokens)
                r.save(self.out / "snapshots" / f"step-{self.step:05d}" / f"probe-{i}")
                self.guard.probe(self.step, i, r.answer, s["answer"])
        self.model.train(was)

    def adapter_for_inference(self):
        a = copy.copy(self.adapter)
        a.model = self.acc.unwrap_model(self.model)
        return a

    def save_checkpoint(self) -> Path | None:
        """Atomically write checkpoints/step-N (weights loadable by load_adapter + trainer state). Every process
        calls it: under dist=fsdp the shards are gathered first, and each process's RNG streams are kept."""
        with distributed.full_state(self.model, self.opt, sharded=self.fsdp):
            self.acc.wait_for_everyone()
            if not self.acc.is_main_process:
                return None
            return write_checkpoint(self.out / "checkpoints", self.step, self.acc.unwrap_model(self.model),
                                    self.adapter, self.cfg, self.opt, self.sched, len(self.history),
                                    self.precision, self._saved_dtypes)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def load_checkpoint(self, path: Path | None = None):
        path = path or self.latest_checkpoint()
        if path is None or not path.exists():
            raise RALError(f"no checkpoint to resume from in '{self.out / 'checkpoints'}'")
        self.step = read_checkpoint(path, self.acc.unwrap_model(self.model), self.cfg.lora_r > 0, self.opt,
                                    self.sched)
        if (self.out / "metrics.jsonl").exists() and self.acc.is_main_process:
            self.history = truncate_metrics(self.out / "metrics.jsonl", self.step)
        self.status = "resumed"
