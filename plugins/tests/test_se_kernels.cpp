// C++ check of se_routed_sparse_matmul against a float64 reference built from a dense copy of
// the experts (random_experts.h), for both formats, fp32/fp16/bf16 values, several token counts (decode and
// prefill paths), in_features not a multiple of 8, plus rejection of corrupt inputs. The host-pool
// entry (se_routed_sparse_matmul_on: ONNX Runtime's pool) must give bit-identical results, and the
// host-GEMM entry (se_routed_sparse_matmul_gemm_on) the same product through the host's GEMM.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "se_kernels.h"
#include "random_experts.h"

namespace {

using se_test::Case;

std::atomic<int> pool_calls{0};

// A stand-in host pool: three threads take interleaved indices (another order than OpenMP's).
void thread_pool(void* /*pool*/, size_t count, void (*body)(void*, size_t), void* ctx) {
  ++pool_calls;
  std::vector<std::thread> workers;
  for (size_t w = 0; w < 3; ++w)
    workers.emplace_back([=] {
      for (size_t i = w; i < count; i += 3) body(ctx, i);
    });
  for (auto& t : workers) t.join();
}

// The host GEMM stand-in: a plain loop (c = a w^T), counting the rows it was given.
struct CountingGemm {
  int64_t calls = 0, rows = 0, cols = 0;  // GEMM calls, token rows (m) and output columns (n) summed
  int64_t widest = 0;                     // largest n of a call
  bool fail = false;
};

int reference_gemm(void* ctx, int64_t m, int64_t n, int64_t k, const float* a, const float* w, float* c) {
  auto* g = static_cast<CountingGemm*>(ctx);
  if (g->fail) return 1;
  ++g->calls;
  g->rows += m;
  g->cols += n;
  g->widest = std::max(g->widest, n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t q = 0; q < k; ++q) acc += static_cast<double>(a[i * k + q]) * w[j * k + q];
      c[i * n + j] = static_cast<float>(acc);
    }
  return 0;
}

// se_routed_sparse_matmul_gemm_on: the same product as the sparse kernel (float64 reference), the
// host GEMM called for every expert with >= min tokens and >= SE_DENSE_GROUP_DENSITY kept, for
// exactly those tokens, once per band of output rows when tiled (bands of tile_bytes / (4 in) rows
// covering all of out); a failing GEMM is an error, not a wrong answer.
int check_gemm_entry(const Case& c, se_test::RandomExperts& re, const std::vector<int32_t>& ids,
                     const std::vector<float>& y, int64_t min_tokens, int64_t band_rows) {
  char err[256];
  int failures = 0;
  {
    const int64_t tile_bytes = band_rows * c.in * static_cast<int64_t>(sizeof(float));  // 0: whole expert
    const int64_t band = band_rows > 0 ? std::min(band_rows, c.out) : c.out;
    const int64_t bands = (c.out + band - 1) / band;
    CountingGemm gemm;
    std::vector<float> y_gemm(y.size());
    std::vector<int32_t> ids_gemm(c.tokens);
    if (se_routed_sparse_matmul_gemm_on(&re.e, re.G.data(), re.b.data(), re.x.data(), SE_F32, c.tokens, nullptr,
                                        ids_gemm.data(), y_gemm.data(), thread_pool, nullptr, reference_gemm, &gemm,
                                        min_tokens, tile_bytes, err, sizeof(err))) {
      std::printf("gemm entry failed: %s\n", err);
      return 1;
    }
    if (ids_gemm != ids) ++failures;
    for (size_t i = 0; i < y.size(); ++i) {
      const int64_t t = static_cast<int64_t>(i) / c.out, r = static_cast<int64_t>(i) % c.out;
      if (std::fabs(y_gemm[i] - y[i]) > 1e-4 * (1 + std::fabs(y[i])) + 1e-5 * re.magnitude(t, ids[t], r)) ++failures;
    }
    int64_t expect_calls = 0, expect_rows = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      int64_t n = 0;
      for (int32_t id : ids) n += id == k;
      const int64_t begin = re.e.row_ptr[k * c.out];
      const int64_t end = k + 1 < c.K ? re.e.row_ptr[(k + 1) * c.out] : re.e.nnz;
      const bool dense = static_cast<double>(end - begin) >= SE_DENSE_GROUP_DENSITY * static_cast<double>(c.out * c.in);
      if (dense && n >= min_tokens && c.tokens >= min_tokens) ++expect_calls, expect_rows += n;
    }
    const int64_t experts_dense = expect_calls;
    expect_calls *= bands;
    expect_rows *= bands;
    if (gemm.calls != expect_calls || gemm.rows != expect_rows || gemm.cols != experts_dense * c.out ||
        (experts_dense && gemm.widest != band)) {
      std::printf("gemm calls %lld rows %lld cols %lld widest %lld, expected %lld, %lld, %lld, %lld (min %lld, band %lld)\n",
                  static_cast<long long>(gemm.calls), static_cast<long long>(gemm.rows),
                  static_cast<long long>(gemm.cols), static_cast<long long>(gemm.widest),
                  static_cast<long long>(expect_calls), static_cast<long long>(expect_rows),
                  static_cast<long long>(experts_dense * c.out), static_cast<long long>(band),
                  static_cast<long long>(min_tokens), static_cast<long long>(band_rows));
      ++failures;
    }
    if (expect_calls) {
      gemm.fail = true;
      if (!se_routed_sparse_matmul_gemm_on(&re.e, re.G.data(), re.b.data(), re.x.data(), SE_F32, c.tokens, nullptr,
                                           nullptr, y_gemm.data(), nullptr, nullptr, reference_gemm, &gemm, min_tokens,
                                           tile_bytes, err, sizeof(err)))
        ++failures;
    }
  }
  return failures;
}

int run_case(const Case& c, std::mt19937& rng) {
  se_test::RandomExperts re(c, rng);
  se_experts& e = re.e;
  auto& G = re.G;
  auto& b = re.b;
  auto& x = re.x;
  auto& cols = re.cols;
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
  for (se_parallel_for pool : {static_cast<se_parallel_for>(thread_pool), static_cast<se_parallel_for>(nullptr)}) {
    std::vector<float> y_pool(y.size());
    std::vector<int32_t> ids_pool(c.tokens);
    if (se_routed_sparse_matmul_on(&e, G.data(), b.data(), x.data(), SE_F32, c.tokens, nullptr, ids_pool.data(),
                                   y_pool.data(), pool, nullptr, err, sizeof(err)) ||
        std::memcmp(y_pool.data(), y.data(), y.size() * sizeof(float)) != 0 || ids_pool != ids)
      ++failures;
  }
  for (int64_t min_tokens : {int64_t{1}, int64_t{4}, c.tokens + 1})
    for (int64_t band_rows : {int64_t{0}, int64_t{1}, int64_t{3}, c.out + 5})  // whole, bands, one oversized band
      failures += check_gemm_entry(c, re, ids, y, min_tokens, band_rows);
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t k = ids[t];
    if (!re.routing_ok(t, k)) ++failures;
    for (int64_t r = 0; r < c.out; ++r) {
      const double ref = re.reference(t, k, r);
      if (std::fabs(ref - y[t * c.out + r]) > 1e-4 * (1 + std::fabs(ref)) + 1e-5 * re.magnitude(t, k, r)) ++failures;
    }
  }
  // se_decode_expert: every expert exactly its dense copy (stored values, zeros where pruned)
  std::vector<float> decoded(c.out * c.in);
  for (int64_t k = 0; k < c.K; ++k) {
    if (se_decode_expert(&e, k, decoded.data(), 0, err, sizeof(err))) ++failures;
    for (int64_t i = 0; i < c.out * c.in; ++i)
      if (decoded[i] != static_cast<float>(re.dense[k * c.out * c.in + i])) ++failures;
  }
  if (!se_decode_expert(&e, c.K, decoded.data(), 0, err, sizeof(err))) ++failures;  // k out of range
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
  // enough rows that decode work items hold more than 32 rows, the last one partial; at 1100
  // inputs, fp32, the AVX-512 bitmap decode takes rows a quarter of an item apart in lock step
  // (fp16 there: one row at a time). Few of the large cases: CI runs this under qemu too.
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int dtype : {SE_F32, SE_F16})
      for (int64_t tokens : {1, 2}) {
        failed += run_case({format, dtype, 2, 2100, 300, tokens, 0.3}, rng);
        ++total;
        if (format == SE_BITMAP && tokens == 2) {
          failed += run_case({format, dtype, 2, 3300, 1100, tokens, 0.5}, rng);
          ++total;
        }
      }
  // int8 / int4 codes: group sizes on the vector paths (16, 64) and off them (24), both formats,
  // decode and prefill, rows wide enough for the 64-column loops
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int dtype : {SE_I8, SE_I4})
      for (int64_t group : {16, 24, 64})
        for (int64_t tokens : {1, 2, 70})
          for (double density : {0.0, 0.3, 1.0}) {
            failed += run_case({format, dtype, 3, 21, 203, tokens, density, group}, rng);
            ++total;
          }
  if (pool_calls == 0) {  // the larger cases must have reached the host pool, not run serially
    std::printf("FAIL: se_routed_sparse_matmul_on never used the host pool\n");
    ++failed;
  }
  std::printf("%d/%d cases passed (isa: %s)\n", total - failed, total, se_kernel_isa());
  return failed ? 1 : 0;
}
