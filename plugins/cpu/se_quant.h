// Quantized expert values (SE_I8, SE_I4): the pieces every kernel path shares. A kept weight is
// code * scale, the scale one fp16 per expert, row and group of `group_size` input columns
// (se_kernels.h). The products keep the codes as they are and apply the scale per group: the
// scalar paths sum code * x over a group and multiply once; the vector paths multiply the 16
// columns of x a step covers by their group's scale (group sizes that are powers of two >= 16, so
// a step never straddles two groups). No path writes a dequantized copy of an expert, except
// decode_row, whose caller asked for one (a large prefill group's dense GEMM).
#pragma once

#include <cstdint>
#include <cstring>

#include "se_half.h"
#include "se_kernels.h"
#include "se_values.h"

namespace se_quant {

// The scales of one expert row
struct RowScales {
  const uint16_t* scales;  // fp16 bits [ceil(in / group)]
  int64_t group;           // input columns per scale
  int shift;               // log2(group) when the vector paths take it (a power of two >= 16), else -1
  const float* wide = nullptr;  // the same scales widened to fp32, where a caller looks them up per weight

  float at(int64_t col) const {
    const int64_t g = shift >= 0 ? col >> shift : col / group;
    return wide ? wide[g] : se_half::f16_to_f32(scales[g]);
  }
};

inline int vector_shift(int64_t group) {
  return group >= 16 && (group & (group - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(group)) : -1;
}

inline RowScales row_scales(const se_experts* e, int64_t k, int64_t r) {
  const int64_t groups = (e->in_features + e->group_size - 1) / e->group_size;
  return {e->scales + (k * e->out_features + r) * groups, e->group_size, vector_shift(e->group_size)};
}

// The vector paths widen a row's scales to fp32 once, on the stack, before its loop: at most this
// many groups (in_features / 16 up to 65536 columns); wider rows take the scalar path.
constexpr int64_t kMaxVectorGroups = 4096;

inline int64_t row_groups(const se_experts* e) { return (e->in_features + e->group_size - 1) / e->group_size; }

// Values a 16-code vector load starting at a row's last value may touch past the row's end: an
// int4 load reads the 8 bytes holding 16 nibbles and one more byte when it starts mid-byte.
template <int VD>
constexpr int64_t kVectorSlack = VD == SE_I4 ? 18 : 16;

// Expansion controls of one mask byte: lane j takes byte rank(j) of the packed codes when bit j is
// set, else 0x80. 0x80 plus an offset of at most 16 still yields a zero lane, both for x86's
// pshufb (high bit set) and for NEON's tbl (index >= 16), so a second byte's control is the
// table entry plus the first byte's popcount.
struct ExpandCodes {
  alignas(8) uint8_t ctl[256][8];
  ExpandCodes() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) ctl[m][j] = static_cast<uint8_t>((m >> j) & 1 ? rank++ : 0x80);
    }
  }
};
inline const ExpandCodes kExpandCodes;

// The controls of two mask bytes m0, m1 as 16 bytes (low 8: m0; high 8: m1 offset by m0's values)
inline void expand_controls(unsigned m0, unsigned m1, uint64_t& lo, uint64_t& hi) {
  std::memcpy(&lo, kExpandCodes.ctl[m0], 8);
  std::memcpy(&hi, kExpandCodes.ctl[m1], 8);
  hi += static_cast<uint64_t>(__builtin_popcount(m0)) * 0x0101010101010101ull;
}

// 16 int4 codes from value p, value p in the low nibble (p may be odd: a row starting mid-byte)
// Branch-free: the parity of p is data (a branch on it mispredicted every other step); always
// reads 9 bytes, which kVectorSlack covers.
inline uint64_t nibbles16(const void* values, int64_t p) {
  const uint8_t* b = static_cast<const uint8_t*>(values) + (p >> 1);
  uint64_t u;
  std::memcpy(&u, b, 8);
  const unsigned shift = static_cast<unsigned>(p & 1) * 4;
  return (u >> shift) | ((static_cast<uint64_t>(b[8]) << 56) << (8 - shift));
}

// s + the scaled products of mask bytes [byte, nbytes) of a bitmap row with x, codes from p (advanced)
template <int VD>
inline float bitmap_bits(const void* values, const uint8_t* bits, int64_t byte, int64_t nbytes, int64_t& p,
                         const float* x, const RowScales& q, float s) {
  for (; byte < nbytes; ++byte)
    for (unsigned m = bits[byte]; m; m &= m - 1) {
      const int64_t col = byte * 8 + __builtin_ctz(m);
      s += static_cast<float>(se_values::load_code<VD>(values, p++)) * q.at(col) * x[col];
    }
  return s;
}

// Sum of code * x per group, times the group's scale: a walk over the row's kept columns in order
// (bitmap bits or csr16 columns), one multiply by a scale per group instead of per weight.
class GroupSum {
 public:
  explicit GroupSum(const RowScales& q) : q_(q), end_(q.group) {}
  void add(int64_t col, float product) {
    if (col >= end_) {
      flush();
      group_ = col / q_.group;
      end_ = (group_ + 1) * q_.group;
    }
    part_ += product;
  }
  float total() {
    flush();
    return sum_;
  }

 private:
  void flush() {
    if (part_ != 0.f) sum_ += part_ * se_half::f16_to_f32(q_.scales[group_]);
    part_ = 0.f;
  }
  const RowScales& q_;
  int64_t group_ = 0, end_;
  float part_ = 0.f, sum_ = 0.f;
};

template <int VD>
float dot_bitmap_portable(const void* values, const uint8_t* bits, int64_t nbytes, int64_t p, const float* x,
                          const RowScales& q) {
  GroupSum sum(q);
  for (int64_t byte = 0; byte < nbytes; ++byte)
    for (unsigned m = bits[byte]; m; m &= m - 1) {
      const int64_t col = byte * 8 + __builtin_ctz(m);
      sum.add(col, static_cast<float>(se_values::load_code<VD>(values, p++)) * x[col]);
    }
  return sum.total();
}

template <int VD>
float dot_csr_portable(const void* values, const uint16_t* cols, int64_t b, int64_t end, const float* x,
                       const RowScales& q) {
  GroupSum sum(q);
  for (int64_t j = b; j < end; ++j)
    sum.add(cols[j], static_cast<float>(se_values::load_code<VD>(values, j)) * x[cols[j]]);
  return sum.total();
}

// A row dequantized into dense[0, in), zeros where pruned: csr16 rows take their columns from
// cols[p, end), bitmap rows their set bits from bits (the other pointer is unused and may be null)
template <int VD>
void decode_row(const void* values, bool csr16, const uint8_t* bits, const uint16_t* cols, int64_t in, int64_t p,
                int64_t end, const RowScales& q, float* dense) {
  std::memset(dense, 0, sizeof(float) * static_cast<size_t>(in));
  if (csr16) {
    for (; p < end; ++p) dense[cols[p]] = static_cast<float>(se_values::load_code<VD>(values, p)) * q.at(cols[p]);
    return;
  }
  for (int64_t byte = 0; 8 * byte < in; ++byte)
    for (unsigned m = bits[byte]; m; m &= m - 1) {
      const int64_t col = byte * 8 + __builtin_ctz(m);
      dense[col] = static_cast<float>(se_values::load_code<VD>(values, p++)) * q.at(col);
    }
}

}  // namespace se_quant
