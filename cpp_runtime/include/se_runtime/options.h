// Command-line options of se_runtime and the small pure helpers the runner relies on (token id
// lists, KV-cache tensor naming, greedy argmax), kept free of CUDA/TensorRT so CI tests them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace se_runtime {

struct Options {
  std::string mode;           // generate | bench
  std::string engine;         // serialized TensorRT engine (se-export trt --out)
  std::string plugin;         // libse_trt_plugin.so (RoutedSparseMatMul)
  std::string dense_engine;   // bench: a dense engine measured in the same run
  std::string nvinfer;        // explicit libnvinfer path (else libnvinfer.so.<major>)
  std::vector<int64_t> ids;   // generate: prompt token ids
  int new_tokens = 32;        // generate: greedy tokens; bench: decode steps
  int prompt_len = 128;       // bench: prefill length
  int runs = 10;              // bench: measured repetitions (median reported)
  int warmup = 3;             // bench: unmeasured repetitions
  bool json = false;
};

// Parses argv; on error returns std::nullopt and sets `error` to a one-line reason.
std::optional<Options> parse_options(int argc, char const* const* argv, std::string* error);
std::string usage();

// "1,2, 3" -> {1, 2, 3}; false on anything that is not a comma-separated list of integers >= 0.
bool parse_ids(std::string const& text, std::vector<int64_t>* ids);

// KV cache naming of se-export onnx (Optimum convention): past_key_values.N.key|value feeds from
// present.N.key|value. Returns the matching present name, or "" for a non-cache input.
std::string present_name_for(std::string const& past_input);

// Index of the largest value (first on ties), as greedy decoding does.
int64_t argmax(float const* values, int64_t n);

// Median of a sample (copy sorted); 0 for an empty one.
double median(std::vector<double> samples);

}  // namespace se_runtime
