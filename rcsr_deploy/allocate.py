"""Mixed precision: choose each layer's bit width under a size budget (``rcsr quantize --avg-bits B``).

**Units.**  Matrices that vLLM runs as one layer get one width: q/k/v (``qkv_proj``), gate/up
(``gate_up_proj``), DeepSeek's ``q_a_proj``/``kv_a_proj_with_mqa``, and all experts of one MoE layer;
every other decoder matrix (and the head with ``--lm-head``) is a unit of its own.

**Sensitivity (measured, one pass over up to ``PROBE_WINDOWS`` calibration windows, FP model).**  For
each block, with its FP inputs ``X``: for every unit ``u`` and allowed width ``b``, quantize only ``u`` at
``b`` (GPTQ on the full-range grid with the unit's own ``H`` from ``X``; plain RTN for MoE experts), run
the block and measure the squared
error of the **block output** ``e(u, b) = ‖block_{u→b}(X) − block(X)‖²``.  Every unit is measured in
the same currency — the residual stream the block writes — so errors of different layers and blocks
can be traded against each other (to first order they add up along the residual stream).  A layer's
own output error ``‖(W − Q)X‖²`` cannot be compared across layer types: q/k/v errors are in attention
space, o/down errors in the residual stream.  The same pass also reports each unit's relative
layer-output error in quant_report.json.

**Allocation.**  Minimise ``Σ_u e(u, b_u)`` subject to ``Σ_u bytes(u, b_u) ≤ budget``, where bytes count
the packed codes, fp16 scales and uint8 zeros (``avg_bits = 8 · bytes / params`` over the quantized
weights), by an exact dynamic program over units (multiple-choice knapsack, bytes in buckets of
budget/50 000, each choice's bytes rounded *up* so the result never exceeds the budget).  ``--bits-rule
REGEX=BITS`` pins matching units.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import RcsrError
from .format import QuantSpec

log = logging.getLogger(__name__)

#: matrices vLLM fuses into one layer (same parent module)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
BUCKETS = 50_000
#: calibration windows the sensitivity probe uses (at most): it ranks units, it does not calibrate them
PROBE_WINDOWS = 16


@dataclass
class Unit:
    """Matrices that get one width: full module names, their shapes, the block they sit in."""

    name: str
    modules: list[str]
    shapes: list[tuple[int, int]]
    block: int
    pinned: int | None = None
    errors: dict[int, float] = field(default_factory=dict)  # width -> block-output squared error

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.shapes)

    def nbytes(self, bits: int, group_size: int, sym: bool) -> int:
        total = 0
        for o, i in self.shapes:
            g = 1 if group_size == -1 else i // group_size
            total += o * i * bits // 8 + o * g * 2 + (0 if sym else o * g)
        return total


def parse_rules(rules: tuple[str, ...] | list[str]) -> list[tuple[re.Pattern, int]]:
    """``'down_proj=4'`` -> (regex, bits)."""
    out = []
    for r in rules:
        pat, sep, bits = r.rpartition("=")
        if not sep or not pat:
            raise RcsrError(f"--bits-rule must look like 'REGEX=BITS', got {r!r}")
        try:
            b = int(bits)
            rx = re.compile(pat)
        except (ValueError, re.error) as e:
            raise RcsrError(f"--bits-rule {r!r}: {e}") from None
        QuantSpec(b, -1).check()
        out.append((rx, b))
    return out


def block_units(block: nn.Module, index: int, prefix: str) -> list[Unit]:
    """The allocation units of one decoder block (module order)."""
    from .calib.adapter import experts_modules, linear_modules

    units: list[Unit] = []
    by_parent: dict[tuple[str, tuple[str, ...]], Unit] = {}
    for n, m in linear_modules(block).items():
        parent, _, leaf = n.rpartition(".")
        fused = next((f for f in FUSED if leaf in f), None)
        full = f"{prefix}.{index}.{n}"
        if fused is not None and (parent, fused) in by_parent:
            u = by_parent[(parent, fused)]
            u.modules.append(full)
            u.shapes.append(tuple(m.weight.shape))
            continue
        u = Unit(full if fused is None else f"{prefix}.{index}.{parent}.{'/'.join(fused)}", [full],
                 [tuple(m.weight.shape)], index)
        units.append(u)
        if fused is not None:
            by_parent[(parent, fused)] = u
    for name, ex in experts_modules(block).items():
        mods, shapes = [], []
        for e in range(ex.num_experts):
            for part, n in ex.matrix_names(e).items():
                mods.append(f"{prefix}.{index}.{n}")
                shapes.append(tuple(ex.weight(e, part).shape))
        units.append(Unit(f"{prefix}.{index}.{name}.*", mods, shapes, index))
    return units


def _quantize_unit(block, unit: Unit, bits: int, cfg, stats_of, prefix_len: int) -> dict[str, torch.Tensor]:
    """Dequantized weights of ``unit`` at ``bits`` (GPTQ on its H; RTN for experts), keyed by local name."""
    from dataclasses import replace

    from .calib.solver import quantize_linear

    probe_cfg = replace(cfg, method="gptq", beam=1, bits=bits, module_grids={}, sarqc_lambda=0.0, clip="minmax")
    out = {}
    for full in unit.modules:
        local = full[prefix_len:]
        w = _weight(block, local)
        stats = stats_of(local)
        if stats is None:
            probe_cfg_rtn = replace(probe_cfg, method="rtn", clip="minmax")
            out[local] = quantize_linear(w.float(), None, probe_cfg_rtn, full).dequantize()
        else:
            out[local] = quantize_linear(w.float(), stats, probe_cfg, full).dequantize()
    return out


def _weight(block, local: str) -> torch.Tensor:
    from .calib.adapter import weight_view

    return weight_view(block, local)


def probe(model, tokenizer, cfg, widths: tuple[int, ...], units_by_block: dict[int, list[Unit]],
          progress: bool = True) -> None:
    """Fill ``unit.errors[b]`` (block-output squared error with only ``unit`` at ``b`` bits) for every unit."""
    from tqdm.auto import tqdm

    from .calib.adapter import find_decoder_layers
    from .calib.streams import capture_block_inputs, discover_groups, run_block, run_block_capturing
    from .data import calibration_windows
    from .objective import LayerStats

    layers, prefix = find_decoder_layers(model)
    dtype = next(model.parameters()).dtype
    windows = calibration_windows(cfg.calib, tokenizer, min(cfg.nsamples, PROBE_WINDOWS), cfg.seqlen, cfg.seed)
    x, kwargs = capture_block_inputs(model, layers, windows, cfg.batch_size, "cpu")
    x = x.float() if dtype == torch.float32 else x
    bs = cfg.batch_size
    for i in tqdm(sorted(units_by_block), desc="sensitivity", disable=not progress):
        block = layers[i]
        kw = kwargs[i]
        groups = discover_groups(block, x, kw, "cpu", dtype)
        mods = dict(block.named_modules())
        firsts = {g[0]: mods[g[0]] for g in groups}
        y, cache = run_block_capturing(block, x, kw, "cpu", bs, dtype, firsts)
        stats: dict[str, LayerStats] = {}
        for g in groups:
            st = LayerStats(mods[g[0]].in_features, "cpu", with_d=False)
            for b0 in range(0, cache[g[0]].shape[0], bs):
                st.add(cache[g[0]][b0:b0 + bs])
            for n in g:
                stats[n] = st
        del cache
        plen = len(f"{prefix}.{i}.")
        for u in units_by_block[i]:
            saved = {m[plen:]: _weight(block, m[plen:]).clone() for m in u.modules}
            for b in widths:
                if u.pinned is not None and b != u.pinned:
                    continue
                deq = _quantize_unit(block, u, b, cfg, stats.get, plen)
                with torch.no_grad():
                    for local, w in deq.items():
                        _weight(block, local).copy_(w.to(dtype))
                yb = run_block(block, x, kw, "cpu", bs, dtype)
                u.errors[b] = float(((yb.double() - y.double()) ** 2).sum())
                with torch.no_grad():
                    for local, w in saved.items():
                        _weight(block, local).copy_(w)
        x = y


def allocate(units: list[Unit], widths: tuple[int, ...], budget_bytes: int, group_size: int,
             sym: bool) -> dict[str, int]:
    """Exact multiple-choice knapsack: the width of every unit minimising the summed error within budget."""
    bucket = max(budget_bytes / BUCKETS, 1.0)
    cap = int(budget_bytes // bucket)
    INF = float("inf")
    best = np.full(cap + 1, INF)
    best[0] = 0.0
    choice = []
    for u in units:
        opts = [b for b in widths if (u.pinned is None or b == u.pinned) and b in u.errors]
        if not opts:
            raise RcsrError(f"{u.name}: no allowed width (rules pin it to {u.pinned}, allowed {widths})")
        new = np.full(cap + 1, INF)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for k, b in enumerate(opts):
            w = int(np.ceil(u.nbytes(b, group_size, sym) / bucket))
            if w > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[w:] = best[:cap + 1 - w] + u.errors[b]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        best = new
        choice.append((opts, arg))
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        smallest = sum(min(u.nbytes(b, group_size, sym) for b in widths) for u in units)
        raise RcsrError(f"--avg-bits: the budget ({budget_bytes} bytes) is below the smallest allowed model "
                        f"({smallest} bytes at the lowest widths); raise --avg-bits or allow lower --widths")
    out: dict[str, int] = {}
    for u, (opts, arg) in zip(reversed(units), reversed(choice)):
        k = int(arg[end])
        b = opts[k]
        out[u.name] = b
        end -= int(np.ceil(u.nbytes(b, group_size, sym) / bucket))
    return out


@dataclass
class Allocation:
    """The chosen widths and what they cost: ``module_grids`` feeds ``QuantizeConfig``."""

    widths: dict[str, int]
    module_bits: dict[str, int]
    budget_bytes: int
    predicted_bytes: int
    params: int
    predicted_error: float
    uniform_error: dict[int, float]
    seconds: float
    units: list[dict]

    @property
    def avg_bits(self) -> float:
        return 8 * self.predicted_bytes / self.params

    def report(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "predicted_bytes": self.predicted_bytes, "params": self.params,
                "predicted_avg_bits": self.avg_bits, "predicted_error": self.predicted_error,
                "uniform_error": self.uniform_error, "seconds": self.seconds, "units": self.units}


def plan(model, tokenizer, cfg, avg_bits: float, widths: tuple[int, ...], rules: list[tuple[re.Pattern, int]],
         progress: bool = True) -> Allocation:
    """Units → sensitivity probe → knapsack, for the decoder blocks ``cfg`` selects."""
    from .calib.adapter import find_decoder_layers

    t0 = time.perf_counter()
    layers, prefix = find_decoder_layers(model)
    by_block = {i: block_units(layers[i], i, prefix) for i in cfg.block_set(len(layers))}
    units = [u for us in by_block.values() for u in us]
    for u in units:
        for rx, b in rules:
            if any(rx.search(m) for m in u.modules):
                u.pinned = b
    params = sum(u.params for u in units)
    budget = int(avg_bits * params / 8)
    for w in widths:
        for u in units:
            for (o, i) in u.shapes:
                QuantSpec(w, cfg.group_size, cfg.sym).validate(i, u.name)
    probe(model, tokenizer, cfg, widths, by_block, progress=progress)
    chosen = allocate(units, widths, budget, cfg.group_size, cfg.sym)
    predicted = sum(u.nbytes(chosen[u.name], cfg.group_size, cfg.sym) for u in units)
    uniform = {b: sum(u.errors.get(b, float("nan")) for u in units) for b in widths}
    module_bits = {m: chosen[u.name] for u in units for m in u.modules}
    rows = [{"unit": u.name, "bits": chosen[u.name], "params": u.params, "errors": u.errors,
             "bytes": {b: u.nbytes(b, cfg.group_size, cfg.sym) for b in widths}, "pinned": u.pinned} for u in units]
    alloc = Allocation(chosen, module_bits, budget, predicted, params,
                       sum(u.errors[chosen[u.name]] for u in units), uniform, time.perf_counter() - t0, rows)
    log.info("allocation: %.3f bits/weight predicted (budget %.3f), widths %s", alloc.avg_bits, avg_bits,
             {b: sum(1 for v in chosen.values() if v == b) for b in widths})
    return alloc
