// The C exports of se_kernels.h: each one catches every exception and reports it through err.
#include "routed_sparse_common.h"

using namespace se_cpu;

extern "C" SE_API int se_check_experts(const se_experts* e, char* err, size_t err_len) {
  return check_experts(e, err, err_len);
}

extern "C" SE_API int se_decode_expert(const se_experts* e, int64_t k, float* dense, int32_t threads, char* err,
                                       size_t err_len) {
  try {
    return decode_expert(e, k, dense, openmp(threads), err, err_len);
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in_features, int64_t num_experts,
                               const float* router_weight, const float* router_bias, int32_t* expert_ids,
                               int32_t threads, char* err, size_t err_len) {
  try {
    if (x_dtype != SE_F32 && x_dtype != SE_F16) return fail(err, err_len, "x must be fp32 or fp16"), 1;
    std::vector<float> buf;
    const float* x32;
    to_f32(x, x_dtype, tokens * in_features, buf, &x32);
    route_f32(x32, tokens, in_features, num_experts, router_weight, router_bias, expert_ids, openmp(threads));
    return 0;
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul(const se_experts* e, const float* router_weight, const float* router_bias,
                                              const void* x, int32_t x_dtype, int64_t tokens,
                                              const int32_t* expert_ids_in, int32_t* expert_ids_out, void* y,
                                              int32_t threads, char* err, size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                openmp(threads), err, err_len);
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul_on(const se_experts* e, const float* router_weight,
                                                 const float* router_bias, const void* x, int32_t x_dtype,
                                                 int64_t tokens, const int32_t* expert_ids_in, int32_t* expert_ids_out,
                                                 void* y, se_parallel_for parallel_for, void* pool, char* err,
                                                 size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                Executor{parallel_for, pool, 1}, err, err_len);
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul_gemm_on(const se_experts* e, const float* router_weight,
                                                      const float* router_bias, const void* x, int32_t x_dtype,
                                                      int64_t tokens, const int32_t* expert_ids_in,
                                                      int32_t* expert_ids_out, void* y, se_parallel_for parallel_for,
                                                      void* pool, se_dense_gemm gemm, void* gemm_ctx,
                                                      int64_t min_group_tokens, int64_t gemm_tile_bytes, char* err,
                                                      size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                Executor{parallel_for, pool, 1}, err, err_len,
                                DenseGroups{gemm, gemm_ctx, min_group_tokens, gemm_tile_bytes});
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul_gemm(const se_experts* e, const float* router_weight,
                                                   const float* router_bias, const void* x, int32_t x_dtype,
                                                   int64_t tokens, const int32_t* expert_ids_in,
                                                   int32_t* expert_ids_out, void* y, int32_t threads, se_dense_gemm gemm,
                                                   void* gemm_ctx, int64_t min_group_tokens, int64_t gemm_tile_bytes,
                                                   char* err, size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                openmp(threads), err, err_len,
                                DenseGroups{gemm, gemm_ctx, min_group_tokens, gemm_tile_bytes});
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int32_t se_kernels_abi(void) { return SE_KERNELS_ABI; }

extern "C" SE_API int64_t se_dense_group_tokens(void) { return SE_DENSE_GROUP_TOKENS; }

extern "C" SE_API double se_dense_group_density(void) { return SE_DENSE_GROUP_DENSITY; }

extern "C" SE_API const char* se_kernel_isa(void) {
  switch (cpu_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Neon: return "neon";
    default: return "portable";
  }
}
