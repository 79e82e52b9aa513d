"""Quantized vocabulary tables: the output head (``lm_head``) and a tied input embedding.

``rcsr quantize --lm-head`` stores the output head quantized, in the same canonical tensors as a
linear layer (docs/FORMAT.md): ``<m>.qweight`` int32 ``[vocab, hidden*bits/32]``, ``<m>.scales`` fp16
``[vocab, n_groups]`` (+ ``zeros``, + ``group_index``).  ``<m>`` is ``lm_head`` for an untied head, and
the input embedding (``model.embed_tokens``) when the head is tied to it — one table then serves both
the lookup and the logits, as in the FP model.

* :class:`RcsrEmbeddingMethod` — for a ``VocabParallelEmbedding`` / ``ParallelLMHead`` whose table is
  quantized.  ``apply`` (logits) runs the table through the same kernel dispatch as every linear
  layer (``[tokens, hidden] @ table.T``); ``embedding`` (lookup) gathers the packed rows of the
  requested ids and dequantizes just those rows.  Vocabulary-parallel sharding splits rows, never
  groups, so every tensor-parallel size the model allows works; padded vocabulary rows load as 0.
* :class:`RcsrTiedHeadMethod` — for an unquantized ``ParallelLMHead``: vLLM's own unquantized
  method, except that when ``tie_weights`` ties it to an rcsr-quantized embedding it drops its own
  weight and computes the logits with the embedding's kernel.
"""
from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.utils import set_weight_attrs

from rcsr_deploy.format import STORED_DTYPES, QuantSpec, dequantize, tensor_table
from rcsr_deploy.packing import unpack_codes

from .errors import RcsrPluginError
from .kernels import LayerSpec, QuantWeights, register_live, run, select_kernel



def _shape(t) -> str:
    return "[" + ", ".join(str(int(d)) for d in t) + "]"


def dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_index: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """``[n, in]`` weights of ``n`` gathered rows: ``(q - z[g(i)]) * s[g(i)]`` computed in fp32."""
    spec = QuantSpec(bits, group_size, sym=zeros is None)
    z = zeros if zeros is not None else torch.full(tuple(scales.shape), spec.sym_zero, device=scales.device)
    return dequantize(unpack_codes(qweight, bits, in_features), scales, z, spec, group_index).to(dtype)


class RcsrEmbeddingMethod(QuantizeMethodBase):
    """A quantized vocabulary table (embedding lookup and/or logits)."""

    def __init__(self, config, prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        cfg = self.config
        rows = sum(output_partition_sizes)
        hidden = input_size_per_partition
        if hidden % 32 or (cfg.group_size != -1 and hidden % cfg.group_size):
            raise RcsrPluginError(f"{self.prefix}: hidden size {hidden} does not fit group size {cfg.group_size} "
                                  "and 32-column packing")
        n_groups = 1 if cfg.group_size == -1 else hidden // cfg.group_size
        loader = extra_weight_attrs.pop("weight_loader")
        layer.rcsr_loaded = set()
        layer.rcsr_params_dtype = params_dtype
        layer.rcsr_hidden = hidden

        def add(name: str, data: torch.Tensor, sharded: bool = True) -> None:
            p = Parameter(data, requires_grad=False)
            attrs = {"weight_loader": self._checked_loader(layer, name, loader)}
            if sharded:
                attrs.update(input_dim=1, output_dim=0)
            set_weight_attrs(p, attrs)
            set_weight_attrs(p, extra_weight_attrs)
            layer.register_parameter(name, p)

        add("qweight", torch.zeros(rows, hidden * cfg.bits // 32, dtype=torch.int32))
        add("scales", torch.zeros(rows, n_groups, dtype=torch.float16))
        if not cfg.sym:
            add("zeros", torch.zeros(rows, n_groups, dtype=torch.uint8))
        if cfg.act_order == "dynamic":
            add("group_index", torch.zeros(hidden, dtype=torch.int32), sharded=False)

    def _expected(self, layer, name: str) -> tuple[int, ...]:
        cfg = self.config
        vocab = int(layer.org_vocab_size)
        hidden = layer.rcsr_hidden
        return tensor_table(QuantSpec(cfg.bits, cfg.group_size, False), vocab, hidden, True)[name][1]

    def _checked_loader(self, layer, name: str, inner):
        method = self

        def loader(param, loaded_weight: torch.Tensor, *args, **kwargs):
            what = f"{method.prefix}.{name}"
            want_dtype, want_shape = STORED_DTYPES[name], method._expected(layer, name)
            if loaded_weight.dtype != want_dtype or tuple(loaded_weight.shape) != want_shape:
                raise RcsrPluginError(
                    f"{what}: expected {str(want_dtype).removeprefix('torch.')} {_shape(want_shape)} in the "
                    f"checkpoint, got {str(loaded_weight.dtype).removeprefix('torch.')} {_shape(loaded_weight.shape)}")
            inner(param, loaded_weight, *args, **kwargs)
            layer.rcsr_loaded.add(name)

        return loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cfg = self.config
        from .linear import _load_format

        names = ["qweight", "scales"] + (["zeros"] if not cfg.sym else []) + (
            ["group_index"] if cfg.act_order == "dynamic" else [])
        if _load_format() != "dummy":
            missing = [n for n in names if n not in layer.rcsr_loaded]
            if missing:
                raise RcsrPluginError(f"{self.prefix}.{missing[0]} is missing from the checkpoint; the module is "
                                      "listed in quantization_config.quantized_modules")
            if not bool(torch.isfinite(layer.scales).all()):
                raise RcsrPluginError(f"{self.prefix}.scales has non-finite values")
        del layer.rcsr_loaded
        zeros = layer.zeros.data if not cfg.sym else None
        gidx = layer.group_index.data if cfg.act_order == "dynamic" else None
        rows = layer.qweight.shape[0]
        kernel = select_kernel(LayerSpec(cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, layer.rcsr_hidden, rows,
                                         layer.rcsr_params_dtype, layer.qweight.device, prefix=self.prefix))
        kernel.prepare(QuantWeights(layer.qweight.data, layer.scales.data, zeros,
                                    None if gidx is None else gidx.unsqueeze(0)))
        register_live(kernel)
        layer.rcsr_kernel = kernel
        # The lookup reads the canonical rows (packed, a few bytes per row), the kernel its own layout.

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return run(layer.rcsr_kernel, x, bias)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        ids = input_.reshape(-1)
        zeros = layer.zeros[ids] if not cfg.sym else None
        gidx = layer.group_index if cfg.act_order == "dynamic" else None
        rows = dequantize_rows(layer.qweight[ids], layer.scales[ids], zeros, gidx, cfg.bits, cfg.group_size,
                               layer.rcsr_hidden, layer.rcsr_params_dtype)
        return rows.reshape(*input_.shape, layer.rcsr_hidden)


class RcsrTiedHeadMethod(UnquantizedEmbeddingMethod):
    """An unquantized ``lm_head`` that, once tied to an rcsr-quantized embedding, uses its table."""

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        if not isinstance(getattr(embed_tokens, "quant_method", None), RcsrEmbeddingMethod):
            return super().tie_weights(layer, embed_tokens)
        del layer.weight  # the head owns no table of its own
        layer.rcsr_tied_to = [embed_tokens]  # a list: not registered as a submodule (no double loading)
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "rcsr_tied_to"):
            super().process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tied = getattr(layer, "rcsr_tied_to", None)
        if tied is None:
            return super().apply(layer, x, bias)
        return run(tied[0].rcsr_kernel, x, bias)
