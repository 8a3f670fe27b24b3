// Random packed experts for the C++ tests: both formats, fp32/fp16/bf16 values exactly
// representable in the stored precision or int8/int4 codes with fp16 scales, a float64 dense copy
// for references, random router.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "se_kernels.h"

namespace se_test {

inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // truncation: the reference uses the same stored value
}

inline float from_bf16(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline double decode_f16(uint16_t h) {  // normal fp16 numbers only (what to_f16_exact writes)
  if ((h & 0x7fffu) == 0) return 0.0;
  const double m = 1.0 + (h & 0x3ffu) / 1024.0;
  return ((h & 0x8000u) ? -1.0 : 1.0) * std::ldexp(m, ((h >> 10) & 0x1f) - 15);
}

inline uint16_t to_f16_exact(float v) {  // |v| < 8 in steps of 1/64: exact in fp16
  const float a = std::fabs(v);
  uint16_t h = 0;
  if (a > 0) {
    int e;
    const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    const uint16_t man = static_cast<uint16_t>(std::lround((m * 2.f - 1.f) * 1024.f));
    h = static_cast<uint16_t>(((e - 1 + 15) << 10) | man);
  }
  return static_cast<uint16_t>(h | (v < 0 ? 0x8000 : 0));
}

struct Case {
  int format, value_dtype;
  int64_t K, out, in, tokens;
  double density;
  int64_t group = 0;  // input columns per scale of SE_I8 / SE_I4 values
};

struct RandomExperts {
  Case c;
  std::vector<double> dense;  // [K*out, in]
  std::vector<float> vals32, G, b, bias, x;
  std::vector<uint16_t> vals16, cols, scales;
  std::vector<int8_t> codes;    // SE_I8 values (and SE_I4 codes before packing)
  std::vector<uint8_t> nibbles;  // SE_I4 values
  std::vector<uint8_t> bitmap;
  std::vector<int32_t> row_ptr;
  se_experts e{};

  RandomExperts(const Case& cs, std::mt19937& rng) : c(cs) {
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<double> uni(0, 1);
    const int64_t nb = (c.in + 7) / 8;
    dense.assign(c.K * c.out * c.in, 0.0);
    bitmap.assign(c.K * c.out * nb, 0);
    row_ptr.resize(c.K * c.out);
    const bool quantized = c.value_dtype == SE_I8 || c.value_dtype == SE_I4;
    const int64_t groups = quantized ? (c.in + c.group - 1) / c.group : 0;
    // codes over the full two's-complement range (int8 [-128, 127], int4 [-8, 7]) and scales of
    // either sign, as the full-range grid writes them
    std::uniform_int_distribution<int> code(c.value_dtype == SE_I8 ? -128 : -8, c.value_dtype == SE_I8 ? 127 : 7);
    std::uniform_int_distribution<int> steps(-64, 63);
    for (int64_t r = 0; r < c.K * c.out; ++r) {
      row_ptr[r] = static_cast<int32_t>(quantized ? codes.size() : c.value_dtype == SE_F32 ? vals32.size() : vals16.size());
      for (int64_t g = 0; g < groups; ++g) {
        const int step = steps(rng);
        scales.push_back(to_f16_exact(static_cast<float>(step >= 0 ? step + 1 : step) / 64.f));
      }
      for (int64_t i = 0; i < c.in; ++i) {
        if (uni(rng) >= c.density) continue;
        float v = normal(rng);
        if (quantized) {
          codes.push_back(static_cast<int8_t>(code(rng)));
          dense[r * c.in + i] = static_cast<double>(codes.back()) * decode_f16(scales[r * groups + i / c.group]);
          bitmap[r * nb + i / 8] |= static_cast<uint8_t>(1u << (i % 8));
          cols.push_back(static_cast<uint16_t>(i));
          continue;
        }
        if (c.value_dtype == SE_F32) {
          vals32.push_back(v);
        } else if (c.value_dtype == SE_BF16) {
          vals16.push_back(to_bf16(std::round(v * 64.f) / 64.f));
          v = from_bf16(vals16.back());
        } else {
          v = std::round(v * 64.f) / 64.f;
          vals16.push_back(to_f16_exact(v));
        }
        dense[r * c.in + i] = v;
        bitmap[r * nb + i / 8] |= static_cast<uint8_t>(1u << (i % 8));
        cols.push_back(static_cast<uint16_t>(i));
      }
    }
    for (auto* vec : {&G, &b, &bias, &x}) vec->clear();
    G.resize(c.in * c.K);
    b.resize(c.K);
    bias.resize(c.K * c.out);
    x.resize(c.tokens * c.in);
    for (auto* vec : {&G, &b, &bias, &x})
      for (auto& v : *vec) v = normal(rng);
    e.format = c.format;
    e.value_dtype = c.value_dtype;
    e.num_experts = c.K;
    e.out_features = c.out;
    e.in_features = c.in;
    e.values = c.value_dtype == SE_F32 ? static_cast<const void*>(vals32.data()) : vals16.data();
    e.nnz = c.value_dtype == SE_F32 ? vals32.size() : vals16.size();
    if (quantized) {
      nibbles.assign((codes.size() + 1) / 2, 0);
      for (size_t i = 0; i < codes.size(); ++i)
        nibbles[i / 2] |= static_cast<uint8_t>((static_cast<unsigned>(codes[i]) & 15u) << (i % 2 ? 4 : 0));
      e.values = c.value_dtype == SE_I8 ? static_cast<const void*>(codes.data()) : nibbles.data();
      e.nnz = static_cast<int64_t>(codes.size());
      e.scales = scales.data();
      e.group_size = c.group;
    }
    e.indices = c.format == SE_BITMAP ? static_cast<const void*>(bitmap.data()) : cols.data();
    e.indices_len = c.format == SE_BITMAP ? static_cast<int64_t>(bitmap.size()) : static_cast<int64_t>(cols.size());
    e.row_ptr = row_ptr.data();
    e.bias = bias.data();
  }

  // float64 routing scores of token t
  std::vector<double> scores(int64_t t) const {
    std::vector<double> s(c.K);
    for (int64_t k = 0; k < c.K; ++k) {
      s[k] = b[k];
      for (int64_t i = 0; i < c.in; ++i) s[k] += static_cast<double>(x[t * c.in + i]) * G[i * c.K + k];
    }
    return s;
  }

  // is expert k an acceptable routing of token t (the float64 argmin, or within a near tie of it)
  bool routing_ok(int64_t t, int64_t k) const {
    const auto s = scores(t);
    int64_t best = 0;
    for (int64_t j = 1; j < c.K; ++j)
      if (s[j] < s[best]) best = j;
    return k == best || std::fabs(s[k] - s[best]) <= 1e-3 * (1 + std::fabs(s[best]));
  }

  // float64 y[t, r] for expert k
  double reference(int64_t t, int64_t k, int64_t r) const {
    double ref = bias[k * c.out + r];
    for (int64_t i = 0; i < c.in; ++i) ref += dense[(k * c.out + r) * c.in + i] * x[t * c.in + i];
    return ref;
  }

  // |bias| + sum |w x|: what fp32 accumulation error scales with (int8 codes up to 128 steps make
  // large terms that cancel, so |reference| alone would be too tight a yardstick)
  double magnitude(int64_t t, int64_t k, int64_t r) const {
    double m = std::fabs(bias[k * c.out + r]);
    for (int64_t i = 0; i < c.in; ++i) m += std::fabs(dense[(k * c.out + r) * c.in + i] * x[t * c.in + i]);
    return m;
  }
};

}  // namespace se_test
