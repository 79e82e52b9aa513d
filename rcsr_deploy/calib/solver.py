"""The one-layer solver: objective → grid → rounding for one weight matrix.

``quantize_linear(W, stats, cfg, name)`` turns a weight ``W`` and its calibration statistics
(``objective.LayerStats``: ``H``, ``D``; ``None`` for plain RTN) into a :class:`format.QuantizedTensor`
whose ``info`` carries the method, α and the objective values reported in ``quant_report.json``:

1. objective (``objective.prepare_target``): damped ``H`` (+ SARQC ``λ diag(s)``), the α-shifted
   target ``W_ref = W + α W D H⁻¹`` and its Cholesky factor;
2. grid (``grid.compute_grid``): group scales/zeros of ``W_ref`` (clip search weighted by ``H``);
3. rounding (``rounding.successive_round``): the one decode loop of GPTQ / SNRQ / K-SNRQ, or ``rtn``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RcsrError
from ..format import QuantizedTensor, expand_groups
from ..grid import compute_grid
from ..objective import (LayerStats, Target, closed_form_alpha, prepare_target, quadratic_objective,
                         shifted_target)
from ..rounding import decode_order, rtn, successive_round
from .config import AUTO_ALPHAS, QuantizeConfig


def quantize_linear(W: torch.Tensor, stats: LayerStats | None, cfg: QuantizeConfig, name: str) -> QuantizedTensor:
    """Objective → grid → rounding for one weight matrix (fp32, on the compute device)."""
    spec = cfg.spec_for(name)
    out_f, in_f = W.shape
    spec.validate(in_f, name)
    if not torch.isfinite(W).all():
        raise RcsrError(f"{name}: weights contain NaN/Inf")
    t0 = time.perf_counter()
    info: dict = {"method": cfg.method}
    if stats is None:  # plain RTN, no calibration
        scale, zero = compute_grid(W.float(), spec, clip=cfg.clip)
        S, Z = expand_groups(scale, spec, in_f), expand_groups(zero, spec, in_f)
        codes = rtn(W, S, Z, spec.maxq)
        q = (codes.float() - Z) * S
        info.update(rel_weight_error=float(((W - q).norm() / W.norm().clamp(min=1e-12)).item()))
        info["seconds"] = time.perf_counter() - t0
        return QuantizedTensor(codes.cpu(), scale.cpu(), zero.cpu(), None, spec, info=info)

    mode, a0 = cfg.alpha_mode
    if mode == "heldout":  # α chosen on held-out sequences, then one more decode at that α on all of them
        if cfg.method != "rtn":
            a0, info["alpha_validation"] = choose_alpha(W, stats, cfg, spec, name)
            info["alpha_mode"] = "heldout"
        mode = "fixed"
    sol = _solve(W, stats.H, stats.D, mode, a0, cfg, spec, name, cfg.effective_beam)
    if mode == "closed-form" and cfg.method != "rtn":
        info["alpha_start"] = a0
    if cfg.method != "rtn":
        info["alpha"] = sol.alpha
        info["beam"] = sol.beam
    q = sol.dequantized()
    tgt, W_ref = sol.target, sol.W_ref
    obj = quadratic_objective(W_ref, q, tgt.H)
    denom = quadratic_objective(W_ref, torch.zeros_like(W_ref), tgt.H)
    # calibration-output error vs the FP layer on the quantized-path inputs: ‖(W − Q) X̃‖² / ‖W X̃‖²
    out_err = quadratic_objective(tgt.W, q, stats.H) / max(quadratic_objective(tgt.W, torch.zeros_like(q), stats.H), 1e-30)
    info.update(objective=obj, rel_objective=obj / max(denom, 1e-30), rel_output_error=out_err,
                rel_weight_error=float(((tgt.W - q).norm() / tgt.W.norm().clamp(min=1e-12)).item()))
    info["seconds"] = time.perf_counter() - t0
    g_idx = sol.g_idx
    return QuantizedTensor(sol.codes.cpu(), sol.scale.cpu(), sol.zero.cpu(), None if g_idx is None else g_idx.cpu(),
                           spec, info=info)


@dataclass
class _Solution:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    S: torch.Tensor  # per-column expanded scales / zeros
    Z: torch.Tensor
    g_idx: torch.Tensor | None
    W_ref: torch.Tensor
    target: Target
    alpha: float | None
    beam: int

    def dequantized(self) -> torch.Tensor:
        return (self.codes.float() - self.Z) * self.S


def _solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, mode: str, a0: float, cfg: QuantizeConfig,
           spec, name: str, beam: int) -> _Solution:
    """Objective → grid → rounding for statistics ``H``/``D`` and α mode ``mode`` (fixed | sample |
    closed-form): the target ``W_ref``, its grid, and the decode (``rtn`` or the successive rounding)."""
    in_f = W.shape[1]
    tgt = prepare_target(W, H, D, alpha=a0, percdamp=cfg.percdamp,
                         sarqc_lambda=cfg.sarqc_lambda if cfg.method != "rtn" else 0.0, name=name)
    act = cfg.act_order != "none"
    order = decode_order(tgt.H, act)
    columns = order if cfg.act_order == "dynamic" else None
    g_idx = None
    if columns is not None:
        glen = spec.group_len(in_f)
        g_idx = torch.empty(in_f, dtype=torch.int32, device=W.device)
        g_idx[order] = (torch.arange(in_f, device=W.device) // glen).to(torch.int32)

    def grid_for(w_ref):
        scale, zero = compute_grid(w_ref, spec, clip=cfg.clip, H=H, w_fp=tgt.W,
                                   drift_lambda=cfg.sarqc_lambda if cfg.method == "rtn" else 0.0,
                                   columns=columns)
        return scale, zero, expand_groups(scale, spec, in_f, g_idx), expand_groups(zero, spec, in_f, g_idx)

    if cfg.method == "rtn":
        scale, zero, S, Z = grid_for(tgt.W)
        codes = rtn(tgt.W, S, Z, spec.maxq)
        return _Solution(codes, scale, zero, S, Z, g_idx, tgt.W, tgt, None, 1)
    alpha_used = None if mode == "sample" else a0
    W_ref = tgt.W_ref
    if mode == "closed-form":
        scale, zero, S, Z = grid_for(W_ref)
        q0 = (successive_round(W_ref, tgt.H, S, Z, spec.maxq, order, beam=1, block=cfg.block).codes.float() - Z) * S
        alpha_used = closed_form_alpha(tgt.W, q0, tgt.WD, tgt.L)
        W_ref = shifted_target(tgt.W, tgt.WD, tgt.L, alpha_used)
    scale, zero, S, Z = grid_for(W_ref)
    res = successive_round(W_ref, tgt.H, S, Z, spec.maxq, order, beam=beam, block=cfg.block)
    return _Solution(res.codes, scale, zero, S, Z, g_idx, W_ref, tgt, alpha_used, beam)


def choose_alpha(W: torch.Tensor, stats: LayerStats, cfg: QuantizeConfig, spec, name: str) -> tuple[float, dict]:
    """``--alpha heldout``: quantize at every α of ``AUTO_ALPHAS`` on the fitted (not held-out) sequences and
    return the α whose result has the smallest relative held-out error ``‖W X_v − Q X̃_v‖² / ‖W X_v‖²``
    (``objective.HeldOutStats.error``; ties go to the smaller α), with ``{α: error}``.

    The candidates are decoded greedily (beam 1) whatever ``--beam`` is: the choice is about the target.
    Without held-out or fitted tokens (an expert the router sends few tokens) it returns α = 0."""
    if stats.val is None or stats.D is None:
        raise RcsrError(f"{name}: --alpha heldout needs held-out statistics (internal error)")
    H_fit, D_fit, n_fit = stats.fit()
    if stats.val.tokens == 0 or n_fit == 0:
        return 0.0, {"held_out_tokens": stats.val.tokens, "fit_tokens": n_fit}
    errors = {}
    for a in AUTO_ALPHAS:
        sol = _solve(W, H_fit, D_fit, "fixed", a, cfg, spec, f"{name} (alpha {a}, fit)", 1)
        errors[a] = stats.val.error(sol.target.W, sol.dequantized())
    best = min(AUTO_ALPHAS, key=lambda a: (errors[a], a))
    return best, {"held_out_tokens": stats.val.tokens, "fit_tokens": n_fit,
                  "errors": {str(a): e for a, e in errors.items()}}


def dequant_into(module: nn.Module, r: QuantizedTensor) -> None:
    """Write ``r``'s dequantized weights into ``module.weight`` (so later layers see the quantized path)."""
    in_f = module.weight.shape[1]
    S = expand_groups(r.scale, r.spec, in_f, r.g_idx)
    Z = expand_groups(r.zero, r.spec, in_f, r.g_idx)
    with torch.no_grad():
        module.weight.copy_(((r.codes.float() - Z) * S).to(module.weight.device, module.weight.dtype))
