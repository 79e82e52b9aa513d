"""Model adapter: where the quantizer finds a model's decoder blocks, their matmul weights and the head.

Every architecture-specific question the calibration loop asks goes through here, so a new model family
(or a new kind of weight, e.g. Mixture-of-Experts experts) is taught to the quantizer in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import moe_format
from ..errors import RcsrError
from ..format import QuantSpec


def find_decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The ModuleList of decoder blocks and its dotted name."""
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None and hasattr(model.config, "get_text_config"):
        n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len(mod) > 0:
            if best is None or name.count(".") < best[1].count("."):
                best = (mod, name)
    if best is None:
        raise RcsrError(f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of num_hidden_layers blocks)")
    return best


#: last name components of linears that route tokens (MoE routers, shared-expert gates): they choose
#: which weights run and stay in full precision, deliberately (vLLM runs them unquantized too)
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_router(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` matmul weights, in module order (routers excluded)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) and not is_router(name)}


@dataclass
class ExpertsModule:
    """Fused Mixture-of-Experts weights as transformers 5 stores them, called as
    ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``: ``gate_up_proj [E, 2I, H]`` (gate rows
    first) and ``down_proj [E, H, I]`` (Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3), or any layout
    ``moe_format.expert_layout`` reads (GPT-OSS: transposed, gate/up interleaved, biases).

    Each expert ``e`` is quantized as three matrices named like the hub's per-expert linears
    (``<name>.<e>.gate_proj`` ``[I, H]``, ``.up_proj`` ``[I, H]``, ``.down_proj`` ``[H, I]``)."""

    name: str
    module: nn.Module
    layout: moe_format.ExpertLayout

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def intermediate(self) -> int:
        return self.layout.intermediate

    def matrix_names(self, e: int) -> dict[str, str]:
        return {p: f"{self.name}.{e}.{p}" for p in moe_format.PROJ_NAMES}

    def weight(self, e: int, part: str) -> torch.Tensor:
        """A view of expert ``e``'s ``gate_proj`` / ``up_proj`` / ``down_proj`` matrix ``[out, in]``."""
        slot = self.layout.slot(self.name, e, part)
        return slot.view(getattr(self.module, slot.param.rpartition(".")[2]).data)

    def down_input(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s ``down_proj`` input for its tokens ``x [T, H]``, with the module's current
        (FP or just-quantized) gate/up weights and biases and its own gating (``act(gate) * up``, or
        GPT-OSS's clamped SwiGLU) -- what the module's forward computes."""
        m, lay = self.module, self.layout
        if not lay.transposed and not lay.interleaved and not lay.biases and callable(getattr(m, "act_fn", None)):
            return m.act_fn(x @ self.weight(e, "gate_proj").t()) * (x @ self.weight(e, "up_proj").t())
        w = m.gate_up_proj.data[e]
        gu = x @ w if lay.transposed else x @ w.t()
        if "gate_up_proj_bias" in lay.biases:
            gu = gu + m.gate_up_proj_bias.data[e]
        return m._apply_gate(gu)


def experts_modules(block: nn.Module) -> dict[str, ExpertsModule]:
    """The block's fused expert modules of a layout ``moe_format`` reads (see :class:`ExpertsModule`).
    Others (e.g. experts without a gate) are left to the coverage guard, which names them."""
    out = {}
    for name, m in moe_format.experts_modules(block).items():
        try:
            layout = moe_format.expert_layout(name, m)
        except RcsrError:
            continue
        if callable(getattr(m, "act_fn", None)) or callable(getattr(m, "_apply_gate", None)):
            out[name] = ExpertsModule(name, m, layout)
    return out


@dataclass
class OutputHead:
    """The output projection (``lm_head``) and what its calibration needs.

    ``store_name`` is the module whose weight the checkpoint stores quantized: the head itself, or
    — when the head is tied to the input embedding — the embedding (one table serves both, so both
    the lookup and the logits then use the quantized weights).  ``norm`` is the final normalisation
    that turns the last block's output into the head's input.
    """

    name: str
    store_name: str
    module: nn.Linear
    norm: nn.Module
    tied: bool


def find_output_head(model: nn.Module) -> OutputHead:
    """The model's output head, its final norm and whether it is tied (``--lm-head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise RcsrError(f"--lm-head: {type(model).__name__} has no nn.Linear output head")
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    tied = emb is not None and getattr(emb, "weight", None) is not None and emb.weight is head.weight
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    if not isinstance(norm, nn.Module):
        raise RcsrError(f"--lm-head: cannot find the final norm of {type(model).__name__} (expected decoder.norm)")
    name = names[id(head)]
    return OutputHead(name=name, store_name=names[id(emb)] if tied else name, module=head, norm=norm, tied=tied)


def check_layers_fit(model, spec: QuantSpec) -> None:
    """Fail early (before any calibration) when a decoder matmul weight cannot take the grid."""
    layers, prefix = find_decoder_layers(model)
    for i, block in enumerate(layers):
        for n, m in linear_modules(block).items():
            spec.validate(m.in_features, f"{prefix}.{i}.{n}")
        for n, ex in experts_modules(block).items():
            names = ex.matrix_names(0)
            spec.validate(ex.weight(0, "gate_proj").shape[1], f"{prefix}.{i}.{names['gate_proj']}")
            spec.validate(ex.weight(0, "down_proj").shape[1], f"{prefix}.{i}.{names['down_proj']}")


def check_finite(model) -> None:
    for pname, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise RcsrError(f"model weights contain NaN/Inf: {pname}")


def weight_view(block: nn.Module, name: str) -> torch.Tensor:
    """The weight tensor (or fused-expert view) behind a quantized matrix name of the block."""
    mods = dict(block.named_modules())
    if name in mods and isinstance(mods[name], nn.Linear):
        return mods[name].weight.data
    parent, e, part = name.rsplit(".", 2)
    ex = experts_modules(block).get(parent)
    if ex is None or not e.isdigit():
        raise RcsrError(f"{name}: not a matmul weight of this block")
    return ex.weight(int(e), part)


def quantization_plan(model, cfg) -> tuple[list[str], dict[str, str]]:
    """(the names the quantizer will produce, parameters deliberately left out with the reason) for the
    coverage guard: every linear (routers excepted) and expert matrix of the selected blocks, the head
    with ``--lm-head``; the blocks ``--blocks`` leaves out are left out by name."""
    layers, prefix = find_decoder_layers(model)
    selected = set(cfg.block_set(len(layers)))
    plan, left_out = [], {}
    for i, block in enumerate(layers):
        names = list(linear_modules(block)) + [n for ex in experts_modules(block).values()
                                               for e in range(ex.num_experts) for n in ex.matrix_names(e).values()]
        if i in selected:
            plan += [f"{prefix}.{i}.{n}" for n in names]
        else:
            left_out.update({f"{prefix}.{i}.{n}": "--blocks" for n in linear_modules(block)})
            left_out.update({f"{prefix}.{i}.{n}.{p}": "--blocks" for n in experts_modules(block)
                             for p in ("gate_up_proj", "down_proj")})
    if cfg.lm_head:
        plan.append(find_output_head(model).store_name)
    return plan, left_out
