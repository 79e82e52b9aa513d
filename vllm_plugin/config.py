"""``RcsrConfig``: vLLM's view of an rcsr checkpoint's ``quantization_config`` (``rcsr_deploy.format.QuantConfig``)."""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from rcsr_deploy.errors import RcsrError
from rcsr_deploy.format import QUANT_METHOD, QuantConfig

from .errors import RcsrPluginError

_QKV = ("q", "k", "v")
#: last name component of input-embedding modules across HF architectures
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


#: ``<experts module>.<e>.<projection>``: a routed expert's projection (format_version 3)
_EXPERT_PROJ = re.compile(r"^(.*\.experts)(\.\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3))$")


def parse_quant_config(config: dict[str, Any]) -> QuantConfig:
    """The validated ``quantization_config`` (RcsrPluginError naming the bad field)."""
    try:
        return QuantConfig.from_dict(config)
    except RcsrError as e:
        raise RcsrPluginError(str(e)) from None


class RcsrConfig(QuantizationConfig):
    """Weight-only integer quantization with group-wise fp16 scales (rcsr-deploy checkpoints)."""

    def __init__(self, bits: int, group_size: int, sym: bool, act_order: str,
                 quantized_modules: list[str], module_grids: dict[str, dict[str, int]] | None = None):
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.act_order = act_order
        self.quantized_modules = list(quantized_modules)
        self._quantized = set(self.quantized_modules)
        self.module_grids = dict(module_grids or {})

    def __repr__(self) -> str:
        return (f"RcsrConfig(bits={self.bits}, group_size={self.group_size}, sym={self.sym}, "
                f"act_order={self.act_order!r}, {len(self.quantized_modules)} quantized modules)")

    # --- QuantizationConfig interface -----------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # CUDA only (Triton kernel); vLLM does not check it on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RcsrConfig":
        qc = parse_quant_config(config)
        return cls(qc.bits, qc.group_size, qc.sym, qc.act_order, qc.quantized_modules, qc.module_grids)

    def for_modules(self, names: list[str]) -> "RcsrConfig":
        """This config with the grid of the HF modules ``names`` (one vLLM layer; mixed precision gives
        each its own ``bits`` / ``group_size``).  Modules fused into one layer must share a grid."""
        grids = {(g.get("bits", self.bits), g.get("group_size", self.group_size))
                 for g in (self.module_grids.get(n, {}) for n in names)}
        if len(grids) > 1:
            raise RcsrPluginError(f"{', '.join(names)} are one fused vLLM layer but have different grids "
                                  f"{sorted(grids)} in quantization_config.module_grids; quantize them alike")
        (bits, group_size), = grids
        if (bits, group_size) == (self.bits, self.group_size):
            return self
        view = copy.copy(self)
        view.bits, view.group_size = bits, group_size
        return view

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Follow the model's HF -> vLLM module renames (fused names are handled per layer).

        A routed expert's projection ``<experts>.<e>.<proj>`` is our name, not a tensor of the model: only its
        ``<experts>`` module name is mapped (GPT-OSS's mapper renames the *tensor* suffix ``.down_proj`` to
        ``.w2_weight``, which must not turn ``experts.3.down_proj`` into ``experts.3.w2_weight``)."""
        def one(name: str) -> str | None:
            m = _EXPERT_PROJ.match(name)
            if m is None:
                out = hf_to_vllm_mapper.apply_list([name])
                return out[0] if out else None
            head = hf_to_vllm_mapper.apply_list([m.group(1)])
            return f"{head[0]}{m.group(2)}" if head else None

        self.quantized_modules = [n for n in map(one, self.quantized_modules) if n is not None]
        self._quantized = set(self.quantized_modules)
        if self.module_grids:
            self.module_grids = {k2: v for k, v in self.module_grids.items() if (k2 := one(k)) is not None}

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Drop nothing: our act-order tensor is ``group_index`` and every tensor is used (the base
        class drops ``.g_idx``; a stray one in an rcsr checkpoint should fail loudly instead)."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def input_table(self) -> str | None:
        """The quantized input-embedding table (a tied head's), if the checkpoint has one."""
        return next((m for m in self.quantized_modules if m.rsplit(".", 1)[-1] in _EMBEDDING_NAMES), None)

    def hf_names(self, prefix: str) -> list[str]:
        """HF (unfused) module names behind a vLLM layer prefix, in shard order."""
        parent, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        if not parts or prefix in self._quantized:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        if isinstance(layer, VocabParallelEmbedding):
            from .embedding import RcsrEmbeddingMethod, RcsrTiedHeadMethod

            if not prefix and not isinstance(layer, ParallelLMHead):
                # some vLLM models (Llama among them) build embed_tokens without a prefix
                prefix = self.input_table() or ""
            if prefix in self._quantized:  # a quantized head, or the table a tied head shares
                return RcsrEmbeddingMethod(self.for_modules([prefix]), prefix)
            if isinstance(layer, ParallelLMHead):
                return RcsrTiedHeadMethod()  # unquantized unless tied to a quantized embedding
            return None  # unquantized embedding
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

        if isinstance(layer, RoutedExperts):  # MoE experts (format_version 3): vllm_plugin.moe
            from .moe import moe_quant_method

            return moe_quant_method(self, layer, prefix)
        if not isinstance(layer, LinearBase):
            return None  # attention: unquantized
        names = self.hf_names(prefix)
        quantized = [n in self._quantized for n in names]
        if all(quantized):
            from .linear import RcsrLinearMethod

            return RcsrLinearMethod(self.for_modules(names), prefix, names)
        if not any(quantized):
            return UnquantizedLinearMethod()
        q = [n for n, f in zip(names, quantized) if f]
        u = [n for n, f in zip(names, quantized) if not f]
        raise RcsrPluginError(
            f"{prefix}: vLLM runs {', '.join(names)} as one fused layer, but quantized_modules lists only "
            f"{', '.join(q)} (not {', '.join(u)}); quantize all of them or none")

    @staticmethod
    def shard_index(shard_id) -> int | None:
        """Index into :meth:`hf_names` of a vLLM loader shard id (``'q'``/``'k'``/``'v'`` or int)."""
        if shard_id is None:
            return None
        if isinstance(shard_id, str):
            return _QKV.index(shard_id)
        if isinstance(shard_id, tuple):
            return shard_id[0] if len(shard_id) == 1 else None
        return int(shard_id)
