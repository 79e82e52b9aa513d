#!/usr/bin/env python
"""MoE benchmark: quantization time per block and per expert (GPTQ vs SNRQ vs K-SNRQ), peak memory, bytes,
and (with --serve) served decode tok/s through vLLM against the same model in bf16.

No real MoE model is reachable offline: the model is a random-init Qwen3-MoE built from a config (weights
are random, so quality is meaningless here; time, memory, bytes and speed are real).  The calibration
text is the project's SOTU set.

    python tools/bench_moe.py --out runs/moe --methods gptq,snrq,ksnrq --json runs/moe/bench.json
    python tools/bench_moe.py --out runs/moe --methods snrq --serve      # + rcsr bench (vLLM) vs bf16
"""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

HERE = Path(__file__).resolve().parent.parent


def build_model(out: Path, hidden: int, experts: int, inter: int, layers: int, top_k: int) -> Path:
    """A random Qwen3-MoE saved with the default model's tokenizer (so vLLM can serve it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from rcsr_deploy import assets

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(assets.default_model_dir())
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         moe_intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), head_dim=64, num_experts=experts,
                         num_experts_per_tok=top_k, tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _quantize_in_subprocess(model_dir: Path, ckpt: Path, method: str, args: dict) -> dict:
    """One `rcsr quantize` in a fresh process (its peak RSS is that run's alone); returns the report."""
    cmd = [sys.executable, "-m", "rcsr_cli", "quantize", "--model", str(model_dir), "--out", str(ckpt), "--method",
           method, "--bits", str(args["bits"]), "--group-size", str(args["group_size"]), "--nsamples",
           str(args["nsamples"]), "--seqlen", str(args["seqlen"]), "--no-progress", "--overwrite", "--device", "cpu"]
    if method == "ksnrq":
        cmd += ["--beam", "4"]
    if method in ("snrq", "ksnrq"):  # one pass of the method (the default --alpha auto runs two candidates)
        cmd += ["--alpha", "sample"]
    code = ("import resource, runpy, sys; sys.argv = ['rcsr'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('rcsr_cli', run_name='__main__')\n"
            "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *cmd[3:]], capture_output=True, text=True, cwd=str(HERE))
    if r.returncode != 0:
        raise SystemExit(f"quantize failed: {r.stderr[-3000:]}")
    peak = int(next(ln.split()[1] for ln in r.stderr.splitlines() if ln.startswith("PEAK_RSS_KB"))) * 1024
    report = json.loads((ckpt / "quant_report.json").read_text())
    return {"wall_s": time.perf_counter() - t0, "peak_rss_bytes": peak, "report": report}


def _summary(method: str, run: dict, ckpt: Path) -> dict:
    rep = run["report"]
    blocks = [e for e in rep["layers"] if "seconds" in e and "groups" in e]
    expert_s = [i["seconds"] for e in rep["layers"] for n, i in e["modules"].items() if ".experts." in n]
    counts = [i["tokens"] for e in rep["layers"] for n, i in e["modules"].items() if n.endswith("gate_proj") and
              ".experts." in n]
    fallback = sum(1 for e in rep["layers"] for n, i in e["modules"].items()
                   if n.endswith("gate_proj") and i.get("calibration") == "all-tokens")
    return {"method": method, "quantize_seconds": rep["seconds"], "wall_s": run["wall_s"],
            "seconds_per_block": sum(e["seconds"] for e in blocks) / max(len(blocks), 1),
            "seconds_per_expert_matrix_solve": sum(expert_s) / max(len(expert_s), 1),
            "expert_matrices": len(expert_s), "routed_tokens_min_max": [min(counts), max(counts)] if counts else None,
            "experts_on_fallback": fallback, "peak_rss_bytes": run["peak_rss_bytes"],
            "bytes": sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))}


@click.command()
@click.option("--out", default=str(HERE / "runs" / "moe"), show_default=True)
@click.option("--hidden", type=int, default=1024, show_default=True)
@click.option("--experts", type=int, default=16, show_default=True)
@click.option("--inter", type=int, default=512, show_default=True, help="expert intermediate size")
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--top-k", "top_k", type=int, default=2, show_default=True)
@click.option("--methods", default="gptq,snrq,ksnrq", show_default=True)
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--group-size", "group_size", type=int, default=64, show_default=True)
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--serve", is_flag=True, help="Also `rcsr bench --quick` the last checkpoint against the bf16 model.")
@click.option("--json", "json_out", default=None)
def main(out, hidden, experts, inter, layers, top_k, methods, bits, group_size, nsamples, seqlen, serve, json_out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out / "fp", hidden, experts, inter, layers, top_k)
    fp_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    args = dict(bits=bits, group_size=group_size, nsamples=nsamples, seqlen=seqlen)
    rows = []
    ckpt = None
    for method in methods.split(","):
        ckpt = out / f"{method}-w{bits}g{group_size}"
        run = _quantize_in_subprocess(model_dir, ckpt, method, args)
        rows.append(_summary(method, run, ckpt))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": {"hidden": hidden, "experts": experts, "expert_intermediate": inter, "layers": layers,
                        "top_k": top_k, "fp32_bytes": fp_bytes, "params": fp_bytes // 4},
              "settings": args, "rows": rows, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if serve and ckpt is not None:
        bench_json = out / "serve.json"
        subprocess.run([sys.executable, "-m", "rcsr_cli", "bench", str(ckpt), "--baseline", str(model_dir),
                        "--json", str(bench_json)], check=True, cwd=str(HERE))
        result["serve"] = json.loads(bench_json.read_text())
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    print(f"peak RSS (max over runs): {max(r['peak_rss_bytes'] for r in rows) / 2**30:.2f} GiB; "
          f"ru_maxrss of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
