# mistral-serve: `make serve` and `make test` each build .venv from scratch when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)
comma := ,
# MLX on Linux needs a backend package; macOS wheels carry Metal. On Linux the tests also
# compile the CUDA kernels with NVIDIA's NVRTC wheels (no GPU needed).
EXTRAS := $(if $(filter Linux,$(UNAME)),cpu$(comma)kernels,)
# On a Linux CPU, MLX's bundled BLAS is slow; Debian's OpenBLAS makes float32 matmuls ~30x faster.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
PRELOAD = $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)
ARGS ?=

.PHONY: install serve test proto check-proto openblas clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)$(if $(EXTRAS),$(comma),)dev]"
	touch $@


install: $(VENV)/.installed openblas

# Best effort: install OpenBLAS where we are root on Debian/Ubuntu; everything works without it, slower.
openblas:
	@if [ "$(UNAME)" = Linux ] && [ ! -f $(OPENBLAS) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null \
	      || echo "warning: could not install OpenBLAS; CPU float32 will be slow"; \
	  else echo "note: install libopenblas0-pthread for fast float32 on this CPU"; fi; \
	fi

serve: install
	$(PRELOAD) $(VENV)/bin/mistral-serve serve $(ARGS)

test: install check-proto
	$(PRELOAD) $(PY) -m pytest -q $(ARGS)

proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
	  proto/mistral_serve/v1/generation.proto

# Fails when the committed stubs differ from what the .proto generates.
check-proto: $(VENV)/.installed
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp \
	  proto/mistral_serve/v1/generation.proto && \
	for f in generation_pb2.py generation_pb2.pyi generation_pb2_grpc.py; do \
	  diff -q $$tmp/mistral_serve/v1/$$f proto/mistral_serve/v1/$$f >/dev/null \
	    || { echo "proto stubs drifted: run 'make proto' and commit ($$f)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "proto stubs up to date"

clean:
	rm -rf $(VENV) build *.egg-info
