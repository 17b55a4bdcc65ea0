"""bench/trl_bench.py without running either trainer: its per-round ratios, the report it writes from stored
comparisons, and where a trial run keeps them (TRL is not needed: it is imported only by a measuring run)."""
from argparse import Namespace
from pathlib import Path

from benchhelpers import bench_module

ROOT = Path(__file__).resolve().parents[1]


def _tb():
    return bench_module("trl_bench")


def _result(tb, key, cpu):
    """A stored comparison as measure() + describe() leave it, from per-round CPU seconds per rollout batch."""
    wall = {k: [2 * x for x in v] for k, v in cpu.items()}
    k = len(cpu["ours"])
    side = {name: {**tb._side(wall[name], cpu[name], 2, 8), "rollout_wall": 0.5, "resp_len": 32.0, "reward": 0.0,
                   "lens": [32.0] * k} for name in tb.ROWS}
    side["trl"].update(gen_wall=3.0, reuse_wall=1.0, gen_cpu=1.5, reuse_cpu=0.5)
    return {"title": f"{key} title", "short": f"{key} short", "what": "what.", "date": "2026-12-07 05:00 UTC",
            "machine": "2 CPUs, test CPU (flags: avx2; native bf16: no) · python 3.11", "datasets": "5.2.0",
            "threads": {r: [1] for r in tb.ROWS}, "rounds": k, "warmup": 0, "total_s": 60.0, "load_start": "1 1 1",
            "load_end": "2 2 2", "prompt_check": "identical", "same_prompts": True,
            "sharing": {"ours": [True, "auto"], "off": [False, "false"]}, "updates": 2, "n": 8,
            "img_processor": "P", "img_proc_ms": 10.0, "distinct": 1, "img_distinct_ms": 2.0, "cpu": cpu,
            "wall": wall, "orders": [list(tb._order(r)) for r in range(k)], "settings_rows": [["a", "b", "c"]],
            "nproc": "2", "busy_before": [], "versions": {"trl": "1.16.0"}, "new_tokens": 32,
            "prompt_tokens": 1020, "vocab": 151936, "hidden": 1536, "side": side,
            "ratios": tb.round_ratios(cpu, wall)}


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
    met = _result(tb, "real", {"ours": [1.0, 1.1, 0.9], "trl": [4.0, 4.0, 4.5], "off": [3.0, 3.0, 3.2]})
    missed = _result(tb, "real", {"ours": [1.0, 1.5, 1.0], "trl": [4.0, 4.0, 2.0], "off": [3.0, 3.0, 3.2]})
    small = _result(tb, "small", {"ours": [0.4, 0.4, 0.4], "trl": [1.0, 1.0, 1.0], "off": [0.8, 0.9, 0.8]})
    md = tb.render({"real": met, "small": small}, "cmd")
    assert "| **ours / TRL** | **0.250×** (0.200–0.275) |" in md
    assert "ours with sharing off / TRL | 0.750× (0.711–0.750)" in md
    assert "is **met**" in md and "TRL 1.16's fused head projects all 1052 positions" in md
    assert md.index("## real title") < md.index("## small title")
    assert md.count("| ours, sharing off (`vision_cache=false share_prompt=false`) |") == 2  # a row per comparison
    assert "native bf16: no" in md and "shared with other people's runs" in md
    md2 = tb.render({"real": missed}, "cmd")
    assert "is **not met**" in md2 and "worst round 0.500" in md2


def test_a_report_elsewhere_keeps_its_comparisons_next_to_itself(tmp_path):
    tb = _tb()
    committed = str(ROOT / "bench" / "results" / "trl.json")
    assert tb.records_path(Namespace(out=str(tmp_path / "t.md"))) == str(tmp_path / "t.json")
    assert tb.records_path(Namespace(out=str(ROOT / "bench" / "results" / "trl.md"))) == committed
    assert tb.records_path(Namespace(out=None)) == committed
