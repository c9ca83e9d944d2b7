# The Makefile is the user's memory: thin targets over the klppo-bench CLI.
# First use creates .venv and installs everything (CPU torch by default; see README for CUDA).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENV    ?=
SPEC   ?= experiments/bench.yaml
# the report of a sweep: RESULTS/<the spec's name:> (or RESULTS/EXPERIMENT if EXPERIMENT is set)
EXPERIMENT ?=
REPORT_OF = $(if $(EXPERIMENT),$(RESULTS)/$(EXPERIMENT),$(SPEC) --results $(RESULTS))
RESULTS ?= results
# report: pool the stored runs of this experiment directory (e.g. results/reference/ppo_table1)
COMPARE_TO ?=
SEEDS  ?=
FRAMES ?=
BACKEND ?= local
WORKERS ?=
DEVICE ?=
ENGINE ?= auto
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# test processes (pytest-xdist, one test file per process; 0 runs the suite in this process)
TEST_WORKERS ?= 2

SWEEP_ARGS := $(if $(ENV),--env $(ENV)) --backend $(BACKEND) --results $(RESULTS) $(if $(DEVICE),--device $(DEVICE)) \
	--engine $(ENGINE) \
	$(if $(SEEDS),--seeds $(SEEDS)) $(if $(FRAMES),--frames $(FRAMES)) \
	$(if $(WORKERS),--workers $(WORKERS))

.PHONY: install bench sweep report test perf variants clean-venv

$(BIN)/klppo-bench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build (a few hundred MB). GPU users: TORCH="torch==2.13.0 --index-url ..."
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,ray]"
	touch $@

install: $(BIN)/klppo-bench

bench: install
	$(BIN)/klppo-bench sweep $(SPEC) $(SWEEP_ARGS)
	$(BIN)/klppo-bench report $(REPORT_OF)

sweep: install
	$(BIN)/klppo-bench sweep $(SPEC) $(SWEEP_ARGS)

report: install
	$(BIN)/klppo-bench report $(REPORT_OF) $(if $(COMPARE_TO),--compare-to $(COMPARE_TO))

variants: install
	$(BIN)/klppo-bench variants

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# PERF_BASELINE=<checkout of an older commit> adds that engine's rows to engine_generic.py
PERF_BASELINE ?=

perf: install
	$(BIN)/python benchmarks/throughput.py $(if $(ENV),--env $(ENV))
	$(BIN)/python benchmarks/batched.py $(if $(ENV),--env $(ENV))
	$(BIN)/python benchmarks/engine_generic.py $(if $(ENV),--env $(ENV)) \
		$(if $(PERF_BASELINE),--baseline $(PERF_BASELINE))

clean-venv:
	rm -rf $(VENV)
