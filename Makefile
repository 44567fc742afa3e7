# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint check clean test-deps bench-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/jobstream dev

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Browser tests drive Debian's Chromium, the proxy test Debian's nginx and the archive tests
# Debian's PostgreSQL; without them those tests fail, never skip. Installed with apt when missing
# (as root, on Debian).
test-deps:
	@missing=""; \
	[ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$$missing nginx-light"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing for the tests"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The AI SDK tests run against the real npm packages, pinned by tests/js/package-lock.json.
JS_STAMP := tests/js/node_modules/.installed

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

test: lint test-deps $(JS_STAMP)
	$(BIN)/pytest

# What bench/ drives besides the venv: wrk for request costs, nginx with Nchan for comparisons.
bench-deps: install
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk nginx-light libnginx-mod-nchan

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
