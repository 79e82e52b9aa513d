"""Coverage guard: does the quantization plan cover every matmul weight of the model?

A quantizer that walks ``nn.Linear`` modules silently skips weights stored any other way -- notably
the fused 3-D expert tensors of transformers 5 MoE models (``mlp.experts.gate_up_proj [E, 2I, H]``),
which hold most of an MoE model's parameters.  :func:`coverage_report` counts the parameters of every
weight the forward multiplies with and the part the plan quantizes, and refuses (one ``RcsrError``
line) when a weight is neither quantized nor deliberately left out by name.

Kinds of parameters (``kind`` in the report):

* ``linear``     -- ``nn.Linear`` weights (quantizable)
* ``experts``    -- fused 3-D routed-expert tensors (``rcsr_deploy.moe_format``), per expert projection
* ``router``     -- MoE router / gate weights (``mlp.gate``, ``mlp.router``, ``shared_expert_gate``): left out
* ``embedding``  -- input embeddings: left out unless quantized as a tied head's table (``--lm-head``)
* ``lm_head``    -- the output head: left out unless ``--lm-head``
* ``norm/bias``  -- 1-D parameters (norm weights, biases, e.g. ``e_score_correction_bias``) and the 2-D
  per-expert biases of fused experts (GPT-OSS's ``gate_up_proj_bias [E, 2I]``): added, not multiplied
* ``other``      -- any other >= 2-D float parameter: an unknown matmul weight, never silently skipped

The plan is a list of names: module names of linears (``model.layers.0.self_attn.q_proj``), per-expert
projection names (``model.layers.0.mlp.experts.3.gate_proj``), or full parameter names.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from . import moe_format
from .errors import RcsrError

KINDS = ("linear", "experts", "router", "embedding", "lm_head", "norm/bias", "other")
#: kinds that are left out by name (with this reason) when the plan does not quantize them
DELIBERATE = {"router": "router/gate (tiny, precision-critical)", "embedding": "embedding (not --lm-head)",
              "lm_head": "output head (not --lm-head)", "norm/bias": "norm / bias (1-D, not a matmul)"}
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


@dataclass
class KindSummary:
    total: int = 0
    quantized: int = 0
    left_out: dict[str, str] = field(default_factory=dict)   # parameter name -> reason

    def as_dict(self) -> dict:
        pct = 100.0 * self.quantized / self.total if self.total else 100.0
        return {"total_params": self.total, "quantized_params": self.quantized, "quantized_pct": round(pct, 2),
                "left_out": dict(self.left_out)}


def _is_router(mod_name: str, mod: nn.Module) -> bool:
    last = mod_name.rsplit(".", 1)[-1]
    cls = type(mod).__name__.lower()
    return last in _ROUTER_NAMES or "router" in cls or cls.endswith("gate")


def _classify(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """``{parameter name: (kind, owning module, module name)}`` for every float parameter."""
    heads = set()
    for getter in ("get_output_embeddings",):
        f = getattr(model, getter, None)
        m = f() if f is not None else None
        if m is not None:
            heads.add(id(m))
    experts = {id(m) for m in moe_format.experts_modules(model).values()}
    out: dict[str, tuple[str, nn.Module, str]] = {}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p is None or not p.is_floating_point() or id(p) in seen:
                continue
            seen.add(id(p))   # a tied parameter is counted once, under its first name
            full = f"{mod_name}.{pname}" if mod_name else pname
            if p.dim() < 2 or (id(mod) in experts and pname.endswith("_bias")):
                kind = "norm/bias"
            elif id(mod) in heads:
                kind = "lm_head"
            elif isinstance(mod, nn.Embedding):
                kind = "embedding"
            elif id(mod) in experts and pname in ("gate_up_proj", "down_proj"):
                kind = "experts"
            elif _is_router(mod_name, mod):
                kind = "router"
            elif isinstance(mod, nn.Linear) and pname == "weight":
                kind = "linear"
            else:
                kind = "other"
            out[full] = (kind, mod, mod_name)
    return out


def coverage_report(model: nn.Module, plan: Iterable[str], *, lm_head: bool = False,
                    left_out: Mapping[str, str] | None = None, strict: bool = True) -> dict:
    """Per-kind parameter counts of ``model``'s weights and the part ``plan`` quantizes.

    ``left_out`` names further parameters (or modules) deliberately kept in full precision, with the
    reason.  With ``strict`` (the default) raises ``RcsrError`` in one line when a linear, an expert
    tensor or an unknown >= 2-D weight is neither quantized nor left out by name (also when
    ``lm_head`` is set but the head is not in the plan).  Returns a JSON-ready dict for
    quant_report.json: ``{"kinds": {kind: {...}}, "matmul_params", "quantized_params", "quantized_pct"}``.
    """
    plan = list(plan)
    classes = _classify(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    slots: dict = {}
    if any(k == "experts" for k, _, _ in classes.values()):
        try:
            slots = moe_format.expert_slots(model)
        except RcsrError:  # a fused layout the format cannot store (no gate): its experts stay uncovered
            slots = {}
    per_param_q: dict[str, int] = {}
    unknown = []
    for name in plan:
        if name in slots:
            s = slots[name]
            per_param_q[s.param] = per_param_q.get(s.param, 0) + s.view(params[s.param]).numel()
        elif f"{name}.weight" in params:
            per_param_q[f"{name}.weight"] = params[f"{name}.weight"].numel()
        elif name in params:
            per_param_q[name] = params[name].numel()
        else:
            unknown.append(name)
    if unknown:
        raise RcsrError(f"coverage: the plan names {len(unknown)} weight(s) the model does not have: "
                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    deliberate = dict(left_out or {})
    kinds = {k: KindSummary() for k in KINDS}
    uncovered: dict[str, list[str]] = {}
    missing_params: dict[str, int] = {}
    for pname, (kind, _mod, mod_name) in classes.items():
        n = params[pname].numel()
        ks = kinds[kind]
        ks.total += n
        q = per_param_q.get(pname, 0)
        ks.quantized += q
        if q == n:
            continue
        reason = deliberate.get(pname) or deliberate.get(mod_name)
        if reason is None and kind in DELIBERATE and not (kind == "lm_head" and lm_head):
            reason = DELIBERATE[kind]
        if reason is not None:
            ks.left_out[pname] = reason
        else:
            what = f"{pname} ({q} of {n} params quantized)" if q else pname
            uncovered.setdefault(kind, []).append(what)
            missing_params[kind] = missing_params.get(kind, 0) + n - q
    matmul = sum(kinds[k].total for k in KINDS if k != "norm/bias")
    quant = sum(kinds[k].quantized for k in KINDS)
    report = {"kinds": {k: v.as_dict() for k, v in kinds.items() if v.total},
              "matmul_params": matmul, "quantized_params": quant,
              "quantized_pct": round(100.0 * quant / matmul, 2) if matmul else 100.0}
    if uncovered and strict:
        parts = []
        for kind, names in uncovered.items():
            nparams = missing_params[kind]
            parts.append(f"{len(names)} {kind} weight(s), {nparams:,} params left ({100.0 * nparams / max(matmul, 1):.0f}% "
                         f"of matmul weights): {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
        raise RcsrError("coverage: weights neither quantized nor left out by name -- " + "; ".join(parts))
    report["uncovered"] = {k: v for k, v in uncovered.items()}
    return report


def linear_only_plan(model: nn.Module, layers_prefix: str = "model.layers.") -> list[str]:
    """Today's quantizer walk (``rcsr_deploy.calib.adapter.linear_modules`` per decoder block): every
    ``nn.Linear`` inside the decoder blocks, routers excepted (for the tests and as the baseline)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(layers_prefix) and not _is_router(n, m)]


def full_plan(model: nn.Module, layers_prefix: str = "model.layers.") -> list[str]:
    """:func:`linear_only_plan` plus every routed expert projection (per-expert names)."""
    return linear_only_plan(model, layers_prefix) + list(moe_format.expert_slots(model))

