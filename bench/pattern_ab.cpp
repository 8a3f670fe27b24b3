// Batch-1 time of the bitmap kernel on 2:4 rows against unstructured 50% rows, paired in one process.
//
// Why: bench/kernel_speed.py measured 2:4 rows at 1.33-1.48x the dense speed against 1.50-1.61x for
// unstructured 50%, at the same bytes, which suggested that an N:M format (fixed offsets, no
// popcounts) could pay. Those were separate timing loops in one run; here the two patterns are timed
// back to back in every repetition (order alternating), on DRAM-cold weight sets, and the median
// of the per-repetition ratios is reported.
//
// `make plugins` builds it (build/plugins/pattern_ab, beside the library it links):
//   build/plugins/pattern_ab --threads 1,2 --json bench/results/pattern_ab_xeon.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "se_kernels.h"

namespace {

struct WeightSet {
  std::vector<float> values;
  std::vector<uint8_t> bits;
  std::vector<int32_t> row_ptr;
  std::vector<float> router_weight, router_bias;
  se_experts experts{};
};

// One expert [out, in]; two of every four columns kept (two_four) or each column with probability 1/2.
WeightSet random_set(int64_t in, int64_t out, bool two_four, std::mt19937& rng) {
  WeightSet s;
  const int64_t row_bytes = (in + 7) / 8;
  s.bits.assign(out * row_bytes, 0);
  s.row_ptr.resize(out);
  int64_t nnz = 0;
  for (int64_t r = 0; r < out; ++r) {
    s.row_ptr[r] = static_cast<int32_t>(nnz);
    for (int64_t c0 = 0; c0 < in; c0 += 4) {
      bool keep[4] = {false, false, false, false};
      if (two_four) {
        const unsigned a = rng() % 4u, b = (a + 1u + rng() % 3u) % 4u;
        keep[a] = keep[b] = true;
      } else {
        for (auto& k : keep) k = rng() & 1u;
      }
      for (int j = 0; j < 4 && c0 + j < in; ++j)
        if (keep[j]) {
          s.bits[r * row_bytes + (c0 + j) / 8] |= static_cast<uint8_t>(1u << ((c0 + j) % 8));
          ++nnz;
        }
    }
  }
  s.values.resize(nnz);
  for (auto& v : s.values) v = static_cast<float>(rng() % 1000u) / 1000.f + 0.5f;
  s.router_weight.assign(in, 0.f);
  s.router_bias.assign(1, 0.f);
  s.experts = se_experts{SE_BITMAP, SE_F32, 1, out, in, s.values.data(), nnz, s.bits.data(),
                         static_cast<int64_t>(s.bits.size()), s.row_ptr.data(), nullptr, nullptr, 0};
  return s;
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1))];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t in = 4096, out = 11008;
  int sets_per_pattern = 6, reps = 60;  // 6 x 90 MB per pattern: DRAM-cold on a 300 MB L3
  std::vector<int> threads_list = {1, 2};
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : "";
    if (a == "--shape") in = std::atoll(next), out = std::atoll(std::strchr(next, 'x') + 1), ++i;
    else if (a == "--sets") sets_per_pattern = std::atoi(next), ++i;
    else if (a == "--reps") reps = std::atoi(next), ++i;
    else if (a == "--json") json = next, ++i;
    else if (a == "--threads") {
      threads_list.clear();
      for (const char* p = next; *p; ++p) {
        threads_list.push_back(std::atoi(p));
        while (*p && *p != ',') ++p;
        if (!*p) break;
      }
      ++i;
    } else {
      std::fprintf(stderr, "usage: pattern_ab [--shape INxOUT] [--sets N] [--reps N] [--threads 1,2] [--json FILE]\n");
      return 2;
    }
  }
  std::mt19937 rng(1);
  std::vector<WeightSet> sets[2];  // [0] unstructured 50%, [1] 2:4
  for (int s = 0; s < sets_per_pattern; ++s)
    for (int p = 0; p < 2; ++p) sets[p].push_back(random_set(in, out, p == 1, rng));
  std::vector<float> x(in), y(out);
  for (auto& v : x) v = static_cast<float>(rng() % 1000u) / 1000.f;
  std::vector<int32_t> ids(1);
  char err[256];
  std::string rows;
  std::printf("| in x out | threads | unstructured 50%% us | 2:4 us | 2:4 / unstructured (median) | quartiles |\n");
  std::printf("|---|---:|---:|---:|---:|---|\n");
  for (int threads : threads_list) {
    std::vector<double> t[2], ratio;
    for (int rep = 0; rep < reps; ++rep) {
      double us[2];
      for (int p : {rep % 2, 1 - rep % 2}) {
        const auto t0 = std::chrono::steady_clock::now();
        for (auto& s : sets[p])
          if (se_routed_sparse_matmul(&s.experts, s.router_weight.data(), s.router_bias.data(), x.data(), SE_F32, 1,
                                      nullptr, ids.data(), y.data(), threads, err, sizeof(err))) {
            std::fprintf(stderr, "kernel failed: %s\n", err);
            return 1;
          }
        us[p] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
                sets_per_pattern;
        t[p].push_back(us[p]);
      }
      ratio.push_back(us[1] / us[0]);
    }
    const double r = quantile(ratio, 0.5), q1 = quantile(ratio, 0.25), q3 = quantile(ratio, 0.75);
    std::printf("| %lldx%lld | %d | %.0f | %.0f | %.3f | %.3f-%.3f |\n", static_cast<long long>(in),
                static_cast<long long>(out), threads, quantile(t[0], 0.5), quantile(t[1], 0.5), r, q1, q3);
    char row[256];
    std::snprintf(row, sizeof(row),
                  "%s{\"in\": %lld, \"out\": %lld, \"threads\": %d, \"unstructured_us\": %.1f, \"two_four_us\": %.1f, "
                  "\"ratio\": %.4f, \"q1\": %.4f, \"q3\": %.4f, \"reps\": %d}",
                  rows.empty() ? "" : ",\n  ", static_cast<long long>(in), static_cast<long long>(out), threads,
                  quantile(t[0], 0.5), quantile(t[1], 0.5), r, q1, q3, reps);
    rows += row;
  }
  if (!json.empty()) {
    const std::string tmp = json + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f || std::fprintf(f, "{\"isa\": \"%s\", \"rows\": [\n  %s\n]}\n", se_kernel_isa(), rows.c_str()) < 0 ||
        std::fclose(f) != 0 || std::rename(tmp.c_str(), json.c_str()) != 0) {
      std::fprintf(stderr, "cannot write %s\n", json.c_str());
      return 1;
    }
  }
  return 0;
}
