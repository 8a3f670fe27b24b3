// Pieces both execution providers' RoutedSparseMatMul kernels share (routed_sparse_matmul_op.cc for
// the CPU, routed_sparse_matmul_cuda_op.cc for CUDA): type codes, error statuses, names.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT  // the API pointer comes from the host process (RegisterCustomOps)
#endif
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>

#include "se_kernels.h"

namespace se_ort {

using Ort::Custom::Tensor;

constexpr const char* kDomain = "se";
constexpr const char* kOpName = "RoutedSparseMatMul";

template <typename T>
constexpr int32_t dtype_code() {
  if constexpr (std::is_same_v<T, float>) return SE_F32;
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return SE_F16;
  if constexpr (std::is_same_v<T, int8_t>) return SE_I8;   // int8 codes
  if constexpr (std::is_same_v<T, uint8_t>) return SE_I4;  // int4 codes, two per byte
  return SE_BF16;
}

template <typename TV>
constexpr bool kQuantizedValues = std::is_same_v<TV, int8_t> || std::is_same_v<TV, uint8_t>;

inline Ort::Status invalid(const std::string& msg) {
  return Ort::Status(("RoutedSparseMatMul: " + msg).c_str(), ORT_INVALID_ARGUMENT);
}

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

// One kernel of `Kernel<TX, TV, TI>` per activation, value and index type for `provider`: every
// kernel shares the op name, so ONNX Runtime picks one by the node's types.
template <template <typename, typename, typename> class Kernel>
void add_kernels(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& ops, const char* provider) {
  auto index_types = [&](auto x, auto v) {
    using TX = decltype(x);
    using TV = decltype(v);
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<Kernel<TX, TV, uint8_t>>(kOpName, provider, 1));
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<Kernel<TX, TV, int16_t>>(kOpName, provider, 1));
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<Kernel<TX, TV, int32_t>>(kOpName, provider, 1));
  };
  auto value_types = [&](auto x) {
    index_types(x, float{});
    index_types(x, Ort::Float16_t{});
    index_types(x, Ort::BFloat16_t{});
    index_types(x, int8_t{});
    index_types(x, uint8_t{});
  };
  value_types(float{});
  value_types(Ort::Float16_t{});
}

// An integer attribute, or `fallback` where the node has none.
inline int64_t optional_int(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// A node's attributes that both providers read.
struct NodeAttributes {
  int64_t out_features = 0;
  std::string format;
  int64_t group_size = 0;  // int8/int4 values; 0 for version 1 nodes and float values

  static NodeAttributes of(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    return {ki.GetAttribute<int64_t>("out_features"), ki.GetAttribute<std::string>("format"),
            optional_int(ki, "group_size", 0)};
  }
};

// What describe_experts learned from a call's inputs besides the experts themselves.
struct CallShape {
  int64_t tokens = 1;
  const int32_t* ids_in = nullptr;  // given routing, or null
};

// Checks every input's shape and type against the node's attributes and describes the packed
// experts (pointers as given: host memory on the CPU, device memory on CUDA). Indices are bitmap
// bytes (uint8) or csr16 columns (int16), or either packed little-endian into int32 words,
// zero-padded to a whole word: the TensorRT form (se_export.trt_onnx), as TensorRT has no 16-bit
// integers. e.nnz is the value count and e.indices_len the index element count until
// finish_counts sets what int4 codes and int32 words leave to be derived.
template <typename TX, typename TV, typename TI>
Ort::Status describe_experts(const NodeAttributes& a, const Tensor<TX>& x, const Tensor<float>& router_weight,
                             const Tensor<float>& router_bias, const Tensor<TV>& values, const Tensor<TI>& indices,
                             const Tensor<int32_t>& row_ptr, std::optional<const Tensor<float>*> bias,
                             std::optional<const Tensor<int32_t>*> expert_ids,
                             std::optional<const Tensor<Ort::Float16_t>*> scales, se_experts& e, CallShape& call) {
  const int32_t format = a.format == "bitmap" ? SE_BITMAP : a.format == "csr16" ? SE_CSR16 : -1;
  if (format < 0) return invalid("format attribute must be 'bitmap' or 'csr16', got '" + a.format + "'");
  if (format == SE_BITMAP && std::is_same_v<TI, int16_t>) return invalid("format 'bitmap' needs uint8 or int32 indices");
  if (format == SE_CSR16 && std::is_same_v<TI, uint8_t>) return invalid("format 'csr16' needs int16 or int32 indices");
  const auto& xs = x.Shape();
  if (xs.empty()) return invalid("x must have at least one dimension");
  const int64_t in = xs.back();
  const auto& gs = router_weight.Shape();
  if (gs.size() != 2 || gs[0] != in)
    return invalid("router_weight is " + shape_str(gs) + " but x has " + std::to_string(in) + " features");
  const int64_t K = gs[1], out = a.out_features;
  if (router_bias.NumberOfElement() != K) return invalid("router_bias must have K = " + std::to_string(K) + " entries");
  if (out < 1) return invalid("out_features must be >= 1");
  if (row_ptr.NumberOfElement() != K * out)
    return invalid("row_ptr must have K*out = " + std::to_string(K * out) + " entries, has " +
                   std::to_string(row_ptr.NumberOfElement()));
  e = se_experts{};
  e.format = format;
  e.value_dtype = dtype_code<TV>();
  e.num_experts = K;
  e.out_features = out;
  e.in_features = in;
  e.values = values.Data();
  e.nnz = values.NumberOfElement();
  e.indices = indices.Data();
  e.indices_len = indices.NumberOfElement();
  e.row_ptr = row_ptr.Data();
  if (bias.has_value() && *bias != nullptr && (*bias)->NumberOfElement() > 0) {
    if ((*bias)->NumberOfElement() != K * out) return invalid("bias must be [K, out]");
    e.bias = (*bias)->Data();
  }
  call = CallShape{};
  for (size_t i = 0; i + 1 < xs.size(); ++i) call.tokens *= xs[i];
  if (expert_ids.has_value() && *expert_ids != nullptr && ((*expert_ids)->NumberOfElement() > 0 || call.tokens == 0)) {
    if ((*expert_ids)->NumberOfElement() != call.tokens)
      return invalid("expert_ids must have one entry per token (" + std::to_string(call.tokens) + ")");
    call.ids_in = (*expert_ids)->Data();
  }
  if constexpr (kQuantizedValues<TV>) {
    if (!scales.has_value() || *scales == nullptr || (*scales)->NumberOfElement() == 0)
      return invalid("int8/int4 values need the scales input (op version 2)");
    if (a.group_size < 1 || a.group_size > in)
      return invalid("group_size attribute must be in [1, in_features = " + std::to_string(in) + "], got " +
                     std::to_string(a.group_size));
    const int64_t groups = (in + a.group_size - 1) / a.group_size;
    if ((*scales)->NumberOfElement() != K * out * groups)
      return invalid("scales must be [K, out, ceil(in / group_size)] = " + std::to_string(K * out * groups) +
                     " entries, have " + std::to_string((*scales)->NumberOfElement()));
    e.scales = reinterpret_cast<const uint16_t*>((*scales)->Data());
    e.group_size = a.group_size;
  } else if (scales.has_value() && *scales != nullptr && (*scales)->NumberOfElement() > 0) {
    return invalid("scales are for int8/int4 values; these values are floats");
  }
  return Ort::Status(nullptr);
}

// The counts the layout leaves to be derived, from host copies of the indices' bytes and the last
// row pointer: int4's code count (csr16: one column per code; bitmap: the last row's start plus
// its set bits) and, for int32 words, the packed bytes they must cover (padding ignored).
template <typename TV, typename TI>
Ort::Status finish_counts(se_experts& e, const uint8_t* index_bytes, int32_t last_row_start) {
  constexpr bool words = std::is_same_v<TI, int32_t>;
  const int64_t rows = e.num_experts * e.out_features, width = (e.in_features + 7) / 8;
  const int64_t index_count = e.indices_len;
  if constexpr (std::is_same_v<TV, uint8_t>) {
    if (e.format != SE_BITMAP && words) return invalid("int4 csr16 values need int16 indices");
    int64_t count = index_count;
    if (e.format == SE_BITMAP) {
      const int64_t total = words ? rows * width : index_count;
      if (rows == 0 || total < width || last_row_start < 0) return invalid("bitmap indices are shorter than one row");
      count = last_row_start;
      for (int64_t i = total - width; i < total; ++i) count += __builtin_popcount(index_bytes[i]);
    }
    if (e.nnz != (count + 1) / 2)
      return invalid("int4 values must hold " + std::to_string((count + 1) / 2) + " bytes for " +
                     std::to_string(count) + " codes, have " + std::to_string(e.nnz));
    e.nnz = count;
  }
  if (words) {
    const int64_t bytes = e.format == SE_BITMAP ? rows * width : 2 * e.nnz;
    if (index_count != (bytes + 3) / 4)
      return invalid("int32-word indices must hold " + std::to_string((bytes + 3) / 4) + " words, have " +
                     std::to_string(index_count));
    e.indices_len = e.format == SE_BITMAP ? bytes : e.nnz;
  }
  return Ort::Status(nullptr);
}

}  // namespace se_ort
