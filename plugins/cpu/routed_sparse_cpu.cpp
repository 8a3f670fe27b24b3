// CPU implementation of se_kernels.h.
//
// Tokens are routed (fp32 scores), grouped by expert (counting sort), and each group runs one
// sparse-times-dense product:
//  * 1-2 tokens in a group (decode): one sparse dot product per (token, row);
//  * more tokens (prefill): the group's activations are transposed to [in, tokens] so every kept
//    weight is broadcast once and multiplied into a tile of up to 32 tokens (vector FMAs).
// Work items (expert group x block of rows) are spread over an OpenMP team or the host's thread
// pool (se_routed_sparse_matmul_on: ONNX Runtime's intra-op pool); small problems run serially.
// On x86 an AVX2/FMA/F16C path is chosen at run time (bitmap bytes expand 8 values with a
// 256-entry table of byte-shuffle controls: one in-lane vpshufb per byte for fp32 values, one
// pshufb for 16-bit ones; csr16 uses gathers; the decode loops prefetch the weight streams), and
// where the CPU has AVX-512F the decode products and the 64-token prefill tile use
// routed_sparse_avx512.h (vexpandps: 16 columns per instruction, no table; 16-lane FMAs);
// aarch64 decodes bitmap rows with NEON table lookups (routed_sparse_neon.h) and runs the portable
// code elsewhere; every other machine runs the portable path, which the compiler vectorizes over
// the token tile.
#include "routed_sparse_avx2.h"
#include "routed_sparse_common.h"
#include "routed_sparse_portable.h"

namespace se_cpu {

// ------------------------------------------------------------------ driver

// One row of int8/int4 codes times x (bias not included): bitmap rows on the widest vector path
// when the group size is a power of two >= 16, everything else scalar per group (se_quant.h).
template <int VD>
float dot_quant_row(const se_experts* e, int64_t k, int64_t r, int64_t b, const float* x, [[maybe_unused]] Isa isa) {
  const se_quant::RowScales q = se_quant::row_scales(e, k, r);
  const int64_t end = row_end(e, k, r);
  if (e->format == SE_CSR16)
    return se_quant::dot_csr_portable<VD>(e->values, static_cast<const uint16_t*>(e->indices), b, end, x, q);
  const int64_t nbytes = (e->in_features + 7) / 8;
  const uint8_t* bits = static_cast<const uint8_t*>(e->indices) + (k * e->out_features + r) * nbytes;
  if (q.shift >= 4 && se_quant::row_groups(e) <= se_quant::kMaxVectorGroups) {
#if SE_X86
    if (isa == Isa::Avx512 && cpu_has_avx512_vbmi2())
      return se_avx512::dot_bitmap_quant64<VD>(e->values, e->nnz, e->in_features, bits, nbytes, b, end, x, q);
    if (isa == Isa::Avx512)
      return se_avx512::dot_bitmap_quant<VD>(e->values, e->nnz, e->in_features, bits, nbytes, b, end, x, q);
    if (isa == Isa::Avx2) return dot_bitmap_quant_avx2<VD>(e, bits, nbytes, b, end, x, q);
#elif SE_NEON
    if (isa == Isa::Neon)
      return se_neon::dot_bitmap_quant<VD>(e->values, e->nnz, e->in_features, bits, nbytes, b, end, x, q);
#endif
  }
  return se_quant::dot_bitmap_portable<VD>(e->values, bits, nbytes, b, x, q);
}

template <int VD>
void run_groups(const Problem& pb, const Executor& exec) {
  const se_experts* e = pb.e;
  const int64_t K = e->num_experts, out = e->out_features, in = e->in_features;
  [[maybe_unused]] const Isa isa = cpu_isa();  // unused off x86
  [[maybe_unused]] const bool avx2 = isa != Isa::Portable;
  const uint8_t* bitmap = e->format == SE_BITMAP ? static_cast<const uint8_t*>(e->indices) : nullptr;

  // transposed, zero-padded activations for every group that takes the prefill path
  std::vector<int64_t> ld(K, 0), xt_off(K, 0), width(K, kTile);
  int64_t xt_size = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = pb.start[k + 1] - pb.start[k];
    if (n > kGemvMaxTokens) {
      width[k] = n <= 2 * kSmallTile ? kSmallTile : kTile;
      ld[k] = (n + width[k] - 1) / width[k] * width[k];
      xt_off[k] = xt_size;
      xt_size += ld[k] * in;
    }
  }
  // 64-byte aligned: a token tile's column is 64 floats, so every vector load of it stays inside
  // one cache line (from a plain vector, 16-byte aligned, every 64-byte load straddled two)
  std::vector<float> xt_storage(static_cast<size_t>(xt_size) + 16, 0.f);
  float* const xt = xt_storage.data() + (16 - (reinterpret_cast<uintptr_t>(xt_storage.data()) / 4) % 16) % 16;
  struct Item { int64_t k, r0, r1, t0; };
  std::vector<Item> items;
  std::vector<int64_t> row_bytes(K, 0);  // mean bytes of a row of every expert that decodes
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = pb.start[k + 1] - pb.start[k];
    if (n == 0) continue;
    const int64_t tiles = n > kGemvMaxTokens ? ld[k] / width[k] : 1;
    if (n <= kGemvMaxTokens) row_bytes[k] = mean_row_bytes(e, k);
    const int64_t rows = n > kGemvMaxTokens ? kRowsPerItem : decode_rows_per_item(out, row_bytes[k]);
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t r0 = 0; r0 < out; r0 += rows) items.push_back({k, r0, std::min(out, r0 + rows), t * width[k]});
  }

  auto transpose = [&](int64_t k) {
    if (!ld[k]) return;
      float* dst = xt + xt_off[k];
      for (int64_t i = pb.start[k]; i < pb.start[k + 1]; ++i) {
        const float* src = pb.x + static_cast<int64_t>(pb.order[i]) * in;
        const int64_t t = i - pb.start[k];
        const int64_t w = width[k];
        float* tile = dst + (t / w) * in * w + t % w;  // tile-major: [tile][c][w]
        for (int64_t c = 0; c < in; ++c) tile[c * w] = src[c];
      }
  };
  auto run_item = [&](int64_t it) {
      const Item item = items[it];
      const int64_t k = item.k;
      const int64_t r1 = item.r1;
      const int64_t nbytes = (in + 7) / 8;
      const float* bias = e->bias ? e->bias + k * out : nullptr;
      if (!ld[k]) {  // decode: sparse dot products
#if SE_X86
        constexpr int kRows = se_avx512::kDecodeRows;
        const int64_t len = (r1 - item.r0) / kRows;  // rows per stream of a lock-step group
        const bool far = len * row_bytes[k] >= kFarStreamBytes;
        constexpr bool quantized = se_values::kQuantized<VD>;  // quantized rows go one by one
        const bool lock_step = !quantized && isa == Isa::Avx512 && bitmap && (far || in <= kNeighbourRowsMaxIn);
        const bool far_avx2 = !quantized && isa == Isa::Avx2 && bitmap && far;
#endif
        for (int64_t i = pb.start[k]; i < pb.start[k + 1]; ++i) {
          const int64_t tok = pb.order[i];
          const float* xv = pb.x + tok * in;
          float* yv = pb.y + tok * out;
          int64_t r = item.r0;
#if SE_X86
          if (lock_step && !far) {  // four neighbouring rows: row j ends where row j + 1 begins
            for (; r + kRows <= r1; r += kRows) {
              int64_t p[kRows + 1];
              for (int j = 0; j < kRows; ++j) p[j] = row_begin(e, k, r + j);
              p[kRows] = row_end(e, k, r + kRows - 1);
              se_avx512::dot_bitmap_rows<VD>(e->values, e->nnz, in, bitmap + (k * out + r) * nbytes, nbytes, nbytes,
                                             p, p + 1, xv, yv + r);
              if (bias)
                for (int j = 0; j < kRows; ++j) yv[r + j] += bias[r + j];
            }
          } else if (lock_step || far_avx2) {  // row q of each quarter of the item
            static_assert(kRows == kAvx2LockStepRows, "both paths split an item into the same quarters");
            for (int64_t q = 0; q < len; ++q) {
              int64_t p[kRows], end[kRows];
              float dots[kRows];
              for (int j = 0; j < kRows; ++j) {
                p[j] = row_begin(e, k, item.r0 + j * len + q);
                end[j] = row_end(e, k, item.r0 + j * len + q);
              }
              const uint8_t* first = bitmap + (k * out + item.r0 + q) * nbytes;
              if (far_avx2)
                dot_bitmap_rows_avx2<VD>(e, first, len * nbytes, nbytes, p, end, xv, dots);
              else
                se_avx512::dot_bitmap_rows<VD>(e->values, e->nnz, in, first, len * nbytes, nbytes, p, end, xv, dots);
              for (int j = 0; j < kRows; ++j) {
                const int64_t row = item.r0 + j * len + q;
                yv[row] = bias ? dots[j] + bias[row] : dots[j];
              }
            }
            r = item.r0 + kRows * len;
          }
#endif
          for (; r < r1; ++r) {
            const int64_t b = row_begin(e, k, r);
            float s;
            if constexpr (se_values::kQuantized<VD>) {
              s = dot_quant_row<VD>(e, k, r, b, xv, isa);
            } else if (e->format == SE_CSR16) {
#if SE_X86
              const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
              s = isa == Isa::Avx512 ? se_avx512::dot_csr16<VD>(e->values, cols, b, row_end(e, k, r), xv)
                  : avx2             ? dot_csr_avx2<VD>(e, b, row_end(e, k, r), xv)
                                     : dot_csr_portable<VD>(e, b, row_end(e, k, r), xv);
#else
              s = dot_csr_portable<VD>(e, b, row_end(e, k, r), xv);
#endif
            } else {
              const uint8_t* bits = bitmap + (k * out + r) * nbytes;
#if SE_X86
              s = isa == Isa::Avx512
                      ? se_avx512::dot_bitmap<VD>(e->values, e->nnz, in, bits, nbytes, b, row_end(e, k, r), xv)
                  : avx2 ? dot_bitmap_avx2<VD>(e, bits, nbytes, b, row_end(e, k, r), xv)
                         : dot_bitmap_portable<VD>(e, bits, nbytes, b, xv);
#elif SE_NEON
              s = isa == Isa::Neon ? se_neon::dot_bitmap<VD>(e->values, e->nnz, in, bits, nbytes, b, row_end(e, k, r), xv)
                                   : dot_bitmap_portable<VD>(e, bits, nbytes, b, xv);
#else
              s = dot_bitmap_portable<VD>(e, bits, nbytes, b, xv);
#endif
            }
            yv[r] = bias ? s + bias[r] : s;
          }
        }
        return;
      }
      const float* xtk = xt + xt_off[k] + item.t0 * in;
      const int64_t w = width[k];
      const int64_t n = std::min(w, pb.start[k + 1] - pb.start[k] - item.t0);
      const int32_t* toks = pb.order + pb.start[k] + item.t0;
      const int64_t rows = r1 - item.r0;
      alignas(32) float acc[kRowsPerItem][kTile];
      for (int64_t i = 0; i < rows; ++i) std::fill(acc[i], acc[i] + w, 0.f);
      int64_t pos[kRowsPerItem], ends[kRowsPerItem];
      for (int64_t i = 0; i < rows; ++i) {
        pos[i] = row_begin(e, k, item.r0 + i);
        ends[i] = row_end(e, k, item.r0 + i);
      }
      // quantized values: the item's scales widened to fp32 once (the tile looks one up per kept
      // weight; a software fp16 conversion each time made a 128-token prompt 2.7x the dense time)
      [[maybe_unused]] float* wide = nullptr;
      [[maybe_unused]] int64_t groups = 0;
      if constexpr (se_values::kQuantized<VD>) {
        thread_local std::vector<float> wide_scales;
        groups = se_quant::row_groups(e);
        wide_scales.resize(static_cast<size_t>(rows * groups));
        const uint16_t* first = se_quant::row_scales(e, k, item.r0).scales;
        for (int64_t j = 0; j < rows * groups; ++j) wide_scales[j] = se_half::f16_to_f32(first[j]);
        wide = wide_scales.data();
      }
      for (int64_t c0 = 0; c0 < in; c0 += kColBlock) {  // the tile's columns stay in L1 across rows
        const int64_t c1 = std::min(in, c0 + kColBlock);
        for (int64_t i = 0; i < rows; ++i) {
          const uint8_t* bits = bitmap ? bitmap + (k * out + item.r0 + i) * nbytes : nullptr;
          if constexpr (se_values::kQuantized<VD>) {
            se_quant::RowScales q = se_quant::row_scales(e, k, item.r0 + i);
            q.wide = wide + i * groups;
#if SE_X86
            if (avx2) {
              if (w == kTile)
                row_block_avx2<VD, kTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i], &q);
              else
                row_block_avx2<VD, kSmallTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i], &q);
              continue;
            }
#endif
            if (w == kTile)
              row_block_portable<VD, kTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i], &q);
            else
              row_block_portable<VD, kSmallTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i], &q);
            continue;
          } else {
#if SE_X86
          if (avx2) {
            if (w == kTile && isa == Isa::Avx512)
              row_block_avx2<VD, kTile, true>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
            else if (w == kTile)
              row_block_avx2<VD, kTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
            else
              row_block_avx2<VD, kSmallTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
            continue;
          }
#endif
          if (w == kTile)
            row_block_portable<VD, kTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
          else
            row_block_portable<VD, kSmallTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float bv = bias ? bias[item.r0 + i] : 0.f;
        for (int64_t t = 0; t < n; ++t) pb.y[static_cast<int64_t>(toks[t]) * out + item.r0 + i] = acc[i][t] + bv;
      }
  };
  if (xt_size) exec.for_each(K, transpose);
  exec.for_each(static_cast<int64_t>(items.size()), run_item);
}

void fail(char* err, size_t len, const std::string& msg) {
  if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}

int resolve_threads(int32_t threads) {
#if defined(_OPENMP)
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

void to_f32(const void* x, int32_t dtype, int64_t count, std::vector<float>& buf, const float** out) {
  if (dtype == SE_F32) {
    *out = static_cast<const float*>(x);
    return;
  }
  buf.resize(static_cast<size_t>(count));
  const uint16_t* h = static_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < count; ++i) buf[i] = f16_to_f32(h[i]);
  *out = buf.data();
}

void route_f32(const float* x, int64_t tokens, int64_t in, int64_t K, const float* g, const float* b, int32_t* ids,
               const Executor& exec) {
  const bool avx2 = cpu_has_avx2();
  auto route_token = [&](int64_t t) {
    float stack_scores[64];  // no allocation per token for the usual K <= 64
    std::vector<float> heap_scores(K > 64 ? K : 0);
    float* s = K > 64 ? heap_scores.data() : stack_scores;
    std::copy(b, b + K, s);
    const float* xv = x + t * in;
    if (!(avx2 && route_scores_fast(xv, in, g, K, s))) {
      for (int64_t i = 0; i < in; ++i) {
        const float xi = xv[i];
        const float* gi = g + i * K;
        for (int64_t k = 0; k < K; ++k) s[k] += xi * gi[k];
      }
    }
    int64_t best = 0;
    for (int64_t k = 1; k < K; ++k)
      if (s[k] < s[best]) best = k;
    ids[t] = static_cast<int32_t>(best);
  };
  exec.serial_if(tokens * in * K < kSerialWork).for_each(tokens, route_token);
}

Executor openmp(int32_t threads) { return Executor{nullptr, nullptr, resolve_threads(threads)}; }

int routed_sparse_matmul(const se_experts* e, const float* router_weight, const float* router_bias, const void* x,
                         int32_t x_dtype, int64_t tokens, const int32_t* expert_ids_in, int32_t* expert_ids_out,
                         void* y, const Executor& exec, char* err, size_t err_len,
                         const DenseGroups& dense) {
  if (x_dtype != SE_F32 && x_dtype != SE_F16) return fail(err, err_len, "x must be fp32 or fp16"), 1;
  if (tokens < 0) return fail(err, err_len, "negative token count"), 1;
  if (tokens == 0) return 0;
  const int64_t K = e->num_experts, in = e->in_features, out = e->out_features;
  std::vector<float> xbuf;
  const float* x32;
  to_f32(x, x_dtype, tokens * in, xbuf, &x32);
  std::vector<int32_t> ids_buf;
  const int32_t* ids = expert_ids_in;
  if (ids) {
    for (int64_t t = 0; t < tokens; ++t)
      if (ids[t] < 0 || ids[t] >= K)
        return fail(err, err_len, "expert id " + std::to_string(ids[t]) + " at token " + std::to_string(t) +
                                      " is outside [0, " + std::to_string(K) + ")"), 1;
  } else {
    int32_t* dst = expert_ids_out;
    if (!dst) {
      ids_buf.resize(static_cast<size_t>(tokens));
      dst = ids_buf.data();
    }
    route_f32(x32, tokens, in, K, router_weight, router_bias, dst, exec);
    ids = dst;
  }
  if (expert_ids_out && expert_ids_out != ids) std::memcpy(expert_ids_out, ids, sizeof(int32_t) * tokens);
  // counting sort of tokens by expert
  std::vector<int64_t> start(K + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) ++start[ids[t] + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  std::vector<int32_t> order(static_cast<size_t>(tokens));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < tokens; ++t) order[fill[ids[t]]++] = static_cast<int32_t>(t);

  std::vector<float> ybuf;
  float* y32 = x_dtype == SE_F32 ? static_cast<float*>(y) : (ybuf.resize(static_cast<size_t>(tokens * out)), ybuf.data());
  if (dense.on() && tokens >= dense.min_tokens && run_dense_groups(e, x32, y32, order, start, dense, exec, err, err_len))
    return 1;
  Problem pb{e, x32, y32, order.data(), start.data(), (in + 7) / 8};
  const Executor run = exec.serial_if(tokens * (e->nnz / K) < kSerialWork);
  switch (e->value_dtype) {
    case SE_F32: run_groups<SE_F32>(pb, run); break;
    case SE_F16: run_groups<SE_F16>(pb, run); break;
    case SE_I8: run_groups<SE_I8>(pb, run); break;
    case SE_I4: run_groups<SE_I4>(pb, run); break;
    default: run_groups<SE_BF16>(pb, run); break;
  }
  if (x_dtype == SE_F16) {
    uint16_t* yh = static_cast<uint16_t*>(y);
    for (int64_t i = 0; i < tokens * out; ++i) yh[i] = f32_to_f16(y32[i]);
  }
  return 0;
}

int check_experts(const se_experts* e, char* err, size_t err_len) {
  try {
    if (!e) return fail(err, err_len, "experts pointer is null"), 1;
    if (e->format != SE_BITMAP && e->format != SE_CSR16) return fail(err, err_len, "format must be bitmap or csr16"), 1;
    if (e->value_dtype < SE_F32 || e->value_dtype > SE_I4)
      return fail(err, err_len, "values must be fp32, fp16, bf16, int8 or int4"), 1;
    if (e->value_dtype == SE_I8 || e->value_dtype == SE_I4) {
      if (!e->scales) return fail(err, err_len, "int8/int4 values need their scales"), 1;
      if (e->group_size < 1 || e->group_size > e->in_features)
        return fail(err, err_len, "group_size " + std::to_string(e->group_size) + " is outside [1, in_features]"), 1;
      const int64_t count = e->num_experts * e->out_features * ((e->in_features + e->group_size - 1) / e->group_size);
      for (int64_t i = 0; i < count; ++i)
        if ((e->scales[i] & 0x7c00u) == 0x7c00u)
          return fail(err, err_len, "scale " + std::to_string(i) + " is not finite (corrupt scales)"), 1;
    }
    if (e->num_experts < 1 || e->out_features < 1 || e->in_features < 1)
      return fail(err, err_len, "experts, out_features and in_features must be >= 1"), 1;
    if (e->format == SE_CSR16 && e->in_features > 65536)
      return fail(err, err_len, "csr16 holds at most 65536 input features"), 1;
    const int64_t rows = e->num_experts * e->out_features;
    const int64_t nbytes = (e->in_features + 7) / 8;
    if (e->nnz < 0 || e->nnz > rows * e->in_features) return fail(err, err_len, "values has more entries than the experts hold"), 1;
    if (e->format == SE_BITMAP && e->indices_len != rows * nbytes)
      return fail(err, err_len, "bitmap indices must be [K, out, ceil(in/8)] bytes"), 1;
    if (e->format == SE_CSR16 && e->indices_len != e->nnz)
      return fail(err, err_len, "csr16 indices must hold one column per value"), 1;
    int64_t prev = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = e->row_ptr[r];
      if (b < prev || b > e->nnz)
        return fail(err, err_len, "row_ptr entry " + std::to_string(r) + " is out of order or past the values"), 1;
      if (r == 0 && b != 0) return fail(err, err_len, "row_ptr must start at 0"), 1;
      prev = b;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = e->row_ptr[r];
      const int64_t end = r + 1 < rows ? e->row_ptr[r + 1] : e->nnz;
      if (e->format == SE_CSR16) {
        const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
        for (int64_t j = b; j < end; ++j) {
          if (cols[j] >= e->in_features)
            return fail(err, err_len, "csr16 column " + std::to_string(cols[j]) + " >= in_features " +
                                          std::to_string(e->in_features)), 1;
          if (j > b && cols[j] <= cols[j - 1]) return fail(err, err_len, "csr16 columns of a row must increase"), 1;
        }
      } else {
        const uint8_t* bits = static_cast<const uint8_t*>(e->indices) + r * nbytes;
        int64_t count = 0;
        for (int64_t i = 0; i < nbytes; ++i) count += __builtin_popcount(bits[i]);
        const int tail = static_cast<int>(e->in_features % 8);
        if (tail && (bits[nbytes - 1] >> tail))
          return fail(err, err_len, "bitmap marks columns past in_features"), 1;
        if (count != end - b)
          return fail(err, err_len, "bitmap row " + std::to_string(r) + " marks " + std::to_string(count) +
                                        " weights but row_ptr gives " + std::to_string(end - b)), 1;
      }
    }
    return 0;
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

}  // namespace se_cpu
