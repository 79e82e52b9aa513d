// rcsr_cpu: AVX-512 VNNI kernel with int8 activations (opt-in, RCSR_CPU_ISA=avx512_vnni_a8) for 2/3/4/8-bit codes.
//
// This is the one kernel that changes numerics: each row's activations are quantized per weight group
// to int8 (symmetric, scale = max|x| / 127 over the group's columns; ops.cpp, kernel_inputs), and
// vpdpbusd multiplies the unsigned codes q (u8) with the int8 activations, four products per 32-bit lane
// (64 MACs per instruction, twice vdpbf16ps).  Per group the integer sums give, exactly,
//   sum_k xq_k (q_k - z) = acc - z * sum_k xq_k,
// which is scaled by the weight scale s and the activation scale sx in fp32.  On symmetric grids (z = 2^(b-1)
// for every column) the int32 sums start at -z * sum_k xq_k (ops.cpp, zero_point_terms), so a flush is
// three FP instructions per 16 sums instead of four.  The packed layout is the
// A16 kernels' (kernel.h): a p-bit plane word holds its even codes in the low half and its odd codes in
// the high half, so (word >> p*j) & mask gives in its four bytes the codes (2j, per/2+2j, 2j+1,
// per/2+2j+1) of the word's per = 32/p; quantize_rows writes the activation bytes in that order.  3-bit
// codes take their bytes from the low 2-bit plane and add the high plane's bit (block3).
// Compiled for AVX-512 VNNI via the pragma below, called only after the run-time CPU check (ops.cpp).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
#include <immintrin.h>
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in its own intrinsics

#include "kernel.h"
#include "simd_avx512.h"

#define RCSR_INLINE __attribute__((always_inline)) inline
#ifndef RCSR_A8_MB
// rows per pass over a pair of tiles from M = 4 on.  The fp32 sums stay in registers with the int32 ones
// (2 x 4 of each): the per-group scaling is a third of this kernel's instructions at group 64 (it does
// half the dot instructions of the bf16 kernel per group), and keeping its accumulators out of memory
// made M = 256 15 % faster than 2 x 8 rows with the sums in L1 (1 thread, 1.1B-model shapes)
#define RCSR_A8_MB 4
#endif

namespace rcsr_cpu {
namespace {

// 3-bit codes, one k-block of tiles wt[0..TL-1]: the two words of the low (2-bit) plane give four byte
// steps each, as for 2-bit codes, and the high (1-bit) plane word h adds bit 2 of every byte.  Step j
// of low word wi holds the word's codes (2j, 8+2j, 2j+1, 9+2j) in its four bytes, whose high bits sit in
// h at bits 8wi+j, 8wi+4+j, 16+8wi+j, 16+8wi+4+j (code c at bit 16*(c&1) + (c>>1)).  One select per low
// word gathers them as hp = (bits 8wi..8wi+3 -> byte 0, 8wi+4..8wi+7 -> byte 1, the same +16 -> bytes 2/3),
// so that bit j of each byte of hp is the high bit of step j's code (bits 4-7 of a byte are left over and
// never reach bit 2 under the shifts below); step j then shifts bit j to bit 2, masks it, and ors it
// into the masked low codes: (lo & 0x03) | (hi & 0x04) per byte, the code lo + 4 hi.  The activations
// are in the 2-bit order (quantize_rows).
template <int MB, int TL>
RCSR_INLINE void block3(const int32_t* const* wt, int64_t kb, const int32_t* const* xr, __m512i (*accq)[MB]) {
  const __m512i m03 = _mm512_set1_epi32(0x03030303), m04 = _mm512_set1_epi32(0x04040404);
  const __m512i m0f = _mm512_set1_epi32(0x000F000F);
  __m512i h[TL];
  for (int i = 0; i < TL; ++i) h[i] = _mm512_loadu_si512(wt[i] + (kb * 3 + 2) * NT);
#pragma GCC unroll 2
  for (int wi = 0; wi < 2; ++wi) {
    __m512i v[TL], hp[TL];
    for (int i = 0; i < TL; ++i) {
      v[i] = _mm512_loadu_si512(wt[i] + (kb * 3 + wi) * NT);
      // select (imm 0xE4: c ? a : b) with c = 0x000F000F: bits 0-3 / 16-19 from a, the rest from b
      hp[i] = wi == 0 ? _mm512_ternarylogic_epi32(h[i], _mm512_slli_epi32(h[i], 4), m0f, 0xE4)
                      : _mm512_ternarylogic_epi32(_mm512_srli_epi32(h[i], 8), _mm512_srli_epi32(h[i], 4), m0f, 0xE4);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i w[TL];
      for (int i = 0; i < TL; ++i) {
        const __m512i lo = j == 0 ? v[i] : _mm512_srli_epi32(v[i], 2 * j);
        const __m512i hs = j < 2 ? _mm512_slli_epi32(hp[i], 2 - j) : j == 2 ? hp[i] : _mm512_srli_epi32(hp[i], 1);
        // imm 0xEC: (a & c) | b, with b = the high bits already masked to bit 2 of each byte
        w[i] = _mm512_ternarylogic_epi32(lo, _mm512_and_si512(hs, m04), m03, 0xEC);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m512i xb = _mm512_set1_epi32(xr[m][wi * 4 + j]);
        for (int i = 0; i < TL; ++i) accq[i][m] = _mm512_dpbusd_epi32(accq[i][m], w[i], xb);
      }
    }
  }
}

// Output tiles t .. t+TL-1, rows m0 .. m0+MB-1 (the structure of the bf16 kernel: each broadcast
// activation word feeds TL dot products; the group's int32 sums and the fp32 sums stay in registers).
template <int BITS, int MB, int TL>
void tile_rows(const GemmArgs& a, int64_t t, int64_t m0) {
  constexpr int S = 8 / BITS;  // 4-code steps per plane word
  const int8_t* x = static_cast<const int8_t*>(a.x);
  __m512 acc[TL][MB];
  for (int i = 0; i < TL; ++i)
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_setzero_ps();
  const int32_t* wt[TL];
  for (int i = 0; i < TL; ++i) wt[i] = a.packed + (t + i) * a.k_blocks * BITS * NT;
  const __m512i bmask = _mm512_set1_epi32(BITS == 8 ? -1 : ((1 << BITS) - 1) * 0x01010101);
  const __m512 zsym = _mm512_set1_ps((float)(1 << (BITS - 1)));
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m512i accq[TL][MB];
    if (a.xoffq) {  // symmetric: the int32 sums start at the zero-point term -z * sum(x_q), exact
      for (int m = 0; m < MB; ++m) {
        const __m512i zo = _mm512_set1_epi32(a.xoffq[(m0 + m) * a.n_groups + g]);
        for (int i = 0; i < TL; ++i) accq[i][m] = zo;
      }
    } else {
      for (int i = 0; i < TL; ++i)
        for (int m = 0; m < MB; ++m) accq[i][m] = _mm512_setzero_si512();
    }
    int64_t kb1 = (g + 1) * a.group_blocks;
    if (kb1 > a.k_blocks) kb1 = a.k_blocks;
    for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
      const int32_t* xr[MB];
      for (int m = 0; m < MB; ++m) xr[m] = reinterpret_cast<const int32_t*>(x + kb * a.x_block_stride + (m0 + m) * KB);
      for (int i = 0; i < TL; ++i) RCSR_PREFETCH_BLOCK(wt[i] + kb * BITS * NT, BITS);
      if constexpr (BITS == 3) {
        block3<MB, TL>(wt, kb, xr, accq);
      } else {
#pragma GCC unroll 8
        for (int wi = 0; wi < BITS; ++wi) {
          __m512i v[TL];
          for (int i = 0; i < TL; ++i) v[i] = _mm512_loadu_si512(wt[i] + (kb * BITS + wi) * NT);
#pragma GCC unroll 4
          for (int j = 0; j < S; ++j) {
            __m512i w[TL];
            for (int i = 0; i < TL; ++i)
              w[i] = BITS == 8 ? v[i] : _mm512_and_si512(_mm512_srli_epi32(v[i], BITS * j), bmask);
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
              const __m512i xb = _mm512_set1_epi32(xr[m][wi * S + j]);
              for (int i = 0; i < TL; ++i) accq[i][m] = _mm512_dpbusd_epi32(accq[i][m], w[i], xb);
            }
          }
        }
      }
    }
    for (int i = 0; i < TL; ++i) {
      const int64_t sg = ((t + i) * a.n_groups + g) * NT;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scales + sg)));
      if (a.xoffq) {  // three FP instructions per 16 sums: convert, scale product, FMA
        for (int m = 0; m < MB; ++m) {
          const __m512 sx = _mm512_mul_ps(s, _mm512_set1_ps(a.xscale[(m0 + m) * a.n_groups + g]));
          acc[i][m] = _mm512_fmadd_ps(sx, _mm512_cvtepi32_ps(accq[i][m]), acc[i][m]);
        }
      } else {
        const __m512 z = a.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + sg))))
                                 : zsym;
        for (int m = 0; m < MB; ++m) {
          const int64_t mg = (m0 + m) * a.n_groups + g;
          const __m512 xs = _mm512_set1_ps(a.xsum[mg]);
          const __m512 sx = _mm512_mul_ps(s, _mm512_set1_ps(a.xscale[mg]));
          const __m512 q = _mm512_fnmadd_ps(z, xs, _mm512_cvtepi32_ps(accq[i][m]));
          acc[i][m] = _mm512_fmadd_ps(sx, q, acc[i][m]);
        }
      }
    }
  }
  for (int i = 0; i < TL; ++i)
    for (int m = 0; m < MB; ++m) {
      const int64_t o = (m0 + m) * a.out_stride + (t + i) * NT;
      if (a.out_bf16)  // bf16 straight into the caller's tensor, rounded as ATen rounds
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out_bf16 + o), simd_to_bf16(acc[i][m]));
      else
        _mm512_storeu_ps(a.out + o, acc[i][m]);
    }
}

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

template <int BITS, int TL, int MB>
void rows_of(const GemmArgs& a, int64_t t) {
  int64_t m0 = 0;
  for (; m0 + MB <= a.M; m0 += MB) tile_rows<BITS, MB, TL>(a, t, m0);
  rest_rows<BITS, TL, MB - 1>(a, t, m0, a.M - m0);
}

// tiles in fours for M < 4 (one row's sums are a dependent chain of vpdpbusd), else pairs x RCSR_A8_MB rows
template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t t0, int64_t t1) {
  int64_t t = t0;
  if (a.M < 4)
    for (; t + 4 <= t1; t += 4) rows_of<BITS, 4, 4>(a, t);
  for (; t + 2 <= t1; t += 2) rows_of<BITS, 2, RCSR_A8_MB>(a, t);
  for (; t < t1; ++t) rows_of<BITS, 1, RCSR_A8_MB>(a, t);
}

}  // namespace

void gemm_avx512vnni(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, t0, t1); break;
    case 3: gemm_bits<3>(a, t0, t1); break;
    case 4: gemm_bits<4>(a, t0, t1); break;
    case 8: gemm_bits<8>(a, t0, t1); break;
    default: break;
  }
}


// The int8 kernel's input (was scalar code in ops.cpp, whose per-element nearbyint call cost as much as
// the GEMM of a 576-wide layer at M = 16): per row and weight group, scale = max|x| / 127 (1 where the
// group is all zero), x_q = round-half-even(x * (127 / max|x|)) clamped to [-127, 127] (cvtps2dq under
// the default rounding mode, as nearbyint), read from fp32, bf16 or fp16 rows (widened exactly); blocked
// [k_blocks][M][32], each plane word's 4-byte steps in the order tile_rows unpacks the codes: within every run of per = 32/p columns, step j holds columns
// (2j, per/2+2j, 2j+1, per/2+2j+1).  A run (4, 8 or 16 columns) never crosses a 16-byte lane, so one
// in-lane byte shuffle per block does the reordering.  xsum = the group sums of x_q (exact in fp32).
namespace {

// 16 activations (mask mk) as fp32, exactly, from fp32, bf16 or fp16 rows
template <int XT>
RCSR_INLINE __m512 load_x(const void* row, int64_t c, __mmask16 mk) {
  if constexpr (XT == 0) return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(row) + c);
  if constexpr (XT == 1) return simd_load_bf16(static_cast<const uint16_t*>(row) + c, mk);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(row) + c));
}

template <int XT>
void quantize_rows(const void* x, int64_t m, int64_t k, int64_t kpad, int64_t ng, int bits, int8_t* xk, float* xsum,
                   float* xscale) {
  const int64_t gl = k / ng, kb_n = kpad / KB, per = 32 / (bits == 3 ? 2 : bits);  // 3-bit: the low plane's order
  alignas(32) int8_t ctrl[KB];
  for (int64_t w0 = 0; w0 < KB; w0 += per)
    for (int64_t j = 0; j < per / 4; ++j) {
      const int64_t lane = (w0 / 16) * 16;
      ctrl[w0 + 4 * j + 0] = (int8_t)(w0 + 2 * j - lane);
      ctrl[w0 + 4 * j + 1] = (int8_t)(w0 + per / 2 + 2 * j - lane);
      ctrl[w0 + 4 * j + 2] = (int8_t)(w0 + 2 * j + 1 - lane);
      ctrl[w0 + 4 * j + 3] = (int8_t)(w0 + per / 2 + 2 * j + 1 - lane);
    }
  const __m256i shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctrl));
  const __m512 sign = _mm512_set1_ps(-0.0f), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  int8_t* q = new int8_t[kpad];
  const int64_t xbytes = XT == 0 ? 4 : 2;
  for (int64_t r = 0; r < m; ++r) {
    const void* row = static_cast<const char*>(x) + r * k * xbytes;
    for (int64_t c = k; c < kpad; ++c) q[c] = 0;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gl, c1 = c0 + gl;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t c = c0; c < c1; c += 16) {
        const __mmask16 mk = c1 - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c1 - c)) - 1);
        vmax = _mm512_max_ps(vmax, _mm512_andnot_ps(sign, load_x<XT>(row, c, mk)));
      }
      const float amax = _mm512_reduce_max_ps(vmax);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t c = c0; c < c1; c += 16) {
        const __mmask16 mk = c1 - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c1 - c)) - 1);
        const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(load_x<XT>(row, c, mk), inv)));
        const __m512i qi = _mm512_maskz_mov_epi32(mk, _mm512_cvtps_epi32(v));
        vsum = _mm512_add_epi32(vsum, qi);
        _mm512_mask_cvtsepi32_storeu_epi8(q + c, mk, qi);
      }
      xsum[r * ng + g] = (float)_mm512_reduce_add_epi32(vsum);
      xscale[r * ng + g] = amax > 0.f ? amax / 127.f : 1.f;
    }
    for (int64_t kb = 0; kb < kb_n; ++kb) {
      const __m256i src = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + kb * KB));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xk + (kb * m + r) * KB), _mm256_shuffle_epi8(src, shuf));
    }
  }
  delete[] q;
}

}  // namespace

void quantize_rows_avx512vnni(const void* x, int xdtype, int64_t m, int64_t k, int64_t kpad, int64_t ng, int bits,
                              int8_t* xk, float* xsum, float* xscale) {
  switch (xdtype) {
    case 0: quantize_rows<0>(x, m, k, kpad, ng, bits, xk, xsum, xscale); break;
    case 1: quantize_rows<1>(x, m, k, kpad, ng, bits, xk, xsum, xscale); break;
    default: quantize_rows<2>(x, m, k, kpad, ng, bits, xk, xsum, xscale); break;
  }
}

}  // namespace rcsr_cpu
