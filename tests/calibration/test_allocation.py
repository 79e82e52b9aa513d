"""Mixed precision (``--avg-bits``): units, the knapsack, and the pipeline end to end on a tiny model."""
from __future__ import annotations

import pytest
import torch
from factories import tiny_llama, tiny_moe

from rcsr_deploy.allocate import Unit, allocate, block_units, parse_rules
from rcsr_deploy.calib import QuantizeConfig
from rcsr_deploy.calib.adapter import find_decoder_layers
from rcsr_deploy.checkpoint import load_fake_quant_model, load_quantized_tensors
from rcsr_deploy.errors import RcsrError
from rcsr_deploy.format import QuantConfig
from rcsr_deploy.pipeline import quantize_to_checkpoint


def test_units_follow_vllm_fusion():
    """q/k/v one unit, gate/up one unit, all experts of a MoE layer one unit, the rest alone."""
    model = tiny_llama(layers=1)
    layers, prefix = find_decoder_layers(model)
    names = [u.name.removeprefix("model.layers.0.") for u in block_units(layers[0], 0, prefix)]
    assert names == ["self_attn.q_proj/k_proj/v_proj", "self_attn.o_proj", "mlp.gate_proj/up_proj", "mlp.down_proj"]
    moe = tiny_moe("qwen2_moe")
    layers, prefix = find_decoder_layers(moe)
    units = {u.name.removeprefix("model.layers.0."): u for u in block_units(layers[0], 0, prefix)}
    assert "mlp.experts.*" in units and len(units["mlp.experts.*"].modules) == 4 * 3
    assert "mlp.shared_expert.gate_proj/up_proj" in units and not any("shared_expert_gate" in n for n in units)


def _units(n: int, seed: int = 0) -> list[Unit]:
    g = torch.Generator().manual_seed(seed)
    units = []
    for k in range(n):
        shape = (int(torch.randint(1, 5, (1,), generator=g)) * 64, 128)
        base = float(torch.rand(1, generator=g)) * 10 + 0.1
        units.append(Unit(f"u{k}", [f"u{k}"], [shape], 0, errors={2: base * 16, 3: base * 4, 4: base}))
    return units


def _brute_force(units, widths, budget):
    import itertools

    best = None
    for combo in itertools.product(widths, repeat=len(units)):
        size = sum(u.nbytes(b, 32, True) for u, b in zip(units, combo))
        if size <= budget:
            err = sum(u.errors[b] for u, b in zip(units, combo))
            if best is None or err < best[0]:
                best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_is_optimal_and_within_budget(seed):
    """The DP equals brute force on 6 units (3^6 choices) up to its byte buckets, and never exceeds the budget."""
    units = _units(6, seed)
    lo = sum(u.nbytes(2, 32, True) for u in units)
    hi = sum(u.nbytes(4, 32, True) for u in units)
    budget = int(lo + (hi - lo) * (0.3 + 0.15 * seed))
    chosen = allocate(units, (2, 3, 4), budget, 32, True)
    size = sum(u.nbytes(chosen[u.name], 32, True) for u in units)
    assert size <= budget
    err = sum(u.errors[chosen[u.name]] for u in units)
    best_err, _ = _brute_force(units, (2, 3, 4), budget)
    # bytes are rounded up to buckets of budget/50000: the DP may miss choices within 6 buckets of the budget
    relaxed, _ = _brute_force(units, (2, 3, 4), budget - 6 * budget / 50_000)
    assert best_err <= err + 1e-9 and err <= relaxed + 1e-9
    # within one unit's size of the budget: no unit upgrade still fits
    assert all(size + u.nbytes(min(chosen[u.name] + 1, 4), 32, True) - u.nbytes(chosen[u.name], 32, True) > budget
               or chosen[u.name] == 4 for u in units)


def test_budget_below_smallest_model_and_rules():
    units = _units(3)
    with pytest.raises(RcsrError, match="below the smallest allowed model"):
        allocate(units, (2, 3, 4), 100, 32, True)
    (rx, b), = parse_rules(["u1=4"])
    units[1].pinned = b
    big = sum(u.nbytes(4, 32, True) for u in units)
    chosen = allocate(units, (2, 3, 4), big, 32, True)
    assert chosen["u1"] == 4
    with pytest.raises(RcsrError, match="REGEX=BITS"):
        parse_rules(["down_proj"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=len(tokenizer), layers=3, head_dim=16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cfg(text_file, **kw):
    base = dict(method="snrq", bits=3, group_size=32, calib=str(text_file), nsamples=6, seqlen=48, seed=0,
                batch_size=3)
    base.update(kw)
    return QuantizeConfig(**base)


def test_avg_bits_end_to_end(tiny_dir, text_file, tmp_path):
    """--avg-bits 3.25 over widths 2/3/4: achieved bytes within the budget and within one unit of it; fused
    modules share a width; the checkpoint (format 3) round-trips and loads fake-quantized; quant_report
    records predicted and achieved sizes."""
    rep = quantize_to_checkpoint(str(tiny_dir), tmp_path / "mix", _cfg(text_file, avg_bits=3.25), device="cpu",
                                 progress=False)
    a = rep["allocation"]
    assert a["achieved_bytes"] == a["predicted_bytes"] <= a["budget_bytes"]
    largest = max(max(u["bytes"].values()) - min(u["bytes"].values()) for u in a["units"])
    assert a["budget_bytes"] - a["achieved_bytes"] <= largest  # no unit's upgrade still fits
    qc = QuantConfig.read(tmp_path / "mix")
    widths = {qc.spec_for(m).bits for m in qc.quantized_modules}
    assert qc.format_version == 3 and len(widths) > 1, widths
    for i in range(3):
        q, k, v = (qc.spec_for(f"model.layers.{i}.self_attn.{p}_proj") for p in "qkv")
        assert q == k == v
        assert qc.spec_for(f"model.layers.{i}.mlp.gate_proj") == qc.spec_for(f"model.layers.{i}.mlp.up_proj")
    tensors = load_quantized_tensors(tmp_path / "mix")
    assert all(t.spec == qc.spec_for(m) for m, t in tensors.items())
    model, _ = load_fake_quant_model(tmp_path / "mix")
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 30]])).logits).all()


def test_uniform_budget_gives_uniform_codes(tiny_dir, text_file, tmp_path):
    """A budget equal to uniform W3 with W3 the only width: exactly the codes of plain --bits 3."""
    plain = quantize_to_checkpoint(str(tiny_dir), tmp_path / "w3", _cfg(text_file), device="cpu", progress=False)
    size_w3 = 3 + 16 / 32  # codes + fp16 scale per group of 32
    quantize_to_checkpoint(str(tiny_dir), tmp_path / "alloc", _cfg(text_file, avg_bits=size_w3, widths=(3,)),
                           device="cpu", progress=False)
    a, b = load_quantized_tensors(tmp_path / "w3"), load_quantized_tensors(tmp_path / "alloc")
    assert set(a) == set(b) and plain
    for m in a:
        assert torch.equal(a[m].codes, b[m].codes) and torch.equal(a[m].scale, b[m].scale), m


def test_uniform_width_that_fits_is_considered():
    """Guard: the uniform allocation at a width that fits the budget (exact bytes) is one of the candidates.

    The budget is exactly uniform W3; the knapsack rounds each choice's bytes up to a bucket, so on its own
    it cannot fit all-W3 and must push a unit down to W2 (predicted 100× worse).  ``allocate`` must return
    uniform W3, and must keep the knapsack's answer where a mixed allocation is predicted better."""
    from rcsr_deploy.allocate import knapsack

    shapes = [(64, 128), (192, 128), (320, 128), (128, 128), (256, 128), (64, 128), (192, 128)]
    units = [Unit(f"u{k}", [f"u{k}"], [s], 0, errors={2: 100.0, 3: 1.0, 4: 0.9}) for k, s in enumerate(shapes)]
    budget = sum(u.nbytes(3, 32, True) for u in units)
    dp = knapsack(units, (2, 3, 4), budget, 32, True)
    assert set(dp.values()) != {3}, "precondition: bucket rounding excludes uniform W3 from the DP"
    chosen = allocate(units, (2, 3, 4), budget, 32, True)
    assert chosen == {u.name: 3 for u in units}
    # a mixed allocation that is predicted better than every uniform one that fits is kept
    for k, u in enumerate(units):
        u.errors = {2: 1.0, 3: 1.0, 4: 1.0} if k % 2 else {2: 50.0, 3: 10.0, 4: 0.1}
    chosen = allocate(units, (2, 3, 4), budget, 32, True)
    assert len(set(chosen.values())) > 1
    assert sum(u.nbytes(chosen[u.name], 32, True) for u in units) <= budget
    # pinned units stay pinned in the uniform candidate
    for u in units:
        u.errors = {2: 100.0, 3: 1.0, 4: 0.9}
    units[0].pinned = 2
    chosen = allocate(units, (2, 3, 4), budget, 32, True)
    assert chosen["u0"] == 2


def test_fisher_kl_predicts_end_to_end_kl():
    """The sensitivity currency: ``fisher_kl(G_i, δ)`` (sampled-label Fisher of the final logits, pulled back to
    block ``i``'s output) matches the measured mean per-token KL(p_FP ‖ p) of adding a small ``δ`` to that
    output, for the first and the last block -- errors of different blocks land on one scale."""
    import torch.nn.functional as F

    from rcsr_deploy.allocate import fisher_kl, output_fisher_factors

    model = tiny_llama(layers=3, vocab_size=256, initializer_range=0.25)
    layers, _ = find_decoder_layers(model)
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (6, 24), generator=g)
    G = output_fisher_factors(model, layers, windows, 256, 0, 3, {0, 2})
    with torch.no_grad():
        ref = F.log_softmax(model(windows).logits.double(), -1)
    for i in (0, 2):
        delta = 0.02 * torch.randn(6, 24, 64, generator=g)
        h = layers[i].register_forward_hook(
            lambda m, a, out: ((out[0] + delta,) + tuple(out[1:])) if isinstance(out, tuple) else out + delta)
        try:
            with torch.no_grad():
                lp = F.log_softmax(model(windows).logits.double(), -1)
        finally:
            h.remove()
        measured = float((ref.exp() * (ref - lp)).sum(-1).mean())
        predicted = fisher_kl(G[i], delta)
        assert measured > 0 and abs(predicted / measured - 1) < 0.25, (i, predicted, measured)
