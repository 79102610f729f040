# Two commands: `make demo` and `make test`. Both create .venv on first use, from requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: demo test venv lock test-latest test-llama-cpp gpu-bundle clean

venv: $(STAMP)

# Exactly the lock: pip itself first, then every pinned package, then this project with no
# dependencies of its own resolution and no isolated build (whose setuptools would be unpinned).
# `pip check` fails if the lock no longer covers pyproject.toml's dependencies.
$(STAMP): pyproject.toml $(LOCK)
	@lock=$$(sed -n 's/^# Resolved on Python \([0-9]*\.[0-9]*\).*/\1/p' $(LOCK)); \
	here=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	[ "$$lock" = "$$here" ] || { echo "$(LOCK) is for Python $$lock and $(PYTHON) is $$here:" \
	    "pass PYTHON=python$$lock, or re-resolve with make lock"; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $$(grep '^pip==' $(LOCK))
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest tests

# Re-resolve requirements.lock from pyproject.toml (the newest releases; torch held at the CPU build).
lock:
	PYTHON=$(PYTHON) .ci/lock

# Not CI: the suite against the newest releases the lock could move to, in a throw-away venv.
test-latest:
	PYTHON=$(PYTHON) .ci/test-latest

# Not CI: GGUF exports checked in real llama.cpp (tests/test_llama_cpp.py, skipped elsewhere), in
# their own venv: the lock, then llama-cpp-python built from source with the tools pinned in
# requirements-llama.lock (built once; the README says how long it takes). Not -march=native: on a CPU
# with AMX, llama.cpp's AMX kernels for Q4/Q8 crash in some containers (seen here), so the build
# targets AVX2 (every x86-64 CPU of the last decade; ignored elsewhere). --no-cache-dir: pip's wheel
# cache ignores CMAKE_ARGS and would hand back a wheel built with other flags.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed
$(LLAMA_STAMP): pyproject.toml $(LOCK) requirements-llama.lock Makefile  # Makefile: the build flags
	rm -rf $(LLAMA_VENV)
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q $$(grep '^pip==' $(LOCK))
	$(LLAMA_VENV)/bin/python -m pip install -q --no-deps -r $(LOCK)
	$(LLAMA_VENV)/bin/python -m pip install -q --no-deps $$(grep -v -e '^#' -e '^llama-cpp-python' requirements-llama.lock)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/python -m pip install --no-deps \
	    --no-build-isolation --no-binary llama-cpp-python --no-cache-dir $$(grep '^llama-cpp-python==' requirements-llama.lock)
	$(LLAMA_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(LLAMA_VENV)/bin/python -m pip check
	touch $(LLAMA_STAMP)

test-llama-cpp: $(LLAMA_STAMP)
	$(LLAMA_VENV)/bin/python -m pytest -v -s tests/test_llama_cpp.py

# Not CI: .gpu/, what a lent GPU machine lacks to run bench/gpu_check.py (bench/gpu_bundle.py):
# bitsandbytes at the lock's version, trimmed to its CPU and CUDA 13 libraries (7 MB of 43), and
# gguf. It prints the run's carry and command, which installs them there and runs the check.
gpu-bundle: $(STAMP)
	$(PY) bench/gpu_bundle.py

clean:
	rm -rf $(VENV) $(LLAMA_VENV) .pytest_cache .gpu
