"""The block loop: every decoder block in order, one at a time on the compute device.

For each selected block (``ModelAdapter`` finds them): its linears are grouped true-sequentially by
shared input (for Llama ``[q,k,v] → [o] → [gate,up] → [down]``); for each group both streams are run up
to the group's input, ``H``/``D`` accumulated (``objective.LayerStats``), every module of the group
quantized (``solver.quantize_linear``) and its dequantized weights put back, so that the next group
sees the quantized path.  Then both streams are propagated through the block and the block's result is
stored (``store.WorkDir``; ``--resume`` restarts at the first block without one).

Plain RTN (no calibration data needed) runs through the same loop as a block without statistics:
no streams, each linear its own group, ``stats = None``.

Memory on the host is ``2 · nsamples · seqlen · hidden`` activations (plus, for one block at a time,
the FP stream's group inputs when they fit in ``FP_CAPTURE_BYTES``) and the model; on the device one
block (twice when the FP stream is needed) and one group's statistics.  Nothing grows with depth.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import RcsrError
from ..format import QuantizedTensor
from ..objective import LayerStats, holdout_sequences, sample_alphas
from .adapter import (
    OutputHead,
    check_finite,
    experts_modules,
    find_decoder_layers,
    find_output_head,
    linear_modules,
    weight_view,
)
from .experts import calibrate_experts, write_back
from .config import QuantizeConfig
from .solver import dequant_into, quantize_linear
from .store import WorkDir
from .streams import (
    FP_CAPTURE_BYTES,
    cached_inputs,
    capture_block_inputs,
    collect_inputs,
    discover_groups,
    run_block,
    run_block_capturing,
)

log = logging.getLogger(__name__)


class Streams:
    """The quantized-path stream ``q`` and (when α ≠ 0) the FP stream ``fp`` of block inputs, on the host."""

    def __init__(self, model, layers, tokenizer, cfg: QuantizeConfig, device: str, dtype: torch.dtype,
                 windows: torch.Tensor | None = None):
        from ..data import calibration_windows

        self.cfg, self.device, self.dtype, self.bs = cfg, device, dtype, cfg.batch_size
        if windows is None:
            windows = calibration_windows(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
        t_cap = time.perf_counter()
        x0, self.kwargs = capture_block_inputs(model, layers, windows, cfg.batch_size, device)
        x0 = x0.float() if dtype == torch.float32 else x0
        self.q = x0
        self.fp = x0.clone() if cfg.needs_fp_stream else None
        log.info("captured %d block inputs in %.1fs", x0.shape[0], time.perf_counter() - t_cap)

    def run(self, block, x: torch.Tensor, i: int) -> torch.Tensor:
        return run_block(block, x, self.kwargs[i], self.device, self.bs, self.dtype)

    def passthrough(self, block, i: int) -> None:
        """A block left in full precision: both streams see the same block."""
        block.to(self.device)
        self.q = self.run(block, self.q, i)
        if self.fp is not None:
            self.fp = self.run(block, self.fp, i)
        block.to("cpu")


def quantize_model(model, tokenizer, cfg: QuantizeConfig, *, device: str = "cpu", work_dir: Path,
                   resume: bool = False, model_id: str = "", progress: bool = True,
                   fp_capture_bytes: int | None = None, windows: torch.Tensor | None = None):
    """Quantize every linear of every selected decoder block (and the head with ``cfg.lm_head``).

    Returns ``({full module name: QuantizedTensor}, report)``.  ``fp_capture_bytes`` bounds the host
    cache of one block's FP-stream group inputs (default ``FP_CAPTURE_BYTES``); above it the FP stream
    falls back to one cut-short forward per group.  ``windows`` (``[nsamples, seqlen]`` token ids) replaces
    the calibration windows drawn from ``cfg`` (``--alpha heldout`` draws them away from its held-back text)."""
    fp_capture_bytes = FP_CAPTURE_BYTES if fp_capture_bytes is None else fp_capture_bytes
    cfg.validate()
    layers, prefix = find_decoder_layers(model)
    check_finite(model)
    dtype = next(model.parameters()).dtype
    wd = WorkDir(work_dir, cfg, model_id)
    done = wd.open(resume)
    if done:
        log.info("resuming: %d finished blocks found", len(done))
    t_start = time.perf_counter()
    results: dict[str, QuantizedTensor] = {}
    report_layers = []

    selected = set(cfg.block_set(len(layers)))
    head = find_output_head(model) if cfg.lm_head else None
    if head is not None:
        cfg.spec.validate(head.module.in_features, head.name)
    streams = Streams(model, layers, tokenizer, cfg, device, dtype, windows) if cfg.needs_calibration else None
    if streams is None:
        blocks = sorted(selected)
    else:  # the head's inputs come out of the last block: with --lm-head every block is propagated
        blocks = range(((len(layers) - 1) if cfg.lm_head else max(selected)) + 1)

    bar = tqdm(blocks, desc=f"{cfg.method} W{cfg.bits}", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = layers[i]
        if i not in selected:
            streams.passthrough(block, i)
            continue
        fp_block = copy.deepcopy(block).to(device) if streams is not None and streams.fp is not None else None
        fp_next = groups = None
        block.to(device)
        mods = dict(block.named_modules())
        if i in done:
            blk = wd.load_block(i)
            for n, r in blk.items():
                write_back(weight_view(block, n), r)
        else:
            if streams is None:  # a block without statistics: every matmul weight on its own
                blk = {}
                for n in linear_modules(block):
                    bar.set_postfix_str(n)
                    blk[n] = quantize_linear(mods[n].weight.data.float(), None, cfg, f"{prefix}.{i}.{n}")
                    dequant_into(mods[n], blk[n])
                for ex in experts_modules(block).values():
                    for e in range(ex.num_experts):
                        for part, n in ex.matrix_names(e).items():
                            blk[n] = quantize_linear(ex.weight(e, part).float(), None, cfg, f"{prefix}.{i}.{n}")
                            write_back(ex.weight(e, part), blk[n])
            else:
                groups, blk, fp_next = _calibrate_block(block, fp_block, i, streams, cfg, prefix, bar, fp_capture_bytes)
            wd.save_block(i, blk)
        if streams is not None:
            streams.q = streams.run(block, streams.q, i)
            if streams.fp is not None:
                streams.fp = fp_next if fp_next is not None else streams.run(fp_block, streams.fp, i)
            del fp_next
            if not torch.isfinite(streams.q).all():
                raise RcsrError(f"block {i}: NaN/Inf activations on the quantized path")
        block.to("cpu")
        del fp_block
        for n, r in blk.items():
            results[f"{prefix}.{i}.{n}"] = r
        entry = {"block": i, "seconds": time.perf_counter() - t0, "modules": {n: r.info for n, r in blk.items()}}
        if groups is not None:  # the linears that shared one set of calibration statistics
            entry["groups"] = groups
        report_layers.append(entry)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if head is not None:
        t0 = time.perf_counter()
        bar.set_postfix_str(head.name)

        def run():
            stats = None if streams is None else _head_stats(head, streams, cfg, len(layers))
            return quantize_linear(head.module.weight.data.to(device).float(), stats, cfg, head.name)

        r = _head_result(wd, len(layers), head, run)
        results[head.store_name] = r
        report_layers.append({"block": len(layers), "seconds": time.perf_counter() - t0,
                              "modules": {head.name: r.info}})
    return results, _report(cfg, report_layers, time.perf_counter() - t_start)


def _calibrate_block(block, fp_block, i: int, streams: Streams, cfg: QuantizeConfig, prefix: str, bar,
                     fp_capture_bytes: int):
    """Quantize one block group by group on the two streams; returns (groups, results, FP stream after
    the block or None when it was not cached on the way)."""
    device, dtype, bs = streams.device, streams.dtype, streams.bs
    kwargs = streams.kwargs[i]
    mode, _ = cfg.alpha_mode
    mods = dict(block.named_modules())
    blk: dict[str, QuantizedTensor] = {}
    fp_next = fp_cache = None
    groups = discover_groups(block, streams.q, kwargs, device, dtype)
    if fp_block is not None:
        fmods = dict(fp_block.named_modules())
        firsts = {g[0]: fmods[g[0]] for g in groups}
        elem = torch.finfo(dtype).bits // 8
        need = streams.fp.shape[0] * streams.fp.shape[1] * sum(m.in_features for m in firsts.values()) * elem
        if need <= fp_capture_bytes:
            fp_next, fp_cache = run_block_capturing(fp_block, streams.fp, kwargs, device, bs, dtype, firsts)
    held = holdout_sequences(streams.q.shape[0]) if mode == "heldout" else None
    for gi, group in enumerate(groups):
        first = mods[group[0]]
        stats = LayerStats(first.in_features, device, with_d=streams.fp is not None, holdout=held is not None)
        alphas = (sample_alphas(streams.q.shape[0], cfg.alpha_m, _seed(cfg.seed, i, gi))
                  if mode == "sample" else None)
        if fp_cache is not None:
            fp_iter = cached_inputs(fp_cache.pop(group[0]), device, bs)
        elif fp_block is not None:
            fp_iter = collect_inputs(fp_block, fmods[group[0]], streams.fp, kwargs, device, dtype, bs)
        else:
            fp_iter = None
        q_iter = collect_inputs(block, first, streams.q, kwargs, device, dtype, bs)
        try:
            for b0, xq in q_iter:
                xf = next(fp_iter)[1] if fp_iter is not None else None
                scale = 1.0 if alphas is None else alphas[b0:b0 + xq.shape[0]]
                stats.add(xq, xf, dx_scale=scale, held_out=None if held is None else held[b0:b0 + xq.shape[0]])
        finally:  # removes the hooks even if a generator is left suspended
            q_iter.close()
            if fp_iter is not None:
                fp_iter.close()
        for n in group:
            bar.set_postfix_str(n)
            r = quantize_linear(mods[n].weight.data.float(), stats, cfg, f"{prefix}.{i}.{n}")
            dequant_into(mods[n], r)
            blk[n] = r
        del stats
    # fused MoE experts (after the linear groups: a shared expert, if any, runs in parallel to them)
    for k, name in enumerate(experts_modules(block)):
        blk.update(calibrate_experts(block, fp_block, i, name, streams, cfg, prefix,
                                     _seed(cfg.seed, i, len(groups) + k), bar))
        groups = groups + [[f"{name}.*"]]
    return groups, blk, fp_next


def _head_stats(head: OutputHead, streams: Streams, cfg: QuantizeConfig, index: int) -> LayerStats:
    """``H``/``D`` of the head: its inputs are the final norm of each stream's last-block output."""
    mode, _ = cfg.alpha_mode
    device, dtype = streams.device, streams.dtype
    q_stream, fp_stream = streams.q, streams.fp
    held = holdout_sequences(q_stream.shape[0]) if mode == "heldout" else None
    stats = LayerStats(head.module.in_features, device, with_d=fp_stream is not None, holdout=held is not None)
    alphas = sample_alphas(q_stream.shape[0], cfg.alpha_m, _seed(cfg.seed, index, 0)) if mode == "sample" else None
    norm = head.norm.to(device)
    try:
        with torch.inference_mode():
            for b0 in range(0, q_stream.shape[0], cfg.batch_size):
                xq = norm(q_stream[b0:b0 + cfg.batch_size].to(device, dtype))
                xf = None if fp_stream is None else norm(fp_stream[b0:b0 + cfg.batch_size].to(device, dtype))
                scale = 1.0 if alphas is None else alphas[b0:b0 + xq.shape[0]]
                stats.add(xq, xf, dx_scale=scale, held_out=None if held is None else held[b0:b0 + xq.shape[0]])
    finally:
        norm.to("cpu")
    return stats


def _head_result(wd: WorkDir, index: int, head: OutputHead, quantize) -> QuantizedTensor:
    """Quantize the head (or reuse the saved result with --resume) and write its dequantized weight
    back (with a tied head that is the input embedding too)."""
    done = wd.has_block(index)
    r = wd.load_block(index)[head.name] if done else quantize()
    if not done:
        wd.save_block(index, {head.name: r})
    dequant_into(head.module, r)
    return r


def _seed(seed: int, block: int, group: int) -> int:
    return (seed * 1_000_003 + block * 1009 + group) % (2 ** 32)


def _report(cfg: QuantizeConfig, layers: list, seconds: float) -> dict:
    return {"config": asdict(cfg), "seconds": seconds, "layers": layers}
