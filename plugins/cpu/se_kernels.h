// se-export CPU kernels: the folded router and the routed sparse matrix product.
//
// One C ABI shared by every CPU caller (the ONNX Runtime custom op, the Python/torch binding,
// the benchmarks) so that they cannot drift. Semantics are those of se::routed_sparse_matmul
// (docs/routed_sparse_matmul.md): expert = argmin_k (x G + b)_k in fp32 (ties -> lowest k), then
// y[t] = W[expert_t] x[t] + bias[expert_t] with fp32 accumulation, y in the dtype of x.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SE_API __declspec(dllexport)
#else
#define SE_API __attribute__((visibility("default")))
#endif

// The version of this header's entry points and structs: bumped whenever a signature or layout
// changes, so a binding that loads the library at run time (ctypes) can refuse a stale build
// instead of calling it with the wrong arguments. 2: se_routed_sparse_matmul_gemm[_on] take
// gemm_tile_bytes. 3: int8/int4 values (SE_I8, SE_I4) with scales and group_size in se_experts.
#define SE_KERNELS_ABI 3
SE_API int32_t se_kernels_abi(void);

// Value types. SE_I8 and SE_I4 are quantized values (se_export/formats/quantization.py): integer
// codes q standing for q * scale, one fp16 scale per expert, row and group of group_size input
// columns. SE_I8: one int8 code per value. SE_I4: two codes per byte, value i in the low nibble of
// byte i / 2 when i is even and in the high nibble when odd, two's complement in [-8, 7]; a row may
// start mid-byte (rows are located by row_ptr in values, not bytes).
enum se_dtype { SE_F32 = 0, SE_F16 = 1, SE_BF16 = 2, SE_I8 = 3, SE_I4 = 4 };
enum se_format { SE_BITMAP = 0, SE_CSR16 = 1 };

// K experts of shape [out, in] in one packed format (se_export/sparse_format.py):
//  values  [nnz]                 kept weights, expert-major then row-major (value_dtype; SE_I4:
//                                ceil(nnz / 2) bytes)
//  indices bitmap: uint8 [K, out, ceil(in/8)], bit j (LSB first) of byte b = column 8b+j
//          csr16:  uint16 [nnz] column of every value (stored as int16 in ONNX/torch)
//  row_ptr int32 [K*out]         start of every expert row in values (row ends at the next start)
//  bias    fp32 [K, out] or NULL
//  scales  fp16 bits [K, out, ceil(in / group_size)] for SE_I8 / SE_I4, NULL otherwise
typedef struct se_experts {
  int32_t format;
  int32_t value_dtype;
  int64_t num_experts;
  int64_t out_features;
  int64_t in_features;
  const void* values;
  int64_t nnz;
  const void* indices;
  int64_t indices_len;  // elements of indices
  const int32_t* row_ptr;
  const float* bias;
  const uint16_t* scales;
  int64_t group_size;  // input columns per scale (SE_I8 / SE_I4); 0 otherwise
} se_experts;

// Full structural check (row pointers monotone and in range, csr16 columns < in, bitmap
// popcounts equal row lengths, no bits past in; quantized values: scales present, group_size in
// [1, in], every scale finite). O(nnz); callers run it once per weight set.
// Returns 0 when valid; otherwise writes a one-line reason into err.
SE_API int se_check_experts(const se_experts* experts, char* err, size_t err_len);

// Routing only: expert_ids[t] = argmin_k (x[t] G + b)_k. x is fp32 or fp16 [tokens, in].
SE_API int se_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in_features, int64_t num_experts,
                    const float* router_weight, const float* router_bias, int32_t* expert_ids, int32_t threads,
                    char* err, size_t err_len);

// y [tokens, out] = routed sparse product of x [tokens, in] (fp32 or fp16; y has x's dtype).
// expert_ids_in (may be NULL) skips routing; its ids are range-checked. expert_ids_out (may be
// NULL) receives the routing used. The experts must have passed se_check_experts.
// threads <= 0 uses the OpenMP default. Returns 0 on success.
SE_API int se_routed_sparse_matmul(const se_experts* experts, const float* router_weight, const float* router_bias,
                                   const void* x, int32_t x_dtype, int64_t tokens, const int32_t* expert_ids_in,
                                   int32_t* expert_ids_out, void* y, int32_t threads, char* err, size_t err_len);

// Expert k as a dense fp32 [out, in] matrix, zeros where pruned: for hosts that multiply a large
// token group with their own dense GEMM (at moderate sparsity a compute-bound GEMM beats the
// sparse tile; the PyTorch binding does this for prefill). The experts must have passed
// se_check_experts; k is range-checked. threads <= 0 uses the OpenMP default. Returns 0 on success.
SE_API int se_decode_expert(const se_experts* experts, int64_t k, float* dense, int32_t threads, char* err,
                            size_t err_len);

// A host's thread pool: runs body(ctx, i) for every i in [0, count), possibly in parallel, and
// returns when all have finished. Lets a host (ONNX Runtime's intra-op pool) run the kernel on its
// own threads instead of a second OpenMP team that would fight it for the cores.
typedef void (*se_parallel_for)(void* pool, size_t count, void (*body)(void* ctx, size_t i), void* ctx);

// se_routed_sparse_matmul on the caller's pool (parallel_for(pool, ...)); NULL parallel_for runs
// on the calling thread only. Small problems (a decode step of a small layer) run serially
// either way: a fork/join costs more than they do.
SE_API int se_routed_sparse_matmul_on(const se_experts* experts, const float* router_weight, const float* router_bias,
                                      const void* x, int32_t x_dtype, int64_t tokens, const int32_t* expert_ids_in,
                                      int32_t* expert_ids_out, void* y, se_parallel_for parallel_for, void* pool,
                                      char* err, size_t err_len);

// Prefill with the host's dense GEMM for large expert groups. At moderate sparsity a tuned dense
// GEMM (which reuses every loaded weight across a register block of tokens) beats the sparse tile
// once an expert has enough tokens: such an expert is decoded once (se_decode_expert), its tokens'
// rows are gathered and gemm computes them; every other token runs the sparse kernel. An expert
// goes dense when it has >= min_group_tokens tokens in the call and keeps >= SE_DENSE_GROUP_DENSITY
// of its weights. gemm must compute c[m, n] = a[m, k] w[n, k]^T (fp32, row-major) and return 0;
// NULL gemm or min_group_tokens <= 0 is se_routed_sparse_matmul_on. ONNX Runtime's op passes its
// own Gemm (invoked from the op), the PyTorch binding torch's matmul through the OpenMP variant.
// gemm_tile_bytes > 0 decodes and multiplies an expert a band of output rows at a time (as many as
// that many fp32 bytes hold, at least one; gemm then gets n = the band's rows), so the decode
// scratch kept per calling thread is a band, not the whole expert. Whether narrower GEMMs cost
// speed depends on the host's GEMM (ONNX Runtime's: no; torch's: yes), so the host chooses;
// <= 0 is one GEMM per expert.
#define SE_DENSE_GROUP_TOKENS 128
#define SE_DENSE_GROUP_DENSITY 0.4
typedef int (*se_dense_gemm)(void* ctx, int64_t m, int64_t n, int64_t k, const float* a, const float* w, float* c);
SE_API int se_routed_sparse_matmul_gemm_on(const se_experts* experts, const float* router_weight,
                                           const float* router_bias, const void* x, int32_t x_dtype, int64_t tokens,
                                           const int32_t* expert_ids_in, int32_t* expert_ids_out, void* y,
                                           se_parallel_for parallel_for, void* pool, se_dense_gemm gemm,
                                           void* gemm_ctx, int64_t min_group_tokens, int64_t gemm_tile_bytes,
                                           char* err, size_t err_len);
// The same on an OpenMP team of `threads` (<= 0: the OpenMP default), like se_routed_sparse_matmul.
SE_API int se_routed_sparse_matmul_gemm(const se_experts* experts, const float* router_weight,
                                        const float* router_bias, const void* x, int32_t x_dtype, int64_t tokens,
                                        const int32_t* expert_ids_in, int32_t* expert_ids_out, void* y,
                                        int32_t threads, se_dense_gemm gemm, void* gemm_ctx,
                                        int64_t min_group_tokens, int64_t gemm_tile_bytes, char* err,
                                        size_t err_len);

// The dense-group policy above (SE_DENSE_GROUP_TOKENS, SE_DENSE_GROUP_DENSITY), for bindings that
// want to know whether a call can take the GEMM path without repeating the constants.
SE_API int64_t se_dense_group_tokens(void);
SE_API double se_dense_group_density(void);

// "avx512", "avx2", "neon" or "portable": which code path this machine runs; SE_KERNELS_ISA=avx2
// or SE_KERNELS_ISA=portable caps it (a path the CPU lacks is never taken).
SE_API const char* se_kernel_isa(void);

#ifdef __cplusplus
}
#endif
