"""MoE without vLLM: the coverage guard on each tiny family, and format_version 3 (per-expert tensors)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from factories import MOE_FAMILIES, tiny_moe, write_moe_checkpoint

from rcsr_deploy import coverage, moe_format
from rcsr_deploy.checkpoint import load_fake_quant_model, load_quantized_tensors
from rcsr_deploy.errors import RcsrError
from rcsr_deploy.format import QUANT_SUFFIXES, QuantConfig

STORABLE = list(MOE_FAMILIES)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_moe(f) for f in MOE_FAMILIES}


# --------------------------------------------------------------------------------------------------
# coverage guard
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_linear_only_plan_fails_on_moe_and_lists_the_experts(models, family):
    """Today's nn.Linear-only walk misses the fused 3-D experts: one RcsrError line naming them."""
    model = models[family]
    with pytest.raises(RcsrError) as ei:
        coverage.coverage_report(model, coverage.linear_only_plan(model))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("coverage: ")
    first = next(n for n, m in model.named_modules() if n.endswith("mlp.experts"))
    assert "experts weight(s)" in msg and f"{first}.gate_up_proj" in msg, msg
    # non-strict: the same numbers as a report
    rep = coverage.coverage_report(model, coverage.linear_only_plan(model), strict=False)
    assert rep["kinds"]["experts"]["quantized_params"] == 0
    assert rep["kinds"]["experts"]["total_params"] == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert rep["uncovered"]["experts"]


@pytest.mark.parametrize("family", STORABLE)
def test_full_plan_covers_100_percent(models, family):
    model = models[family]
    rep = coverage.coverage_report(model, coverage.full_plan(model))
    json.dumps(rep)
    for kind in ("linear", "experts"):
        assert rep["kinds"][kind]["quantized_pct"] == 100.0, rep["kinds"][kind]
        assert rep["kinds"][kind]["left_out"] == {}
    router = rep["kinds"]["router"]
    assert router["quantized_params"] == 0 and router["left_out"]
    assert all(r.startswith("router/gate") for r in router["left_out"].values())
    assert rep["kinds"]["embedding"]["left_out"] and rep["kinds"]["lm_head"]["left_out"]
    assert not rep["uncovered"]
    # every matmul weight is either quantized or a router / embedding / head left out by name
    left = sum(rep["kinds"][k]["total_params"] for k in ("router", "embedding", "lm_head"))
    assert rep["quantized_params"] + left == rep["matmul_params"]


def test_partial_experts_and_lm_head_flag(models):
    model = models["qwen3_moe"]
    plan = [n for n in coverage.full_plan(model) if not n.endswith("experts.3.down_proj")]
    with pytest.raises(RcsrError, match=r"experts weight\(s\).*down_proj \(\d+ of \d+ params quantized\)"):
        coverage.coverage_report(model, plan)
    with pytest.raises(RcsrError, match=r"1 lm_head weight\(s\).*lm_head.weight"):
        coverage.coverage_report(model, coverage.full_plan(model), lm_head=True)
    rep = coverage.coverage_report(model, coverage.full_plan(model) + ["lm_head"], lm_head=True)
    assert rep["kinds"]["lm_head"]["quantized_pct"] == 100.0
    # deliberately left out by name, with the reason recorded
    with pytest.raises(RcsrError, match=r"1 experts weight\(s\), 6,144 params left"):
        coverage.coverage_report(model, plan, left_out={"model.layers.0.mlp.experts.down_proj": "test"})
    rep = coverage.coverage_report(model, plan, left_out={f"model.layers.{i}.mlp.experts.down_proj": "test"
                                                          for i in (0, 1)})
    assert rep["kinds"]["experts"]["left_out"]["model.layers.1.mlp.experts.down_proj"] == "test"
    assert rep["kinds"]["experts"]["quantized_params"] == rep["kinds"]["experts"]["total_params"] - 2 * 6144
    with pytest.raises(RcsrError, match="plan names 1 weight"):
        coverage.coverage_report(model, ["model.layers.9.mlp.experts.0.gate_proj"])


class _Odd(nn.Module):
    """A block with a 3-D weight the forward multiplies with, of no known kind."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.mix = nn.Parameter(torch.randn(4, 32, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(torch.einsum("bi,kio->bo", self.proj(x), self.mix))


def test_unsupported_3d_weight_is_refused():
    model = _Odd()
    with pytest.raises(RcsrError, match=r"coverage: .*1 other weight\(s\), 4,096 params left.*: mix$"):
        coverage.coverage_report(model, ["proj"])
    rep = coverage.coverage_report(model, ["proj", "mix"])
    assert rep["kinds"]["other"]["quantized_pct"] == 100.0
    assert rep["kinds"]["norm/bias"]["left_out"]["norm.weight"].startswith("norm")


def test_gpt_oss_slices_reproduce_the_experts_forward(models):
    """GPT-OSS stores experts transposed ``[E, H, 2I]`` with gate/up interleaved and biases: the per-expert
    ``[out, in]`` views, with the biases and the module's clamped SwiGLU, give the module's own output."""
    model = models["gpt_oss"]
    mod = model.model.layers[0].mlp.experts
    lay = moe_format.expert_layout("mlp.experts", mod)
    assert (lay.transposed, lay.interleaved, lay.biases) == (True, True, ("gate_up_proj_bias", "down_proj_bias"))
    assert (lay.num_experts, lay.intermediate, lay.hidden) == (4, 96, 64)
    ws = moe_format.expert_weights(model)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1], [0, 1], [2, 3], [1, 2]])
    wts = torch.rand(7, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = mod(x, idx, wts)
        out = torch.zeros_like(x)
        for t in range(7):
            for k in range(2):
                e = int(idx[t, k])
                p = f"model.layers.0.mlp.experts.{e}."
                G, U, D = ws[p + "gate_proj"], ws[p + "up_proj"], ws[p + "down_proj"]
                assert G.shape == U.shape == (96, 64) and D.shape == (64, 96)
                b = mod.gate_up_proj_bias[e]
                g = (x[t] @ G.t() + b[0::2]).clamp(max=mod.limit)
                u = (x[t] @ U.t() + b[1::2]).clamp(-mod.limit, mod.limit)
                h = (u + 1) * g * torch.sigmoid(g * mod.alpha)
                out[t] += wts[t, k] * (h @ D.t() + mod.down_proj_bias[e])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the views write through to the fused tensors (fake-quant loading and the quantizer's write-back)
    s = moe_format.expert_slots(model)["model.layers.0.mlp.experts.2.up_proj"]
    t = mod.gate_up_proj.detach().clone()
    s.view(t).fill_(7.0)
    assert (t[2, :, 1::2] == 7).all() and (t[2, :, 0::2] == mod.gate_up_proj[2, :, 0::2]).all()
    assert torch.equal(t[[0, 1, 3]], mod.gate_up_proj.detach()[[0, 1, 3]])


def test_gateless_experts_are_refused(models):
    mod = models["qwen3_moe"].model.layers[0].mlp.experts
    mod.has_gate = False
    try:
        with pytest.raises(RcsrError, match="without a gate projection"):
            moe_format.expert_layout("mlp.experts", mod)
        with pytest.raises(RcsrError, match=r"experts weight\(s\).*model.layers.0.mlp.experts.gate_up_proj"):
            coverage.coverage_report(models["qwen3_moe"], coverage.linear_only_plan(models["qwen3_moe"]))
    finally:
        mod.has_gate = True


# --------------------------------------------------------------------------------------------------
# format_version 3
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_per_expert_orientation_matches_transformers_save(models, family, tmp_path):
    """Our per-expert [out, in] slices equal what transformers' own save_pretrained writes per expert
    (gate = first half of gate_up_proj's rows, up = second half, down = down_proj[e])."""
    from safetensors.torch import load_file

    model = models[family]
    model.save_pretrained(tmp_path)
    disk = load_file(str(tmp_path / "model.safetensors"))
    hub = {"mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}.get(family)
    ours = moe_format.expert_weights(model)
    assert len(ours) == 2 * 4 * 3
    for name, w in ours.items():
        key = f"{name}.weight"
        if hub:
            head, e, proj = name.rsplit(".", 2)
            key = f"{head.replace('mlp.experts', 'block_sparse_moe.experts')}.{e}.{hub[proj]}.weight"
        assert torch.equal(disk[key], w), name


@pytest.mark.parametrize("family", STORABLE)
def test_checkpoint_roundtrip_and_fake_quant(models, family, tmp_path):
    model = models[family]
    ck = write_moe_checkpoint(model, tmp_path / "ck", bits=3, group_size=32, sym=False, act_order="dynamic")
    qc = QuantConfig.read(ck).to_dict()
    assert qc["format_version"] == 3
    qt = load_quantized_tensors(ck)
    slots = moe_format.expert_slots(model)
    assert set(slots) <= set(qt)
    from safetensors import safe_open

    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    names = moe_format.hub_names(model.config.model_type)
    e0 = names.to_hub(next(iter(slots)))
    assert {f"{e0}.qweight", f"{e0}.scales", f"{e0}.zeros", f"{e0}.group_index"} <= keys
    # on disk: the hub's names, i.e. what transformers' own save_pretrained writes for the FP model, with
    # every quantized module's weight replaced by its quantized tensors
    model.save_pretrained(tmp_path / "fp")
    with safe_open(str(tmp_path / "fp" / "model.safetensors"), "pt") as f:
        hub_keys = set(f.keys())
    listed = QuantConfig.read(ck).quantized_modules
    plain = {k for k in keys if not (k.rpartition(".")[0] in set(listed) and k.rpartition(".")[2] in QUANT_SUFFIXES)}
    fused = {k for k in hub_keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if fused:  # hubs that store the experts fused (GPT-OSS): the per-expert projections replace them
        hub_keys = (hub_keys - fused) | {f"{names.to_hub(n)}.weight" for n in slots}
    assert plain | {f"{m}.weight" for m in listed} == hub_keys
    if family == "mixtral":  # vLLM's Mixtral loader reads block_sparse_moe.experts.<e>.w1 / w3 / w2
        assert "model.layers.0.block_sparse_moe.experts.3.w3.qweight" in keys
        assert "model.layers.1.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)
    fq, _ = load_fake_quant_model(ck)
    params = dict(fq.named_parameters())
    for name, s in slots.items():
        assert torch.equal(s.view(params[s.param]), qt[name].dequantize()), name
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fq(ids).logits, model(ids).logits
    assert torch.isfinite(a).all() and 0 < (a - b).abs().max() < 5


def test_writer_refuses_partial_experts_and_old_version(models, tmp_path):
    from rcsr_deploy.checkpoint import save_quantized
    from factories import rtn
    from rcsr_deploy import grid

    model = models["qwen3_moe"]
    spec = grid.QuantSpec(4, 32, True)
    gen = torch.Generator().manual_seed(0)
    ws = moe_format.expert_weights(model)
    part = {n: rtn(w, spec, False, gen) for n, w in ws.items() if ".layers.0." in n and ".3." not in n}
    qc = {"quant_method": "rcsr", "format_version": 3, "bits": 4, "group_size": 32, "sym": True,
          "act_order": "static", "quantized_modules": sorted(part)}
    with pytest.raises(RcsrError, match=r"model.layers.0.mlp.experts.gate_up_proj: 6 of its 8 expert projections"):
        save_quantized(model, part, tmp_path / "a", qc)
    full = {n: rtn(w, spec, False, gen) for n, w in ws.items()}
    with pytest.raises(RcsrError, match="need format_version 3"):
        save_quantized(model, full, tmp_path / "b", dict(qc, format_version=1, quantized_modules=sorted(full)))


def test_mixtral_checkpoint_with_module_names_still_loads(models, tmp_path, monkeypatch):
    """Mixtral checkpoints written before the hub names (transformers 5 module names on disk) still load."""
    model = models["mixtral"]
    new = write_moe_checkpoint(model, tmp_path / "new", bits=4, group_size=32, sym=True, act_order="static")
    monkeypatch.setattr(moe_format, "hub_names", lambda model_type: moe_format.HubNames())
    old = write_moe_checkpoint(model, tmp_path / "old", bits=4, group_size=32, sym=True, act_order="static")
    assert any(".mlp.experts.0.gate_proj." in k for k in _keys(old))
    monkeypatch.undo()
    a, _ = load_fake_quant_model(new)
    b, _ = load_fake_quant_model(old)
    for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q), n
    assert set(load_quantized_tensors(old)) == set(load_quantized_tensors(new))


def _keys(ck):
    from safetensors import safe_open

    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        return set(f.keys())
