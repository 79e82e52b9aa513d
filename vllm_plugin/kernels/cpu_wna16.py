"""``cpu_wna16``: vLLM's own CPU W4A16 GEMM (``vllm._custom_ops.cpu_gemm_wna16``).

Always called directly as W4A16 (never vLLM's ``int4_scaled_mm_cpu`` W4A8 path, which quantizes
activations to int8 on AMX machines when ``VLLM_CPU_INT4_W4A8=1``), so numerics stay those of the
checkpoint.  bf16/fp16 activations only (the op is not implemented for fp32).

Layout (what ``CPUWNA16LinearKernel._process_gptq_weights_w4a16`` produces, checked numerically in
the tests): codes transposed to ``[in, out]``, packed 8 per int32 along ``out``, then blocks of 16
output channels made contiguous: ``[out/16, in*2]`` int32.  Scales ``[n_groups, out]`` in the
activation dtype; zero points (asymmetric "uint4") ``[n_groups, out/8]`` int32 packed along ``out``,
``None`` for symmetric 4-bit ("uint4b8", zero 8).  Codes below 16 of 2- and 3-bit layers run as
asymmetric uint4 with their own zero points.
"""
from __future__ import annotations

import torch

from rcsr_deploy.packing import pack_lsb_words

from .base import Kernel, LayerSpec, QuantWeights, flatten_x, group_permutation, unpack

_OP = None


def _op():
    global _OP
    if _OP is None:
        try:
            from vllm import _custom_ops as ops  # noqa: F401

            _OP = ops.cpu_gemm_wna16 if hasattr(torch.ops._C, "cpu_gemm_wna16") else False
        except Exception:
            _OP = False
    return _OP


def _isa_hint(dtype: torch.dtype) -> str:
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # pragma: no cover
        amx = False
    return "amx" if amx and dtype == torch.bfloat16 else "vec"


class CpuWna16Kernel(Kernel):
    name = "cpu_wna16"

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        if spec.device.type != "cpu":
            return "CPU only"
        if spec.bits > 4:
            return f"{spec.bits}-bit codes do not fit uint4"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return f"activation dtype {spec.act_dtype} (bf16/fp16 only)"
        if spec.out_features % 32 or spec.in_features % 32:
            return "in and out sizes must be multiples of 32"
        if spec.group_size != -1 and spec.group_size % 2:
            return f"group size {spec.group_size}"
        if spec.dynamic and not spec.shared_group_index:
            return "fused shards have different group_index"
        if not _op():
            return "vLLM's cpu_gemm_wna16 op is not available"
        return None

    def prepare(self, w: QuantWeights) -> None:
        spec = self.spec
        n, k = spec.out_features, spec.in_features
        codes = unpack(w, spec)
        self.perm = group_permutation(w, spec)
        if self.perm is not None:
            codes = codes[:, self.perm]
        wt = pack_lsb_words(codes.t(), 4, dim=1)  # [k, n/8]
        self.qw = wt.view(k, n // 16, 2).permute(1, 0, 2).reshape(n // 16, k * 2).contiguous()
        self.scales = w.scales.t().to(spec.act_dtype).contiguous()  # [ng, n]
        if spec.sym and spec.bits == 4:
            self.zeros = None
        else:
            if spec.sym:
                z = torch.full(tuple(w.scales.shape), 1 << (spec.bits - 1), dtype=torch.uint8, device=w.scales.device)
            else:
                z = w.zeros
            self.zeros = pack_lsb_words(z.t(), 4, dim=1)  # [ng, n/8]
        self.isa = _isa_hint(spec.act_dtype)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2, lead = flatten_x(x)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = _op()(x2.contiguous(), self.qw, self.scales, self.zeros, bias, 8, self.isa)
        return y.reshape(*lead, y.shape[-1])
