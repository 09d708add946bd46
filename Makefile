# tenant-metrics-router: every target builds on `make install` (a .venv in the checkout).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo bench fmt clean compile uncompile test-compiled

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check router tests bench
	$(BIN)/ruff format --check router tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format router tests bench
	$(BIN)/ruff check --fix router tests bench

# The optional compiled build (setup.py): the request path's hot modules compiled with mypyc,
# in place, shadowing their .py files until `make uncompile`. The Dockerfile ships this build.
# mypyc's shared runtime is a top-level module: it goes into the venv, where the console script
# finds it from any directory.
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)

compile: install
	METRICS_ROUTER_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace
	mv -f metrics_router__mypyc*.so $(SITE)/

uncompile:
	rm -f router/*.so router/http/*.so metrics_router__mypyc*.so
	[ -z "$(SITE)" ] || rm -f $(SITE)/metrics_router__mypyc*.so
	rm -rf build

# The test suite against the compiled build (then back to pure Python).
test-compiled: compile
	$(BIN)/pytest -q -p no:cacheprovider; rc=$$?; $(MAKE) uncompile; exit $$rc

demo: install
	$(BIN)/metrics-router demo

bench: install
	bash bench/run.sh

clean: uncompile
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
