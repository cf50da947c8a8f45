# Seedling: the two quick-start commands are `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
DATA ?= ../shared/data

.PHONY: setup setup-dev model native serve test lint bench tasks tasks-quick

$(PY):
	.ci/setup.sh

setup:
	.ci/setup.sh

setup-dev:
	.ci/setup.sh --dev

model: setup
	$(PY) -m model.convert default

# the native CPU kernels (SEEDLING_QUANTIZE=auto serves q4 with them), built now rather than at the
# first start; where they cannot build, the server says why and serves through torch
native: setup
	$(PY) -m model.native || echo "native kernels not built: the server will use the torch path"

serve: setup model native
	$(PY) -m app --port $(PORT)

test: setup-dev
	$(PY) -m model.convert default
	$(PY) -m model.native || echo "native kernels not built: the q4 tests will say why"
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra

lint:
	$(PY) -m ruff check .

bench:
	$(PY) -m bench.engine_throughput

# task adapters (LoRA) + report: runs/tasks/report.md; kill and re-run to resume
tasks: setup model
	$(PY) -m training.make_tasks --data_dir $(DATA)

tasks-quick: setup model
	$(PY) -m training.make_tasks --data_dir $(DATA) --quick --out_dir runs/tasks-quick --adapters_dir runs/tasks-quick/adapters
