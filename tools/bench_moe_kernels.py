#!/usr/bin/env python
"""Micro-benchmark of one MoE layer's experts kernels (``vllm_plugin.moe``) on random weights.

    python tools/bench_moe_kernels.py [--experts 64] [--top-k 8] [--hidden 2048] [--inter 768]
                                      [--bits 4,3,2] [--tokens 1,16,64] [--threads 2] [--dtype bfloat16]

Default shape: a Qwen3-30B-A3B-like layer with half its experts (hidden 2048, expert intermediate 768,
top-8).  Kernels: ``native_cpu`` (the grouped C++ kernel over the packed codes), ``vllm_cpu`` (the
experts dequantized once to dense bf16 and run by vLLM's own CPU fused-MoE op -- what serving an
unquantized MoE costs) and ``dequant``.  Routing is uniform random top-k; timings are microseconds
per layer call, best of several batches with the kernels taking turns.
"""
from __future__ import annotations

import argparse
import os

import torch

from vllm_plugin.kernels.base import LayerSpec, QuantWeights
from vllm_plugin.kernels.bench import cpu_features, make_layer, time_calls
from vllm_plugin.moe import MOE_KERNELS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--tokens", default="1,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kernels", default="native_cpu,vllm_cpu,dequant")
    ap.add_argument("--min-time", type=float, default=0.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    E, H, inter, k = args.experts, args.hidden, args.inter, args.top_k
    print(f"# {cpu_features()}; threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    print(f"# {E} experts, top-{k}, hidden {H}, expert intermediate {inter}, g{args.group} sym, {args.dtype}; "
          "microseconds per layer call (and held bytes per expert weight)")
    names = args.kernels.split(",")
    print(f"{'bits':>4} {'tokens':>6} " + " ".join(f"{n:>12}" for n in names) + "   native vs vllm_cpu")
    for bits in (int(b) for b in args.bits.split(",")):
        spec13 = LayerSpec(bits, args.group, True, "static", H, 2 * inter, dt, shard_sizes=(inter, inter))
        spec2 = LayerSpec(bits, args.group, True, "static", inter, H, dt)
        w13 = [make_layer(2 * inter, H, bits, args.group, True, seed=e) for e in range(E)]
        w2 = [make_layer(H, inter, bits, args.group, True, seed=1000 + e) for e in range(E)]
        kernels = {}
        for n in names:
            cls = MOE_KERNELS[n]
            if cls.unsupported_reason(spec13, spec2, "silu") is None:
                kern = cls(spec13, spec2, E)
                kern.prepare(w13, w2)
                kernels[n] = kern
        del w13, w2
        held = {n: kern.nbytes() / (E * 3 * H * inter) for n, kern in kernels.items()}
        for t in (int(v) for v in args.tokens.split(",")):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(t, H, generator=g).to(dt)
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]).to(torch.int32)
            w = torch.softmax(torch.randn(t, k, generator=g), -1)
            fns = {n: (lambda kern: lambda: kern.apply(x, w, ids, activation="silu"))(kern) for n, kern in kernels.items()}
            us = time_calls(fns, args.min_time * (1 + len(fns)))
            cols = [f"{us[n]:12.0f}" if n in us else f"{'-':>12}" for n in names]
            ratio = f"{us['vllm_cpu'] / us['native_cpu']:.2f}x" if {"native_cpu", "vllm_cpu"} <= us.keys() else "-"
            print(f"{bits:>4} {t:>6} " + " ".join(cols) + f"   {ratio}", flush=True)
        print("# bytes held per weight: " + ", ".join(f"{n} {b:.3f}" for n, b in held.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
