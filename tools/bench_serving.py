#!/usr/bin/env python
"""Serving benchmark of several checkpoints of one model against its FP original (docs/RESULTS).

    python tools/bench_serving.py --bits 4,3,2 --group-size 64 --method rtn [--lm-head both] [--quick]

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


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--bits", default="4,3,2", show_default=True)
@click.option("--group-size", "group_size", default="64", show_default=True)
@click.option("--method", default="rtn", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--work", default=str(HERE / "runs" / "serving"), show_default=True,
              help="Checkpoints, vLLM logs and the result JSON go here.")
@click.option("--quick", is_flag=True, help="16 output tokens, one timed iteration.")
@click.option("--batch-sizes", "batch_sizes", default="1,16", show_default=True)
@click.option("--lm-head", "lm_head", type=click.Choice(["no", "yes", "both"]), default="both", show_default=True,
              help="Checkpoints with the decoder linears only, with the output head quantized too (--lm-head), or both.")
def main(model, bits, group_size, method, dtype, work, quick, batch_sizes, lm_head):
    from rcsr_deploy.assets import resolve_model
    from rcsr_cli.bench import (BenchConfig, bench_model, machine_info, machine_line, parse_batch_sizes, ratio_line,
                                   ratios, served_table, table_header, table_rows)

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    kw = dict(dtype=dtype, batch_sizes=parse_batch_sizes(batch_sizes))
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    fp_dir = resolve_model(model)
    ckpts = []
    heads = {"no": [False], "yes": [True], "both": [False, True]}[lm_head]
    for b in [int(x) for x in bits.split(",")]:
        for head in heads:
            out = work / f"{Path(fp_dir).name}-{method}-w{b}g{group_size}{'-head' if head else ''}"
            if not out.exists():
                click.echo(f"quantizing W{b} g{group_size} ({method}{', lm_head' if head else ''}) -> {out}", err=True)
                subprocess.run([sys.executable, "-m", "rcsr_cli", "quantize", "--model", model, "--method",
                                method, "--bits", str(b), "--group-size", str(group_size), "--out", str(out),
                                "--no-progress", "--lm-head" if head else "--no-lm-head"], check=True,
                               env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
            ckpts.append(out)
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
