"""``vllm_mp``: vLLM's own mixed-precision GEMM kernels, picked by vLLM's kernel selection.

vLLM chooses a ``MPLinearKernel`` for a weight-only quantized linear with
``vllm.model_executor.kernels.linear.choose_mp_linear_kernel(MPLinearLayerConfig)``: on CUDA
Machete (Hopper) before Marlin before the rest, on CPU its ``cpu_gemm_wna16`` kernel, and so on.
This module feeds an rcsr layer to that machinery:

1. **Policy** (:meth:`VllmMpKernel.unsupported_reason`): 4- and 8-bit codes only (vLLM no longer
   serves 2/3-bit; those run on our Triton kernel); the layer described as an
   ``MPLinearLayerConfig`` (``uint4b8``/``uint8b128`` symmetric, ``uint4``/``uint8`` with zero
   points, the activation dtype, the group size); vLLM must find a kernel for it, and on CUDA
   that kernel must be Machete or Marlin -- for anything vLLM would fall back to (Exllama, Conch,
   its own Triton W4A16) our Triton kernel is the better choice.
2. **Layout** (:meth:`VllmMpKernel.prepare`): the canonical tensors are rewritten in the layout of
   compressed-tensors' ``pack-quantized`` format, which every vLLM mixed-precision kernel accepts
   through vLLM's parameter classes (each kernel's ``process_weights_after_loading`` permutes a
   parameter to the layout it needs from the ``input_dim``/``output_dim``/``packed_dim`` it
   carries):

   * ``weight_packed``      int32 ``[out, in*bits/32]``, codes packed along ``in``, least
     significant first (:class:`PackedvLLMParameter`, input_dim 1, output_dim 0, packed_dim 1);
   * ``weight_scale``       ``[out, n_groups]`` in the activation dtype (vLLM's kernels compute
     with scales of the activation dtype: with bf16 activations the fp16 checkpoint scales are
     rounded to bf16, exactly as for any GPTQ/compressed-tensors checkpoint served in bf16);
   * ``weight_zero_point``  int32 ``[out*bits/32, n_groups]``, the actual zero points packed along
     ``out`` (asymmetric only; symmetric grids use the type's bias, 8 resp. 128 == 2**(bits-1)).

   The parameters live on a private holder module, not on the vLLM layer, so a kernel that
   rewrites ``layer.bias`` for its own layout (Marlin permutes it) cannot touch the layer's bias;
   the bias is therefore added after the GEMM.
3. **Act order**: vLLM's MPLinear kernels take static groups only.  Dynamic act order whose
   shards share one ``group_index`` is turned into static groups by permuting the input columns
   once at load (:func:`~.base.group_permutation`) and gathering ``x[:, perm]`` once per call.

The vLLM class actually chosen is part of the kernel's label in the dispatch log line
(``-> kernel vllm_mp[MarlinLinearKernel]``).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from rcsr_deploy.packing import pack_lsb_words

from .base import Kernel, LayerSpec, QuantWeights, flatten_x, group_permutation, unpack

#: vLLM kernels taken on CUDA; for anything else vLLM would pick, ``triton`` runs the layer.
CUDA_ACCEPTED = ("MacheteLinearKernel", "MarlinLinearKernel")
SUPPORTED_BITS = (4, 8)
# The CPU kernel (cpu_gemm_wna16) has bf16/fp16 paths only, although its can_implement accepts fp32.
_CPU_ACT_DTYPES = (torch.bfloat16, torch.float16)


def _vllm():
    """vLLM's kernel-selection API, or ``None`` when vLLM (or this part of it) is missing."""
    try:
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.scalar_type import scalar_types
    except Exception:  # noqa: BLE001 - a missing or broken vLLM means "not available"
        return None
    return MPLinearLayerConfig, choose_mp_linear_kernel, scalar_types


def weight_type(bits: int, sym: bool):
    """vLLM ``ScalarType`` of the codes: ``uint{b}b{2**(b-1)}`` (symmetric: the bias is our
    constant zero point) or ``uint{b}`` with explicit zero points."""
    st = _vllm()[2]
    return getattr(st, f"uint{bits}b{1 << (bits - 1)}" if sym else f"uint{bits}")


def layer_config(spec: LayerSpec):
    """The ``MPLinearLayerConfig`` of one (per-rank) layer.  Shapes are ``(in, out)`` per vLLM;
    the full shape is the partition's: our partition plan never splits a group across ranks."""
    MPLinearLayerConfig = _vllm()[0]
    shape = (spec.in_features, spec.out_features)
    return MPLinearLayerConfig(full_weight_shape=shape, partition_weight_shape=shape,
                               weight_type=weight_type(spec.bits, spec.sym), act_type=spec.act_dtype,
                               group_size=spec.group_size, zero_points=not spec.sym)


@functools.lru_cache(maxsize=None)
def _choose(bits: int, group_size: int, sym: bool, in_f: int, out_f: int, act_dtype: torch.dtype):
    """(vLLM kernel class or None, reason) -- vLLM's choice for this layer shape, cached."""
    spec = LayerSpec(bits, group_size, sym, "static", in_f, out_f, act_dtype)
    try:
        return _vllm()[1](layer_config(spec)), None
    except ValueError as exc:
        # vLLM lists one reason per candidate kernel; keep the list on one line
        reasons = [r.strip() for r in str(exc).splitlines()[1:] if r.strip()]
        return None, "vLLM has no kernel for it (" + "; ".join(reasons) + ")"


def cuda_policy(chosen: str) -> str | None:
    """``None`` when the vLLM kernel ``chosen`` is taken on CUDA, else the reason it is not."""
    if chosen in CUDA_ACCEPTED:
        return None
    return f"vLLM would use {chosen}, not Machete/Marlin (the Triton kernel runs this layer)"


@contextlib.contextmanager
def _local_tp_rank():
    """vLLM's parameter classes read the TP rank/size at construction.  The holder's parameters
    never load weights (they hold this rank's tensors already), so outside an initialized vLLM
    engine (benchmarks, unit tests) rank 0 of 1 is used."""
    import vllm.model_executor.parameter as vp

    try:
        vp.get_tensor_model_parallel_rank()
        yield
        return
    except AssertionError:
        pass
    saved = vp.get_tensor_model_parallel_rank, vp.get_tensor_model_parallel_world_size
    vp.get_tensor_model_parallel_rank, vp.get_tensor_model_parallel_world_size = (lambda: 0), (lambda: 1)
    try:
        yield
    finally:
        vp.get_tensor_model_parallel_rank, vp.get_tensor_model_parallel_world_size = saved


def _no_loader(*_args, **_kwargs):  # pragma: no cover - the holder's parameters are never loaded
    raise RuntimeError("rcsr vllm_mp holder parameters are not loaded from a checkpoint")


class VllmMpKernel(Kernel):
    name = "vllm_mp"

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec) -> str | None:
        if spec.bits not in SUPPORTED_BITS:
            return f"{spec.bits}-bit codes (vLLM's kernels are used for 4/8-bit only)"
        if spec.dynamic and not spec.shared_group_index:
            return "fused shards have different group_index"
        if spec.out_features % (32 // spec.bits):
            return f"out-features {spec.out_features} cannot be packed {32 // spec.bits} per int32"
        if _vllm() is None:
            return "vLLM's mixed-precision kernel selection is not importable"
        if spec.device.type == "cpu" and spec.act_dtype not in _CPU_ACT_DTYPES:
            return f"activation dtype {spec.act_dtype} (vLLM's CPU kernel is bf16/fp16 only)"
        if spec.device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        chosen, reason = _choose(spec.bits, spec.group_size, spec.sym, spec.in_features, spec.out_features,
                                 spec.act_dtype)
        if chosen is None:
            return reason
        if spec.device.type == "cuda":
            return cuda_policy(chosen.__name__)
        return None

    @classmethod
    def label(cls, spec: LayerSpec) -> str:
        chosen, _ = _choose(spec.bits, spec.group_size, spec.sym, spec.in_features, spec.out_features,
                            spec.act_dtype)
        return f"{cls.name}[{chosen.__name__}]" if chosen is not None else cls.name

    def prepare(self, w: QuantWeights) -> None:
        from vllm.model_executor.parameter import (
            ChannelQuantScaleParameter,
            GroupQuantScaleParameter,
            PackedvLLMParameter,
        )

        spec = self.spec
        chosen, reason = _choose(spec.bits, spec.group_size, spec.sym, spec.in_features, spec.out_features,
                                 spec.act_dtype)
        if chosen is None:
            raise ValueError(reason)
        codes = unpack(w, spec)                                   # uint8 [out, in]
        self.perm = group_permutation(w, spec)
        if self.perm is not None:
            codes = codes[:, self.perm]
        per = 32 // spec.bits
        holder = torch.nn.Module()
        with _local_tp_rank():
            holder.register_parameter("weight_packed", PackedvLLMParameter(
                data=pack_lsb_words(codes, spec.bits, dim=1), input_dim=1, output_dim=0, packed_dim=1,
                packed_factor=per, weight_loader=_no_loader))
            scales = w.scales.to(spec.act_dtype).contiguous()   # [out, n_groups]
            if spec.group_size == -1:
                scale_param = ChannelQuantScaleParameter(data=scales, output_dim=0, weight_loader=_no_loader)
            else:
                scale_param = GroupQuantScaleParameter(data=scales, output_dim=0, input_dim=1,
                                                       weight_loader=_no_loader)
            holder.register_parameter("weight_scale", scale_param)
            if not spec.sym:
                holder.register_parameter("weight_zero_point", PackedvLLMParameter(
                    data=pack_lsb_words(w.zeros, spec.bits, dim=0), input_dim=1, output_dim=0, packed_dim=0,
                    packed_factor=per, weight_loader=_no_loader))
        holder.register_parameter("bias", None)
        self.impl = chosen(layer_config(spec), w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                           w_zp_param_name=None if spec.sym else "weight_zero_point")
        self.impl.process_weights_after_loading(holder)
        self.holder = holder
        self.vllm_kernel = chosen.__name__

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2, lead = flatten_x(x)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = self.impl.apply_weights(self.holder, x2.contiguous(), None)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    def nbytes(self) -> int:
        held = [t for t in self.holder.state_dict().values() if isinstance(t, torch.Tensor)]
        held += [t for t in vars(self.holder).values() if isinstance(t, torch.Tensor)]
        if self.perm is not None:
            held.append(self.perm)
        return sum(t.numel() * t.element_size() for t in held)
