"""``native_cpu``: this project's own C++ CPU kernels (``csrc/cpu``, built at install into
``vllm_plugin._rcsr_cpu``) -- 2/3/4/8-bit weights stay packed at their own bit width.

Ops (``torch.ops.rcsr_cpu``, C++ schemas in ``csrc/cpu/ops.cpp``, fake implementations here so that
``torch.compile`` keeps them opaque):

* ``repack(codes, bits)``: uint8 codes ``[N, K]`` -> the tile-16 layout (``csrc/cpu/kernel.h``)
* ``gemm(x, packed, scales, zeros, perm, bits, group_size, n, isa, large_m)``: ``x[:, perm] @ W^T``
* ``grouped_gemm(..., offsets, ...)``: the same for rows sorted by expert, one call per MoE layer

ISA (``RCSR_CPU_ISA`` forces one: ``avx512_bf16``, ``avx512``, ``avx2``, ``scalar``; default: the best
the CPU runs).  ``avx512_bf16`` multiplies bf16 activations with the exact bf16 numbers ``128 + q``
(``vdpbf16ps``) for codes of up to 4 bits; other layers of that model run the AVX-512 fp32 kernel.

``RCSR_CPU_ISA=avx512_vnni_a8`` is an **opt-in** that changes numerics (never chosen by default): each
row's activations are quantized to int8 per weight group (symmetric, scale ``max|x| / 127``) and
``vpdpbusd`` multiplies them with the codes, 64 MACs per instruction instead of ``vdpbf16ps``' 32 --
the lever for compute-bound batches (decode at batch 16, prefill).  Every width (2/3/4/8 bits); no large-M
path, so a row's result does not depend on the batch it is in.

Two code paths per call, switched at ``large_m`` rows: below it the kernel reads the packed codes once
per 8 (AVX2: 3) rows; from it on, column chunks of ``W^T`` are dequantized into cache and multiplied by
ATen's GEMM (oneDNN for bf16, MKL for fp32; fp16 activations are multiplied in fp32).  The switch comes
from a table (:data:`LARGE_M`) on the kind of CPU it was measured on (AVX-512 BF16 without AMX) and is
measured when a layer is loaded everywhere else (:func:`switch_for`: AMX makes oneDNN's bf16 GEMM several
times faster, so the table would keep batches on the slower path there); ``RCSR_CPU_LARGE_M`` forces a row
count, ``table`` or ``measure``.

Numerics: fp32 accumulation of ``x * (q - z)``, one multiply by the fp32 scale per group; the result
matches the fp32 dequantized reference to the activation dtype's rounding.  The large-M path rounds
the dequantized weight to bf16 for bf16 activations (like ``dequant``) and keeps it in fp32 otherwise.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from ..errors import RcsrPluginError
from .base import Kernel, LayerSpec, QuantWeights, flatten_x, group_permutation, unpack

ENV_ISA = "RCSR_CPU_ISA"
ENV_LARGE_M = "RCSR_CPU_LARGE_M"
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512_bf16", "avx512_vnni_a8")
EXACT_ISAS = 4  #: ISA levels below this keep the activations in their dtype (A16); level 4 quantizes them
INT8_ACT = 4    #: ``avx512_vnni_a8``: int8 activations, opt-in only
NT, KB = 16, 32  # output channels per tile, input columns per block (csrc/cpu/kernel.h)

_EXT = None
_EXT_ERROR: str | None = None


def extension():
    """The compiled module (``None`` if it was not built; :func:`unavailable_reason` says why)."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            from .. import _rcsr_cpu  # type: ignore[attr-defined]
        except ImportError as e:
            _EXT_ERROR = (f"the native CPU kernels were not built ({e}); reinstall with "
                          "`pip install --no-build-isolation -e .` and a C++ compiler")
        else:
            _EXT = _rcsr_cpu
            _register_fakes()
    return _EXT


def unavailable_reason() -> str | None:
    return None if extension() is not None else _EXT_ERROR


def _register_fakes() -> None:
    @torch.library.register_fake("rcsr_cpu::repack")
    def _repack_fake(codes, bits):
        n, k = codes.shape
        return codes.new_empty(((n + NT - 1) // NT, (k + KB - 1) // KB, bits, NT), dtype=torch.int32)

    @torch.library.register_fake("rcsr_cpu::unpack")
    def _unpack_fake(packed, bits, n, k):
        return packed.new_empty((n, k), dtype=torch.uint8)

    @torch.library.register_fake("rcsr_cpu::gemm")
    def _gemm_fake(x, packed, scales, zeros, perm, bits, group_size, n, isa, large_m):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("rcsr_cpu::grouped_gemm")
    def _grouped_fake(x, packed, scales, zeros, perm, offsets, bits, group_size, n, isa, large_m):
        return x.new_empty((x.shape[0], n))


def best_isa() -> int:
    ext = extension()
    return int(ext.best_isa()) if ext is not None else 0


def resolve_isa(name: str | None = None) -> int:
    """ISA level from ``name`` or ``RCSR_CPU_ISA`` (``auto``/unset: the best this CPU runs)."""
    ext = extension()
    if ext is None:
        raise RcsrPluginError(_EXT_ERROR or "native CPU kernels unavailable")
    name = (name if name is not None else os.environ.get(ENV_ISA, "")).strip().lower()
    if name in ("", "auto"):
        return int(ext.best_isa())
    if name not in ISA_NAMES:
        raise RcsrPluginError(f"{ENV_ISA}={name!r} is not an ISA (choose auto or one of {', '.join(ISA_NAMES)})")
    isa = ISA_NAMES.index(name)
    if not ext.isa_supported(isa):
        raise RcsrPluginError(f"{ENV_ISA}={name}: this CPU cannot run it (best here: {ISA_NAMES[ext.best_isa()]})")
    return isa


def supported_isas() -> list[str]:
    """The exact (A16) ISA paths this CPU runs, slowest first (the int8-activation opt-in is not one)."""
    ext = extension()
    return [] if ext is None else [n for i, n in enumerate(ISA_NAMES[:EXACT_ISAS]) if ext.isa_supported(i)]


def int8_supported() -> bool:
    ext = extension()
    return ext is not None and bool(ext.isa_supported(INT8_ACT))


def effective_isa(isa: int, dtype: torch.dtype, bits: int) -> int:
    """The kernel a call really runs (as ``csrc/cpu/ops.cpp`` decides): the int8 kernel takes every width; the
    bf16 kernel takes bf16 activations and <= 4 bits (other layers run AVX-512)."""
    if isa == 3 and (dtype != torch.bfloat16 or bits > 4):
        return 2
    return isa


#: rows from which dequantize + ATen GEMM beats the packed-code kernel, by kernel level (as
#: :func:`effective_isa` gives it) and activation dtype; 0 = never.  Measured on Zen 5 (AVX-512 + BF16, no AMX)
#: with ``python -m vllm_plugin.kernels.bench --split-native`` (docs/CPU_KERNELS.md, "Two code paths"); the
#: AVX2 row with that level forced on the same machine.  ``RCSR_CPU_LARGE_M`` overrides it on others.
LARGE_M = {
    0: {torch.bfloat16: 2, torch.float16: 2, torch.float32: 2},  # scalar: its M = 1 costs one dequantization
    1: {torch.bfloat16: 32, torch.float16: 64, torch.float32: 64},  # AVX2 fp32 FMA
    2: {torch.bfloat16: 64, torch.float16: 0, torch.float32: 0},  # AVX-512 fp32 FMA: faster than MKL's sgemm
    3: {torch.bfloat16: 512},  # AVX-512 BF16 vdpbf16ps: beats oneDNN up to ~384 rows
}


def amx_tiles() -> bool:
    """Whether torch (and so oneDNN's bf16 GEMM, the other side of every switch) uses AMX tiles here."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # older torch: no such query
        return False


def table_applies() -> bool:
    """Whether :data:`LARGE_M` was measured on this kind of CPU: AVX-512 with BF16 and without AMX, where
    oneDNN's bf16 GEMM runs on ``vdpbf16ps`` like the bf16 kernel.  With AMX tiles oneDNN is several times
    faster at large M, on CPUs without AVX-512 BF16 it is slower, so the table's rows would be wrong there."""
    ext = extension()
    return ext is not None and bool(ext.isa_supported(3)) and not amx_tiles()


def switch_mode() -> int | str:
    """``RCSR_CPU_LARGE_M``: a row count (0 = never), ``table`` (:data:`LARGE_M`) or ``measure`` (time both
    paths when a layer is loaded, :func:`measured_switch`).  Unset: ``table`` where :func:`table_applies`,
    ``measure`` elsewhere."""
    env = os.environ.get(ENV_LARGE_M, "").strip().lower()
    if env in ("", "auto"):
        return "table" if table_applies() else "measure"
    if env in ("table", "measure"):
        return env
    try:
        return max(0, int(env))
    except ValueError:
        raise RcsrPluginError(f"{ENV_LARGE_M}={env!r} is not a row count, 'table' or 'measure'") from None


def large_m_for(isa: int, dtype: torch.dtype, bits: int) -> int:
    """Rows from which the dequantize + ATen GEMM path runs (0: never), without timing anything: an
    integer ``RCSR_CPU_LARGE_M``, else :data:`LARGE_M`.  The int8-activation kernel never switches (its
    numerics stay independent of the batch).  :func:`switch_for` is what a loaded layer uses."""
    mode = switch_mode()
    if isinstance(mode, int):
        return mode
    eff = effective_isa(isa, dtype, bits)
    if eff == INT8_ACT:
        return 0
    return LARGE_M[eff].get(dtype, 0)


#: row counts at which :func:`measured_switch` times both paths (ascending), and its time budget per layer shape
SWITCH_ROWS = (8, 16, 32, 64, 128, 256, 512, 1024)
SWITCH_BUDGET_S = 2.0
SWITCH_MARGIN = 0.97  #: the dequantize path must be this much faster (it rounds the weight to bf16)
_SWITCH_CACHE: dict[tuple, int] = {}
logger = logging.getLogger("vllm.rcsr_plugin.native_cpu")


def switch_for(weight: "PackedWeight", isa: int, dtype: torch.dtype) -> int:
    """The switch-over row count for one loaded layer: :func:`large_m_for`, or, in ``measure`` mode (the
    default on CPUs the table was not measured on), :func:`measured_switch`."""
    if switch_mode() != "measure":
        return large_m_for(isa, dtype, weight.bits)
    eff = effective_isa(isa, dtype, weight.bits)
    if eff == INT8_ACT:
        return 0
    table = LARGE_M[eff].get(dtype, 0)
    if eff == 0:  # scalar: dequantizing once costs about one M = 1 call on every CPU
        return table
    return measured_switch(weight, isa, dtype, fallback=table)


def choose_switch(timings: list[tuple[int, float, float]], fallback: int, complete: bool,
                  margin: float = SWITCH_MARGIN) -> int:
    """The switch-over from ``(rows, seconds packed-code kernel, seconds dequantize + GEMM)``, ascending rows:
    the first row count from which the dequantize path is faster (by ``margin``) at every measured one.  When
    the packed-code kernel still wins at the last one: never (0) if every candidate was measured, else
    ``fallback`` (the table's value) if that lies beyond what was measured, else never."""
    switch = 0
    for rows, t_small, t_large in reversed(timings):
        if t_large < margin * t_small:
            switch = rows
        else:
            break
    if switch:
        return switch
    last = timings[-1][0] if timings else 0
    return fallback if not complete and fallback > last else 0


def time_path(weight: "PackedWeight", x: torch.Tensor, isa: int, large_m: int, reps: int = 3) -> float:
    """Seconds of one ``weight.matmul(x, isa, large_m)`` call: best of ``reps`` after a warm-up call."""
    weight.matmul(x, isa, large_m)  # warm-up: caches, the dequantize path's buffers
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        weight.matmul(x, isa, large_m)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_paths(weight: "PackedWeight", isa: int, dtype: torch.dtype, rows: tuple[int, ...] = SWITCH_ROWS,
                  budget_s: float = SWITCH_BUDGET_S, timer=None) -> tuple[list[tuple[int, float, float]], bool]:
    """``[(rows, seconds packed-code kernel, seconds dequantize + GEMM)]`` on this weight at ``rows`` (ascending;
    :func:`time_path`, this process's thread count), and whether every row count was measured: stops once
    the dequantize path has won twice in a row, or when the next row count would exceed ``budget_s``.
    ``timer`` (tests) replaces :func:`time_path`."""
    timer = timer or time_path
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    timings: list[tuple[int, float, float]] = []
    with torch.inference_mode():
        for i, m in enumerate(rows):
            x = torch.randn(m, weight.k, generator=gen).to(dtype)
            t_small = timer(weight, x, isa, 0)
            t_large = timer(weight, x, isa, 1)
            timings.append((m, t_small, t_large))
            if len(timings) >= 2 and all(tl < SWITCH_MARGIN * ts for _, ts, tl in timings[-2:]):
                break
            # the next row count costs about rows[i + 1] / m times this one's 2 x 4 calls
            if i + 1 < len(rows) and time.perf_counter() - t0 + 4 * (t_small + t_large) * rows[i + 1] / m > budget_s:
                return timings, False
    return timings, True


def measured_switch(weight: "PackedWeight", isa: int, dtype: torch.dtype, fallback: int = 0,
                    rows: tuple[int, ...] = SWITCH_ROWS, budget_s: float = SWITCH_BUDGET_S, timer=None) -> int:
    """:func:`choose_switch` on :func:`measure_paths`, cached per layer shape, grid, ISA, dtype and thread
    count (a model's repeated layers are measured once) and logged."""
    key = (weight.n, weight.k, weight.bits, weight.group_size, weight.zeros is not None, weight.perm is not None,
           isa, dtype, torch.get_num_threads())
    if key in _SWITCH_CACHE:
        return _SWITCH_CACHE[key]
    t0 = time.perf_counter()
    timings, complete = measure_paths(weight, isa, dtype, rows, budget_s, timer)
    switch = choose_switch(timings, fallback, complete)
    _SWITCH_CACHE[key] = switch
    logger.info("rcsr native_cpu: %dx%d W%d g%d %s: dequantize + GEMM from %s rows (measured in %.2f s; "
                "rows: packed-code / dequantize us %s)", weight.n, weight.k, weight.bits, weight.group_size,
                str(dtype).replace("torch.", ""), switch or "never", time.perf_counter() - t0,
                ", ".join(f"{m}: {ts * 1e6:.0f} / {tl * 1e6:.0f}" for m, ts, tl in timings))
    return switch


def tile_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-output-row tensor ``[..., N, G]`` -> ``[..., ceil(N/16), G, 16]`` (padded with zeros)."""
    n = t.shape[-2]
    nt = (n + NT - 1) // NT
    if nt * NT != n:
        pad = t.new_zeros((*t.shape[:-2], nt * NT - n, t.shape[-1]))
        t = torch.cat([t, pad], dim=-2)
    return t.reshape(*t.shape[:-2], nt, NT, t.shape[-1]).transpose(-1, -2).contiguous()


@dataclass
class PackedWeight:
    """One weight (or a stack of experts' weights) in the native layout."""

    packed: torch.Tensor  # int32 [(E,) nt, kb, bits, 16]
    scales: torch.Tensor  # fp16 [(E,) nt, G, 16]
    zeros: torch.Tensor | None  # uint8 like scales, None for symmetric grids
    perm: torch.Tensor | None  # int64 [K]: input permutation (dynamic act order), shared by all experts
    bits: int
    group_size: int
    n: int
    k: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, perm: torch.Tensor | None = None) -> "PackedWeight":
        """``codes`` uint8 ``[(E,) N, K]`` (already permuted), ``scales`` ``[(E,) N, G]``, ``zeros`` uint8 or None."""
        if extension() is None:
            raise RcsrPluginError(_EXT_ERROR or "native CPU kernels unavailable")
        ops = torch.ops.rcsr_cpu
        if codes.dim() == 3:
            packed = torch.stack([ops.repack(c.contiguous(), bits) for c in codes])
        else:
            packed = ops.repack(codes.contiguous(), bits)
        return cls(packed, tile_rows(scales.to(torch.float16)),
                   None if zeros is None else tile_rows(zeros.to(torch.uint8)),
                   None if perm is None else perm.to(torch.int64).contiguous(), bits, group_size,
                   codes.shape[-2], codes.shape[-1])

    def matmul(self, x: torch.Tensor, isa: int, large_m: int | None = None) -> torch.Tensor:
        """``x [M, K] -> [M, N]`` in ``x.dtype``."""
        if large_m is None:
            large_m = large_m_for(isa, x.dtype, self.bits)
        return torch.ops.rcsr_cpu.gemm(x, self.packed, self.scales, self.zeros, self.perm, self.bits,
                                       self.group_size, self.n, isa, large_m)

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, isa: int, large_m: int | None = None) -> torch.Tensor:
        """Rows ``offsets[e]:offsets[e+1]`` of ``x`` times expert ``e``'s weight."""
        if large_m is None:
            large_m = large_m_for(isa, x.dtype, self.bits)
        return torch.ops.rcsr_cpu.grouped_gemm(x, self.packed, self.scales, self.zeros, self.perm, offsets,
                                               self.bits, self.group_size, self.n, isa, large_m)

    def expert(self, e: int) -> "PackedWeight":
        """Expert ``e`` of a stack, as a one-weight view (no copy)."""
        return PackedWeight(self.packed[e], self.scales[e], None if self.zeros is None else self.zeros[e],
                            self.perm, self.bits, self.group_size, self.n, self.k)

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 ``[N, K]`` (one weight): the inverse of the repacking, for checks."""
        return torch.ops.rcsr_cpu.unpack(self.packed, self.bits, self.n, self.k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros, self.perm)
                   if t is not None)


def layout_reason(spec: LayerSpec) -> str | None:
    """Why the native layout cannot hold this layer (``None`` if it can)."""
    if spec.group_size != -1 and spec.group_size % KB:
        return f"group size {spec.group_size} is not a multiple of {KB}"
    if spec.bits not in (2, 3, 4, 8):
        return f"{spec.bits}-bit codes"
    return None


class NativeCpuKernel(Kernel):
    name = "native_cpu"

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        if spec.device.type != "cpu":
            return "CPU only"
        reason = layout_reason(spec)
        if reason:
            return reason
        if spec.act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"activation dtype {spec.act_dtype}"
        if spec.dynamic and not spec.shared_group_index:
            return "fused shards have different group_index"
        return unavailable_reason()

    @classmethod
    def label(cls, spec: LayerSpec) -> str:
        try:
            isa = effective_isa(resolve_isa(), spec.act_dtype, spec.bits)
        except RcsrPluginError:
            return cls.name
        return f"{cls.name}[{ISA_NAMES[isa]}]"

    def prepare(self, w: QuantWeights) -> None:
        spec = self.spec
        codes = unpack(w, spec)
        perm = group_permutation(w, spec)
        if perm is not None:
            codes = codes[:, perm]
        self.isa = resolve_isa()
        self.weight = PackedWeight.from_codes(codes, w.scales, None if spec.sym else w.zeros, spec.bits,
                                              spec.group_size, perm)
        self.large_m = switch_for(self.weight, self.isa, spec.act_dtype)

    def nbytes(self) -> int:
        return self.weight.nbytes()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2, lead = flatten_x(x)
        y = self.weight.matmul(x2.contiguous(), self.isa, self.large_m)
        if bias is not None:
            y.add_(bias)
        return y.reshape(*lead, y.shape[-1])
