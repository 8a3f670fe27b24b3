// Internal to the CPU kernel library: what its translation units share (not part of the C ABI
// in se_kernels.h). The library's layout: routed_sparse_cpu.cpp (routing, grouping and the
// sparse product's driver), routed_sparse_dense_groups.cpp (large expert groups as decoded dense
// GEMMs, expert decode), routed_sparse_isa.cpp (which path this CPU runs), se_kernels_api.cpp
// (the C exports); the kernels per ISA are headers: routed_sparse_portable.h,
// routed_sparse_avx2.h, routed_sparse_avx512.h, routed_sparse_neon.h.
#pragma once

#include "se_kernels.h"
#include "se_half.h"
#include "se_values.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define SE_X86 1
#include <immintrin.h>

#include "routed_sparse_avx512.h"
#else
#define SE_X86 0
#endif
#if defined(__aarch64__)
#define SE_NEON 1
#include <arm_neon.h>

#include "routed_sparse_neon.h"
#else
#define SE_NEON 0
#endif


namespace se_cpu {

constexpr int64_t kRowsPerItem = 32;  // rows per prefill work item (its register tile's rows)
// Decode work items hold about kDecodeItemBytes of weights. Why: each item starts a new weight
// stream, which the hardware prefetchers must pick up again; a 2-thread read of 60 MB here runs
// 6-9% faster in 2.5 MB runs than in 160 KB ones, and the decode of 4096 x 11008 fp32, 30% kept,
// DRAM-cold, 2 threads, ran 1.04-1.07x faster with 128-512-row items than with 32-row ones
// (bench/kernel_ab.cpp, paired). At least kMinDecodeItems items keep a wide pool busy.
constexpr int64_t kDecodeItemBytes = int64_t{1} << 20;
constexpr int64_t kMinDecodeItems = 32;
constexpr int64_t kTile = 64;       // tokens per register tile in the prefill path
constexpr int64_t kSmallTile = 8;   // tile for groups of at most 16 tokens (no padding to 64)
constexpr int64_t kGemvMaxTokens = 2;
constexpr int64_t kColBlock = 128;  // columns per L1 block of a prefill tile (128 x 64 fp32 = 32 KB)

// ------------------------------------------------------------------ number formats

using se_half::bf16_to_f32;
using se_half::f16_to_f32;
using se_half::f32_to_f16;

using se_values::load_value;

// ------------------------------------------------------------------ problem description

struct Problem {
  const se_experts* e;
  const float* x;         // [tokens, in] fp32
  float* y;               // [tokens, out] fp32
  const int32_t* order;   // tokens sorted by expert
  const int64_t* start;   // [K+1] group offsets into order
  int64_t row_bytes;      // bitmap bytes per row
};

// Where parallel loops run: an OpenMP team, the host's pool (se_parallel_for), or the calling
// thread. Problems below kSerialWork multiply-adds run serially: a fork/join costs more.
constexpr int64_t kSerialWork = 1 << 16;

struct Executor {
  se_parallel_for host = nullptr;
  void* pool = nullptr;
  int threads = 1;  // OpenMP team size when there is no host pool

  Executor serial_if(bool small) const { return small ? Executor{nullptr, nullptr, 1} : *this; }

  template <class F>
  void for_each(int64_t n, F& body) const {
    if (n <= 1 || (!host && threads <= 1)) {
      for (int64_t i = 0; i < n; ++i) body(i);
    } else if (host) {
      host(pool, static_cast<size_t>(n), [](void* ctx, size_t i) { (*static_cast<F*>(ctx))(static_cast<int64_t>(i)); },
           &body);
    } else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) body(i);
    }
  }
};

inline int64_t row_begin(const se_experts* e, int64_t k, int64_t r) { return e->row_ptr[k * e->out_features + r]; }
inline int64_t row_end(const se_experts* e, int64_t k, int64_t r) {
  const int64_t next = k * e->out_features + r + 1;
  return next < e->num_experts * e->out_features ? e->row_ptr[next] : e->nnz;
}

// The mean bytes (values and index) of a row of expert k, at least 1
inline int64_t mean_row_bytes(const se_experts* e, int64_t k) {
  const int64_t out = e->out_features;
  const int64_t nnz = row_end(e, k, out - 1) - row_begin(e, k, 0);
  const int64_t value_bits = e->value_dtype == SE_F32 ? 32 : e->value_dtype == SE_I8 ? 8 : e->value_dtype == SE_I4 ? 4 : 16;
  const int64_t index_bytes = e->format == SE_CSR16 ? 2 * nnz : out * ((e->in_features + 7) / 8);
  const int64_t scale_bytes = e->scales ? 2 * out * ((e->in_features + e->group_size - 1) / e->group_size) : 0;
  return std::max<int64_t>(1, (nnz * value_bits / 8 + index_bytes + scale_bytes) / out);
}

// Rows per decode work item of an expert whose mean row holds row_bytes: row_bytes into
// kDecodeItemBytes, a multiple of kRowsPerItem, from kRowsPerItem up to out / kMinDecodeItems
inline int64_t decode_rows_per_item(int64_t out, int64_t row_bytes) {
  const int64_t most = out / kMinDecodeItems / kRowsPerItem * kRowsPerItem;
  if (most <= kRowsPerItem) return kRowsPerItem;
  return std::clamp(kDecodeItemBytes / row_bytes / kRowsPerItem * kRowsPerItem, kRowsPerItem, most);
}

// The AVX-512 bitmap decode runs four rows in lock step (se_avx512::dot_bitmap_rows). Rows a
// quarter of the work item apart make four weight streams, which a core reads faster than one,
// once each stream (a quarter of the item) holds kFarStreamBytes; DRAM-cold, 2 threads:
// 4096 x 11008 (260 KB streams) 1.3x, 1536 x 576 fp16 (9 KB) 0.94-1.02x, 576 x 1536 fp16 (3 KB)
// 0.88-0.96x against neighbouring rows. Shorter items take four neighbouring rows where rows are
// short (in <= kNeighbourRowsMaxIn: one row ends before its stream gets going), else one row at a
// time (paired with bench/kernel_ab.cpp).
#if SE_X86
constexpr int64_t kFarStreamBytes = int64_t{32} << 10;
constexpr int64_t kNeighbourRowsMaxIn = 1024;
#endif

enum class Isa { Portable, Avx2, Avx512, Neon };
Isa cpu_isa();

// SE_KERNELS_ISA=portable|avx2 caps the path the library takes (tests, A/B timing)
inline bool isa_capped_at(const char* name) {
  const char* cap = std::getenv("SE_KERNELS_ISA");
  return cap && std::strcmp(cap, name) == 0;
}

// ------------------------------------------------------------------ shared entry points

void fail(char* err, size_t len, const std::string& msg);
int resolve_threads(int32_t threads);
Executor openmp(int32_t threads);
void to_f32(const void* x, int32_t dtype, int64_t count, std::vector<float>& buf, const float** out);
void route_f32(const float* x, int64_t tokens, int64_t in, int64_t K, const float* g, const float* b, int32_t* ids,
               const Executor& exec);
bool cpu_has_avx2();
// AVX512-VBMI and -VBMI2 (byte permutes and expansion: the quantized decode's 64-column path);
// SE_KERNELS_ISA=avx512 keeps the AVX-512 path without them (tests, A/B timing)
bool cpu_has_avx512_vbmi2();
// Router scores s[0..K) += x G for one token with AVX2 (K <= 64); false when it cannot.
bool route_scores_fast(const float* xv, int64_t in, const float* g, int64_t K, float* s);

// The host's dense GEMM for large expert groups (se_routed_sparse_matmul_gemm_on); none by default.
struct DenseGroups {
  se_dense_gemm gemm = nullptr;
  void* ctx = nullptr;
  int64_t min_tokens = 0;
  int64_t tile_bytes = 0;  // decoded bytes per GEMM call; <= 0: the whole expert at once
  bool on() const { return gemm != nullptr && min_tokens > 0; }
  // Output rows decoded and multiplied per GEMM call: as many as tile_bytes holds (at least one).
  int64_t tile_rows(int64_t in, int64_t out) const {
    if (tile_bytes <= 0) return out;
    return std::min(out, std::max<int64_t>(1, tile_bytes / (static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(in, 1))));
  }
};

// Every expert with enough tokens and weights as decode + host GEMM (routed_sparse_dense_groups.cpp).
int run_dense_groups(const se_experts* e, const float* x, float* y, std::vector<int32_t>& order,
                     std::vector<int64_t>& start, const DenseGroups& dense, const Executor& exec, char* err,
                     size_t err_len);
int routed_sparse_matmul(const se_experts* e, const float* router_weight, const float* router_bias, const void* x,
                         int32_t x_dtype, int64_t tokens, const int32_t* expert_ids_in, int32_t* expert_ids_out,
                         void* y, const Executor& exec, char* err, size_t err_len,
                         const DenseGroups& dense = DenseGroups{});
int decode_expert(const se_experts* e, int64_t k, float* dense, Executor exec, char* err, size_t err_len);
void decode_rows(const se_experts* e, int64_t k, int64_t first, int64_t last, float* dense, const Executor& exec);
int check_experts(const se_experts* e, char* err, size_t err_len);

}  // namespace se_cpu
