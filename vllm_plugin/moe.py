"""``RcsrMoEMethod``: quantized routed experts (vLLM's ``RoutedExperts`` layer) from rcsr checkpoints.

On disk (format_version 3, docs/FORMAT.md section 12) every expert projection is stored like a dense
quantized linear under its hub name ``<experts>.<e>.gate_proj|up_proj|down_proj``; vLLM's model loaders
map those names (``make_expert_params_mapping``) to this layer's 3-D parameters with shard ids
w1 (gate) / w3 (up) / w2 (down) and the expert id:

* ``w13_qweight`` int32 ``[E, 2I, H*bits/32]``   ``w2_qweight`` int32 ``[E, H, I*bits/32]``
* ``w13_scales``  fp16  ``[E, 2I, G(H)]``         ``w2_scales``  fp16  ``[E, H, G(I)]``
* ``w13_zeros`` / ``w2_zeros``  uint8, like the scales (asymmetric only)
* ``w13_group_index`` int32 ``[E, 2, H]`` (one row per shard)  ``w2_group_index`` int32 ``[E, 1, I]``
  (dynamic act order only)

Experts with biases (GPT-OSS): ``w13_bias [E, 2I]`` and ``w2_bias [E, H]`` in the activation dtype, loaded by
the model's own loader (GPT-OSS: interleaved gate/up for its ``swigluoai`` activation, de-interleaved here
into this module's gate-then-up order); GPT-OSS's loader does not route per-expert tensors, so
:func:`_install_gpt_oss_loader` wraps it to hand ours to these parameters' loaders.

Packing is along the input dim, so tensor parallelism splits w13 along its output rows (gate and up
each keep their rank's ``I/TP`` rows) and w2 along its packed input words / groups -- exactly what
vLLM's own ``RoutedExperts.weight_loader`` does for ``quant_method="group"`` parameters, which loads
qweight / scales / zeros here.  ``group_index`` and per-channel w2 scales are loaded by this module.

Runtime: :func:`select_experts_kernel` picks an :class:`ExpertsKernel`.  Routing (top-k ids and
weights) is always vLLM's own, passed to ``apply``.  Kernels, in the default order:

* ``native_cpu`` (default on CPU when the extension is built): the project's grouped C++ kernel
  (``rcsr_cpu::grouped_gemm``, ``vllm_plugin.kernels.native_cpu``) over the PACKED codes at the
  checkpoint's bit width -- (token, slot) pairs sorted by expert, one call for gate+up of all
  experts, one for down.  Dynamic act order: every expert (and gate vs up, when their orders differ)
  has its own column order; its codes are stored in that order at load, and each expert's rows of the
  sorted activations are permuted before the grouped call (one ``index_select`` per expert that got
  tokens).  Gate and up with different orders take one grouped call each.
* ``vllm_cpu`` (default on CPU): dequantizes every expert once at load into the activation dtype and
  runs vLLM's own unquantized CPU grouped MoE op -- same numerics as vLLM on the dequantized reference;
  memory holds DENSE experts (2 or 4 bytes per weight).
* ``triton`` (default on CUDA): the Triton WNA16 kernel in its grouped form, one launch per matrix for
  all experts, codes packed at their bit width on the GPU, no host sync (:class:`TritonExperts`);
  interpreter-tested and compiled for sm_90a on CPU.
* ``marlin`` (``RCSR_MOE_KERNEL=marlin``, CUDA, 4/8-bit static groups): vLLM's own Marlin-MoE kernel on
  weights converted by vLLM's own Marlin processing (:class:`MarlinExperts`); opt-in until a GPU run
  validates it (none has been available), so ``triton`` stays the CUDA default.
* ``dequant`` (``RCSR_MOE_KERNEL=dequant``; any device/dtype): keeps each expert as a
  ``vllm_plugin.kernels.dequant.DequantKernel`` (``q - z`` unpacked as int8: 1 byte per weight, not the
  packed codes) and per call dequantizes only the experts that received tokens into the shared scratch
  buffer (tokens sorted by expert, one dense GEMM pair per expert).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from rcsr_deploy.moe_format import PROJ_NAMES, SHARD_IDS, vllm_expert_modules
from rcsr_deploy.format import STOCK_GROUP_SIZES, QuantSpec, supported_group_size, tensor_table
from rcsr_deploy.packing import pack_lsb_words

from .errors import RcsrPluginError
from .kernels.base import LayerSpec, QuantWeights, can_permute, group_permutation, unpack
from .kernels.dequant import DequantKernel
from .kernels.native_cpu import NativeCpuKernel, PackedWeight, resolve_isa, switch_for

logger = logging.getLogger("vllm.rcsr_plugin.moe")
ENV_MOE_KERNEL = "RCSR_MOE_KERNEL"
_DTYPES = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.uint8, "group_index": torch.int32}
_SHARD_PROJ = {v: k for k, v in SHARD_IDS.items()}   # w1 -> gate_proj, ...


def experts_prefix(prefix: str) -> str:
    """The HF module name of the experts behind a vLLM ``RoutedExperts`` prefix."""
    return prefix.removesuffix(".routed_experts")


def moe_quant_method(config, layer, prefix: str):
    """``get_quant_method`` for a ``RoutedExperts`` layer: ours when every expert projection of the layer
    is listed in ``quantized_modules``, vLLM's unquantized method when none is, else one error line."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    moe = layer.moe_config
    hf = experts_prefix(prefix)
    listed = vllm_expert_modules(config.quantized_modules, hf)
    n = int(moe.num_experts)
    if not listed:
        return UnquantizedFusedMoEMethod(moe)
    want = {(e, p) for e in range(n) for p in PROJ_NAMES}
    have = {(e, p) for e, d in listed.items() for p in d}
    if have != want:
        miss = sorted(want - have)
        extra = sorted(have - want)
        what = (f"not {hf}.{miss[0][0]}.{miss[0][1]}" if miss else f"{hf}.{extra[0][0]}.{extra[0][1]} is beyond "
                f"its {n} experts")
        raise RcsrPluginError(f"{hf}: quantized_modules lists {len(have & want)} of its {len(want)} expert "
                              f"projections ({what}); quantize all experts of a layer or none")
    if type(layer).__name__ == "GptOssRoutedExperts":
        _install_gpt_oss_loader()
    # mixed precision: the layer's experts (gate, up and down) are one layer for vLLM: one grid
    return RcsrMoEMethod(config.for_modules([m for d in listed.values() for m in d.values()]), moe, hf)


#: a routed expert's quantized tensor on disk: ``<experts>.<e>.<proj>.<kind>``
_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(qweight|scales|zeros|group_index)$")


def _install_gpt_oss_loader() -> None:
    """Wrap vLLM's ``GptOssModel.load_weights`` (once per process) so that an rcsr checkpoint's per-expert
    tensors reach this module's parameters.  vLLM's GPT-OSS loader knows only its own fused expert tensors
    and silently skips any other name; the wrapper hands ``<experts>.<e>.<proj>.<kind>`` to the parameter's
    loader with the expert id and shard id (w1 / w3 / w2), as the other families' loaders do through
    ``make_expert_params_mapping``, and passes every other tensor through unchanged."""
    from vllm.model_executor.models import gpt_oss

    orig = gpt_oss.GptOssModel.load_weights
    if getattr(orig, "_rcsr_experts", False):
        return

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def others():
            for name, w in weights:
                m = _EXPERT_TENSOR.match(name)
                if m is None:
                    yield name, w
                    continue
                stem = f"{'w2' if m.group(3) == 'down_proj' else 'w13'}_{m.group(4)}"
                pname = next((p for p in (f"{m.group(1)}.routed_experts.{stem}", f"{m.group(1)}.{stem}")
                              if p in params), None)
                if pname is None:  # vLLM would drop it silently
                    raise RcsrPluginError(f"{name}: no rcsr expert parameter {stem} in {m.group(1)} to load it into")
                param = params[pname]
                if param.weight_loader(param, w, pname, SHARD_IDS[m.group(3)], int(m.group(2)), return_success=True):
                    loaded.add(pname)

        return loaded | set(orig(self, others()))

    load_weights._rcsr_experts = True
    gpt_oss.GptOssModel.load_weights = load_weights
    logger.info("rcsr: GPT-OSS loader routes the per-expert rcsr tensors to the experts' parameters")


# --------------------------------------------------------------------------------------------------
# kernels for a whole layer of experts
# --------------------------------------------------------------------------------------------------
class ExpertsKernel(ABC):
    """Runtime form of one layer of quantized experts.  ``prepare`` gets the canonical per-expert tensors
    (``w13[e]``: gate and up stacked, ``spec13.shard_sizes == (I, I)``; ``w2[e]``), ``apply`` computes
    ``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])`` with ``act(gate) * up`` (or GPT-OSS's
    ``swigluoai``) in between, and the experts' biases (``set_biases``) where they have them."""

    name: ClassVar[str] = "?"
    supports_bias: ClassVar[bool] = True

    def __init__(self, spec13: LayerSpec, spec2: LayerSpec, num_experts: int):
        self.spec13, self.spec2, self.num_experts = spec13, spec2, num_experts
        self.b13: torch.Tensor | None = None   # [E, 2I] fp32, gate block then up block
        self.b2: torch.Tensor | None = None    # [E, H] fp32

    def set_biases(self, b13: torch.Tensor | None, b2: torch.Tensor | None) -> None:
        self.b13 = None if b13 is None else b13.float().contiguous()
        self.b2 = None if b2 is None else b2.float().contiguous()

    @classmethod
    @abstractmethod
    def unsupported_reason(cls, spec13: LayerSpec, spec2: LayerSpec, activation: str) -> str | None:
        ...

    @abstractmethod
    def prepare(self, w13: list[QuantWeights], w2: list[QuantWeights]) -> None:
        ...

    @abstractmethod
    def apply(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              activation: str, apply_router_weight_on_input: bool = False) -> torch.Tensor:
        ...

    def nbytes(self) -> int:
        return 0

    def per_expert(self, x, topk_weights, topk_ids, activation: str, apply_router_weight_on_input: bool,
                   up, down) -> torch.Tensor:
        """One expert at a time over the (token, slot) pairs sorted by expert (ids ``>= E``: another rank's
        experts, skipped): ``up(e, x_e)`` -> gate and up outputs ``[n, 2I]``, biases, gating, ``down(e, h)``,
        biases, then the routing weights; accumulated in fp32."""
        gated = _GATES[activation]
        inter = self.spec13.shard_sizes[0]
        out = torch.zeros(x.shape[0], self.spec2.out_features, dtype=torch.float32, device=x.device)
        flat_ids = topk_ids.reshape(-1).long()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()[:self.num_experts]
        k = topk_ids.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tok = pairs // k
            w = topk_weights.reshape(-1)[pairs].to(torch.float32).unsqueeze(1)
            xe = x.index_select(0, tok)
            if apply_router_weight_on_input:
                xe = (xe.float() * w).to(x.dtype)
            h = up(e, xe)
            if self.b13 is not None:
                h = (h.float() + self.b13[e]).to(h.dtype)
            y = down(e, gated(h[:, :inter], h[:, inter:]).contiguous()).float()
            if self.b2 is not None:
                y = y + self.b2[e]
            out.index_add_(0, tok, y if apply_router_weight_on_input else y * w)
        return out.to(x.dtype)


_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _swigluoai(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """GPT-OSS's gating (vLLM's ``swigluoai``, transformers' ``GptOssExperts._apply_gate``) on separate gate and
    up blocks: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


#: ``gate, up -> expert hidden`` per vLLM activation name
_GATES = {**{n: (lambda g, u, a=a: a(g) * u) for n, a in _ACTS.items()}, "swigluoai": _swigluoai}


class DequantExperts(ExpertsKernel):
    """Per expert that received tokens: dequantize (shared scratch buffer) + dense GEMMs; exact in fp32."""

    name = "dequant"

    @classmethod
    def unsupported_reason(cls, spec13, spec2, activation) -> str | None:
        if activation not in _GATES:
            return f"activation {activation!r} (supported: {', '.join(_GATES)})"
        return DequantKernel.unsupported_reason(spec13) or DequantKernel.unsupported_reason(spec2)

    def prepare(self, w13, w2) -> None:
        self.k13, self.k2 = [], []
        for a, b in zip(w13, w2, strict=True):
            k1, k2 = DequantKernel(self.spec13), DequantKernel(self.spec2)
            k1.prepare(a)
            k2.prepare(b)
            self.k13.append(k1)
            self.k2.append(k2)

    def nbytes(self) -> int:
        return sum(k.qz.numel() * k.qz.element_size() + k.s.numel() * 4 for k in self.k13 + self.k2)

    def apply(self, x, topk_weights, topk_ids, *, activation, apply_router_weight_on_input=False):
        return self.per_expert(x, topk_weights, topk_ids, activation, apply_router_weight_on_input,
                               lambda e, xe: self.k13[e].apply(xe), lambda e, h: self.k2[e].apply(h))


class VllmCpuExperts(ExpertsKernel):
    """Dequantize every expert ONCE at load into the activation dtype (dense ``[E, 2I, H]`` / ``[E, H, I]``,
    vLLM's CPU prepacked layout) and run vLLM's own unquantized CPU grouped MoE op (``cpu_fused_moe``, the
    kernel vLLM's unquantized path uses here): numerically the same as vLLM serving the dequantized
    reference, and fast -- but the memory holds DENSE dequantized experts, not the packed codes."""

    name = "vllm_cpu"
    isa = "vec"
    supports_bias = False

    @classmethod
    def unsupported_reason(cls, spec13, spec2, activation) -> str | None:
        if spec13.device.type != "cpu":
            return "CPU only"
        if spec13.act_dtype not in (torch.float32, torch.bfloat16):
            return f"activation dtype {spec13.act_dtype}"
        if activation not in ("silu", "gelu"):
            return f"activation {activation!r}"
        if spec13.in_features % 32 or spec2.in_features % 32:
            return "hidden and intermediate sizes must be multiples of 32"
        try:
            from vllm.platforms import current_platform

            current_platform.import_kernels()
            if not (hasattr(torch.ops._C, "cpu_fused_moe") and hasattr(torch.ops._C, "prepack_moe_weight")):
                return "vLLM's CPU MoE ops are not available"
        except Exception as e:  # pragma: no cover
            return f"vLLM's CPU MoE ops are not available ({e})"
        return None

    def prepare(self, w13, w2) -> None:
        from vllm._custom_ops import cpu_prepack_moe_weight

        dt = self.spec13.act_dtype
        d13 = torch.empty(self.num_experts, self.spec13.out_features, self.spec13.in_features, dtype=dt)
        d2 = torch.empty(self.num_experts, self.spec2.out_features, self.spec2.in_features, dtype=dt)
        for e, (a, b) in enumerate(zip(w13, w2, strict=True)):
            for spec, src, dst in ((self.spec13, a, d13[e]), (self.spec2, b, d2[e])):
                kern = DequantKernel(spec)
                kern.prepare(src)
                kern.dequantize_into(dst)   # fp32 (q - z) * s, rounded once to the activation dtype
        self.w13 = cpu_prepack_moe_weight(d13, self.isa)
        self.w2 = cpu_prepack_moe_weight(d2, self.isa)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2))

    def apply(self, x, topk_weights, topk_ids, *, activation, apply_router_weight_on_input=False):
        from vllm._custom_ops import cpu_fused_moe

        other = topk_ids == self.num_experts    # another rank's expert (expert parallelism): weight 0 on expert 0
        if bool(other.any()):
            topk_weights = topk_weights.masked_fill(other, 0)
            topk_ids = topk_ids.masked_fill(other, 0)
        if apply_router_weight_on_input:  # as vLLM's prepare step does for topk == 1
            x = x * topk_weights.to(x.dtype)
        out = torch.empty(x.shape[0], self.spec2.out_features, dtype=x.dtype, device=x.device)
        cpu_fused_moe(out, x.contiguous(), self.w13, self.w2, None, None, topk_weights, topk_ids, activation,
                      self.isa, apply_router_weight_on_input)
        return out


class NativeExperts(ExpertsKernel):
    """The native grouped kernel over the packed codes (2/3/4/8 bits stay packed in memory)."""

    name = "native_cpu"

    @classmethod
    def unsupported_reason(cls, spec13, spec2, activation) -> str | None:
        if activation not in _GATES:
            return f"activation {activation!r} (supported: {', '.join(_GATES)})"
        if spec13.dynamic and not (spec13.shared_group_index and spec2.shared_group_index):
            return "dynamic act order whose groups are not all of group_size columns"
        for spec in (spec13, spec2):  # what the dense native kernel takes, per expert matrix
            reason = NativeCpuKernel.unsupported_reason(dataclasses.replace(spec, shared_group_index=True))
            if reason:
                return reason
        return None

    def prepare(self, w13, w2) -> None:
        self.isa = resolve_isa()
        inter = self.spec13.shard_sizes[0]
        if not self.spec13.dynamic:
            self.w13 = [(_stack(w13, self.spec13), None)]
            self.w2 = (_stack(w2, self.spec2), None)
        else:
            self._prepare_dynamic(w13, w2, inter)
        # the switch-over to dequantize + GEMM for an expert's rows (measured on expert 0 where the table
        # does not apply); every expert of a stack has the same shape and grid
        dt = self.spec13.act_dtype
        self.large_m13 = [switch_for(pw.expert(0), self.isa, dt) for pw, _ in self.w13]
        self.large_m2 = switch_for(self.w2[0].expert(0), self.isa, dt)

    def _prepare_dynamic(self, w13, w2, inter) -> None:
        # dynamic act order: per expert (and per shard) the permutation that makes its groups static
        same = all(bool((w.group_index[0] == w.group_index[1]).all()) for w in w13)
        rows = [slice(0, 2 * inter)] if same else [slice(0, inter), slice(inter, 2 * inter)]
        self.w13 = []
        for shard, r in enumerate(rows):
            ws = [QuantWeights(w.qweight[r], w.scales[r], None if w.zeros is None else w.zeros[r],
                               w.group_index[shard:shard + 1]) for w in w13]
            spec = dataclasses.replace(self.spec13, out_features=r.stop - r.start, shard_sizes=())
            self.w13.append(_stack_permuted(ws, spec))
        self.w2 = _stack_permuted(w2, self.spec2)

    def nbytes(self) -> int:
        return sum(pw.nbytes() + (0 if perms is None else perms.numel() * perms.element_size())
                   for pw, perms in (*self.w13, self.w2))

    def apply(self, x, topk_weights, topk_ids, *, activation, apply_router_weight_on_input=False):
        gated = _GATES[activation]
        inter = self.spec13.shard_sizes[0]
        flat_ids = topk_ids.reshape(-1).long()
        order = torch.argsort(flat_ids, stable=True)          # (token, slot) pairs sorted by expert
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(flat_ids, minlength=self.num_experts)[:self.num_experts], 0, out=offsets[1:])
        if int(offsets[-1]) < order.numel():                   # pairs with id E (another rank's expert): skip
            order = order[:int(offsets[-1])]
        tok = order // topk_ids.shape[1]
        w = topk_weights.reshape(-1)[order].to(torch.float32).unsqueeze(1)
        xs = x.index_select(0, tok)
        if apply_router_weight_on_input:
            xs = (xs.float() * w).to(x.dtype)
        parts = [pw.grouped(_permute_segments(xs, offsets, perms), offsets, self.isa, lm)
                 for (pw, perms), lm in zip(self.w13, self.large_m13, strict=True)]
        h = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        eids = flat_ids[order] if self.b13 is not None or self.b2 is not None else None
        if self.b13 is not None:
            h = (h.float() + self.b13.index_select(0, eids)).to(h.dtype)
        h = gated(h[:, :inter], h[:, inter:]).contiguous()
        pw2, perms2 = self.w2
        y = pw2.grouped(_permute_segments(h, offsets, perms2), offsets, self.isa, self.large_m2).float()
        if self.b2 is not None:
            y = y + self.b2.index_select(0, eids)
        out = torch.zeros(x.shape[0], self.spec2.out_features, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, y if apply_router_weight_on_input else y * w)
        return out.to(x.dtype)


class TritonExperts(ExpertsKernel):
    """CUDA (2/3/4/8 bits): the project's Triton WNA16 kernel (``vllm_plugin.kernels.triton_wna16``) in its
    grouped form -- ONE launch for gate+up of every expert (two when some expert's gate and up act orders
    differ) and one for down, on the (token, slot) pairs sorted by expert, with each expert's act order
    gathered in the kernel's activation load.  No host sync (the tile map is computed on the device), so
    the layer can be captured in a CUDA graph.  The codes stay packed at their bit width on the GPU.
    Tested under the Triton interpreter on CPU (``TRITON_INTERPRET=1``), like the dense kernel."""

    name = "triton"

    @staticmethod
    def _module():
        try:
            from .kernels import triton_wna16

            return triton_wna16 if triton_wna16.is_available() else None
        except Exception:  # noqa: BLE001 - a broken Triton install means "not available"
            return None

    @classmethod
    def unsupported_reason(cls, spec13, spec2, activation) -> str | None:
        if activation not in _GATES:
            return f"activation {activation!r} (supported: {', '.join(_GATES)})"
        mod = cls._module()
        if mod is None:
            return "Triton is not available"
        if spec13.device.type != "cuda" and not (mod._interpret_env() and os.environ.get(ENV_MOE_KERNEL) == "triton"):
            return "CUDA only (on CPU: TRITON_INTERPRET=1 with RCSR_MOE_KERNEL=triton, for tests)"
        if not supported_group_size(spec13.group_size) or spec13.bits not in (2, 3, 4, 8):
            return f"{spec13.bits}-bit, group {spec13.group_size}"
        if spec13.in_features % 32 or spec2.in_features % 32:
            return "hidden and intermediate sizes must be multiples of 32"
        return None

    def prepare(self, w13, w2) -> None:
        mod = self.mod = self._module()
        spec, inter = self.spec13, self.spec13.shard_sizes[0]

        def prep(w: QuantWeights, rows: slice | None, shard: int | None):
            q, s_, z = w.qweight, w.scales, w.zeros
            if rows is not None:
                q, s_, z = q[rows], s_[rows], None if z is None else z[rows]
            g = None if w.group_index is None else w.group_index[0 if shard is None else shard]
            return mod.prepare(q.contiguous(), s_.contiguous(), None if spec.sym else z.contiguous(), g,
                               spec.bits, spec.group_size, spec.sym)

        same = all(w.group_index is None or bool((w.group_index[0] == w.group_index[1]).all()) for w in w13)
        if same:
            self.w13 = [mod.stack([prep(w, None, None) for w in w13])]
        else:  # some expert's gate and up have their own column orders: a stack (and a launch) each
            self.w13 = [mod.stack([prep(w, slice(0, inter), 0) for w in w13]),
                        mod.stack([prep(w, slice(inter, 2 * inter), 1) for w in w13])]
        self.w2 = mod.stack([prep(w, None, None) for w in w2])

    def nbytes(self) -> int:
        return sum(gw.nbytes() for gw in self.w13) + self.w2.nbytes()

    def apply(self, x, topk_weights, topk_ids, *, activation, apply_router_weight_on_input=False):
        gated = _GATES[activation]
        inter, n_exp = self.spec13.shard_sizes[0], self.num_experts
        flat_ids = topk_ids.reshape(-1).long()
        order = torch.argsort(flat_ids, stable=True)          # (token, slot) pairs sorted by expert
        # counts by scatter (bincount would size its output on the host); id E = another rank's expert
        counts = torch.zeros(n_exp + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids.clamp(max=n_exp), torch.ones_like(flat_ids))
        offsets = torch.zeros(n_exp + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(counts[:n_exp], 0, out=offsets[1:])
        sorted_ids = flat_ids[order]
        valid = (sorted_ids < n_exp).unsqueeze(1)            # rows past offsets[E] come back zero
        eids = sorted_ids.clamp(max=n_exp - 1)
        tok = order // topk_ids.shape[1]
        w = topk_weights.reshape(-1)[order].to(torch.float32).unsqueeze(1)
        xs = x.index_select(0, tok)
        if apply_router_weight_on_input:
            xs = (xs.float() * w).to(x.dtype)
        parts = [self.mod.grouped_matmul(xs, gw, offsets) for gw in self.w13]
        h = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if self.b13 is not None:
            h = (h.float() + self.b13.index_select(0, eids)).to(h.dtype)
        h = gated(h[:, :inter], h[:, inter:]).contiguous()
        y = self.mod.grouped_matmul(h, self.w2, offsets).float()
        if self.b2 is not None:
            y = y + self.b2.index_select(0, eids)
        y = torch.where(valid, y if apply_router_weight_on_input else y * w, 0.0)
        out = torch.zeros(x.shape[0], self.spec2.out_features, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, y)
        return out.to(x.dtype)


class MarlinExperts(ExpertsKernel):
    """CUDA, 4/8-bit static groups: vLLM's own Marlin-MoE kernel (``fused_marlin_moe``), fed through vLLM's own
    weight post-processing for it (``convert_to_wna16_moe_kernel_format`` with the MARLIN backend: the
    ``gptq_marlin_moe_repack`` of the codes, the scale and zero-point permutations, the tile padding of the
    intermediate size).  The canonical tensors are handed over in the compressed-tensors ``pack-quantized``
    layout vLLM's compressed-tensors MoE path gives it (:meth:`canonical`): codes packed along the input,
    least significant first, ``[E, N, K*bits/32]``; scales ``[E, N, G]`` in the activation dtype; asymmetric
    zero points packed along the output ``[E, N*bits/32, G]``.  Symmetric grids use the types' bias
    (``uint4b8`` / ``uint8b128``: our constant zero point ``2**(bits-1)``); asymmetric 4-bit uses ``uint4`` with
    zero points (Marlin has no 8-bit type with zero points).  Marlin-MoE takes static groups only (no
    per-expert act order) and gated ``silu`` / ``gelu`` experts without biases here.

    Opt-in (``RCSR_MOE_KERNEL=marlin``) until it has run on a GPU: no GPU has been available to this project,
    so only the layout handed to vLLM (checked against vLLM's and compressed-tensors' own dequantizers) and the
    call into ``fused_marlin_moe`` (checked with the CUDA ops replaced by a reference) are tested."""

    name = "marlin"
    supports_bias = False
    _ACTIVATIONS = ("silu", "gelu")

    @staticmethod
    def _ops_reason() -> str | None:
        try:
            from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe  # noqa: F401
            from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import (  # noqa: F401
                WNA16MoEBackend,
                convert_to_wna16_moe_kernel_format,
            )
        except Exception as e:  # noqa: BLE001 - a vLLM without this API cannot run the kernel
            return f"vLLM's Marlin-MoE API is not importable ({type(e).__name__})"
        return None

    @classmethod
    def unsupported_reason(cls, spec13, spec2, activation) -> str | None:
        if activation not in cls._ACTIVATIONS:
            return f"activation {activation!r} (supported: {', '.join(cls._ACTIVATIONS)})"
        if spec13.bits not in (4, 8):
            return f"{spec13.bits}-bit codes (Marlin-MoE takes 4 and 8 bits)"
        if spec13.bits == 8 and not spec13.sym:
            return "asymmetric 8-bit (Marlin-MoE has no 8-bit type with zero points)"
        if spec13.dynamic:
            return "dynamic act order (Marlin-MoE takes static groups only)"
        if spec13.act_dtype not in (torch.float16, torch.bfloat16):
            return f"activation dtype {spec13.act_dtype} (Marlin takes fp16/bf16)"
        if spec13.group_size not in STOCK_GROUP_SIZES:
            return f"group {spec13.group_size}"
        hidden, inter = spec13.in_features, spec2.in_features
        if hidden % 128 or (spec13.group_size > 0 and inter % spec13.group_size):
            return f"hidden size {hidden} (needs a multiple of 128) or intermediate size {inter}"
        if spec13.device.type != "cuda":
            return "CUDA only"
        return cls._ops_reason()

    def canonical(self, w13, w2) -> dict[str, torch.Tensor | None]:
        """The experts in compressed-tensors' N-first layout (the input of vLLM's Marlin-MoE processing)."""
        bits, dt = self.spec13.bits, self.spec13.act_dtype
        out = {}
        for stem, ws, spec in (("w13", w13, self.spec13), ("w2", w2, self.spec2)):
            out[f"{stem}_qweight"] = torch.stack([pack_lsb_words(unpack(w, spec), bits, dim=1) for w in ws])
            out[f"{stem}_scales"] = torch.stack([w.scales for w in ws]).to(dt).contiguous()
            out[f"{stem}_qzeros"] = (None if spec.sym else
                                     torch.stack([pack_lsb_words(w.zeros, bits, dim=0) for w in ws]))
        return out

    def quant_args(self):
        from compressed_tensors.quantization import QuantizationArgs

        gs = self.spec13.group_size
        return QuantizationArgs(num_bits=self.spec13.bits, type="int", symmetric=self.spec13.sym,
                                strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs)

    def prepare(self, w13, w2) -> None:
        import types

        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import (
            WNA16MoEBackend,
            convert_to_wna16_moe_kernel_format,
        )

        from .kernels.vllm_mp import weight_type

        c = self.canonical(w13, w2)
        inter = self.spec13.shard_sizes[0]
        layer = types.SimpleNamespace(intermediate_size_per_partition=inter,
                                      num_groups_w13=self.spec13.n_groups, num_groups_w2=self.spec2.n_groups)
        (self.w13, self.w2, self.s13, self.s2, self.z13, self.z2, *_rest) = convert_to_wna16_moe_kernel_format(
            WNA16MoEBackend.MARLIN, layer, self.quant_args(), None, c["w13_qweight"], c["w2_qweight"],
            c["w13_scales"], c["w2_scales"], c["w13_qzeros"], c["w2_qzeros"])
        self.quant_type_id = weight_type(self.spec13.bits, self.spec13.sym).id

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2, self.s13, self.s2, self.z13, self.z2)
                   if t is not None)

    def apply(self, x, topk_weights, topk_ids, *, activation, apply_router_weight_on_input=False):
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe

        other = topk_ids >= self.num_experts   # another rank's expert (expert parallelism): weight 0 on expert 0
        topk_weights = topk_weights.float().masked_fill(other, 0)
        topk_ids = topk_ids.masked_fill(other, 0)
        return fused_marlin_moe(x.contiguous(), self.w13, self.w2, None, None, self.s13, self.s2, topk_weights,
                                topk_ids, self.quant_type_id, apply_router_weight_on_input=apply_router_weight_on_input,
                                global_num_experts=self.num_experts, activation=MoEActivation(activation),
                                w1_zeros=self.z13, w2_zeros=self.z2)


def _stack(ws: list[QuantWeights], spec: LayerSpec) -> PackedWeight:
    """Every expert's matrix in one native stack (static groups)."""
    codes = torch.stack([unpack(w, spec) for w in ws])
    zeros = None if spec.sym else torch.stack([w.zeros for w in ws])
    return PackedWeight.from_codes(codes, torch.stack([w.scales for w in ws]), zeros, spec.bits, spec.group_size)


def _stack_permuted(ws: list[QuantWeights], spec: LayerSpec) -> tuple[PackedWeight, torch.Tensor]:
    """Dynamic act order: each expert's codes in its own group-sorted column order (static groups then),
    and the permutations ``[E, K]`` (int32) that :func:`_permute_segments` applies to the activations."""
    perms = [group_permutation(w, spec) for w in ws]
    codes = torch.stack([unpack(w, spec)[:, p] for w, p in zip(ws, perms, strict=True)])
    zeros = None if spec.sym else torch.stack([w.zeros for w in ws])
    pw = PackedWeight.from_codes(codes, torch.stack([w.scales for w in ws]), zeros, spec.bits, spec.group_size)
    return pw, torch.stack(perms).to(torch.int32)


def _permute_segments(x: torch.Tensor, offsets: torch.Tensor, perms: torch.Tensor | None) -> torch.Tensor:
    """Rows ``offsets[e]:offsets[e+1]`` of ``x`` (sorted by expert) with their columns in expert ``e``'s order
    ``perms[e]``; ``x`` itself when there is no permutation."""
    if perms is None:
        return x
    out = torch.empty_like(x)
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            torch.index_select(x[a:b], 1, perms[e], out=out[a:b])
    return out


MOE_KERNELS: dict[str, type[ExpertsKernel]] = {
    k.name: k for k in (NativeExperts, VllmCpuExperts, TritonExperts, MarlinExperts, DequantExperts)}
#: first that can run the layer wins (CPU: native_cpu, vllm_cpu; CUDA: triton); ``RCSR_MOE_KERNEL`` forces one
#: (``marlin`` is opt-in until it has run on a GPU)
DEFAULT_MOE_ORDER = ("native_cpu", "vllm_cpu", "triton", "dequant")


def select_experts_kernel(spec13: LayerSpec, spec2: LayerSpec, num_experts: int, activation: str,
                          prefix: str = "", has_bias: bool = False) -> ExpertsKernel:
    """The kernel for one layer of experts (unprepared); ``RCSR_MOE_KERNEL`` forces one."""
    forced = os.environ.get(ENV_MOE_KERNEL, "").strip()
    names = (forced,) if forced else DEFAULT_MOE_ORDER
    reasons = []
    for name in names:
        cls = MOE_KERNELS.get(name)
        if cls is None:
            raise RcsrPluginError(f"{ENV_MOE_KERNEL}={forced!r} is not an experts kernel "
                                  f"(choose one of {', '.join(MOE_KERNELS)})")
        reason = cls.unsupported_reason(spec13, spec2, activation)
        if reason is None and has_bias and not cls.supports_bias:
            reason = "experts with biases"
        if reason is None:
            logger.info("rcsr: experts %s -> kernel %s (%d experts, %d-bit, group %d, %s, act_order %s, %s)",
                        prefix, name, num_experts, spec13.bits, spec13.group_size,
                        "sym" if spec13.sym else "asym", spec13.act_order,
                        str(spec13.act_dtype).removeprefix("torch."))
            return cls(spec13, spec2, num_experts)
        reasons.append(f"{name}: {reason}")
    raise RcsrPluginError(f"no experts kernel can run {prefix} ({'; '.join(reasons)})")


# --------------------------------------------------------------------------------------------------
# the vLLM method
# --------------------------------------------------------------------------------------------------
class RcsrMoEMethod(FusedMoEMethodBase):
    """Quantized routed experts (all experts of the layer listed in ``quantized_modules``)."""

    def __init__(self, config, moe, hf_prefix: str):
        super().__init__(moe)
        self.config = config
        self.hf_prefix = hf_prefix

    # --- creation ---------------------------------------------------------------------------------
    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        cfg = self.config
        bits, gs = cfg.bits, cfg.group_size
        H, inter = int(hidden_size), int(intermediate_size_per_partition)
        tp = int(self.moe.tp_size or 1)
        where = self.hf_prefix
        for what, n in (("hidden size", H), ("intermediate size per rank", inter)):
            if n % 32 or (gs != -1 and n % gs):
                raise RcsrPluginError(f"{where}: {what} {n} must be a multiple of 32 and of group_size {gs}")
        if cfg.act_order == "dynamic" and tp > 1:
            raise RcsrPluginError(f"{where}: dynamic act order cannot be split for tensor parallelism "
                                  f"(down_proj is row-parallel); serve with TP 1")
        E = int(num_experts)
        g13 = 1 if gs == -1 else H // gs
        g2 = 1 if gs == -1 else inter // gs
        weight_loader = extra_weight_attrs.pop("weight_loader")
        layer.rcsr_loaded = set()
        layer.rcsr_dims = (E, H, inter, tp)
        layer.rcsr_params_dtype = params_dtype
        shapes = {"w13_qweight": (E, 2 * inter, H * bits // 32), "w2_qweight": (E, H, inter * bits // 32),
                  "w13_scales": (E, 2 * inter, g13), "w2_scales": (E, H, g2)}
        if not cfg.sym:
            shapes.update({"w13_zeros": (E, 2 * inter, g13), "w2_zeros": (E, H, g2)})
        if cfg.act_order == "dynamic":
            shapes.update({"w13_group_index": (E, 2, H), "w2_group_index": (E, 1, inter)})
        for name, shape in shapes.items():
            kind = name.split("_", 1)[1]
            p = torch.nn.Parameter(torch.zeros(shape, dtype=_DTYPES[kind]), requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, {"quant_method": "group", "is_transposed": False,
                                 "weight_loader": self._checked_loader(layer, kind, weight_loader)})
        if getattr(self.moe, "has_bias", False):   # full precision, loaded by the model's own loader
            for name, shape in (("w13_bias", (E, 2 * inter)), ("w2_bias", (E, H))):
                p = torch.nn.Parameter(torch.zeros(shape, dtype=params_dtype), requires_grad=False)
                layer.register_parameter(name, p)
                set_weight_attrs(p, {"weight_loader": weight_loader})

    def expected_shape(self, layer, kind: str, shard_id: str) -> tuple[int, ...]:
        """Full (pre-TP) on-disk shape of one expert's ``<proj>.<kind>``."""
        cfg = self.config
        _, H, inter, tp = layer.rcsr_dims
        I_full = inter * tp
        in_f, out_f = (I_full, H) if shard_id == "w2" else (H, I_full)
        return tensor_table(QuantSpec(cfg.bits, cfg.group_size, False), out_f, in_f, True)[kind][1]

    def _checked_loader(self, layer, kind: str, inner):
        method = self

        def loader(param, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int,
                   return_success: bool = False):
            if shard_id not in _SHARD_PROJ:
                raise RcsrPluginError(f"{method.hf_prefix}: unexpected expert shard id {shard_id!r}")
            what = f"{method.hf_prefix}.{expert_id}.{_SHARD_PROJ[shard_id]}.{kind}"
            want = method.expected_shape(layer, kind, shard_id)
            if loaded_weight.dtype != _DTYPES[kind] or tuple(loaded_weight.shape) != want:
                raise RcsrPluginError(
                    f"{what}: expected {str(_DTYPES[kind]).removeprefix('torch.')} {list(want)} in the checkpoint, "
                    f"got {str(loaded_weight.dtype).removeprefix('torch.')} {list(loaded_weight.shape)}")
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            ok = True
            if local == -1:
                ok = False
            elif kind == "group_index":
                row = 1 if shard_id == "w3" else 0
                param.data[local, row].copy_(loaded_weight)
            elif shard_id == "w2" and kind in ("scales", "zeros") and method.config.group_size == -1:
                param.data[local].copy_(loaded_weight)   # per channel: every rank keeps the one group
            else:
                ok = inner(param, loaded_weight, weight_name, shard_id, expert_id, return_success=True)
                ok = True if ok is None else bool(ok)
            if ok:
                layer.rcsr_loaded.add((local, shard_id, kind))
            return ok if return_success else None

        return loader

    # --- after loading ----------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        cfg = self.config
        E, H, inter, _ = layer.rcsr_dims
        # expert parallelism: this rank holds E local experts; global_ids[local] is each one's id in the model
        emap = layer.expert_map
        global_ids = list(range(E)) if emap is None else (emap >= 0).nonzero().flatten().tolist()
        if len(global_ids) != E:
            raise RcsrPluginError(f"{self.hf_prefix}: the expert map places {len(global_ids)} experts on this rank, "
                                  f"the layer was built for {E}")
        kinds = [k for k in ("qweight", "scales", "zeros", "group_index") if hasattr(layer, f"w13_{k}")]
        from .linear import _load_format

        if _load_format() != "dummy":
            missing = [f"{self.hf_prefix}.{global_ids[e]}.{_SHARD_PROJ[s]}.{k}" for e in range(E)
                       for s in ("w1", "w3", "w2") for k in kinds if (e, s, k) not in layer.rcsr_loaded]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise RcsrPluginError(f"{missing[0]} is missing from the checkpoint{more}; the experts are listed in "
                                      "quantization_config.quantized_modules")
            for name in ("w13_scales", "w2_scales"):
                if not bool(torch.isfinite(getattr(layer, name).data).all()):
                    raise RcsrPluginError(f"{self.hf_prefix}: {name.split('_')[0]} scales have non-finite values")
            if not cfg.sym:
                for name in ("w13_zeros", "w2_zeros"):
                    z = getattr(layer, name).data
                    if z.numel() and int(z.max()) > (1 << cfg.bits) - 1:
                        raise RcsrPluginError(f"{self.hf_prefix}: zeros must lie in [0, {(1 << cfg.bits) - 1}]")
        dt = layer.rcsr_params_dtype
        dev = layer.w13_qweight.device
        # For experts, ``shared_group_index`` says that every shard of every expert permutes to static groups
        # (each with its own permutation): what the native grouped kernel needs for dynamic act order.
        spec13 = LayerSpec(cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, H, 2 * inter, dt, dev,
                           shard_sizes=(inter, inter), prefix=self.hf_prefix + ".w13")
        spec2 = LayerSpec(cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, inter, H, dt, dev,
                          prefix=self.hf_prefix + ".w2")
        if cfg.act_order == "dynamic":
            one13 = dataclasses.replace(spec13, out_features=inter, shard_sizes=())
            ok13 = all(can_permute(g.unsqueeze(0), one13) for g in layer.w13_group_index.data.reshape(-1, H))
            ok2 = all(can_permute(g, spec2) for g in layer.w2_group_index.data)
            spec13 = dataclasses.replace(spec13, shared_group_index=ok13)
            spec2 = dataclasses.replace(spec2, shared_group_index=ok2)
        activation = getattr(layer.activation, "value", str(layer.activation))
        has_bias = hasattr(layer, "w13_bias")
        kernel = select_experts_kernel(spec13, spec2, E, activation, self.hf_prefix, has_bias)
        if has_bias:
            b13 = layer.w13_bias.data
            if activation == "swigluoai":  # vLLM's swigluoai convention: gate/up interleaved in w13
                b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], 1)
            kernel.set_biases(b13, layer.w2_bias.data)

        def qw(stem: str, e: int) -> QuantWeights:
            g = getattr(layer, f"{stem}_group_index", None)
            z = getattr(layer, f"{stem}_zeros", None)
            return QuantWeights(getattr(layer, f"{stem}_qweight").data[e], getattr(layer, f"{stem}_scales").data[e],
                                None if z is None else z.data[e], None if g is None else g.data[e])

        kernel.prepare([qw("w13", e) for e in range(E)], [qw("w2", e) for e in range(E)])
        layer.rcsr_experts = kernel
        layer.rcsr_activation = activation
        for stem in ("w13", "w2"):
            for k in kinds:
                del layer._parameters[f"{stem}_{k}"]
        del layer.rcsr_loaded

    # --- forward ----------------------------------------------------------------------------------
    def get_fused_moe_quant_config(self, layer):
        return None  # the experts run in this plugin's own kernels, not in a vLLM modular kernel

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        """``topk_ids`` are the model's (global) expert ids.  Under expert parallelism vLLM's ``expert_map``
        turns them into this rank's local ids, ``-1`` for experts held elsewhere: those (token, slot) pairs
        get the id ``E`` (one past the last local expert), which every kernel skips, and this rank returns
        its experts' share of the sum (vLLM all-reduces the ranks' shares)."""
        emap = layer.expert_map
        if emap is not None:
            local = emap.index_select(0, topk_ids.reshape(-1).long()).reshape(topk_ids.shape)
            topk_ids = torch.where(local >= 0, local, layer.rcsr_experts.num_experts).to(topk_ids.dtype)
        return layer.rcsr_experts.apply(x, topk_weights, topk_ids, activation=layer.rcsr_activation,
                                        apply_router_weight_on_input=bool(layer.apply_router_weight_on_input))
