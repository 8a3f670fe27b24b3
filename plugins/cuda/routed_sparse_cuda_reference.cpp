// CPU reference of the CUDA kernels (se_cuda_kernels.h): the same function, computed with the
// same indexing helpers and the same decomposition (router feature splits, thread strides and
// expert chunks; lane-per-word bitmap GEMV warps; grouped tiles of <= 32 tokens x 64 rows decoded
// 64 columns per step; int8/int4 codes times their group's scale), one emulated lane at a time.
// csr16 GEMV lanes stride one value at a time here, and the device's 16-byte vectors and 64-token
// tiles of the grouped kernel take the same products in another order. CI has no GPU; this is
// how the kernels' indexing is exercised there.
#include <algorithm>
#include <cstdio>
#include <limits>
#include <vector>

#include "se_half.h"
#include "se_cuda_kernels.h"
#include "se_sparse_index.h"

namespace se_cuda_ref {

using se_index::kTileCols;
using se_index::kTileRows;
using se_index::kTileTokens;
using se_index::kWarp;

using se_index::kRouteChunk;
using se_index::kRouteThreads;

float load(const void* p, int32_t dtype, int64_t i) {
  const auto* h = static_cast<const uint16_t*>(p);
  if (dtype == SE_F32) return static_cast<const float*>(p)[i];
  return dtype == SE_F16 ? se_half::f16_to_f32(h[i]) : se_half::bf16_to_f32(h[i]);
}

bool quantized(const se_experts& e) { return e.value_dtype == SE_I8 || e.value_dtype == SE_I4; }

// Kept weight p of flattened row `row`, at column `col`: the stored float, or code * the scale of
// its (row, group), as the device decodes it (the product in fp32, exact for int8/int4 codes).
float weight(const se_experts& e, int64_t p, int64_t row, int64_t col) {
  if (!quantized(e)) return load(e.values, e.value_dtype, p);
  const bool int4 = e.value_dtype == SE_I4;
  const uint8_t byte = static_cast<const uint8_t*>(e.values)[se_index::code_byte_index(int4, p)];
  const int64_t groups = se_index::scale_groups(e.in_features, e.group_size);
  const float scale = se_half::f16_to_f32(e.scales[se_index::scale_index(row, col, groups, e.group_size)]);
  return static_cast<float>(se_index::code_of_byte(byte, int4, p)) * scale;
}

void store(void* p, int32_t dtype, int64_t i, float v) {
  if (dtype == SE_F32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = se_half::f32_to_f16(v);
  }
}

// Device: route_splits(in, tokens) blocks per token, each summing a contiguous chunk of features
// (thread i takes chunk columns i, i+256, ...) for kRouteChunk experts per pass; then, per expert,
// the splits' sums in split order plus the bias, and the argmin with ties to the lowest expert.
int32_t route_token(const void* x, int32_t x_dtype, int64_t t, int64_t tokens, int64_t in, int64_t K, const float* G,
                    const float* b) {
  const int64_t splits = se_index::route_splits(in, tokens), chunk = se_index::route_chunk(in, splits);
  std::vector<float> scores(static_cast<size_t>(K), 0.0f);
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t i0 = s * chunk, i1 = std::min(in, i0 + chunk);
    for (int64_t k0 = 0; k0 < K; k0 += kRouteChunk) {
      std::vector<float> thread_acc(static_cast<size_t>(kRouteThreads) * kRouteChunk, 0.0f);
      for (int th = 0; th < kRouteThreads; ++th) {
        for (int64_t i = i0 + th; i < i1; i += kRouteThreads) {
          const float xi = load(x, x_dtype, t * in + i);
          for (int j = 0; j < kRouteChunk && k0 + j < K; ++j)
            thread_acc[th * kRouteChunk + j] += xi * G[i * K + k0 + j];
        }
      }
      for (int j = 0; j < kRouteChunk && k0 + j < K; ++j) {
        float sum = 0.0f;
        for (int th = 0; th < kRouteThreads; ++th) sum += thread_acc[th * kRouteChunk + j];
        scores[k0 + j] += sum;
      }
    }
  }
  float best = std::numeric_limits<float>::infinity();
  int32_t best_k = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (scores[k] + b[k] < best) {
      best = scores[k] + b[k];
      best_k = static_cast<int32_t>(k);
    }
  }
  return best_k;
}

// Device GEMV: one warp per (token, row). Bitmap (lane per word): lane l walks the set bits of
// words l, l+32, ..., its values placed after the kept weights of the words before; csr16: lanes
// stride over the values.
float gemv_row(const se_experts& e, const void* x, int32_t x_dtype, int64_t t, int64_t row) {
  const int64_t in = e.in_features, rows = e.num_experts * e.out_features;
  const int64_t start = e.row_ptr[row], end = se_index::row_end(e.row_ptr, row, rows, e.nnz);
  float lane_acc[kWarp] = {};
  if (e.format == SE_BITMAP) {
    const int64_t row_bytes = se_index::bitmap_row_bytes(in), words = se_index::bitmap_row_words(in);
    const auto* bits = static_cast<const uint8_t*>(e.indices) + row * row_bytes;
    int64_t base = start;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t word = se_index::bitmap_word(bits, w, row_bytes);
      const int lane = static_cast<int>(w % kWarp);
      for (int64_t p = base; word != 0; ++p, word &= word - 1u) {
        const int c = se_index::lowest_bit(word);
        lane_acc[lane] += weight(e, p, row, w * kWarp + c) * load(x, x_dtype, t * in + w * kWarp + c);
      }
      base += se_index::popcount32(se_index::bitmap_word(bits, w, row_bytes));
    }
  } else {
    const auto* cols = static_cast<const uint16_t*>(e.indices);
    for (int lane = 0; lane < kWarp; ++lane) {
      for (int64_t p = start + lane; p < end; p += kWarp) {
        lane_acc[lane] += weight(e, p, row, cols[p]) * load(x, x_dtype, t * in + cols[p]);
      }
    }
  }
  float acc = 0.0f;
  for (float a : lane_acc) acc += a;
  return acc + (e.bias ? e.bias[row] : 0.0f);
}

// Device grouped block: kTileRows rows of one expert times a tile of <= 32 tokens. Each step
// decodes kTileCols columns of every row (lane-per-column bitmap words; csr16 windows that
// advance the row's cursor) into a dense block, rounded to fp16 where the device uses tensor cores
// (fp16 activations with fp16/bf16 values, exact for weights of LLM range, or with int8/int4
// codes times their scale, rounded once), and multiplies it with the tokens' activations.
void grouped_tile(const se_experts& e, const void* x, int32_t x_dtype, const int32_t* perm, const int32_t* tile,
                  void* y) {
  const int64_t in = e.in_features, out = e.out_features, rows = e.num_experts * out;
  const int32_t expert = tile[0], first = tile[1], len = tile[2];
  const int64_t row_bytes = se_index::bitmap_row_bytes(in), words = se_index::bitmap_row_words(in);
  const bool tensor_cores = x_dtype == SE_F16 && e.value_dtype != SE_F32;  // fp16 operands on the device
  const auto round_w = [&](float v) { return tensor_cores ? se_half::f16_to_f32(se_half::f32_to_f16(v)) : v; };
  for (int64_t r0 = 0; r0 < out; r0 += kTileRows) {
    std::vector<float> acc(static_cast<size_t>(kTileRows) * kTileTokens, 0.0f), w(kTileCols);
    std::vector<int64_t> p(kTileRows), end(kTileRows);
    for (int64_t i = 0; i < kTileRows && r0 + i < out; ++i) {
      p[i] = e.row_ptr[expert * out + r0 + i];
      end[i] = se_index::row_end(e.row_ptr, expert * out + r0 + i, rows, e.nnz);
    }
    for (int64_t c0 = 0; c0 < in; c0 += kTileCols) {
      for (int64_t i = 0; i < kTileRows && r0 + i < out; ++i) {
        std::fill(w.begin(), w.end(), 0.0f);
        if (e.format == SE_BITMAP) {
          const auto* bits = static_cast<const uint8_t*>(e.indices) + (expert * out + r0 + i) * row_bytes;
          for (int h = 0; h < 2; ++h) {
            const int64_t wi = c0 / kWarp + h;
            const uint32_t word = wi < words ? se_index::bitmap_word(bits, wi, row_bytes) : 0u;
            for (int lane = 0; lane < kWarp; ++lane) {
              if (se_index::lane_has(word, lane))
                w[h * kWarp + lane] = weight(e, p[i] + se_index::lane_value_offset(word, lane), expert * out + r0 + i,
                                             wi * kWarp + lane);
            }
            p[i] += se_index::popcount32(word);
          }
        } else {
          const auto* cols = static_cast<const uint16_t*>(e.indices);
          int64_t taken = 0;
          for (int64_t q = p[i]; q < p[i] + kTileCols; ++q) {
            const uint16_t c = q < end[i] ? cols[q] : 0;
            if (!se_index::in_window(q, end[i], c, c0)) continue;
            w[c - c0] = weight(e, q, expert * out + r0 + i, c);
            ++taken;
          }
          p[i] += taken;
        }
        for (int tok = 0; tok < len; ++tok) {
          float s = 0.0f;
          for (int64_t col = 0; col < kTileCols && c0 + col < in; ++col)
            s += round_w(w[col]) * load(x, x_dtype, perm[first + tok] * in + c0 + col);
          acc[i * kTileTokens + tok] += s;
        }
      }
    }
    for (int64_t i = 0; i < kTileRows && r0 + i < out; ++i) {
      const float bias = e.bias ? e.bias[expert * out + r0 + i] : 0.0f;
      for (int tok = 0; tok < len; ++tok)
        store(y, x_dtype, perm[first + tok] * out + r0 + i, acc[i * kTileTokens + tok] + bias);
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
  if (quantized(*e) && (!e->scales || e->group_size < 1)) {
    std::snprintf(err, err_len, "int8/int4 values need scales and a group_size >= 1");
    return 1;
  }
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    ids[t] = ids_in ? ids_in[t] : route_token(x, x_dtype, t, tokens, e->in_features, K, G, b);
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
