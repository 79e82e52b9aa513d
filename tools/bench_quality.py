#!/usr/bin/env python
"""Quality benchmark: quantize the model with several methods/settings, evaluate perplexity.

Each (setting, method, seed) row: ``rcsr quantize`` in-process (wall time of the whole layer loop,
forward passes included) → fake-quant perplexity on the evaluation text.  Rows are appended to a
JSONL file as they finish, so an interrupted run continues where it stopped (rows already present
are skipped).  ``--summary`` prints the markdown tables for docs/RESULTS.md (one per setting: ppl per
seed, mean ± sd, ratio to GPTQ's mean, quantization time, mean α).  SARQC λ sweeps:
``snrq-sarqc<λ>`` / ``rtn-sarqc<λ>`` for λ in 0.01, 0.03, 0.3, 1, 3 (plain names: λ = 0.1).

Example (the docs/RESULTS.md run)::

    python tools/bench_quality.py --out runs/quality.jsonl --settings w3g64 --methods all \
        --nsamples 32 --seqlen 512 --eval-tokens 40960 --seeds 0
    python tools/bench_quality.py --out runs/quality.jsonl --summary
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

SETTINGS = {
    "w3g64": dict(bits=3, group_size=64, sym=True),
    "w4pc": dict(bits=4, group_size=-1, sym=True),
    "w2g64": dict(bits=2, group_size=64, sym=True),
    "w4g64": dict(bits=4, group_size=64, sym=True),
    "w4g64a": dict(bits=4, group_size=64, sym=False),
    "w3g128": dict(bits=3, group_size=128, sym=True),
    # mixed precision (--avg-bits: widths 2/3/4, bits per weight counting fp16 scales: W2 g64 = 2.25,
    # W3 g64 = 3.25, W4 g64 = 4.25) and the simple rule baseline: W2 everywhere, one width higher (W3)
    # for down_proj and the first and last blocks
    "avg2.5g64": dict(bits=3, group_size=64, sym=True, avg_bits=2.5, widths=(2, 3, 4)),
    "avg3.0g64": dict(bits=3, group_size=64, sym=True, avg_bits=3.0, widths=(2, 3, 4)),
    "avg3.25g64": dict(bits=3, group_size=64, sym=True, avg_bits=3.25, widths=(2, 3, 4)),
    "avg3.5g64": dict(bits=3, group_size=64, sym=True, avg_bits=3.5, widths=(2, 3, 4)),
    "rule2+1g64": dict(bits=2, group_size=64, sym=True, rule_up=1),   # 2.55 bits/weight on SmolLM2-135M
    "rule3+1g64": dict(bits=3, group_size=64, sym=True, rule_up=1),   # 3.55
    # ... choosing the group size per layer too (g64 or per channel): W3 pc = 3.03 bits, W4 pc = 4.03
    "avg2.5mix": dict(bits=3, group_size=64, sym=True, avg_bits=2.5, widths=(2, 3, 4), group_sizes=(64, -1)),
    "avg3.5mix": dict(bits=3, group_size=64, sym=True, avg_bits=3.5, widths=(2, 3, 4), group_sizes=(64, -1)),
    "avg3.0mix": dict(bits=3, group_size=64, sym=True, avg_bits=3.0, widths=(2, 3, 4), group_sizes=(64, -1)),
    "avg3.25mix": dict(bits=3, group_size=64, sym=True, avg_bits=3.25, widths=(2, 3, 4), group_sizes=(64, -1)),
    "avg3.25mix34": dict(bits=3, group_size=64, sym=True, avg_bits=3.25, widths=(3, 4), group_sizes=(64, -1)),
    "w3pc": dict(bits=3, group_size=-1, sym=True),
    # group sizes between g64 and per channel (multiples of 32 dividing 576): W3 g192 = 3.083 bits, g96 = 3.167
    "w3g96": dict(bits=3, group_size=96, sym=True),
    "w3g192": dict(bits=3, group_size=192, sym=True),
    "avg2.5mixg": dict(bits=3, group_size=64, sym=True, avg_bits=2.5, widths=(2, 3, 4), group_sizes=(64, 96, 192, -1)),
    "avg3.0mixg": dict(bits=3, group_size=64, sym=True, avg_bits=3.0, widths=(2, 3, 4), group_sizes=(64, 96, 192, -1)),
    "avg3.25mixg": dict(bits=3, group_size=64, sym=True, avg_bits=3.25, widths=(2, 3, 4),
                        group_sizes=(64, 96, 192, -1)),
}


def rule_grids(model_path, bits: int, up: int) -> dict:
    """The simple allocation rule: ``down_proj`` and the first/last decoder blocks ``up`` widths higher."""
    from rcsr_deploy.assets import load_model
    from rcsr_deploy.calib.adapter import find_decoder_layers, linear_modules

    model, _ = load_model(model_path)
    layers, prefix = find_decoder_layers(model)
    last = len(layers) - 1
    return {f"{prefix}.{i}.{n}": {"bits": bits + up} for i, block in enumerate(layers) for n in linear_modules(block)
            if n.endswith("down_proj") or i in (0, last)}
METHODS = {  # the paper's comparison rows use the full-range (minmax) grid; "-mse" rows the clip search
    "rtn": dict(method="rtn", clip="minmax"),
    "gptq": dict(method="gptq", clip="minmax"),
    "gptaq": dict(method="gptaq", clip="minmax"),
    "snrq": dict(method="snrq", alpha="sample", clip="minmax"),
    "snrq-cf": dict(method="snrq", alpha="closed-form", clip="minmax"),
    "ksnrq4": dict(method="ksnrq", alpha="sample", beam=4, clip="minmax"),
    "ksnrq8": dict(method="ksnrq", alpha="sample", beam=8, clip="minmax"),
    "snrq-sarqc": dict(method="snrq", alpha="sample", sarqc_lambda=0.1, clip="minmax"),
    "rtn-mse": dict(method="rtn", clip="mse"),
    "gptq-mse": dict(method="gptq", clip="mse"),
    "snrq-mse": dict(method="snrq", alpha="sample", clip="mse"),
    "ksnrq4-mse": dict(method="ksnrq", alpha="sample", beam=4, clip="mse"),
    "snrq-sarqc-mse": dict(method="snrq", alpha="sample", sarqc_lambda=0.1, clip="mse"),
    # α chosen per model on held-back calibration text (--alpha auto), per layer on held-back sequences (heldout)
    "snrq-auto": dict(method="snrq", alpha="auto", clip="minmax"),
    "snrq-auto-mse": dict(method="snrq", alpha="auto", clip="mse"),
    "snrq-auto-sarqc-mse": dict(method="snrq", alpha="auto", clip="mse", auto_sarqc=0.1),
    "snrq-heldout-mse": dict(method="snrq", alpha="heldout", clip="mse"),
    "snrq-cf-mse": dict(method="snrq", alpha="closed-form", clip="mse"),
    "gptaq-mse": dict(method="gptaq", clip="mse"),
    "ksnrq4-auto-mse": dict(method="ksnrq", alpha="auto", beam=4, clip="mse"),
    "rtn-sarqc": dict(method="rtn", clip="mse", sarqc_lambda=0.1),
}
# SARQC λ sweep: snrq-sarqc<λ> / rtn-sarqc<λ> (λ = 0.1 is the plain name above)
for _lam in ("0.01", "0.03", "0.3", "1", "3"):
    METHODS[f"snrq-sarqc{_lam}"] = dict(method="snrq", alpha="sample", sarqc_lambda=float(_lam), clip="minmax")
    METHODS[f"rtn-sarqc{_lam}"] = dict(method="rtn", clip="mse", sarqc_lambda=float(_lam))


def machine_info() -> dict:
    from rcsr_cli.bench import cpu_flags
    import transformers

    flags = {f for f, on in cpu_flags().items() if on}
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }


def _commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), so a row says which code made it."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["setting"], r["method"], r["seed"], r.get("nsamples"), r.get("seqlen"), r.get("blocks", "")))
    return keys


@click.command()
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="runs/quality.jsonl", show_default=True)
@click.option("--model", default="default", show_default=True)
@click.option("--settings", default="w3g64", show_default=True, help=f"comma list of {', '.join(SETTINGS)}")
@click.option("--methods", default="all", show_default=True, help=f"comma list of fp, {', '.join(METHODS)} or all")
@click.option("--seeds", default="0", show_default=True)
@click.option("--calib", default="sotu", show_default=True)
@click.option("--eval-data", "eval_data", default="mobydick", show_default=True)
@click.option("--extra-eval", "extra_eval", default="", show_default=True,
              help="comma list of further evaluation texts (names or local files): each row also records "
                   "ppl_extra {text: ppl}, and with --alpha auto each candidate's, on the same token budget")
@click.option("--alpha-check", "alpha_check", default="", show_default=True,
              help="--alpha auto rows: the second held-back text (--alpha-check-data); rows are named METHOD+check")
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--eval-tokens", "eval_tokens_n", type=int, default=40960, show_default=True)
@click.option("--eval-seqlen", type=int, default=1024, show_default=True)
@click.option("--act-order", "act_order", default="static", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--blocks", default="", help="Quantize only these decoder blocks (timing runs), e.g. 0-5.")
@click.option("--no-eval", is_flag=True, help="Timing only: skip perplexity.")
@click.option("--lm-head", "lm_head", is_flag=True,
              help="Quantize the output head too (rows are named METHOD+head); also records the perplexity of the "
                   "same checkpoint with the FP head put back (ppl_fp_head).")
@click.option("--summary", is_flag=True, help="Only print the markdown table of what --out holds.")
def main(out_path, model, settings, methods, seeds, calib, eval_data, extra_eval, alpha_check, nsamples, seqlen, eval_tokens_n,
         eval_seqlen, act_order, device, blocks, no_eval, lm_head, summary):
    out = Path(out_path)
    if summary:
        print(render_summary(out))
        return
    from rcsr_deploy.assets import load_model, resolve_model
    from rcsr_deploy.calib import QuantizeConfig
    from rcsr_deploy.checkpoint import load_fake_quant_model
    from rcsr_deploy.data import eval_tokens
    from rcsr_deploy.evaluate import perplexity
    from rcsr_deploy.pipeline import quantize_to_checkpoint, resolve_device

    dev = resolve_device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    info = machine_info()
    path = resolve_model(model)
    _, tok = load_model(path)
    tokens = eval_tokens(eval_data, tok, eval_tokens_n)
    extra = {name: eval_tokens(name, tok, eval_tokens_n) for name in extra_eval.split(",") if name.strip()}

    def extra_ppl(m) -> dict:
        return {name: perplexity(m, t, eval_seqlen, bos_token_id=tok.bos_token_id, device=dev)["ppl"]
                for name, t in extra.items()}
    method_names = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",")]
    if methods == "all":
        method_names = ["fp"] + method_names

    def record(row):
        row.update(machine=info, model=model, eval_data=eval_data, eval_tokens=int(tokens.numel()),
                   eval_seqlen=eval_seqlen, calib=calib, nsamples=nsamples, seqlen=seqlen, act_order=act_order,
                   when=time.strftime("%Y-%m-%d %H:%M:%S"))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("setting", "method", "seed", "ppl", "quant_seconds")}), flush=True)

    if "fp" in method_names and ("fp", "fp", 0, nsamples, seqlen, "") not in done:
        m, _ = load_model(path)
        r = perplexity(m, tokens, eval_seqlen, bos_token_id=tok.bos_token_id, device=dev)
        record({"setting": "fp", "method": "fp", "seed": 0, "ppl": r["ppl"], "quant_seconds": 0.0,
                "ppl_extra": extra_ppl(m) if extra else None})
        del m
    for setting in settings.split(","):
        for name in method_names:
            if name == "fp":
                continue
            checked = bool(alpha_check) and METHODS[name].get("alpha") == "auto"
            row_name = name + ("+check" if checked else "") + ("+head" if lm_head else "") + \
                ("" if act_order == "static" else f"@{act_order}")
            for seed in (int(s) for s in seeds.split(",")):
                if (setting, row_name, seed, nsamples, seqlen, blocks) in done:
                    continue
                kw = {**SETTINGS[setting], **METHODS[name]}
                if "rule_up" in kw:
                    kw["module_grids"] = rule_grids(path, kw["bits"], kw.pop("rule_up"))
                if checked:
                    kw["alpha_check"] = alpha_check
                cfg = QuantizeConfig(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, act_order=act_order,
                                     blocks=blocks, lm_head=lm_head, **kw)
                tmp = Path(tempfile.mkdtemp(prefix="rcsr-bench-"))

                def candidate_ppl(alpha, cand_model):  # --alpha auto: every candidate's evaluation perplexity too
                    if no_eval:
                        return {}
                    cand_model.to(dev)
                    try:
                        res = {"eval_ppl": perplexity(cand_model, tokens, eval_seqlen, bos_token_id=tok.bos_token_id,
                                                      device=dev)["ppl"]}
                        if extra:
                            res["eval_ppl_extra"] = extra_ppl(cand_model)
                        return res
                    finally:
                        cand_model.to("cpu")
                try:
                    rep = quantize_to_checkpoint(path, tmp / "q", cfg, device=dev, progress=True,
                                                 candidate_hook=candidate_ppl)
                    if no_eval:
                        r = {"ppl": float("nan")}
                    else:
                        qm, _ = load_fake_quant_model(tmp / "q", device=dev)
                        r = perplexity(qm, tokens, eval_seqlen, bos_token_id=tok.bos_token_id, device=dev)
                        if extra:
                            r["ppl_extra"] = extra_ppl(qm)
                        if lm_head:  # the same decoder linears with the FP head (and tied embedding) put back
                            fp_model, _ = load_model(path)
                            with torch.no_grad():
                                qm.get_output_embeddings().weight.copy_(fp_model.get_output_embeddings().weight)
                                qm.get_input_embeddings().weight.copy_(fp_model.get_input_embeddings().weight)
                            del fp_model
                            r["ppl_fp_head"] = perplexity(qm, tokens, eval_seqlen, bos_token_id=tok.bos_token_id,
                                                          device=dev)["ppl"]
                        del qm
                    groups = sorted({json.dumps(e["groups"]) for e in rep["layers"] if "groups" in e})
                    alphas = [i.get("alpha") for e in rep["layers"] for i in e["modules"].values() if i.get("alpha") is not None]
                    chosen = [i["alpha"] for e in rep["layers"] for i in e["modules"].values()
                              if i.get("alpha_mode") == "heldout"]
                    record({"setting": setting, "method": row_name, "seed": seed, "ppl": r["ppl"],
                            "ppl_fp_head": r.get("ppl_fp_head"), "ppl_extra": r.get("ppl_extra"),
                            "quant_seconds": rep["seconds"], "config": rep["config"],
                            "mean_alpha": (sum(alphas) / len(alphas)) if alphas else None,
                            "alpha_counts": {str(a): chosen.count(a) for a in sorted(set(chosen))} or None,
                            "alpha_selection": rep.get("alpha_selection"),
                            "bytes_on_disk": sum(p.stat().st_size for p in (tmp / "q").glob("*.safetensors")),
                            "allocation": {k: v for k, v in rep.get("allocation", {}).items() if k != "units"}
                            or None,
                            "groups": [json.loads(g) for g in groups], "commit": _commit(),
                            "blocks": blocks, "decode_seconds": sum(i.get("seconds", 0.0) for e in rep["layers"]
                                                                   for i in e["modules"].values())})
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)


def _method_key(method: str):
    base = method.split("+")[0].split("@")[0]
    return (list(METHODS).index(base) if base in METHODS else -1, method)


def render_summary(path: Path) -> str:
    """One markdown table per setting: ppl per seed, mean ± sd, ratio to GPTQ's mean, time, mean α.

    Rows of a calibration size other than the most common one are labelled with it (e.g. "128×512"),
    and their "× GPTQ" uses GPTQ at the same calibration size.  Timing-only rows (``--no-eval``,
    ``--blocks``) are left out.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("blocks") and r["ppl"] == r["ppl"]]
    if not rows:
        return "(no rows)"
    sizes = [(r.get("nsamples"), r.get("seqlen")) for r in rows]
    common = max(set(sizes), key=sizes.count)

    def label(r):
        size = (r.get("nsamples"), r.get("seqlen"))
        return r["method"] + ("" if size == common else f" ({size[0]}×{size[1]})")

    def mean(vals):
        return sum(vals) / len(vals)

    fp = [r["ppl"] for r in rows if r["method"] == "fp"]
    out = []
    for setting in sorted({r["setting"] for r in rows if r["setting"] != "fp"},
                          key=lambda s: list(SETTINGS).index(s) if s in SETTINGS else 99):
        by: dict[str, dict[int, dict]] = {}
        for r in rows:
            if r["setting"] == setting:
                by.setdefault(label(r), {})[r["seed"]] = r
        seeds = sorted({s for m in by.values() for s in m})
        out += [f"**{setting}**" + (f" (FP {fp[0]:.2f})" if fp else ""), "",
                "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | × GPTQ | quant. s | mean α |",
                "|---|" + "---:|" * (len(seeds) + 4)]
        for name in sorted(by, key=lambda m: (_method_key(m.split(" ")[0]), m)):
            rs = by[name]
            p = torch.tensor([r["ppl"] for r in rs.values()], dtype=torch.float64)
            sd = f" ± {p.std().item():,.2f}" if len(rs) > 1 else ""
            _, _, size_suffix = name.partition(" ")  # compare with GPTQ at the same calibration size
            ref = by.get("gptq" + (f" {size_suffix}" if size_suffix else ""))
            x = p.mean().item() / mean([r["ppl"] for r in ref.values()]) if ref else None
            ratio = "–" if x is None else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"
            al = [r["mean_alpha"] for r in rs.values() if r.get("mean_alpha") is not None]
            cells = [f"{rs[s]['ppl']:,.2f}" if s in rs else "–" for s in seeds]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {p.mean().item():,.2f}{sd} | {ratio} | "
                       f"{mean([r['quant_seconds'] for r in rs.values()]):.0f} | "
                       f"{f'{mean(al):.3f}' if al else '–'} |")
        out.append("")
        fp_head = [f"{name} seed {seed}: {r['ppl_fp_head']:,.2f}" for name, rs in by.items()
                   for seed, r in sorted(rs.items()) if r.get("ppl_fp_head") is not None]
        if fp_head:
            out += ["Same checkpoints with the FP head put back: " + "; ".join(fp_head) + ".", ""]
    out += render_auto(rows)
    return "\n".join(out)


def render_auto(rows: list[dict]) -> list[str]:
    """``--alpha auto`` rows: per setting and seed, both candidates' held-back NLL and evaluation perplexity
    (each candidate is the plain α = 0 / sampled-α run of that seed), the one kept, and whether the kept one
    is at or below α = 0's (GPTQ's) evaluation perplexity."""
    auto = [r for r in rows if r.get("alpha_selection")]
    if not auto:
        return []
    out = ["**--alpha auto** (candidates: α = 0, i.e. GPTQ, and the sampled α, on the same calibration windows)", "",
           "| setting | seed | held-back NLL α=0 | held-back NLL sampled | gain ± s.e. (margin) | ppl α=0 (GPTQ) | "
           "ppl sampled | kept | kept ÷ GPTQ | quant. s |", "|---|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for r in sorted(auto, key=lambda r: (list(SETTINGS).index(r["setting"]) if r["setting"] in SETTINGS else 99,
                                         r["method"], r["seed"])):
        sel = r["alpha_selection"]
        c0, cs = sel["candidates"].get("0.0", {}), sel["candidates"].get("sample", {})
        p0 = c0.get("eval_ppl")
        kept = sel["candidates"][sel["chosen"]].get("eval_ppl", r["ppl"])
        gain = c0.get("held_back_nll", float("nan")) - cs.get("held_back_nll", float("nan"))
        se = f" ± {cs['gain_se']:.4f}" if "gain_se" in cs else ""  # rows before the margin rule lack it
        margin = f" ({sel['margin']})" if "margin" in sel else " (none)"
        out.append(f"| {r['setting']} | {r['seed']} | {c0.get('held_back_nll', float('nan')):.4f} | "
                   f"{cs.get('held_back_nll', float('nan')):.4f} | {gain:+.4f}{se}{margin} | {p0 or float('nan'):,.2f} | "
                   f"{cs.get('eval_ppl', float('nan')):,.2f} | {'α=0' if sel['chosen'] == '0.0' else 'sampled'} | "
                   f"{kept / p0 if p0 else float('nan'):.3f} | {r['quant_seconds']:.0f} |")
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())
