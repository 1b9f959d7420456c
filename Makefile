# make run   installs, builds and runs the main job (dense, ONG and magnitude at init, GMP and
#            budgeted IMP during training, on Fashion-MNIST at 90% and 98% sparsity)
# make test  installs, builds and runs the test suite (what .ci/run calls)
# make bench runs the benchmark suites and prints the ratio tables
#
# Everything goes into a virtual environment ($(VENV)). torch is pinned to the CPU build that
# lies on this machine's disk (TORCH_SPEC); an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Triton runs the GPU kernels' tests in its interpreter on this CPU machine. triton 3.9 with
# numpy 2.4.6 works; triton 3.6's interpreter fails with numpy 2.4 on loop bounds read from
# tensors. (The GPU machine's preinstalled triton 3.6 compiles the kernels, no interpreter.)
TRITON_SPEC ?= triton==3.9.0
NUMPY_SPEC ?= numpy==2.4.6
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP_DEPS := $(VENV)/.deps
STAMP_BUILD := $(VENV)/.build
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
TEST_ARGS ?=

.PHONY: install build test run bench lint clean data

install: $(STAMP_BUILD)

$(STAMP_DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	# safetensors: core; tqdm, matplotlib: the [train] extra (make run, make test);
	# pytest ... scikit-learn: the [test] extra (scikit-learn is a required test oracle).
	$(PIP) install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" "$(NUMPY_SPEC)" pybind11 cmake ninja \
		safetensors tqdm matplotlib pytest hypothesis scikit-learn pytest-benchmark ruff
	touch $@

# The extension needs only pybind11 + CMake at build time (it does not link libtorch), so the
# build runs without isolation against the venv's tools. Rebuilt when a source changes.
$(STAMP_BUILD): $(STAMP_DEPS) CMakeLists.txt setup.py $(shell find csrc -type f)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import ong_kernels; print('ong_kernels backends:', ong_kernels.backends_available())"
	touch $@

build: $(STAMP_BUILD)

test: install
	$(PY) -m pytest tests -q -m "not slow and not benchmark" $(TEST_ARGS)

# Fashion-MNIST ships as a Debian package (no download at run time).
data:
	@if [ ! -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; \
	fi

run: install data
	$(PY) -m ong_kernels.train.main_job --data-dir $(FMNIST_DIR)

bench: install
	mkdir -p build
	$(PIP) install -q --no-deps torchnmf==0.3.5
	$(PY) -m pytest benchmarks -m benchmark --benchmark-json=build/bench.json
	$(PY) -m benchmarks.report build/bench.json

lint: $(STAMP_DEPS)
	$(VENV)/bin/ruff check ong_kernels tests benchmarks setup.py
	$(VENV)/bin/ruff format --check ong_kernels tests benchmarks setup.py

clean:
	rm -rf build ong_kernels/_C*.so *.egg-info $(STAMP_BUILD)
