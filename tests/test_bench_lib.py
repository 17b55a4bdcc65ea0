"""bench/_common.py, the benchmarks' small library, and the CLI seam a benchmark uses instead of patching ral_core."""
import json
import os
import sys
from pathlib import Path

from benchhelpers import bench_module as _bench

ROOT = Path(__file__).resolve().parents[1]


def _common():
    return _bench("_common")


def test_records_are_rounded_sorted_and_byte_stable(tmp_path):
    C = _common()
    rec = {"b": 0.123456789, "a": [1.0 / 3, float("nan"), 7], "c": {"x": 12345.678}}
    p = tmp_path / "r" / "rec.json"
    C.dump_record(p, rec)
    first = p.read_bytes()
    C.dump_record(p, json.loads(first))  # re-dumping a loaded record gives the same bytes
    assert p.read_bytes() == first
    assert json.loads(first) == {"a": [0.33333, None, 7], "b": 0.12346, "c": {"x": 12346.0}}
    assert first.decode().splitlines()[1] == ' "a": ['  # sorted keys, one per line


def test_machine_line_names_the_cpu_its_bf16_support_and_the_libraries():
    C = _common()
    meta = C.machine_info()
    line = C.machine_line(meta)
    assert meta["cpu"] in line and f"native bf16: {meta['native_bf16']}" in line
    assert meta["native_bf16"] in ("yes", "no", "unknown")
    for lib in ("torch", "transformers", "numpy"):
        assert f"{lib} {meta[lib]}" in line
    flags = C.cpu_flags()
    if flags:  # Linux: the verdict follows the flags
        assert (meta["native_bf16"] == "yes") == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_start_sets_the_bench_environment_without_overriding(monkeypatch):
    C = _common()
    for k in (*C.THREAD_ENV, *C.OFFLINE_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    C.start()
    assert os.environ["OMP_NUM_THREADS"] == "3" and os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_cli_inspect_takes_a_built_model_and_reports_its_model_time(tiny_qwen, tmp_path):
    """What bench/real_bench.py needs from `ral inspect` without replacing functions inside ral_core: a model it
    built itself (a shape twin) and the seconds of inspect() apart from the figures."""
    from ral_core import cli
    timings = {}
    argv = ["inspect", "--model", str(tmp_path / "no-such-model"), "--image",
            str(ROOT / "assets" / "examples" / "grid3_cell.png"), "--question", "row one col two ?", "--out",
            str(tmp_path / "out"), "--no-progress", "--max-new-tokens", "2", "--figsize", "200,200"]
    assert cli.main(argv, adapter=tiny_qwen, timings=timings) == 0
    assert timings["inspect_s"] > 0 and (tmp_path / "out" / "answer.txt").exists()
    # without the seam the same command loads --model, which does not exist: one clear error, exit 2
    assert cli.main(argv) == 2


def test_bench_scripts_import_the_library_without_path_preambles():
    """Benchmarks run as `python bench/NAME.py` (their folder is on sys.path), so none edits sys.path when it starts
    (a worker that loads another commit's code may, inside its function)."""
    import ast

    def edits_path(n):
        return (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Attribute)
                and n.func.value.attr == "path" and isinstance(n.func.value.value, ast.Name)
                and n.func.value.value.id == "sys")
    for f in sorted((ROOT / "bench").glob("*.py")):
        top = [n for n in ast.parse(f.read_text()).body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not any(edits_path(x) for n in top for x in ast.walk(n)), f.name


def test_every_bench_script_imports_from_any_working_directory():
    """Each script's start-up (its imports, constants, the library) in one process, as `python bench/NAME.py`
    sees it: the bench folder first on sys.path, run from elsewhere."""
    import subprocess
    names = sorted(f.stem for f in (ROOT / "bench").glob("*.py"))
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r})\nfor m in {names!r}: __import__(m)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-1500:]


def test_step_bench_writes_its_rows_next_to_a_report_elsewhere(tmp_path):
    """Only the committed train.md keeps its rows in the committed bench/results/step.json; a trial run with
    --out elsewhere must not rewrite the committed measurements."""
    from argparse import Namespace
    sb = _bench("step_bench")
    committed = str(ROOT / "bench" / "results" / "step.json")
    assert sb.records_path(Namespace(json=None, out=str(tmp_path / "t.md"))) == str(tmp_path / "t.step.json")
    assert sb.records_path(Namespace(json=None, out=str(ROOT / "bench" / "results" / "train.md"))) == committed
    assert sb.records_path(Namespace(json=None, out=None)) == committed
    assert sb.records_path(Namespace(json=str(tmp_path / "j.json"), out=None)) == str(tmp_path / "j.json")


def test_the_live_evidence_does_not_depend_on_the_archived_script():
    """docs/results.md's generator takes its statistics and records from the library, not from bench/evidence.py
    (which only rebuilds the archived documents)."""
    import ast
    tree = ast.parse((ROOT / "bench" / "home_regime.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "evidence" not in mods and "_common" in mods


def test_no_bench_script_replaces_anything_inside_ral_core():
    """Benchmarks measure ral_core through its public seams (cli.main's adapter/timings, capture's rows_cpu_s),
    never by assigning over its functions."""
    import ast
    for f in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(f.read_text())
        mods = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names if a.name.startswith("ral_core")}
        mods |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 and (n.module or "").startswith("ral_core") for a in n.names}
        for n in ast.walk(tree):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
            for t in targets:
                while isinstance(t, ast.Attribute):
                    t = t.value
                    assert not (isinstance(t, ast.Name) and t.id in mods), f"{f.name}:{n.lineno} assigns into {t.id}"


def test_capture_reports_the_cpu_time_of_its_own_rows(tiny_qwen):
    import torch
    from PIL import Image

    from ral_core.attention import capture
    b = tiny_qwen.build_inputs([Image.new("RGB", (56, 56))], ["row one col two ?"])
    mi = b["model_inputs"]
    L = mi["input_ids"].shape[1]
    with torch.no_grad(), capture(tiny_qwen.model, "all", torch.arange(L - 4, L)[None]) as maps:
        tiny_qwen.model(**mi)
    assert len(maps) == tiny_qwen.num_layers and maps.rows_cpu_s > 0


def test_step_bench_publishes_a_report_elsewhere_without_touching_the_committed_rows(tmp_path):
    """The write path of a run with --out elsewhere (no measuring): rows and section land next to the report, the
    committed step.json keeps its bytes, and each ratio carries its per-round spread."""
    from argparse import Namespace
    sb = _bench("step_bench")
    committed = ROOT / "bench" / "results" / "step.json"
    before = committed.read_bytes()

    def run(cpu, parts):
        return {"wall": cpu * 1.25, "cpu": cpu, "parts": dict(parts, other=cpu - sum(parts.values())),
                "rollout_wall": 0.1, "reward": 0.0, "load": "1.00 1.00 1.00"}
    steps = {"before": [2.0, 2.2, 2.1], "cache": [1.5, 1.6, 1.4], "after": [1.0, 1.0, 1.05]}
    raw = {"runs": {m: [run(c, {"vision": 0.1, "decoder": 0.2}) for c in v] for m, v in steps.items()},
           "load_start": "1.00 1.00 1.00", "load_end": "2.00 2.00 2.00", "date": "2026-01-01 00:00",
           "prompt_tokens": 29}
    out = tmp_path / "t.md"
    out.write_text("# elsewhere\n")
    text = sb.publish({"default": sb.summarise("default", raw)}, Namespace(json=None, out=str(out)))
    assert committed.read_bytes() == before
    rows = json.loads((tmp_path / "t.step.json").read_text())
    assert rows["default"]["ratio_rounds"]["before/after"] == [2.0, 2.2, 2.0]
    assert "**2.00×** (2.00–2.20)" in text and "| 3 |" in text and "native bf16" in text
    assert out.read_text().startswith("# elsewhere\n") and sb.BEGIN in out.read_text()


def test_bf16_speed_is_measured_per_round_and_named_in_one_line():
    C = _common()
    speed = C.bf16_matmul_speed(rounds=3, shapes=((16, 32, 64),))
    (r,) = speed
    assert r["shape"] == [16, 32, 64] and r["rounds"] == 3 and r["fp32_ms"] > 0 and r["bf16_ms"] > 0
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert "16×32×64" in C.bf16_line(speed) and f"{r['ratio']:.2f}×" in C.bf16_line(speed)


def test_real_bench_capture_ratios_carry_their_spread_over_calls():
    rb = _bench("real_bench")
    calls = lambda *cpu: {"cpu_s": sorted(cpu)[1], "calls": [{"cpu_s": c} for c in cpu]}  # noqa: E731
    assert rb._call_ratio(calls(1.1, 1.0, 1.2), calls(1.0, 1.0, 1.0)) == "1.100 (1.000–1.200, 3 calls)"
    assert rb._call_ratio({"cpu_s": 2.0}, {"cpu_s": 1.0}) == "2.000 (one call)"  # a row from before calls were kept
    assert rb._call_ratio(None, {"cpu_s": 1.0}) == "–"


def test_real_bench_run_with_a_report_elsewhere_keeps_its_rows_elsewhere(tmp_path):
    """`real_bench.py --out ELSEWHERE` must not rewrite the committed real.json: its rows go next to its report,
    seeded from the committed ones so a partial rerun still shows the whole table."""
    rb = _bench("real_bench")
    committed = ROOT / "bench" / "results" / "real.json"
    assert rb.results_json(None) == str(committed)
    assert rb.results_json(str(ROOT / "bench" / "results" / "real.md")) == str(committed)
    assert rb.results_json(str(tmp_path / "r.md"), read_only=True) == str(committed)
    path = rb.results_json(str(tmp_path / "r.md"))
    assert path == str(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_bytes() == committed.read_bytes()
