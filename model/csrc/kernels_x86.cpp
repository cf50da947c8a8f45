// The x86 SIMD kernel variants, in one translation unit compiled for the baseline x86-64: each
// variant is kernels_x86.inc under its own `#pragma GCC target` region and namespace, so the library
// loads on any x86-64 CPU and seedling_cpu.cpp only calls a variant after CPUID says it can run.
// (Per-file -m flags would instead let an AVX-512 copy of some inline library function, emitted by
// the AVX-512 file, be the one the linker keeps for everyone.)
#if defined(__x86_64__)

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "seedling_cpu.h"

// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*(), which -Wall reports as
// uninitialized (a false positive in the compiler's own headers)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace seedling::avx2 {
#define SEEDLING_AVX512 0
#include "kernels_x86.inc"
#undef SEEDLING_AVX512
}  // namespace seedling::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace seedling::avx512 {
#define SEEDLING_AVX512 1
#include "kernels_x86.inc"
#undef SEEDLING_AVX512
}  // namespace seedling::avx512
#pragma GCC pop_options

namespace seedling {

const Kernels& avx2_kernels() {
  static const Kernels table{"avx2", avx2::quantize, avx2::matmul, avx2::silu_mul, avx2::attend_f32, avx2::attend_f16};
  return table;
}

const Kernels& avx512_kernels() {
  static const Kernels table{"avx512", avx512::quantize, avx512::matmul, avx512::silu_mul, avx512::attend_f32,
                             avx512::attend_f16};
  return table;
}

}  // namespace seedling

#endif  // __x86_64__
