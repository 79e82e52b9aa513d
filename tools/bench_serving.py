#!/usr/bin/env python
"""Serving benchmark of several checkpoints of one model against its FP original (docs/RESULTS).

    python tools/bench_serving.py --bits 4,3,2 --group-size 64 --method rtn [--lm-head both] [--quick]
    python tools/bench_serving.py --model random-llama-1b --bits 4,3,2 --lm-head no   # speed at 1B scale

``--model random-llama-1b`` builds (once, under ``--work``) a random-init Llama with TinyLlama-1.1B's
shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632) and the default model's
tokenizer, saved in bf16: its weights are random, so only speed and memory mean anything.

Quantizes the model (``rcsr quantize``; reused when the folder exists), then measures the FP model
once and every checkpoint with :func:`rcsr_cli.bench.bench_model` -- the numbers of
``rcsr bench CKPT`` without re-running the baseline for each checkpoint -- and prints one markdown
table plus the ratios.  Rounding method does not change serving speed (same packed format, same
kernels), so RTN, which needs no calibration, is the default.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent.parent


def build_random_llama(out: Path) -> Path:
    """A random-init Llama of TinyLlama-1.1B's shape with the default model's tokenizer, in bf16."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rcsr_deploy import assets
    from rcsr_deploy.storage import atomic_dir

    tok = AutoTokenizer.from_pretrained(assets.default_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--bits", default="4,3,2", show_default=True)
@click.option("--group-size", "group_size", default="64", show_default=True)
@click.option("--method", default="rtn", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--work", default=str(HERE / "runs" / "serving"), show_default=True,
              help="Checkpoints, vLLM logs and the result JSON go here.")
@click.option("--quick", is_flag=True, help="16 output tokens, one timed iteration.")
@click.option("--iters", type=int, default=None, help="Timed iterations of each latency run (default 3).")
@click.option("--throughput-prompts", "throughput_prompts", type=int, default=None,
              help="vllm bench throughput prompts (default 64; 0 skips).")
@click.option("--serve-prompts", "serve_prompts", type=int, default=None,
              help="vllm bench serve prompts (default 32; 0 skips).")
@click.option("--batch-sizes", "batch_sizes", default="1,16", show_default=True)
@click.option("--lm-head", "lm_head", type=click.Choice(["no", "yes", "both"]), default="both", show_default=True,
              help="Checkpoints with the decoder linears only, with the output head quantized too (--lm-head), or both.")
@click.option("--checkpoint", "extra", multiple=True,
              help="An already quantized checkpoint of --model to measure too (repeatable), e.g. an --avg-bits "
                   "mixed-precision one next to its uniform neighbours.")
def main(model, bits, group_size, method, dtype, work, quick, iters, throughput_prompts, serve_prompts, batch_sizes,
         lm_head, extra):
    from rcsr_deploy.assets import resolve_model
    from rcsr_cli.bench import (BenchConfig, bench_model, machine_info, machine_line, parse_batch_sizes, ratio_line,
                                   ratios, served_table, table_header, table_rows)

    for e in extra:  # before anything is built or resolved
        if not (Path(e) / "config.json").is_file():
            raise click.ClickException(f"--checkpoint {e}: not a checkpoint folder (no config.json)")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    kw = dict(dtype=dtype, batch_sizes=parse_batch_sizes(batch_sizes))
    for key, val in (("iters", iters), ("throughput_prompts", throughput_prompts), ("serve_prompts", serve_prompts)):
        if val is not None:
            kw[key] = val
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    if model == "random-llama-1b":
        model = str(build_random_llama(work / "random-llama-1b"))
    fp_dir = resolve_model(model)
    ckpts = []
    heads = {"no": [False], "yes": [True], "both": [False, True]}[lm_head]
    for b in [int(x) for x in bits.split(",") if x.strip()]:
        for head in heads:
            out = work / f"{Path(fp_dir).name}-{method}-w{b}g{group_size}{'-head' if head else ''}"
            if not out.exists():
                click.echo(f"quantizing W{b} g{group_size} ({method}{', lm_head' if head else ''}) -> {out}", err=True)
                subprocess.run([sys.executable, "-m", "rcsr_cli", "quantize", "--model", model, "--method",
                                method, "--bits", str(b), "--group-size", str(group_size), "--out", str(out),
                                "--no-progress", "--lm-head" if head else "--no-lm-head"], check=True,
                               env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
            ckpts.append(out)
    ckpts += [Path(e) for e in extra]
    machine = machine_info()
    t0 = time.perf_counter()
    logs = work / "logs"

    def progress(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:6.0f}s] {msg}", err=True)

    base = bench_model(fp_dir, cfg, logs, "fp", progress)
    rows = [base]
    result = {"command": "python tools/bench_serving.py " + shlex.join(sys.argv[1:]),
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
              "machine": machine, "baseline": base, "checkpoints": {}, "ratios": {}}
    for ck in ckpts:
        res = bench_model(str(ck), cfg, logs, ck.name, progress)
        rows.append(res)
        result["checkpoints"][ck.name] = res
        result["ratios"][ck.name] = ratios(res, base)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t0
    (work / "serving.json").write_text(json.dumps(result, indent=1))
    bs = list(cfg.batch_sizes)
    lines = [f"machine: {machine_line(machine)}", "", *table_header(bs), *table_rows(rows, bs),
             *served_table(rows, result["config"]), ""]
    for name, r in result["ratios"].items():
        lines.append(f"{name} / FP: {ratio_line(r, bs)}")
    click.echo("\n".join(lines))
    click.echo(f"\nwrote {work / 'serving.json'}", err=True)


if __name__ == "__main__":
    main()
