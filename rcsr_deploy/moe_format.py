"""Mixture-of-Experts tensors in rcsr checkpoints (``format_version`` 3, docs/FORMAT.md section 12).

transformers 5 keeps the routed experts of a sparse-MoE block as two fused 3-D parameters of one
``...Experts`` module (Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V3, ...)::

    <experts>.gate_up_proj  [E, 2*I, H]   rows [0, I) = gate_proj, rows [I, 2I) = up_proj (out x in)
    <experts>.down_proj     [E, H, I]     (out x in)

On disk every expert projection is stored like a dense quantized linear under the hub's per-expert
module name ``<experts>.<e>.gate_proj`` / ``.up_proj`` / ``.down_proj`` (the names vLLM's
``make_expert_params_mapping`` loads: shard ids w1 / w3 / w2).  This module maps the fused parameters
to those names and back; ``rcsr_deploy.checkpoint`` calls it when writing and when fake-quant loading.

The names on disk are the hub's (what ``save_pretrained`` writes and vLLM's model loaders read), which for
some families are not transformers 5's module names: Mixtral stores ``block_sparse_moe.experts.<e>.w1``
/ ``w3`` / ``w2`` where transformers 5 has ``mlp.experts`` (``HubNames``, from transformers' own
checkpoint conversion mapping).  The quantizer works in module names; the checkpoint writer and readers
translate tensor names and ``quantized_modules`` at the boundary.

transformers 5 marks other layouts on the experts module itself (``use_experts_implementation``:
``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``).  GPT-OSS stores them *transposed*,
``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` (in x out), with gate and up *interleaved* (columns
0, 2, 4, ... are gate, 1, 3, 5, ... up) and biases ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias
[E, H]``.  :class:`ExpertSlot` views any of these as the same per-expert ``[out, in]`` matrices, so the
quantizer, the checkpoint and its readers never see the layout; biases stay full precision under their
own names.  Refused (one ``RcsrError`` line): experts without a gate (``has_gate`` False) and shapes that
match no layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .errors import RcsrError

#: per-expert projection names, in vLLM shard order (w1, w3, w2)
PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
SHARD_IDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
FORMAT_VERSION_EXPERTS = 3


@dataclass(frozen=True)
class ExpertSlot:
    """Where one per-expert projection lives inside a fused 3-D parameter."""

    param: str          # full name of the fused parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    expert: int
    rows: tuple[int, int]  # row range [start, stop) of the [out, in] matrix of param[expert]
    step: int = 1          # 2: every other row (GPT-OSS's interleaved gate/up)
    transposed: bool = False  # param[expert] is stored [in, out]

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The ``[out, in]`` slice of the fused tensor ``t`` (a view; strided for transposed layouts)."""
        m = t[self.expert]
        if self.transposed:
            m = m.t()
        return m[self.rows[0]:self.rows[1]:self.step]


@dataclass(frozen=True)
class ExpertLayout:
    """How one fused-experts module stores its ``E`` experts of intermediate size ``I`` and hidden ``H``."""

    num_experts: int
    intermediate: int
    hidden: int
    transposed: bool = False    # [E, H, 2I] / [E, I, H] (in x out) instead of [E, 2I, H] / [E, H, I]
    interleaved: bool = False   # gate/up rows alternate instead of gate block then up block
    biases: tuple[str, ...] = ()  # full-precision bias parameters of the module (gate_up_proj_bias, ...)

    def slot(self, name: str, e: int, part: str) -> ExpertSlot:
        """Where expert ``e``'s ``part`` (gate_proj / up_proj / down_proj) of the module ``name`` lives."""
        if part == "down_proj":
            return ExpertSlot(f"{name}.down_proj", e, (0, self.hidden), 1, self.transposed)
        I, k = self.intermediate, PROJ_NAMES.index(part)
        rows = (k, 2 * I) if self.interleaved else (k * I, (k + 1) * I)
        return ExpertSlot(f"{name}.gate_up_proj", e, rows, 2 if self.interleaved else 1, self.transposed)

    def slots(self, name: str) -> dict[str, ExpertSlot]:
        return {f"{name}.{e}.{p}": self.slot(name, e, p) for e in range(self.num_experts) for p in PROJ_NAMES}


def _is_experts_module(mod: nn.Module) -> bool:
    p = mod._parameters
    return (isinstance(p.get("gate_up_proj"), torch.Tensor) and isinstance(p.get("down_proj"), torch.Tensor)
            and p["gate_up_proj"].dim() == 3 and p["down_proj"].dim() == 3)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` of every fused-experts module (3-D ``gate_up_proj`` + ``down_proj``)."""
    return {n: m for n, m in model.named_modules() if _is_experts_module(m)}


def expert_layout(name: str, mod: nn.Module) -> ExpertLayout:
    """The :class:`ExpertLayout` of a fused-experts module, from the flags transformers 5 sets on it
    (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``; absent = the default layout) and
    checked against the shapes; ``RcsrError`` when they do not fit."""
    gu, dn = mod.gate_up_proj, mod.down_proj
    kind = type(mod).__name__
    if not getattr(mod, "has_gate", True):
        raise RcsrError(f"{name}: fused experts without a gate projection ({kind}) are not supported by the rcsr format")
    transposed = bool(getattr(mod, "is_transposed", False))
    interleaved = not getattr(mod, "is_concatenated", True)
    E = int(gu.shape[0])
    H, two_i = (gu.shape[1], gu.shape[2]) if transposed else (gu.shape[2], gu.shape[1])
    down = (E, two_i // 2, H) if transposed else (E, H, two_i // 2)
    if two_i % 2 or tuple(dn.shape) != down:
        want = "[E, H, 2I] and [E, I, H]" if transposed else "[E, 2I, H] and [E, H, I]"
        raise RcsrError(f"{name}: fused experts have gate_up_proj {list(gu.shape)} and down_proj "
                        f"{list(dn.shape)}; expected {want} ({kind})")
    biases = []
    if getattr(mod, "has_bias", False):
        for b, shape in (("gate_up_proj_bias", (E, two_i)), ("down_proj_bias", (E, H))):
            t = getattr(mod, b, None)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise RcsrError(f"{name}: {kind} says it has biases but {b} is "
                                f"{list(t.shape) if isinstance(t, torch.Tensor) else 'missing'}, expected {list(shape)}")
            biases.append(b)
    return ExpertLayout(E, two_i // 2, int(H), transposed, interleaved, tuple(biases))


def expert_slots(model: nn.Module) -> dict[str, ExpertSlot]:
    """``{per-expert module name: ExpertSlot}`` for every routed expert projection of ``model``.

    Names are ``<experts module>.<e>.gate_proj|up_proj|down_proj``; the order is layer, expert, proj."""
    out: dict[str, ExpertSlot] = {}
    for name, mod in experts_modules(model).items():
        out.update(expert_layout(name, mod).slots(name))
    return out


def expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{per-expert module name: [out, in] weight view}``, e.g. to quantize each expert like a linear."""
    params = dict(model.named_parameters())
    return {n: s.view(params[s.param].detach()) for n, s in expert_slots(model).items()}


def fused_members(slots: dict[str, ExpertSlot]) -> dict[str, list[str]]:
    """``{fused parameter name: its per-expert module names}``."""
    out: dict[str, list[str]] = {}
    for n, s in slots.items():
        out.setdefault(s.param, []).append(n)
    return out


def check_complete(slots: dict[str, ExpertSlot], modules) -> set[str]:
    """Fused parameter names all of whose experts are in ``modules``.  A fused parameter of which only
    some experts are quantized is refused (the format stores it either fused or per expert)."""
    mods = set(modules)
    done = set()
    for param, members in fused_members(slots).items():
        have = [m for m in members if m in mods]
        if have and len(have) != len(members):
            miss = [m for m in members if m not in mods]
            raise RcsrError(f"{param}: {len(have)} of its {len(members)} expert projections are quantized "
                            f"(not {miss[0]}{' ...' if len(miss) > 1 else ''}); quantize all experts of a layer or none")
        if have:
            done.add(param)
    return done


def format_version_for(model: nn.Module, modules, base: int) -> int:
    """``3`` when ``modules`` holds expert projections, else ``base``."""
    return FORMAT_VERSION_EXPERTS if set(modules) & set(expert_slots(model)) else base


def vllm_expert_modules(quantized_modules, experts_prefix: str) -> dict[int, dict[str, str]]:
    """``{expert: {proj: module name}}`` of the listed per-expert modules under ``experts_prefix``; ``proj``
    is ``gate_proj`` / ``up_proj`` / ``down_proj``, also for names on disk in vLLM's shard ids
    (Mixtral's ``w1`` / ``w3`` / ``w2``)."""
    by_shard = {v: k for k, v in SHARD_IDS.items()}
    out: dict[int, dict[str, str]] = {}
    head = experts_prefix + "."
    for m in quantized_modules:
        if not m.startswith(head):
            continue
        e, _, proj = m[len(head):].partition(".")
        proj = by_shard.get(proj, proj)
        if e.isdigit() and proj in PROJ_NAMES:
            out.setdefault(int(e), {})[proj] = m
    return out


# --------------------------------------------------------------------------------------------------
# hub names on disk <-> transformers 5 module names
# --------------------------------------------------------------------------------------------------
_EXPERT_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


class HubNames:
    """Tensor / module names of a model family on disk (the hub's) and in transformers 5 (the model's).

    Built from transformers' checkpoint conversion mapping of the ``model_type``: its plain
    ``WeightRenaming`` transforms (Mixtral: ``.block_sparse_moe.`` -> ``.mlp.``) and the per-expert projection names
    its experts converters merge (Mixtral: ``w1``, ``w3`` -> ``gate_up_proj``; ``w2`` -> ``down_proj``).
    Only families with fused experts are translated; every other name, and every other family, maps to
    itself, so dense checkpoints are unchanged."""

    def __init__(self, renamings=(), proj: tuple[str, str, str] = PROJ_NAMES):
        self._forward = tuple(renamings)                        # hub -> model
        self._reverse = tuple(t.reverse_transform() for t in self._forward)
        self.proj = tuple(proj)                                 # hub names of gate, up, down
        self._to_model = dict(zip(self.proj, PROJ_NAMES))
        self._to_hub = dict(zip(PROJ_NAMES, self.proj))
        self.identity = not self._forward and self.proj == PROJ_NAMES

    @staticmethod
    def _sub(key: str, names: dict[str, str]) -> str:
        if not names or all(k == v for k, v in names.items()):
            return key
        alt = "|".join(map(re.escape, names))
        return re.sub(rf"(\.experts\.\d+\.)({alt})(?=\.|$)", lambda m: m.group(1) + names[m.group(2)], key)

    def _map(self, key: str, renamings, proj: dict[str, str]) -> str:
        if self.identity:
            return key
        for t in renamings:
            key = t.rename_source_key(key)[0]
        return self._sub(key, proj)

    def to_hub(self, key: str) -> str:
        return self._map(key, self._reverse, self._to_hub)

    def to_model(self, key: str) -> str:
        return self._map(key, self._forward, self._to_model)


@lru_cache(maxsize=None)
def hub_names(model_type: str | None) -> HubNames:
    """The :class:`HubNames` of a ``config.model_type`` (identity when transformers has no experts
    conversion for it, or is too old to say)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4.x: module names are the hub names
        return HubNames()
    transforms = get_checkpoint_conversion_mapping(model_type) if model_type else None
    gate_up = down = None
    for t in transforms or []:
        if not isinstance(t, WeightConverter):
            continue
        names = [m.group(1) for m in map(_EXPERT_SOURCE.search, t.source_patterns) if m]
        target = t.target_patterns[0] if t.target_patterns else ""
        if target.endswith("experts.gate_up_proj") and len(names) == 2:
            gate_up = names
        elif target.endswith("experts.down_proj") and len(names) == 1:
            down = names[0]
    if gate_up is None or down is None:
        return HubNames()
    return HubNames([t for t in transforms if type(t) is WeightRenaming], (gate_up[0], gate_up[1], down))
