# `make run`: set up .venv and chat with the default model.  `make test`: set up and run the tests.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
MODEL   ?= qwen3.5:0.8b

.PHONY: setup setup-test run test test-long lint typecheck bench clean

$(VPY):
	$(PY) -m venv $(VENV)

setup: $(VPY)
	./scripts/install-torch.sh $(VPY)
	$(VPY) -m pip install -q -e .

setup-test: setup
	$(VPY) -m pip install -q -e '.[test]'

run: setup
	$(VENV)/bin/deltarun chat $(MODEL)

# the default run (under ~15 min on 2 cores): skip reasons (-rs) and the slowest tests are printed
test: setup-test
	$(VPY) -m pytest -q -x -rs --durations=15 -m "not long"

# ruff (pyflakes, import order, lines ≤ 120) and mypy (lenient, pyproject.toml): CI runs both before the tests
lint: setup-test
	$(VPY) -m ruff check deltarun tests benchmarks
	$(VPY) -m mypy deltarun

typecheck: setup-test
	$(VPY) -m mypy deltarun

# checks past the default run's time budget (marked `long`)
test-long: setup-test
	$(VPY) -m pytest -q -rs --durations=15 -m long

bench: setup-test
	$(VPY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) build *.egg-info
