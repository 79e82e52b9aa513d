"""``dequant``: unpack + dequantize into one shared scratch buffer, then a dense ``F.linear``.

Works for every bit width (2/3/4/8), every activation dtype (fp32/bf16/fp16), every group size,
static and dynamic act order (any per-shard ``group_index``), on any device.  In fp32 the
dequantized weight is bit-identical to ``rcsr_deploy.grid.dequantize`` (``(q - z) * s`` in fp32),
so the layer output is exactly ``F.linear(x, W_reference)``.

Memory: the layer keeps ``q - z`` unpacked as int8 (int16 for 8-bit asymmetric): 1 byte per weight,
a quarter of a dense fp32 weight.  (Keeping the packed codes instead would halve that for 4-bit
but costs three more passes over the weight per call -- unpack, convert, subtract -- about
doubling the time of this kernel; measured in vllm_plugin/README.md.)  At most ONE layer's dense weight
exists at a time: every layer dequantizes
into a module-level scratch buffer (per dtype and device) sized to the largest layer seen, and
the result of ``F.linear`` never aliases it.  (vLLM runs a model's layers one after another in one
thread per process, which is what makes the shared buffer safe.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rcsr_deploy.packing import SUPPORTED_BITS

from .base import Kernel, LayerSpec, QuantWeights, scales_f32, unpack, zeros_f32

# rows are dequantized in chunks of about this many elements when an fp32 temporary is needed
_CHUNK_ELEMS = 1 << 18


class _Scratch:
    """Grow-only flat buffers keyed by (name, dtype, device); views are handed out, never kept."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        key = (name, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._bufs.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


SCRATCH = _Scratch()


def store_dtype(bits: int, sym: bool) -> torch.dtype:
    """dtype of the stored ``q - z``: int8 when it always fits, else int16 (8-bit asymmetric)."""
    return torch.int8 if bits < 8 or sym else torch.int16


def dequant_rows_into(qz: torch.Tensor, s: torch.Tensor, out: torch.Tensor, group_len: int,
                      g: torch.Tensor | None = None) -> torch.Tensor:
    """``out[o, i] = qz[o, i] * s[o, group(i)]`` computed in fp32 and rounded once to ``out.dtype``.

    ``qz`` integer ``[rows, in]`` (``q - z``, exact in fp32), ``s`` fp32 ``[rows, n_groups]``; the group
    of column ``i`` is ``i // group_len`` or ``g[i]``.  Same-dtype in-place ops only: torch's CPU
    kernels for mixed dtypes and for bf16 arithmetic are several times slower."""
    rows, in_f = qz.shape
    ng = in_f // group_len
    fp32 = out.dtype == torch.float32
    step = rows if fp32 else max(1, _CHUNK_ELEMS // max(in_f, 1))
    tmp_full = None if fp32 else SCRATCH.get("dq_tmp", (min(step, rows), in_f), torch.float32, qz.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        tmp = out[r0:r1] if fp32 else tmp_full[: r1 - r0]
        tmp.copy_(qz[r0:r1])
        if g is None:
            tmp.view(r1 - r0, ng, group_len).mul_(s[r0:r1].unsqueeze(-1))
        else:
            tmp.mul_(s[r0:r1].index_select(1, g))
        if not fp32:
            out[r0:r1].copy_(tmp)
    return out


class DequantKernel(Kernel):
    name = "dequant"

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        if spec.bits not in SUPPORTED_BITS:
            return f"{spec.bits}-bit codes"
        if spec.act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"activation dtype {spec.act_dtype}"
        return None

    def prepare(self, w: QuantWeights) -> None:
        spec = self.spec
        codes = unpack(w, spec).to(torch.int16)
        z = zeros_f32(w, spec).to(torch.int16)
        self.s = scales_f32(w).contiguous()
        bounds, r = [], 0
        for n in spec.shard_sizes:
            bounds.append((r, r + n))
            r += n
        self.bounds = bounds
        self.g = None
        if spec.dynamic:
            if w.group_index is None:
                raise ValueError("dynamic act order needs group_index")
            self.g = w.group_index.long().contiguous()  # [n_shards, in]
            for k, (r0, r1) in enumerate(bounds):
                gk = self.g[k if self.g.shape[0] > 1 else 0]
                codes[r0:r1] -= z[r0:r1].index_select(1, gk)
        else:
            codes.view(spec.out_features, spec.n_groups, spec.group_len).sub_(z.unsqueeze(-1))
        self.qz = codes.to(store_dtype(spec.bits, spec.sym)).contiguous()

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's dense weight ``[out, in]`` in ``out.dtype``, written into ``out``."""
        spec = self.spec
        if self.g is None:
            return dequant_rows_into(self.qz, self.s, out, spec.group_len)
        for k, (r0, r1) in enumerate(self.bounds):
            gk = self.g[k if self.g.shape[0] > 1 else 0]
            dequant_rows_into(self.qz[r0:r1], self.s[r0:r1], out[r0:r1], spec.group_len, gk)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A fresh dense weight (for tests and export)."""
        out = torch.empty(self.spec.out_features, self.spec.in_features, dtype=dtype, device=self.qz.device)
        return self.dequantize_into(out)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        if x.dtype == torch.float16 and x.device.type == "cpu":
            # torch's fp16 GEMM on CPU is not vectorized (5-10x slower than fp32): compute in fp32
            w = SCRATCH.get("weight", (spec.out_features, spec.in_features), torch.float32, x.device)
            self.dequantize_into(w)
            y = F.linear(x.float(), w, None if bias is None else bias.float())
            return y.to(x.dtype)
        w = SCRATCH.get("weight", (spec.out_features, spec.in_features), x.dtype, x.device)
        self.dequantize_into(w)
        return F.linear(x, w, bias)
