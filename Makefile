# The two commands a newcomer needs: `make demo` and `make test`. Both set up everything from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system-deps test test-fast demo bench bench-engine bench-kafka bench-kafka-quick bench-kafka-profile \
	bench-replay bench-durability bench-peers fault-harness fault-harness-long clean

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

bench-kafka: setup
	$(PY) benchmarks/kafka_end_to_end.py

bench-kafka-quick: setup
	$(PY) benchmarks/kafka_end_to_end.py --quick

bench-kafka-profile: setup
	$(PY) benchmarks/kafka_service_profile.py --output benchmarks/results/kafka_service_profile.txt

bench-replay: setup
	$(PY) benchmarks/topic_replay.py

bench-durability: setup
	$(PY) benchmarks/durability.py

# The long form of the fault harness; its short form runs inside `make test`.
fault-harness-long: setup
	$(PY) benchmarks/fault_harness.py --kills 50 --guarantee both

fault-harness: setup
	$(PY) benchmarks/fault_harness.py --short --guarantee both

bench-peers: setup
	bash benchmarks/peers/setup-venv.sh
	$(PY) benchmarks/compare.py

bench: bench-engine bench-kafka bench-replay bench-durability bench-peers

clean:
	rm -rf $(VENV) .pytest_cache out
