// The scalar pieces every kernel path shares (portable, AVX2, AVX-512, NEON): the prefetch
// distance, one stored value widened to fp32, and the bit-by-bit walks of bitmap bytes (a dot
// product, and a row written out dense) that the portable code runs for a whole row and the
// vector paths run for their tails (partial last byte, last values of the array).
#pragma once

#include <algorithm>
#include <cstdint>

#include "se_half.h"
#include "se_kernels.h"

namespace se_values {

// Software prefetch distance of the decode loops, in values and in mask bytes. Weights stream
// from memory once per token, and the value loads wait on a chain of popcounts; on a Xeon
// (AVX-512) prefetching 1024 values ahead made DRAM-cold calls 1.2-1.5x faster (256: slower,
// 2048: no better).
constexpr int64_t kPrefetchValues = 1024;
constexpr int64_t kPrefetchMaskBytes = 512;

// Asks for the value kPrefetchValues after index i (a hint: never faults, even past the end).
// fp32 also asks for the next line: a 64-column bitmap step at 50% density or a 32-value csr16
// step eats two lines of fp32 values, so one hint per step left every other line to the hardware
// prefetcher (two, paired, DRAM-cold: 1.07-1.08x at 50% bitmap, 1.11-1.16x at 90% csr16, same at 70%).
template <int VD>
constexpr bool kQuantized = VD == SE_I8 || VD == SE_I4;

// Byte offset of value i (int4: the byte holding its nibble)
template <int VD>
constexpr int64_t value_byte(int64_t i) {
  return VD == SE_F32 ? 4 * i : VD == SE_I8 ? i : VD == SE_I4 ? i / 2 : 2 * i;
}

// Quantized values look as many bytes ahead as fp16 values do (2 KiB), not as many values: 512
// bytes ahead (int4) left the decode waiting on DRAM (4096 x 11008, 50%, DRAM-cold, batch 1, Zen 4
// EPYC: int4 against the fp16 expert in the same run went from 0.72x to 0.86x; int8 0.87x to 0.90x).
template <int VD>
inline void prefetch_values(const void* values, int64_t i) {
  constexpr int64_t ahead = VD == SE_I8 ? 2 * kPrefetchValues : VD == SE_I4 ? 4 * kPrefetchValues : kPrefetchValues;
  const char* at = static_cast<const char*>(values) + value_byte<VD>(i + ahead);
  __builtin_prefetch(at);
  if constexpr (VD == SE_F32) __builtin_prefetch(at + 64);
}

// The integer code of quantized value i (int4: the sign-extended nibble)
template <int VD>
inline int32_t load_code(const void* values, int64_t i) {
  static_assert(kQuantized<VD>, "codes are int8 or int4 values");
  if constexpr (VD == SE_I8) {
    return static_cast<const int8_t*>(values)[i];
  } else {
    const unsigned byte = static_cast<const uint8_t*>(values)[i >> 1];
    const int32_t nibble = static_cast<int32_t>(i & 1 ? byte >> 4 : byte & 15u);
    return (nibble ^ 8) - 8;
  }
}

// Value i widened to fp32; for quantized values the code (the caller applies the scale)
template <int VD>
inline float load_value(const void* values, int64_t i) {
  if constexpr (kQuantized<VD>) {
    return static_cast<float>(load_code<VD>(values, i));
  } else if constexpr (VD == SE_F32) {
    return static_cast<const float*>(values)[i];
  } else if constexpr (VD == SE_F16) {
    return se_half::f16_to_f32(static_cast<const uint16_t*>(values)[i]);
  } else {
    return se_half::bf16_to_f32(static_cast<const uint16_t*>(values)[i]);
  }
}

// s + the products of mask bytes [byte, nbytes) of a bitmap row with x, values from p (advanced)
template <int VD>
inline float bitmap_bits(const void* values, const uint8_t* bits, int64_t byte, int64_t nbytes, int64_t& p,
                         const float* x, float s) {
  for (; byte < nbytes; ++byte) {
    unsigned m = bits[byte];
    while (m) {
      const int j = __builtin_ctz(m);
      s += load_value<VD>(values, p++) * x[byte * 8 + j];
      m &= m - 1;
    }
  }
  return s;
}

// Columns [8 * byte, in) of a bitmap row written out dense (zeros where pruned), values from p
template <int VD>
inline void decode_bits(const void* values, const uint8_t* bits, int64_t byte, int64_t in, int64_t p, float* dense) {
  std::fill(dense + 8 * byte, dense + in, 0.f);
  for (; 8 * byte < in; ++byte)
    for (unsigned m = bits[byte]; m; m &= m - 1) dense[8 * byte + __builtin_ctz(m)] = load_value<VD>(values, p++);
}

}  // namespace se_values
