"""Mixed precision: choose each layer's grid under a size budget (``rcsr quantize --avg-bits B``).

**Choices.**  A unit's grid is a width from ``--widths`` and, with ``--group-sizes``, a group size from
that list (default: ``--group-size`` alone).  Group size is a second lever on the same budget: W3 per-channel
costs 3.03 bits per weight on a 576-wide model against W3 g64's 3.25, and the 0.22 bits it frees pay for W4
on about a fifth of the weights.  Group sizes are any multiple of 32 (``format.supported_group_size``): on a
576-wide model 96 and 192 sit between g64 and per channel (W3 g192 = 3.083 bits).  A choice whose group does not
divide a unit's in-features is not offered to that unit (128 on 576 inputs).

**Units.**  Matrices that vLLM runs as one layer get one width: q/k/v (``qkv_proj``), gate/up
(``gate_up_proj``), DeepSeek's ``q_a_proj``/``kv_a_proj_with_mqa``, and all experts of one MoE layer;
every other decoder matrix (and the head with ``--lm-head``) is a unit of its own.

**Sensitivity: predicted end-to-end KL (measured on up to ``PROBE_WINDOWS`` calibration windows of at
most ``PROBE_SEQLEN`` tokens, FP model).**  One forward/backward pass of the FP model gives, for every
block ``i``, ``G_i`` = the gradients of the summed next-token loss w.r.t. block ``i``'s output, for
``FISHER_SAMPLES`` label sets sampled from the FP model's own predictions.  Then per block, with its FP
inputs ``X``: for every unit ``u`` and allowed width ``b``, quantize only ``u`` at ``b`` (GPTQ on the
full-range grid with the unit's own ``H`` from ``X``; plain RTN for MoE experts), run the block, take the
block-output perturbation ``δ = block_{u→b}(X) − block(X)`` and score

    e(u, b) = ½ · mean_k Σ_sequences (G_i,k · δ)² / tokens  ≈  mean per-token KL(p_FP ‖ p_{u→b})

-- the second-order Taylor expansion of the end-to-end KL of the final logits in ``δ`` (its Hessian at
``δ = 0`` is the Fisher ``E_y[g gᵀ]``, estimated without bias by the sampled-label gradients; every later
block and attention across tokens included, no diagonal approximation).  All units are scored in one
currency, nats of the model's output, so errors of different blocks -- which the later blocks amplify
differently -- can be traded against each other (to first order they add up).  The former proxy, the
summed block-output squared error ``‖δ‖²``, is kept in the report (``block_errors``): it is on a different
scale in every block and predicted the measured 3.25-bit allocation better than uniform W3 when it was
44 % worse (docs/RESULTS.md).

**Allocation.**  Minimise ``Σ_u e(u, b_u)`` subject to ``Σ_u bytes(u, b_u) ≤ budget``, where bytes count
the packed codes, fp16 scales and uint8 zeros (``avg_bits = 8 · bytes / params`` over the quantized
weights), by an exact dynamic program over units (multiple-choice knapsack, bytes in buckets of
budget/50 000, each choice's bytes rounded *up* so the result never exceeds the budget), then a guard: every
uniform allocation (one width for all unpinned units) that fits the budget in exact bytes is compared with
the knapsack's answer and wins when predicted no worse (bucket rounding can drop a uniform width that fits
to the byte, e.g. ``--avg-bits 3.25`` = uniform W3 g64 sym).  ``--bits-rule REGEX=BITS`` pins matching units.

**Check and correction (``--alloc-check``, default on).**  The proxy's candidates (its optimum, the same
without the narrowest widths, the best uniform grid) and every uniform allocation are assembled and their
end-to-end KL measured on held-back calibration windows (``measure_candidates``).  The uniform points
calibrate the proxy per grid: ``f_c`` = measured / predicted KL of uniform ``c`` (on SmolLM2-135M: 0.89 for
W4 g64, 1.27 for W3 g64, 1.46 for W3 per channel, 6.1 for W2 g64 -- the second-order proxy underrates the
large perturbations most).  The knapsack is solved again on ``e(u, c) · f_c^γ`` for a few ``γ``
(``calibrated_candidates``), those allocations are measured too, and the kept allocation is the one with
the lowest measured KL among all that fit the budget.  The probe keeps its quantized weights
(``CACHE_BYTES``), so each measured candidate costs one forward pass of the calibration windows.
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
#: ... of at most this many tokens each
PROBE_SEQLEN = 256
#: labels sampled per token from the FP model's predictions for the Fisher (KL) estimate
FISHER_SAMPLES = 4
#: held-back windows (of ``PROBE_SEQLEN`` tokens) on which the candidate allocations are measured
CHECK_WINDOWS = 8
#: the probe keeps every (unit, grid)'s quantized weights for the check when they take at most this many bytes
#: (fp32); above it the check quantizes them again (same numbers, more time)
CACHE_BYTES = 6 << 30
#: exponents of the per-grid correction of the predictor (``calibrated_candidates``)
CALIBRATION_STRENGTHS = (0.5, 1.0, 2.0)


Choice = tuple[int, int]  # a grid: (bits, group size; -1 = per channel)


@dataclass
class Unit:
    """Matrices that get one width: full module names, their shapes, the block they sit in."""

    name: str
    modules: list[str]
    shapes: list[tuple[int, int]]
    block: int
    pinned: tuple[int, int | None] | None = None  # (bits, group size or None = any allowed) from --bits-rule
    errors: dict[Choice, float] = field(default_factory=dict)  # grid -> predicted end-to-end KL (nats/token)
    block_errors: dict[Choice, float] = field(default_factory=dict)  # grid -> block-output squared error
    #: grid -> the probe's dequantized weights by local name, kept for the check (``CACHE_BYTES``)
    deq: dict[Choice, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.shapes)

    def nbytes(self, choice: Choice, sym: bool) -> int:
        """Bytes on disk at ``choice``: packed codes, fp16 scales, uint8 zeros (asym)."""
        bits, group_size = choice
        total = 0
        for o, i in self.shapes:
            g = 1 if group_size == -1 else i // group_size
            total += o * i * bits // 8 + o * g * 2 + (0 if sym else o * g)
        return total

    def options(self, choices: list[Choice]) -> list[Choice]:
        """The grids this unit may take: the allowed ones whose group divides every in-features, narrowed by
        its ``--bits-rule`` pin (a pin that names a group size is offered even if not in ``choices``)."""
        fits = [c for c in choices if all(c[1] == -1 or i % c[1] == 0 for _, i in self.shapes)]
        if self.pinned is None:
            return fits
        bits, group = self.pinned
        if group is not None:
            return [(bits, group)]
        return [c for c in fits if c[0] == bits]



def label(c: Choice) -> str:
    """``(3, 64)`` -> ``'3g64'``, ``(4, -1)`` -> ``'4pc'`` (report keys)."""
    return f"{c[0]}{'pc' if c[1] == -1 else f'g{c[1]}'}"


def choices_of(widths, group_sizes) -> list[Choice]:
    return [(b, g) for b in sorted(set(widths)) for g in group_sizes]


def parse_rules(rules: tuple[str, ...] | list[str]) -> list[tuple[re.Pattern, tuple[int, int | None]]]:
    """``'down_proj=4'`` -> (regex, (4, None)); ``'v_proj=4g32'`` -> (regex, (4, 32)); ``'=4pc'`` per channel."""
    out = []
    for r in rules:
        pat, sep, grid = r.rpartition("=")
        m = re.fullmatch(r"(\d+)(?:g(\d+)|(pc))?", grid.strip())
        if not sep or not pat or m is None:
            raise RcsrError(f"--bits-rule must look like 'REGEX=BITS' or 'REGEX=BITSgGROUP' (e.g. down_proj=4g64, "
                            f"v_proj=4pc), got {r!r}")
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise RcsrError(f"--bits-rule {r!r}: {e}") from None
        b = int(m.group(1))
        g = -1 if m.group(3) else (int(m.group(2)) if m.group(2) else None)
        QuantSpec(b, -1 if g is None else g).check()
        out.append((rx, (b, g)))
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


def _quantize_unit(block, unit: Unit, choice: Choice, cfg, stats_of, prefix_len: int) -> dict[str, torch.Tensor]:
    """Dequantized weights of ``unit`` on grid ``choice`` (GPTQ on its H; RTN for experts), keyed by local name.

    The grid is found the way the run finds it (``cfg.clip``: the H-weighted clip search by default), so the
    probe sees the scales the checkpoint will have (on SmolLM2-135M, uniform W3 g64 measured 1.28 nats of KL
    with the full min/max range, against 0.48 for the run's own SNRQ with the clip search)."""
    from dataclasses import replace

    from .calib.solver import quantize_linear

    probe_cfg = replace(cfg, method="gptq", beam=1, bits=choice[0], group_size=choice[1], module_grids={},
                        sarqc_lambda=0.0)
    out = {}
    for full in unit.modules:
        local = full[prefix_len:]
        w = _weight(block, local)
        stats = stats_of(local)
        if stats is None:
            probe_cfg_rtn = replace(probe_cfg, method="rtn")
            out[local] = quantize_linear(w.float(), None, probe_cfg_rtn, full).dequantize()
        else:
            out[local] = quantize_linear(w.float(), stats, probe_cfg, full).dequantize()
    return out


def _weight(block, local: str) -> torch.Tensor:
    from .calib.adapter import weight_view

    return weight_view(block, local)


def output_fisher_factors(model, layers, windows: torch.Tensor, samples: int, seed: int,
                          batch_size: int, keep: set[int]) -> dict[int, torch.Tensor]:
    """Per block ``i`` in ``keep``: ``G[i]`` [samples, N, L, d], the gradients of the FP model's summed
    next-token loss w.r.t. block ``i``'s output, for labels *sampled from the FP model's own predictions*.

    For a perturbation ``δ`` [N, L, d] of block ``i``'s output, ``E_y[(G·δ)²] = δᵀ F δ`` per sequence, where
    ``F = Σ_t Jₜᵀ (diag pₜ − pₜpₜᵀ) Jₜ`` is the Fisher (= Gauss-Newton = exact Hessian at δ = 0) of the summed
    ``KL(p_FP ‖ p_perturbed)`` over the sequence's tokens: so ``½ mean_k (G_k·δ)²`` estimates the end-to-end KL
    to second order, through every later block, attention across tokens included (no diagonal approximation).
    """
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    emb = model.get_input_embeddings()
    outs: dict[int, torch.Tensor] = {}

    def hook(i):
        def f(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.requires_grad:
                h.retain_grad()
            outs[i] = h
        return f

    hooks = [layers[i].register_forward_hook(hook(i)) for i in keep]
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    n, L = windows.shape
    G = {i: None for i in keep}
    try:
        for b0 in range(0, n, batch_size):
            ids = windows[b0:b0 + batch_size]
            with torch.no_grad():
                e = emb(ids)
            e = e.detach().requires_grad_(True)
            outs.clear()
            with torch.enable_grad():
                logits = model(inputs_embeds=e, use_cache=False).logits.float()
                logp = torch.log_softmax(logits, -1)
                probs = logp.detach().exp().reshape(-1, logp.shape[-1])
                cdf = probs.cumsum(-1)
                for k in range(samples):
                    y = sample_labels(cdf, gen).reshape(ids.shape)
                    loss = -logp.gather(-1, y[..., None]).sum()
                    for h in outs.values():
                        h.grad = None
                    loss.backward(retain_graph=k < samples - 1)
                    for i in keep:
                        g = outs[i].grad
                        g = per_sequence_grad(g, ids.shape[0])
                        if G[i] is None:
                            G[i] = torch.zeros(samples, n, *g.shape[1:], dtype=torch.float32)
                        G[i][k, b0:b0 + ids.shape[0]] = g.float()
            del logits, logp, probs, cdf
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return G


def sample_labels(cdf: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of ``cdf`` [T, V] (cumulative probabilities) by inverse-CDF sampling: the same
    distribution as ``torch.multinomial(probs, 1)``, ~30× faster on a 49k vocabulary (one uniform per row and a
    binary search instead of a pass that rebuilds the distribution)."""
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


def per_sequence_grad(g: torch.Tensor, n_seq: int) -> torch.Tensor:
    return g if g.dim() == 3 and g.shape[0] == n_seq else g.reshape(n_seq, -1, g.shape[-1])


def fisher_kl(G: torch.Tensor, delta: torch.Tensor) -> float:
    """Predicted mean per-token ``KL(p_FP ‖ p)`` (nats) of a block-output perturbation ``delta`` [N, L, d]."""
    proj = torch.einsum("knld,nld->kn", G.double(), delta.double())  # [samples, N]
    return float(0.5 * (proj ** 2).mean(0).sum() / (delta.shape[0] * delta.shape[1]))


def _block_stats(block, x: torch.Tensor, kw: dict, bs: int, dtype):
    """The FP block output on ``x`` and every module's ``H`` statistics (GPTQ's, no ``D``) by local name."""
    from .calib.streams import discover_groups, run_block_capturing
    from .objective import LayerStats

    groups = discover_groups(block, x, kw, "cpu", dtype)
    mods = dict(block.named_modules())
    firsts = {g[0]: mods[g[0]] for g in groups}
    y, cache = run_block_capturing(block, x, kw, "cpu", bs, dtype, firsts)
    stats = {}
    for g in groups:
        st = LayerStats(mods[g[0]].in_features, "cpu", with_d=False)
        for b0 in range(0, cache[g[0]].shape[0], bs):
            st.add(cache[g[0]][b0:b0 + bs])
        for n in g:
            stats[n] = st
    return y, stats


def probe(model, tokenizer, cfg, choices: list[Choice], units_by_block: dict[int, list[Unit]],
          progress: bool = True, keep: bool = False) -> None:
    """Fill ``unit.errors[c]`` (predicted end-to-end mean per-token KL with only ``unit`` on grid ``c``) for
    every unit and each of its options; ``unit.block_errors[c]`` keeps the block-output squared error (the
    former proxy).  With ``keep``, ``unit.deq[c]`` keeps the quantized weights for the check."""
    from tqdm.auto import tqdm

    from .calib.adapter import find_decoder_layers
    from .calib.streams import capture_block_inputs, run_block
    from .data import calibration_windows

    layers, prefix = find_decoder_layers(model)
    dtype = next(model.parameters()).dtype
    windows = calibration_windows(cfg.calib, tokenizer, min(cfg.nsamples, PROBE_WINDOWS),
                                  min(cfg.seqlen, PROBE_SEQLEN), cfg.seed)
    G = output_fisher_factors(model, layers, windows, FISHER_SAMPLES, cfg.seed, cfg.batch_size,
                              set(units_by_block))
    x, kwargs = capture_block_inputs(model, layers, windows, cfg.batch_size, "cpu")
    x = x.float() if dtype == torch.float32 else x
    bs = cfg.batch_size
    for i in tqdm(range(max(units_by_block) + 1), desc="sensitivity", disable=not progress):
        block = layers[i]
        kw = kwargs[i]
        if i not in units_by_block:  # a block left out by --blocks: only propagate the FP stream
            x = run_block(block, x, kw, "cpu", bs, dtype)
            continue
        y, stats = _block_stats(block, x, kw, bs, dtype)
        plen = len(f"{prefix}.{i}.")
        for u in units_by_block[i]:
            saved = {m[plen:]: _weight(block, m[plen:]).clone() for m in u.modules}
            for b in u.options(choices):
                deq = _quantize_unit(block, u, b, cfg, stats.get, plen)
                if keep:
                    u.deq[b] = {k: v.detach().to("cpu", torch.float32) for k, v in deq.items()}
                with torch.no_grad():
                    for local, w in deq.items():
                        _weight(block, local).copy_(w.to(dtype))
                yb = run_block(block, x, kw, "cpu", bs, dtype)
                delta = yb.double() - y.double()
                u.block_errors[b] = float((delta ** 2).sum())
                u.errors[b] = fisher_kl(G[i], delta)
                with torch.no_grad():
                    for local, w in saved.items():
                        _weight(block, local).copy_(w)
        G.pop(i)
        x = y


def allocate(units: list[Unit], choices: list[Choice], budget_bytes: int, sym: bool) -> dict[str, Choice]:
    """The grid of every unit minimising the summed predicted error within budget: the exact knapsack
    (``knapsack``), then the uniform allocations compared with *exact* bytes -- the knapsack rounds each
    choice's bytes up to a bucket, which can push a uniform grid that fits exactly (``--avg-bits 3.25`` is
    uniform W3 g64 to the byte) out of its feasible set.  A uniform grid that fits and is predicted no worse
    than the knapsack's choice wins (ties go to uniform).  Uniform = one grid for every unit that is offered
    it (pinned units keep their pin; a unit the grid's group does not divide keeps its best option)."""
    try:
        best = knapsack(units, choices, budget_bytes, sym)
    except RcsrError:
        best = None
    best_err = float("inf") if best is None else sum(u.errors[best[u.name]] for u in units)
    for _, uni, err in uniform_allocations(units, choices, budget_bytes, sym):
        if err <= best_err:
            best, best_err = uni, err
    if best is None:
        return knapsack(units, choices, budget_bytes, sym)  # raises the budget error
    return best


def uniform_allocations(units: list[Unit], choices: list[Choice], budget_bytes: int, sym: bool):
    """``(grid, allocation, predicted error)`` of every uniform allocation that fits the budget in exact
    bytes, widest grid first: one grid for every unit that is offered it (pinned units keep their pin; a
    unit the grid's group does not divide takes its best option)."""
    for c in sorted(choices, key=lambda c: (-c[0], c[1] == -1, c[1])):
        uni = {}
        for u in units:
            opts = [o for o in u.options(choices) if o in u.errors]
            if not opts:
                break
            uni[u.name] = c if c in opts else min(opts, key=lambda o: (u.errors[o], u.nbytes(o, sym)))
        else:
            if sum(u.nbytes(uni[u.name], sym) for u in units) <= budget_bytes:
                yield c, uni, sum(u.errors[uni[u.name]] for u in units)


def candidate_allocations(units: list[Unit], choices: list[Choice], budget_bytes: int,
                          sym: bool) -> dict[str, dict[str, Choice]]:
    """The allocations the measured check compares (distinct ones only, in this order):

    * ``proxy optimum``: ``allocate`` over every allowed grid (the knapsack, or a uniform grid the proxy
      predicts no worse);
    * ``widths >= w``: the same with the narrowest widths left out, for each ``w`` above the narrowest --
      the second-order proxy is least trustworthy for the largest perturbations, which the narrowest width
      makes, so the check measures whether spending bytes on it pays;
    * ``uniform <grid>``: the uniform allocation the proxy predicts best among those that fit."""
    out: dict[str, dict[str, Choice]] = {"proxy optimum": allocate(units, choices, budget_bytes, sym)}
    widths = sorted({c[0] for c in choices})
    for w in widths[1:]:
        sub = [c for c in choices if c[0] >= w]
        try:
            out[f"widths >= {w}"] = allocate(units, sub, budget_bytes, sym)
        except RcsrError:  # the budget (or a pin) needs the narrower widths
            break
    unis = sorted(uniform_allocations(units, choices, budget_bytes, sym), key=lambda t: t[2])
    if unis:
        out[f"uniform {label(unis[0][0])}"] = unis[0][1]
    distinct: dict[str, dict[str, Choice]] = {}
    for name, a in out.items():
        if a not in distinct.values():
            distinct[name] = a
    return distinct


def knapsack(units: list[Unit], choices: list[Choice], budget_bytes: int, sym: bool) -> dict[str, Choice]:
    """Exact multiple-choice knapsack: the grid of every unit minimising the summed error within budget."""
    bucket = max(budget_bytes / BUCKETS, 1.0)
    cap = int(budget_bytes // bucket)
    INF = float("inf")
    best = np.full(cap + 1, INF)
    best[0] = 0.0
    choice = []
    for u in units:
        opts = [c for c in u.options(choices) if c in u.errors]
        if not opts:
            raise RcsrError(f"{u.name}: no allowed grid (pinned to {u.pinned}, allowed "
                            f"{', '.join(label(c) for c in choices)})")
        new = np.full(cap + 1, INF)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for k, c in enumerate(opts):
            w = int(np.ceil(u.nbytes(c, sym) / bucket))
            if w > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[w:] = best[:cap + 1 - w] + u.errors[c]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        best = new
        choice.append((opts, arg))
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        smallest = sum(min(u.nbytes(c, sym) for c in u.options(choices) or choices) for u in units)
        raise RcsrError(f"--avg-bits: the budget ({budget_bytes} bytes) is below the smallest allowed model "
                        f"({smallest} bytes at the lowest widths); raise --avg-bits or allow lower --widths")
    out: dict[str, Choice] = {}
    for u, (opts, arg) in zip(reversed(units), reversed(choice)):
        c = opts[int(arg[end])]
        out[u.name] = c
        end -= int(np.ceil(u.nbytes(c, sym) / bucket))
    return out


def measure_candidates(model, tokenizer, cfg, units_by_block: dict[int, list[Unit]],
                       candidates: dict[str, dict[str, Choice]], progress: bool = True) -> dict[str, dict]:
    """Measured end-to-end ``KL(p_FP ‖ p)`` and NLL of every candidate allocation on ``CHECK_WINDOWS``
    held-back windows.

    Each candidate is assembled with the probe's quantizer (GPTQ on each module's ``H`` from the FP stream
    of the probe windows) and run block by block on held-back windows of the calibration text that overlap
    no probe window (``data.calibration_split``); every distinct (unit, grid) is quantized once per block,
    whichever candidates share it.  The last probed block's output of each candidate is then fed through
    the rest of the FP model (a forward hook), so the logits include every later block, the final norm and
    the head exactly as the model computes them (Gemma-3's soft-capping included)."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .calib.adapter import find_decoder_layers
    from .calib.streams import capture_block_inputs, run_block
    from .data import calibration_split

    layers, prefix = find_decoder_layers(model)
    dtype = next(model.parameters()).dtype
    bs = cfg.batch_size
    fit, val = calibration_split(cfg.calib, tokenizer, min(cfg.nsamples, PROBE_WINDOWS),
                                 min(cfg.seqlen, PROBE_SEQLEN), cfg.seed, CHECK_WINDOWS, 1)
    x, kwargs = capture_block_inputs(model, layers, fit, bs, "cpu")
    xv, _ = capture_block_inputs(model, layers, val, bs, "cpu")  # same length: the fit windows' kwargs apply
    if dtype == torch.float32:
        x, xv = x.float(), xv.float()
    streams = {name: xv for name in candidates}
    last = max(units_by_block)
    for i in tqdm(range(last + 1), desc="allocation check", disable=not progress):
        block, kw = layers[i], kwargs[i]
        if i not in units_by_block:
            x = run_block(block, x, kw, "cpu", bs, dtype)
            streams = {n: run_block(block, h, kw, "cpu", bs, dtype) for n, h in streams.items()}
            continue
        plen = len(f"{prefix}.{i}.")
        units = units_by_block[i]
        need = [(u, c) for u in units for c in dict.fromkeys(a[u.name] for a in candidates.values())]
        if all(c in u.deq for u, c in need):  # kept by the probe: no FP statistics needed
            y, stats = run_block(block, x, kw, "cpu", bs, dtype), {}
            deq = {(u.name, c): u.deq[c] for u, c in need}
        else:
            y, stats = _block_stats(block, x, kw, bs, dtype)
            deq = {(u.name, c): _quantize_unit(block, u, c, cfg, stats.get, plen) for u, c in need}
        saved = {m[plen:]: _weight(block, m[plen:]).clone() for u in units for m in u.modules}
        for name, alloc in candidates.items():
            with torch.no_grad():
                for u in units:
                    for local, w in deq[(u.name, alloc[u.name])].items():
                        _weight(block, local).copy_(w.to(dtype))
            streams[name] = run_block(block, streams[name], kw, "cpu", bs, dtype)
        with torch.no_grad():
            for local, w in saved.items():
                _weight(block, local).copy_(w)
        del deq, stats
        x = y
    box = {}

    def swap(mod, args, out):
        h = box.get("h")
        if h is None:
            return out
        return ((h.to(out[0].dtype),) + tuple(out[1:])) if isinstance(out, tuple) else h.to(out.dtype)

    hook = layers[last].register_forward_hook(swap)
    kl = {n: 0.0 for n in candidates}
    nll = {n: 0.0 for n in candidates}
    tokens = 0
    try:
        with torch.inference_mode():
            for b0 in range(0, val.shape[0], bs):
                ids = val[b0:b0 + bs]
                box["h"] = None
                ref = F.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)
                for n, h in streams.items():
                    box["h"] = h[b0:b0 + bs]
                    lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)
                    kl[n] += float((ref.exp() * (ref - lp)).sum())
                    nll[n] += float(-lp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
                tokens += ids.numel()
    finally:
        hook.remove()
    n_next = tokens - val.shape[0]
    return {n: {"measured_kl": kl[n] / tokens, "held_back_nll": nll[n] / n_next} for n in candidates}


class _Measured(dict):
    """Candidate allocations (name -> allocation) with ``measured``: name -> measured KL / NLL, and
    ``sources``: grid -> the candidate its correction factor was measured on."""

    measured: dict[str, dict]
    sources: dict[Choice, str]


def calibrated_candidates(units: list[Unit], choices: list[Choice], budget_bytes: int, sym: bool,
                          factors: dict[Choice, float]) -> dict[str, dict[str, Choice]]:
    """The proxy's candidates again, on errors corrected per grid: ``e'(u, c) = e(u, c) · f_c^γ`` for each
    ``γ`` in ``CALIBRATION_STRENGTHS``, where ``f_c`` = measured / predicted KL of the uniform allocation on
    grid ``c``.  The second-order proxy is not equally wrong for every grid (its error grows with the size of
    the perturbation, and the check measures how much); ``γ`` hedges how far the uniform point's ratio
    carries over to a mix."""
    from dataclasses import replace

    out: dict[str, dict[str, Choice]] = {}
    for g in CALIBRATION_STRENGTHS:
        scaled = [replace(u, errors={c: e * factors.get(c, 1.0) ** g for c, e in u.errors.items()}) for u in units]
        for name, a in candidate_allocations(scaled, choices, budget_bytes, sym).items():
            if not name.startswith("uniform"):
                out[f"{name}, corrected^{g:g}"] = a
    return out


def _check(model, tokenizer, cfg, by_block, units, choices, budget, cands, progress) -> tuple[_Measured, dict]:
    """Measure the proxy's candidates and every uniform allocation (``uniform <grid>``, the calibration
    points, whether or not they fit), correct the proxy per grid from the uniform points
    (``calibrated_candidates``) and measure the new candidates that gives.  Returns every measured
    allocation (name -> allocation, ``.measured``: name -> figures) and the per-grid factors."""
    out = _Measured(cands)
    for c, uni, _ in uniform_allocations(units, choices, float("inf"), cfg.sym):
        if uni not in out.values():
            out[f"uniform {label(c)}"] = uni
    out.measured = measure_candidates(model, tokenizer, cfg, by_block, dict(out), progress=progress)
    factors, out.sources = {}, {}
    for c, uni, err in uniform_allocations(units, choices, float("inf"), cfg.sym):
        name = next(n for n, a in out.items() if a == uni)
        if err > 0:
            factors[c] = out.measured[name]["measured_kl"] / err
            out.sources[c] = name
    new = {}
    try:
        fresh = calibrated_candidates(units, choices, budget, cfg.sym, factors)
    except RcsrError:
        fresh = {}
    for n, a in fresh.items():
        if a not in out.values() and a not in new.values():
            new[n] = a
    if new:
        out.update(new)
        out.measured.update(measure_candidates(model, tokenizer, cfg, by_block, new, progress=progress))
    return out, factors


@dataclass
class Allocation:
    """The chosen grids and what they cost: ``module_grids`` feeds ``QuantizeConfig``."""

    grids: dict[str, Choice]  # unit -> grid
    module_grids: dict[str, Choice]  # module -> grid
    budget_bytes: int
    predicted_bytes: int
    params: int
    predicted_error: float
    uniform_error: dict[str, float]
    seconds: float
    units: list[dict]
    candidate: str = "proxy optimum"  # which of ``candidates`` was kept
    candidates: dict[str, dict] = field(default_factory=dict)  # name -> predicted / measured KL, bits
    #: grid label -> {"factor": measured / predicted KL of the uniform allocation, "candidate": its name}
    correction: dict[str, dict] = field(default_factory=dict)

    @property
    def avg_bits(self) -> float:
        return 8 * self.predicted_bytes / self.params

    def report(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "predicted_bytes": self.predicted_bytes, "params": self.params,
                "predicted_avg_bits": self.avg_bits, "predicted_error": self.predicted_error,
                "uniform_error": self.uniform_error, "seconds": self.seconds, "kept_candidate": self.candidate,
                "candidates": self.candidates, "correction": self.correction, "units": self.units}


def plan(model, tokenizer, cfg, avg_bits: float, choices: list[Choice],
         rules: list[tuple[re.Pattern, tuple[int, int | None]]], progress: bool = True) -> Allocation:
    """Units → sensitivity probe → knapsack, for the decoder blocks ``cfg`` selects."""
    from .calib.adapter import find_decoder_layers

    t0 = time.perf_counter()
    layers, prefix = find_decoder_layers(model)
    by_block = {i: block_units(layers[i], i, prefix) for i in cfg.block_set(len(layers))}
    units = [u for us in by_block.values() for u in us]
    for u in units:
        for rx, pin in rules:
            if any(rx.search(m) for m in u.modules):
                u.pinned = pin
    params = sum(u.params for u in units)
    budget = int(avg_bits * params / 8)
    for u in units:
        opts = u.options(choices)
        if not opts:
            raise RcsrError(f"--avg-bits: no allowed grid fits {u.name} (in-features "
                            f"{sorted({i for _, i in u.shapes})}; allowed {', '.join(label(c) for c in choices)}"
                            f"{'' if u.pinned is None else f', pinned to {u.pinned[0]} bits'})")
        for c in opts:
            for (o, i) in u.shapes:
                QuantSpec(c[0], c[1], cfg.sym).validate(i, u.name)
    keep = cfg.alloc_check and len(choices) > 1 and 4 * sum(u.params * len(u.options(choices)) for u in units) <= CACHE_BYTES
    probe(model, tokenizer, cfg, choices, by_block, progress=progress, keep=keep)
    cands = candidate_allocations(units, choices, budget, cfg.sym)
    factors: dict[Choice, float] = {}
    if cfg.alloc_check and len(choices) > 1:
        cands, factors = _check(model, tokenizer, cfg, by_block, units, choices, budget, cands, progress)
    checked = {n: {"predicted_kl": sum(u.errors[a[u.name]] for u in units),
                   "avg_bits": 8 * sum(u.nbytes(a[u.name], cfg.sym) for u in units) / params} for n, a in cands.items()}
    for n, m in getattr(cands, "measured", {}).items():
        checked[n].update(m)
    eligible = [n for n, a in cands.items() if sum(u.nbytes(a[u.name], cfg.sym) for u in units) <= budget]
    pick = "proxy optimum"
    if any("measured_kl" in checked[n] for n in eligible):
        pick = min((n for n in eligible if "measured_kl" in checked[n]), key=lambda n: checked[n]["measured_kl"])
    for n in checked:
        checked[n]["fits_budget"] = n in eligible
    for u in units:
        u.deq.clear()
    chosen = cands[pick]
    predicted = sum(u.nbytes(chosen[u.name], cfg.sym) for u in units)
    uniform = {label(c): sum(u.errors.get(c, float("nan")) for u in units) for c in choices}
    module_grids = {m: chosen[u.name] for u in units for m in u.modules}
    rows = [{"unit": u.name, "bits": chosen[u.name][0], "group_size": chosen[u.name][1], "params": u.params,
             "errors": {label(c): e for c, e in u.errors.items()},
             "block_errors": {label(c): e for c, e in u.block_errors.items()},
             "bytes": {label(c): u.nbytes(c, cfg.sym) for c in u.options(choices)},
             "pinned": None if u.pinned is None else list(u.pinned)} for u in units]
    alloc = Allocation(chosen, module_grids, budget, predicted, params,
                       sum(u.errors[chosen[u.name]] for u in units), uniform, time.perf_counter() - t0, rows,
                       pick, checked, {label(c): {"factor": f, "candidate": cands.sources[c]}
                                       for c, f in factors.items()})
    for n, c in checked.items():
        log.info("allocation candidate %-16s %.3f bits/weight, predicted KL %.4f, measured %s%s", n, c["avg_bits"],
                 c["predicted_kl"], f"{c['measured_kl']:.4f}" if "measured_kl" in c else "-",
                 "  <- kept" if n == pick else "")
    log.info("allocation: %.3f bits/weight predicted (budget %.3f), grids %s", alloc.avg_bits, avg_bits,
             {label(c): sum(1 for v in chosen.values() if v == c) for c in choices})
    return alloc
