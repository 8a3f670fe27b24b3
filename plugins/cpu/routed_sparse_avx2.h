// AVX2/FMA/F16C kernels of the CPU library (x86 CPUs without AVX-512, and the AVX-512 path's
// prefill tiles). Bitmap bytes expand 8 values with a 256-entry table of byte-shuffle controls
// (one in-lane vpshufb per byte for fp32 values, one pshufb for 16-bit ones); csr16 uses
// gathers; the decode loops prefetch the weight streams. Chosen at run time (routed_sparse_isa.cpp).
#pragma once

#include "routed_sparse_common.h"
#include "se_quant.h"

namespace se_cpu {

#if SE_X86
struct BitmapTables {
  // vpshufb control expanding fp32 values, one 128-bit lane per nibble: the low lane holds the
  // values of the low nibble's set bits, the high lane those of the high nibble; 0x80 zeroes
  alignas(32) uint8_t shuf32[256][32];
  alignas(8) uint8_t cols[256][8];  // positions of the set bits, compacted (branch-free decoding)
  alignas(16) uint8_t shuf16[256][16];  // pshufb control expanding 16-bit values, 0x80 zeroes a lane
  BitmapTables() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (b >> j) & 1;
        const int lane_rank = rank - (j >= 4 ? __builtin_popcount(b & 15) : 0);  // rank within the nibble
        for (int byte = 0; byte < 4; ++byte)
          shuf32[b][4 * j + byte] = static_cast<uint8_t>(set ? 4 * lane_rank + byte : 0x80);
        cols[b][j] = 0;
        shuf16[b][2 * j] = static_cast<uint8_t>(set ? 2 * rank : 0x80);
        shuf16[b][2 * j + 1] = static_cast<uint8_t>(set ? 2 * rank + 1 : 0x80);
        if (set) cols[b][rank++] = static_cast<uint8_t>(j);
      }
    }
  }
};
inline const BitmapTables kTables;

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline __m256 load8(const void* values, int64_t i) {
  if constexpr (VD == SE_F32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + i);
  } else if constexpr (VD == SE_F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) float dot_csr_avx2(const se_experts* e, int64_t b, int64_t end,
                                                             const float* x) {
  const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;  // two chains: latency hiding, shorter sums
  int64_t j = b;
  for (; j + 16 <= end; j += 16) {
    const __m256i c0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + j)));
    const __m256i c1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + j + 8)));
    acc0 = _mm256_fmadd_ps(load8<VD>(e->values, j), _mm256_i32gather_ps(x, c0, 4), acc0);
    acc1 = _mm256_fmadd_ps(load8<VD>(e->values, j + 8), _mm256_i32gather_ps(x, c1, 4), acc1);
  }
  for (; j + 8 <= end; j += 8) {
    const __m256i c = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + j)));
    acc0 = _mm256_fmadd_ps(load8<VD>(e->values, j), _mm256_i32gather_ps(x, c, 4), acc0);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; j < end; ++j) s += load_value<VD>(e->values, j) * x[cols[j]];
  return s;
}

// acc + (8 packed values from p expanded to the set bits of m) * x[0..8). fp32 values: the low
// and high nibble's values are loaded into the two 128-bit lanes and one vpshufb expands and
// zeroes them (measured 13-15% faster than a vpermps plus a zeroing mask, streaming, 2 threads);
// 16-bit values: one pshufb expands and zeroes in the 16-bit domain before the conversion
// (measured 16% faster per row than permuting after it).
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline __m256 bitmap_byte_avx2(const void* values, int64_t p,
                                                                                 unsigned m, const float* x,
                                                                                 __m256 acc) {
  __m256 w;
  if constexpr (VD == SE_F32) {  // 4 values per nibble: one in-lane byte shuffle expands and zeroes
    const float* v = static_cast<const float*>(values) + p;
    const __m256 halves = _mm256_loadu2_m128(v + _mm_popcnt_u32(m & 15u), v);
    w = _mm256_castsi256_ps(_mm256_shuffle_epi8(
        _mm256_castps_si256(halves), _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.shuf32[m]))));
  } else {
    const __m128i h = _mm_shuffle_epi8(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + p)),
        _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.shuf16[m])));
    if constexpr (VD == SE_F16) {
      w = _mm256_cvtph_ps(h);
    } else {
      w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc);
}

// Byte i of the 8 mask bytes in m, times the 8 columns of x it covers, into acc; p moves past
// the byte's values.
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline __m256 bitmap_step_avx2(const void* values, int64_t& p,
                                                                                 uint64_t m, int i, const float* x,
                                                                                 __m256 acc) {
  const unsigned mi = static_cast<unsigned>(m >> (8 * i)) & 255u;
  acc = bitmap_byte_avx2<VD>(values, p, mi, x + 8 * i, acc);
  p += _mm_popcnt_u32(mi);
  return acc;
}

// One row of a bitmap expert times x: every mask byte expands up to 8 packed values into their
// lanes with one byte shuffle (256-entry table), then one FMA with 8 columns of x. Eight bytes
// per step into eight accumulators: the value offsets are a chain of popcounts, the products are
// independent (eight chains measured 10-15% faster than four, fp32, 4096 x 11008). The
// accumulators are eight named values, not an array: GCC zeroed an array with `rep stos` on the
// stack for every row (15% of a 576-wide row's time in a profile).
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) float dot_bitmap_avx2(const se_experts* e, const uint8_t* bits,
                                                                           int64_t nbytes, int64_t p, int64_t end,
                                                                           const float* x) {
  const void* v = e->values;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t full = e->in_features / 8;  // bytes whose 8 columns all exist
  int64_t byte = 0;
  if (end + 8 <= e->nnz) {  // every 8-value load of this row stays inside values: no checks
    for (; byte + 8 <= full; byte += 8) {  // eight bytes per step, eight chains
      se_values::prefetch_values<VD>(v, p);
      __builtin_prefetch(bits + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, bits + byte, 8);
      const float* xb = x + byte * 8;
      a0 = bitmap_step_avx2<VD>(v, p, m, 0, xb, a0);
      a1 = bitmap_step_avx2<VD>(v, p, m, 1, xb, a1);
      a2 = bitmap_step_avx2<VD>(v, p, m, 2, xb, a2);
      a3 = bitmap_step_avx2<VD>(v, p, m, 3, xb, a3);
      a4 = bitmap_step_avx2<VD>(v, p, m, 4, xb, a4);
      a5 = bitmap_step_avx2<VD>(v, p, m, 5, xb, a5);
      a6 = bitmap_step_avx2<VD>(v, p, m, 6, xb, a6);
      a7 = bitmap_step_avx2<VD>(v, p, m, 7, xb, a7);
    }
    for (; byte + 2 <= full; byte += 2) {
      const uint64_t m = static_cast<uint64_t>(bits[byte]) | static_cast<uint64_t>(bits[byte + 1]) << 8;
      a0 = bitmap_step_avx2<VD>(v, p, m, 0, x + byte * 8, a0);
      a1 = bitmap_step_avx2<VD>(v, p, m, 1, x + byte * 8, a1);
    }
  }
  for (; byte < full && p + 8 <= e->nnz; ++byte) a0 = bitmap_step_avx2<VD>(v, p, bits[byte], 0, x + byte * 8, a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))));
  return se_values::bitmap_bits<VD>(v, bits, byte, nbytes, p, x, s);  // tail columns, last values of the array
}

// lo/hi + (the codes at p expanded to the set bits of mask bytes m0, m1) * x[0..16) * scale: one
// byte shuffle expands both bytes' codes (se_quant::expand_controls), then two 8-lane FMAs
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline void quant_step_avx2(const void* values, int64_t& p,
                                                                               unsigned m0, unsigned m1,
                                                                               const float* x, float scale,
                                                                               __m256& lo, __m256& hi) {
  uint64_t c0, c1;
  se_quant::expand_controls(m0, m1, c0, c1);
  const __m128i e = _mm_shuffle_epi8(se_avx512::code_bytes16<VD>(values, p),
                                     _mm_set_epi64x(static_cast<long long>(c1), static_cast<long long>(c0)));
  p += _mm_popcnt_u32(m0) + _mm_popcnt_u32(m1);
  const __m256 s = _mm256_set1_ps(scale);
  lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e)), _mm256_mul_ps(_mm256_loadu_ps(x), s), lo);
  hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e, 8))),
                       _mm256_mul_ps(_mm256_loadu_ps(x + 8), s), hi);
}

// The row's n fp16 scales widened to fp32 into out (8 per conversion)
__attribute__((target("avx2,fma,f16c"))) inline void widen_scales_avx2(const uint16_t* scales, int64_t n,
                                                                       float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + i))));
  for (; i < n; ++i) out[i] = se_half::f16_to_f32(scales[i]);
}

// One bitmap row of int8/int4 codes times x on AVX2 (q.shift >= 4, at most kMaxVectorGroups
// groups): 16 columns per step, four steps per 64 columns into eight accumulators, x scaled by the
// row's scales widened once; tail columns and the array's last values scalar.
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) float dot_bitmap_quant_avx2(const se_experts* e,
                                                                                 const uint8_t* bits,
                                                                                 int64_t nbytes, int64_t p,
                                                                                 int64_t end, const float* x,
                                                                                 const se_quant::RowScales& q) {
  const void* v = e->values;
  float wide[se_quant::kMaxVectorGroups];
  widen_scales_avx2(q.scales, se_quant::row_groups(e), wide);
  const int shift = q.shift;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t full = e->in_features / 8;
  int64_t byte = 0;
  if (end + se_quant::kVectorSlack<VD> <= e->nnz) {
    for (; byte + 8 <= full; byte += 8) {
      se_values::prefetch_values<VD>(v, p);
      __builtin_prefetch(bits + byte + se_values::kPrefetchMaskBytes);
      const uint8_t* m = bits + byte;
      const int64_t c = byte * 8;
      quant_step_avx2<VD>(v, p, m[0], m[1], x + c, wide[c >> shift], a0, a1);
      quant_step_avx2<VD>(v, p, m[2], m[3], x + c + 16, wide[(c + 16) >> shift], a2, a3);
      quant_step_avx2<VD>(v, p, m[4], m[5], x + c + 32, wide[(c + 32) >> shift], a4, a5);
      quant_step_avx2<VD>(v, p, m[6], m[7], x + c + 48, wide[(c + 48) >> shift], a6, a7);
    }
    for (; byte + 2 <= full; byte += 2)
      quant_step_avx2<VD>(v, p, bits[byte], bits[byte + 1], x + byte * 8, wide[(byte * 8) >> shift], a0, a1);
  }
  const float s = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                     _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))));
  return se_quant::bitmap_bits<VD>(v, bits, byte, nbytes, p, x, q, s);
}

// Four bitmap rows in lock step on AVX2: row i's mask bytes at bits + i * stride, its values from
// p[i] up to end[i] (rows in the order of their values), results into out[i]. The AVX-512 path's
// four weight streams per core (se_avx512::dot_bitmap_rows) for CPUs without AVX-512, two
// accumulators per row: paired, DRAM-cold, fp32 30% kept, SE_KERNELS_ISA=avx2 on the Xeon,
// 1.05x at 4096 x 11008 and 1.13x at 11008 x 4096 (paired, DRAM-cold, SE_KERNELS_ISA=avx2 on an AVX-512 Xeon). Rows whose
// 8-value loads could pass the end of values go one by one.
constexpr int kAvx2LockStepRows = 4;

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) void dot_bitmap_rows_avx2(const se_experts* e,
                                                                               const uint8_t* bits, int64_t stride,
                                                                               int64_t nbytes, const int64_t* p,
                                                                               const int64_t* end, const float* x,
                                                                               float* out) {
  constexpr int R = kAvx2LockStepRows;
  if (end[R - 1] + 8 > e->nnz) {  // rows come in order: the last one ends last
    for (int i = 0; i < R; ++i) out[i] = dot_bitmap_avx2<VD>(e, bits + i * stride, nbytes, p[i], end[i], x);
    return;
  }
  const void* v = e->values;
  __m256 a[R], b[R];
  int64_t pos[R];
  for (int i = 0; i < R; ++i) {
    a[i] = b[i] = _mm256_setzero_ps();
    pos[i] = p[i];
  }
  const int64_t full = e->in_features / 8;
  int64_t byte = 0;
  for (; byte + 8 <= full; byte += 8) {
    const float* xb = x + byte * 8;
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = bits + i * stride;
      se_values::prefetch_values<VD>(v, pos[i]);
      __builtin_prefetch(row + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, row + byte, 8);
      for (int j = 0; j < 8; j += 2) {
        a[i] = bitmap_step_avx2<VD>(v, pos[i], m, j, xb, a[i]);
        b[i] = bitmap_step_avx2<VD>(v, pos[i], m, j + 1, xb, b[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {  // the last whole bytes, then the tail columns bit by bit
    const uint8_t* row = bits + i * stride;
    int64_t c = byte;
    for (; c < full; ++c) a[i] = bitmap_step_avx2<VD>(v, pos[i], row[c], 0, x + c * 8, a[i]);
    out[i] = se_values::bitmap_bits<VD>(v, row, c, nbytes, pos[i], x, hsum(_mm256_add_ps(a[i], b[i])));
  }
}

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline float load_value_avx2(const void* values, int64_t i) {
  if constexpr (VD == SE_F16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(values)[i]);
  } else {
    return load_value<VD>(values, i);
  }
}

// row_block_portable with W/8 ymm accumulators (8 or 64 tokens) per kept weight; with Avx512 the
// 64-token tile's multiply-adds run as W/16 zmm FMAs (se_avx512::tile_products) instead
// (quantized values: q gives the row's scales; each kept weight is dequantized once, then
// multiplied into all W tokens)
template <int VD, int W, bool Avx512 = false>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) void row_block_avx2(const se_experts* e, const uint8_t* bitmap_row,
                                                              int64_t c0, int64_t c1, int64_t end, int64_t& pos,
                                                              const float* xt, float* acc,
                                                              const se_quant::RowScales* q = nullptr) {
  static_assert(!(Avx512 && se_values::kQuantized<VD>), "the AVX-512 tile takes float values");
  static_assert(W % 8 == 0 && W <= 64, "the AVX2 tile holds W/8 vectors of 8 tokens");
  constexpr int kRegs = W / 8;
  __m256 a[kRegs];
  for (int i = 0; i < kRegs; ++i) a[i] = _mm256_setzero_ps();  // block partial sums: shorter chains
  auto add = [&](float v, const float* xr) __attribute__((target("avx2,fma"))) {
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < kRegs; ++i) a[i] = _mm256_fmadd_ps(vv, _mm256_loadu_ps(xr + 8 * i), a[i]);
  };
  if (e->format == SE_CSR16) {
    const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
    if constexpr (Avx512) {
      int64_t n = 0;
      while (pos + n < end && cols[pos + n] < c1) ++n;
      se_avx512::tile_products<VD, W>(e->values, pos, cols + pos, n, xt, acc);
      pos += n;
      return;
    }
    for (; pos < end && cols[pos] < c1; ++pos) {
      if constexpr (se_values::kQuantized<VD>)
        add(load_value<VD>(e->values, pos) * q->at(cols[pos]), xt + cols[pos] * W);
      else
        add(load_value_avx2<VD>(e->values, pos), xt + cols[pos] * W);
    }
  } else {  // decode the block's columns without branches (table + popcount), then a linear loop
    alignas(16) uint16_t cols[kColBlock + 8];
    int64_t n = 0;
    for (int64_t byte = c0 / 8; byte < (c1 + 7) / 8; ++byte) {
      const unsigned m = bitmap_row[byte];
      const __m128i idx = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kTables.cols[m])));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cols + n),
                       _mm_add_epi16(idx, _mm_set1_epi16(static_cast<int16_t>(byte * 8 - c0))));
      n += _mm_popcnt_u32(m);
    }
    const float* xb = xt + c0 * W;
    if constexpr (Avx512) {
      se_avx512::tile_products<VD, W>(e->values, pos, cols, n, xb, acc);
      pos += n;
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      if constexpr (se_values::kQuantized<VD>)
        add(load_value<VD>(e->values, pos + j) * q->at(c0 + cols[j]), xb + cols[j] * W);
      else
        add(load_value_avx2<VD>(e->values, pos + j), xb + cols[j] * W);
    }
    pos += n;
  }
  for (int i = 0; i < kRegs; ++i) _mm256_storeu_ps(acc + 8 * i, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * i), a[i]));
}

// Router scores s[0..K) += x G for one token, K <= 64: the scores stay in registers (one 8-lane
// accumulator per 8 experts, two chains over the inputs) instead of a memory array updated for
// every input, which made a 1536 x 16 router take 12 us per token (now ~1 us).
template <int KB>
__attribute__((target("avx2,fma"))) void route_scores_avx2(const float* xv, int64_t in, const float* g, int64_t K,
                                                             float* s) {
  const int tail = static_cast<int>(K % 8);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i tail_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), lanes);
  auto row = [&](const float* gi, int j) __attribute__((target("avx2,fma"))) {
    return (j + 1 < KB || tail == 0) ? _mm256_loadu_ps(gi + 8 * j) : _mm256_maskload_ps(gi + 8 * j, tail_mask);
  };
  __m256 a[KB], c[KB];
  for (int j = 0; j < KB; ++j) a[j] = c[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= in; i += 2) {
    const __m256 x0 = _mm256_set1_ps(xv[i]), x1 = _mm256_set1_ps(xv[i + 1]);
    for (int j = 0; j < KB; ++j) {
      a[j] = _mm256_fmadd_ps(x0, row(g + i * K, j), a[j]);
      c[j] = _mm256_fmadd_ps(x1, row(g + (i + 1) * K, j), c[j]);
    }
  }
  if (i < in) {
    const __m256 x0 = _mm256_set1_ps(xv[i]);
    for (int j = 0; j < KB; ++j) a[j] = _mm256_fmadd_ps(x0, row(g + i * K, j), a[j]);
  }
  for (int j = 0; j < KB; ++j) {
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(a[j], c[j]));
    for (int l = 0; l < 8 && 8 * j + l < K; ++l) s[8 * j + l] += t[l];
  }
}
#endif  // SE_X86

}  // namespace se_cpu
