// Portable kernels of the CPU library: scalar loops the compiler vectorizes over the token tile.
// Every machine can run them; SE_KERNELS_ISA=portable forces them (tests).
#pragma once

#include "routed_sparse_common.h"
#include "se_quant.h"

namespace se_cpu {

template <int VD>
float dot_csr_portable(const se_experts* e, int64_t b, int64_t end, const float* x) {
  const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
  float acc = 0.f;
  for (int64_t j = b; j < end; ++j) acc += load_value<VD>(e->values, j) * x[cols[j]];
  return acc;
}

template <int VD>
float dot_bitmap_portable(const se_experts* e, const uint8_t* bits, int64_t nbytes, int64_t p, const float* x) {
  return se_values::bitmap_bits<VD>(e->values, bits, 0, nbytes, p, x, 0.f);
}

// Prefill: acc[0..W) += v * xt[c * W + t] for the row's kept weights with columns in [c0, c1);
// ``pos`` is the row's cursor into values (advanced), xt the tile-major activations (W tokens).
// Quantized values: q gives the row's scales (each kept weight dequantized once for W tokens).
template <int VD, int W>
void row_block_portable(const se_experts* e, const uint8_t* bitmap_row, int64_t c0, int64_t c1, int64_t end,
                        int64_t& pos, const float* xt, float* acc, const se_quant::RowScales* q = nullptr) {
  float part[W] = {};  // block partial sums, added to the row total at the end
  auto add = [&](int64_t col) {
    float v = load_value<VD>(e->values, pos++);
    if constexpr (se_values::kQuantized<VD>) v *= q->at(col);
    const float* xr = xt + col * W;
    for (int64_t t = 0; t < W; ++t) part[t] += v * xr[t];
  };
  if (e->format == SE_CSR16) {
    const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
    while (pos < end && cols[pos] < c1) add(cols[pos]);
  } else {
    for (int64_t byte = c0 / 8; byte < (c1 + 7) / 8; ++byte)
      for (unsigned m = bitmap_row[byte]; m; m &= m - 1) add(byte * 8 + __builtin_ctz(m));
  }
  for (int64_t t = 0; t < W; ++t) acc[t] += part[t];
}

}  // namespace se_cpu
