// The AVX-512 decode kernels (plugins/cpu/routed_sparse_avx512.h) on a machine without AVX-512:
// the very source the library compiles natively, built here against SIMDe's portable
// implementations of the intrinsics, and checked against a float64 sum of the decoded values
//  * on every one of the 65,536 16-bit mask patterns, for each value type;
//  * the bitmap decode of several rows in lock step (every row position in its group);
//  * on random rows: widths that are not multiples of 8 or 16 (tail columns), densities from
//    empty to full, and the last rows of the values array (where 16-value loads would overrun
//    and the kernel must fall back to scalar code); bitmap and csr16 alike;
//  * the dense decode of bitmap rows (exact, every column);
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

#ifndef _mm512_cvtepi8_epi32
// Nor vpmovsxbd: lane i is byte i of a, sign-extended to 32 bits.
static inline simde__m512i se_emulated_cvtepi8_epi32(simde__m128i a) {
  int8_t bytes[16];
  int32_t lanes[16];
  simde_mm_storeu_si128(reinterpret_cast<simde__m128i*>(bytes), a);
  for (int i = 0; i < 16; ++i) lanes[i] = bytes[i];
  return simde_mm512_loadu_si512(lanes);
}
#define _mm512_cvtepi8_epi32 se_emulated_cvtepi8_epi32
#endif

#ifndef _mm512_maskz_expand_epi8
// Nor the VBMI2 byte expansion and the masked byte load (AVX512-BW): Intel's definitions.
static inline simde__m512i se_emulated_maskz_expand_epi8(uint64_t k, simde__m512i a) {
  int8_t packed[64], lanes[64];
  simde_mm512_storeu_si512(packed, a);
  int next = 0;
  for (int i = 0; i < 64; ++i) lanes[i] = (k >> i) & 1 ? packed[next++] : 0;
  return simde_mm512_loadu_si512(lanes);
}
#define _mm512_maskz_expand_epi8 se_emulated_maskz_expand_epi8
#endif
#ifndef _mm512_maskz_loadu_epi8
static inline simde__m512i se_emulated_maskz_loadu_epi8(uint64_t k, const void* p) {
  int8_t lanes[64];
  for (int i = 0; i < 64; ++i) lanes[i] = (k >> i) & 1 ? static_cast<const int8_t*>(p)[i] : 0;
  return simde_mm512_loadu_si512(lanes);
}
#define _mm512_maskz_loadu_epi8 se_emulated_maskz_loadu_epi8
#endif

#define SE_AVX512_VBMI_TARGET
#define SE_AVX512_TARGET
#include "routed_sparse_avx512.h"
#include "kernel_rows.h"
#include "quant_rows.h"

namespace {

using se_test::Rows;

template <int VD>
void decode_rows(std::mt19937& gen, int random_sets) {
  auto bitmap = [](const Rows& r, int64_t i) {
    return se_avx512::dot_bitmap<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, r.nbytes,
                                     r.row_ptr[i], r.row_ptr[i + 1], r.x.data());
  };
  auto csr16 = [](const Rows& r, int64_t i) {
    return se_avx512::dot_csr16<VD>(r.values<VD>(), r.cols.data(), r.row_ptr[i], r.row_ptr[i + 1], r.x.data());
  };
  // row i in a lock-step group whose rows are d apart (i, i + d, i + 2d, i + 3d), as the library
  // groups neighbouring rows (d = 1) or rows a quarter of a work item apart; the largest d that
  // fits the set, so both kinds and the rows at the end of values are met. Every lane is checked.
  auto bitmap_rows = [bitmap](const Rows& r, int64_t i) {
    constexpr int n = se_avx512::kDecodeRows;
    const int64_t d = (r.rows() - 1 - i) / (n - 1);
    if (d < 1) return bitmap(r, i);
    int64_t p[n], end[n], row[n];
    float out[n];
    for (int j = 0; j < n; ++j) row[j] = i + j * d, p[j] = r.row_ptr[row[j]], end[j] = r.row_ptr[row[j] + 1];
    se_avx512::dot_bitmap_rows<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, d * r.nbytes,
                                   r.nbytes, p, end, r.x.data(), out);
    for (int j = 1; j < n; ++j) {  // the other lanes against their rows' float64 sums (check_rows' bound)
      double want = 0.0, scale = 0.0;
      for (int64_t q = p[j]; q < end[j]; ++q) {
        const double term = static_cast<double>(r.v32[q]) * r.x[r.cols[q]];
        want += term, scale += std::fabs(term);
      }
      if (std::fabs(out[j] - want) > 1.2e-7 * static_cast<double>(end[j] - p[j] + 1) * (scale + 1e-30))
        return std::nanf("");
    }
    return out[0];
  };
  se_test::check_decode_kernels(gen, random_sets, VD, bitmap, csr16, bitmap_rows);
}

// The dense decode of bitmap rows (the PyTorch binding's large prefill groups): exact, every
// column either its kept value or zero
template <int VD>
void dense_rows(std::mt19937& gen, int random_sets) {
  auto check = [](const Rows& r, const char* what) {
    std::vector<float> dense(r.in), want(r.in);
    for (int64_t i = 0; i < r.rows(); ++i) {
      std::fill(dense.begin(), dense.end(), std::nanf(""));
      se_avx512::decode_bitmap_row<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, r.row_ptr[i],
                                       dense.data());
      std::fill(want.begin(), want.end(), 0.f);
      for (int64_t j = r.row_ptr[i]; j < r.row_ptr[i + 1]; ++j) want[r.cols[j]] = r.v32[j];
      for (int64_t c = 0; c < r.in; ++c)
        if (!(dense[c] == want[c])) {
          std::printf("  %s, value type %d, row %lld column %lld of %lld: %.9g want %.9g\n", what, VD,
                      static_cast<long long>(i), static_cast<long long>(c), static_cast<long long>(r.in), dense[c],
                      want[c]);
          se_test::expect(false, what);
          return false;
        }
    }
    return true;
  };
  check(se_test::every_mask_pattern(gen), "dense decode, every 16-bit mask pattern");
  for (int c = 0; c < random_sets; ++c)
    if (!check(se_test::random_rows(gen), "dense decode, random rows")) return;
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
      r.add_value(v);
      r.cols.push_back(static_cast<uint16_t>(col(gen)));
    }
    std::vector<float> xt(150 * W), acc(W), before(W);
    for (auto& v : xt) v = static_cast<float>(u(gen));
    for (int t = 0; t < W; ++t) before[t] = acc[t] = static_cast<float>(u(gen));  // products add to acc
    const void* values = r.values<VD>();
    se_avx512::tile_products<VD, W>(values, 0, r.cols.data(), n, xt.data(), acc.data());
    for (int t = 0; t < W; ++t) {
      double want = before[t], scale = std::fabs(before[t]);
      for (int j = 0; j < n; ++j) {
        const double term = static_cast<double>(se_avx512::load_value<VD>(values, j)) * xt[r.cols[j] * W + t];
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

// int8 and int4 codes (rows starting mid-byte, groups of 16-128 columns) against float64
template <int VD>
void decode_quant_rows(std::mt19937& gen, int sets) {
  auto kernel = [](const se_test::QuantRows& r, int64_t i) {
    return se_avx512::dot_bitmap_quant<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, r.nbytes,
                                     r.row_ptr[i], r.row_ptr[i + 1], r.x.data(), r.row_scales(i));
  };
  auto kernel64 = [](const se_test::QuantRows& r, int64_t i) {  // the VBMI2 path
    return se_avx512::dot_bitmap_quant64<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, r.nbytes,
                                             r.row_ptr[i], r.row_ptr[i + 1], r.x.data(), r.row_scales(i));
  };
  for (int c = 0; c < sets; ++c) {
    const se_test::QuantRows rows = se_test::random_quant_rows(gen);
    if (!se_test::check_quant_rows(rows, VD, kernel) || !se_test::check_quant_rows(rows, VD, kernel64)) return;
  }
}

}  // namespace

int main() {
  std::mt19937 gen(20261126);
  decode_rows<SE_F32>(gen, 400);
  decode_rows<SE_F16>(gen, 400);
  decode_rows<SE_BF16>(gen, 400);
  decode_quant_rows<SE_I8>(gen, 300);
  decode_quant_rows<SE_I4>(gen, 300);
  dense_rows<SE_F32>(gen, 200);
  dense_rows<SE_F16>(gen, 200);
  dense_rows<SE_BF16>(gen, 200);
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
              "(bitmap, csr16), 600 quantized row sets, 800 prefill tiles agree with float64; dense decode exact on all "
              "patterns and 600 row sets\n");
  return 0;
}
