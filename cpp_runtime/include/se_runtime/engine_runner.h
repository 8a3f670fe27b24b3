// Runs a causal-LM TensorRT engine exported by `se-export onnx` + `se-export trt`: prefill then
// greedy decode with the KV cache kept on the device (present.* of one step is past_key_values.*
// of the next, ping-pong buffers), one execution context per optimization profile (prefill,
// decode), timing with CUDA events.
#pragma once

#include <cuda_runtime_api.h>

#include <NvInferRuntime.h>

#include <memory>
#include <string>
#include <vector>

#include "se_runtime/trt_library.h"

namespace se_runtime {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, char const* msg) noexcept override;
  Severity threshold = Severity::kWARNING;
};

struct Timing {
  double prefill_ms = 0.0;               // prompt forward + first token (CUDA events)
  std::vector<double> decode_ms;         // one per generated token after the first
};

class EngineRunner {
 public:
  // Loads the plugin library into the runtime's registry, then the engine. Throws on failure.
  EngineRunner(TrtLibrary const& trt, Logger& logger, std::string const& engine_path, std::string const& plugin_path);
  ~EngineRunner();
  EngineRunner(EngineRunner const&) = delete;
  EngineRunner& operator=(EngineRunner const&) = delete;

  // Greedy generation of `new_tokens` tokens after `prompt` (batch 1); returns the new ids.
  std::vector<int64_t> generate(std::vector<int64_t> const& prompt, int new_tokens, Timing* timing = nullptr);
  int64_t vocab_size() const { return mVocab; }

 private:
  struct Kv {
    std::string past, present;
    int64_t heads = 0, head_dim = 0;
    void* buffer[2] = {nullptr, nullptr};
  };
  void allocate(int64_t max_total);
  int64_t step(std::vector<int64_t> const& ids, int64_t past_len, int cur);  // returns greedy next id
  nvinfer1::IExecutionContext* context_for(int64_t seq, int64_t past);

  nvinfer1::IRuntime* mRuntime = nullptr;
  nvinfer1::ICudaEngine* mEngine = nullptr;
  std::vector<nvinfer1::IExecutionContext*> mContexts;  // one per optimization profile
  cudaStream_t mStream = nullptr;
  std::vector<Kv> mKv;
  bool mHasPositionIds = false;
  nvinfer1::DataType mIdType = nvinfer1::DataType::kINT64, mLogitsType = nvinfer1::DataType::kFLOAT;
  nvinfer1::DataType mKvType = nvinfer1::DataType::kFLOAT;
  int64_t mVocab = 0, mCapacity = 0;
  void *mIds = nullptr, *mMask = nullptr, *mPositions = nullptr, *mLogits = nullptr;
  std::vector<unsigned char> mHostInputs[3];  // ids, mask, positions in the engine's id type
};

}  // namespace se_runtime
