"""``vllm_plugin.moe`` without a vLLM engine: the experts kernel against transformers' own expert forward,
the per-expert weight loader and its checks, and ``get_quant_method``'s all-or-none rule."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
from factories import tiny_moe, write_moe_checkpoint

from rcsr_deploy.checkpoint import load_fake_quant_model
from rcsr_deploy.format import QuantConfig
from rcsr_deploy.moe_format import SHARD_IDS
from vllm_plugin.errors import RcsrPluginError

pytestmark = pytest.mark.vllm


class FakeExpertsLayer(torch.nn.Module):
    """What RcsrMoEMethod uses of vLLM's RoutedExperts (TP 1, no EP)."""

    def __init__(self, activation: str = "silu"):
        super().__init__()
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation

        self.expert_map = None
        self.activation = MoEActivation(activation)
        self.apply_router_weight_on_input = False

    @staticmethod
    def _map_global_expert_id_to_local_expert_id(e: int) -> int:
        return e


def vllm_like_loader(param, loaded, weight_name, shard_id, expert_id, return_success=False):
    """vLLM's RoutedExperts.weight_loader at TP 1 for 'group' params: w1 -> first half, w3 -> second."""
    dst = param.data[expert_id]
    if shard_id == "w2":
        dst.copy_(loaded)
    else:
        half = dst.shape[0] // 2
        dst[:half].copy_(loaded) if shard_id == "w1" else dst[half:].copy_(loaded)
    return True if return_success else None


def load_layer(ckpt: Path, layer_idx: int, act_dtype=torch.float32, drop: str | None = None,
               activation: str = "silu", bias: bool = False):
    """One layer of experts through RcsrMoEMethod, loaded as vLLM would (``bias``: GPT-OSS, whose loader copies
    ``gate_up_proj_bias`` -- gate/up interleaved -- and ``down_proj_bias`` into w13_bias / w2_bias)."""
    from safetensors.torch import load_file

    from vllm_plugin.config import RcsrConfig
    from vllm_plugin.moe import RcsrMoEMethod

    qc = QuantConfig.read(ckpt).to_dict()
    cfg = RcsrConfig.from_config(qc)
    hf = f"model.layers.{layer_idx}.mlp.experts"
    E = 4
    moe = SimpleNamespace(tp_size=1, has_bias=bias, num_experts=E)
    method = RcsrMoEMethod(cfg, moe, hf)
    layer = FakeExpertsLayer(activation)
    method.create_weights(layer, E, 64, 96, act_dtype, weight_loader=vllm_like_loader)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, t in tensors.items():
        if not name.startswith(hf + ".") or name == drop:
            continue
        if name.endswith("_bias"):
            getattr(layer, "w13_bias" if name.endswith("gate_up_proj_bias") else "w2_bias").data.copy_(t)
            continue
        e, proj, kind = name[len(hf) + 1:].split(".")
        stem = "w2" if proj == "down_proj" else "w13"
        param = getattr(layer, f"{stem}_{kind}")
        param.weight_loader(param, t, f"{hf}.{stem}_{kind}", SHARD_IDS[proj], int(e), return_success=True)
    method.process_weights_after_loading(layer)
    return method, layer


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-units")
    model = tiny_moe("qwen3_moe")
    return model, {
        "w4": write_moe_checkpoint(model, root / "w4", bits=4, group_size=32, sym=True, act_order="static"),
        "w3": write_moe_checkpoint(model, root / "w3", bits=3, group_size=32, sym=False, act_order="dynamic"),
        "w2": write_moe_checkpoint(model, root / "w2", bits=2, group_size=-1, sym=False, act_order="none"),
        "w8": write_moe_checkpoint(model, root / "w8", bits=8, group_size=32, sym=True, act_order="dynamic"),
    }


@pytest.mark.parametrize("kernel", ["native_cpu", "vllm_cpu", "dequant"])
@pytest.mark.parametrize("key", ["w4", "w3", "w2", "w8"])
def test_experts_match_transformers_on_dequantized_weights(moe_ckpts, key, kernel, monkeypatch):
    """fp32: identical (to rounding) to transformers' Qwen3MoeExperts forward on the fake-quant weights,
    with the same top-k ids / weights; tokens routed to every expert, one expert unused in a 2nd call."""
    monkeypatch.setenv("RCSR_MOE_KERNEL", kernel)
    _, ckpts = moe_ckpts
    fq, _ = load_fake_quant_model(ckpts[key])
    for layer_idx in (0, 1):
        method, layer = load_layer(ckpts[key], layer_idx)
        ref_experts = fq.model.layers[layer_idx].mlp.experts
        gen = torch.Generator().manual_seed(layer_idx)
        x = torch.randn(37, 64, generator=gen)
        logits = torch.randn(37, 4, generator=gen)
        w, ids = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        got = method.apply(layer, x, w, ids.to(torch.int32))
        with torch.no_grad():
            want = ref_experts(x, ids, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # only experts 1 and 2 get tokens
        ids2 = torch.tensor([[1, 2]] * 5, dtype=torch.int32)
        w2 = torch.full((5, 2), 0.5)
        with torch.no_grad():
            torch.testing.assert_close(method.apply(layer, x[:5], w2, ids2), ref_experts(x[:5], ids2.long(), w2),
                                       rtol=1e-5, atol=1e-5)
    # the canonical tensors are gone; dequant holds 1 byte per weight (+ fp32 scales), vllm_cpu dense
    # fp32, native_cpu the packed codes (bits / 8 bytes per weight + fp16 scales / uint8 zeros)
    assert "w13_qweight" not in layer._parameters and layer.rcsr_experts.name == kernel
    n_weights = 4 * 3 * 64 * 96
    if kernel == "native_cpu":
        bits = QuantConfig.read(ckpts[key]).bits
        assert n_weights * bits / 8 <= layer.rcsr_experts.nbytes() <= n_weights * (bits / 8 + 0.2)
    else:
        assert layer.rcsr_experts.nbytes() >= (4 if kernel == "vllm_cpu" else 1) * n_weights


@pytest.mark.parametrize("kernel", ["native_cpu", "dequant"])
def test_gpt_oss_experts_with_biases_and_swigluoai(kernel, tmp_path, monkeypatch):
    """GPT-OSS: transposed, interleaved experts with biases and the clamped SwiGLU (vLLM's ``swigluoai``).
    fp32 output equals transformers' GptOssExperts on the fake-quant weights; vllm_cpu refuses the layer."""
    monkeypatch.setenv("RCSR_MOE_KERNEL", kernel)
    model = tiny_moe("gpt_oss")
    ck = write_moe_checkpoint(model, tmp_path / "ck", bits=4, group_size=32, sym=False, act_order="dynamic")
    fq, _ = load_fake_quant_model(ck)
    for layer_idx in (0, 1):
        method, layer = load_layer(ck, layer_idx, activation="swigluoai", bias=True)
        ref = fq.model.layers[layer_idx].mlp.experts
        gen = torch.Generator().manual_seed(layer_idx)
        x = 8 * torch.randn(23, 64, generator=gen)   # large enough that the clamp at +-7 acts
        w, ids = torch.topk(torch.softmax(torch.randn(23, 4, generator=gen), -1), 2, dim=-1)
        with torch.no_grad():
            want = ref(x, ids, w)
            h = x @ ref.gate_up_proj[0] + ref.gate_up_proj_bias[0]
        assert (h.abs() > 7).any(), "the test does not reach the clamp"
        torch.testing.assert_close(method.apply(layer, x, w, ids.to(torch.int32)), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("RCSR_MOE_KERNEL", "vllm_cpu")
    with pytest.raises(RcsrPluginError, match=r"vllm_cpu: activation 'swigluoai'"):
        load_layer(ck, 0, activation="swigluoai", bias=True)


def test_expert_names_survive_gpt_oss_weights_mapper():
    """GPT-OSS's HF -> vLLM mapper renames the tensor suffix ``.down_proj`` to ``.w2_weight``; our per-expert
    module names keep their projection names (only the experts module's name is mapped)."""
    from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

    from vllm_plugin.config import RcsrConfig

    qc = {"quant_method": "rcsr", "format_version": 3, "bits": 4, "group_size": 32, "sym": True,
          "act_order": "static", "quantized_modules": ["model.layers.0.self_attn.q_proj",
                                                       "model.layers.0.mlp.experts.3.down_proj",
                                                       "model.layers.0.mlp.experts.3.gate_proj"]}
    cfg = RcsrConfig.from_config(qc)
    cfg.apply_vllm_mapper(GptOssForCausalLM.hf_to_vllm_mapper)
    assert cfg.quantized_modules == ["model.layers.0.attn.q_proj", "model.layers.0.mlp.experts.3.down_proj",
                                     "model.layers.0.mlp.experts.3.gate_proj"]


@pytest.mark.parametrize("kernel", ["native_cpu", "vllm_cpu", "dequant"])
def test_bf16_close_to_fp32(moe_ckpts, kernel, monkeypatch):
    monkeypatch.setenv("RCSR_MOE_KERNEL", kernel)
    _, ckpts = moe_ckpts
    m32, l32 = load_layer(ckpts["w4"], 0)
    m16, l16 = load_layer(ckpts["w4"], 0, act_dtype=torch.bfloat16)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 3]] * 9, dtype=torch.int32)
    w = torch.full((9, 2), 0.5)
    a = m32.apply(l32, x, w, ids)
    b = m16.apply(l16, x.bfloat16(), w, ids)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()


def test_loader_rejects_bad_tensors_and_reports_missing(moe_ckpts, tmp_path):
    from vllm_plugin.errors import RcsrPluginError

    _, ckpts = moe_ckpts
    with pytest.raises(RcsrPluginError, match=r"^rcsr: model.layers.1.mlp.experts.2.up_proj.scales is missing "
                                              r"from the checkpoint; the experts are listed in "):
        load_layer(ckpts["w4"], 1, drop="model.layers.1.mlp.experts.2.up_proj.scales")
    from vllm_plugin.config import RcsrConfig
    from vllm_plugin.moe import RcsrMoEMethod

    cfg = RcsrConfig.from_config(QuantConfig.read(ckpts["w4"]).to_dict())
    method = RcsrMoEMethod(cfg, SimpleNamespace(tp_size=1, has_bias=False, num_experts=4), "m.experts")
    layer = FakeExpertsLayer()
    method.create_weights(layer, 4, 64, 96, torch.float32, weight_loader=vllm_like_loader)
    p = layer.w2_scales
    with pytest.raises(RcsrPluginError, match=r"m.experts.1.down_proj.scales: expected float16 \[64, 3\] in the "
                                              r"checkpoint, got float32 \[64, 3\]"):
        p.weight_loader(p, torch.zeros(64, 3), "w2_scales", "w2", 1)
    with pytest.raises(RcsrPluginError, match="hidden size 48 must be a multiple of 32"):
        method.create_weights(FakeExpertsLayer(), 4, 48, 64, torch.float32, weight_loader=vllm_like_loader)


def test_get_quant_method_all_or_none(moe_ckpts):
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from vllm_plugin.config import RcsrConfig
    from vllm_plugin.errors import RcsrPluginError
    from vllm_plugin.moe import RcsrMoEMethod, moe_quant_method

    _, ckpts = moe_ckpts
    qc = QuantConfig.read(ckpts["w4"]).to_dict()
    layer = SimpleNamespace(moe_config=SimpleNamespace(num_experts=4, tp_size=1, has_bias=False))
    cfg = RcsrConfig.from_config(qc)
    assert isinstance(moe_quant_method(cfg, layer, "model.layers.0.mlp.experts"), RcsrMoEMethod)
    mods = [m for m in qc["quantized_modules"] if m != "model.layers.1.mlp.experts.3.down_proj"]
    cfg2 = RcsrConfig.from_config(dict(qc, quantized_modules=mods))
    with pytest.raises(RcsrPluginError, match=r"model.layers.1.mlp.experts: quantized_modules lists 11 of its 12 "
                                              r"expert projections \(not model.layers.1.mlp.experts.3.down_proj\)"):
        moe_quant_method(cfg2, layer, "model.layers.1.mlp.experts")
    cfg3 = RcsrConfig.from_config(dict(qc, quantized_modules=[m for m in qc["quantized_modules"] if "experts" not in m]))
    try:
        got = moe_quant_method(cfg3, layer, "model.layers.0.mlp.experts")
    except Exception:  # vLLM's unquantized method needs a real FusedMoEConfig
        got = None
    assert got is None or isinstance(got, UnquantizedFusedMoEMethod)


def test_forced_unknown_experts_kernel(monkeypatch, moe_ckpts):
    from vllm_plugin.errors import RcsrPluginError

    monkeypatch.setenv("RCSR_MOE_KERNEL", "nope")
    with pytest.raises(RcsrPluginError, match="RCSR_MOE_KERNEL='nope' is not an experts kernel"):
        load_layer(moe_ckpts[1]["w4"], 0)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose tensors went through ``edit(dict)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _check_against_transformers(method, layer, fq, layer_idx, dtype=torch.float32):
    ref_experts = fq.model.layers[layer_idx].mlp.experts
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(23, 64, generator=gen)
    w, ids = torch.topk(torch.softmax(torch.randn(23, 4, generator=gen), -1), 2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    got = method.apply(layer, x.to(dtype), w, ids.to(torch.int32))
    with torch.no_grad():
        want = ref_experts(x, ids, w)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dynamic_act_order_shapes_of_permutation(moe_ckpts, tmp_path, monkeypatch, dtype):
    """Dynamic act order on the native grouped kernel: gate and up with their own column orders (two grouped
    calls), and with one shared order (one call); the codes stay packed at their bit width."""
    monkeypatch.setenv("RCSR_MOE_KERNEL", "native_cpu")
    _, ckpts = moe_ckpts
    method, layer = load_layer(ckpts["w3"], 0, act_dtype=dtype)      # the factory draws one order per matrix
    assert layer.rcsr_experts.name == "native_cpu" and len(layer.rcsr_experts.w13) == 2
    _check_against_transformers(method, layer, load_fake_quant_model(ckpts["w3"])[0], 0, dtype)
    n_weights = 4 * 3 * 64 * 96
    assert n_weights * 3 / 8 <= layer.rcsr_experts.nbytes() <= n_weights * (3 / 8 + 0.3)

    def share(t):                       # up_proj takes gate_proj's order (a different, equally valid model)
        for name in list(t):
            if name.endswith("up_proj.group_index"):
                t[name] = t[name.replace("up_proj", "gate_proj")].clone()
    shared = _edited_copy(ckpts["w8"], tmp_path / "shared", share)
    method, layer = load_layer(shared, 1, act_dtype=dtype)
    assert len(layer.rcsr_experts.w13) == 1
    _check_against_transformers(method, layer, load_fake_quant_model(shared)[0], 1, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_switch_measured_on_one_expert(moe_ckpts, monkeypatch, dtype):
    """Where the switch-over is measured at load (``RCSR_CPU_LARGE_M=measure``), the experts kernel measures it
    on one expert's matrix per stack and sends each expert's rows from that count on to dequantize + GEMM
    (here a fake timer puts it at 8 rows; ~11 rows per expert), still matching the reference."""
    from vllm_plugin.kernels import native_cpu as nc

    monkeypatch.setenv("RCSR_MOE_KERNEL", "native_cpu")
    monkeypatch.setenv(nc.ENV_LARGE_M, "measure")
    monkeypatch.setattr(nc, "_SWITCH_CACHE", {})
    shapes = []

    def timer(weight, x, isa, large_m):
        shapes.append((weight.n, weight.k, weight.packed.dim()))
        return 1.0 if large_m == 0 else 0.5

    monkeypatch.setattr(nc, "time_path", timer)
    _, ckpts = moe_ckpts
    method, layer = load_layer(ckpts["w4"], 0, act_dtype=dtype)
    ex = layer.rcsr_experts
    assert ex.name == "native_cpu" and ex.large_m13 == [8] and ex.large_m2 == 8
    assert {s[2] for s in shapes} == {4} and {s[:2] for s in shapes} == {(2 * 96, 64), (64, 96)}  # one expert
    _check_against_transformers(method, layer, load_fake_quant_model(ckpts["w4"])[0], 0, dtype)


def test_native_refuses_uneven_dynamic_groups(moe_ckpts, tmp_path, monkeypatch):
    """group_index whose groups are not all group_size columns (outside the checkpoint contract, which the
    offline reader enforces; the plugin stays liberal): native_cpu says why it cannot, the default order
    falls through to vllm_cpu, and that agrees with the exact dequant kernel."""
    _, ckpts = moe_ckpts

    def uneven(t):
        g = t["model.layers.0.mlp.experts.2.down_proj.group_index"]
        g[:] = 0
        g[-1] = 1                      # 95 columns in group 0, one in group 1
    bad = _edited_copy(ckpts["w3"], tmp_path / "uneven", uneven)
    monkeypatch.setenv("RCSR_MOE_KERNEL", "native_cpu")
    with pytest.raises(RcsrPluginError, match="native_cpu: dynamic act order whose groups are not all of group_size"):
        load_layer(bad, 0)
    monkeypatch.delenv("RCSR_MOE_KERNEL")
    method, layer = load_layer(bad, 0)
    assert layer.rcsr_experts.name == "vllm_cpu"
    monkeypatch.setenv("RCSR_MOE_KERNEL", "dequant")
    m_dq, l_dq = load_layer(bad, 0)
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[2, 0]] * 11, dtype=torch.int32)
    w = torch.full((11, 2), 0.5)
    torch.testing.assert_close(method.apply(layer, x, w, ids), m_dq.apply(l_dq, x, w, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["native_cpu", "vllm_cpu", "dequant"])
def test_expert_parallel_shares_sum_to_the_whole_layer(moe_ckpts, kernel, monkeypatch):
    """Expert parallelism over 2 ranks (vLLM's expert_map: global id -> local id or -1): each rank loads only
    its 2 experts (global ids in the checkpoint) and returns its experts' share; the shares sum to the
    single-rank layer's output."""
    from vllm_plugin.config import RcsrConfig
    from vllm_plugin.moe import RcsrMoEMethod
    from safetensors.torch import load_file

    monkeypatch.setenv("RCSR_MOE_KERNEL", kernel)
    _, ckpts = moe_ckpts
    ck = ckpts["w4"]
    whole_method, whole = load_layer(ck, 0)
    tensors = load_file(str(ck / "model.safetensors"))
    hf = "model.layers.0.mlp.experts"
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(19, 64, generator=gen)
    w, ids = torch.topk(torch.softmax(torch.randn(19, 4, generator=gen), -1), 2, dim=-1)
    ids = ids.to(torch.int32)
    total = torch.zeros(19, 64)
    for rank, mine in enumerate(([0, 1], [2, 3])):
        emap = torch.full((4,), -1, dtype=torch.int32)
        emap[mine] = torch.arange(2, dtype=torch.int32)
        layer = FakeExpertsLayer()
        layer.expert_map = emap
        layer._map_global_expert_id_to_local_expert_id = lambda e, m=emap: int(m[e])
        method = RcsrMoEMethod(RcsrConfig.from_config(QuantConfig.read(ck).to_dict()),
                               SimpleNamespace(tp_size=1, has_bias=False, num_experts=4), hf)
        method.create_weights(layer, 2, 64, 96, torch.float32, weight_loader=ep_loader(emap))
        for name, t in tensors.items():
            if name.startswith(hf + "."):
                e, proj, kind = name[len(hf) + 1:].split(".")
                param = getattr(layer, f"{'w2' if proj == 'down_proj' else 'w13'}_{kind}")
                param.weight_loader(param, t, name, SHARD_IDS[proj], int(e), return_success=True)
        method.process_weights_after_loading(layer)
        total += method.apply(layer, x, w, ids)
    torch.testing.assert_close(total, whole_method.apply(whole, x, w, ids), rtol=1e-5, atol=1e-6)
    # a rank that misses one of ITS experts names it by its global id
    layer = FakeExpertsLayer()
    layer.expert_map = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
    layer._map_global_expert_id_to_local_expert_id = lambda e: int(layer.expert_map[e])
    method = RcsrMoEMethod(RcsrConfig.from_config(QuantConfig.read(ck).to_dict()),
                           SimpleNamespace(tp_size=1, has_bias=False, num_experts=4), hf)
    method.create_weights(layer, 2, 64, 96, torch.float32, weight_loader=ep_loader(layer.expert_map))
    for name, t in tensors.items():
        if name.startswith(hf + ".") and name != f"{hf}.3.down_proj.scales":
            e, proj, kind = name[len(hf) + 1:].split(".")
            param = getattr(layer, f"{'w2' if proj == 'down_proj' else 'w13'}_{kind}")
            param.weight_loader(param, t, name, SHARD_IDS[proj], int(e), return_success=True)
    with pytest.raises(RcsrPluginError, match=rf"^rcsr: {hf}.3.down_proj.scales is missing"):
        method.process_weights_after_loading(layer)


def ep_loader(emap):
    """vLLM's RoutedExperts.weight_loader under EP: the global id is mapped to this rank's local slot."""
    def loader(param, loaded, weight_name, shard_id, expert_id, return_success=False):
        local = int(emap[expert_id])
        if local < 0:
            return False if return_success else None
        return vllm_like_loader(param, loaded, weight_name, shard_id, local, return_success)
    return loader
