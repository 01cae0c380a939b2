# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo  -> create .venv, install medjax, train + evaluate the quick joint registration experiment
#   make test  -> create .venv, install medjax[dev] plus the reference libraries, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
WORKDIR ?= runs/estienne2020_quick
# pytest-xdist workers for `make test` (CI has 2 cores; each worker compiles with XLA on its own)
TEST_WORKERS ?= 2

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	# Reference implementations for the parity tests (CPU torch wheel + MONAI). If they cannot be
	# installed the parity tests skip, unless MEDJAX_REQUIRE_REFERENCE=1 (as in CI) makes them fail.
	$(BIN)/pip install -q "torch==2.13.0" "monai>=1.4" || echo "warning: torch/MONAI not installed; parity tests will skip"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/medjax train estienne2020 --variant quick --workdir $(WORKDIR)
	$(BIN)/medjax eval estienne2020 --workdir $(WORKDIR)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check medjax tests experiments benchmarks notebooks

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/warp.py
	$(BIN)/python benchmarks/universeg.py
	$(BIN)/python benchmarks/conv.py
	$(BIN)/python benchmarks/models.py --system medicalzoo
	$(BIN)/python benchmarks/models.py --system systems
	$(BIN)/python benchmarks/xla_cpu_flags.py
	$(BIN)/python benchmarks/first_step.py
	$(BIN)/python benchmarks/zoo_budgets.py --seconds 200

clean:
	rm -rf $(VENV) runs .pytest_cache
