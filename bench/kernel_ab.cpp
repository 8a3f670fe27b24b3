// Paired A/B timing of two builds of the CPU kernel library (libse_kernels.so) in one process.
//
// Why: this VM's speed drifts by up to 2x between seconds, so two builds timed one after the other
// (even interleaved run by run) can disagree by more than the change being measured. Here both
// libraries are dlopen'ed side by side and every repetition calls A and B back to back (order
// alternating), and the median of the per-repetition ratios A/B is reported with its quartiles.
//
// Build and run (A = the library of the previous commit, B = the current one; `make plugins` also
// builds it as build/plugins/kernel_ab):
//   g++ -O2 -std=c++17 -Iplugins/cpu bench/kernel_ab.cpp -ldl -o build/kernel_ab
//   build/kernel_ab A.so B.so --shapes 576x1536,1536x576 --sets 1,90 --threads 1,2 --json out.json
// Shapes are in x out; each weight set holds K random experts (--experts, 16) at a density
// (--density, 0.3; bitmap format unless --csr16, fp16 values unless --fp32); --tokens (1) are routed per call
// (e.g. --tokens 512 --experts 1 times the prefill path). With --sets 90 the weights are cold
// (58 MB per call sweep, more than a 32 MB L3), as in a model's decode step. Size the sweep to the
// machine: a Xeon that reports a 300 MB L3 needs 6-16 sets at 4096x11008.
#include "se_kernels.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using MatmulFn = int (*)(const se_experts*, const float*, const float*, const void*, int32_t, int64_t,
                         const int32_t*, int32_t*, void*, int32_t, char*, size_t);

struct WeightSet {
  std::vector<uint16_t> values;  // fp16 values, or pairs of halves of fp32 ones
  std::vector<uint8_t> bitmap;
  std::vector<uint16_t> cols;  // csr16: the column of every value
  std::vector<int32_t> row_ptr;
  std::vector<float> router_weight, router_bias;
  se_experts experts{};
};

WeightSet random_set(int64_t in, int64_t out, int64_t K, double density, bool fp32, bool csr16, std::mt19937& rng) {
  std::uniform_real_distribution<double> uni(0, 1);
  WeightSet s;
  const int64_t row_bytes = (in + 7) / 8;
  s.bitmap.assign(K * out * row_bytes, 0);
  s.row_ptr.resize(K * out);
  int64_t nnz = 0;
  for (int64_t r = 0; r < K * out; ++r) {
    s.row_ptr[r] = static_cast<int32_t>(nnz);
    for (int64_t c = 0; c < in; ++c)
      if (uni(rng) < density) {
        s.bitmap[r * row_bytes + c / 8] |= static_cast<uint8_t>(1u << (c % 8));
        s.cols.push_back(static_cast<uint16_t>(c));
        ++nnz;
      }
  }
  s.values.resize(fp32 ? 2 * nnz : nnz);
  for (int64_t j = 0; j < nnz; ++j) {  // normal numbers of either sign (no denormals)
    if (fp32) {
      const float v = static_cast<float>(uni(rng) + 0.5) * (rng() & 1 ? 1.f : -1.f);
      std::memcpy(&s.values[2 * j], &v, sizeof(v));
    } else {
      s.values[j] = static_cast<uint16_t>(0x3c00u ^ (rng() & 0x83ffu));
    }
  }
  s.router_weight.resize(in * K);
  for (auto& g : s.router_weight) g = static_cast<float>(uni(rng) - 0.5);
  s.router_bias.assign(K, 0.f);
  if (csr16)
    s.experts = se_experts{SE_CSR16, fp32 ? SE_F32 : SE_F16, K, out, in, s.values.data(), nnz, s.cols.data(),
                           static_cast<int64_t>(s.cols.size()), s.row_ptr.data(), nullptr, nullptr, 0};
  else
    s.experts = se_experts{SE_BITMAP, fp32 ? SE_F32 : SE_F16, K, out, in, s.values.data(), nnz, s.bitmap.data(),
                           static_cast<int64_t>(s.bitmap.size()), s.row_ptr.data(), nullptr, nullptr, 0};
  return s;
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream ss(text);
  for (std::string part; std::getline(ss, part, ',');) parts.push_back(part);
  return parts;
}

MatmulFn load(const char* path) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    std::fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
    std::exit(2);
  }
  return reinterpret_cast<MatmulFn>(dlsym(handle, "se_routed_sparse_matmul"));
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * (v.size() - 1))];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: kernel_ab A.so B.so [--shapes 576x1536,...] [--sets 1,90] [--threads 1,2] "
                         "[--reps N] [--fp32] [--csr16] [--tokens T] [--experts K] [--density D] [--json FILE]\n");
    return 2;
  }
  // dlopen keys libraries by path and inode: two copies of one file would share one handle
  const MatmulFn fn[2] = {load(argv[1]), load(argv[2])};
  std::string shapes = "576x1536,1536x576", sets_arg = "1,90", threads_arg = "1,2", json;
  int reps = 0;
  int64_t tokens = 1, experts = 16;
  double density = 0.3;
  bool fp32 = false, csr16 = false;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--shapes") shapes = next();
    else if (a == "--sets") sets_arg = next();
    else if (a == "--threads") threads_arg = next();
    else if (a == "--reps") reps = std::atoi(next().c_str());
    else if (a == "--fp32") fp32 = true;
    else if (a == "--csr16") csr16 = true;
    else if (a == "--tokens") tokens = std::atoll(next().c_str());
    else if (a == "--experts") experts = std::atoll(next().c_str());
    else if (a == "--density") density = std::atof(next().c_str());
    else if (a == "--json") json = next();
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const std::string label = std::string(fp32 ? "fp32" : "fp16") + (csr16 ? " csr16" : "");
  std::mt19937 rng(1);
  std::string rows_json;
  std::printf("| in x out | values | weight sets | threads | A us/call | B us/call | A/B median | A/B quartiles |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---|\n");
  for (const auto& shape : split(shapes)) {
    const int64_t in = std::atoll(shape.c_str()), out = std::atoll(shape.c_str() + shape.find('x') + 1);
    for (const auto& sets_text : split(sets_arg)) {
      const int nsets = std::atoi(sets_text.c_str());
      std::vector<WeightSet> sets;
      for (int s = 0; s < nsets; ++s) sets.push_back(random_set(in, out, experts, density, fp32, csr16, rng));
      std::vector<float> x(tokens * in), y(tokens * out);
      std::vector<int32_t> ids(tokens);
      for (auto& v : x) v = static_cast<float>(rng() % 1000) / 1000.f;
      for (const auto& threads_text : split(threads_arg)) {
        const int threads = std::atoi(threads_text.c_str());
        const int n = reps ? reps : (nsets > 1 ? 40 : 300);
        std::vector<double> t[2], ratio;
        char err[256];
        for (int rep = 0; rep < n; ++rep) {
          double us[2];
          for (int which : {rep % 2, 1 - rep % 2}) {
            const auto t0 = std::chrono::steady_clock::now();
            for (auto& s : sets)
              if (fn[which](&s.experts, s.router_weight.data(), s.router_bias.data(), x.data(), SE_F32, tokens, nullptr,
                            ids.data(), y.data(), threads, err, sizeof(err))) {
                std::fprintf(stderr, "kernel failed: %s\n", err);
                return 1;
              }
            us[which] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / nsets;
            t[which].push_back(us[which]);
          }
          ratio.push_back(us[0] / us[1]);
        }
        const double a = quantile(t[0], 0.5), b = quantile(t[1], 0.5), r = quantile(ratio, 0.5);
        const double q1 = quantile(ratio, 0.25), q3 = quantile(ratio, 0.75);
        std::printf("| %lldx%lld | %s | %d | %d | %.1f | %.1f | %.3f | %.3f-%.3f |\n", static_cast<long long>(in),
                    static_cast<long long>(out), label.c_str(), nsets, threads, a, b, r, q1, q3);
        char row[400];
        std::snprintf(row, sizeof(row),
                      "%s{\"in\": %lld, \"out\": %lld, \"values\": \"%s\", \"sets\": %d, \"threads\": %d, "
                      "\"a_us\": %.2f, \"b_us\": %.2f, \"a_over_b\": %.4f, \"q1\": %.4f, \"q3\": %.4f, \"reps\": %d}",
                      rows_json.empty() ? "" : ",\n  ", static_cast<long long>(in), static_cast<long long>(out),
                      label.c_str(), nsets, threads, a, b, r, q1, q3, n);
        rows_json += row;
      }
    }
  }
  if (!json.empty()) {
    const std::string tmp = json + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", json.c_str());
      return 1;
    }
    std::fprintf(f, "{\"a\": \"%s\", \"b\": \"%s\", \"rows\": [\n  %s\n]}\n", argv[1], argv[2], rows_json.c_str());
    std::fclose(f);
    std::rename(tmp.c_str(), json.c_str());
  }
  return 0;
}
