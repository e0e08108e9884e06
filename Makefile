# The two commands of the README: `make demo` runs the whole stack, `make test` passes the tests.
# `make check` is the quick loop (under 2 minutes): ruff and the tests that need no service and train nothing long.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch's exact pin, read from pyproject.toml (its one definition).
TORCH := $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml)
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --excludes requirements/lock.exclude

.PHONY: demo test check lint bench clean lock

# Every dependency but torch comes from the hashed lock (--no-deps: the lock lists them all). torch is kept out of
# the lock and installed by its exact pin: its wheel (and its nvidia-* dependencies) differ between CPU and CUDA
# hosts, so pip picks the one the configured index offers for this host.
$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements/dev.lock
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Re-resolve the locks after editing pyproject.toml (pins already in a lock are kept; add --upgrade to LOCK_FLAGS
# to move them). The images install api.lock and worker.lock; make installs dev.lock.
lock: $(STAMP)
	for extra in dev api worker; do \
	  $(VENV)/bin/uv pip compile pyproject.toml --extra $$extra $(LOCK_FLAGS) --custom-compile-command "make lock" \
	    --quiet -o requirements/$$extra.lock || exit 1; \
	done

demo: $(STAMP)
	$(PY) -m scripts.demo

# The slowest tests are listed at the end (--durations): where the suite's time goes.
test: $(STAMP)
	./scripts/ensure_chromium.sh
	./scripts/ensure_promtool.sh
	$(PY) -m scripts.redisctl run -- $(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

# The tests marked neither `services` (Redis, a server or worker process, SeaweedFS, a browser) nor `slow` (long
# training or compiling); tests/conftest.py sets the markers. Redis is pointed out of reach: a test that needs it
# without its marker fails here.
check: lint
	./scripts/ensure_promtool.sh
	REDIS_URL=redis://127.0.0.1:1/0 $(PY) -m pytest -q -ra -m "not services and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	./bench/cpu.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache/image-venvs
