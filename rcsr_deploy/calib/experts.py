"""Mixture-of-Experts: every expert calibrated on the tokens its router sends it.

For one fused experts module (``adapter.ExpertsModule``) of a block, after the block's linear groups:

1. **gate/up.**  Both streams are run up to the experts call (forward cut short there): the
   quantized path gives the experts' input ``X̃`` and the routing ``top_k_index`` of its (quantized-path)
   router; the FP path gives ``X`` for the *same tokens*.  Routing follows the quantized path, so that
   an expert is calibrated on the tokens it will see once deployed, and ``D = ΔX X̃ᵀ`` pairs each token's
   two inputs.  Per expert ``e``: ``H_e``, ``D_e`` from its routed tokens (sampled α: each token carries
   its sequence's α), then ``gate_proj[e]`` and ``up_proj[e]`` are quantized (one set of statistics,
   as for a dense layer's gate/up) and written back dequantized.
2. **down.**  The same tokens again: the quantized path's input of ``down_proj[e]`` is
   ``act(X̃ G̃ᵀ) ⊙ (X̃ Ũᵀ)`` with the just-quantized gate/up, the FP path's ``act(X Gᵀ) ⊙ (X Uᵀ)`` with the
   FP ones (with the module's own biases and gating where it has them: GPT-OSS's clamped SwiGLU);
   ``down_proj[e]`` is quantized on those.

**Experts with few routed tokens.**  ``H_e`` from a handful of tokens is rank-deficient: the damping
dominates it and the solver would "protect" a few directions at random.  An expert with fewer than
``cfg.moe_min_tokens`` routed tokens (zero included) takes ``cfg.moe_fallback``:

* ``all`` (default): *all* tokens that reach the experts module — the input distribution of the whole
  block, the best estimate of an expert's inputs without routing evidence (what llm-compressor uses for
  every expert);
* ``neighbours``: the routed tokens of the experts whose router rows are most similar (cosine) to its
  own, nearest first, until they hold ``moe_min_tokens`` tokens — the tokens the router would send it
  if its logit were a little higher; its ``down_proj`` sees those tokens through its own gate/up;
* ``rtn``: no calibration, round to nearest with the weight-MSE clip search.

``cfg.moe_calib = "all"`` calibrates every expert on all tokens.  Each expert's report entry records its
routed token count and what it was calibrated on (``tokens``, ``calibration``: ``routed`` |
``all-tokens`` | ``neighbours`` with ``neighbours: [experts]`` | ``rtn``), and the fallbacks are logged.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..errors import RcsrError
from ..format import QuantizedTensor
from ..objective import LayerStats, holdout_sequences, sample_alphas
from .adapter import ExpertsModule
from .config import QuantizeConfig
from .solver import quantize_linear
from .streams import collect_calls

log = logging.getLogger(__name__)


def _calls(block, module, stream, kwargs, streams):
    return collect_calls(block, module, stream, kwargs, streams.device, streams.dtype, streams.bs)


def _experts_inputs(block, fp_block, ex: ExpertsModule, fp_ex: ExpertsModule | None, streams, i: int):
    """Per mini-batch: (b0, tokens per sequence, X̃ [T, H], X [T, H] or None, top_k_index [T, k])."""
    kwargs = streams.kwargs[i]
    q_iter = _calls(block, ex.module, streams.q, kwargs, streams)
    fp_iter = _calls(fp_block, fp_ex.module, streams.fp, kwargs, streams) if fp_ex is not None else None
    seq_len = streams.q.shape[1]
    try:
        for b0, args, kw in q_iter:
            xq = args[0]
            idx = args[1] if len(args) > 1 else kw["top_k_index"]
            xf = next(fp_iter)[1][0] if fp_iter is not None else None
            yield b0, seq_len, xq.reshape(-1, xq.shape[-1]), None if xf is None else xf.reshape(-1, xf.shape[-1]), \
                idx.reshape(-1, idx.shape[-1])
    finally:
        q_iter.close()
        if fp_iter is not None:
            fp_iter.close()


def _token_alphas(alphas, b0: int, seq_len: int, rows: torch.Tensor):
    """Each token's sequence α (sampled mode), or 1.0."""
    if alphas is None:
        return 1.0
    return alphas[b0 + torch.div(rows.cpu(), seq_len, rounding_mode="floor")]


def _token_held_out(held, b0: int, seq_len: int, rows: torch.Tensor):
    """Which tokens belong to a held-back sequence (``--alpha heldout``), or None."""
    if held is None:
        return None
    return held[b0 + torch.div(rows.cpu(), seq_len, rounding_mode="floor")]


def calibrate_experts(block, fp_block, i: int, name: str, streams, cfg: QuantizeConfig, prefix: str,
                      seed: int, bar=None) -> dict[str, QuantizedTensor]:
    """Quantize every expert of the fused experts module ``name`` of block ``i`` (see the module doc)."""
    from .adapter import experts_modules

    ex = experts_modules(block)[name]
    fp_ex = experts_modules(fp_block)[name] if fp_block is not None else None
    n_exp, device = ex.num_experts, streams.device
    mode, _ = cfg.alpha_mode
    with_d = streams.fp is not None
    alphas = sample_alphas(streams.q.shape[0], cfg.alpha_m, seed) if mode == "sample" else None
    held = holdout_sequences(streams.q.shape[0]) if mode == "heldout" else None
    hidden = ex.weight(0, "gate_proj").shape[1]
    inter = ex.intermediate

    # 1. routed tokens -> H_e, D_e of gate/up (and of all tokens, for the fallback)
    counts = torch.zeros(n_exp, dtype=torch.long)
    stats = [LayerStats(hidden, device, with_d, holdout=held is not None) for _ in range(n_exp)]
    stats_all = LayerStats(hidden, device, with_d, holdout=held is not None)
    for b0, seq_len, xq, xf, idx in _experts_inputs(block, fp_block, ex, fp_ex, streams, i):
        rows_all = torch.arange(xq.shape[0], device=xq.device)
        stats_all.add(xq.unsqueeze(1), None if xf is None else xf.unsqueeze(1),
                      dx_scale=_token_alphas(alphas, b0, seq_len, rows_all),
                      held_out=_token_held_out(held, b0, seq_len, rows_all))
        for e in range(n_exp):
            rows = (idx == e).any(-1).nonzero().flatten()
            counts[e] += rows.numel()
            if rows.numel():
                stats[e].add(xq[rows].unsqueeze(1), None if xf is None else xf[rows].unsqueeze(1),
                             dx_scale=_token_alphas(alphas, b0, seq_len, rows),
                             held_out=_token_held_out(held, b0, seq_len, rows))
    routed = [cfg.moe_calib == "routed" and int(counts[e]) >= max(cfg.moe_min_tokens, 1) for e in range(n_exp)]
    plan = _fallback_plan(block, name, routed, counts, cfg) if cfg.moe_calib == "routed" else \
        {e: "all-tokens" for e in range(n_exp)}
    out: dict[str, QuantizedTensor] = {}
    for e in range(n_exp):  # (every expert's statistics stay until the last one: they may be a neighbour's)
        st = stats[e] if routed[e] else stats_all if plan[e] == "all-tokens" else \
            LayerStats.merged([stats[j] for j in plan[e]]) if isinstance(plan[e], list) else None
        for part in ("gate_proj", "up_proj"):
            full = f"{prefix}.{i}.{ex.matrix_names(e)[part]}"
            if bar is not None:
                bar.set_postfix_str(ex.matrix_names(e)[part])
            out[ex.matrix_names(e)[part]] = r = _quantize(ex.weight(e, part).float().contiguous(), st, cfg, full)
            write_back(ex.weight(e, part), r)
        del st
    n_tokens = stats_all.tokens
    del stats, stats_all

    # 2. the same tokens through the (quantized / FP) gate and up -> H_e, D_e of down
    dstats = [LayerStats(inter, device, with_d, holdout=held is not None) for _ in range(n_exp)]
    with torch.inference_mode():
        for b0, seq_len, xq, xf, idx in _experts_inputs(block, fp_block, ex, fp_ex, streams, i):
            for e in range(n_exp):
                if plan[e] == "rtn":
                    continue
                sources = [e] if routed[e] else plan[e] if isinstance(plan[e], list) else None
                rows = torch.arange(xq.shape[0], device=xq.device) if sources is None else \
                    torch.isin(idx, torch.tensor(sources, device=idx.device)).any(-1).nonzero().flatten()
                if not rows.numel():
                    continue
                hq = ex.down_input(xq[rows], e)
                hf = fp_ex.down_input(xf[rows], e) if xf is not None else None
                dstats[e].add(hq.unsqueeze(1), None if hf is None else hf.unsqueeze(1),
                              dx_scale=_token_alphas(alphas, b0, seq_len, rows),
                              held_out=_token_held_out(held, b0, seq_len, rows))
    for e in range(n_exp):
        part = "down_proj"
        full = f"{prefix}.{i}.{ex.matrix_names(e)[part]}"
        if bar is not None:
            bar.set_postfix_str(ex.matrix_names(e)[part])
        st = None if plan[e] == "rtn" else dstats[e]
        out[ex.matrix_names(e)[part]] = r = _quantize(ex.weight(e, part).float().contiguous(), st, cfg, full)
        write_back(ex.weight(e, part), r)
        dstats[e] = None
    for e in range(n_exp):
        how = "routed" if routed[e] else "neighbours" if isinstance(plan[e], list) else plan[e]
        for part in ("gate_proj", "up_proj", "down_proj"):
            info = out[ex.matrix_names(e)[part]].info
            info.update(tokens=int(counts[e]), calibration=how)
            if how == "neighbours":
                info["neighbours"] = list(plan[e])
    fell_back = [e for e in range(n_exp) if not routed[e]]
    if fell_back and cfg.moe_calib == "routed":
        what = {"all": f"calibrated on all {n_tokens} tokens", "rtn": "rounded to nearest (RTN, clip search)",
                "neighbours": "calibrated on their router neighbours' tokens: " + ", ".join(
                    f"{e} <- {plan[e]}" if isinstance(plan[e], list) else f"{e}: all tokens" for e in fell_back)}
        log.info("block %d %s: experts %s had < %d routed tokens (%s): %s", i, name, fell_back,
                 cfg.moe_min_tokens, [int(counts[e]) for e in fell_back], what[cfg.moe_fallback])
    return out


def _quantize(W: torch.Tensor, stats, cfg: QuantizeConfig, name: str) -> QuantizedTensor:
    """``quantize_linear``; without statistics (``--moe-fallback rtn``) round to nearest with the weight-MSE
    clip search, and under dynamic act order with the identity column order (every module of a
    dynamic checkpoint has a ``g_idx``)."""
    if stats is not None:
        return quantize_linear(W, stats, cfg, name)
    r = quantize_linear(W, None, replace(cfg, method="rtn", clip="mse"), name)
    if cfg.act_order == "dynamic":
        spec = r.spec
        glen = W.shape[1] if spec.group_size == -1 else spec.group_size
        r = replace(r, g_idx=(torch.arange(W.shape[1]) // glen).to(torch.int32))
    r.info.update(method="rtn", fallback=True)
    return r


def _router_weight(block, name: str, n_exp: int, hidden: int) -> torch.Tensor | None:
    """The ``[E, H]`` router weight next to the experts module ``name`` (its sibling ``gate``/``router``)."""
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    for child_name, child in parent.named_children():
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (n_exp, hidden):
            return w.detach().float()
    return None


def _fallback_plan(block, name: str, routed: list[bool], counts: torch.Tensor, cfg: QuantizeConfig) -> dict:
    """Per expert: ``"routed"``, or its fallback: ``"all-tokens"``, ``"rtn"`` or the list of neighbour experts
    (``--moe-fallback neighbours``: by router-row cosine similarity among the experts with enough routed
    tokens, nearest first, until ``moe_min_tokens`` tokens; ``"all-tokens"`` when no expert has enough)."""
    n_exp = len(routed)
    plan: dict = {}
    sims = None
    for e in range(n_exp):
        if routed[e]:
            plan[e] = "routed"
        elif cfg.moe_fallback == "rtn":
            plan[e] = "rtn"
        elif cfg.moe_fallback == "neighbours" and any(routed):
            if sims is None:
                from .adapter import experts_modules

                hidden = experts_modules(block)[name].weight(0, "gate_proj").shape[1]
                wr = _router_weight(block, name, n_exp, hidden)
                if wr is None:
                    raise RcsrError(f"{name}: --moe-fallback neighbours needs the router weight [{n_exp}, {hidden}] "
                                    "next to the experts; none found (use --moe-fallback all or rtn)")
                wr = torch.nn.functional.normalize(wr, dim=1)
                sims = wr @ wr.T
            order = [j for j in torch.argsort(sims[e], descending=True).tolist() if j != e and routed[j]]
            nbrs, n = [], 0
            for j in order:
                nbrs.append(j)
                n += int(counts[j])
                if n >= cfg.moe_min_tokens:
                    break
            plan[e] = nbrs
        else:
            plan[e] = "all-tokens"
    return plan


def write_back(dst: torch.Tensor, r: QuantizedTensor) -> None:
    """Put ``r``'s dequantized weights into ``dst`` (a view of the fused expert tensor)."""
    with torch.no_grad():
        dst.copy_(r.dequantize().to(dst.device, dst.dtype))
