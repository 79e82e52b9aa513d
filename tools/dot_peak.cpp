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

template <int N>
__attribute__((noinline)) float run_bf16(long iters, __m512bh a, __m512bh b) {
  __m512 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_ps();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
    for (int i = 0; i < N; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  // keep the loop
  }
  __m512 s = acc[0];
  for (int i = 1; i < N; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

template <int N>
__attribute__((noinline)) int run_vnni(long iters, __m512i a, __m512i b) {
  __m512i acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_si512();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
    for (int i = 0; i < N; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  __m512i s = acc[0];
  for (int i = 1; i < N; ++i) s = _mm512_add_epi32(s, acc[i]);
  return _mm512_reduce_add_epi32(s);
}

template <int N>
void report() {
  const long iters = 160000000L / N;
  auto t0 = std::chrono::steady_clock::now();
  const float r = run_bf16<N>(iters, (__m512bh)_mm512_set1_epi32(0x3f803f80), (__m512bh)_mm512_setzero_si512());
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%2d chains: vdpbf16ps %6.1f GMAC/s (%.2f G/s)", N, iters * N * 32.0 / s / 1e9, iters * N / s / 1e9);
  t0 = std::chrono::steady_clock::now();
  const int q = run_vnni<N>(iters, _mm512_set1_epi32(0x01010101), _mm512_setzero_si512());
  s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("   vpdpbusd %6.1f GMAC/s (%.2f G/s)%s\n", iters * N * 64.0 / s / 1e9, iters * N / s / 1e9,
              r == 12345.f || q == 12345 ? " " : "");
}

int main() {
  report<4>();
  report<8>();
  report<12>();
  report<16>();
  report<24>();
  return 0;
}
