"""``torch_int4``: PyTorch's own int4 CPU GEMM (``aten._weight_int4pack_mm_for_cpu``).

torch computes ``w = (q - 8) * scale + zero`` per (group, output) with ``scales_and_zeros[g, n] =
(scale, zero)``.  Our format is ``w = (q - z) * s = (q - 8) * s + (8 - z) * s``, so
``scale = s`` and ``zero = (8 - z) * s`` (computed in fp32, then rounded to the activation dtype).
Any code below 16 fits, so 2- and 3-bit layers run on it too (stored at 4 bits per weight): their
codes are stored shifted by ``c = 8 - 2**(bits-1)`` (``q' = q + c``, ``zero = (2**(bits-1) - z) * s``),
which keeps torch's zero term small (exactly 0 for symmetric grids) so that rounding the scale and
zero to bf16/fp16 costs no more than for 4-bit layers.

* group sizes: torch takes 32/64/128/256; a per-channel layer uses the largest of those dividing
  ``in`` with its scale repeated.
* dynamic act order: when all shards share one ``group_index`` the input columns are permuted
  once at load time (``group_permutation``) and ``x`` is permuted per call.
* small M (decode) runs the int4 kernel; from ``dense_min_m`` rows on (prefill) the packed weight is
  unpacked + dequantized into the shared scratch buffer and a dense ``F.linear`` runs, which is
  faster there.  torch's packed layout is decoded by :func:`unpack_int4pack` (checked against torch
  once per process by :func:`int4pack_layout_ok`; if it ever changes, large M stays on the int4 kernel).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .base import Kernel, LayerSpec, QuantWeights, flatten_x, group_permutation, scales_f32, unpack, zeros_f32
from .dequant import _CHUNK_ELEMS, SCRATCH

_TORCH_GROUPS = (256, 128, 64, 32)

#: rows of x from which the dense path is used, per activation dtype (measured with
#: ``python -m vllm_plugin.kernels.bench --split-int4``, see vllm_plugin/README.md): torch's int4 GEMM is
#: vectorized for bf16 only; in fp32 and fp16 it is 10-30x slower than the dense path at every M.
DENSE_MIN_M = {torch.bfloat16: 80, torch.float16: 1, torch.float32: 1}


def _has_ops() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def unpack_int4pack_t(packed: torch.Tensor, n: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Transposed uint8 codes ``[k, n]`` from ``_convert_weight_to_int4pack_for_cpu(codes, 1)``'s output.

    Layout (torch 2.x CPU): rows in blocks of 64; block ``b`` is ``[k, 32]`` bytes whose low nibble is
    row ``64b + j`` and high nibble row ``64b + 32 + j``; a tail of ``r < 64`` rows is ``[k, r/2]`` bytes
    whose low/high nibbles are rows ``2j`` / ``2j + 1``.  Writing the transpose keeps every copy
    a run of 32 contiguous bytes."""
    if out is None:
        out = torch.empty(k, n, dtype=torch.uint8, device=packed.device)
    flat = packed.reshape(-1)
    nb = n // 64
    if nb:
        # 8 codes per int64 op: low nibbles of 8 bytes at once (n % 16 == 0 keeps rows 8-byte aligned)
        mask = 0x0F0F0F0F0F0F0F0F
        blk = flat[: nb * k * 32].view(torch.int64).view(nb, k, 4).transpose(0, 1)  # [k, nb, 4]
        o = out.view(torch.int64)[:, : nb * 8].view(k, nb, 2, 4)
        torch.bitwise_and(blk, mask, out=o[:, :, 0])
        torch.bitwise_right_shift(blk, 4, out=o[:, :, 1])
        o[:, :, 1].bitwise_and_(mask)
    rem = n - nb * 64
    if rem:
        tail = flat[nb * k * 32:].view(k, rem // 2)
        o = out[:, nb * 64:].view(k, rem // 2, 2)
        torch.bitwise_and(tail, 15, out=o[:, :, 0])
        torch.bitwise_right_shift(tail, 4, out=o[:, :, 1])
    return out


def unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """uint8 codes ``[n, k]`` (see :func:`unpack_int4pack_t`)."""
    return unpack_int4pack_t(packed, n, k).t().contiguous()


def _chunk_rows(group_len: int, k: int, n: int) -> int:
    """Rows of the transposed weight per fp32 chunk: whole groups, or a divisor of one group."""
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    if group_len <= step:
        return min(k, group_len * (step // group_len))
    c = group_len
    while c > step and c % 2 == 0:
        c //= 2
    return c


def dequant_t_into(codes_t: torch.Tensor, st: torch.Tensor, zt: torch.Tensor, out_t: torch.Tensor,
                   group_len: int) -> torch.Tensor:
    """``out_t[i, o] = (codes_t[i, o] - zt[i // group_len, o]) * st[i // group_len, o]`` in fp32, rounded
    once to ``out_t.dtype`` (same-dtype in-place ops on fp32 chunks)."""
    k, n = codes_t.shape
    cr = _chunk_rows(group_len, k, n)
    fp32 = out_t.dtype == torch.float32
    tmp_full = None if fp32 else SCRATCH.get("dq_tmp", (cr, n), torch.float32, codes_t.device)
    for r0 in range(0, k, cr):
        r1 = min(k, r0 + cr)
        tmp = out_t[r0:r1] if fp32 else tmp_full[: r1 - r0]
        tmp.copy_(codes_t[r0:r1])
        if r1 - r0 >= group_len:
            g0, g1 = r0 // group_len, r1 // group_len
            t3 = tmp.view(g1 - g0, group_len, n)
            t3.sub_(zt[g0:g1].unsqueeze(1))
            t3.mul_(st[g0:g1].unsqueeze(1))
        else:
            g = r0 // group_len
            tmp.sub_(zt[g])
            tmp.mul_(st[g])
        if not fp32:
            out_t[r0:r1].copy_(tmp)
    return out_t


_LAYOUT_OK: bool | None = None


def int4pack_layout_ok() -> bool:
    """Whether :func:`unpack_int4pack` matches this torch's packing (checked once)."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            ok = True
            for n in (128, 96):
                q = torch.randint(0, 16, (n, 64), generator=g, dtype=torch.int32)
                p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                ok = ok and torch.equal(unpack_int4pack_t(p, n, 64).t().int(), q)
            _LAYOUT_OK = bool(ok)
        except Exception:  # pragma: no cover - op missing / different signature
            _LAYOUT_OK = False
    return _LAYOUT_OK


def effective_group(spec: LayerSpec) -> int | None:
    if spec.group_size != -1:
        return spec.group_size if spec.group_size in _TORCH_GROUPS else None
    for g in _TORCH_GROUPS:
        if spec.in_features % g == 0:
            return g
    return None


class TorchInt4Kernel(Kernel):
    name = "torch_int4"

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        if spec.device.type != "cpu":
            return "CPU only"
        if not _has_ops():
            return "this torch has no _weight_int4pack_mm_for_cpu"
        if spec.bits > 4:
            return f"{spec.bits}-bit codes do not fit int4"
        if spec.act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"activation dtype {spec.act_dtype}"
        if spec.out_features % 16:
            return f"output size {spec.out_features} is not a multiple of 16"
        if effective_group(spec) is None:
            return f"group size {spec.group_size} (torch takes 32/64/128/256)"
        if spec.dynamic and not spec.shared_group_index:
            return "fused shards have different group_index"
        return None

    def prepare(self, w: QuantWeights) -> None:
        spec = self.spec
        codes = unpack(w, spec)
        s = scales_f32(w)
        z = zeros_f32(w, spec)
        self.perm = group_permutation(w, spec)
        if self.perm is not None:
            codes = codes[:, self.perm]
        self.gs = effective_group(spec)
        rep = spec.group_len // self.gs
        s_e = s.repeat_interleave(rep, dim=1) if rep > 1 else s
        z_e = z.repeat_interleave(rep, dim=1) if rep > 1 else z
        c = 8 - (1 << (spec.bits - 1))  # 0 for 4-bit
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).add_(c).contiguous(), 1)
        sz = torch.stack([s_e.t(), ((8.0 - c - z_e) * s_e).t()], dim=-1)  # [in/gs, out, 2] fp32
        self.scales_zeros = sz.to(spec.act_dtype).contiguous()
        # fp32 grid, transposed, for the dense (large-M) path
        self.st = s.t().contiguous()
        self.zt = (z + c).t().contiguous()  # the stored codes carry the offset c
        self.dense_min_m = int(os.environ.get("RCSR_INT4_DENSE_MIN_M", DENSE_MIN_M.get(spec.act_dtype, 8)))
        if not int4pack_layout_ok():
            self.dense_min_m = 1 << 62

    def dense_weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight, transposed ``[in, out]`` (rows permuted when ``perm`` is set), in the
        shared scratch buffer."""
        spec = self.spec
        n, k = spec.out_features, spec.in_features
        dev = self.packed.device
        codes_t = unpack_int4pack_t(self.packed, n, k, out=SCRATCH.get("codes", (k, n), torch.uint8, dev))
        out_t = SCRATCH.get("weight", (k, n), dtype, dev)
        return dequant_t_into(codes_t, self.st, self.zt, out_t, spec.group_len)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2, lead = flatten_x(x)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if x2.shape[0] >= self.dense_min_m:
            y = F.linear(x2, self.dense_weight_t(x2.dtype).t(), bias)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.gs, self.scales_zeros)
            if bias is not None:
                y = y + bias
        return y.reshape(*lead, y.shape[-1])
