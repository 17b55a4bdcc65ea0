"""The evidence benchmark's run matrix and its second-checkpoint recipe (the runs themselves live in bench/)."""
import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _evidence():
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "bench" / "evidence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(model="default", teacher="T3", checkpoints="W", seeds=3, explore_seeds=5, explore_tasks="read3,cell3,cell4", steps=12,
                n_eval=150, methods="", tasks="", tag="t")
    ev = _evidence()
    base["methods"], base["tasks"] = ",".join(ev.METHODS), ",".join(ev.TASKS)
    base.update(kw)
    return ev, Namespace(**base)


def test_plan_gives_the_exploration_comparison_more_seeds_and_the_4x4_tasks_their_checkpoints():
    ev, args = _args()
    jobs = ev.plan(args)
    seeds = {}
    for j in jobs:
        seeds.setdefault((j["task"], j["method"]), set()).add(j["seed"])
        four = ev.TASKS[j["task"]]["grid_rows"] == 4
        assert j["model"] == ("default" if not four else "W/sft4s" if j["task"] == "cell4" else "W/sft4")
        assert j["teacher"] == ("W/teacher4_l6" if four else "T3")
    for (t, m), s in seeds.items():
        want = 5 if (m in ev.EXPLORE_SET and t in ev.EXPLORE_TASKS) or m in ev.MORE_SEEDS else 3
        assert s == set(range(want)), (t, m)
    # every task runs GRPO and the published RAL; exploration arms only where the comparison is made
    assert all((t, "grpo") in seeds and (t, "ral") in seeds for t in ev.TASKS)
    assert ("read4", "explore_last") not in seeds and ("cell4", "explore_last") in seeds
    assert len({j["out"] for j in jobs}) == len(jobs)
    # seed-major order: a cut-short invocation still has every task and method at its first seeds
    assert [j["seed"] for j in jobs] == sorted(j["seed"] for j in jobs)


def test_plan_refuses_unknown_names():
    ev, args = _args(methods="grpo,nope")
    with pytest.raises(SystemExit, match="unknown method"):
        ev.plan(args)


def test_pair_and_4x4_tasks_fit_their_token_budget():
    from ral_core.data import GroundingTask
    from ral_core.models import load_adapter
    ev = _evidence()
    tok = load_adapter("default").tokenizer
    for name, t in ev.TASKS.items():
        task = GroundingTask(t["grid_rows"], t["grid_cols"], kinds=tuple(t["task_kinds"]), split="test", seed=1234)
        lens = [len(tok(s.answer, add_special_tokens=False)["input_ids"]) + 1 for s in task.samples(200)]
        # +1 for the end token; a budget below the answer length would make the reward unreachable
        assert sum(n <= t["max_new_tokens"] for n in lens) / len(lens) >= 0.97, (name, max(lens))


@pytest.mark.slow
def test_grid_recipe_continues_a_checkpoint_on_a_bigger_grid(tiny_model_dir, tmp_path):
    out = tmp_path / "sft4"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--out", str(out),
                        "--init", str(tiny_model_dir), "--rows", "4", "--cols", "4", "--kinds", "cell,pair",
                        "--steps", "2", "--batch", "4", "--eval-every", "0", "--n-eval", "8"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "training_info.json").read_text())
    assert info["init"] == str(tiny_model_dir) and info["task"]["rows"] == 4 and info["steps"] == 2
    assert info["args"]["vision_steps"] == 0  # the vision tower is not re-warmed from scratch
    from ral_core.models import load_adapter
    assert load_adapter(str(out)).model.config.text_config.hidden_size == 64
