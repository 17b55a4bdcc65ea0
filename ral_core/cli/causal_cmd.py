"""`ral causal`: does this head matter? The head knock-out grid, region blocking, attention sinks and the logit lens,
or a saved result re-rendered without the model."""
from __future__ import annotations

from pathlib import Path

from ral_core.cli.common import Steps, add_model_options, load_model


def add_causal(sub):
    p = sub.add_parser("causal", help="does this head matter? head knock-out grid, region blocking and attention sinks")
    p.add_argument("--image", default=None, help="path of a PNG/JPEG image")
    p.add_argument("--question", default=None, help="the question to ask")
    p.add_argument("--model", default="default", help="'default' (embedded), a model directory or a hub id (org/name)")
    add_model_options(p)
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
    adapter = load_model(a, device="auto")
    question = check_question(adapter, a.question, reserved=reserved_tokens(adapter, image, a.max_new_tokens))
    for spec in (knock, block):
        if spec is not None:
            adapter.resolve_layers(spec)
    steps = Steps(a)
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
