// The CUDA execution provider's RoutedSparseMatMul kernels (routed_sparse_matmul_cuda_op.cc), added
// to the op domain by RegisterCustomOps in builds of libse_ort_ops_cuda.so (SE_ORT_WITH_CUDA).
#pragma once

#include <memory>
#include <vector>

#include "se_ort_common.h"

namespace se_ort {

// Appends one CUDAExecutionProvider kernel per (activation, value, index) type combination.
void add_cuda_kernels(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& ops);

// How many kernels add_cuda_kernels appends (for hosts and tests asking what a library registers).
int32_t cuda_kernel_count();

}  // namespace se_ort
