// CUDA implementation of se_cuda_kernels.h. Kernel structure (mirrored on CPU by
// routed_sparse_cuda_reference.cpp, which CI runs):
//  * router: route_partial_kernel splits each token's input features over up to kRouteSplitMax
//    blocks (so a decode step's router runs on many SMs, not one; long prefills keep one block
//    per token, se_sparse_index.h route_splits); each block scores up to 16
//    experts per pass (warp shuffles, then the block's warps) and writes its partial scores to the
//    workspace; route_argmin_kernel (one warp per token) sums the splits in order, adds the bias
//    and takes the argmin, ties to the lowest expert.
//  * gemv_kernel (decode): the token's activations are staged in shared memory (global reads
//    past the device's shared-memory limit); one warp per output row. Bitmap rows, lane per word
//    (default): lane l owns word w0+l of each 32-word pass, finds its values' offset by a warp scan
//    of the words' popcounts and walks only its set bits, so a warp spends an instruction per kept
//    weight, not per column. csr16 rows: lanes stride over the row's values and columns in 16-byte
//    vectors (SE_CUDA_GEMV_VECTORS=0: one value per lane per step, for comparison).
//  * grouped path (prefill): tokens are counted per expert, planned into tiles of <= 64 tokens
//    (tensor-core path) or <= 32 (fp32 path), scattered into an expert-sorted permutation;
//    grouped_kernel decodes a 64-row x 64-column block of the expert into shared memory per step
//    (lane-per-column bitmap, csr16 windows), with the next step's words and activations already
//    in flight, and multiplies it with the tile's activations: tensor cores (WMMA, fp32
//    accumulation) for fp16 activations with fp16/bf16 values or int8/int4 codes, a
//    register-blocked fp32 FMA loop otherwise.
//  * int8/int4 codes (SE_I8, SE_I4) are decoded where a value is read: the code's byte is loaded
//    (int4: the value's nibble chosen by its index), multiplied by its group's fp16 scale in fp32
//    (GEMV) or written to the tile as code * scale (grouped path). No dequantized copy is made.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <mma.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "se_cuda_kernels.h"
#include "se_sparse_index.h"

namespace se_cuda {

using se_index::kTileCols;
using se_index::kTileRows;
using se_index::kTileTokens;
using se_index::kWarp;

constexpr int kRouteChunk = se_index::kRouteChunk;
constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr int kGemvRowsPerWarp = 2;
constexpr int kGemvRowsPerBlock = kWarpsPerBlock * kGemvRowsPerWarp;  // 16
constexpr int kTileRowsPerWarp = kTileRows / kWarpsPerBlock;            // 8
constexpr unsigned kFull = 0xffffffffu;
static_assert(kBlock == se_index::kRouteThreads, "the reference emulates the router's block size");
static_assert(kTileRows == 4 * 16 && kTileTokens == 2 * 16 && kWarpsPerBlock == 8,
              "a warp owns one 16x16 WMMA tile per 32 tokens");

struct Experts {  // se_experts by value, typed for the kernels
  const void* values;
  const void* indices;
  const int32_t* row_ptr;
  const float* bias;
  int64_t num_experts, out, in, nnz;
  const uint16_t* scales;      // fp16 bits [K*out, groups] of int8/int4 codes, else null
  int64_t group_size, groups;  // columns per scale and scales per row (int8/int4 codes)
};

// Value types of quantized experts (SE_I8, SE_I4): tags, the codes are bytes (int4: two per byte).
struct Int8Codes {};
struct Int4Codes {};
template <typename TV>
constexpr bool kQuantized = std::is_same<TV, Int8Codes>::value || std::is_same<TV, Int4Codes>::value;
template <typename TV>
constexpr bool kInt4 = std::is_same<TV, Int4Codes>::value;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Scale of (row, col) of quantized experts, as fp32.
__device__ __forceinline__ float scale_at(const Experts& e, int64_t row, int64_t col) {
  return __half2float(__ushort_as_half(__ldg(e.scales + se_index::scale_index(row, col, e.groups, e.group_size))));
}

// Kept weight p of flattened row `row`, at column `col`: the stored float, or its code times the
// scale of its (row, group) in fp32 (exact for int8/int4 codes and fp16 scales).
template <typename TV>
__device__ __forceinline__ float weight_at(const Experts& e, int64_t p, int64_t row, int64_t col) {
  if constexpr (kQuantized<TV>) {
    const uint8_t byte = __ldg(static_cast<const uint8_t*>(e.values) + se_index::code_byte_index(kInt4<TV>, p));
    return static_cast<float>(se_index::code_of_byte(byte, kInt4<TV>, p)) * scale_at(e, row, col);
  } else {
    return to_float(static_cast<const TV*>(e.values)[p]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Word w of a bitmap row: one 32-bit load when rows are word-aligned, else byte by byte.
__device__ __forceinline__ uint32_t load_word(const uint8_t* row, int64_t w, int64_t row_bytes, bool aligned) {
  return aligned ? reinterpret_cast<const uint32_t*>(row)[w] : se_index::bitmap_word(row, w, row_bytes);
}

// Partial router scores of features [s * chunk, (s + 1) * chunk) of token t (blockIdx.x; tokens
// may exceed the 65535 blocks of grid.y), split s (blockIdx.y): partial[(t * splits + s) * K + k] = sum_i x[t, i] G[i, k].
template <typename TX>
__global__ void __launch_bounds__(kBlock) route_partial_kernel(const TX* __restrict__ x, int64_t in, int64_t K,
                                                               int64_t chunk, const float* __restrict__ G,
                                                               float* __restrict__ partial) {
  __shared__ float warp_sums[kWarpsPerBlock][kRouteChunk];
  const int64_t t = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t i0 = s * chunk, i1 = i0 + chunk < in ? i0 + chunk : in;
  const TX* xt = x + t * in;
  for (int64_t k0 = 0; k0 < K; k0 += kRouteChunk) {
    float acc[kRouteChunk] = {};
    const bool full = k0 + kRouteChunk <= K;
    for (int64_t i = i0 + threadIdx.x; i < i1; i += kBlock) {
      const float xi = to_float(xt[i]);
      const float* g = G + i * K + k0;
      if (full) {
#pragma unroll
        for (int j = 0; j < kRouteChunk; ++j) acc[j] += xi * g[j];
      } else {
#pragma unroll
        for (int j = 0; j < kRouteChunk; ++j) {
          if (k0 + j < K) acc[j] += xi * g[j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRouteChunk; ++j) {
      const float sum = warp_sum(acc[j]);
      if (lane == 0) warp_sums[warp][j] = sum;
    }
    __syncthreads();
    if (threadIdx.x < kRouteChunk && k0 + threadIdx.x < K) {
      float sum = 0.0f;
      for (int w = 0; w < kWarpsPerBlock; ++w) sum += warp_sums[w][threadIdx.x];
      partial[(t * splits + s) * K + k0 + threadIdx.x] = sum;
    }
    __syncthreads();
  }
}

// ids[t] = argmin_k (sum over splits of partial + b)_k, ties to the lowest k; one warp per token.
__global__ void __launch_bounds__(kBlock) route_argmin_kernel(const float* __restrict__ partial, int64_t tokens,
                                                              int64_t splits, int64_t K, const float* __restrict__ b,
                                                              int32_t* __restrict__ ids) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= tokens) return;  // whole warps leave together
  float best = CUDART_INF_F;
  int32_t best_k = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    float score = 0.0f;
    for (int64_t s = 0; s < splits; ++s) score += partial[(t * splits + s) * K + k];
    score += b[k];
    if (score < best) {
      best = score;
      best_k = static_cast<int32_t>(k);
    }
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float other = __shfl_xor_sync(kFull, best, o);
    const int32_t other_k = __shfl_xor_sync(kFull, best_k, o);
    if (other < best || (other == best && other_k < best_k)) {
      best = other;
      best_k = other_k;
    }
  }
  if (lane == 0) ids[t] = best_k;
}

// One bitmap row's dot product with the token's activations xs (column c of word w at
// xs[w * kXStride + c], padded when staged), summed over the warp's lanes by the caller.
// Lane per word: lane l owns word w0+l of each 32-word pass; an inclusive warp scan of the words'
// popcounts places its first value, and it walks its set bits only, loading each value itself.
// Measured on an H200 against lane per column (lane l owns column 32w+l of every word: a warp step
// per word whatever its popcount), staging each pass's values per warp, and decoding each pass's
// columns to shared memory for 16-byte value loads (BENCHMARKS.md): 1.3-3.1x faster than the first,
// fastest of the four.
template <typename TV, typename TX, int64_t kXStride>
__device__ __forceinline__ float bitmap_row_dot_words(const Experts& e, int64_t row, const TX* xs, int lane,
                                                      int64_t words, int64_t row_bytes, bool aligned) {
  const uint8_t* bits = static_cast<const uint8_t*>(e.indices) + row * row_bytes;
  int64_t base = e.row_ptr[row];
  float acc0 = 0.0f, acc1 = 0.0f;
  for (int64_t w0 = 0; w0 < words; w0 += kWarp) {
    const int64_t w = w0 + lane;
    uint32_t word = w < words ? load_word(bits, w, row_bytes, aligned) : 0u;
    const int count = se_index::popcount32(word);
    int inclusive = count;
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const int up = __shfl_up_sync(kFull, inclusive, o);
      if (lane >= o) inclusive += up;
    }
    int64_t q = base + (inclusive - count);  // this lane's first value
    const TX* xw = xs + w * kXStride;
    while (word) {  // two kept weights per step: two independent loads in flight
      const int c0 = se_index::lowest_bit(word);
      word &= word - 1u;
      if (word) {
        const int c1 = se_index::lowest_bit(word);
        word &= word - 1u;
        acc1 += weight_at<TV>(e, q + 1, row, w * kWarp + c1) * to_float(xw[c1]);
      }
      acc0 += weight_at<TV>(e, q, row, w * kWarp + c0) * to_float(xw[c0]);
      q += 2;
    }
    base += __shfl_sync(kFull, inclusive, kWarp - 1);
  }
  return acc0 + acc1;
}

// Values per 16-byte vector load.
template <typename TV>
struct Vec {
  static constexpr int kN = 16 / static_cast<int>(sizeof(TV));
};

// Loads kN values (16 bytes, aligned); loads kN 16-bit columns (2 kN bytes, aligned).
template <typename TV>
__device__ __forceinline__ void load_vector(const TV* v, TV (&vals)[Vec<TV>::kN]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(v));
  memcpy(vals, &raw, sizeof(raw));
}
template <int kN>
__device__ __forceinline__ void load_columns(const uint16_t* c, uint16_t (&cols)[kN]) {
  static_assert(kN == 8 || kN == 4, "16 or 8 bytes of columns (16-bit or 32-bit values)");
  if constexpr (kN == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(c);
    memcpy(cols, &raw, sizeof(raw));
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(c);
    memcpy(cols, &raw, sizeof(raw));
  }
}

// The values [begin, end) in whole aligned vectors: [head_end, body_end) holds `vectors` vectors,
// [begin, head_end) and [body_end, end) fewer than a vector's values each.
struct VectorSpan {
  int64_t head_end, vectors, body_end;
};
template <int kN>
__device__ __forceinline__ VectorSpan vector_span(int64_t begin, int64_t end) {
  int64_t head_end = (begin + kN - 1) / kN * kN;
  if (head_end > end) head_end = end;
  const int64_t vectors = (end - head_end) / kN;
  return {head_end, vectors, head_end + vectors * kN};
}

// csr16: lanes stride over the row's values, one per lane per step (kVector false, and always for
// int8/int4 codes), or in 16-byte vectors of values with their columns (kN values and kN columns
// per load; head and tail one value per lane).
template <typename TV, typename TX>
__device__ __forceinline__ float csr16_row_dot(const Experts& e, int64_t row, const TX* xs, int lane, bool vector) {
  const uint16_t* cols = static_cast<const uint16_t*>(e.indices);
  const int64_t begin = e.row_ptr[row], end = se_index::row_end(e.row_ptr, row, e.num_experts * e.out, e.nnz);
  float acc0 = 0.0f, acc1 = 0.0f;
  if (!vector || kQuantized<TV>) {
#pragma unroll 4
    for (int64_t p = begin + lane; p < end; p += kWarp)
      acc0 += weight_at<TV>(e, p, row, cols[p]) * to_float(xs[cols[p]]);
    return acc0;
  }
  if constexpr (!kQuantized<TV>) {
    constexpr int kN = Vec<TV>::kN;
    const TV* v = static_cast<const TV*>(e.values);
    const VectorSpan span = vector_span<kN>(begin, end);
    if (begin + lane < span.head_end) acc0 += to_float(v[begin + lane]) * to_float(xs[cols[begin + lane]]);
    if (span.body_end + lane < end) acc1 += to_float(v[span.body_end + lane]) * to_float(xs[cols[span.body_end + lane]]);
#pragma unroll 2
    for (int64_t k = lane; k < span.vectors; k += kWarp) {
      const int64_t p = span.head_end + k * kN;
      TV vals[kN];
      uint16_t c[kN];
      load_vector(v + p, vals);
      load_columns<kN>(cols + p, c);
#pragma unroll
      for (int j = 0; j < kN; j += 2) {
        acc0 += to_float(vals[j]) * to_float(xs[c[j]]);
        acc1 += to_float(vals[j + 1]) * to_float(xs[c[j + 1]]);
      }
    }
  }
  return acc0 + acc1;
}

// Element stride between the bitmap words of the activations the GEMV reads: padded in shared
// memory for bitmap rows (bank spread for the lane-per-word walk), plain otherwise.
template <typename TX, int FMT, bool kSmemX>
struct GemvXStride {
  static constexpr int64_t value = kSmemX && FMT == SE_BITMAP ? se_index::StagedWordStride<sizeof(TX)>::value : kWarp;
};

// Dynamic shared memory of a GEMV block that stages the token's activations.
template <typename TX, int FMT>
size_t gemv_smem_bytes(int64_t in) {
  return static_cast<size_t>(se_index::bitmap_row_words(in) * GemvXStride<TX, FMT, true>::value) * sizeof(TX);
}

// Whether 16-byte vector loads of a csr16 GEMV's values and columns are aligned.
__device__ __forceinline__ bool csr16_vectors_aligned(const Experts& e) {
  return reinterpret_cast<uintptr_t>(e.values) % 16 == 0 && reinterpret_cast<uintptr_t>(e.indices) % 16 == 0;
}

// kSmemX: the token's activations (padded to whole bitmap words with zeros, words kXStride apart)
// sit in dynamic shared memory; otherwise they are read from global memory (in_features past the
// shared-memory limit). kVectors: csr16 rows in 16-byte vector loads (kVectors false:
// SE_CUDA_GEMV_VECTORS=0, for comparison; misaligned values or columns fall back per call).
template <typename TX, typename TV, int FMT, bool kSmemX, bool kVectors>
__global__ void __launch_bounds__(kBlock) gemv_kernel(Experts e, const TX* __restrict__ x,
                                                      const int32_t* __restrict__ ids, TX* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  constexpr int64_t kXStride = GemvXStride<TX, FMT, kSmemX>::value;
  const int64_t t = blockIdx.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int32_t expert = ids[t];
  const bool valid = expert >= 0 && expert < e.num_experts;
  const int64_t words = se_index::bitmap_row_words(e.in), row_bytes = se_index::bitmap_row_bytes(e.in);
  const bool aligned = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(e.indices) % 4 == 0;
  const bool vector = kVectors && FMT == SE_CSR16 && csr16_vectors_aligned(e);
  const TX* xt = x + t * e.in;
  const TX* xs = xt;
  if constexpr (kSmemX) {
    TX* staged = reinterpret_cast<TX*>(gemv_smem);
    for (int64_t i = threadIdx.x; i < words * kWarp; i += kBlock)
      staged[(i / kWarp) * kXStride + i % kWarp] = i < e.in ? xt[i] : from_float<TX>(0.0f);
    __syncthreads();
    xs = staged;
  }
  for (int j = 0; j < kGemvRowsPerWarp; ++j) {
    const int64_t r = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * kGemvRowsPerWarp + j;
    if (r >= e.out) return;
    const int64_t row = expert * e.out + r;
    float acc = 0.0f;
    if (valid) {
      if constexpr (FMT == SE_CSR16) {
        acc = csr16_row_dot<TV>(e, row, xs, lane, vector);
      } else {
        acc = bitmap_row_dot_words<TV, TX, kXStride>(e, row, xs, lane, words, row_bytes, aligned);
      }
      acc = warp_sum(acc) + (e.bias ? e.bias[row] : 0.0f);
    }
    if (lane == 0) y[t * e.out + r] = from_float<TX>(acc);
  }
}

// --- grouped path: count -> plan -> scatter -> grouped product
__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t tokens, int64_t K, int32_t* counts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < tokens && ids[t] >= 0 && ids[t] < K) atomicAdd(&counts[ids[t]], 1);
}

__global__ void plan_kernel(const int32_t* counts, int64_t K, int32_t* offsets, int32_t* cursor, int32_t* tiles,
                            int32_t* num_tiles, int32_t tile_tokens) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;  // K is small: one thread plans
  *num_tiles = static_cast<int32_t>(se_index::plan_tiles(counts, K, offsets, tiles, tile_tokens));
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

// Shared memory of one grouped block. Tensor cores (fp16 activations, fp16 or bf16 values, both
// exact in fp16 for weights of LLM range): the decoded weights and activations in fp16 (WMMA
// operands; rows padded by 16 bytes against bank conflicts), reused as the fp32 result tile at the
// end. Otherwise (fp32 activations, or fp32 values, which fp16 would round): both tiles in fp32
// (rows padded by one word) for the FMA loop.
template <bool kTensorCores, int TT>
struct GroupedTile;
template <int TT>
struct GroupedTile<true, TT> {
  static constexpr int kLdW = kTileCols + 8, kLdX = kTileCols + 8, kLdC = TT + 4;
  union {
    struct {
      __half w[kTileRows * kLdW];
      __half x[TT * kLdX];
    } in;
    float c[kTileRows * kLdC];
  };
};
template <int TT>
struct GroupedTile<false, TT> {
  static_assert(TT == kTileTokens, "the fp32 FMA loop's thread layout covers 32 tokens");
  static constexpr int kLdW = kTileCols + 1, kLdX = kTileCols + 1;
  struct {
    float w[kTileRows * kLdW];
    float x[TT * kLdX];
  } in;
};

// --- grouped kernel: each step's loads issued a step ahead
//
// The first grouped kernel spent three dependent global round trips per 64-column step (the
// bitmap words, then the values they locate, then the activations), each behind a __syncthreads:
// its blocks waited on latency, not bandwidth (H200: 19-83x cuBLAS at 512 tokens). Here a step
// issues its value loads from words the step before prefetched, then the next step's words and
// activations, and only then waits at the barrier: one exposed round trip per step. Loads stay as
// raw bits in registers until the barrier. Its time then no longer depended on sparsity: the
// decode (about ten instructions per lane and column position) bounds it, so the tensor-core path
// takes tiles of 64 tokens and decodes each expert block half as often. H100, 512 tokens, same
// calls (BENCHMARKS.md): prefetching 1.7-2.7x faster than the first kernel; 64-token tiles a further
// 1.01-1.14x (bitmap) and 1.23-1.24x (csr16) over 32-token tiles. Steps are 64 columns: 128 had
// gained bitmap 1-3% on 32-token tiles, and 64-token tiles leave no registers for them.

template <typename T>
using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;

template <typename T>
__device__ __forceinline__ float bits_to_float(Bits<T> b) {
  if constexpr (std::is_same<T, float>::value) {
    return __uint_as_float(b);
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__ushort_as_half(b));
  } else {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);  // bf16
  }
}

// A decoded weight (bits of TV) or activation (bits of TX) as the tile's element type
template <typename TW, typename T>
__device__ __forceinline__ TW bits_to_tile(Bits<T> b) {
  if constexpr (std::is_same<TW, __half>::value && std::is_same<T, __half>::value) {
    return __ushort_as_half(b);
  } else {
    return static_cast<TW>(bits_to_float<T>(b));
  }
}

// Whether a grouped block multiplies on the tensor cores: fp16 activations with fp16 or bf16
// values (both exact in fp16 for weights of LLM range).
template <typename TX, typename TV>
constexpr bool kGroupedTensorCores = std::is_same<TX, __half>::value && !std::is_same<TV, float>::value;

// Tokens per tile: 64 on the tensor-core path, 32 on the fp32 path (its FMA loop's thread layout).
// Each step decodes kTileCols columns: per row and lane kTileCols / 32 bitmap words (lanes < 8
// hold them) or csr16 values.
template <bool kTensorCores>
struct GroupedShape {
  static constexpr int kTokens = kTensorCores ? 2 * kTileTokens : kTileTokens;
  static constexpr int kMinBlocks = kTensorCores ? 2 : 3;  // per SM (caps the registers)
};

// The activations of one step: TT x kTileCols elements in 16-byte vectors, kLoads per thread.
template <typename TX, int TT>
struct StepX {
  static constexpr int kPerVec = 16 / static_cast<int>(sizeof(TX));
  static constexpr int kVecPerRow = kTileCols / kPerVec;
  static constexpr int kLoads = TT * kVecPerRow / kBlock;
  static_assert(kLoads >= 1 && kLoads * kBlock == TT * kVecPerRow, "whole vectors per thread");
};

// Lane i < 8 of the warp: the kSlots bitmap words of its row (bits, row_bytes long) from column
// c0 on; zeros past the row or for an absent row (bits null).
template <int kSlots>
__device__ __forceinline__ void load_step_words(const uint8_t* bits, int64_t row_bytes, bool aligned8, int64_t c0,
                                                uint32_t (&words)[kSlots]) {
#pragma unroll
  for (int h = 0; h < kSlots; ++h) words[h] = 0u;
  if (!bits) return;
  if (aligned8 && c0 / 8 + 4 * kSlots <= row_bytes) {
#pragma unroll
    for (int h = 0; h < kSlots; h += 2) {
      const uint2 both = *reinterpret_cast<const uint2*>(bits + c0 / 8 + 4 * h);
      words[h] = both.x;
      words[h + 1] = both.y;
    }
  } else {
    const int64_t w0 = c0 / kWarp, row_words = se_index::bitmap_row_words(8 * row_bytes);
#pragma unroll
    for (int h = 0; h < kSlots; ++h) words[h] = w0 + h < row_words ? se_index::bitmap_word(bits, w0 + h, row_bytes) : 0u;
  }
}

// This thread's activation vectors of the step at c0: tokens token_row[] (-1: none) of x [*, in];
// zeros past the tile's tokens or the row. `vectors`: in is a whole number of vectors and x is
// 16-byte aligned, so each vector is one load.
template <typename TX, int TT>
__device__ __forceinline__ void load_step_x(const TX* x, const int64_t* token_row, int64_t in, int64_t c0,
                                            bool vectors, uint4 (&out)[StepX<TX, TT>::kLoads]) {
  using SX = StepX<TX, TT>;
#pragma unroll
  for (int j = 0; j < SX::kLoads; ++j) {
    const int v = threadIdx.x + j * kBlock, tok = v / SX::kVecPerRow, col = (v % SX::kVecPerRow) * SX::kPerVec;
    const int64_t tr = token_row[tok], c = c0 + col;
    out[j] = make_uint4(0u, 0u, 0u, 0u);
    if (tr < 0 || c >= in) continue;
    if (vectors) {
      out[j] = __ldg(reinterpret_cast<const uint4*>(x + tr * in + c));
      continue;
    }
    const Bits<TX>* row = reinterpret_cast<const Bits<TX>*>(x) + tr * in;
    const auto at = [&](int k) -> uint32_t { return c + k < in ? static_cast<uint32_t>(row[c + k]) : 0u; };
    if constexpr (sizeof(TX) == 2) {
      out[j] = make_uint4(at(0) | at(1) << 16, at(2) | at(3) << 16, at(4) | at(5) << 16, at(6) | at(7) << 16);
    } else {
      out[j] = make_uint4(at(0), at(1), at(2), at(3));
    }
  }
}

// Writes the activation vectors of load_step_x into the x tile (leading dimension LD).
template <typename TW, typename TX, int TT, int LD>
__device__ __forceinline__ void stage_step_x(const uint4 (&vecs)[StepX<TX, TT>::kLoads], TW* x_tile) {
  using SX = StepX<TX, TT>;
#pragma unroll
  for (int j = 0; j < SX::kLoads; ++j) {
    const int v = threadIdx.x + j * kBlock, tok = v / SX::kVecPerRow, col = (v % SX::kVecPerRow) * SX::kPerVec;
    TW* dst = x_tile + tok * LD + col;
    if constexpr (std::is_same<TW, TX>::value && sizeof(TX) == 2) {  // fp16 into fp16: one 16-byte store
      *reinterpret_cast<uint4*>(dst) = vecs[j];
    } else {
      const uint32_t wd[4] = {vecs[j].x, vecs[j].y, vecs[j].z, vecs[j].w};
#pragma unroll
      for (int k = 0; k < SX::kPerVec; ++k) {
        const uint32_t b = sizeof(TX) == 2 ? (wd[k / 2] >> (16 * (k % 2))) & 0xffffu : wd[k % 4];
        dst[k] = bits_to_tile<TW, TX>(static_cast<Bits<TX>>(b));
      }
    }
  }
}

// Raw storage of one loaded value: its bits, or for int8/int4 codes the byte that holds its code.
template <typename TV>
using Raw = typename std::conditional<kQuantized<TV>, uint8_t, Bits<TV>>::type;

// One step's weights of a warp's kTileRowsPerWarp rows, as raw bits in registers: lane l holds
// column h*32 + l of each row (bitmap), or value p + h*32 + l of each row and its column (csr16).
// int8/int4 codes also keep which nibble holds the code and (bitmap) the scale's bits.
template <typename TV, int kSlots>
struct StepWeights {
  Raw<TV> vals[kTileRowsPerWarp][kSlots];
  uint16_t cols[kTileRowsPerWarp][kSlots];    // csr16 only
  uint16_t scales[kTileRowsPerWarp][kSlots];  // int8/int4 bitmap only (csr16 looks the scale up by column)
  uint32_t odd;                               // int4: bit i * kSlots + h set when that value is a high nibble
};

// Loads the raw value p (the byte of its code for int8/int4; `odd` records an int4 high nibble).
template <typename TV>
__device__ __forceinline__ Raw<TV> load_raw(const Experts& e, int64_t p, uint32_t& odd, int bit) {
  if constexpr (kQuantized<TV>) {
    if (kInt4<TV> && (p & 1)) odd |= 1u << bit;
    return static_cast<const uint8_t*>(e.values)[se_index::code_byte_index(kInt4<TV>, p)];
  } else {
    return static_cast<const Bits<TV>*>(e.values)[p];
  }
}

// A loaded value as the tile's element type: the stored float, or the code times its scale (fp32
// product, then one rounding to TW).
template <typename TW, typename TV>
__device__ __forceinline__ TW value_to_tile(Raw<TV> raw, bool odd, uint16_t scale_bits) {
  if constexpr (kQuantized<TV>) {
    const int code = se_index::code_of_byte(raw, kInt4<TV>, odd ? 1 : 0);
    return static_cast<TW>(static_cast<float>(code) * __half2float(__ushort_as_half(scale_bits)));
  } else {
    return bits_to_tile<TW, TV>(raw);
  }
}

// Issues the loads of one step's weights (flattened rows row0 + i, columns from c0). Bitmap: from
// the rows' words (lanes < 8 hold row i's), advancing each row's value cursor p[i]; int8/int4
// codes load their scale too (its column is known). csr16: the next kSlots * 32 values of each
// row with their columns (at most that many columns ahead); stage_step_weights advances p.
template <typename TV, int FMT, int kSlots>
__device__ __forceinline__ void load_step_weights(const Experts& e, const uint32_t (&words)[kSlots],
                                                  int32_t (&p)[kTileRowsPerWarp],
                                                  const int32_t (&end)[kTileRowsPerWarp], int lane, int64_t row0,
                                                  int64_t c0, StepWeights<TV, kSlots>& w) {
  w.odd = 0u;
#pragma unroll
  for (int i = 0; i < kTileRowsPerWarp; ++i) {
#pragma unroll
    for (int h = 0; h < kSlots; ++h) {
      const int bit = i * kSlots + h;
      if constexpr (FMT == SE_BITMAP) {
        const uint32_t word = __shfl_sync(kFull, words[h], i);
        const bool has = se_index::lane_has(word, lane);
        w.vals[i][h] = has ? load_raw<TV>(e, p[i] + se_index::lane_value_offset(word, lane), w.odd, bit) : 0;
        if constexpr (kQuantized<TV>)
          w.scales[i][h] = has ? e.scales[se_index::scale_index(row0 + i, c0 + h * kWarp + lane, e.groups,
                                                                e.group_size)]
                               : 0;
        p[i] += se_index::popcount32(word);
      } else {
        const int32_t q = p[i] + h * kWarp + lane;
        w.cols[i][h] = q < end[i] ? static_cast<const uint16_t*>(e.indices)[q] : 0;
        w.vals[i][h] = q < end[i] ? load_raw<TV>(e, q, w.odd, bit) : 0;
      }
    }
  }
}

// Writes one step's weights (columns [c0, c0 + kSlots * 32)) into the warp's rows of the weight
// tile (leading dimension LD); csr16 keeps the values whose column falls in the step and moves
// each row's cursor past them.
template <typename TW, typename TV, int FMT, int kSlots, int LD>
__device__ __forceinline__ void stage_step_weights(const StepWeights<TV, kSlots>& w, const Experts& e, int64_t row0,
                                                   int64_t c0, int32_t (&p)[kTileRowsPerWarp],
                                                   const int32_t (&end)[kTileRowsPerWarp], int lane, TW* w_tile) {
#pragma unroll
  for (int i = 0; i < kTileRowsPerWarp; ++i)
#pragma unroll
    for (int h = 0; h < kSlots; ++h)
      w_tile[i * LD + h * kWarp + lane] =
          FMT == SE_BITMAP ? value_to_tile<TW, TV>(w.vals[i][h], (w.odd >> (i * kSlots + h)) & 1u,
                                                   kQuantized<TV> ? w.scales[i][h] : uint16_t{0})
                           : static_cast<TW>(0.0f);
  if constexpr (FMT == SE_CSR16) {
    __syncwarp();  // the zeros are down before the kept values land on them
#pragma unroll
    for (int i = 0; i < kTileRowsPerWarp; ++i) {
      int taken = 0;
#pragma unroll
      for (int h = 0; h < kSlots; ++h) {
        const int64_t q = static_cast<int64_t>(p[i]) + h * kWarp + lane;
        const bool ok = se_index::in_window(q, end[i], w.cols[i][h], c0);
        if (ok) {
          const uint16_t scale = kQuantized<TV> ? e.scales[se_index::scale_index(row0 + i, w.cols[i][h], e.groups,
                                                                                 e.group_size)]
                                                : 0;
          w_tile[i * LD + (w.cols[i][h] - c0)] =
              value_to_tile<TW, TV>(w.vals[i][h], (w.odd >> (i * kSlots + h)) & 1u, scale);
        }
        taken += __popc(__ballot_sync(kFull, ok));
      }
      p[i] += taken;
    }
  }
}

template <typename TX, typename TV, int FMT>
__global__ void __launch_bounds__(kBlock, GroupedShape<kGroupedTensorCores<TX, TV>>::kMinBlocks)
    grouped_kernel(Experts e, const TX* __restrict__ x, const int32_t* __restrict__ perm,
                   const int32_t* __restrict__ tiles, const int32_t* __restrict__ num_tiles, TX* __restrict__ y) {
  constexpr bool kTensorCores = kGroupedTensorCores<TX, TV>;
  using Shape = GroupedShape<kTensorCores>;
  constexpr int TT = Shape::kTokens, KC = kTileCols, kSlots = KC / kWarp;
  constexpr int kFrags = TT / 32;  // 16x16 result tiles per warp
  using Tile = GroupedTile<kTensorCores, TT>;
  using SX = StepX<TX, TT>;
  using TW = typename std::conditional<kTensorCores, __half, float>::type;
  if (static_cast<int32_t>(blockIdx.y) >= *num_tiles) return;
  __shared__ __align__(128) Tile tile;
  __shared__ int64_t token_row[TT];
  const int32_t expert = tiles[3 * blockIdx.y], first = tiles[3 * blockIdx.y + 1], len = tiles[3 * blockIdx.y + 2];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t rows = e.num_experts * e.out, r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t r_first = r0 + warp * kTileRowsPerWarp;  // this warp decodes rows r_first .. +7
  const int64_t row_bytes = se_index::bitmap_row_bytes(e.in);
  const bool aligned8 = row_bytes % 8 == 0 && reinterpret_cast<uintptr_t>(e.indices) % 8 == 0;
  const bool x_vectors = e.in % SX::kPerVec == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // lane i < 8 loads the bitmap words of row r_first + i
  const uint8_t* my_bits = FMT == SE_BITMAP && lane < kTileRowsPerWarp && r_first + lane < e.out
                               ? static_cast<const uint8_t*>(e.indices) + (expert * e.out + r_first + lane) * row_bytes
                               : nullptr;
  TW* w_tile = tile.in.w + warp * kTileRowsPerWarp * Tile::kLdW;
  if (threadIdx.x < TT) token_row[threadIdx.x] = static_cast<int>(threadIdx.x) < len ? perm[first + threadIdx.x] : -1;

  int32_t p[kTileRowsPerWarp], end[kTileRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kTileRowsPerWarp; ++i) {
    const int64_t row = expert * e.out + r_first + i;
    const bool valid = r_first + i < e.out;
    p[i] = valid ? e.row_ptr[row] : 0;
    end[i] = valid ? static_cast<int32_t>(se_index::row_end(e.row_ptr, row, rows, e.nnz)) : 0;
  }
  // fp16: warp (fm, fn) owns the 16x16 result blocks rows 16 fm.., tokens 16 (fn + 2 f).. for
  // f < kFrags; fp32: thread (ty, tx) owns rows 2 ty, 2 ty + 1 and tokens 4 tx .. 4 tx + 3
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c_frag[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) nvcuda::wmma::fill_fragment(c_frag[f], 0.0f);
  const int fm = warp % 4, fn = warp / 4, ty = threadIdx.x / 8, tx = threadIdx.x % 8;
  float acc[2][4] = {};

  uint32_t words_next[kSlots];
  uint4 x_next[SX::kLoads];
  __syncthreads();  // token_row is written
  load_step_words<kSlots>(my_bits, row_bytes, aligned8, 0, words_next);
  load_step_x<TX, TT>(x, token_row, e.in, 0, x_vectors, x_next);
  for (int64_t c0 = 0; c0 < e.in; c0 += KC) {
    // 1. this step's weight loads (bitmap: from the words the last step prefetched)
    StepWeights<TV, kSlots> weights;
    load_step_weights<TV, FMT, kSlots>(e, words_next, p, end, lane, expert * e.out + r_first, c0, weights);
    uint4 x_now[SX::kLoads];
#pragma unroll
    for (int j = 0; j < SX::kLoads; ++j) x_now[j] = x_next[j];
    // 2. the next step's words and activations, in flight across this step's product
    if (c0 + KC < e.in) {
      load_step_words<kSlots>(my_bits, row_bytes, aligned8, c0 + KC, words_next);
      load_step_x<TX, TT>(x, token_row, e.in, c0 + KC, x_vectors, x_next);
    }
    __syncthreads();  // the previous step's product has read the tiles
    // 3. this step's tiles
    stage_step_x<TW, TX, TT, Tile::kLdX>(x_now, tile.in.x);
    stage_step_weights<TW, TV, FMT, kSlots, Tile::kLdW>(weights, e, expert * e.out + r_first, c0, p, end, lane,
                                                        w_tile);
    __syncthreads();
    // 4. the product
    if constexpr (kTensorCores) {
      using namespace nvcuda;
#pragma unroll
      for (int kk = 0; kk < KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a_frag;
        wmma::load_matrix_sync(a_frag, tile.in.w + fm * 16 * Tile::kLdW + kk, Tile::kLdW);
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b_frag;
          wmma::load_matrix_sync(b_frag, tile.in.x + (fn + 2 * f) * 16 * Tile::kLdX + kk, Tile::kLdX);
          wmma::mma_sync(c_frag[f], a_frag, b_frag, c_frag[f]);
        }
      }
    } else {
#pragma unroll 8
      for (int k = 0; k < KC; ++k) {
        const float w0 = tile.in.w[(2 * ty) * Tile::kLdW + k], w1 = tile.in.w[(2 * ty + 1) * Tile::kLdW + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float xv = tile.in.x[(4 * tx + j) * Tile::kLdX + k];
          acc[0][j] += w0 * xv;
          acc[1][j] += w1 * xv;
        }
      }
    }
  }
  if constexpr (kTensorCores) {
    __syncthreads();  // every warp is done with the operand tiles the result tile overlays
#pragma unroll
    for (int f = 0; f < kFrags; ++f)
      nvcuda::wmma::store_matrix_sync(tile.c + fm * 16 * Tile::kLdC + (fn + 2 * f) * 16, c_frag[f], Tile::kLdC,
                                      nvcuda::wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < kTileRows * TT; i += kBlock) {
      const int tok = i / kTileRows, tr = i % kTileRows;  // consecutive threads: consecutive rows of y
      const int64_t r = r0 + tr;
      if (tok < len && r < e.out) {
        const float bias = e.bias ? e.bias[expert * e.out + r] : 0.0f;
        y[token_row[tok] * e.out + r] = from_float<TX>(tile.c[tr * Tile::kLdC + tok] + bias);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r = r0 + 2 * ty + i;
      if (r >= e.out) continue;
      const float bias = e.bias ? e.bias[expert * e.out + r] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (4 * tx + j < len) y[token_row[4 * tx + j] * e.out + r] = from_float<TX>(acc[i][j] + bias);
      }
    }
  }
}

// --- host side
struct Workspace {  // carve-up of the caller's scratch memory (se_cuda_workspace_size)
  int32_t *ids, *counts, *offsets, *cursor, *perm, *tiles, *num_tiles;
  float* route_partial;  // [tokens, route_splits, K] partial router scores
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Lays the slots out one after another, each 256-byte aligned; with base NULL only measures.
size_t carve(void* base, int64_t tokens, int64_t K, Workspace* ws) {
  const size_t T = static_cast<size_t>(tokens), k = static_cast<size_t>(K);
  size_t off = 0;
  const auto take = [&](size_t elements) {  // 4-byte elements (int32 or fp32)
    void* slot = base ? static_cast<char*>(base) + off : nullptr;
    off += align256(elements * 4);
    return slot;
  };
  ws->ids = static_cast<int32_t*>(take(T));
  ws->counts = static_cast<int32_t*>(take(k));
  ws->offsets = static_cast<int32_t*>(take(k + 1));
  ws->cursor = static_cast<int32_t*>(take(k));
  ws->perm = static_cast<int32_t*>(take(T));
  ws->tiles = static_cast<int32_t*>(take(3 * static_cast<size_t>(se_index::max_tiles(tokens, K))));
  ws->num_tiles = static_cast<int32_t*>(take(1));
  ws->route_partial = static_cast<float*>(take(static_cast<size_t>(se_index::route_partial_rows(tokens)) * k));
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

// Whether the GEMV can stage `bytes` of activations in shared memory: always up to the 48 KB
// every kernel gets; beyond, up to the device's opt-in limit (raised once per kernel). The
// environment variable SE_CUDA_GEMV_SMEM_X=0 forces the global-memory variant (tests use it).
bool gemv_smem_fits(const void* kernel, size_t bytes, char* err, size_t err_len) {
  if (err && err_len) err[0] = '\0';
  const char* force = std::getenv("SE_CUDA_GEMV_SMEM_X");
  if (force && force[0] == '0') return false;
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) return true;
  int device = 0, optin = 0;
  if (cuda_error(cudaGetDevice(&device), err, err_len, "cudaGetDevice") ||
      cuda_error(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), err, err_len,
                 "cudaDeviceGetAttribute"))
    return false;
  if (bytes > static_cast<size_t>(optin)) return false;
  return !cuda_error(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                     err, err_len, "cudaFuncSetAttribute");
}

// SE_CUDA_GEMV_VECTORS=0 loads csr16 rows one value per lane per step (read per call: the
// benchmark's comparison and the tests).
bool gemv_vectors() {
  const char* vectors = std::getenv("SE_CUDA_GEMV_VECTORS");
  return !(vectors && vectors[0] == '0');
}

template <typename TX, typename TV, int FMT, bool kVectors>
int launch_gemv(const Experts& e, const TX* x, int64_t tokens, const int32_t* ids, TX* y, cudaStream_t stream,
                char* err, size_t err_len) {
  const dim3 grid(static_cast<unsigned>((e.out + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock),
                  static_cast<unsigned>(tokens));
  const auto staged = gemv_kernel<TX, TV, FMT, true, kVectors>;
  const size_t smem = gemv_smem_bytes<TX, FMT>(e.in);
  if (gemv_smem_fits(reinterpret_cast<const void*>(staged), smem, err, err_len)) {
    staged<<<grid, kBlock, smem, stream>>>(e, x, ids, y);
  } else {
    if (err && err_len && err[0]) return 1;  // the attribute call itself failed
    gemv_kernel<TX, TV, FMT, false, kVectors><<<grid, kBlock, 0, stream>>>(e, x, ids, y);
  }
  return cuda_failed(err, err_len, "gemv_kernel");
}

template <typename TX, typename TV, int FMT>
int run_product(const Experts& e, const TX* x, int64_t tokens, const int32_t* ids, bool ids_given, TX* y, bool gemv,
                const Workspace& ws, cudaStream_t stream, char* err, size_t err_len) {
  if (gemv) {  // vectors for csr16 only (FMT == SE_CSR16 as the argument: no bitmap instantiation of them)
    return FMT == SE_CSR16 && gemv_vectors()
               ? launch_gemv<TX, TV, FMT, FMT == SE_CSR16>(e, x, tokens, ids, y, stream, err, err_len)
               : launch_gemv<TX, TV, FMT, false>(e, x, tokens, ids, y, stream, err, err_len);
  }
  const unsigned blocks = static_cast<unsigned>((tokens + kBlock - 1) / kBlock);
  if (cuda_error(cudaMemsetAsync(ws.counts, 0, sizeof(int32_t) * e.num_experts, stream), err, err_len,
                 "cudaMemsetAsync"))
    return 1;
  count_kernel<<<blocks, kBlock, 0, stream>>>(ids, tokens, e.num_experts, ws.counts);
  if (cuda_failed(err, err_len, "count_kernel")) return 1;
  plan_kernel<<<1, 32, 0, stream>>>(ws.counts, e.num_experts, ws.offsets, ws.cursor, ws.tiles, ws.num_tiles,
                                    GroupedShape<kGroupedTensorCores<TX, TV>>::kTokens);
  if (cuda_failed(err, err_len, "plan_kernel")) return 1;
  scatter_kernel<<<blocks, kBlock, 0, stream>>>(ids, tokens, e.num_experts, ws.cursor, ws.perm);
  if (cuda_failed(err, err_len, "scatter_kernel")) return 1;
  if (ids_given) {  // only caller-given ids can be out of range; the router's never are
    zero_invalid_kernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(ids, tokens, e.num_experts, e.out, y,
                                                                            static_cast<int>(sizeof(TX)));
    if (cuda_failed(err, err_len, "zero_invalid_kernel")) return 1;
  }
  const dim3 grid(static_cast<unsigned>((e.out + kTileRows - 1) / kTileRows),
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
    case SE_I8: return dispatch_format<TX, Int8Codes>(s, e, xt, tokens, ids, ids_given, yt, gemv, ws, stream, err, err_len);
    case SE_I4: return dispatch_format<TX, Int4Codes>(s, e, xt, tokens, ids, ids_given, yt, gemv, ws, stream, err, err_len);
    default: return dispatch_format<TX, __nv_bfloat16>(s, e, xt, tokens, ids, ids_given, yt, gemv, ws, stream, err, err_len);
  }
}

// Router: partial scores per (split, token), then one warp per token sums them and takes the argmin.
int launch_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in, int64_t K, const float* G,
                 const float* b, int32_t* ids, float* partial, cudaStream_t stream, char* err, size_t err_len) {
  const int64_t splits = se_index::route_splits(in, tokens), chunk = se_index::route_chunk(in, splits);
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(splits));
  if (x_dtype == SE_F32) {
    route_partial_kernel<float><<<grid, kBlock, 0, stream>>>(static_cast<const float*>(x), in, K, chunk, G, partial);
  } else {
    route_partial_kernel<__half><<<grid, kBlock, 0, stream>>>(static_cast<const __half*>(x), in, K, chunk, G, partial);
  }
  if (cuda_failed(err, err_len, "route_partial_kernel")) return 1;
  const unsigned blocks = static_cast<unsigned>((tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  route_argmin_kernel<<<blocks, kBlock, 0, stream>>>(partial, tokens, splits, K, b, ids);
  return cuda_failed(err, err_len, "route_argmin_kernel");
}

// The caller's workspace carved, or an error naming the size it needs.
int carve_workspace(void* workspace, size_t workspace_size, int64_t tokens, int64_t K, Workspace* ws, char* err,
                    size_t err_len) {
  const size_t need = carve(nullptr, tokens, K, ws);
  if (!workspace || workspace_size < need) {
    if (err && err_len)
      std::snprintf(err, err_len, "workspace of %zu bytes is too small: se_cuda_workspace_size says %zu",
                    workspace_size, need);
    return 1;
  }
  carve(workspace, tokens, K, ws);
  return 0;
}

}  // namespace se_cuda

extern "C" SE_API size_t se_cuda_workspace_size(int64_t tokens, int64_t num_experts) {
  se_cuda::Workspace ws{};
  return se_cuda::carve(nullptr, tokens, num_experts, &ws);
}

extern "C" SE_API int se_cuda_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in, int64_t K,
                                    const float* G, const float* b, int32_t* ids, void* workspace,
                                    size_t workspace_size, se_cuda_stream stream, char* err, size_t err_len) {
  using namespace se_cuda;
  if (tokens <= 0) return 0;
  if (x_dtype != SE_F32 && x_dtype != SE_F16) return fail(err, err_len, "x must be fp32 or fp16");
  Workspace ws{};
  if (carve_workspace(workspace, workspace_size, tokens, K, &ws, err, err_len)) return 1;
  return launch_route(x, x_dtype, tokens, in, K, G, b, ids, ws.route_partial, reinterpret_cast<cudaStream_t>(stream),
                      err, err_len);
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
  if (s->value_dtype < SE_F32 || s->value_dtype > SE_I4) return fail(err, err_len, "unknown value dtype");
  const bool quantized = s->value_dtype == SE_I8 || s->value_dtype == SE_I4;
  if (quantized && (!s->scales || s->group_size < 1 || s->group_size > s->in_features))
    return fail(err, err_len, "int8/int4 values need scales and a group_size in [1, in_features]");
  if (s->in_features > 65536 && s->format == SE_CSR16)
    return fail(err, err_len, "csr16 needs in_features <= 65536");
  if (tokens <= 0) return 0;
  if (gemv_max_tokens <= 0) gemv_max_tokens = SE_CUDA_DEFAULT_GEMV_MAX_TOKENS;
  const bool gemv = tokens <= gemv_max_tokens;
  Workspace ws{};
  const bool needs_workspace = !gemv || !ids_in;  // the grouped path's plan, or the router's partial scores
  if (needs_workspace && carve_workspace(workspace, workspace_size, tokens, s->num_experts, &ws, err, err_len))
    return 1;
  const int32_t* ids = ids_in;
  if (!ids) {
    int32_t* routed = ids_out ? ids_out : ws.ids;
    if (launch_route(x, x_dtype, tokens, s->in_features, s->num_experts, G, b, routed, ws.route_partial, stream, err,
                     err_len))
      return 1;
    ids = routed;
  } else if (ids_out && ids_out != ids_in) {
    if (cuda_error(cudaMemcpyAsync(ids_out, ids_in, sizeof(int32_t) * tokens, cudaMemcpyDeviceToDevice, stream), err,
                   err_len, "cudaMemcpyAsync"))
      return 1;
  }
  const int64_t groups = quantized ? se_index::scale_groups(s->in_features, s->group_size) : 0;
  const Experts e{s->values,       s->indices,      s->row_ptr, s->bias,       s->num_experts, s->out_features,
                  s->in_features,  s->nnz,          s->scales,  s->group_size, groups};
  const bool given = ids_in != nullptr;
  return x_dtype == SE_F32 ? dispatch_values<float>(*s, e, x, tokens, ids, given, y, gemv, ws, stream, err, err_len)
                           : dispatch_values<__half>(*s, e, x, tokens, ids, given, y, gemv, ws, stream, err, err_len);
}
