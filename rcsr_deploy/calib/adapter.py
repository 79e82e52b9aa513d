"""Model adapter: where the quantizer finds a model's decoder blocks, their matmul weights and the head.

Every architecture-specific question the calibration loop asks goes through here, so a new model family
(or a new kind of weight, e.g. Mixture-of-Experts experts) is taught to the quantizer in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


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
    """Fail early (before any calibration) when a decoder linear cannot take the grid."""
    layers, prefix = find_decoder_layers(model)
    for i, block in enumerate(layers):
        for n, m in linear_modules(block).items():
            spec.validate(m.in_features, f"{prefix}.{i}.{n}")


def check_finite(model) -> None:
    for pname, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise RcsrError(f"model weights contain NaN/Inf: {pname}")
