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
        units.append(Unit(f"u{k}", [f"u{k}"], [shape], 0, errors={(2, 32): base * 16, (3, 32): base * 4,
                                                                  (4, 32): base}))
    return units


def W(*bits, g=32):
    """Grids at one group size."""
    return [(b, g) for b in bits]


def _brute_force(units, widths, budget):
    import itertools

    best = None
    for combo in itertools.product(widths, repeat=len(units)):
        if not all(c in u.options(widths) for u, c in zip(units, combo)):
            continue
        size = sum(u.nbytes(b, True) for u, b in zip(units, combo))
        if size <= budget:
            err = sum(u.errors[b] for u, b in zip(units, combo))
            if best is None or err < best[0]:
                best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_is_optimal_and_within_budget(seed):
    """The DP equals brute force on 6 units (3^6 choices) up to its byte buckets, and never exceeds the budget."""
    units = _units(6, seed)
    lo = sum(u.nbytes((2, 32), True) for u in units)
    hi = sum(u.nbytes((4, 32), True) for u in units)
    budget = int(lo + (hi - lo) * (0.3 + 0.15 * seed))
    chosen = allocate(units, W(2, 3, 4), budget, True)
    size = sum(u.nbytes(chosen[u.name], True) for u in units)
    assert size <= budget
    err = sum(u.errors[chosen[u.name]] for u in units)
    best_err, _ = _brute_force(units, W(2, 3, 4), budget)
    # bytes are rounded up to buckets of budget/50000: the DP may miss choices within 6 buckets of the budget
    relaxed, _ = _brute_force(units, W(2, 3, 4), budget - 6 * budget / 50_000)
    assert best_err <= err + 1e-9 and err <= relaxed + 1e-9
    # within one unit's size of the budget: no unit upgrade still fits
    up = lambda c: (min(c[0] + 1, 4), c[1])  # noqa: E731
    assert all(size + u.nbytes(up(chosen[u.name]), True) - u.nbytes(chosen[u.name], True) > budget
               or chosen[u.name][0] == 4 for u in units)


@pytest.mark.parametrize("seed", range(3))
def test_knapsack_over_widths_and_group_sizes(seed):
    """Grids = widths × group sizes (32, 64, per channel): the DP equals brute force on 5 units (9^5 choices),
    and a unit is never given a group size that does not divide its in-features (96 is not a multiple of
    64)."""
    g = torch.Generator().manual_seed(seed)
    grids = [(b, gs) for b in (2, 3, 4) for gs in (32, 64, -1)]
    units = []
    for k in range(5):
        ins = 96 if k == 2 else 128
        shape = (int(torch.randint(1, 5, (1,), generator=g)) * 64, ins)
        u = Unit(f"u{k}", [f"u{k}"], [shape], 0)
        for c in u.options(grids):  # coarser groups and fewer bits: more error
            u.errors[c] = float(torch.rand(1, generator=g) + 0.5) * 4.0 ** (4 - c[0]) * {32: 1, 64: 1.3, -1: 2.2}[c[1]]
        units.append(u)
    assert (3, 64) not in units[2].options(grids) and (3, -1) in units[2].options(grids)
    lo = sum(min(u.nbytes(c, True) for c in u.options(grids)) for u in units)
    hi = sum(max(u.nbytes(c, True) for c in u.options(grids)) for u in units)
    budget = int(lo + (hi - lo) * (0.25 + 0.2 * seed))
    chosen = allocate(units, grids, budget, True)
    assert chosen["u2"][1] != 64
    assert sum(u.nbytes(chosen[u.name], True) for u in units) <= budget
    err = sum(u.errors[chosen[u.name]] for u in units)
    best_err, _ = _brute_force(units, grids, budget)
    relaxed, _ = _brute_force(units, grids, budget - 6 * budget / 50_000)
    assert best_err <= err + 1e-9 and err <= relaxed + 1e-9


def test_group_sizes_of_a_576_wide_model():
    """SmolLM2-135M: 128 divides down_proj's 1536 inputs but not the 576 of the others; 96 and 192 divide both."""
    grids = [(3, g) for g in (64, 96, 128, 192, -1)]
    attn = Unit("qkv", ["q", "k", "v"], [(576, 576), (192, 576), (192, 576)], 0)
    down = Unit("down", ["down"], [(576, 1536)], 0)
    assert attn.options(grids) == [(3, 64), (3, 96), (3, 192), (3, -1)]
    assert down.options(grids) == grids
    # bytes: codes + one fp16 scale per group; W3 g192 = 3 + 16/192 bits per weight
    assert attn.nbytes((3, 192), True) * 8 / attn.params == pytest.approx(3 + 16 / 192)


def test_budget_below_smallest_model_and_rules():
    units = _units(3)
    with pytest.raises(RcsrError, match="below the smallest allowed model"):
        allocate(units, W(2, 3, 4), 100, True)
    (rx, pin), = parse_rules(["u1=4"])
    assert pin == (4, None) and rx.search("model.u1")
    units[1].pinned = pin
    big = sum(u.nbytes((4, 32), True) for u in units)
    chosen = allocate(units, W(2, 3, 4), big, True)
    assert chosen["u1"] == (4, 32)
    assert [p for _, p in parse_rules(["v_proj=4g64", "down_proj=3pc"])] == [(4, 64), (3, -1)]
    # a pin that names a group size is the unit's only option, even outside the allowed grids
    units[1].pinned = (4, -1)
    assert units[1].options(W(2, 3, 4)) == [(4, -1)]
    for bad in ("down_proj", "down_proj=4x", "down_proj=4g48"):
        with pytest.raises(RcsrError):
            parse_rules([bad])


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


def test_group_size_choices_end_to_end(tiny_dir, text_file, tmp_path):
    """--group-sizes 32,channel with widths 3/4: layers get different group sizes as well as widths, fused
    modules share a grid, achieved bytes equal predicted within the budget, the report names every unit's
    grid, and the checkpoint loads fake-quantized."""
    cfg = _cfg(text_file, avg_bits=3.4, widths=(3, 4), group_sizes=(32, -1))
    rep = quantize_to_checkpoint(str(tiny_dir), tmp_path / "mix", cfg, device="cpu", progress=False)
    a = rep["allocation"]
    assert a["achieved_bytes"] == a["predicted_bytes"] <= a["budget_bytes"]
    assert set(a["uniform_error"]) == {"3g32", "3pc", "4g32", "4pc"}
    qc = QuantConfig.read(tmp_path / "mix")
    grids = {(qc.spec_for(m).bits, qc.spec_for(m).group_size) for m in qc.quantized_modules}
    assert len({g for _, g in grids}) > 1, grids
    assert {(u["bits"], u["group_size"]) for u in a["units"]} == grids
    for i in range(3):
        q, k, v = (qc.spec_for(f"model.layers.{i}.self_attn.{p}_proj") for p in "qkv")
        assert q == k == v
    tensors = load_quantized_tensors(tmp_path / "mix")
    assert all(t.spec == qc.spec_for(m) for m, t in tensors.items())
    model, _ = load_fake_quant_model(tmp_path / "mix")
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 30]])).logits).all()


def test_per_channel_budget_gives_per_channel_codes(tiny_dir, text_file, tmp_path):
    """Budget = uniform W3 per channel, grids 3g32 / 3pc: only all-per-channel fits, and its codes are exactly
    those of plain --bits 3 --group-size -1 (the group-size lever reduces to the uniform grid)."""
    quantize_to_checkpoint(str(tiny_dir), tmp_path / "pc", _cfg(text_file, group_size=-1), device="cpu",
                           progress=False)
    q = load_quantized_tensors(tmp_path / "pc")
    # bits per weight of uniform W3 per channel: codes + one fp16 scale per row (+1e-6: float rounding)
    avg = 3 + 16 * sum(t.scale.numel() for t in q.values()) / sum(t.codes.numel() for t in q.values()) + 1e-6
    rep = quantize_to_checkpoint(str(tiny_dir), tmp_path / "alloc",
                                 _cfg(text_file, avg_bits=avg, widths=(3,), group_sizes=(32, -1)),
                                 device="cpu", progress=False)
    assert {(u["bits"], u["group_size"]) for u in rep["allocation"]["units"]} == {(3, -1)}
    b = load_quantized_tensors(tmp_path / "alloc")
    assert set(q) == set(b)
    for m in q:
        assert torch.equal(q[m].codes, b[m].codes) and torch.equal(q[m].scale, b[m].scale), m


def test_uniform_width_that_fits_is_considered():
    """Guard: the uniform allocation at a width that fits the budget (exact bytes) is one of the candidates.

    The budget is exactly uniform W3; the knapsack rounds each choice's bytes up to a bucket, so on its own
    it cannot fit all-W3 and must push a unit down to W2 (predicted 100× worse).  ``allocate`` must return
    uniform W3, and must keep the knapsack's answer where a mixed allocation is predicted better."""
    from rcsr_deploy.allocate import knapsack

    shapes = [(64, 128), (192, 128), (320, 128), (128, 128), (256, 128), (64, 128), (192, 128)]
    e = lambda e2, e3, e4: {(2, 32): e2, (3, 32): e3, (4, 32): e4}  # noqa: E731
    units = [Unit(f"u{k}", [f"u{k}"], [s], 0, errors=e(100.0, 1.0, 0.9)) for k, s in enumerate(shapes)]
    budget = sum(u.nbytes((3, 32), True) for u in units)
    dp = knapsack(units, W(2, 3, 4), budget, True)
    assert set(dp.values()) != {(3, 32)}, "precondition: bucket rounding excludes uniform W3 from the DP"
    chosen = allocate(units, W(2, 3, 4), budget, True)
    assert chosen == {u.name: (3, 32) for u in units}
    # a mixed allocation that is predicted better than every uniform one that fits is kept
    for k, u in enumerate(units):
        u.errors = e(1.0, 1.0, 1.0) if k % 2 else e(50.0, 10.0, 0.1)
    chosen = allocate(units, W(2, 3, 4), budget, True)
    assert len(set(chosen.values())) > 1
    assert sum(u.nbytes(chosen[u.name], True) for u in units) <= budget
    # pinned units stay pinned in the uniform candidate
    for u in units:
        u.errors = e(100.0, 1.0, 0.9)
    units[0].pinned = (2, None)
    chosen = allocate(units, W(2, 3, 4), budget, True)
    assert chosen["u0"] == (2, 32)


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


def test_sample_labels_follows_the_distribution():
    """Inverse-CDF label sampling (the Fisher's sampled labels): frequencies match the probabilities, and a
    zero-probability token is never drawn."""
    from rcsr_deploy.allocate import sample_labels

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    rows = probs.repeat(20000, 1)
    y = sample_labels(rows.cumsum(-1), torch.Generator().manual_seed(0)).reshape(20000, 2)
    freq = torch.stack([torch.bincount(y[:, r], minlength=4).float() / 20000 for r in range(2)])
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_measured_check_is_the_assembled_models_kl(tiny_dir, text_file, tokenizer, monkeypatch):
    """``measure_candidates`` streams every candidate block by block and hooks the result into the rest of the
    model: its KL must equal that of the model rebuilt by hand from the same dequantized weights and run
    normally, for each candidate; a W8 candidate is measured near zero and far below a W2 one."""
    import copy

    import torch.nn.functional as F

    import rcsr_deploy.allocate as al
    from rcsr_deploy.assets import load_model
    from rcsr_deploy.data import calibration_split

    model, tok = load_model(str(tiny_dir), dtype=torch.float32, device="cpu")
    model.eval()
    layers, prefix = find_decoder_layers(model)
    by_block = {i: block_units(layers[i], i, prefix) for i in range(len(layers))}
    units = [u for us in by_block.values() for u in us]
    rng = torch.Generator().manual_seed(0)
    mixed = {u.name: (2 + int(torch.randint(0, 3, (1,), generator=rng)), 32) for u in units}
    cands = {"w2": {u.name: (2, 32) for u in units}, "w8": {u.name: (8, 32) for u in units}, "mixed": mixed}
    seen = {}
    real = al._quantize_unit

    def record(block, unit, choice, cfg, stats_of, plen):
        out = real(block, unit, choice, cfg, stats_of, plen)
        seen[(unit.name, choice)] = {unit.modules[0][:plen] + k: v.clone() for k, v in out.items()}
        return out

    monkeypatch.setattr(al, "_quantize_unit", record)
    cfg = _cfg(text_file)
    got = al.measure_candidates(model, tok, cfg, by_block, cands, progress=False)
    _, val = calibration_split(cfg.calib, tok, min(cfg.nsamples, al.PROBE_WINDOWS),
                               min(cfg.seqlen, al.PROBE_SEQLEN), cfg.seed, al.CHECK_WINDOWS, 1)
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=val).logits.double(), -1)
    for name, alloc in cands.items():
        m = copy.deepcopy(model)
        with torch.no_grad():
            for u in units:
                for full, w in seen[(u.name, alloc[u.name])].items():
                    m.get_submodule(full).weight.copy_(w)
            lp = F.log_softmax(m(input_ids=val).logits.double(), -1)
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        assert abs(got[name]["measured_kl"] - kl) <= 1e-6 + 1e-4 * kl, (name, got[name], kl)
    assert got["w8"]["measured_kl"] < 0.05 * got["w2"]["measured_kl"]
    # the weights were restored: the model is FP again
    with torch.no_grad():
        assert torch.equal(F.log_softmax(model(input_ids=val).logits.double(), -1), ref)


def test_allocation_keeps_the_measured_best_candidate(tiny_dir, text_file, tmp_path):
    """--avg-bits with the check on: the report lists every candidate with predicted and measured KL -- the
    proxy's, every uniform grid (the calibration points, fitting or not) and the corrected proxy's -- the
    per-grid correction is measured / predicted of the uniform points, and the kept candidate has the
    lowest measured KL of those that fit; --no-alloc-check keeps the proxy optimum and measures nothing."""
    rep = quantize_to_checkpoint(str(tiny_dir), tmp_path / "a", _cfg(text_file, avg_bits=3.0), device="cpu",
                                 progress=False)["allocation"]
    c = rep["candidates"]
    assert len(c) > 1 and "proxy optimum" in c and all("measured_kl" in v for v in c.values())
    fits = [n for n, v in c.items() if v["fits_budget"]]
    assert all(c[n]["avg_bits"] <= 3.0 for n in fits) and all(c[n]["avg_bits"] > 3.0 for n in c if n not in fits)
    assert rep["kept_candidate"] == min(fits, key=lambda n: c[n]["measured_kl"])
    assert set(rep["correction"]) == {"2g32", "3g32", "4g32"}
    for g, f in rep["correction"].items():
        v = c[f["candidate"]]
        assert f["factor"] == pytest.approx(v["measured_kl"] / v["predicted_kl"])
    assert c["uniform 4g32"]["avg_bits"] > 3.0 and not c["uniform 4g32"]["fits_budget"]
    rep = quantize_to_checkpoint(str(tiny_dir), tmp_path / "b", _cfg(text_file, avg_bits=3.0, alloc_check=False),
                                 device="cpu", progress=False)["allocation"]
    assert rep["kept_candidate"] == "proxy optimum"
    assert not any("measured_kl" in v for v in rep["candidates"].values())


def test_calibrated_candidates_correct_the_proxy_per_grid():
    """The corrected proxy scales every unit's predicted error on grid ``c`` by ``f_c^γ``: with all factors 1
    it is the proxy's own candidates; when the check measured W2 100× worse than predicted (its uniform point),
    the corrected optimum at γ = 1 gives W2 up while staying within budget, and a larger γ is no more W2-heavy."""
    from rcsr_deploy.allocate import CALIBRATION_STRENGTHS, calibrated_candidates, candidate_allocations

    units = _units(8, seed=3)
    for u in units:  # W2 looks cheap to the proxy
        u.errors[(2, 32)] = u.errors[(4, 32)] * 2
    budget = int(sum(u.nbytes((3, 32), True) for u in units))
    base = {n: a for n, a in candidate_allocations(units, W(2, 3, 4), budget, True).items()
            if not n.startswith("uniform")}
    same = calibrated_candidates(units, W(2, 3, 4), budget, True, {c: 1.0 for c in W(2, 3, 4)})
    for g in CALIBRATION_STRENGTHS:
        for n, a in base.items():
            assert same[f"{n}, corrected^{g:g}"] == a
    assert any(c == (2, 32) for c in base["proxy optimum"].values()), "precondition: the proxy takes W2"
    fixed = calibrated_candidates(units, W(2, 3, 4), budget, True, {(2, 32): 100.0, (3, 32): 1.0, (4, 32): 1.0})
    n2 = {g: sum(c == (2, 32) for c in fixed[f"proxy optimum, corrected^{g:g}"].values()) for g in CALIBRATION_STRENGTHS}
    assert n2[1.0] < sum(c == (2, 32) for c in base["proxy optimum"].values())
    assert n2[2.0] <= n2[1.0] <= n2[0.5]
    for a in fixed.values():
        assert sum(u.nbytes(a[u.name], True) for u in units) <= budget
