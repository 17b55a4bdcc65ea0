"""`ral` command line: inspect (and, as the engine grows, train / eval). Errors are one clear line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _add_model_options(p):
    p.add_argument("--allow-download", action="store_true",
                   help="download a hub id that is not in the local cache (also RAL_ALLOW_DOWNLOAD=1; on by default "
                        "on a Hugging Face Space)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on a CUDA GPU, float32 on the CPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr for the long steps (model load, image+prompt encoding, generation, "
                        "capture, rendering); default: on when stderr is a terminal, off in logs and pipes")


def _load(a, device=None):
    if getattr(a, "adapter", None) is not None:  # built by the caller of main() (a benchmark's shape twin)
        return a.adapter
    from ral_core.models import load_adapter
    with _Steps(a).step("load model"):
        return load_adapter(a.model, device=device, dtype=a.dtype, allow_download=a.allow_download or None)


class _Steps:
    """One tqdm bar on stderr per long step. A ticker thread redraws the open bar every second, so a step without
    updates (loading a 2B model, a long prefill) still shows that it is running and for how long."""

    def __init__(self, a):
        p = getattr(a, "progress", None)
        self.on = sys.stderr.isatty() if p is None else bool(p)

    @contextlib.contextmanager
    def step(self, desc: str, total=None, unit: str = "it"):
        import threading

        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, disable=not self.on, file=sys.stderr, dynamic_ncols=True,
                   bar_format=None if total else "{desc}: {elapsed}")
        stop = threading.Event()

        def tick():
            while not stop.wait(1.0):
                bar.refresh()
        if self.on:
            threading.Thread(target=tick, daemon=True).start()
        try:
            yield bar
        finally:
            stop.set()
            bar.close()

    @contextlib.contextmanager
    def inspect(self, model, max_new_tokens: int):
        """Bars for the model calls inside `inspect()`, told apart by their inputs: the first call encodes the image
        and the prompt, one-token calls are generation steps (the KV cache holds the rest), a later full-length
        call is the teacher-forced capture pass."""
        state = {"n": 0, "ctx": None, "bar": None}

        def enter(desc, total=None, unit="it"):
            leave()
            state["ctx"] = self.step(desc, total, unit)
            state["bar"] = state["ctx"].__enter__()

        def leave():
            if state["ctx"] is not None:
                state["ctx"].__exit__(None, None, None)
                state["ctx"] = state["bar"] = None

        def pre(_mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            length = ids.shape[1] if ids is not None else 0
            if state["n"] == 0:
                enter("encode image + prompt")
            elif length != 1:
                enter("capture attention")
            elif state["n"] == 1:
                enter("generate", total=max_new_tokens, unit="tok")
                state["bar"].update(1)  # the first token came out of the encoding pass
            state["n"] += 1

        def post(_mod, args, kwargs, _out):
            if state["bar"] is not None and state["bar"].total:
                state["bar"].update(1)

        hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
                 model.register_forward_hook(post, with_kwargs=True)]
        try:
            yield
        finally:
            leave()
            for h in hooks:
                h.remove()


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="answer a question about an image and render where the model looked")
    p.add_argument("--image", required=True, help="path of a PNG/JPEG image")
    p.add_argument("--question", required=True, help="the question to ask")
    p.add_argument("--model", default="default", help="'default' (embedded), a model directory or a hub id (org/name)")
    _add_model_options(p)
    p.add_argument("--layer", type=int, default=-1, help="decoder layer for the overlay and head grid (default: last)")
    p.add_argument("--head", type=int, default=None, help="also render this single head")
    p.add_argument("--token", type=int, default=None,
                   help="answer token to show, counted from 1 as in the figure titles (default: mean over the answer)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-pixels", type=_pixels, default=None, metavar="N|WxH",
                   help="pixel budget per image before the vision tower, so fewer visual tokens (e.g. 401408 or "
                        "640x480): Qwen caps its smart resize, Idefics3/SmolVLM the tiled longest edge; LLaVA and "
                        "Gemma 3 take one fixed size (no effect); 0: the model's own setting (as in the app)")
    p.add_argument("--figsize", type=_figsize, default=None, metavar="W,H",
                   help="the box in pixels each figure must fit in, e.g. 1600,1200 (the image keeps its aspect "
                        "ratio inside it); default: sized from the image (an overlay's long side up to 900 px) "
                        "and, for the head grid, ~10 px per token")
    p.add_argument("--format", default="png", choices=["png", "svg"], help="figure file format")
    p.add_argument("--per-head-scale", action="store_true",
                   help="head grid: each head on its own colour scale (0 … its own max, noted per panel) instead "
                        "of one shared scale, so a few strong heads do not wash out the rest")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_inspect)


def _pixels(text: str) -> int:
    """'401408' or '640x480' (also 640*480) → a positive number of pixels; '0' → 0, the model's own setting."""
    if text.strip() == "0":
        return 0
    try:
        parts = [int(v) for v in text.lower().replace("*", "x").split("x")]
        n = parts[0] * (parts[1] if len(parts) == 2 else 1)
        assert len(parts) <= 2 and min(parts) > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a pixel count (N or WxH, positive; 0: the model's own)") from None
    return n


def _figsize(text: str) -> tuple[int, int]:
    """'1600,1200' → (1600, 1200) pixels, each side 100..10000."""
    try:
        w, h = (int(v) for v in text.replace("x", ",").split(","))
        assert 100 <= w <= 10_000 and 100 <= h <= 10_000
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not W,H in pixels (each 100..10000)") from None
    return w, h


def cmd_inspect(a) -> int:
    from ral_core import render
    from ral_core.errors import RALError
    from ral_core.images import load_image
    from ral_core.inspection import inspect
    from ral_core.limits import check_question, reserved_tokens

    if not a.question.strip():
        raise RALError("--question is empty; type a question about the image")
    if not 1 <= a.max_new_tokens <= 512:
        raise RALError("--max-new-tokens must be between 1 and 512")
    image = load_image(a.image)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RALError(f"cannot create output directory '{a.out}': {e.strerror}") from None
    adapter = _load(a, device="auto")
    _pixel_budget(a, adapter)
    n, attn = adapter.num_layers, adapter.attention_layers
    if not -len(attn) <= a.layer < n:
        raise RALError(f"--layer {a.layer} is out of range: the model has {n} decoder layers (0..{n - 1} or -1)")
    layer = adapter.resolve_layers([a.layer])[0]  # -1: the last layer with softmax attention (hybrid models)
    if a.head is not None and not 0 <= a.head < adapter.num_heads:
        raise RALError(f"--head {a.head} is out of range: the model has {adapter.num_heads} heads (0..{adapter.num_heads - 1})")
    question = check_question(adapter, a.question, reserved=reserved_tokens(adapter, image, a.max_new_tokens))
    steps = _Steps(a)
    t0 = time.perf_counter()
    with steps.inspect(adapter.model, a.max_new_tokens):
        res = inspect(adapter, image, question, max_new_tokens=a.max_new_tokens)
    if getattr(a, "timings", None) is not None:
        a.timings["inspect_s"] = time.perf_counter() - t0
    token = "mean" if a.token is None else a.token - 1  # counted from 1, as the figure titles count
    if a.token is not None and not 1 <= a.token <= res.n_tokens:
        raise RALError(f"--token {a.token} is out of range: the answer has {res.n_tokens} token(s) (1..{res.n_tokens})")
    res.save(out / "result")
    (out / "answer.txt").write_text(res.answer + "\n")
    ext, size = a.format, a.figsize
    figures = [(lambda: render.inspection_overlay(res, layer=layer, token=token, size_px=size), "overlay"),
               (lambda: render.head_grid(res, layer, token=token, shared_scale=not a.per_head_scale, size_px=size),
                "heads"),
               (lambda: render.layer_head_summary(res, token=token, size_px=size), "layers_heads")]
    if a.head is not None:
        figures.append((lambda: render.inspection_overlay(res, layer=layer, head=a.head, token=token, size_px=size),
                        f"head{a.head}"))
    files = []
    with steps.step("render figures", total=len(figures), unit="fig") as bar:
        for draw, name in figures:
            files.append(render.save_figure(draw(), out / f"{name}.{ext}"))
            bar.update(1)
    m = res.mass_split(layer=layer, token=token)
    print(f"answer: {res.answer!r}")
    print(f"visual tokens: {res.geometry.n_tokens} for the {image.width}×{image.height} image")
    print(f"layer {layer} attention mass: image {m['image']:.3f} · prompt text {m['prompt_text']:.3f} · "
          f"answer {m['answer']:.3f}")
    print("wrote: " + ", ".join(str(f) for f in files + [out / "answer.txt", out / "result"]))
    return 0


def _pixel_budget(a, adapter):
    """--max-pixels: a cap, or 0 for the model's own setting (what the app's 0 means)."""
    if a.max_pixels is None:
        return
    note = adapter.set_max_pixels(a.max_pixels or None)
    if not a.max_pixels:
        note = "the model's own setting"
    print(f"--max-pixels {a.max_pixels}: {note}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line (its default prints the usage block first); exit code 2 as before."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _check_args(a):
    """Cheap checks of any command's arguments, before a model or data set is loaded, so that a bad input is
    refused at once (a 1,000,000-character question used to run for minutes)."""
    import math

    from ral_core.errors import RALError
    from ral_core.limits import check_question_length

    if getattr(a, "question", None) is not None:
        check_question_length(a.question)
    if a.cmd == "train":  # the whole config, before torch and the trainer are imported (seconds)
        from ral_core.config import build_config
        build_config(a.config, a.overrides)
    if a.cmd == "levers":
        if not 1 <= a.n <= 1000:
            raise RALError(f"--n must be between 1 and 1000 (got {a.n})")
        if not (math.isfinite(a.strength) and 0 < a.strength <= 100):
            raise RALError(f"--strength must be a number in (0, 100] (got {a.strength})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ral", description="RAL workbench: see, train and compare VLM attention")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_inspect(sub)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


def _add_train(sub):
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


def _add_eval(sub):
    p = sub.add_parser("eval", help="held-out accuracy and where the model looks on the grounding task")
    p.add_argument("--model", default="default", help="'default', a model or checkpoint directory, or a hub id")
    _add_model_options(p)
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
    adapter = _load(a)
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


def _add_levers(sub):
    p = sub.add_parser("levers", help="causal-lever map: which layers' attention moves the answer")
    p.add_argument("--model", default="default")
    _add_model_options(p)
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

    adapter = _load(a)
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


def _add_compare(sub):
    p = sub.add_parser("compare", help="two models on one image and question: A | B | B − A, the heads that moved "
                                       "and how far attention moved")
    p.add_argument("model_a", help="model A, which answers: 'default', a model or checkpoint directory, or a hub id")
    p.add_argument("model_b", help="model B, scored on A's answer")
    p.add_argument("--image", required=True, help="path of a PNG/JPEG image")
    p.add_argument("--question", required=True, help="the question to ask")
    _add_model_options(p)
    p.add_argument("--layer", default="-1", help="decoder layer (default -1: the last), or 'mean' for the mean over "
                                                 "layers (the heads are then ranked at the last layer)")
    p.add_argument("--token", type=int, default=None,
                   help="answer token, counted from 1 as in the figure titles (default: mean over the answer)")
    p.add_argument("--row", default="predicts", choices=["predicts", "own"],
                   help="attention row: the query that predicts each answer token, or the token's own")
    p.add_argument("--magnify", default="1",
                   help="divide the B − A panel's colour range by this factor (≥ 1) or 'auto' (the largest change "
                        "fills it); the title states the factor. Default 1: the A/B maps' own scale")
    p.add_argument("--box", action="append", default=None, metavar="x0,y0,x1,y1",
                   help="target region in pixels (repeatable): on-target mass A → B; default: the bundled "
                        "example's box when the image and question are one of assets/examples")
    p.add_argument("--expected", default=None, help="expected answer to show (default: the bundled example's)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-pixels", type=_pixels, default=None, metavar="N|WxH",
                   help="pixel budget per image for both models (as `ral inspect`); 0: the models' own setting")
    p.add_argument("--knockout", action="store_true",
                   help="also knock out every head of the layer in both models (on A's answer) and rank the heads by "
                        "how much their knock-out effect changed A → B (heads_causal.csv; see `ral causal`)")
    p.add_argument("--format", default="png", choices=["png", "svg"], help="figure file format")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a) -> int:
    from ral_core import render
    from ral_core.compare import bundled_example, compare, comparison_figure, heads_table, magnitude, parse_magnify
    from ral_core.errors import RALError
    from ral_core.images import load_image
    from ral_core.limits import check_question, reserved_tokens
    from ral_core.models import load_adapter

    if not a.question.strip():
        raise RALError("--question is empty; type a question about the image")
    if not 1 <= a.max_new_tokens <= 512:
        raise RALError("--max-new-tokens must be between 1 and 512")
    magnify = parse_magnify(a.magnify)
    layer_arg = a.layer.strip().lower()
    if layer_arg != "mean":
        try:
            layer_arg = int(layer_arg)
        except ValueError:
            raise RALError(f"--layer must be a layer number (-1: the last) or 'mean'; got {a.layer!r}") from None
    image = load_image(a.image)
    boxes = []
    for text in a.box or []:
        try:
            b = tuple(float(v) for v in text.split(","))
            assert len(b) == 4 and b[0] < b[2] and b[1] < b[3]
        except (ValueError, AssertionError):
            raise RALError(f"--box must be four numbers x0,y0,x1,y1 with x0 < x1 and y0 < y1; got {text!r}") from None
        boxes.append(b)
    ex = bundled_example(image, a.question) or {}
    boxes = boxes or [tuple(b) for b in ex.get("boxes") or []]
    expected = a.expected if a.expected is not None else ex.get("answer")
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RALError(f"cannot create output directory '{a.out}': {e.strerror}") from None
    steps = _Steps(a)
    adapters = []
    for spec in (a.model_a, a.model_b):
        with steps.step(f"load {spec}"):
            ad = load_adapter(spec, device="auto", dtype=a.dtype, allow_download=a.allow_download or None)
        _pixel_budget(a, ad)
        ad.name = spec
        adapters.append(ad)
    question = check_question(adapters[0], a.question,
                              reserved=reserved_tokens(adapters[0], image, a.max_new_tokens))
    with steps.step("A answers; A and B scored on A's answer"):
        cmp = compare(adapters[0], adapters[1], image, question, max_new_tokens=a.max_new_tokens)
    if not cmp.layers:
        raise RALError(f"the two models have no attention layer in common (A: {cmp.a.layers}, B: {cmp.b.layers})")
    if layer_arg == "mean":
        layer = "mean"
    elif -len(cmp.layers) <= layer_arg < 0:
        layer = cmp.layers[layer_arg]
    elif layer_arg in cmp.layers:
        layer = layer_arg
    else:
        raise RALError(f"--layer {a.layer} is not a layer both models captured: {cmp.layers} (or -1, 'mean')")
    token = "mean"
    if a.token is not None:
        if not 1 <= a.token <= cmp.a.n_tokens:
            raise RALError(f"--token {a.token} is out of range: the answer has {cmp.a.n_tokens} token(s) "
                           f"(1..{cmp.a.n_tokens})")
        token = a.token - 1
    sel = dict(layer=layer, token=token, row=a.row)
    m = magnitude(cmp, boxes=boxes, expected=expected, **sel)
    rows = heads_table(cmp, **sel)
    cmp.a.save(out / "results" / "model_a")
    cmp.b.save(out / "results" / "model_b")
    fig_path = render.save_figure(comparison_figure(cmp, magnify=magnify, boxes=boxes, expected=expected, **sel),
                                  out / f"compare.{a.format}")
    import csv
    with open(out / "heads.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "magnitude.json").write_text(json.dumps(m.to_dict(), indent=1))
    (out / "magnitude.txt").write_text(m.line() + "\n")
    print(f"A ({a.model_a}) answers: {cmp.free_answer_a!r}")
    print(f"B ({a.model_b}) answers: {cmp.free_answer_b!r}")
    print("both maps are measured on A's answer tokens, fed to both models")
    print(m.line())
    print(f"heads that moved most at layer {rows[0]['layer']} (JSD, image share A → B):")
    for r in rows[:5]:
        print(f"  {r['rank']:>2}. head {r['head']:<3} {r['jsd']:.3g}   {r['image_a']:.3f} → {r['image_b']:.3f}")
    if a.knockout:
        _compare_knockout(a, cmp, adapters, image, question, rows[0]["layer"], token, out)
    print("wrote: " + ", ".join(str(p) for p in (fig_path, out / "heads.csv", out / "magnitude.txt",
                                                 out / "magnitude.json", out / "results")))
    return 0


def _compare_knockout(a, cmp, adapters, image, question, layer, token, out):
    """Both models' knock-out grids of `layer` on A's answer: heads ranked by how far their attention moved and by
    how much their knock-out effect changed (ral_core.causal.heads_moved_and_mattered) → heads_causal.csv."""
    import csv

    from ral_core.causal import heads_moved_and_mattered, knockout

    with _Steps(a).step("knock out every head of both models"):
        ka, kb = (knockout(ad, image, question, r.answer_ids, layers=[layer])
                  for ad, r in zip(adapters, (cmp.a, cmp.b)))
    rows = heads_moved_and_mattered(cmp, ka, kb, layer, token=token, row=a.row)
    with open(out / "heads_causal.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"heads whose knock-out effect changed most at layer {layer} (Δ log p A → B; attention-moved rank):")
    for r in rows[:5]:
        print(f"  {r['rank_effect_change']:>2}. head {r['head']:<3} {r['knockout_a']:+.4f} → {r['knockout_b']:+.4f}"
              f"   moved rank {r['rank_moved']}")
    print(f"wrote: {out / 'heads_causal.csv'}")


def _add_causal(sub):
    p = sub.add_parser("causal", help="does this head matter? head knock-out grid, region blocking and attention sinks")
    p.add_argument("--image", default=None, help="path of a PNG/JPEG image")
    p.add_argument("--question", default=None, help="the question to ask")
    p.add_argument("--model", default="default", help="'default' (embedded), a model directory or a hub id (org/name)")
    _add_model_options(p)
    p.add_argument("--answer", default=None, help="answer to score (default: the model's greedy answer)")
    p.add_argument("--layers", default="all", help="layers of the knock-out grid: 'all', 'last', 'none' or numbers "
                                                   "such as 0,3,-1")
    p.add_argument("--chunk", type=int, default=None,
                   help="knock-out variants per forward (default: the number of heads, one forward per layer)")
    p.add_argument("--box", action="append", default=None, metavar="x0,y0,x1,y1",
                   help="block the answer's attention to this region, in image pixels (repeatable: their union); "
                        "default: the bundled example's box when the image and question are one of assets/examples")
    p.add_argument("--block-layers", default="all", help="layers where the region is blocked ('all', 'last', numbers)")
    p.add_argument("--token", type=int, default=None,
                   help="answer token for the figures, counted from 1 (default: mean over the answer)")
    p.add_argument("--sink-eps", type=float, default=0.3, help="a head sinks into a token taking more than this share "
                                                               "of its row (Gu et al. 2025's ε)")
    p.add_argument("--sink-share", type=float, default=0.5, help="a token is a sink when more than this share of the "
                                                                 "heads sink into it")
    p.add_argument("--lens", default=None, metavar="LAYERS",
                   help="logit lens over the image tokens at these decoder layers ('all', 'last' or numbers): each "
                        "patch's top token through the final norm and LM head (lens_layerN.png)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--format", default="png", choices=["png", "svg"], help="figure file format")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="re-render a saved result (OUT/result of an earlier run) without the model")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_causal)


def _layer_list(text: str, flag: str):
    """'all' | 'last' | 'none' (None) | '0,3,-1' → a layer spec for adapter.resolve_layers."""
    from ral_core.causal import parse_layers
    return parse_layers(text, flag)


def cmd_causal(a) -> int:
    import csv

    from ral_core import causal, render
    from ral_core.errors import RALError
    from ral_core.inspection import InspectionResult

    out = Path(a.out)
    if a.from_dir:
        res, c = InspectionResult.load(a.from_dir), causal.CausalResult.load(a.from_dir)
    else:
        res, c = _run_causal(a)
    if not (0 < a.sink_eps < 1 and 0 <= a.sink_share < 1):
        raise RALError("--sink-eps must lie in (0, 1) and --sink-share in [0, 1)")
    c.sinks = causal.detect_sinks(res, a.sink_eps, a.sink_share)
    token = "mean"
    if a.token is not None:
        if not 1 <= a.token <= res.n_tokens:
            raise RALError(f"--token {a.token} is out of range: the answer has {res.n_tokens} token(s) "
                           f"(1..{res.n_tokens})")
        token = a.token - 1
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RALError(f"cannot create output directory '{a.out}': {e.strerror}") from None
    if not a.from_dir:
        res.save(out / "result")
    c.save(out / "result")
    ext, files = a.format, []
    files.append(render.save_figure(render.sink_overlay(res, c.sinks, token=token), out / f"sinks.{ext}"))
    files.append(render.save_figure(render.sink_overlay(res, c.sinks, token=token, clean=True),
                                    out / f"sinks_clean.{ext}"))
    ko = c.knockout
    print(f"answer: {res.answer!r}")
    if ko is not None:
        files.append(render.save_figure(render.knockout_grid(ko, token=token), out / f"knockout.{ext}"))
        with open(out / "knockout.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "layer", "head", "delta_logp_mean"] + [f"delta_logp_token{t + 1}"
                                                                        for t in range(ko.delta.shape[-1])])
            for r, (layer, head, _) in enumerate(ko.ranked("mean"), 1):
                d = ko.delta[ko.layers.index(layer), head]
                w.writerow([r, layer, head, f"{d.mean():.6g}"] + [f"{v:.6g}" for v in d])
        files.append(out / "knockout.csv")
        print(f"knock-out grid: {len(ko.layers)} layers × {ko.num_heads} heads in {ko.forwards} forwards "
              f"(one per head: {ko.naive_forwards}), {ko.seconds:.1f} s")
        print("heads the answer needs most (Δ log p per answer token when knocked out):")
        for layer, head, d in ko.ranked(token, n=5):
            print(f"  layer {layer:>3} head {head:>3}  {d:+.4f}")
    for i, b in enumerate(c.blocks):
        files.append(render.save_figure(render.blocking_overlay(res, b), out / f"blocking{i or ''}.{ext}"))
        print(b.line())
    for layer in c.lens.layers if c.lens else []:
        files.append(render.save_figure(render.logit_lens_overlay(res, c.lens, layer),
                                        out / f"lens_layer{layer}.{ext}"))
    print(f"sinks: {len(c.sinks.tokens)} visual token(s) {c.sinks.tokens[:10]}" if c.sinks.tokens else "sinks: none")
    print("wrote: " + ", ".join(str(f) for f in files + [out / "result"]))
    return 0


def _run_causal(a):
    from ral_core import causal
    from ral_core.compare import bundled_example
    from ral_core.errors import RALError
    from ral_core.images import load_image
    from ral_core.inspection import inspect
    from ral_core.limits import check_question, reserved_tokens

    if not a.image or not a.question or not a.question.strip():
        raise RALError("give --image and --question (or --from DIR to re-render a saved result)")
    if not 1 <= a.max_new_tokens <= 512:
        raise RALError("--max-new-tokens must be between 1 and 512")
    if a.chunk is not None and a.chunk < 1:
        raise RALError("--chunk must be at least 1")
    knock, block = _layer_list(a.layers, "--layers"), _layer_list(a.block_layers, "--block-layers")
    lens_spec = _layer_list(a.lens, "--lens") if a.lens else None
    image = load_image(a.image)
    boxes = []
    for text in a.box or []:
        try:
            b = [float(v) for v in text.split(",")]
            assert len(b) == 4
        except (ValueError, AssertionError):
            raise RALError(f"--box must be four numbers x0,y0,x1,y1; got {text!r}") from None
        boxes.append(b)
    boxes = boxes or [list(b) for b in (bundled_example(image, a.question) or {}).get("boxes") or []]
    adapter = _load(a, device="auto")
    question = check_question(adapter, a.question, reserved=reserved_tokens(adapter, image, a.max_new_tokens))
    for spec in (knock, block):
        if spec is not None:
            adapter.resolve_layers(spec)
    steps = _Steps(a)
    with steps.step("answer and capture"):
        res = inspect(adapter, image, question, max_new_tokens=a.max_new_tokens, forced_answer=a.answer)
    ko = None
    if knock is not None:
        with steps.step("knock-out grid", unit="forward") as bar:
            def progress(done, total):
                bar.total = total
                bar.n = done
                bar.refresh()
            ko = causal.knockout(adapter, image, question, res.answer_ids, layers=knock, chunk=a.chunk,
                                 progress=progress)
    blocks = []
    if boxes and block is not None:
        with steps.step("region blocking"):
            blocks.append(causal.block_region(adapter, image, question, res.answer_ids, boxes, layers=block,
                                              max_new_tokens=a.max_new_tokens))
    lens = None
    if lens_spec is not None:
        n = adapter.num_layers
        lens_layers = None if lens_spec == "all" else [n - 1] if lens_spec == "last" else lens_spec
        if lens_layers is not None and not lens_layers:
            raise RALError("--lens needs 'all', 'last' or layer numbers")
        with steps.step("logit lens"):
            lens = causal.logit_lens(adapter, image, question, layers=lens_layers)
    return res, causal.CausalResult(knockout=ko, blocks=blocks, lens=lens, meta={"model_name": res.model_name})


_EXTRA_COMMANDS: list = [_add_train, _add_eval, _add_levers, _add_compare, _add_causal]


def main(argv=None, adapter=None, timings: dict | None = None) -> int:
    """Run one command. For callers in Python (benchmarks): `adapter` is used instead of loading --model, and
    `timings` receives the seconds of the model work (`inspect_s`: inspect() without the figures)."""
    from ral_core import settings
    from ral_core.errors import RALError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line): a code, in-process too
        return e.code if isinstance(e.code, int) else 2
    args.adapter, args.timings = adapter, timings
    try:
        _check_args(args)
        import torch
        torch.set_num_threads(settings.get("RAL_THREADS", min(4, os.cpu_count() or 1)))
        return args.func(args) or 0
    except RALError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — last resort: one line, not a traceback
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
