"""`ral` command line: inspect (and, as the engine grows, train / eval). Errors are one clear line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="answer a question about an image and render where the model looked")
    p.add_argument("--image", required=True, help="path of a PNG/JPEG image")
    p.add_argument("--question", required=True, help="the question to ask")
    p.add_argument("--model", default="default", help="'default' (embedded), a model directory or a cached hub id")
    p.add_argument("--layer", type=int, default=-1, help="decoder layer for the overlay and head grid (default: last)")
    p.add_argument("--head", type=int, default=None, help="also render this single head")
    p.add_argument("--token", type=int, default=None, help="answer token to show (default: mean over the answer)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a) -> int:
    from ral_core import render
    from ral_core.errors import RALError
    from ral_core.images import load_image
    from ral_core.inspection import inspect
    from ral_core.models import load_adapter

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
    adapter = load_adapter(a.model)
    n = adapter.num_layers
    if not -n <= a.layer < n:
        raise RALError(f"--layer {a.layer} is out of range: the model has {n} decoder layers (0..{n - 1} or -1)")
    layer = a.layer % n
    if a.head is not None and not 0 <= a.head < adapter.num_heads:
        raise RALError(f"--head {a.head} is out of range: the model has {adapter.num_heads} heads (0..{adapter.num_heads - 1})")
    res = inspect(adapter, image, a.question, max_new_tokens=a.max_new_tokens)
    token = "mean" if a.token is None else a.token
    if a.token is not None and not 0 <= a.token < res.n_tokens:
        raise RALError(f"--token {a.token} is out of range: the answer has {res.n_tokens} token(s)")
    res.save(out / "result")
    (out / "answer.txt").write_text(res.answer + "\n")
    files = [render.save_figure(render.inspection_overlay(res, layer=layer, token=token), out / "overlay.png"),
             render.save_figure(render.head_grid(res, layer, token=token), out / "heads.png")]
    if a.head is not None:
        files.append(render.save_figure(render.inspection_overlay(res, layer=layer, head=a.head, token=token),
                                        out / f"head{a.head}.png"))
    m = res.mass_split(layer=layer, token=token)
    print(f"answer: {res.answer!r}")
    print(f"layer {layer} attention mass: image {m['image']:.3f} · prompt text {m['prompt_text']:.3f} · "
          f"answer {m['answer']:.3f}")
    print("wrote: " + ", ".join(str(f) for f in files + [out / "answer.txt", out / "result"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ral", description="RAL workbench: see, train and compare VLM attention")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_inspect(sub)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


_EXTRA_COMMANDS: list = []


def main(argv=None) -> int:
    from ral_core.errors import RALError

    args = build_parser().parse_args(argv)
    try:
        import torch
        torch.set_num_threads(int(os.environ.get("RAL_THREADS", min(4, os.cpu_count() or 1))))
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
