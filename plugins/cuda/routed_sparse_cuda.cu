// CUDA implementation of se_cuda_kernels.h. Kernel structure (mirrored on CPU by
// routed_sparse_cuda_reference.cpp, which CI runs):
//  * route_kernel: one warp per token, experts scored 8 at a time (lane-strided dot products,
//    shuffle reductions), argmin with ties to the lowest expert.
//  * gemv_kernel (decode): one warp per (token, output row). Bitmap rows: each lane takes one
//    32-column word, an inclusive shuffle scan of the lanes' popcounts gives every lane its first
//    value; csr16 rows: lanes stride over the row's values. Loads of x hit L1/L2 (reused by all
//    rows of the token).
//  * grouped path (prefill): tokens are counted per expert, planned into tiles of <= 32 tokens
//    (one per lane), scattered into an expert-sorted permutation; grouped_kernel then stages 128
//    columns of the tile's activations in shared memory ([col][token], conflict free) and every
//    warp walks 8 rows' kept weights in column order: each weight is one broadcast load used by
//    32 tokens.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdio>
#include <limits>

#include "se_cuda_kernels.h"
#include "se_sparse_index.h"

namespace se_cuda {

using se_index::kTileTokens;
using se_index::kWarp;

constexpr int kRouteChunk = 8;
constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr int kRowsPerWarp = 8;
constexpr int kRowsPerBlock = kWarpsPerBlock * kRowsPerWarp;  // 64
constexpr int kColChunk = 128;
constexpr unsigned kFull = 0xffffffffu;

struct Experts {  // se_experts by value, typed for the kernels
  const void* values;
  const void* indices;
  const int32_t* row_ptr;
  const float* bias;
  int64_t num_experts, out, in, nnz;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename TX>
__global__ void route_kernel(const TX* __restrict__ x, int64_t tokens, int64_t in, int64_t K,
                             const float* __restrict__ G, const float* __restrict__ b, int32_t* __restrict__ ids) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= tokens) return;  // whole warps exit together (blockDim is a multiple of 32)
  const TX* xt = x + t * in;
  float best = CUDART_INF_F;
  int32_t best_k = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kRouteChunk) {
    float acc[kRouteChunk] = {};
    for (int64_t i = lane; i < in; i += kWarp) {
      const float xi = to_float(xt[i]);
      const float* g = G + i * K + k0;
#pragma unroll
      for (int j = 0; j < kRouteChunk; ++j) {
        if (k0 + j < K) acc[j] += xi * g[j];
      }
    }
#pragma unroll
    for (int j = 0; j < kRouteChunk; ++j) {
      const float s = warp_sum(acc[j]);
      if (k0 + j < K && s + b[k0 + j] < best) {
        best = s + b[k0 + j];
        best_k = static_cast<int32_t>(k0 + j);
      }
    }
  }
  if (lane == 0) ids[t] = best_k;
}

template <typename TX, typename TV, int FMT>
__global__ void gemv_kernel(Experts e, const TX* __restrict__ x, const int32_t* __restrict__ ids, TX* __restrict__ y) {
  const int64_t t = blockIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= e.out) return;
  const int32_t expert = ids[t];
  if (expert < 0 || expert >= e.num_experts) {
    if (lane == 0) y[t * e.out + r] = from_float<TX>(0.0f);
    return;
  }
  const int64_t row = expert * e.out + r, rows = e.num_experts * e.out;
  const int64_t start = e.row_ptr[row];
  const TV* v = static_cast<const TV*>(e.values);
  const TX* xt = x + t * e.in;
  float acc = 0.0f;
  if (FMT == SE_BITMAP) {
    const int64_t row_bytes = se_index::bitmap_row_bytes(e.in), words = se_index::bitmap_row_words(e.in);
    const uint8_t* bits = static_cast<const uint8_t*>(e.indices) + row * row_bytes;
    int64_t base = start;
    for (int64_t w0 = 0; w0 < words; w0 += kWarp) {
      const int64_t w = w0 + lane;
      uint32_t word = w < words ? se_index::bitmap_word(bits, w, row_bytes) : 0u;
      const int count = se_index::popcount32(word);
      int incl = count;  // inclusive scan of popcounts over lanes
      for (int o = 1; o < kWarp; o *= 2) {
        const int up = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += up;
      }
      int64_t p = base + incl - count;
      for (; word != 0; word &= word - 1) acc += to_float(v[p++]) * to_float(xt[w * 32 + se_index::lowest_bit(word)]);
      base += __shfl_sync(kFull, incl, kWarp - 1);
    }
  } else {
    const uint16_t* cols = static_cast<const uint16_t*>(e.indices);
    const int64_t end = se_index::row_end(e.row_ptr, row, rows, e.nnz);
    for (int64_t p = start + lane; p < end; p += kWarp) acc += to_float(v[p]) * to_float(xt[cols[p]]);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[t * e.out + r] = from_float<TX>(acc + (e.bias ? e.bias[row] : 0.0f));
}

// --- grouped path: count -> plan -> scatter -> grouped product
__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t tokens, int64_t K, int32_t* counts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < tokens && ids[t] >= 0 && ids[t] < K) atomicAdd(&counts[ids[t]], 1);
}

__global__ void plan_kernel(const int32_t* counts, int64_t K, int32_t* offsets, int32_t* cursor, int32_t* tiles,
                            int32_t* num_tiles) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;  // K is small: one thread plans
  *num_tiles = static_cast<int32_t>(se_index::plan_tiles(counts, K, offsets, tiles));
  for (int64_t e = 0; e < K; ++e) cursor[e] = offsets[e];
}

__global__ void scatter_kernel(const int32_t* __restrict__ ids, int64_t tokens, int64_t K, int32_t* cursor,
                               int32_t* perm) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < tokens && ids[t] >= 0 && ids[t] < K) perm[atomicAdd(&cursor[ids[t]], 1)] = static_cast<int32_t>(t);
}

__global__ void zero_invalid_kernel(const int32_t* __restrict__ ids, int64_t tokens, int64_t K, int64_t out, void* y,
                                    int x_bytes) {
  const int64_t t = blockIdx.x;
  if (t >= tokens || (ids[t] >= 0 && ids[t] < K)) return;
  char* row = static_cast<char*>(y) + t * out * x_bytes;
  for (int64_t i = threadIdx.x; i < out * x_bytes; i += blockDim.x) row[i] = 0;
}

template <typename TX, typename TV, int FMT>
__global__ void __launch_bounds__(kBlock) grouped_kernel(Experts e, const TX* __restrict__ x,
                                                        const int32_t* __restrict__ perm,
                                                        const int32_t* __restrict__ tiles,
                                                        const int32_t* __restrict__ num_tiles, TX* __restrict__ y) {
  if (static_cast<int32_t>(blockIdx.y) >= *num_tiles) return;
  __shared__ float xs[kColChunk][kTileTokens + 1];
  const int32_t expert = tiles[3 * blockIdx.y], first = tiles[3 * blockIdx.y + 1], len = tiles[3 * blockIdx.y + 2];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t rows = e.num_experts * e.out;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;
  const TV* v = static_cast<const TV*>(e.values);
  const int64_t row_bytes = se_index::bitmap_row_bytes(e.in);

  int64_t p[kRowsPerWarp], end[kRowsPerWarp];
  float acc[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = expert * e.out + r0 + i;
    const bool valid = r0 + i < e.out;
    p[i] = valid ? e.row_ptr[row] : 0;
    end[i] = valid ? se_index::row_end(e.row_ptr, row, rows, e.nnz) : 0;
    acc[i] = 0.0f;
  }
  for (int64_t c0 = 0; c0 < e.in; c0 += kColChunk) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kColChunk * kTileTokens; idx += kBlock) {
      const int col = idx % kColChunk, tok = idx / kColChunk;
      xs[col][tok] = (tok < len && c0 + col < e.in) ? to_float(x[perm[first + tok] * e.in + c0 + col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (r0 + i >= e.out) continue;
      if (FMT == SE_BITMAP) {
        const uint8_t* bits = static_cast<const uint8_t*>(e.indices) + (expert * e.out + r0 + i) * row_bytes;
        for (int ww = 0; ww < kColChunk / 32; ++ww) {
          for (uint32_t word = se_index::bitmap_word(bits, c0 / 32 + ww, row_bytes); word != 0; word &= word - 1) {
            acc[i] += to_float(v[p[i]++]) * xs[ww * 32 + se_index::lowest_bit(word)][lane];
          }
        }
      } else {
        const uint16_t* cols = static_cast<const uint16_t*>(e.indices);
        for (; p[i] < end[i]; ++p[i]) {
          const int64_t c = cols[p[i]];
          if (c >= c0 + kColChunk) break;
          acc[i] += to_float(v[p[i]]) * xs[c - c0][lane];
        }
      }
    }
  }
  if (lane >= len) return;
  const int64_t t = perm[first + lane];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    if (r0 + i < e.out) {
      const int64_t row = expert * e.out + r0 + i;
      y[t * e.out + r0 + i] = from_float<TX>(acc[i] + (e.bias ? e.bias[row] : 0.0f));
    }
  }
}

// --- host side
struct Workspace {  // carve-up of the caller's scratch memory (se_cuda_workspace_size)
  int32_t *ids, *counts, *offsets, *cursor, *perm, *tiles, *num_tiles;
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

size_t carve(void* base, int64_t tokens, int64_t K, Workspace* ws) {
  const size_t T = static_cast<size_t>(tokens), k = static_cast<size_t>(K);
  const size_t sizes[] = {T, k, k + 1, k, T, 3 * static_cast<size_t>(se_index::max_tiles(tokens, K)), 1};
  int32_t** slots[] = {&ws->ids, &ws->counts, &ws->offsets, &ws->cursor, &ws->perm, &ws->tiles, &ws->num_tiles};
  size_t off = 0;
  for (size_t i = 0; i < 7; ++i) {
    if (base) *slots[i] = reinterpret_cast<int32_t*>(static_cast<char*>(base) + off);
    off += align256(sizes[i] * sizeof(int32_t));
  }
  return off;
}

int fail(char* err, size_t len, const char* what) {  // returns the error code, 1
  if (err && len) std::snprintf(err, len, "%s", what);
  return 1;
}

int cuda_error(cudaError_t rc, char* err, size_t len, const char* where) {  // 0 on success
  if (rc == cudaSuccess) return 0;
  if (err && len) std::snprintf(err, len, "CUDA error in %s: %s", where, cudaGetErrorString(rc));
  return 1;
}

int cuda_failed(char* err, size_t len, const char* where) {  // checks the last launch
  return cuda_error(cudaGetLastError(), err, len, where);
}

template <typename TX, typename TV, int FMT>
int run_product(const Experts& e, const TX* x, int64_t tokens, const int32_t* ids, bool ids_given, TX* y, bool gemv,
                const Workspace& ws, cudaStream_t stream, char* err, size_t err_len) {
  if (gemv) {
    const dim3 grid(static_cast<unsigned>((e.out + kWarpsPerBlock - 1) / kWarpsPerBlock), static_cast<unsigned>(tokens));
    gemv_kernel<TX, TV, FMT><<<grid, kBlock, 0, stream>>>(e, x, ids, y);
    return cuda_failed(err, err_len, "gemv_kernel");
  }
  const unsigned blocks = static_cast<unsigned>((tokens + kBlock - 1) / kBlock);
  if (cuda_error(cudaMemsetAsync(ws.counts, 0, sizeof(int32_t) * e.num_experts, stream), err, err_len,
                 "cudaMemsetAsync"))
    return 1;
  count_kernel<<<blocks, kBlock, 0, stream>>>(ids, tokens, e.num_experts, ws.counts);
  if (cuda_failed(err, err_len, "count_kernel")) return 1;
  plan_kernel<<<1, 32, 0, stream>>>(ws.counts, e.num_experts, ws.offsets, ws.cursor, ws.tiles, ws.num_tiles);
  if (cuda_failed(err, err_len, "plan_kernel")) return 1;
  scatter_kernel<<<blocks, kBlock, 0, stream>>>(ids, tokens, e.num_experts, ws.cursor, ws.perm);
  if (cuda_failed(err, err_len, "scatter_kernel")) return 1;
  if (ids_given) {  // only caller-given ids can be out of range; the router's never are
    zero_invalid_kernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(ids, tokens, e.num_experts, e.out, y,
                                                                            static_cast<int>(sizeof(TX)));
    if (cuda_failed(err, err_len, "zero_invalid_kernel")) return 1;
  }
  const dim3 grid(static_cast<unsigned>((e.out + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(se_index::max_tiles(tokens, e.num_experts)));
  grouped_kernel<TX, TV, FMT><<<grid, kBlock, 0, stream>>>(e, x, ws.perm, ws.tiles, ws.num_tiles, y);
  return cuda_failed(err, err_len, "grouped_kernel");
}

template <typename TX, typename TV>
int dispatch_format(const se_experts& s, const Experts& e, const TX* x, int64_t tokens, const int32_t* ids,
                    bool ids_given, TX* y, bool gemv, const Workspace& ws, cudaStream_t stream, char* err,
                    size_t err_len) {
  return s.format == SE_BITMAP
             ? run_product<TX, TV, SE_BITMAP>(e, x, tokens, ids, ids_given, y, gemv, ws, stream, err, err_len)
             : run_product<TX, TV, SE_CSR16>(e, x, tokens, ids, ids_given, y, gemv, ws, stream, err, err_len);
}

template <typename TX>
int dispatch_values(const se_experts& s, const Experts& e, const void* x, int64_t tokens, const int32_t* ids,
                    bool ids_given, void* y, bool gemv, const Workspace& ws, cudaStream_t stream, char* err,
                    size_t err_len) {
  const TX* xt = static_cast<const TX*>(x);
  TX* yt = static_cast<TX*>(y);
  switch (s.value_dtype) {
    case SE_F32: return dispatch_format<TX, float>(s, e, xt, tokens, ids, ids_given, yt, gemv, ws, stream, err, err_len);
    case SE_F16: return dispatch_format<TX, __half>(s, e, xt, tokens, ids, ids_given, yt, gemv, ws, stream, err, err_len);
    default: return dispatch_format<TX, __nv_bfloat16>(s, e, xt, tokens, ids, ids_given, yt, gemv, ws, stream, err, err_len);
  }
}

int launch_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in, int64_t K, const float* G,
                 const float* b, int32_t* ids, cudaStream_t stream, char* err, size_t err_len) {
  const unsigned blocks = static_cast<unsigned>((tokens * kWarp + kBlock - 1) / kBlock);
  if (x_dtype == SE_F32) {
    route_kernel<float><<<blocks, kBlock, 0, stream>>>(static_cast<const float*>(x), tokens, in, K, G, b, ids);
  } else {
    route_kernel<__half><<<blocks, kBlock, 0, stream>>>(static_cast<const __half*>(x), tokens, in, K, G, b, ids);
  }
  return cuda_failed(err, err_len, "route_kernel");
}

}  // namespace se_cuda

extern "C" SE_API size_t se_cuda_workspace_size(int64_t tokens, int64_t num_experts) {
  se_cuda::Workspace ws{};
  return se_cuda::carve(nullptr, tokens, num_experts, &ws);
}

extern "C" SE_API int se_cuda_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in, int64_t K,
                                    const float* G, const float* b, int32_t* ids, se_cuda_stream stream, char* err,
                                    size_t err_len) {
  if (tokens <= 0) return 0;
  if (x_dtype != SE_F32 && x_dtype != SE_F16) return se_cuda::fail(err, err_len, "x must be fp32 or fp16");
  return se_cuda::launch_route(x, x_dtype, tokens, in, K, G, b, ids, reinterpret_cast<cudaStream_t>(stream), err,
                               err_len);
}

extern "C" SE_API int se_cuda_routed_sparse_matmul(const se_experts* s, const float* G, const float* b, const void* x,
                                                   int32_t x_dtype, int64_t tokens, const int32_t* ids_in,
                                                   int32_t* ids_out, void* y, void* workspace, size_t workspace_size,
                                                   int32_t gemv_max_tokens, se_cuda_stream stream_handle, char* err,
                                                   size_t err_len) {
  using namespace se_cuda;
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (!s || !x || !y) return fail(err, err_len, "null experts, x or y");
  if (x_dtype != SE_F32 && x_dtype != SE_F16) return fail(err, err_len, "x must be fp32 or fp16");
  if (s->format != SE_BITMAP && s->format != SE_CSR16) return fail(err, err_len, "unknown sparse format");
  if (s->value_dtype < SE_F32 || s->value_dtype > SE_BF16) return fail(err, err_len, "unknown value dtype");
  if (s->in_features > 65536 && s->format == SE_CSR16)
    return fail(err, err_len, "csr16 needs in_features <= 65536");
  if (tokens <= 0) return 0;
  if (gemv_max_tokens <= 0) gemv_max_tokens = SE_CUDA_DEFAULT_GEMV_MAX_TOKENS;
  const bool gemv = tokens <= gemv_max_tokens;
  Workspace ws{};
  const size_t need = carve(workspace, tokens, s->num_experts, &ws);
  const bool needs_workspace = !gemv || (!ids_in && !ids_out);
  if (needs_workspace && (!workspace || workspace_size < need)) {
    if (err && err_len)
      std::snprintf(err, err_len, "workspace of %zu bytes is too small: se_cuda_workspace_size says %zu",
                    workspace_size, need);
    return 1;
  }
  const int32_t* ids = ids_in;
  if (!ids) {
    int32_t* routed = ids_out ? ids_out : ws.ids;
    if (launch_route(x, x_dtype, tokens, s->in_features, s->num_experts, G, b, routed, stream, err, err_len)) return 1;
    ids = routed;
  } else if (ids_out && ids_out != ids_in) {
    if (cuda_error(cudaMemcpyAsync(ids_out, ids_in, sizeof(int32_t) * tokens, cudaMemcpyDeviceToDevice, stream), err,
                   err_len, "cudaMemcpyAsync"))
      return 1;
  }
  const Experts e{s->values, s->indices, s->row_ptr, s->bias, s->num_experts, s->out_features, s->in_features, s->nnz};
  const bool given = ids_in != nullptr;
  return x_dtype == SE_F32 ? dispatch_values<float>(*s, e, x, tokens, ids, given, y, gemv, ws, stream, err, err_len)
                           : dispatch_values<__half>(*s, e, x, tokens, ids, given, y, gemv, ws, stream, err, err_len);
}
