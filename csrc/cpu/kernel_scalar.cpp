// rcsr_cpu: portable scalar kernels.  They read the packed layout code by code and are the
// executable definition of that layout (kernel.h); the SIMD kernels must agree with them.
#include "kernel.h"

namespace rcsr_cpu {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      exp = 113;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// code of lane l, column kk (0..31) of the block starting at `blk` ([bits][16] words)
inline uint32_t code_at(const int32_t* blk, int bits, int kk, int l) {
  const int widths3[2] = {2, 1};
  int np = bits == 3 ? 2 : 1;
  uint32_t code = 0;
  int off = 0, shift = 0;
  for (int p = 0; p < np; ++p) {
    int pw = bits == 3 ? widths3[p] : bits;
    int per = 32 / pw, wi = kk / per, c = kk % per;
    uint32_t word = (uint32_t)blk[(off + wi) * NT + l];
    uint32_t v = (word >> (16 * (c & 1) + pw * (c >> 1))) & ((1u << pw) - 1u);
    code |= v << shift;
    shift += pw;
    off += pw;
  }
  return code;
}

}  // namespace

void gemm_scalar(const GemmArgs& a, int64_t t0, int64_t t1) {
  const float* x = static_cast<const float*>(a.x);
  const float zsym = (float)(1 << (a.bits - 1));
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* wt = a.packed + t * a.k_blocks * a.bits * NT;
    for (int64_t m = 0; m < a.M; ++m) {
      float acc[NT] = {0};
      for (int64_t g = 0; g < a.n_groups; ++g) {
        float accq[NT] = {0};
        int64_t kb1 = (g + 1) * a.group_blocks;
        if (kb1 > a.k_blocks) kb1 = a.k_blocks;
        for (int64_t kb = g * a.group_blocks; kb < kb1; ++kb) {
          const int32_t* blk = wt + kb * a.bits * NT;
          for (int kk = 0; kk < KB; ++kk) {
            const float xv = x[kb * a.x_block_stride + m * KB + kk];
            for (int l = 0; l < NT; ++l) accq[l] += (float)code_at(blk, a.bits, kk, l) * xv;
          }
        }
        const int64_t sg = (t * a.n_groups + g) * NT;
        const float xs = a.xsum[m * a.n_groups + g];
        for (int l = 0; l < NT; ++l) {
          const float z = a.zeros ? (float)a.zeros[sg + l] : zsym;
          acc[l] += half_to_float(a.scales[sg + l]) * (accq[l] - z * xs);
        }
      }
      float* o = a.out + m * a.out_stride + t * NT;
      for (int l = 0; l < NT; ++l) o[l] = acc[l];
    }
  }
}

void dequant_scalar(const DequantArgs& a, int64_t t0, int64_t t1) {
  const float zsym = (float)(1 << (a.bits - 1));
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* wt = a.packed + t * a.k_blocks * a.bits * NT;
    float* wcol = a.w + (t - a.tile0) * NT;
    for (int64_t kb = 0; kb < a.k_blocks; ++kb) {
      int64_t g = kb / a.group_blocks;
      if (g >= a.n_groups) g = a.n_groups - 1;
      const int64_t sg = (t * a.n_groups + g) * NT;
      const int32_t* blk = wt + kb * a.bits * NT;
      for (int kk = 0; kk < KB; ++kk) {
        float* row = wcol + (kb * KB + kk) * a.ldw;
        for (int l = 0; l < NT; ++l) {
          const float z = a.zeros ? (float)a.zeros[sg + l] : zsym;
          row[l] = ((float)code_at(blk, a.bits, kk, l) - z) * half_to_float(a.scales[sg + l]);
        }
      }
    }
  }
}

}  // namespace rcsr_cpu
