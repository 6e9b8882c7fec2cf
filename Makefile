# Developer targets. `make test` is the README's test command without the installs.
PY ?= python

.PHONY: test test-slow test-purepython lint format bench-quick build build-cuda gpu-suite-dry

test:            ## the whole suite (CPU; Triton through its interpreter)
	$(PY) -m pytest -q

test-slow:       ## only the long tests marked slow (the default run deselects them)
	$(PY) -m pytest -q -m slow

test-purepython: ## every op through its pure-PyTorch *_ref (no compiled kernels)
	RLHF_FAST_PUREPYTHON=1 $(PY) -m pytest -q tests/ops

lint:            ## ruff lint + format check (the CI runs the same)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:          ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

build:           ## rebuild the C++ extension in place after editing csrc/cpu
	$(PY) setup.py build_ext --inplace

build-cuda:      ## also compile csrc/cuda/*.cu with nvcc (needs a CUDA toolkit)
	RLHF_FAST_BUILD_CUDA=1 $(PY) setup.py build_ext --inplace

bench-quick:     ## every benchmark at its --quick size
	$(PY) -m rlhf_fast bench
