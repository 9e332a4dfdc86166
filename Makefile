# wgx: the two commands of the README, plus helpers.
#   make demo         set up this machine, then run the two-namespace tunnel demo
#   make test         set up this machine, then run the whole test suite
#   make test-latest  the fast tests + worker/fast-path tests against the newest releases
#   make test-lowest  the same against the lowest versions pyproject.toml allows
#   make lock         refresh requirements.lock (run `make test-latest` first)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# requirements.lock: what setup.sh installs. uv is pinned so that a refresh
# changes package versions, not the lock's format; it lives in a throwaway
# venv under /tmp (recreated when missing, never in .venv).
UV_VERSION := 0.13.10
UV_VENV ?= /tmp/wgx-uv-$(UV_VERSION)
UV := $(UV_VENV)/bin/uv
LOCK_CMD := uv pip compile --no-config pyproject.toml --extra dev \
	--python-version 3.11 --python-platform x86_64-unknown-linux-gnu

# Throwaway venvs, recreated on every run (outside the repo).
LATEST_VENV ?= /tmp/wgx-latest-venv
LOWEST_VENV ?= /tmp/wgx-lowest-venv
KEY_PACKAGES := cryptography pyroute2 numpy typer click rich matplotlib \
	pyparsing pytest pytest-timeout hypothesis prometheus-client atheris ruff
# The worker and fast-path tests: their privileged half (the unprivileged tests of
# these files are in the first run already).
WORKER_TESTS := tests/test_worker_batches.py tests/test_pool.py tests/test_fastpath.py \
	tests/test_xsk.py tests/test_xdp.py

# Each package's version and where it is imported from (the venv, or Debian's system site).
SHOW_VERSIONS := import importlib.metadata as m, re, sys; \
	norm = lambda n: re.sub(r"[-_.]+", "-", n).lower(); found = {}; \
	[found.setdefault(norm(d.metadata["Name"]), d) for d in m.distributions()]; \
	[print("  %-18s %-10s %s" % ((n, found[norm(n)].version, found[norm(n)].locate_file("")) \
	 if norm(n) in found else (n, "-", "not installed"))) for n in sys.argv[1:]]

# $(call dep_tests,venv): which versions, then the fast tests, then the privileged
# worker/fast-path tests; both runs always run, the target fails if either did.
define dep_tests
	@$(1)/bin/python -c '$(SHOW_VERSIONS)' $(KEY_PACKAGES)
	@rc=0; \
	$(1)/bin/python -m pytest -p no:cacheprovider -m "not privileged and not slow" $(PYTEST_ARGS) || rc=1; \
	$(1)/bin/python -m pytest -p no:cacheprovider -m privileged $(PYTEST_ARGS) $(WORKER_TESTS) || rc=1; \
	exit $$rc
endef

.PHONY: setup demo test test-latest test-lowest lock lint clean
setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Newest releases of everything, no lock, no constraints: PIP_CONSTRAINT=/dev/null
# replaces any constraint from the environment or a pip config file.
test-latest: setup
	rm -rf $(LATEST_VENV)
	/usr/bin/python3 -m venv --system-site-packages $(LATEST_VENV)
	PIP_CONSTRAINT=/dev/null $(LATEST_VENV)/bin/python -m pip install -q \
		--disable-pip-version-check --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -P scripts/venv_check.py --pip-check
	@echo "test-latest: newest releases in $(LATEST_VENV):"
	$(call dep_tests,$(LATEST_VENV))

# Lowest versions that pyproject.toml allows for wgx's direct dependencies
# (indirect ones newest): checks that its lower bounds are honest.
test-lowest: setup $(UV)
	rm -rf $(LOWEST_VENV)
	/usr/bin/python3 -m venv --system-site-packages $(LOWEST_VENV)
	$(UV) pip install --no-config --python $(LOWEST_VENV)/bin/python \
		--resolution lowest-direct -e ".[dev]"
	$(LOWEST_VENV)/bin/python -P scripts/venv_check.py --pip-check
	@echo "test-lowest: lowest direct versions in $(LOWEST_VENV):"
	$(call dep_tests,$(LOWEST_VENV))

$(UV):
	rm -rf $(UV_VENV)
	/usr/bin/python3 -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"

# Resolves from scratch (to stdout, so no old pin is kept), then replaces the lock.
lock: $(UV)
	$(UV_VENV)/bin/$(LOCK_CMD) > requirements.lock.new
	mv requirements.lock.new requirements.lock

lint:
	$(VENV)/bin/ruff check wgx tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
