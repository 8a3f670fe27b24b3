#include "se_runtime/engine_runner.h"

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "se_runtime/options.h"

#define SE_CUDA(call)                                                                                \
  do {                                                                                               \
    const cudaError_t rc_ = (call);                                                                  \
    if (rc_ != cudaSuccess)                                                                          \
      throw std::runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(rc_));          \
  } while (0)

using namespace nvinfer1;

namespace se_runtime {
namespace {

constexpr char const* kPluginName = "RoutedSparseMatMul";  // plugins/trt/routedSparseMatMulPlugin
constexpr char const* kPluginVersion = "1";

size_t element_size(DataType t) {
  switch (t) {
    case DataType::kFLOAT:
    case DataType::kINT32: return 4;
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
  }
}

Dims dims_of(std::vector<int64_t> const& v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

// Host copy of integer ids in the engine's id type (int64 from ONNX; int32 when TensorRT narrowed it).
std::vector<unsigned char> encode_ids(std::vector<int64_t> const& values, DataType type) {
  std::vector<unsigned char> bytes(values.size() * element_size(type));
  for (size_t i = 0; i < values.size(); ++i) {
    if (type == DataType::kINT64) reinterpret_cast<int64_t*>(bytes.data())[i] = values[i];
    else reinterpret_cast<int32_t*>(bytes.data())[i] = static_cast<int32_t>(values[i]);
  }
  return bytes;
}

}  // namespace

void Logger::log(Severity severity, char const* msg) noexcept {
  if (severity <= threshold) std::fprintf(stderr, "[TensorRT] %s\n", msg);
}

EngineRunner::EngineRunner(TrtLibrary const& trt, Logger& logger, std::string const& engine_path,
                           std::string const& plugin_path) {
  std::ifstream file(engine_path, std::ios::binary);
  if (!file) throw std::runtime_error("engine file not found: " + engine_path + " (build one with se-export trt)");
  const std::vector<char> blob((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  mRuntime = trt.create_runtime(logger);
  if (!mRuntime) throw std::runtime_error("createInferRuntime failed");
  // TensorRT keeps one registry per process: a second runner (bench --dense-engine) finds our creator
  // already registered, and loading the library again may fail for that reason; it is success.
  IPluginRegistry& registry = mRuntime->getPluginRegistry();
  if (registry.getCreator(kPluginName, kPluginVersion, "") == nullptr &&
      (!registry.loadLibrary(plugin_path.c_str()) || registry.getCreator(kPluginName, kPluginVersion, "") == nullptr))
    throw std::runtime_error("cannot load plugin library " + plugin_path +
                             " (see the TensorRT log above; build it with make plugins against this TensorRT)");
  mEngine = mRuntime->deserializeCudaEngine(blob.data(), blob.size());
  if (!mEngine)
    throw std::runtime_error("cannot deserialize " + engine_path +
                             ": built by another TensorRT version or for another GPU? (see the TensorRT log above)");
  SE_CUDA(cudaStreamCreate(&mStream));
  for (int32_t i = 0; i < mEngine->getNbIOTensors(); ++i) {
    const std::string name = mEngine->getIOTensorName(i);
    const Dims shape = mEngine->getTensorShape(name.c_str());
    if (name == "input_ids") mIdType = mEngine->getTensorDataType(name.c_str());
    if (name == "position_ids") mHasPositionIds = true;
    if (name == "logits") {
      mLogitsType = mEngine->getTensorDataType(name.c_str());
      mVocab = shape.d[shape.nbDims - 1];
    }
    const std::string present = present_name_for(name);
    if (!present.empty()) {
      if (shape.nbDims != 4) throw std::runtime_error(name + " is not [batch, heads, past, head_dim]");
      Kv kv;
      kv.past = name;
      kv.present = present;
      kv.heads = shape.d[1];
      kv.head_dim = shape.d[3];
      mKvType = mEngine->getTensorDataType(name.c_str());
      mKv.push_back(kv);
    }
  }
  if (mVocab <= 0) throw std::runtime_error(engine_path + " has no static logits output [batch, seq, vocab]");
  for (int32_t p = 0; p < mEngine->getNbOptimizationProfiles(); ++p) {
    IExecutionContext* ctx = mEngine->createExecutionContext();
    if (!ctx) throw std::runtime_error("createExecutionContext failed");
    mContexts.push_back(ctx);
    if (!ctx->setOptimizationProfileAsync(p, mStream)) throw std::runtime_error("cannot select profile");
  }
  SE_CUDA(cudaStreamSynchronize(mStream));
}

EngineRunner::~EngineRunner() {
  for (auto& kv : mKv)
    for (void* b : kv.buffer) cudaFree(b);
  for (void* b : {mIds, mMask, mPositions, mLogits}) cudaFree(b);
  for (auto* ctx : mContexts) delete ctx;
  delete mEngine;
  delete mRuntime;
  if (mStream) cudaStreamDestroy(mStream);
}

void EngineRunner::allocate(int64_t max_total) {
  if (max_total <= mCapacity) return;
  for (auto& kv : mKv)
    for (void*& b : kv.buffer) {
      cudaFree(b);
      SE_CUDA(cudaMalloc(&b, static_cast<size_t>(kv.heads * max_total * kv.head_dim) * element_size(mKvType)));
    }
  for (void** b : {&mIds, &mMask, &mPositions}) {
    cudaFree(*b);
    SE_CUDA(cudaMalloc(b, static_cast<size_t>(max_total) * 8));
  }
  cudaFree(mLogits);
  SE_CUDA(cudaMalloc(&mLogits, static_cast<size_t>(max_total * mVocab) * element_size(mLogitsType)));
  mCapacity = max_total;
}

IExecutionContext* EngineRunner::context_for(int64_t seq, int64_t past) {
  // the covering profile with the smallest maximum sequence: decode for one token, else prefill
  IExecutionContext* best = nullptr;
  int64_t best_max = 0;
  for (size_t p = 0; p < mContexts.size(); ++p) {
    const auto pi = static_cast<int32_t>(p);
    const Dims lo = mEngine->getProfileShape("input_ids", pi, OptProfileSelector::kMIN);
    const Dims hi = mEngine->getProfileShape("input_ids", pi, OptProfileSelector::kMAX);
    bool ok = lo.nbDims == 2 && seq >= lo.d[1] && seq <= hi.d[1];
    if (ok && !mKv.empty()) {
      const Dims plo = mEngine->getProfileShape(mKv[0].past.c_str(), pi, OptProfileSelector::kMIN);
      const Dims phi = mEngine->getProfileShape(mKv[0].past.c_str(), pi, OptProfileSelector::kMAX);
      ok = past >= plo.d[2] && past <= phi.d[2];
    }
    if (ok && (best == nullptr || hi.d[1] < best_max)) {
      best = mContexts[p];
      best_max = hi.d[1];
    }
  }
  if (best) return best;
  throw std::runtime_error("no optimization profile covers seq=" + std::to_string(seq) + ", past=" +
                           std::to_string(past) + ": rebuild the engine with larger --max-seq/--max-past");
}

int64_t EngineRunner::step(std::vector<int64_t> const& ids, int64_t past_len, int cur) {
  const auto seq = static_cast<int64_t>(ids.size());
  IExecutionContext* ctx = context_for(seq, past_len);
  std::vector<int64_t> mask(static_cast<size_t>(past_len + seq), 1), positions(static_cast<size_t>(seq));
  for (int64_t i = 0; i < seq; ++i) positions[i] = past_len + i;
  // staging copies stay alive in mHostInputs until the step's final synchronize
  const auto upload = [&](int slot, void* dst, std::vector<int64_t> const& v) {
    mHostInputs[slot] = encode_ids(v, mIdType);
    SE_CUDA(cudaMemcpyAsync(dst, mHostInputs[slot].data(), mHostInputs[slot].size(), cudaMemcpyHostToDevice, mStream));
  };
  upload(0, mIds, ids);
  upload(1, mMask, mask);
  bool ok = ctx->setInputShape("input_ids", dims_of({1, seq})) && ctx->setTensorAddress("input_ids", mIds) &&
            ctx->setInputShape("attention_mask", dims_of({1, past_len + seq})) &&
            ctx->setTensorAddress("attention_mask", mMask);
  if (mHasPositionIds) {
    upload(2, mPositions, positions);
    ok = ok && ctx->setInputShape("position_ids", dims_of({1, seq})) &&
         ctx->setTensorAddress("position_ids", mPositions);
  }
  for (auto& kv : mKv) {
    ok = ok && ctx->setInputShape(kv.past.c_str(), dims_of({1, kv.heads, past_len, kv.head_dim})) &&
         ctx->setTensorAddress(kv.past.c_str(), kv.buffer[cur]) &&
         ctx->setTensorAddress(kv.present.c_str(), kv.buffer[1 - cur]);
  }
  ok = ok && ctx->setTensorAddress("logits", mLogits);
  if (!ok) throw std::runtime_error("cannot bind the engine's inputs (not an se-export causal-LM engine?)");
  if (!ctx->enqueueV3(mStream)) throw std::runtime_error("enqueueV3 failed (see the TensorRT log above)");
  SE_CUDA(cudaGetLastError());
  const size_t esize = element_size(mLogitsType);
  std::vector<unsigned char> last(static_cast<size_t>(mVocab) * esize);
  SE_CUDA(cudaMemcpyAsync(last.data(), static_cast<char*>(mLogits) + (seq - 1) * mVocab * esize, last.size(),
                          cudaMemcpyDeviceToHost, mStream));
  SE_CUDA(cudaStreamSynchronize(mStream));
  std::vector<float> logits(static_cast<size_t>(mVocab));
  for (int64_t i = 0; i < mVocab; ++i) {
    logits[i] = mLogitsType == DataType::kHALF ? __half2float(reinterpret_cast<__half const*>(last.data())[i])
                                               : reinterpret_cast<float const*>(last.data())[i];
  }
  return argmax(logits.data(), mVocab);
}

std::vector<int64_t> EngineRunner::generate(std::vector<int64_t> const& prompt, int new_tokens, Timing* timing) {
  const auto prompt_len = static_cast<int64_t>(prompt.size());
  allocate(prompt_len + new_tokens);
  cudaEvent_t start, stop;
  SE_CUDA(cudaEventCreate(&start));
  SE_CUDA(cudaEventCreate(&stop));
  const auto elapsed = [&]() {
    float ms = 0.0f;
    SE_CUDA(cudaEventSynchronize(stop));
    SE_CUDA(cudaEventElapsedTime(&ms, start, stop));
    return static_cast<double>(ms);
  };
  std::vector<int64_t> out;
  int cur = 0;
  SE_CUDA(cudaEventRecord(start, mStream));
  out.push_back(step(prompt, 0, cur));
  SE_CUDA(cudaEventRecord(stop, mStream));
  if (timing) {
    timing->prefill_ms = elapsed();
    timing->decode_ms.clear();
  }
  for (int i = 1; i < new_tokens; ++i) {
    cur = 1 - cur;
    SE_CUDA(cudaEventRecord(start, mStream));
    out.push_back(step({out.back()}, prompt_len + i - 1, cur));
    SE_CUDA(cudaEventRecord(stop, mStream));
    if (timing) timing->decode_ms.push_back(elapsed());
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return out;
}

}  // namespace se_runtime
