# tokenrelay: `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMPS := .stamps
# llama.cpp is built without -march=native: AMX kernels segfault under some VMs (docs/performance.md),
# and a portable AVX2 build is what pip caches and reuses on other machines of the same kind.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export FORCE_CMAKE := 1

.PHONY: serve test lint bench install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMPS)/install: pyproject.toml | $(PY)
	@mkdir -p $(STAMPS)
	$(PIP) install -e .
	@touch $@

$(STAMPS)/install-test: pyproject.toml $(STAMPS)/install
	$(PIP) install -e '.[test,lint]'
	@touch $@

install: $(STAMPS)/install
install-test: $(STAMPS)/install-test

serve: $(STAMPS)/install
	$(VENV)/bin/tokenrelay serve $(if $(CONFIG),--config $(CONFIG))

test: $(STAMPS)/install-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMPS)/install-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMPS)/install-test
	$(PY) benchmarks/run.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) $(STAMPS) build *.egg-info src/*.egg-info
