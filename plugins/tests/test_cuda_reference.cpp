// CPU checks of the CUDA kernels' indexing and decomposition (no GPU needed, runs in CI):
//  * the shared __host__ __device__ helpers (bitmap words at row ends, lane value offsets, csr16
//    windows, tile plan, int8/int4 code decoding and scale indices);
//  * se_cuda_reference_matmul, which runs the kernels' exact decomposition on the host, against
//    a float64 dense reference and against the CPU kernel library, for the GEMV and the grouped
//    path, both formats, fp32/fp16/bf16 values and int8/int4 codes with group scales, fp32/fp16
//    activations, odd widths (partial words, several 128-column chunks, several 32-word warp
//    passes), expert counts across router chunks, widths across router splits (up to
//    kRouteSplitMax).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "se_half.h"
#include "se_kernels.h"
#include "se_cuda_kernels.h"
#include "se_sparse_index.h"
#include "random_experts.h"

namespace {

int check(bool ok, const char* what) {
  if (!ok) std::printf("FAIL %s\n", what);
  return ok ? 0 : 1;
}

int test_helpers(std::mt19937& rng) {
  int failures = 0;
  std::uniform_int_distribution<int> byte(0, 255);
  for (int64_t in : {1, 7, 8, 9, 31, 32, 33, 45, 100, 257}) {
    const int64_t row_bytes = se_index::bitmap_row_bytes(in);
    std::vector<uint8_t> mem(row_bytes + 8);
    for (auto& v : mem) v = static_cast<uint8_t>(byte(rng));  // bytes past the row are garbage
    int64_t seen = 0;
    for (int64_t w = 0; w < se_index::bitmap_row_words(in) + 1; ++w) {
      const uint32_t word = se_index::bitmap_word(mem.data(), w, row_bytes);
      for (int bit = 0; bit < 32; ++bit) {
        const int64_t col = 32 * w + bit;
        const bool expect = col / 8 < row_bytes && ((mem[col / 8] >> (col % 8)) & 1u);
        failures += check(((word >> bit) & 1u) == expect, "bitmap_word bit");
        seen += expect;
      }
      for (uint32_t wd = word; wd; wd &= wd - 1) failures += check((word >> se_index::lowest_bit(wd)) & 1u, "lowest_bit");
    }
    int64_t pop = 0;
    for (int64_t i = 0; i < row_bytes; ++i) pop += se_index::popcount32(mem[i]);
    failures += check(seen == pop, "bitmap_word covers exactly the row's bytes");
  }
  for (int trial = 0; trial < 200; ++trial) {  // lane-per-column offsets: each set bit's rank
    const uint32_t word = trial == 0 ? 0u : trial == 1 ? 0xffffffffu
                                          : static_cast<uint32_t>(byte(rng)) << 24 | static_cast<uint32_t>(byte(rng)) << 16 |
                                                static_cast<uint32_t>(byte(rng)) << 8 | static_cast<uint32_t>(byte(rng));
    int rank = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const bool set = (word >> lane) & 1u;
      failures += check(se_index::lane_has(word, lane) == set, "lane_has");
      failures += check(se_index::lane_value_offset(word, lane) == rank, "lane_value_offset");
      rank += set;
    }
    failures += check(rank == se_index::popcount32(word), "ranks end at the popcount");
  }
  for (int b = 0; b < 256; ++b) {  // codes: int8 is the byte; int4 value p is nibble p % 2, (n ^ 8) - 8
    const uint8_t byte = static_cast<uint8_t>(b);
    failures += check(se_index::code_of_byte(byte, false, b) == static_cast<int>(static_cast<signed char>(byte)),
                      "int8 code");
    for (int64_t p : {0, 1, 6, 7}) {
      const int nibble = (byte >> (4 * (p % 2))) & 0xf;
      failures += check(se_index::code_of_byte(byte, true, p) == (nibble ^ 8) - 8, "int4 code");
      failures += check(se_index::code_byte_index(true, p) == p / 2 && se_index::code_byte_index(false, p) == p,
                        "code byte index");
    }
  }
  for (int64_t in : {1, 31, 32, 33, 300})  // groups of group_size columns, the last one may be short
    for (int64_t group : {1, 7, 32, 128}) {
      const int64_t groups = se_index::scale_groups(in, group);
      failures += check(groups * group >= in && (groups - 1) * group < in, "scale groups cover the row");
      failures += check(se_index::scale_index(0, in - 1, groups, group) == groups - 1, "last column, last group");
    }
  {  // csr16 window: both bounds and the row's end
    const int64_t c0 = 128;
    failures += check(se_index::in_window(5, 9, 128, c0) && se_index::in_window(5, 9, 191, c0), "window inside");
    failures += check(!se_index::in_window(5, 9, 192, c0) && !se_index::in_window(5, 9, 127, c0), "window edges");
    failures += check(!se_index::in_window(9, 9, 130, c0), "window past the row's end");
  }
  // tile plans of 32 tokens (the default) and of 64 (the kernel's longer tiles): every token of
  // every expert in exactly one tile, inside max_tiles
  for (int trial = 0; trial < 400; ++trial) {
    const int32_t tile_tokens = trial % 2 ? 2 * se_index::kTileTokens : se_index::kTileTokens;
    const int64_t K = 1 + byte(rng) % 20;
    std::vector<int32_t> c(K), offsets(K + 1);
    int64_t tokens = 0;
    for (auto& v : c) tokens += (v = trial % 3 == 0 ? byte(rng) % 3 : byte(rng));
    std::vector<int32_t> tiles(3 * se_index::max_tiles(tokens, K));
    const int64_t n = trial % 2 ? se_index::plan_tiles(c.data(), K, offsets.data(), tiles.data(), tile_tokens)
                                : se_index::plan_tiles(c.data(), K, offsets.data(), tiles.data());
    failures += check(n <= se_index::max_tiles(tokens, K), "tile count within max_tiles");
    failures += check(offsets[K] == tokens, "offsets end at the token count");
    std::vector<int64_t> covered(K, 0);
    int32_t next = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t e = tiles[3 * i], first = tiles[3 * i + 1], len = tiles[3 * i + 2];
      failures += check(len >= 1 && len <= tile_tokens, "tile length in [1, tile_tokens]");
      failures += check(len == tile_tokens || first + len == offsets[e] + c[e], "only an expert's last tile is short");
      failures += check(first == next, "tiles are contiguous slots");
      failures += check(first >= offsets[e] && first + len <= offsets[e] + c[e], "tile inside its expert's slots");
      covered[e] += len;
      next = first + len;
    }
    for (int64_t e = 0; e < K; ++e) failures += check(covered[e] == c[e], "every token of every expert tiled once");
  }
  // router splits: contiguous chunks cover every feature once, none empty, at most kRouteSplitMax;
  // the partial scores fit the rows the workspace reserves, for this token count and any larger
  // one (a workspace sized for a profile's maximum serves every smaller call)
  for (int64_t tokens : {1, 2, 16, 63, 64, 65, 100, 300, 999, 1000, 1023, 1024, 1025, 5000}) {
    failures += check(se_index::route_partial_rows(tokens) <= se_index::route_partial_rows(tokens + 1),
                      "route_partial_rows never shrinks as tokens grow");
    for (int64_t in = 1; in <= 20000; in += in < 600 ? 1 : 97) {
      const int64_t splits = se_index::route_splits(in, tokens), chunk = se_index::route_chunk(in, splits);
      failures += check(splits >= 1 && splits <= se_index::kRouteSplitMax, "route_splits range");
      failures += check(tokens * splits <= se_index::route_partial_rows(tokens), "partial scores fit the workspace");
      failures += check(splits * chunk >= in && (splits - 1) * chunk < in, "route chunks cover the features");
    }
  }
  for (int64_t tokens = 1; tokens <= 4096; ++tokens)
    failures += check(se_index::route_partial_rows(tokens) <= se_index::route_partial_rows(tokens + 1) &&
                          tokens * se_index::route_splits(1 << 20, tokens) <= se_index::route_partial_rows(tokens),
                      "route_partial_rows bounds every token count");
  return failures;
}

int run_case(const se_test::Case& c, int x_dtype, int gemv_max, std::mt19937& rng) {
  se_test::RandomExperts re(c, rng);
  std::vector<uint16_t> x16(re.x.size());
  if (x_dtype == SE_F16) {  // the reference sees the same fp16-rounded activations
    for (size_t i = 0; i < re.x.size(); ++i) {
      x16[i] = se_half::f32_to_f16(re.x[i]);
      re.x[i] = se_half::f16_to_f32(x16[i]);
    }
  }
  const void* x = x_dtype == SE_F32 ? static_cast<const void*>(re.x.data()) : x16.data();
  const size_t ny = static_cast<size_t>(c.tokens * c.out);
  std::vector<float> y32(ny), cpu32(ny);
  std::vector<uint16_t> y16(ny), cpu16(ny);
  void* y = x_dtype == SE_F32 ? static_cast<void*>(y32.data()) : y16.data();
  void* cpu_y = x_dtype == SE_F32 ? static_cast<void*>(cpu32.data()) : cpu16.data();
  std::vector<int32_t> ids(c.tokens), cpu_ids(c.tokens);
  char err[256];
  if (se_cuda_reference_matmul(&re.e, re.G.data(), re.b.data(), x, x_dtype, c.tokens, nullptr, ids.data(), y, gemv_max,
                               err, sizeof(err))) {
    std::printf("reference failed: %s\n", err);
    return 1;
  }
  if (se_routed_sparse_matmul(&re.e, re.G.data(), re.b.data(), x, x_dtype, c.tokens, ids.data(), cpu_ids.data(), cpu_y,
                              1, err, sizeof(err))) {
    std::printf("cpu kernel failed: %s\n", err);
    return 1;
  }
  // fp16 activations: the grouped path hands the tensor cores fp16 weights (code * scale rounded
  // once: 2^-11 of each term, so of sum |w x|, which int8 codes' cancellation can make far larger
  // than |y|); fp32 activations: fp32 accumulation
  const double tol = x_dtype == SE_F32 ? 1e-4 : 4e-3, per_term = x_dtype == SE_F32 ? 1e-5 : 1e-3;
  int failures = 0;
  for (int64_t t = 0; t < c.tokens; ++t) {
    failures += !re.routing_ok(t, ids[t]);
    for (int64_t r = 0; r < c.out; ++r) {
      const size_t i = static_cast<size_t>(t * c.out + r);
      const double got = x_dtype == SE_F32 ? y32[i] : se_half::f16_to_f32(y16[i]);
      const double cpu = x_dtype == SE_F32 ? cpu32[i] : se_half::f16_to_f32(cpu16[i]);
      const double ref = re.reference(t, ids[t], r), bound = tol * (1 + std::fabs(ref)) + per_term * re.magnitude(t, ids[t], r);
      failures += std::fabs(got - ref) > bound;
      failures += std::fabs(got - cpu) > bound;
    }
  }
  // the reference rejects out-of-range ids like every host entry point
  std::vector<int32_t> bad(c.tokens, static_cast<int32_t>(c.K));
  failures += se_cuda_reference_matmul(&re.e, re.G.data(), re.b.data(), x, x_dtype, c.tokens, bad.data(), nullptr, y,
                                       gemv_max, err, sizeof(err)) == 0;
  if (failures)
    std::printf("FAIL format=%d values=%d x=%d K=%lld out=%lld in=%lld tokens=%lld gemv_max=%d: %d mismatches\n",
                c.format, c.value_dtype, x_dtype, static_cast<long long>(c.K), static_cast<long long>(c.out),
                static_cast<long long>(c.in), static_cast<long long>(c.tokens), gemv_max, failures);
  return failures ? 1 : 0;
}

}  // namespace

int main() {
  std::mt19937 rng(4321);
  int failed = test_helpers(rng), total = 1;
  struct Shape {
    int64_t K, out, in;
  };
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int values : {SE_F32, SE_F16, SE_BF16})
      for (int x_dtype : {SE_F32, SE_F16})
        for (Shape s : {Shape{1, 9, 45}, Shape{3, 70, 300}, Shape{9, 17, 1100}, Shape{17, 5, 33}, Shape{4, 3, 5000}})
          for (int64_t tokens : {1, 4, 37})
            for (double density : {0.0, 0.3, 1.0}) {
              if (s.in >= 1100 && (density == 1.0 || tokens == 37)) continue;  // keep the run short
              const int gemv_max = tokens == 4 ? 1 : 0;  // 4 tokens: forced onto the grouped path
              failed += run_case({format, values, s.K, s.out, s.in, tokens, density}, x_dtype, gemv_max, rng);
              ++total;
            }
  // int8 / int4 codes: group sizes below, at and above a bitmap word and a grouped step, one that
  // leaves a short last group, and odd row lengths (int4 rows that start mid-byte)
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int values : {SE_I8, SE_I4})
      for (int x_dtype : {SE_F32, SE_F16})
        for (int64_t group : {1, 7, 32, 48, 128})
          for (Shape s : {Shape{3, 13, 45}, Shape{5, 70, 300}, Shape{2, 9, 1100}})
            for (int64_t tokens : {1, 37}) {
              if (group > s.in) continue;
              const double density = s.in == 300 ? 1.0 : 0.4;
              failed += run_case({format, values, s.K, s.out, s.in, tokens, density, group}, x_dtype, 0, rng);
              ++total;
            }
  std::printf("%d/%d CUDA-reference checks passed\n", total - failed, total);
  return failed ? 1 : 0;
}
