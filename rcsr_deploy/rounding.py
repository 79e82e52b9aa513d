"""Rounding: RTN and one successive-rounding decode loop serving GPTQ, SNRQ and K-SNRQ.

Every Gram-based method minimises, independently for each output row ``w`` of the target ``W_ref``,

    f(q) = (w − q) H (w − q)ᵀ,        q on the grid  {(c − z_g) s_g : c = 0 … 2^b − 1},

with ``H`` the damped (SARQC-augmented) Gram matrix.  Columns are decoded in an order ``π``
(act-order: ``diag H`` descending).  Write ``H_π = T Tᵀ`` with ``T`` *upper* triangular (``T = J chol(J H_π
J) J``, ``J`` the reversal) and ``A_jk = T_jk / T_kk`` for ``j < k``.  Then, exactly,

    f(q) = Σ_k T_kk² (ŵ_k − q_k)²,    ŵ_k = w_k + Σ_{j<k} (w_j − q_j) A_jk,

so choosing ``q_k`` after ``q_1 … q_{k−1}`` is a one-dimensional problem with the error feedback
``ŵ_k`` (Babai's nearest plane / LDLQ).

* **GPTQ** — ``W_ref = W`` (α = 0), greedy: ``q_k = round(ŵ_k)``.  This is the same algorithm as GPTQ's
  inverse-Hessian error propagation in the same order (checked against a classic implementation in
  the tests).
* **SNRQ** — the same greedy rule on the α-regularized target ``W_ref = W (H + αD) H⁻¹``.
* **K-SNRQ** — bounded beam search on the same tree: every row keeps ``K`` partial solutions; column
  ``k`` extends each beam by its candidate codes with cost ``T_kk² (ŵ_k^{(beam)} − q)²``, keeps the ``K``
  cheapest of all extensions (remembering parent and code) and finally returns the best beam.
  For a fixed parent the cost is monotone in ``|ŵ − q|``, so only each beam's ``K`` nearest grid
  codes (a window of ``K`` consecutive codes) can survive: we score ``min(K, 2^b)`` codes per beam,
  which is exactly equivalent to scoring all ``2^b``.  ``K = 1`` is SNRQ; ``K ≥ 2^{b(n−1)}`` is exhaustive search.
  Beam pruning can drop the greedy path, so the greedy (SNRQ) path rides along in an extra slot of the
  same loop (never pruned, never a parent of the beams); rows where it ends below every beam keep the
  greedy codes, so K-SNRQ's objective is never above SNRQ's.

Implementation: blocks of ``block`` columns.  The feedback from earlier blocks enters once per block
as a matrix product ``E_{<b} A_{<b, b}`` (``E`` = per-beam errors ``w − q``), feedback inside a block is a
rank-1 update per column; beam bookkeeping inside a block tracks each beam's ancestor at the block
start so that the long history is re-gathered once per block.  Rows are processed in chunks to
bound memory (``rows·K·in`` floats).  Nothing loops over rows in Python.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .grid import quantize_to_grid


@dataclass
class RoundingResult:
    codes: torch.Tensor  # uint8 [out, in], original column order
    objective: torch.Tensor  # float64 [out]: f(q) per row (the decode's own accounting)


def decode_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Decode order: diag(H) descending (act-order, stable) or natural order."""
    n = H.shape[0]
    if not act_order:
        return torch.arange(n, device=H.device)
    return torch.argsort(torch.diag(H), descending=True, stable=True)


def upper_factor(Hp: torch.Tensor) -> torch.Tensor:
    """Upper-triangular ``T`` with ``Hp = T Tᵀ`` (reverse-order Cholesky)."""
    L = torch.linalg.cholesky(torch.flip(Hp, (0, 1)))
    return torch.flip(L, (0, 1))


def rtn(W: torch.Tensor, scale_cols: torch.Tensor, zero_cols: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round-to-nearest codes (uint8) for per-column scale/zero ``[out, in]``."""
    return quantize_to_grid(W.float(), scale_cols, zero_cols, maxq).to(torch.uint8)


def successive_round(
    W_ref: torch.Tensor,
    H: torch.Tensor,
    scale_cols: torch.Tensor,
    zero_cols: torch.Tensor,
    maxq: int,
    order: torch.Tensor,
    *,
    beam: int = 1,
    block: int = 128,
    max_state_bytes: int = 512 * 2**20,
) -> RoundingResult:
    """Greedy (``beam=1``) or beam-search successive rounding of ``W_ref`` under ``H`` (see module doc).

    ``scale_cols``/``zero_cols`` give each column's grid (``[out, in]``, original order); ``order`` is
    the decode order (a permutation of ``range(in)``).
    """
    out_f, n = W_ref.shape
    K = int(beam)
    if K < 1:
        raise ValueError("beam must be >= 1")
    dev = W_ref.device
    order = order.to(dev)
    Hp = H[order][:, order].double()
    T = upper_factor(Hp)
    tdiag = torch.diag(T)
    A = (T / tdiag.unsqueeze(0)).float()  # A[j, k] = T_jk / T_kk
    A.fill_diagonal_(0.0)
    t2 = (tdiag ** 2).float()
    Wp = W_ref[:, order].float()
    Sp = scale_cols[:, order].float()
    Zp = zero_cols[:, order].float()

    slots = K + (K > 1)  # K beams (+ the greedy path's slot)
    per_row = max(1, slots * n * (4 + 1) * 2)  # errors fp32 + codes uint8, x2 for gathers
    rows_per_chunk = max(1, min(out_f, max_state_bytes // per_row))
    codes = torch.empty(out_f, n, dtype=torch.uint8, device=dev)
    objective = torch.empty(out_f, dtype=torch.float64, device=dev)
    for r0 in range(0, out_f, rows_per_chunk):
        r1 = min(out_f, r0 + rows_per_chunk)
        # beams re-gather their block-local state every column: shorter blocks are cheaper there
        c, o = _decode_rows(Wp[r0:r1], Sp[r0:r1], Zp[r0:r1], A, t2, maxq, K, block if K == 1 else min(block, 64))
        codes[r0:r1] = c
        objective[r0:r1] = o
    inv = torch.argsort(order)
    return RoundingResult(codes=codes[:, inv], objective=objective)


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """The column loop issues many small ops: on CPU run it on one thread.

    Multi-threaded tiny ops gain nothing and, on a loaded machine, OpenMP barriers make them up to
    50x slower (measured: 9.2 s vs 0.16 s for one 1536x576 greedy decode at load average 5)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _decode_rows(Wp, Sp, Zp, A, t2, maxq: int, K: int, block: int):
    """Decode a chunk of rows (all tensors already in decode order).

    For ``K > 1`` slot ``K`` of the state follows the greedy path (its own parent at every column);
    the result is the best beam, or the greedy codes where those are cheaper."""
    R, n = Wp.shape
    dev = Wp.device
    G = int(K > 1)  # the greedy path's extra slot
    SL = K + G
    E = torch.zeros(R, SL, n, dtype=torch.float32, device=dev)  # w − q per beam
    C = torch.zeros(R, SL, n, dtype=torch.uint8, device=dev)  # codes per beam
    cost = torch.full((R, K), float("inf"), dtype=torch.float64, device=dev)
    cost[:, 0] = 0.0
    gcost = torch.zeros(R, 1, dtype=torch.float64, device=dev)
    greedy_parent = torch.full((R, 1), K, dtype=torch.long, device=dev)
    # The K nearest grid codes of a point u are the window [c0, c0 + K − 1], c0 = floor(u − (K−1)/2 + ½)
    # clamped into [0, maxq + 1 − K]; only they can survive the top-K of one parent.
    width = min(K, maxq + 1)
    shift = (width - 1) / 2 - 0.5
    offsets = torch.arange(width, device=dev, dtype=torch.float64)
    rows = torch.arange(R, device=dev)
    row_base = (rows * SL).unsqueeze(1)  # flat index of slot 0 of each row in [R*SL, ...] views
    t2s2 = t2.double().unsqueeze(0) * Sp.double() ** 2  # per-column cost scale in code units

    def regather(t: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """t[r, k, :] <- t[r, parent[r, k], :] (row copies via index_select, much faster than gather).

        ``t`` may be a column slice of a contiguous ``[R, SL, ·]`` tensor; the result is contiguous."""
        flat = (row_base + parent).reshape(-1)
        return t.reshape(R * SL, -1).index_select(0, flat).reshape(t.shape)

    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        B = b1 - b0
        if b0:
            tail = torch.matmul(E[:, :, :b0], A[:b0, b0:b1])  # [R, SL, B]
        else:
            tail = torch.zeros(R, SL, B, dtype=torch.float32, device=dev)
        e_hist = torch.empty(R, SL, B, dtype=torch.float32, device=dev)  # by beam index *at* that column
        q_hist = torch.empty(R, SL, B, dtype=torch.uint8, device=dev)
        parents = []  # beam back-pointers per column (K > 1)
        with _single_thread(dev):
            for jj in range(B):
                j = b0 + jj
                w = Wp[:, j].unsqueeze(1)  # [R, 1]
                s = Sp[:, j].unsqueeze(1)
                z = Zp[:, j].unsqueeze(1)
                what = w + tail[:, :, 0]  # [R, SL]; tail holds columns jj..B-1 of the block
                if K == 1:
                    q = torch.clamp(torch.round(what / s) + z, 0, maxq)
                    v = (q - z) * s
                    cost += (t2[j] * (what - v) ** 2).double()
                    tail = tail[:, :, 1:]
                else:
                    u = (what[:, :K] / s + z).double()  # continuous code
                    c0 = torch.clamp(torch.floor(u - shift), 0, maxq + 1 - width)
                    d = (u - c0).unsqueeze(-1) - offsets  # [R, K, width] distance in code units
                    tot = torch.addcmul(cost.unsqueeze(-1), d * d, t2s2[:, j].view(R, 1, 1))
                    cost, idx = torch.topk(tot.reshape(R, -1), K, dim=1, largest=False, sorted=True)
                    parent = torch.div(idx, width, rounding_mode="floor")
                    q = (c0.gather(1, parent) + (idx - parent * width)).float()
                    # the greedy slot: SNRQ's rule and accounting on its own error feedback
                    wg = what[:, K:]
                    qg = torch.clamp(torch.round(wg / s) + z, 0, maxq)
                    gcost += (t2[j] * (wg - (qg - z) * s) ** 2).double()
                    q = torch.cat([q, qg], dim=1)
                    parent = torch.cat([parent, greedy_parent], dim=1)
                    v = (q - z) * s
                    parents.append(parent)
                    tail = regather(tail[:, :, 1:], parent)  # only the columns still to come follow
                e = w - v  # [R, K]
                e_hist[:, :, jj] = e
                q_hist[:, :, jj] = q.to(torch.uint8)
                if jj + 1 < B:
                    tail.addcmul_(e.unsqueeze(-1), A[j, j + 1:b1])
        if K == 1:
            E[:, :, b0:b1] = e_hist
            C[:, :, b0:b1] = q_hist
            continue
        # Backtrack each final beam through the block, then re-gather the history before the block.
        idx = torch.arange(SL, device=dev).expand(R, SL)
        for jj in range(B - 1, -1, -1):
            E[:, :, b0 + jj] = e_hist[:, :, jj].gather(1, idx)
            C[:, :, b0 + jj] = q_hist[:, :, jj].gather(1, idx)
            idx = parents[jj].gather(1, idx)
        if b0:
            E[:, :, :b0] = regather(E[:, :, :b0].contiguous(), idx)
            C[:, :, :b0] = regather(C[:, :, :b0].contiguous(), idx)
    best = torch.argmin(cost, dim=1)
    codes, obj = C[rows, best], cost[rows, best]
    if G:
        better = gcost[:, 0] < obj
        codes[better], obj[better] = C[rows, K][better], gcost[better, 0]
    return codes, obj
