"""``rcsr quantize`` end to end: model → calibration engine → packed checkpoint (+ report)."""
from __future__ import annotations

import io
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch

from . import __version__, moe_format
from .calib import QuantizeConfig, quantize_model
from .calib.adapter import check_finite, check_layers_fit, quantization_plan
from .calib.config import AUTO_CANDIDATES, AUTO_SARQC_CANDIDATE
from .coverage import coverage_report
from .errors import RcsrError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RcsrError(f"--device {device} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise RcsrError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)")
    return device


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.rcsr-work"


def quantize_to_checkpoint(model_name: str, out_dir: str | Path, cfg: QuantizeConfig, *, device: str = "auto",
                           resume: bool = False, overwrite: bool = False, progress: bool = True,
                           candidate_hook=None) -> dict:
    """Quantize ``model_name`` and write the checkpoint atomically to ``out_dir``; returns the report.

    ``candidate_hook(alpha, model)`` (``--alpha auto`` only; benchmarks) sees each candidate's fake-quantized
    model; what it returns lands in that candidate's ``report["alpha_selection"]`` entry."""
    from .assets import load_model, resolve_model
    from .checkpoint import save_quantized
    from .format import QuantConfig

    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise RcsrError(f"output directory {out_dir} already exists (pass --overwrite to replace it)")
    device = resolve_device(device)
    path = resolve_model(model_name)
    t0 = time.perf_counter()
    model, tokenizer = load_model(path, dtype=torch.float32, device="cpu")
    model.eval()
    if not (cfg.avg_bits and cfg.group_sizes):  # else the allocation offers each layer the grids that fit it
        check_layers_fit(model, cfg.spec)
    plan, left_out = quantization_plan(model, cfg)
    coverage = coverage_report(model, plan, lm_head=cfg.lm_head, left_out=left_out)  # one error line if short
    log.info("coverage: %.2f%% of %d matmul parameters quantized", coverage["quantized_pct"], coverage["matmul_params"])
    load_s = time.perf_counter() - t0
    alloc = None
    if cfg.avg_bits:
        alloc = _allocate(model, tokenizer, cfg, progress)
    if cfg.alpha == "auto" and cfg.method in ("snrq", "ksnrq"):
        model, results, report = _select_alpha(path, model, tokenizer, cfg, device, out_dir, resume, str(model_name),
                                               progress, candidate_hook)
    else:
        results, report = quantize_model(model, tokenizer, cfg, device=device, work_dir=work_dir_for(out_dir),
                                         resume=resume, model_id=str(model_name), progress=progress)
    modules = dict(model.named_modules())
    for name, r in results.items():
        bias = getattr(modules.get(name), "bias", None)  # a tied embedding or a fused expert has none
        r.bias = None if bias is None else bias.detach().cpu()
    grids = {n: {"bits": r.spec.bits, "group_size": r.spec.group_size} for n, r in results.items()
             if r.spec != cfg.spec}
    qcfg = QuantConfig(
        bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
        act_order="none" if cfg.method == "rtn" else cfg.act_order,  # RTN never reorders columns
        quantized_modules=sorted(results),
        # the lowest version that holds it: 3 per-module grids or MoE experts, 2 a quantized vocabulary table, else 1
        format_version=3 if grids or moe_format.format_version_for(model, results, 0) else 2 if cfg.lm_head else 1,
        module_grids=grids or None,
        lm_head=cfg.lm_head,
        method={k: v for k, v in report["config"].items() if k not in ("bits", "group_size", "sym", "act_order", "module_grids")},
        rcsr_version=__version__,
    )
    if alloc is not None:
        achieved = sum(t.numel() * t.element_size() for n, r in results.items() if n in alloc.module_grids
                       for k, t in r.to_tensors(n).items() if not k.endswith(".bias"))
        report["allocation"] = {**alloc.report(), "achieved_bytes": achieved,
                                "achieved_avg_bits": 8 * achieved / alloc.params}
    report["coverage"] = coverage
    report.update({
        "model": str(model_name),
        "model_path": str(path),
        "load_seconds": load_s,
        "device": device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    })
    extra = {"quant_report.json": json.dumps(report, indent=1, default=float)}
    png = _plot_report(report)
    if png is not None:
        extra["quant_report.png"] = png
    save_quantized(model, results, out_dir, qcfg, tokenizer=tokenizer, extra_files=extra, overwrite=overwrite)
    import shutil
    shutil.rmtree(work_dir_for(out_dir), ignore_errors=True)
    return report


#: ``--alpha auto`` refuses to choose on fewer held-back windows than this
MIN_HELD_BACK = 2


def _paired_gain(base: list[float], w: list[float], what: str) -> tuple[float, float]:
    """Mean and standard error of ``base_w − w_w`` over paired windows."""
    n = len(base)
    if len(w) != n:
        raise ValueError(f"{what}: {len(w)} held-back windows, not {n}")
    d = [b - x for b, x in zip(base, w)]
    gain = sum(d) / n
    return gain, (math.sqrt(sum((x - gain) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan"))


def pick_auto_candidate(window_nll: dict[str, list[float]], margin: float,
                        check_nll: dict[str, list[float]] | None = None) -> tuple[str, dict[str, dict]]:
    """``--alpha auto``'s rule, given each candidate's per-window held-back NLL (equal-length windows, the same
    windows for every candidate).

    With ``d_w = nll_w(α = 0) − nll_w(c)`` the paired gain of candidate ``c`` on window ``w``, its gain is
    ``ḡ = mean_w d_w`` (nats per token) with standard error ``sd(d) / √n``.  A candidate is eligible when
    ``ḡ > margin``; the eligible one with the lowest NLL is kept, and α = 0 when none is: a gain that small
    is a tie, and a tie keeps GPTQ's target (``AUTO_MARGIN``).  With ``check_nll`` (the same candidates' NLL on
    windows of a second text, ``--alpha-check-data``) a candidate must also gain more than the margin there:
    the held-back windows come from the calibration text, and a target that fits that domain better can
    still lose on another.  Returns ``(chosen, {c: {"gain", "gain_se"[, "check_gain", "check_gain_se"]}})``."""
    base_key = AUTO_CANDIDATES[0]
    base = window_nll[base_key]
    n = len(base)
    chosen, best = base_key, sum(base) / n
    stats: dict[str, dict] = {}
    for c, w in window_nll.items():
        if c == base_key:
            continue
        gain, se = _paired_gain(base, w, f"candidate {c}")
        stats[c] = {"gain": gain, "gain_se": se}
        eligible = gain > margin
        if check_nll is not None:
            cg, cse = _paired_gain(check_nll[base_key], check_nll[c], f"candidate {c} (check text)")
            stats[c].update(check_gain=cg, check_gain_se=cse)
            eligible = eligible and cg > margin
        if eligible and sum(w) / n < best:
            chosen, best = c, sum(w) / n
    return chosen, stats


def _auto_pick(scores: dict[str, dict], keys, margin: float) -> tuple[str, dict[str, dict]]:
    """:func:`pick_auto_candidate` over the candidates ``keys`` of ``scores`` (with the check text's NLLs when
    they were measured)."""
    win = {c: scores[c]["window_nll"] for c in keys}
    chk = {c: scores[c]["check_window_nll"] for c in keys} if all("check_window_nll" in scores[c] for c in keys) \
        else None
    return pick_auto_candidate(win, margin, chk)


def _check_windows(name: str, tokenizer, n: int, seqlen: int) -> torch.Tensor:
    """``--alpha-check-data``: ``n`` windows of ``seqlen`` tokens from the start of the text ``name`` (fewer if it
    is shorter; at least one)."""
    from .data import eval_tokens

    tokens = eval_tokens(name, tokenizer, n * seqlen)
    k = tokens.numel() // seqlen
    if k < 1:
        raise RcsrError(f"--alpha-check-data {name}: {tokens.numel()} tokens, fewer than one {seqlen}-token window")
    if k < n:
        log.warning("--alpha-check-data %s: room for %d windows of %d tokens, not %d", name, k, seqlen, n)
    return tokens[: k * seqlen].reshape(k, seqlen)


def _select_alpha(path, model, tokenizer, cfg: QuantizeConfig, device: str, out_dir: Path, resume: bool,
                  model_id: str, progress: bool, candidate_hook=None):
    """``--alpha auto``: α chosen per model on held-back calibration text.

    ``held_back_windows(nsamples, seqlen)`` windows of ``seqlen`` tokens of the calibration text, disjoint from the
    calibration windows, are held back (``data.calibration_split``).  The model is quantized once per candidate of ``AUTO_CANDIDATES`` — α = 0 (GPTQ's target: with ``--method snrq`` the
    very GPTQ solution) and the paper's sampled α — on the same calibration windows, each from the FP
    model.  The regularized candidate is kept only when its negative log-likelihood on the held-back windows
    is lower than α = 0's by more than ``cfg.alpha_margin`` nats per token (``pick_auto_candidate``); else
    α = 0 is.  ``--auto-sarqc LAMBDA`` adds a third candidate, the sampled α with SARQC's drift penalty at
    LAMBDA (``AUTO_SARQC_CANDIDATE``), judged by the same rule.  So the default never keeps the regularized target where, on text the quantizer did not see,
    it is worse than its own α = 0 point, nor where it is better by too little to tell.  Cost: one
    quantization per candidate (two), plus three short evaluations; host memory: two models at a time.

    Returns ``(model, results, report)`` of the chosen candidate; ``report["alpha_selection"]`` has every
    candidate's held-back NLL and quantization time."""
    from dataclasses import replace

    from .assets import load_model
    from .calib.config import held_back_windows
    from .data import calibration_split
    from .evaluate import held_back_pass

    check_finite(model)  # the one-line refusal of NaN/Inf weights comes before any forward pass
    n_val = held_back_windows(cfg.nsamples, cfg.seqlen)
    fit, val = calibration_split(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, n_val, MIN_HELD_BACK)
    if val.shape[0] < n_val:
        log.warning("--alpha auto: the calibration text has room for %d held-back windows, not %d: the choice rests "
                    "on %d tokens", val.shape[0], n_val, val.numel())
    work = work_dir_for(out_dir)
    bos = tokenizer.bos_token_id
    fp_nll, fp_blocks, _ = held_back_pass(model.to(device), val, bos_token_id=bos, device=device)
    model.to("cpu")
    check = _check_windows(cfg.alpha_check, tokenizer, val.shape[0], cfg.seqlen) if cfg.alpha_check else None
    scores: dict[str, dict] = {}
    kept: dict[str, tuple] = {}
    candidates = AUTO_CANDIDATES + ((AUTO_SARQC_CANDIDATE,) if cfg.auto_sarqc > 0 else ())
    for k, cand in enumerate(candidates):
        c = replace(cfg, alpha=cand, alpha_check="", auto_sarqc=0.0)
        if cand == AUTO_SARQC_CANDIDATE:  # the sampled α with SARQC's drift penalty (--auto-sarqc LAMBDA)
            c = replace(c, alpha="sample", sarqc_lambda=cfg.auto_sarqc)
        m = model if k == 0 else load_model(path, dtype=torch.float32, device="cpu")[0].eval()
        t0 = time.perf_counter()
        results, report = quantize_model(m, tokenizer, c, device=device, work_dir=work / f"alpha-{cand}",
                                         resume=resume, model_id=model_id, progress=progress, windows=fit)
        seconds = time.perf_counter() - t0
        nll, block_err, window_nll = held_back_pass(m.to(device), val, bos_token_id=bos, device=device,
                                                    reference=fp_blocks)
        m.to("cpu")
        scores[cand] = {"held_back_nll": nll, "held_back_ppl": math.exp(nll), "seconds": seconds,
                        "block_output_error": block_err, "window_nll": window_nll}
        if check is not None:
            cnll, _, cwin = held_back_pass(m.to(device), check, bos_token_id=bos, device=device)
            scores[cand].update(check_nll=cnll, check_window_nll=cwin)
        if candidate_hook is not None:
            scores[cand].update(candidate_hook(cand, m) or {})
        log.info("--alpha auto: candidate alpha=%s: held-back NLL %.5f (FP %.5f) in %.0fs", cand, nll, fp_nll, seconds)
        kept[cand] = (m, results, report)
        if k > 0:  # keep at most two models: alpha = 0 and the better regularized one so far
            c0 = _auto_pick(scores, kept, cfg.alpha_margin)[0]
            for c in [c for c in kept if c not in (AUTO_CANDIDATES[0], c0)]:
                del kept[c]
        del m, results, report
    chosen, gains = _auto_pick(scores, scores, cfg.alpha_margin)
    for c, g in gains.items():
        scores[c].update(g)
    model, results, report = kept.pop(chosen)
    kept.clear()
    report["config"]["alpha"] = "auto"
    report["config"]["alpha_chosen"] = chosen
    report["config"]["alpha_check"] = cfg.alpha_check
    report["config"]["auto_sarqc"] = cfg.auto_sarqc
    report["alpha_selection"] = {"chosen": chosen, "candidates": scores, "margin": cfg.alpha_margin,
                                 "check_data": cfg.alpha_check or None,
                                 "check_tokens": None if check is None else int(check.numel()),
                                 "held_back_windows": n_val,
                                 "held_back_tokens": int(val.numel()), "fp_held_back_nll": fp_nll}
    report["seconds"] = sum(v["seconds"] for v in scores.values())
    log.info("--alpha auto: kept alpha=%s", chosen)
    return model, results, report


def _allocate(model, tokenizer, cfg: QuantizeConfig, progress: bool):
    """``--avg-bits``: choose every layer's grid (allocate.py) and set ``cfg.module_grids``; the top-level
    grid becomes the one that covers most weights."""
    from .allocate import choices_of, parse_rules, plan

    choices = choices_of(cfg.widths, cfg.group_sizes or (cfg.group_size,))
    alloc = plan(model, tokenizer, cfg, cfg.avg_bits, choices, parse_rules(cfg.bits_rules), progress=progress)
    per_grid: dict[tuple[int, int], int] = {}
    for u in alloc.units:
        c = (u["bits"], u["group_size"])
        per_grid[c] = per_grid.get(c, 0) + u["params"]
    cfg.bits, cfg.group_size = max(per_grid, key=per_grid.get)
    cfg.module_grids = {m: {"bits": b, **({"group_size": g} if g != cfg.group_size else {})}
                        for m, (b, g) in alloc.module_grids.items() if (b, g) != (cfg.bits, cfg.group_size)}
    log.info("--avg-bits %.3f: %.3f bits/weight predicted, top-level W%d g%d, %d modules on other grids",
             cfg.avg_bits, alloc.avg_bits, cfg.bits, cfg.group_size, len(cfg.module_grids))
    return alloc


def _held_out_ratios(report: dict) -> dict[str, list[tuple[int, float]]]:
    """``--alpha heldout``: per block, the geometric mean over its modules of held-out error at each
    candidate α (and at the chosen one) divided by the held-out error at α = 0 (GPTQ's target)."""
    import math
    per: dict[str, dict[int, list[float]]] = {}
    for entry in report["layers"]:
        for info in entry["modules"].values():
            errs = (info.get("alpha_validation") or {}).get("errors")
            if not errs or errs.get("0.0", 0) <= 0:
                continue
            base = errs["0.0"]
            for a, e in list(errs.items()) + [("chosen", errs.get(str(info.get("alpha"))))]:
                if a != "0.0" and e is not None and e > 0:
                    label = a if a == "chosen" else f"α = {a}"
                    per.setdefault(label, {}).setdefault(entry["block"], []).append(math.log(e / base))
    return {label: sorted((b, math.exp(sum(v) / len(v))) for b, v in blocks.items()) for label, blocks in per.items()}


def _plot_report(report: dict) -> bytes | None:
    """Per-block relative output error of every module, as PNG bytes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is a dependency; plotting is best-effort
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    key = "rel_output_error"
    for entry in report["layers"]:
        for mod, info in entry["modules"].items():
            v = info.get(key, info.get("rel_weight_error"))
            if v is not None:
                label = ("experts." if ".experts." in f".{mod}" else "") + mod.split(".")[-1]
                series.setdefault(label, []).append((entry["block"], v))
    if not series:
        return None
    alloc = report.get("allocation")
    heldout = _held_out_ratios(report)
    sel = report.get("alpha_selection")
    blocks_err = {a: c["block_output_error"] for a, c in (sel or {}).get("candidates", {}).items()
                  if c.get("block_output_error")}
    panels = 1 + bool(alloc) + bool(heldout) + bool(blocks_err)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.5 + 3 * (panels - 1)), dpi=110, sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3] + [2] * (panels - 1)})
    ax = axes[0][0]
    ax2 = axes[1][0] if alloc else None
    ax3 = axes[1 + bool(alloc)][0] if heldout else None
    ax4 = axes[-1][0] if blocks_err else None
    for mod, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=mod)
    cfg = report["config"]
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative error ‖(W−Q)X̃‖²/‖WX̃‖²" if any("rel_output_error" in i for e in report["layers"] for i in e["modules"].values()) else "relative weight error")
    grid = "per channel" if cfg["group_size"] == -1 else f"g{cfg['group_size']}"
    ax.set_title(f"{cfg['method']} W{cfg['bits']} {grid} {'sym' if cfg['sym'] else 'asym'}"
                 + (" (top-level grid; --avg-bits mixed)" if alloc else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if alloc:
        kinds: dict[str, list[tuple[int, int]]] = {}
        from .allocate import label
        for u in alloc["units"]:
            block = int(u["unit"].split(".layers.")[-1].split(".")[0]) if ".layers." in u["unit"] else -1
            grid = label((u["bits"], u.get("group_size", cfg["group_size"])))
            bpw = 8 * u["bytes"][grid] / u["params"] if grid in u.get("bytes", {}) else u["bits"]
            kinds.setdefault(u["unit"].rsplit(".", 1)[-1], []).append((block, bpw))
        for k, (kind, pts) in enumerate(sorted(kinds.items())):
            ax2.scatter([p[0] + 0.12 * k for p in pts], [p[1] for p in pts], s=14, label=kind)
        ax2.set_ylabel("bits / weight (scales incl.)")
        ax2.set_xlabel("decoder block")
        ax2.set_title(f"--avg-bits allocation: predicted {alloc['predicted_avg_bits']:.3f}, achieved "
                      f"{alloc.get('achieved_avg_bits', float('nan')):.3f} bits/weight (scales, zeros included)",
                      fontsize=9)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7, ncol=3)
    if heldout:
        for label, pts in heldout.items():
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if label != "chosen" else "o",
                     lw=2.2 if label == "chosen" else 1, label=label)
        ax3.axhline(1.0, color="k", lw=0.8)
        ax3.set_yscale("log")
        ax3.set_xlabel("decoder block")
        ax3.set_ylabel("held-out error / GPTQ's (α = 0)")
        ax3.set_title("--alpha heldout: held-out ‖WX − QX̃‖² of each α against α = 0 (geometric mean over the "
                      "block's modules; < 1: regularization helps)", fontsize=8)
        ax3.grid(True, alpha=0.3)
        ax3.legend(fontsize=7, ncol=3)
    if blocks_err:
        names = {"0.0": "α = 0 (GPTQ's target)", "sample": "sampled α (SNRQ)"}
        for a, errs in blocks_err.items():
            ax4.plot(range(len(errs)), errs, marker=".", lw=2.2 if a == sel["chosen"] else 1,
                     label=names.get(a, f"α = {a}") + (" — kept" if a == sel["chosen"] else ""))
        ax4.set_yscale("log")
        ax4.set_xlabel("decoder block")
        ax4.set_ylabel("‖h − h_FP‖² / ‖h_FP‖²")
        ax4.set_title(f"--alpha auto: each block's output error against the FP model on {sel['held_back_tokens']:,} "
                      "held-back tokens", fontsize=8)
        ax4.grid(True, alpha=0.3)
        ax4.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
