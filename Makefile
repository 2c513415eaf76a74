# hopwatch: `make run` (daemon, default config) and `make test` (everything) do all set-up
# on a fresh root Debian/Ubuntu node. Both are idempotent; a second run takes seconds.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
BCC_DIST := /usr/lib/python3/dist-packages/bcc
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The daemon's runtime (daemon/hopwatch/runtime.py, docs/performance.md): `auto` (the
# default), `pypy` or `cpython`. With PyPy `hopwatch run` execs it: about half the CPU per
# message, ~40 MiB more memory, a JIT warm-up. `auto` takes PyPy when the distro's pypy3 is
# Python 3.9 or later (Debian 12: 3.9), decided once `system` has installed it, and CPython
# otherwise (Ubuntu 22.04: 3.8), so `make run` works on both. The tests always build the
# PyPy environment (they run both). The CLI and the tools stay on CPython.
RUNTIME ?= auto
PYPY ?= /usr/bin/pypy3
PYPY_VENV := .venv-pypy
PYPY_STAMP := $(PYPY_VENV)/.installed
# Exits 0 on the Python the daemon needs (3.9 or later).
NEEDS_39 := -c 'import sys; sys.exit(sys.version_info < (3, 9))'

.PHONY: all setup system venv runtime run test test-unit test-kernel lint bench clean

all: setup

setup: system venv

# apt packages, kernel headers (or the merged fallback), tracefs
system:
	@bash scripts/setup-system.sh

$(PY):
	$(PYTHON) -m venv $(VENV)

# The venv sees Debian's bcc (pure ctypes) and nothing else of dist-packages: a .pth file
# adds a folder that holds only a symlink to the bcc package.
$(VENV)/bcc-shim/bcc: | $(PY)
	mkdir -p $(VENV)/bcc-shim
	ln -sfn $(BCC_DIST) $(VENV)/bcc-shim/bcc
	echo "$(abspath $(VENV))/bcc-shim" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hopwatch-bcc.pth

$(STAMP): pyproject.toml | $(PY) $(VENV)/bcc-shim/bcc
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# PyPy: only what the daemon imports (no test tools), bcc through the same shim.
$(PYPY_VENV)/bin/python:
	$(PYPY) -m venv $(PYPY_VENV)

$(PYPY_STAMP): pyproject.toml | $(PYPY_VENV)/bin/python $(VENV)/bcc-shim/bcc
	@$(PYPY_VENV)/bin/python $(NEEDS_39) || { \
	  echo "$(PYPY) is Python $$($(PYPY_VENV)/bin/python -c 'import platform; print(platform.python_version())'):" \
	    "the daemon needs 3.9 or later (RUNTIME=cpython needs no PyPy)" >&2; exit 1; }
	$(PYPY_VENV)/bin/python -m pip install -q -e .
	echo "$(abspath $(VENV))/bcc-shim" > $$($(PYPY_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hopwatch-bcc.pth
	$(PYPY_VENV)/bin/python -c 'from hopwatch._bcc import import_bcc; import_bcc(); import hopwatch.capture.live'
	touch $(PYPY_STAMP)

# `.venv/hopwatch-pypy` is what `hopwatch run` execs (runtime.py); without it, CPython runs.
# Expanded when the recipe runs, after `system`: `pypy` when $(PYPY) is 3.9 or later.
PYPY_USABLE = $(shell [ -x $(PYPY) ] && $(PYPY) $(NEEDS_39) 2>/dev/null && echo pypy)
RUNTIME_USED = $(if $(filter auto,$(RUNTIME)),$(or $(PYPY_USABLE),cpython),$(RUNTIME))

runtime: $(STAMP)
	@case '$(RUNTIME)' in auto | pypy | cpython) ;; *) \
	  echo "RUNTIME must be auto, pypy or cpython, not '$(RUNTIME)'" >&2; exit 2 ;; esac
	$(if $(filter pypy,$(RUNTIME_USED)),@$(MAKE) -q $(PYPY_STAMP) || $(MAKE) --no-print-directory $(PYPY_STAMP))
	$(if $(filter pypy,$(RUNTIME_USED)),ln -sfn $(abspath $(PYPY_VENV))/bin/hopwatch,rm -f) $(VENV)/hopwatch-pypy
	@echo "runtime: $(RUNTIME_USED) (RUNTIME=$(RUNTIME))"

venv: $(STAMP) $(VENV)/bcc-shim/bcc runtime

run: setup
	$(VENV)/bin/hopwatch run

# The tests run the daemon on both interpreters (tests/test_runtime.py).
test: setup $(PYPY_STAMP)
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m 'not kernel' $(PYTEST_ARGS)

test-kernel: setup $(PYPY_STAMP)
	$(PY) -m pytest -m kernel $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/mypy

bench: setup
	command -v valgrind >/dev/null || apt-get install -y -q valgrind  # hotpath: instructions
	$(PY) bench/replay_bench.py
	$(PY) bench/hotpath_bench.py

clean:
	rm -rf $(VENV) $(PYPY_VENV) build dist *.egg-info

# --- systemd service (docs/operations.md) ---------------------------------------------
# A self-contained venv under PREFIX, the unit, a commented default config; enables the
# service when systemd is PID 1. Overrides: PREFIX, CONFDIR, UNITDIR, ENABLE=no, PURGE=1.
.PHONY: install uninstall

install: system
	@bash systemd/install.sh install

uninstall:
	@bash systemd/install.sh uninstall

# --- fuzzing (fuzz/hopwatch_fuzz.py) -----------------------------------------------------
# atheris (libFuzzer) campaigns on the HTTP/1, HTTP/2, connection and header-check entry
# points and on the daemon's analysis of capture events (pipeline), seeded with
# tests/fixtures; FUZZ_SECONDS per target. Corpora grow in fuzz/corpus (not committed); a
# crash leaves fuzz/artifacts/crash-* and fails the target.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= http1 http2 conn header pipeline
.PHONY: fuzz
fuzz: venv
	$(PY) -m pip install -q atheris
	$(PY) fuzz/hopwatch_fuzz.py seed fuzz/corpus
	mkdir -p fuzz/artifacts
	@set -e; for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t ($(FUZZ_SECONDS)s)"; \
	  $(PY) fuzz/hopwatch_fuzz.py run $$t fuzz/corpus/$$t -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=fuzz/artifacts/$$t- -print_final_stats=1 2>&1 \
	    | tee fuzz/artifacts/$$t.log | grep -E '^(Done|stat::number_of_executed_units|==|.*(ERROR|Uncaught))' ; \
	  test $${PIPESTATUS[0]} -eq 0; \
	done
