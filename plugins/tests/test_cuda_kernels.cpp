// GPU check of the CUDA kernels against their CPU reference (se_cuda_reference_matmul) and a
// float64 dense reference: both paths, both formats, all value dtypes (int8/int4 codes with group
// scales included), fp32/fp16 activations, the GEMV's activations in default, opt-in and no shared
// memory, scalar and vector csr16 loads, the grouped kernel's aligned and unaligned activations and
// bitmap rows, misaligned values and indices, and routing alone (se_cuda_route) against the
// product's own routing.
// ctest label "gpu"; exits 77 (ctest SKIP_RETURN_CODE) when no CUDA device is present.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "se_half.h"
#include "se_cuda_kernels.h"
#include "random_experts.h"

#define CHECK_CUDA(call)                                                                     \
  do {                                                                                       \
    const cudaError_t rc_ = (call);                                                          \
    if (rc_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d: %s\n", #call, __FILE__, __LINE__, cudaGetErrorString(rc_)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

namespace {

// Copies v to the device `shift` elements past the start of its allocation (a misaligned array
// when shift > 0); `base` receives the allocation, for cudaFree.
template <typename T>
T* to_device(const std::vector<T>& v, void** base = nullptr, int shift = 0) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(1, (v.size() + shift) * sizeof(T))));
  if (base) *base = d;
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(d + shift, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d + shift;
}

// misalign: the values and indices one element past an aligned address (the GEMV's vector loads
// fall back to one value per lane).
int run_case(const se_test::Case& c, int x_dtype, int gemv_max, bool give_ids, std::mt19937& rng,
             bool misalign = false) {
  se_test::RandomExperts re(c, rng);
  std::vector<uint16_t> x16(re.x.size());
  for (size_t i = 0; i < re.x.size() && x_dtype == SE_F16; ++i) x16[i] = se_half::f32_to_f16(re.x[i]);
  const size_t ny = static_cast<size_t>(c.tokens * c.out), xb = x_dtype == SE_F32 ? 4 : 2;
  std::vector<unsigned char> ref(ny * xb), got(ny * xb);
  std::vector<int32_t> ref_ids(c.tokens), got_ids(c.tokens);
  const void* hx = x_dtype == SE_F32 ? static_cast<const void*>(re.x.data()) : x16.data();
  char err[256];
  if (se_cuda_reference_matmul(&re.e, re.G.data(), re.b.data(), hx, x_dtype, c.tokens, nullptr, ref_ids.data(),
                               ref.data(), gemv_max, err, sizeof(err))) {
    std::printf("reference failed: %s\n", err);
    return 1;
  }
  se_experts d = re.e;
  void *values_base = nullptr, *indices_base = nullptr;
  const int shift = misalign ? 1 : 0;
  if (c.value_dtype == SE_I8 || c.value_dtype == SE_I4) {
    d.values = c.value_dtype == SE_I8 ? static_cast<const void*>(to_device(re.codes, &values_base, shift))
                                      : to_device(re.nibbles, &values_base, shift);
  } else {
    d.values = c.value_dtype == SE_F32 ? static_cast<const void*>(to_device(re.vals32, &values_base, shift))
                                       : to_device(re.vals16, &values_base, shift);
  }
  d.scales = re.scales.empty() ? nullptr : to_device(re.scales);
  d.indices = c.format == SE_BITMAP ? static_cast<const void*>(to_device(re.bitmap, &indices_base, shift))
                                    : to_device(re.cols, &indices_base, shift);
  d.row_ptr = to_device(re.row_ptr);
  d.bias = to_device(re.bias);
  float* G = to_device(re.G);
  float* b = to_device(re.b);
  void* x = x_dtype == SE_F32 ? static_cast<void*>(to_device(re.x)) : to_device(x16);
  int32_t* ids_in = give_ids ? to_device(ref_ids) : nullptr;
  int32_t* ids_out = to_device(std::vector<int32_t>(c.tokens, -1));
  void* y = nullptr;
  void* ws = nullptr;
  const size_t ws_size = se_cuda_workspace_size(c.tokens, c.K);
  CHECK_CUDA(cudaMalloc(&y, ny * xb));
  CHECK_CUDA(cudaMalloc(&ws, ws_size));
  if (se_cuda_routed_sparse_matmul(&d, G, b, x, x_dtype, c.tokens, ids_in, ids_out, y, ws, ws_size, gemv_max, nullptr,
                                   err, sizeof(err))) {
    std::printf("kernel failed: %s\n", err);
    return 1;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(got.data(), y, ny * xb, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_ids.data(), ids_out, c.tokens * 4, cudaMemcpyDeviceToHost));
  int failures = 0;
  if (!give_ids) {  // routing alone (se_cuda_route) gives the ids the product routed with
    int32_t* route_ids = to_device(std::vector<int32_t>(c.tokens, -1));
    std::vector<int32_t> alone(c.tokens);
    if (se_cuda_route(x, x_dtype, c.tokens, c.in, c.K, G, b, route_ids, ws, ws_size, nullptr, err, sizeof(err))) {
      std::printf("route failed: %s\n", err);
      return 1;
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(alone.data(), route_ids, c.tokens * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaFree(route_ids));
    failures += alone != got_ids;
  }
  const double tol = x_dtype == SE_F32 ? 1e-4 : 4e-3;
  for (int64_t t = 0; t < c.tokens; ++t) {
    if (got_ids[t] != ref_ids[t]) {  // a near tie may flip between summation orders
      failures += !re.routing_ok(t, got_ids[t]);
      continue;
    }
    for (int64_t r = 0; r < c.out; ++r) {
      const size_t i = static_cast<size_t>(t * c.out + r);
      const auto val = [&](const std::vector<unsigned char>& v) {
        return x_dtype == SE_F32 ? reinterpret_cast<const float*>(v.data())[i]
                                 : se_half::f16_to_f32(reinterpret_cast<const uint16_t*>(v.data())[i]);
      };
      // the same decomposition and weights as the reference: only the summation order differs,
      // whose fp32 error scales with sum |w x| (large, cancelling terms with int8 codes)
      failures += std::fabs(val(got) - val(ref)) > tol * (1 + std::fabs(val(ref))) + 1e-5 * re.magnitude(t, got_ids[t], r);
    }
  }
  for (const void* p : {static_cast<const void*>(values_base), static_cast<const void*>(indices_base),
                        static_cast<const void*>(d.row_ptr), static_cast<const void*>(d.bias),
                        static_cast<const void*>(G), static_cast<const void*>(b), static_cast<const void*>(x),
                        static_cast<const void*>(ids_in), static_cast<const void*>(ids_out),
                        static_cast<const void*>(y), static_cast<const void*>(ws), static_cast<const void*>(d.scales)})
    CHECK_CUDA(cudaFree(const_cast<void*>(p)));
  if (failures)
    std::printf("FAIL format=%d values=%d x=%d K=%lld out=%lld in=%lld tokens=%lld: %d mismatches\n", c.format,
                c.value_dtype, x_dtype, static_cast<long long>(c.K), static_cast<long long>(c.out),
                static_cast<long long>(c.in), static_cast<long long>(c.tokens), failures);
  return failures ? 1 : 0;
}

}  // namespace

// --quick: one case per format, activation dtype and path (compute-sanitizer's racecheck runs
// the kernels hundreds of times slower; bench/gpu_session.sh gives it this subset).
int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 77;
  }
  std::mt19937 rng(99);
  int failed = 0, total = 0;
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int values : {SE_F32, SE_F16, SE_BF16})
      for (int x_dtype : {SE_F32, SE_F16})
        for (int64_t tokens : {1, 3, 40, 300})
          for (double density : {0.0, 0.3, 0.9}) {
            if (quick && (values != SE_F16 || density != 0.3 || tokens == 1 || tokens == 300)) continue;
            failed += run_case({format, values, 16, 200, 1100, tokens, density}, x_dtype, 0, tokens == 40, rng);
            ++total;
          }
  // the GEMV with its activations past the 48 KB default (opt-in shared memory: 20000 fp32 = 80 KB)
  // and with the activations read from global memory (the variant for widths past the opt-in)
  for (const char* smem_x : {"1", "0"}) {
    if (quick) break;
    setenv("SE_CUDA_GEMV_SMEM_X", smem_x, 1);
    for (int format : {SE_BITMAP, SE_CSR16})
      for (int x_dtype : {SE_F32, SE_F16})
        for (int64_t in : {1100, 20000}) {
          failed += run_case({format, SE_F16, 4, 40, in, 3, 0.3}, x_dtype, 0, false, rng);
          ++total;
        }
  }
  unsetenv("SE_CUDA_GEMV_SMEM_X");
  // csr16 GEMV rows with one value per lane per step (SE_CUDA_GEMV_VECTORS=0, kept for
  // comparison), then both formats on values and indices one element off an aligned address (the
  // csr16 vector loads fall back to one value per lane; bitmap words are read byte by byte)
  for (bool scalar_loads : {true, false}) {
    if (scalar_loads) setenv("SE_CUDA_GEMV_VECTORS", "0", 1);
    for (int format : {SE_BITMAP, SE_CSR16})
      for (int values : {SE_F32, SE_F16, SE_BF16})
        for (int x_dtype : {SE_F32, SE_F16})
          for (double density : {0.0, 0.3, 0.9}) {
            if (quick && (values != SE_F16 || density != 0.3)) continue;
            if (scalar_loads && format != SE_CSR16) continue;
            failed += run_case({format, values, 16, 200, 1100, 3, density}, x_dtype, 0, false, rng, !scalar_loads);
            ++total;
          }
    if (!quick) {
      setenv("SE_CUDA_GEMV_SMEM_X", "0", 1);
      for (int format : {SE_BITMAP, SE_CSR16}) {
        failed += run_case({format, SE_F16, 4, 40, 20000, 3, 0.3}, SE_F16, 0, false, rng, !scalar_loads);
        ++total;
      }
      unsetenv("SE_CUDA_GEMV_SMEM_X");
    }
    unsetenv("SE_CUDA_GEMV_VECTORS");
  }
  // the grouped kernel at 1088 features (whole 16-byte activation vectors, 8-byte bitmap rows and
  // whole 64-column steps), 1096 (whole vectors, a partial last step, bitmap rows read byte by
  // byte) and 1100 (none of these); the 1088 case again on values and indices one element off an
  // aligned address
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int values : {SE_F32, SE_F16, SE_BF16})
      for (int x_dtype : {SE_F32, SE_F16})
        for (int64_t in : {1088, 1096, 1100}) {
          if (quick && (values != SE_F16 || in != 1096)) continue;
          failed += run_case({format, values, 16, 200, in, 300, 0.3}, x_dtype, 0, false, rng);
          ++total;
          if (in == 1088 && values != SE_F32 && !quick) {
            failed += run_case({format, values, 16, 200, in, 300, 0.3}, x_dtype, 0, false, rng, true);
            ++total;
          }
        }
  // int8 / int4 codes: both paths, both formats, group sizes within a bitmap word, at a word, and
  // above a grouped step with a short last group; int4 rows start mid-byte (odd row lengths)
  for (int format : {SE_BITMAP, SE_CSR16})
    for (int values : {SE_I8, SE_I4})
      for (int x_dtype : {SE_F32, SE_F16})
        for (int64_t group : {7, 32, 128})
          for (int64_t tokens : {1, 3, 300}) {
            if (quick && (group != 32 || tokens == 1)) continue;
            se_test::Case qc{format, values, 16, 200, 1100, tokens, 0.3, group};
            failed += run_case(qc, x_dtype, 0, false, rng, tokens == 3 && !quick);
            ++total;
          }
  std::printf("%d/%d GPU kernel checks passed\n", total - failed, total);
  return failed ? 1 : 0;
}
