"""Triton JIT code of the W{2,3,4,8}A16 GEMM (imported lazily by ``triton_wna16``).

This module imports Triton at import time and decorates the kernels then, so whether they run
compiled or under the Triton interpreter is fixed by ``TRITON_INTERPRET`` at import;
``triton_wna16`` reloads it when that setting changes.  Layouts are described in docs/KERNELS.md
and in ``triton_wna16.PreparedWeight``.
"""
from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl


def interpret_requested() -> bool:
    """Whether triton.jit builds interpreter functions now (Triton reads TRITON_INTERPRET)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except ImportError:       # Triton < 3.4 has no knobs module
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


INTERPRET = interpret_requested()


@triton.jit
def _spread(w, PPW: tl.constexpr):
    """[R, C] words -> [R, C*PPW]: every word repeated PPW times in a row (PPW a power of two)."""
    if PPW >= 2:
        w = tl.interleave(w, w)
    if PPW >= 4:
        w = tl.interleave(w, w)
    if PPW >= 8:
        w = tl.interleave(w, w)
    if PPW >= 16:
        w = tl.interleave(w, w)
    if PPW >= 32:
        w = tl.interleave(w, w)
    return w


@triton.jit
def _zero_row(z_ptr, row_offset, offs_n, mask_n, HAS_ZEROS: tl.constexpr, BITS: tl.constexpr):
    """Zero points of one group row as int32 (the constant 2**(BITS-1) when symmetric)."""
    if HAS_ZEROS:
        z = tl.load(z_ptr + row_offset + offs_n, mask=mask_n, other=0).to(tl.int32)
    else:
        z = tl.zeros_like(offs_n) + (1 << (BITS - 1))
    return z


@triton.jit
def wna16_gemm_kernel(
    x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr,
    M, N, K, N_PAD,
    stride_xm, stride_om, stride_qw, stride_qh,
    M_BUCKET,
    tile_e_ptr, tile_r_ptr, ends_ptr, perm_ptr, NUM_TILES,
    stride_eqw, stride_eqh, stride_es,
    BITS: tl.constexpr, PLANE_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUPED: tl.constexpr, HAS_PERM: tl.constexpr,
):
    """out[M, N] (+)= x[M, K] @ dequant(W)[K, N].

    ``GROUPED`` (MoE, one launch for all experts of a layer): ``x`` rows are sorted by expert and the
    weights are stacked per expert (expert strides ``stride_eqw``/``stride_eqh`` in words, ``stride_es``
    in scale/zero elements; group ids and permutations ``[E, K]``).  Row tile ``t`` of the launch belongs
    to expert ``tile_e[t]`` (``-1``: a padding tile, which exits at once) and covers rows
    ``tile_r[t] .. min(tile_r[t] + BLOCK_M, ends[e])``.  ``HAS_PERM``: row ``k`` of expert ``e``'s weight
    reads activation column ``perm[e, k]`` (each expert's act order; gathered in the load).

    Weights are K-major and packed along N: word ``qw[k, j]`` holds the codes of output channels
    ``j*PPW .. j*PPW+PPW-1`` at input ``k`` (slot ``t`` in bits ``[t*PLANE_BITS, (t+1)*PLANE_BITS)``,
    PPW = 32 // PLANE_BITS).  3-bit codes are split into a 2-bit plane ``qw`` and a 1-bit plane ``qh``
    (the code's bit 2).  ``GROUP_SIZE == 0`` means one group per output channel.  With SPLIT_K > 1
    each program reduces a slice of K and atomically adds into a zeroed fp32 ``out``.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GROUPED:
        num_pid_m = NUM_TILES
    else:
        num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-tiles share each weight tile while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_rows)
    pid_n = (pid % num_pid_in_group) // group_rows

    PPW: tl.constexpr = 32 // PLANE_BITS          # codes per word of the main plane
    WPT: tl.constexpr = BLOCK_N // PPW            # main-plane words per tile row
    LOW_MASK: tl.constexpr = (1 << PLANE_BITS) - 1
    # Row strides in words: N_PAD / PPW = (N_PAD / 128) * 4 * PLANE_BITS for the main plane and
    # (N_PAD / 128) * 4 for the 1-bit plane, because N_PAD is a multiple of 128 (the host checks).
    # Triton only knows a runtime int is a multiple of 16, and only when it is; rewriting the
    # strides as multiples of 4 words states the 16-byte row alignment outright, so the plane loads
    # stay 128-bit when a stride is not a multiple of 16 words (3-bit high plane at N = 11008).
    stride_qw = (stride_qw // (4 * PLANE_BITS)) * (4 * PLANE_BITS)
    if BITS == 3:
        stride_qh = (stride_qh // 4) * 4

    if GROUPED:
        expert = tl.load(tile_e_ptr + pid_m)
        if expert < 0:
            return
        row0 = tl.load(tile_r_ptr + pid_m)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < tl.load(ends_ptr + expert)
        e64 = expert.to(tl.int64)
        qw_ptr += e64 * stride_eqw
        s_ptr += e64 * stride_es
        if BITS == 3:
            qh_ptr += e64 * stride_eqh
        if HAS_ZEROS:
            z_ptr += e64 * stride_es
        if HAS_GIDX:
            gidx_ptr += e64 * K
        if HAS_PERM:
            perm_ptr += e64 * K
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_np = offs_n < N_PAD
    offs_w = tl.max_contiguous(tl.multiple_of(pid_n * WPT + tl.arange(0, WPT), WPT), WPT)
    # N_PAD is a multiple of 128 (triton_wna16.N_ALIGN).  The weight-plane masks are written so that
    # Triton's axis analysis sees them constant over 128-column runs: a mask built as
    # ``offs_w < N_PAD // PPW`` is only known constant over divisibility(N_PAD) / PPW words, which
    # caps the weight loads at 32-64 bits instead of 128 (checked in the sm_90 SASS).
    mask_w = (offs_w // (128 // PPW)) < (N_PAD // 128)
    shift = ((tl.arange(0, BLOCK_N) % PPW) * PLANE_BITS)[None, :]
    if BITS == 3:
        offs_h = pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
        mask_h = (offs_h // 4) < (N_PAD // 128)
        shift_h = (tl.arange(0, BLOCK_N) % 32)[None, :]

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_start = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_start + tiles_per_split, k_tiles)

    dot_t = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP_SIZE == 0:
        # Per-channel: scale/zero are constant along K -> subtract the zero in the loop, scale at the end.
        s_row = tl.load(s_ptr + offs_n, mask=mask_np, other=0.0).to(tl.float32)
        z_row = _zero_row(z_ptr, 0, offs_n, mask_np, HAS_ZEROS, BITS)

    for kt in range(kt_start, kt_end):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_w[None, :],
                    mask=mask_k[:, None] & mask_w[None, :], other=0)
        q = (_spread(w, PPW) >> shift) & LOW_MASK
        if BITS == 3:
            h = tl.load(qh_ptr + offs_k[:, None] * stride_qh + offs_h[None, :],
                        mask=mask_k[:, None] & mask_h[None, :], other=0)
            q = q | (((_spread(h, 32) >> shift_h) & 1) << 2)

        if GROUP_SIZE == 0:
            b = (q - z_row[None, :]).to(tl.float32).to(dot_t)
            acc = tl.dot(x, b, acc, input_precision="ieee")
        elif GROUP_SIZE % BLOCK_K == 0 and not HAS_GIDX:
            # The whole K tile lies in one group: one scale/zero row per tile.
            g = k0 // GROUP_SIZE
            s_row = tl.load(s_ptr + g * N_PAD + offs_n, mask=mask_np, other=0.0).to(tl.float32)
            z_row = _zero_row(z_ptr, g * N_PAD, offs_n, mask_np, HAS_ZEROS, BITS)
            if BLOCK_M <= BLOCK_K:
                # Skinny tiles: exact integer (q - z) operand, scale the [BLOCK_M, BLOCK_N] partial.
                b = (q - z_row[None, :]).to(tl.float32).to(dot_t)
                acc += tl.dot(x, b, input_precision="ieee") * s_row[None, :]
            else:
                # Tall tiles: scaling the [BLOCK_K, BLOCK_N] operand is the cheaper side.
                b = ((q - z_row[None, :]).to(tl.float32) * s_row[None, :]).to(dot_t)
                acc = tl.dot(x, b, acc, input_precision="ieee")
        else:
            # Groups change inside the tile (group < BLOCK_K, or act-order groups of uneven size).
            if HAS_GIDX:
                g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
            else:
                g = offs_k // GROUP_SIZE
            # Rows past K (last, partial tile) must not read past the group tables: mask them too.
            mask_g = mask_k[:, None] & mask_np[None, :]
            s = tl.load(s_ptr + g[:, None] * N_PAD + offs_n[None, :], mask=mask_g, other=0.0)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g[:, None] * N_PAD + offs_n[None, :], mask=mask_g, other=0).to(tl.int32)
            else:
                z = 1 << (BITS - 1)
            b = ((q - z).to(tl.float32) * s.to(tl.float32)).to(dot_t)
            acc = tl.dot(x, b, acc, input_precision="ieee")

    if GROUP_SIZE == 0:
        acc = acc * s_row[None, :]
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = bias * (pid_k == 0).to(tl.float32)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_out)


# --------------------------------------------------------------------------------------------
# Autotuning.  Key: M bucket (power of two), N, K, and the quantization constexprs (a config tuned
# for 4 bits is not reused for 3 bits); Triton adds the tensor dtypes to the key itself.
# --------------------------------------------------------------------------------------------
TUNE_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZEROS", "HAS_GIDX"]


def _cfg(bm, bn, bk, sk, warps, stages, gm=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": gm},
                         num_warps=warps, num_stages=stages)


# Skinny path (M <= 16): one 16-row tile, weights streamed once; split-K fills the SMs when N/BLOCK_N
# alone gives too few programs (4096 / 128 = 32 programs for 132 SMs).
SKINNY_CONFIGS = [
    _cfg(16, bn, bk, sk, warps, stages, gm=1)
    for (bn, bk, warps, stages) in [(64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 5),
                                    (256, 64, 8, 4), (64, 256, 4, 3), (32, 256, 4, 4)]
    for sk in (1, 2, 4, 8, 16)
]

# Tiled path (M > 16).
TILED_CONFIGS = [
    _cfg(bm, bn, bk, 1, warps, stages)
    for (bm, bn, bk, warps, stages) in [
        (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 128, 128, 4, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 32, 4, 4),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
]


def _prune_skinny(configs, named_args, **kwargs):
    k = named_args["K"]
    n = named_args["N"]
    kept = []
    for c in configs:
        bn, bk, sk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if sk > 1 and bk * sk > k:          # splits that would get no K tile
            continue
        if bn > 2 * max(n, 32):             # tile mostly masked
            continue
        kept.append(c)
    return kept or configs[:1]


def _prune_tiled(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, 2 * mb)]
    return kept or configs[:1]


def _autotune(configs, prune, reset_out):
    # reset_out: the split-K configs accumulate atomically into ``out``, which must be zero before
    # every benchmarked launch and before the real one.
    kwargs = dict(configs=configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune},
                  reset_to_zero=["out_ptr"] if reset_out else None)
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True      # persist the choice in Triton's cache dir across processes
    return triton.autotune(**kwargs)(wna16_gemm_kernel)


wna16_gemm_skinny_tuned = _autotune(SKINNY_CONFIGS, _prune_skinny, reset_out=True)
wna16_gemm_tiled_tuned = _autotune(TILED_CONFIGS, _prune_tiled, reset_out=False)
