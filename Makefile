# The README's commands. Each creates .venv on first use, so `make run` and `make test` work alone
# on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-stamp
# The gguf extra's llama-cpp-python compiles llama.cpp (CPU only): ~15 min on 2 busy cores the first time, then pip
# reuses the wheel it built (~/.cache/pip/wheels). GGML_NATIVE=OFF: AVX2/FMA/F16C code for any x86-64-v3 CPU, not
# only the one that built it (the wheel is cached and the venv copied); GGML_NATIVE=ON is faster on AVX-512 CPUs.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false

.PHONY: setup run test test-system bench stack-test clean

setup: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk; a bare `torch` would
# download a CUDA build of several GB. DeepSpeed builds no ops at install time (they JIT on use).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[test,gguf]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/sftflow run

test: setup
	$(PY) -m pytest -q -ra -m "not system"

# Fault injection (killed runs, a stopped tracking server, a broken remote) and the stack test:
# real servers and whole flow runs, several minutes. CI runs them after `make test`.
test-system: setup
	$(PY) -m pytest -q -ra -m system

bench: setup
	$(PIP) install -q -e '.[test,bench]'
	$(PY) -m bench

stack-test: setup
	$(PY) -m pytest -q -ra tests/test_stack.py

clean:
	rm -rf artifacts metrics plots mlflow.db mlartifacts
