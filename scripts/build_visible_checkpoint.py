"""Build the bundled "after" model, assets/trained_model: the embedded default model trained by the default visible
run (`ral train` with RECIPE and SEED below), so Compare has a real before/after pair offline and on a Space where
training is refused. Only the weights, tokenizer and processor are kept (no optimizer state): the same size as
assets/default_model.

    python scripts/build_visible_checkpoint.py                  # (re)build assets/trained_model
    python scripts/build_visible_checkpoint.py --check          # rebuild into a temporary folder, compare the weights
    python scripts/build_visible_checkpoint.py --recipe grpo --seed 1 --set steps=20   # another run, same pipeline

Training runs as `ral train` does, in one process with one thread, so a rebuild on the same machine gives the same
weights bit for bit (`--check` says whether it did; floats differ across machines). training_info.json records the
recipe (name, file hash and every resolved value), the seed, the command, the weights' SHA-256, the training time,
held-out accuracy of both models (`ral eval`) and the magnitude line of `ral compare default <this>` on each bundled
digit-grid example.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "trained_model"
RECIPE, SEED = "grounded", 0  # the default visible run: `ral train` (recipe grounded, seed 0)
KEEP = ("config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_file(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") and p.exists() else ROOT / "assets" / "recipes" / f"{name}.yaml"


def train(out: Path, recipe: str, seed: int, overrides: list[str]) -> dict:
    """`ral train` into a scratch folder, then keep the final checkpoint's model files in `out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAL_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        # exactly the run a user starts (its snapshots and checkpoints too), only without the figures
        args = ["train", "--config", recipe, "--no-figures", f"seed={seed}", f"output_dir={tmp}/run", *overrides]
        t0, c0 = time.perf_counter(), os.times()
        subprocess.run([sys.executable, "-m", "ral_core.cli", *args], check=True, cwd=ROOT, env=env)
        c1 = os.times()
        wall = time.perf_counter() - t0
        ck = Path(tmp) / "run" / "checkpoints"
        final = ck / (ck / "latest").read_text().strip()
        cfg = (final / "train_config.yaml").read_text()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in KEEP:
            if (final / name).exists():
                shutil.copy2(final / name, out / name)
    import yaml
    return {"base_model": "default", "recipe": recipe, "recipe_sha256": sha256(recipe_file(recipe)), "seed": seed,
            "overrides": overrides, "command": "ral " + " ".join(a for a in args if not a.startswith("output_dir=")),
            "config": yaml.safe_load(cfg), "train_wall_s": round(wall, 1),
            "train_cpu_s": round((c1.children_user + c1.children_system) - (c0.children_user + c0.children_system), 1),
            "weights_sha256": sha256(out / "model.safetensors")}


def measure(out: Path, eval_n: int) -> dict:
    """Held-out accuracy of default and this model, and how far attention moved on each bundled digit example."""
    import torch

    from ral_core.compare import EXAMPLES_DIR, compare, magnitude
    from ral_core.data import GroundingTask
    from ral_core.evaluate import evaluate
    from ral_core.images import load_image
    from ral_core.models import load_adapter

    torch.set_num_threads(1)
    a, b = load_adapter("default"), load_adapter(str(out))
    a.name, b.name = "default", out.name
    moved = []
    for ex in json.loads((EXAMPLES_DIR / "examples.json").read_text()):
        cmp = compare(a, b, load_image(EXAMPLES_DIR / ex["image"]), ex["question"])
        m = magnitude(cmp, layer=cmp.layers[-1], boxes=ex.get("boxes") or [], expected=ex.get("answer"))
        moved.append({"image": ex["image"], "question": ex["question"], "head_jsd": round(m.head_jsd, 5),
                      "target_a": m.target_a, "target_b": m.target_b, "visible": m.visible, "line": m.line()})
    info = {"bundled_examples": moved}
    if eval_n:
        task = GroundingTask(kinds=("cell", "row", "where"), split="test")
        ev = {}
        for name, ad in (("default", a), ("trained", b)):
            r = evaluate(ad, task, eval_n)
            ev[name] = {k: round(float(r[k]), 4) for k in ("accuracy", "target_mass", "target_share")}
        info["held_out"] = dict(ev, n=eval_n, split="test", kinds="cell,row,where", layer="last")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=RECIPE, help="recipe name in assets/recipes or a YAML file")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (repeatable), as `ral train` takes them")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--eval-n", type=int, default=400, help="held-out samples for the accuracy in training_info.json")
    p.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare the weights")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.check:
        want = json.loads((out / "training_info.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            got = train(Path(tmp) / "m", want["recipe"], want["seed"], want.get("overrides", []))
        same = got["weights_sha256"] == want["weights_sha256"]
        print(f"rebuilt weights {'match' if same else 'DIFFER from'} {out}/model.safetensors "
              f"({got['weights_sha256'][:12]} vs {want['weights_sha256'][:12]})")
        return 0 if same else 1
    info = train(out, a.recipe, a.seed, a.overrides)
    info.update(measure(out, a.eval_n))
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    for m in info["bundled_examples"]:
        print(f"{m['question']!r}: {m['line']}")
    if "held_out" in info:
        print("held-out accuracy: default {default[accuracy]:.3f} → trained {trained[accuracy]:.3f}".format(
            **info["held_out"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
