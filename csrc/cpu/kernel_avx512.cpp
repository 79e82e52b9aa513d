// rcsr_cpu: AVX-512 kernels (fp32 FMA on unpacked codes).  Compiled for AVX-512 via the pragma
// below and called only after the CPU was checked at run time (ops.cpp).  Everything here has
// internal linkage (kernel.h explains why).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#include <immintrin.h>
// GCC 12 warns "__Y may be used uninitialized" inside its own AVX-512 intrinsics (their masked forms take
// _mm512_undefined_*() as the pass-through operand): a false positive, silenced for this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "kernel.h"

#define RCSR_INLINE __attribute__((always_inline)) inline

namespace rcsr_cpu {
namespace {

// Calls f(q, kk) for the 32 columns kk of one block, q = the codes of the 16 lanes (int32).
template <int BITS, class F>
RCSR_INLINE void unpack_block(const int32_t* blk, F&& f) {
  if constexpr (BITS == 3) {
    const __m512i m2 = _mm512_set1_epi32(3), m4 = _mm512_set1_epi32(4);
    const __m512i hw = _mm512_loadu_si512(blk + 2 * NT);
#pragma GCC unroll 2
    for (int wi = 0; wi < 2; ++wi) {
      __m512i v = _mm512_loadu_si512(blk + wi * NT);
      __m512i vh = _mm512_srli_epi32(v, 16);
      const __m512i hh = _mm512_srli_epi32(hw, wi * 8);
      __m512i he = _mm512_slli_epi32(hh, 2), ho = _mm512_srli_epi32(hh, 14);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        f(_mm512_or_si512(_mm512_and_si512(v, m2), _mm512_and_si512(he, m4)), wi * 16 + 2 * j);
        f(_mm512_or_si512(_mm512_and_si512(vh, m2), _mm512_and_si512(ho, m4)), wi * 16 + 2 * j + 1);
        v = _mm512_srli_epi32(v, 2);
        vh = _mm512_srli_epi32(vh, 2);
        he = _mm512_srli_epi32(he, 1);
        ho = _mm512_srli_epi32(ho, 1);
      }
    }
  } else {
    constexpr int PER = 32 / BITS;  // codes per word
    const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
#pragma GCC unroll 8
    for (int wi = 0; wi < BITS; ++wi) {
      __m512i v = _mm512_loadu_si512(blk + wi * NT);
      __m512i vh = _mm512_srli_epi32(v, 16);
#pragma GCC unroll 16
      for (int j = 0; j < PER / 2; ++j) {
        f(_mm512_and_si512(v, mask), wi * PER + 2 * j);
        f(_mm512_and_si512(vh, mask), wi * PER + 2 * j + 1);
        v = _mm512_srli_epi32(v, BITS);
        vh = _mm512_srli_epi32(vh, BITS);
      }
    }
  }
}

RCSR_INLINE __m512 load_scales(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

RCSR_INLINE __m512 load_zeros(const uint8_t* p, __m512 zsym) {
  if (!p) return zsym;
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Output tile t, rows m0 .. m0+MB-1.  Fewer than 4 rows split each row's sums into 4 interleaved
// chains (column kk goes to chain kk % 4): one chain per row would wait on the FMA latency at decode.
template <int BITS, int MB>
void tile_rows(const GemmArgs& a, int64_t t, int64_t m0) {
  constexpr int S = MB < 4 ? 4 : 1;
  const float* x = static_cast<const float*>(a.x);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const int32_t* wt = a.packed + t * a.k_blocks * BITS * NT;
  const __m512 zsym = _mm512_set1_ps((float)(1 << (BITS - 1)));
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m512 accq[S][MB];
    for (int c = 0; c < S; ++c)
      for (int m = 0; m < MB; ++m) accq[c][m] = _mm512_setzero_ps();
    int64_t kb1 = (g + 1) * a.group_blocks;
    if (kb1 > a.k_blocks) kb1 = a.k_blocks;
    for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
      const float* xr[MB];
      for (int m = 0; m < MB; ++m) xr[m] = x + kb * a.x_block_stride + (m0 + m) * KB;
      RCSR_PREFETCH_BLOCK(wt + kb * BITS * NT, BITS);
      unpack_block<BITS>(wt + kb * BITS * NT, [&](__m512i q, int kk) {
        const __m512 qf = _mm512_cvtepi32_ps(q);
        const int c = kk % S;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) accq[c][m] = _mm512_fmadd_ps(qf, _mm512_set1_ps(xr[m][kk]), accq[c][m]);
      });
    }
    for (int c = 1; c < S; ++c)
      for (int m = 0; m < MB; ++m) accq[0][m] = _mm512_add_ps(accq[0][m], accq[c][m]);
    const int64_t sg = (t * a.n_groups + g) * NT;
    const __m512 s = load_scales(a.scales + sg);
    const __m512 z = load_zeros(a.zeros ? a.zeros + sg : nullptr, zsym);
    for (int m = 0; m < MB; ++m) {
      const __m512 xs = _mm512_set1_ps(a.xsum[(m0 + m) * a.n_groups + g]);
      acc[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, accq[0][m]), acc[m]);
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

template <int BITS>
void dequant_bits(const DequantArgs& a, int64_t t0, int64_t t1) {
  const __m512 zsym = _mm512_set1_ps((float)(1 << (BITS - 1)));
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* wt = a.packed + t * a.k_blocks * BITS * NT;
    float* wcol = a.w + (t - a.tile0) * NT;
    for (int64_t kb = 0; kb < a.k_blocks; ++kb) {
      int64_t g = kb / a.group_blocks;
      if (g >= a.n_groups) g = a.n_groups - 1;
      const int64_t sg = (t * a.n_groups + g) * NT;
      const __m512 s = load_scales(a.scales + sg);
      const __m512 z = load_zeros(a.zeros ? a.zeros + sg : nullptr, zsym);
      float* rows = wcol + kb * KB * a.ldw;
      const int64_t ldw = a.ldw;
      unpack_block<BITS>(wt + kb * BITS * NT, [&](__m512i q, int kk) {
        _mm512_storeu_ps(rows + kk * ldw, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), z), s));
      });
    }
  }
}

}  // namespace

void gemm_avx512(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, t0, t1); break;
    case 3: gemm_bits<3>(a, t0, t1); break;
    case 4: gemm_bits<4>(a, t0, t1); break;
    case 8: gemm_bits<8>(a, t0, t1); break;
    default: break;
  }
}

void dequant_avx512(const DequantArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: dequant_bits<2>(a, t0, t1); break;
    case 3: dequant_bits<3>(a, t0, t1); break;
    case 4: dequant_bits<4>(a, t0, t1); break;
    case 8: dequant_bits<8>(a, t0, t1); break;
    default: break;
  }
}

}  // namespace rcsr_cpu
