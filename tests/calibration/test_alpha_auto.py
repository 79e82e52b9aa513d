"""``--alpha heldout``: α chosen per layer on held-back calibration sequences (objective module doc).

Checked here: the held-out statistics give the exact held-out error of any ``Q``; the fitted
statistics are those of the other sequences; the choice is the candidate with the smallest held-out
error, α = 0 among them, and the final decode is the fixed-α decode at the chosen α on all sequences;
a systematic ``ΔX`` (the FP path is a fixed linear map of the quantized path) is followed (α > 0)
while a ``ΔX`` that differs between sequences is not (α near 0, GPTQ's target); end to end on a
dense and an MoE model."""
from __future__ import annotations

import pytest
import torch
from factories import arch_configs, tiny_moe
from transformers import AutoModelForCausalLM

from rcsr_deploy.calib import QuantizeConfig, quantize_model
from rcsr_deploy.calib.config import AUTO_ALPHAS
from rcsr_deploy.calib.solver import choose_alpha, quantize_linear
from rcsr_deploy.errors import RcsrError
from rcsr_deploy.objective import LayerStats, holdout_sequences


def _streams(n_seq=8, L=64, d=64, drift="systematic", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    xq = torch.randn(n_seq, L, d, generator=g) @ base
    if drift == "systematic":  # the FP path is the same linear map of the quantized path everywhere
        M = 0.3 * torch.randn(d, d, generator=g) / d ** 0.5
        xf = xq + xq @ M
    else:  # a different map in every sequence: nothing about ΔX carries over to other sequences
        xf = torch.stack([x + x @ (0.3 * torch.randn(d, d, generator=g) / d ** 0.5) for x in xq])
    return xq, xf


def _stats(xq, xf, holdout=True, batch=3):
    held = holdout_sequences(xq.shape[0])
    st = LayerStats(xq.shape[-1], "cpu", with_d=True, holdout=holdout)
    for b0 in range(0, xq.shape[0], batch):
        st.add(xq[b0:b0 + batch], xf[b0:b0 + batch], held_out=held[b0:b0 + batch])
    return st, held


def _quantize_tiny_llama(tokenizer, text_file, tmp_path, alpha):
    """A tiny random Llama saved to ``tmp_path/fp`` and quantized to ``tmp_path/q`` (SNRQ W3 g32, 8 x 32 tokens)."""
    from rcsr_deploy.pipeline import quantize_to_checkpoint
    src = tmp_path / "fp"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(arch_configs()["llama"](), dtype=torch.float32).save_pretrained(src)
    tokenizer.save_pretrained(src)
    cfg = QuantizeConfig(method="snrq", bits=3, group_size=32, alpha=alpha, calib=str(text_file), nsamples=8,
                         seqlen=32, seed=0)
    return src, cfg, quantize_to_checkpoint(str(src), tmp_path / "q", cfg, device="cpu", progress=False)


def test_holdout_sequences():
    assert holdout_sequences(8).tolist() == [False, False, False, True] * 2
    assert holdout_sequences(3).tolist() == [False, False, True]  # fewer than four: the last one
    assert holdout_sequences(1).tolist() == [False]


def test_held_out_error_is_exact_and_fit_excludes_held_out_rows():
    xq, xf = _streams(n_seq=9)
    st, held = _stats(xq, xf)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    Q = W + 0.05 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    Xv, Xfv = xq[held].reshape(-1, 64).double(), xf[held].reshape(-1, 64).double()
    direct = ((Xfv @ W.double().T - Xv @ Q.double().T).pow(2).sum() / (Xfv @ W.double().T).pow(2).sum()).item()
    assert st.val.error(W, Q) == pytest.approx(direct, rel=1e-4)
    assert st.val.tokens == int(held.sum()) * 64

    fit = LayerStats(64, "cpu", with_d=True)
    fit.add(xq[~held], xf[~held])
    H, D, n = st.fit()
    assert n == fit.tokens
    torch.testing.assert_close(H, fit.H, rtol=1e-4, atol=1e-4 * fit.H.abs().max().item())
    torch.testing.assert_close(D, fit.D, rtol=1e-4, atol=1e-4 * fit.D.abs().max().item())


def _cfg(**kw):
    return QuantizeConfig(method="snrq", bits=3, group_size=32, alpha="heldout", clip="minmax", **kw)


@pytest.mark.parametrize("drift, expect", [("systematic", "positive"), ("per-sequence", "small")])
def test_choice_follows_the_held_out_error(drift, expect):
    xq, xf = _streams(n_seq=16, drift=drift)
    st, _ = _stats(xq, xf)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    cfg = _cfg()
    alpha, val = choose_alpha(W, st, cfg, cfg.spec, "layer")
    errors = {float(a): e for a, e in val["errors"].items()}
    assert set(errors) == set(AUTO_ALPHAS)
    assert alpha == min(AUTO_ALPHAS, key=lambda a: (errors[a], a))
    assert errors[alpha] <= errors[0.0]  # never worse than GPTQ's target on the held-out sequences
    if expect == "positive":
        assert alpha > 0 and errors[alpha] < 0.9 * errors[0.0]
    else:  # small α are within the rounding noise of one another; a large α is clearly worse
        assert alpha <= 0.25 and errors[1.0] > 1.05 * errors[0.0]


def test_final_decode_is_the_fixed_alpha_decode_on_all_sequences():
    xq, xf = _streams(n_seq=12)
    st, _ = _stats(xq, xf)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    r = quantize_linear(W, st, _cfg(), "layer")
    a = r.info["alpha"]
    assert r.info["alpha_mode"] == "heldout" and a in AUTO_ALPHAS
    fixed = quantize_linear(W, st, QuantizeConfig(method="snrq", bits=3, group_size=32, alpha=str(a), clip="minmax"),
                            "layer")
    assert torch.equal(r.codes, fixed.codes) and torch.equal(r.scale, fixed.scale)
    if a == 0.0:  # then it is GPTQ's solution on the same statistics
        gptq = quantize_linear(W, st, QuantizeConfig(method="gptq", bits=3, group_size=32, clip="minmax"), "layer")
        assert torch.equal(r.codes, gptq.codes)


def test_auto_needs_two_sequences():
    with pytest.raises(RcsrError, match="--alpha heldout .* --nsamples >= 2"):
        _cfg(nsamples=1).validate()


def test_auto_end_to_end_dense_and_moe(tokenizer, text_file, tmp_path):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(arch_configs()["llama"](), dtype=torch.float32)
    for name, model in (("dense", dense), ("moe", tiny_moe("qwen3_moe"))):
        cfg = QuantizeConfig(method="snrq", bits=3, group_size=32, alpha="heldout", calib=str(text_file), nsamples=8,
                             seqlen=32, seed=0, moe_min_tokens=1)
        results, rep = quantize_model(model, tokenizer, cfg, work_dir=tmp_path / name, progress=False)
        infos = [r.info for r in results.values()]
        assert infos and all(i["alpha"] in AUTO_ALPHAS and i["alpha_mode"] == "heldout" for i in infos), name
        # an expert whose routed tokens all lie in fitted sequences cannot be validated: it keeps α = 0
        assert all(i["alpha_validation"]["held_out_tokens"] > 0 or i["alpha"] == 0.0 for i in infos), name
        assert sum(i["alpha_validation"]["held_out_tokens"] > 0 for i in infos) > len(infos) // 2, name
        assert all(torch.isfinite(torch.tensor(i["objective"])) for i in infos), name


def test_report_plot_shows_held_out_error_against_gptq(tokenizer, text_file, tmp_path):
    """quant_report's plot gets a panel per block: held-out error of each α over α = 0's; the chosen α
    is never above 1 (α = 0 is a candidate)."""
    from rcsr_deploy.pipeline import _held_out_ratios
    src, cfg, rep = _quantize_tiny_llama(tokenizer, text_file, tmp_path, "heldout")
    ratios = _held_out_ratios(rep)
    assert set(ratios) == {"chosen"} | {f"α = {a}" for a in AUTO_ALPHAS if a}
    assert [b for b, _ in ratios["chosen"]] == [0, 1]
    assert all(r <= 1.0 + 1e-12 for _, r in ratios["chosen"])
    assert (tmp_path / "q" / "quant_report.png").stat().st_size > 0


# -- --alpha auto: α chosen per model on held-back calibration text ------------------------------------

def test_calibration_split_holds_back_disjoint_windows(tokenizer, text_file):
    from rcsr_deploy.data import calibration_split, calibration_windows, load_text, tokenize_text
    tokens = tokenize_text(load_text(str(text_file), "train"), tokenizer)
    fit, val = calibration_split(str(text_file), tokenizer, 8, 32, 0, 4)
    assert torch.equal(fit, calibration_windows(str(text_file), tokenizer, 8, 32, 0))  # the plain run's windows
    assert val.shape == (4, 32)

    def start(w):
        return next(s for s in range(tokens.numel() - 31) if torch.equal(tokens[s:s + 32], w))

    calib, held = [start(w) for w in fit], [start(w) for w in val]
    for i, h in enumerate(held):  # no held-back token is a calibration token, none is held back twice
        assert all(abs(h - c) >= 32 for c in calib) and all(abs(h - o) >= 32 for o in held[:i])
    with pytest.raises(RcsrError, match="--alpha auto holds"):
        calibration_split(str(text_file), tokenizer, 8, 32, 0, tokens.numel() // 32)


def test_auto_keeps_the_candidate_with_the_lower_held_back_loss(tokenizer, text_file, tmp_path):
    """Both candidates (α = 0 and sampled α) are quantized on the same windows; the checkpoint holds the one
    with the lower held-back NLL, bit-identical to a direct run of it; the report says why."""
    from dataclasses import replace

    from rcsr_deploy.calib.config import AUTO_CANDIDATES, held_back_windows
    from rcsr_deploy.checkpoint import load_quantized_tensors
    from rcsr_deploy.data import calibration_split
    src, cfg, rep = _quantize_tiny_llama(tokenizer, text_file, tmp_path, "auto")
    sel = rep["alpha_selection"]
    assert set(sel["candidates"]) == set(AUTO_CANDIDATES) and sel["held_back_windows"] == held_back_windows(8, 32)
    nll = {c: v["held_back_nll"] for c, v in sel["candidates"].items()}
    gain = nll["0.0"] - nll["sample"]
    assert sel["margin"] == cfg.alpha_margin and sel["candidates"]["sample"]["gain"] == pytest.approx(gain, abs=1e-9)
    assert sel["chosen"] == ("sample" if gain > cfg.alpha_margin else "0.0")
    assert rep["config"]["alpha"] == "auto" and rep["config"]["alpha_chosen"] == sel["chosen"]
    for c in sel["candidates"].values():  # per block: the output error against the FP model on held-back text
        errs = c["block_output_error"]
        assert len(errs) == 2 and all(0 < e < 1 for e in errs)
        assert c["held_back_nll"] > sel["fp_held_back_nll"] - 0.05
    assert (tmp_path / "q" / "quant_report.png").stat().st_size > 0

    fit, _ = calibration_split(str(text_file), tokenizer, 8, 32, 0, held_back_windows(8, 32))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    direct, _ = quantize_model(model, tokenizer, replace(cfg, alpha=sel["chosen"]), work_dir=tmp_path / "w",
                               progress=False, windows=fit)
    saved = load_quantized_tensors(tmp_path / "q")
    assert set(saved) == set(direct)
    for n, r in direct.items():
        assert torch.equal(saved[n].codes, r.codes) and torch.equal(saved[n].scale.float(), r.scale.float()), n


def test_alpha_zero_candidate_is_gptq(tokenizer, text_file, tmp_path):
    """The α = 0 candidate of --alpha auto is GPTQ's solution, code for code."""
    out = {}
    for name, kw in (("gptq", dict(method="gptq")), ("snrq0", dict(method="snrq", alpha="0.0"))):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(arch_configs()["llama"](), dtype=torch.float32)
        cfg = QuantizeConfig(bits=3, group_size=32, calib=str(text_file), nsamples=4, seqlen=32, seed=0, **kw)
        out[name], _ = quantize_model(model, tokenizer, cfg, work_dir=tmp_path / name, progress=False)
    assert all(torch.equal(out["gptq"][n].codes, out["snrq0"][n].codes) for n in out["gptq"])


def test_auto_needs_a_concrete_alpha_inside_the_loop(tokenizer, text_file, tmp_path):
    model = AutoModelForCausalLM.from_config(arch_configs()["llama"](), dtype=torch.float32)
    cfg = QuantizeConfig(method="snrq", bits=3, group_size=32, alpha="auto", calib=str(text_file), nsamples=4, seqlen=32)
    with pytest.raises(RcsrError, match="chosen per model"):
        quantize_model(model, tokenizer, cfg, work_dir=tmp_path / "w", progress=False)


def test_held_back_pass_scores_like_perplexity_and_compares_blocks():
    from rcsr_deploy.evaluate import held_back_pass, perplexity
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_configs()["llama"](), dtype=torch.float32).eval()
    windows = torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    nll, ref, per_window = held_back_pass(model, windows, bos_token_id=1)
    assert nll == pytest.approx(perplexity(model, windows.reshape(-1), 24, bos_token_id=1, progress=False)["nll"],
                                rel=1e-6)
    for w, v in zip(windows, per_window):  # each window's own mean NLL
        assert v == pytest.approx(held_back_pass(model, w[None], bos_token_id=1)[0], rel=1e-6)
    assert sum(per_window) / len(per_window) == pytest.approx(nll, rel=1e-9)
    assert len(ref) == 3 and len(ref[0]) == 2 and ref[0][0].dtype == torch.bfloat16
    same, errs, _ = held_back_pass(model, windows, bos_token_id=1, reference=ref)
    assert same == nll and all(e < 1e-4 for e in errs)  # only the bf16 rounding of the reference
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    _, errs, _ = held_back_pass(model, windows, bos_token_id=1, reference=ref)
    assert errs[0] < 1e-4 < errs[1]  # block 0 untouched, block 1 changed


def test_auto_rule_keeps_alpha_zero_unless_the_gain_clears_the_margin():
    """The paired rule of ``--alpha auto``: the regularized candidate needs a held-back gain above the margin;
    a smaller gain, a tie or a loss keeps alpha = 0. The reported standard error is the paired one."""
    import numpy as np

    from rcsr_deploy.pipeline import pick_auto_candidate
    base = [3.40, 3.30, 3.50, 3.45]
    for shift, margin, want in [(0.05, 0.02, "sample"), (0.012, 0.02, "0.0"), (0.012, 0.0, "sample"),
                                (-0.03, 0.0, "0.0"), (0.019, 0.02, "0.0"), (0.021, 0.02, "sample")]:
        cand = [b - shift + e for b, e in zip(base, (0.01, -0.01, 0.005, -0.005))]
        chosen, stats = pick_auto_candidate({"0.0": base, "sample": cand}, margin)
        d = np.array(base) - np.array(cand)
        assert chosen == want, (shift, margin)
        assert stats["sample"]["gain"] == pytest.approx(d.mean(), abs=1e-12)
        assert stats["sample"]["gain_se"] == pytest.approx(d.std(ddof=1) / 2, rel=1e-9)
    assert pick_auto_candidate({"0.0": base, "sample": list(base)}, 0.0)[0] == "0.0"  # an exact tie
    # a third candidate: the eligible one with the lower NLL wins
    chosen, _ = pick_auto_candidate({"0.0": base, "a": [b - 0.03 for b in base], "b": [b - 0.05 for b in base]}, 0.02)
    assert chosen == "b"
    with pytest.raises(ValueError, match="windows"):
        pick_auto_candidate({"0.0": base, "sample": base[:2]}, 0.02)


def test_alpha_margin_is_validated():
    from rcsr_deploy.calib import QuantizeConfig
    from rcsr_deploy.calib.config import AUTO_MARGIN
    assert QuantizeConfig().alpha_margin == AUTO_MARGIN == 0.02
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(RcsrError, match="--alpha-margin"):
            QuantizeConfig(alpha_margin=bad).validate()


def test_check_text_must_agree():
    """``--alpha-check-data``: the regularized candidate must also clear the margin on the second text;
    a gain on the calibration domain alone (the W2 blind spot) keeps alpha = 0."""
    from rcsr_deploy.pipeline import pick_auto_candidate
    base = [3.40, 3.30, 3.50, 3.45]
    better = [b - 0.5 for b in base]
    for check_shift, want in [(0.05, "sample"), (-0.4, "0.0"), (0.01, "0.0")]:
        check0 = [5.0, 5.2, 4.9, 5.1]
        check1 = [c - check_shift for c in check0]
        chosen, stats = pick_auto_candidate({"0.0": base, "sample": better}, 0.02,
                                            {"0.0": check0, "sample": check1})
        assert chosen == want, check_shift
        assert stats["sample"]["check_gain"] == pytest.approx(check_shift, abs=1e-12)
        assert stats["sample"]["gain"] == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(RcsrError, match="--alpha-check-data .* needs --alpha auto"):
        QuantizeConfig(alpha="sample", alpha_check="x.txt").validate()


def test_auto_with_check_text_end_to_end(tokenizer, text_file, tmp_path):
    """Every candidate is also scored on the check text; the report and the rule use those windows."""
    from dataclasses import replace

    from rcsr_deploy.pipeline import pick_auto_candidate, quantize_to_checkpoint
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))
    src, cfg, _ = _quantize_tiny_llama(tokenizer, text_file, tmp_path / "plain", "auto")
    cfg = replace(cfg, alpha_check=str(other))
    rep = quantize_to_checkpoint(str(src), tmp_path / "q", cfg, device="cpu", progress=False)
    sel = rep["alpha_selection"]
    assert sel["check_data"] == str(other) and sel["check_tokens"] == sel["held_back_tokens"]
    cands = sel["candidates"]
    assert all(len(c["check_window_nll"]) == len(c["window_nll"]) for c in cands.values())
    assert cands["0.0"]["check_nll"] != cands["0.0"]["held_back_nll"]
    want, _ = pick_auto_candidate({c: v["window_nll"] for c, v in cands.items()}, cfg.alpha_margin,
                                  {c: v["check_window_nll"] for c, v in cands.items()})
    assert sel["chosen"] == want and "check_gain" in cands["sample"]


def test_auto_sarqc_adds_a_third_candidate(tokenizer, text_file, tmp_path):
    """``--auto-sarqc 0.1``: the sampled α with SARQC is a third candidate, judged by the same rule; the
    checkpoint holds the chosen candidate's codes, bit-identical to a direct run of it (margin 0 here, so
    the lowest held-back NLL wins whenever it beats α = 0)."""
    from dataclasses import replace

    from rcsr_deploy.calib.config import AUTO_SARQC_CANDIDATE, held_back_windows
    from rcsr_deploy.checkpoint import load_quantized_tensors
    from rcsr_deploy.data import calibration_split
    from rcsr_deploy.pipeline import pick_auto_candidate, quantize_to_checkpoint

    src, cfg, _ = _quantize_tiny_llama(tokenizer, text_file, tmp_path / "plain", "auto")
    cfg = replace(cfg, auto_sarqc=0.1, alpha_margin=0.0)
    rep = quantize_to_checkpoint(str(src), tmp_path / "q", cfg, device="cpu", progress=False)
    sel = rep["alpha_selection"]
    cands = sel["candidates"]
    assert set(cands) == {"0.0", "sample", AUTO_SARQC_CANDIDATE} and rep["config"]["auto_sarqc"] == 0.1
    want, _ = pick_auto_candidate({c: v["window_nll"] for c, v in cands.items()}, 0.0)
    assert sel["chosen"] == want
    assert cands[AUTO_SARQC_CANDIDATE]["held_back_nll"] != cands["sample"]["held_back_nll"]  # SARQC changed codes
    direct_cfg = replace(cfg, alpha="sample", sarqc_lambda=0.1, auto_sarqc=0.0) if want == AUTO_SARQC_CANDIDATE \
        else replace(cfg, alpha=want, auto_sarqc=0.0)
    fit, _ = calibration_split(str(text_file), tokenizer, 8, 32, 0, held_back_windows(8, 32))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    direct, _ = quantize_model(model, tokenizer, direct_cfg, work_dir=tmp_path / "w", progress=False, windows=fit)
    saved = load_quantized_tensors(tmp_path / "q")
    for n, r in direct.items():
        assert torch.equal(saved[n].codes, r.codes), n
    with pytest.raises(RcsrError, match="--auto-sarqc adds a candidate to --alpha auto"):
        QuantizeConfig(method="snrq", alpha="sample", auto_sarqc=0.1).validate()
