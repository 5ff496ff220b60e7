# caffetune: `make setup` installs everything on a fresh Debian 12 machine (idempotent; a second run takes seconds),
# `make test` runs the whole test suite against the real Caffe, `make check` the fast tier (no Caffe build) and
# ruff, `make demo` runs the whole fine-tuning job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := $(or $(CAFFETUNE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/caffetune)
SCHEMA := caffetune/_generated/caffe_schema.py
CAFFE_SRC := $(CACHE)/source-$(shell sed -n 's/^CAFFE_DEB_VERSION=//p' proto/caffe-source.lock)/src

# Debian packages: Caffe's build dependencies, graphviz for `caffetune draw`, Fashion-MNIST for the demo, PostgreSQL
# for the tests of `caffetune sweep` workers sharing a study.
APT_PACKAGES := build-essential cmake pkg-config patch xz-utils ca-certificates \
  libprotobuf-dev protobuf-compiler libgoogle-glog-dev libgflags-dev libhdf5-dev libleveldb-dev libsnappy-dev \
  liblmdb-dev libopencv-dev libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev \
  libopenblas-dev liblapack-dev graphviz dataset-fashion-mnist postgresql

LOGS := build/setup
EDITABLE := '.[test,pycaffe]'
SOURCE_STAMP := $(CAFFE_SRC)/.caffetune-patched
SITE = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# $(call logged,STEP,COMMAND): run COMMAND with its output in $(LOGS)/STEP.log, shown in full when it fails.
logged = mkdir -p $(LOGS) && { $(2); } >$(LOGS)/$(1).log 2>&1 || { status=$$?; cat $(LOGS)/$(1).log >&2; \
  echo "setup: $(1) failed (exit $$status); the log above is $(LOGS)/$(1).log" >&2; exit $$status; }

.PHONY: setup apt venv caffe pycaffe-path source proto check lint docs-check test demo bench transfer-bench clean

setup: apt venv caffe pycaffe-path proto
	@echo "setup: done (logs in $(LOGS)/)"

apt:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then echo "setup: apt packages already installed"; else \
	  echo "setup: installing apt packages (log: $(LOGS)/apt.log)"; \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $(call logged,apt,$$sudo apt-get update && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y --no-install-recommends $(APT_PACKAGES)); fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "setup: Python packages into $(VENV) (log: $(LOGS)/venv.log)"
	@$(call logged,venv,test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install --upgrade pip 'setuptools>=77' wheel && $(PY) -m pip install -e $(EDITABLE))
	@touch $@

# Builds into $(CACHE)/caffe-<version>-<cpu|cuda>-py<ver>-np<ver> (minutes the first time, then cached);
# CAFFE_CUDA=1 builds with CUDA.
caffe: venv
	@echo "setup: Caffe from the pinned source, cached in $(CACHE) (log: $(LOGS)/caffe.log)"
	@$(call logged,caffe,proto/build-caffe.sh $(abspath $(PY)))

# `import caffe` in the venv: a .pth file naming a folder that holds only the built pycaffe package.
pycaffe-path: caffe
	@prefix=$$(tail -1 $(LOGS)/caffe.log) && \
	  package=$$(ls -d "$$prefix"/lib/python3/dist-packages/caffe "$$prefix"/python/caffe 2>/dev/null | head -1) && \
	  mkdir -p "$$prefix/site" && ln -sfn "$$package" "$$prefix/site/caffe" && \
	  echo "$$prefix/site" >"$(SITE)/caffetune-pycaffe.pth"
	@$(PY) -c 'import caffe' && echo "setup: pycaffe importable in $(VENV) ($(VENV)/bin/python -c 'import caffe')"

source: $(SOURCE_STAMP)

$(SOURCE_STAMP):
	@echo "setup: pinned Caffe source into $(dir $(CAFFE_SRC)) (log: $(LOGS)/source.log)"
	@$(call logged,source,proto/fetch-caffe.sh $(dir $(CAFFE_SRC)))

proto: $(SCHEMA)

$(SCHEMA): $(SOURCE_STAMP) proto/compile_schema.py | venv
	@echo "setup: schema $@ from the pinned caffe.proto"
	@$(call logged,proto,$(PY) proto/compile_schema.py $(CAFFE_SRC)/src/caffe/proto/caffe.proto $@)

# The fast tier: lint, then every test that needs only the venv, the apt packages and the schema (no Caffe build,
# no download but the pinned Caffe source).
check: apt venv source proto lint
	$(PY) -m pytest -q -m "not caffe and not network"

lint: venv
	$(PY) -m ruff check caffetune tests bench proto tools

# Every shell example of README.md and docs/ (minutes: it trains and evaluates the tour's small runs).
docs-check: setup
	$(PY) tools/docs_check.py

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/caffetune demo

bench: setup
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

transfer-bench: setup
	$(PY) bench/transfer.py

clean:
	rm -rf $(VENV) $(SCHEMA) build *.egg-info .pytest_cache
