# fused_optim developer entry points. Each target finds (or makes) a Python with torch and the dev dependencies
# through scripts/env.sh: the active virtual environment if there is one, else a cached venv under
# $HOME/.cache/fused_optim/ keyed by requirements-dev.txt (torch) and pyproject.toml's dev extra.
SHELL := /bin/bash
# Evaluated once, on first use (not for `make clean`).
PYTHON ?= $(eval PYTHON := $(shell scripts/env.sh))$(PYTHON)
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= $(shell nproc)
# scripts/env.sh installs torch without byte-compiling it (a minute of set-up saved); the first import writes the
# .pyc files of the modules it uses. With PYTHONDONTWRITEBYTECODE set (some CI images set it) none would ever be
# written, and every process the tests spawn would compile torch again: 9 minutes of `make test` became 16.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install build test test-full check-wheel fuzz bench bench-full train info clean

# One build for every command: setup.py compiles each extension in build/temp/<extension>/ with ninja, so
# `make build`, `make install` and a hand-run `pip install --no-build-isolation -e .` share their objects and a
# changed .cu file recompiles alone; an in-place build writes the stamp, and `make build` is skipped while the stamp
# is newer than every build input (CI restores its cached extensions with a fresh stamp).
BUILD_STAMP := fused_optim/.extensions-built
build: $(BUILD_STAMP)

$(BUILD_STAMP): setup.py $(shell find csrc -type f)
	$(PYTHON) setup.py build_ext --inplace

# The package, editable, with both C++ extensions (the CUDA one when nvcc and a CUDA build of torch are present):
# after `make build` only the link steps run again.
install: build
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

# pytest-xdist processes for `make test`: one a core, at most 8 (each imports torch; 0 runs the tests in this one).
export TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 8 ? n : 8 )))

test: build
	$(PYTHON) -m pytest tests -q -n $(TEST_WORKERS)

# Every case under the Triton interpreter too: `make test` runs it on a covering subset of the largest option
# matrices (tests marked `interpreted_cover`, tests/conftest.py), the other backends on all of them.
test-full: build
	FUSED_OPTIM_INTERPRETED_CASES=all $(PYTHON) -m pytest tests -q -n $(TEST_WORKERS)

# A wheel (every CPU level; CUDA too when it builds), installed into a fresh venv and tested there.
check-wheel:
	scripts/check_wheel.sh $(PYTHON)

# The long differential fuzz run (tests/test_fuzz.py draws 40 configurations per op in `make test`).
fuzz: build
	FUSED_OPTIM_FUZZ_EXAMPLES=5000 $(PYTHON) -m pytest tests/test_fuzz.py -q

# A first result in a couple of minutes: three ops at small sizes, a table and out/bench-quick.json.
bench: install
	$(PYTHON) -m fused_optim bench --quick --ops adamw,ce,accumulate --json out/bench-quick.json

# Every op at its full sizes (tens of minutes on a 2-core CPU): out/bench-full.json.
bench-full: install
	$(PYTHON) -m fused_optim bench --ops all --json out/bench-full.json

# A small GPT trained with the package beside torch's AdamW and cross-entropy (seconds; drop --quick for minutes).
train: install
	$(PYTHON) -m fused_optim train --quick --compare

info: install
	$(PYTHON) -m fused_optim info

clean:
	rm -rf build fused_optim/*.so $(BUILD_STAMP) *.egg-info
