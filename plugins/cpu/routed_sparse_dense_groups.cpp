// Large expert groups as decoded dense GEMMs (prefill at moderate sparsity, where a tuned dense
// GEMM beats the sparse tile), and decoding experts to dense rows. The host passes its GEMM
// (se_routed_sparse_matmul_gemm[_on]); the policy is SE_DENSE_GROUP_TOKENS/_DENSITY in se_kernels.h.
#include "routed_sparse_common.h"

namespace se_cpu {

static int64_t tokens_of(const std::vector<int64_t>& start) { return start.back(); }

static double expert_density(const se_experts* e, int64_t k) {
  const int64_t end = k + 1 < e->num_experts ? row_begin(e, k + 1, 0) : e->nnz;
  return static_cast<double>(end - row_begin(e, k, 0)) / static_cast<double>(e->out_features * e->in_features);
}

// Runs every expert with enough tokens and weights as decode + gather + host GEMM + scatter (+ bias)
// into y, and removes its tokens from (order, start) so the sparse kernel skips them. With a tile,
// the expert is decoded and multiplied a band of output rows at a time, so the scratch kept per
// thread is a band, not the whole expert.
int run_dense_groups(const se_experts* e, const float* x, float* y, std::vector<int32_t>& order,
                     std::vector<int64_t>& start, const DenseGroups& dense, const Executor& exec, char* err,
                     size_t err_len) {
  const int64_t K = e->num_experts, in = e->in_features, out = e->out_features;
  std::vector<char> taken(static_cast<size_t>(K), 0);
  bool any = false;
  // Buffers per thread, reused across calls and layers: a fresh out x in (or tokens x out) buffer
  // per call costs page faults and zero fills comparable to the decode itself.
  thread_local std::vector<float> weight, a, c;
  auto reserve = [](std::vector<float>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  };
  const int64_t tile = dense.tile_rows(in, out);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = start[k + 1] - start[k];
    if (n < dense.min_tokens || expert_density(e, k) < SE_DENSE_GROUP_DENSITY) continue;
    reserve(weight, tile * in);
    const int32_t* toks = order.data() + start[k];
    // all tokens in their own order (one expert took the whole call): no gather, no scatter
    const bool whole = n == tokens_of(start) && toks[0] == 0 && toks[n - 1] == n - 1;
    const float* rows = x;
    if (!whole) {
      reserve(a, n * in);
      for (int64_t t = 0; t < n; ++t) std::memcpy(&a[t * in], x + static_cast<int64_t>(toks[t]) * in, sizeof(float) * in);
      rows = a.data();
    }
    const bool direct = whole && tile == out;
    if (!direct) reserve(c, n * tile);
    const float* bias = e->bias ? e->bias + k * out : nullptr;
    for (int64_t r0 = 0; r0 < out; r0 += tile) {
      const int64_t w = std::min(tile, out - r0);
      decode_rows(e, k, r0, r0 + w, weight.data(), exec);
      float* result = direct ? y : c.data();
      if (dense.gemm(dense.ctx, n, w, in, rows, weight.data(), result))
        return fail(err, err_len, "the host's dense GEMM failed for expert " + std::to_string(k)), 1;
      for (int64_t t = 0; t < n; ++t) {
        float* dst = y + static_cast<int64_t>(toks[t]) * out + r0;
        const float* src = result + t * w;
        if (bias)
          for (int64_t r = 0; r < w; ++r) dst[r] = src[r] + bias[r0 + r];
        else if (!direct)
          std::memcpy(dst, src, sizeof(float) * w);
      }
    }
    taken[k] = 1;
    any = true;
  }
  if (!any) return 0;
  std::vector<int32_t> kept;
  std::vector<int64_t> kept_start(static_cast<size_t>(K + 1), 0);
  for (int64_t k = 0; k < K; ++k) {
    if (!taken[k]) kept.insert(kept.end(), order.begin() + start[k], order.begin() + start[k + 1]);
    kept_start[k + 1] = static_cast<int64_t>(kept.size());
  }
  order.swap(kept);
  start.swap(kept_start);
  return 0;
}

// Row r of expert k into dense[0, in), zeros where pruned: bitmap rows with vexpandps where the
// CPU has AVX-512 (4096 x 11008 at 50%: ~3x faster than the bit-walk), else zeros then every kept
// value at its column (se_values::decode_bits).
template <int VD>
void decode_row(const se_experts* e, int64_t k, int64_t r, float* dense) {
  const int64_t in = e->in_features;
  int64_t p = row_begin(e, k, r);
  if constexpr (se_values::kQuantized<VD>) {
    const bool csr = e->format == SE_CSR16;
    const auto* bits = csr ? nullptr : static_cast<const uint8_t*>(e->indices) + (k * e->out_features + r) * ((in + 7) / 8);
    se_quant::decode_row<VD>(e->values, csr, bits, static_cast<const uint16_t*>(e->indices), in, p, row_end(e, k, r),
                             se_quant::row_scales(e, k, r), dense);
    return;
  }
  if (e->format == SE_CSR16) {
    std::fill(dense, dense + in, 0.f);
    const auto* cols = static_cast<const uint16_t*>(e->indices);
    for (const int64_t end = row_end(e, k, r); p < end; ++p) dense[cols[p]] = se_values::load_value<VD>(e->values, p);
    return;
  }
  const auto* bits = static_cast<const uint8_t*>(e->indices) + (k * e->out_features + r) * ((in + 7) / 8);
#if SE_X86
  if (cpu_isa() == Isa::Avx512) return se_avx512::decode_bitmap_row<VD>(e->values, e->nnz, in, bits, p, dense);
#endif
  se_values::decode_bits<VD>(e->values, bits, 0, in, p, dense);
}

// Rows [first, last) of expert k into dense (row first at dense[0]), on exec's threads.
void decode_rows(const se_experts* e, int64_t k, int64_t first, int64_t last, float* dense, const Executor& exec) {
  const int64_t in = e->in_features;
  const int64_t block = 64;  // rows per task
  auto body = [&](int64_t t) {
    for (int64_t r = first + t * block; r < std::min(last, first + (t + 1) * block); ++r) {
      float* row = dense + (r - first) * in;
      if (e->value_dtype == SE_F32) decode_row<SE_F32>(e, k, r, row);
      else if (e->value_dtype == SE_F16) decode_row<SE_F16>(e, k, r, row);
      else if (e->value_dtype == SE_I8) decode_row<SE_I8>(e, k, r, row);
      else if (e->value_dtype == SE_I4) decode_row<SE_I4>(e, k, r, row);
      else decode_row<SE_BF16>(e, k, r, row);
    }
  };
  exec.serial_if((last - first) * in < kSerialWork).for_each((last - first + block - 1) / block, body);
}

int decode_expert(const se_experts* e, int64_t k, float* dense, Executor exec, char* err, size_t err_len) {
  if (k < 0 || k >= e->num_experts) return fail(err, err_len, "expert index out of range"), 1;
  decode_rows(e, k, 0, e->out_features, dense, exec);
  return 0;
}

}  // namespace se_cpu
