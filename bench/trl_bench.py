"""Benchmark: our GRPO trainer next to TRL's GRPOTrainer, same model, same prompts, same settings (CPU).

    make bench-trl                                                        # installs trl==1.16.0 into .venv, then
    .venv/bin/python bench/trl_bench.py --out bench/results/trl.md      # ≈ 2–4 min on 2 shared cores
    .venv/bin/python bench/trl_bench.py --quick                           # tiny smoke run, prints the report

TRL is a benchmark-only dependency: it is not in requirements.txt and nothing under ral_core/ or tests/ imports it.

Both trainers get their own copy of the embedded default model (assets/default_model, a 0.88M-param Qwen2-VL),
full fine-tuning of the language model in fp32 (vision tower and merger frozen on both sides, as our
`freeze_vision=true` default), the bundled grounding task with its images, exact-match reward. TRL takes the
VLM path: a Qwen2VLProcessor built from our tokenizer and PIL image processor (without its torchvision-only
video processor) and a chat template that yields exactly our adapter's prompt tokens (checked at start-up).

One rollout batch = P prompts × G completions, then U optimizer updates on the whole batch:
  ours  Trainer.train():       prompts_per_step=P, group_size=G, epochs=U, minibatch_size=P·G
  TRL   GRPOTrainer.train():   per_device_train_batch_size=P·G, num_generations=G, num_iterations=U,
                               steps_per_generation=1, gradient_accumulation_steps=1
so TRL's first optimizer step of each rollout batch generates and its next U−1 steps reuse the batch.

Timing: each trainer's own train() loop runs in a worker thread that pauses at every step boundary (a trainer
callback blocks on a semaphore), so the main thread times one step at a time and the two trainers alternate in
this one process (ours, TRL, TRL, ours, …; only one runs at any moment). One round = one rollout batch on each
side: one `train()` step of ours, U optimizer steps of TRL. Both trainers see the same prompts in the same order
(TRL's `shuffle_dataset=False`; checked). Wall time and process CPU time are recorded; with one torch thread,
CPU/wall well below 1 means another process was taking the core, so the ratio is taken on CPU time.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import os
import shlex
import sys
import tempfile
import threading
import time
import warnings

import _common as C

C.start()  # before torch is imported

import torch  # noqa: E402

TRL_PIN = "1.16.0"
# our loss_norm → TRL loss_type with the same normaliser for one process without gradient accumulation
# (dr_grpo differs in its constant: ours N·T_batch_max, TRL N·max_completion_length)
LOSS_MAP = {"token": "dapo", "sequence": "grpo", "dr_grpo": "dr_grpo"}


log = C.logger("trl_bench")


def require_trl():
    """Import TRL or stop with one line saying how to get it (it is not a project dependency)."""
    try:
        import trl
    except ImportError as e:
        print(f"trl_bench: TRL is not installed in this environment ({e}); run `make bench-trl`, which installs "
              f"trl=={TRL_PIN} into .venv and runs this benchmark.", file=sys.stderr)
        sys.exit(2)
    if trl.__version__ != TRL_PIN:
        log(f"warning: trl {trl.__version__} installed, this benchmark was written against {TRL_PIN}")
    return trl


# ------------------------------------------------------------------------------------------------ stepping

class Stepper:
    """Runs a training loop in a worker thread that pauses at every step boundary.

    `run(pause)` must start the loop and call `pause()` at the end of each step; `pause()` returns True when the
    loop should stop. `step()` lets the loop run to its next boundary and returns (wall s, process CPU s).
    """

    def __init__(self, name: str, run):
        self.name, self._run = name, run
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self.stop_requested = self.finished = False
        self.error: BaseException | None = None
        self.threads_seen: set[int] = set()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self):
        torch.set_num_threads(1)  # OpenMP thread counts are per thread: set it here too
        try:
            self._go.acquire()
            self._run(self.pause)
        except BaseException as e:  # handed to the main thread by step()
            self.error = e
        finally:
            self.finished = True
            self._done.release()

    def pause(self) -> bool:
        self.threads_seen.add(torch.get_num_threads())
        self._done.release()
        self._go.acquire()
        return self.stop_requested

    def step(self, timeout: float = 600.0) -> tuple[float, float]:
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        self._go.release()
        ok = self._done.acquire(timeout=timeout)
        t1, c1 = time.perf_counter(), time.process_time()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed: {type(self.error).__name__}: {self.error}") from self.error
        if not ok or self.finished:
            raise RuntimeError(f"{self.name}: {'no step boundary within the timeout' if not ok else 'loop ended early'}")
        return t1 - t0, c1 - c0

    def close(self):
        self.stop_requested = True
        self._go.release()
        self.thread.join(timeout=120)


# ------------------------------------------------------------------------------------------------ setup

def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_ours(adapter, args, tmp, rec):
    """Our Trainer with the benchmark settings; its train() loop wrapped in a Stepper."""
    from ral_core.config import build_config
    from ral_core.trainer import Trainer

    n = args.prompts * args.group
    cfg = build_config(None, {
        "model": "default", "device": "cpu", "threads": 1, "seed": 0, "steps": 100_000,
        "output_dir": os.path.join(tmp, "ours"), "prompts_per_step": args.prompts, "group_size": args.group,
        "max_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0, "lr": args.lr,
        "schedule": "constant", "epochs": args.updates, "minibatch_size": n, "grad_accum": 1,
        "loss_norm": args.loss, "beta": 0.0, "lora_r": 0, "freeze_vision": True, "max_grad_norm": 1.0,
        "clip_low": 0.2, "clip_high": 0.2, "weight_decay": 0.0, "advantage_scale": "std",
        "save_every": 0, "snapshot_every": 0, "eval_every": 0, "log_tensorboard": False,
        # plain GRPO: no attention capture, no attention metrics pass
        "log_attention": False, "attn_metrics_every": 0, "lambda_attn": 0.0,
    })
    assert cfg.updates_per_step == args.updates
    tr = Trainer(cfg, adapter=adapter)
    assert tr.spec is None and tr.ref_model is None

    def cb(trainer, m):
        ro = trainer.last_rollouts
        rec.append({"rollout_wall": m["rollout_time"], "resp_len": m["response_len"], "reward": m["reward"],
                    "updates": m["updates"], "questions": tuple(s["question"] for s in ro.samples)})

    def run(pause):
        tr.callbacks.append(cb)
        tr.callbacks.append(lambda trainer, m: trainer.cancel.set() if pause() else None)
        tr.train()

    return tr, cfg, Stepper("ours", run)


def make_trl(model, adapter, args, tmp, rec):
    """TRL's GRPOTrainer with the matching settings; its train() loop wrapped in a Stepper."""
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from ral_core.data import GroundingTask
    from ral_core.integrations.trl import processor_for
    from ral_core.rewards import exact_match
    from ral_core.trainer import is_vision_param

    n = args.prompts * args.group
    task = GroundingTask(3, 3, kinds=("cell", "row", "where"), split="train", seed=0)  # = our dataset_for(cfg)

    # Our trainer renders each prompt's image once per rollout batch; TRL's dataloader fetches P·G rows per
    # optimizer step (each prompt G times, and again on reuse steps), so cache the renders to keep that cost equal.
    @functools.lru_cache(maxsize=4 * n)
    def sample(i):
        return task.sample(i)

    def rows(batch):
        ss = [sample(int(i)) for i in batch["idx"]]
        return {"prompt": [[{"role": "user", "content": s.question}] for s in ss], "image": [s.image for s in ss],
                "answer": [s.answer for s in ss], "question": [s.question for s in ss]}

    dataset = datasets.Dataset.from_dict({"idx": list(range(args.prompts * 100_000))}).with_transform(rows)

    def exact_match_reward(prompts, completions, answer, question, **kw):
        rec["questions"].append(tuple(question[::args.group]))
        return [exact_match(c[0]["content"].strip(), {"answer": a}) for c, a in zip(completions, answer)]

    for name, p in model.named_parameters():  # = our freeze_vision=true
        p.requires_grad_(not is_vision_param(name))
    cfg = GRPOConfig(
        output_dir=os.path.join(tmp, "trl"), use_cpu=True, bf16=False, fp16=False, seed=0,
        activation_checkpointing=False,  # TRL turns gradient checkpointing on by default; ours has none
        per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=args.updates, num_generations=args.group, max_completion_length=args.new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2,
        loss_type=LOSS_MAP[args.loss], scale_rewards="group",
        # the structural tokens our sampler never emits (TRL suppresses only the image token by default)
        generation_kwargs={"suppress_tokens": adapter.suppress_token_ids},
        shuffle_dataset=False, max_steps=1_000_000, report_to=[], save_strategy="no", eval_strategy="no",
        logging_steps=10**9, disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
    )
    assert not cfg.gradient_checkpointing and cfg.steps_per_generation == 1 and cfg.generation_batch_size == n

    class StepRecorder(TrainerCallback):
        trainer = None

        def on_step_end(self, a, state, control, **kw):
            m = self.trainer._metrics["train"]
            rec["steps"].append({"gens": len(m["reward"]), "reward": m["reward"][-1] if m["reward"] else float("nan"),
                                 "resp_len": (m["completions/mean_length"][-1] if m["completions/mean_length"]
                                              else float("nan"))})
            return control

    recorder = StepRecorder()
    tr = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=cfg, train_dataset=dataset,
                     processing_class=processor_for(adapter), callbacks=[recorder])
    recorder.trainer = tr
    for cb in (PrinterCallback, ProgressCallback):  # no printing at the end of train()
        tr.remove_callback(cb)

    class Gate(TrainerCallback):
        pause = None

        def on_step_end(self, a, state, control, **kw):
            if self.pause():
                control.should_training_stop = True
            return control

    gate = Gate()
    tr.add_callback(gate)

    def run(pause):
        gate.pause = pause
        tr.train()

    return tr, cfg, Stepper("TRL", run)


def check_prompts(trl_trainer, adapter, samples, group) -> str:
    """TRL's tokenised generation prompts and pixels against our adapter's build_inputs for the same samples."""
    from trl.data_utils import prepare_multimodal_messages
    try:
        prompts = [prepare_multimodal_messages([{"role": "user", "content": s.question}], images=[s.image])
                   for s in samples for _ in range(group)]
        ids, _, mm = trl_trainer._tokenize_prompts(prompts)
        ours = adapter.build_inputs([s.image for s in samples for _ in range(group)],
                                    [s.question for s in samples for _ in range(group)])["model_inputs"]
        same_ids = all(list(map(int, a)) == b[m.bool()].tolist()
                       for a, b, m in zip(ids, ours["input_ids"], ours["attention_mask"]))
        pv = torch.as_tensor(mm["pixel_values"]) if "pixel_values" in mm else None
        same_px = pv is not None and torch.equal(pv.to(ours["pixel_values"].dtype), ours["pixel_values"])
    except Exception as e:  # private TRL API: report instead of failing the run
        return f"not checked ({type(e).__name__}: {e})"
    if not (same_ids and same_px):
        raise AssertionError(f"TRL's prompts differ from ours (token ids equal: {same_ids}, pixels equal: {same_px})")
    return (f"identical ({len(ids)} prompts: {min(map(len, ids))}–{max(map(len, ids))} tokens each, "
            "pixel values equal)")


# ------------------------------------------------------------------------------------------------ measuring

def measure(args) -> dict:
    from ral_core.models import load_adapter
    from ral_core.models.base import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise SystemExit("trl_bench: the embedded default model is missing (assets/default_model); run "
                         "`make default-model` first")
    base = load_adapter("default", device="cpu")
    # one copy each, made before our Trainer switches its copy to the capture attention function
    trl_model = copy.deepcopy(base.model)
    ours_adapter = copy.deepcopy(base)
    n = args.prompts * args.group
    rec_ours, rec_trl = [], {"steps": [], "questions": []}
    res = {"n": n}
    with tempfile.TemporaryDirectory() as tmp:
        ours_tr, ours_cfg, ours = make_ours(ours_adapter, args, tmp, rec_ours)
        trl_tr, trl_cfg, trl_s = make_trl(trl_model, base, args, tmp, rec_trl)
        res["ours_cfg"], res["trl_cfg"] = ours_cfg, trl_cfg
        res["trainable"] = (n_trainable(ours_tr.acc.unwrap_model(ours_tr.model)), n_trainable(trl_model))
        res["params"] = sum(p.numel() for p in base.model.parameters())
        assert res["trainable"][0] == res["trainable"][1], f"trainable parameters differ: {res['trainable']}"
        first = [_Sample(ours_tr.data.sample(i)) for i in range(args.prompts)]  # our step-0 prompts
        res["prompt_check"] = check_prompts(trl_tr, base, first, args.group)
        log(f"prompts: {res['prompt_check']}")
        res["gen_config"] = trl_tr.generation_config.to_diff_dict()

        def trl_cycle():
            """U optimizer steps = one rollout batch; the first must generate, the others must reuse it."""
            out = []
            for k in range(args.updates):
                before = len(rec_trl["steps"]) and rec_trl["steps"][-1]["gens"]
                w, c = trl_s.step()
                gens = rec_trl["steps"][-1]["gens"] - before
                if gens != (1 if k == 0 else 0):
                    raise RuntimeError(f"TRL step {k} of a rollout batch generated {gens} times: steps and "
                                       "generations are out of step")
                out.append((w, c))
            return out

        fns = {"ours": lambda: [ours.step()], "trl": trl_cycle}
        timings = {"ours": [], "trl": []}
        try:
            t_warm = time.perf_counter()
            for r in range(args.warmup):
                for name in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                    fns[name]()
            log(f"warm-up ({args.warmup} rollout batches each) took {time.perf_counter() - t_warm:.0f} s")
            t0 = time.perf_counter()
            for r in range(args.repeats):
                # ABBA…: alternate which trainer goes first so neither always follows the other
                for name in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                    timings[name].append(fns[name]())
                if r + 1 >= args.min_repeats and time.perf_counter() - t0 > args.budget:
                    break
            res["measure_s"] = time.perf_counter() - t0
        finally:
            ours.close()
            trl_s.close()
        res["threads"] = {"ours": sorted(ours.threads_seen), "trl": sorted(trl_s.threads_seen)}

    k = len(timings["ours"])
    res["rounds"] = k
    # records of the timed rounds only (the warm-up ones come first)
    ro = rec_ours[args.warmup:args.warmup + k]
    tq = rec_trl["questions"][args.warmup:args.warmup + k]
    ts = rec_trl["steps"][args.warmup * args.updates:(args.warmup + k) * args.updates]
    res["same_prompts"] = [o["questions"] for o in ro] == tq
    assert all(o["updates"] == args.updates for o in ro)
    ours_w = [t[0][0] for t in timings["ours"]]
    ours_c = [t[0][1] for t in timings["ours"]]
    trl_w = [sum(s[0] for s in t) for t in timings["trl"]]
    trl_c = [sum(s[1] for s in t) for t in timings["trl"]]
    U = args.updates
    res["ours"] = _side(ours_w, ours_c, U, n)
    res["trl"] = _side(trl_w, trl_c, U, n)
    res["ours"].update(rollout_wall=C.median([o["rollout_wall"] for o in ro]),
                       resp_len=_mean([o["resp_len"] for o in ro]), reward=_mean([o["reward"] for o in ro]))
    gen = [t[0] for t in timings["trl"]]
    reuse = [s for t in timings["trl"] for s in t[1:]]
    res["trl"].update(gen_wall=C.median([g[0] for g in gen]), gen_cpu=C.median([g[1] for g in gen]),
                      reuse_wall=C.median([s[0] for s in reuse]) if reuse else float("nan"),
                      reuse_cpu=C.median([s[1] for s in reuse]) if reuse else float("nan"),
                      resp_len=_mean([s["resp_len"] for s in ts[::U]]), reward=_mean([s["reward"] for s in ts[::U]]))
    res["per_round"] = [{"ow": ow, "oc": oc, "tw": tw, "tc": tc, "olen": o["resp_len"], "tlen": s["resp_len"]}
                        for ow, oc, tw, tc, o, s in zip(ours_w, ours_c, trl_w, trl_c, ro, ts[::U])]
    res["ratio_wall"] = res["ours"]["wall"] / res["trl"]["wall"]
    res["ratio_cpu"] = res["ours"]["cpu"] / res["trl"]["cpu"]
    res["ratio_pair_cpu"] = C.median([a / b for a, b in zip(ours_c, trl_c) if b > 0])
    res["ratio_pair_wall"] = C.median([a / b for a, b in zip(ours_w, trl_w) if b > 0])
    # image preprocessing of one rollout batch: ours runs it once per batch, TRL twice (see report)
    imgs = [_Sample(ours_tr.data.sample(i)).image for i in range(args.prompts) for _ in range(args.group)]
    res["img_proc_ms"] = 1e3 * C.median([_timed(lambda: base.process_images(imgs)) for _ in range(5)])
    return res


class _Sample:
    """Attribute access to our dataset's sample dicts (the shape GroundingTask.sample returns)."""

    def __init__(self, d):
        self.image, self.question, self.answer = d["image"], d["question"], d["answer"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _side(wall, cpu, updates, n) -> dict:
    """Per rollout batch medians → per optimizer step and rollouts/s."""
    w, c = C.median(wall), C.median(cpu)
    return {"wall": w, "cpu": c, "step_wall": w / updates, "step_cpu": c / updates, "rps_wall": n / w,
            "rps_cpu": n / c, "cpu_wall": C.median([b / a for a, b in zip(wall, cpu) if a > 0]), "n": len(wall)}


# ------------------------------------------------------------------------------------------------ report

def report(res, meta, versions, command, args, total_s, busy_before, busy_after) -> str:
    o, t = res["ours"], res["trl"]
    n, U = res["n"], args.updates
    faster = "ours" if res["ratio_cpu"] < 1 else "TRL"
    factor = 1 / res["ratio_cpu"] if res["ratio_cpu"] < 1 else res["ratio_cpu"]
    L = ["# Our GRPO trainer vs TRL GRPOTrainer (CPU)\n"]
    L.append(f"Command: `{command}`  ")
    L.append(f"Date: {meta['date']} · machine: {C.machine_line({**meta, **versions})}, datasets "
             f"{versions['datasets']} · one torch thread "
             f"(seen at step ends: ours {res['threads']['ours']}, TRL {res['threads']['trl']}) · fp32 · "
             f"total run {total_s / 60:.1f} min\n")
    L.append(f"Model: embedded default (assets/default_model), Qwen2-VL, {res['params'] / 1e6:.2f}M params, full "
             f"fine-tuning of the language model ({res['trainable'][0] / 1e6:.2f}M trainable on both sides; vision "
             f"tower and merger frozen on both). Task: bundled grounding task (3×3 digit grids, cell/row/where, "
             f"with images), exact-match reward. Rollout batch: {args.prompts} prompts × {args.group} = {n} "
             f"completions, ≤ {args.new_tokens} new tokens, temperature 1.0, then {U} optimizer updates on the "
             f"whole batch. Prompts fed to the model: {res['prompt_check']}; same prompts in the same order in "
             f"every timed round: {'yes' if res['same_prompts'] else 'NO'}.\n")

    L.append(f"## Main table (medians over {res['rounds']} interleaved rounds, after {args.warmup} untimed rollout "
             f"batch{'es' if args.warmup != 1 else ''} per trainer)\n")
    L.append(f"| trainer | s / optimizer step | s / rollout batch ({U} updates) | rollouts (completions) / s | "
             "mean completion tokens | mean reward | CPU/wall |")
    L.append("|---|---|---|---|---|---|---|")
    for name, s in (("ours (`ral_core.trainer.Trainer`)", o), (f"TRL `GRPOTrainer` {versions['trl']}", t)):
        L.append(f"| {name} | {s['step_wall']:.3f} ({s['step_cpu']:.3f}) | {s['wall']:.3f} ({s['cpu']:.3f}) | "
                 f"{s['rps_wall']:.1f} ({s['rps_cpu']:.1f}) | {s['resp_len']:.1f} | {s['reward']:.2f} | "
                 f"{s['cpu_wall']:.2f} |")
    L.append(f"| **ratio ours / TRL** (time per step; < 1 = ours faster) | **{res['ratio_cpu']:.3f}×** CPU · "
             f"{res['ratio_wall']:.3f}× wall | median of per-round ratios: {res['ratio_pair_cpu']:.3f}× CPU · "
             f"{res['ratio_pair_wall']:.3f}× wall | | | | |")
    L.append(f"\nSeconds are wall-clock medians with the median process CPU time in brackets; rollouts/s = {n} / "
             "median wall time per rollout batch (in brackets on CPU time: what one uncontended core would give). "
             f"A rollout batch is one step of our `train()` loop and {U} optimizer steps of TRL's (the first "
             "generates), each timed from the end of the previous step to the end of this one, so the loop's own "
             f"bookkeeping is included on both sides. On CPU time, **{faster} is {factor:.2f}× faster** per "
             "optimizer step in this run.\n")

    L.append("## Where the time goes (wall medians, approximate split)\n")
    ours_upd = (o["wall"] - o["rollout_wall"]) / U
    trl_roll = t["gen_wall"] - t["reuse_wall"] if U > 1 else float("nan")
    L.append("| | ours | TRL |")
    L.append("|---|---|---|")
    L.append(f"| rollout phase (image preprocessing, generate, rewards, advantages, old log-prob pass) | "
             f"{o['rollout_wall']:.3f} s (measured inside `train_step`) | "
             + (f"{trl_roll:.3f} s (generating step − reusing step) |" if U > 1 else "n/a (one update per batch) |"))
    L.append(f"| one optimizer update on {n} sequences (forward, backward, clip, AdamW) plus loop overhead | "
             f"{ours_upd:.3f} s (rest of the step / {U}) | "
             + (f"{t['reuse_wall']:.3f} s (a reusing step) |" if U > 1 else "n/a |"))
    if U > 1:
        L.append(f"| TRL step that generates / that reuses the batch | — | {t['gen_wall']:.3f} s ({t['gen_cpu']:.3f} "
                 f"CPU) / {t['reuse_wall']:.3f} s ({t['reuse_cpu']:.3f} CPU) |")
    L.append(f"\nFor scale: preprocessing the {n} images of one rollout batch (`Qwen2VLImageProcessorPil`) takes "
             f"{res['img_proc_ms']:.0f} ms here.\n")

    pr = res["per_round"]
    q = sorted(r["oc"] / r["tc"] for r in pr)
    L.append(f"Spread: the per-round CPU-time ratio ours / TRL ranged {q[0]:.3f}–{q[-1]:.3f} (quartiles "
             f"{q[len(q) // 4]:.3f} / {q[(3 * len(q)) // 4]:.3f}); ours took less CPU time than TRL in "
             f"{sum(x < 1 for x in q)} of {len(q)} rounds.\n")
    L.append("<details><summary>Per round, in run order: wall s (CPU s) and mean completion tokens</summary>\n")
    L.append("| round | first | ours | TRL | ratio ours / TRL (CPU) | tokens ours / TRL |")
    L.append("|---|---|---|---|---|---|")
    for i, r in enumerate(pr):
        L.append(f"| {i + 1} | {'ours' if i % 2 == 0 else 'TRL'} | {r['ow']:.3f} ({r['oc']:.3f}) | {r['tw']:.3f} "
                 f"({r['tc']:.3f}) | {r['oc'] / r['tc']:.3f} | {r['olen']:.2f} / {r['tlen']:.2f} |")
    L.append("\n</details>\n")

    oc, tc = res["ours_cfg"], res["trl_cfg"]
    L.append("## Settings, side by side\n")
    L.append("| | ours (`build_config(None, …)`) | TRL (`GRPOConfig`) |")
    L.append("|---|---|---|")
    rows = [
        ("model", "`default` (own deep copy)", "same weights (own deep copy), `processing_class` = Qwen2VLProcessor "
         "from our tokenizer + image processor, chat template = our prompt"),
        ("precision / device", "fp32, `device=cpu`, `threads=1`", "fp32: `bf16=False` (TRL's default is True), "
         "`use_cpu=True`"),
        ("trained parameters", "`lora_r=0`, `freeze_vision=true`", "no `peft_config`; vision params set "
         "`requires_grad=False` before the trainer is built"),
        ("prompts × completions", f"`prompts_per_step={oc.prompts_per_step}`, `group_size={oc.group_size}`",
         f"`per_device_train_batch_size={tc.per_device_train_batch_size}`, `num_generations={tc.num_generations}`, "
         f"`generation_batch_size={tc.generation_batch_size}`"),
        ("updates per rollout batch", f"`epochs={oc.epochs}`, `minibatch_size={oc.minibatch_size}` → "
         f"{oc.updates_per_step}", f"`num_iterations={tc.num_iterations}`, `steps_per_generation="
         f"{tc.steps_per_generation}`, `gradient_accumulation_steps={tc.gradient_accumulation_steps}` → "
         f"{tc.num_iterations * tc.steps_per_generation}"),
        ("sampling", f"`max_new_tokens={oc.max_new_tokens}`, `temperature={oc.temperature}`, `top_p={oc.top_p}`, "
         "top_k 0, structural tokens suppressed", f"`max_completion_length={tc.max_completion_length}`, "
         f"`temperature={tc.temperature}`, `top_p={tc.top_p}`, `top_k={tc.top_k}`, `generation_kwargs="
         f"{{suppress_tokens: {res['gen_config'].get('suppress_tokens')}}}`"),
        ("optimizer", f"AdamW `lr={oc.lr}`, `weight_decay={oc.weight_decay}`, `schedule={oc.schedule}`, "
         f"`max_grad_norm={oc.max_grad_norm}`", f"`optim={tc.optim.value if hasattr(tc.optim, 'value') else tc.optim}`"
         f", `learning_rate={tc.learning_rate}`, `weight_decay={tc.weight_decay}`, `lr_scheduler_type="
         f"{getattr(tc.lr_scheduler_type, 'value', tc.lr_scheduler_type)}`, `max_grad_norm={tc.max_grad_norm}`"),
        ("loss", f"`loss_norm={oc.loss_norm}`, `clip_low/high={oc.clip_low}/{oc.clip_high}`, `beta={oc.beta}`, "
         f"`advantage_scale={oc.advantage_scale}`", f"`loss_type={tc.loss_type}`, `epsilon={tc.epsilon}`, "
         f"`beta={tc.beta}`, `scale_rewards={tc.scale_rewards}`"),
        ("overheads off", "`log_attention=false`, `attn_metrics_every=0`, `save_every=0`, `snapshot_every=0`, "
         "`eval_every=0`, no TensorBoard", "`report_to=[]`, `save_strategy=no`, `eval_strategy=no`, "
         "`logging_steps=1e9`, `disable_tqdm`, `log_completions=False`, `activation_checkpointing=False` (TRL "
         "turns gradient checkpointing on by default)"),
        ("data order", f"prompts `{args.prompts}k … {args.prompts}k+{args.prompts - 1}` of the train split at step k",
         "`shuffle_dataset=False` over the same split: the same prompts in the same rollout batch"),
    ]
    L += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    L.append("")
    d = [abs(r["olen"] - r["tlen"]) for r in res["per_round"]]
    lengths = (f"Their mean completion lengths were equal in {sum(x < 1e-6 for x in d)} of {len(d)} rounds and "
               f"never more than {max(d):.2f} tokens apart (on this task the answer's length is set by the question "
               "kind: one digit or `row r column c`), so both sides processed practically the same number of "
               "tokens.")
    oldlp = ("one extra no-grad forward per rollout batch for the old log-probs (ours always; TRL because "
             "`num_iterations` > 1)" if U > 1 else "the old log-probs (ours from one extra no-grad forward; TRL, "
             "with one update per batch, skips that forward and uses the detached current ones: not matched)")
    L.append(NOTES.format(n=n, U=U, lengths=lengths, oldlp=oldlp))

    worst = min(o["cpu_wall"], t["cpu_wall"])
    L += C.contention_section(meta, worst, busy_before, busy_after,
                              f"Median CPU/wall per rollout batch: ours {o['cpu_wall']:.2f}, TRL {t['cpu_wall']:.2f}; "
                              "lower of the two")
    return "\n".join(L) + "\n"


NOTES = """## What is and isn't comparable

Matched: the weights, the trained parameters, the prompt tokens and pixels fed to `generate` (checked above), the
sampling settings and the tokens that may be sampled, the number of completions and of optimizer updates per
rollout batch, each update on the whole batch of {n}, the clipped-ratio objective with group-normalised advantages
((r − mean) / (std + 1e-4), 0 for zero-variance groups on both), the token-level normaliser (our `token` divides by
the completion tokens of the mini-batch; TRL's `dapo` by those of the generation batch, the same {n} sequences
here), no KL term and no reference model (β = 0 on both), AdamW (torch, non-fused) with a constant learning rate
and clipping at norm 1, {oldlp}, and no logging, saving or evaluation on either side.

Not the same, and part of what is measured:

- **Completions.** Each trainer samples its own completions from its own copy of the weights (which drift apart
  after the first update), so the texts and rewards differ per round; the prompts are the same. {lengths}
- **Log-probs.** Ours runs the LM head on the completion positions only (`logits_to_keep = T + 1`) and takes a
  log-softmax. TRL 1.16 patches the model with its fused LM head, which on CPU (no Triton) projects every position
  of the sequence, prompt included, in chunks, and also computes the per-token entropy in every training forward
  (for its `entropy` metric); ours computes no entropy.
- **Image preprocessing.** Ours preprocesses the {n} images once per rollout batch and reuses the tensors for
  generation, the old-log-prob pass and the updates. TRL runs the processor twice per rollout batch (once inside
  `apply_chat_template` for generation, once more for the forward passes).
- **Data loading.** TRL's `Trainer` fetches and collates {n} dataset rows per optimizer step through `datasets`
  and its `RepeatSampler`, also on the steps that reuse the batch; ours takes the prompts from the task directly.
  Image rendering is cached on the TRL side so both render each prompt's image once per rollout batch.
- **Bookkeeping.** TRL always gathers prompts, completions, images and advantages into its completion logs, and
  computes its metrics (entropy, clip ratios, reward statistics; several `.item()` calls) every step even when it
  never logs them. Ours computes `clip_frac` and `ratio_mean` per mini-batch and writes one `metrics.jsonl` line
  per step.
- **Generation.** Both call `model.generate` of the same transformers with the same sampling settings. TRL passes
  a `GenerationConfig` (`disable_compile=True`) inside its `unwrap_model_for_generation` context; ours passes the
  arguments directly and runs under our attention-capture context (with nothing captured it calls the same SDPA
  kernel). In a Qwen2-VL `generate`, the vision tower runs once per call on both sides.
- **One loss variant only.** Other settings (LoRA, β > 0, mini-batches smaller than the batch, `dr_grpo`, whose
  constant differs: ours N·T_batch_max, TRL N·`max_completion_length`) were not measured.
"""


# ------------------------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown report path (default: print only)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (2 prompts × 4, 1 warm-up, 2 rounds); prints")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (TRL num_generations)")
    ap.add_argument("--new-tokens", type=int, default=12, help="max new tokens (TRL max_completion_length)")
    ap.add_argument("--updates", type=int, default=2, help="optimizer updates per rollout batch, each on the whole "
                    "batch (ours epochs, TRL num_iterations)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--loss", choices=sorted(LOSS_MAP), default="token", help="our loss_norm (TRL loss_type: "
                    + ", ".join(f"{k}→{v}" for k, v in LOSS_MAP.items()) + ")")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rollout batches per trainer first")
    ap.add_argument("--repeats", type=int, default=40, help="max interleaved rounds (one rollout batch each side)")
    ap.add_argument("--min-repeats", type=int, default=8)
    ap.add_argument("--budget", type=float, default=150.0, help="s of timed rounds before stopping early")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.group, args.warmup, args.repeats, args.min_repeats = 2, 4, 1, 2, 2
    if args.updates < 1 or args.prompts < 1 or args.group < 2:
        ap.error("need --updates ≥ 1, --prompts ≥ 1, --group ≥ 2")
    trl = require_trl()
    import accelerate
    import datasets

    # noise from the libraries that says nothing about this run
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TRL.*experimental.*")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    prefix = "make bench-trl → " if os.environ.get("MAKELEVEL") else "HF_HUB_OFFLINE=1 "
    command = prefix + ".venv/bin/python bench/trl_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = C.machine_info()
    versions = {"trl": trl.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    busy_before = C.busy_processes(exclude={os.getpid()})
    t0 = time.perf_counter()
    res = measure(args)
    busy_after = C.busy_processes(exclude={os.getpid()})
    o, t = res["ours"], res["trl"]
    log(f"ours {o['step_wall']:.3f} s/step ({o['rps_wall']:.1f} rollouts/s), TRL {t['step_wall']:.3f} s/step "
        f"({t['rps_wall']:.1f} rollouts/s); ratio ours/TRL {res['ratio_cpu']:.3f} CPU, {res['ratio_wall']:.3f} wall, "
        f"n={res['rounds']}")
    md = report(res, meta, versions, command, args, time.perf_counter() - t0, busy_before, busy_after)
    C.write_report(md, args.out, args.quick, log)
    if not res["same_prompts"] or math.isnan(res["ratio_cpu"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
