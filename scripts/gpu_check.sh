#!/usr/bin/env bash
# One prepared check for a CUDA machine, meant to finish within 8 minutes:
#   1. the GPU-marked tests (`pytest -m gpu`, when pyproject.toml registers a `gpu` marker), else an end-to-end
#      `ral inspect` of the embedded model on the GPU (dtype auto = bf16) as the smallest device check;
#   1b. a chunked run on CUDA (ral_core/chunked.py: 2 GPU calls in forked workers, state through the CPU);
#   2. the real-size bench in bf16 on CUDA (bench/real_bench.py --device cuda --dtype bfloat16) →
#      bench/results/real_cuda.md / real_cuda.json, rows written as they finish, stopped at the time budget.
# Fails at once, with one line, where no CUDA GPU is visible.
#
#   scripts/gpu_check.sh                 # from the repository root, after `make install` with a CUDA torch
#   OUT=/some/dir scripts/gpu_check.sh   # also copies the results and logs there
#   BUDGET_S=480 ONLY=qwen2_vl_2b scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
BUDGET_S=${BUDGET_S:-480}          # whole script, seconds (8 minutes)
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not installed'), torch.cuda.is_available() is False); install a CUDA build of torch on a GPU machine, then rerun" >&2
  exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")'

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
LOGS=${OUT:-bench/_work/real}/gpu_check_logs
mkdir -p "$LOGS"
rc=0

# ---- 1. GPU-marked tests (or the smallest end-to-end device check)
if grep -Eq '"gpu[: ]' pyproject.toml; then
  echo "gpu_check: pytest -m gpu"
  timeout 150 "$PY" -m pytest tests -m gpu -p no:warnings -q 2>&1 | tee "$LOGS/pytest_gpu.log" || rc=1
else
  echo "gpu_check: no 'gpu' pytest marker is registered in pyproject.toml; running ral inspect of the embedded model on cuda instead"
  timeout 120 "$PY" -m ral_core.cli inspect --model default --dtype auto --image assets/examples/grid3_cell.png \
    --question "What digit is in row 2 column 3?" --out "$LOGS/inspect_default" --no-progress 2>&1 \
    | tee "$LOGS/inspect_default.log" || rc=1
  "$PY" - "$LOGS/inspect_default.log" <<'EOF' || rc=1
import sys
text = open(sys.argv[1]).read()
assert "answer:" in text and "visual tokens:" in text, "ral inspect on cuda printed no answer"
print("gpu_check: ral inspect on cuda ok")
EOF
fi

# ---- 1b. a chunked run on CUDA as ZeroGPU runs it: 4 RAL steps of the embedded model in 2 GPU calls, each in a forked
#      worker (tests/spaces_standin: arguments and results pickled, only CPU tensors cross), state on the CPU between
#      calls; this process never initialises CUDA. Prints each call's declared seconds, set-up and step times.
echo "gpu_check: chunked run on cuda (2 calls of 2 steps, state through the CPU)"
timeout 180 env PYTHONPATH="tests/spaces_standin${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$LOGS/chunked_run" <<'EOF' \
  2>&1 | tee "$LOGS/chunked_cuda.log" || rc=1
import math, shutil, sys, time
import spaces
from ral_core.chunked import ChunkJob, ChunkLimits, declared_seconds, run_chunk, run_chunked
from ral_core.config import build_config
shutil.rmtree(sys.argv[1], ignore_errors=True)
cfg = build_config("ral", dict(model="default", output_dir=sys.argv[1], device="cuda", steps=4, snapshot_every=0,
                               save_every=0, log_tensorboard=False))
call = spaces.GPU(duration=declared_seconds)(run_chunk)
t0, events = time.time(), []
for ev in run_chunked(ChunkJob(cfg.to_dict()), call, ChunkLimits(chunk_steps=2)):
    events.append(ev)
    if ev.kind == "chunk":
        st = [round(m["step_time"], 3) for m in ev.metrics]
        print(f"gpu_check: call {ev.calls}: step {ev.step}, declared {spaces.CALLS[-1][1]} s (run: {ev.gpu_seconds} s), "
              f"set-up {ev.state.setup_s:.1f} s, step times {st} s")
end = events[-1]
assert end.status == "done" and end.step == 4 and end.calls == 2, (end.status, end.message)
assert all(t.device.type == "cpu" for t in end.state.trainable.values())
assert all(math.isfinite(m["loss_grpo"]) for m in end.state.history)
import torch
assert not torch.cuda.is_initialized(), "the driver process initialised CUDA"
print(f"gpu_check: chunked run on cuda ok ({time.time() - t0:.1f} s wall, {end.gpu_seconds} s declared, "
      f"checkpoint {end.checkpoint})")
EOF

# ---- 2. real-size bench in bf16 on CUDA, within what is left of the budget
remaining=$(left)
if (( remaining < 60 )); then
  echo "gpu_check: only ${remaining}s left of ${BUDGET_S}s; skipping the real-size bench" >&2
  exit 1
fi
deadline=$(date -u -d "@$(( $(date +%s) + remaining - 45 ))" +%H:%M)   # no new row after this; the last one finishes
echo "gpu_check: real-size bench (${remaining}s left, no new row after ${deadline} UTC)"
timeout $(( remaining - 5 )) "$PY" bench/real_bench.py --device cuda --dtype bfloat16 --threads 4 \
  --unit-timeout 240 --deadline "$deadline" ${ONLY:+--only "$ONLY"} 2>&1 | tee "$LOGS/real_bench_cuda.log" || rc=1
if [[ -n "${OUT:-}" ]]; then
  cp bench/results/real_cuda.md bench/results/real_cuda.json "$OUT"/ 2>/dev/null || true
  cp -r bench/_work/real/logs "$OUT"/real_bench_row_logs 2>/dev/null || true
fi
echo "gpu_check: done in $(( $(date +%s) - START ))s (rc $rc); table: bench/results/real_cuda.md"
exit $rc
