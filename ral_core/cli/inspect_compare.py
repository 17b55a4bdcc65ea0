"""`ral inspect` (one model: its answer and where it looked) and `ral compare` (two models on one image and
question: A | B | B − A, the heads that moved, optionally their knock-out effects)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ral_core.cli.common import Steps, add_model_options, figure_size, load_model, apply_pixel_budget, pixel_count


def add_inspect(sub):
    p = sub.add_parser("inspect", help="answer a question about an image and render where the model looked")
    p.add_argument("--image", required=True, help="path of a PNG/JPEG image")
    p.add_argument("--question", required=True, help="the question to ask")
    p.add_argument("--model", default="default", help="'default' (embedded), a model directory or a hub id (org/name)")
    add_model_options(p)
    p.add_argument("--layer", type=int, default=-1, help="decoder layer for the overlay and head grid (default: last)")
    p.add_argument("--head", type=int, default=None, help="also render this single head")
    p.add_argument("--token", type=int, default=None,
                   help="answer token to show, counted from 1 as in the figure titles (default: mean over the answer)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-pixels", type=pixel_count, default=None, metavar="N|WxH",
                   help="pixel budget per image before the vision tower, so fewer visual tokens (e.g. 401408 or "
                        "640x480): Qwen caps its smart resize, Idefics3/SmolVLM the tiled longest edge; LLaVA and "
                        "Gemma 3 take one fixed size (no effect); 0: the model's own setting (as in the app)")
    p.add_argument("--figsize", type=figure_size, default=None, metavar="W,H",
                   help="the box in pixels each figure must fit in, e.g. 1600,1200 (the image keeps its aspect "
                        "ratio inside it); default: sized from the image (an overlay's long side up to 900 px) "
                        "and, for the head grid, ~10 px per token")
    p.add_argument("--format", default="png", choices=["png", "svg"], help="figure file format")
    p.add_argument("--per-head-scale", action="store_true",
                   help="head grid: each head on its own colour scale (0 … its own max, noted per panel) instead "
                        "of one shared scale, so a few strong heads do not wash out the rest")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_inspect)


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
    adapter = load_model(a, device="auto")
    apply_pixel_budget(a, adapter)
    n, attn = adapter.num_layers, adapter.attention_layers
    if not -len(attn) <= a.layer < n:
        raise RALError(f"--layer {a.layer} is out of range: the model has {n} decoder layers (0..{n - 1} or -1)")
    layer = adapter.resolve_layers([a.layer])[0]  # -1: the last layer with softmax attention (hybrid models)
    if a.head is not None and not 0 <= a.head < adapter.num_heads:
        raise RALError(f"--head {a.head} is out of range: the model has {adapter.num_heads} heads (0..{adapter.num_heads - 1})")
    question = check_question(adapter, a.question, reserved=reserved_tokens(adapter, image, a.max_new_tokens))
    steps = Steps(a)
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


def add_compare(sub):
    p = sub.add_parser("compare", help="two models on one image and question: A | B | B − A, the heads that moved "
                                       "and how far attention moved")
    p.add_argument("model_a", help="model A, which answers: 'default', a model or checkpoint directory, or a hub id")
    p.add_argument("model_b", help="model B, scored on A's answer")
    p.add_argument("--image", required=True, help="path of a PNG/JPEG image")
    p.add_argument("--question", required=True, help="the question to ask")
    add_model_options(p)
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
    p.add_argument("--max-pixels", type=pixel_count, default=None, metavar="N|WxH",
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
    steps = Steps(a)
    adapters = []
    for spec in (a.model_a, a.model_b):
        with steps.step(f"load {spec}"):
            ad = load_adapter(spec, device="auto", dtype=a.dtype, allow_download=a.allow_download or None)
        apply_pixel_budget(a, ad)
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

    with Steps(a).step("knock out every head of both models"):
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
