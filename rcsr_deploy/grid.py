"""Quantization grids: per-(row, group) scale and integer zero point, and round-to-grid.

Dequantization everywhere in this project (quantizer, checkpoint, plugin, kernels) is

    w[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)],     q in {0, ..., 2**bits - 1}

with ``g(i) = i // group_size`` (static groups) or ``g(i) = group_index[i]`` (dynamic act-order
groups), ``s`` stored as float16 and ``z`` an integer.  Symmetric grids are GPTQ's: ``z = 2**(bits-1)``
and ``s = 2 max|w| / (2**bits - 1)``, levels ``-2**(bits-1) s ... (2**(bits-1) - 1) s`` (vLLM's
"uint4b8" for 4 bits).  Asymmetric grids map ``[min(w, 0), max(w, 0)]`` onto ``[0, 2**bits - 1]``.

Scales are rounded to float16 *before* any rounding decision so that the codes chosen by the
quantizer are optimal for the scales actually stored.
"""
from __future__ import annotations

import torch

from .errors import RcsrError
from .format import QuantSpec, dequantize, expand_groups  # noqa: F401  (the grid's meaning, re-exported)

FP16_MIN_SCALE = 2.0 ** -14  # smallest normal float16: scales below it lose precision in storage


def _minmax_params(w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0):
    """Scale/zero of each row of ``w`` ([..., n]) for the range shrunk by ``shrink``."""
    maxq = spec.maxq
    if spec.sym:
        xmax = w.abs().amax(-1) * shrink
        scale = 2 * xmax / maxq
        scale = _fp16_scale(scale)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        xmin = w.amin(-1).clamp(max=0) * shrink
        xmax = w.amax(-1).clamp(min=0) * shrink
        scale = _fp16_scale((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=FP16_MIN_SCALE).to(torch.float16).to(torch.float32)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid code (float tensor of integers) of ``w`` for broadcastable scale/zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return (quantize_to_grid(w, scale, zero, maxq) - zero) * scale


def compute_grid(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    clip: str = "minmax",
    H: torch.Tensor | None = None,
    drift_lambda: float = 0.0,
    w_fp: torch.Tensor | None = None,
    grid_points: int = 20,
    max_shrink: float = 0.5,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales and zeros of ``w`` ([out, in]) -> (scale, zero), each ``[out, n_groups]`` fp32.

    ``columns`` (optional permutation of ``range(in)``) forms groups from consecutive entries of
    ``w[:, columns]`` (dynamic act-order groups); by default groups are consecutive columns.

    ``clip``:
      * ``"minmax"``: the full range of each group.
      * ``"mse"``: per group ``g``, try range shrink factors ``1, 1 − max_shrink/grid_points, …,
        1 − max_shrink`` and keep the one minimising the group's loss for the rounded weights
        ``q = RTN(w_g)``:

            loss_g = e_g H_gg e_gᵀ + λ Σ_{j∈g} s_j (w_fp,j − q_j)²,   e_g = w_g − q_g,

        with ``H_gg`` the group's diagonal block of the calibration Gram matrix (output-error proxy,
        AWQ/GPTQ-style clip search; identity when ``H`` is None) and the SARQC drift term (saliency
        ``s = diag H``, drift measured from the FP weights ``w_fp``; off when ``λ = 0``).
    """
    out_f, in_f = w.shape
    spec.validate(in_f)
    glen = spec.group_len(in_f)
    ng = spec.groups(in_f)
    perm = columns if columns is not None else None
    wp = w if perm is None else w[:, perm]
    wg = wp.reshape(out_f, ng, glen).float()
    if clip == "minmax":
        return _minmax_params(wg, spec)
    if clip != "mse":
        raise RcsrError(f"unknown clip mode {clip!r} (minmax or mse)")
    if H is not None:
        Hp = H.float() if perm is None else H.float()[perm][:, perm]
        blocks = torch.stack([Hp[g * glen:(g + 1) * glen, g * glen:(g + 1) * glen] for g in range(ng)])
        sal = torch.diagonal(Hp).reshape(1, ng, glen)
    else:
        blocks = None
        sal = torch.ones(1, ng, glen, device=w.device)
    drift = drift_lambda > 0 and w_fp is not None
    if drift:
        fg = (w_fp if perm is None else w_fp[:, perm]).reshape(out_f, ng, glen).float()
    best_err = torch.full((out_f, ng), float("inf"), device=w.device)
    best_scale, best_zero = _minmax_params(wg, spec)
    for k in range(grid_points + 1):
        shrink = 1.0 - max_shrink * k / grid_points
        scale, zero = _minmax_params(wg, spec, shrink)
        q = fake_quant(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.maxq)
        e = wg - q
        if blocks is None:
            err = (e * e).sum(-1)
        else:
            err = torch.einsum("ogi,gij,ogj->og", e, blocks, e)
        if drift:
            err = err + drift_lambda * (sal * (fg - q) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
