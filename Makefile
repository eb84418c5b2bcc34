# RSM Bench — every target that runs code depends on `setup`, so one command works on a fresh clone.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
SCALE       ?= tiny
MODE        ?= trained
ARGS        ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
# SCALE=paper runs on GPUs through accelerate (2 processes for Figure 3, 4 for the GenEval run and the
# first-order Figures 5/6), with the repository's accelerate config and a free port (experiments/launch.py)
ifeq ($(SCALE),paper)
RUN_FIG3       = $(PY) -m experiments.launch --processes 2
RUN_FIG_ZO     = $(PY) -m experiments.launch --processes 4
RUN_FIG_FO     = $(PY) -m experiments.launch --processes 4
RUN_FIG_ZO_DIFF = $(PY) -m experiments.launch --processes 4
else
RUN_FIG3       = $(PY) -m
RUN_FIG_ZO     = $(PY) -m
RUN_FIG_FO     = $(PY) -m
RUN_FIG_ZO_DIFF = $(PY) -m
endif

.DEFAULT_GOAL := help
METHOD      ?= tempflow-grpo
.PHONY: help setup test test-slow lint train fig3 fig-zo-flow fig-zo-diffusion fig5 fig6 paper-data paper-embeddings bench fig-toy fig-nim table1 smoke-reference toy-assets tiny-assets tiny-check clean-venv plan

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv, install $(TORCH_SPEC) then this package (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup  ## the fast suite (< 10 min on 2 cores)
	$(PY) -m pytest -q

test-slow: setup  ## the tests marked slow
	$(PY) -m pytest -q -m slow

lint: setup  ## ruff, and the layout's import contracts (pyproject.toml [tool.importlinter])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

train: setup  ## one run of any registered method (METHOD=tempflow-grpo SCALE=smoke|tiny, ARGS="--set k=v")
	$(PY) -m experiments.run $(METHOD) --scale $(SCALE) $(ARGS)

fig3: setup  ## Figure 3: TempFlow-GRPO vs Uniform vs Equal Variance Reallocation (SCALE=smoke|tiny|paper|1gpu)
	$(RUN_FIG3) experiments.fig3 --scale $(SCALE) $(ARGS)

fig-zo-flow: setup  ## GenEval validation: lowsnr2 + matching + fair clip2 vs TempFlow-GRPO (SCALE=smoke|tiny|paper)
	$(RUN_FIG_ZO) experiments.fig_zo_flow --scale $(SCALE) $(ARGS)

fig-zo-diffusion: setup  ## Fig. 16 b, c: PCPO vs the sparse-branching redesign on diffusion (SCALE=smoke|tiny|paper)
	$(RUN_FIG_ZO_DIFF) experiments.fig_zo_diffusion --scale $(SCALE) $(ARGS)

paper-data: setup  ## fetch the paper runs' prompt files and aesthetic head, sha256-checked, into $RSM_BENCH_DATA (or ~/.cache/rsm_bench)
	$(PY) -m experiments.paper_data $(ARGS)

fig5: setup  ## Figure 5: first-order redesign vs pruned VGG-Flow (flow) and nabla-DB (diffusion) (SCALE=smoke|tiny|paper)
	$(RUN_FIG_FO) experiments.fig5 --scale $(SCALE) $(ARGS)

fig6: setup  ## Figure 6: estimator or weighting? Linear Baselines A/B, the estimator ablation (SCALE=smoke|tiny|paper)
	$(RUN_FIG_FO) experiments.fig6 --scale $(SCALE) $(ARGS)

FIG         ?= fig3
paper-embeddings: setup  ## embed every prompt of a paper figure's runs to disk, once (FIG=fig3|fig_zo_flow|fig_zo_diffusion|fig5|fig6, SCALE=paper|1gpu)
	$(PY) -m experiments.embeddings --figure $(FIG) --scale $(if $(filter tiny smoke,$(SCALE)),paper,$(SCALE)) $(ARGS)

plan: setup  ## per-GPU memory plan of a paper run (SCALE=paper|1gpu FIG=fig3|fig_zo_flow|fig_zo_diffusion|fig5|fig6)
	$(PY) -m experiments.plan --figure $(FIG) --scale $(if $(filter tiny smoke,$(SCALE)),paper,$(SCALE)) $(ARGS)

bench: setup  ## per-epoch time split and NFE per parent of each Figure 3 arm (results/tables/bench_zo_flow.md)
	$(PY) -m experiments.bench $(ARGS)

fig-toy: setup  ## toy estimator figure (SCALE=smoke|tiny|paper, MODE=trained|oracle, ARGS="--set k=v")
	$(PY) -m experiments.fig_toy --scale $(SCALE) --mode $(MODE) $(ARGS)

fig-nim: setup  ## influence metric per timestep of every method at its paper schedule (Figure 1)
	$(PY) -m experiments.fig_nim

table1: setup  ## Table 1 from the method registry (results/tables/table1.md, .tex)
	$(PY) -m experiments.table1

smoke-reference: setup  ## re-measure the numbers gate's reference (tests/reference/smoke_metrics.json)
	$(PY) -m experiments.smoke_reference

tiny-assets: setup  ## pretrain the tiny world (CLIP, aesthetic scorer, flow and diffusion models; < 60 min)
	$(PY) -m experiments.tiny_assets $(ARGS)

tiny-check: setup  ## measure the shipped tiny world: results/tables/tiny_check.json and two figures
	$(PY) -m experiments.tiny_check $(ARGS)

clean-venv:  ## remove the virtual environment
	rm -rf $(VENV)

toy-assets: setup  ## retrain the toy's shipped denoisers with the paper's settings (~8 min)
	$(PY) -m experiments.toy_assets

CLUSTER     ?= local
DRY_RUN     ?=
PLAN        ?=
.PHONY: all-baselines sweep-status
all-baselines: setup  ## every trainable method, one matched budget (SCALE=smoke|tiny|paper CLUSTER=local|slurm DRY_RUN=1 [PLAN=1]; docs/cluster.md)
	$(PY) -m experiments.all_baselines --scale $(SCALE) --cluster $(CLUSTER) $(if $(filter 1,$(DRY_RUN)),--dry-run) $(if $(filter 1,$(PLAN)),--plan) $(ARGS)

sweep-status: setup  ## the all-baselines runs of SCALE: state, epochs, eval reward, GPU-hours, Slurm state
	$(PY) -m experiments.sweep_status --scale $(SCALE) $(ARGS)
