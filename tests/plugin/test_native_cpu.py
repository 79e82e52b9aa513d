"""The native C++ CPU kernels (``vllm_plugin.kernels.native_cpu``, sources in ``csrc/cpu``).

Against the fp32 dequantized reference (``rcsr_deploy.grid.dequantize``): every bits x group x
sym/asym x act order x activation dtype, M = 1, 2, 7, 16, 33, 64, 300, odd N / K multiples of the
group, both code paths (packed-code kernel and dequantize + ATen GEMM), and every ISA this machine
can run (each forced).  Also: the packed layout against an independent Python packer and its round
trip, the grouped (MoE) op, torch.compile opacity, dispatch and ``RCSR_CPU_ISA`` errors.

The extension is built by ``pip install --no-build-isolation -e .`` (scripts/bootstrap.sh); these
tests fail -- not skip -- when it is missing, because serving then silently loses its fastest path.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from kernel_support import make_layer, spec_of

from vllm_plugin.errors import RcsrPluginError
from vllm_plugin.kernels import native_cpu as nc
from vllm_plugin.kernels import select_kernel

MS = (1, 2, 7, 16, 33, 64, 300)
ISAS = nc.supported_isas()
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _table_switch(monkeypatch):
    """The tests here set each kernel's switch themselves (or test the measurement): no load-time timing on
    CPUs where it would be the default."""
    monkeypatch.setenv(nc.ENV_LARGE_M, "table")


def test_extension_is_built_and_dispatched_first():
    assert nc.unavailable_reason() is None, nc.unavailable_reason()
    assert "scalar" in ISAS
    spec = spec_of(96, 256, 3, 64, True, False, torch.bfloat16)
    assert select_kernel(spec, log=False).name == "native_cpu"
    for dt in (torch.float32, torch.float16):
        assert select_kernel(spec_of(96, 256, 8, -1, False, True, dt), log=False).name == "native_cpu"
    # what the layout cannot hold goes to the next kernel
    assert select_kernel(spec_of(96, 256, 4, 16, True, False, torch.bfloat16), log=False).name != "native_cpu"


def test_kernels_run_on_every_thread():
    """The extension is built with OpenMP: its parallel loops use all of torch's threads."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert nc.extension().parallel_threads(64) == 2
    finally:
        torch.set_num_threads(old)


def _py_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packer written from the layout text in csrc/cpu/kernel.h."""
    n, k = codes.shape
    nt, kb = -(-n // 16), -(-k // 32)
    out = [[[[0] * 16 for _ in range(bits)] for _ in range(kb)] for _ in range(nt)]
    planes = [(2, 0, 0), (1, 2, 2)] if bits == 3 else [(bits, 0, 0)]
    for r in range(n):
        for c in range(k):
            q = int(codes[r, c])
            for width, shift, off in planes:
                per = 32 // width
                wi, ci = (c % 32) // per, (c % 32) % per
                bit = 16 * (ci & 1) + width * (ci >> 1)
                out[r // 16][c // 32][off + wi][r % 16] |= ((q >> shift) & ((1 << width) - 1)) << bit
    t = torch.tensor(out, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_packed_layout_and_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n, k in ((17, 40), (16, 32), (3, 100)):
        codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        packed = torch.ops.rcsr_cpu.repack(codes, bits)
        assert torch.equal(packed, _py_pack(codes, bits)), (n, k)
        assert torch.equal(torch.ops.rcsr_cpu.unpack(packed, bits, n, k), codes)
    # packed stays at the checkpoint's own width: bits/8 bytes per (padded) weight
    big = torch.randint(0, 1 << bits, (256, 1024), generator=g, dtype=torch.uint8)
    assert torch.ops.rcsr_cpu.repack(big, bits).numel() * 4 == 256 * 1024 * bits // 8
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.rcsr_cpu.repack(torch.full((2, 32), 1 << bits, dtype=torch.uint8).clamp(max=255), bits) \
            if bits < 8 else (_ for _ in ()).throw(RuntimeError("does not fit"))


CASES = list(itertools.product((2, 3, 4, 8), (32, 64, 96, 128, -1), (True, False), (False, True),
                               (torch.float32, torch.bfloat16, torch.float16)))


@pytest.mark.parametrize("bits,gs,sym,dynamic,dtype", CASES,
                         ids=[f"w{b}-g{g}-{'sym' if s else 'asym'}-{'dyn' if d else 'static'}-"
                              f"{str(t).removeprefix('torch.')}" for b, g, s, d, t in CASES])
def test_gemm_matches_fp32_reference(bits, gs, sym, dynamic, dtype, monkeypatch):
    # odd numbers of groups / tiles: K = 3 groups (per channel: 7 blocks of 32); N = 83 is 6 tiles, the last
    # one padded (the bf16 kernel takes tiles in fours for M < 4, else in pairs), N = 99 is 7 (4 + 2 + 1)
    k = 3 * gs if gs != -1 else 224
    g = torch.Generator().manual_seed(7)
    xs = {m: torch.randn(m, k, generator=g).to(dtype) for m in MS}
    for n in (83, 99):
        w, ref = make_layer(n, k, bits, gs, sym, dynamic, seed=bits * 31 + gs + n)
        bias = torch.randn(n).to(dtype)
        for isa in ISAS:
            monkeypatch.setenv(nc.ENV_ISA, isa)
            kern = nc.NativeCpuKernel(spec_of(n, k, bits, gs, sym, dynamic, dtype))
            kern.prepare(w)
            for m, x in xs.items():
                want = F.linear(x.float(), ref, bias.float())
                scale = float(want.abs().max())
                for large_m in (0, 1):  # the packed-code kernel, then dequantize + ATen GEMM
                    kern.large_m = large_m
                    y = kern.apply(x, bias)
                    assert y.dtype == dtype and y.shape == (m, n)
                    err = float((y.float() - want).abs().max()) / scale
                    assert err <= TOL[dtype], (isa, n, m, large_m, err)
    # 3-D input as vLLM may pass it
    x3 = torch.randn(2, 5, k).to(dtype)
    assert kern.apply(x3).shape == (2, 5, n)


@pytest.mark.parametrize("k", [200, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_op_per_channel_ragged_k(k, dtype):
    """The op takes any K for a per-channel grid (checkpoints hold multiples of 32): the last k-block is
    partial (zero-padded activations, masked loads, a group sum that ends inside the block)."""
    n = 40
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, 1), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, 1, generator=g) / 8 + 0.01).to(torch.float16)
    pw = nc.PackedWeight.from_codes(codes, scales, zeros, 4, -1)
    ref = (codes.float() - zeros.float()) * scales.float()
    for isa in ISAS:
        for m in (1, 7, 33):
            x = (torch.randn(m, k, generator=g) + 3).to(dtype)  # a non-zero mean: the zero-point term matters
            want = x.float() @ ref.t()
            y = pw.matmul(x, isa=nc.resolve_isa(isa), large_m=0)
            err = float((y.float() - want).abs().max()) / float(want.abs().max())
            assert err <= TOL[dtype], (isa, m, err)


def test_fused_shards_and_dynamic_orders():
    """q/k/v-like fused layer: shared group_index works; differing ones are refused (dequant takes them)."""
    w, ref = make_layer(160, 256, 4, 64, False, True, shard_sizes=(64, 64, 32))
    spec = spec_of(160, 256, 4, 64, False, True, torch.float32, shard_sizes=(64, 64, 32))
    kern = nc.NativeCpuKernel(spec)
    kern.prepare(w)
    x = torch.randn(5, 256)
    torch.testing.assert_close(kern.apply(x), F.linear(x, ref), rtol=0, atol=2e-5 * float(F.linear(x, ref).abs().max()))
    spec2 = spec_of(160, 256, 4, 64, False, True, torch.float32, shard_sizes=(64, 64, 32), shared=False)
    assert "different group_index" in nc.NativeCpuKernel.unsupported_reason(spec2)


@pytest.mark.parametrize("bits,sym", [(2, False), (2, True), (3, False), (3, True), (4, False)])
def test_bf16_kernel_is_exact_on_integers(bits, sym):
    """The AVX-512 BF16 path multiplies with the exact numbers 128 + q (2/3 bits at M = 1: 128 + 4^r q,
    then scaled by 4^-r): integer activations and power-of-two scales give the exact integer result."""
    if "avx512_bf16" not in ISAS:
        pytest.skip("this CPU has no AVX512_BF16")  # the generic test above still ran every other ISA
    n, k = 80, 256  # 5 tiles: four take the M = 1 path of 2/3 bits, the fifth the generic one
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = None if sym else torch.randint(0, 1 << bits, (n, k // 64), generator=g, dtype=torch.uint8)
    z = torch.full((n, k // 64), float(1 << (bits - 1))) if sym else zeros.float()
    scales = torch.full((n, k // 64), 0.25, dtype=torch.float16)
    pw = nc.PackedWeight.from_codes(codes, scales, zeros, bits, 64)
    wref = (codes.float() - z.repeat_interleave(64, 1)) * 0.25
    for m in (1, 3, 40):  # the M = 1 path, a partial register block, 5 full blocks of 8 rows
        x = torch.randint(-4, 5, (m, k), generator=g).to(torch.bfloat16)
        y = pw.matmul(x, isa=3, large_m=0)
        assert torch.equal(y.float(), (x.float() @ wref.t()).bfloat16().float()), m


@pytest.mark.parametrize("bits,gs,sym", [(4, 64, True), (3, 32, False), (2, -1, False), (8, 128, True)])
def test_grouped_gemm_matches_per_expert(bits, gs, sym):
    E, n, k = 5, 48, 256
    layers = [make_layer(n, k, bits, gs, sym, False, seed=e) for e in range(E)]
    from rcsr_deploy.packing import unpack_codes

    codes = torch.stack([unpack_codes(w.qweight, bits, k) for w, _ in layers])
    scales = torch.stack([w.scales for w, _ in layers])
    zeros = None if sym else torch.stack([w.zeros for w, _ in layers])
    pw = nc.PackedWeight.from_codes(codes, scales, zeros, bits, gs)
    counts = [3, 0, 40, 1, 9]  # an expert without rows, one over the large-M switch
    offsets = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(int(offsets[-1]), k).to(dtype)
        want = torch.cat([F.linear(x[offsets[e]:offsets[e + 1]].float(), layers[e][1]) for e in range(E)])
        for isa in ISAS:
            i = nc.ISA_NAMES.index(isa)
            for large_m in (0, 8):
                y = pw.grouped(x, offsets, i, large_m)
                err = float((y.float() - want).abs().max() / want.abs().max())
                assert y.dtype == dtype and err <= TOL[dtype], (isa, large_m, err)
    with pytest.raises(RuntimeError, match="offsets"):
        pw.grouped(torch.randn(4, k), torch.tensor([0, 1, 2, 3, 4, 9]), 0)


def _int8_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, gs: int) -> torch.Tensor:
    """What the int8-activation kernel computes, in float64: per row and weight group (columns in the
    kernel's order), x_q = round-half-even(x * (127 / max|x|)) and scale max|x| / 127, then
    sum_g s_w * s_x * sum_k x_q (q - z)."""
    m, k = x.shape
    n = codes.shape[0]
    g = 1 if gs == -1 else k // gs
    xr = x.float().reshape(m, g, k // g)
    amax = xr.abs().amax(-1, keepdim=True)
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: IEEE division (a Python scalar divides by reciprocal)
    xq = torch.round(xr * torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    sx = torch.where(amax > 0, amax / c127, torch.ones_like(amax))
    z = torch.full((n, g), float(1 << (bits - 1))) if zeros is None else zeros.float()
    wq = codes.double().reshape(n, g, k // g) - z.double()[..., None]
    part = torch.einsum("mgk,ngk->mgn", xq.double(), wq)
    return (part * sx.double() * scales.double().t()[None]).sum(1)


INT8_CASES = list(itertools.product((2, 3, 4, 8), (32, 64, -1), (True, False), (False, True)))


@pytest.mark.parametrize("bits,gs,sym,with_perm", INT8_CASES,
                         ids=[f"w{b}-g{g}-{'sym' if s else 'asym'}-{'perm' if p else 'static'}"
                              for b, g, s, p in INT8_CASES])
def test_int8_activation_kernel_matches_its_reference(bits, gs, sym, with_perm):
    """``RCSR_CPU_ISA=avx512_vnni_a8`` (opt-in): equals the int8-activation reference (per-row, per-group
    symmetric int8 activations, integer products, fp32 scaling) to fp32 rounding, for fp32/bf16/fp16
    activations, M from 1 to 300 (the 4-tile and 2-tile x 8-row register blockings and their remainders),
    N = 83 / 99, a stored input permutation; large_m is ignored (one numerics for every batch); and it
    stays within a few percent of the exact fp32 result."""
    if not nc.int8_supported():
        pytest.skip("this CPU has no AVX512_VNNI")
    k = 3 * gs if gs != -1 else 224
    g = torch.Generator().manual_seed(bits * 7 + gs)
    for n in (83, 99):
        codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        ng = 1 if gs == -1 else k // gs
        scales = (torch.rand(n, ng, generator=g) * 0.05 + 1e-3).half()
        zeros = None if sym else torch.randint(0, 1 << bits, (n, ng), generator=g, dtype=torch.uint8)
        perm = torch.randperm(k, generator=g) if with_perm else None
        pw = nc.PackedWeight.from_codes(codes, scales, zeros, bits, gs, perm)
        z = torch.full((n, ng), float(1 << (bits - 1))) if sym else zeros.float()
        exact_w = (codes.float() - z.repeat_interleave(k // ng, 1)) * scales.float().repeat_interleave(k // ng, 1)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for m in MS:
                x = torch.randn(m, k, generator=g).to(dtype)
                xp = x if perm is None else x[:, perm]
                want = _int8_reference(xp, codes, scales, zeros, bits, gs)
                y = pw.matmul(x, nc.INT8_ACT, large_m=0)
                assert y.dtype == dtype and y.shape == (m, n)
                scale = float(want.abs().max())
                err = float((y.double() - want).abs().max()) / scale
                assert err <= {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype], (n, dtype, m, err)
                assert torch.equal(pw.matmul(x, nc.INT8_ACT, large_m=1), y)  # no large-M path
                if dtype != torch.float32:  # bf16 / fp16 rows read as they are, bf16 results rounded as ATen does
                    assert torch.equal(y, pw.matmul(x.float(), nc.INT8_ACT, large_m=0).to(dtype)), (n, dtype, m)
                if dtype == torch.float32 and m >= 16:  # the price of int8 activations, for scale
                    exact = xp.double() @ exact_w.double().t()
                    assert float((want - exact).norm() / exact.norm()) < 0.03


def test_int8_activation_opt_in_dispatch():
    """Every width runs the int8 kernel under the opt-in (3-bit too, from session 24); the grouped op runs
    it per expert; the default never picks it."""
    if not nc.int8_supported():
        pytest.skip("this CPU has no AVX512_VNNI")
    assert nc.best_isa() != nc.INT8_ACT and "avx512_vnni_a8" not in ISAS
    for bits in (2, 3, 4, 8):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            assert nc.effective_isa(nc.INT8_ACT, dtype, bits) == nc.INT8_ACT
    from rcsr_deploy.packing import unpack_codes

    E, n, k = 4, 40, 128
    offsets = torch.tensor([0, 5, 5, 22, 23])
    x = torch.randn(23, k)
    # symmetric: the int32 sums start at the zero-point term, per expert's rows
    for bits, sym in ((4, False), (4, True), (3, False), (3, True)):
        layers = [make_layer(n, k, bits, 64, sym, False, seed=e) for e in range(E)]
        codes = torch.stack([unpack_codes(lw.qweight, bits, k) for lw, _ in layers])
        zeros = None if sym else torch.stack([lw.zeros for lw, _ in layers])
        pw = nc.PackedWeight.from_codes(codes, torch.stack([lw.scales for lw, _ in layers]), zeros, bits, 64)
        y = pw.grouped(x, offsets, nc.INT8_ACT, 8)
        for e in range(E):
            a, b = int(offsets[e]), int(offsets[e + 1])
            if b > a:
                one = nc.PackedWeight(pw.packed[e], pw.scales[e], None if sym else pw.zeros[e], None, bits, 64, n, k)
                assert torch.equal(y[a:b], one.matmul(x[a:b], nc.INT8_ACT, 0)), (bits, sym, e)
                if sym:
                    want = _int8_reference(x[a:b], codes[e], layers[e][0].scales, None, bits, 64)
                    assert float((y[a:b].double() - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_torch_compile_keeps_the_op_opaque():
    w, ref = make_layer(64, 128, 3, 32, False, False)
    kern = nc.NativeCpuKernel(spec_of(64, 128, 3, 32, False, False, torch.float32))
    kern.prepare(w)
    pw = kern.weight

    def f(x):
        return torch.ops.rcsr_cpu.gemm(x, pw.packed, pw.scales, pw.zeros, None, 3, 32, 64, kern.isa, 0) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    for m in (1, 5, 40):
        x = torch.randn(m, 128)
        torch.testing.assert_close(compiled(x), f(x))
    torch._dynamo.reset()


def test_isa_selection(monkeypatch):
    monkeypatch.setenv(nc.ENV_ISA, "sse9")
    with pytest.raises(RcsrPluginError, match="RCSR_CPU_ISA='sse9' is not an ISA"):
        nc.resolve_isa()
    monkeypatch.setenv(nc.ENV_ISA, "auto")
    assert nc.ISA_NAMES[nc.resolve_isa()] == ISAS[-1]
    runnable = ISAS + (["avx512_vnni_a8"] if nc.int8_supported() else [])
    for name in nc.ISA_NAMES:
        monkeypatch.setenv(nc.ENV_ISA, name)
        if name in runnable:
            assert nc.resolve_isa() == nc.ISA_NAMES.index(name)
        else:
            with pytest.raises(RcsrPluginError, match="this CPU cannot run it"):
                nc.resolve_isa()
    # switch-over to dequantize + ATen GEMM (nc.LARGE_M): bf16 kernel from 512 rows; AVX-512 FMA from 64 with
    # bf16 activations, never with fp32/fp16 (the W8 layer of a bf16 model and fp32 layers run that kernel);
    # AVX2 from 32 (bf16) / 64; scalar from 2; int8 never
    assert nc.large_m_for(3, torch.bfloat16, 4) == 512 and nc.large_m_for(3, torch.float32, 4) == 0
    assert nc.large_m_for(3, torch.bfloat16, 8) == 64 and nc.large_m_for(2, torch.float16, 4) == 0
    assert nc.large_m_for(1, torch.bfloat16, 4) == 32 and nc.large_m_for(1, torch.float16, 3) == 64
    assert nc.large_m_for(0, torch.float32, 2) == 2 and nc.large_m_for(nc.INT8_ACT, torch.bfloat16, 4) == 0
    monkeypatch.setenv(nc.ENV_LARGE_M, "7")
    assert nc.large_m_for(3, torch.bfloat16, 4) == 7
    monkeypatch.setenv(nc.ENV_LARGE_M, "x")
    with pytest.raises(RcsrPluginError, match="RCSR_CPU_LARGE_M='x' is not a row count, 'table' or 'measure'"):
        nc.large_m_for(2, torch.float32, 4)
    with pytest.raises(RuntimeError, match="group size 16"):
        torch.ops.rcsr_cpu.gemm(torch.randn(1, 64), torch.zeros(1, 2, 4, 16, dtype=torch.int32),
                                torch.zeros(1, 4, 16, dtype=torch.float16), None, None, 4, 16, 16, 0, 0)


def test_switch_mode(monkeypatch):
    """``RCSR_CPU_LARGE_M``: unset = the table on the CPU kind it was measured on (AVX-512 BF16, no AMX), the
    load-time measurement elsewhere; ``table`` / ``measure`` / a row count force one."""
    monkeypatch.delenv(nc.ENV_LARGE_M, raising=False)
    expect = "table" if "avx512_bf16" in ISAS and not nc.amx_tiles() else "measure"
    assert nc.table_applies() == (expect == "table") and nc.switch_mode() == expect
    for env, mode in (("table", "table"), ("MEASURE", "measure"), (" 96 ", 96), ("-3", 0), ("auto", expect)):
        monkeypatch.setenv(nc.ENV_LARGE_M, env)
        assert nc.switch_mode() == mode
    monkeypatch.setenv(nc.ENV_LARGE_M, "measure")  # a row count or the table never time anything
    assert nc.large_m_for(3, torch.bfloat16, 4) == 512


def test_choose_switch():
    """The switch is the first measured row count from which dequantize + GEMM wins at every larger one."""
    t = [(16, 1.0, 2.0), (32, 2.0, 1.0), (64, 4.0, 4.5), (128, 8.0, 5.0), (256, 16.0, 9.0)]
    assert nc.choose_switch(t, fallback=512, complete=True) == 128  # the win at 32 rows is not kept
    assert nc.choose_switch(t[:2], fallback=512, complete=False) == 32
    assert nc.choose_switch([(16, 1.0, 0.99)], fallback=0, complete=True) == 0  # inside the margin: packed codes
    never = [(16, 1.0, 2.0), (32, 2.0, 3.0)]
    assert nc.choose_switch(never, fallback=512, complete=True) == 0      # measured everywhere: never
    assert nc.choose_switch(never, fallback=512, complete=False) == 512   # out of budget: the table beyond
    assert nc.choose_switch(never, fallback=16, complete=False) == 0      # the table's row was measured: never
    assert nc.choose_switch([], fallback=64, complete=False) == 64


def _fake_timer(crossover: int, calls: list):
    """Timings with the packed-code kernel at 1 unit per row and dequantize + GEMM at 0.5 per row plus a fixed
    cost, so that the dequantize path wins (by more than the margin) from ``crossover`` rows on, when
    ``crossover`` is one of the measured row counts."""
    def timer(weight, x, isa, large_m):
        calls.append((x.shape[0], large_m))
        m = x.shape[0]
        return m * 1e-6 if large_m == 0 else (0.5 * m + 0.4 * crossover) * 1e-6
    return timer


def test_measured_switch(monkeypatch):
    """The load-time measurement: stops after two wins of the dequantize path, caches per shape, keeps within
    its budget; real timing on a small layer gives a candidate row count, and a layer loaded in ``measure``
    mode uses it."""
    monkeypatch.setattr(nc, "_SWITCH_CACHE", {})
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (96, 128), generator=g, dtype=torch.uint8)
    pw = nc.PackedWeight.from_codes(codes, (torch.rand(96, 2, generator=g) / 8 + 0.01).half(), None, 4, 64)
    calls: list = []
    assert nc.measured_switch(pw, 2, torch.float32, timer=_fake_timer(64, calls)) == 64
    assert [m for m, lm in calls if lm == 0] == [8, 16, 32, 64, 128]  # two wins (64, 128), then stop
    calls.clear()
    assert nc.measured_switch(pw, 2, torch.float32, timer=_fake_timer(16, calls)) == 64 and not calls  # cached
    # over budget after the first row count: the table's row count beyond it, or never
    slow = lambda weight, x, isa, large_m: 1.0 + large_m  # noqa: E731
    assert nc.measured_switch(pw, 2, torch.bfloat16, fallback=64, timer=slow, budget_s=0.5) == 64
    assert nc.measured_switch(pw, 1, torch.bfloat16, fallback=0, timer=slow, budget_s=0.5) == 0
    # real timings of both paths (this CPU's best exact level)
    isa = nc.ISA_NAMES.index(ISAS[-1])
    real = nc.measured_switch(pw, isa, torch.bfloat16, rows=(8, 16, 32), budget_s=5.0)
    assert real in (0, 8, 16, 32)
    # a layer prepared in measure mode takes the measured row count (fake timer: from 32 rows)
    monkeypatch.setenv(nc.ENV_LARGE_M, "measure")
    monkeypatch.setattr(nc, "_SWITCH_CACHE", {})
    monkeypatch.setattr(nc, "time_path", _fake_timer(32, []))
    w, ref = make_layer(96, 128, 4, 64, True, False, seed=5)
    for isa in ISAS:
        monkeypatch.setenv(nc.ENV_ISA, isa)
        kern = nc.NativeCpuKernel(spec_of(96, 128, 4, 64, True, False, torch.bfloat16))
        kern.prepare(w)
        assert kern.large_m == (2 if isa == "scalar" else 32), isa  # scalar keeps its table row
        for m in (31, 40):  # either side of the switch
            x = torch.randn(m, 128, generator=g).bfloat16()
            want = x.float() @ ref.t()
            err = float((kern.apply(x).float() - want).abs().max()) / float(want.abs().max())
            assert err <= TOL[torch.bfloat16], (isa, m, err)


@pytest.mark.parametrize("stream", [0, 2])
def test_kernel_bench_runs(capsys, stream):
    """The microbenchmark (``python -m vllm_plugin.kernels.bench``) on tiny shapes: one cache-resident layer per
    shape, and ``--stream N`` (one pass over N blocks of layers with their own weights): a row per bits x M with a
    positive time for every kernel that can take the layer and the native kernel's ratios."""
    from vllm_plugin.kernels import bench

    args = ["--bits", "4,3", "--m", "1,5", "--dtypes", "float32", "--shapes", "64x128,96x64", "--group", "32",
            "--kernels", "native_cpu,dequant", "--min-time", "0.01"] + (["--stream", str(stream)] if stream else [])
    assert bench.main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line and not line.startswith(("#", "bits"))]
    per_shape = 1 if stream else 2
    assert len(rows) == 2 * 2 * per_shape
    for r in rows:
        times = r[3:6] if stream else r[4:7]          # dense, native_cpu, dequant
        assert all(float(v) > 0 for v in times), r
        assert float(r[-1]) > 0 and float(r[-2]) > 0, r     # % of bandwidth, GB/s


def test_kernel_bench_switch(capsys):
    """``bench --switch``: per shape the table's and the measured switch-over, and the timings they come from."""
    from vllm_plugin.kernels import bench

    assert bench.main(["--switch", "--bits", "4,8", "--dtypes", "bfloat16", "--shapes", "64x128",
                       "--switch-budget", "0.3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line and not line.startswith(("#", "bits"))]
    assert [r[:3] for r in rows] == [["4", "bfloat16", "64x128"], ["8", "bfloat16", "64x128"]]
    for r in rows:
        assert r[3] in nc.ISA_NAMES and r[4] == str(nc.large_m_for(nc.ISA_NAMES.index(r[3]), torch.bfloat16, int(r[0])) or "never")
        assert r[5] == "never" or int(r[5]) in nc.SWITCH_ROWS or int(r[5]) == int(r[4])
        timings = " ".join(r[6:]).removesuffix(" (budget)")
        assert timings.startswith("8: "), timings
        assert all(float(v) > 0 for p in timings.split(", ") for v in p.split(": ")[1].split("/")), timings
