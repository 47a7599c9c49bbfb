# dmarw: two commands on a fresh machine.
#   make demo   creates .venv, installs dmarw, runs the main job on a built-in default
#   make test   installs the test dependencies into .venv and runs the whole suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench clean asan peer-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==23.2.1" "setuptools==84.2.1"

$(STAMP): $(BIN)/python pyproject.toml $(shell find src -name '*.py' -o -name '*.c' 2>/dev/null)
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/dmarw demo

test: $(TEST_STAMP) peer-deps
	@$(BIN)/python -c "import dmarw._native as n; assert n.__file__" || { echo "the native core did not build (see pip's output above)"; exit 1; }
	@$(BIN)/python -c "import dmarw._vmm" || { echo "the native vCPU loop dmarw._vmm did not build (see pip's output above)"; exit 1; }
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/paths.py

clean:
	rm -rf $(VENV) build src/*.egg-info

# The native core built with AddressSanitizer + UndefinedBehaviorSanitizer, in its own
# directory (the in-place build is untouched), and the whole suite run against it with the
# sanitizer runtimes preloaded (native is the default core, and tests/contract/ runs
# every contract suite on it explicitly).  Any report fails the target.  About 3 minutes.
ASAN_DIR := build/asan
ASAN_RT = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)
asan: $(TEST_STAMP)
	rm -rf $(ASAN_DIR)
	mkdir -p $(ASAN_DIR)
	cp -r src/dmarw $(ASAN_DIR)/dmarw
	rm -f $(ASAN_DIR)/dmarw/*.so
	DMARW_SANITIZE=1 $(BIN)/python setup.py -q build_ext --build-temp $(ASAN_DIR)/tmp --build-lib $(ASAN_DIR) 2>&1 | grep -v -i deprecat || true
	test -n "$$(ls $(ASAN_DIR)/dmarw/_native*.so)"
	LD_PRELOAD="$(ASAN_RT)" PYTHONPATH=$(ASAN_DIR) PYTHONMALLOC=malloc \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(BIN)/python -c "import dmarw._native as n, sys; assert '$(ASAN_DIR)' in n.__file__, n.__file__; print('sanitized build:', n.__file__)"
	LD_PRELOAD="$(ASAN_RT)" PYTHONPATH=$(ASAN_DIR) PYTHONMALLOC=malloc \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests

# The Debian packages that build the vfio-user peer (libvfio-user, in ../shared/peers), which
# the interop tests build in a scratch folder.  Installed only when missing; apt-get update
# runs once, first.  Without root or apt this says so loudly and goes on: the peer tests then
# skip, each saying why.
PEER_DEBS := meson ninja-build pkg-config libjson-c-dev libcmocka-dev
peer-deps:
	@missing=""; for p in $(PEER_DEBS); do \
	  dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "peer build tools present: $(PEER_DEBS)"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "*** WARNING: cannot install$$missing (needs root and apt-get): the vfio-user peer tests will skip ***"; \
	else \
	  echo "installing the peer build tools:$$missing"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null; } \
	  || echo "*** WARNING: apt-get could not install$$missing: the vfio-user peer tests will skip ***"; \
	fi
