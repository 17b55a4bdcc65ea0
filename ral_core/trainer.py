"""The update loop (GRPO / RAL / OPAD / token distillation) on accelerate: rollouts → several optimizer
updates per rollout batch → metrics, checkpoints, snapshots. Readable in one sitting on purpose."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from ral_core.attention import resolve_layers
from ral_core.config import TrainConfig
from ral_core.errors import RALError
from ral_core.losses import LossContext, Window, accumulation_windows, combined_loss, window_weight
from ral_core.rewards import RewardModel
from ral_core.rollout import (ExploreSpec, PolicySpec, attention_stats, forward_policies, make_rollouts,
                              policy_forward)
from ral_core.vision_cache import VISION_PREFIXES, is_vision_param, vision_frozen  # noqa: F401 (re-exported)

MASTER_WEIGHTS = "master_weights.safetensors"  # fp32 trainable weights of a checkpoint saved in bf16/fp16


def dataset_for(cfg: TrainConfig, split: str = "train"):
    """Sample source with `.sample(i) -> dict(image, question, answer, boxes)`."""
    if cfg.dataset == "grounding":
        from ral_core.data import GroundingTask
        task = GroundingTask(rows=cfg.grid_rows, cols=cfg.grid_cols, kinds=tuple(cfg.task_kinds), split=split,
                             seed=cfg.data_seed)

        class _Src:
            def sample(self, i):
                s = task.sample(i)
                return {"image": s.image, "question": s.question, "answer": s.answer, "boxes": s.boxes,
                        "kind": s.kind}
        return _Src()
    from ral_core.data.jsonl import JsonlDataset
    return JsonlDataset(cfg.dataset)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the trainer holds and computes: trainable parameters (the master weights the optimizer updates, and so
    its state) are always fp32; `frozen` is the dtype of frozen weights (the checkpoint's under bf16-mixed, so they
    are saved unchanged), `compute` the autocast dtype (None: plain fp32 compute), `storage` the checkpoint's dtype,
    which saved weights keep."""

    mode: str                       # fp32 | bf16-mixed
    storage: torch.dtype
    frozen: torch.dtype
    compute: torch.dtype | None
    device_type: str

    def autocast(self):
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)


def resolve_precision(setting: str, storage: torch.dtype, device) -> Precision:
    """`precision` of the config → a Precision. 'auto' follows the checkpoint: an fp32 one trains in fp32; a bf16/fp16
    one gets fp32 master weights, with bf16 autocast on a CUDA GPU (frozen weights keep the checkpoint's dtype: half
    the memory) and fp32 compute on the CPU, where bf16 matmuls are slower than fp32 ones unless the CPU has AMX. In
    pure bf16 most updates of an AdamW step at lr 5e-5 round away (issue 14: 57 % of N(0, 0.02²) weights moved)."""
    dev = torch.device(device).type
    bf16_ok = dev != "cuda" or torch.cuda.is_bf16_supported()
    if setting == "auto":
        setting = "bf16-mixed" if storage != torch.float32 and dev == "cuda" and bf16_ok else "fp32"
    if setting == "fp32":
        return Precision("fp32", storage, torch.float32, None, dev)
    if setting == "bf16-mixed":
        if not bf16_ok:
            raise RALError("precision=bf16-mixed needs a GPU with bfloat16 support; this one has none — use "
                           "precision=fp32 (or auto)")
        return Precision("bf16-mixed", storage, storage, torch.bfloat16, dev)
    raise RALError(f"unknown precision '{setting}'; choose auto, fp32 or bf16-mixed")


def apply_precision(model: torch.nn.Module, prec: Precision) -> None:
    """Cast in place: trainable parameters to fp32 (masters), frozen ones to `prec.frozen`. Set requires_grad
    first. Tied weights are one Parameter, so they stay tied."""
    if prec.mode == "fp32":
        model.float()  # buffers too: the whole forward computes in fp32
        return
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if p.requires_grad else prec.frozen)


def storage_state_dict(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> dict:
    """The model's state dict with each floating tensor back in its checkpoint dtype (`dtypes`, by key), tied tensors
    still shared, so save_pretrained drops the alias as it does for the model's own state dict."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        dt = dtypes.get(k, v.dtype)
        if v.is_floating_point() and v.dtype != dt:
            key = (v.data_ptr(), dt, tuple(v.shape), v.stride())
            if key not in seen:
                seen[key] = v.detach().to(dt)
            v = seen[key]
        out[k] = v
    return out


def matched_layers(layers: list[int], student, teacher) -> list[int]:
    """Student layer indices → the teacher's layers at the same relative depth (last ↔ last), so OPAD compares
    like with like when the teacher is deeper. `student` / `teacher`: a layer count, or the list of layers with
    softmax attention (hybrid models), along which depth is then counted."""
    s = list(range(student)) if isinstance(student, int) else list(student)
    t = list(range(teacher)) if isinstance(teacher, int) else list(teacher)
    return [t[min(len(t) - 1, max(0, round((s.index(i) + 1) * len(t) / len(s)) - 1))] for i in layers]


class Trainer:
    """`Trainer(cfg).train()` runs the loop. Callbacks get (trainer, metrics) after every step; set
    `trainer.cancel` (a threading.Event) to stop at the next step boundary with a checkpoint."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callable] | None = None, adapter=None,
                 accelerator=None):
        from accelerate import Accelerator

        from ral_core.models import load_adapter

        self.cfg = cfg.validate()
        self.callbacks = list(callbacks or [])
        self.cancel = threading.Event()
        use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RALError("device=cuda but no CUDA GPU is visible; use device=auto or cpu")
        self.acc = accelerator or Accelerator(cpu=use_cpu)
        if use_cpu:
            torch.set_num_threads(max(1, cfg.threads))
        self.out = Path(cfg.output_dir)
        self._seed_all(cfg.seed + self.acc.process_index)
        self.adapter = adapter or load_adapter(cfg.model, device=str(self.acc.device))
        model = self.adapter.model
        self.precision = resolve_precision(cfg.precision, model.dtype, self.acc.device)
        self._saved_dtypes = {k: v.dtype for k, v in model.state_dict().items()}  # what checkpoints write back
        for n, p in model.named_parameters():
            p.requires_grad_(not (cfg.freeze_vision and is_vision_param(n)))
        self.ref_model = None
        if cfg.lora_r > 0:
            model = self._add_lora(model)
        apply_precision(model, self.precision)  # after LoRA, so its adapters are fp32 like every trainable weight
        if cfg.lora_r == 0 and cfg.beta > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            for p in self.ref_model.parameters():  # frozen: no fp32 masters needed (values unchanged)
                p.data = p.data.to(self.precision.frozen)
        self.teacher = None
        if cfg.teacher and (cfg.gamma_opad > 0 or cfg.lambda_token_kl > 0):
            self.teacher = load_adapter(cfg.teacher, device=str(self.acc.device),
                                        dtype=torch.float32 if self.precision.compute is None else None)
            self.teacher.model.requires_grad_(False)
            if len(self.teacher.tokenizer) != len(self.adapter.tokenizer):
                raise RALError("the teacher must share the student's tokenizer (same vocabulary) for OPAD")
        self.adapter.model = model
        n_layers = self.adapter.num_layers
        self.spec = None
        if cfg.uses_policy_attention or cfg.log_attention:
            self.spec = PolicySpec(resolve_layers(cfg.attn_layers, n_layers, self.adapter.attention_layers),
                                   cfg.attn_row, cfg.attn_support, cfg.attn_per_head)
        self.teacher_spec = self.spec
        if self.teacher is not None and self.spec is not None:
            attn_teacher = self.teacher.attention_layers  # depth is matched along the softmax-attention layers
            if cfg.attn_per_head and self.teacher.num_heads != self.adapter.num_heads:
                raise RALError(f"attn_per_head needs a teacher with the student's {self.adapter.num_heads} heads "
                               f"(it has {self.teacher.num_heads}); set attn_per_head=false")
            self.teacher_spec = dataclasses.replace(self.spec, layers=matched_layers(
                self.spec.layers, self.adapter.attention_layers, attn_teacher))
        self.rewarder = RewardModel(cfg.reward_weights)
        self.data = dataset_for(cfg)
        self.explore = None
        if cfg.explore:
            self.explore = ExploreSpec(self._explore_layers(), cfg.explore_sigma, cfg.explore_per_head,
                                       cfg.explore_keys, cfg.explore_row)
        from ral_core import distributed
        self.fsdp = distributed.use_fsdp(cfg.dist, self.acc)
        if self.fsdp:  # FSDP2 by us (accelerate's CPU mode would silently run DDP): before the optimizer sees params
            model = self._shard(model)
        self.notes: list[str] = []  # what the run log says about choices made for this run
        self.vision_cache = cfg.vision_cache and vision_frozen(model)
        if cfg.vision_cache and not self.vision_cache:
            self.notes.append("vision-feature cache off: the vision path is trained (freeze_vision=false), so every "
                              "pass encodes its images itself")
        # under FSDP a shared prompt's KV cache carries gradient into its layers around their outputs, where FSDP
        # hooks the re-gather for backward: the prompt is computed per sequence (images are still encoded once)
        self.share_prompt = cfg.share_prompt if (self.vision_cache and not self.fsdp) else "false"
        if self.fsdp and cfg.share_prompt != "false":
            self.notes.append("dist=fsdp: each sequence computes its own prompt (a shared prompt's cache would carry "
                              "gradient past FSDP's re-gather hooks); images are still encoded once per step")
        if self.share_prompt != "false" and self.explore is not None:
            self.notes.append("exploration: each rollout's prompt runs under its own attention bias, so prompts are "
                              "not shared within a group (images are still encoded once)")
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total_updates = cfg.steps * cfg.updates_per_step
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_lambda(total_updates))
        if self.fsdp:
            self.model = model
            distributed.shard_optimizer_state(self.opt)
        else:
            self.model, self.opt = self.acc.prepare(model, self.opt)
        self.step = 0
        self.history: list[dict] = []
        self.status = "ready"

    # ---- setup helpers --------------------------------------------------------------------------------
    def _shard(self, model):
        """dist=fsdp: every model of the run sharded over the processes (ral_core/distributed.py)."""
        from ral_core import distributed
        if self.cfg.snapshot_every:
            raise RALError("snapshot_every is not supported with dist=fsdp yet (snapshots run on one process); "
                           "inspect a saved checkpoint instead")
        dt = self.precision.compute
        for m in (self.ref_model, self.teacher.model if self.teacher is not None else None):
            if m is not None:
                distributed.shard(m, dt)
        return distributed.shard(model, dt)

    def _add_lora(self, model):
        from peft import LoraConfig, get_peft_model
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and not is_vision_param(n) and n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
        lcfg = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=targets)
        return get_peft_model(model, lcfg)

    def _gathered(self):
        from ral_core.distributed import gathered
        return gathered(self.model) if self.fsdp else contextlib.nullcontext()

    def _explore_layers(self) -> list[int]:
        """'levers': the layers whose attention moves the answer most on a few training samples."""
        spec = self.cfg.explore_layers
        if spec != "levers":
            return resolve_layers(spec, self.adapter.num_layers, self.adapter.attention_layers)
        from ral_core.levers import lever_map
        probe = [self.data.sample(10_000 + i) for i in range(8)]
        with self.precision.autocast():
            self.levers = lever_map(self.adapter, probe, strength=self.cfg.explore_lever_strength)
        return self.levers.top(min(self.cfg.explore_top_k, len(self.adapter.attention_layers)))

    def _lr_lambda(self, total):
        cfg = self.cfg

        def f(u):
            if cfg.warmup_steps and u < cfg.warmup_steps * cfg.updates_per_step:
                return (u + 1) / (cfg.warmup_steps * cfg.updates_per_step)
            frac = u / max(1, total)
            if cfg.schedule == "linear":
                return max(0.0, 1 - frac)
            if cfg.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            return 1.0
        return f

    @staticmethod
    def _seed_all(seed):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---- one step -------------------------------------------------------------------------------------
    def _prompts(self, step: int) -> list[dict]:
        n, world, rank = self.cfg.prompts_per_step, self.acc.num_processes, self.acc.process_index
        base = step * n * world + rank * n
        return [self.data.sample(base + i) for i in range(n)]

    def _loss(self, mb) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        need_logits = cfg.lambda_token_kl > 0
        r = forward_policies(self.model, mb, self.spec, self.explore, need_logits=need_logits)
        ctx = LossContext(mask=mb.mask, logp=r["logp"], old_logp=mb.old_logp, ref_logp=mb.ref_logp,
                          advantages=mb.advantages, attn=r["attn"], attn_old=mb.old_attn,
                          attn_teacher=mb.teacher_attn, attn_natural=r["natural"], attn_explored=mb.explored_attn,
                          logits=r["logits"], teacher_logits=mb.teacher_logits, norm=cfg.loss_norm,
                          max_len=cfg.max_new_tokens, clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        terms = {"grpo": 1.0, "kl": cfg.beta, "ral_attn": cfg.lambda_attn, "opad_attn": cfg.gamma_opad,
                 "token_rkl": cfg.lambda_token_kl, "explore": cfg.explore_weight if mb.explore_bias else 0.0}
        return combined_loss(ctx, terms)

    @torch.no_grad()
    def _fill_references(self, ro):
        if self.ref_model is not None:
            ro.ref_logp, _, _ = policy_forward(self.ref_model, ro, None)
        elif self.cfg.beta > 0 and self.cfg.lora_r > 0:
            with self.acc.unwrap_model(self.model).disable_adapter():
                ro.ref_logp, _, _ = policy_forward(self.model, ro, None)
        if self.teacher is not None:
            _, ro.teacher_attn, ro.teacher_logits = policy_forward(self.teacher.model, ro, self.teacher_spec,
                                                                   need_logits=self.cfg.lambda_token_kl > 0)

    def update_phase(self, ro) -> tuple[int, dict, list]:
        """`epochs` passes of shuffled mini-batches over one rollout batch (≥ 2 optimizer updates when an
        attention term is on), `grad_accum` mini-batches per update; each one's loss is weighted to its share of
        its window (losses.window_weight, TRL 1.16's normalisation). Returns (updates, per-term metric lists,
        grad norms)."""
        cfg = self.cfg
        self.model.train()
        N = len(ro.texts)
        agg: dict[str, list] = {}
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        n_updates, grad_norms = 0, []
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
        cfg = self.cfg
        t0 = time.perf_counter()
        gen_model = self.acc.unwrap_model(self.model)
        if self.explore is not None and cfg.explore_schedule == "linear":
            self.explore.sigma = cfg.explore_sigma * (1 - self.step / cfg.steps)
        try:
            with self.precision.autocast(), self._gathered():  # dist=fsdp: sampling with the model gathered once
                ro = make_rollouts(self.adapter, self._prompts(self.step), cfg.group_size, self.rewarder, self.spec,
                                   cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.advantage_scale,
                                   gen_model=gen_model, explore=self.explore, vision_cache=self.vision_cache,
                                   share_prompt=self.share_prompt)
        except RuntimeError as e:
            if "inf" in str(e) or "nan" in str(e):  # sampling from non-finite probabilities
                raise FloatingPointError(f"non-finite model outputs while sampling at step {self.step}") from None
            raise
        with self.precision.autocast():
            self._fill_references(ro)
        t_roll = time.perf_counter() - t0
        n_updates, agg, grad_norms = self.update_phase(ro)
        # attention of the updated policy on the same rows: how far the updates moved it
        metrics = {"step": self.step, "reward": float(ro.rewards.mean()),
                   "accuracy": float(ro.sub_rewards.get("exact_match", ro.rewards).mean()),
                   "reward_std": float(ro.rewards.std()), "adv_abs_mean": float(ro.advantages.abs().mean()),
                   "zero_var_groups": ro.zero_var_groups, "groups": cfg.prompts_per_step,
                   "response_len": float(ro.mask.float().sum(1).mean()), "updates": n_updates,
                   "lr": float(self.sched.get_last_lr()[0])}
        metrics.update({f"reward_{k}": float(v.mean()) for k, v in ro.sub_rewards.items()})
        metrics.update({k: float(np.mean(v)) for k, v in agg.items()})
        if grad_norms:
            metrics["grad_norm"] = float(np.mean(grad_norms))
        if self.explore is not None:
            metrics.update(explore_stats(ro, self.explore))
        if self.spec is not None:
            metrics.update(attention_stats(ro.old_attn, ro))  # the rollout policy's attention: free
            if cfg.attn_metrics_every and (self.step + 1) % cfg.attn_metrics_every == 0:
                # how far this step's updates moved the attention on the same rows: one extra forward
                with torch.no_grad(), self.precision.autocast():
                    attn_new = forward_policies(self.model, ro, self.spec, self.explore)["attn"]
                from ral_core.losses import aggregate, jsd
                d = torch.stack([jsd(a, b).mean(1) for a, b in zip(attn_new, ro.old_attn)]).mean(0)
                metrics["attn_jsd_after_update"] = float(aggregate(d, ro.mask, "token"))
        metrics["rollout_time"] = t_roll
        metrics["step_time"] = time.perf_counter() - t0
        self.last_rollouts = ro
        return metrics

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        cfg = self.cfg
        main = self.acc.is_main_process
        if main:  # a checkpoint write killed mid-way leaves .tmp-step-* behind; not "checkpoints of another run"
            from ral_core.train_state import remove_stale_tmp
            remove_stale_tmp(self.out / "checkpoints")
        if resume:
            self.load_checkpoint()
        elif main and (self.out / "checkpoints").exists() and any((self.out / "checkpoints").iterdir()):
            raise RALError(f"'{self.out}' already holds checkpoints of another run; pass resume (ral train --resume) "
                           "or choose a new output_dir — nothing was overwritten")
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if self.notes:
                with open(self.out / "run.log", "a") as f:
                    f.write("".join(f"step {self.step}: {n}\n" for n in self.notes))
        tb = self._tensorboard() if (main and cfg.log_tensorboard) else None
        self.status = "running"
        last_good = None
        try:
            while self.step < cfg.steps:
                if self.cancel.is_set():
                    self.status = "cancelled"
                    break
                try:
                    m = self.train_step()
                except FloatingPointError as e:
                    self._restore_last_good(last_good)
                    self.status = "nan"
                    raise RALError(f"training stopped: {e}. The last good checkpoint is kept in "
                                   f"'{self.out / 'checkpoints'}'; lower lr or check the data") from None
                self.step += 1
                m["step"] = self.step
                self.history.append(m)
                if main:
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(m) + "\n")
                    if tb:
                        for k, v in m.items():
                            if isinstance(v, (int, float)):
                                tb.add_scalar(k, v, self.step)
                if cfg.snapshot_every and self.step % cfg.snapshot_every == 0 and main:
                    self.snapshot()
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
                "final": self.history[-1] if self.history else {}}

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _restore_last_good(self, path):
        if path is not None:
            self.load_checkpoint(path)

    # ---- snapshots --------------------------------------------------------------------------------------
    def probe_samples(self) -> list[dict]:
        src = dataset_for(self.cfg, split="test") if self.cfg.dataset == "grounding" else self.data
        return [src.sample(i) for i in range(self.cfg.probe_samples)]

    def snapshot(self):
        """Attention of fixed probe samples (greedy answer, all layers) saved under snapshots/step-N/."""
        from ral_core.inspection import inspect
        was = self.model.training
        self.model.eval()
        for i, s in enumerate(self.probe_samples()):
            with self.precision.autocast():
                r = inspect(self.adapter_for_inference(), s["image"], s["question"], self.cfg.max_new_tokens)
            r.save(self.out / "snapshots" / f"step-{self.step:05d}" / f"probe-{i}")
        self.model.train(was)

    def adapter_for_inference(self):
        a = copy.copy(self.adapter)
        a.model = self.acc.unwrap_model(self.model)
        return a

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Atomically write checkpoints/step-N (weights loadable by load_adapter + trainer state). Every process
        calls it: under dist=fsdp the shards are gathered first, and each process's RNG streams are kept."""
        from ral_core.distributed import full_state
        with full_state(self.model, self.opt, sharded=self.fsdp):
            return self._write_checkpoint()

    def _write_checkpoint(self) -> Path | None:
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        ck_root = self.out / "checkpoints"
        ck_root.mkdir(parents=True, exist_ok=True)
        from ral_core.train_state import remove_stale_tmp
        remove_stale_tmp(ck_root)  # writes of killed processes (e.g. during a run that was resumed)
        final = ck_root / f"step-{self.step:05d}"
        tmp = ck_root / f".tmp-step-{self.step:05d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.acc.unwrap_model(self.model)
        if self.cfg.lora_r > 0:
            model.save_pretrained(tmp)  # the LoRA adapters only, fp32 as trained (PEFT's convention)
        else:
            self._save_weights(model, tmp)
        self.adapter.tokenizer.save_pretrained(tmp)
        self.adapter.image_processor.save_pretrained(tmp)
        if self.cfg.lora_r > 0:
            (tmp / "ral_base_model.txt").write_text(str(self.cfg.model))
        from ral_core.train_state import save_state  # safetensors + JSON: resuming never unpickles
        save_state(tmp, self.step, self.opt, self.sched, len(self.history))
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = ck_root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, ck_root / "latest")
        kept = sorted(p for p in ck_root.glob("step-*") if p.is_dir())
        for old in kept[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _save_weights(self, model, directory: Path):
        """Weights in the checkpoint's dtypes (a bf16 model stays a bf16 checkpoint), plus the fp32 master copy of the
        trainable weights that they would round (MASTER_WEIGHTS), so that resuming continues exactly."""
        from safetensors.torch import save_file
        st = self.precision.storage
        model.save_pretrained(directory, state_dict=storage_state_dict(model, self._saved_dtypes))
        cfg_file = directory / "config.json"
        c = json.loads(cfg_file.read_text())
        if c.get("dtype") != str(st).removeprefix("torch."):  # save_pretrained writes the fp32 masters' dtype
            c["dtype"] = str(st).removeprefix("torch.")
            cfg_file.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        masters = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                   if p.requires_grad and p.dtype != self._saved_dtypes.get(n, p.dtype)}
        if masters:
            save_file(masters, str(directory / MASTER_WEIGHTS))

    def latest_checkpoint(self) -> Path | None:
        f = self.out / "checkpoints" / "latest"
        return (self.out / "checkpoints" / f.read_text().strip()) if f.exists() else None

    def load_checkpoint(self, path: Path | None = None):
        path = path or self.latest_checkpoint()
        if path is None or not path.exists():
            raise RALError(f"no checkpoint to resume from in '{self.out / 'checkpoints'}'")
        from safetensors.torch import load_file
        model = self.acc.unwrap_model(self.model)
        if self.cfg.lora_r > 0:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        else:
            # from_pretrained maps the on-disk key names (which v5 may convert) back to the module's names
            saved = type(model).from_pretrained(path)
            try:
                model.load_state_dict(saved.state_dict())
            except RuntimeError as e:
                raise RALError(f"checkpoint '{path}' does not match the model: {str(e).splitlines()[0]}") from None
            del saved
            if (path / MASTER_WEIGHTS).exists():  # the fp32 masters the saved bf16/fp16 weights were rounded from
                params = dict(model.named_parameters())
                masters = load_file(str(path / MASTER_WEIGHTS))
                bad = [n for n, t in masters.items() if n not in params or params[n].shape != t.shape]
                if bad:
                    raise RALError(f"checkpoint '{path}': {MASTER_WEIGHTS} does not match the model ({bad[0]})")
                model.load_state_dict(masters, strict=False)  # (not param.copy_: a sharded parameter takes it too)
        from ral_core.train_state import load_state
        st = load_state(path, self.opt, self.sched)  # optimizer, scheduler and RNG streams; refuses pickles
        self.step = int(st["step"])
        mfile = self.out / "metrics.jsonl"
        if mfile.exists() and self.acc.is_main_process:
            # drop metric lines written after this checkpoint (an interrupted step), so the log stays exact
            lines = [ln for ln in mfile.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            mfile.write_text("".join(ln + "\n" for ln in keep))
            self.history = [json.loads(ln) for ln in keep]
        self.status = "resumed"


def explore_stats(ro, spec: ExploreSpec) -> dict:
    """σ, mean |b| on perturbed keys, JSD(explored ‖ natural) at rollout time, natural on-target mass at the
    decisive row and the correlation of explored on-target mass with reward."""
    from ral_core.losses import aggregate, jsd
    out = {"explore_sigma": spec.sigma}
    if ro.explore_bias:
        b = torch.stack([v.abs().mean(dim=(1, 2)) for v in ro.explore_bias.values()]).mean(0)  # [N, P]
        nz = torch.stack([(v != 0).float().mean(dim=(1, 2)) for v in ro.explore_bias.values()]).mean(0)
        out["explore_bias_abs"] = float(b.sum() / nz.sum().clamp_min(1))
    if ro.explored_attn:
        d = torch.stack([jsd(a, n).mean(1) for a, n in zip(ro.explored_attn, ro.natural_attn_old)]).mean(0)
        out["explore_jsd_natural"] = float(aggregate(d, ro.mask, "token"))
        if ro.target_keys is not None:
            ex = torch.stack([a.mean(1)[:, 0] for a in ro.explored_attn]).mean(0)  # decisive row [N, K]
            nat = torch.stack([a.mean(1)[:, 0] for a in ro.natural_attn_old]).mean(0)
            tm_ex = (ex * ro.target_keys).sum(-1)
            out["natural_target_mass_decisive"] = float((nat * ro.target_keys).sum(-1).mean())
            if tm_ex.std() > 1e-12 and ro.rewards.std() > 1e-12:
                out["explore_target_reward_corr"] = float(torch.corrcoef(torch.stack([tm_ex.cpu(), ro.rewards]))[0, 1])
    return out
