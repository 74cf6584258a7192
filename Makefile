# mimkit: `make demo` and `make test` work on a fresh clone; both create .venv in the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A local torch wheel (e.g. a CPU build in /opt/wheels) is used when present; otherwise torch comes from the index.
TORCH_SPEC ?= $(or $(firstword $(wildcard /opt/wheels/torch-*.whl)),torch)
STAMP  := $(VENV)/.installed

# `make bench REF=folder` needs the released UM-MAE code unpacked outside the repo (../shared/tools/side_by_side.py)
SHARED ?= ../shared
REF    ?=
SBS_ROWS := ref_umae_swin_t,mk_umae_swin_t,mkk_umae_swin_t,refk_umae_swin_t,ref_simmim_swin_t,mk_simmim_swin_t,mkk_simmim_swin_t,refk_simmim_swin_t,ref_umae_pvt_s,mk_umae_pvt_s,mkk_umae_pvt_s,refk_umae_pvt_s,ref_simmim_pvt_s,mk_simmim_pvt_s,mkk_simmim_pvt_s,refk_simmim_pvt_s,hf_mae_vit_b,mk_mae_vit_b,mkk_mae_vit_b,hfk_mae_vit_b
BENCH_CPU := --steps 4 --warmup 1 --rounds 3 --precision fp32
SBSEC_ROWS := ref_umae_swin_t,mkk_umae_swin_t,mkck_umae_swin_t,ref_simmim_swin_t,mkk_simmim_swin_t,mkck_simmim_swin_t,ref_umae_pvt_s,mkk_umae_pvt_s,mkck_umae_pvt_s,ref_simmim_pvt_s,mkk_simmim_pvt_s,mkck_simmim_pvt_s,hf_mae_vit_b,mkk_mae_vit_b,mkck_mae_vit_b
SBS5_ROWS := ref_umae_swin_t,mkk_umae_swin_t,ref_simmim_swin_t,mkk_simmim_swin_t,ref_umae_pvt_s,mkk_umae_pvt_s,ref_simmim_pvt_s,mkk_simmim_pvt_s,hf_mae_vit_b,mkk_mae_vit_b
SBSC_ROWS := ref_umae_swin_t,mkck_umae_swin_t,ref_simmim_swin_t,mkck_simmim_swin_t,ref_umae_pvt_s,mkck_umae_pvt_s,ref_simmim_pvt_s,mkck_simmim_pvt_s,hf_mae_vit_b,mkck_mae_vit_b

CALTECH ?= $(SHARED)/data/caltech101
BENCH_WORK ?= /tmp/mimkit-bench-data

.PHONY: install demo test test-fast lint clean docs bench results

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	# keep the installed torch: torchvision must match it exactly, and must not pull another torch build
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mimkit demo --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mimkit tests scripts
	$(VENV)/bin/ruff format --check mimkit tests scripts
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(PY) scripts/render_docs.py

# Speed and memory (about 3 hours on 2 CPU cores, keep the machine otherwise idle): writes the result files under
# docs/benchmarks/, then renders docs/. `make results` does the same for the measurements on Caltech-101.
bench: $(STAMP)
	@test -n "$(REF)" || { echo "make bench: give REF=folder of the released UM-MAE code (see $(SHARED)/tools/side_by_side.py)"; exit 2; }
	mkdir -p docs/benchmarks
	{ echo "# $$(date -u +%F) $$(nproc) cores, eager, rounds 3, at $$(git rev-parse --short HEAD)"; $(PY) scripts/side_by_side_compiled.py --tool $(SHARED)/tools/side_by_side.py --ref-dir $(REF) --rounds 3 --rows $(SBS_ROWS); } > docs/benchmarks/side_by_side.log
	{ echo "# $$(date -u +%F) $$(nproc) cores, compiled rows, rounds 3, at $$(git rev-parse --short HEAD)"; $(PY) scripts/side_by_side_compiled.py --tool $(SHARED)/tools/side_by_side.py --ref-dir $(REF) --rounds 3 --rows $(SBSC_ROWS); } > docs/benchmarks/side_by_side_compiled.log
	{ echo "# $$(date -u +%F) $$(nproc) cores, eager, rounds 5, at $$(git rev-parse --short HEAD)"; $(PY) scripts/side_by_side_compiled.py --tool $(SHARED)/tools/side_by_side.py --ref-dir $(REF) --rounds 5 --rows $(SBS5_ROWS); } > docs/benchmarks/side_by_side_5rounds.log
	{ echo "# $$(date -u +%F) $$(nproc) cores, eager and compiled rows in one run, rounds 3, at $$(git rev-parse --short HEAD)"; $(PY) scripts/side_by_side_compiled.py --tool $(SHARED)/tools/side_by_side.py --ref-dir $(REF) --rounds 3 --rows $(SBSEC_ROWS); } > docs/benchmarks/side_by_side_eager_compiled.log
	{ echo "# $$(date -u +%F) $$(nproc) cores, rounds 3, at $$(git rev-parse --short HEAD)"; $(PY) scripts/stage_times.py --tool $(SHARED)/tools/side_by_side.py --ref-dir $(REF) --rounds 3 --rows ref_umae_pvt_s,mkk_umae_pvt_s; } > docs/benchmarks/stage_times_pvt.log
	$(PY) scripts/bench_table.py record docs/benchmarks/lomar_vs_mae.json -- --models mae_vit_base_patch16 lomar_vit_base_patch16 --img-size 224 384 448 --batch-size 4 $(BENCH_CPU)
	$(PY) scripts/bench_table.py record docs/benchmarks/mixmae_vs_simmim.json -- --models simmim_mixswin_base_224 mixmae_swin_base_224 mixmae_swin_base_224:pairing=once --batch-size 8 $(BENCH_CPU)
	$(PY) scripts/bench_table.py record docs/benchmarks/coma_vs_mae.json -- --models mae_vit_base_patch16 coma_dyvit_base_224:mode=pair coma_dyvit_base_224:mode=cycle coma_dyvit_base_224:mode=cycle,teacher=ema coma_dyvit_tiny_224:mode=cycle coma_vit_base_patch16:mode=cycle --batch-size 8 $(BENCH_CPU)
	$(PY) scripts/bench_table.py record docs/benchmarks/umae_vs_simmim_swin_b32.json -- --models simmim_swin_tiny_256 umae_swin_tiny_256 --batch-size 32 --steps 2 --warmup 1 --rounds 3 --precision fp32
	$(PY) scripts/bench_table.py record docs/benchmarks/umae_vs_simmim_pvt_b32.json -- --models simmim_pvt_small_256 umae_pvt_small_256 --batch-size 32 --steps 2 --warmup 1 --rounds 3 --precision fp32
	$(PY) scripts/bench_table.py record docs/benchmarks/ckpt_vit_large.json -- --models mae_vit_large_patch16 mae_vit_large_patch16:grad_checkpointing=true --batch-size 32 --steps 1 --warmup 0 --rounds 3 --precision fp32
	$(PY) scripts/bench_table.py record docs/benchmarks/ckpt_swin_large.json -- --models umae_swin_large_256 umae_swin_large_256:grad_checkpointing=true --batch-size 16 --steps 1 --warmup 0 --rounds 3 --precision fp32
	$(PY) scripts/fsdp_build_memory.py --model mae_vit_large_patch16 --rounds 3 --out docs/benchmarks/fsdp_build_memory.json
	$(PY) scripts/fsdp_build_memory.py --model mae_vit_large_patch16 --ranks 4 --rounds 3 --out docs/benchmarks/fsdp_build_memory_4.json
	$(PY) scripts/time_demo.py --rounds 2 --out docs/benchmarks/demo_time.json
	$(PY) scripts/compile_check.py --out docs/benchmarks/compile_check.json
	$(PY) scripts/cpu_linear.py --sweep --rounds 5 --json docs/benchmarks/cpu_linear_sweep.json
	$(PY) scripts/cpu_linear.py simmim_pvt_small_256 umae_pvt_small_256 simmim_swin_tiny_256 umae_swin_tiny_256 --rounds 4 --json docs/benchmarks/cpu_linear_steps.json
	$(PY) scripts/row_gather.py > docs/benchmarks/row_gather_cpu.txt
	$(PY) scripts/path_memory.py --paths 1000000 --workers 2 --rounds 3 --out docs/benchmarks/path_memory.json
	$(MAKE) docs

# Measurements on Caltech-101 (1.5-2 hours on 2 CPU cores): loaders, docs/results.md and its figures.
results: $(STAMP)
	@test -d "$(CALTECH)/train" || { echo "make results: no $(CALTECH)/train; give CALTECH=folder with train/ and val/"; exit 2; }
	$(PY) scripts/bench_data_sources.py --data $(CALTECH)/train --work $(BENCH_WORK) --rounds 3 --out docs/benchmarks/data_sources.json
	$(PY) scripts/bench_data_sources.py --data $(CALTECH)/train --work $(BENCH_WORK) --rounds 3 --img-size 224 --workers 1 2 --sources "tar shards" --out docs/benchmarks/data_sources_224.json
	$(PY) scripts/loader_vs_model.py --data $(BENCH_WORK)/shards --rounds 3 --out docs/benchmarks/loader_vs_model.json
	$(PY) scripts/caltech_results.py --data $(CALTECH) --minutes 3 --out runs/results --json docs/results/caltech101.json
	$(PY) scripts/results_page.py docs/results/caltech101.json --figures docs
	$(MAKE) docs

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
