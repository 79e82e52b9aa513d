"""Activation streams: block inputs on the host, block forwards in mini-batches, group inputs.

Two streams of block inputs are kept on the host: ``q`` (through already-quantized blocks) and, when
the objective needs it (α ≠ 0), ``fp`` (through the original blocks).  ``capture_block_inputs`` records
the first block's inputs and each block's keyword arguments (masks, rotary embeddings — they differ per
block in e.g. Gemma3) with every block replaced by a catcher, at the cost of the embeddings only.
Inside a block, linears are grouped true-sequentially by *shared input* (``discover_groups``) and each
group's inputs are collected with the forward cut short right there (``collect_inputs``); the FP block
never changes, so its stream is run once, recording every group's input (``run_block_capturing``).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import RcsrError
from .adapter import linear_modules

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder block: records its inputs, passes the hidden states through."""

    def __init__(self, idx: int, store: dict, record_inputs: bool):
        super().__init__()
        self.idx, self.store, self.record_inputs = idx, store, record_inputs

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RcsrError("decoder blocks called with positional extras are not supported")
        if self.record_inputs:
            self.store["inputs"].append(hidden_states.detach().to("cpu"))
        if self.idx not in self.store["kwargs"]:
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "cache_position")}
            self.store["kwargs"][self.idx] = _to_device(kw, "cpu")
        return hidden_states


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _expand_batch(obj, b: int):
    """Broadcast batch-1 tensors in kwargs (position ids, rotary tables) to batch ``b``."""
    if isinstance(obj, torch.Tensor):
        return obj.expand(b, *obj.shape[1:]) if obj.dim() >= 1 and obj.shape[0] == 1 and b > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_expand_batch(o, b) for o in obj)
    if isinstance(obj, dict):
        return {k: _expand_batch(v, b) for k, v in obj.items()}
    return obj


def capture_block_inputs(model, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int, device):
    """Layer-0 inputs ``[N, L, d]`` (host) and per-block kwargs for batch 1."""
    store = {"inputs": [], "kwargs": {}}
    originals = list(layers)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, store, record_inputs=(i == 0))
        model.to(device) if device != "cpu" else None
        with torch.inference_mode():
            for s in range(windows.shape[0]):
                decoder(input_ids=windows[s:s + 1].to(device), use_cache=False)
    finally:
        for i, blk in enumerate(originals):
            layers[i] = blk
        if device != "cpu":
            model.to("cpu")
    return torch.cat(store["inputs"], 0), store["kwargs"]


def run_block(block, x: torch.Tensor, kwargs: dict, device, batch_size: int, dtype) -> torch.Tensor:
    """Run ``block`` over host tensor ``x`` [N, L, d] in mini-batches; returns host [N, L, d]."""
    return run_block_capturing(block, x, kwargs, device, batch_size, dtype, {})[0]


# Host bytes the FP stream may spend on caching every group's inputs of one block (see ``run_block_capturing``).
FP_CAPTURE_BYTES = 2 * 2**30


def run_block_capturing(block, x: torch.Tensor, kwargs: dict, device, batch_size: int, dtype,
                         modules: dict[str, nn.Module]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``run_block`` that also records the input of each of ``modules`` (host, ``[N, L, in]``).

    The FP block never changes while its block is calibrated, so one full forward yields the inputs
    of all its groups *and* the next block's FP stream — instead of one forward cut short per group
    and one more to propagate (``collect_inputs``).  The recorded tensors are bit-identical to what
    the cut-short forwards return (same ops, same mini-batches)."""
    box: dict[str, torch.Tensor] = {}
    store = {n: None for n in modules}
    hooks = []
    for n, m in modules.items():
        def pre(mod, args, _n=n):
            box[_n] = args[0].detach()
        hooks.append(m.register_forward_pre_hook(pre))
    out = torch.empty_like(x)
    try:
        for b0 in range(0, x.shape[0], batch_size):
            xb = x[b0:b0 + batch_size].to(device, dtype)
            kw = _expand_batch(_to_device(kwargs, device), xb.shape[0])
            with torch.inference_mode():
                y = block(xb, **kw)
            if isinstance(y, tuple):
                y = y[0]
            out[b0:b0 + xb.shape[0]] = y.to("cpu", x.dtype)
            for n in modules:
                v = per_sequence(box.pop(n), xb.shape[0])
                if store[n] is None:
                    store[n] = torch.empty(x.shape[0], *v.shape[1:], dtype=v.dtype)
                store[n][b0:b0 + xb.shape[0]] = v.to("cpu")
    finally:
        for h in hooks:
            h.remove()
    return out, store


def cached_inputs(cache: torch.Tensor, device, batch_size: int):
    """Same stream shape as ``collect_inputs``, from a ``run_block_capturing`` cache."""
    for b0 in range(0, cache.shape[0], batch_size):
        yield b0, cache[b0:b0 + batch_size].to(device)


def discover_groups(block, x0: torch.Tensor, kwargs: dict, device, dtype) -> list[list[str]]:
    """True-sequential groups: linears in execution order, grouped by identical input tensor.

    The hooks keep every input tensor alive until the forward is over and compare tensors with
    ``is``: an ``id()`` alone may be recycled — the attention output is freed after ``o_proj`` and
    the next norm's output can land on the same address, which would merge ``o_proj`` with
    ``gate_proj``/``up_proj`` and calibrate them on the wrong inputs."""
    mods = linear_modules(block)
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, m in mods.items():
        def pre(mod, args, _name=name):
            calls.append((_name, args[0]))
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        run_block(block, x0[:1], kwargs, device, 1, dtype)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, t in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and t is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = t
    missing = [n for n in mods if n not in seen]
    if missing:
        log.warning("linears never called during calibration stay unquantized: %s", missing)
    return groups


def per_sequence(t: torch.Tensor, n_seq: int) -> torch.Tensor:
    """A module input as ``[sequences, tokens, features]``: some modules (MoE shared experts, MLA
    projections) get the mini-batch's tokens flattened to ``[sequences * tokens, features]``, in sequence
    order; the statistics pair each sequence with its own α and its FP twin."""
    return t if t.dim() == 3 and t.shape[0] == n_seq else t.reshape(n_seq, -1, t.shape[-1])


def collect_calls(block, module: nn.Module, x: torch.Tensor, kwargs, device, dtype, batch_size):
    """The positional and keyword arguments of ``module``'s call for host stream ``x``, the forward cut
    short at that module.  Yields ``(b0, args, kwargs)`` per mini-batch (tensors detached)."""
    box = {}

    def pre(mod, args, kw):
        box["call"] = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                       {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        raise _Stop

    h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b0 in range(0, x.shape[0], batch_size):
            xb = x[b0:b0 + batch_size].to(device, dtype)
            kw = _expand_batch(_to_device(kwargs, device), xb.shape[0])
            try:
                with torch.inference_mode():
                    block(xb, **kw)
            except _Stop:
                pass
            args, call_kw = box.pop("call")
            yield b0, args, call_kw
    finally:
        h.remove()


def collect_inputs(block, module: nn.Module, x: torch.Tensor, kwargs, device, dtype, batch_size):
    """Inputs of ``module`` for host stream ``x``, forward cut short at that module. Yields per batch."""
    calls = collect_calls(block, module, x, kwargs, device, dtype, batch_size)
    try:
        for b0, args, _ in calls:
            yield b0, per_sequence(args[0], min(batch_size, x.shape[0] - b0))
    finally:
        calls.close()
