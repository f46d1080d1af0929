# Two commands do all set-up: `make demo` (main job on the shipped small default) and `make test`.
# `make test-fast` (unit tests only) and `make lint` are for development.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TABLE := results/cifar10_table.csv
# Rules call `python -m pipeline.<stage>`: the venv's python must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test test-fast lint install dag clean

demo: install
	$(VENV)/bin/snakemake --cores all $(TABLE)
	@echo "table: $(TABLE) (markdown: results/cifar10_table.md, figures: results/figures/)"
	@cat results/cifar10_table.md

test: install
	$(PY) -m pytest -q

# Unit tests only, none over ~10 s (about 5 min, 4.4 CPU-minutes in one process): no workflow runs, stage
# subprocesses, SLURM, DVC remotes or DDP. One thread per process: it stays fast on a machine shared with other jobs.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not shared"

# Every check runs; the target fails if any of them does.
lint: install
	@status=0; \
	$(VENV)/bin/ruff check pipeline tests bench || status=1; \
	$(VENV)/bin/mypy pipeline || status=1; \
	$(PY) tools/lint_workflow.py || status=1; \
	$(VENV)/bin/snakefmt --check Snakefile rules || status=1; \
	exit $$status

install: $(VENV)/.installed

# torch is pinned first (the pair this project is tested with); pyproject allows a range around it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[test]'
	touch $@

dag: install
	$(VENV)/bin/snakemake --dag $(TABLE) | dot -Tpng > results/figures/dag.png

clean:
	rm -rf data/cifar10 data/generated data/pseudolabels models work logs benchmarks results/* .snakemake
