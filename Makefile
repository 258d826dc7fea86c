# Upload Gateway — the two commands: `make run` and `make test` (README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench soak deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

deps-%:
	scripts/system-deps.sh $*

run: deps-run $(STAMP)
	scripts/run-demo.sh

test: deps-test $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	# Three at once: most tests wait on sockets and timers, not the CPU (241 s serially, ~100 s).
	# By file: a module's tests run in their serial order, with its gateway fixtures made once.
	$(BIN)/python -m pytest -n 3 --dist loadfile

bench: deps-bench $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.auth_cost
	$(BIN)/python -m bench.floor
	$(BIN)/python -m bench.spool_file_cost

soak: deps-run $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
