// NEON decode kernel for aarch64 (Jetson's CPU): one token times one bitmap expert row.
//
// The portable decode loop walks the set bits of each mask byte one by one (a data-dependent
// branch per kept weight). Here every mask nibble expands its packed values into 4 lanes with
// one table lookup (`tbl`: out-of-range control bytes give 0, so the lookup zeroes the unset
// lanes too), then one 4-lane FMA: the same idea as the AVX2 byte shuffle.
//
// This header is compiled natively inside routed_sparse_cpu.cpp on aarch64, and against SIMDe's
// portable NEON intrinsics in plugins/tests/test_neon_emulated.cpp, so CI (x86) tests the code
// that ships; `make test-aarch64` runs the library's own C++ tests on it under qemu.
#pragma once

#include <cstdint>

#include "se_kernels.h"
#include "se_quant.h"
#include "se_values.h"

namespace se_neon {

struct ExpandTables {
  // tbl control expanding the fp32 values of one mask nibble (4 columns): byte b of lane j reads
  // byte 4 * rank + b of the packed values when bit j is set, and 0xFF (-> 0) otherwise
  alignas(16) uint8_t nibble32[16][16];
  // tbl control expanding the 16-bit values of one mask byte (8 columns) the same way
  alignas(16) uint8_t byte16[256][16];
  ExpandTables() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (m >> j) & 1;
        byte16[m][2 * j] = static_cast<uint8_t>(set ? 2 * rank : 0xFF);
        byte16[m][2 * j + 1] = static_cast<uint8_t>(set ? 2 * rank + 1 : 0xFF);
        if (m < 16 && j < 4)
          for (int b = 0; b < 4; ++b) nibble32[m][4 * j + b] = static_cast<uint8_t>(set ? 4 * rank + b : 0xFF);
        rank += set;
      }
    }
  }
};
inline const ExpandTables kExpand;

using se_values::load_value;

// lo/hi += (the values at p expanded to the set bits of mask byte m) * x[0..8); p moves past them
template <int VD>
inline void bitmap_byte(const void* values, int64_t& p, unsigned m, const float* x, float32x4_t& lo,
                        float32x4_t& hi) {
  float32x4_t w_lo, w_hi;
  if constexpr (VD == SE_F32) {
    const float* v = static_cast<const float*>(values) + p;
    const unsigned n_lo = static_cast<unsigned>(__builtin_popcount(m & 15u));
    w_lo = vreinterpretq_f32_u8(vqtbl1q_u8(vreinterpretq_u8_f32(vld1q_f32(v)), vld1q_u8(kExpand.nibble32[m & 15u])));
    w_hi = vreinterpretq_f32_u8(vqtbl1q_u8(vreinterpretq_u8_f32(vld1q_f32(v + n_lo)), vld1q_u8(kExpand.nibble32[m >> 4])));
  } else {
    const uint8_t* v = reinterpret_cast<const uint8_t*>(static_cast<const uint16_t*>(values) + p);
    const uint16x8_t h = vreinterpretq_u16_u8(vqtbl1q_u8(vld1q_u8(v), vld1q_u8(kExpand.byte16[m])));
    if constexpr (VD == SE_F16) {
      w_lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
      w_hi = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
    } else {
      w_lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
      w_hi = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16));
    }
  }
  lo = vfmaq_f32(lo, w_lo, vld1q_f32(x));
  hi = vfmaq_f32(hi, w_hi, vld1q_f32(x + 4));
  p += __builtin_popcount(m);
}

// One bitmap row (nbytes mask bytes, values from p up to end) times x; two bytes per step into
// four accumulators. Every 8-value load stays inside the nnz values; the columns of a partial
// last byte and rows at the very end of the array run scalar.
template <int VD>
float dot_bitmap(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits, int64_t nbytes, int64_t p,
                 int64_t end, const float* x) {
  float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
  const int64_t full = in_features / 8;  // bytes whose 8 columns all exist
  int64_t byte = 0;
  if (end + 8 <= nnz) {  // no load of this row can pass the end of values
    for (; byte + 2 <= full; byte += 2) {
      bitmap_byte<VD>(values, p, bits[byte], x + byte * 8, a0, a1);
      bitmap_byte<VD>(values, p, bits[byte + 1], x + byte * 8 + 8, a2, a3);
    }
    for (; byte < full; ++byte) bitmap_byte<VD>(values, p, bits[byte], x + byte * 8, a0, a1);
  }
  float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
  return se_values::bitmap_bits<VD>(values, bits, byte, nbytes, p, x, s);
}

// 16 quantized codes from value p as sign-extended bytes (int4: nibbles spread to bytes)
template <int VD>
inline int8x16_t code_bytes16(const void* values, int64_t p) {
  if constexpr (VD == SE_I8) {
    return vld1q_s8(static_cast<const int8_t*>(values) + p);
  } else {
    const uint8x8_t v = vcreate_u8(se_quant::nibbles16(values, p));
    const uint8x8_t lo = vand_u8(v, vdup_n_u8(15)), hi = vshr_n_u8(v, 4);
    const int8x16_t spread = vreinterpretq_s8_u8(vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi)));
    return vsubq_s8(veorq_s8(spread, vdupq_n_s8(8)), vdupq_n_s8(8));
  }
}

// a[0..4) + (the codes at p expanded to the set bits of mask bytes m0, m1) * x[0..16) * scale: one
// table lookup expands both bytes' codes (se_quant::expand_controls), then four 4-lane FMAs
template <int VD>
inline void quant_step(const void* values, int64_t& p, unsigned m0, unsigned m1, const float* x, float scale,
                       float32x4_t* a) {
  uint64_t c0, c1;
  se_quant::expand_controls(m0, m1, c0, c1);
  const int8x16_t e = vqtbl1q_s8(code_bytes16<VD>(values, p), vcombine_u8(vcreate_u8(c0), vcreate_u8(c1)));
  p += __builtin_popcount(m0) + __builtin_popcount(m1);
  const int16x8_t lo = vmovl_s8(vget_low_s8(e)), hi = vmovl_s8(vget_high_s8(e));
  a[0] = vfmaq_f32(a[0], vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vmulq_n_f32(vld1q_f32(x), scale));
  a[1] = vfmaq_f32(a[1], vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), vmulq_n_f32(vld1q_f32(x + 4), scale));
  a[2] = vfmaq_f32(a[2], vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vmulq_n_f32(vld1q_f32(x + 8), scale));
  a[3] = vfmaq_f32(a[3], vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), vmulq_n_f32(vld1q_f32(x + 12), scale));
}

// The row's n fp16 scales widened to fp32 into out (4 per conversion)
inline void widen_scales(const uint16_t* scales, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(scales + i))));
  for (; i < n; ++i) out[i] = se_half::f16_to_f32(scales[i]);
}

// One bitmap row of int8/int4 codes times x (q.shift >= 4, at most kMaxVectorGroups groups): 16
// columns per step, x scaled by the row's scales widened once; tail columns and the array's last
// values run scalar.
template <int VD>
float dot_bitmap_quant(const void* values, int64_t nnz, int64_t in_features, const uint8_t* bits, int64_t nbytes,
                       int64_t p, int64_t end, const float* x, const se_quant::RowScales& q) {
  float wide[se_quant::kMaxVectorGroups];
  widen_scales(q.scales, (in_features + q.group - 1) / q.group, wide);
  float32x4_t a[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
  const int64_t full = in_features / 8;
  int64_t byte = 0;
  if (end + se_quant::kVectorSlack<VD> <= nnz)
    for (; byte + 2 <= full; byte += 2)
      quant_step<VD>(values, p, bits[byte], bits[byte + 1], x + byte * 8, wide[(byte * 8) >> q.shift], a);
  const float s = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
  return se_quant::bitmap_bits<VD>(values, bits, byte, nbytes, p, x, q, s);
}

}  // namespace se_neon
