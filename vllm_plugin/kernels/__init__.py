"""Kernel dispatch: the ONE place that decides how a quantized linear layer runs.

``select_kernel(LayerSpec(...))`` returns an unprepared :class:`Kernel` for a layer; the caller feeds it the
canonical tensors (``kernel.prepare(QuantWeights(...))``) and calls ``kernel.apply(x, bias)``.

Kernels (``RCSR_KERNEL=<name>`` forces one for every layer; it is an error if it cannot run one):

* ``vllm_mp``    -- vLLM's own mixed-precision kernels through vLLM's kernel selection
                    (``choose_mp_linear_kernel``), 4/8-bit; on CUDA only when vLLM picks Machete or
                    Marlin (``vllm_plugin.kernels.vllm_mp``)
* ``triton``     -- CUDA only: ``vllm_plugin.kernels.triton_wna16`` (when it imports and says it is available)
* ``native_cpu`` -- CPU, 2/3/4/8 bits, fp32/bf16/fp16: this project's C++ kernels over the packed codes
                    (``vllm_plugin.kernels.native_cpu``; AVX-512 BF16 / AVX-512 / AVX2 / scalar chosen
                    at run time, ``RCSR_CPU_ISA`` forces one); absent when the extension was not built
* ``torch_int4`` -- CPU, codes <= 4 bits, fp32/bf16/fp16: torch's int4 GEMM for small M, dequantize
                    into a scratch buffer + dense GEMM for large M
* ``cpu_wna16``  -- CPU, codes <= 4 bits, bf16/fp16: vLLM's cpu_gemm_wna16 (W4A16)
* ``dequant``    -- everything (2/3/4/8 bits, any dtype/device): dequantize into one shared scratch
                    buffer, then dense GEMM; bit-exact to the fp32 reference

Default choice (measured, see ``python -m vllm_plugin.kernels.bench`` and vllm_plugin/README.md), the first
kernel of the list that can take the layer:

* CUDA: vllm_mp (4/8-bit on Machete/Marlin), triton (2/3-bit, and 4/8-bit shapes Machete/Marlin do not
  take), dequant
* CPU: native_cpu first for every bit width and dtype (docs/RESULTS-serving.md); without the
  extension: bf16 torch_int4 (int4 GEMM below 80 rows, dense above), cpu_wna16, dequant; fp16
  cpu_wna16, dequant (torch's int4 and fp16 GEMMs are not vectorized on CPU); fp32 dequant

On CPU ``vllm_mp`` is not in the default order: it reaches the same ``cpu_gemm_wna16`` op as
``cpu_wna16`` (for 4-bit only) through vLLM's layout conversion; ``RCSR_KERNEL=vllm_mp`` forces it.
"""
from __future__ import annotations

import itertools
import logging
import os
import weakref

import torch

from ..errors import RcsrPluginError
from .base import Kernel, LayerSpec, QuantWeights
from .cpu_wna16 import CpuWna16Kernel
from .dequant import SCRATCH, DequantKernel
from .native_cpu import NativeCpuKernel
from .torch_int4 import TorchInt4Kernel
from .vllm_mp import VllmMpKernel

logger = logging.getLogger("vllm.rcsr_plugin.kernels")

ENV_KERNEL = "RCSR_KERNEL"


class TritonKernel(Kernel):
    """CUDA: the Triton WNA16 kernel of ``vllm_plugin.kernels.triton_wna16`` (written separately)."""

    name = "triton"

    @staticmethod
    def _module():
        try:
            from . import triton_wna16  # type: ignore[attr-defined]
        except Exception:
            return None
        try:
            return triton_wna16 if triton_wna16.is_available() else None
        except Exception:
            return None

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        if spec.device.type != "cuda" or not torch.cuda.is_available():
            return "CUDA only"
        if spec.dynamic and not spec.shared_group_index:
            return "fused shards have different group_index"
        if cls._module() is None:
            return "vllm_plugin.kernels.triton_wna16 is not available"
        return None

    def prepare(self, w: QuantWeights) -> None:
        spec = self.spec
        g_idx = w.group_index[0] if w.group_index is not None else None
        self.mod = self._module()
        self.prepared = self.mod.prepare(w.qweight, w.scales, w.zeros if not spec.sym else None, g_idx,
                                         spec.bits, spec.group_size, spec.sym)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.mod.matmul(x, self.prepared, bias)


KERNELS: dict[str, type[Kernel]] = {
    k.name: k for k in (VllmMpKernel, TritonKernel, NativeCpuKernel, TorchInt4Kernel, CpuWna16Kernel, DequantKernel)
}

#: CPU preference per activation dtype, first match wins (measurements in vllm_plugin/README.md)
DEFAULT_CPU_ORDER = {
    torch.bfloat16: ("native_cpu", "torch_int4", "cpu_wna16", "dequant"),
    torch.float16: ("native_cpu", "cpu_wna16", "dequant"),
    torch.float32: ("native_cpu", "dequant"),
}
DEFAULT_CUDA_ORDER = ("vllm_mp", "triton", "dequant")


def kernel_names() -> list[str]:
    return list(KERNELS)


def default_order(spec: LayerSpec) -> tuple[str, ...]:
    if spec.device.type == "cuda":
        return DEFAULT_CUDA_ORDER
    return DEFAULT_CPU_ORDER.get(spec.act_dtype, ("dequant",))


def select_kernel(spec: LayerSpec, *, log: bool = True) -> Kernel:
    """The kernel for one layer (unprepared).  Honours ``RCSR_KERNEL``; logs the choice once."""
    forced = os.environ.get(ENV_KERNEL, "").strip()
    where = spec.prefix or f"[{spec.out_features}x{spec.in_features}]"
    if forced:
        cls = KERNELS.get(forced)
        if cls is None:
            raise RcsrPluginError(f"{ENV_KERNEL}={forced!r} is not a kernel (choose one of {', '.join(KERNELS)})")
        reason = cls.unsupported_reason(spec)
        if reason:
            raise RcsrPluginError(f"{ENV_KERNEL}={forced} cannot run layer {where}: {reason}")
    else:
        cls = None
        reasons = []
        for name in default_order(spec):
            reason = KERNELS[name].unsupported_reason(spec)
            if reason is None:
                cls = KERNELS[name]
                break
            reasons.append(f"{name}: {reason}")
        if cls is None:  # pragma: no cover - dequant takes every valid spec
            raise RcsrPluginError(f"no kernel can run layer {where} ({'; '.join(reasons)})")
    if log:
        logger.info("rcsr: layer %s -> kernel %s (%d-bit, group %d, %s, act_order %s, %s)", where, cls.label(spec),
                    spec.bits, spec.group_size, "sym" if spec.sym else "asym", spec.act_order,
                    str(spec.act_dtype).removeprefix("torch."))
    return cls(spec)


# --------------------------------------------------------------------------------------------------
# torch.compile: the kernels run plain torch code (out= views, scratch buffers, vLLM/aten custom ops)
# that dynamo should not trace; under compilation each layer is one opaque custom op instead.
# --------------------------------------------------------------------------------------------------
_LIVE: "weakref.WeakValueDictionary[str, Kernel]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register_live(kernel: Kernel) -> str:
    """Give a prepared kernel the key by which the ``rcsr::linear`` op finds it (held weakly)."""
    key = f"{kernel.spec.prefix or 'layer'}#{next(_IDS)}"
    _LIVE[key] = kernel
    kernel.key = key
    return key


@torch.library.custom_op("rcsr::linear", mutates_args=())
def _rcsr_linear(x: torch.Tensor, bias: torch.Tensor | None, key: str) -> torch.Tensor:
    return _LIVE[key].apply(x, bias)


@_rcsr_linear.register_fake
def _rcsr_linear_fake(x: torch.Tensor, bias: torch.Tensor | None, key: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LIVE[key].spec.out_features))


def run(kernel: Kernel, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``kernel.apply(x, bias)``; an opaque ``rcsr::linear`` op while torch.compile traces."""
    if torch.compiler.is_compiling():
        key = getattr(kernel, "key", None) or register_live(kernel)
        return torch.ops.rcsr.linear(x, bias, key)
    return kernel.apply(x, bias)


__all__ = ["Kernel", "LayerSpec", "QuantWeights", "KERNELS", "SCRATCH", "select_kernel", "kernel_names",
           "default_order", "DEFAULT_CPU_ORDER", "ENV_KERNEL", "run", "register_live"]
