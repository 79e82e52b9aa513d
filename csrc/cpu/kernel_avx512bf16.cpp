// rcsr_cpu: AVX-512 BF16 kernel for bf16 activations and 2/3/4-bit codes (vdpbf16ps).
//
// A pair of codes (k, k+1) of a lane becomes a pair of bf16 numbers 128 + q, exactly: 0x4300 is
// bf16 128.0, whose 7-bit mantissa counts in steps of 1, so (0x4300 | q) == 128 + q for q < 128.  vdpbf16ps multiplies them with the bf16 activation pair (products are exact in fp32)
// and accumulates in fp32, so sum_k x_k (q_k - z) = acc - (128 + z) * sum_k x_k with no rounding of
// weights or activations.  Compiled for AVX-512 BF16 via the pragma below, called only after the
// run-time CPU check (ops.cpp); everything here has internal linkage (kernel.h explains why).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#include <immintrin.h>

#include "kernel.h"

#define RCSR_INLINE __attribute__((always_inline)) inline

namespace rcsr_cpu {
namespace {

constexpr int TL_AND_OR = 0xEA;  // ternary logic: (a & b) | c

// Calls f(w, kk) for the 16 column pairs (kk even) of one block: w = bf16 pairs (128 + q_kk, 128 + q_kk+1).
template <int BITS, class F>
RCSR_INLINE void unpack_pairs(const int32_t* blk, F&& f) {
  const __m512i bias = _mm512_set1_epi32(0x43004300);
  if constexpr (BITS == 3) {
    const __m512i ml = _mm512_set1_epi32(0x00030003), mh = _mm512_set1_epi32(0x00040004);
    const __m512i hw = _mm512_loadu_si512(blk + 2 * NT);
#pragma GCC unroll 2
    for (int wi = 0; wi < 2; ++wi) {
      __m512i lo = _mm512_loadu_si512(blk + wi * NT);
      __m512i h2 = _mm512_slli_epi32(_mm512_srli_epi32(hw, wi * 8), 2);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512i hi = _mm512_ternarylogic_epi32(h2, mh, bias, TL_AND_OR);
        f(_mm512_ternarylogic_epi32(lo, ml, hi, TL_AND_OR), wi * 16 + 2 * j);
        lo = _mm512_srli_epi32(lo, 2);
        h2 = _mm512_srli_epi32(h2, 1);
      }
    }
  } else {
    constexpr int PER = 32 / BITS;
    constexpr int M = (1 << BITS) - 1;
    const __m512i mask = _mm512_set1_epi32(M | (M << 16));
#pragma GCC unroll 4
    for (int wi = 0; wi < BITS; ++wi) {
      __m512i v = _mm512_loadu_si512(blk + wi * NT);
#pragma GCC unroll 8
      for (int j = 0; j < PER / 2; ++j) {
        f(_mm512_ternarylogic_epi32(v, mask, bias, TL_AND_OR), wi * PER + 2 * j);
        v = _mm512_srli_epi32(v, BITS);
      }
    }
  }
}

template <int BITS, int MB>
void tile_rows(const GemmArgs& a, int64_t t, int64_t m0) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const int32_t* wt = a.packed + t * a.k_blocks * BITS * NT;
  const __m512 bias = _mm512_set1_ps(128.0f);
  const __m512 zsym = _mm512_set1_ps((float)(128 + (1 << (BITS - 1))));
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m512 accq[MB];
    for (int m = 0; m < MB; ++m) accq[m] = _mm512_setzero_ps();
    int64_t kb1 = (g + 1) * a.group_blocks;
    if (kb1 > a.k_blocks) kb1 = a.k_blocks;
    for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
      const int32_t* xr[MB];
      for (int m = 0; m < MB; ++m) xr[m] = reinterpret_cast<const int32_t*>(x + kb * a.x_block_stride + (m0 + m) * KB);
      unpack_pairs<BITS>(wt + kb * BITS * NT, [&](__m512i w, int kk) {
        const __m512bh wb = (__m512bh)w;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          accq[m] = _mm512_dpbf16_ps(accq[m], wb, (__m512bh)_mm512_set1_epi32(xr[m][kk >> 1]));
      });
    }
    const int64_t sg = (t * a.n_groups + g) * NT;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scales + sg)));
    const __m512 z = a.zeros ? _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + sg)))),
                                             bias)
                             : zsym;
    for (int m = 0; m < MB; ++m) {
      const __m512 xs = _mm512_set1_ps(a.xsum[(m0 + m) * a.n_groups + g]);
      acc[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, accq[m]), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(a.out + (m0 + m) * a.out_stride + t * NT, acc[m]);
}

template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m0 = 0;
    for (; m0 + 8 <= a.M; m0 += 8) tile_rows<BITS, 8>(a, t, m0);
    switch (a.M - m0) {
      case 1: tile_rows<BITS, 1>(a, t, m0); break;
      case 2: tile_rows<BITS, 2>(a, t, m0); break;
      case 3: tile_rows<BITS, 3>(a, t, m0); break;
      case 4: tile_rows<BITS, 4>(a, t, m0); break;
      case 5: tile_rows<BITS, 5>(a, t, m0); break;
      case 6: tile_rows<BITS, 6>(a, t, m0); break;
      case 7: tile_rows<BITS, 7>(a, t, m0); break;
      default: break;
    }
  }
}

}  // namespace

void gemm_avx512bf16(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, t0, t1); break;
    case 3: gemm_bits<3>(a, t0, t1); break;
    case 4: gemm_bits<4>(a, t0, t1); break;
    default: break;
  }
}

}  // namespace rcsr_cpu
