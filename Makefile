# fused_optim developer entry points. Each target finds (or makes) a Python with torch and the dev dependencies
# through scripts/env.sh: the active virtual environment if there is one, else a cached venv under
# $HOME/.cache/fused_optim/ keyed by requirements-dev.txt.
SHELL := /bin/bash
# Evaluated once, on first use (not for `make clean`).
PYTHON ?= $(eval PYTHON := $(shell scripts/env.sh))$(PYTHON)
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= $(shell nproc)

.PHONY: install build test fuzz bench train info clean

# The package, editable, with both C++ extensions (the CUDA one when nvcc and a CUDA build of torch are present).
install:
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

# In-place build only, what `make test` needs; skipped while the stamp is newer than every build input (CI restores
# its cached extensions with a fresh stamp). After changing torch or the compilers: make clean.
BUILD_STAMP := fused_optim/.extensions-built
build: $(BUILD_STAMP)

$(BUILD_STAMP): setup.py $(shell find csrc -type f)
	$(PYTHON) setup.py -q build_ext --inplace
	touch $@

test: build
	$(PYTHON) -m pytest tests -q

# The long differential fuzz run (tests/test_fuzz.py draws 40 configurations per op in `make test`).
fuzz: build
	FUSED_OPTIM_FUZZ_EXAMPLES=5000 $(PYTHON) -m pytest tests/test_fuzz.py -q

bench: install
	$(PYTHON) -m fused_optim bench --ops all

# A small GPT trained with the package beside torch's AdamW and cross-entropy (seconds; drop --quick for minutes).
train: install
	$(PYTHON) -m fused_optim train --quick --compare

info: install
	$(PYTHON) -m fused_optim info

clean:
	rm -rf build fused_optim/*.so $(BUILD_STAMP) *.egg-info
