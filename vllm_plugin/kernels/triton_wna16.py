"""Triton W{2,3,4,8}A16 GEMM for rcsr checkpoints: load-time repacking and ``y = x @ W^T (+ b)``.

Public API (importable without CUDA, vLLM or Triton; Triton is imported on first use):

* :func:`is_available` -- Triton importable and CUDA present (or ``TRITON_INTERPRET=1``).
* :func:`prepare` -- canonical checkpoint tensors -> :class:`PreparedWeight` (kernel layout).
* :func:`matmul` -- ``[..., in] @ W^T -> [..., out]`` in the activation dtype, fp32 accumulation.
* :func:`warmup` -- run the autotuner for the usual M buckets before CUDA-graph capture.

Kernel layout (docs/KERNELS.md has the bit diagrams):

* codes are stored K-major and packed along the *output* dimension: ``qweight[k, j]`` (int32) holds
  the codes of output channels ``j*P .. j*P+P-1`` at input ``k``, slot ``t`` in bits
  ``[t*b, (t+1)*b)`` with ``b`` the plane width and ``P = 32 // b``.  Unpacking a
  ``[BLOCK_K, BLOCK_N]`` tile is one load of ``[BLOCK_K, BLOCK_N / P]`` words, ``log2 P``
  ``tl.interleave`` steps, one shift and one mask.
* 3-bit codes are split into two planes with no wasted bit: the low 2 bits in a 2-bit plane
  (``qweight``, 16 per word) and bit 2 in a 1-bit plane (``qweight_hi``, 32 per word): 3 words per
  32 codes, the same 3 bits per weight as the canonical bitstream, and no code straddles words.
* out-features are padded to a multiple of 128 (zero codes, zero scales) so every row of every
  plane is 16-byte aligned; the kernels mask the padding.
* scales fp16 ``[n_groups, out_pad]`` and zeros uint8 ``[n_groups, out_pad]`` (asymmetric only;
  symmetric uses the constant ``2**(bits-1)`` in the kernel).
* act order: the input columns are sorted by ``g_idx`` once here (stable), so groups become
  contiguous; ``perm`` is stored and :func:`matmul` gathers ``x[:, perm]`` once per call.  When the
  sorted groups are exactly ``group_size`` long (GPTQ-style act order) the kernel then runs the plain
  static-group code; otherwise ``group_ids`` (sorted ``g_idx``) is kept and read per K row.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, fields, replace

import torch

from rcsr_deploy.errors import RcsrError
from rcsr_deploy.format import supported_group_size
from rcsr_deploy.packing import SUPPORTED_BITS, pack_lsb_words, unpack_codes

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
N_ALIGN = 128          # out-features padding of the repacked planes (the kernel's N masks assume 128)
SKINNY_MAX_M = 16      # M <= this: split-K GEMV-style path; above: tiled GEMM
_MAX_M_BUCKET = 4096   # autotune buckets: powers of two, everything above shares the last
_INT32_LIMIT = 2 ** 31 - 1
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M", "num_warps", "num_stages")


class KernelInputError(RcsrError, ValueError):
    """A weight/activation the Triton kernels cannot take (one clear line)."""


# ----------------------------------------------------------------------------------------------
# Availability and lazy Triton import
# ----------------------------------------------------------------------------------------------
def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def is_available() -> bool:
    """True when Triton imports and either CUDA is present or ``TRITON_INTERPRET=1`` is set."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any broken install means "not available"
        return False
    return _interpret_env() or torch.cuda.is_available()


_JIT = None


def _jit():
    """The JIT module, (re)imported so that its kernels match the current TRITON_INTERPRET."""
    global _JIT
    if _JIT is None:
        try:
            _JIT = importlib.import_module(".triton_wna16_jit", __package__)
        except ImportError as exc:
            raise RcsrError(f"the Triton kernels need the 'triton' package ({exc})") from exc
    if _JIT.INTERPRET != _JIT.interpret_requested():
        _JIT = importlib.reload(_JIT)
    return _JIT


# ----------------------------------------------------------------------------------------------
# Prepared (repacked) weight
# ----------------------------------------------------------------------------------------------
@dataclass
class PreparedWeight:
    """One quantized linear in the kernel layout (see the module docstring)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int                      # -1 = one group per output channel
    sym: bool
    out_pad: int                         # out_features rounded up to N_ALIGN
    qweight: torch.Tensor                # int32 [in, out_pad * plane_bits / 32]
    scales: torch.Tensor                 # float16 [n_groups, out_pad]
    qweight_hi: torch.Tensor | None = None   # int32 [in, out_pad / 32], 3-bit only (bit 2 of each code)
    zeros: torch.Tensor | None = None        # uint8 [n_groups, out_pad], asymmetric only
    perm: torch.Tensor | None = None         # int64 [in]: kernel column j reads input column perm[j]
    group_ids: torch.Tensor | None = None    # int32 [in]: group of kernel column j (uneven act-order groups)

    def __post_init__(self):
        # The kernel restates the plane row strides as multiples of 4 * plane_bits (main plane) and
        # 4 (high plane) words -- its 16-byte alignment hint -- which holds for contiguous rows of
        # out_pad codes with out_pad % N_ALIGN == 0, the layout prepare() produces.
        if self.out_pad % N_ALIGN or self.qweight.stride() != (self.out_pad * self.plane_bits // 32, 1) or (
                self.qweight_hi is not None and self.qweight_hi.stride() != (self.out_pad // 32, 1)):
            _fail("the packed planes are not in prepare()'s layout (contiguous rows of out_pad codes)")

    @property
    def plane_bits(self) -> int:
        return 2 if self.bits == 3 else self.bits

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors (non-None) by field name, e.g. to register them as buffers."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (codes, scales, zeros, group ids)."""
        return sum(t.numel() * t.element_size() for n, t in self.tensors().items() if n != "perm")

    def to(self, device) -> "PreparedWeight":
        return replace(self, **{n: t.to(device) for n, t in self.tensors().items()})


def _fail(msg: str):
    raise KernelInputError(msg)


def prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            g_idx: torch.Tensor | None, bits: int, group_size: int, sym: bool) -> PreparedWeight:
    """Repack one linear from the canonical checkpoint layout (docs/FORMAT.md) to the kernel layout.

    ``qweight`` int32 ``[out, in*bits/32]``, ``scales`` float16 ``[out, n_groups]``, ``zeros``
    integer ``[out, n_groups]`` (asymmetric only, else None), ``g_idx`` int ``[in]`` (dynamic act
    order only, else None).  Runs on the tensors' device; the result lives there too.
    """
    if bits not in SUPPORTED_BITS:
        _fail(f"bits={bits} is not supported by the Triton kernels (choose 2, 3, 4 or 8)")
    if not supported_group_size(group_size):
        _fail(f"group size {group_size} is not supported by the Triton kernels (-1 or a multiple of 32)")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        _fail(f"qweight must be a 2-D int32 tensor, got {getattr(qweight, 'dtype', type(qweight))} "
              f"{tuple(getattr(qweight, 'shape', ()))}")
    out_f, width = qweight.shape
    if width == 0 or out_f == 0 or (width * 32) % bits or ((width * 32) // bits) % 32:
        _fail(f"qweight width {width} is not a whole number of 32-code runs at {bits} bits "
              f"(in-features must be a positive multiple of 32)")
    in_f = width * 32 // bits
    if group_size != -1 and in_f % group_size:
        _fail(f"group size {group_size} does not divide in-features {in_f}")
    n_groups = 1 if group_size == -1 else in_f // group_size
    dev = qweight.device
    if scales.dtype != torch.float16 or tuple(scales.shape) != (out_f, n_groups):
        _fail(f"scales must be float16 [{out_f}, {n_groups}], got {scales.dtype} {tuple(scales.shape)}")
    if sym and zeros is not None:
        _fail("zeros were given for a symmetric weight (symmetric uses the constant 2**(bits-1))")
    if not sym:
        if zeros is None:
            _fail("an asymmetric weight needs zeros [out, n_groups]")
        if zeros.dtype.is_floating_point or tuple(zeros.shape) != (out_f, n_groups):
            _fail(f"zeros must be integer [{out_f}, {n_groups}], got {zeros.dtype} {tuple(zeros.shape)}")
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= (1 << bits)):
            _fail(f"zero points out of range for {bits} bits")

    perm = group_ids = None
    if g_idx is not None:
        if g_idx.dtype.is_floating_point or tuple(g_idx.shape) != (in_f,):
            _fail(f"g_idx must be integer [{in_f}], got {g_idx.dtype} {tuple(g_idx.shape)}")
        g = g_idx.to(device=dev, dtype=torch.int64)
        if int(g.min()) < 0 or int(g.max()) >= n_groups:
            _fail(f"g_idx values must lie in [0, {n_groups})")
        if group_size != -1:
            perm = torch.argsort(g, stable=True)
            g_sorted = g[perm]
            if not torch.equal(g_sorted, torch.arange(in_f, device=dev) // group_size):
                group_ids = g_sorted.to(torch.int32)
            if torch.equal(perm, torch.arange(in_f, device=dev)):
                perm = None

    plane = 2 if bits == 3 else bits
    out_pad = -(-out_f // N_ALIGN) * N_ALIGN
    qw_new = torch.empty(in_f, out_pad * plane // 32, dtype=torch.int32, device=dev)
    qh_new = torch.empty(in_f, out_pad // 32, dtype=torch.int32, device=dev) if bits == 3 else None
    # Row chunks (a multiple of N_ALIGN) bound the int64 temporaries to ~2**24 elements.
    chunk = max(N_ALIGN, (2 ** 24 // in_f) // N_ALIGN * N_ALIGN)
    for n0 in range(0, out_pad, chunk):
        n1 = min(n0 + chunk, out_pad)
        codes = unpack_codes(qweight[n0:min(n1, out_f)], bits, in_f).long()        # [c, in]
        if perm is not None:
            codes = codes[:, perm]
        codes_t = torch.zeros(in_f, n1 - n0, dtype=torch.int64, device=dev)
        codes_t[:, :codes.shape[0]] = codes.t()
        if bits == 3:
            qw_new[:, n0 // 16:n1 // 16] = pack_lsb_words(codes_t & 3, 2, dim=1)
            qh_new[:, n0 // 32:n1 // 32] = pack_lsb_words(codes_t >> 2, 1, dim=1)
        else:
            qw_new[:, n0 * bits // 32:n1 * bits // 32] = pack_lsb_words(codes_t, bits, dim=1)

    def _kmajor(t, dtype):
        out = torch.zeros(n_groups, out_pad, dtype=dtype, device=dev)
        out[:, :out_f] = t.to(device=dev, dtype=dtype).t()
        return out

    return PreparedWeight(
        in_features=in_f, out_features=out_f, bits=bits, group_size=group_size, sym=sym,
        out_pad=out_pad, qweight=qw_new, qweight_hi=qh_new, scales=_kmajor(scales, torch.float16),
        zeros=None if sym else _kmajor(zeros, torch.uint8), perm=perm, group_ids=group_ids)


# ----------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------
def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def m_bucket(m: int) -> int:
    """Autotune bucket of M: the next power of two, capped at 4096."""
    return min(_pow2_at_least(m), _MAX_M_BUCKET)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used for the interpreter's heuristic config


def default_config(m: int, n: int, k: int, device: torch.device | str = "cuda", *, group_size: int = -1,
                   uneven_groups: bool = False) -> dict:
    """Heuristic launch config (used under the interpreter and for untuned keys during graph capture).

    ``group_size`` / ``uneven_groups`` (act-order groups read per K row) pick the dequantization
    branch: with static groups smaller than the K tile, ``BLOCK_K`` is cut to the group size so a
    K tile holds one group (one scale row per tile instead of a ``[BLOCK_K, BLOCK_N]`` gather).
    Compiled for sm_90 on CPU (tools/compile_kernels.py, docs/KERNELS.md), the gather variant of the
    skinny 16x128x128 4-stage config needs 232-244 KB of shared memory with zero points -- over the
    227 KB an H100 block may use -- and the uneven-group variant spills registers; both are avoided here.
    """
    device = torch.device(device)
    static_groups = group_size > 0 and not uneven_groups
    if m <= SKINNY_MAX_M:
        bn = 128 if n >= 2048 else 64 if n > 32 else 32
        bk = 128 if k >= 128 else 64 if k >= 64 else 32
        stages = 4
        if static_groups and group_size < bk:
            bk = max(32, group_size)
        elif uneven_groups:
            bk, stages = min(bk, 64), 3
        n_tiles, k_tiles = -(-n // bn), -(-k // bk)
        split = 1
        while split < 16 and 2 * split <= k_tiles and n_tiles * split < 2 * _sm_count(device):
            split *= 2
        return {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 1,
                "num_warps": 4, "num_stages": stages}
    bm = 32 if m <= 32 else 64 if m <= 64 else 128
    bk = 32 if static_groups and group_size < 64 else 64
    return {"BLOCK_M": bm, "BLOCK_N": 128 if n >= 128 else 64, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8,
            "num_warps": 8 if bm == 128 else 4, "num_stages": 3}


def _check_config(cfg: dict) -> dict:
    unknown = set(cfg) - set(_CONFIG_KEYS)
    if unknown:
        _fail(f"unknown config keys {sorted(unknown)} (known: {', '.join(_CONFIG_KEYS)})")
    full = {"SPLIT_K": 1, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, **cfg}
    for key, low in (("BLOCK_M", 16), ("BLOCK_N", 32), ("BLOCK_K", 32)):
        v = full.get(key)
        if not isinstance(v, int) or v < low or v & (v - 1):
            _fail(f"config {key} must be a power of two >= {low}, got {v!r}")
    if not isinstance(full["SPLIT_K"], int) or full["SPLIT_K"] < 1:
        _fail(f"config SPLIT_K must be a positive integer, got {full['SPLIT_K']!r}")
    return full


_TUNED_KEYS: set = set()


def _launch_meta(pw: PreparedWeight, has_bias: bool, grouped: bool = False, has_perm: bool = False) -> dict:
    return dict(BITS=pw.bits, PLANE_BITS=pw.plane_bits, GROUP_SIZE=0 if pw.group_size == -1 else pw.group_size,
                HAS_ZEROS=pw.zeros is not None, HAS_GIDX=pw.group_ids is not None, HAS_BIAS=has_bias,
                GROUPED=grouped, HAS_PERM=has_perm)


#: the grouped launch's arguments in a dense launch: tile map, ends, perm, NUM_TILES, expert strides
_DENSE_ONLY = (None, None, None, None, 0, 0, 0, 0)


def matmul(x: torch.Tensor, pw: PreparedWeight, bias: torch.Tensor | None = None, *,
           config: dict | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for ``x`` ``[..., in]`` fp16/bf16/fp32 -> ``[..., out]`` in ``x.dtype``.

    M (the product of the leading dims) <= 16 takes the skinny split-K path, larger M the tiled
    path; both are autotuned on CUDA (key: M bucket, N, K, quantization constexprs, dtypes).
    ``config`` (keys ``BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, GROUP_M, num_warps, num_stages``) forces a
    launch config instead (tests, benchmarks).
    """
    if not isinstance(pw, PreparedWeight):
        raise TypeError(f"pw must be a PreparedWeight (from prepare()), got {type(pw).__name__}")
    k, n = pw.in_features, pw.out_features
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != k:
        _fail(f"activation must have {k} features in its last dim, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(f"activation dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
    if x.device != pw.device:
        _fail(f"activation is on {x.device} but the weight is on {pw.device}")
    if bias is not None:
        if tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point:
            _fail(f"bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
        bias = bias.to(pw.device).contiguous()
    jit = _jit()
    if x.device.type != "cuda" and not jit.INTERPRET:
        _fail("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if pw.perm is not None:
        x2 = x2.index_select(1, pw.perm)           # act order: one gather per call, not per tile
    elif x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)

    # The kernel indexes activations/outputs with int32 offsets: split absurdly tall inputs.
    rows = max(1, (_INT32_LIMIT // max(x2.stride(0), n, 1)) // 256 * 256)
    if m > rows:
        out = torch.cat([_matmul_2d(jit, x2[r:r + rows], pw, bias, config) for r in range(0, m, rows)])
    else:
        out = _matmul_2d(jit, x2, pw, bias, config)
    return out.reshape(*lead, n)


def _matmul_2d(jit, x2: torch.Tensor, pw: PreparedWeight, bias: torch.Tensor | None,
               config: dict | None) -> torch.Tensor:
    m, k = x2.shape
    n = pw.out_features
    skinny = m <= SKINNY_MAX_M
    bucket = m_bucket(m)
    meta = _launch_meta(pw, bias is not None)
    tune_key = (skinny, bucket, n, k, tuple(meta.values()), x2.dtype, None if bias is None else bias.dtype)
    if config is None and (jit.INTERPRET or (torch.cuda.is_current_stream_capturing()
                                             and tune_key not in _TUNED_KEYS)):
        # No autotuning under the interpreter, nor inside CUDA-graph capture (benchmarking there
        # would break the capture): use the heuristic config.
        config = default_config(m, n, k, x2.device, group_size=pw.group_size, uneven_groups=pw.group_ids is not None)
    cfg = None if config is None else _check_config(config)

    atomic = (cfg["SPLIT_K"] > 1) if cfg is not None else skinny
    out = (torch.zeros(m, n, dtype=torch.float32, device=x2.device) if atomic
           else torch.empty(m, n, dtype=x2.dtype, device=x2.device))
    args = (x2, pw.qweight, pw.qweight_hi, pw.scales, pw.zeros, pw.group_ids, bias, out,
            m, n, k, pw.out_pad, x2.stride(0), out.stride(0), pw.qweight.stride(0),
            0 if pw.qweight_hi is None else pw.qweight_hi.stride(0), bucket,
            *_DENSE_ONLY)

    def grid(meta_):
        return (-(-m // meta_["BLOCK_M"]) * -(-n // meta_["BLOCK_N"]), meta_["SPLIT_K"])

    if cfg is None:
        kernel = jit.wna16_gemm_skinny_tuned if skinny else jit.wna16_gemm_tiled_tuned
        kernel[grid](*args, **meta)
        _TUNED_KEYS.add(tune_key)
    else:
        launch = {kk: cfg[kk] for kk in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M")}
        jit.wna16_gemm_kernel[grid](*args, **meta, **launch,
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if out.dtype != x2.dtype:
        out = out.to(x2.dtype)
    return out


def warmup(pw: PreparedWeight, dtype: torch.dtype = torch.float16, *, bias: bool = False,
           m_values=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)) -> None:
    """Autotune every M bucket of ``m_values`` for this weight now (call before CUDA-graph capture).

    Nothing to do (returns at once) off CUDA or under the interpreter, where no autotuning runs.
    """
    if pw.device.type != "cuda" or _jit().INTERPRET:
        return
    b = torch.zeros(pw.out_features, dtype=dtype, device=pw.device) if bias else None
    for m in m_values:
        matmul(torch.zeros(m, pw.in_features, dtype=dtype, device=pw.device), pw, b)


# ----------------------------------------------------------------------------------------------
# Grouped (MoE): every expert of a layer in one launch
# ----------------------------------------------------------------------------------------------
@dataclass
class GroupedWeight:
    """The experts of one MoE layer, each prepared by :func:`prepare` and stacked along a leading expert
    dimension (same shape and grid for all): ``qweight [E, in, words]``, ``qweight_hi [E, in, out_pad/32]``
    (3-bit), ``scales``/``zeros [E, n_groups, out_pad]``; ``perm [E, in]`` int32 (an expert without an act
    order gets the identity) and ``group_ids [E, in]`` int32 (uneven act-order groups; the others get
    ``k // group_size``) when any expert needs them."""

    num_experts: int
    in_features: int
    out_features: int
    bits: int
    group_size: int
    sym: bool
    out_pad: int
    qweight: torch.Tensor
    scales: torch.Tensor
    qweight_hi: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None

    plane_bits = PreparedWeight.plane_bits
    tensors = PreparedWeight.tensors
    device = PreparedWeight.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "GroupedWeight":
        return replace(self, **{n: t.to(device) for n, t in self.tensors().items()})


def stack(pws: list[PreparedWeight]) -> GroupedWeight:
    """One :class:`GroupedWeight` from the per-expert prepared weights of a layer."""
    if not pws:
        _fail("stack() needs at least one expert")
    p0 = pws[0]
    key = lambda p: (p.in_features, p.out_features, p.bits, p.group_size, p.sym, p.out_pad)  # noqa: E731
    if any(key(p) != key(p0) for p in pws):
        _fail("the experts of one layer must share shape, bits, group size and symmetry")
    k, dev = p0.in_features, p0.device
    ident = torch.arange(k, device=dev)
    perm = group_ids = None
    if any(p.perm is not None for p in pws):
        perm = torch.stack([ident if p.perm is None else p.perm for p in pws]).to(torch.int32)
    if any(p.group_ids is not None for p in pws):
        even = (ident // (k if p0.group_size == -1 else p0.group_size)).to(torch.int32)
        group_ids = torch.stack([even if p.group_ids is None else p.group_ids for p in pws])

    def cat(name):
        ts = [getattr(p, name) for p in pws]
        return None if ts[0] is None else torch.stack(ts).contiguous()

    return GroupedWeight(len(pws), k, p0.out_features, p0.bits, p0.group_size, p0.sym, p0.out_pad,
                         cat("qweight"), cat("scales"), cat("qweight_hi"), cat("zeros"), perm, group_ids)


def tile_map(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row tiles of a grouped launch, computed on the device without a host sync (so the launch can be
    captured in a CUDA graph): expert ``e``'s rows ``offsets[e]:offsets[e+1]`` are cut into
    ``ceil(n_e / block_m)`` tiles; the grid has the fixed upper bound ``ceil(num_rows / block_m) +
    min(E, num_rows)`` tiles and the unused ones get expert ``-1``.  Returns ``(tile_expert, tile_row0,
    n_tiles)`` (int32)."""
    e = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    tiles = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    n_tiles = -(-num_rows // block_m) + min(e, num_rows)
    t = torch.arange(n_tiles, device=offsets.device)
    ex = torch.searchsorted(cum, t, right=True)
    valid = ex < e
    ec = ex.clamp(max=e - 1)
    row0 = offsets[ec].to(torch.int64) + (t - (cum[ec] - tiles[ec])) * block_m
    return (torch.where(valid, ec, -1).to(torch.int32), torch.where(valid, row0, 0).to(torch.int32), n_tiles)


def grouped_matmul(x: torch.Tensor, gw: GroupedWeight, offsets: torch.Tensor, *,
                   config: dict | None = None) -> torch.Tensor:
    """``out[r] = x[r] @ W_e^T`` for the rows ``offsets[e]:offsets[e+1]`` of ``x [M, in]`` (sorted by expert),
    every expert in ONE launch; rows past ``offsets[E]`` (e.g. another rank's experts) are zero.  Returns
    ``[M, out]`` in ``x.dtype``, fp32 accumulation.  ``config`` as in :func:`matmul`; by default the heuristic
    for the mean rows per expert that can have tokens, ``ceil(M / min(E, M))``."""
    if not isinstance(gw, GroupedWeight):
        raise TypeError(f"gw must be a GroupedWeight (from stack()), got {type(gw).__name__}")
    k, n = gw.in_features, gw.out_features
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k:
        _fail(f"activation must be [rows, {k}], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(f"activation dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
    if x.device != gw.device or offsets.device != gw.device:
        _fail(f"activation ({x.device}) and offsets ({offsets.device}) must be on the weight's device ({gw.device})")
    if offsets.dim() != 1 or offsets.numel() != gw.num_experts + 1 or offsets.dtype.is_floating_point:
        _fail(f"offsets must be integer [{gw.num_experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    jit = _jit()
    if x.device.type != "cuda" and not jit.INTERPRET:
        _fail("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)")
    m = x.shape[0]
    if m == 0:
        return x.new_zeros(0, n)
    if m * max(x.stride(0), n) > _INT32_LIMIT:
        _fail(f"{m} rows exceed the kernel's int32 offsets; split the call")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if config is None:
        per = -(-m // min(gw.num_experts, m))
        config = default_config(per, n, k, x.device, group_size=gw.group_size,
                                uneven_groups=gw.group_ids is not None)
    cfg = _check_config(config)
    tile_e, tile_r, n_tiles = tile_map(offsets, m, cfg["BLOCK_M"])
    ends = offsets[1:].to(torch.int32)
    atomic = cfg["SPLIT_K"] > 1
    out = torch.zeros(m, n, dtype=torch.float32 if atomic else x.dtype, device=x.device)
    meta = _launch_meta(gw, False, grouped=True, has_perm=gw.perm is not None)
    args = (x, gw.qweight, gw.qweight_hi, gw.scales, gw.zeros, gw.group_ids, None, out,
            m, n, k, gw.out_pad, x.stride(0), out.stride(0), gw.qweight.stride(1),
            0 if gw.qweight_hi is None else gw.qweight_hi.stride(1), m_bucket(m),
            tile_e, tile_r, ends, gw.perm, n_tiles,
            gw.qweight.stride(0), 0 if gw.qweight_hi is None else gw.qweight_hi.stride(0), gw.scales.stride(0))

    def grid(meta_):
        return (n_tiles * -(-n // meta_["BLOCK_N"]), meta_["SPLIT_K"])

    launch = {kk: cfg[kk] for kk in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M")}
    jit.wna16_gemm_kernel[grid](*args, **meta, **launch, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out if out.dtype == x.dtype else out.to(x.dtype)
