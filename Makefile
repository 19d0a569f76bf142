# tokenrelay: `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMPS := .stamps
LLAMA_CPP_VERSION := 0.3.36
# built once per machine, outside the checkout, so fresh clones and CI reuse it
WHEELHOUSE ?= $(HOME)/.cache/tokenrelay/wheels
# llama.cpp is built without -march=native: AMX kernels segfault under some VMs (docs/performance.md),
# and a portable AVX2 build is what pip caches and reuses on other machines of the same kind.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: serve test lint bench bench-embedded install install-test clean proto

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMPS)/install: pyproject.toml | $(PY)
	@mkdir -p $(STAMPS) $(WHEELHOUSE)
	@ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (portable AVX2; a few minutes, once per machine)"; \
	  $(PIP) wheel --no-deps --no-cache-dir -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(PIP) install --find-links $(WHEELHOUSE) -e .
	@touch $@

# anthropic SDK 1.x sends x-api-key where 2.x sends a Bearer token: tests run both (2.x is in .[test])
LEGACY_ANTHROPIC := $(VENV)/legacy/anthropic-1.17.0

$(STAMPS)/install-test: pyproject.toml $(STAMPS)/install
	$(PIP) install --find-links $(WHEELHOUSE) -e '.[test,lint]'
	$(PIP) install -q --no-deps --upgrade --target $(LEGACY_ANTHROPIC) anthropic==1.17.0
	@touch $@

install: $(STAMPS)/install
install-test: $(STAMPS)/install-test

serve: $(STAMPS)/install
	$(VENV)/bin/tokenrelay serve $(if $(CONFIG),--config $(CONFIG))

# the suite runs on the default HTTP server (the built-in one); the stream, error, resume, backpressure,
# client and WebSocket tests run once more on granian (--server granian)
GRANIAN_SERVER_TESTS = tests/test_chat_stream.py tests/test_errors.py tests/test_stream_lifecycle.py \
	tests/test_backpressure.py tests/test_resume.py tests/test_websocket.py tests/test_anthropic.py \
	tests/test_client.py

test: $(STAMPS)/install-test
	$(PY) -m pytest $(PYTEST_ARGS)
	TOKENRELAY_HTTP_SERVER=granian $(PY) -m pytest -q -p no:cacheprovider $(GRANIAN_SERVER_TESTS)

lint: $(STAMPS)/install-test
	$(VENV)/bin/ruff check src tests examples $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check src tests examples $(wildcard benchmarks)
	$(VENV)/bin/mypy

$(STAMPS)/install-bench: pyproject.toml $(STAMPS)/install-test
	$(PIP) install --find-links $(WHEELHOUSE) -e '.[test,lint,bench]'
	@touch $@

# the scale suite (issue 7): direct, nginx, tokenrelay with 1 and 2 workers, 5 to 10,000 streams;
# nginx-light is installed when missing (root with apt-get), otherwise its rows are skipped
bench: $(STAMPS)/install-bench
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light || echo "nginx-light not installed"
	$(PY) benchmarks/run.py --scale --out docs/benchmarks.md --plot docs/bench-scale.png

# the embedded model (issue 7, item 3): tokenrelay's `tiny` against llama-cpp-python called directly
bench-embedded: $(STAMPS)/install
	$(PY) benchmarks/embedded.py --out docs/benchmarks.md

# regenerate the gRPC code after editing the .proto (the generated files are committed)
proto: $(STAMPS)/install-test
	$(PIP) install -q grpcio-tools==1.85.1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src proto/tokenrelay/grpc_api/tokenrelay.proto

clean:
	rm -rf $(VENV) $(STAMPS) build *.egg-info src/*.egg-info
