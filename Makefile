# One-command set-up: `make demo` and `make test` create .venv and install everything on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-dev demo test test-fast chromium default-model bench bench-capture bench-train bench-step bench-inspect bench-load bench-trl bench-scale evidence evidence-collect evidence-short evidence-long evidence-home evidence-home-collect evidence-models evidence-teacher clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# runtime only (what a Space installs); the test tools and the TRL integration come with `install-dev`
install: $(STAMP)

DEV_STAMP := $(VENV)/.installed-dev
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev,trl]"
	touch $(DEV_STAMP)

install-dev: $(DEV_STAMP)

# Debian's Chromium for the browser tests (never `playwright install`: it downloads its own browser).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; browser tests will be skipped"

demo: install
	$(BIN)/python -m app

test: install-dev chromium
	$(BIN)/python -m pytest tests --durations=15

test-fast: install-dev
	$(BIN)/python -m pytest tests -m "not slow and not browser"

# Rebuild the embedded default model from a fixed seed (supervised, CPU).
default-model: install
	$(BIN)/python scripts/train_default_model.py --out assets/default_model

bench-capture: install
	$(BIN)/python bench/capture_bench.py --out bench/results/capture.md

bench-train: install
	$(BIN)/python bench/train_bench.py --out bench/results/train.md
	$(BIN)/python bench/step_bench.py --section-only --out bench/results/train.md

# A full RAL step before / with the vision cache / with shared prompts, on the default model and the
# Qwen2-VL-2B twin at 1 + 1 and 2 + 2 layers (1024×768 photo; cut in depth, see the script), rounds interleaved in
# one run (5 default, 3 per twin row; ~45 CPU-min); writes its section of train.md and bench/results/step.json.
bench-step: install
	$(BIN)/python bench/step_bench.py --out bench/results/train.md

bench-inspect: install
	$(BIN)/python bench/inspect_latency.py --out bench/results/inspect.md

# 20 concurrent gradio_client inspects against a real served app, idle and with a training run, next to the
# serial server of commit 04a5bda (before the concurrent server), in one run (≈ 8 min on 2 cores).
bench-load: install
	$(BIN)/python bench/load_bench.py --out bench/results/load.md

# Our GRPO trainer next to TRL's GRPOTrainer, and ours with its sharing off: the default model (≈ 5 min) and the
# Qwen2-VL-2B twin at real width (3 rounds ≈ 45 CPU-min, hours on shared cores; ~10 GiB RAM). TRL is an optional
# extra (pyproject `[trl]`, installed by `install` for ral_core/integrations/trl.py and its tests), not in
# requirements.txt (trl 1.16.0 works with transformers 5.24).
bench-trl: install
	$(BIN)/pip install -q trl==1.16.0
	$(BIN)/python bench/trl_bench.py --out bench/results/trl.md

# One RAL step of a 7B VLM (Qwen2-VL-7B shape) on 8 GPUs with FSDP: one decoder layer measured at real width (CPU,
# ≈ 10 min on 2 shared cores; `--device cuda` on a GPU), the rest modelled from the shapes.
bench-scale: install
	$(BIN)/python bench/scale_bench.py --out bench/results/scale.md

# Shape twins of SmolVLM-256M, Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B, Qwen3.5-0.8B (assets/twins/, random weights)
# → bench/results/real.md. Rows are written as they finish and a rerun skips done ones (bench/real_bench.py --only
# TWIN[:ROW] --force redoes some); hours on 2 shared cores. GPU table: scripts/gpu_check.sh.
.PHONY: bench-real
bench-real: install
	$(BIN)/python bench/real_bench.py --nice 5 --out bench/results/real.md

bench: bench-capture bench-train bench-inspect

# Checkpoints of the evidence benchmark (built once, kept in bench/_work/):
# - teacher_l6: the OPAD/distillation teacher, the default architecture with 6 decoder layers instead of 4, trained
#   1.5× longer (same tokenizer/processor; a wider one, hidden 192, had not learned the grid routing in 2,500 steps);
# - sft4 / teacher4_l6: the default model / that teacher continued on the 4×4 grid (1,500 / 3,000 steps);
# - sft4s: a short (400-step) continuation, for a one-token task that leaves RL some headroom.
W := bench/_work
evidence-models: install
	test -f $(W)/teacher_l6/config.json || $(BIN)/python scripts/train_default_model.py \
	  --out $(W)/teacher_l6 --layers 6 --steps 4500 --minutes 60
	test -f $(W)/sft4/config.json || $(BIN)/python scripts/train_default_model.py --out $(W)/sft4 \
	  --init assets/default_model --rows 4 --cols 4 --kinds cell,row,where,pair --steps 1500 --lr 5e-4 --minutes 40
	test -f $(W)/sft4s/config.json || $(BIN)/python scripts/train_default_model.py --out $(W)/sft4s \
	  --init assets/default_model --rows 4 --cols 4 --kinds cell,row,where,pair --steps 400 --lr 5e-4 --minutes 20
	test -f $(W)/teacher4_l6/config.json || $(BIN)/python scripts/train_default_model.py --out $(W)/teacher4_l6 \
	  --init $(W)/teacher_l6 --rows 4 --cols 4 --kinds cell,row,where,pair --steps 3000 --lr 5e-4 --minutes 60

# The archived 12-step document (276 runs; its run cache was not kept): docs/results_short.md
evidence-short: install evidence-models
	$(BIN)/python bench/evidence.py --out docs/results_short.md

# The evidence document docs/results.md: RAL in its home regime (bench/home_regime.py). The OPAD/distill teacher
# (bench/_work/teacher43: the default model continued 600 supervised steps on 4×3 grids) is built only when missing;
# then the pilot and the sweeps `home` (T 1.5) and `home_t2` (T 2): GRPO, RAL λ ∈ {0.5, 1, 5, 100}, OPAD, distill ×
# 5 seeds; then the grounded sweep on the default task (bench/ground_regime.py: GRPO, RAL, attention reward, attention
# target, OPAD with assets/teacher_model × 8 seeds) and the RAL gradient at every update (--grad-across). Each run
# writes bench/records/home*/ or ground*/ and a run whose record exists is skipped; `make evidence
# RERUN=--rerun` redoes everything (teacher included). `evidence-collect` rewrites the document from the records.
RERUN ?=
evidence-teacher: install
	$(BIN)/python bench/home_regime.py --build-teacher $(RERUN)

evidence: install evidence-teacher
	$(BIN)/python bench/home_regime.py --pilot $(RERUN)
	$(BIN)/python bench/home_regime.py --doc home $(RERUN)
	$(BIN)/python bench/home_regime.py --doc home_t2 $(RERUN)
	$(BIN)/python bench/ground_regime.py $(RERUN)
	$(BIN)/python bench/ground_regime.py --grad-across $(RERUN)
	$(BIN)/python bench/home_regime.py --collect

evidence-collect:
	$(BIN)/python bench/home_regime.py --collect

evidence-home: evidence
evidence-home-collect: evidence-collect

# 3× longer runs of the main contrasts on the 4×4 tasks with headroom (about 45 min on 2 cores)
evidence-long: install evidence-models
	$(BIN)/python bench/evidence.py --out docs/results_long.md --steps 36 --tasks pair4,cell4 \
	  --methods grpo,ral,explore_levers,noise_levers --seeds 3 --explore-seeds 3 --explore-tasks pair4,cell4

clean:
	rm -rf $(VENV) .pytest_cache
