// Quantized expert rows for the tests of the ISA-specific decode kernels (AVX-512, NEON, built
// against SIMDe's emulated intrinsics): random bitmap rows of int8 codes and of the same codes as
// int4 nibbles (rows start mid-byte whenever the previous rows hold an odd count), fp16 scales per
// group of a power-of-two size, and a float64 reference of code * scale * x.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "expect.h"
#include "random_experts.h"
#include "se_half.h"
#include "se_quant.h"

namespace se_test {

struct QuantRows {
  int64_t in = 0, nbytes = 0, group = 16, groups = 1;
  std::vector<uint8_t> bits;
  std::vector<int8_t> codes;   // SE_I8 values
  std::vector<uint8_t> nibbles;  // SE_I4 values (two per byte)
  std::vector<uint16_t> scales;  // [rows, groups] fp16
  std::vector<int64_t> row_ptr{0};
  std::vector<float> x;

  int64_t rows() const { return static_cast<int64_t>(row_ptr.size()) - 1; }
  int64_t nnz() const { return row_ptr.back(); }
  template <int VD>
  const void* values() const {
    if constexpr (VD == SE_I8) return codes.data();
    else return nibbles.data();
  }
  se_quant::RowScales row_scales(int64_t row) const {
    return {scales.data() + row * groups, group, se_quant::vector_shift(group)};
  }
};

// 1-12 rows of width 16-700, empty to full, codes in the int4 range [-8, 7] (shared by both
// widths), group sizes 16-128, the last rows at the end of the values array
inline QuantRows random_quant_rows(std::mt19937& gen) {
  std::uniform_int_distribution<int64_t> width(16, 700), count(1, 12);
  std::uniform_int_distribution<int> code(-8, 7), steps(1, 64);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double densities[] = {0.0, 0.1, 0.3, 0.5, 0.7, 1.0};
  const int64_t group_sizes[] = {16, 32, 64, 128};
  QuantRows r;
  r.in = width(gen);
  r.nbytes = (r.in + 7) / 8;
  r.group = std::min(group_sizes[gen() % 4], r.in / 16 * 16);
  r.groups = (r.in + r.group - 1) / r.group;
  for (int64_t i = 0; i < r.in; ++i) r.x.push_back(static_cast<float>(u(gen) * 4.0 - 2.0));
  const int64_t rows = count(gen);
  for (int64_t i = 0; i < rows; ++i) {
    const double d = densities[gen() % 6];
    r.bits.resize(r.bits.size() + r.nbytes, 0);
    uint8_t* row = r.bits.data() + r.bits.size() - r.nbytes;
    for (int64_t c = 0; c < r.in; ++c)
      if (u(gen) < d) {
        row[c / 8] |= static_cast<uint8_t>(1u << (c % 8));
        r.codes.push_back(static_cast<int8_t>(code(gen)));
      }
    r.row_ptr.push_back(static_cast<int64_t>(r.codes.size()));
    for (int64_t g = 0; g < r.groups; ++g)  // either sign, as the full-range grid writes them
      r.scales.push_back(to_f16_exact(static_cast<float>(steps(gen) * (g % 2 ? -1 : 1)) / 64.f));
  }
  r.nibbles.assign((r.codes.size() + 1) / 2, 0);
  for (size_t i = 0; i < r.codes.size(); ++i)
    r.nibbles[i / 2] |= static_cast<uint8_t>((static_cast<unsigned>(r.codes[i]) & 15u) << (i % 2 ? 4 : 0));
  return r;
}

// Every row through kernel(r, row) -> float against a float64 sum of code * scale * x
template <class Kernel>
bool check_quant_rows(const QuantRows& r, int value_dtype, Kernel kernel) {
  for (int64_t i = 0; i < r.rows(); ++i) {
    double want = 0.0, size = 0.0;
    int64_t p = r.row_ptr[i];
    for (int64_t c = 0; c < r.in; ++c)
      if ((r.bits[i * r.nbytes + c / 8] >> (c % 8)) & 1) {
        const double term = r.codes[p++] * static_cast<double>(se_half::f16_to_f32(r.scales[i * r.groups + c / r.group])) * r.x[c];
        want += term;
        size += std::fabs(term);
      }
    const double tol = 1.2e-7 * static_cast<double>(r.row_ptr[i + 1] - r.row_ptr[i] + 1) * (size + 1e-30);
    if (std::fabs(kernel(r, i) - want) > tol) {
      std::printf("  quantized rows, value type %d, row %lld of %lld (in %lld, group %lld): want %.9g\n", value_dtype,
                  static_cast<long long>(i), static_cast<long long>(r.rows()), static_cast<long long>(r.in),
                  static_cast<long long>(r.group), want);
      expect(false, "quantized rows");
      return false;
    }
  }
  return true;
}

}  // namespace se_test
