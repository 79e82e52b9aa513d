// rcsr_cpu: small AVX-512 helpers shared by the AVX-512 kernel translation units.
//
// Every function here is `static inline`: internal linkage, so each translation unit that includes this
// header gets its own copy compiled for its own target ISA (#pragma GCC target), and the linker never
// picks one unit's copy for another (the hazard kernel.h describes for ordinary inline functions).
// Include after <immintrin.h>, from a unit compiled for at least AVX-512 F + BW.
#pragma once
#include <immintrin.h>
#include <stdint.h>

namespace rcsr_cpu {

// fp32 -> bf16 bits rounded to nearest even, exactly as ATen converts (c10::BFloat16; NaN stays NaN)
static inline __attribute__((always_inline)) __m256i simd_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(h);
}

// 16 bf16 values widened exactly to fp32
static inline __attribute__((always_inline)) __m512 simd_bf16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// up to 16 bf16 values (mask mk) widened exactly to fp32; masked-off lanes are 0
static inline __attribute__((always_inline)) __m512 simd_load_bf16(const uint16_t* p, __mmask16 mk) {
  return simd_bf16_to_ps(_mm256_maskz_loadu_epi16(mk, p));
}

}  // namespace rcsr_cpu
