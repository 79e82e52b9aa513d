// rcsr_cpu: AVX2 + FMA + F16C kernels (fp32 FMA on unpacked codes).  A tile's 16 lanes are two
// 8-lane halves.  Compiled for AVX2 via the pragma below, called only after the run-time CPU check
// (ops.cpp); everything here has internal linkage (kernel.h explains why).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "kernel.h"

#define RCSR_INLINE __attribute__((always_inline)) inline

namespace rcsr_cpu {
namespace {

struct I16 {  // 16 int32 lanes
  __m256i h[2];
};

RCSR_INLINE I16 load16(const int32_t* p) {
  return {{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))}};
}
RCSR_INLINE I16 srli(I16 v, int n) { return {{_mm256_srli_epi32(v.h[0], n), _mm256_srli_epi32(v.h[1], n)}}; }
RCSR_INLINE I16 slli(I16 v, int n) { return {{_mm256_slli_epi32(v.h[0], n), _mm256_slli_epi32(v.h[1], n)}}; }
RCSR_INLINE I16 andv(I16 v, __m256i m) { return {{_mm256_and_si256(v.h[0], m), _mm256_and_si256(v.h[1], m)}}; }
RCSR_INLINE I16 orv(I16 a, I16 b) { return {{_mm256_or_si256(a.h[0], b.h[0]), _mm256_or_si256(a.h[1], b.h[1])}}; }

template <int BITS, class F>
RCSR_INLINE void unpack_block(const int32_t* blk, F&& f) {
  if constexpr (BITS == 3) {
    const __m256i m2 = _mm256_set1_epi32(3), m4 = _mm256_set1_epi32(4);
    const I16 hw = load16(blk + 2 * NT);
#pragma GCC unroll 2
    for (int wi = 0; wi < 2; ++wi) {
      I16 v = load16(blk + wi * NT);
      I16 vh = srli(v, 16);
      const I16 hh = srli(hw, wi * 8);
      I16 he = slli(hh, 2), ho = srli(hh, 14);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        f(orv(andv(v, m2), andv(he, m4)), wi * 16 + 2 * j);
        f(orv(andv(vh, m2), andv(ho, m4)), wi * 16 + 2 * j + 1);
        v = srli(v, 2);
        vh = srli(vh, 2);
        he = srli(he, 1);
        ho = srli(ho, 1);
      }
    }
  } else {
    constexpr int PER = 32 / BITS;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
#pragma GCC unroll 8
    for (int wi = 0; wi < BITS; ++wi) {
      I16 v = load16(blk + wi * NT);
      I16 vh = srli(v, 16);
#pragma GCC unroll 16
      for (int j = 0; j < PER / 2; ++j) {
        f(andv(v, mask), wi * PER + 2 * j);
        f(andv(vh, mask), wi * PER + 2 * j + 1);
        v = srli(v, BITS);
        vh = srli(vh, BITS);
      }
    }
  }
}

RCSR_INLINE void load_sz(const GemmArgs* ga, const DequantArgs* da, int64_t sg, int bits, __m256 s[2], __m256 z[2]) {
  const uint16_t* sp = (ga ? ga->scales : da->scales) + sg;
  const uint8_t* zp = ga ? ga->zeros : da->zeros;
  for (int h = 0; h < 2; ++h) {
    s[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + 8 * h)));
    if (zp) {
      z[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + sg + 8 * h))));
    } else {
      z[h] = _mm256_set1_ps((float)(1 << (bits - 1)));
    }
  }
}

// Output tile t (two ymm halves), rows m0 .. m0+MB-1.  One or two rows split each half's sums into
// S interleaved chains (column kk goes to chain kk % S) so that the FMA latency is covered at decode.
template <int BITS, int MB>
void tile_rows(const GemmArgs& a, int64_t t, int64_t m0) {
  constexpr int S = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  const float* x = static_cast<const float*>(a.x);
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const int32_t* wt = a.packed + t * a.k_blocks * BITS * NT;
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m256 accq[S][MB][2];
    for (int c = 0; c < S; ++c)
      for (int m = 0; m < MB; ++m) accq[c][m][0] = accq[c][m][1] = _mm256_setzero_ps();
    int64_t kb1 = (g + 1) * a.group_blocks;
    if (kb1 > a.k_blocks) kb1 = a.k_blocks;
    for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
      const float* xr[MB];
      for (int m = 0; m < MB; ++m) xr[m] = x + kb * a.x_block_stride + (m0 + m) * KB;
      RCSR_PREFETCH_BLOCK(wt + kb * BITS * NT, BITS);
      unpack_block<BITS>(wt + kb * BITS * NT, [&](I16 q, int kk) {
        const __m256 q0 = _mm256_cvtepi32_ps(q.h[0]), q1 = _mm256_cvtepi32_ps(q.h[1]);
        const int c = kk % S;
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const __m256 xv = _mm256_broadcast_ss(xr[m] + kk);
          accq[c][m][0] = _mm256_fmadd_ps(q0, xv, accq[c][m][0]);
          accq[c][m][1] = _mm256_fmadd_ps(q1, xv, accq[c][m][1]);
        }
      });
    }
    for (int c = 1; c < S; ++c)
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < 2; ++h) accq[0][m][h] = _mm256_add_ps(accq[0][m][h], accq[c][m][h]);
    const int64_t sg = (t * a.n_groups + g) * NT;
    __m256 s[2], z[2];
    load_sz(&a, nullptr, sg, BITS, s, z);
    for (int m = 0; m < MB; ++m) {
      const __m256 xs = _mm256_set1_ps(a.xsum[(m0 + m) * a.n_groups + g]);
      for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_fmadd_ps(s[h], _mm256_fnmadd_ps(z[h], xs, accq[0][m][h]), acc[m][h]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* o = a.out + (m0 + m) * a.out_stride + t * NT;
    _mm256_storeu_ps(o, acc[m][0]);
    _mm256_storeu_ps(o + 8, acc[m][1]);
  }
}

template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m0 = 0;
    for (; m0 + 3 <= a.M; m0 += 3) tile_rows<BITS, 3>(a, t, m0);
    switch (a.M - m0) {
      case 1: tile_rows<BITS, 1>(a, t, m0); break;
      case 2: tile_rows<BITS, 2>(a, t, m0); break;
      default: break;
    }
  }
}

template <int BITS>
void dequant_bits(const DequantArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* wt = a.packed + t * a.k_blocks * BITS * NT;
    float* wcol = a.w + (t - a.tile0) * NT;
    for (int64_t kb = 0; kb < a.k_blocks; ++kb) {
      int64_t g = kb / a.group_blocks;
      if (g >= a.n_groups) g = a.n_groups - 1;
      __m256 s[2], z[2];
      load_sz(nullptr, &a, (t * a.n_groups + g) * NT, BITS, s, z);
      float* rows = wcol + kb * KB * a.ldw;
      const int64_t ldw = a.ldw;
      unpack_block<BITS>(wt + kb * BITS * NT, [&](I16 q, int kk) {
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_ps(rows + kk * ldw + 8 * h, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q.h[h]), z[h]), s[h]));
      });
    }
  }
}

}  // namespace

void gemm_avx2(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, t0, t1); break;
    case 3: gemm_bits<3>(a, t0, t1); break;
    case 4: gemm_bits<4>(a, t0, t1); break;
    case 8: gemm_bits<8>(a, t0, t1); break;
    default: break;
  }
}

void dequant_avx2(const DequantArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: dequant_bits<2>(a, t0, t1); break;
    case 3: dequant_bits<3>(a, t0, t1); break;
    case 4: dequant_bits<4>(a, t0, t1); break;
    case 8: dequant_bits<8>(a, t0, t1); break;
    default: break;
  }
}

}  // namespace rcsr_cpu
