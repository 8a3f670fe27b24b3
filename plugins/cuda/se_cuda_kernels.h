// se-export CUDA kernels: folded router, sparse GEMV (decode) and grouped sparse product (prefill).
//
// Same contract as the CPU kernels (se_kernels.h, docs/routed_sparse_matmul.md) on device memory: every
// pointer in `experts` and every tensor argument is a device pointer; work is queued on `stream`
// and nothing synchronises. No TensorRT dependency: the TensorRT plugin, the GPU tests and the
// Python benchmark all call this one API.
//
// Routing: expert = argmin_k (x G + b)_k in fp32, ties to the lowest k; the scores are summed over
// splits of the input features (se_sparse_index.h, route_splits), so a decode step's router runs
// on many SMs. Tokens with at most `gemv_max_tokens` rows run the GEMV path (one warp per output
// row and token); larger batches are grouped by expert (count, scan, scatter) and run one
// sparse-times-dense tile of up to 64 tokens (32 with fp32 activations or values) per (expert,
// block of 64 rows). Device code cannot raise: an out-of-range id given in `expert_ids_in` yields
// a zero output row (host callers validate ids they produce themselves).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "se_kernels.h"  // se_experts, se_dtype, se_format, SE_API (shared contract)

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* se_cuda_stream;  // == cudaStream_t, without the CUDA headers

// Bytes of scratch memory se_cuda_routed_sparse_matmul needs for `tokens` tokens and K experts.
SE_API size_t se_cuda_workspace_size(int64_t tokens, int64_t num_experts);

// Tokens up to which the GEMV path runs when gemv_max_tokens <= 0.
#define SE_CUDA_DEFAULT_GEMV_MAX_TOKENS 16

// Routing only: expert_ids[t] = argmin_k (x[t] G + b)_k; x fp32 or fp16 [tokens, in]; `workspace`
// holds at least se_cuda_workspace_size(tokens, K) bytes (the partial scores).
SE_API int se_cuda_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in_features, int64_t num_experts,
                         const float* router_weight, const float* router_bias, int32_t* expert_ids, void* workspace,
                         size_t workspace_size, se_cuda_stream stream, char* err, size_t err_len);

// y [tokens, out] (x's dtype) = routed sparse product of x [tokens, in]. expert_ids_in (may be
// NULL) skips routing; expert_ids_out (may be NULL) receives the routing. `workspace` holds at
// least se_cuda_workspace_size(tokens, K) bytes (may be NULL only when tokens <= the GEMV limit
// and expert_ids_in is given: routing needs it for the partial scores). Returns 0, or non-zero
// with a one-line reason in err (bad arguments or a CUDA launch error).
SE_API int se_cuda_routed_sparse_matmul(const se_experts* experts, const float* router_weight,
                                        const float* router_bias, const void* x, int32_t x_dtype, int64_t tokens,
                                        const int32_t* expert_ids_in, int32_t* expert_ids_out, void* y,
                                        void* workspace, size_t workspace_size, int32_t gemv_max_tokens,
                                        se_cuda_stream stream, char* err, size_t err_len);

// CPU reference of both kernels: the same function and the same indexing helpers
// (se_sparse_index.h), emulating the device's warps and tiles on host memory. Used by CI (no GPU)
// and by the GPU tests as the expected result. Same arguments, host pointers, no workspace.
SE_API int se_cuda_reference_matmul(const se_experts* experts, const float* router_weight, const float* router_bias,
                                    const void* x, int32_t x_dtype, int64_t tokens, const int32_t* expert_ids_in,
                                    int32_t* expert_ids_out, void* y, int32_t gemv_max_tokens, char* err,
                                    size_t err_len);

#ifdef __cplusplus
}
#endif
