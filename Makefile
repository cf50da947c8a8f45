# Seedling: the two quick-start commands are `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
DATA ?= ../shared/data

.PHONY: setup setup-dev model serve test lint bench tasks tasks-quick

$(PY):
	.ci/setup.sh

setup:
	.ci/setup.sh

setup-dev:
	.ci/setup.sh --dev

model: setup
	$(PY) -m model.convert default

serve: setup model
	$(PY) -m app --port $(PORT)

test: setup-dev
	$(PY) -m model.convert default
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
