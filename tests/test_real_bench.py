"""bench/real_bench.py's rounds: interleaved fresh-process rounds summarised as median (min–max), each round's machine
and load kept, and single measurements from before rounds never mixed in. No measuring: the rows are made up."""
import types

from benchhelpers import bench_module

MACHINE = "2 CPUs, Test CPU (flags: avx2 avx512_bf16; native bf16: yes) · python 3.11.7, torch 2.13.0"
ARGS = types.SimpleNamespace(device="cpu", dtype="bfloat16", quick=False, threads=1, capture_repeats=3,
                             eager_limit_gb=6.5, train_size="448x336")


def _inspect_round(wall, cpu, peak, load):
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak, "build_s": 10.0, "inspect_s": wall - 2, "figures_s": 2.0,
            "model_mb": 900.0, "build_peak_mb": 1000.0, "unit_s": wall + 12, "rc": 0, "answer_tokens": 16,
            "visual_tokens": 999, "layers_captured": 28, "argv": ["ral", "inspect"], "date": f"2026-12-07 08:0{load} UTC",
            "loadavg_before": f"{load}.00 1.00 1.00", "loadavg": f"{load}.50 1.00 1.00", "machine": MACHINE,
            "code": "commit abc"}


def _train_legacy(step):
    return {"layers": 1, "ckpt": 0, "rollout_s": step / 2, "update_s": step / 2, "rollout_cpu_s": step / 2,
            "update_cpu_s": step / 2, "step_s": step, "cpu_s": step, "extra_mb": 500.0, "update_extra_mb": 400.0,
            "base_mb": 1000.0, "P": 222, "T": 32, "visual": 192, "loadavg": "3.00 2.00 1.00"}


def test_rounds_are_summarised_as_median_min_max_and_a_single_measurement_is_replaced_not_merged():
    rb = bench_module("real_bench")
    legacy = _inspect_round(999.0, 999.0, 9999.0, 1)
    for k in ("machine", "loadavg_before", "code"):
        legacy.pop(k)
    row = None
    for rnd, (wall, cpu, peak) in enumerate([(200.0, 190.0, 4000.0), (260.0, 180.0, 4100.0), (230.0, 210.0, 3900.0)]):
        row = rb.add_round(legacy if rnd == 0 else row, _inspect_round(wall, cpu, peak, rnd + 2), "inspect")
    assert [r["wall_s"] for r in row["rounds"]] == [200.0, 260.0, 230.0]  # the legacy 999 s is gone, not a round
    assert (row["wall_s"], row["cpu_s"], row["peak_mb"]) == (230.0, 190.0, 4000.0)
    assert row["machine"] == MACHINE and row["rounds"][1]["loadavg_before"] == "3.00 1.00 1.00"
    assert rb.spread(row, "wall_s") == "230 (200–260)"
    assert rb.spread(row, "peak_mb", rb._gb) == "3.91 GiB (3.81 GiB–4.00 GiB)"
    assert rb.spread(legacy, "wall_s") == "999" and rb._n_rounds(legacy) == "single, machine not recorded"


def test_report_names_rounds_machine_and_load_per_row_and_marks_the_single_rows():
    rb = bench_module("real_bench")
    row = None
    for i, wall in enumerate((200.0, 260.0, 230.0)):
        row = rb.add_round(row, _inspect_round(wall, wall - 10, 4000.0 + i, i + 2), "inspect")
    rows = {"cpu/bfloat16/qwen2_vl_2b/inspect": row,
            "cpu/bfloat16/qwen2_vl_2b/train:1:plain": _train_legacy(18.0),
            "cpu/bfloat16/qwen2_vl_2b/train:2:plain": _train_legacy(24.0)}
    md = rb.report({"meta": {"machine": MACHINE}, "rows": rows}, ARGS)
    assert "| qwen2_vl_2b | 3 | **230 (200–260)** (228 / 2.0) | 220 (190–250) |" in md
    assert ("Rounds: inspect rows: 3 rounds (qwen2_vl_2b); train rows: a single measurement, machine not recorded "
            "(qwen2_vl_2b)") in md
    assert f"Rows by the machine that measured them: {MACHINE}: 1 row(s) (qwen2_vl_2b/inspect)" in md
    assert "not recorded" in md and "**shared**" in md and "native bf16: yes" in md
    assert "- qwen2_vl_2b/inspect: 2026-12-07 08:02 UTC 2.00 → 2.50; 2026-12-07 08:03 UTC 3.00 → 3.50;" in md
    assert "| qwen2_vl_2b | off | single, machine not recorded | 222 (192) + 32 | 18.0 (9.0 + 9.0; CPU 18.0) /" in md


def test_rounds_of_different_twins_are_interleaved_inspect_first_then_the_goal_twin_s_training():
    rb = bench_module("real_bench")
    args = types.SimpleNamespace(twins=["qwen2_vl_2b", "smolvlm_256m"], only_rows={}, rows=["inspect", "train"])
    order = [(t, u, r) for t, u, _, r in rb.schedule(rb.plan(args), 2)]
    assert order[:4] == [("qwen2_vl_2b", "inspect", 1), ("smolvlm_256m", "inspect", 1),
                         ("qwen2_vl_2b", "inspect", 2), ("smolvlm_256m", "inspect", 2)]
    goal_train = [x for x in order[4:12]]
    assert {t for t, _, _ in goal_train} == {"qwen2_vl_2b"} and [r for *_, r in goal_train] == [1] * 4 + [2] * 4
    assert {t for t, _, _ in order[12:]} == {"smolvlm_256m"} and len(order) == 20


def test_every_measured_row_is_stamped_with_the_machine_line_and_the_load_around_it():
    rb = bench_module("real_bench")
    res = rb.stamp({"wall_s": 1.0}, "1.25 1.00 1.00")
    assert res["machine"] == rb.C.machine_line() and rb.C.cpu_model() in res["machine"]
    assert "native bf16:" in res["machine"] and "torch " in res["machine"]
    assert res["loadavg_before"] == "1.25 1.00 1.00" and len(res["loadavg"].split()) == 3 and "UTC" in res["date"]


def test_full_depth_extrapolates_cpu_medians_and_flags_overlapping_rounds():
    rb = bench_module("real_bench")
    row = lambda *cpu: {"update_cpu_s": sorted(cpu)[1], "rounds": [{"update_cpu_s": c} for c in cpu]}  # noqa: E731
    fmt = lambda x: f"{x:.0f}"  # noqa: E731
    assert rb._full(row(5, 6, 7), row(9, 10, 11), "update_cpu_s", 28, fmt, "time") == "114"  # 6 + 4 × 27
    assert rb._full(row(5, 6, 7), row(6.5, 7, 9), "update_cpu_s", 28, fmt, "time") == "33 †"  # ranges overlap
    assert rb._full(row(5, 6, 7), row(5, 5.5, 9), "update_cpu_s", 28, fmt, "time") == \
        "– (time: 1→2 layers within the noise)"
    assert rb._full({"update_cpu_s": 6.0}, {"update_cpu_s": 10.0}, "update_cpu_s", 28, fmt, "time") == "114"
