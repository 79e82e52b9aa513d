// rcsr_cpu: AVX-512 BF16 kernel for bf16 activations and 2/3/4-bit codes (vdpbf16ps).
//
// A pair of codes (k, k+1) of a lane becomes a pair of bf16 numbers 128 + q, exactly: 0x4300 is
// bf16 128.0, whose 7-bit mantissa counts in steps of 1, so (0x4300 | q) == 128 + q for q < 128.  vdpbf16ps multiplies them with the bf16 activation pair (products are exact in fp32)
// and accumulates in fp32, so sum_k x_k (q_k - z) = acc - (128 + z) * sum_k x_k with no rounding of
// weights or activations.  Compiled for AVX-512 BF16 via the pragma below, called only after the
// run-time CPU check (ops.cpp); everything here has internal linkage (kernel.h explains why).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#include <immintrin.h>
// GCC 12 warns "__Y may be used uninitialized" inside its own AVX-512 intrinsics (their masked forms take
// _mm512_undefined_*() as the pass-through operand): a false positive, silenced for this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "kernel.h"
#include "simd_avx512.h"

#define RCSR_INLINE __attribute__((always_inline)) inline
#ifndef RCSR_BF16_TL
#define RCSR_BF16_TL 2  // output tiles per pass from M = 4 on
#endif
#ifndef RCSR_BF16_S1
#define RCSR_BF16_S1 2
#endif
#ifndef RCSR_BF16_M1
#define RCSR_BF16_M1 1  // 2/3 bits at M = 1: the shift-saving kernel (tile_row_m1); 0 = the generic one
#endif
#ifndef RCSR_BF16_MB
#define RCSR_BF16_MB 8  // rows per pass over a pair of tiles (16 zmm sums); 12 spilled and ran 2x slower at M = 16
#endif

namespace rcsr_cpu {
namespace {

constexpr int TL_AND_OR = 0xEA;  // ternary logic: (a & b) | c

// row `row`, columns col .. col+15 of the result: bf16 straight into the caller's tensor, or fp32
RCSR_INLINE void store_out(const GemmArgs& a, int64_t row, int64_t col, __m512 v) {
  if (a.out_bf16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out_bf16 + row * a.out_stride + col), simd_to_bf16(v));
  else
    _mm512_storeu_ps(a.out + row * a.out_stride + col, v);
}

// Calls f(w, kk) for the 16 column pairs (kk even) of one block of each of the TL tiles blk[0..TL):
// w[i] = bf16 pairs (128 + q_kk, 128 + q_kk+1) of tile i.
template <int BITS, int TL, class F>
RCSR_INLINE void unpack_pairs(const int32_t* const* blk, F&& f) {
  const __m512i bias = _mm512_set1_epi32(0x43004300);
  __m512i w[TL];
  if constexpr (BITS == 3) {
    const __m512i ml = _mm512_set1_epi32(0x00030003), mh = _mm512_set1_epi32(0x00040004);
    __m512i hw[TL];
    for (int i = 0; i < TL; ++i) hw[i] = _mm512_loadu_si512(blk[i] + 2 * NT);
#pragma GCC unroll 2
    for (int wi = 0; wi < 2; ++wi) {
      __m512i lo[TL], h2[TL];
      for (int i = 0; i < TL; ++i) {
        lo[i] = _mm512_loadu_si512(blk[i] + wi * NT);
        h2[i] = _mm512_slli_epi32(_mm512_srli_epi32(hw[i], wi * 8), 2);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        for (int i = 0; i < TL; ++i) {
          const __m512i hi = _mm512_ternarylogic_epi32(h2[i], mh, bias, TL_AND_OR);
          w[i] = _mm512_ternarylogic_epi32(lo[i], ml, hi, TL_AND_OR);
          lo[i] = _mm512_srli_epi32(lo[i], 2);
          h2[i] = _mm512_srli_epi32(h2[i], 1);
        }
        f(w, wi * 16 + 2 * j);
      }
    }
  } else {
    constexpr int PER = 32 / BITS;
    constexpr int M = (1 << BITS) - 1;
    const __m512i mask = _mm512_set1_epi32(M | (M << 16));
#pragma GCC unroll 4
    for (int wi = 0; wi < BITS; ++wi) {
      __m512i v[TL];
      for (int i = 0; i < TL; ++i) v[i] = _mm512_loadu_si512(blk[i] + wi * NT);
#pragma GCC unroll 8
      for (int j = 0; j < PER / 2; ++j) {
        for (int i = 0; i < TL; ++i) {
          w[i] = _mm512_ternarylogic_epi32(v[i], mask, bias, TL_AND_OR);
          v[i] = _mm512_srli_epi32(v[i], BITS);
        }
        f(w, wi * PER + 2 * j);
      }
    }
  }
}

// Output tiles t .. t+TL-1, rows m0 .. m0+MB-1.  Each broadcast activation pair feeds TL dot products,
// so two tiles halve the broadcasts per vdpbf16ps; the group's integer-domain sums stay in registers
// (TL*MB of them) and are scaled into an fp32 accumulator in L1 at the end of each group.
template <int BITS, int MB, int TL>
void tile_rows(const GemmArgs& a, int64_t t, int64_t m0) {
  constexpr int S = MB == 1 ? RCSR_BF16_S1 : 1;  // independent chains per sum
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  alignas(64) float acc[TL][MB][NT];
  for (int i = 0; i < TL; ++i)
    for (int m = 0; m < MB; ++m) _mm512_store_ps(acc[i][m], _mm512_setzero_ps());
  const int32_t* wt[TL];
  for (int i = 0; i < TL; ++i) wt[i] = a.packed + (t + i) * a.k_blocks * BITS * NT;
  const __m512 bias = _mm512_set1_ps(128.0f);
  const __m512 zsym = _mm512_set1_ps((float)(128 + (1 << (BITS - 1))));
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m512 accq[S][TL][MB];
    for (int c = 0; c < S; ++c)
      for (int i = 0; i < TL; ++i)
        for (int m = 0; m < MB; ++m) accq[c][i][m] = _mm512_setzero_ps();
    if (a.xoff)  // symmetric: the sums start at the zero-point term, a broadcast load, so the flush is one FMA
      for (int m = 0; m < MB; ++m) {
        const __m512 xo = _mm512_set1_ps(a.xoff[(m0 + m) * a.n_groups + g]);
        for (int i = 0; i < TL; ++i) accq[0][i][m] = xo;
      }
    int64_t kb1 = (g + 1) * a.group_blocks;
    if (kb1 > a.k_blocks) kb1 = a.k_blocks;
    for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
      const int32_t* xr[MB];
      for (int m = 0; m < MB; ++m) xr[m] = reinterpret_cast<const int32_t*>(x + kb * a.x_block_stride + (m0 + m) * KB);
      const int32_t* blk[TL];
      for (int i = 0; i < TL; ++i) blk[i] = wt[i] + kb * BITS * NT;
      for (int i = 0; i < TL; ++i) RCSR_PREFETCH_BLOCK(blk[i], BITS);
      unpack_pairs<BITS, TL>(blk, [&](const __m512i* w, int kk) {
        const int c = (kk >> 1) % S;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[m][kk >> 1]);
          for (int i = 0; i < TL; ++i) accq[c][i][m] = _mm512_dpbf16_ps(accq[c][i][m], (__m512bh)w[i], xb);
        }
      });
    }
    for (int c = 1; c < S; ++c)
      for (int i = 0; i < TL; ++i)
        for (int m = 0; m < MB; ++m) accq[0][i][m] = _mm512_add_ps(accq[0][i][m], accq[c][i][m]);
    if (a.xoff) {
      for (int i = 0; i < TL; ++i) {
        const int64_t sg = ((t + i) * a.n_groups + g) * NT;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scales + sg)));
        for (int m = 0; m < MB; ++m)
          _mm512_store_ps(acc[i][m], _mm512_fmadd_ps(s, accq[0][i][m], _mm512_load_ps(acc[i][m])));
      }
      continue;
    }
    for (int i = 0; i < TL; ++i) {
      const int64_t sg = ((t + i) * a.n_groups + g) * NT;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scales + sg)));
      const __m512 z = a.zeros ? _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + sg)))),
                                               bias)
                               : zsym;
      for (int m = 0; m < MB; ++m) {
        const __m512 xs = _mm512_set1_ps(a.xsum[(m0 + m) * a.n_groups + g]);
        _mm512_store_ps(acc[i][m], _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, accq[0][i][m]), _mm512_load_ps(acc[i][m])));
      }
    }
  }
  for (int i = 0; i < TL; ++i)
    for (int m = 0; m < MB; ++m)
      store_out(a, m0 + m, (t + i) * NT, _mm512_load_ps(acc[i][m]));
}

// the last r < MB rows of tiles t .. t+TL-1 (R counts down to the remainder's row count)
template <int BITS, int TL, int R>
RCSR_INLINE void rest_rows(const GemmArgs& a, int64_t t, int64_t m0, int64_t r) {
  if constexpr (R > 0) {
    if (r == R) {
      tile_rows<BITS, R, TL>(a, t, m0);
    } else {
      rest_rows<BITS, TL, R - 1>(a, t, m0, r);
    }
  }
}

// rows of tiles t .. t+TL-1: blocks of MB rows, then the remainder
template <int BITS, int TL, int MB>
void rows_of(const GemmArgs& a, int64_t t) {
  int64_t m0 = 0;
  for (; m0 + MB <= a.M; m0 += MB) tile_rows<BITS, MB, TL>(a, t, m0);
  rest_rows<BITS, TL, MB - 1>(a, t, m0, a.M - m0);
}

// One row (M = 1) of 2- or 3-bit tiles t .. t+TL-1 with fewer shifts.  The generic path shifts every
// code pair down to bit 0 before its ternary-logic and vdpbf16ps.  Here the 2-bit low-plane codes stay
// where they are: a mask at bits 2r..2r+1 of each half (r = 0, 1, 2) gives the bf16 number
// 0x4300 | (q << 2r) = 128 + 4^r q, exact, because q << 2r stays inside the 7-bit mantissa.  So one
// low-plane word (8 pairs, pair j at bits 2j) takes two shifts (by 6 and 12) instead of seven, and pair
// j feeds the sum of its offset r = j mod 3 (pairs 6, 7: offsets 0, 1).  3 bits: the high-plane bit of
// pair j is shifted once to bit 2r + 2 and or-ed in (128 + 4^r (l + 4 h) <= 128 + 16 * 7, still exact):
// one shift less per pair.  Per group, with acc_r = sum x (128 + 4^r q) over the pairs of offset r,
//   sum_k x_k (q_k - z) = acc_0 + acc_1 / 4 + acc_2 / 16 - C - z sum_k x_k,   C = 128 sum_r 4^-r X_r,
// X_r the sum of the activations of the pairs of offset r: one vdpbf16ps per block with the constant
// pair weights 128 * 4^-r (bf16 128 / 32 / 8, exact) gives C for all tiles.  The three sums are also
// three independent chains per tile (12 in flight with four tiles), which a lone row needs (see below).
template <int BITS, int TL>
void tile_row_m1(const GemmArgs& a, int64_t t) {
  static_assert(BITS == 2 || BITS == 3, "2 or 3 bits");
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  alignas(64) float acc[TL][NT];
  for (int i = 0; i < TL; ++i) _mm512_store_ps(acc[i], _mm512_setzero_ps());
  const int32_t* wt[TL];
  for (int i = 0; i < TL; ++i) wt[i] = a.packed + (t + i) * a.k_blocks * BITS * NT;
  const __m512i bias = _mm512_set1_epi32(0x43004300);
  const __m512i ml[3] = {_mm512_set1_epi32(0x00030003), _mm512_set1_epi32(0x000C000C),
                         _mm512_set1_epi32(0x00300030)};
  const __m512i mh[3] = {_mm512_set1_epi32(0x00040004), _mm512_set1_epi32(0x00100010),
                         _mm512_set1_epi32(0x00400040)};
  // lane p = pair p of a block (low-plane word p / 8, pair j = p % 8): both halves 128 * 4^-(j mod 3)
  const __m512i wc = _mm512_setr_epi32(0x43004300, 0x42004200, 0x41004100, 0x43004300, 0x42004200, 0x41004100,
                                       0x43004300, 0x42004200, 0x43004300, 0x42004200, 0x41004100, 0x43004300,
                                       0x42004200, 0x41004100, 0x43004300, 0x42004200);
  const __m512 zsym = _mm512_set1_ps((float)(1 << (BITS - 1)));
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m512 accq[3][TL];
    for (int r = 0; r < 3; ++r)
      for (int i = 0; i < TL; ++i) accq[r][i] = _mm512_setzero_ps();
    __m512 cacc = _mm512_setzero_ps();
    int64_t kb1 = (g + 1) * a.group_blocks;
    if (kb1 > a.k_blocks) kb1 = a.k_blocks;
    for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(x + kb * a.x_block_stride);
      cacc = _mm512_dpbf16_ps(cacc, (__m512bh)wc, (__m512bh)_mm512_loadu_si512(xr));
      const int32_t* blk[TL];
      for (int i = 0; i < TL; ++i) blk[i] = wt[i] + kb * BITS * NT;
      for (int i = 0; i < TL; ++i) RCSR_PREFETCH_BLOCK(blk[i], BITS);
      __m512i hw[TL];
      if constexpr (BITS == 3)
        for (int i = 0; i < TL; ++i) hw[i] = _mm512_loadu_si512(blk[i] + 2 * NT);
#pragma GCC unroll 2
      for (int wi = 0; wi < 2; ++wi) {
        __m512i v[TL];
        for (int i = 0; i < TL; ++i) v[i] = _mm512_loadu_si512(blk[i] + wi * NT);
#pragma GCC unroll 3
        for (int s = 0; s < 3; ++s) {  // pairs 3s .. 3s+2 (the last shift holds pairs 6, 7)
          __m512i u[TL];
          for (int i = 0; i < TL; ++i) u[i] = s == 0 ? v[i] : _mm512_srli_epi32(v[i], 6 * s);
#pragma GCC unroll 3
          for (int r = 0; r < 3; ++r) {
            const int j = 3 * s + r;
            if (j >= 8) break;
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[wi * 8 + j]);
            for (int i = 0; i < TL; ++i) {
              __m512i w;
              if constexpr (BITS == 3) {
                const int sh = wi * 8 + j - (2 * r + 2);  // high bit of pair wi*8+j (bit wi*8+j) to bit 2r+2
                const __m512i h = sh > 0 ? _mm512_srli_epi32(hw[i], sh) : sh < 0 ? _mm512_slli_epi32(hw[i], -sh) : hw[i];
                w = _mm512_ternarylogic_epi32(u[i], ml[r], _mm512_ternarylogic_epi32(h, mh[r], bias, TL_AND_OR), TL_AND_OR);
              } else {
                w = _mm512_ternarylogic_epi32(u[i], ml[r], bias, TL_AND_OR);
              }
              accq[r][i] = _mm512_dpbf16_ps(accq[r][i], (__m512bh)w, xb);
            }
          }
        }
      }
    }
    const __m512 c = _mm512_set1_ps(_mm512_reduce_add_ps(cacc));
    const __m512 xs = _mm512_set1_ps(a.xsum[g]);
    for (int i = 0; i < TL; ++i) {
      const int64_t sg = ((t + i) * a.n_groups + g) * NT;
      const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scales + sg)));
      const __m512 z = a.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + sg))))
                               : zsym;
      __m512 q = _mm512_fmadd_ps(accq[2][i], _mm512_set1_ps(0.0625f), accq[0][i]);
      q = _mm512_fmadd_ps(accq[1][i], _mm512_set1_ps(0.25f), q);
      q = _mm512_sub_ps(q, _mm512_fmadd_ps(z, xs, c));
      _mm512_store_ps(acc[i], _mm512_fmadd_ps(sc, q, _mm512_load_ps(acc[i])));
    }
  }
  for (int i = 0; i < TL; ++i) store_out(a, 0, (t + i) * NT, _mm512_load_ps(acc[i]));
}

// Tiles in pairs, or in fours for M < 4 (decode): each tile's sums of one row form a dependent chain of
// vdpbf16ps, so a lone row needs several tiles in flight to cover the instruction's latency.
template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t t0, int64_t t1) {
  int64_t t = t0;
  if constexpr (BITS <= 3)
    if (RCSR_BF16_M1 && a.M == 1)
      for (; t + 4 <= t1; t += 4) tile_row_m1<BITS, 4>(a, t);
  if (a.M < 4)
    for (; t + 4 <= t1; t += 4) rows_of<BITS, 4, 4>(a, t);
  for (; t + RCSR_BF16_TL <= t1; t += RCSR_BF16_TL) rows_of<BITS, RCSR_BF16_TL, RCSR_BF16_MB>(a, t);
  for (; t < t1; ++t) rows_of<BITS, 1, 8>(a, t);
}

}  // namespace

// One pass over each row: a 64-byte load per k-block (masked at a ragged end) is stored blocked and
// widened exactly to fp32 and then to double for the group sums.  The portable loop this replaces cost
// about 0.8 us per 2048-wide row, as much as the GEMM itself for small layers at M = 32 (session 21).
void block_rows_avx512bf16(const uint16_t* x, int64_t m, int64_t k, int64_t kpad, int64_t ng, uint16_t* xk,
                           float* xsum) {
  const int64_t kb_n = kpad / KB, gl = k / ng;
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* row = x + r * k;
    int64_t g = 0, g_end = gl;  // the current group and its end column
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int64_t kb = 0; kb < kb_n; ++kb) {
      const int64_t c0 = kb * KB;
      const int64_t len = k - c0 < KB ? k - c0 : KB;
      const __mmask32 mk = len == KB ? ~__mmask32(0) : (__mmask32(1) << len) - 1;
      const __m512i v = _mm512_maskz_loadu_epi16(mk, row + c0);
      _mm512_storeu_si512(xk + (kb * m + r) * KB, v);
      const __m512 lo = simd_bf16_to_ps(_mm512_castsi512_si256(v));
      const __m512 hi = simd_bf16_to_ps(_mm512_extracti64x4_epi64(v, 1));
      s0 = _mm512_add_pd(s0, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(lo)),
                                           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lo), 1)))));
      s1 = _mm512_add_pd(s1, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(hi)),
                                           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(hi), 1)))));
      if (c0 + KB >= g_end) {  // a group ends with this block (groups are whole blocks, or the whole row)
        xsum[r * ng + g] = static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(s0, s1)));
        s0 = _mm512_setzero_pd();
        s1 = _mm512_setzero_pd();
        if (++g == ng) g_end = INT64_MAX;
        else g_end += gl;
      }
    }
  }
}

void gemm_avx512bf16(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, t0, t1); break;
    case 3: gemm_bits<3>(a, t0, t1); break;
    case 4: gemm_bits<4>(a, t0, t1); break;
    default: break;
  }
}

}  // namespace rcsr_cpu
