#!/usr/bin/env python
"""Compile the Triton W{2,3,4,8}A16 GEMM ahead of time for a real NVIDIA GPU on a CPU-only machine.

No GPU is needed and none is used: Triton lowers ``wna16_gemm_kernel``
(vllm_plugin/kernels/triton_wna16_jit.py) to PTX and its bundled ``ptxas`` assembles an sm_XX cubin,
exactly as a first launch on that GPU would.  Every compile is specialized like a real launch of
``triton_wna16.matmul``: the launch arguments are captured from ``matmul`` itself (fake PreparedWeight
tensors of the real shapes, real dtypes), and Triton's own launch binder turns them into the
signature, the constexprs (``None`` pointers, integers equal to 1) and the ``tt.divisibility``
hints (16-byte-aligned pointers, integers divisible by 16).

For every compile it reports: ok / the first line of the error; shared memory (bytes, from Triton's
metadata: what the launch asks for); registers per thread, spill stores/loads and stack frame
(``ptxas -v`` on the PTX, the same flags Triton uses); local memory (``cuobjdump
--dump-resource-usage``); and from the SASS (``nvdisasm -g``, whose line info maps each instruction
to a line of the kernel source): global loads by width per operand (x tile, weight tile, 3-bit high
plane, scales, zeros, group ids, bias; both ``LDG`` into registers and ``LDGSTS`` async copies into
shared memory), and tensor-core instructions (HMMA, HGMMA (= wgmma), IMMA, tcgen05 UTC*MMA).
These are compiler facts, not performance measurements.

Rows: bits x activation dtype x dequantization branch (per channel; one group per K tile; several
groups per K tile; uneven act-order groups) x sym/asym x launch config (the autotune lists
SKINNY_CONFIGS / TILED_CONFIGS, compiled at the first shape with M = 16 resp. 256, and/or the configs
``triton_wna16.default_config`` picks for each shape, M and weight kind), deduplicated by the exact
compile input (a row lists every launch it stands for in ``uses``).

Output: the per-compile table on stdout, the per-arch limits, a per bits x path summary of the
default_config compiles, and the flagged compiles grouped by launch config (SMEM>LIMIT: more shared
memory than a block may use on that arch, the launch would fail; SPILL: ptxas spills with Triton's
flags; ERROR: the compile failed).  ``--json`` writes every row (a spilling row also records what
ptxas does without Triton's ``--regAllocOptLevel=2``, to tell that flag's small spills from real
register pressure).  ``--from-json`` merges/reports earlier runs (e.g. pieces run per ``--bits``).
Without Triton or its NVIDIA backend (ptxas, cuobjdump, nvdisasm) it exits with code 2 and one line.
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import click

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

# The kernels must be real @triton.jit functions, not interpreter ones: Triton reads TRITON_INTERPRET
# when the kernel module is imported, so drop it before anything imports Triton.
os.environ.pop("TRITON_INTERPRET", None)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008"      # NxK = out x in (as tools/bench_kernels.py)
DEFAULT_MS = "1,16,64,256"
BRANCHES = ("channel", "tile", "multi", "gidx")
BRANCH_HELP = {"channel": "per-channel scales (group_size -1)",
               "tile": "one group per K tile (group % BLOCK_K == 0; g128 where it fits)",
               "multi": "several groups per K tile (g32 < BLOCK_K)",
               "gidx": "uneven act-order groups (group_ids read per K row; g128)"}
# Per-block limits: max dynamic shared memory a block may opt into (bytes), registers per thread.
ARCH_LIMITS = {
    80: {"gpu": "A100", "shared": 163 * 1024, "regs": 255},
    86: {"gpu": "RTX 30xx / A10 / A40", "shared": 99 * 1024, "regs": 255},
    89: {"gpu": "L4 / L40S / RTX 40xx", "shared": 99 * 1024, "regs": 255},
    90: {"gpu": "H100 / H200", "shared": 227 * 1024, "regs": 255},
    100: {"gpu": "B200 / GB200", "shared": 227 * 1024, "regs": 255},
    120: {"gpu": "RTX 50xx / RTX PRO 6000", "shared": 99 * 1024, "regs": 255},
}
LOAD_LABELS = {"x_ptr": "x", "qw_ptr": "w", "qh_ptr": "qh", "s_ptr": "scale", "z_ptr": "zero",
               "gidx_ptr": "gidx", "bias_ptr": "bias"}
MMA_RE = re.compile(r"^(HMMA|HGMMA|IMMA|QMMA|OMMA|UTC\w*MMA|WGMMA|BMMA)")
SASS_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
GLOBAL_LOAD_RE = re.compile(r"^(LDG|LDGSTS|UTMALDG)(\.|$)")     # not LDGDEPBAR (a barrier)
LINE_RE = re.compile(r'//## File "([^"]+)", line (\d+)')


class ToolMissing(Exception):
    """Triton or its NVIDIA backend is not usable here (exit code 2)."""


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def check_toolchain(arch: int) -> dict:
    """Triton version and the paths of the bundled ptxas / cuobjdump / nvdisasm; ToolMissing if absent."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as nvc
    except Exception as exc:  # noqa: BLE001 - any broken install means "missing"
        raise ToolMissing(f"Triton with its NVIDIA backend is not importable ({type(exc).__name__}: {exc})") from exc
    tools = {}
    try:
        tools["ptxas"] = nvc.get_ptxas(arch).path
        tools["cuobjdump"] = knobs.nvidia.cuobjdump.path
        tools["nvdisasm"] = knobs.nvidia.nvdisasm.path
    except Exception as exc:  # noqa: BLE001
        raise ToolMissing(f"Triton's NVIDIA tools are not available ({type(exc).__name__}: {exc})") from exc
    for name, path in tools.items():
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ToolMissing(f"Triton's bundled {name} is missing ({path})")
    try:
        ver = subprocess.run([tools["ptxas"], "--version"], capture_output=True, text=True, check=True).stdout
        lines = ver.strip().splitlines()
        ptxas_version = next((ln.split("release", 1)[1].strip(" ,") for ln in lines if "release" in ln), lines[-1])
    except Exception as exc:  # noqa: BLE001
        raise ToolMissing(f"the bundled ptxas does not run ({exc})") from exc
    return {"triton": triton.__version__, "ptxas_version": ptxas_version, **tools}


def sm_name(arch: int) -> str:
    return f"sm_{arch}{'a' if arch >= 90 else ''}"      # what Triton's CUDA backend passes to ptxas


# ------------------------------------------------------------------------------------------------
# jobs: what to compile
# ------------------------------------------------------------------------------------------------
def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            n, k = item.lower().split("x")
            out.append((int(n), int(k)))
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def config_dict(c) -> dict:
    """A triton.Config of the autotune lists -> the ``config=`` dict of ``triton_wna16.matmul``."""
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def branch_group(branch: str, block_k: int) -> tuple[int, bool] | None:
    """(group_size for prepare(), has uneven act-order groups) realizing ``branch`` for BLOCK_K, or None."""
    if branch == "channel":
        return -1, False
    if branch == "tile":
        for g in (128, 64, 32):
            if g % block_k == 0:
                return g, False
        return None                       # BLOCK_K > 128: no supported group size spans whole tiles
    if branch == "multi":
        return (32, False) if block_k > 32 else None
    if branch == "gidx":
        return 128, True
    raise ValueError(f"unknown branch {branch!r}")


def cfg_label(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} sk{cfg['SPLIT_K']} gm{cfg['GROUP_M']} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}")


def kernel_branch(group_size: int, uneven: bool, block_k: int) -> str:
    """The dequantization branch wna16_gemm_kernel compiles for this weight and BLOCK_K."""
    if group_size == -1:
        return "channel"
    if uneven:
        return "gidx"
    return "tile" if group_size % block_k == 0 else "multi"


# The weight each branch name stands for in the default_config rows (default_config picks BLOCK_K
# from the group size, so the kernel branch compiled can differ: g32 gets BLOCK_K 32, one group per tile).
DEFAULT_WEIGHT = {"channel": (-1, False), "tile": (128, False), "multi": (32, False), "gidx": (128, True)}


def weight_label(group_size: int, uneven: bool) -> str:
    return "per-channel" if group_size == -1 else f"g{group_size}{' uneven act-order' if uneven else ''}"


def _default_config(tw, m: int, n: int, k: int, group_size: int, uneven: bool) -> dict:
    """triton_wna16.default_config as matmul calls it (older versions take no group arguments)."""
    params = inspect.signature(tw.default_config).parameters
    extra = {}
    if "group_size" in params:
        extra["group_size"] = group_size
    if "uneven_groups" in params:
        extra["uneven_groups"] = uneven
    # device "cpu": the heuristic then assumes 132 SMs (H100/H200); only SPLIT_K depends on it.
    return tw.default_config(m, n, k, "cpu", **extra)


def plan(bits_list, dtypes, branches, syms, configs, shapes, ms, sweep_m, bias, grouped: int = 0,
         perm: bool = False) -> list[dict]:
    """Launch descriptions (before deduplication)."""
    from vllm_plugin.kernels import triton_wna16 as tw
    from vllm_plugin.kernels import triton_wna16_jit as J

    launches = []       # (source, M, N, K, branch, group_size, uneven, cfg)
    n0, k0 = shapes[0]
    sweep = []
    if configs in ("skinny", "all"):
        sweep += [(f"skinny[{i}]", sweep_m[0], config_dict(c)) for i, c in enumerate(J.SKINNY_CONFIGS)]
    if configs in ("tiled", "all"):
        sweep += [(f"tiled[{i}]", sweep_m[1], config_dict(c)) for i, c in enumerate(J.TILED_CONFIGS)]
    for branch in branches:
        for source, m, cfg in sweep:
            bg = branch_group(branch, cfg["BLOCK_K"])
            if bg is not None:
                launches.append((source, m, n0, k0, bg[0], bg[1], cfg))
        if configs in ("default", "all"):
            gs, uneven = DEFAULT_WEIGHT[branch]
            for n, k in shapes:
                for m in ms:
                    launches.append((f"default M={m} {n}x{k} {weight_label(gs, uneven)}", m, n, k, gs, uneven,
                                     _default_config(tw, m, n, k, gs, uneven)))
    jobs = []
    for bits in bits_list:
        for dtype in dtypes:
            for sym in syms:
                for source, m, n, k, gs, uneven, cfg in launches:
                    jobs.append(dict(bits=bits, dtype=dtype, branch=kernel_branch(gs, uneven, cfg["BLOCK_K"]),
                                     weight=weight_label(gs, uneven), group_size=gs, uneven_gidx=uneven,
                                     sym=sym == "sym", bias=bias, M=m, N=n, K=k,
                                     path="skinny" if m <= tw.SKINNY_MAX_M else "tiled", config=cfg, source=source,
                                     grouped=grouped, perm=perm and grouped > 0))
    return jobs


# ------------------------------------------------------------------------------------------------
# capture the real launch and specialize it like Triton's launcher
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for the JIT module inside ``triton_wna16.matmul`` and records the kernel launch."""

    INTERPRET = True          # lets matmul accept CPU tensors; every job passes an explicit config

    def __init__(self):
        self.calls = []
        rec = self

        class _Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.calls.append((args, kwargs))
                return launch
        self.wna16_gemm_kernel = _Kernel()
        self.wna16_gemm_skinny_tuned = self.wna16_gemm_tiled_tuned = None


def capture_launch(job: dict):
    """(args, kwargs) that ``triton_wna16.matmul`` passes to ``wna16_gemm_kernel`` for this job."""
    import torch

    from vllm_plugin.kernels import triton_wna16 as tw

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[job["dtype"]]
    bits, n, k, gs = job["bits"], job["N"], job["K"], job["group_size"]
    plane = 2 if bits == 3 else bits
    out_pad = -(-n // tw.N_ALIGN) * tw.N_ALIGN
    n_groups = 1 if gs == -1 else k // gs
    empty = torch.empty
    pw = tw.PreparedWeight(
        in_features=k, out_features=n, bits=bits, group_size=gs, sym=job["sym"], out_pad=out_pad,
        qweight=empty(k, out_pad * plane // 32, dtype=torch.int32),
        scales=empty(n_groups, out_pad, dtype=torch.float16),
        qweight_hi=empty(k, out_pad // 32, dtype=torch.int32) if bits == 3 else None,
        zeros=None if job["sym"] else empty(n_groups, out_pad, dtype=torch.uint8),
        perm=torch.arange(k) if job["uneven_gidx"] else None,
        group_ids=(torch.arange(k, dtype=torch.int32) // gs) if job["uneven_gidx"] else None)
    x = empty(job["M"], k, dtype=dtype)
    bias = torch.zeros(n, dtype=dtype) if job["bias"] else None
    n_exp = job.get("grouped", 0)
    if n_exp:  # MoE: the experts stacked, M rows per expert, one grouped launch
        gw = tw.stack([dataclasses.replace(pw, perm=torch.arange(k) if job.get("perm") else pw.perm)
                       for _ in range(n_exp)])
        x = empty(job["M"] * n_exp, k, dtype=dtype)
        offsets = torch.arange(n_exp + 1) * job["M"]
    rec = _Recorder()
    saved = tw._jit
    tw._jit = lambda: rec
    try:
        if n_exp:
            tw.grouped_matmul(x, gw, offsets, config=job["config"])
        else:
            tw.matmul(x, pw, bias, config=job["config"])
    finally:
        tw._jit = saved
    if len(rec.calls) != 1:
        raise RuntimeError(f"expected one kernel launch from triton_wna16, saw {len(rec.calls)}")
    return rec.calls[0]


def specialize(job: dict, arch: int) -> dict:
    """signature / constexprs / attrs / options of the real launch, as Triton's launcher derives them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from vllm_plugin.kernels import triton_wna16_jit as J

    fn = J.wna16_gemm_kernel
    args, kwargs = capture_launch(job)
    kwargs = dict(kwargs)
    # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", getattr(fn, "debug", None)) or knobs.runtime.debug
    for name, knob in (("instrumentation_mode", "instrumentation_mode"),
                       ("fpsan_homomorphic_casts", "fpsan_homomorphic_casts")):
        if hasattr(knobs.compilation, knob):
            kwargs[name] = getattr(knobs.compilation, knob)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    try:
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        how = "triton-binder"
    except (ImportError, AttributeError, TypeError):
        signature, constexprs, attrs, options = _specialize_manual(fn, backend, args, kwargs)
        how = "manual"
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs,
            "options": {k: v for k, v in options.__dict__.items()}, "how": how}


def _specialize_manual(fn, backend, args, kwargs):
    """Fallback for Triton versions without the 3.x launch binder: Triton 3's rules written out."""
    import torch
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    tnames = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
              torch.uint8: "u8", torch.int64: "i64"}
    for i, (name, p) in enumerate(zip(names, fn.params)):
        v = values[name]
        if p.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + tnames[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "u1"
        else:
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = backend.parse_options({k: v for k, v in kwargs.items() if k not in names})
    return signature, constexprs, attrs, options


def compile_key(spec: dict, arch: int) -> str:
    blob = repr((arch, sorted(spec["signature"].items()), sorted(spec["constexprs"].items()),
                 sorted((k, repr(v)) for k, v in spec["attrs"].items()),
                 sorted((k, repr(v)) for k, v in spec["options"].items())))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# worker: compile + inspect
# ------------------------------------------------------------------------------------------------
def _source_lines() -> dict[int, str]:
    """Line number in triton_wna16_jit.py -> operand label, for every tl.load statement.

    A helper function that loads a single operand (``_zero_row``) maps all its lines to that operand:
    ptxas may attribute the inlined load to another line of the helper (its ``return``)."""
    from vllm_plugin.kernels import triton_wna16_jit as J
    tree = ast.parse(Path(inspect.getsourcefile(J)).read_text())

    def loads(root):
        for node in ast.walk(root):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and node.args):
                ptrs = [n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name) and n.id in LOAD_LABELS]
                if ptrs:
                    yield node, LOAD_LABELS[ptrs[0]]

    lines = {}
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        labels = {label for _, label in loads(fn)}
        if fn.name != J.wna16_gemm_kernel.__name__ and len(labels) == 1:
            for ln in range(fn.lineno, (fn.end_lineno or fn.lineno) + 1):
                lines[ln] = next(iter(labels))
    for node, label in loads(tree):
        for ln in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            lines[ln] = label
    return lines


def kernel_source_sha() -> str:
    """Short sha256 of the kernel's source file as imported (rows of one run must agree on it)."""
    from vllm_plugin.kernels import triton_wna16_jit as J
    return hashlib.sha256(Path(inspect.getsourcefile(J)).read_bytes()).hexdigest()[:12]


def _git_head() -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        head = res.stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "vllm_plugin/kernels"],
                               capture_output=True, text=True).stdout.strip()
        return f"{head}{'+dirty' if head and dirty else ''}" if head else None
    except OSError:
        return None


def access_width(opcode: str) -> int:
    """Bits per thread of a global access opcode (LDG.E.128 -> 128, LDG.E -> 32, LDG.E.U8 -> 8)."""
    width = 32
    for tok in opcode.split(".")[1:]:
        if tok in ("64", "128", "256"):
            width = int(tok)
        elif tok in ("U8", "S8"):
            width = 8
        elif tok in ("U16", "S16"):
            width = 16
    return width


def analyze_sass(text: str, jit_file: str, load_lines: dict[int, str]) -> dict:
    opcodes = Counter()
    mma = Counter()
    per_operand: dict[str, Counter] = {}
    where = None
    for line in text.splitlines():
        m = LINE_RE.search(line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = SASS_RE.search(line)
        if not m:
            continue
        op = m.group(1)
        opcodes[op] += 1
        if MMA_RE.match(op):
            mma[op] += 1
        if GLOBAL_LOAD_RE.match(op):
            label = "other"
            if where and os.path.basename(where[0]) == os.path.basename(jit_file):
                label = load_lines.get(where[1], "other")
            kind = "LDGSTS" if op.startswith("LDGSTS") else "UTMALDG" if op.startswith("UTMALDG") else "LDG"
            per_operand.setdefault(label, Counter())[f"{kind}.{access_width(op)}"] += 1
    ldg = {op: c for op, c in sorted(opcodes.items()) if GLOBAL_LOAD_RE.match(op)}
    widths = Counter()
    for op, c in ldg.items():
        widths[access_width(op)] += c
    kinds = sorted({re.match(r"[A-Z]+", op).group(0) for op in mma})
    return {"global_loads": ldg, "global_load_widths": {str(w): c for w, c in sorted(widths.items())},
            "loads_by_operand": {k: dict(sorted(v.items())) for k, v in sorted(per_operand.items())},
            "mma": dict(sorted(mma.items())), "mma_kind": "+".join(kinds) if kinds else None,
            "mma_count": sum(mma.values()),
            "stores": {op: c for op, c in sorted(opcodes.items()) if op.startswith(("STG", "ATOMG", "RED"))},
            "sass_instructions": sum(opcodes.values())}


def parse_ptxas_log(log: str) -> dict:
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    out["regs"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    else:
        out["stack"] = out["spill_stores"] = out["spill_loads"] = None
    return out


def parse_resource_usage(text: str) -> dict:
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return {"cuobjdump_regs": None, "local": None, "static_shared": None}
    reg, _stack, shared, local = map(int, m.groups())
    return {"cuobjdump_regs": reg, "local": local, "static_shared": shared}


_WORKER: dict = {}


def _init_worker(cache_dir: str | None):
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def compile_one(arch: int, spec: dict, tools: dict) -> dict:
    """Compile one specialization and inspect the result (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_plugin.kernels import triton_wna16_jit as J

    if "load_lines" not in _WORKER:
        _WORKER["load_lines"] = _source_lines()
        _WORKER["kernel_sha"] = kernel_source_sha()
    row: dict = {"ok": False, "error": None, "kernel_sha": _WORKER["kernel_sha"]}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=J.wna16_gemm_kernel, signature=spec["signature"], constexprs=spec["constexprs"],
                        attrs=spec["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
    except Exception as exc:  # noqa: BLE001 - a compile error is a result row
        text = str(exc).strip() or type(exc).__name__
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
        row.update(error=f"{type(exc).__name__}: {first}"[:300], compile_s=round(time.perf_counter() - t0, 2))
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["ok"] = True
    row["shared"] = int(k.metadata.shared)
    row["num_warps"] = k.metadata.num_warps
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        Path(ptx).write_text(k.asm["ptx"])
        Path(cubin).write_bytes(k.asm["cubin"])
        # Triton's own ptxas flags (backends/nvidia/compiler.py make_cubin) plus -v.
        fmad = [] if spec["options"].get("enable_fp_fusion", True) else ["--fmad=false"]
        cmd = [tools["ptxas"], "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_name(arch)}",
               ptx, "-o", os.path.join(tmp, "v.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        row.update(parse_ptxas_log(res.stdout + res.stderr))
        if (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0):
            # Triton passes --regAllocOptLevel=2 (a ptxas 13 workaround); what ptxas does without it tells a
            # flag artifact (same registers, no spill) from real register pressure.  Informational only.
            res = subprocess.run([c for c in cmd if c != "--regAllocOptLevel=2"], capture_output=True, text=True)
            row["without_regalloc_opt2"] = parse_ptxas_log(res.stdout + res.stderr)
        res = subprocess.run([tools["cuobjdump"], "--dump-resource-usage", cubin], capture_output=True, text=True)
        row.update(parse_resource_usage(res.stdout))
        res = subprocess.run([tools["nvdisasm"], "-g", "-c", cubin], capture_output=True, text=True)
        if res.returncode != 0:
            row["sass_error"] = (res.stderr.strip().splitlines() or ["nvdisasm failed"])[0]
        else:
            row.update(analyze_sass(res.stdout, inspect.getsourcefile(J), _WORKER["load_lines"]))
    return row


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _widths(counter: dict | None) -> str:
    """{'LDGSTS.128': 16, 'LDG.32': 4} -> '128x16a 32x4' (a = async copy LDGSTS)."""
    if not counter:
        return "-"
    parts = []
    for key, c in sorted(counter.items(), key=lambda kv: (-int(kv[0].split(".")[1]), kv[0])):
        kind, width = key.split(".")
        parts.append(f"{width}x{c}{'a' if kind == 'LDGSTS' else 't' if kind == 'UTMALDG' else ''}")
    return " ".join(parts)


def flags(row: dict, limits: dict) -> list[str]:
    out = []
    if not row["ok"]:
        out.append("ERROR")
        return out
    if row["shared"] > limits["shared"]:
        out.append("SMEM>LIMIT")
    if (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0) > 0:
        out.append("SPILL")
    if (row.get("local") or 0) > 0 and "SPILL" not in out:
        out.append("LOCAL")
    if row.get("regs") is not None and row["regs"] > limits["regs"]:
        out.append("REGS>LIMIT")
    if row.get("cuobjdump_regs") is not None and row.get("regs") is not None and row["cuobjdump_regs"] != row["regs"]:
        out.append("PTXAS-RERUN-DIFFERS")     # our ptxas -v run does not match Triton's cubin
    if row.get("sass_error"):
        out.append("NO-SASS")
    return out


def table(rows: list[dict], limits: dict) -> str:
    head = ("| bits | dtype | branch (g) | sym | path | config | M | ok | regs | smem KB | spill st/ld | "
            "x loads | w loads | qh loads | scale loads | MMA | flags |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lo = r.get("loads_by_operand") or {}
        spill = "-" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(
            f"| {r['bits']} | {r['dtype']} | {r['branch']} ({r['group_size']}) | {'sym' if r['sym'] else 'asym'} | "
            f"{r['path']} | {cfg_label(r['config'])} | {r['M']} | {'ok' if r['ok'] else 'ERR'} | "
            f"{r.get('regs', '-')} | {(r['shared'] / 1024 if r['ok'] else 0):.1f} | {spill} | "
            f"{_widths(lo.get('x'))} | {_widths(lo.get('w'))} | {_widths(lo.get('qh'))} | {_widths(lo.get('scale'))} | "
            f"{(r.get('mma_kind') or '-')} x{r.get('mma_count', 0)} | {' '.join(r['flags']) or ''} |")
    return "\n".join(lines)


def _rng(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def _width_set(rows, operand) -> str:
    seen = set()
    for r in rows:
        for key in ((r.get("loads_by_operand") or {}).get(operand) or {}):
            kind, width = key.split(".")
            seen.add((int(width), "a" if kind == "LDGSTS" else ""))
    return " ".join(f"{w}{a}" for w, a in sorted(seen, reverse=True)) or "-"


def _combo(r) -> str:
    return f"{r['branch']}-{'sym' if r['sym'] else 'asym'}"


def summary(rows: list[dict]) -> str:
    """Per bits x path over the default_config compiles: ranges and the combos that spill/overflow."""
    rows = [r for r in rows if r["ok"] and any(u.startswith("default") for u in r["uses"])]
    if not rows:
        return ""
    lines = ["| bits | path | compiles | regs | shared KB | spills (branch-sym: max store/load B) | over smem | "
             "x load bits | w load bits | qh load bits | scale load bits | MMA |",
             "|---|---|---:|---|---|---|---|---|---|---|---|---|"]
    for bits in sorted({r["bits"] for r in rows}):
        for path in ("skinny", "tiled"):
            g = [r for r in rows if r["bits"] == bits and r["path"] == path]
            if not g:
                continue
            spills: dict[str, tuple[int, int]] = {}
            for r in g:
                if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0):
                    st, ld = spills.get(_combo(r), (0, 0))
                    spills[_combo(r)] = (max(st, r["spill_stores"]), max(ld, r["spill_loads"]))
            over = sorted({_combo(r) for r in g if "SMEM>LIMIT" in r["flags"]})
            mma = sorted({r.get("mma_kind") or "none" for r in g})
            sp = ", ".join(f"{k}: {v[0]}/{v[1]}" for k, v in sorted(spills.items())) or "0"
            lines.append(f"| {bits} | {path} | {len(g)} | {_rng(r.get('regs') for r in g)} | "
                         f"{_rng(round(r['shared'] / 1024, 1) for r in g)} | {sp} | {', '.join(over) or '-'} | "
                         f"{_width_set(g, 'x')} | {_width_set(g, 'w')} | {_width_set(g, 'qh')} | "
                         f"{_width_set(g, 'scale')} | {'/'.join(mma)} |")
    lines.append("(load bits: access width per thread of the global loads of each operand; a = LDGSTS, an "
                 "async copy global->shared (cp.async); no suffix = LDG into registers)")
    return "\n".join(lines)


def flag_groups(rows: list[dict]) -> list[str]:
    """Flagged compiles grouped by launch config (SPLIT_K merged) and flag: which bits/branch/sym."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        for fl in r["flags"]:
            c = r["config"]
            label = (f"{r['path']} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} "
                     f"s{c['num_stages']}")
            g = groups.setdefault((fl, label), {"sk": set(), "combos": {}, "dtypes": set(), "n": 0, "shared": set(),
                                                "spill": set(), "default": False})
            g["sk"].add(c["SPLIT_K"])
            g["combos"].setdefault(r["bits"], set()).add(_combo(r))
            g["dtypes"].add(r["dtype"])
            g["n"] += 1
            g["default"] |= any(u.startswith("default") for u in r["uses"])
            if r["ok"]:
                g["shared"].add(r["shared"])
                g["spill"].add((r.get("spill_stores") or 0) + (r.get("spill_loads") or 0))
    out = []
    for (fl, label), g in sorted(groups.items()):
        combos = "; ".join(f"b{b}: {', '.join(sorted(v))}" for b, v in sorted(g["combos"].items()))
        extra = (f", shared {_rng(sorted(v / 1024 for v in g['shared']))} KB" if fl == "SMEM>LIMIT" else
                 f", spill st+ld {_rng(g['spill'])} B" if fl == "SPILL" else "")
        out.append(f"{fl} {label} sk {','.join(map(str, sorted(g['sk'])))}{' [DEFAULT CONFIG]' if g['default'] else ''}"
                   f": {g['n']} compiles ({'+'.join(sorted(g['dtypes']))}{extra}) -- {combos}")
    return out


def report(rows: list[dict], meta: dict, show_table: bool, echo) -> None:
    limits = meta["limits"]
    if show_table:
        echo(table(rows, limits))
        echo("")
    echo(f"Triton {meta['triton']}, ptxas {meta['ptxas']}; target {meta['sm']} ({limits['gpu']}); {len(rows)} compiles")
    echo(f"limits for {meta['sm']}: {limits['shared'] // 1024} KB shared memory per block "
         f"({limits['shared']} bytes), {limits['regs']} registers per thread")
    summ = summary(rows)
    if summ:
        echo("")
        echo("default_config compiles, per bits x path:")
        echo(summ)
    flagged = [r for r in rows if r["flags"]]
    echo("")
    echo(f"flagged: {len(flagged)} of {len(rows)} compiles")
    for line in flag_groups(rows):
        echo("  " + line)


def run_jobs(jobs: list[dict], arch: int, tools: dict, workers: int, cache_dir: str | None, echo) -> list[dict]:
    # Specialize in this process (cheap), deduplicate by the exact compile input, compile in workers.
    unique: dict[str, dict] = {}
    for job in jobs:
        spec = specialize(job, arch)
        key = compile_key(spec, arch)
        if key in unique:
            unique[key]["uses"].append(job["source"])
            continue
        unique[key] = {**job, "uses": [job["source"]], "key": key, "spec": spec}
    items = list(unique.values())
    echo(f"{len(jobs)} launches -> {len(items)} distinct compiles for {sm_name(arch)} on {workers} worker(s)", err=True)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(cache_dir,)) as pool:
        futs = {pool.submit(compile_one, arch, it["spec"], tools): it["key"] for it in items}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            key = futs[fut]
            try:
                results[key] = fut.result()
            except Exception as exc:  # noqa: BLE001 - a crashed worker is a row, not the end of the run
                results[key] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            if i % 25 == 0 or i == len(items):
                echo(f"  {i}/{len(items)} compiled ({time.perf_counter() - t0:.0f} s)", err=True)
    limits = ARCH_LIMITS[arch]
    from vllm_plugin.kernels import triton_wna16_jit as J
    meta_names = {p.name for p in J.wna16_gemm_kernel.params if p.is_constexpr}
    rows = []
    for it in items:
        spec = it.pop("spec")
        row = {"arch": arch, "sm": sm_name(arch), **it, **results[it["key"]], "specialization": {
            "how": spec["how"],
            "signature": {k: v for k, v in spec["signature"].items() if v != "constexpr"},
            "constexpr_args": {k: spec["constexprs"][(i,)] for i, (k, v) in enumerate(spec["signature"].items())
                               if v == "constexpr" and (i,) in spec["constexprs"] and k not in meta_names},
            "divisible_by_16": [k for i, k in enumerate(spec["signature"]) if (i,) in spec["attrs"]
                                and any(a[0] == "tt.divisibility" for a in spec["attrs"][(i,)])]}}
        w = (row.get("loads_by_operand") or {}).get("w") or {}
        widths = [int(key.split(".")[1]) for key in w]
        row["w_load_bits"] = sorted(set(widths))            # access widths of the weight-tile loads
        row["w_load_all_128"] = bool(widths) and min(widths) >= 128
        row["flags"] = flags(row, limits)
        rows.append(row)
    rows.sort(key=_row_order)
    return rows


def _row_order(r: dict):
    return (r["bits"], r["dtype"], BRANCHES.index(r["branch"]), not r["sym"], r["path"] != "skinny",
            r["uses"][0].startswith("default"), r["M"], json.dumps(r["config"], sort_keys=True))


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--arch", type=click.Choice([str(a) for a in ARCH_LIMITS]), default="90", show_default=True,
              help="compute capability to compile for (90 = H100/H200, sm_90a)")
@click.option("--bits", "bits_text", default="2,3,4,8", show_default=True)
@click.option("--dtype", "dtype_text", default="fp16,bf16", show_default=True, help="activation dtypes")
@click.option("--branches", "branch_text", default=",".join(BRANCHES), show_default=True,
              help="dequantization branches: " + "; ".join(f"{k} = {v}" for k, v in BRANCH_HELP.items())
              + ".  For the default_config rows each names a weight (channel: per-channel, tile: g128, multi: g32, "
              "gidx: g128 with uneven act-order groups) and default_config picks the tile, hence the branch compiled")
@click.option("--sym", "sym_text", default="sym,asym", show_default=True, help="sym (constant zero) and/or asym")
@click.option("--configs", type=click.Choice(["skinny", "tiled", "all", "default"]), default="all", show_default=True,
              help="SKINNY_CONFIGS / TILED_CONFIGS (autotune lists), both plus default, or only default_config's "
                   "picks for --shapes x --m")
@click.option("--shapes", "shapes_text", default=DEFAULT_SHAPES, show_default=True,
              help="NxK (out x in) shapes for default_config; the autotune lists are compiled at the first one")
@click.option("--m", "m_text", default=DEFAULT_MS, show_default=True, help="token counts M for default_config")
@click.option("--sweep-m", "sweep_m_text", default="16,256", show_default=True,
              help="M used for the SKINNY_CONFIGS and the TILED_CONFIGS compiles (M is specialized: 1 is a constant, "
                   "multiples of 16 get a divisibility hint)")
@click.option("--bias", is_flag=True, help="compile with a bias (vLLM's Llama linears have none)")
@click.option("--grouped", "grouped", default=0, show_default=True, type=click.IntRange(0, 1024),
              help="compile the grouped (MoE) launch of triton_wna16.grouped_matmul for this many experts, "
                   "--m rows each (0: the dense matmul)")
@click.option("--perm", is_flag=True, help="with --grouped: every expert with its own act order (HAS_PERM)")
@click.option("--jobs", "workers", default=2, show_default=True, type=click.IntRange(1, 64), help="compile processes")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Triton cache dir for the compiles (default: a fresh temporary one, so every row is compiled)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write all rows as JSON")
@click.option("--table/--no-table", "show_table", default=True, show_default=True, help="print the per-compile table")
@click.option("--from-json", "from_json", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="compile nothing: report (and with --json merge) the rows of earlier --json files of one arch; "
                   "a row in a later file replaces the same compile in an earlier one")
@click.option("--recompile-flagged", "recompile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="compile again the flagged rows of an earlier --json file (same arch; e.g. after a kernel change), "
                   "instead of the rows the selection options describe")
@click.option("--quick", is_flag=True,
              help="a handful of compiles (< 60 s): bits 3,4, fp16, one group per tile, sym, default configs of "
                   "4096x4096 at M 1 and 64")
def main(arch, bits_text, dtype_text, branch_text, sym_text, configs, shapes_text, m_text, sweep_m_text, bias, grouped,
         perm, workers,
         cache_dir, json_path, show_table, from_json, recompile, quick):
    arch = int(arch)
    if from_json:
        rows, metas = {}, []
        for path in from_json:
            data = json.loads(Path(path).read_text())
            metas.append(data)
            for r in data["rows"]:
                rows[r["key"]] = r                 # a later file replaces a row compiled again
        if len({(m["arch"], m["triton"]) for m in metas}) != 1:
            click.echo("error: --from-json files differ in arch or Triton version", err=True)
            sys.exit(2)
        shas = sorted({r.get("kernel_sha") or "unknown" for r in rows.values()})
        if len(shas) != 1:
            click.echo(f"error: --from-json rows were compiled from different kernel sources ({', '.join(shas)})",
                       err=True)
            sys.exit(2)
        meta = {k: metas[0][k] for k in ("triton", "ptxas", "arch", "sm", "limits")}
        meta.update(git_head=sorted({str(m.get("git_head")) for m in metas}), kernel_sha=shas)
        meta.update(compiled_at=max(m["compiled_at"] for m in metas), argv=[a for m in metas for a in [m["argv"]]],
                    no_gpu_run=True, merged_from=[str(p) for p in from_json])
        rows = sorted(rows.values(), key=_row_order)
        report(rows, meta, show_table, click.echo)
        if json_path:
            _write_json(json_path, meta, rows)
        return
    if quick:
        bits_text, dtype_text, branch_text, sym_text = "3,4", "fp16", "tile", "sym"
        configs, shapes_text, m_text = "default", "4096x4096", "1,64"
    try:
        tools = check_toolchain(arch)
    except ToolMissing as exc:
        click.echo(f"error: no AOT toolchain: {exc}", err=True)
        sys.exit(2)
    try:
        bits_list = _ints(bits_text)
        dtypes = _csv(dtype_text)
        branches = _csv(branch_text)
        syms = _csv(sym_text)
        shapes = _shapes(shapes_text)
        ms = _ints(m_text)
        sweep_m = _ints(sweep_m_text)
        bad = ([f"bits {b}" for b in bits_list if b not in (2, 3, 4, 8)] + [f"dtype {d}" for d in dtypes
               if d not in ("fp16", "bf16", "fp32")] + [f"branch {b}" for b in branches if b not in BRANCHES]
               + [f"sym {s}" for s in syms if s not in ("sym", "asym")])
        if bad or not shapes or len(sweep_m) != 2 or not (sweep_m[0] <= 16 < sweep_m[1]):
            raise ValueError(", ".join(bad) or "--sweep-m needs two values: skinny M <= 16 < tiled M")
    except ValueError as exc:
        click.echo(f"error: bad option ({exc})", err=True)
        sys.exit(2)
    if recompile:
        data = json.loads(Path(recompile).read_text())
        if data["arch"] != arch:
            click.echo(f"error: {recompile} is for sm_{data['arch']}, not sm_{arch} (--arch)", err=True)
            sys.exit(2)
        fields = ("bits", "dtype", "branch", "weight", "group_size", "uneven_gidx", "sym", "bias", "M", "N", "K", "path",
                  "config")
        jobs = [{**{f: r[f] for f in fields}, "grouped": r.get("grouped", 0), "perm": r.get("perm", False),
                 "source": src} for r in data["rows"] if r["flags"] for src in r["uses"]]
    else:
        if grouped and bias:
            click.echo("error: bad option (--grouped takes no --bias: the experts' biases are added in PyTorch)",
                       err=True)
            sys.exit(2)
        jobs = plan(bits_list, dtypes, branches, syms, configs, shapes, ms, sweep_m, bias, grouped, perm)
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="triton-aot-")
        cache_dir = tmp.name
    t0 = time.perf_counter()
    try:
        rows = run_jobs(jobs, arch, tools, workers, cache_dir, click.echo)
    finally:
        if tmp is not None:
            tmp.cleanup()
    click.echo(f"{len(rows)} compiles in {time.perf_counter() - t0:.0f} s", err=True)
    meta = {"triton": tools["triton"], "ptxas": tools["ptxas_version"], "arch": arch, "sm": sm_name(arch),
            "limits": ARCH_LIMITS[arch], "compiled_at": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
            "no_gpu_run": True, "git_head": _git_head(), "kernel_sha": sorted({r.get("kernel_sha") for r in rows
                                                                             if r.get("kernel_sha")})}
    if len(meta["kernel_sha"]) > 1:
        click.echo("warning: triton_wna16_jit.py changed during the run (rows carry different kernel_sha)", err=True)
    report(rows, meta, show_table, click.echo)
    if json_path:
        _write_json(json_path, meta, rows)


def _write_json(path: str, meta: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump({**meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
