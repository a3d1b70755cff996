# Foveal: two commands do all set-up on a fresh machine.
#   make up    -> the local stack on embedded defaults (SQLite, local pools, no cluster)
#   make test  -> the whole test suite (SQLite and a real PostgreSQL on loopback)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= router,pool,operator,ray,dev
STAMP := $(VENV)/.installed

.PHONY: up test venv proto check lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/foveal up

test: $(STAMP)
	bash scripts/test-deps.sh
	$(PY) -m pytest -q

# Regenerate the gRPC stubs from proto/ with the pinned grpcio-tools.
proto: $(STAMP)
	$(PY) -m foveal.api.generate

check: $(STAMP)
	$(PY) -m foveal.api.generate --check
	$(VENV)/bin/ruff check foveal tests
	$(VENV)/bin/ruff format --check foveal tests
	$(VENV)/bin/mypy foveal
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(VENV)/bin/foveal bench overhead

clean:
	rm -rf $(VENV) .pytest_cache
