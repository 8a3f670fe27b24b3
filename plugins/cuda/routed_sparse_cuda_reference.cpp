// CPU reference of the CUDA kernels (se_cuda_kernels.h): the same function, computed with the
// same indexing helpers and the same decomposition (router chunks, GEMV warps with lane value
// offsets, grouped tiles of <= 32 tokens in 128-column chunks), one emulated lane at a time.
// CI has no GPU; this is how the kernels' indexing is exercised there.
#include <cstdio>
#include <limits>
#include <vector>

#include "../cpu/se_half.h"
#include "se_cuda_kernels.h"
#include "se_sparse_index.h"

namespace se_cuda_ref {

using se_index::kWarp;

constexpr int kRouteChunk = 8;    // experts scored per pass (registers per lane on the device)
constexpr int64_t kColChunk = 128;  // columns staged per grouped step (shared memory on the device)

float load(const void* p, int32_t dtype, int64_t i) {
  const auto* h = static_cast<const uint16_t*>(p);
  if (dtype == SE_F32) return static_cast<const float*>(p)[i];
  return dtype == SE_F16 ? se_half::f16_to_f32(h[i]) : se_half::bf16_to_f32(h[i]);
}

void store(void* p, int32_t dtype, int64_t i, float v) {
  if (dtype == SE_F32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = se_half::f32_to_f16(v);
  }
}

// Device: one warp per token; lane l sums columns l, l+32, ...; then a warp reduction per expert.
int32_t route_token(const void* x, int32_t x_dtype, int64_t t, int64_t in, int64_t K, const float* G, const float* b) {
  float best = std::numeric_limits<float>::infinity();
  int32_t best_k = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kRouteChunk) {
    float lane_acc[kWarp][kRouteChunk] = {};
    for (int lane = 0; lane < kWarp; ++lane) {
      for (int64_t i = lane; i < in; i += kWarp) {
        const float xi = load(x, x_dtype, t * in + i);
        for (int j = 0; j < kRouteChunk && k0 + j < K; ++j) lane_acc[lane][j] += xi * G[i * K + k0 + j];
      }
    }
    for (int j = 0; j < kRouteChunk && k0 + j < K; ++j) {
      float s = 0.0f;
      for (int lane = 0; lane < kWarp; ++lane) s += lane_acc[lane][j];
      s += b[k0 + j];
      if (s < best) {
        best = s;
        best_k = static_cast<int32_t>(k0 + j);
      }
    }
  }
  return best_k;
}

// Device GEMV: one warp per (token, row); bitmap words are split over lanes and each lane finds
// its first value from the exclusive prefix of the lanes' popcounts; csr16 strides over values.
float gemv_row(const se_experts& e, const void* x, int32_t x_dtype, int64_t t, int64_t row) {
  const int64_t in = e.in_features, rows = e.num_experts * e.out_features;
  const int64_t start = e.row_ptr[row], end = se_index::row_end(e.row_ptr, row, rows, e.nnz);
  float lane_acc[kWarp] = {};
  if (e.format == SE_BITMAP) {
    const int64_t row_bytes = se_index::bitmap_row_bytes(in), words = se_index::bitmap_row_words(in);
    const auto* bits = static_cast<const uint8_t*>(e.indices) + row * row_bytes;
    int64_t base = start;
    for (int64_t w0 = 0; w0 < words; w0 += kWarp) {
      uint32_t word[kWarp];
      int counts[kWarp];
      for (int lane = 0; lane < kWarp; ++lane) {
        word[lane] = w0 + lane < words ? se_index::bitmap_word(bits, w0 + lane, row_bytes) : 0u;
        counts[lane] = se_index::popcount32(word[lane]);
      }
      for (int lane = 0; lane < kWarp; ++lane) {
        int64_t p = base + se_index::lane_offset(counts, lane);
        for (uint32_t wd = word[lane]; wd != 0; wd &= wd - 1) {
          const int64_t col = (w0 + lane) * 32 + se_index::lowest_bit(wd);
          lane_acc[lane] += load(e.values, e.value_dtype, p++) * load(x, x_dtype, t * in + col);
        }
      }
      base += se_index::lane_offset(counts, kWarp);
    }
  } else {
    const auto* cols = static_cast<const uint16_t*>(e.indices);
    for (int lane = 0; lane < kWarp; ++lane) {
      for (int64_t p = start + lane; p < end; p += kWarp) {
        lane_acc[lane] += load(e.values, e.value_dtype, p) * load(x, x_dtype, t * in + cols[p]);
      }
    }
  }
  float acc = 0.0f;
  for (float a : lane_acc) acc += a;
  return acc + (e.bias ? e.bias[row] : 0.0f);
}

// Device grouped tile: lane = token of the tile; the row's kept weights are walked in column
// order, 128 staged columns at a time, the value pointer carried across chunks.
void grouped_tile(const se_experts& e, const void* x, int32_t x_dtype, const int32_t* perm, const int32_t* tile,
                  void* y) {
  const int64_t in = e.in_features, out = e.out_features, rows = e.num_experts * out;
  const int32_t expert = tile[0], first = tile[1], len = tile[2];
  for (int64_t r = 0; r < out; ++r) {
    const int64_t row = expert * out + r;
    int64_t p = e.row_ptr[row];
    const int64_t end = se_index::row_end(e.row_ptr, row, rows, e.nnz);
    float acc[se_index::kTileTokens] = {};
    for (int64_t c0 = 0; c0 < in; c0 += kColChunk) {
      if (e.format == SE_BITMAP) {
        const int64_t row_bytes = se_index::bitmap_row_bytes(in);
        const auto* bits = static_cast<const uint8_t*>(e.indices) + row * row_bytes;
        for (int64_t w = c0 / 32; w < (c0 + kColChunk) / 32; ++w) {
          for (uint32_t wd = se_index::bitmap_word(bits, w, row_bytes); wd != 0; wd &= wd - 1) {
            const int64_t col = w * 32 + se_index::lowest_bit(wd);
            const float v = load(e.values, e.value_dtype, p++);
            for (int lane = 0; lane < len; ++lane) acc[lane] += v * load(x, x_dtype, perm[first + lane] * in + col);
          }
        }
      } else {
        const auto* cols = static_cast<const uint16_t*>(e.indices);
        for (; p < end && cols[p] < c0 + kColChunk; ++p) {
          const float v = load(e.values, e.value_dtype, p);
          for (int lane = 0; lane < len; ++lane) acc[lane] += v * load(x, x_dtype, perm[first + lane] * in + cols[p]);
        }
      }
    }
    for (int lane = 0; lane < len; ++lane) {
      store(y, x_dtype, perm[first + lane] * out + r, acc[lane] + (e.bias ? e.bias[row] : 0.0f));
    }
  }
}

}  // namespace se_cuda_ref

extern "C" SE_API int se_cuda_reference_matmul(const se_experts* e, const float* G, const float* b, const void* x,
                                               int32_t x_dtype, int64_t tokens, const int32_t* ids_in,
                                               int32_t* ids_out, void* y, int32_t gemv_max_tokens, char* err,
                                               size_t err_len) {
  using namespace se_cuda_ref;
  const int64_t K = e->num_experts, out = e->out_features;
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    ids[t] = ids_in ? ids_in[t] : route_token(x, x_dtype, t, e->in_features, K, G, b);
    if (ids[t] < 0 || ids[t] >= K) {
      std::snprintf(err, err_len, "expert id %d of token %lld is out of range [0, %lld)", ids[t],
                    static_cast<long long>(t), static_cast<long long>(K));
      return 1;
    }
  }
  if (ids_out) std::copy(ids.begin(), ids.end(), ids_out);
  if (gemv_max_tokens <= 0) gemv_max_tokens = SE_CUDA_DEFAULT_GEMV_MAX_TOKENS;
  if (tokens <= gemv_max_tokens) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t r = 0; r < out; ++r) store(y, x_dtype, t * out + r, gemv_row(*e, x, x_dtype, t, ids[t] * out + r));
    }
    return 0;
  }
  // grouped path: count, plan, scatter (stable here; the device's order differs, results do not)
  std::vector<int32_t> counts(K, 0), offsets(K + 1), perm(tokens);
  std::vector<int32_t> tiles(3 * static_cast<size_t>(se_index::max_tiles(tokens, K)));
  for (int32_t id : ids) ++counts[id];
  const int64_t n_tiles = se_index::plan_tiles(counts.data(), K, offsets.data(), tiles.data());
  std::vector<int32_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t t = 0; t < tokens; ++t) perm[cursor[ids[t]]++] = static_cast<int32_t>(t);
  for (int64_t i = 0; i < n_tiles; ++i) grouped_tile(*e, x, x_dtype, perm.data(), &tiles[3 * i], y);
  return 0;
}
