"""``RcsrLinearMethod``: creates, loads, validates and runs one quantized vLLM linear layer.

Parameters (per tensor-parallel rank; see :mod:`vllm_plugin.partition`):

* ``qweight``     int32 ``[out, in*bits/32]``  ``ModelWeightParameter`` (input_dim=1, output_dim=0)
* ``scales``      fp16 ``[out, n_groups]``     ``GroupQuantScaleParameter`` (per-channel:
                  ``ChannelQuantScaleParameter [out, 1]``, which a row-parallel rank loads whole)
* ``zeros``       uint8, same shape/class as ``scales``; asymmetric checkpoints only
* ``group_index`` int32 ``[n_shards, in]``    dynamic act order only; one row per fused shard
  (q/k/v or gate/up may have different column orders), see :class:`GroupIndexParameter`

Every parameter's weight loader is wrapped: the checkpoint tensor's dtype and full shape are
checked first (a one-line error naming the HF tensor), and each (tensor, shard) that arrives is
recorded so that ``process_weights_after_loading`` can name any tensor the checkpoint lacks
(vLLM does not check that for quantized models).  Then the kernel chosen by
:func:`vllm_plugin.kernels.select_kernel` repacks the tensors and the canonical ones are freed.
"""
from __future__ import annotations

import dataclasses

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
)

from rcsr_deploy.format import STORED_DTYPES, QuantSpec, tensor_table

from .errors import RcsrPluginError
from .kernels import QuantWeights, register_live, run, select_kernel
from .kernels.base import LayerSpec, can_permute
from .partition import plan_partition



def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class GroupIndexParameter(BasevLLMParameter):
    """``[n_shards, in]`` int32: row ``k`` is the ``group_index`` of fused shard ``k``.

    Column-parallel and fused layers keep every input column, so each shard's tensor is copied
    whole into its row; a row-parallel layer (one shard) takes its rank's slice of the columns."""

    def _row(self, shard_id) -> torch.Tensor:
        if shard_id is None:
            return self.data[0]
        idx = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id) if isinstance(shard_id, str) else int(shard_id)
        return self.data[idx]

    def _copy(self, row: torch.Tensor, loaded: torch.Tensor) -> None:
        assert row.shape == loaded.shape
        row.copy_(loaded)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        self._copy(self.data[0], loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._copy(self._row(kwargs.get("shard_id")), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._copy(self._row(kwargs.get("shard_id")), loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        n = self.data.shape[1]
        self._copy(self.data[0], loaded_weight.narrow(0, self.tp_rank * n, n))


def _load_format() -> str:
    try:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
        return str(getattr(cfg.load_config, "load_format", "")) if cfg is not None else ""
    except Exception:  # pragma: no cover
        return ""


@register_weight_loader_v2_supported_method
class RcsrLinearMethod(LinearMethodBase):
    """Linear method for layers listed in ``quantization_config.quantized_modules``."""

    def __init__(self, config, prefix: str, hf_names: list[str]):
        self.config = config
        self.prefix = prefix
        self.hf_names = list(hf_names)

    # --- creation ---------------------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        cfg = self.config
        weight_loader = extra_weight_attrs.pop("weight_loader")
        tp_size = int(getattr(layer, "tp_size", 1) or 1)
        plan = plan_partition(bits=cfg.bits, group_size=cfg.group_size, act_order=cfg.act_order,
                              input_size=input_size, input_size_per_partition=input_size_per_partition,
                              output_partition_sizes=output_partition_sizes, tp_size=tp_size,
                              prefix=self.prefix)
        if len(output_partition_sizes) != len(self.hf_names) and len(self.hf_names) > 1:
            raise RcsrPluginError(f"{self.prefix}: {len(output_partition_sizes)} output shards but "
                                  f"{len(self.hf_names)} checkpoint modules ({', '.join(self.hf_names)})")
        layer.rcsr_plan = plan
        layer.rcsr_params_dtype = params_dtype
        layer.rcsr_loaded = set()
        layer.rcsr_dummy = _load_format() == "dummy"
        out = plan.out_features
        dynamic = cfg.act_order == "dynamic"
        # dynamic act order keeps every group on every rank (no row-parallel split is allowed)
        n_groups = plan.n_groups

        def wrap(name: str):
            return self._checked_loader(layer, name, weight_loader)

        qweight = ModelWeightParameter(data=torch.empty(out, plan.words, dtype=torch.int32),
                                       input_dim=1, output_dim=0, weight_loader=wrap("qweight"))
        layer.register_parameter("qweight", qweight)

        def scale_like(dtype: torch.dtype, name: str):
            data = torch.empty(out, n_groups, dtype=dtype)
            if cfg.group_size == -1:
                return ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=wrap(name))
            return GroupQuantScaleParameter(data=data, input_dim=1, output_dim=0, weight_loader=wrap(name))

        layer.register_parameter("scales", scale_like(torch.float16, "scales"))
        if not cfg.sym:
            zeros = scale_like(torch.uint8, "zeros")
            zeros.dummy_weight_value = 0
            layer.register_parameter("zeros", zeros)
        if dynamic:
            gidx = GroupIndexParameter(
                data=torch.zeros(len(plan.shard_sizes), plan.in_features, dtype=torch.int32),
                weight_loader=wrap("group_index"))
            gidx.dummy_weight_value = 0
            layer.register_parameter("group_index", gidx)

    # --- loading ----------------------------------------------------------------------------------
    def _hf_name(self, shard_id) -> list[str]:
        idx = self.config.shard_index(shard_id)
        if idx is None or len(self.hf_names) == 1:
            return list(self.hf_names) if idx is None else [self.hf_names[0]]
        return [self.hf_names[idx]]

    def expected_shape(self, layer: torch.nn.Module, name: str, shard_id) -> tuple[int, ...]:
        """Full (pre-tensor-parallel) checkpoint shape of ``<hf module>.<name>`` for a shard."""
        cfg = self.config
        in_full = int(layer.input_size)
        idx = cfg.shard_index(shard_id)
        if idx is None:
            out_full = int(layer.output_size)
        elif hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
            heads = (layer.total_num_heads, layer.total_num_kv_heads, layer.total_num_kv_heads)[idx]
            hsize = (layer.head_size, layer.head_size, getattr(layer, "v_head_size", layer.head_size))[idx]
            out_full = int(heads * hsize)
        elif hasattr(layer, "output_sizes"):
            out_full = int(layer.output_sizes[idx])
        else:
            out_full = int(layer.output_size)
        return tensor_table(QuantSpec(cfg.bits, cfg.group_size, False), out_full, in_full, True)[name][1]

    def _checked_loader(self, layer: torch.nn.Module, name: str, inner):
        method = self

        def loader(param, loaded_weight: torch.Tensor, *args, **kwargs):
            shard_id = args[0] if args else kwargs.get("loaded_shard_id")
            hf = method._hf_name(shard_id)
            what = f"{'/'.join(hf)}.{name}"
            want_dtype = STORED_DTYPES[name]
            want_shape = method.expected_shape(layer, name, shard_id)
            if loaded_weight.dtype != want_dtype or tuple(loaded_weight.shape) != want_shape:
                raise RcsrPluginError(
                    f"{what}: expected {_dtype_name(want_dtype)} {_fmt_shape(want_shape)} in the checkpoint, "
                    f"got {_dtype_name(loaded_weight.dtype)} {_fmt_shape(loaded_weight.shape)}")
            try:
                inner(param, loaded_weight, *args, **kwargs)
            except (AssertionError, RuntimeError, IndexError) as e:
                raise RcsrPluginError(f"{what}: cannot load tensor of shape {_fmt_shape(loaded_weight.shape)} "
                                      f"into {method.prefix}.{name} {_fmt_shape(param.shape)} ({e or 'shape mismatch'})"
                                      ) from e
            for h in hf:
                layer.rcsr_loaded.add((h, name))

        return loader

    # --- after loading ----------------------------------------------------------------------------
    def _expected_tensors(self, layer) -> list[tuple[str, str]]:
        names = ["qweight", "scales"]
        if hasattr(layer, "zeros") and layer.zeros is not None:
            names.append("zeros")
        if hasattr(layer, "group_index") and layer.group_index is not None:
            names.append("group_index")
        return [(h, n) for h in self.hf_names for n in names]

    def _shard_of_row(self, layer, row: int) -> str:
        r = 0
        for h, n in zip(self.hf_names, layer.rcsr_plan.shard_sizes):
            if row < r + n:
                return h
            r += n
        return self.prefix

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cfg = self.config
        plan = layer.rcsr_plan
        if not layer.rcsr_dummy:
            missing = [f"{h}.{n}" for h, n in self._expected_tensors(layer) if (h, n) not in layer.rcsr_loaded]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise RcsrPluginError(f"{missing[0]} is missing from the checkpoint{more}; the module is listed "
                                      "in quantization_config.quantized_modules")
        scales = layer.scales.data
        zeros = layer.zeros.data if not cfg.sym else None
        gidx = layer.group_index.data if cfg.act_order == "dynamic" else None
        if not layer.rcsr_dummy:
            self._validate_values(layer, scales, zeros, gidx)
        spec = LayerSpec(cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, plan.in_features, plan.out_features,
                         layer.rcsr_params_dtype, layer.qweight.device, shard_sizes=plan.shard_sizes,
                         prefix=self.prefix)
        if gidx is not None:
            spec = dataclasses.replace(spec, shared_group_index=can_permute(gidx, spec))
        kernel = select_kernel(spec)
        kernel.prepare(QuantWeights(layer.qweight.data, scales, zeros, gidx))
        register_live(kernel)
        layer.rcsr_kernel = kernel
        # the kernel holds its own layout now: free the canonical tensors
        device = layer.qweight.device
        for name in ("qweight", "scales", "zeros", "group_index"):
            if name in layer._parameters:
                del layer._parameters[name]
        del layer.rcsr_loaded
        # vLLM code that needs a quantized layer's dense weight (MLA attention absorbs kv_b_proj after
        # loading: quant_utils.get_and_maybe_dequant_weights) takes the device from one of weight / qweight /
        # weight_packed and then runs apply(layer, eye): an empty placeholder tells it the device.
        layer.qweight = torch.empty(0, dtype=torch.int32, device=device)

    def _validate_values(self, layer, scales, zeros, gidx) -> None:
        cfg = self.config
        plan = layer.rcsr_plan
        bad = ~torch.isfinite(scales)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise RcsrPluginError(f"{self._shard_of_row(layer, row)}.scales has non-finite values")
        maxq = (1 << cfg.bits) - 1
        if zeros is not None and zeros.numel() and int(zeros.max()) > maxq:
            row = int((zeros > maxq).nonzero()[0, 0])
            raise RcsrPluginError(f"{self._shard_of_row(layer, row)}.zeros: values must lie in [0, {maxq}] "
                                  f"for {cfg.bits} bits, got {int(zeros.max())}")
        if gidx is not None and gidx.numel():
            n_groups = plan.n_groups
            lo, hi = int(gidx.min()), int(gidx.max())
            if lo < 0 or hi >= n_groups:
                k = int(((gidx < 0) | (gidx >= n_groups)).any(dim=1).nonzero()[0, 0])
                raise RcsrPluginError(f"{self.hf_names[min(k, len(self.hf_names) - 1)]}.group_index: values must "
                                      f"lie in [0, {n_groups}), got [{lo}, {hi}]")

    # --- forward ----------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run(layer.rcsr_kernel, x, bias)
