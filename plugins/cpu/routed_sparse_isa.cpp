// Which kernel path this CPU runs (AVX-512, AVX2, NEON or portable), decided once per process.
#include "routed_sparse_avx2.h"

namespace se_cpu {

#if SE_X86
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

bool cpu_has_avx512_vbmi2() {
  static const bool has = cpu_isa() == Isa::Avx512 && !isa_capped_at("avx512") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2");
  return has;
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
bool cpu_has_avx512_vbmi2() { return false; }
bool route_scores_fast(const float*, int64_t, const float*, int64_t, float*) { return false; }
#endif

}  // namespace se_cpu
