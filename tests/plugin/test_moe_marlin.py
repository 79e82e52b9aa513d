"""``vllm_plugin.moe.MarlinExperts`` on a machine without a GPU: its policy, the layout it hands to vLLM's
Marlin-MoE weight processing (decoded by vLLM's own GPTQ int4 dequantizer and by the compressed-tensors
library), and its call into ``fused_marlin_moe`` with vLLM's CUDA-only steps replaced by a reference.
What only a GPU can show -- vLLM's repack and the Marlin kernel on these tensors -- is not tested here."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")
from rcsr_deploy.packing import pack_codes
from vllm_plugin.kernels.base import LayerSpec, QuantWeights
from vllm_plugin.moe import DequantExperts, MarlinExperts

pytestmark = pytest.mark.vllm

E, H, INTER = 3, 128, 64


def specs(bits=4, gs=32, sym=True, act_order="none", dtype=torch.bfloat16, device="cpu"):
    s13 = LayerSpec(bits, gs, sym, act_order, H, 2 * INTER, dtype, device, shard_sizes=(INTER, INTER))
    s2 = LayerSpec(bits, gs, sym, act_order, INTER, H, dtype, device)
    return s13, s2


def random_experts(spec: LayerSpec, seed: int):
    """Per expert: QuantWeights and the dense fp32 matrix (q - z) * s it stands for (scales already rounded
    to the activation dtype, as every vLLM kernel computes with them)."""
    g = torch.Generator().manual_seed(seed)
    ws, dense = [], []
    for _ in range(E):
        codes = torch.randint(0, 1 << spec.bits, (spec.out_features, spec.in_features), generator=g, dtype=torch.uint8)
        scales = (torch.rand(spec.out_features, spec.n_groups, generator=g) * 0.02 + 1e-3).half()
        zeros = None if spec.sym else torch.randint(0, 1 << spec.bits, (spec.out_features, spec.n_groups),
                                                    generator=g, dtype=torch.uint8)
        z = torch.full_like(scales, 1 << (spec.bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
        s = scales.to(spec.act_dtype).float()
        dense.append((codes.float() - z.repeat_interleave(spec.group_len, 1)) * s.repeat_interleave(spec.group_len, 1))
        ws.append(QuantWeights(pack_codes(codes, spec.bits), scales, zeros, None))
    return ws, torch.stack(dense)


def test_policy_reasons():
    ok13, ok2 = specs(device="cuda")
    reason = MarlinExperts.unsupported_reason
    assert "CUDA only" in reason(*specs(), "silu")
    assert "2-bit" in reason(*specs(bits=2, device="cuda"), "silu")
    assert "asymmetric 8-bit" in reason(*specs(bits=8, sym=False, device="cuda"), "silu")
    assert "dynamic act order" in reason(*specs(act_order="dynamic", device="cuda"), "silu")
    assert "fp16/bf16" in reason(*specs(dtype=torch.float32, device="cuda"), "silu")
    assert "activation 'swigluoai'" in reason(ok13, ok2, "swigluoai")
    small = dataclasses.replace(ok13, in_features=64)
    assert "multiple of 128" in reason(small, ok2, "silu")


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, 64, False), (4, -1, False), (8, 32, True), (8, -1, True)])
def test_layout_decodes_to_the_reference(bits, gs, sym):
    """The N-first tensors handed to vLLM decode to the experts' dense matrices with the compressed-tensors
    library's ``unpack_from_int32`` (codes and zero points), and -- 4-bit, the K-first GPTQ form vLLM's Marlin
    processing transposes them to before ``gptq_marlin_moe_repack`` -- with vLLM's own GPTQ int4 dequantizer."""
    from compressed_tensors.compressors import unpack_from_int32

    s13, s2 = specs(bits, gs, sym)
    k = MarlinExperts(s13, s2, E)
    w13, d13 = random_experts(s13, 0)
    w2, d2 = random_experts(s2, 1)
    c = k.canonical(w13, w2)
    for stem, spec, dense in (("w13", s13, d13), ("w2", s2, d2)):
        q, s, z = c[f"{stem}_qweight"], c[f"{stem}_scales"], c[f"{stem}_qzeros"]
        assert q.dtype == torch.int32 and q.shape == (E, spec.out_features, spec.in_features * bits // 32)
        assert s.dtype == torch.bfloat16 and s.shape == (E, spec.out_features, spec.n_groups)
        assert (z is None) == sym
        off = 1 << (bits - 1)
        for e in range(E):
            codes = unpack_from_int32(q[e], bits, torch.Size((spec.out_features, spec.in_features))).float() + off
            zeros = (torch.full((spec.out_features, spec.n_groups), float(off)) if sym else
                     unpack_from_int32(z[e], bits, torch.Size((spec.out_features, spec.n_groups)), packed_dim=0).float()
                     + off)
            got = (codes - zeros.repeat_interleave(spec.group_len, 1)) * s[e].float().repeat_interleave(spec.group_len, 1)
            assert torch.equal(got, dense[e])
        if bits == 4:
            from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import _unpack_and_dequant_int4_gptq

            got = _unpack_and_dequant_int4_gptq(q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous(),
                                                None if sym else z.transpose(1, 2).contiguous(),
                                                transpose_output=True, output_dtype=torch.float32)
            assert torch.equal(got, dense)
    assert k.quant_args().num_bits == bits and k.quant_args().symmetric is sym
    assert k.quant_args().group_size == (None if gs == -1 else gs)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("apply_on_input", [False, True])
def test_apply_feeds_fused_marlin_moe(monkeypatch, sym, apply_on_input):
    """``prepare`` and ``apply`` end to end with vLLM's CUDA-only steps replaced: the weight processing by the
    transpose to K-first GPTQ tensors that vLLM's Marlin path starts with, ``fused_marlin_moe`` by a reference
    that decodes those with vLLM's GPTQ int4 dequantizer -- checking what the kernel is given (quant type,
    zero points, fp32 router weights, activation, expert-parallel slots) against the dequant kernel."""
    import vllm.model_executor.layers.fused_moe.experts.marlin_moe as mm
    import vllm.model_executor.layers.fused_moe.oracle.int_wna16 as oracle
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.scalar_type import scalar_types

    calls = []

    def convert(backend, layer, qargs, input_dtype, w13, w2, s13, s2, z13=None, z2=None, b13=None, b2=None):
        assert backend == oracle.WNA16MoEBackend.MARLIN and layer.intermediate_size_per_partition == INTER
        assert qargs.num_bits == 4 and qargs.symmetric is sym and input_dtype is None
        t = [None if v is None else v.transpose(1, 2).contiguous() for v in (w13, w2, s13, s2, z13, z2)]
        return (*t, None, None, None, None)

    def fake_marlin(x, w1, w2, b1, b2, s1, s2, topk_weights, topk_ids, quant_type_id, *,
                    apply_router_weight_on_input, global_num_experts, activation, w1_zeros, w2_zeros):
        calls.append(quant_type_id)
        assert quant_type_id == (scalar_types.uint4b8 if sym else scalar_types.uint4).id
        assert (w1_zeros is None) == sym and b1 is None and b2 is None
        assert topk_weights.dtype == torch.float32 and activation == MoEActivation.SILU
        assert global_num_experts == E and int(topk_ids.max()) < E
        dq = oracle._unpack_and_dequant_int4_gptq
        d1 = dq(w1, s1, w1_zeros, transpose_output=True, output_dtype=torch.float32)
        d2 = dq(w2, s2, w2_zeros, transpose_output=True, output_dtype=torch.float32)
        out = torch.zeros(x.shape[0], H)
        for t in range(x.shape[0]):
            for j in range(topk_ids.shape[1]):
                e, w = int(topk_ids[t, j]), float(topk_weights[t, j])
                xe = x[t].float() * (w if apply_router_weight_on_input else 1.0)
                h = d1[e] @ xe
                y = d2[e] @ (F.silu(h[:INTER]) * h[INTER:])
                out[t] += y if apply_router_weight_on_input else w * y
        return out.to(x.dtype)

    monkeypatch.setattr(oracle, "convert_to_wna16_moe_kernel_format", convert)
    monkeypatch.setattr(mm, "fused_marlin_moe", fake_marlin)
    s13, s2 = specs(4, 32, sym, dtype=torch.float32)   # fp32 so that the comparison is exact to rounding
    w13, _ = random_experts(s13, 2)
    w2, _ = random_experts(s2, 3)
    k = MarlinExperts(s13, s2, E)
    k.prepare(w13, w2)
    ref = DequantExperts(s13, s2, E)
    ref.prepare(w13, w2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, H, generator=gen)
    k_top = 1 if apply_on_input else 2
    w, ids = torch.topk(torch.softmax(torch.randn(9, E, generator=gen), -1), k_top, dim=-1)
    ids = ids.to(torch.int32)
    ids[0, 0] = E                     # another rank's expert: contributes nothing
    got = k.apply(x, w, ids, activation="silu", apply_router_weight_on_input=apply_on_input)
    w_ref = w.masked_fill(ids == E, 0)
    want = ref.apply(x, w_ref, ids.masked_fill(ids == E, 0), activation="silu",
                     apply_router_weight_on_input=apply_on_input)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls and k.nbytes() > 0


def test_forced_on_cpu_names_the_reason(monkeypatch):
    from vllm_plugin.errors import RcsrPluginError
    from vllm_plugin.moe import select_experts_kernel

    monkeypatch.setenv("RCSR_MOE_KERNEL", "marlin")
    with pytest.raises(RcsrPluginError, match="marlin: CUDA only"):
        select_experts_kernel(*specs(), E, "silu", "model.layers.0.mlp.experts")
