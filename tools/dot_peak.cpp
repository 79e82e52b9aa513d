// The dot-product ceilings of one core: N independent accumulators, register operands only, so nothing but the
// instruction's latency (few chains) or its issue rate (many chains) limits the loop.
//   * vdpbf16ps (32 MACs): the rate an exact bf16-activation GEMM (this project's native kernel, or oneDNN's
//     dense bf16 GEMM on CPUs without AMX) cannot exceed;
//   * vpdpbusd (64 MACs, u8 x s8): the ceiling of the opt-in int8-activation kernel (avx512_vnni_a8).
// docs/CPU_KERNELS.md compares the kernels with them.
//
//   g++ -O2 -mavx512f -mavx512bf16 -mavx512vnni tools/dot_peak.cpp -o /tmp/dot_peak && taskset -c 1 /tmp/dot_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

// N chains of acc = dot(acc, a, b); `a` is laundered through an empty asm each iteration so the loop stays.
template <int N, class Acc, class V, class Dot>
__attribute__((noinline)) Acc run(long iters, Acc zero, V a, V b, Dot dot) {
  Acc acc[N];
  for (int i = 0; i < N; ++i) acc[i] = zero;
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
    for (int i = 0; i < N; ++i) acc[i] = dot(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  for (int i = 1; i < N; ++i) acc[0] += acc[i];  // every chain feeds the result (GCC vector arithmetic)
  return acc[0];
}

template <int N>
void report() {
  const long iters = 160000000L / N;
  auto t0 = std::chrono::steady_clock::now();
  const __m512 r = run<N>(iters, _mm512_setzero_ps(), (__m512bh)_mm512_set1_epi32(0x3f803f80),
                          (__m512bh)_mm512_setzero_si512(),
                          [](__m512 c, __m512bh x, __m512bh y) { return _mm512_dpbf16_ps(c, x, y); });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%2d chains: vdpbf16ps %6.1f GMAC/s (%.2f G/s)", N, iters * N * 32.0 / s / 1e9, iters * N / s / 1e9);
  t0 = std::chrono::steady_clock::now();
  const __m512i q = run<N>(iters, _mm512_setzero_si512(), _mm512_set1_epi32(0x01010101), _mm512_setzero_si512(),
                           [](__m512i c, __m512i x, __m512i y) { return _mm512_dpbusd_epi32(c, x, y); });
  s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("   vpdpbusd %6.1f GMAC/s (%.2f G/s)%s\n", iters * N * 64.0 / s / 1e9, iters * N / s / 1e9,
              _mm512_reduce_add_ps(r) == 12345.f || _mm512_reduce_add_epi32(q) == 12345 ? " " : "");
}

int main() {
  report<4>();
  report<8>();
  report<12>();
  report<16>();
  report<24>();
  return 0;
}
