"""Triton W{2,3,4,8}A16 kernels (vllm_plugin/kernels/triton_wna16.py) under the Triton interpreter.

``RCSR_TRITON_TEST_DEVICE=cuda`` runs the same checks compiled on a GPU instead (the interpreter-only
tests are then skipped); CI has no GPU, so there it is always the interpreter.

Every bits x group size x sym/asym x act-order combination is checked on both paths (skinny split-K
and tiled) against dequantize-then-matmul in fp32 (rcsr_deploy.packing.unpack_codes +
rcsr_deploy.grid.dequantize).  Shapes are tiny: the interpreter runs every program in numpy.
"""
import os

DEVICE = os.environ.get("RCSR_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' module (and its triton.jit) is imported

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rcsr_deploy.errors import RcsrError
from rcsr_deploy.grid import QuantSpec, dequantize
from rcsr_deploy.packing import pack_codes, unpack_codes
from vllm_plugin.kernels import triton_wna16 as tw
from tool_support import load_tool

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
IN_FOR_GROUP = {32: 96, 64: 128, 128: 256, -1: 64}   # 96 with g32: K is not a multiple of BLOCK_K=64
INTERPRETER_ONLY = pytest.mark.skipif(DEVICE != "cpu", reason="checks the Triton interpreter itself")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def bf16_dot(monkeypatch):
    """The Triton 3.9 interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bits as
    integers; widen bf16 operands to fp32 inside the interpreter's dot so bf16 kernels can be checked
    here (the kernel code is unchanged; compiled GPU kernels never go through this)."""
    if DEVICE != "cpu":
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig = ti.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(ti.InterpreterBuilder, "create_dot", create_dot)


def make_layer(bits, group_size, sym, act, out_f, in_f, seed=0):
    """Random canonical checkpoint tensors + the fp32 reference weight [out, in]."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g)
    qweight = pack_codes(codes, bits)
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.004).to(torch.float16)
    zeros = None if sym else torch.randint(0, 2 ** bits, (out_f, n_groups), generator=g).to(torch.uint8)
    g_idx = None
    if act == "dynamic" and group_size != -1:
        # GPTQ/SNRQ act order: groups are consecutive runs of the permuted column order.
        order = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_f) // group_size).to(torch.int32)
    elif act == "uneven" and group_size != -1:
        g_idx = torch.randint(0, n_groups, (in_f,), generator=g, dtype=torch.int32)
    spec = QuantSpec(bits, group_size, sym)
    z = torch.full((out_f, n_groups), float(1 << (bits - 1))) if sym else zeros.float()
    w_ref = dequantize(unpack_codes(qweight, bits, in_f), scales.float(), z, spec, g_idx=g_idx)
    return dev(qweight), dev(scales), dev(zeros), dev(g_idx), dev(w_ref)


def dev(t):
    """``t`` on the device the kernels run on (``None`` stays ``None``)."""
    return None if t is None else t.to(DEVICE)


def check(y, x, w_ref, bias=None):
    """|y - ref| <= tol * (|x| @ |W|^T): rounding of the weight operand and of the output scale with that."""
    ref = x.float() @ w_ref.t()
    mag = x.float().abs() @ w_ref.abs().t()
    if bias is not None:
        ref = ref + bias.float()
        mag = mag + bias.float().abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    bound = TOL[x.dtype] * mag + 1e-6
    assert bool((err <= bound).all()), f"max err {err.max():.3e}, worst err/bound {(err / bound).max():.2f}"


# Launch configs rotated over the cases so every dequantization branch runs: per-channel (scale hoisted
# out of the loop), one group per K tile with scale-after-dot (BLOCK_M <= BLOCK_K) and scale-on-operand
# (BLOCK_M > BLOCK_K), several groups per tile / uneven act-order groups (gathered scales); split-K
# 1, 2, 3 (uneven split, empty splits) and the heuristic default (None).
SKINNY = [None, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2),
          dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=3), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)]
TILED = [None, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2),
         dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)]
CASES = [(b, g, s, a) for b in BITS for g in GROUPS for s in (True, False)
         for a in ("static", "dynamic", "uneven") if not (g == -1 and a == "uneven")]


@pytest.mark.parametrize("bits,group_size,sym,act", CASES)
def test_matches_dequantized_reference(bits, group_size, sym, act):
    i = CASES.index((bits, group_size, sym, act))
    in_f = IN_FOR_GROUP[group_size]
    out_f = (40, 96)[i % 2]
    qweight, scales, zeros, g_idx, w_ref = make_layer(bits, group_size, sym, act, out_f, in_f, seed=i)
    pw = tw.prepare(qweight, scales, zeros, g_idx, bits, group_size, sym)
    assert (pw.perm is not None) == (act != "static" and group_size != -1)
    assert (pw.group_ids is not None) == (act == "uneven")
    gen = torch.Generator().manual_seed(100 + i)
    for m, cfg in (((1, 3, 16)[i % 3], SKINNY[i % 4]), ((17, 33)[i % 2], TILED[(i // 2) % 4])):
        x = dev(torch.randn(m, in_f, generator=gen))
        check(tw.matmul(x, pw, config=cfg), x, w_ref)


@pytest.mark.parametrize("bits,group_size,sym,act", [(2, 96, True, "static"), (3, 96, False, "dynamic"),
                                                     (4, 192, False, "static"), (8, 96, True, "uneven")])
def test_group_sizes_that_are_not_powers_of_two(bits, group_size, sym, act):
    """g96 / g192 (what divides a 576-wide model): a K tile of 32 lies in one group, tiles of 64 / 128 straddle
    two groups (the gathered-scale branch); K = 576 is six g96 groups, three g192 ones."""
    in_f, out_f = 576, 40
    qweight, scales, zeros, g_idx, w_ref = make_layer(bits, group_size, sym, act, out_f, in_f, seed=bits)
    pw = tw.prepare(qweight, scales, zeros, g_idx, bits, group_size, sym)
    gen = torch.Generator().manual_seed(bits)
    for m, cfg in ((1, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)), (3, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)),
                   (17, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2))):
        x = dev(torch.randn(m, in_f, generator=gen))
        check(tw.matmul(x, pw, config=cfg), x, w_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,sym,act", [(4, 128, True, "static"), (3, 32, False, "dynamic"),
                                                     (2, -1, False, "static"), (8, 64, True, "uneven")])
def test_half_precision_activations(bf16_dot, dtype, bits, group_size, sym, act):
    in_f = IN_FOR_GROUP[group_size]
    qweight, scales, zeros, g_idx, w_ref = make_layer(bits, group_size, sym, act, 96, in_f, seed=bits)
    pw = tw.prepare(qweight, scales, zeros, g_idx, bits, group_size, sym)
    gen = torch.Generator().manual_seed(bits)
    bias = dev(torch.randn(96, generator=gen).to(dtype))
    for m in (2, 16, 40):                  # skinny (atomic fp32 buffer, cast back) and tiled (direct store)
        x = dev(torch.randn(m, in_f, generator=gen).to(dtype))
        check(tw.matmul(x, pw, bias), x, w_ref, bias)
        check(tw.matmul(x, pw, bias, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1)), x, w_ref, bias)


def test_bias_leading_dims_and_empty():
    qweight, scales, zeros, g_idx, w_ref = make_layer(4, 32, False, "dynamic", 40, 64)
    pw = tw.prepare(qweight, scales, zeros, g_idx, 4, 32, False)
    bias = dev(torch.randn(40))
    x = dev(torch.randn(2, 3, 64))
    y = tw.matmul(x, pw, bias)
    assert y.shape == (2, 3, 40)
    check(y.reshape(6, 40), x.reshape(6, 64), w_ref, bias)
    x_big = dev(torch.randn(5, 9, 64))                       # M = 45: tiled path with bias
    check(tw.matmul(x_big, pw, bias).reshape(45, 40), x_big.reshape(45, 64), w_ref, bias)
    xt = dev(torch.randn(64, 7)).t()                         # non-contiguous activation
    check(tw.matmul(xt, pw), xt, w_ref)
    assert tw.matmul(dev(torch.randn(0, 64)), pw).shape == (0, 40)


def test_rows_split_below_int32_offsets(monkeypatch):
    qweight, scales, zeros, g_idx, w_ref = make_layer(3, 64, True, "static", 40, 64)
    pw = tw.prepare(qweight, scales, zeros, g_idx, 3, 64, True)
    monkeypatch.setattr(tw, "_INT32_LIMIT", 64 * 100)      # -> one row per launch
    calls = []
    orig = tw._matmul_2d
    monkeypatch.setattr(tw, "_matmul_2d", lambda *a: calls.append(a[1].shape[0]) or orig(*a))
    x = dev(torch.randn(5, 64))
    check(tw.matmul(x, pw), x, w_ref)
    assert calls == [1] * 5


@pytest.mark.parametrize("bits", BITS)
def test_repacked_layout_is_the_documented_one(bits):
    """Decode the kernel planes as docs/KERNELS.md describes and compare with the canonical codes."""
    qweight, scales, zeros, g_idx, _ = make_layer(bits, 32, False, "dynamic", 140, 96, seed=bits)
    qweight, scales, zeros, g_idx = (t.cpu() for t in (qweight, scales, zeros, g_idx))
    codes = unpack_codes(qweight, bits, 96).long()
    assert torch.equal(unpack_codes(qweight, bits, 96).long(), codes)
    pw = tw.prepare(qweight, scales, zeros, g_idx, bits, 32, False)
    assert pw.out_pad == 256 and pw.qweight.shape == (96, 256 * pw.plane_bits // 32)

    def plane(words, b):                       # [K, out_pad*b/32] -> [K, out_pad]; slot t = bits [t*b, (t+1)*b)
        shifts = torch.arange(32 // b) * b
        return ((words.long().unsqueeze(-1) >> shifts) & ((1 << b) - 1)).reshape(words.shape[0], -1)

    got = plane(pw.qweight, pw.plane_bits)
    if bits == 3:
        got = got | (plane(pw.qweight_hi, 1) << 2)
    perm = torch.argsort(g_idx.long(), stable=True)
    assert torch.equal(pw.perm, perm)
    assert torch.equal(got[:, :140], codes[:, perm].t())
    assert not got[:, 140:].any()
    assert torch.equal(pw.scales[:, :140], scales.t()) and not pw.scales[:, 140:].any()
    assert torch.equal(pw.zeros[:, :140], zeros.t())
    assert pw.nbytes() == 96 * 256 * bits // 8 + 3 * 256 * 3    # codes + fp16 scales + uint8 zeros


def test_every_autotune_config_runs():
    """Each config the GPU autotuner may pick computes the right thing (big tiles, empty K splits)."""
    jit = tw._jit()
    qweight, scales, zeros, g_idx, w_ref = make_layer(3, 32, False, "uneven", 96, 256, seed=7)
    pw = tw.prepare(qweight, scales, zeros, g_idx, 3, 32, False)
    gen = torch.Generator().manual_seed(7)
    for configs, m in ((jit.SKINNY_CONFIGS, 5), (jit.TILED_CONFIGS, 40)):
        x = dev(torch.randn(m, 256, generator=gen))
        for c in configs:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            check(tw.matmul(x, pw, config=cfg), x, w_ref)


def test_autotune_pruning_and_buckets():
    jit = tw._jit()
    kept = jit._prune_skinny(jit.SKINNY_CONFIGS, {"K": 128, "N": 4096})
    assert kept and all(c.kwargs["SPLIT_K"] == 1 or c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= 128 for c in kept)
    assert len(kept) < len(jit.SKINNY_CONFIGS)
    kept = jit._prune_tiled(jit.TILED_CONFIGS, {"M_BUCKET": 32})
    assert kept and max(c.kwargs["BLOCK_M"] for c in kept) == 64
    assert [tw.m_bucket(m) for m in (1, 3, 16, 17, 100, 5000)] == [1, 4, 16, 32, 128, 4096]
    assert tw.default_config(1, 4096, 4096, "cpu")["SPLIT_K"] == 16     # 32 N tiles x 16 splits >= 2 x 132 SMs
    assert tw.default_config(64, 4096, 4096, "cpu")["BLOCK_M"] == 64
    # static groups smaller than the K tile: one group per tile (no per-row scale gather); uneven
    # act-order groups: a smaller, 3-stage tile (the sm_90 compile of the default one spills)
    for m, gs, bk in ((1, 32, 32), (1, 64, 64), (1, 128, 128), (1, -1, 128), (64, 32, 32), (64, 128, 64)):
        assert tw.default_config(m, 4096, 4096, "cpu", group_size=gs)["BLOCK_K"] == bk, (m, gs)
    uneven = tw.default_config(1, 4096, 4096, "cpu", group_size=32, uneven_groups=True)
    assert (uneven["BLOCK_K"], uneven["num_stages"]) == (64, 3)


@INTERPRETER_ONLY
def test_is_available_and_interpreter_switch(monkeypatch):
    assert tw.is_available()
    assert tw._jit().INTERPRET
    monkeypatch.setenv("TRITON_INTERPRET", "0")        # kernels are re-decorated for the compiler...
    assert not tw._jit().INTERPRET
    assert tw.is_available() == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")        # ...and back for the interpreter
    assert tw._jit().INTERPRET


def _layer(**over):
    kw = dict(bits=4, group_size=32, sym=False)
    kw.update(over)
    qweight, scales, zeros, g_idx, _ = make_layer(kw["bits"], kw["group_size"], kw["sym"], "static", 40, 64)
    return dict(qweight=qweight, scales=scales, zeros=zeros, g_idx=g_idx, **kw)


@pytest.mark.parametrize("change,msg", [
    (dict(bits=5), "bits=5"),
    (dict(group_size=16), "group size 16"),
    (dict(qweight=torch.zeros(40, 9, dtype=torch.int32)), "multiple of 32"),      # 72 in-features at 4 bits
    (dict(qweight=torch.zeros(40, 8, dtype=torch.int64)), "int32"),
    (dict(group_size=128), "does not divide"),
    (dict(scales=torch.ones(40, 2, dtype=torch.float32)), "float16"),
    (dict(scales=torch.ones(40, 3, dtype=torch.float16)), "scales must be"),
    (dict(sym=True), "symmetric"),
    (dict(zeros=None), "needs zeros"),
    (dict(zeros=torch.full((40, 2), 16, dtype=torch.uint8)), "out of range"),
    (dict(g_idx=torch.full((64,), 2, dtype=torch.int32)), "g_idx values"),
    (dict(g_idx=torch.zeros(32, dtype=torch.int32)), "g_idx must be"),
])
def test_prepare_rejects(change, msg):
    kw = _layer()
    kw.update(change)
    with pytest.raises(tw.KernelInputError, match=msg) as info:
        tw.prepare(**kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RcsrError)


def test_matmul_rejects():
    pw = tw.prepare(**_layer())
    for x, msg in ((dev(torch.randn(3, 32)), "64 features"), (dev(torch.randn(3, 64)).double(), "dtype"),
                   (dev(torch.ones(3, 64, dtype=torch.int32)), "dtype")):
        with pytest.raises(ValueError, match=msg):
            tw.matmul(x, pw)
    with pytest.raises(ValueError, match="bias"):
        tw.matmul(dev(torch.randn(3, 64)), pw, dev(torch.randn(41)))
    for cfg, msg in ((dict(BLOCK_M=16, BLOCK_N=48, BLOCK_K=32), "BLOCK_N"), (dict(BLOCK_M=16, BLOCK_N=32), "BLOCK_K"),
                     (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=0), "SPLIT_K"),
                     (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_Z=1), "unknown")):
        with pytest.raises(ValueError, match=msg):
            tw.matmul(dev(torch.randn(3, 64)), pw, config=cfg)
    with pytest.raises(TypeError):
        tw.matmul(dev(torch.randn(3, 64)), {"qweight": None})
    # The kernel states the planes' 16-byte row alignment from prepare()'s layout: another layout is refused.
    wide = torch.zeros(pw.qweight.shape[0], pw.qweight.shape[1] + 1, dtype=torch.int32, device=pw.qweight.device)
    wide[:, :-1] = pw.qweight
    with pytest.raises(ValueError, match="layout"):
        tw.matmul(dev(torch.randn(3, 64)), dataclasses.replace(pw, qweight=wide[:, :-1]))


def _bench_module():
    return load_tool("bench_kernels")


@INTERPRETER_ONLY
def test_bench_interpret_smoke(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench.main, ["--interpret-smoke", "--dequant", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 96x128 | 20 | 3 |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["M"], r["bits"]) for r in rows} == {(1, 3), (20, 3), (1, 4), (20, 4)}
    assert all(r["max_rel_err"] < 1e-5 and r["gbps"] > 0 and r["bytes"] > 0 for r in rows)
    assert all(r["dequant_ms"] > 0 and r["speedup_vs_dequant"] > 0 for r in rows)    # the fallback kernel, timed too
    assert "÷ dequant" in result.stdout


def test_bench_without_cuda_exits_2(monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(bench.main, ["--m", "1", "--bits", "4"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: no CUDA device") and len(result.stderr.strip().splitlines()) == 1


GROUPED_CASES = [(4, 64, True, "static", None), (3, 32, False, "dynamic", dict(BLOCK_M=16, BLOCK_N=32,
                  BLOCK_K=32, SPLIT_K=2)), (2, -1, False, "static", dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)),
                 (8, 32, True, "uneven", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2))]


@pytest.mark.parametrize("bits,group_size,sym,act,cfg", GROUPED_CASES)
def test_grouped_matches_per_expert_reference(bits, group_size, sym, act, cfg):
    """One grouped launch for 5 experts (rows sorted by expert: counts 3, 0, 21, 1, 7 -- an empty expert,
    tiles that straddle no expert boundary, tails -- then 2 rows of "another rank" past offsets[E]) equals
    each expert's fp32 dequantized reference on its rows; the rows past the end are zero.  Per-expert act
    orders (gathered in the kernel's activation load), uneven groups, split-K and GROUP_M ordering."""
    in_f, out_f, n_exp = IN_FOR_GROUP[group_size], 72, 5
    layers = [make_layer(bits, group_size, sym, act if e % 2 else "static", out_f, in_f, seed=10 * e + bits)
              for e in range(n_exp)]
    pws = [tw.prepare(q, s, z, g, bits, group_size, sym) for q, s, z, g, _ in layers]
    gw = tw.stack(pws)
    assert (gw.perm is not None) == (act != "static" and group_size != -1)
    counts = [3, 0, 21, 1, 7]
    offsets = dev(torch.tensor([0] + list(np.cumsum(counts)), dtype=torch.int64))
    gen = torch.Generator().manual_seed(bits)
    x = dev(torch.randn(sum(counts) + 2, in_f, generator=gen))
    y = tw.grouped_matmul(x, gw, offsets, config=cfg)
    assert y.shape == (x.shape[0], out_f) and y.dtype == x.dtype
    start = 0
    for e, c in enumerate(counts):
        if c:
            check(y[start:start + c], x[start:start + c], layers[e][4])
        start += c
    assert bool((y[start:] == 0).all())


def test_tile_map_has_no_host_sync_and_covers_every_row():
    """The tile map is computed on the device from the offsets alone; its size depends only on (rows,
    experts, BLOCK_M); valid tiles cover each expert's rows exactly once and the rest are marked -1."""
    offsets = torch.tensor([0, 3, 3, 24, 25, 32])
    te, tr, n = tw.tile_map(offsets, 34, 16)
    assert n == 3 + 5 and te.shape == tr.shape == (n,)
    covered = []
    for e, r in zip(te.tolist(), tr.tolist()):
        if e >= 0:
            covered += [(e, i) for i in range(r, min(r + 16, int(offsets[e + 1])))]
    assert sorted(covered) == [(e, i) for e in range(5) for i in range(int(offsets[e]), int(offsets[e + 1]))]
    assert te.tolist().count(-1) == n - 5  # tiles: 1 + 0 + 2 + 1 + 1


def test_grouped_rejects():
    q, s, z, g, _ = make_layer(4, 64, True, "static", 40, 128)
    pw = tw.prepare(q, s, z, g, 4, 64, True)
    gw = tw.stack([pw, pw])
    with pytest.raises(RcsrError, match="offsets must be integer"):
        tw.grouped_matmul(dev(torch.zeros(3, 128)), gw, dev(torch.tensor([0, 3])))
    with pytest.raises(RcsrError, match=r"activation must be \[rows, 128\]"):
        tw.grouped_matmul(dev(torch.zeros(3, 64)), gw, dev(torch.tensor([0, 1, 3])))
    q2, s2, z2, g2, _ = make_layer(4, 32, True, "static", 40, 128)
    with pytest.raises(RcsrError, match="must share shape"):
        tw.stack([pw, tw.prepare(q2, s2, z2, g2, 4, 32, True)])
    assert tw.grouped_matmul(dev(torch.zeros(0, 128)), gw, dev(torch.tensor([0, 0, 0]))).shape == (0, 40)


# --------------------------------------------------------------------------------------------------
# MoE: vllm_plugin.moe.TritonExperts (the CUDA experts kernel) against transformers' experts
# --------------------------------------------------------------------------------------------------
def _experts_weights(ck, layer: int, n_exp: int):
    """Per expert the canonical w13 (gate rows, then up) / w2 QuantWeights, as RcsrMoEMethod hands them over."""
    from safetensors.torch import load_file

    from vllm_plugin.kernels.base import QuantWeights

    t = load_file(str(ck / "model.safetensors"))
    p = f"model.layers.{layer}.mlp.experts"

    def one(e, projs):
        get = lambda kind: [t.get(f"{p}.{e}.{pr}.{kind}") for pr in projs]  # noqa: E731
        z, g = get("zeros"), get("group_index")
        return QuantWeights(torch.cat(get("qweight")), torch.cat(get("scales")),
                            None if z[0] is None else torch.cat(z), None if g[0] is None else torch.stack(g).int())

    return [one(e, ("gate_proj", "up_proj")) for e in range(n_exp)], [one(e, ("down_proj",)) for e in range(n_exp)]


@pytest.mark.skipif(DEVICE != "cpu", reason="runs the interpreter on CPU tensors")
@pytest.mark.parametrize("family,bits,gs,sym,act", [("qwen3_moe", 3, 32, False, "dynamic"),
                                                    ("gpt_oss", 2, -1, True, "static")])
def test_triton_experts_match_transformers(family, bits, gs, sym, act, tmp_path, monkeypatch):
    """fp32, 9 tokens top-2 over 4 experts (one unused): the Triton experts kernel (one grouped launch per
    matrix) equals transformers' experts on the fake-quant weights (Qwen3-MoE with per-expert dynamic
    orders; GPT-OSS with biases and its clamped SwiGLU); slots of another rank's expert (id E) add nothing."""
    from factories import tiny_moe, write_moe_checkpoint

    from rcsr_deploy.checkpoint import load_fake_quant_model
    from vllm_plugin.kernels.base import LayerSpec
    from vllm_plugin.moe import select_experts_kernel

    monkeypatch.setenv("RCSR_MOE_KERNEL", "triton")
    model = tiny_moe(family)
    ck = write_moe_checkpoint(model, tmp_path / "ck", bits=bits, group_size=gs, sym=sym, act_order=act)
    fq, _ = load_fake_quant_model(ck)
    ref = fq.model.layers[1].mlp.experts
    inter = 96
    spec13 = LayerSpec(bits, gs, sym, act, 64, 2 * inter, torch.float32, shard_sizes=(inter, inter))
    spec2 = LayerSpec(bits, gs, sym, act, inter, 64, torch.float32)
    activation = "swigluoai" if family == "gpt_oss" else "silu"
    kern = select_experts_kernel(spec13, spec2, 4, activation, "test", has_bias=family == "gpt_oss")
    assert kern.name == "triton"
    kern.prepare(*_experts_weights(ck, 1, 4))
    if family == "gpt_oss":
        b = ref.gate_up_proj_bias.detach()
        kern.set_biases(torch.cat([b[:, 0::2], b[:, 1::2]], 1), ref.down_proj_bias.detach())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 64, generator=g)
    ids = torch.tensor([[0, 1], [1, 3], [3, 0], [0, 3], [1, 0], [3, 1], [0, 1], [1, 3], [3, 0]])
    w = torch.rand(9, 2, generator=g)
    with torch.no_grad():
        want = ref(x, ids, w)
    torch.testing.assert_close(kern.apply(x, w, ids.int(), activation=activation), want, rtol=1e-4, atol=1e-5)
    # expert parallelism: slots routed to another rank's expert (id E) contribute nothing
    other = ids.clone()
    other[[0, 4, 7], [1, 0, 1]] = 4
    w0 = w.clone()
    w0[[0, 4, 7], [1, 0, 1]] = 0
    with torch.no_grad():
        want = ref(x, ids, w0)
    torch.testing.assert_close(kern.apply(x, w, other.int(), activation=activation), want, rtol=1e-4, atol=1e-5)
