// C++ check of se_routed_sparse_matmul against a float64 reference built from a dense copy of
// the experts, for both formats, fp32/fp16/bf16 values, several token counts (decode and
// prefill paths), in_features not a multiple of 8, plus rejection of corrupt inputs.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/se_kernels.h"

namespace {

uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // truncation: the reference uses the same stored value
}
float from_bf16(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

struct Case {
  int format, value_dtype;
  int64_t K, out, in, tokens;
  double density;
};

int run_case(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> uni(0, 1);
  const int64_t nb = (c.in + 7) / 8;
  std::vector<double> dense(c.K * c.out * c.in, 0.0);
  std::vector<float> vals32;
  std::vector<uint16_t> vals16;
  std::vector<uint8_t> bitmap(c.K * c.out * nb, 0);
  std::vector<uint16_t> cols;
  std::vector<int32_t> row_ptr(c.K * c.out);
  for (int64_t r = 0; r < c.K * c.out; ++r) {
    row_ptr[r] = static_cast<int32_t>(c.value_dtype == SE_F32 ? vals32.size() : vals16.size());
    for (int64_t i = 0; i < c.in; ++i) {
      if (uni(rng) >= c.density) continue;
      float v = normal(rng);
      if (c.value_dtype == SE_F32) {
        vals32.push_back(v);
      } else {
        // fp16 via bf16-free path: keep values exactly representable in both (multiples of 1/64)
        v = std::round(v * 64.f) / 64.f;
        vals16.push_back(c.value_dtype == SE_BF16 ? to_bf16(v) : 0);
        if (c.value_dtype == SE_BF16) v = from_bf16(vals16.back());
        if (c.value_dtype == SE_F16) {  // encode exactly (|v| < 8, step 1/64 fits fp16)
          const float a = std::fabs(v);
          uint16_t h = 0;
          if (a > 0) {
            int e;
            const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
            const int exp16 = e - 1 + 15;
            const uint16_t man = static_cast<uint16_t>(std::lround((m * 2.f - 1.f) * 1024.f));
            h = static_cast<uint16_t>((exp16 << 10) | man);
          }
          vals16.back() = static_cast<uint16_t>(h | (v < 0 ? 0x8000 : 0));
        }
      }
      dense[r * c.in + i] = v;
      bitmap[r * nb + i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      cols.push_back(static_cast<uint16_t>(i));
    }
  }
  std::vector<float> G(c.in * c.K), b(c.K), bias(c.K * c.out), x(c.tokens * c.in);
  for (auto& v : G) v = normal(rng);
  for (auto& v : b) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  for (auto& v : x) v = normal(rng);

  se_experts e{};
  e.format = c.format;
  e.value_dtype = c.value_dtype;
  e.num_experts = c.K;
  e.out_features = c.out;
  e.in_features = c.in;
  e.values = c.value_dtype == SE_F32 ? static_cast<const void*>(vals32.data()) : vals16.data();
  e.nnz = c.value_dtype == SE_F32 ? vals32.size() : vals16.size();
  e.indices = c.format == SE_BITMAP ? static_cast<const void*>(bitmap.data()) : cols.data();
  e.indices_len = c.format == SE_BITMAP ? static_cast<int64_t>(bitmap.size()) : static_cast<int64_t>(cols.size());
  e.row_ptr = row_ptr.data();
  e.bias = bias.data();
  char err[256];
  if (se_check_experts(&e, err, sizeof(err))) {
    std::printf("unexpected check failure: %s\n", err);
    return 1;
  }
  std::vector<float> y(c.tokens * c.out);
  std::vector<int32_t> ids(c.tokens);
  if (se_routed_sparse_matmul(&e, G.data(), b.data(), x.data(), SE_F32, c.tokens, nullptr, ids.data(), y.data(), 0, err,
                              sizeof(err))) {
    std::printf("kernel failed: %s\n", err);
    return 1;
  }
  int failures = 0;
  for (int64_t t = 0; t < c.tokens; ++t) {
    // reference routing in float64 (a near-tie may differ from fp32: accept either of the two best)
    std::vector<double> s(c.K);
    for (int64_t k = 0; k < c.K; ++k) {
      s[k] = b[k];
      for (int64_t i = 0; i < c.in; ++i) s[k] += static_cast<double>(x[t * c.in + i]) * G[i * c.K + k];
    }
    int64_t best = 0;
    for (int64_t k = 1; k < c.K; ++k)
      if (s[k] < s[best]) best = k;
    const int64_t k = ids[t];
    if (k != best && std::fabs(s[k] - s[best]) > 1e-3 * (1 + std::fabs(s[best]))) ++failures;
    for (int64_t r = 0; r < c.out; ++r) {
      double ref = bias[k * c.out + r];
      for (int64_t i = 0; i < c.in; ++i) ref += dense[(k * c.out + r) * c.in + i] * x[t * c.in + i];
      if (std::fabs(ref - y[t * c.out + r]) > 1e-4 * (1 + std::fabs(ref))) ++failures;
    }
  }
  // corrupt inputs are rejected before any kernel runs
  std::vector<int32_t> bad_ids(c.tokens, static_cast<int32_t>(c.K));
  if (!se_routed_sparse_matmul(&e, G.data(), b.data(), x.data(), SE_F32, c.tokens, bad_ids.data(), nullptr, y.data(), 0,
                               err, sizeof(err)))
    ++failures;
  if (c.format == SE_CSR16 && !cols.empty()) {
    const uint16_t saved = cols[0];
    cols[0] = static_cast<uint16_t>(c.in);
    if (!se_check_experts(&e, err, sizeof(err))) ++failures;
    cols[0] = saved;
  }
  if (failures)
    std::printf("FAIL format=%d dtype=%d K=%lld out=%lld in=%lld tokens=%lld: %d mismatches\n", c.format, c.value_dtype,
                static_cast<long long>(c.K), static_cast<long long>(c.out), static_cast<long long>(c.in),
                static_cast<long long>(c.tokens), failures);
  return failures ? 1 : 0;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int failed = 0, total = 0;
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int dtype : {SE_F32, SE_F16, SE_BF16})
      for (int64_t tokens : {1, 2, 3, 70, 150})
        for (double density : {0.0, 0.1, 0.5, 1.0}) {
          failed += run_case({format, dtype, 3, 37, 45, tokens, density}, rng);
          ++total;
        }
  std::printf("%d/%d cases passed (isa: %s)\n", total - failed, total, se_kernel_isa());
  return failed ? 1 : 0;
}
