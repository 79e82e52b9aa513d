#!/usr/bin/env python
"""Benchmark the Triton W{2,3,4,8}A16 GEMM (vllm_plugin/kernels/triton_wna16.py) against torch fp16.

Shapes are written ``NxK`` = out-features x in-features of the linear (weight ``[N, K]``,
``y[M, N] = x[M, K] @ W^T``).  For every shape, M and bit width it reports the kernel time
(CUDA events through ``triton.testing.do_bench``, median), the achieved bandwidth counting the bytes
a kernel must move (packed codes + scales (+ zeros) + activations + outputs), TFLOP/s, the share of
the GPU's bandwidth roofline, and the speed-up over ``torch.nn.functional.linear`` with an fp16
weight measured in the same run.  A "7B layer" block times the seven linears of one Llama-7B decoder
layer (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008) back to back.

Prints a markdown table; ``--json out.json`` also writes every row.  Needs a CUDA GPU; without one
it exits with code 2 unless ``--interpret-smoke`` runs one tiny shape under the Triton interpreter
on the CPU (a check that the script itself works, not a measurement).
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672"
LAYER_7B = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
            ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]
# Peak HBM bandwidth (GB/s) by device-name substring, most specific first.
PEAK_GBPS = [("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0)]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        n, k = item.lower().split("x")
        out.append((int(n), int(k)))
    return out


def _peak_for(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


def _random_weight(n: int, k: int, bits: int, group_size: int, sym: bool, device, gen):
    """Canonical checkpoint tensors with random codes (every int32 pattern is a valid bitstream)."""
    import torch
    qweight = torch.randint(-2 ** 31, 2 ** 31, (n, k * bits // 32), dtype=torch.int64,
                            generator=gen, device="cpu").to(torch.int32).to(device)
    groups = 1 if group_size == -1 else k // group_size
    # Scales of a unit-variance weight: the output stays O(1) for any K.
    scales = (torch.rand(n, groups, generator=gen) * 0.5 + 0.75) * (2.0 / (2 ** bits - 1)) / (k ** 0.5)
    zeros = None if sym else torch.randint(0, 2 ** bits, (n, groups), generator=gen).to(torch.uint8).to(device)
    return qweight, scales.to(torch.float16).to(device), zeros


def _reference(qweight, scales, zeros, bits, group_size, sym, k):
    import torch
    from rcsr_deploy.grid import QuantSpec, dequantize
    from rcsr_deploy.packing import unpack_codes
    spec = QuantSpec(bits, group_size, sym)
    z = torch.full(scales.shape, float(1 << (bits - 1)), device=scales.device) if sym else zeros.float()
    return dequantize(unpack_codes(qweight, bits, k), scales.float(), z, spec)


GRAPH_CALLS = 20


def _graphed(fn):
    """``fn`` captured ``GRAPH_CALLS`` times into one CUDA graph: replaying it costs the GPU work alone,
    without Python's and the launcher's per-call time (vLLM's decode runs under CUDA graphs too)."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                    # warm-up off the capture (allocator, autotuning)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return graph


def _dequant_kernel(qw, sc, zr, bits, group_size, sym, n, k, dtype, device):
    """The plugin's ``dequant`` kernel (dequantize into a scratch buffer, then a dense GEMM) on the same
    canonical tensors: the fallback the CUDA dispatch would take after the Triton kernel."""
    from vllm_plugin.kernels import LayerSpec, QuantWeights
    from vllm_plugin.kernels.dequant import DequantKernel

    kernel = DequantKernel(LayerSpec(bits, group_size, sym, "static", k, n, dtype, device))
    kernel.prepare(QuantWeights(qw, sc, zr, None))
    return kernel


def _timer(interpret: bool, cuda_graph: bool = False):
    if interpret:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return bench
    import triton.testing

    def bench(fn):
        if cuda_graph:
            graph = _graphed(fn)
            return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / GRAPH_CALLS
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return bench


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def run(shapes, ms, bits_list, group_size, sym, dtype_name, peak_gbps, with_layer, check, interpret, echo,
        heuristic=False, cuda_graph=False, with_dequant=False):
    import torch
    import torch.nn.functional as F

    from vllm_plugin.kernels import triton_wna16 as tw

    device = torch.device("cpu" if interpret else "cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    if interpret:
        dtype = torch.float32            # the interpreter's dot does not take bf16; keep smoke simple
        gpu, peak = "cpu (Triton interpreter, not a measurement)", peak_gbps
    else:
        gpu = torch.cuda.get_device_name(device)
        peak = peak_gbps if peak_gbps else _peak_for(gpu)
    bench = _timer(interpret, cuda_graph and not interpret)

    def qmm(x, pw):
        cfg = (tw.default_config(x.shape[0], pw.out_features, pw.in_features, x.device, group_size=pw.group_size,
                                 uneven_groups=pw.group_ids is not None) if heuristic else None)
        return tw.matmul(x, pw, config=cfg)
    gen = torch.Generator().manual_seed(0)
    rows = []

    def record(kind, name, n, k, m, bits, t_ms, t_ref_ms, nbytes, flops, err, t_dq_ms=None):
        gbps = nbytes / (t_ms * 1e-3) / 1e9
        row = {"kind": kind, "shape": name, "N": n, "K": k, "M": m, "bits": bits, "group_size": group_size,
               "sym": sym, "dtype": str(dtype).replace("torch.", ""), "time_ms": t_ms, "torch_ms": t_ref_ms,
               "torch_dtype": str(dtype).replace("torch.", ""), "speedup": t_ref_ms / t_ms, "bytes": nbytes, "gbps": gbps,
               "tflops": flops / (t_ms * 1e-3) / 1e12,
               "pct_roofline": None if not peak else 100.0 * gbps / peak, "max_rel_err": err}
        if t_dq_ms is not None:
            row.update(dequant_ms=t_dq_ms, speedup_vs_dequant=t_dq_ms / t_ms)
        rows.append(row)
        echo(f"  {name} M={m} bits={bits}: {t_ms * 1e3:.1f} us, {gbps:.0f} GB/s, x{row['speedup']:.2f} vs torch",
             err=True)

    for n, k in shapes:
        w16 = torch.randn(n, k, generator=gen).to(dtype).to(device) / k ** 0.5
        xs = {m: torch.randn(m, k, generator=gen).to(dtype).to(device) for m in ms}
        t_ref = {m: bench(lambda m=m: F.linear(xs[m], w16)) for m in ms}
        del w16
        for bits in bits_list:
            qw, sc, zr = _random_weight(n, k, bits, group_size, sym, device, gen)
            pw = tw.prepare(qw, sc, zr, None, bits, group_size, sym)
            w_ref = _reference(qw, sc, zr, bits, group_size, sym, k) if check else None
            dq = _dequant_kernel(qw, sc, zr, bits, group_size, sym, n, k, dtype, device) if with_dequant else None
            del qw
            for m in ms:
                x = xs[m]
                y = qmm(x, pw)                           # autotunes this (M bucket, N, K) on CUDA
                err = None
                if w_ref is not None:
                    ref = x.float() @ w_ref.t()
                    err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                t = bench(lambda x=x: qmm(x, pw))
                t_dq = bench(lambda x=x: dq.apply(x)) if dq is not None else None
                nbytes = pw.nbytes() + x.numel() * x.element_size() + m * n * x.element_size()
                record("linear", f"{n}x{k}", n, k, m, bits, t, t_ref[m], nbytes, 2.0 * m * n * k, err, t_dq)
            del pw, w_ref, dq
        del xs

    if with_layer:
        layer = [(name, n, k) for name, n, k in LAYER_7B]
        w16 = [torch.randn(n, k, generator=gen).to(dtype).to(device) / k ** 0.5 for _, n, k in layer]
        for m in ms:
            xs = {k: torch.randn(m, k, generator=gen).to(dtype).to(device) for k in {k for _, _, k in layer}}

            def torch_layer():
                for (_, _, k), w in zip(layer, w16):
                    F.linear(xs[k], w)
            t_ref = bench(torch_layer)
            for bits in bits_list:
                pws = [tw.prepare(*_random_weight(n, k, bits, group_size, sym, device, gen), None,
                                  bits, group_size, sym) for _, n, k in layer]

                def q_layer():
                    for (_, _, k), pw in zip(layer, pws):
                        qmm(xs[k], pw)
                q_layer()
                t = bench(q_layer)
                nbytes = sum(pw.nbytes() + m * (k + n) * xs[k].element_size() for (_, n, k), pw in zip(layer, pws))
                flops = 2.0 * m * sum(n * k for _, n, k in layer)
                record("7b-layer", "7B layer (7 linears)", None, None, m, bits, t, t_ref, nbytes, flops, None)
                del pws
        del w16
    return gpu, peak, rows


def markdown(gpu, peak, rows) -> str:
    r0 = rows[0] if rows else {"dtype": "?", "group_size": "?", "sym": "?"}
    dq = any("dequant_ms" in r for r in rows)
    lines = [f"GPU: {gpu}; bandwidth roofline: {_fmt(peak, '.0f')} GB/s; activations {r0['dtype']}, "
             f"group size {r0['group_size']}, {'symmetric' if r0['sym'] is True else 'asymmetric'}", "",
             "| shape (NxK) | M | bits | time (us) | GB/s | TFLOP/s | % roofline | torch dense (us) | speed-up | max rel err |"
             + (" dequant kernel (us) | ÷ dequant |" if dq else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if dq else "")]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['bits']} | {r['time_ms'] * 1e3:.1f} | {r['gbps']:.0f} | "
                     f"{r['tflops']:.2f} | {_fmt(r['pct_roofline'], '.1f')} | {r['torch_ms'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f} | {_fmt(r['max_rel_err'], '.1e')} |"
                     + (f" {_fmt(r.get('dequant_ms') and r['dequant_ms'] * 1e3, '.1f')} | "
                        f"{_fmt(r.get('speedup_vs_dequant'), '.2f')} |" if dq else ""))
    return "\n".join(lines)


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--shapes", default=DEFAULT_SHAPES, show_default=True, help="NxK (out x in) list")
@click.option("--m", "ms", default="1,4,16,64,256", show_default=True, help="token counts M")
@click.option("--bits", "bits_list", default="2,3,4,8", show_default=True)
@click.option("--group-size", default=128, show_default=True, type=int, help="-1 = per-channel")
@click.option("--asym", is_flag=True, help="asymmetric weights (zeros tensor) instead of symmetric")
@click.option("--dtype", "dtype_name", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--peak-gbps", type=float, default=None, help="bandwidth roofline (default: from the GPU name)")
@click.option("--layer/--no-layer", "with_layer", default=True, show_default=True, help="7B decoder-layer block")
@click.option("--check/--no-check", default=True, show_default=True, help="compare with a dequantized fp32 reference")
@click.option("--heuristic", is_flag=True,
              help="use triton_wna16.default_config instead of autotuning (quick first look)")
@click.option("--dequant", "with_dequant", is_flag=True,
              help="also time the plugin's dequant kernel (dequantize + dense GEMM) on the same weights")
@click.option("--cuda-graph", is_flag=True,
              help="time replays of a CUDA graph of the call (GPU time without per-call host overhead)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write rows as JSON")
@click.option("--interpret-smoke", is_flag=True, help="one tiny shape under the Triton interpreter on the CPU")
def main(shapes, ms, bits_list, group_size, asym, dtype_name, peak_gbps, with_layer, check, heuristic, with_dequant,
         cuda_graph, json_path, interpret_smoke):
    if interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"     # before the kernels' module is imported
        shapes, ms, bits_list, with_layer = "96x128", "1,20", "3,4", False
    else:
        import torch
        if not torch.cuda.is_available():
            click.echo("error: no CUDA device: bench_kernels needs a GPU (--interpret-smoke checks the script on CPU)",
                       err=True)
            sys.exit(2)
    try:
        gpu, peak, rows = run(_shapes(shapes), _ints(ms), _ints(bits_list), group_size, not asym, dtype_name,
                              peak_gbps, with_layer, check, interpret_smoke, click.echo, heuristic, cuda_graph,
                              with_dequant)
    except ValueError as exc:                   # bad shape / bits / group size: one line, exit 2
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(markdown(gpu, peak, rows))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"gpu": gpu, "peak_gbps": peak, "interpret_smoke": interpret_smoke,
                       "launch": "heuristic" if heuristic else "autotuned",
                       "timing": "cuda-graph replay" if cuda_graph else "per call", "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
