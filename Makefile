# caffetune: `make setup` installs everything on a fresh Debian 12 machine (idempotent; a second run takes seconds),
# `make test` runs the test suite against the real Caffe, `make demo` runs the whole fine-tuning job.
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

.PHONY: setup apt venv caffe proto test demo bench transfer-bench clean

setup: apt venv caffe proto

apt:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); }

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77' wheel
	$(PY) -m pip install -q -e '.[test,pycaffe]'
	touch $@

# Builds into $(CACHE)/caffe-<version>-<cpu|cuda>-py<ver>-np<ver>; CAFFE_CUDA=1 builds with CUDA.
caffe: venv
	proto/build-caffe.sh $(abspath $(PY))

proto: $(SCHEMA)

$(SCHEMA): proto/caffe-source.lock proto/compile_schema.py | venv
	proto/fetch-caffe.sh $(dir $(CAFFE_SRC))
	$(PY) proto/compile_schema.py $(CAFFE_SRC)/src/caffe/proto/caffe.proto $@

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
