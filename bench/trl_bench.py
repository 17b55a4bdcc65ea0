"""Benchmark: our GRPO trainer next to TRL's GRPOTrainer, same model, same prompts, same settings (CPU).

    make bench-trl                                                      # installs trl==1.16.0 into .venv, then
    .venv/bin/python bench/trl_bench.py --out bench/results/trl.md    # both: ≈ 5 min + ≈ 45 CPU-min, ~10 GiB RAM
    .venv/bin/python bench/trl_bench.py --out bench/results/trl.md --settings small    # rerun one, keep the other
    .venv/bin/python bench/trl_bench.py --quick --settings small        # smoke run, prints the report

TRL is a benchmark-only dependency: it is not in requirements.txt and nothing under ral_core/ or tests/ imports it.

Two comparisons (`--settings`), each with three rows built from the same weights: ours with its defaults (the
vision cache and the shared prompt on), TRL, and ours with that sharing off (`vision_cache=false
share_prompt=false`), so the report says what the sharing buys and what the rest of our trainer does:
  small  the embedded default model (assets/default_model, a 0.88M-param Qwen2-VL), full fine-tuning of the
         language model, the bundled grounding task, 8 prompts × 8, 12 new tokens;
  real   the Qwen2-VL-2B shape twin at its published width cut to --real-layers decoder layers and vision blocks
         (bench/step_bench.py's cut and 1024×768 photo), LoRA r 8 on both sides (TRL gets our trainer's own
         LoraConfig), 1 prompt × G 8, 32 new tokens.
Everything in fp32 (a CPU run: TRL's CPU default would autocast to bf16), the vision tower frozen on every row,
exact-match reward. TRL takes the VLM path: a Qwen2VLProcessor built from our tokenizer and image processor (without
its torchvision-only video processor) and a chat template that yields exactly our adapter's prompt tokens (checked).

One rollout batch = P prompts × G completions, then U optimizer updates on the whole batch:
  ours  Trainer.train():       prompts_per_step=P, group_size=G, epochs=U, minibatch_size=P·G
  TRL   GRPOTrainer.train():   per_device_train_batch_size=P·G, num_generations=G, num_iterations=U,
                               steps_per_generation=1, gradient_accumulation_steps=1
so TRL's first optimizer step of each rollout batch generates and its next U−1 steps reuse the batch.

Timing: each trainer's own train() loop runs in a worker thread that pauses at every step boundary (a trainer
callback blocks on a semaphore), so the main thread times one step at a time and the rows take turns in this one
process (only one runs at any moment; the order rotates round by round). One round = one rollout batch on each row:
one `train()` step of ours, U optimizer steps of TRL. All rows see the same prompts in the same order (TRL's
`shuffle_dataset=False`; checked). Wall time and process CPU time are recorded; with one torch thread, CPU/wall well
below 1 means another process was taking the core, so ratios are taken on CPU time, round by round. The comparisons
are kept in a .json beside the report (bench/results/trl.json for the committed one); the report is written from it.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import shlex
import sys
import tempfile
import threading
import time
import warnings
from types import SimpleNamespace

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


# ------------------------------------------------------------------------------------------------ settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(ROOT, "bench", "results", "trl.md")
TOK_CACHE = os.path.join(ROOT, "bench", "_work", "real", "tokenizers")  # the twins' tokenizers (as real_bench)
ROWS = ("ours", "trl", "off")  # the order of the first round; later rounds rotate it


def settings(args) -> dict[str, SimpleNamespace]:
    """The two comparisons: `small` (the embedded default model, full fine-tuning of its language model) and `real`
    (the Qwen2-VL-2B twin at its published width cut in depth, LoRA, one photo × G, as bench/step_bench.py)."""
    small = SimpleNamespace(
        key="small", model="default", layers=None, prompts=args.prompts, group=args.group,
        new_tokens=args.new_tokens, updates=args.updates, lr=args.lr, lora_r=0, loss=args.loss, dataset="grounding",
        warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats, budget=args.budget, timeout=600.0,
        order_offset=args.order_offset)
    real = SimpleNamespace(
        key="real", model="twin", layers=args.real_layers, prompts=1, group=8, new_tokens=32, updates=2, lr=1e-4,
        lora_r=8, loss=args.loss, dataset=None, warmup=args.real_warmup, repeats=args.real_rounds,
        min_repeats=args.real_rounds, budget=math.inf, timeout=3600.0, order_offset=args.order_offset)
    if args.quick:
        small.prompts, small.group, small.warmup, small.repeats, small.min_repeats = 2, 4, 1, 2, 2
        real.warmup, real.repeats, real.min_repeats = 0, 1, 1
    return {"small": small, "real": real}


def load_base(S, tmp):
    """The setting's adapter (the weights every side copies) and, for the twin, the photo dataset's path."""
    from ral_core.models import load_adapter
    from ral_core.models.base import DEFAULT_MODEL_DIR

    if S.model == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise SystemExit("trl_bench: the embedded default model is missing (assets/default_model); run "
                             "`make default-model` first")
        return load_adapter("default", device="cpu")
    from step_bench import photo_dataset  # the same 1024×768 photo and question as the step benchmark
    from ral_core.builders.twins import build_twin

    S.dataset = photo_dataset(tmp)
    return build_twin("qwen2_vl_2b", text_layers=S.layers, vision_depth=S.layers, seed=0, tokenizer_cache=TOK_CACHE)


# ------------------------------------------------------------------------------------------------ setup

def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_ours(adapter, S, tmp, rec, share: bool, name: str):
    """Our Trainer with the benchmark settings (`share`: our defaults, else the vision cache and the shared prompt
    off); its train() loop wrapped in a Stepper."""
    from ral_core.config import build_config
    from ral_core.trainer import Trainer

    n = S.prompts * S.group
    cfg = build_config(None, {
        "model": S.model, "dataset": S.dataset, "device": "cpu", "threads": 1, "seed": 0, "steps": 100_000,
        "precision": "fp32", "output_dir": os.path.join(tmp, name), "prompts_per_step": S.prompts,
        "group_size": S.group, "max_new_tokens": S.new_tokens, "temperature": 1.0, "top_p": 1.0, "lr": S.lr,
        "schedule": "constant", "epochs": S.updates, "minibatch_size": n, "grad_accum": 1,
        "loss_norm": S.loss, "beta": 0.0, "lora_r": S.lora_r, "freeze_vision": True, "max_grad_norm": 1.0,
        "clip_low": 0.2, "clip_high": 0.2, "weight_decay": 0.0, "advantage_scale": "std",
        "save_every": 0, "snapshot_every": 0, "eval_every": 0, "log_tensorboard": False,
        # plain GRPO: no attention capture, no attention metrics pass
        "log_attention": False, "attn_metrics_every": 0, "lambda_attn": 0.0,
        "vision_cache": share, "share_prompt": "auto" if share else "false",
    })
    assert cfg.updates_per_step == S.updates
    tr = Trainer(cfg, adapter=adapter)
    assert tr.spec is None and tr.ref_model is None
    assert bool(tr.vision_cache) == share, f"{name}: vision cache {tr.vision_cache}, wanted {share}"

    def cb(trainer, m):
        ro = trainer.last_rollouts
        rec.append({"rollout_wall": m["rollout_time"], "resp_len": m["response_len"], "reward": m["reward"],
                    "updates": m["updates"], "questions": tuple(s["question"] for s in ro.samples)})

    def run(pause):
        tr.callbacks.append(cb)
        tr.callbacks.append(lambda trainer, m: trainer.cancel.set() if pause() else None)
        tr.train()

    return tr, cfg, Stepper(name, run)


def make_trl(model, adapter, S, tmp, rec, peft_config=None):
    """TRL's GRPOTrainer with the matching settings; its train() loop wrapped in a Stepper."""
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from ral_core.config import build_config
    from ral_core.data.sources import dataset_for
    from ral_core.integrations.trl import processor_for
    from ral_core.rewards import exact_match
    from ral_core.trainer import is_vision_param

    n = S.prompts * S.group
    src = dataset_for(build_config(None, {"dataset": S.dataset}))  # = our trainer's dataset

    # Our trainer renders (or reads) each prompt's image once per rollout batch; TRL's dataloader fetches P·G rows
    # per optimizer step (each prompt G times, and again on reuse steps), so cache the images to keep that cost equal.
    @functools.lru_cache(maxsize=4 * n)
    def sample(i):
        return src.sample(i)

    def rows(batch):
        ss = [sample(int(i)) for i in batch["idx"]]
        return {"prompt": [[{"role": "user", "content": s["question"]}] for s in ss],
                "image": [s["image"] for s in ss], "answer": [s["answer"] for s in ss],
                "question": [s["question"] for s in ss]}

    dataset = datasets.Dataset.from_dict({"idx": list(range(S.prompts * 100_000))}).with_transform(rows)

    def exact_match_reward(prompts, completions, answer, question, **kw):
        rec["questions"].append(tuple(question[::S.group]))
        return [exact_match(c[0]["content"].strip(), {"answer": a}) for c, a in zip(completions, answer)]

    for name, p in model.named_parameters():  # = our freeze_vision=true (with LoRA peft freezes the base anyway)
        p.requires_grad_(not is_vision_param(name))
    cfg = GRPOConfig(
        output_dir=os.path.join(tmp, "trl"), use_cpu=True, bf16=False, fp16=False, seed=0,
        activation_checkpointing=False,  # TRL turns gradient checkpointing on by default; ours has none
        per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=S.updates, num_generations=S.group, max_completion_length=S.new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=S.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2,
        loss_type=LOSS_MAP[S.loss], scale_rewards="group",
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
                     processing_class=processor_for(adapter), callbacks=[recorder], peft_config=peft_config)
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
        prompts = [prepare_multimodal_messages([{"role": "user", "content": s["question"]}], images=[s["image"]])
                   for s in samples for _ in range(group)]
        ids, _, mm = trl_trainer._tokenize_prompts(prompts)
        ours = adapter.build_inputs([s["image"] for s in samples for _ in range(group)],
                                    [s["question"] for s in samples for _ in range(group)])["model_inputs"]
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

def measure(S, save=None) -> dict:
    """One run of one setting: the three rows built from the same weights, then interleaved rollout batches. Returns
    the run's record (JSON-ready: its set-up and one entry per timed round); `save(record)` after every round, so a
    run cut short keeps the rounds it finished."""
    n = S.prompts * S.group
    rec = {"ours": [], "off": [], "trl": {"steps": [], "questions": []}}
    res = {"n": n, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": C.loadavg(),
           "busy_before": C.busy_processes(exclude={os.getpid()}), "rounds": [], "planned": S.repeats}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(S, tmp)
        res["params"] = sum(p.numel() for p in base.model.parameters())
        text_cfg = base.model.config.get_text_config()
        res["hidden"], res["vocab"] = text_cfg.hidden_size, text_cfg.vocab_size
        res["img_processor"] = type(base.image_processor).__name__
        # our two copies are made before our Trainers switch them to the capture attention function; TRL trains
        # `base.model` itself (peft injects its adapters in place), `base` keeps the processor for the checks
        ours_ad, off_ad = copy.deepcopy(base), copy.deepcopy(base)
        ours_tr, ours_cfg, ours = make_ours(ours_ad, S, tmp, rec["ours"], True, "ours")
        off_tr, _, off = make_ours(off_ad, S, tmp, rec["off"], False, "ours-off")
        peft = None
        if S.lora_r:  # the very LoRA config our trainer built: same rank, alpha, dropout, target modules
            peft = copy.deepcopy(ours_tr.acc.unwrap_model(ours_tr.model).peft_config["default"])
            res["lora_targets"] = sorted({t.split(".")[-1] for t in peft.target_modules})
            res["lora_n_targets"] = len(peft.target_modules)
        trl_tr, trl_cfg, trl_s = make_trl(base.model, base, S, tmp, rec["trl"], peft)
        trained = {"ours": ours_tr.acc.unwrap_model(ours_tr.model), "off": off_tr.acc.unwrap_model(off_tr.model),
                   "trl": trl_tr.model}
        res["trainable"] = {k: n_trainable(m) for k, m in trained.items()}
        assert len(set(res["trainable"].values())) == 1, f"trainable parameters differ: {res['trainable']}"
        res["sharing"] = {"ours": [bool(ours_tr.vision_cache), str(ours_tr.share_prompt)],
                          "off": [bool(off_tr.vision_cache), str(off_tr.share_prompt)]}
        first = [ours_tr.data.sample(i) for i in range(S.prompts)]  # our step-0 prompts
        res["prompt_check"] = check_prompts(trl_tr, base, first, S.group)
        log(f"{S.key}: prompts {res['prompt_check']}")
        res["prompt_tokens"] = int(base.build_inputs([first[0]["image"]], [first[0]["question"]])
                                   ["model_inputs"]["input_ids"].shape[1])
        res["settings_rows"] = settings_rows(S, ours_cfg, trl_cfg, trl_tr.generation_config.to_diff_dict())
        # image preprocessing: TRL runs the processor on all n copies twice per rollout batch; ours, each distinct
        # image once (build_inputs)
        imgs = [s["image"] for s in first for _ in range(S.group)]
        res["img_proc_ms"] = 1e3 * C.median([_timed(lambda: base.process_images(imgs)) for _ in range(3)])
        res["img_distinct_ms"] = 1e3 * C.median([_timed(lambda: base.process_images([s["image"] for s in first]))
                                                 for _ in range(3)])
        del base

        def trl_cycle():
            """U optimizer steps = one rollout batch; the first must generate, the others must reuse it."""
            out = []
            for k in range(S.updates):
                before = len(rec["trl"]["steps"]) and rec["trl"]["steps"][-1]["gens"]
                w, c = trl_s.step(S.timeout)
                gens = rec["trl"]["steps"][-1]["gens"] - before
                if gens != (1 if k == 0 else 0):
                    raise RuntimeError(f"TRL step {k} of a rollout batch generated {gens} times: steps and "
                                       "generations are out of step")
                out.append((w, c))
            return out

        fns = {"ours": lambda: [ours.step(S.timeout)], "off": lambda: [off.step(S.timeout)], "trl": trl_cycle}
        U, W = S.updates, S.warmup
        try:
            t_warm = time.perf_counter()
            for r in range(W):
                for name in _order(r):
                    fns[name]()
            log(f"{S.key}: warm-up ({W} rollout batches each) took {time.perf_counter() - t_warm:.0f} s")
            t0 = time.perf_counter()
            for r in range(S.repeats):
                # the order rotates (ours TRL off, TRL off ours, off ours TRL, …) so that each row takes each
                # place in turn and contention that comes and goes hits all rows alike
                order, t = _order(r + S.order_offset), {}
                for name in order:
                    t[name] = fns[name]()
                    log(f"{S.key} round {r + 1} {name}: {sum(x[0] for x in t[name]):.1f} s wall, "
                        f"{sum(x[1] for x in t[name]):.1f} s CPU, load {C.loadavg()}")
                # this round's records (the warm-up ones come first)
                o, f = rec["ours"][W + r], rec["off"][W + r]
                steps = rec["trl"]["steps"][(W + r) * U:(W + r + 1) * U]
                assert o["updates"] == U and f["updates"] == U
                res["rounds"].append({
                    "order": list(order), "load": C.loadavg(),
                    "cpu": {k: sum(x[1] for x in t[k]) for k in ROWS},
                    "wall": {k: sum(x[0] for x in t[k]) for k in ROWS},
                    "trl_steps": [list(x) for x in t["trl"]],  # (wall, CPU) of the generating step, then reuses
                    "rollout_wall": {"ours": o["rollout_wall"], "off": f["rollout_wall"]},
                    "len": {"ours": o["resp_len"], "off": f["resp_len"], "trl": steps[0]["resp_len"]},
                    "reward": {"ours": o["reward"], "off": f["reward"], "trl": steps[0]["reward"]},
                    "same_prompts": o["questions"] == f["questions"] == rec["trl"]["questions"][W + r]})
                res["threads"] = {"ours": sorted(ours.threads_seen), "off": sorted(off.threads_seen),
                                  "trl": sorted(trl_s.threads_seen)}
                res.update(load_end=C.loadavg(), total_s=time.perf_counter() - t_all)
                if save is not None:
                    save(res)
                if r + 1 >= S.min_repeats and time.perf_counter() - t0 > S.budget:
                    break
        finally:
            for s_ in (ours, off, trl_s):
                s_.close()
    res["busy_after"] = C.busy_processes(exclude={os.getpid()})
    res.update(load_end=C.loadavg(), total_s=time.perf_counter() - t_all)
    return res


def summarise(runs: list[dict]) -> dict:
    """The figures of one setting from its runs' records (the rounds of all runs, in run order): medians per row,
    per-round ratios with their spread."""
    first = runs[0]
    rounds = [r for run in runs for r in run["rounds"]]
    res = {k: v for k, v in first.items() if k != "rounds"}
    n, U = first["n"], first["updates"]
    cpu = {k: [r["cpu"][k] for r in rounds] for k in ROWS}
    wall = {k: [r["wall"][k] for r in rounds] for k in ROWS}
    res.update(rounds=len(rounds), cpu=cpu, wall=wall, orders=[r["order"] for r in rounds],
               same_prompts=all(r["same_prompts"] for r in rounds), n_runs=len(runs),
               run_of=[i for i, run in enumerate(runs) for _ in run["rounds"]],
               argvs=[_without_note(run.get("argv", "")) for run in runs],
               notes=[f"(run {i + 1}) {run['note']}" for i, run in enumerate(runs) if run.get("note")],
               runs_text="; ".join(f"{run['date']}, {len(run['rounds'])} round(s), load {run['load_start']} → "
                                   f"{run['load_end']}, {run['total_s'] / 60:.0f} min" for run in runs),
               total_s=sum(run["total_s"] for run in runs), load_end=runs[-1]["load_end"],
               threads={k: sorted({t for run in runs for t in run.get("threads", {}).get(k, [])}) for k in ROWS})
    res["side"] = {k: _side(wall[k], cpu[k], U, n) for k in ROWS}
    for k in ROWS:
        res["side"][k].update(resp_len=_mean([r["len"][k] for r in rounds]), lens=[r["len"][k] for r in rounds],
                              reward=_mean([r["reward"][k] for r in rounds]))
        if k != "trl":
            res["side"][k]["rollout_wall"] = C.median([r["rollout_wall"][k] for r in rounds])
    gen = [r["trl_steps"][0] for r in rounds]
    reuse = [s for r in rounds for s in r["trl_steps"][1:]]
    res["side"]["trl"].update(
        gen_wall=C.median([g[0] for g in gen]), gen_cpu=C.median([g[1] for g in gen]),
        reuse_wall=C.median([s[0] for s in reuse]) if reuse else float("nan"),
        reuse_cpu=C.median([s[1] for s in reuse]) if reuse else float("nan"))
    res["ratios"] = round_ratios(cpu, wall)
    return res


def _without_note(argv: str) -> str:
    """A run's arguments without its --note (shown on its own)."""
    a = shlex.split(argv)
    i = a.index("--note") if "--note" in a else None
    return " ".join(shlex.quote(x) for x in (a if i is None else a[:i] + a[i + 2:]))


def round_ratios(cpu: dict, wall: dict) -> dict:
    """'a/b' → {'cpu', 'wall'} → spread of the per-round ratios: each round's rows ran back to back, so a ratio
    within a round sees the same neighbours on the machine."""
    return {f"{a}/{b}": {kind: _spread([x / y for x, y in zip(t[a], t[b]) if y > 0])
                         for kind, t in (("cpu", cpu), ("wall", wall))}
            for a, b in (("ours", "trl"), ("off", "trl"), ("ours", "off"))}


def _order(r: int) -> tuple[str, ...]:
    return ROWS[r % 3:] + ROWS[:r % 3]


def _spread(xs) -> dict:
    """Median, min, max and quartiles of per-round values."""
    s = sorted(xs)
    if not s:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "q1": float("nan"),
                "q3": float("nan"), "n": 0}
    return {"median": C.median(s), "min": s[0], "max": s[-1], "q1": s[len(s) // 4], "q3": s[(3 * len(s)) // 4],
            "n": len(s)}


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

LABEL = {"ours": "ours (defaults: vision cache + shared prompt)", "trl": "TRL `GRPOTrainer`",
         "off": "ours, sharing off (`vision_cache=false share_prompt=false`)"}


def settings_rows(S, oc, tc, gen_config) -> list[list[str]]:
    """The settings table of one comparison, as (what, ours, TRL) cells."""
    lora = (f"`lora_r={oc.lora_r}`, `lora_alpha={oc.lora_alpha}`, `lora_dropout={oc.lora_dropout}` on the language "
            "model's q/k/v/o projections, `freeze_vision=true`" if oc.lora_r else "`lora_r=0`, `freeze_vision=true`")
    return [
        ["model", f"`{S.model}` (own deep copy; sharing-off row: another)" + (
            f", the Qwen2-VL-2B twin cut to {S.layers} + {S.layers} layers" if S.layers else ""),
         "same weights, `processing_class` = Qwen2VLProcessor from our tokenizer + image processor, chat template "
         "= our prompt"],
        ["precision / device", "`precision=fp32`, `device=cpu`, `threads=1`",
         "fp32: `bf16=False` (with `use_cpu=True` TRL would otherwise autocast to bf16), `use_cpu=True`"],
        ["trained parameters", lora, ("`peft_config` = our trainer's own LoraConfig (same rank, alpha, dropout and "
                                      "target modules)" if oc.lora_r else
                                      "no `peft_config`; vision params set `requires_grad=False` before the trainer "
                                      "is built")],
        ["prompts × completions", f"`prompts_per_step={oc.prompts_per_step}`, `group_size={oc.group_size}`",
         f"`per_device_train_batch_size={tc.per_device_train_batch_size}`, `num_generations={tc.num_generations}`, "
         f"`generation_batch_size={tc.generation_batch_size}`"],
        ["updates per rollout batch", f"`epochs={oc.epochs}`, `minibatch_size={oc.minibatch_size}` → "
         f"{oc.updates_per_step}", f"`num_iterations={tc.num_iterations}`, `steps_per_generation="
         f"{tc.steps_per_generation}`, `gradient_accumulation_steps={tc.gradient_accumulation_steps}` → "
         f"{tc.num_iterations * tc.steps_per_generation}"],
        ["sampling", f"`max_new_tokens={oc.max_new_tokens}`, `temperature={oc.temperature}`, `top_p={oc.top_p}`, "
         "top_k 0, structural tokens suppressed", f"`max_completion_length={tc.max_completion_length}`, "
         f"`temperature={tc.temperature}`, `top_p={tc.top_p}`, `top_k={tc.top_k}`, `generation_kwargs="
         f"{{suppress_tokens: {gen_config.get('suppress_tokens')}}}`"],
        ["optimizer", f"AdamW `lr={oc.lr}`, `weight_decay={oc.weight_decay}`, `schedule={oc.schedule}`, "
         f"`max_grad_norm={oc.max_grad_norm}`", f"`optim={getattr(tc.optim, 'value', tc.optim)}`"
         f", `learning_rate={tc.learning_rate}`, `weight_decay={tc.weight_decay}`, `lr_scheduler_type="
         f"{getattr(tc.lr_scheduler_type, 'value', tc.lr_scheduler_type)}`, `max_grad_norm={tc.max_grad_norm}`"],
        ["loss", f"`loss_norm={oc.loss_norm}`, `clip_low/high={oc.clip_low}/{oc.clip_high}`, `beta={oc.beta}`, "
         f"`advantage_scale={oc.advantage_scale}`", f"`loss_type={tc.loss_type}`, `epsilon={tc.epsilon}`, "
         f"`beta={tc.beta}`, `scale_rewards={tc.scale_rewards}`"],
        ["overheads off", "`log_attention=false`, `attn_metrics_every=0`, `save_every=0`, `snapshot_every=0`, "
         "`eval_every=0`, no TensorBoard", "`report_to=[]`, `save_strategy=no`, `eval_strategy=no`, "
         "`logging_steps=1e9`, `disable_tqdm`, `log_completions=False`, `activation_checkpointing=False` (TRL "
         "turns gradient checkpointing on by default)"],
        ["data order", (f"prompts `{S.prompts}k … {S.prompts}k+{S.prompts - 1}` of the train split at step k"
                        if S.model == "default" else "the one photo and question at every step"),
         "`shuffle_dataset=False` over the same rows: the same prompts in the same rollout batch"],
    ]


def _r(sp: dict, bold: bool = False) -> str:
    m = f"{sp['median']:.3f}×"
    return (f"**{m}**" if bold else m) + f" ({sp['min']:.3f}–{sp['max']:.3f})"


def section(key: str, res: dict) -> list[str]:
    """The markdown of one comparison."""
    sd, n, U = res["side"], res["n"], res["updates"]
    real = key == "real"
    L = [f"## {res['title']}\n",
         f"{res['machine']}, datasets {res['datasets']} · one torch thread per trainer (seen at step ends: ours "
         f"{res['threads']['ours']}, TRL {res['threads']['trl']}, sharing off {res['threads']['off']}) · fp32 · "
         f"{res['rounds']} timed rounds after {res['warmup']} untimed rollout batch{'es' if res['warmup'] != 1 else ''}"
         f" per row and run · run{'s' if res['n_runs'] > 1 else ''} (UTC start, rounds, load average at start → "
         f"end, duration): {res['runs_text']}"
         + (" (runs added with `--add-run`, each its own process with its three rows interleaved; runs whose "
            "times overlap ran as two processes at once)" if res["n_runs"] > 1 else "")
         + " · measured with " + " and ".join(f"`.venv/bin/python bench/trl_bench.py {a}`"
                                               for a in dict.fromkeys(res["argvs"])) + "\n",
         res["what"] + f" Prompts fed to the model: {res['prompt_check']}; same prompts in the same order in every "
         f"timed round on all three rows: {'yes' if res['same_prompts'] else 'NO'}. Sharing as resolved by our "
         f"trainer: ours vision cache {res['sharing']['ours'][0]}, share_prompt {res['sharing']['ours'][1]}"
         + (" (on here: the prompt is at least as long as the answer budget)" if res["sharing"]["ours"][1] == "auto"
            and res["prompt_tokens"] >= res["new_tokens"] else "") + "; "
         f"sharing-off row {res['sharing']['off'][0]}, {res['sharing']['off'][1]}.\n"]
    L += [f"Note: {x}\n" for x in res["notes"]]
    L.append(f"| row | CPU s / optimizer step | CPU s / rollout batch ({U} updates) | wall s / rollout batch | "
             "rollouts / CPU-s | mean completion tokens | mean reward | CPU/wall |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name in ROWS:
        s = sd[name]
        lab = LABEL[name] + (f" {res['versions']['trl']}" if name == "trl" else "")
        L.append(f"| {lab} | {s['step_cpu']:.3f} | {s['cpu']:.3f} | {s['wall']:.3f} | {s['rps_cpu']:.2f} | "
                 f"{s['resp_len']:.1f} | {s['reward']:.2f} | {s['cpu_wall']:.2f} |")
    ra = res["ratios"]
    L.append("")
    L.append("Ratios of time per optimizer step, median of the per-round ratios (min–max over rounds; < 1 = the "
             "first is faster):\n")
    L.append("| ratio | process CPU time | wall time |")
    L.append("|---|---|---|")
    for k, lab in (("ours/trl", "**ours / TRL**"), ("off/trl", "ours with sharing off / TRL"),
                   ("ours/off", "ours / ours with sharing off (what the vision cache + shared prompt buy)")):
        L.append(f"| {lab} | {_r(ra[k]['cpu'], k == 'ours/trl')} | {_r(ra[k]['wall'])} |")
    oc = ra["ours/trl"]["cpu"]
    L.append("")
    L.append(f"Medians over rounds; a rollout batch is one step of our `train()` loop and {U} optimizer steps of "
             "TRL's (the first generates), each timed from the end of the previous step to the end of this one, so "
             f"each loop's own bookkeeping is included. Ours took less CPU time than TRL in "
             f"{sum(a < b for a, b in zip(res['cpu']['ours'], res['cpu']['trl']))} of {res['rounds']} rounds"
             + (f"; the goal at real width, ours ≤ 1/3 of TRL's time per step, is **"
                f"{'met' if oc['max'] <= 1 / 3 else 'met on the median, not in every round' if oc['median'] <= 1 / 3 else 'not met'}**"
                f" (median {oc['median']:.3f}, worst round {oc['max']:.3f})" if real else "") + ".\n")

    # where the time goes
    o, f, t = sd["ours"], sd["off"], sd["trl"]
    L.append("Where the time goes (wall medians; the rollout phase of ours is measured inside `train_step`, TRL's is "
             "its generating step minus a reusing step):\n")
    L.append("| | ours | ours, sharing off | TRL |")
    L.append("|---|---|---|---|")
    trl_roll = t["gen_wall"] - t["reuse_wall"] if U > 1 else float("nan")
    L.append(f"| rollout phase (preprocessing, generate, rewards, advantages, old log-prob pass), s | "
             f"{o['rollout_wall']:.3f} | {f['rollout_wall']:.3f} | {trl_roll:.3f} |")
    L.append(f"| one optimizer update on {n} sequences (forward, backward, clip, AdamW) + loop, s | "
             f"{(o['wall'] - o['rollout_wall']) / U:.3f} | {(f['wall'] - f['rollout_wall']) / U:.3f} | "
             f"{t['reuse_wall']:.3f} |")
    L.append(f"| TRL step that generates / that reuses the batch, CPU s | | | {t['gen_cpu']:.3f} / "
             f"{t['reuse_cpu']:.3f} |")
    L.append("")
    L.append(f"Image preprocessing (`{res['img_processor']}`): all {n} rows of a rollout batch "
             f"{res['img_proc_ms']:.0f} ms, which TRL runs twice per rollout batch; the {res['distinct']} distinct "
             f"image(s) {res['img_distinct_ms']:.0f} ms, which both our rows run once per rollout batch.\n")
    L.append("<details><summary>Per round, in run order: process CPU s (wall s) per rollout batch</summary>\n")
    L.append("| round | run | order | ours | TRL | ours, sharing off | ours / TRL (CPU) | off / TRL (CPU) | "
             "completion tokens ours / TRL / off |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    c, w = res["cpu"], res["wall"]
    for i in range(res["rounds"]):
        L.append(f"| {i + 1} | {res['run_of'][i] + 1} | {' → '.join(res['orders'][i])} | {c['ours'][i]:.2f} ({w['ours'][i]:.2f}) | "
                 f"{c['trl'][i]:.2f} ({w['trl'][i]:.2f}) | {c['off'][i]:.2f} ({w['off'][i]:.2f}) | "
                 f"{c['ours'][i] / c['trl'][i]:.3f} | {c['off'][i] / c['trl'][i]:.3f} | "
                 f"{o['lens'][i]:.2f} / {t['lens'][i]:.2f} / {f['lens'][i]:.2f} |")
    L.append("\n</details>\n")
    L.append("<details><summary>Settings, side by side</summary>\n")
    L.append("| | ours (`build_config(None, …)`) | TRL (`GRPOConfig`) |")
    L.append("|---|---|---|")
    L += [f"| {a} | {b} | {c_} |" for a, b, c_ in res["settings_rows"]]
    L.append("\n</details>\n")
    worst = min(sd[k]["cpu_wall"] for k in ROWS)
    L.append(f"Contention: the machine was shared with other people's runs throughout (load averages above, on "
             f"{res['nproc']} CPUs); median CPU/wall per rollout batch "
             + ", ".join(f"{k} {sd[k]['cpu_wall']:.2f}" for k in ROWS)
             + (" (1.00 = the process had its core to itself): wall times are inflated by about 1/(CPU/wall), so "
                "the CPU-time figures and ratios are the ones to read, and the rounds were interleaved so that "
                "contention hits all rows alike." if worst < 0.9 else ".")
             + " Busiest other processes at start: "
             + ("; ".join(res["busy_before"]) or "none") + ".\n")
    return L


def lead_text(results: dict) -> list[str]:
    """What buys our lead, with the measured rows and the LM-head arithmetic of each setting."""
    L = ["## What buys the lead\n"]
    for r in results.values():
        key = r["kind"]
        ra, n = r["ratios"], r["n"]
        T = r["new_tokens"]
        ours_head = n * (T + 1)
        trl_head = n * (r["prompt_tokens"] + T)
        lead, share = 1 / ra["ours/trl"]["cpu"]["median"], 1 / ra["ours/off"]["cpu"]["median"]
        part = math.log(share) / math.log(lead) if lead > 1 else float("nan")
        L.append(f"- **{r['short']}**: with our sharing off we take {ra['off/trl']['cpu']['median']:.3f}× TRL's CPU "
                 f"time per step, with it on {ra['ours/trl']['cpu']['median']:.3f}×: the vision cache and the shared "
                 f"prompt make the step {share:.2f}× faster (ours / sharing off {ra['ours/off']['cpu']['median']:.3f}×)"
                 f", {'most' if part > 0.5 else 'part'} of our {lead:.2f}× lead ({100 * part:.0f} % of it on a log "
                 "scale); the rest "
                 f"({1 / ra['off/trl']['cpu']['median']:.2f}×) is what both our rows have: the LM head "
                 f"({r['vocab']:,} × {r['hidden']}) runs on the {T + 1} answer positions of each sequence in every "
                 f"scoring and training forward ({ours_head:,} rows per pass) where TRL 1.16's fused head projects "
                 f"all {'≈' if key == 'small' else ''}{r['prompt_tokens'] + T} positions ({trl_head:,} rows, {trl_head / ours_head:.0f}× more) and "
                 "also computes their entropy; each distinct image is preprocessed once per rollout batch (TRL: "
                 f"all {n} rows, twice); and no `datasets` collation or completion gathering per optimizer step."
                 + (" The twin is cut in depth: at full depth (28 decoder layers, 32 vision blocks) the layers and "
                    "the tower weigh far more against the head, so TRL's extra head work matters less and the lead "
                    "rests on the sharing; the sharing-alone ratio (ours / sharing off) is the better guide there "
                    "(an expectation, not measured)." if key == "real" else ""))
    L.append("- **The vision cache** (`ral_core/vision_cache.py`): each distinct image goes through the frozen vision "
             "tower once per step, and generation, the old-policy pass and every update read those features; TRL "
             "(and our sharing-off row) run the tower on all G copies in every pass: generation, the old log-prob "
             "pass and each update.")
    real = [r for r in results.values() if r["kind"] == "real"]
    L.append("- **The shared prompt** (`ral_core/prefix_share.py`): each group's prompt is prefilled once for "
             "sampling and computed once per pass in scoring and updates, with the G answers attending to it; "
             "TRL runs the whole prompt for each of the G rollouts in every pass. At real width the prompt is "
             f"{real[0]['prompt_tokens'] if real else '~1,000'} tokens against "
             f"{real[0]['new_tokens'] if real else 32} answer tokens, so nearly all of a "
             "pass's language-model work is the prompt.")
    L.append("")
    return L


NOTES = """## What is and isn't comparable

Matched, in both comparisons: the weights, the trained parameters (the same count on the three rows, checked), the
prompt tokens and pixels fed to `generate` (checked), the sampling settings and the tokens that may be sampled, the
number of completions and of optimizer updates per rollout batch, each update on the whole batch, the clipped-ratio
objective with group-normalised advantages ((r − mean) / (std + 1e-4), 0 for zero-variance groups on both), the
token-level normaliser (our `token` divides by the completion tokens of the mini-batch; TRL's `dapo` by those of the
generation batch, the same sequences here), no KL term and no reference model (β = 0), AdamW (torch, non-fused) with
a constant learning rate and clipping at norm 1, one extra no-grad forward per rollout batch for the old log-probs
(ours always; TRL because `num_iterations` > 1), fp32 and one torch thread per trainer, and no logging, saving or
evaluation on either side. fp32 because these are CPU runs: TRL's `use_cpu=True` would autocast to bf16, which pays
only on a CPU with native bf16 (each section's machine line says whether its CPU has it; hosts of this kind without
it run bf16 matmuls about 3× slower than fp32), and fp32 is our trainer's precision on a CPU, so the figures do not
depend on which host of the kind ran them.

Not the same, and part of what is measured:

- **Completions.** Each trainer samples its own completions from its own copy of the weights (which drift apart
  after the first update), so the texts and rewards differ per round; the prompts are the same. The per-round
  completion lengths are in the tables above (on the small task the answer's length is set by the question kind;
  the random-weight twin writes all of its new tokens, with an exact-match reward of 0, so every advantage is 0 —
  both trainers still run every forward, backward and optimizer step: neither skips a zero-advantage batch).
- **Log-probs.** Ours runs the LM head on the completion positions only (`logits_to_keep = T + 1`) and takes a
  log-softmax. TRL 1.16 patches the model with its fused LM head, which on CPU (no Triton) projects every position
  of the sequence, prompt included, in chunks, and also computes the per-token entropy in every training forward
  (for its `entropy` metric); ours computes no entropy.
- **The vision tower and the prompt.** Ours (defaults) encodes each distinct image once per step and computes each
  group's prompt once per pass; the sharing-off row and TRL run the tower on every rollout's copy of the image and
  the whole prompt of every rollout in every pass (generation, old log-probs, each update). In a Qwen2-VL `generate`
  the tower runs once per call, on all rows, in TRL and in our sharing-off row.
- **Image preprocessing.** Both our rows preprocess each distinct image once per rollout batch and reuse the tensors
  for every pass. TRL runs the processor on all rows twice per rollout batch (once inside `apply_chat_template` for
  generation, once more for the forward passes).
- **Data loading.** TRL's `Trainer` fetches and collates the batch's dataset rows per optimizer step through
  `datasets` and its `RepeatSampler`, also on the steps that reuse the batch; ours takes the prompts from the
  dataset directly. Images are cached on the TRL side so both read or render each prompt's image once per batch.
- **Bookkeeping.** TRL always gathers prompts, completions, images and advantages into its completion logs, and
  computes its metrics (entropy, clip ratios, reward statistics; several `.item()` calls) every step even when it
  never logs them. Ours computes `clip_frac` and `ratio_mean` per mini-batch and writes one `metrics.jsonl` line
  per step.
- **Generation.** Both call `model.generate` of the same transformers with the same sampling settings. TRL passes
  a `GenerationConfig` (`disable_compile=True`) inside its `unwrap_model_for_generation` context; ours (defaults)
  prefills each group's prompt once and samples the G answers from copies of its cache; the sharing-off row calls
  `generate` on all rows as TRL does, under our attention-capture context (with nothing captured it calls the same
  SDPA kernel).
- **One loss variant only.** Other settings (β > 0, mini-batches smaller than the batch, `dr_grpo`, whose constant
  differs: ours N·T_batch_max, TRL N·`max_completion_length`) were not measured.
"""


COMMAND = "make bench-trl"  # = .venv/bin/python bench/trl_bench.py --out bench/results/trl.md


def render(stored: dict, command: str) -> str:
    """The whole results file from the stored comparisons (a rerun of one setting keeps the other)."""
    results = {}  # one comparison per setting and shape (runs of another depth are never pooled)
    for k in sorted(stored, key=lambda k: k != "real"):
        v = stored[k]
        if not (isinstance(v, dict) and v.get("runs")):
            continue
        groups: dict[str, list] = {}
        for i in sorted(v["runs"]):
            run = v["runs"][i]
            if "argv" in run:  # the words from this code and the run's own arguments (its numbers as stored)
                describe(settings(parser().parse_args(shlex.split(run["argv"])))[k], run)
            groups.setdefault(run["short"], []).append(run)
        for j, short in enumerate(sorted(groups)):
            r = results[f"{k}|{short}"] = summarise(groups[short])
            r["kind"] = k
            r["notes"] += v.get("notes", []) if j == 0 else []  # afterwords once, in the setting's first section
    L = ["# Our GRPO trainer vs TRL GRPOTrainer (CPU)\n",
         f"Command: `{command}` (`.venv/bin/python bench/trl_bench.py --out bench/results/trl.md`; the comparisons "
         "are kept in `bench/results/trl.json`, `--settings real` or `small` reruns one, `--report-only` rewrites "
         "this file from them). Three rows, interleaved round by round in one process per run (one rollout batch each per round, the order "
         "rotating): ours with its defaults, TRL's `GRPOTrainer`, and ours with its sharing off (`vision_cache=false "
         "share_prompt=false`), so the file says what the sharing buys and what the rest of our trainer does. "
         "Ratios are of process CPU time per optimizer step (the machine is shared, see each section), with their "
         "spread over rounds.\n"]
    L.append("| comparison | ours / TRL (CPU) | sharing off / TRL | ours / sharing off | rounds | CPU s per optimizer "
             "step: ours · TRL · off |")
    L.append("|---|---|---|---|---|---|")
    for r in results.values():
        ra, sd = r["ratios"], r["side"]
        L.append(f"| {r['short']} | {_r(ra['ours/trl']['cpu'], True)} | {_r(ra['off/trl']['cpu'])} | "
                 f"{_r(ra['ours/off']['cpu'])} | {r['rounds']} | {sd['ours']['step_cpu']:.2f} · "
                 f"{sd['trl']['step_cpu']:.2f} · {sd['off']['step_cpu']:.2f} |")
    L.append("")
    L += lead_text(results)
    for r in results.values():
        L += section(r["kind"], r)
    L.append(NOTES)
    return "\n".join(L) + "\n"


def describe(S, res) -> None:
    """The words and shapes a section needs, stored with its numbers."""
    n = S.prompts * S.group
    if S.model == "default":
        res["title"] = "Embedded default model (0.88M params), full fine-tuning of the language model"
        res["short"] = f"default model, {S.prompts} prompts × {S.group}, ≤ {S.new_tokens} new tokens"
        res["what"] = (f"Model: embedded default (assets/default_model), Qwen2-VL, {res['params'] / 1e6:.2f}M params, "
                       f"full fine-tuning of the language model ({res['trainable']['ours'] / 1e6:.2f}M trainable on "
                       "every row; vision tower and merger frozen). Task: bundled grounding task (3×3 digit grids, "
                       f"cell/row/where, with images), exact-match reward. Rollout batch: {S.prompts} prompts × "
                       f"{S.group} = {n} completions, ≤ {S.new_tokens} new tokens, temperature 1.0, then "
                       f"{S.updates} optimizer updates on the whole batch; prompts of {res['prompt_tokens']} tokens.")
    else:
        res["title"] = f"Real width: the Qwen2-VL-2B twin cut to {S.layers} + {S.layers} layers, LoRA r {S.lora_r}"
        res["short"] = (f"Qwen2-VL-2B twin, {S.layers} + {S.layers} layers, 1024×768 photo, G = {S.group}, "
                        f"{S.new_tokens} new tokens, LoRA r {S.lora_r}")
        res["what"] = (f"Model: the Qwen2-VL-2B shape twin (`ral_core/builders/twins.py`: the published config at its "
                       f"real width — hidden {res['hidden']}, vision width 1280, full {res['vocab']:,}-token "
                       f"embedding and tied head — random weights) cut to {S.layers} decoder layer(s) and {S.layers} "
                       f"vision block(s) of the published 28 and 32 (as `bench/step_bench.py`), "
                       f"{res['params'] / 1e6:.0f}M params; LoRA r {S.lora_r} on {res['lora_n_targets']} modules "
                       f"({', '.join(res['lora_targets'])}) on every row, {res['trainable']['ours'] / 1e6:.2f}M "
                       "trainable, the rest frozen. Task: one 1024×768 photo (`bench/step_bench.py`'s, "
                       f"{res['prompt_tokens']}-token prompt), exact-match reward. Rollout batch: {S.prompts} prompt "
                       f"× G = {S.group}, {S.new_tokens} new tokens, temperature 1.0, then {S.updates} optimizer "
                       "updates on the whole batch. At full depth each pass would run "
                       f"{28 / S.layers:.0f}× the language "
                       f"layers and {32 / S.layers:.0f}× the vision blocks while the embedding and LM head stay the "
                       "same, so the cut weighs the head (where TRL spends the most extra) more than the real model "
                       "does.")
    res.update(updates=S.updates, warmup=S.warmup, new_tokens=S.new_tokens)


def records_path(args) -> str:
    """The comparisons file: the committed bench/results/trl.json only for the committed report; a report written
    elsewhere keeps its own next to itself, so a trial run never rewrites the committed measurements."""
    if not args.out or os.path.abspath(args.out) == os.path.abspath(RESULTS_MD):
        return os.path.splitext(RESULTS_MD)[0] + ".json"
    return os.path.splitext(args.out)[0] + ".json"


# ------------------------------------------------------------------------------------------------ main

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown report path (default: print only); its comparisons are kept in a .json "
                    "beside it")
    ap.add_argument("--settings", default="small,real", help="comparisons to run: small (the default model), real "
                    "(the Qwen2-VL-2B twin at real width); the others are kept from the .json")
    ap.add_argument("--quick", action="store_true", help="smoke run (small: 2 prompts × 4, 1 warm-up, 2 rounds; "
                    "real: 1 round, no warm-up); prints, writes nothing")
    ap.add_argument("--prompts", type=int, default=8, help="small: prompts per rollout batch")
    ap.add_argument("--group", type=int, default=8, help="small: completions per prompt (TRL num_generations)")
    ap.add_argument("--new-tokens", type=int, default=12, help="small: max new tokens (TRL max_completion_length)")
    ap.add_argument("--updates", type=int, default=2, help="small: optimizer updates per rollout batch, each on the "
                    "whole batch (ours epochs, TRL num_iterations)")
    ap.add_argument("--lr", type=float, default=5e-5, help="small: learning rate")
    ap.add_argument("--loss", choices=sorted(LOSS_MAP), default="token", help="our loss_norm (TRL loss_type: "
                    + ", ".join(f"{k}→{v}" for k, v in LOSS_MAP.items()) + ")")
    ap.add_argument("--warmup", type=int, default=2, help="small: untimed rollout batches per row first")
    ap.add_argument("--repeats", type=int, default=40, help="small: max interleaved rounds")
    ap.add_argument("--min-repeats", type=int, default=6)
    ap.add_argument("--budget", type=float, default=240.0, help="small: s of timed rounds before stopping early")
    ap.add_argument("--real-layers", type=int, default=2, help="real: decoder layers and vision blocks of the twin")
    ap.add_argument("--real-rounds", type=int, default=3, help="real: interleaved rounds")
    ap.add_argument("--real-warmup", type=int, default=0, help="real: untimed rollout batches per row first")
    ap.add_argument("--add-run", action="store_true", help="keep the setting's stored runs and add this one (a "
                    "second process measuring more rounds at the same time; the report pools the rounds of all runs)")
    ap.add_argument("--order-offset", type=int, default=0, help="start the rotation of the row order here (0: ours "
                    "first, 1: TRL first, 2: sharing off first): a run added beside another starts where it does not")
    ap.add_argument("--note", default="", help="a sentence stored with this run and shown in its section (why a "
                    "setting was cut, what else ran); with --report-only, added to the stored --settings")
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from its stored comparisons without "
                    "measuring")
    return ap


def main():
    ap = parser()
    args = ap.parse_args()
    if args.report_only:
        rows = records_path(args)
        if not (args.out and os.path.exists(rows)):
            ap.error(f"--report-only needs --out and its stored comparisons ({rows} does not exist)")
        stored = json.load(open(rows))
        if args.note:  # an afterword on a stored comparison (something its runs could not know)
            for key in [k.strip() for k in args.settings.split(",") if k.strip() in stored]:
                stored[key]["notes"] = list(dict.fromkeys(stored[key].get("notes", []) + [args.note]))
            with open(rows, "w") as f:
                json.dump(stored, f, indent=1, sort_keys=True, ensure_ascii=False)
        C.write_report(render(stored, COMMAND), args.out, False, log)
        return
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    if not keys or any(k not in ("small", "real") for k in keys):
        ap.error("--settings takes small, real or both (comma-separated)")
    if args.updates < 1 or args.prompts < 1 or args.group < 2 or args.real_rounds < 1 or args.real_layers < 1:
        ap.error("need --updates ≥ 1, --prompts ≥ 1, --group ≥ 2, --real-rounds ≥ 1, --real-layers ≥ 1")
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
    versions = {"trl": trl.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    S_all = settings(args)
    rows = records_path(args)
    keep = bool(args.out) and not args.quick
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
    results, failed = {}, False
    for key in keys:
        S, meta, fresh = S_all[key], C.machine_info(), [not args.add_run]

        def save(raw, S=S, meta=meta, key=key, fresh=fresh):
            """This run's record into the comparisons file, over what other runs stored meanwhile; a run without
            --add-run replaces the setting's earlier runs at its first save."""
            rec = {**raw, "argv": " ".join(shlex.quote(a) for a in sys.argv[1:]), "note": args.note, "machine": C.machine_line(meta), "nproc": meta["nproc"], "versions": versions,
                   "datasets": versions["datasets"], "distinct": S.prompts}
            describe(S, rec)
            results.setdefault(key, {"runs": {}})["runs"][run_id] = C.round_floats(rec)
            if not keep:
                return
            stored = json.load(open(rows)) if os.path.exists(rows) else {}
            if fresh[0] or key not in stored:
                stored[key] = {"runs": {}}
                fresh[0] = False
            stored[key]["runs"][run_id] = results[key]["runs"][run_id]
            with open(rows, "w") as f:
                json.dump(stored, f, indent=1, sort_keys=True, ensure_ascii=False)
            results.update(stored)

        save(measure(S, save))
        mine = results[key]["runs"][run_id]["short"]  # pooled with the runs of this shape only
        res = summarise([r for _, r in sorted(results[key]["runs"].items()) if r["short"] == mine])
        sd = res["side"]
        log(f"{key}: CPU s/step ours {sd['ours']['step_cpu']:.3f}, TRL {sd['trl']['step_cpu']:.3f}, sharing off "
            f"{sd['off']['step_cpu']:.3f}; ours/TRL {res['ratios']['ours/trl']['cpu']['median']:.3f} CPU, "
            f"{res['rounds']} rounds over {res['n_runs']} run(s)")
        failed |= not res["same_prompts"] or math.isnan(res["ratios"]["ours/trl"]["cpu"]["median"])
    if keep:
        results = json.load(open(rows))
    C.write_report(render(results, COMMAND), args.out, args.quick, log)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
