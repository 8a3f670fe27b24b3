// CPU implementation of se_kernels.h.
//
// Tokens are routed (fp32 scores), grouped by expert (counting sort), and each group runs one
// sparse-times-dense product:
//  * 1-2 tokens in a group (decode): one sparse dot product per (token, row);
//  * more tokens (prefill): the group's activations are transposed to [in, tokens] so every kept
//    weight is broadcast once and multiplied into a tile of up to 32 tokens (vector FMAs).
// Work items (expert group x block of rows) are spread over an OpenMP team or the host's thread
// pool (se_routed_sparse_matmul_on: ONNX Runtime's intra-op pool); small problems run serially.
// On x86 an AVX2/FMA/F16C path is chosen at run time (bitmap bytes expand 8 values with a
// 256-entry table of byte-shuffle controls: one in-lane vpshufb per byte for fp32 values, one
// pshufb for 16-bit ones; csr16 uses gathers; the decode loops prefetch the weight streams), and
// where the CPU has AVX-512F the decode products and the 64-token prefill tile use
// routed_sparse_avx512.h (vexpandps: 16 columns per instruction, no table; 16-lane FMAs);
// aarch64 decodes bitmap rows with NEON table lookups (routed_sparse_neon.h) and runs the portable
// code elsewhere; every other machine runs the portable path, which the compiler vectorizes over
// the token tile.
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
  const int64_t value_bytes = e->value_dtype == SE_F32 ? 4 : 2;
  const int64_t index_bytes = e->format == SE_CSR16 ? 2 * nnz : out * ((e->in_features + 7) / 8);
  return std::max<int64_t>(1, (nnz * value_bytes + index_bytes) / out);
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
// time (BENCHMARKS.md, fifteenth session).
#if SE_X86
constexpr int64_t kFarStreamBytes = int64_t{32} << 10;
constexpr int64_t kNeighbourRowsMaxIn = 1024;
#endif

enum class Isa { Portable, Avx2, Avx512, Neon };
Isa cpu_isa();

// SE_KERNELS_ISA=portable|avx2 caps the path the library takes (tests, A/B timing)
bool isa_capped_at(const char* name) {
  const char* cap = std::getenv("SE_KERNELS_ISA");
  return cap && std::strcmp(cap, name) == 0;
}

// ------------------------------------------------------------------ portable kernels

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
template <int VD, int W>
void row_block_portable(const se_experts* e, const uint8_t* bitmap_row, int64_t c0, int64_t c1, int64_t end,
                        int64_t& pos, const float* xt, float* acc) {
  float part[W] = {};  // block partial sums, added to the row total at the end
  auto add = [&](float v, const float* xr) {
    for (int64_t t = 0; t < W; ++t) part[t] += v * xr[t];
  };
  if (e->format == SE_CSR16) {
    const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
    for (; pos < end && cols[pos] < c1; ++pos) add(load_value<VD>(e->values, pos), xt + cols[pos] * W);
  } else {
    for (int64_t byte = c0 / 8; byte < (c1 + 7) / 8; ++byte) {
      unsigned m = bitmap_row[byte];
      while (m) {
        const int j = __builtin_ctz(m);
        add(load_value<VD>(e->values, pos++), xt + (byte * 8 + j) * W);
        m &= m - 1;
      }
    }
  }
  for (int64_t t = 0; t < W; ++t) acc[t] += part[t];
}

// ------------------------------------------------------------------ AVX2 kernels

#if SE_X86
struct BitmapTables {
  // vpshufb control expanding fp32 values, one 128-bit lane per nibble: the low lane holds the
  // values of the low nibble's set bits, the high lane those of the high nibble; 0x80 zeroes
  alignas(32) uint8_t shuf32[256][32];
  alignas(8) uint8_t cols[256][8];  // positions of the set bits, compacted (branch-free decoding)
  alignas(16) uint8_t shuf16[256][16];  // pshufb control expanding 16-bit values, 0x80 zeroes a lane
  BitmapTables() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (b >> j) & 1;
        const int lane_rank = rank - (j >= 4 ? __builtin_popcount(b & 15) : 0);  // rank within the nibble
        for (int byte = 0; byte < 4; ++byte)
          shuf32[b][4 * j + byte] = static_cast<uint8_t>(set ? 4 * lane_rank + byte : 0x80);
        cols[b][j] = 0;
        shuf16[b][2 * j] = static_cast<uint8_t>(set ? 2 * rank : 0x80);
        shuf16[b][2 * j + 1] = static_cast<uint8_t>(set ? 2 * rank + 1 : 0x80);
        if (set) cols[b][rank++] = static_cast<uint8_t>(j);
      }
    }
  }
};
const BitmapTables kTables;

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline __m256 load8(const void* values, int64_t i) {
  if constexpr (VD == SE_F32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + i);
  } else if constexpr (VD == SE_F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) float dot_csr_avx2(const se_experts* e, int64_t b, int64_t end,
                                                             const float* x) {
  const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;  // two chains: latency hiding, shorter sums
  int64_t j = b;
  for (; j + 16 <= end; j += 16) {
    const __m256i c0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + j)));
    const __m256i c1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + j + 8)));
    acc0 = _mm256_fmadd_ps(load8<VD>(e->values, j), _mm256_i32gather_ps(x, c0, 4), acc0);
    acc1 = _mm256_fmadd_ps(load8<VD>(e->values, j + 8), _mm256_i32gather_ps(x, c1, 4), acc1);
  }
  for (; j + 8 <= end; j += 8) {
    const __m256i c = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + j)));
    acc0 = _mm256_fmadd_ps(load8<VD>(e->values, j), _mm256_i32gather_ps(x, c, 4), acc0);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; j < end; ++j) s += load_value<VD>(e->values, j) * x[cols[j]];
  return s;
}

// acc + (8 packed values from p expanded to the set bits of m) * x[0..8). fp32 values: the low
// and high nibble's values are loaded into the two 128-bit lanes and one vpshufb expands and
// zeroes them (measured 13-15% faster than a vpermps plus a zeroing mask, streaming, 2 threads);
// 16-bit values: one pshufb expands and zeroes in the 16-bit domain before the conversion
// (measured 16% faster per row than permuting after it).
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline __m256 bitmap_byte_avx2(const void* values, int64_t p,
                                                                                 unsigned m, const float* x,
                                                                                 __m256 acc) {
  __m256 w;
  if constexpr (VD == SE_F32) {  // 4 values per nibble: one in-lane byte shuffle expands and zeroes
    const float* v = static_cast<const float*>(values) + p;
    const __m256 halves = _mm256_loadu2_m128(v + _mm_popcnt_u32(m & 15u), v);
    w = _mm256_castsi256_ps(_mm256_shuffle_epi8(
        _mm256_castps_si256(halves), _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.shuf32[m]))));
  } else {
    const __m128i h = _mm_shuffle_epi8(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + p)),
        _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.shuf16[m])));
    if constexpr (VD == SE_F16) {
      w = _mm256_cvtph_ps(h);
    } else {
      w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc);
}

// Byte i of the 8 mask bytes in m, times the 8 columns of x it covers, into acc; p moves past
// the byte's values.
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline __m256 bitmap_step_avx2(const void* values, int64_t& p,
                                                                                 uint64_t m, int i, const float* x,
                                                                                 __m256 acc) {
  const unsigned mi = static_cast<unsigned>(m >> (8 * i)) & 255u;
  acc = bitmap_byte_avx2<VD>(values, p, mi, x + 8 * i, acc);
  p += _mm_popcnt_u32(mi);
  return acc;
}

// One row of a bitmap expert times x: every mask byte expands up to 8 packed values into their
// lanes with one byte shuffle (256-entry table), then one FMA with 8 columns of x. Eight bytes
// per step into eight accumulators: the value offsets are a chain of popcounts, the products are
// independent (eight chains measured 10-15% faster than four, fp32, 4096 x 11008). The
// accumulators are eight named values, not an array: GCC zeroed an array with `rep stos` on the
// stack for every row (15% of a 576-wide row's time in a profile).
template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) float dot_bitmap_avx2(const se_experts* e, const uint8_t* bits,
                                                                           int64_t nbytes, int64_t p, int64_t end,
                                                                           const float* x) {
  const void* v = e->values;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t full = e->in_features / 8;  // bytes whose 8 columns all exist
  int64_t byte = 0;
  if (end + 8 <= e->nnz) {  // every 8-value load of this row stays inside values: no checks
    for (; byte + 8 <= full; byte += 8) {  // eight bytes per step, eight chains
      se_values::prefetch_values<VD>(v, p);
      __builtin_prefetch(bits + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, bits + byte, 8);
      const float* xb = x + byte * 8;
      a0 = bitmap_step_avx2<VD>(v, p, m, 0, xb, a0);
      a1 = bitmap_step_avx2<VD>(v, p, m, 1, xb, a1);
      a2 = bitmap_step_avx2<VD>(v, p, m, 2, xb, a2);
      a3 = bitmap_step_avx2<VD>(v, p, m, 3, xb, a3);
      a4 = bitmap_step_avx2<VD>(v, p, m, 4, xb, a4);
      a5 = bitmap_step_avx2<VD>(v, p, m, 5, xb, a5);
      a6 = bitmap_step_avx2<VD>(v, p, m, 6, xb, a6);
      a7 = bitmap_step_avx2<VD>(v, p, m, 7, xb, a7);
    }
    for (; byte + 2 <= full; byte += 2) {
      const uint64_t m = static_cast<uint64_t>(bits[byte]) | static_cast<uint64_t>(bits[byte + 1]) << 8;
      a0 = bitmap_step_avx2<VD>(v, p, m, 0, x + byte * 8, a0);
      a1 = bitmap_step_avx2<VD>(v, p, m, 1, x + byte * 8, a1);
    }
  }
  for (; byte < full && p + 8 <= e->nnz; ++byte) a0 = bitmap_step_avx2<VD>(v, p, bits[byte], 0, x + byte * 8, a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))));
  return se_values::bitmap_bits<VD>(v, bits, byte, nbytes, p, x, s);  // tail columns, last values of the array
}

// Four bitmap rows in lock step on AVX2: row i's mask bytes at bits + i * stride, its values from
// p[i] up to end[i] (rows in the order of their values), results into out[i]. The AVX-512 path's
// four weight streams per core (se_avx512::dot_bitmap_rows) for CPUs without AVX-512, two
// accumulators per row: paired, DRAM-cold, fp32 30% kept, SE_KERNELS_ISA=avx2 on the Xeon,
// 1.05x at 4096 x 11008 and 1.13x at 11008 x 4096 (BENCHMARKS.md, fifteenth session). Rows whose
// 8-value loads could pass the end of values go one by one.
constexpr int kAvx2LockStepRows = 4;

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) void dot_bitmap_rows_avx2(const se_experts* e,
                                                                               const uint8_t* bits, int64_t stride,
                                                                               int64_t nbytes, const int64_t* p,
                                                                               const int64_t* end, const float* x,
                                                                               float* out) {
  constexpr int R = kAvx2LockStepRows;
  if (end[R - 1] + 8 > e->nnz) {  // rows come in order: the last one ends last
    for (int i = 0; i < R; ++i) out[i] = dot_bitmap_avx2<VD>(e, bits + i * stride, nbytes, p[i], end[i], x);
    return;
  }
  const void* v = e->values;
  __m256 a[R], b[R];
  int64_t pos[R];
  for (int i = 0; i < R; ++i) {
    a[i] = b[i] = _mm256_setzero_ps();
    pos[i] = p[i];
  }
  const int64_t full = e->in_features / 8;
  int64_t byte = 0;
  for (; byte + 8 <= full; byte += 8) {
    const float* xb = x + byte * 8;
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = bits + i * stride;
      se_values::prefetch_values<VD>(v, pos[i]);
      __builtin_prefetch(row + byte + se_values::kPrefetchMaskBytes);
      uint64_t m;
      std::memcpy(&m, row + byte, 8);
      for (int j = 0; j < 8; j += 2) {
        a[i] = bitmap_step_avx2<VD>(v, pos[i], m, j, xb, a[i]);
        b[i] = bitmap_step_avx2<VD>(v, pos[i], m, j + 1, xb, b[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {  // the last whole bytes, then the tail columns bit by bit
    const uint8_t* row = bits + i * stride;
    int64_t c = byte;
    for (; c < full; ++c) a[i] = bitmap_step_avx2<VD>(v, pos[i], row[c], 0, x + c * 8, a[i]);
    out[i] = se_values::bitmap_bits<VD>(v, row, c, nbytes, pos[i], x, hsum(_mm256_add_ps(a[i], b[i])));
  }
}

template <int VD>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) inline float load_value_avx2(const void* values, int64_t i) {
  if constexpr (VD == SE_F16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(values)[i]);
  } else {
    return load_value<VD>(values, i);
  }
}

// row_block_portable with W/8 ymm accumulators (8 or 64 tokens) per kept weight; with Avx512 the
// 64-token tile's multiply-adds run as W/16 zmm FMAs (se_avx512::tile_products) instead
template <int VD, int W, bool Avx512 = false>
__attribute__((target("avx2,fma,f16c,popcnt,bmi"))) void row_block_avx2(const se_experts* e, const uint8_t* bitmap_row,
                                                              int64_t c0, int64_t c1, int64_t end, int64_t& pos,
                                                              const float* xt, float* acc) {
  static_assert(W % 8 == 0 && W <= 64, "the AVX2 tile holds W/8 vectors of 8 tokens");
  constexpr int kRegs = W / 8;
  __m256 a[kRegs];
  for (int i = 0; i < kRegs; ++i) a[i] = _mm256_setzero_ps();  // block partial sums: shorter chains
  auto add = [&](float v, const float* xr) __attribute__((target("avx2,fma"))) {
    const __m256 vv = _mm256_set1_ps(v);
    for (int i = 0; i < kRegs; ++i) a[i] = _mm256_fmadd_ps(vv, _mm256_loadu_ps(xr + 8 * i), a[i]);
  };
  if (e->format == SE_CSR16) {
    const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
    if constexpr (Avx512) {
      int64_t n = 0;
      while (pos + n < end && cols[pos + n] < c1) ++n;
      se_avx512::tile_products<VD, W>(e->values, pos, cols + pos, n, xt, acc);
      pos += n;
      return;
    }
    for (; pos < end && cols[pos] < c1; ++pos) add(load_value_avx2<VD>(e->values, pos), xt + cols[pos] * W);
  } else {  // decode the block's columns without branches (table + popcount), then a linear loop
    alignas(16) uint16_t cols[kColBlock + 8];
    int64_t n = 0;
    for (int64_t byte = c0 / 8; byte < (c1 + 7) / 8; ++byte) {
      const unsigned m = bitmap_row[byte];
      const __m128i idx = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kTables.cols[m])));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cols + n),
                       _mm_add_epi16(idx, _mm_set1_epi16(static_cast<int16_t>(byte * 8 - c0))));
      n += _mm_popcnt_u32(m);
    }
    const float* xb = xt + c0 * W;
    if constexpr (Avx512) {
      se_avx512::tile_products<VD, W>(e->values, pos, cols, n, xb, acc);
      pos += n;
      return;
    }
    for (int64_t j = 0; j < n; ++j) add(load_value_avx2<VD>(e->values, pos + j), xb + cols[j] * W);
    pos += n;
  }
  for (int i = 0; i < kRegs; ++i) _mm256_storeu_ps(acc + 8 * i, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * i), a[i]));
}

// The widest path this CPU runs, capped by SE_KERNELS_ISA=portable|avx2 (tests, A/B timing).
Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (isa_capped_at("portable") || !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt") &&
                           __builtin_cpu_supports("bmi")))
      return Isa::Portable;
    if (isa_capped_at("avx2") || !__builtin_cpu_supports("avx512f")) return Isa::Avx2;
    if (!se_avx512::agrees_with_scalar()) {
      std::fprintf(stderr, "se-export kernels: the AVX-512 path disagreed with a scalar sum on this CPU; "
                           "using AVX2 (please report the CPU model)\n");
      return Isa::Avx2;
    }
    return Isa::Avx512;
  }();
  return isa;
}

bool cpu_has_avx2() { return cpu_isa() != Isa::Portable; }

// Router scores s[0..K) += x G for one token, K <= 64: the scores stay in registers (one 8-lane
// accumulator per 8 experts, two chains over the inputs) instead of a memory array updated for
// every input, which made a 1536 x 16 router take 12 us per token (now ~1 us).
template <int KB>
__attribute__((target("avx2,fma"))) void route_scores_avx2(const float* xv, int64_t in, const float* g, int64_t K,
                                                             float* s) {
  const int tail = static_cast<int>(K % 8);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i tail_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), lanes);
  auto row = [&](const float* gi, int j) __attribute__((target("avx2,fma"))) {
    return (j + 1 < KB || tail == 0) ? _mm256_loadu_ps(gi + 8 * j) : _mm256_maskload_ps(gi + 8 * j, tail_mask);
  };
  __m256 a[KB], c[KB];
  for (int j = 0; j < KB; ++j) a[j] = c[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= in; i += 2) {
    const __m256 x0 = _mm256_set1_ps(xv[i]), x1 = _mm256_set1_ps(xv[i + 1]);
    for (int j = 0; j < KB; ++j) {
      a[j] = _mm256_fmadd_ps(x0, row(g + i * K, j), a[j]);
      c[j] = _mm256_fmadd_ps(x1, row(g + (i + 1) * K, j), c[j]);
    }
  }
  if (i < in) {
    const __m256 x0 = _mm256_set1_ps(xv[i]);
    for (int j = 0; j < KB; ++j) a[j] = _mm256_fmadd_ps(x0, row(g + i * K, j), a[j]);
  }
  for (int j = 0; j < KB; ++j) {
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(a[j], c[j]));
    for (int l = 0; l < 8 && 8 * j + l < K; ++l) s[8 * j + l] += t[l];
  }
}

// route_scores_avx2 for any K <= 64; false when K is larger (the caller's scalar loop runs).
bool route_scores_fast(const float* xv, int64_t in, const float* g, int64_t K, float* s) {
  switch ((K + 7) / 8) {
    case 1: route_scores_avx2<1>(xv, in, g, K, s); return true;
    case 2: route_scores_avx2<2>(xv, in, g, K, s); return true;
    case 3: route_scores_avx2<3>(xv, in, g, K, s); return true;
    case 4: route_scores_avx2<4>(xv, in, g, K, s); return true;
    case 5: route_scores_avx2<5>(xv, in, g, K, s); return true;
    case 6: route_scores_avx2<6>(xv, in, g, K, s); return true;
    case 7: route_scores_avx2<7>(xv, in, g, K, s); return true;
    case 8: route_scores_avx2<8>(xv, in, g, K, s); return true;
    default: return false;
  }
}
#else
Isa cpu_isa() {  // NEON is part of every aarch64 CPU; SE_KERNELS_ISA=portable turns it off
  static const Isa isa = SE_NEON && !isa_capped_at("portable") ? Isa::Neon : Isa::Portable;
  return isa;
}
bool cpu_has_avx2() { return false; }
bool route_scores_fast(const float*, int64_t, const float*, int64_t, float*) { return false; }
#endif

// ------------------------------------------------------------------ driver

template <int VD>
void run_groups(const Problem& pb, const Executor& exec) {
  const se_experts* e = pb.e;
  const int64_t K = e->num_experts, out = e->out_features, in = e->in_features;
  [[maybe_unused]] const Isa isa = cpu_isa();  // unused off x86
  [[maybe_unused]] const bool avx2 = isa != Isa::Portable;
  const uint8_t* bitmap = e->format == SE_BITMAP ? static_cast<const uint8_t*>(e->indices) : nullptr;

  // transposed, zero-padded activations for every group that takes the prefill path
  std::vector<int64_t> ld(K, 0), xt_off(K, 0), width(K, kTile);
  int64_t xt_size = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = pb.start[k + 1] - pb.start[k];
    if (n > kGemvMaxTokens) {
      width[k] = n <= 2 * kSmallTile ? kSmallTile : kTile;
      ld[k] = (n + width[k] - 1) / width[k] * width[k];
      xt_off[k] = xt_size;
      xt_size += ld[k] * in;
    }
  }
  // 64-byte aligned: a token tile's column is 64 floats, so every vector load of it stays inside
  // one cache line (from a plain vector, 16-byte aligned, every 64-byte load straddled two)
  std::vector<float> xt_storage(static_cast<size_t>(xt_size) + 16, 0.f);
  float* const xt = xt_storage.data() + (16 - (reinterpret_cast<uintptr_t>(xt_storage.data()) / 4) % 16) % 16;
  struct Item { int64_t k, r0, r1, t0; };
  std::vector<Item> items;
  std::vector<int64_t> row_bytes(K, 0);  // mean bytes of a row of every expert that decodes
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = pb.start[k + 1] - pb.start[k];
    if (n == 0) continue;
    const int64_t tiles = n > kGemvMaxTokens ? ld[k] / width[k] : 1;
    if (n <= kGemvMaxTokens) row_bytes[k] = mean_row_bytes(e, k);
    const int64_t rows = n > kGemvMaxTokens ? kRowsPerItem : decode_rows_per_item(out, row_bytes[k]);
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t r0 = 0; r0 < out; r0 += rows) items.push_back({k, r0, std::min(out, r0 + rows), t * width[k]});
  }

  auto transpose = [&](int64_t k) {
    if (!ld[k]) return;
      float* dst = xt + xt_off[k];
      for (int64_t i = pb.start[k]; i < pb.start[k + 1]; ++i) {
        const float* src = pb.x + static_cast<int64_t>(pb.order[i]) * in;
        const int64_t t = i - pb.start[k];
        const int64_t w = width[k];
        float* tile = dst + (t / w) * in * w + t % w;  // tile-major: [tile][c][w]
        for (int64_t c = 0; c < in; ++c) tile[c * w] = src[c];
      }
  };
  auto run_item = [&](int64_t it) {
      const Item item = items[it];
      const int64_t k = item.k;
      const int64_t r1 = item.r1;
      const int64_t nbytes = (in + 7) / 8;
      const float* bias = e->bias ? e->bias + k * out : nullptr;
      if (!ld[k]) {  // decode: sparse dot products
#if SE_X86
        constexpr int kRows = se_avx512::kDecodeRows;
        const int64_t len = (r1 - item.r0) / kRows;  // rows per stream of a lock-step group
        const bool far = len * row_bytes[k] >= kFarStreamBytes;
        const bool lock_step = isa == Isa::Avx512 && bitmap && (far || in <= kNeighbourRowsMaxIn);
        const bool far_avx2 = isa == Isa::Avx2 && bitmap && far;
#endif
        for (int64_t i = pb.start[k]; i < pb.start[k + 1]; ++i) {
          const int64_t tok = pb.order[i];
          const float* xv = pb.x + tok * in;
          float* yv = pb.y + tok * out;
          int64_t r = item.r0;
#if SE_X86
          if (lock_step && !far) {  // four neighbouring rows: row j ends where row j + 1 begins
            for (; r + kRows <= r1; r += kRows) {
              int64_t p[kRows + 1];
              for (int j = 0; j < kRows; ++j) p[j] = row_begin(e, k, r + j);
              p[kRows] = row_end(e, k, r + kRows - 1);
              se_avx512::dot_bitmap_rows<VD>(e->values, e->nnz, in, bitmap + (k * out + r) * nbytes, nbytes, nbytes,
                                             p, p + 1, xv, yv + r);
              if (bias)
                for (int j = 0; j < kRows; ++j) yv[r + j] += bias[r + j];
            }
          } else if (lock_step || far_avx2) {  // row q of each quarter of the item
            static_assert(kRows == kAvx2LockStepRows, "both paths split an item into the same quarters");
            for (int64_t q = 0; q < len; ++q) {
              int64_t p[kRows], end[kRows];
              float dots[kRows];
              for (int j = 0; j < kRows; ++j) {
                p[j] = row_begin(e, k, item.r0 + j * len + q);
                end[j] = row_end(e, k, item.r0 + j * len + q);
              }
              const uint8_t* first = bitmap + (k * out + item.r0 + q) * nbytes;
              if (far_avx2)
                dot_bitmap_rows_avx2<VD>(e, first, len * nbytes, nbytes, p, end, xv, dots);
              else
                se_avx512::dot_bitmap_rows<VD>(e->values, e->nnz, in, first, len * nbytes, nbytes, p, end, xv, dots);
              for (int j = 0; j < kRows; ++j) {
                const int64_t row = item.r0 + j * len + q;
                yv[row] = bias ? dots[j] + bias[row] : dots[j];
              }
            }
            r = item.r0 + kRows * len;
          }
#endif
          for (; r < r1; ++r) {
            const int64_t b = row_begin(e, k, r);
            float s;
            if (e->format == SE_CSR16) {
#if SE_X86
              const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
              s = isa == Isa::Avx512 ? se_avx512::dot_csr16<VD>(e->values, cols, b, row_end(e, k, r), xv)
                  : avx2             ? dot_csr_avx2<VD>(e, b, row_end(e, k, r), xv)
                                     : dot_csr_portable<VD>(e, b, row_end(e, k, r), xv);
#else
              s = dot_csr_portable<VD>(e, b, row_end(e, k, r), xv);
#endif
            } else {
              const uint8_t* bits = bitmap + (k * out + r) * nbytes;
#if SE_X86
              s = isa == Isa::Avx512
                      ? se_avx512::dot_bitmap<VD>(e->values, e->nnz, in, bits, nbytes, b, row_end(e, k, r), xv)
                  : avx2 ? dot_bitmap_avx2<VD>(e, bits, nbytes, b, row_end(e, k, r), xv)
                         : dot_bitmap_portable<VD>(e, bits, nbytes, b, xv);
#elif SE_NEON
              s = isa == Isa::Neon ? se_neon::dot_bitmap<VD>(e->values, e->nnz, in, bits, nbytes, b, row_end(e, k, r), xv)
                                   : dot_bitmap_portable<VD>(e, bits, nbytes, b, xv);
#else
              s = dot_bitmap_portable<VD>(e, bits, nbytes, b, xv);
#endif
            }
            yv[r] = bias ? s + bias[r] : s;
          }
        }
        return;
      }
      const float* xtk = xt + xt_off[k] + item.t0 * in;
      const int64_t w = width[k];
      const int64_t n = std::min(w, pb.start[k + 1] - pb.start[k] - item.t0);
      const int32_t* toks = pb.order + pb.start[k] + item.t0;
      const int64_t rows = r1 - item.r0;
      alignas(32) float acc[kRowsPerItem][kTile];
      for (int64_t i = 0; i < rows; ++i) std::fill(acc[i], acc[i] + w, 0.f);
      int64_t pos[kRowsPerItem], ends[kRowsPerItem];
      for (int64_t i = 0; i < rows; ++i) {
        pos[i] = row_begin(e, k, item.r0 + i);
        ends[i] = row_end(e, k, item.r0 + i);
      }
      for (int64_t c0 = 0; c0 < in; c0 += kColBlock) {  // the tile's columns stay in L1 across rows
        const int64_t c1 = std::min(in, c0 + kColBlock);
        for (int64_t i = 0; i < rows; ++i) {
          const uint8_t* bits = bitmap ? bitmap + (k * out + item.r0 + i) * nbytes : nullptr;
#if SE_X86
          if (avx2) {
            if (w == kTile && isa == Isa::Avx512)
              row_block_avx2<VD, kTile, true>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
            else if (w == kTile)
              row_block_avx2<VD, kTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
            else
              row_block_avx2<VD, kSmallTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
            continue;
          }
#endif
          if (w == kTile)
            row_block_portable<VD, kTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
          else
            row_block_portable<VD, kSmallTile>(e, bits, c0, c1, ends[i], pos[i], xtk, acc[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float bv = bias ? bias[item.r0 + i] : 0.f;
        for (int64_t t = 0; t < n; ++t) pb.y[static_cast<int64_t>(toks[t]) * out + item.r0 + i] = acc[i][t] + bv;
      }
  };
  if (xt_size) exec.for_each(K, transpose);
  exec.for_each(static_cast<int64_t>(items.size()), run_item);
}

void fail(char* err, size_t len, const std::string& msg) {
  if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}

int resolve_threads(int32_t threads) {
#if defined(_OPENMP)
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

void to_f32(const void* x, int32_t dtype, int64_t count, std::vector<float>& buf, const float** out) {
  if (dtype == SE_F32) {
    *out = static_cast<const float*>(x);
    return;
  }
  buf.resize(static_cast<size_t>(count));
  const uint16_t* h = static_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < count; ++i) buf[i] = f16_to_f32(h[i]);
  *out = buf.data();
}

void route_f32(const float* x, int64_t tokens, int64_t in, int64_t K, const float* g, const float* b, int32_t* ids,
               const Executor& exec) {
  const bool avx2 = cpu_has_avx2();
  auto route_token = [&](int64_t t) {
    float stack_scores[64];  // no allocation per token for the usual K <= 64
    std::vector<float> heap_scores(K > 64 ? K : 0);
    float* s = K > 64 ? heap_scores.data() : stack_scores;
    std::copy(b, b + K, s);
    const float* xv = x + t * in;
    if (!(avx2 && route_scores_fast(xv, in, g, K, s))) {
      for (int64_t i = 0; i < in; ++i) {
        const float xi = xv[i];
        const float* gi = g + i * K;
        for (int64_t k = 0; k < K; ++k) s[k] += xi * gi[k];
      }
    }
    int64_t best = 0;
    for (int64_t k = 1; k < K; ++k)
      if (s[k] < s[best]) best = k;
    ids[t] = static_cast<int32_t>(best);
  };
  exec.serial_if(tokens * in * K < kSerialWork).for_each(tokens, route_token);
}

}  // namespace se_cpu

using namespace se_cpu;

extern "C" SE_API int se_check_experts(const se_experts* e, char* err, size_t err_len) {
  try {
    if (!e) return fail(err, err_len, "experts pointer is null"), 1;
    if (e->format != SE_BITMAP && e->format != SE_CSR16) return fail(err, err_len, "format must be bitmap or csr16"), 1;
    if (e->value_dtype < SE_F32 || e->value_dtype > SE_BF16) return fail(err, err_len, "values must be fp32, fp16 or bf16"), 1;
    if (e->num_experts < 1 || e->out_features < 1 || e->in_features < 1)
      return fail(err, err_len, "experts, out_features and in_features must be >= 1"), 1;
    if (e->format == SE_CSR16 && e->in_features > 65536)
      return fail(err, err_len, "csr16 holds at most 65536 input features"), 1;
    const int64_t rows = e->num_experts * e->out_features;
    const int64_t nbytes = (e->in_features + 7) / 8;
    if (e->nnz < 0 || e->nnz > rows * e->in_features) return fail(err, err_len, "values has more entries than the experts hold"), 1;
    if (e->format == SE_BITMAP && e->indices_len != rows * nbytes)
      return fail(err, err_len, "bitmap indices must be [K, out, ceil(in/8)] bytes"), 1;
    if (e->format == SE_CSR16 && e->indices_len != e->nnz)
      return fail(err, err_len, "csr16 indices must hold one column per value"), 1;
    int64_t prev = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = e->row_ptr[r];
      if (b < prev || b > e->nnz)
        return fail(err, err_len, "row_ptr entry " + std::to_string(r) + " is out of order or past the values"), 1;
      if (r == 0 && b != 0) return fail(err, err_len, "row_ptr must start at 0"), 1;
      prev = b;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = e->row_ptr[r];
      const int64_t end = r + 1 < rows ? e->row_ptr[r + 1] : e->nnz;
      if (e->format == SE_CSR16) {
        const uint16_t* cols = static_cast<const uint16_t*>(e->indices);
        for (int64_t j = b; j < end; ++j) {
          if (cols[j] >= e->in_features)
            return fail(err, err_len, "csr16 column " + std::to_string(cols[j]) + " >= in_features " +
                                          std::to_string(e->in_features)), 1;
          if (j > b && cols[j] <= cols[j - 1]) return fail(err, err_len, "csr16 columns of a row must increase"), 1;
        }
      } else {
        const uint8_t* bits = static_cast<const uint8_t*>(e->indices) + r * nbytes;
        int64_t count = 0;
        for (int64_t i = 0; i < nbytes; ++i) count += __builtin_popcount(bits[i]);
        const int tail = static_cast<int>(e->in_features % 8);
        if (tail && (bits[nbytes - 1] >> tail))
          return fail(err, err_len, "bitmap marks columns past in_features"), 1;
        if (count != end - b)
          return fail(err, err_len, "bitmap row " + std::to_string(r) + " marks " + std::to_string(count) +
                                        " weights but row_ptr gives " + std::to_string(end - b)), 1;
      }
    }
    return 0;
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

namespace se_cpu {

Executor openmp(int32_t threads) { return Executor{nullptr, nullptr, resolve_threads(threads)}; }

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

int decode_expert(const se_experts* e, int64_t k, float* dense, Executor exec, char* err, size_t err_len);
void decode_rows(const se_experts* e, int64_t k, int64_t first, int64_t last, float* dense, const Executor& exec);

inline int64_t tokens_of(const std::vector<int64_t>& start) { return start.back(); }

inline double expert_density(const se_experts* e, int64_t k) {
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

int routed_sparse_matmul(const se_experts* e, const float* router_weight, const float* router_bias, const void* x,
                         int32_t x_dtype, int64_t tokens, const int32_t* expert_ids_in, int32_t* expert_ids_out,
                         void* y, const Executor& exec, char* err, size_t err_len,
                         const DenseGroups& dense = DenseGroups{}) {
  if (x_dtype != SE_F32 && x_dtype != SE_F16) return fail(err, err_len, "x must be fp32 or fp16"), 1;
  if (tokens < 0) return fail(err, err_len, "negative token count"), 1;
  if (tokens == 0) return 0;
  const int64_t K = e->num_experts, in = e->in_features, out = e->out_features;
  std::vector<float> xbuf;
  const float* x32;
  to_f32(x, x_dtype, tokens * in, xbuf, &x32);
  std::vector<int32_t> ids_buf;
  const int32_t* ids = expert_ids_in;
  if (ids) {
    for (int64_t t = 0; t < tokens; ++t)
      if (ids[t] < 0 || ids[t] >= K)
        return fail(err, err_len, "expert id " + std::to_string(ids[t]) + " at token " + std::to_string(t) +
                                      " is outside [0, " + std::to_string(K) + ")"), 1;
  } else {
    int32_t* dst = expert_ids_out;
    if (!dst) {
      ids_buf.resize(static_cast<size_t>(tokens));
      dst = ids_buf.data();
    }
    route_f32(x32, tokens, in, K, router_weight, router_bias, dst, exec);
    ids = dst;
  }
  if (expert_ids_out && expert_ids_out != ids) std::memcpy(expert_ids_out, ids, sizeof(int32_t) * tokens);
  // counting sort of tokens by expert
  std::vector<int64_t> start(K + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) ++start[ids[t] + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  std::vector<int32_t> order(static_cast<size_t>(tokens));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < tokens; ++t) order[fill[ids[t]]++] = static_cast<int32_t>(t);

  std::vector<float> ybuf;
  float* y32 = x_dtype == SE_F32 ? static_cast<float*>(y) : (ybuf.resize(static_cast<size_t>(tokens * out)), ybuf.data());
  if (dense.on() && tokens >= dense.min_tokens && run_dense_groups(e, x32, y32, order, start, dense, exec, err, err_len))
    return 1;
  Problem pb{e, x32, y32, order.data(), start.data(), (in + 7) / 8};
  const Executor run = exec.serial_if(tokens * (e->nnz / K) < kSerialWork);
  switch (e->value_dtype) {
    case SE_F32: run_groups<SE_F32>(pb, run); break;
    case SE_F16: run_groups<SE_F16>(pb, run); break;
    default: run_groups<SE_BF16>(pb, run); break;
  }
  if (x_dtype == SE_F16) {
    uint16_t* yh = static_cast<uint16_t*>(y);
    for (int64_t i = 0; i < tokens * out; ++i) yh[i] = f32_to_f16(y32[i]);
  }
  return 0;
}

// Row r of expert k into dense[0, in), zeros where pruned: bitmap rows with vexpandps where the
// CPU has AVX-512 (4096 x 11008 at 50%: ~3x faster than the bit-walk), else zeros then every kept
// value at its column (se_values::decode_bits).
template <int VD>
void decode_row(const se_experts* e, int64_t k, int64_t r, float* dense) {
  const int64_t in = e->in_features;
  int64_t p = row_begin(e, k, r);
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

extern "C" SE_API int se_decode_expert(const se_experts* e, int64_t k, float* dense, int32_t threads, char* err,
                                       size_t err_len) {
  try {
    return decode_expert(e, k, dense, openmp(threads), err, err_len);
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_route(const void* x, int32_t x_dtype, int64_t tokens, int64_t in_features, int64_t num_experts,
                               const float* router_weight, const float* router_bias, int32_t* expert_ids,
                               int32_t threads, char* err, size_t err_len) {
  try {
    if (x_dtype != SE_F32 && x_dtype != SE_F16) return fail(err, err_len, "x must be fp32 or fp16"), 1;
    std::vector<float> buf;
    const float* x32;
    to_f32(x, x_dtype, tokens * in_features, buf, &x32);
    route_f32(x32, tokens, in_features, num_experts, router_weight, router_bias, expert_ids, openmp(threads));
    return 0;
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul(const se_experts* e, const float* router_weight, const float* router_bias,
                                              const void* x, int32_t x_dtype, int64_t tokens,
                                              const int32_t* expert_ids_in, int32_t* expert_ids_out, void* y,
                                              int32_t threads, char* err, size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                openmp(threads), err, err_len);
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul_on(const se_experts* e, const float* router_weight,
                                                 const float* router_bias, const void* x, int32_t x_dtype,
                                                 int64_t tokens, const int32_t* expert_ids_in, int32_t* expert_ids_out,
                                                 void* y, se_parallel_for parallel_for, void* pool, char* err,
                                                 size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                Executor{parallel_for, pool, 1}, err, err_len);
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul_gemm_on(const se_experts* e, const float* router_weight,
                                                      const float* router_bias, const void* x, int32_t x_dtype,
                                                      int64_t tokens, const int32_t* expert_ids_in,
                                                      int32_t* expert_ids_out, void* y, se_parallel_for parallel_for,
                                                      void* pool, se_dense_gemm gemm, void* gemm_ctx,
                                                      int64_t min_group_tokens, int64_t gemm_tile_bytes, char* err,
                                                      size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                Executor{parallel_for, pool, 1}, err, err_len,
                                DenseGroups{gemm, gemm_ctx, min_group_tokens, gemm_tile_bytes});
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int se_routed_sparse_matmul_gemm(const se_experts* e, const float* router_weight,
                                                   const float* router_bias, const void* x, int32_t x_dtype,
                                                   int64_t tokens, const int32_t* expert_ids_in,
                                                   int32_t* expert_ids_out, void* y, int32_t threads, se_dense_gemm gemm,
                                                   void* gemm_ctx, int64_t min_group_tokens, int64_t gemm_tile_bytes,
                                                   char* err, size_t err_len) {
  try {
    return routed_sparse_matmul(e, router_weight, router_bias, x, x_dtype, tokens, expert_ids_in, expert_ids_out, y,
                                openmp(threads), err, err_len,
                                DenseGroups{gemm, gemm_ctx, min_group_tokens, gemm_tile_bytes});
  } catch (const std::exception& ex) {
    return fail(err, err_len, ex.what()), 1;
  }
}

extern "C" SE_API int32_t se_kernels_abi(void) { return SE_KERNELS_ABI; }

extern "C" SE_API int64_t se_dense_group_tokens(void) { return SE_DENSE_GROUP_TOKENS; }

extern "C" SE_API double se_dense_group_density(void) { return SE_DENSE_GROUP_DENSITY; }

extern "C" SE_API const char* se_kernel_isa(void) {
  switch (cpu_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Neon: return "neon";
    default: return "portable";
  }
}
