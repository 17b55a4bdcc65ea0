"""`ral train` (a recipe plus overrides; curves and a before/after probe), `ral eval` (held-out accuracy and
attention metrics on the grounding task) and `ral levers` (which layers' attention moves the answer)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ral_core.cli.common import add_model_options, load_model


def add_train(sub):
    p = sub.add_parser("train", help="GRPO / RAL / OPAD fine-tuning from a YAML recipe plus key=value overrides")
    p.add_argument("--config", default="grounded", help="recipe file or name in assets/recipes: grounded (the "
                   "default: RAL plus the attention-target term, which moves attention visibly in a short run), ral "
                   "(plain RAL), grpo, opad")
    p.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    p.add_argument("--allow-download", action="store_true",
                   help="download a hub id model/teacher that is not in the local cache (also RAL_ALLOW_DOWNLOAD=1)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="write curves.png and probe_before_after.png (the starting model vs the trained one on a "
                        "held-out probe, as `ral compare` draws it) into output_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=20 lambda_attn=5")
    p.set_defaults(func=cmd_train)


def cmd_train(a) -> int:
    from ral_core.hub import allowing_downloads

    with allowing_downloads(a.allow_download or None):  # the trainer loads the model (and teacher) itself
        return _train(a)


def _train(a) -> int:
    from tqdm import tqdm

    from ral_core import distributed
    from ral_core.config import build_config
    from ral_core.trainer import Trainer

    cfg = build_config(a.config, a.overrides)
    trainer = Trainer(cfg)
    main_proc = trainer.acc.is_main_process
    if main_proc:
        print(f"{'resuming' if a.resume else 'training'}: {cfg.steps} steps × {cfg.rollouts_per_step} rollouts "
              f"→ {cfg.output_dir}", flush=True)
    bars = []  # created at the first finished step: an error before it (e.g. on resume) stays one line

    def progress(t, m):
        if not bars:
            bars.append(tqdm(total=cfg.steps, initial=t.step - 1, desc="train", disable=not main_proc,
                             dynamic_ncols=True))
        bar = bars[0]
        bar.n = t.step
        post = {"reward": f"{m['reward']:.3f}"}
        if isinstance(m.get("attn_jsd_after_update"), (int, float)):  # measured on some steps only: never a made-up 0
            post["jsd"] = f"{m['attn_jsd_after_update']:.2e}"
        bar.set_postfix(post)
        bar.refresh()
        for w in m.get("warnings", ()) if main_proc else ():  # the trainer's collapse guard, above the bar
            bar.write(f"warning (step {m['step']}): {w}", file=sys.stderr)
    trainer.callbacks.append(progress)
    try:
        res = trainer.train(resume=a.resume)
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        print(f"interrupted at step {trainer.step}; checkpoint saved in {cfg.output_dir}/checkpoints "
              "(continue with --resume)", file=sys.stderr)
        return 130
    finally:
        for bar in bars:
            bar.close()
    if main_proc:
        f = res["final"]
        print(f"{res['status']}: {res['step']} steps in {res['wall_time']:.0f} s · reward "
              f"{f.get('reward', float('nan')):.3f} · checkpoint {trainer.latest_checkpoint()} · metrics "
              f"{cfg.output_dir}/metrics.jsonl")
        for w in res["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        if a.figures and trainer.history:
            _train_figures(trainer)
    distributed.shutdown()  # under torchrun / accelerate launch: every process ends its group (a clean exit)
    return 0


def _train_figures(trainer):
    """curves.png from the run's metrics and probe_before_after.png: the starting model (A) against the trained one
    (B) on the first held-out probe, with the magnitude line."""
    from ral_core import render
    from ral_core.compare import comparison_figure, compare, magnitude
    from ral_core.models import load_adapter

    out = Path(trainer.cfg.output_dir)
    files = [render.save_figure(render.training_curves(trainer.history, trainer.cfg.steps,
                                                       f"{trainer.cfg.output_dir}: {trainer.step} steps"),
                                out / "curves.png")]
    probes = trainer.probe_samples() or [trainer.data.sample(0)]
    s = probes[0]
    before = load_adapter(trainer.cfg.model, device=str(trainer.adapter.device), dtype=trainer.adapter.model.dtype)
    before.name = f"{trainer.cfg.model} (before)"
    after = trainer.adapter_for_inference()
    after.name = f"step {trainer.step} (after)"
    was = trainer.model.training
    trainer.model.eval()
    try:
        with trainer.precision.autocast():
            cmp = compare(before, after, s["image"], s["question"], max_new_tokens=trainer.cfg.max_new_tokens)
    finally:
        trainer.model.train(was)
    boxes, expected = s.get("boxes") or [], s.get("answer")
    m = magnitude(cmp, layer=cmp.layers[-1], boxes=boxes, expected=expected)
    files.append(render.save_figure(comparison_figure(cmp, layer=cmp.layers[-1], boxes=boxes, expected=expected),
                                    out / "probe_before_after.png"))
    (out / "probe_before_after.json").write_text(json.dumps(dict(m.to_dict(), question=s["question"]), indent=1))
    print(f"probe {s['question']!r}, layer {m.layer}: {m.line()}")
    print("wrote: " + ", ".join(str(f) for f in files))


def add_eval(sub):
    p = sub.add_parser("eval", help="held-out accuracy and where the model looks on the grounding task")
    p.add_argument("--model", default="default", help="'default', a model or checkpoint directory, or a hub id")
    add_model_options(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=200, help="number of samples")
    p.add_argument("--kinds", default="cell,row,where", help="question kinds, comma separated")
    p.add_argument("--grid", default="3x3", help="grid size ROWSxCOLS")
    p.add_argument("--layer", type=int, default=-1, help="decoder layer for the attention metrics")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from ral_core.data import GroundingTask
    from ral_core.errors import RALError
    from ral_core.evaluate import evaluate

    try:
        rows, cols = (int(x) for x in a.grid.lower().split("x"))
        task = GroundingTask(rows=rows, cols=cols, kinds=tuple(k.strip() for k in a.kinds.split(",")), split=a.split)
    except ValueError as e:
        raise RALError(f"bad --grid/--kinds: {e}") from None
    if not 1 <= a.n <= 100_000:
        raise RALError("--n must be between 1 and 100000")
    adapter = load_model(a)
    if not -adapter.num_layers <= a.layer < adapter.num_layers:
        raise RALError(f"--layer {a.layer} is out of range: the model has {adapter.num_layers} decoder layers "
                       f"(0..{adapter.num_layers - 1} or -1)")
    res = evaluate(adapter, task, a.n, layer=a.layer)
    print(f"{'metric':<22}{'value':>10}")
    for k in ("accuracy", "target_mass", "target_share", "pointing_hit", "entropy", "image_mass"):
        print(f"{k:<22}{res[k]:>10.3f}")
    for k, v in res["per_kind"].items():
        print(f"{'accuracy/' + k:<22}{v:>10.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


def add_levers(sub):
    p = sub.add_parser("levers", help="causal-lever map: which layers' attention moves the answer")
    p.add_argument("--model", default="default")
    add_model_options(p)
    p.add_argument("--image", default=None, help="one image (else task samples from the grounding test split)")
    p.add_argument("--question", default=None)
    p.add_argument("--answer", default=None, help="answer to score (default: the model's greedy answer)")
    p.add_argument("--box", default=None, help="target region x0,y0,x1,y1 (default: scan image regions)")
    p.add_argument("--n", type=int, default=16, help="task samples when no --image is given")
    p.add_argument("--kinds", default="cell", help="task kinds for the samples")
    p.add_argument("--strength", type=float, default=3.0, help="logit bias added toward / away from the region")
    p.add_argument("--per-head", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_levers)


def cmd_levers(a) -> int:
    from ral_core import render
    from ral_core.data import GroundingTask
    from ral_core.errors import RALError
    from ral_core.images import load_image
    from ral_core.levers import lever_map

    adapter = load_model(a)
    if a.image:
        if not a.question or not a.question.strip():
            raise RALError("--question is required with --image")
        from ral_core.limits import check_question
        a.question = check_question(adapter, a.question)
        img = load_image(a.image)
        box = []
        if a.box:
            try:
                box = [tuple(float(v) for v in a.box.split(","))]
                assert len(box[0]) == 4
            except (ValueError, AssertionError):
                raise RALError("--box must be four numbers x0,y0,x1,y1") from None
        answer = a.answer
        if answer is None:
            from ral_core.evaluate import greedy_answers
            answer = greedy_answers(adapter, [img], [a.question])[0] or " "
        samples = [{"image": img, "question": a.question, "answer": answer, "boxes": box}]
    else:
        task = GroundingTask(kinds=tuple(a.kinds.split(",")), split="test")
        samples = [{"image": s.image, "question": s.question, "answer": s.answer, "boxes": s.boxes}
                   for s in task.samples(a.n)]
    m = lever_map(adapter, samples, strength=a.strength, per_head=a.per_head)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers.json").write_text(json.dumps(m.to_dict(), indent=1))
    render.save_figure(render.lever_chart(m), out / "levers.png")
    print(f"{'layer':>6}{'Δlogp':>10}{'±sd':>8}{'Δmass':>8}{'corr':>8}")
    for i, layer in enumerate(m.layers):
        print(f"{layer:>6}{m.effect[i]:>10.4f}{m.effect_sd[i]:>8.4f}{m.attn_shift[i]:>8.3f}{m.corr[i]:>8.3f}")
    print(f"strongest levers: {m.ranked()[:3]} · wrote {out / 'levers.png'}, {out / 'levers.json'}")
    return 0
