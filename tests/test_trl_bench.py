"""bench/trl_bench.py without running either trainer: its per-round ratios, the report it writes from stored
comparisons, and where a trial run keeps them (TRL is not needed: it is imported only by a measuring run)."""
from argparse import Namespace
from pathlib import Path

from benchhelpers import bench_module

ROOT = Path(__file__).resolve().parents[1]


def _tb():
    return bench_module("trl_bench")


def _stored(tb, cpu, runs=1):
    """A setting's stored runs as the bench saves them, from per-round CPU seconds per rollout batch (split over
    `runs` runs)."""
    k = len(cpu["ours"])
    rounds = [{"order": list(tb._order(r)), "load": "1 1 1", "cpu": {x: cpu[x][r] for x in tb.ROWS},
               "wall": {x: 2 * cpu[x][r] for x in tb.ROWS}, "trl_steps": [[3.0, 1.5], [1.0, 0.5]],
               "rollout_wall": {"ours": 0.5, "off": 0.6}, "len": {x: 32.0 for x in tb.ROWS},
               "reward": {x: 0.0 for x in tb.ROWS}, "same_prompts": True} for r in range(k)]
    run = {"title": "T", "short": "S", "what": "what.", "date": "2026-12-07 05:00 UTC", "load_start": "1 1 1",
           "load_end": "2 2 2", "total_s": 60.0, "machine": "2 CPUs, test CPU (flags: avx2; native bf16: no) · "
           "python 3.11", "datasets": "5.2.0", "threads": {x: [1] for x in tb.ROWS}, "warmup": 0, "updates": 2,
           "n": 8, "prompt_check": "identical", "sharing": {"ours": [True, "auto"], "off": [False, "false"]},
           "img_processor": "P", "img_proc_ms": 10.0, "distinct": 1, "img_distinct_ms": 2.0,
           "settings_rows": [["a", "b", "c"]], "nproc": "2", "busy_before": [], "versions": {"trl": "1.16.0"},
           "new_tokens": 32, "prompt_tokens": 1020, "vocab": 151936, "hidden": 1536, "params": 880000,
           "trainable": {x: 640000 for x in tb.ROWS}}
    cut = [round(i * k / runs) for i in range(runs + 1)]
    return {"runs": {f"r{i}": {**run, "rounds": rounds[cut[i]:cut[i + 1]]} for i in range(runs)}}


def test_ratios_are_taken_round_by_round_with_their_spread():
    tb = _tb()
    cpu = {"ours": [1.0, 2.0, 1.0], "trl": [4.0, 4.0, 5.0], "off": [2.0, 4.0, 2.5]}
    r = tb.round_ratios(cpu, cpu)
    assert r["ours/trl"]["cpu"] == {"median": 0.25, "min": 0.2, "max": 0.5, "q1": 0.2, "q3": 0.5, "n": 3}
    assert r["off/trl"]["cpu"]["median"] == 0.5 and r["ours/off"]["cpu"]["max"] == 0.5
    # each row takes each place in the order once over three rounds
    assert [tb._order(i) for i in range(3)] == [("ours", "trl", "off"), ("trl", "off", "ours"),
                                                ("off", "ours", "trl")]


def test_report_has_all_rows_the_spread_and_an_honest_verdict_on_the_goal():
    tb = _tb()
    met = _stored(tb, {"ours": [1.0, 1.1, 0.9], "trl": [4.0, 4.0, 4.5], "off": [3.0, 3.0, 3.2]}, runs=2)
    missed = _stored(tb, {"ours": [1.0, 1.5, 1.0], "trl": [4.0, 4.0, 2.0], "off": [3.0, 3.0, 3.2]})
    small = _stored(tb, {"ours": [0.4, 0.4, 0.4], "trl": [1.0, 1.0, 1.0], "off": [0.8, 0.9, 0.8]})
    small["runs"]["r0"]["title"] = "small title"
    met["runs"]["r1"]["note"], met["notes"] = "Cut for time.", ["Paused once."]  # a run's note, an afterword
    md = tb.render({"real": met, "small": small}, "cmd")
    assert "| **ours / TRL** | **0.250×** (0.200–0.275) |" in md  # the three rounds of both runs pooled
    assert "ours with sharing off / TRL | 0.750× (0.711–0.750)" in md
    assert "is **met**" in md and "TRL 1.16's fused head projects all 1052 positions" in md
    assert md.index("## T") < md.index("## small title")
    assert md.count("| ours, sharing off (`vision_cache=false share_prompt=false`) |") == 2  # a row per comparison
    assert "Note: (run 2) Cut for time." in md and "Note: Paused once." in md
    assert "native bf16: no" in md and "shared with other people's runs" in md and "two processes at once" in md
    missed["runs"]["r9"] = {**met["runs"]["r0"], "short": "deeper"}  # another shape: its own comparison
    small["runs"]["r0"]["argv"] = "--out x.md --settings small --prompts 2 --group 4"
    assert "| default model, 2 prompts × 4, ≤ 12 new tokens |" in tb.render({"small": small}, "cmd")  # its words
    md2 = tb.render({"real": missed}, "cmd")
    assert md2.count("| S | ") == 1 and md2.count("| deeper | ") == 1
    assert "is **not met**" in md2 and "worst round 0.500" in md2


def test_a_report_elsewhere_keeps_its_comparisons_next_to_itself(tmp_path):
    tb = _tb()
    committed = str(ROOT / "bench" / "results" / "trl.json")
    assert tb.records_path(Namespace(out=str(tmp_path / "t.md"))) == str(tmp_path / "t.json")
    assert tb.records_path(Namespace(out=str(ROOT / "bench" / "results" / "trl.md"))) == committed
    assert tb.records_path(Namespace(out=None)) == committed
