// Pieces both execution providers' RoutedSparseMatMul kernels share (routed_sparse_matmul_op.cc for
// the CPU, routed_sparse_matmul_cuda_op.cc for CUDA): type codes, error statuses, names.
#pragma once

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

}  // namespace se_ort
