// Expert rows for the tests of the ISA-specific decode kernels (AVX-512, NEON), which are built
// against SIMDe's emulated intrinsics: both formats, values exact in fp32, fp16 and bf16 (so the
// float64 reference needs no rounding model), every 16-bit mask pattern or random rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "expect.h"
#include "random_experts.h"

namespace se_test {

struct Rows {
  int64_t in = 0, nbytes = 0;
  std::vector<uint8_t> bits;
  std::vector<uint16_t> cols;
  std::vector<int64_t> row_ptr{0};
  std::vector<float> v32;  // the values, also stored as:
  std::vector<uint16_t> v16, vb16;
  std::vector<float> x;

  int64_t rows() const { return static_cast<int64_t>(row_ptr.size()) - 1; }
  int64_t nnz() const { return row_ptr.back(); }

  void add_row(const std::vector<bool>& keep, std::mt19937& gen) {
    std::uniform_int_distribution<int> step(-256, 256);  // multiples of 1/64: exact in all three types
    bits.resize(bits.size() + nbytes, 0);
    uint8_t* row = bits.data() + bits.size() - nbytes;
    for (int64_t c = 0; c < in; ++c) {
      if (!keep[c]) continue;
      row[c / 8] |= static_cast<uint8_t>(1u << (c % 8));
      cols.push_back(static_cast<uint16_t>(c));
      add_value(static_cast<float>(step(gen)) / 64.f);
    }
    row_ptr.push_back(static_cast<int64_t>(cols.size()));
  }

  void add_value(float v) {
    v32.push_back(v);
    v16.push_back(to_f16_exact(v));
    vb16.push_back(to_bf16(v));
  }

  template <int VD>
  const void* values() const {
    if constexpr (VD == SE_F32) return v32.data();
    else if constexpr (VD == SE_F16) return v16.data();
    else return vb16.data();
  }
};

// 1024 rows x 64 masks of 16 columns: pattern (row * 64 + q) sits at columns [16q, 16q + 16), so
// every 16-bit mask, and every mask byte next to every other, occurs once
inline Rows every_mask_pattern(std::mt19937& gen) {
  Rows r;
  r.in = 1024;
  r.nbytes = r.in / 8;
  std::uniform_int_distribution<int> xs(-128, 128);
  for (int64_t c = 0; c < r.in; ++c) r.x.push_back(static_cast<float>(xs(gen)) / 32.f);
  for (int64_t row = 0; row < 1024; ++row) {
    std::vector<bool> keep(r.in);
    for (int64_t q = 0; q < 64; ++q)
      for (int b = 0; b < 16; ++b) keep[16 * q + b] = ((row * 64 + q) >> b) & 1;
    r.add_row(keep, gen);
  }
  return r;
}

// 1-12 rows of width 1-333 (tail columns), each empty to full, the last ones at the end of the
// values array (where wide loads would overrun and kernels must fall back to scalar code)
inline Rows random_rows(std::mt19937& gen) {
  std::uniform_int_distribution<int64_t> width(1, 333), count(1, 12);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double densities[] = {0.0, 0.03, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0};
  Rows r;
  r.in = width(gen);
  r.nbytes = (r.in + 7) / 8;
  for (int64_t i = 0; i < r.in; ++i) r.x.push_back(static_cast<float>(u(gen) * 4.0 - 2.0));
  const int64_t rows = count(gen);
  for (int64_t i = 0; i < rows; ++i) {
    const double d = densities[gen() % 8];
    std::vector<bool> keep(r.in);
    for (int64_t j = 0; j < r.in; ++j) keep[j] = u(gen) < d;
    r.add_row(keep, gen);
  }
  return r;
}

// Every row of r through each kernel (kernel(r, row) -> float) vs a float64 sum of the exact
// values; reports the first disagreement. fp32 accumulation: tolerance (terms + 1) ulp-ish of
// the sum of |terms|.
template <class... Kernels>
bool check_rows(const Rows& r, const char* what, int value_dtype, Kernels... kernels) {
  for (int64_t i = 0; i < r.rows(); ++i) {
    const int64_t b = r.row_ptr[i], end = r.row_ptr[i + 1];
    double want = 0.0, scale = 0.0;
    for (int64_t j = b; j < end; ++j) {
      const double term = static_cast<double>(r.v32[j]) * r.x[r.cols[j]];
      want += term;
      scale += std::fabs(term);
    }
    const double tol = 1.2e-7 * static_cast<double>(end - b + 1) * (scale + 1e-30);
    int which = 0;
    const bool ok = ((++which, std::fabs(kernels(r, i) - want) <= tol) && ...);
    if (!ok) {
      std::printf("  %s, value type %d, kernel %d, row %lld of %lld (in %lld, %lld kept): want %.9g\n", what,
                  value_dtype, which, static_cast<long long>(i), static_cast<long long>(r.rows()),
                  static_cast<long long>(r.in), static_cast<long long>(end - b), want);
      expect(false, what);
      return false;
    }
  }
  return true;
}

// Each kernel (kernel(rows, row) -> float) on every 16-bit mask pattern, then on random row sets
// (stopping at the first set with a failure)
template <class... Kernels>
void check_decode_kernels(std::mt19937& gen, int random_sets, int value_dtype, Kernels... kernels) {
  check_rows(every_mask_pattern(gen), "every 16-bit mask pattern", value_dtype, kernels...);
  for (int c = 0; c < random_sets; ++c)
    if (!check_rows(random_rows(gen), "random rows", value_dtype, kernels...)) return;
}

}  // namespace se_test
