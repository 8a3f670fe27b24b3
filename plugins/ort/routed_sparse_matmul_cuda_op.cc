// ONNX Runtime CUDA execution provider kernels of se::RoutedSparseMatMul (versions 1 and 2): the
// contract of the CPU kernels (routed_sparse_matmul_op.cc, docs/routed_sparse_matmul.md) computed
// by the CUDA kernel library (plugins/cuda, the code the TensorRT plugin runs) on ONNX Runtime's
// compute stream, with scratch memory from ONNX Runtime's device allocator. Built into
// libse_ort_ops_cuda.so beside the CPU kernels, so one library serves both providers.
//
// The packed experts are initializers: each node copies its row pointers, indices and scales to
// the host once and runs the CPU library's structural check (se_check_experts) on them, so the
// device kernels never see row pointers or columns that point outside the values or x. Anything
// refused is an ONNX Runtime error status naming the problem, never a crash.
#include <cuda_runtime_api.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "se_cuda_kernels.h"
#include "se_ort_cuda.h"

namespace se_ort {
namespace {

constexpr const char* kCudaProvider = "CUDAExecutionProvider";

// Device memory copied to a host vector (synchronously: done once per weight set).
template <typename T>
Ort::Status to_host(const void* device, int64_t count, std::vector<T>& host) {
  host.resize(static_cast<size_t>(count));
  if (count == 0) return Ort::Status(nullptr);
  const cudaError_t rc = cudaMemcpy(host.data(), device, sizeof(T) * static_cast<size_t>(count), cudaMemcpyDeviceToHost);
  if (rc != cudaSuccess) return invalid(std::string("copying the packed experts to the host failed: ") + cudaGetErrorString(rc));
  return Ort::Status(nullptr);
}

template <typename TX, typename TV, typename TI>
struct RoutedSparseMatMulCudaKernel {
  RoutedSparseMatMulCudaKernel(const OrtApi* /*api*/, const OrtKernelInfo* info) {
    attrs_ = NodeAttributes::of(info);
    gemv_max_tokens_ = static_cast<int32_t>(optional_int(Ort::ConstKernelInfo(info), "gemv_max_tokens", 0));
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<TX>& x, const Tensor<float>& router_weight,
                      const Tensor<float>& router_bias, const Tensor<TV>& values, const Tensor<TI>& indices,
                      const Tensor<int32_t>& row_ptr, std::optional<const Tensor<float>*> bias,
                      std::optional<const Tensor<int32_t>*> expert_ids,
                      std::optional<const Tensor<Ort::Float16_t>*> scales, Tensor<TX>& y,
                      std::optional<Tensor<int32_t>*> expert_ids_out) {
    se_experts e;
    CallShape call;
    Ort::Status st =
        describe_experts(attrs_, x, router_weight, router_bias, values, indices, row_ptr, bias, expert_ids, scales, e, call);
    if (!st.IsOK()) return st;
    st = check_once(e);  // sets e.nnz and e.indices_len as the host copies say
    if (!st.IsOK()) return st;
    const auto& xs = x.Shape();
    const int64_t tokens = call.tokens, K = e.num_experts, out = e.out_features;
    const int32_t* ids_in = call.ids_in;

    std::vector<int64_t> ys(xs.begin(), xs.end());
    ys.back() = out;
    TX* y_data = y.Allocate(ys);
    int32_t* ids_out = nullptr;
    if (expert_ids_out.has_value() && *expert_ids_out != nullptr)
      ids_out = (*expert_ids_out)->Allocate(std::vector<int64_t>(xs.begin(), xs.end() - 1));
    if (tokens == 0) return Ort::Status(nullptr);

    Ort::KernelContext ctx(context);
    auto stream = static_cast<se_cuda_stream>(ctx.GetGPUComputeStream());
    const size_t ws_size = se_cuda_workspace_size(tokens, K);
    Ort::ConstValue x_value = ctx.GetInput(0);
    const Ort::ConstMemoryInfo memory = x_value.GetTensorMemoryInfo();
    Ort::Allocator allocator = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(memory));
    // freed when Compute returns, while the kernel may still run: ONNX Runtime's device arena
    // hands it out again only to work queued after it on this compute stream
    void* workspace = allocator.Alloc(ws_size);
    char err[512] = {0};
    const int rc = se_cuda_routed_sparse_matmul(&e, router_weight.Data(), router_bias.Data(), x.Data(), dtype_code<TX>(),
                                                tokens, ids_in, ids_out, y_data, workspace, ws_size, gemv_max_tokens_,
                                                stream, err, sizeof(err));
    allocator.Free(workspace);
    return rc ? invalid(err) : Ort::Status(nullptr);
  }

 private:
  // Once per weight set (the initializers' device addresses): host copies of row_ptr, the indices
  // and the scales; the counts int4 codes and int32 words leave to derive; the CPU library's
  // structural check. Later calls reuse the derived counts.
  Ort::Status check_once(se_experts& e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (checked_values_ == e.values && checked_indices_ == e.indices && checked_rows_ == e.row_ptr) {
      e.nnz = nnz_;
      e.indices_len = indices_len_;
      return Ort::Status(nullptr);
    }
    const int64_t rows = e.num_experts * e.out_features, in = e.in_features;
    std::vector<int32_t> row_ptr;
    std::vector<uint8_t> index_bytes;
    std::vector<uint16_t> scales;
    Ort::Status st = to_host(e.row_ptr, rows, row_ptr);
    if (st.IsOK()) st = to_host(e.indices, e.indices_len * static_cast<int64_t>(sizeof(TI)), index_bytes);
    if (st.IsOK() && e.scales) st = to_host(e.scales, rows * ((in + e.group_size - 1) / e.group_size), scales);
    if (!st.IsOK()) return st;
    se_experts host = e;
    host.row_ptr = row_ptr.data();
    host.indices = index_bytes.data();
    host.scales = e.scales ? scales.data() : nullptr;
    st = finish_counts<TV, TI>(host, index_bytes.data(), rows > 0 ? row_ptr.back() : -1);
    if (!st.IsOK()) return st;
    char err[512] = {0};
    if (se_check_experts(&host, err, sizeof(err))) return invalid(err);
    checked_values_ = e.values;
    checked_indices_ = e.indices;
    checked_rows_ = e.row_ptr;
    e.nnz = nnz_ = host.nnz;
    e.indices_len = indices_len_ = host.indices_len;
    return Ort::Status(nullptr);
  }

  NodeAttributes attrs_;
  int32_t gemv_max_tokens_ = 0;
  std::mutex mu_;
  const void* checked_values_ = nullptr;
  const void* checked_indices_ = nullptr;
  const int32_t* checked_rows_ = nullptr;
  int64_t nnz_ = 0, indices_len_ = 0;
};

}  // namespace

namespace {
int32_t g_cuda_kernels = 0;
}

void add_cuda_kernels(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& ops) {
  const size_t before = ops.size();
  add_kernels<RoutedSparseMatMulCudaKernel>(ops, kCudaProvider);
  g_cuda_kernels = static_cast<int32_t>(ops.size() - before);
}

int32_t cuda_kernel_count() { return g_cuda_kernels; }

}  // namespace se_ort

// Kernels registered for CUDAExecutionProvider (0 until a session registered the library).
extern "C" __attribute__((visibility("default"))) int32_t se_ort_cuda_kernel_count(void) {
  return se_ort::cuda_kernel_count();
}
