"""Build a shape twin of a real vision-language model as a model folder that `ral`, the app (app/models.yaml) and
`load_adapter` load like any other: the real transformers class at the published shapes (assets/twins/<name>/),
**random weights**, the family's image processor at the published settings, a tokenizer of the real vocabulary size.
A twin reproduces sizes, visual tokens, memory and time (and so the README's real-size screenshots), never answers.

    python scripts/build_twin.py --list
    python scripts/build_twin.py qwen2_vl_2b --out twins/qwen2_vl_2b                    # full size, bf16 (≈ 4.4 GB)
    python scripts/build_twin.py qwen2_vl_2b --out twins/q2 --text-layers 2 --vision-depth 2 --dtype float32
    ral inspect --model twins/qwen2_vl_2b --image assets/examples/photos/chelsea.jpg \\
        --question "What animal is in the picture?" --out out/twin

Same seed, same weights. twin_info.json in the folder says what it is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from ral_core.builders.twins import TWINS, build_twin, describe, parameter_count, twin_names

    p = argparse.ArgumentParser(description="Build a random-weight shape twin of a real VLM as a model folder.")
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(twin_names())}")
    p.add_argument("--out", help="folder to write (must be new or empty)")
    p.add_argument("--text-layers", type=int, default=None, help="cut to this many decoder layers (default: all)")
    p.add_argument("--vision-depth", type=int, default=None, help="cut to this many vision blocks (default: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="stored weights (bfloat16: half the disk and memory of float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the twins and their shapes")
    a = p.parse_args(argv)
    if a.list or not a.name:
        for n in twin_names():
            d = describe(n)
            print(f"{n:<16} {d['repo']:<40} {d['family']:<11} {d['layers']} layers, {d['heads']} heads, "
                  f"hidden {d['hidden']}")
        return 0 if a.list else 2
    if a.name not in TWINS:
        print(f"error: unknown twin '{a.name}'; choose one of: {', '.join(twin_names())}", file=sys.stderr)
        return 2
    if not a.out:
        print("error: --out is required: the folder to write the twin into", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: '{out}' is not empty; choose a new folder", file=sys.stderr)
        return 2
    for flag, v in (("--text-layers", a.text_layers), ("--vision-depth", a.vision_depth)):
        if v is not None and v < 1:
            print(f"error: {flag} must be at least 1", file=sys.stderr)
            return 2
    import torch

    dtype = getattr(torch, a.dtype)
    adapter = build_twin(a.name, text_layers=a.text_layers, vision_depth=a.vision_depth, dtype=dtype, seed=a.seed)
    out.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(out)
    adapter.tokenizer.save_pretrained(out)
    adapter.image_processor.save_pretrained(out)
    info = {"twin_of": TWINS[a.name][0], "family": TWINS[a.name][1], "weights": "random (no trained weights)",
            "seed": a.seed, "dtype": a.dtype, "text_layers": a.text_layers or "all", "vision_depth":
            a.vision_depth or "all", "parameters": parameter_count(adapter), "settings": f"assets/twins/{a.name}/",
            "command": "python scripts/build_twin.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "twin_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}: twin of {info['twin_of']}, {info['parameters']:,} parameters, random weights ({a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
