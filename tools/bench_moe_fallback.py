#!/usr/bin/env python
"""MoE few-token experts: what should an expert with too few routed calibration tokens be calibrated on?

Measures the options of ``--moe-fallback`` (``all`` tokens of the block, its router ``neighbours``' tokens,
``rtn``) and, as the case they replace, calibrating it on its own few tokens (``own``), by the expert's
output error on *held-out* tokens the router sends it:

    err_e = ‖(W − Q) X_e‖² / ‖W X_e‖²   for gate_proj / up_proj (X_e: the expert's FP-path inputs on
                                         held-out text) and down_proj (X_e: its FP gate/up activations)

over the experts that had fewer than ``--min-tokens`` routed calibration tokens.  Block 0 only is
quantized (GPTQ, α = 0: the objective is this very error on the calibration tokens), so every option sees
the same inputs.  The model is a random-init Qwen3-MoE with the default model's tokenizer, calibrated and
evaluated on the project's SOTU text (disjoint windows): no real MoE is reachable offline, so this
measures the statistics of each option, not a real model's routing.

    python tools/bench_moe_fallback.py --json runs/moe_fallback.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch


def _model(hidden: int, experts: int, inter: int, top_k: int, vocab: int, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=inter,
                         num_hidden_layers=2, num_attention_heads=hidden // 64, num_key_value_heads=1, head_dim=64,
                         num_experts=experts, num_experts_per_tok=top_k, tie_word_embeddings=True,
                         max_position_embeddings=2048, decoder_sparse_step=1, norm_topk_prob=True)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # transformers 5 initialises the fused experts to zeros / ones
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0.0, 0.02)
    return model


def _held_out_inputs(model, ids: torch.Tensor):
    """Block 0's experts: per expert, its FP-path inputs (X [T_e, H]) on ``ids`` as routed."""
    ex = model.model.layers[0].mlp.experts
    box = []
    h = ex.register_forward_pre_hook(lambda m, args, kw: box.append(
        (args[0].reshape(-1, args[0].shape[-1]).clone(), (args[1] if len(args) > 1 else kw["top_k_index"])
         .reshape(-1, (args[1] if len(args) > 1 else kw["top_k_index"]).shape[-1]).clone())), with_kwargs=True)
    try:
        with torch.inference_mode():
            for w in ids:
                model(input_ids=w[None], use_cache=False)
    finally:
        h.remove()
    x = torch.cat([b[0] for b in box])
    idx = torch.cat([b[1] for b in box])
    return {e: x[(idx == e).any(-1)] for e in range(ex.gate_up_proj.shape[0])}


def _err(W, Q, X) -> float:
    if X.shape[0] == 0:
        return float("nan")
    return float(((X @ (W - Q).T).pow(2).sum() / (X @ W.T).pow(2).sum().clamp(min=1e-30)))


@click.command()
@click.option("--hidden", default=256, show_default=True)
@click.option("--experts", default=16, show_default=True)
@click.option("--inter", default=128, show_default=True)
@click.option("--top-k", "top_k", default=2, show_default=True)
@click.option("--bits", default=3, show_default=True)
@click.option("--group-size", "group_size", default=32, show_default=True)
@click.option("--nsamples", default=4, show_default=True, help="calibration windows (few: many starved experts)")
@click.option("--seqlen", default=128, show_default=True)
@click.option("--min-tokens", "min_tokens", default=64, show_default=True)
@click.option("--eval-windows", "eval_windows", default=48, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def main(hidden, experts, inter, top_k, bits, group_size, nsamples, seqlen, min_tokens, eval_windows, seeds, json_out):
    from transformers import AutoTokenizer

    from rcsr_deploy import assets
    from rcsr_deploy.calib import QuantizeConfig, quantize_model
    from rcsr_deploy.data import calibration_split

    tok = AutoTokenizer.from_pretrained(assets.default_model_dir())
    options = {"own": dict(moe_min_tokens=1), "all": dict(moe_fallback="all"),
               "neighbours": dict(moe_fallback="neighbours"), "rtn": dict(moe_fallback="rtn")}
    rows = []
    for seed in [int(s) for s in seeds.split(",")]:
        fit, held = calibration_split("sotu", tok, nsamples, seqlen, seed, eval_windows, 2)
        base = _model(hidden, experts, inter, top_k, len(tok), seed)
        X = _held_out_inputs(base, held)
        ex0 = base.model.layers[0].mlp.experts
        W = {e: {"gate_proj": ex0.gate_up_proj[e, :inter].detach().clone(),
                 "up_proj": ex0.gate_up_proj[e, inter:].detach().clone(),
                 "down_proj": ex0.down_proj[e].detach().clone()} for e in range(experts)}
        Xd = {e: torch.nn.functional.silu(X[e] @ W[e]["gate_proj"].T) * (X[e] @ W[e]["up_proj"].T) for e in range(experts)}
        starved = None
        for name, kw in options.items():
            model = _model(hidden, experts, inter, top_k, len(tok), seed)
            cfg = QuantizeConfig(method="gptq", bits=bits, group_size=group_size, nsamples=nsamples, seqlen=seqlen,
                                 seed=seed, blocks="0", clip="mse", **{"moe_min_tokens": min_tokens, **kw})
            t0 = time.perf_counter()
            res, _ = quantize_model(model, tok, cfg, work_dir=Path(f"/tmp/rcsr-moe-fallback-{seed}-{name}"),
                                    progress=False, windows=fit)
            secs = time.perf_counter() - t0
            pre = "model.layers.0.mlp.experts"
            counts = {e: res[f"{pre}.{e}.gate_proj"].info["tokens"] for e in range(experts)}
            if starved is None:
                starved = [e for e in range(experts) if counts[e] < min_tokens]
            errs = {p: [] for p in ("gate_proj", "up_proj", "down_proj")}
            for e in starved:
                for p in errs:
                    Q = res[f"{pre}.{e}.{p}"].dequantize()
                    errs[p].append(_err(W[e][p], Q, X[e] if p != "down_proj" else Xd[e]))
            row = {"seed": seed, "option": name, "starved": starved, "calib_tokens": [counts[e] for e in starved],
                   "held_out_tokens": [int(X[e].shape[0]) for e in starved], "seconds": secs,
                   "mean_rel_error": {p: float(torch.tensor(v).nanmean()) for p, v in errs.items()}, "errors": errs}
            rows.append(row)
            print(f"seed {seed} {name:>10}: {len(starved)} starved experts, mean held-out rel. error "
                  + ", ".join(f"{p} {v:.4f}" for p, v in row["mean_rel_error"].items()), flush=True)
    print("\n| option | " + " | ".join(f"seed {s}" for s in seeds.split(",")) + " | mean (gate / up / down) |")
    print("|---|" + "---:|" * (len(seeds.split(",")) + 1))
    for name in options:
        rs = [r for r in rows if r["option"] == name]
        per = [sum(r["mean_rel_error"].values()) / 3 for r in rs]
        m = {p: sum(r["mean_rel_error"][p] for r in rs) / len(rs) for p in ("gate_proj", "up_proj", "down_proj")}
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in per)
              + f" | {m['gate_proj']:.4f} / {m['up_proj']:.4f} / {m['down_proj']:.4f} |")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"config": dict(hidden=hidden, experts=experts, inter=inter, top_k=top_k,
                                                             bits=bits, group_size=group_size, nsamples=nsamples,
                                                             seqlen=seqlen, min_tokens=min_tokens,
                                                             eval_windows=eval_windows),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
