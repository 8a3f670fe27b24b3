// The AVX-512 decode kernels (plugins/cpu/routed_sparse_avx512.h) on a machine without AVX-512:
// the very source the library compiles natively, built here against SIMDe's portable
// implementations of the intrinsics, and checked against a float64 sum of the decoded values
//  * on every one of the 65,536 16-bit mask patterns, for each value type;
//  * on random rows: widths that are not multiples of 8 or 16 (tail columns), densities from
//    empty to full, and the last rows of the values array (where 16-value loads would overrun
//    and the kernel must fall back to scalar code); bitmap and csr16 alike;
//  * the prefill tile's products (16, 32 and 64 tokens, 0-70 kept weights, tails of 16 values);
//  * and the start-up self-check the library runs before it trusts the AVX-512 path.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#ifndef _mm512_maskz_expand_ps
// SIMDe 0.8.2 has no 512-bit vexpandps. Intel's definition: lane i takes the next packed element
// of a when bit i of k is set, and 0 otherwise.
static inline simde__m512 se_emulated_maskz_expand_ps(simde__mmask16 k, simde__m512 a) {
  float packed[16], lanes[16];
  simde_mm512_storeu_ps(packed, a);
  int next = 0;
  for (int i = 0; i < 16; ++i) lanes[i] = (k >> i) & 1 ? packed[next++] : 0.f;
  return simde_mm512_loadu_ps(lanes);
}
#define _mm512_maskz_expand_ps se_emulated_maskz_expand_ps
#endif

#define SE_AVX512_TARGET
#include "../cpu/routed_sparse_avx512.h"
#include "expect.h"
#include "random_experts.h"

namespace {

// Rows of one expert in both formats, values stored as fp32, fp16 and bf16.
struct Rows {
  int64_t in = 0, nbytes = 0;
  std::vector<uint8_t> bits;
  std::vector<uint16_t> cols;
  std::vector<int64_t> row_ptr{0};
  std::vector<float> v32;
  std::vector<uint16_t> v16, vb16;
  std::vector<float> x;

  void add_row(const std::vector<bool>& keep, std::mt19937& gen) {
    std::uniform_int_distribution<int> step(-256, 256);  // multiples of 1/64, exact in all three types
    bits.resize(bits.size() + nbytes, 0);
    uint8_t* row = bits.data() + bits.size() - nbytes;
    for (int64_t c = 0; c < in; ++c) {
      if (!keep[c]) continue;
      row[c / 8] |= static_cast<uint8_t>(1u << (c % 8));
      cols.push_back(static_cast<uint16_t>(c));
      const float v = static_cast<float>(step(gen)) / 64.f;
      v32.push_back(v);
      v16.push_back(se_test::to_f16_exact(v));
      vb16.push_back(se_test::to_bf16(v));
    }
    row_ptr.push_back(static_cast<int64_t>(cols.size()));
  }
  int64_t rows() const { return static_cast<int64_t>(row_ptr.size()) - 1; }
};

template <int VD>
const void* values_of(const Rows& r) {
  if constexpr (VD == SE_F32) return r.v32.data();
  else if constexpr (VD == SE_F16) return r.v16.data();
  else return r.vb16.data();
}

// Every row of r through both kernels vs a float64 sum; returns the number of rows checked.
template <int VD>
int64_t check_rows(const Rows& r, const char* what) {
  const void* values = values_of<VD>(r);
  const int64_t nnz = r.row_ptr.back();
  for (int64_t i = 0; i < r.rows(); ++i) {
    const int64_t b = r.row_ptr[i], end = r.row_ptr[i + 1];
    double want = 0.0, scale = 0.0;
    for (int64_t j = b; j < end; ++j) {
      const double term = static_cast<double>(se_avx512::load1<VD>(values, j)) * r.x[r.cols[j]];
      want += term;
      scale += std::fabs(term);
    }
    const double tol = 1.2e-7 * static_cast<double>(end - b + 1) * (scale + 1e-30);  // fp32 accumulation
    const float bitmap = se_avx512::dot_bitmap<VD>(values, nnz, r.in, r.bits.data() + i * r.nbytes, r.nbytes, b, end,
                                                   r.x.data());
    const float csr = se_avx512::dot_csr16<VD>(values, r.cols.data(), b, end, r.x.data());
    if (std::fabs(bitmap - want) > tol || std::fabs(csr - want) > tol) {
      std::printf("  %s, value type %d, row %lld of %lld (in %lld, %lld kept): bitmap %.9g csr16 %.9g want %.9g\n",
                  what, VD, static_cast<long long>(i), static_cast<long long>(r.rows()), static_cast<long long>(r.in),
                  static_cast<long long>(end - b), bitmap, csr, want);
      se_test::expect(false, what);
      return i;
    }
  }
  return r.rows();
}

template <int VD>
void every_mask_pattern(std::mt19937& gen) {
  // 1024 rows x 64 masks of 16 columns: pattern (row * 64 + q) sits at columns [16q, 16q + 16)
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
  se_test::expect(check_rows<VD>(r, "every 16-bit mask pattern") == 1024, "all 1024 rows checked");
}

template <int VD>
void random_rows(std::mt19937& gen, int cases) {
  std::uniform_int_distribution<int64_t> width(1, 333), count(1, 12);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double densities[] = {0.0, 0.03, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0};
  for (int c = 0; c < cases; ++c) {
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
    check_rows<VD>(r, "random rows");
  }
}

// The prefill tile: random kept weights (any columns, repeats allowed) times W tokens per column.
template <int VD, int W>
void random_tiles(std::mt19937& gen, int cases) {
  std::uniform_int_distribution<int> count(0, 70), col(0, 149), step(-256, 256);
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  for (int c = 0; c < cases; ++c) {
    Rows r;
    const int n = count(gen);
    for (int j = 0; j < n; ++j) {
      const float v = static_cast<float>(step(gen)) / 64.f;
      r.v32.push_back(v);
      r.v16.push_back(se_test::to_f16_exact(v));
      r.vb16.push_back(se_test::to_bf16(v));
      r.cols.push_back(static_cast<uint16_t>(col(gen)));
    }
    std::vector<float> xt(150 * W), acc(W), before(W);
    for (auto& v : xt) v = static_cast<float>(u(gen));
    for (int t = 0; t < W; ++t) before[t] = acc[t] = static_cast<float>(u(gen));  // products add to acc
    const void* values = values_of<VD>(r);
    se_avx512::tile_products<VD, W>(values, 0, r.cols.data(), n, xt.data(), acc.data());
    for (int t = 0; t < W; ++t) {
      double want = before[t], scale = std::fabs(before[t]);
      for (int j = 0; j < n; ++j) {
        const double term = static_cast<double>(se_avx512::load1<VD>(values, j)) * xt[r.cols[j] * W + t];
        want += term;
        scale += std::fabs(term);
      }
      if (std::fabs(acc[t] - want) > 1.2e-7 * (n + 2) * (scale + 1e-30)) {
        std::printf("  tile W=%d, value type %d, %d weights, token %d: %.9g want %.9g\n", W, VD, n, t, acc[t], want);
        se_test::expect(false, "prefill tile");
        return;
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 gen(20261126);
  every_mask_pattern<SE_F32>(gen);
  every_mask_pattern<SE_F16>(gen);
  every_mask_pattern<SE_BF16>(gen);
  random_rows<SE_F32>(gen, 400);
  random_rows<SE_F16>(gen, 400);
  random_rows<SE_BF16>(gen, 400);
  random_tiles<SE_F32, 64>(gen, 200);
  random_tiles<SE_F16, 64>(gen, 200);
  random_tiles<SE_BF16, 64>(gen, 200);
  random_tiles<SE_F32, 16>(gen, 100);
  random_tiles<SE_F16, 32>(gen, 100);
  se_test::expect(se_avx512::agrees_with_scalar(), "the library's start-up self-check passes");
  if (se_test::failures()) {
    std::printf("%d AVX-512 (emulated) checks failed\n", se_test::failures());
    return 1;
  }
  std::printf("AVX-512 kernels under SIMDe emulation: 65536 mask patterns x 3 value types, 1200 random row sets "
              "(bitmap, csr16), 800 prefill tiles agree with float64\n");
  return 0;
}
