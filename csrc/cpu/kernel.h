// rcsr_cpu: the arguments every ISA's low-bit kernel takes, and the kernels' declarations.
//
// This header is included by the ISA translation units (kernel_*.cpp), which are compiled with
// different target ISAs (#pragma GCC target).  It must therefore hold plain data and declarations
// only: no inline functions and no standard-library templates, whose instantiations the linker
// could share between translation units compiled for different ISAs.
//
// Packed layout ("rcsr tile-16 v1"), written once by rcsr_cpu::repack:
//   * output channels in tiles of NT = 16 (padded with code 0), input in blocks of KB = 32 (padded);
//   * a code of b bits is split into planes: b=2: {2}, 3: {2 low, 1 high}, 4: {4}, 8: {8};
//   * packed int32 [n_tiles][k_blocks][b][16]: for each block the words of each plane, one 32-bit
//     word per lane (output channel) per word index; a plane of width p has p words per block and
//     32/p codes per word.  Within a word the even codes of the run sit in the low 16 bits and the
//     odd codes in the high 16 bits: code c of the word is at bit 16*(c&1) + p*(c>>1).  So one shift
//     and one mask give the pair (k, k+1) in the two halves -- one bf16 pair for vdpbf16ps, or two
//     fp32 lanes.
//   * scales fp16 [n_tiles][n_groups][16], zero points uint8 [n_tiles][n_groups][16] (asymmetric
//     only; symmetric grids use the constant 2^(b-1)); W[n,k] = (q[n,k] - z[n,g]) * s[n,g].
#pragma once
#include <stdint.h>

namespace rcsr_cpu {

constexpr int NT = 16;  // output channels per tile
constexpr int KB = 32;  // input columns per block

// Software prefetch of a tile's packed codes a few k-blocks ahead of the block being read (one cache
// line per plane word).  A decode GEMM streams its weights from DRAM once; with one thread the hardware
// prefetchers alone kept the W4 kernel at ~60 % of the read bandwidth on the 1.1B model's layers
// (docs/CPU_KERNELS.md).  Distance: 8 blocks for 4 and 8 bits, 12 for 2 and 3 bits (a block of
// narrower codes is read faster; measured on the 1.1B model's decoder, sessions 17-18);
// -DRCSR_PF_BLOCKS=N forces N blocks for every width, 0 turns it off.  A macro, not a function: see
// the note above.  Used by the SIMD translation units, which include <immintrin.h> first.
#ifdef RCSR_PF_BLOCKS
#define RCSR_PF_BLOCKS_FOR(BITS) (RCSR_PF_BLOCKS)
#else
#define RCSR_PF_BLOCKS_FOR(BITS) ((BITS) < 4 ? 12 : 8)
#endif
#define RCSR_PREFETCH_BLOCK(blk, BITS)                                                             \
  do {                                                                                            \
    if (RCSR_PF_BLOCKS_FOR(BITS) > 0)                                                             \
      for (int pf_line = 0; pf_line < (BITS); ++pf_line)                                          \
        _mm_prefetch(reinterpret_cast<const char*>((blk) + (RCSR_PF_BLOCKS_FOR(BITS) * (BITS) + pf_line) * NT), \
                     _MM_HINT_T0);                                                                \
  } while (0)

struct GemmArgs {
  // activations blocked as [k_blocks][rows][32] (the rows' 32 columns of one block are adjacent, so
  // rows never alias in the L1 cache): fp32, or bf16 for the bf16 kernel; row m of this call is at
  // x + m*32, block kb at + kb*x_block_stride
  const void* x;
  const float* xsum;     // [M][n_groups]: sum of x over each group (int8 kernel: of the int8 activations)
  const float* xscale;   // [M][n_groups]: int8 kernel only, the activation scale of each group (else nullptr)
  const float* xoff;     // [M][n_groups]: bf16 kernel, symmetric grids: -(128 + 2^(bits-1)) * xsum (else nullptr)
  const int32_t* xoffq;  // [M][n_groups]: int8 kernel, symmetric grids: -2^(bits-1) * xsum, exact (else nullptr)
  const int32_t* packed; // [n_tiles][k_blocks][bits][16]
  const uint16_t* scales;  // fp16 bits [n_tiles][n_groups][16]
  const uint8_t* zeros;  // [n_tiles][n_groups][16] or nullptr (symmetric)
  float* out;            // [M][out_stride], columns tile*16 ...
  uint16_t* out_bf16;    // bf16 and int8 kernels: when set, the result goes here as bf16 (out is unused)
  int64_t M;
  int64_t x_block_stride;  // elements between consecutive k-blocks
  int64_t out_stride;    // elements
  int64_t k_blocks;
  int64_t n_groups;
  int64_t group_blocks;  // k-blocks per group (the last group may be shorter: per-channel padding)
  int bits;
};

struct DequantArgs {
  const int32_t* packed;
  const uint16_t* scales;
  const uint8_t* zeros;
  float* w;              // W^T [k_blocks*32][ldw]; tile t writes columns (t - tile0)*16 ...
  int64_t ldw;
  int64_t tile0;
  int64_t k_blocks;
  int64_t n_groups;
  int64_t group_blocks;
  int bits;
};

// Each computes output tiles [t0, t1) for all M rows (GEMM) or dequantizes them (W^T).
void gemm_scalar(const GemmArgs& a, int64_t t0, int64_t t1);
void gemm_avx2(const GemmArgs& a, int64_t t0, int64_t t1);
void gemm_avx512(const GemmArgs& a, int64_t t0, int64_t t1);
void gemm_avx512bf16(const GemmArgs& a, int64_t t0, int64_t t1);  // bits <= 4, bf16 x
void gemm_avx512vnni(const GemmArgs& a, int64_t t0, int64_t t1);  // bits 2/3/4/8, int8 x (opt-in)

// the int8 kernel's activations from rows [m][k] of fp32 (xdtype 0), bf16 (1) or fp16 (2)
// (kernel_avx512vnni.cpp explains the format)
void quantize_rows_avx512vnni(const void* x, int xdtype, int64_t m, int64_t k, int64_t kpad, int64_t ng, int bits,
                              int8_t* xk, float* xsum, float* xscale);

// the bf16 kernel's activations: bf16 rows [m][k] -> blocked [k_blocks][m][32] (zero-padded to kpad) and
// the group sums in fp32 [m][ng] (each summed in double, as ops.cpp's portable block_rows does)
void block_rows_avx512bf16(const uint16_t* x, int64_t m, int64_t k, int64_t kpad, int64_t ng, uint16_t* xk,
                           float* xsum);

void dequant_scalar(const DequantArgs& a, int64_t t0, int64_t t1);
void dequant_avx2(const DequantArgs& a, int64_t t0, int64_t t1);
void dequant_avx512(const DequantArgs& a, int64_t t0, int64_t t1);

}  // namespace rcsr_cpu
