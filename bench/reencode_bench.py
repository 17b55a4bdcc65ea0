"""Benchmark: a training step before and after the last re-encodings (each distinct image preprocessed once; the
reference model and the teacher reuse the step's image features where their tower is the student's).

    .venv/bin/python bench/reencode_bench.py --before c64644b~1 --after c64644b --rounds 3

The two commits are exported with `git archive` (the working tree is not read), and each round runs one worker
process per commit, alternating the order (AB, BA, …). A worker builds the Trainer from the commit's own code, runs
one warm-up step and then `--steps` timed `Trainer.train_step()` calls on the same prompts (the step counter is not
advanced), with one torch thread. It reports per-step process CPU seconds, the CPU spent in the image processor,
and how many images went through the image processor and through each model's vision tower in one step.
Settings: `ral` (the shipped recipe: 16 prompts × 8, 12 new tokens, 4 updates), `ral_kl` (the same with
beta = 0.04: a deep-copied frozen reference model whose tower equals the student's) and `twin` (bench/step_bench.py's
twin row: the Qwen2-VL-2B twin cut to 1 + 1 layers, one 1024×768 photo, G = 8, 32 new tokens, LoRA r 8).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common as C

C.start()

SETTINGS = {"ral": [], "ral_kl": ["beta=0.04"], "twin": []}


def worker(root: str, setting: str, steps: int) -> dict:
    sys.path.insert(0, root)
    import torch

    import ral_core
    assert os.path.abspath(ral_core.__file__).startswith(os.path.abspath(root)), ral_core.__file__
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    from ral_core.vision_cache import _encoder_owner

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="reencode_")
    common = [f"output_dir={tmp}/run", "seed=0", "snapshot_every=0", "save_every=0", "threads=1"]
    if setting == "twin":  # as bench/step_bench.py's twin row
        from ral_core.builders.twins import build_twin
        from step_bench import photo_dataset
        ad = build_twin("qwen2_vl_2b", text_layers=1, vision_depth=1, seed=0)
        cfg = build_config("ral", ["model=twin", f"dataset={photo_dataset(tmp)}", "prompts_per_step=1",
                                   "group_size=8", "max_new_tokens=32", "lora_r=8", "minibatch_size=4", "epochs=1",
                                   "lambda_attn=1", "lr=1e-4"] + common)
        t = Trainer(cfg, adapter=ad)
    else:
        t = Trainer(build_config("ral", ["model=default"] + common + SETTINGS[setting]))
    proc = {"images": 0, "cpu": 0.0}
    process = t.adapter.process_images

    def timed(ims):
        c0 = time.process_time()
        out = process(ims)
        proc["cpu"] += time.process_time() - c0
        proc["images"] += len(ims)
        return out
    t.adapter.process_images = timed
    towers = {}
    for name, m in (("student", t.model), ("reference", t.ref_model)):
        if m is not None:
            _encoder_owner(m).visual.register_forward_hook(
                lambda mod, args, kw, out, k=name: towers.__setitem__(k, towers.get(k, 0) + int(kw["grid_thw"].shape[0])),
                with_kwargs=True)
    torch.manual_seed(1234)
    t.train_step()  # warm-up
    cpu, wall, pcpu = [], [], []
    counts = None
    for _ in range(steps):
        proc.update(images=0, cpu=0.0)
        towers.clear()
        torch.manual_seed(1234)
        c0, w0 = time.process_time(), time.perf_counter()
        t.train_step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        pcpu.append(proc["cpu"])
        counts = {"processed": proc["images"], "towers": dict(towers)}
    return {"cpu": cpu, "wall": wall, "processor_cpu": pcpu, **counts}


def parts(reps: int) -> None:
    """The reference model's pass alone, in this process (this tree's code), alternating with its old form (every
    row's pixels through the reference's own tower, every sequence's whole prompt), on the `ral_kl` step's 128
    sequences."""
    import dataclasses

    import torch

    from ral_core.config import build_config
    from ral_core.policy import policy_forward
    from ral_core.rollout import make_rollouts
    from ral_core.trainer import Trainer

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="reencode_parts_")
    t = Trainer(build_config("ral", ["model=default", f"output_dir={tmp}/run", "seed=0", "snapshot_every=0",
                                     "save_every=0", "threads=1", "beta=0.04"]))
    prompts = t._prompts(0)
    torch.manual_seed(0)
    ro = make_rollouts(t.adapter, prompts, t.cfg.group_size, t.rewarder, t.spec, t.cfg.max_new_tokens,
                       vision_cache=True, share_prompt=t.share_prompt, gen_model=t.model)
    plain = dataclasses.replace(ro, vision=None, share_prompt=False)

    @torch.no_grad()
    def ref(old: bool):
        policy_forward(t.ref_model, plain if old else ro, None)
    ref(True), ref(False)  # warm-up
    cpu = {True: [], False: []}
    for r in range(reps):
        for old in ((True, False) if r % 2 == 0 else (False, True)):
            c0 = time.process_time()
            ref(old)
            cpu[old].append(time.process_time() - c0)
    b, a = C.median(cpu[True]), C.median(cpu[False])
    print(f"reference pass, 128 sequences: CPU ms median (min–max) before {1e3 * b:.1f} ({1e3 * min(cpu[True]):.1f}–"
          f"{1e3 * max(cpu[True]):.1f}), after {1e3 * a:.1f} ({1e3 * min(cpu[False]):.1f}–"
          f"{1e3 * max(cpu[False]):.1f}), {reps} alternating rounds")


def export(ref: str, tmp: str) -> str:
    d = os.path.join(tmp, ref.replace("~", "_").replace("/", "_"))
    os.makedirs(d)
    archive = subprocess.run(["git", "-C", str(C.ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
    return d


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="c64644b~1")
    p.add_argument("--after", default="c64644b")
    p.add_argument("--settings", default="ral,ral_kl")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per worker (after one warm-up step)")
    p.add_argument("--parts", type=int, default=0, metavar="REPS",
                   help="time only the reference pass, old form against new, in this tree, REPS rounds")
    p.add_argument("--worker", nargs=2, metavar=("ROOT", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.parts:
        parts(args.parts)
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return
    log = C.logger("reencode")
    tmp = tempfile.mkdtemp(prefix="reencode_bench_")
    roots = {"before": export(args.before, tmp), "after": export(args.after, tmp)}
    print(f"before = {args.before}, after = {args.after} · {C.machine_line()} · load at start {C.loadavg()}")
    for setting in args.settings.split(","):
        res = {k: [] for k in roots}
        for r in range(args.rounds):
            for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = subprocess.run([sys.executable, __file__, "--worker", roots[k], setting, "--steps", str(args.steps)],
                                     check=True, capture_output=True, text=True).stdout
                res[k].append(json.loads(out.strip().splitlines()[-1]))
                log(f"{setting} round {r} {k}: CPU {res[k][-1]['cpu']}, processor {res[k][-1]['processor_cpu']}")
        med = {k: C.median([c for w in v for c in w["cpu"]]) for k, v in res.items()}
        spread = {k: (min(c for w in v for c in w["cpu"]), max(c for w in v for c in w["cpu"])) for k, v in res.items()}
        proc = {k: C.median([c for w in v for c in w["processor_cpu"]]) for k, v in res.items()}
        ratios = sorted(C.median(b["cpu"]) / C.median(a["cpu"]) for b, a in zip(res["before"], res["after"]))
        print(f"{setting}: step CPU s median (min–max) before {med['before']:.3f} ({spread['before'][0]:.3f}–"
              f"{spread['before'][1]:.3f}), after {med['after']:.3f} ({spread['after'][0]:.3f}–{spread['after'][1]:.3f});"
              f" before/after per round {', '.join(f'{x:.3f}' for x in ratios)}; image processor CPU s "
              f"{proc['before']:.3f} → {proc['after']:.3f}; images processed {res['before'][0]['processed']} → "
              f"{res['after'][0]['processed']}; tower images {res['before'][0]['towers']} → {res['after'][0]['towers']}")


if __name__ == "__main__":
    main()
