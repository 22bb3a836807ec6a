# Set-up is idempotent: the venv is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# The demo and the tests run on the CPU; libtpu (test extra, for `plan`) would otherwise look
# for TPU chips in every process and warn. Benchmarks use whatever accelerator is there.
demo test test-all: export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	env -u XLA_FLAGS $(VENV)/bin/agentgym-jax train --config configs/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -m "not slow" -q -n 2 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	for b in bench/*.py; do env -u XLA_FLAGS $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
