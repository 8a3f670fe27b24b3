// AVX-512F kernels, chosen at run time where the CPU has AVX-512F (Intel Skylake-SP and newer
// Xeons, AMD Zen 4 and newer): decode products (one token times one expert row) and the prefill
// tile's multiply-adds (64 tokens per kept weight in four 16-lane FMAs instead of eight 8-lane).
//
// Why a separate path: on AVX2 a bitmap byte is expanded into its 8 lanes by a table-driven byte
// shuffle (two value loads, a table load and a vpshufb per byte); on a Zen 3 that expansion, not
// memory, bounded the 70% kernel. AVX-512F's `vexpandps` puts 16 packed values into the set lanes
// of a 16-bit mask and zeroes the rest in one instruction, with no table: on a Xeon this path was
// 1.3-1.6x faster than the AVX2 one at fp32 (measured on an AVX-512 Xeon).
//
// This header is compiled twice: natively inside routed_sparse_cpu.cpp (functions carry a target
// attribute; the library still runs on CPUs without AVX-512), and against SIMDe's portable
// implementations of the same intrinsics in plugins/tests/test_avx512_emulated.cpp, so the code
// that ships is tested on machines without AVX-512 (this project's CI has none).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "se_kernels.h"
#include "se_quant.h"
#include "se_values.h"

#ifndef SE_AVX512_TARGET
#define SE_AVX512_TARGET __attribute__((target("avx512f,avx2,fma,f16c,popcnt,bmi")))
#endif
// The quantized decode's 64-column path: byte permutes, bit-field extraction and byte expansion
// (AVX512-VBMI, -VBMI2: Ice Lake and newer Xeons, AMD Zen 4 and newer)
#ifndef SE_AVX512_VBMI_TARGET
#define SE_AVX512_VBMI_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx2,fma,f16c,popcnt,bmi")))
#endif

// GCC 12's AVX-512 intrinsics pass a self-initialised `_mm512_undefined_*()` as the unused
// merge source of every unmasked operation, which -Wmaybe-uninitialized reports (fixed in GCC 13)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace se_avx512 {

using se_values::load_value;

// 16 consecutive values from index i, widened to fp32
template <int VD>
SE_AVX512_TARGET inline __m512 load16(const void* values, int64_t i) {
  if constexpr (VD == SE_F32) {
    return _mm512_loadu_ps(static_cast<const float*>(values) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(values) + i));
    if constexpr (VD == SE_F16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// (a tree of adds: once per row, where a 576-wide row has only nine loop iterations)
SE_AVX512_TARGET inline float hsum16(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// acc + (the packed values at p expanded to the set bits of the 16-bit mask m) * x[0..16);
// p moves past the values used
template <int VD>
SE_AVX512_TARGET inline __m512 bitmap_step(const void* values, int64_t& p, unsigned m, const float* x, __m512 acc) {
  const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), load16<VD>(values, p));
  p += __builtin_popcount(m);
  return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc);
}

// The rest of a bitmap row from mask byte `byte` on, added to the row's accumulator: two mask
// bytes at a time while the 16-value loads stay inside the values, then bit by bit
template <int VD>
SE_AVX512_TARGET inline float finish_row(const void* values, int64_t nnz, const uint8_t* bits, int64_t byte,
                                         int64_t full, int64_t nbytes, int64_t& p, const float* x, __m512 acc) {
  for (; byte + 2 <= full && p + 16 <= nnz; byte += 2)
    acc = bitmap_step<VD>(values, p, bits[byte] | static_cast<unsigned>(bits[byte + 1]) << 8, x + byte * 8, acc);
  return se_values::bitmap_bits<VD>(values, bits, byte, nbytes, p, x, hsum16(acc));
}

// One bitmap row (nbytes mask bytes, values from p up to end) times x. Sixteen columns (two mask
// bytes) per step, four accumulators per 64 columns. Every 16-value load stays inside the nnz
// values; the columns of a partial last byte and rows at the very end of the array run scalar.
template <int VD>
SE_AVX512_TARGET float dot_bitmap(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits,
                                  int64_t nbytes, int64_t p, int64_t end, const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t full = in_features / 8;  // bytes whose 8 columns all exist
  int64_t byte = 0;
  if (end + 16 <= nnz) {  // no load of this row can pass the end of values
    for (; byte + 8 <= full; byte += 8) {
      se_values::prefetch_values<VD>(values, p);
      __builtin_prefetch(bits + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, bits + byte, 8);
      const float* xb = x + byte * 8;
      a0 = bitmap_step<VD>(values, p, static_cast<unsigned>(m) & 0xffffu, xb, a0);
      a1 = bitmap_step<VD>(values, p, static_cast<unsigned>(m >> 16) & 0xffffu, xb + 16, a1);
      a2 = bitmap_step<VD>(values, p, static_cast<unsigned>(m >> 32) & 0xffffu, xb + 32, a2);
      a3 = bitmap_step<VD>(values, p, static_cast<unsigned>(m >> 48), xb + 48, a3);
    }
  }
  return finish_row<VD>(values, nnz, bits, byte, full, nbytes, p, x,
                        _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// 16 quantized codes from value p as sign-extended bytes (int4: nibbles spread to bytes). SSE2
// only, no target attribute: the AVX2 and AVX-512 decodes both inline it.
template <int VD>
inline __m128i code_bytes16(const void* values, int64_t p) {
  if constexpr (VD == SE_I8) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + p));
  } else {
    const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(se_quant::nibbles16(values, p)));
    const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    const __m128i spread = _mm_unpacklo_epi8(_mm_and_si128(v, low), _mm_and_si128(_mm_srli_epi16(v, 4), low));
    return _mm_sub_epi8(_mm_xor_si128(spread, eight), eight);
  }
}

// the same 16 codes widened to fp32
template <int VD>
SE_AVX512_TARGET inline __m512 codes16(const void* values, int64_t p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(code_bytes16<VD>(values, p)));
}

// acc + (the codes at p expanded to the set bits of the 16-bit mask m) * x[0..16) * scale
template <int VD>
SE_AVX512_TARGET inline __m512 quant_step(const void* values, int64_t& p, unsigned m, const float* x, float scale,
                                          __m512 acc) {
  const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), codes16<VD>(values, p));
  p += __builtin_popcount(m);
  return _mm512_fmadd_ps(w, _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(scale)), acc);
}

// The row's n fp16 scales widened to fp32 into out (16 per conversion)
SE_AVX512_TARGET inline void widen_scales(const uint16_t* scales, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + i))));
  for (; i < n; ++i) out[i] = se_half::f16_to_f32(scales[i]);
}

// The rest of a quantized bitmap row from mask byte `byte` on, added to the row's accumulator:
// 16-column steps while a 16-code load stays inside the values, then bit by bit
template <int VD>
SE_AVX512_TARGET inline float finish_quant_row(const void* values, int64_t nnz, const uint8_t* bits, int64_t byte,
                                               int64_t full, int64_t nbytes, int64_t p, int64_t end, const float* x,
                                               const float* wide, const se_quant::RowScales& q, __m512 acc) {
  if (end + se_quant::kVectorSlack<VD> <= nnz)
    for (; byte + 2 <= full; byte += 2)
      acc = quant_step<VD>(values, p, bits[byte] | static_cast<unsigned>(bits[byte + 1]) << 8, x + byte * 8,
                           wide[(byte * 8) >> q.shift], acc);
  return se_quant::bitmap_bits<VD>(values, bits, byte, nbytes, p, x, q, hsum16(acc));
}

// One bitmap row of int8/int4 codes times x (q.shift >= 4: a 16-column step lies in one group;
// at most kMaxVectorGroups groups): the fp16/fp32 row's loop with the codes widened in registers
// and x scaled per step by the row's scales, widened once. The last values of the array (where a
// 16-code load would pass them) and tail columns run scalar.
template <int VD>
SE_AVX512_TARGET float dot_bitmap_quant(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits,
                                        int64_t nbytes, int64_t p, int64_t end, const float* x,
                                        const se_quant::RowScales& q) {
  float wide[se_quant::kMaxVectorGroups];
  widen_scales(q.scales, (in_features + q.group - 1) / q.group, wide);
  const int shift = q.shift;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t full = in_features / 8;
  int64_t byte = 0;
  if (end + se_quant::kVectorSlack<VD> <= nnz) {
    for (; byte + 8 <= full; byte += 8) {
      se_values::prefetch_values<VD>(values, p);
      __builtin_prefetch(bits + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, bits + byte, 8);
      const int64_t c = byte * 8;
      a0 = quant_step<VD>(values, p, static_cast<unsigned>(m) & 0xffffu, x + c, wide[c >> shift], a0);
      a1 = quant_step<VD>(values, p, static_cast<unsigned>(m >> 16) & 0xffffu, x + c + 16, wide[(c + 16) >> shift], a1);
      a2 = quant_step<VD>(values, p, static_cast<unsigned>(m >> 32) & 0xffffu, x + c + 32, wide[(c + 32) >> shift], a2);
      a3 = quant_step<VD>(values, p, static_cast<unsigned>(m >> 48), x + c + 48, wide[(c + 48) >> shift], a3);
    }
  }
  return finish_quant_row<VD>(values, nnz, bits, byte, full, nbytes, p, end, x, wide, q,
                              _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// 64 codes from value p as sign-extended bytes, reading only the bytes that hold the n codes a
// step uses (masked loads never touch the rest, so no slack past the values is needed). int4: the
// 32-33 bytes holding them are spread so that qword lane L holds bytes 4L..4L+7, then one
// bit-field extraction per byte picks nibble (byte index + p's parity) of its lane.
template <int VD>
SE_AVX512_VBMI_TARGET inline __m512i code_bytes64(const void* values, int64_t p, unsigned n) {
  if constexpr (VD == SE_I8) {
    const __mmask64 need = n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    return _mm512_maskz_loadu_epi8(need, static_cast<const int8_t*>(values) + p);
  } else {
    const unsigned odd = static_cast<unsigned>(p & 1);
    const unsigned bytes = (odd + n + 1) / 2;  // <= 33
    const __mmask64 need = (__mmask64{1} << bytes) - 1;
    const __m512i src = _mm512_maskz_loadu_epi8(need, static_cast<const uint8_t*>(values) + (p >> 1));
    alignas(64) static constexpr uint8_t kLaneBytes[64] = {
        0,  1,  2,  3,  4,  5,  6,  7,  4,  5,  6,  7,  8,  9,  10, 11, 8,  9,  10, 11, 12, 13,
        14, 15, 12, 13, 14, 15, 16, 17, 18, 19, 16, 17, 18, 19, 20, 21, 22, 23, 20, 21, 22, 23,
        24, 25, 26, 27, 24, 25, 26, 27, 28, 29, 30, 31, 28, 29, 30, 31, 32, 33, 34, 35};
    alignas(64) static constexpr uint8_t kNibbleBits[64] = {
        0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28,
        0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28,
        0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
    const __m512i lanes = _mm512_permutexvar_epi8(_mm512_load_si512(kLaneBytes), src);
    const __m512i at = _mm512_add_epi8(_mm512_load_si512(kNibbleBits), _mm512_set1_epi8(static_cast<char>(4 * odd)));
    const __m512i nibble = _mm512_and_si512(_mm512_multishift_epi64_epi8(at, lanes), _mm512_set1_epi8(15));
    const __m512i eight = _mm512_set1_epi8(8);
    return _mm512_sub_epi8(_mm512_xor_si512(nibble, eight), eight);
  }
}

// acc + the 16 codes of byte lanes [16 i, 16 i + 16) of e widened to fp32, times x[0..16) * scale
template <int I>
SE_AVX512_VBMI_TARGET inline __m512 quarter_fma(__m512i e, const float* x, float scale, __m512 acc) {
  const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, I)));
  return _mm512_fmadd_ps(w, _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(scale)), acc);
}

// dot_bitmap_quant with 64 columns per step: one code load (and, for int4, one spread) and one
// byte expansion into the columns of the 8 mask bytes, instead of four 16-column steps; on a Zen 4
// EPYC, 4096 x 11008 at 50%, DRAM-cold, batch 1, 2 threads: BENCHMARKS.md, CPU kernels.
template <int VD>
SE_AVX512_VBMI_TARGET float dot_bitmap_quant64(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits,
                                               int64_t nbytes, int64_t p, int64_t end, const float* x,
                                               const se_quant::RowScales& q) {
  float wide[se_quant::kMaxVectorGroups];
  widen_scales(q.scales, (in_features + q.group - 1) / q.group, wide);
  const int shift = q.shift;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t full = in_features / 8;
  int64_t byte = 0;
  for (; byte + 8 <= full; byte += 8) {
    se_values::prefetch_values<VD>(values, p);
    __builtin_prefetch(bits + byte + se_values::kPrefetchMaskBytes);
    uint64_t m;
    std::memcpy(&m, bits + byte, 8);
    const unsigned n = static_cast<unsigned>(__builtin_popcountll(m));
    const __m512i e = _mm512_maskz_expand_epi8(m, code_bytes64<VD>(values, p, n));
    p += n;
    const int64_t c = byte * 8;
    a0 = quarter_fma<0>(e, x + c, wide[c >> shift], a0);
    a1 = quarter_fma<1>(e, x + c + 16, wide[(c + 16) >> shift], a1);
    a2 = quarter_fma<2>(e, x + c + 32, wide[(c + 32) >> shift], a2);
    a3 = quarter_fma<3>(e, x + c + 48, wide[(c + 48) >> shift], a3);
  }
  return finish_quant_row<VD>(values, nnz, bits, byte, full, nbytes, p, end, x, wide, q,
                              _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// kDecodeRows bitmap rows in lock step: row i's mask bytes at bits + i * stride (nbytes each), its
// values from p[i] up to end[i] (rows in the order of their values); results into out[i].
// Why: a core streams more bytes per second from DRAM with several concurrent streams than with
// one (a 2-thread read of 60 MB here: 25.7 GB/s as one stream per thread, 29.5 GB/s as four), so
// for long rows the caller gives rows a quarter of a work item apart: DRAM-cold, 30% kept, 2
// threads, 1.27-1.42x faster than one row at a time at fp32 and 1.14-1.16x at fp16 (4096 x 11008
// and similar shapes, DRAM-cold, paired). Short rows take four neighbouring rows,
// which gained where one row ends before its stream gets going (576 wide: 1.06-1.11x). Where a
// row's 16-value loads could pass the end of values, the rows go one by one.
constexpr int kDecodeRows = 4;

template <int VD>
SE_AVX512_TARGET void dot_bitmap_rows(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits,
                                      int64_t stride, int64_t nbytes, const int64_t* p, const int64_t* end,
                                      const float* x, float* out) {
  if (end[kDecodeRows - 1] + 16 > nnz) {  // rows come in order: the last one ends last
    for (int i = 0; i < kDecodeRows; ++i)
      out[i] = dot_bitmap<VD>(values, nnz, in_features, bits + i * stride, nbytes, p[i], end[i], x);
    return;
  }
  __m512 a[kDecodeRows], b[kDecodeRows];
  int64_t pos[kDecodeRows];
  for (int i = 0; i < kDecodeRows; ++i) {
    a[i] = b[i] = _mm512_setzero_ps();
    pos[i] = p[i];
  }
  const int64_t full = in_features / 8;
  int64_t byte = 0;
  for (; byte + 8 <= full; byte += 8) {
    const float* xb = x + byte * 8;
    for (int i = 0; i < kDecodeRows; ++i) {
      const uint8_t* row = bits + i * stride;
      se_values::prefetch_values<VD>(values, pos[i]);
      __builtin_prefetch(row + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, row + byte, 8);
      a[i] = bitmap_step<VD>(values, pos[i], static_cast<unsigned>(m) & 0xffffu, xb, a[i]);
      b[i] = bitmap_step<VD>(values, pos[i], static_cast<unsigned>(m >> 16) & 0xffffu, xb + 16, b[i]);
      a[i] = bitmap_step<VD>(values, pos[i], static_cast<unsigned>(m >> 32) & 0xffffu, xb + 32, a[i]);
      b[i] = bitmap_step<VD>(values, pos[i], static_cast<unsigned>(m >> 48), xb + 48, b[i]);
    }
  }
  for (int i = 0; i < kDecodeRows; ++i)
    out[i] = finish_row<VD>(values, nnz, bits + i * stride, byte, full, nbytes, pos[i], x, _mm512_add_ps(a[i], b[i]));
}

// One csr16 row (values and 16-bit columns in [b, end)) times x: 16 columns widened to 32 bits
// and one 16-lane gather per step, two accumulators.
template <int VD>
SE_AVX512_TARGET float dot_csr16(const void* values, const uint16_t* cols, int64_t b, int64_t end, const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t j = b;
  auto gather = [&](int64_t at) SE_AVX512_TARGET {
    const __m512i c = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + at)));
    return _mm512_i32gather_ps(c, x, 4);
  };
  for (; j + 32 <= end; j += 32) {
    se_values::prefetch_values<VD>(values, j);
    __builtin_prefetch(cols + j + se_values::kPrefetchValues);
    a0 = _mm512_fmadd_ps(load16<VD>(values, j), gather(j), a0);
    a1 = _mm512_fmadd_ps(load16<VD>(values, j + 16), gather(j + 16), a1);
  }
  for (; j + 16 <= end; j += 16) a0 = _mm512_fmadd_ps(load16<VD>(values, j), gather(j), a0);
  float s = hsum16(_mm512_add_ps(a0, a1));
  for (; j < end; ++j) s += load_value<VD>(values, j) * x[cols[j]];
  return s;
}

// Prefill: acc[0..W) += sum over j < n of value(pos + j) * xb[cols[j] * W + 0..W), the token
// tile's kept-weight products for one row (W tokens). Two accumulator sets take alternate kept
// weights, so an FMA does not wait on the previous one's latency (with one set of W/16 = 4
// vectors it would; on the Xeon the x-tile and value loads bound the loop and both measured the
// same). The values are widened 16 at a time into a small buffer and broadcast from there.
template <int VD, int W>
SE_AVX512_TARGET void tile_products(const void* values, int64_t pos, const uint16_t* cols, int64_t n,
                                    const float* xb, float* acc) {
  static_assert(W % 16 == 0 && W <= 64, "the tile holds W/16 vectors of 16 tokens");
  constexpr int kRegs = W / 16;
  __m512 a[kRegs], b[kRegs];
  for (int i = 0; i < kRegs; ++i) a[i] = b[i] = _mm512_setzero_ps();
  alignas(64) float widened[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = n - j0 < 16 ? n - j0 : 16;
    if (m == 16) {
      _mm512_store_ps(widened, load16<VD>(values, pos + j0));
    } else {  // the last values of a row may be the last of the array: no 16-value load
      for (int64_t j = 0; j < m; ++j) widened[j] = load_value<VD>(values, pos + j0 + j);
    }
    const uint16_t* c = cols + j0;
    int64_t j = 0;
    for (; j + 2 <= m; j += 2) {
      const __m512 v0 = _mm512_set1_ps(widened[j]), v1 = _mm512_set1_ps(widened[j + 1]);
      const float* x0 = xb + static_cast<int64_t>(c[j]) * W;
      const float* x1 = xb + static_cast<int64_t>(c[j + 1]) * W;
      for (int i = 0; i < kRegs; ++i) {
        a[i] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x0 + 16 * i), a[i]);
        b[i] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x1 + 16 * i), b[i]);
      }
    }
    if (j < m) {
      const __m512 v = _mm512_set1_ps(widened[j]);
      const float* xr = xb + static_cast<int64_t>(c[j]) * W;
      for (int i = 0; i < kRegs; ++i) a[i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * i), a[i]);
    }
  }
  for (int i = 0; i < kRegs; ++i)
    _mm512_storeu_ps(acc + 16 * i, _mm512_add_ps(_mm512_loadu_ps(acc + 16 * i), _mm512_add_ps(a[i], b[i])));
}

// One bitmap row as dense fp32 columns [0, in_features), zeros where pruned: one vexpandps and one
// store per 16 columns (the PyTorch binding decodes a large prefill group's expert this way).
// Columns past the last whole 16, and rows whose 16-value loads would pass nnz, go bit by bit.
template <int VD>
SE_AVX512_TARGET void decode_bitmap_row(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits,
                                        int64_t p, float* dense) {
  int64_t c = 0;
  for (; c + 16 <= in_features && p + 16 <= nnz; c += 16) {
    const unsigned m = bits[c / 8] | static_cast<unsigned>(bits[c / 8 + 1]) << 8;
    _mm512_storeu_ps(dense + c, _mm512_maskz_expand_ps(static_cast<__mmask16>(m), load16<VD>(values, p)));
    p += __builtin_popcount(m);
  }
  se_values::decode_bits<VD>(values, bits, c / 8, in_features, p, dense);
}

// The AVX-512 path is tested against SIMDe's emulation of its intrinsics (CI has no AVX-512), not
// on every CPU it may meet: once per process, before the library chooses it, it must reproduce a
// scalar float64 sum on a small random problem for every value type, format and the prefill tile
// (well under a millisecond).
inline bool agrees_with_scalar() {
  constexpr int64_t in = 203, rows = 6;  // 25 whole mask bytes and 3 tail columns
  constexpr int64_t nbytes = (in + 7) / 8;
  uint32_t state = 12345u;
  auto next = [&state] { return (state = state * 1664525u + 1013904223u) >> 8; };
  auto uniform = [&next] { return static_cast<float>(next() % 2001u) / 1000.f - 1.f; };
  std::vector<uint8_t> bits(rows * nbytes, 0);
  std::vector<uint16_t> cols;
  std::vector<int64_t> row_ptr(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < in; ++c)
      if (next() % 10u < 4u) {
        bits[r * nbytes + c / 8] |= static_cast<uint8_t>(1u << (c % 8));
        cols.push_back(static_cast<uint16_t>(c));
      }
    row_ptr[r + 1] = static_cast<int64_t>(cols.size());
  }
  const int64_t nnz = row_ptr[rows];
  std::vector<float> x(in), v32(nnz);
  std::vector<uint16_t> v16(nnz), vb16(nnz);
  for (auto& v : x) v = uniform();
  for (int64_t i = 0; i < nnz; ++i) {
    v32[i] = uniform();
    v16[i] = se_half::f32_to_f16(v32[i]);
    uint32_t u;
    std::memcpy(&u, &v32[i], 4);
    vb16[i] = static_cast<uint16_t>(u >> 16);
  }
  bool ok = true;
  auto check_type = [&](auto vd, const void* values) {
    constexpr int VD = decltype(vd)::value;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = row_ptr[r], end = row_ptr[r + 1];
      double want = 0.0, scale = 1.0;
      for (int64_t j = b; j < end; ++j) {
        want += static_cast<double>(load_value<VD>(values, j)) * x[cols[j]];
        scale += std::fabs(static_cast<double>(load_value<VD>(values, j)) * x[cols[j]]);
      }
      const float got_bitmap = dot_bitmap<VD>(values, nnz, in, bits.data() + r * nbytes, nbytes, b, end, x.data());
      const float got_csr = dot_csr16<VD>(values, cols.data(), b, end, x.data());
      // row r in a lock-step group of neighbouring rows (rows 0-3, then 2-5: the end of values);
      // rows farther apart run the same code with a wider stride (the SIMDe test covers those)
      const int64_t g = r < kDecodeRows ? 0 : rows - kDecodeRows;
      int64_t group_end[kDecodeRows];
      float got_rows[kDecodeRows];
      for (int i = 0; i < kDecodeRows; ++i) group_end[i] = row_ptr[g + i + 1];
      dot_bitmap_rows<VD>(values, nnz, in, bits.data() + g * nbytes, nbytes, nbytes, row_ptr.data() + g, group_end,
                          x.data(), got_rows);
      ok = ok && std::fabs(got_bitmap - want) <= 1e-5 * scale && std::fabs(got_csr - want) <= 1e-5 * scale &&
           std::fabs(got_rows[r - g] - want) <= 1e-5 * scale;
      // the row as a prefill tile of 64 tokens: token t reads x shifted by t columns
      constexpr int W = 64;
      std::vector<float> xt(in * W), acc(W, 0.f);
      for (int64_t c = 0; c < in; ++c)
        for (int tok = 0; tok < W; ++tok) xt[c * W + tok] = x[(c + tok) % in];
      tile_products<VD, W>(values, b, cols.data() + b, end - b, xt.data(), acc.data());
      for (int tok = 0; tok < W; ++tok) {
        double want_t = 0.0;
        for (int64_t j = b; j < end; ++j) want_t += static_cast<double>(load_value<VD>(values, j)) * xt[cols[j] * W + tok];
        ok = ok && std::fabs(acc[tok] - want_t) <= 1e-5 * (scale + std::fabs(want_t));
      }
    }
  };
  check_type(std::integral_constant<int, SE_F32>{}, v32.data());
  check_type(std::integral_constant<int, SE_F16>{}, v16.data());
  check_type(std::integral_constant<int, SE_BF16>{}, vb16.data());
  return ok;
}

}  // namespace se_avx512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
