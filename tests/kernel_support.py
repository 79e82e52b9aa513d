"""Random quantized layers in the canonical checkpoint form, and their fp32 reference weight, for the
kernel tests (tests/plugin)."""
from __future__ import annotations

import torch

from rcsr_deploy.grid import QuantSpec, dequantize
from rcsr_deploy.packing import pack_codes
from vllm_plugin.kernels import LayerSpec, QuantWeights


def make_layer(out_f: int, in_f: int, bits: int, gs: int, sym: bool, dynamic: bool, *, seed: int = 0,
               shard_sizes: tuple[int, ...] = (), same_gidx: bool = True):
    """(canonical tensors, fp32 reference weight) of a random layer; one group_index row per shard."""
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, gs, sym)
    ng, gl = spec.groups(in_f), spec.group_len(in_f)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, ng, generator=g) * 0.05 + 1e-3).half()
    zeros = (torch.full((out_f, ng), 1 << (bits - 1), dtype=torch.uint8) if sym
             else torch.randint(0, 1 << bits, (out_f, ng), generator=g, dtype=torch.uint8))
    shards = shard_sizes or (out_f,)
    gidx_rows = None
    ref = torch.empty(out_f, in_f)
    r = 0
    for k, n in enumerate(shards):
        gi = None
        if dynamic:
            if k == 0 or not same_gidx:
                gi = (torch.randperm(in_f, generator=g) // gl).to(torch.int32)
            else:
                gi = gidx_rows[0]
            gidx_rows = [gi] if gidx_rows is None else gidx_rows + [gi]
        ref[r:r + n] = dequantize(codes[r:r + n], scales[r:r + n].float(), zeros[r:r + n].float(), spec, gi)
        r += n
    w = QuantWeights(pack_codes(codes, bits), scales, None if sym else zeros,
                     torch.stack(gidx_rows) if dynamic else None)
    return w, ref


def spec_of(out_f, in_f, bits, gs, sym, dynamic, dtype, shard_sizes=(), shared=True):
    return LayerSpec(bits, gs, sym, "dynamic" if dynamic else "static", in_f, out_f, dtype,
                     shard_sizes=shard_sizes, shared_group_index=shared)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
