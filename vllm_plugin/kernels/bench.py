"""Micro-benchmark of the plugin's kernels against a dense ``F.linear``.

    python -m vllm_plugin.kernels.bench [--threads 1] [--bits 4] [--group 64] [--m 1,16]
                                        [--dtypes bfloat16,float32] [--shapes default|llm|576x576,...]
                                        [--ratios-of native_cpu] [--int8-act] [--stream N]

Shapes are ``out x in``: ``default`` = the default model's SmolLM2-135M layers, unfused and
vLLM-fused; ``llm`` = 4096x4096, 11008x4096, 4096x11008, 14336x4096 (Llama-2-7B / Mistral-7B); ``1b`` = the
vLLM-fused layers of the random 1.1B Llama that tools/bench_serving.py serves.  ``--vllm-dense`` adds vLLM's
own prepacked oneDNN GEMM, the path vLLM serves an FP model with (stronger than ``F.linear`` at M > 1).
Prints the CPU's features and its measured memory read bandwidth first; timings are microseconds per
call (best of several batches, the kernels taking turns, so that other processes' load affects them
alike).  For the kernel named by ``--ratios-of`` it adds its speed-up over the dense ``F.linear``,
the GB/s of weight traffic (bytes the prepared layer holds / time) and that as a % of the measured
bandwidth.  Weights are random codes (the kernels' speed does not depend on their values).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F

from rcsr_deploy.packing import pack_codes

from . import KERNELS, LayerSpec, QuantWeights

DEFAULT_SHAPES = "576x576,192x576,1536x576,576x1536,960x576,3072x576"
LLM_SHAPES = "4096x4096,11008x4096,4096x11008,14336x4096"
# the random-init 1.1B Llama of tools/bench_serving.py (TinyLlama-1.1B shape), vLLM-fused: qkv, o, gate_up, down
ONE_B_SHAPES = "2560x2048,2048x2048,11264x2048,2048x5632"


def vllm_dense_linear(dense: torch.Tensor):
    """vLLM CPU's own unquantized GEMM for ``dense`` [out, in] -- the path an FP model is served with
    (``dispatch_cpu_unquantized_gemm``: oneDNN on a weight prepacked once), or None when this vLLM build
    has no oneDNN."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001 - no vLLM: the column is left out
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None
    handler = ops.create_onednn_mm(dense.t(), 32)
    return lambda x: ops.onednn_mm(handler, x, None)


def read_bandwidth_gbs(mbytes: int = 512, rounds: int = 5) -> float:
    """Memory read bandwidth with the current thread count: best of ``rounds`` sums over a buffer far
    larger than the caches."""
    t = torch.ones(mbytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def cpu_features() -> str:
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if f in flags]
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return f"{model or 'cpu'}; flags: {' '.join(feats) or '?'}; torch AMX tile: {amx}; torch {torch.__version__}"


def time_calls(fns: dict, min_time: float = 0.15, rounds: int = 7) -> dict:
    """Microseconds per call of each function: the best of ``rounds`` batches, the functions taking
    turns batch by batch (so that load from other processes hits all of them alike)."""
    per_batch = {}
    for name, fn in fns.items():
        for _ in range(2):
            fn()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < min_time / rounds or n < 2:
            fn()
            n += 1
        per_batch[name] = n
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = per_batch[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / n)
    return {name: v * 1e6 for name, v in best.items()}


def time_call(fn, min_time: float = 0.15) -> float:
    return time_calls({"f": fn}, min_time)["f"]


def make_layer(out_f: int, in_f: int, bits: int, group: int, sym: bool, seed: int = 0) -> QuantWeights:
    g = torch.Generator().manual_seed(seed)
    ng = 1 if group == -1 else in_f // group
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, ng, generator=g) * 0.02 + 1e-3).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (out_f, ng), generator=g, dtype=torch.uint8)
    return QuantWeights(pack_codes(codes, bits), scales, zeros, None)


def _prepared(name: str, spec: LayerSpec, w: QuantWeights):
    """Kernel ``name`` (a bench column: ``nc:a8`` etc.) prepared on ``w``, or None when it cannot take ``spec``."""
    base = {"i4": "torch_int4", "nc": "native_cpu"}.get(name.split(":")[0], name)
    if KERNELS[base].unsupported_reason(spec) is not None:
        return None
    k = KERNELS[base](spec)
    k.prepare(w)
    if name == "i4:mm":
        k.dense_min_m = 1 << 62
    elif name == "i4:dense":
        k.dense_min_m = 0
    elif name == "nc:small":
        k.large_m = 0
    elif name == "nc:large":
        k.large_m = 1
    elif name == "nc:a8":
        from .native_cpu import INT8_ACT

        k.isa, k.large_m = INT8_ACT, 0
    return k


def stream(args, shapes: str, names: list[str], ms: list[int], bw: float) -> int:
    """``--stream N``: milliseconds per pass over N blocks of layers of all the shapes (distinct weights)."""
    dims = [tuple(int(v) for v in shape.split("x")) for shape in shapes.split(",")]
    print(f"# one pass = {args.stream} blocks x ({shapes}), each layer its own weights; ms per pass (best of 5)")
    cols = ["dense"] + (["vllm_dense"] if args.vllm_dense else []) + names
    print(f"{'bits':>4} {'dtype':>8} {'M':>4} " + " ".join(f"{c:>11}" for c in cols)
          + f" {'x dense':>8} {'x vllm':>7} {'GB/s':>6} {'%bw':>4}")
    for bits in [int(b) for b in args.bits.split(",")]:
        for dname in args.dtypes.split(","):
            dt = getattr(torch, dname)
            layers: dict[str, list] = {c: [] for c in cols}
            for blk in range(args.stream):
                for out_f, in_f in dims:
                    w = make_layer(out_f, in_f, bits, args.group, not args.asym, seed=blk)
                    spec = LayerSpec(bits, args.group, not args.asym, "static", in_f, out_f, dt)
                    dense = torch.randn(out_f, in_f).to(dt)
                    layers["dense"].append((in_f, lambda x, d=dense: F.linear(x, d)))
                    if args.vllm_dense:
                        vd = vllm_dense_linear(dense)
                        layers["vllm_dense"].append((in_f, vd) if vd is not None else None)
                    for n in names:
                        k = _prepared(n, spec, w)
                        layers[n].append(None if k is None else (in_f, k, k.apply))
            nbytes = {n: sum(e[1].nbytes() for e in layers[n] if e is not None) for n in names}
            for m in ms:
                xs = {in_f: torch.randn(m, in_f).to(dt) for _, in_f in dims}
                t = {}
                for c in cols:
                    if any(e is None for e in layers[c]):
                        continue
                    fns = [(e[0], e[-1]) for e in layers[c]]
                    best = float("inf")
                    for _ in range(5):
                        t0 = time.perf_counter()
                        for in_f, fn in fns:
                            fn(xs[in_f])
                        best = min(best, time.perf_counter() - t0)
                    t[c] = best * 1e3
                rk = args.ratios_of
                extra = ""
                if rk in t:
                    gbs = nbytes[rk] / (t[rk] * 1e-3) / 1e9
                    vx = f"{t['vllm_dense'] / t[rk]:7.2f}" if "vllm_dense" in t else f"{'-':>7}"
                    extra = f" {t['dense'] / t[rk]:8.2f} {vx} {gbs:6.1f} {100 * gbs / bw:4.0f}"
                print(f"{bits:>4} {dname[:8]:>8} {m:>4} " + " ".join(f"{t[c]:11.2f}" if c in t else f"{'-':>11}"
                                                                   for c in cols) + extra, flush=True)
    return 0


def switch(args, shapes: str) -> int:
    """``--switch``: the row count from which native_cpu dequantizes + calls ATen's GEMM, measured on each shape
    the way a layer load measures it, next to the table's value."""
    from . import native_cpu as nc

    budget = args.switch_budget or nc.SWITCH_BUDGET_S
    print(f"# switch-over to dequantize + ATen GEMM; table applies here: {nc.table_applies()}; budget {budget} s "
          "per shape; us per call: packed-code / dequantize + GEMM (best of 3)")
    print(f"{'bits':>4} {'dtype':>8} {'out x in':>10} {'isa':>11} {'table':>5} {'measured':>8}  timings")
    for bits in [int(b) for b in args.bits.split(",")]:
        for dname in args.dtypes.split(","):
            dt = getattr(torch, dname)
            for shape in shapes.split(","):
                out_f, in_f = (int(v) for v in shape.split("x"))
                spec = LayerSpec(bits, args.group, not args.asym, "static", in_f, out_f, dt)
                k = _prepared("native_cpu", spec, make_layer(out_f, in_f, bits, args.group, not args.asym))
                if k is None:
                    continue
                table = nc.large_m_for(k.isa, dt, bits)
                timings, complete = nc.measure_paths(k.weight, k.isa, dt, budget_s=budget)
                measured = nc.choose_switch(timings, table, complete)
                isa = nc.ISA_NAMES[nc.effective_isa(k.isa, dt, bits)]
                print(f"{bits:>4} {dname[:8]:>8} {shape:>10} {isa:>11} {table or 'never':>5} {measured or 'never':>8}  "
                      + ", ".join(f"{m}: {ts * 1e6:.0f}/{tl * 1e6:.0f}" for m, ts, tl in timings)
                      + ("" if complete else " (budget)"), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--vllm-dense", action="store_true",
                    help="also time vLLM's prepacked oneDNN GEMM on the dense weight ('vllm_dense', the path vLLM "
                         "serves an FP model with) and print the --ratios-of kernel's speed-up over it")
    ap.add_argument("--kernels", default=",".join(k for k in KERNELS if k != "triton"))
    ap.add_argument("--min-time", type=float, default=0.15)
    ap.add_argument("--ratios-of", default="native_cpu",
                    help="kernel whose speed-up over dense, weight GB/s and %% of bandwidth are printed")
    ap.add_argument("--split-native", action="store_true",
                    help="time native_cpu's two paths separately (packed-code kernel 'nc:small', dequantize + "
                         "ATen GEMM 'nc:large') to place the switch-over")
    ap.add_argument("--int8-act", action="store_true",
                    help="add native_cpu with the opt-in int8-activation kernel ('nc:a8', RCSR_CPU_ISA=avx512_vnni_a8; "
                         "changes numerics) next to the exact one")
    ap.add_argument("--split-int4", action="store_true",
                    help="time torch_int4's two paths separately (int4 GEMM 'i4:mm', dequant + dense 'i4:dense')")
    ap.add_argument("--stream", type=int, default=0, metavar="N",
                    help="time one pass over N blocks of all --shapes, each layer with its own weights, so that the "
                         "weights stream from memory as in a decode step (--shapes 1b --stream 22: the 1.1B model's "
                         "decoder); milliseconds per pass")
    ap.add_argument("--switch", action="store_true",
                    help="measure native_cpu's switch-over row count per shape as a layer load does "
                         "(RCSR_CPU_LARGE_M=measure), next to the table's (native_cpu.LARGE_M)")
    ap.add_argument("--switch-budget", type=float, default=None, metavar="S",
                    help="seconds per shape for --switch (default: what a layer load allows)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    aliases = {"default": DEFAULT_SHAPES, "llm": LLM_SHAPES, "1b": ONE_B_SHAPES}
    shapes = ",".join(aliases.get(s.strip(), s.strip()) for s in args.shapes.split(","))
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*(,[1-9]\d*x[1-9]\d*)*", shapes):
        ap.error(f"--shapes {args.shapes!r}: give OUTxIN shapes and/or the names {', '.join(aliases)}, "
                 "separated by commas")
    bw = read_bandwidth_gbs()
    print(f"# {cpu_features()}; threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cpus; measured read bandwidth {bw:.1f} GB/s")
    ms = [int(m) for m in args.m.split(",")]
    names = [k for k in args.kernels.split(",") if k]
    if args.split_int4 and "torch_int4" in names:
        i = names.index("torch_int4")
        names[i:i + 1] = ["i4:mm", "i4:dense"]
    if args.int8_act and "native_cpu" in names:
        from .native_cpu import int8_supported

        if int8_supported():
            names.insert(names.index("native_cpu") + 1, "nc:a8")
        else:
            print("# --int8-act: this CPU has no AVX512_VNNI; column left out")
    if args.split_native and "native_cpu" in names:
        i = names.index("native_cpu")
        names[i:i + 1] = ["nc:small", "nc:large"]
    if args.stream:
        return stream(args, shapes, names, ms, bw)
    if args.switch:
        return switch(args, shapes)
    print("# microseconds per call; 'dense' = F.linear on a dense weight of the activation dtype")
    rk = args.ratios_of
    header = (f"{'bits':>4} {'dtype':>8} {'out x in':>10} {'M':>4} {'dense':>8} " + " ".join(f"{n:>11}" for n in names)
              + (f" {'x dense':>8} {'GB/s':>6} {'%bw':>4}" if rk in names else "")
              + (f" {'vllm_dense':>10} {'x vllm':>7}" if args.vllm_dense else ""))
    print(header)
    for bits in [int(b) for b in args.bits.split(",")]:
        for dname in args.dtypes.split(","):
            dt = getattr(torch, dname)
            for shape in shapes.split(","):
                out_f, in_f = (int(v) for v in shape.split("x"))
                w = make_layer(out_f, in_f, bits, args.group, not args.asym)
                spec = LayerSpec(bits, args.group, not args.asym, "static", in_f, out_f, dt)
                kernels = {n: k for n in names if (k := _prepared(n, spec, w)) is not None}
                dense = torch.randn(out_f, in_f).to(dt)
                vd = vllm_dense_linear(dense) if args.vllm_dense else None
                for m in ms:
                    x = torch.randn(m, in_f).to(dt)
                    fns = {"dense": lambda: F.linear(x, dense)}
                    if vd is not None:
                        fns["vllm_dense"] = lambda: vd(x)
                    for n, k in kernels.items():
                        fns[n] = (lambda k: lambda: k.apply(x))(k)
                    t = time_calls(fns, args.min_time * (1 + len(fns)))
                    t_dense = t["dense"]
                    cols = [f"{t[n]:11.1f}" if n in t else f"{'-':>11}" for n in names]
                    extra = ""
                    if rk in t:
                        gbs = kernels[rk].nbytes() / (t[rk] * 1e-6) / 1e9
                        extra = f" {t_dense / t[rk]:8.2f} {gbs:6.1f} {100 * gbs / bw:4.0f}"
                    if args.vllm_dense:
                        extra += (f" {t['vllm_dense']:10.1f} {t['vllm_dense'] / t[rk]:7.2f}"
                                  if "vllm_dense" in t and rk in t else f" {'-':>10} {'-':>7}")
                    print(f"{bits:>4} {dname[:8]:>8} {shape:>10} {m:>4} {t_dense:8.1f} " + " ".join(cols) + extra,
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
