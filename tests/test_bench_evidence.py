"""The evidence benchmark's run matrix and its second-checkpoint recipe (the runs themselves live in bench/)."""
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from benchhelpers import bench_module as _bench

ROOT = Path(__file__).resolve().parents[1]


def _evidence():
    return _bench("evidence")


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


# ---- statistics (bench/_common.py): paired t-test and Holm, no scipy ------------------------------------------
def test_t_distribution_two_sided_p_matches_tables():
    ev = _bench("_common")  # the statistics of both evidence documents
    # 97.5 % quantiles of Student's t (two-sided p = 0.05), e.g. scipy.stats.t.ppf(0.975, df)
    for df, t in ((1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105), (5, 2.570581836),
                  (9, 2.262157163), (30, 2.042272456)):
        assert ev.t_two_sided_p(t, df) == pytest.approx(0.05, abs=1e-8), df
    assert ev.t_two_sided_p(1.0, 1) == pytest.approx(0.5)          # Cauchy: P(|T| ≥ 1) = 1/2
    assert ev.t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / 6 ** 0.5)  # df 2: 1 − t/√(2+t²)
    assert ev.t_two_sided_p(0.0, 4) == 1.0 and ev.t_two_sided_p(-2.776445105, 4) == pytest.approx(0.05)
    assert ev.t_two_sided_p(float("inf"), 4) == 0.0


def test_paired_t_against_a_hand_computed_case():
    ev = _bench("_common")  # the statistics of both evidence documents
    # d = (1, 2, 3, 4, 5)/100: mean 0.03, sd √(2.5)/100, SE = sd/√5 = 0.00707107, t = 4.2426407, df 4;
    # two-sided p for df 4 from A&S 26.7.4: θ = atan(t/2), p = 1 − sinθ (1 + cos²θ/2) = 0.0132356
    r = ev.paired_t([0.01, 0.02, 0.03, 0.04, 0.05])
    assert r["n"] == 5 and r["mean"] == pytest.approx(0.03)
    assert r["se"] == pytest.approx(0.0070710678) and r["t"] == pytest.approx(4.2426407)
    assert r["p"] == pytest.approx(0.0132356, abs=1e-6)
    assert ev.paired_t([0, 0, 0])["p"] == 1.0                      # identical on every seed
    assert ev.paired_t([0.02, 0.02, 0.02])["p"] == 0.0            # the same non-zero difference every seed
    assert ev.paired_t([0.02])["p"] != ev.paired_t([0.02])["p"]   # one seed: no test (nan)


def test_holm_on_known_p_values():
    ev = _bench("_common")  # the statistics of both evidence documents
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → monotone 0.06; returned in input order
    assert ev.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert ev.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])       # 0.5·2 = 1, then monotone
    out = ev.holm([0.01, float("nan"), 0.02])                     # nan: no test, not counted in m
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02) and out[1] != out[1]


def test_default_plan_runs_every_arm_on_at_least_five_seeds():
    ev = _evidence()
    import argparse
    # the argparse defaults of bench/evidence.py, without running it
    src = (ROOT / "bench" / "evidence.py").read_text()
    assert 'p.add_argument("--seeds", type=int, default=5' in src
    _, args = _args(seeds=5)
    seeds = {}
    for j in ev.plan(args):
        seeds.setdefault((j["task"], j["method"]), set()).add(j["seed"])
        assert j["record"].endswith(f"{j['task']}/{j['method']}_s{j['seed']}.json")
    assert all(len(s) >= 5 for s in seeds.values())


def test_results_regenerates_byte_identical_from_the_committed_records(tmp_path):
    """docs/results.md (RAL in its home regime) is written by `bench/home_regime.py --collect` from bench/records/
    alone (no model, no run cache, no teacher checkpoint), so a fresh clone reproduces it byte for byte. The PNG is
    not compared (matplotlib's bytes depend on its version)."""
    doc = ROOT / "docs" / "results.md"
    out = tmp_path / "results.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "home_regime.py"), "--collect", "--no-plot", "--out",
                        str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes() == doc.read_bytes()


def _home():
    return _bench("home_regime")


def test_home_plan_runs_every_arm_on_five_seeds_in_both_sweeps_and_the_teacher_arms_use_the_teacher():
    h = _home()
    for doc in h.SWEEPS:
        args = Namespace(pilot=False, doc=doc, variants="", arms=",".join(h.ARMS), seeds=5, steps=h.STEPS,
                         n_eval=h.N_EVAL, n_sampled=h.N_SAMPLED, rerun=False)
        jobs = h.plan(args)
        seeds = {}
        for j in jobs:
            seeds.setdefault(j["arm"], set()).add(j["seed"])
            assert j["record"].endswith(f"{doc}/{j['arm']}_s{j['seed']}.json")
            assert (j["overrides"].get("teacher") == "@teacher") == (j["arm"] in ("opad", "distill"))
        assert seeds == {a: set(range(5)) for a in h.ARMS}
    assert h.ARMS["opad"]["gamma_opad"] == 1.0 and h.ARMS["distill"]["lambda_token_kl"] == 1.0
    # the teacher's recipe: a fixed step count on the sweep's grid, continued from the student's checkpoint
    a = h.TEACHER_ARGS
    assert a[a.index("--init") + 1] == "assets/default_model" and a[a.index("--rows") + 1] == "4"
    assert a[a.index("--cols") + 1] == "3" and "row" in a[a.index("--kinds") + 1].split(",")


def test_restat_rederives_p_values_from_a_printed_document():
    ev = _evidence()
    text = "\n".join([
        "# Evidence", "", "## Summary (generated from the tables below)", "",
        "- Methods better than GRPO beyond seed noise (|paired mean| ≥ 2 SE): `x` on `t` (+0.020).",
        "- Worse than GRPO beyond seed noise: none.",
        "- Exploration against its own noise-only control (what the exploration term adds, greedy accuracy): none.",
        "", "## Task `t`: ['cell'] on a 3×3 grid", "",
        "| method | greedy acc | Δ acc vs GRPO (paired, mean ± sd) | Δ reward vs GRPO |", "|---|---|---|---|",
        "| grpo | 0.5 ± 0.1 |  |  |",
        "| x | 0.52 ± 0.1 | +0.020 ± 0.010 (n=5) | +0.010 ± 0.010 (n=5) |", "",
        "What the `t` numbers show (paired by seed against GRPO, greedy accuracy):",
        "- `x`: +0.020 (per seed +0.007, +0.013, +0.020, +0.027, +0.033) — better than GRPO.", ""])
    cmp = ev.restat_comparisons(text)
    assert [(c["arm"], c["metric"]) for c in cmp] == [("x", "sampled reward"), ("x", "greedy acc")]
    acc = cmp[1]
    # per seed k/150 for k = 1..5: mean 0.02, SE = (1/150)·√2.5/√5, t = 4.2426, df 4 → p 0.0132 (Holm ×2 → 0.0265)
    assert acc["p"] == pytest.approx(0.0132356, abs=1e-6) and acc["p_holm"] == pytest.approx(2 * 0.0132356, abs=1e-6)
    new = ev.restat_document(text)
    assert "beyond seed noise (|paired" not in new and "— p 0.013, Holm 0.026: better than GRPO." in new
    assert "named 1 difference from GRPO" in new
    with pytest.raises(ValueError):
        ev.restat_document(new)


# ---- the grounded sweep and the per-update probe (bench/ground_regime.py) ------------------------------------------
def test_ci_and_detectable_difference_against_t_tables():
    h = _home()
    # t(0.975, 4) = 2.776445, t(0.8, 4) = 0.9409646 (e.g. scipy.stats.t.ppf)
    assert h.t_crit(0.05, 4) == pytest.approx(2.776445105, abs=1e-6)
    assert h.t_crit(0.4, 4) == pytest.approx(0.9409646, abs=1e-6)
    c = {"n": 5, "mean": 0.02, "se": 0.01}
    assert h.ci95(c) == pytest.approx((0.02 - 0.02776445, 0.02 + 0.02776445), abs=1e-7)
    assert h.detectable(c) == pytest.approx((2.776445105 + 0.9409646) * 0.01, abs=1e-7)
    # Holm's first step asks α/m of the smallest p: what a comparison can detect grows with m
    assert h.detectable(c, 0.05 / 52) > 2 * h.detectable(c)


def test_ground_plan_runs_five_arms_on_eight_seeds_with_pinned_target_settings():
    g = _bench("ground_regime")
    jobs = g.plan(Namespace(grad_across=False, seeds=None, arms=",".join(g.ARMS), rerun=False))
    seeds = {}
    for j in jobs:
        seeds.setdefault(j["arm"], set()).add(j["seed"])
        assert j["record"].endswith(f"ground/{j['arm']}_s{j['seed']}.json")
    assert seeds == {a: set(range(8)) for a in ("grpo", "ral", "reward", "target", "grounded", "grounded_qk", "opad")}
    assert [j["seed"] for j in jobs] == sorted(j["seed"] for j in jobs)  # seed-major
    # the target arm's settings live in the bench, not in a recipe that may change
    assert g.ARMS["target"] == {"lambda_ground": 0.3, "ground_div": "kl", "ground_on": "rewarded", "attn_row": "predicts",
                                "ground_layers": "policy", "ground_heads": "mean"}
    # the default recipe's target when the arm ran, pinned likewise (the recipe may change later)
    assert g.ARMS["grounded"] == {"lambda_attn": 1.0, "lambda_ground": 0.4, "ground_div": "jsd",
                                  "ground_on": "rewarded", "attn_row": "predicts", "ground_layers": "policy",
                                  "ground_heads": 3}
    assert g.ARMS["grounded_qk"] == {**g.ARMS["grounded"], "train_layers": "last", "train_modules": "qk", "lr": 2e-4}
    assert g.ARMS["opad"]["teacher"] == "assets/teacher_model" and (ROOT / "assets/teacher_model/config.json").exists()
    assert g.ARMS["reward"]["reward_weights"] == {"exact_match": 1.0, "attention_box": 0.5}
    assert g.COMMON["snapshot_every"] == 0 and g.COMMON["steps"] == 20
    grad = g.plan(Namespace(grad_across=True, seeds=None, arms="", rerun=False))
    assert {(j["arm"], j["seed"]) for j in grad} == {(a, s) for a in ("grpo", "ral_l100") for s in range(5)}


def test_ground_records_name_their_teacher_by_content(tmp_path):
    """The teacher's folder is reused when it is rebuilt: an OPAD (or base) record counts only with the bundled
    teacher's weights hash, and the document refuses to put another teacher's runs beside the base record."""
    import json
    import shutil
    g = _bench("ground_regime")
    sha = g.teacher_sha()
    assert len(sha) == 64
    assert g._stale({}, "opad") and g._stale({"teacher_sha256": "0" * 64}, "base")
    assert not g._stale({"teacher_sha256": sha}, "opad") and not g._stale({}, "grpo")
    src = ROOT / "bench" / "records" / g.SWEEP
    shutil.copytree(src, tmp_path / g.SWEEP)
    f = tmp_path / g.SWEEP / "opad_s3.json"
    r = json.loads(f.read_text())
    assert r["teacher_sha256"] == json.loads((src / "base.json").read_text())["teacher_sha256"]
    r["teacher_sha256"] = "f" * 64
    f.write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="opad_s3"):
        g.section_lines(tmp_path, [], 1, lambda c, m: [])


def test_update_probe_measures_each_update_where_it_happens_and_leaves_the_run_unchanged(tmp_path):
    """Before every update of the probed steps: ‖∇RAL‖ is exactly 0 at update 1 (p_θ = p_old) and not after;
    every update gets its mini-batch's silence shares; the run's weights equal a run without the probe."""
    import torch
    g = _bench("ground_regime")
    from ral_core.config import build_config
    from ral_core.trainer import Trainer
    torch.set_num_threads(1)
    base = ["task_kinds=[row]", "prompts_per_step=4", "group_size=4", "max_new_tokens=6", "minibatch_size=8",
            "epochs=2", "steps=2", "temperature=1.5", "lambda_attn=1", "save_every=0", "snapshot_every=0",
            "attn_metrics_every=0"]
    a = Trainer(build_config(None, base + [f"output_dir={tmp_path / 'a'}"]))
    probe = g.UpdateProbe(a, {2})
    a.train()
    b = Trainer(build_config(None, base + [f"output_dir={tmp_path / 'b'}"]))
    b.train()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert [(r["step"], r["update"]) for r in probe.rows] == [(2, 1), (2, 2), (2, 3), (2, 4)]
    assert probe.rows[0]["grad_ral_attn"] == 0.0 and probe.rows[0]["grad_grpo"] > 0
    assert max(r["grad_ral_attn"] for r in probe.rows[1:]) > 0
    assert abs(probe.rows[0]["grad_total"] - probe.rows[0]["grad_grpo"]) < 1e-6  # λ·0 adds nothing at update 1
    assert [(s["step"], s["update"]) for s in probe.silence] == [(s, u) for s in (1, 2) for u in (1, 2, 3, 4)]
    assert all(abs(s["ral_rows_acting"] + s["ral_rows_zero_var"] + s["ral_rows_cancelled"] - 1) < 1e-9
               for s in probe.silence)
