// rcsr_cpu: the torch.library ops (schema in TORCH_LIBRARY below) and the run-time ISA dispatch.
//
//   repack(codes, bits)                  uint8 codes [N, K] -> packed layout (kernel.h)
//   unpack(packed, bits, n, k)           the inverse (tests, debugging)
//   gemm(x, packed, scales, zeros, perm, bits, group_size, n, isa, large_m)
//                                        y = x[:, perm] @ W^T  in x's dtype, fp32 accumulation
//   grouped_gemm(x, packed, scales, zeros, perm, offsets, bits, group_size, n, isa, large_m)
//                                        rows offsets[e]..offsets[e+1] of x use expert e's weight
//
// Two code paths: rows < large_m run the ISA kernel on the packed codes (the weight is read once
// per 8 rows); rows >= large_m dequantize column chunks of W^T (fp32, in cache) and hand each to
// ATen's GEMM in the activation dtype (fp16: in fp32).  isa: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 BF16
// (bf16 activations, bits <= 4; other layers of a bf16 model use AVX-512), 4 AVX-512 VNNI with int8
// activations (opt-in only, never the default: it quantizes the activations per row and weight group;
// every width, 2/3/4/8; no large-M path, so a row's numerics do not depend on the batch).
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernel.h"

namespace rcsr_cpu {
namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAvx512VnniA8 = 4 };

bool has_f16c() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  return (c & bit_F16C) != 0;
}

bool isa_probe(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kScalar: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && has_f16c();
    case kAvx512Bf16: return isa_probe(kAvx512) && __builtin_cpu_supports("avx512bf16");
    case kAvx512VnniA8: return isa_probe(kAvx512) && __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
}

// the CPU's answer, asked once (cpuid on every GEMM call showed in decode profiles)
bool isa_supported(int64_t isa) {
  static const bool known[5] = {isa_probe(kScalar), isa_probe(kAvx2), isa_probe(kAvx512), isa_probe(kAvx512Bf16),
                                isa_probe(kAvx512VnniA8)};
  return isa >= kScalar && isa <= kAvx512VnniA8 && known[isa];
}

int64_t best_isa() {  // of the exact (A16) kernels: the int8-activation kernel is opt-in only
  for (int64_t i = kAvx512Bf16; i > kScalar; --i)
    if (isa_supported(i)) return i;
  return kScalar;
}

const char* isa_name(int64_t isa) {
  static const char* names[] = {"scalar", "avx2", "avx512", "avx512_bf16", "avx512_vnni_a8"};
  return isa >= 0 && isa <= 4 ? names[isa] : "?";
}

// how many threads an at::parallel_for of this library really uses (0 .. n): a build without OpenMP
// would silently run every kernel on one thread
int64_t parallel_threads(int64_t n) {
  std::vector<char> used(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  int64_t k = 0;
  for (char u : used) k += u;
  return k;
}

using GemmFn = void (*)(const GemmArgs&, int64_t, int64_t);
using DequantFn = void (*)(const DequantArgs&, int64_t, int64_t);

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void plane_of(int64_t bits, int p, int* width, int* shift, int* off) {
  if (bits == 3) {
    *width = p == 0 ? 2 : 1;
    *shift = p == 0 ? 0 : 2;
    *off = p == 0 ? 0 : 2;
  } else {
    *width = (int)bits;
    *shift = 0;
    *off = 0;
  }
}

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "rcsr_cpu: bits must be 2, 3, 4 or 8, got ", bits);
}

at::Tensor repack(const at::Tensor& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "rcsr_cpu.repack: codes must be uint8 [N, K]");
  const auto c = codes.contiguous();
  const int64_t n = c.size(0), k = c.size(1), nt = ceil_div(n, NT), kbs = ceil_div(k, KB);
  auto out = at::zeros({nt, kbs, bits, NT}, c.options().dtype(at::kInt));
  const uint8_t* src = c.data_ptr<uint8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int np = bits == 3 ? 2 : 1;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int l = 0; l < NT && t * NT + l < n; ++l) {
        const uint8_t* row = src + (t * NT + l) * k;
        for (int64_t kk = 0; kk < k; ++kk) {
          const uint32_t code = row[kk];
          TORCH_CHECK(code < (1u << bits), "rcsr_cpu.repack: code ", code, " does not fit ", bits, " bits");
          const int64_t kb = kk / KB, ki = kk % KB;
          for (int p = 0; p < np; ++p) {
            int w, sh, off;
            plane_of(bits, p, &w, &sh, &off);
            const int per = 32 / w, wi = (int)(ki / per), ci = (int)(ki % per);
            const int bit = 16 * (ci & 1) + w * (ci >> 1);
            dst[((t * kbs + kb) * bits + off + wi) * NT + l] |= ((code >> sh) & ((1u << w) - 1u)) << bit;
          }
        }
      }
  });
  return out;
}

at::Tensor unpack(const at::Tensor& packed, int64_t bits, int64_t n, int64_t k) {
  check_bits(bits);
  const int64_t nt = ceil_div(n, NT), kbs = ceil_div(k, KB);
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.numel() == nt * kbs * bits * NT,
              "rcsr_cpu.unpack: packed does not hold [", n, ", ", k, "] ", bits, "-bit codes");
  const auto pc = packed.contiguous();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(pc.data_ptr<int32_t>());
  auto out = at::empty({n, k}, pc.options().dtype(at::kByte));
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int np = bits == 3 ? 2 : 1;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t t = r / NT, l = r % NT, kb = kk / KB, ki = kk % KB;
      uint32_t code = 0;
      for (int p = 0; p < np; ++p) {
        int w, sh, off;
        plane_of(bits, p, &w, &sh, &off);
        const int per = 32 / w, wi = (int)(ki / per), ci = (int)(ki % per);
        const uint32_t word = src[((t * kbs + kb) * bits + off + wi) * NT + l];
        code |= ((word >> (16 * (ci & 1) + w * (ci >> 1))) & ((1u << w) - 1u)) << sh;
      }
      dst[r * k + kk] = (uint8_t)code;
    }
  return out;
}

GemmFn gemm_fn(int64_t isa) {
  switch (isa) {
    case kAvx2: return gemm_avx2;
    case kAvx512: return gemm_avx512;
    case kAvx512Bf16: return gemm_avx512bf16;
    case kAvx512VnniA8: return gemm_avx512vnni;
    default: return gemm_scalar;
  }
}

DequantFn dequant_fn(int64_t isa) {
  switch (isa) {
    case kAvx2: return dequant_avx2;
    case kAvx512:
    case kAvx512Bf16:
    case kAvx512VnniA8: return dequant_avx512;
    default: return dequant_scalar;
  }
}

// Everything one weight (one expert) needs; checked against x once.
struct Weight {
  const int32_t* packed;
  const uint16_t* scales;
  const uint8_t* zeros;
};

struct Problem {
  int64_t bits, group_size, n, k, k_blocks, n_tiles, n_groups, group_blocks, isa;
};

Problem check_problem(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm, int64_t bits,
                      int64_t group_size, int64_t n, int64_t isa, int64_t experts) {
  check_bits(bits);
  TORCH_CHECK(x.dim() == 2, "rcsr_cpu.gemm: x must be 2-D [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "rcsr_cpu.gemm: x must be fp32, bf16 or fp16");
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512VnniA8, "rcsr_cpu.gemm: unknown isa ", isa);
  TORCH_CHECK(isa_supported(isa), "rcsr_cpu.gemm: this CPU cannot run the ", isa_name(isa), " kernel");
  Problem p;
  p.bits = bits;
  p.group_size = group_size;
  p.n = n;
  p.k = x.size(1);
  p.k_blocks = ceil_div(p.k, KB);
  p.n_tiles = ceil_div(n, NT);
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % KB == 0 && p.k % group_size == 0),
              "rcsr_cpu.gemm: group size ", group_size, " must be -1 or a multiple of 32 dividing K=", p.k);
  p.n_groups = group_size == -1 ? 1 : p.k / group_size;
  p.group_blocks = group_size == -1 ? p.k_blocks : group_size / KB;
  const int64_t e = experts;
  std::vector<int64_t> pshape = {p.n_tiles, p.k_blocks, bits, NT}, sshape = {p.n_tiles, p.n_groups, NT};
  if (e > 0) {
    pshape.insert(pshape.begin(), e);
    sshape.insert(sshape.begin(), e);
  }
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.is_contiguous() && packed.sizes().vec() == pshape,
              "rcsr_cpu.gemm: packed must be contiguous int32 ", at::IntArrayRef(pshape), ", got ", packed.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.sizes().vec() == sshape,
              "rcsr_cpu.gemm: scales must be contiguous fp16 ", at::IntArrayRef(sshape), ", got ", scales.sizes());
  if (zeros.has_value())
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous() && zeros->sizes().vec() == sshape,
                "rcsr_cpu.gemm: zeros must be contiguous uint8 ", at::IntArrayRef(sshape));
  if (perm.has_value())
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == p.k && perm->scalar_type() == at::kLong,
                "rcsr_cpu.gemm: perm must be int64 [K]");
  // the bf16 kernel takes bf16 activations and codes of at most 4 bits; other layers use AVX-512
  if (isa == kAvx512Bf16 && (x.scalar_type() != at::kBFloat16 || bits > 4)) isa = kAvx512;
  p.isa = isa;
  return p;
}

// x (permuted) in the kernel's input form: fp32, or bf16 for the bf16 kernel, zero-padded to
// k_blocks*32 columns and blocked [k_blocks][M][32]; and the group sums of x in fp32 [M][n_groups].
template <typename T>
void block_rows(const T* x, int64_t m, int64_t k, int64_t kpad, int64_t ng, bool bf16_out, void* xk, float* xsum) {
  const int64_t gl = k / ng, kb_n = kpad / KB;
  for (int64_t r = 0; r < m; ++r) {
    const T* row = x + r * k;
    for (int64_t g = 0; g < ng; ++g) {
      // eight independent partial sums: one running sum is a chain of dependent adds (4 cycles each),
      // which cost as much as the whole GEMM at M = 32 on small layers (measured, session 21)
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = g * gl;
      const int64_t ce = (g + 1) * gl;
      for (; c + 8 <= ce; c += 8)
        for (int j = 0; j < 8; ++j) acc[j] += static_cast<float>(row[c + j]);
      for (; c < ce; ++c) acc[0] += static_cast<float>(row[c]);
      xsum[r * ng + g] = static_cast<float>(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
    }
    for (int64_t kb = 0; kb < kb_n; ++kb) {  // block kb of row r: 32 adjacent elements at [kb][r][0]
      const int64_t c0 = kb * KB, len = std::min<int64_t>(KB, k - c0), dst = (kb * m + r) * KB;
      if (bf16_out) {
        uint16_t* d = static_cast<uint16_t*>(xk) + dst;
        std::memcpy(d, reinterpret_cast<const uint16_t*>(row) + c0, len * sizeof(uint16_t));
        std::fill(d + len, d + KB, uint16_t(0));
      } else {
        float* d = static_cast<float*>(xk) + dst;
        for (int64_t c = 0; c < len; ++c) d[c] = static_cast<float>(row[c0 + c]);
        std::fill(d + len, d + KB, 0.f);
      }
    }
  }
}

// x (permuted, contiguous) in the kernel's input form, in one pass: fp32, or bf16 for the bf16
// kernel, zero-padded to k_blocks*32 columns and blocked [k_blocks][M][32]; and the group sums of x
// [M][n_groups] (fp32, summed in double).  The int8 kernel: quantize_rows_avx512vnni, and xscale.
void kernel_inputs(const at::Tensor& xp, const Problem& p, at::Tensor* xk, at::Tensor* xsum, at::Tensor* xscale) {
  const int64_t m = xp.size(0), kpad = p.k_blocks * KB;
  if (p.isa == kAvx512VnniA8) {
    *xk = at::empty({p.k_blocks, m, KB}, xp.options().dtype(at::kChar));
    *xsum = at::empty({m, p.n_groups}, xp.options().dtype(at::kFloat));
    *xscale = at::empty({m, p.n_groups}, xp.options().dtype(at::kFloat));
    TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kBFloat16 || xp.scalar_type() == at::kHalf,
                "rcsr_cpu.gemm: x must be fp32, bf16 or fp16");
    const int xdtype = xp.scalar_type() == at::kFloat ? 0 : xp.scalar_type() == at::kBFloat16 ? 1 : 2;
    quantize_rows_avx512vnni(xp.data_ptr(), xdtype, m, p.k, kpad, p.n_groups, (int)p.bits, xk->data_ptr<int8_t>(),
                             xsum->data_ptr<float>(), xscale->data_ptr<float>());
    return;
  }
  const bool bf16 = p.isa == kAvx512Bf16;
  *xk = at::empty({p.k_blocks, m, KB}, xp.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  *xsum = at::empty({m, p.n_groups}, xp.options().dtype(at::kFloat));
  void* dst = xk->data_ptr();
  float* xs = xsum->data_ptr<float>();
  switch (xp.scalar_type()) {
    case at::kFloat: block_rows(xp.data_ptr<float>(), m, p.k, kpad, p.n_groups, false, dst, xs); break;
    case at::kBFloat16:
      if (bf16)
        block_rows_avx512bf16(reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>()), m, p.k, kpad, p.n_groups,
                              static_cast<uint16_t*>(dst), xs);
      else
        block_rows(xp.data_ptr<at::BFloat16>(), m, p.k, kpad, p.n_groups, false, dst, xs);
      break;
    case at::kHalf: block_rows(xp.data_ptr<at::Half>(), m, p.k, kpad, p.n_groups, false, dst, xs); break;
    default: TORCH_CHECK(false, "rcsr_cpu.gemm: x must be fp32, bf16 or fp16");
  }
}

// tiles per parallel chunk: small layers (a decode step of a small model) run on the calling thread
int64_t tile_grain(const Problem& p, int64_t m) {
  const int64_t work = p.k_blocks * KB * NT * std::max<int64_t>(m, 1);  // MACs per tile
  return std::max<int64_t>(1, (1 << 18) / work);
}

GemmArgs make_args(const Problem& p, const Weight& w, const at::Tensor& xk, const at::Tensor& xsum,
                   const at::Tensor& xscale, float* out, int64_t out_stride) {
  GemmArgs a;
  a.x = xk.data_ptr();
  a.xsum = xsum.data_ptr<float>();
  a.xscale = xscale.defined() ? xscale.data_ptr<float>() : nullptr;
  a.xoff = nullptr;
  a.xoffq = nullptr;
  a.packed = w.packed;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.out = out;
  a.out_bf16 = nullptr;
  a.M = xk.size(1);
  a.x_block_stride = xk.size(1) * KB;  // xk is [k_blocks][M][32]
  a.out_stride = out_stride;
  a.k_blocks = p.k_blocks;
  a.n_groups = p.n_groups;
  a.group_blocks = p.group_blocks;
  a.bits = (int)p.bits;
  return a;
}

// The bf16 kernel on a symmetric grid: each group's sum starts at -(128 + 2^(bits-1)) * sum(x), the
// zero-point term, which is then a broadcast load instead of an FMA per sum (session 21: ~3 % at g64).
// The int8 kernel on a symmetric grid: its int32 sums start at -2^(bits-1) * sum(x_q) (an integer: xsum holds
// the exact sums of the int8 activations; int32 holds it, |sum| <= 127 * K * 128), one FP instruction less
// per flush.
at::Tensor zero_point_terms(const Problem& p, const at::Tensor& xsum, bool asymmetric) {
  if (asymmetric) return at::Tensor();
  if (p.isa == kAvx512VnniA8) return xsum.to(at::kInt) * static_cast<int64_t>(-(1 << (p.bits - 1)));
  if (p.isa != kAvx512Bf16) return at::Tensor();
  return xsum * static_cast<double>(-(128 + (1 << (p.bits - 1))));
}

void set_zero_point_terms(GemmArgs* a, const at::Tensor& xoff, int64_t row0, int64_t n_groups) {
  if (!xoff.defined()) return;
  if (xoff.scalar_type() == at::kInt)
    a->xoffq = xoff.data_ptr<int32_t>() + row0 * n_groups;
  else
    a->xoff = xoff.data_ptr<float>() + row0 * n_groups;
}

// rows >= large_m: dequantize W^T chunk by chunk (fp32, stays in cache) and let ATen multiply
void gemm_large(const Problem& p, const Weight& w, const at::Tensor& xp, at::Tensor out) {
  const int64_t chunk_tiles = std::max<int64_t>(8, std::min<int64_t>(p.n_tiles, (1 << 19) / (p.k_blocks * KB * NT)));
  auto wt = at::empty({p.k_blocks * KB, chunk_tiles * NT}, xp.options().dtype(at::kFloat));
  DequantArgs d;
  d.packed = w.packed;
  d.scales = w.scales;
  d.zeros = w.zeros;
  d.w = wt.data_ptr<float>();
  d.ldw = chunk_tiles * NT;
  d.k_blocks = p.k_blocks;
  d.n_groups = p.n_groups;
  d.group_blocks = p.group_blocks;
  d.bits = (int)p.bits;
  const DequantFn fn = dequant_fn(p.isa);
  // fp16 activations multiply in fp32: ATen's fp16 CPU GEMM has no fast path without AVX512-FP16 (50-80x
  // slower than fp32 on Zen 5, docs/CPU_KERNELS.md), and the fp32 product is the more exact one
  const at::Tensor xa = xp.scalar_type() == at::kHalf ? xp.to(at::kFloat) : xp;
  for (int64_t c0 = 0; c0 < p.n_tiles; c0 += chunk_tiles) {
    const int64_t c1 = std::min(p.n_tiles, c0 + chunk_tiles);
    d.tile0 = c0;
    at::parallel_for(c0, c1, 1, [&](int64_t t0, int64_t t1) { fn(d, t0, t1); });
    const int64_t cols = std::min(p.n, c1 * NT) - c0 * NT;
    auto wc = wt.narrow(0, 0, p.k).narrow(1, 0, cols);
    if (xa.scalar_type() != at::kFloat) wc = wc.to(xa.scalar_type());
    out.narrow(1, c0 * NT, cols).copy_(at::mm(xa, wc));
  }
}

Weight weight_of(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                 int64_t e, const Problem& p) {
  const int64_t pw = p.n_tiles * p.k_blocks * p.bits * NT, sw = p.n_tiles * p.n_groups * NT;
  Weight w;
  w.packed = packed.data_ptr<int32_t>() + e * pw;
  w.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()) + e * sw;
  w.zeros = zeros.has_value() ? zeros->data_ptr<uint8_t>() + e * sw : nullptr;
  return w;
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm, int64_t bits,
                int64_t group_size, int64_t n, int64_t isa, int64_t large_m) {
  const Problem p = check_problem(x, packed, scales, zeros, perm, bits, group_size, n, isa, 0);
  const int64_t m = x.size(0);
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const auto xp = (perm.has_value() ? x.index_select(1, *perm) : x).contiguous();
  const Weight w = weight_of(packed, scales, zeros, 0, p);
  if (p.isa == kAvx512VnniA8) large_m = 0;  // one numerics for every batch size
  if (large_m > 0 && m >= large_m) {
    gemm_large(p, w, xp, out);
    return out;
  }
  at::Tensor xk, xsum, xscale;
  kernel_inputs(xp, p, &xk, &xsum, &xscale);
  // an output whose width is whole tiles is written by the kernel directly: fp32, or bf16 by the bf16 and
  // int8 kernels (rounded as ATen rounds; the separate fp32 buffer and copy cost 3-5 % at M = 32, session 21)
  const bool whole = n == p.n_tiles * NT;
  const bool direct = whole && x.scalar_type() == at::kFloat;
  const bool direct_bf16 = whole && (p.isa == kAvx512Bf16 || p.isa == kAvx512VnniA8) && x.scalar_type() == at::kBFloat16;
  auto acc = direct || direct_bf16 ? out : at::empty({m, p.n_tiles * NT}, x.options().dtype(at::kFloat));
  GemmArgs a = make_args(p, w, xk, xsum, xscale, direct_bf16 ? nullptr : acc.data_ptr<float>(), acc.size(1));
  if (direct_bf16) a.out_bf16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const at::Tensor xoff = zero_point_terms(p, xsum, zeros.has_value());
  set_zero_point_terms(&a, xoff, 0, p.n_groups);
  const GemmFn fn = gemm_fn(p.isa);
  at::parallel_for(0, p.n_tiles, tile_grain(p, m), [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  if (!direct && !direct_bf16) out.copy_(acc.narrow(1, 0, n));
  return out;
}

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                        const at::Tensor& offsets, int64_t bits, int64_t group_size, int64_t n, int64_t isa,
                        int64_t large_m) {
  TORCH_CHECK(packed.dim() == 5, "rcsr_cpu.grouped_gemm: packed must be [E, n_tiles, k_blocks, bits, 16]");
  const int64_t e = packed.size(0);
  const Problem p = check_problem(x, packed, scales, zeros, perm, bits, group_size, n, isa, e);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == e + 1 && offsets.scalar_type() == at::kLong,
              "rcsr_cpu.grouped_gemm: offsets must be int64 [E + 1]");
  const auto off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t m = x.size(0);
  TORCH_CHECK(o[0] == 0 && o[e] == m, "rcsr_cpu.grouped_gemm: offsets must run from 0 to the number of rows");
  for (int64_t i = 0; i < e; ++i) TORCH_CHECK(o[i] <= o[i + 1], "rcsr_cpu.grouped_gemm: offsets must not decrease");
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const auto xp = (perm.has_value() ? x.index_select(1, *perm) : x).contiguous();
  if (p.isa == kAvx512VnniA8) large_m = 0;  // one numerics for every batch size
  // experts with many rows: the large-M path, one after the other
  std::vector<GemmArgs> small;
  at::Tensor xk, xsum, xscale, acc;
  bool any_small = false;
  for (int64_t i = 0; i < e; ++i) {
    const int64_t rows = o[i + 1] - o[i];
    if (rows > 0 && !(large_m > 0 && rows >= large_m)) any_small = true;
  }
  at::Tensor xoff;
  if (any_small) {
    kernel_inputs(xp, p, &xk, &xsum, &xscale);
    acc = at::empty({m, p.n_tiles * NT}, x.options().dtype(at::kFloat));
    xoff = zero_point_terms(p, xsum, zeros.has_value());
  }
  for (int64_t i = 0; i < e; ++i) {
    const int64_t rows = o[i + 1] - o[i];
    if (rows == 0) continue;
    const Weight w = weight_of(packed, scales, zeros, i, p);
    if (large_m > 0 && rows >= large_m) {
      gemm_large(p, w, xp.narrow(0, o[i], rows), out.narrow(0, o[i], rows));
      continue;
    }
    GemmArgs a = make_args(p, w, xk, xsum, xscale, acc.data_ptr<float>() + o[i] * acc.size(1), acc.size(1));
    a.M = rows;
    a.x = static_cast<const char*>(xk.data_ptr()) + o[i] * KB * xk.element_size();
    a.xsum = xsum.data_ptr<float>() + o[i] * p.n_groups;
    if (a.xscale) a.xscale = xscale.data_ptr<float>() + o[i] * p.n_groups;
    set_zero_point_terms(&a, xoff, o[i], p.n_groups);
    small.push_back(a);
  }
  if (!small.empty()) {
    // one parallel loop over (expert, tile) items
    const int64_t items = (int64_t)small.size() * p.n_tiles;
    const GemmFn fn = gemm_fn(p.isa);
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1;) {
        const int64_t s = i / p.n_tiles, t = i % p.n_tiles;
        const int64_t t1 = std::min(p.n_tiles, t + (i1 - i));
        fn(small[s], t, t1);
        i += t1 - t;
      }
    });
    for (int64_t i = 0; i < e; ++i) {
      const int64_t rows = o[i + 1] - o[i];
      if (rows == 0 || (large_m > 0 && rows >= large_m)) continue;
      out.narrow(0, o[i], rows).copy_(acc.narrow(0, o[i], rows).narrow(1, 0, n));
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(rcsr_cpu, m) {
  m.def("repack(Tensor codes, int bits) -> Tensor");
  m.def("unpack(Tensor packed, int bits, int n, int k) -> Tensor");
  m.def("gemm(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? perm, int bits, int group_size, "
        "int n, int isa, int large_m) -> Tensor");
  m.def("grouped_gemm(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? perm, Tensor offsets, "
        "int bits, int group_size, int n, int isa, int large_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(rcsr_cpu, CPU, m) {
  m.impl("repack", &repack);
  m.impl("unpack", &unpack);
  m.impl("gemm", &gemm);
  m.impl("grouped_gemm", &grouped_gemm);
}

}  // namespace rcsr_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcsr-deploy native CPU low-bit GEMM (ops under torch.ops.rcsr_cpu)";
  m.def("isa_supported", &rcsr_cpu::isa_supported,
        "whether this CPU can run ISA level i (0 scalar .. 3 avx512_bf16, 4 avx512_vnni_a8)");
  m.def("best_isa", &rcsr_cpu::best_isa, "the fastest exact (A16) ISA level this CPU runs");
  m.def("parallel_threads", &rcsr_cpu::parallel_threads, "threads an at::parallel_for over n items uses here");
  m.attr("ISA_NAMES") = pybind11::make_tuple("scalar", "avx2", "avx512", "avx512_bf16", "avx512_vnni_a8");
}
