"""Build the bundled OPAD / distillation teacher, assets/teacher_model: the default model's architecture with 6
decoder layers instead of 4 (the same vision tower architecture, tokenizer and image processing; weights of its own),
trained from a fixed seed for 4,500 supervised steps on the recipes' own task — 3×3 digit grids, cell, row and
"where" questions. OPAD reads a deeper teacher at the same relative depth (last layer ↔ last layer).

    python scripts/build_teacher_model.py                 # (re)build assets/teacher_model
    python scripts/build_teacher_model.py --check         # rebuild into a temporary folder, compare the weights

Why this one: a teacher for OPAD must know where to look better than the student does. The 4-layer default model
continued with supervised steps stays near chance on "where" questions (600 steps: held-out 0.705, "where" 0.234,
against the student's 0.690 / 0.219), so it distils a near-equal model; the evidence benchmark's 4×3 teacher scores
0.547 here. Two more decoder layers learn the grid's routing (held-out accuracy and per-kind figures in
training_info.json).

Training is deterministic on one machine (fixed seed, one thread, a step count well inside the time cap), so a
rebuild gives the same weights bit for bit; `--check` says whether it did. training_info.json adds the command and
the weights' SHA-256.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "teacher_model"
ARGS = ["--layers", "6", "--rows", "3", "--cols", "3", "--kinds", "cell,row,where", "--steps", "4500",
        "--minutes", "120"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "scripts/train_default_model.py", "--out", str(out), *ARGS], check=True, cwd=ROOT,
                   env=env)
    info = json.loads((out / "training_info.json").read_text())
    if info["steps"] != info["steps_planned"]:
        sys.exit("the time cap stopped training early: the teacher would not be reproducible; rerun on a quieter "
                 "machine")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare the weights "
                                                        "with assets/teacher_model")
    a = p.parse_args()
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            train(Path(tmp))
            new, old = sha256(Path(tmp) / "model.safetensors"), sha256(OUT / "model.safetensors")
        print(f"rebuilt {new}\nbundled {old}\n" + ("identical" if new == old else "DIFFERENT"))
        sys.exit(0 if new == old else 1)
    tmp = OUT.with_name(".teacher_model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train(tmp)
    info = json.loads((tmp / "training_info.json").read_text())
    info["command"] = "python scripts/build_teacher_model.py"
    info["args"]["out"] = str(OUT.relative_to(ROOT))
    info["weights_sha256"] = sha256(tmp / "model.safetensors")
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(OUT, ignore_errors=True)
    os.replace(tmp, OUT)
    print(f"teacher in {OUT.relative_to(ROOT)}: held-out {info['test_accuracy']['accuracy']:.3f} "
          f"{info['test_accuracy']['per_kind']}")


if __name__ == "__main__":
    main()
