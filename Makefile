# The two commands a newcomer needs: `make demo` and `make test`. Both set up everything from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system-deps test test-fast demo bench bench-engine clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements.txt pyproject.toml scripts/setup-venv.sh
	PYTHON=$(PYTHON) bash scripts/setup-venv.sh
	touch $@

system-deps:
	bash scripts/install-prometheus.sh

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not kafka and not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m streamer demo

bench-engine: setup
	$(PY) benchmarks/engine_throughput.py

bench: bench-engine

clean:
	rm -rf $(VENV) .pytest_cache out
