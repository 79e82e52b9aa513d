"""Layer objectives: statistics (H, D), damping, α-regularized target, SARQC drift penalty.

Notation (per linear layer, weights ``W`` ``[out, in]``, inputs as columns ``[in, tokens]``):

* ``X̃`` — the layer input on the *quantized path* (earlier layers already quantized),
  ``X`` — the input on the *full-precision path*, ``ΔX = X − X̃``.
* ``H = (2/N) Σ X̃ X̃ᵀ`` and ``D = (2/N) Σ ΔX X̃ᵀ`` (not symmetric), accumulated in fp32.

α-interpolated calibration minimises ``‖W(αX + (1−α)X̃) − Q X̃‖²``.  Expanding,
``‖(W−Q)X̃ + αWΔX‖² = tr((W_ref − Q) H (W_ref − Q)ᵀ) + const`` with the shifted target

    W_ref = W (H + αD) H⁻¹ = W + α W D H⁻¹,

so every rounding method keeps GPTQ's quadratic form.  α = 0 is GPTQ's objective, α = 1 GPTAQ's
(asymmetric calibration).  α choices:

* fixed;
* sampled per sequence: ``u ~ Beta(m, m)``, ``α_s = min(u, 1−u) ∈ [0, 0.5]``, and ``ΔX_s`` is scaled by
  ``α_s`` before it enters ``D`` (then ``W_ref = W (H + D) H⁻¹``);
* closed form: given a quantized point ``Q₀`` (the α = 0 decode), the α minimising
  ``‖W_ref(α) − Q₀‖²_H`` is ``α* = clamp(⟨Q₀ − W, W D⟩_F / tr(W D H⁻¹ (W D)ᵀ), 0, 1)``;
* heldout (chosen from data, per layer): every 4th calibration sequence is held back
  (``holdout_sequences``).  For each candidate α in ``AUTO_ALPHAS`` the layer is quantized on the
  other sequences (``H_fit``, ``D_fit``); the candidate whose ``Q_α`` has the smallest *held-out*
  error of the quantized path against the FP output,

      e_v(Q) = ‖W X_v − Q X̃_v‖² = tr(E H_v Eᵀ) + 2⟨E, W D_v⟩ + tr(W G_v Wᵀ),   E = W − Q,
      G_v = ΔX_v ΔX_vᵀ,

  wins, and the layer is quantized once more at that α on all sequences.  α = 0 (GPTQ) is a
  candidate, so where the regularized target does not generalise better than GPTQ's, GPTQ's target
  is kept.  ``e_v`` is the error every α trades off (α = 1 minimises it on the fitted sequences, α = 0
  ignores its ``ΔX`` part); judging it on unseen sequences is what keeps the choice honest.

SARQC (saliency-aware regularized calibration) adds a drift penalty on the deviation from the FP
weights, weighted per input channel by a saliency ``s_j``:

    tr((W_ref − Q) H (W_ref − Q)ᵀ) + λ Σ_j s_j ‖W[:, j] − Q[:, j]‖²
      = tr((W'_ref − Q) H' (W'_ref − Q)ᵀ) + const,
    H' = H + λ diag(s),   W'_ref = W (H' + αD) H'⁻¹,

i.e. the Gram-based pipeline only swaps ``H`` for ``H'`` (in the target *and* the Cholesky factor used
by the rounding).  We take ``s = diag(H)`` — the mean squared activation of each input channel, the
same statistic AWQ uses to find salient channels — so ``λ`` is dimensionless: ``λ = 1`` doubles the
diagonal.  λ → ∞ makes ``H'`` diagonal and ``W'_ref → W``: successive rounding then degenerates to
RTN.  The grid-search pipeline (``grid.compute_grid(clip="mse")``) adds the same ``λ s_j`` weights to
its per-channel error weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RcsrError

log = logging.getLogger(__name__)


#: every ``HOLDOUT_EVERY``-th calibration sequence is held back by ``--alpha heldout``
HOLDOUT_EVERY = 4


def holdout_sequences(n: int) -> torch.Tensor:
    """Boolean ``[n]``: the calibration sequences ``--alpha heldout`` holds back (``s % 4 == 3``; with
    fewer than four sequences the last one)."""
    mask = torch.arange(n) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if not mask.any() and n >= 2:
        mask[-1] = True
    return mask


class LayerStats:
    """Running fp32 accumulators ``H`` and ``D`` for one linear layer (or a group sharing inputs).

    With ``holdout=True`` the rows flagged ``held_out`` in :meth:`add` are *also* accumulated into
    ``self.val`` (their ``H``, unscaled ``D`` and ``G = ΔX ΔXᵀ``), for ``--alpha heldout``;
    :meth:`fit` gives ``H``/``D`` of the other rows."""

    def __init__(self, in_features: int, device: torch.device | str, with_d: bool, holdout: bool = False):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.D = torch.zeros_like(self.H) if with_d else None
        self.tokens = 0
        self.val = HeldOutStats(in_features, device) if holdout else None

    def add(self, x_q: torch.Tensor, x_fp: torch.Tensor | None = None, dx_scale=1.0, held_out=None) -> None:
        """Add sequences: ``x_q``/``x_fp`` are ``[B, L, in]`` (or ``[L, in]``) inputs on the quantized /
        FP path; ``dx_scale`` (float or ``[B]``) scales each sequence's ``ΔX`` (sampled α);
        ``held_out`` (bool ``[B]``) flags the rows that also go to the held-out statistics."""
        if x_q.dim() == 2:
            x_q = x_q.unsqueeze(0)
            x_fp = None if x_fp is None else x_fp.unsqueeze(0)
        a = x_q.float()
        if not torch.isfinite(a).all():
            raise RcsrError("non-finite (NaN/Inf) activations reached a linear layer during calibration")
        if self.val is not None and held_out is not None:
            rows = torch.as_tensor(held_out, dtype=torch.bool).to(a.device).nonzero().flatten()
            if rows.numel():
                self.val.add(a[rows], x_fp[rows].float())
        n = a.shape[0] * a.shape[1]
        total = self.tokens + n
        keep = self.tokens / total
        a_s = a.reshape(-1, a.shape[-1]) * math.sqrt(2.0 / total)
        self.H.mul_(keep).addmm_(a_s.T, a_s)
        if self.D is not None:
            if x_fp is None:
                raise ValueError("x_fp is required when D is accumulated")
            scale = torch.as_tensor(dx_scale, dtype=torch.float32, device=a.device).reshape(-1, 1, 1)
            dx = ((x_fp.float() - a) * (scale * math.sqrt(2.0 / total))).reshape(-1, a.shape[-1])
            self.D.mul_(keep).addmm_(dx.T, a_s)
        self.tokens = total

    @classmethod
    def merged(cls, parts: list["LayerStats"]) -> "LayerStats":
        """The statistics of the union of ``parts``' rows (token-weighted means of ``H``, ``D`` and the
        held-out statistics), as if every row had been added to one accumulator."""
        out = cls.__new__(cls)
        n = sum(p.tokens for p in parts)
        w = [p.tokens / max(n, 1) for p in parts]
        out.H = sum(wi * p.H for wi, p in zip(w, parts))
        out.D = None if parts[0].D is None else sum(wi * p.D for wi, p in zip(w, parts))
        out.tokens = n
        out.val = None
        if parts[0].val is not None:
            out.val = HeldOutStats.__new__(HeldOutStats)
            nv = sum(p.val.tokens for p in parts)
            wv = [p.val.tokens / max(nv, 1) for p in parts]
            for k in ("H", "D", "G"):
                setattr(out.val, k, sum(wi * getattr(p.val, k) for wi, p in zip(wv, parts)))
            out.val.tokens = nv
        return out

    def fit(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """``(H, D, tokens)`` of the rows *not* held out (``D`` unscaled: ``--alpha auto`` adds no
        per-sequence scale)."""
        n, nv = self.tokens, self.val.tokens
        nf = n - nv
        if nf <= 0:
            return self.H, self.D, 0
        H = (self.H * n - self.val.H * nv) / nf
        D = None if self.D is None else (self.D * n - self.val.D * nv) / nf
        return H, D, nf


class HeldOutStats:
    """``H_v = (2/N) Σ X̃X̃ᵀ``, ``D_v = (2/N) Σ ΔX X̃ᵀ``, ``G_v = (2/N) Σ ΔX ΔXᵀ`` of held-out rows."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.D = torch.zeros_like(self.H)
        self.G = torch.zeros_like(self.H)
        self.tokens = 0

    def add(self, a: torch.Tensor, x_fp: torch.Tensor) -> None:
        n = a.shape[0] * a.shape[1]
        total = self.tokens + n
        keep = self.tokens / total
        c = math.sqrt(2.0 / total)
        a_s = a.reshape(-1, a.shape[-1]) * c
        dx = (x_fp - a).reshape(-1, a.shape[-1]) * c
        self.H.mul_(keep).addmm_(a_s.T, a_s)
        self.D.mul_(keep).addmm_(dx.T, a_s)
        self.G.mul_(keep).addmm_(dx.T, dx)
        self.tokens = total

    def error(self, W: torch.Tensor, Q: torch.Tensor) -> float:
        """Relative held-out error ``‖W X_v − Q X̃_v‖² / ‖W X_v‖²`` (fp64), ``X_v = X̃_v + ΔX_v``."""
        W, E = W.double(), (W - Q).double()
        H, D, G = self.H.double(), self.D.double(), self.G.double()
        WD = W @ D
        err = torch.sum((E @ H) * E) + 2 * torch.sum(E * WD) + torch.sum((W @ G) * W)
        ref = torch.sum((W @ H) * W) + 2 * torch.sum(W * WD) + torch.sum((W @ G) * W)
        return float(err / ref.clamp(min=1e-30))


def sample_alphas(n: int, m: float, seed: int) -> np.ndarray:
    """Per-sequence α_s = min(u, 1−u), u ~ Beta(m, m) (deterministic for ``seed``)."""
    u = np.random.default_rng(seed).beta(m, m, size=n)
    return np.minimum(u, 1.0 - u)


def damped_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer", max_tries: int = 6):
    """Add ``percdamp · mean(diag H)`` to the diagonal; on Cholesky failure multiply the damping by 10.

    Returns ``(H_damped, L)`` with ``L`` lower-triangular, ``H_damped = L Lᵀ``.  Works on a copy.
    """
    mean_diag = torch.diag(H).mean().item()
    if not math.isfinite(mean_diag):
        raise RcsrError(f"{name}: non-finite Hessian (NaN/Inf activations)")
    if mean_diag <= 0:
        mean_diag = 1.0
    damp = percdamp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_tries):
        Hd = H + (damp * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            if attempt:
                log.warning("%s: Cholesky needed damping %.3g (raised %d times)", name, damp, attempt)
            return Hd, L
        log.warning("%s: Cholesky failed at damping %.3g; raising it", name, damp)
        damp *= 10
    raise RcsrError(f"{name}: Cholesky factorisation failed even with damping {damp / 10:.3g}")


@dataclass
class Target:
    """What the rounding sees: target ``W_ref`` and the (damped, SARQC-augmented) Gram matrix ``H``."""

    W: torch.Tensor  # FP weights (dead input channels zeroed)
    W_ref: torch.Tensor
    H: torch.Tensor
    L: torch.Tensor  # cholesky(H), lower
    alpha: float | None  # None when sampled per sequence
    WD: torch.Tensor | None  # W D (needed for the closed-form α)


def prepare_target(
    W: torch.Tensor,
    H: torch.Tensor,
    D: torch.Tensor | None,
    *,
    alpha: float,
    percdamp: float = 0.01,
    sarqc_lambda: float = 0.0,
    name: str = "layer",
) -> Target:
    """Dead channels, damping, SARQC ``H' = H + λ diag(diag H)`` and ``W_ref = W + α W D H'⁻¹``.

    ``alpha`` multiplies ``D`` (pass 1.0 when ``D`` was built with per-sequence sampled α).
    """
    W = W.float().clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    if sarqc_lambda:
        if sarqc_lambda < 0:
            raise RcsrError("--sarqc-lambda must be >= 0")
        H = H + sarqc_lambda * torch.diag(torch.diag(H))
    Hd, L = damped_cholesky(H, percdamp, name)
    WD = None
    if D is not None:
        Dm = D.clone()
        Dm[:, dead] = 0.0
        WD = W @ Dm
    W_ref = shifted_target(W, WD, L, alpha)
    if not torch.isfinite(W_ref).all():
        raise RcsrError(f"{name}: the regularized target W_ref is not finite")
    return Target(W=W, W_ref=W_ref, H=Hd, L=L, alpha=alpha, WD=WD)


def shifted_target(W: torch.Tensor, WD: torch.Tensor | None, L: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W_ref = W + α (W D) H⁻¹`` with ``H = L Lᵀ``."""
    if WD is None or alpha == 0.0:
        return W
    return W + alpha * torch.cholesky_solve(WD.T.contiguous(), L).T


def closed_form_alpha(W: torch.Tensor, Q0: torch.Tensor, WD: torch.Tensor, L: torch.Tensor) -> float:
    """``α* = clamp(⟨Q₀ − W, W D⟩ / tr(W D H⁻¹ (W D)ᵀ), 0, 1)`` — the minimiser of ``‖W_ref(α) − Q₀‖²_H``."""
    num = torch.sum((Q0 - W.float()) * WD).item()
    WDHinv = torch.cholesky_solve(WD.T.contiguous(), L).T
    den = torch.sum(WDHinv * WD).item()
    if den <= 0 or not math.isfinite(den):
        return 0.0
    return float(min(max(num / den, 0.0), 1.0))


def quadratic_objective(W_ref: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W_ref − Q) H (W_ref − Q)ᵀ)`` in fp64."""
    E = (W_ref - Q).double()
    return float(torch.sum((E @ H.double()) * E).item())
