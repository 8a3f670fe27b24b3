// ONNX Runtime CPU custom-op library: se::RoutedSparseMatMul versions 1 and 2 (docs/routed_sparse_matmul.md)
// with the lite custom-op API; version 2 adds int8 / int4 values with an fp16 scales input. The arithmetic lives in plugins/cpu (se_kernels.h), the same code the
// PyTorch binding calls. One kernel is registered per (activation, value, index) type
// combination; all of them share the op name, so ONNX Runtime picks one by the node's types.
//
// Load it with SessionOptions.register_custom_ops_library(path); the library exports
// RegisterCustomOps. Invalid inputs return an ONNX Runtime error status, never crash.
#include "se_ort_common.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#ifdef SE_ORT_WITH_CUDA
#include "se_ort_cuda.h"
#endif

namespace se_ort {

// The newest op version this library implements (se_ort_op_version): a host reads it before
// handing the library a model, so a model newer than the library is refused with a reason.
constexpr int32_t kOpVersion = 2;

// The kernel's parallel loops run on ONNX Runtime's intra-op pool (no second thread team
// competing for the session's cores); if the pool refuses, the loop runs on this thread.
void ort_parallel_for(void* context, size_t count, void (*body)(void*, size_t), void* ctx) {
  OrtStatus* status =
      Ort::GetApi().KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(context), body, count, 0, ctx);
  if (status == nullptr) return;
  Ort::GetApi().ReleaseStatus(status);
  for (size_t i = 0; i < count; ++i) body(ctx, i);
}

// Prefill's large expert groups run on ONNX Runtime's own GEMM (MLAS, on the session's pool),
// invoked from inside the op (OrtApi::InvokeOp on a standalone Gemm kernel, transB = 1), over
// buffers the kernel library owns: see se_routed_sparse_matmul_gemm_on.
struct OrtGemm {
  Ort::Op* op;
  const OrtKernelContext* context;
};

int ort_gemm(void* host, int64_t m, int64_t n, int64_t k, const float* a, const float* w, float* c) {
  auto* g = static_cast<OrtGemm*>(host);
  try {
    const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const int64_t a_shape[2] = {m, k}, w_shape[2] = {n, k}, c_shape[2] = {m, n};
    Ort::Value inputs[2] = {
        Ort::Value::CreateTensor<float>(mem, const_cast<float*>(a), static_cast<size_t>(m * k), a_shape, 2),
        Ort::Value::CreateTensor<float>(mem, const_cast<float*>(w), static_cast<size_t>(n * k), w_shape, 2)};
    Ort::Value output = Ort::Value::CreateTensor<float>(mem, c, static_cast<size_t>(m * n), c_shape, 2);
    g->op->Invoke(g->context, inputs, 2, &output, 1);
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

// An integer setting from the environment, or `fallback` where it is unset or empty.
int64_t env_int64(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env && *env ? std::strtoll(env, nullptr, 10) : fallback;
}

// SE_ORT_DENSE_GROUP_TOKENS overrides the group size at which an expert goes to the GEMM (0: never).
int64_t dense_group_tokens() { return env_int64("SE_ORT_DENSE_GROUP_TOKENS", SE_DENSE_GROUP_TOKENS); }

// Decoded bytes per Gemm call: the op's decode scratch holds an 8 MiB band of an expert's output
// rows instead of the whole expert (at 4096 x 11008: resident memory +30 MB over three 512-token
// calls instead of +194 MB), at the same speed with ONNX Runtime's Gemm (BENCHMARKS.md, twelfth
// session). SE_ORT_DENSE_TILE_BYTES overrides it (0: the whole expert in one Gemm).
constexpr int64_t kDenseTileBytes = int64_t{8} << 20;

int64_t dense_tile_bytes() { return env_int64("SE_ORT_DENSE_TILE_BYTES", kDenseTileBytes); }

template <typename TX, typename TV, typename TI>
struct RoutedSparseMatMulKernel {
  RoutedSparseMatMulKernel(const OrtApi* /*api*/, const OrtKernelInfo* info) {
    attrs_ = NodeAttributes::of(info);
    min_group_tokens_ = dense_group_tokens();
    tile_bytes_ = dense_tile_bytes();
    if (min_group_tokens_ > 0) {
      try {
        const char* type_names[] = {"T"};
        const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
        // a standalone kernel gets no schema defaults: every attribute the Gemm kernel reads is given
        const int64_t zero = 0, one = 1;
        const float unit = 1.f;
        const Ort::OpAttr attrs[] = {Ort::OpAttr("transA", &zero, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
                                     Ort::OpAttr("transB", &one, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
                                     Ort::OpAttr("alpha", &unit, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
                                     Ort::OpAttr("beta", &unit, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT)};
        gemm_ = Ort::Op::Create(info, "Gemm", "", 13, type_names, types, 1, attrs, 4, 2, 1);
      } catch (const Ort::Exception&) {  // e.g. a minimal build without standalone kernels: sparse tile only
        min_group_tokens_ = 0;
      }
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<TX>& x, const Tensor<float>& router_weight, const Tensor<float>& router_bias,
                      const Tensor<TV>& values, const Tensor<TI>& indices, const Tensor<int32_t>& row_ptr,
                      std::optional<const Tensor<float>*> bias, std::optional<const Tensor<int32_t>*> expert_ids,
                      std::optional<const Tensor<Ort::Float16_t>*> scales, Tensor<TX>& y,
                      std::optional<Tensor<int32_t>*> expert_ids_out) {
    se_experts e;
    CallShape call;
    Ort::Status st =
        describe_experts(attrs_, x, router_weight, router_bias, values, indices, row_ptr, bias, expert_ids, scales, e, call);
    if (st.IsOK()) {
      const int64_t rows = e.num_experts * e.out_features;
      st = finish_counts<TV, TI>(e, reinterpret_cast<const uint8_t*>(indices.Data()),
                                 rows > 0 ? row_ptr.Data()[rows - 1] : -1);
    }
    if (!st.IsOK()) return st;
    const auto& xs = x.Shape();
    const int64_t out = e.out_features, tokens = call.tokens;
    const int32_t* ids_in = call.ids_in;
    char err[512] = {0};
    if (!already_checked(e)) {
      if (se_check_experts(&e, err, sizeof(err))) return invalid(err);
      remember_checked(e);
    }

    std::vector<int64_t> ys(xs.begin(), xs.end());
    ys.back() = out;
    TX* y_data = y.Allocate(ys);
    int32_t* ids_out = nullptr;
    if (expert_ids_out.has_value() && *expert_ids_out != nullptr) {
      std::vector<int64_t> is(xs.begin(), xs.end() - 1);
      ids_out = (*expert_ids_out)->Allocate(is);
    }
    // with no Gemm (min_group_tokens_ 0) this is the plain sparse kernel on ONNX Runtime's pool
    OrtGemm gemm{&gemm_, context};
    if (se_routed_sparse_matmul_gemm_on(&e, router_weight.Data(), router_bias.Data(), x.Data(), dtype_code<TX>(), tokens,
                                        ids_in, ids_out, y_data, ort_parallel_for, context,
                                        min_group_tokens_ > 0 ? ort_gemm : nullptr, &gemm, min_group_tokens_, tile_bytes_, err,
                                        sizeof(err)))
      return invalid(err);
    return Ort::Status(nullptr);
  }

 private:
  // The structural check is O(nnz); weights are initializers, so check each weight set once.
  bool already_checked(const se_experts& e) {
    std::lock_guard<std::mutex> lock(mu_);
    return has_checked_ && std::memcmp(&checked_, &e, sizeof(e)) == 0;
  }
  void remember_checked(const se_experts& e) {
    std::lock_guard<std::mutex> lock(mu_);
    checked_ = e;
    has_checked_ = true;
  }

  NodeAttributes attrs_;
  int64_t min_group_tokens_ = 0;
  int64_t tile_bytes_ = 0;
  Ort::Op gemm_{nullptr};  // a standalone Gemm kernel, created with the node
  std::mutex mu_;
  se_experts checked_{};
  bool has_checked_ = false;
};

constexpr const char* kProvider = "CPUExecutionProvider";

}  // namespace se_ort

extern "C" __attribute__((visibility("default"))) int32_t se_ort_op_version(void) { return se_ort::kOpVersion; }

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* api) {
  Ort::InitApi(api->GetApi(ORT_API_VERSION));
  // kept alive for the process: sessions reference the domain and its ops
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  static Ort::CustomOpDomain domain{se_ort::kDomain};
  static std::once_flag once;
  try {
    std::call_once(once, [] {
      se_ort::add_kernels<se_ort::RoutedSparseMatMulKernel>(ops, se_ort::kProvider);
#ifdef SE_ORT_WITH_CUDA
      se_ort::add_cuda_kernels(ops);
#endif
      for (auto& op : ops) domain.Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& ex) {
    return Ort::Status(ex).release();
  } catch (const std::exception& ex) {
    return Ort::Status(ex.what(), ORT_FAIL).release();
  }
  return nullptr;
}
