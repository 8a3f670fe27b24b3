// What the memory system leaves the batch-1 decode: on the same DRAM-cold weight sets, one process,
// the variants called in turn (order rotating every repetition), median ms per call:
//   read    a plain sequential read of the expert's bytes (values + bitmap), no decode at all;
//   loads   the decode's access pattern, one row at a time, with no arithmetic: each row's 64-bit
//           mask words and its values loaded 16 at a time, advancing by popcounts, the library's
//           prefetches;
//   decode  the same plus the kernel's arithmetic (vexpandps, FMA with x), one row at a time;
//   library se_routed_sparse_matmul itself (one expert, one token: routing included), which walks
//           four rows a quarter of a work item apart at once.
// Why: the 70% batch-1 target (BENCHMARKS.md) needs the decode within ~10% of the plain read,
// and this separates what the pattern costs from what the arithmetic costs. fp32 values, bitmap
// format, AVX-512 only (on other CPUs it says so and exits 0).
//
//   build/plugins/stream_bound [--shape 4096x11008] [--density 0.3] [--threads 2] [--sets 8]
//                              [--rows-per-item 192] [--reps 40] [--json FILE]
#include "se_kernels.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int64_t kPrefetchValues = 1024;  // as se_values.h
constexpr int64_t kPrefetchMaskBytes = 512;

struct Set {
  std::vector<uint8_t> bitmap;
  std::vector<int32_t> row_ptr;
  std::vector<float> values;
  se_experts experts{};
};

Set random_set(int64_t in, int64_t out, double density, std::mt19937_64& rng) {
  Set s;
  const int64_t nbytes = (in + 7) / 8;
  s.bitmap.assign(static_cast<size_t>(out * nbytes), 0);
  s.row_ptr.resize(static_cast<size_t>(out));
  std::bernoulli_distribution keep(density);
  int64_t nnz = 0;
  for (int64_t r = 0; r < out; ++r) {
    s.row_ptr[r] = static_cast<int32_t>(nnz);
    for (int64_t c = 0; c < in; ++c)
      if (keep(rng)) s.bitmap[r * nbytes + c / 8] |= static_cast<uint8_t>(1u << (c % 8)), ++nnz;
  }
  s.values.assign(static_cast<size_t>(nnz + 64), 0.5f);  // 16-value loads may pass the last value
  s.experts = se_experts{SE_BITMAP, SE_F32, 1, out, in, s.values.data(), nnz, s.bitmap.data(),
                         static_cast<int64_t>(s.bitmap.size()), s.row_ptr.data(), nullptr, nullptr, 0};
  return s;
}

// the 16 lanes' sum (GCC 12's _mm512_reduce_add_ps trips -Wuninitialized)
__attribute__((target("avx512f"))) inline float lane_sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float s = 0.f;
  for (float lane : lanes) s += lane;
  return s;
}

// acc + (the values at p expanded to the set bits of m) * xs[0..16); p moves past them
__attribute__((target("avx512f,popcnt"))) inline __m512 expand_fma(const float* v, int64_t& p, unsigned m,
                                                                    const float* xs, __m512 acc) {
  const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), _mm512_loadu_ps(v + p));
  p += __builtin_popcount(m);
  return _mm512_fmadd_ps(w, _mm512_loadu_ps(xs), acc);
}

// kMode 0: loads only; 1: loads + expand + FMA with x (the kernel's loop). Rows whose width is
// not a multiple of 64 stop at the last full 64 columns (the shapes here have none).
template <int kMode>
__attribute__((target("avx512f,popcnt"))) float row(const Set& s, int64_t in, int64_t r, const float* x) {
  const int64_t nbytes = (in + 7) / 8;
  const uint8_t* bits = s.bitmap.data() + r * nbytes;
  const float* v = s.values.data();
  int64_t p = s.row_ptr[r];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t byte = 0; byte + 8 <= nbytes; byte += 8) {
    __builtin_prefetch(v + p + kPrefetchValues);
    __builtin_prefetch(v + p + kPrefetchValues + 16);
    __builtin_prefetch(bits + byte + kPrefetchMaskBytes);
    uint64_t m;
    std::memcpy(&m, bits + byte, 8);
    const float* xb = x + byte * 8;
    const unsigned m0 = m & 0xffffu, m1 = (m >> 16) & 0xffffu, m2 = (m >> 32) & 0xffffu, m3 = m >> 48;
    if constexpr (kMode == 0) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(v + p)), p += __builtin_popcount(m0);
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(v + p)), p += __builtin_popcount(m1);
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(v + p)), p += __builtin_popcount(m2);
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(v + p)), p += __builtin_popcount(m3);
    } else {
      a0 = expand_fma(v, p, m0, xb, a0), a1 = expand_fma(v, p, m1, xb + 16, a1);
      a2 = expand_fma(v, p, m2, xb + 32, a2), a3 = expand_fma(v, p, m3, xb + 48, a3);
    }
  }
  return lane_sum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <int kMode>
void rows(const Set& s, int64_t in, int64_t out, int64_t per_item, int threads, const float* x, float* y) {
  const int64_t items = (out + per_item - 1) / per_item;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it)
    for (int64_t r = it * per_item; r < std::min(out, (it + 1) * per_item); ++r) y[r] = row<kMode>(s, in, r, x);
}

// every byte of the expert (values, then bitmap) read once in 64-byte loads, threads on contiguous halves
__attribute__((target("avx512f"))) float read_all(const Set& s, int threads) {
  float total = 0.f;
  const struct {
    const char* p;
    int64_t n;
  } parts[2] = {{reinterpret_cast<const char*>(s.values.data()), static_cast<int64_t>(s.values.size() * 4)},
                {reinterpret_cast<const char*>(s.bitmap.data()), static_cast<int64_t>(s.bitmap.size())}};
  for (const auto& part : parts) {
    const int64_t lines = part.n / 64;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      __m512 acc = _mm512_setzero_ps();
      for (int64_t l = lines * t / nt; l < lines * (t + 1) / nt; ++l)
        acc = _mm512_add_ps(acc, _mm512_loadu_ps(reinterpret_cast<const float*>(part.p + 64 * l)));
      total += lane_sum(acc);
    }
  }
  return total;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t in = 4096, out = 11008, per_item = 192;
  double density = 0.3;
  int threads = 2, sets_n = 8, reps = 40;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--shape") {
      const std::string v = next();
      in = std::atoll(v.c_str()), out = std::atoll(v.substr(v.find('x') + 1).c_str());
    } else if (a == "--density") density = std::atof(next().c_str());
    else if (a == "--threads") threads = std::atoi(next().c_str());
    else if (a == "--sets") sets_n = std::atoi(next().c_str());
    else if (a == "--rows-per-item") per_item = std::atoll(next().c_str());
    else if (a == "--reps") reps = std::atoi(next().c_str());
    else if (a == "--json") json = next();
    else {
      std::fprintf(stderr, "unknown argument %s (see the comment at the top of bench/stream_bound.cpp)\n", a.c_str());
      return 2;
    }
  }
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("stream_bound: this CPU has no AVX-512F; nothing to measure\n");
    return 0;
  }
  if (in % 64 || in <= 0 || out <= 0 || sets_n < 1 || reps < 1 || per_item < 1) {
    std::fprintf(stderr, "stream_bound: in must be a positive multiple of 64, the rest positive\n");
    return 2;
  }
  std::mt19937_64 rng(1);
  std::vector<Set> sets;
  for (int s = 0; s < sets_n; ++s) sets.push_back(random_set(in, out, density, rng));
  std::vector<float> x(static_cast<size_t>(in), 0.25f), y(static_cast<size_t>(out));
  std::vector<float> g(static_cast<size_t>(in), 0.f), b(1, 0.f);
  char err[256];
  const char* names[4] = {"read", "loads", "decode", "library"};
  std::vector<double> t[4];
  volatile float sink = 0.f;
  for (int rep = 0; rep < reps; ++rep)
    for (int j = 0; j < 4; ++j) {
      const int v = (j + rep) % 4;
      const Set& s = sets[(rep * 4 + j) % sets_n];
      const auto t0 = std::chrono::steady_clock::now();
      if (v == 0) sink = sink + read_all(s, threads);
      if (v == 1) rows<0>(s, in, out, per_item, threads, x.data(), y.data());
      if (v == 2) rows<1>(s, in, out, per_item, threads, x.data(), y.data());
      if (v == 3 && se_routed_sparse_matmul(&s.experts, g.data(), b.data(), x.data(), SE_F32, 1, nullptr, nullptr,
                                            y.data(), threads, err, sizeof(err))) {
        std::fprintf(stderr, "stream_bound: the library failed: %s\n", err);
        return 1;
      }
      t[v].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3);
    }
  const double bytes = static_cast<double>(sets[0].values.size() * 4 + sets[0].bitmap.size());
  std::printf("%lldx%lld, %.0f%% kept, fp32 bitmap, %.1f MB per call, %d threads, %d sets, %d reps\n",
              static_cast<long long>(in), static_cast<long long>(out), density * 100, bytes / 1e6, threads, sets_n, reps);
  std::printf("| variant | ms | GB/s | x read |\n|---|---:|---:|---:|\n");
  std::string rows_json;
  const double base = median(t[0]);
  for (int v = 0; v < 4; ++v) {
    const double ms = median(t[v]);
    std::printf("| %s | %.3f | %.1f | %.2f |\n", names[v], ms, bytes / ms / 1e6, ms / base);
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s{\"variant\": \"%s\", \"ms\": %.4f, \"gbps\": %.2f, \"x_read\": %.4f}",
                  v ? ",\n  " : "", names[v], ms, bytes / ms / 1e6, ms / base);
    rows_json += buf;
  }
  if (!json.empty()) {  // written beside, then renamed: never a half-written result
    const std::string tmp = json + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f) return std::fprintf(stderr, "stream_bound: cannot write %s\n", tmp.c_str()), 1;
    std::fprintf(f, "{\"in\": %lld, \"out\": %lld, \"density\": %g, \"threads\": %d, \"sets\": %d, \"reps\": %d, "
                    "\"bytes\": %.0f, \"rows\": [\n  %s\n]}\n",
                 static_cast<long long>(in), static_cast<long long>(out), density, threads, sets_n, reps, bytes,
                 rows_json.c_str());
    if (std::fclose(f) || std::rename(tmp.c_str(), json.c_str()))
      return std::fprintf(stderr, "stream_bound: cannot write %s\n", json.c_str()), 1;
  }
  return sink == 12345.f ? 3 : 0;
}
