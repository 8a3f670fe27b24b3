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

int64_t optional_int(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

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
    Ort::ConstKernelInfo ki(info);
    out_features_ = ki.GetAttribute<int64_t>("out_features");
    format_ = ki.GetAttribute<std::string>("format");
    group_size_ = optional_int(ki, "group_size", 0);  // version 1 nodes and float values have none
    gemv_max_tokens_ = static_cast<int32_t>(optional_int(ki, "gemv_max_tokens", 0));
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<TX>& x, const Tensor<float>& router_weight,
                      const Tensor<float>& router_bias, const Tensor<TV>& values, const Tensor<TI>& indices,
                      const Tensor<int32_t>& row_ptr, std::optional<const Tensor<float>*> bias,
                      std::optional<const Tensor<int32_t>*> expert_ids,
                      std::optional<const Tensor<Ort::Float16_t>*> scales, Tensor<TX>& y,
                      std::optional<Tensor<int32_t>*> expert_ids_out) {
    const int32_t format = format_ == "bitmap" ? SE_BITMAP : format_ == "csr16" ? SE_CSR16 : -1;
    if (format < 0) return invalid("format attribute must be 'bitmap' or 'csr16', got '" + format_ + "'");
    constexpr bool words = std::is_same_v<TI, int32_t>;  // the TensorRT form: packed bytes in int32 words
    if (format == SE_BITMAP && std::is_same_v<TI, int16_t>) return invalid("format 'bitmap' needs uint8 or int32 indices");
    if (format == SE_CSR16 && std::is_same_v<TI, uint8_t>) return invalid("format 'csr16' needs int16 or int32 indices");
    const auto& xs = x.Shape();
    if (xs.empty()) return invalid("x must have at least one dimension");
    const int64_t in = xs.back();
    const auto& gs = router_weight.Shape();
    if (gs.size() != 2 || gs[0] != in)
      return invalid("router_weight is " + shape_str(gs) + " but x has " + std::to_string(in) + " features");
    const int64_t K = gs[1], out = out_features_;
    if (router_bias.NumberOfElement() != K) return invalid("router_bias must have K = " + std::to_string(K) + " entries");
    if (out < 1) return invalid("out_features must be >= 1");
    if (row_ptr.NumberOfElement() != K * out)
      return invalid("row_ptr must have K*out = " + std::to_string(K * out) + " entries, has " +
                     std::to_string(row_ptr.NumberOfElement()));
    int64_t tokens = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) tokens *= xs[i];
    const float* bias_data = nullptr;
    if (bias.has_value() && *bias != nullptr && (*bias)->NumberOfElement() > 0) {
      if ((*bias)->NumberOfElement() != K * out) return invalid("bias must be [K, out]");
      bias_data = (*bias)->Data();
    }
    const int32_t* ids_in = nullptr;
    if (expert_ids.has_value() && *expert_ids != nullptr && (*expert_ids)->NumberOfElement() > 0) {
      if ((*expert_ids)->NumberOfElement() != tokens)
        return invalid("expert_ids must have one entry per token (" + std::to_string(tokens) + ")");
      ids_in = (*expert_ids)->Data();
    }

    se_experts e{};
    e.format = format;
    e.value_dtype = dtype_code<TV>();
    e.num_experts = K;
    e.out_features = out;
    e.in_features = in;
    e.values = values.Data();
    e.nnz = values.NumberOfElement();
    e.indices = indices.Data();
    e.row_ptr = row_ptr.Data();
    e.bias = bias_data;
    if constexpr (kQuantizedValues<TV>) {
      if (!scales.has_value() || *scales == nullptr || (*scales)->NumberOfElement() == 0)
        return invalid("int8/int4 values need the scales input (op version 2)");
      if (group_size_ < 1 || group_size_ > in)
        return invalid("group_size attribute must be in [1, in_features = " + std::to_string(in) + "], got " +
                       std::to_string(group_size_));
      const int64_t groups = (in + group_size_ - 1) / group_size_;
      if ((*scales)->NumberOfElement() != K * out * groups)
        return invalid("scales must be [K, out, ceil(in / group_size)] = " + std::to_string(K * out * groups) +
                       " entries, have " + std::to_string((*scales)->NumberOfElement()));
      e.scales = reinterpret_cast<const uint16_t*>((*scales)->Data());
      e.group_size = group_size_;
    } else if (scales.has_value() && *scales != nullptr && (*scales)->NumberOfElement() > 0) {
      return invalid("scales are for int8/int4 values; these values are floats");
    }
    const int64_t index_count = indices.NumberOfElement();
    Ort::Status checked = check_once(e, index_count, words);
    if (!checked.IsOK()) return checked;
    e.nnz = nnz_;
    e.indices_len = indices_len_;

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
  // and the scales; int4's value count from the last row; the CPU library's structural check.
  Ort::Status check_once(const se_experts& device, int64_t index_count, bool words) {
    std::lock_guard<std::mutex> lock(mu_);
    if (checked_values_ == device.values && checked_indices_ == device.indices && checked_rows_ == device.row_ptr)
      return Ort::Status(nullptr);
    const int64_t rows = device.num_experts * device.out_features, in = device.in_features;
    std::vector<int32_t> row_ptr;
    std::vector<uint8_t> index_bytes;
    std::vector<uint16_t> scales;
    Ort::Status st = to_host(device.row_ptr, rows, row_ptr);
    if (st.IsOK()) st = to_host(device.indices, index_count * static_cast<int64_t>(sizeof(TI)), index_bytes);
    if (st.IsOK() && device.scales)
      st = to_host(device.scales, rows * ((in + device.group_size - 1) / device.group_size), scales);
    if (!st.IsOK()) return st;
    se_experts e = device;
    e.row_ptr = row_ptr.data();
    e.indices = index_bytes.data();
    e.scales = device.scales ? scales.data() : nullptr;
    e.indices_len = index_count;
    if constexpr (std::is_same_v<TV, uint8_t>) {  // int4: the code count from the last row's start and length
      int64_t count = index_count;                // csr16: one column per code
      if (e.format == SE_BITMAP) {
        const int64_t width = (in + 7) / 8, total = words ? rows * width : index_count;
        if (rows == 0 || total < width || row_ptr.back() < 0) return invalid("bitmap indices are shorter than one row");
        count = row_ptr.back();
        for (int64_t i = total - width; i < total; ++i) count += __builtin_popcount(index_bytes[static_cast<size_t>(i)]);
      } else if (words) {
        return invalid("int4 csr16 values need int16 indices");
      }
      if (device.nnz != (count + 1) / 2)
        return invalid("int4 values must hold " + std::to_string((count + 1) / 2) + " bytes for " +
                       std::to_string(count) + " codes, have " + std::to_string(device.nnz));
      e.nnz = count;
    }
    if (words) {  // the packed bytes the words must cover; the zero padding after them is ignored
      const int64_t bytes = e.format == SE_BITMAP ? rows * ((in + 7) / 8) : 2 * e.nnz;
      if (index_count != (bytes + 3) / 4)
        return invalid("int32-word indices must hold " + std::to_string((bytes + 3) / 4) + " words, have " +
                       std::to_string(index_count));
      e.indices_len = e.format == SE_BITMAP ? bytes : e.nnz;
    }
    char err[512] = {0};
    if (se_check_experts(&e, err, sizeof(err))) return invalid(err);
    checked_values_ = device.values;
    checked_indices_ = device.indices;
    checked_rows_ = device.row_ptr;
    nnz_ = e.nnz;
    indices_len_ = e.indices_len;
    return Ort::Status(nullptr);
  }

  int64_t out_features_ = 0;
  int64_t group_size_ = 0;
  int32_t gemv_max_tokens_ = 0;
  std::string format_;
  std::mutex mu_;
  const void* checked_values_ = nullptr;
  const void* checked_indices_ = nullptr;
  const int32_t* checked_rows_ = nullptr;
  int64_t nnz_ = 0, indices_len_ = 0;
};

template <typename TX, typename TV>
void add_index_types(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& ops) {
  ops.emplace_back(Ort::Custom::CreateLiteCustomOp<RoutedSparseMatMulCudaKernel<TX, TV, uint8_t>>(kOpName, kCudaProvider, 1));
  ops.emplace_back(Ort::Custom::CreateLiteCustomOp<RoutedSparseMatMulCudaKernel<TX, TV, int16_t>>(kOpName, kCudaProvider, 1));
  ops.emplace_back(Ort::Custom::CreateLiteCustomOp<RoutedSparseMatMulCudaKernel<TX, TV, int32_t>>(kOpName, kCudaProvider, 1));
}

template <typename TX>
void add_value_types(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& ops) {
  add_index_types<TX, float>(ops);
  add_index_types<TX, Ort::Float16_t>(ops);
  add_index_types<TX, Ort::BFloat16_t>(ops);
  add_index_types<TX, int8_t>(ops);
  add_index_types<TX, uint8_t>(ops);
}

}  // namespace

namespace {
int32_t g_cuda_kernels = 0;
}

void add_cuda_kernels(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& ops) {
  const size_t before = ops.size();
  add_value_types<float>(ops);
  add_value_types<Ort::Float16_t>(ops);
  g_cuda_kernels = static_cast<int32_t>(ops.size() - before);
}

int32_t cuda_kernel_count() { return g_cuda_kernels; }

}  // namespace se_ort

// Kernels registered for CUDAExecutionProvider (0 until a session registered the library).
extern "C" __attribute__((visibility("default"))) int32_t se_ort_cuda_kernel_count(void) {
  return se_ort::cuda_kernel_count();
}
