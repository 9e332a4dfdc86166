# wgx: the two commands of the README, plus helpers.
#   make demo   set up this machine, then run the two-namespace tunnel demo
#   make test   set up this machine, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean
setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check wgx tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
