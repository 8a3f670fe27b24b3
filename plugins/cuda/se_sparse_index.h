// Indexing helpers shared by the CUDA kernels (device) and their CPU references and tests (host).
//
// Everything that decides *which* weight meets *which* activation lives here, so CI (no GPU) runs
// the exact indexing code the kernels run: bitmap words, row extents, lane value offsets, the
// csr16 column window of a grouped step and the expert tile plan of the grouped (prefill) path.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SE_HD __host__ __device__ __forceinline__
#else
#define SE_HD inline
#endif

namespace se_index {

constexpr int kWarp = 32;
constexpr int kTileTokens = 32;   // tokens per grouped tile (the kernel's tensor-core path takes 2x)
constexpr int kTileRows = 64;     // output rows per grouped block
constexpr int kTileCols = 64;     // columns of the expert decoded per grouped step

// Router decomposition: a token's input features are split into route_splits(in, tokens)
// contiguous chunks of route_chunk(in, splits) features, one block of kRouteThreads threads each;
// each block scores kRouteChunk experts per pass. The split count aims at kRouteBlocks blocks per
// call: a decode step's router then runs on many SMs, and a long prefill keeps one block per token
// (its tokens fill the GPU already, and the partial scores stay small). The splits' partial scores
// are summed in split order, so the device and the reference agree on the sum.
constexpr int kRouteThreads = 256;
constexpr int kRouteChunk = 16;
constexpr int64_t kRouteSplitMax = 16;
constexpr int64_t kRouteBlocks = 1024;

// Splits the token count allows: kRouteBlocks / tokens, rounded up, at most kRouteSplitMax.
SE_HD int64_t route_splits_for_tokens(int64_t tokens) {
  const int64_t t = tokens < 1 ? 1 : tokens;
  const int64_t by_tokens = (kRouteBlocks + t - 1) / t;
  return by_tokens < kRouteSplitMax ? by_tokens : kRouteSplitMax;
}

SE_HD int64_t route_splits(int64_t in, int64_t tokens) {
  const int64_t by_width = (in + kRouteThreads - 1) / kRouteThreads;  // at least a feature per thread
  const int64_t by_tokens = route_splits_for_tokens(tokens);
  const int64_t splits = by_width < by_tokens ? by_width : by_tokens;
  return splits < 1 ? 1 : splits;
}

SE_HD int64_t route_chunk(int64_t in, int64_t splits) { return (in + splits - 1) / splits; }

// Rows of partial scores (tokens x splits) the workspace reserves for `tokens` tokens: at least
// tokens * route_splits(in, tokens) for every `in`, and non-decreasing in `tokens`, so a workspace
// sized for a profile's largest token count (TensorRT) holds every smaller call.
SE_HD int64_t route_partial_rows(int64_t tokens) {
  const int64_t by_cap = tokens * kRouteSplitMax, by_blocks = tokens + kRouteBlocks;
  return by_cap < by_blocks ? by_cap : by_blocks;
}

// Stride, in elements, between the bitmap words of the GEMV's staged activations: a word's 32
// columns plus 4 bytes, so that the lanes of a lane-per-word walk, which read columns 32 apart,
// fall on different shared-memory banks.
template <int kElemBytes>
struct StagedWordStride {
  static constexpr int64_t value = kWarp + 4 / kElemBytes;
};

// Bytes of one bitmap row of `in` columns (LSB-first bits, docs/routed_sparse_matmul.md).
SE_HD int64_t bitmap_row_bytes(int64_t in) { return (in + 7) / 8; }

// 32-bit words needed to cover one row.
SE_HD int64_t bitmap_row_words(int64_t in) { return (in + 31) / 32; }

// Word w (columns 32w..32w+31) of a bitmap row; bytes past the row's end read as zero, so rows
// whose byte length is not a multiple of 4 (in % 32 != 0) are safe and never read a neighbour.
SE_HD uint32_t bitmap_word(const uint8_t* row, int64_t w, int64_t row_bytes) {
  uint32_t word = 0;
  const int64_t b0 = 4 * w;
  for (int j = 0; j < 4; ++j) {
    if (b0 + j < row_bytes) word |= static_cast<uint32_t>(row[b0 + j]) << (8 * j);
  }
  return word;
}

SE_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// Index of the lowest set bit (v != 0).
SE_HD int lowest_bit(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(v)) - 1;
#else
  return __builtin_ctz(v);
#endif
}

// Row `row` of the flattened [K*out] rows spans values [row_ptr[row], row_end).
SE_HD int64_t row_end(const int32_t* row_ptr, int64_t row, int64_t rows, int64_t nnz) {
  return row + 1 < rows ? static_cast<int64_t>(row_ptr[row + 1]) : nnz;
}

// Lane-per-column bitmap walk (GEMV and the grouped path's tile decode): lane l of a warp owns
// column 32w+l of word w. It holds a kept weight when its bit is set, and that weight sits after
// the word's kept weights below the lane, so the warp's value loads are consecutive (coalesced).
SE_HD bool lane_has(uint32_t word, int lane) { return ((word >> lane) & 1u) != 0; }

SE_HD int lane_value_offset(uint32_t word, int lane) { return popcount32(word & ((1u << lane) - 1u)); }

// Quantized values (SE_I8 / SE_I4, se_kernels.h): the code of value p. int8: one signed byte;
// int4: the low nibble of byte p / 2 when p is even, the high nibble when odd, two's complement.
// `byte` is the byte holding value p (codes[p] for int8, codes[p / 2] for int4), so a kernel can
// load it early and decode it later.
SE_HD int code_of_byte(uint8_t byte, bool int4, int64_t p) {
  if (!int4) return static_cast<int8_t>(byte);
  const int nibble = (p & 1) ? byte >> 4 : byte & 0xf;
  return nibble >= 8 ? nibble - 16 : nibble;
}

SE_HD int64_t code_byte_index(bool int4, int64_t p) { return int4 ? p >> 1 : p; }

// Index of the scale of (row, column) in scales [K*out, groups] (groups = ceil(in / group_size)).
SE_HD int64_t scale_index(int64_t row, int64_t col, int64_t groups, int64_t group_size) {
  return row * groups + col / group_size;
}

SE_HD int64_t scale_groups(int64_t in, int64_t group_size) { return (in + group_size - 1) / group_size; }

// csr16 window of a grouped step: of the (up to kTileCols) values a row holds from `p` on, the
// ones whose column lies in [c0, c0 + kTileCols). Columns ascend within a row, so they are a
// prefix; the check of both bounds keeps a corrupt (unsorted) row inside the tile's memory.
SE_HD bool in_window(int64_t p, int64_t end, uint16_t col, int64_t c0) {
  return p < end && col >= c0 && col < c0 + kTileCols;
}

// Upper bound on grouped tiles for `tokens` tokens over `experts` experts (sizes the grid and
// the tile table before the per-expert counts are known on the host); it also bounds plans of
// longer tiles.
SE_HD int64_t max_tiles(int64_t tokens, int64_t experts) {
  return (tokens + kTileTokens - 1) / kTileTokens + experts;
}

// Plan of the grouped path: offsets[e] = first slot of expert e in the permutation (exclusive
// scan of counts, offsets[K] = total), and one tile (expert, first slot, tokens) per <= tile_tokens
// tokens of each expert (tile_tokens >= kTileTokens). Returns the number of tiles written to
// tiles[3*i..3*i+2].
SE_HD int64_t plan_tiles(const int32_t* counts, int64_t experts, int32_t* offsets, int32_t* tiles,
                         int32_t tile_tokens = kTileTokens) {
  int64_t n = 0;
  int32_t total = 0;
  for (int64_t e = 0; e < experts; ++e) {
    offsets[e] = total;
    for (int32_t s = 0; s < counts[e]; s += tile_tokens) {
      tiles[3 * n] = static_cast<int32_t>(e);
      tiles[3 * n + 1] = total + s;
      tiles[3 * n + 2] = counts[e] - s < tile_tokens ? counts[e] - s : tile_tokens;
      ++n;
    }
    total += counts[e];
  }
  offsets[experts] = total;
  return n;
}

}  // namespace se_index
