// The vdpbf16ps ceiling of one core: N independent accumulators, register operands only, so nothing but the
// instruction's latency (few chains) or its issue rate (many chains) limits the loop.  This is the rate an exact
// bf16-activation GEMM (this project's native kernel, or oneDNN's dense bf16 GEMM on CPUs without AMX) cannot
// exceed; docs/CPU_KERNELS.md compares both with it.
//
//   g++ -O2 -mavx512f -mavx512bf16 tools/bf16_dot_peak.cpp -o /tmp/bf16_dot_peak && taskset -c 1 /tmp/bf16_dot_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

template <int N>
__attribute__((noinline)) float run(long iters, __m512bh a, __m512bh b) {
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
void report(__m512bh a, __m512bh b) {
  const long iters = 160000000L / N;
  const auto t0 = std::chrono::steady_clock::now();
  const float r = run<N>(iters, a, b);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%2d chains: %6.1f GMAC/s  (%.2f G vdpbf16ps/s)%s\n", N, iters * N * 32.0 / s / 1e9, iters * N / s / 1e9,
              r == 12345.f ? " " : "");
}

int main() {
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_setzero_si512();
  report<4>(a, b);
  report<8>(a, b);
  report<12>(a, b);
  report<16>(a, b);
  report<24>(a, b);
  return 0;
}
