"""Mixture-of-Experts calibration on tiny random models of every supported family (fused 3-D experts).

Every expert of every MoE block is quantized (3 matrices per expert, named like the hub's per-expert
linears), routers stay FP; each expert's quantized weights beat RTN on its own routed tokens; an expert
the router never picks falls back to all tokens and says so; both streams pair the same tokens.
"""
from __future__ import annotations

import logging

import pytest
import torch
from factories import QUANTIZABLE_MOE, tiny_moe

import rcsr_deploy.calib.experts as experts_mod
from rcsr_deploy.calib import QuantizeConfig, quantize_model
from rcsr_deploy.calib.adapter import experts_modules, find_decoder_layers
from rcsr_deploy.format import QuantSpec
from rcsr_deploy.grid import compute_grid, expand_groups
from rcsr_deploy.objective import quadratic_objective
from rcsr_deploy.rounding import rtn


def _cfg(text_file, **kw):
    base = dict(method="gptq", bits=3, group_size=32, calib=str(text_file), nsamples=6, seqlen=48, seed=0,
                batch_size=3, moe_min_tokens=8)
    base.update(kw)
    return QuantizeConfig(**base)


def _expected_experts(model) -> set[str]:
    layers, prefix = find_decoder_layers(model)
    out = set()
    for i, block in enumerate(layers):
        for name, ex in experts_modules(block).items():
            for e in range(ex.num_experts):
                out.update(f"{prefix}.{i}.{n}" for n in ex.matrix_names(e).values())
    return out


@pytest.mark.parametrize("family", QUANTIZABLE_MOE)
def test_every_expert_is_quantized_and_written_back(family, tokenizer, text_file, tmp_path):
    model = tiny_moe(family)
    fp = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = _expected_experts(model)
    assert want, "the factory built no fused experts"
    results, report = quantize_model(model, tokenizer, _cfg(text_file), work_dir=tmp_path / "w", progress=False)
    assert want <= set(results), sorted(want - set(results))[:5]
    assert not [n for n in results if n.rsplit(".", 1)[-1] in ("gate", "router", "shared_expert_gate")]
    # the model now holds the dequantized experts (the quantized path for later blocks), routers are FP
    layers, prefix = find_decoder_layers(model)
    for i, block in enumerate(layers):
        for name, ex in experts_modules(block).items():
            for e in range(ex.num_experts):
                for part, n in ex.matrix_names(e).items():
                    assert torch.equal(ex.weight(e, part), results[f"{prefix}.{i}.{n}"].dequantize()), n
    for n, p in model.named_parameters():
        if n.endswith((".gate.weight", ".router.weight", "shared_expert_gate.weight")):
            assert torch.equal(p, fp[n]), n
    infos = [inf for entry in report["layers"] for m, inf in entry["modules"].items() if ".experts." in m]
    assert infos and all(inf["calibration"] in ("routed", "all-tokens") and inf["tokens"] >= 0 for inf in infos)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_beats_rtn_on_its_own_tokens(family, tokenizer, text_file, tmp_path, monkeypatch):
    """Per expert matrix: ‖(W − Q)X̃_e‖² of the calibrated codes ≤ that of RTN (full-range grid), on the
    expert's own statistics ``H_e`` (GPTQ, α = 0: the objective is exactly this output error)."""
    seen = {}
    real = experts_mod.quantize_linear

    def spy(W, stats, cfg, name):
        r = real(W, stats, cfg, name)
        seen[name] = (W.clone(), stats.H.clone(), r)
        return r

    monkeypatch.setattr(experts_mod, "quantize_linear", spy)
    model = tiny_moe(family)
    quantize_model(model, tokenizer, _cfg(text_file, moe_min_tokens=1), work_dir=tmp_path / "w", progress=False)
    assert seen
    spec = QuantSpec(3, 32, True)
    for name, (W, H, r) in seen.items():
        scale, zero = compute_grid(W, spec)
        S, Z = expand_groups(scale, spec, W.shape[1]), expand_groups(zero, spec, W.shape[1])
        q_rtn = (rtn(W, S, Z, spec.maxq).float() - Z) * S
        ours, base = quadratic_objective(W, r.dequantize(), H), quadratic_objective(W, q_rtn, H)
        assert ours <= base * (1 + 1e-6), f"{name}: {ours:.4g} > RTN {base:.4g}"


def _starve_expert_3(model):
    """Bias every Qwen3-MoE router away from expert 3: it gets no token."""
    layers, _ = find_decoder_layers(model)

    def biased(router):
        def forward(hidden_states):  # Qwen3MoeTopKRouter.forward with a -1e4 bias on expert 3's logit
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
            logits[:, 3] -= 1e4
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, router.top_k, dim=-1)
            if router.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        return forward

    for block in layers:
        block.mlp.gate.forward = biased(block.mlp.gate)
    return layers


def test_unrouted_expert_falls_back_to_all_tokens_and_is_logged(tokenizer, text_file, tmp_path, caplog):
    """A router biased away from expert 3 sends it no token: it is calibrated on all tokens, the report
    says so (0 tokens, ``all-tokens``), the log names it; the other experts stay on their own tokens."""
    model = tiny_moe("qwen3_moe")
    layers = _starve_expert_3(model)
    _, prefix = find_decoder_layers(model)
    caplog.set_level(logging.INFO, logger="rcsr_deploy.calib.experts")
    results, report = quantize_model(model, tokenizer, _cfg(text_file), work_dir=tmp_path / "w", progress=False)
    for i in range(len(layers)):
        for part in ("gate_proj", "up_proj", "down_proj"):
            info = results[f"{prefix}.{i}.mlp.experts.3.{part}"].info
            assert (info["tokens"], info["calibration"]) == (0, "all-tokens")
        routed = [results[f"{prefix}.{i}.mlp.experts.{e}.gate_proj"].info for e in range(4) if e != 3]
        assert sum(inf["calibration"] == "routed" for inf in routed) >= 2
    assert "experts [3] had < 8 routed tokens" in caplog.text


@pytest.mark.parametrize("fallback", ["neighbours", "rtn"])
def test_unrouted_expert_other_fallbacks(fallback, tokenizer, text_file, tmp_path, caplog, monkeypatch):
    """``--moe-fallback neighbours``: the starved expert 3 is calibrated on the routed tokens of the experts
    with the most similar router rows (nearest first, until ``moe_min_tokens``): its gate/up statistics
    are exactly theirs.  ``rtn``: it is rounded to nearest with the clip search (its codes are RTN's), with
    an identity ``g_idx`` under dynamic act order.  Both say so in the report and the log."""
    seen = {}
    real = experts_mod.quantize_linear

    def spy(W, stats, cfg, name):
        seen[name] = None if stats is None else stats.H.clone()
        return real(W, stats, cfg, name)

    monkeypatch.setattr(experts_mod, "quantize_linear", spy)
    model = tiny_moe("qwen3_moe")
    layers = _starve_expert_3(model)
    _, prefix = find_decoder_layers(model)
    caplog.set_level(logging.INFO, logger="rcsr_deploy.calib.experts")
    cfg = _cfg(text_file, moe_fallback=fallback, act_order="dynamic")
    results, _ = quantize_model(model, tokenizer, cfg, work_dir=tmp_path / "w", progress=False)
    for i, block in enumerate(layers):
        info = results[f"{prefix}.{i}.mlp.experts.3.gate_proj"].info
        assert (info["tokens"], info["calibration"]) == (0, fallback)
        if fallback == "neighbours":
            w = torch.nn.functional.normalize(block.mlp.gate.weight.detach().float(), dim=1)
            nearest = [j for j in torch.argsort(w @ w[3], descending=True).tolist() if j != 3]
            nbrs = info["neighbours"]
            assert nbrs == nearest[:len(nbrs)] and 3 not in nbrs
            counts = {e: results[f"{prefix}.{i}.mlp.experts.{e}.gate_proj"].info["tokens"] for e in nbrs}
            assert sum(counts.values()) >= 8 and sum(list(counts.values())[:-1]) < 8
            n = sum(counts.values())
            want = sum(counts[e] / n * seen[f"{prefix}.{i}.mlp.experts.{e}.gate_proj"] for e in nbrs)
            torch.testing.assert_close(seen[f"{prefix}.{i}.mlp.experts.3.gate_proj"], want)
            assert seen[f"{prefix}.{i}.mlp.experts.3.down_proj"] is not None
        else:
            for part in ("gate_proj", "up_proj", "down_proj"):
                r = results[f"{prefix}.{i}.mlp.experts.3.{part}"]
                assert r.info["method"] == "rtn" and seen[f"{prefix}.{i}.mlp.experts.3.{part}"] is None
                assert r.g_idx is not None and torch.equal(r.g_idx, torch.arange(r.codes.shape[1]) // 32)
    assert "experts [3] had < 8 routed tokens" in caplog.text
    assert ("router neighbours' tokens: 3 <- [" if fallback == "neighbours" else "rounded to nearest") in caplog.text


def test_calibrate_all_experts_on_all_tokens(tokenizer, text_file, tmp_path):
    """``moe_calib="all"`` (llm-compressor's default): every expert on every token, and an SNRQ run
    (sampled α, both streams) completes with finite objectives."""
    model = tiny_moe("olmoe")
    results, _ = quantize_model(model, tokenizer, _cfg(text_file, method="snrq", moe_calib="all"),
                                work_dir=tmp_path / "w", progress=False)
    experts = [r for n, r in results.items() if ".experts." in n]
    assert experts and all(r.info["calibration"] == "all-tokens" for r in experts)
    assert all(torch.isfinite(torch.tensor(r.info["objective"])) for r in experts)


def test_streams_pair_the_same_tokens_at_the_experts(tokenizer, text_file, tmp_path, monkeypatch):
    """The FP and quantized inputs that reach an expert's statistics are the same tokens, in the same
    order: with attention made an exact no-op on both paths (a zero output projection quantizes to
    zero), the two streams agree at the experts, so every expert's ``D`` is exactly zero.  Pairing an
    expert's quantized-path tokens with other tokens of the FP path (its own routing, a shuffled
    order) would make it non-zero."""
    seen = []
    real = experts_mod.quantize_linear

    def spy(W, stats, cfg, name):
        seen.append((name, stats.D.abs().max().item(), stats.tokens))
        return real(W, stats, cfg, name)

    monkeypatch.setattr(experts_mod, "quantize_linear", spy)
    model = tiny_moe("qwen3_moe")
    cfg = _cfg(text_file, method="snrq", alpha="1.0", blocks="0")  # block 1's streams differ (block 0 quantized)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    quantize_model(model, tokenizer, cfg, work_dir=tmp_path / "w", progress=False)
    gate_up = [(n, d, t) for n, d, t in seen if n.endswith(("gate_proj", "up_proj"))]
    assert gate_up and all(d == 0.0 for _, d, _ in gate_up), gate_up[:3]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_quantize_moe_checkpoint_end_to_end(family, tokenizer, text_file, tmp_path):
    """``rcsr quantize`` on an MoE model: coverage 100 % of expert + attention matmuls (routers left out by
    name) in quant_report.json, format version 3, and the fake-quant model (``rcsr eval``) holds exactly
    the quantized experts and gives finite logits."""
    from rcsr_deploy.checkpoint import load_fake_quant_model, load_quantized_tensors
    from rcsr_deploy.format import QuantConfig
    from rcsr_deploy.pipeline import quantize_to_checkpoint

    src = tmp_path / "fp"
    tiny_moe(family, vocab_size=len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    rep = quantize_to_checkpoint(str(src), tmp_path / "q", _cfg(text_file, method="snrq"), device="cpu",
                                 progress=False)
    cov = rep["coverage"]
    assert cov["kinds"]["experts"]["quantized_pct"] == 100.0 and cov["kinds"]["linear"]["quantized_pct"] == 100.0
    assert all("router" in r for r in cov["kinds"]["router"]["left_out"].values())
    assert QuantConfig.read(tmp_path / "q").format_version == 3
    model, _ = load_fake_quant_model(tmp_path / "q")
    tensors = load_quantized_tensors(tmp_path / "q")
    layers, prefix = find_decoder_layers(model)
    n = 0
    for i, block in enumerate(layers):
        for name, ex in experts_modules(block).items():
            for e in range(ex.num_experts):
                for part, m in ex.matrix_names(e).items():
                    assert torch.equal(ex.weight(e, part), tensors[f"{prefix}.{i}.{m}"].dequantize())
                    n += 1
    assert n and torch.isfinite(model(torch.tensor([[1, 5, 9, 30]])).logits).all()


def test_coverage_guard_refuses_an_unsupported_expert_layout(tokenizer, text_file, tmp_path, monkeypatch):
    """Experts in a layout the format cannot read (here: every layout, as if transformers had added a new
    one) are not calibrated, so ``rcsr quantize`` stops before calibrating with one line naming the
    uncovered weights."""
    from rcsr_deploy import moe_format
    from rcsr_deploy.errors import RcsrError
    from rcsr_deploy.pipeline import quantize_to_checkpoint

    def unknown(name, mod):
        raise RcsrError(f"{name}: unknown layout")

    monkeypatch.setattr(moe_format, "expert_layout", unknown)
    src = tmp_path / "fp"
    tiny_moe("qwen3_moe", vocab_size=len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    with pytest.raises(RcsrError, match=r"coverage: weights neither quantized nor left out by name -- .*experts") as e:
        quantize_to_checkpoint(str(src), tmp_path / "q", _cfg(text_file), device="cpu", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "q").exists()
