// The NEON decode kernel (plugins/cpu/routed_sparse_neon.h) on x86: the very source the library
// compiles natively on aarch64, built here against SIMDe's portable NEON intrinsics, checked
// against a float64 sum on every mask byte next to every other (all 65,536 16-bit patterns) and on
// random rows (tail columns, empty to full rows, rows at the end of the values array), for each
// value type. On aarch64 SIMDe maps the same calls to the real instructions.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/arm/neon.h>

#include <cstdint>
#include <cstdio>
#include <random>

#include "routed_sparse_neon.h"
#include "kernel_rows.h"
#include "quant_rows.h"

namespace {

using se_test::Rows;

template <int VD>
void decode_rows(std::mt19937& gen, int random_sets) {
  auto bitmap = [](const Rows& r, int64_t i) {
    return se_neon::dot_bitmap<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, r.nbytes,
                                   r.row_ptr[i], r.row_ptr[i + 1], r.x.data());
  };
  se_test::check_decode_kernels(gen, random_sets, VD, bitmap);
}

// int8 and int4 codes (rows starting mid-byte, groups of 16-128 columns) against float64
template <int VD>
void decode_quant_rows(std::mt19937& gen, int sets) {
  auto kernel = [](const se_test::QuantRows& r, int64_t i) {
    return se_neon::dot_bitmap_quant<VD>(r.values<VD>(), r.nnz(), r.in, r.bits.data() + i * r.nbytes, r.nbytes,
                                     r.row_ptr[i], r.row_ptr[i + 1], r.x.data(), r.row_scales(i));
  };
  for (int c = 0; c < sets; ++c)
    if (!se_test::check_quant_rows(se_test::random_quant_rows(gen), VD, kernel)) return;
}

}  // namespace

int main() {
  std::mt19937 gen(20261127);
  decode_rows<SE_F32>(gen, 400);
  decode_rows<SE_F16>(gen, 400);
  decode_rows<SE_BF16>(gen, 400);
  decode_quant_rows<SE_I8>(gen, 300);
  decode_quant_rows<SE_I4>(gen, 300);
  if (se_test::failures()) {
    std::printf("%d NEON (emulated) checks failed\n", se_test::failures());
    return 1;
  }
  std::printf("NEON bitmap kernel under SIMDe: 65536 mask patterns x 3 value types, 1200 random row sets and 600 quantized ones agree "
              "with float64\n");
  return 0;
}
