#!/usr/bin/env python
"""The main job (README command 1): quantize → serve with vLLM → answer a chat request → figures.

1. Quantize the embedded default model with K-SNRQ (W4 g64 sym, K = 4; g64 because its hidden size
   576 is not a multiple of 128) — reused if the checkpoint already exists with the same settings.
2. Serve it with ``rcsr serve`` (vLLM's OpenAI server + the rcsr plugin), send one chat request and
   print the answer; time a 128-token greedy completion (decode tokens/s through the API).
3. The same timing on the FP model served by vLLM in bf16 (baseline).
4. Print FP vs quantized perplexity (Moby-Dick, fake-quant reference), size on disk, tokens/s.

Every server is started in its own process group and stopped with it (``rcsr_cli.server``).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent.parent
#: Quantize the tied embedding / lm_head too (K-SNRQ-calibrated, like the decoder linears)?  On: a much
#: smaller checkpoint and faster batch-1 decode for a few percent of perplexity (docs/RESULTS.md and
#: docs/RESULTS-serving.md have the measurements).
LM_HEAD_DEFAULT = True


def chat(srv, text: str, max_tokens: int = 96) -> str:
    r = srv.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": text}],
                                          "max_tokens": max_tokens, "temperature": 0})
    return r["choices"][0]["message"]["content"].strip()


def decode_speed(srv, n_tokens: int = 128, repeats: int = 3) -> float:
    """Median tokens/s of a greedy ``n_tokens`` completion (ignore_eos) of a short prompt."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = srv.post("/v1/completions", {"model": "m", "prompt": "Call me Ishmael. Some years ago",
                                         "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True})
        dt = time.perf_counter() - t0
        rates.append(r["usage"]["completion_tokens"] / dt)
    return sorted(rates)[len(rates) // 2]


def serve(model: str, log_path: Path):
    from rcsr_cli.server import VllmServer

    return VllmServer(model, ["--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager",
                              "--served-model-name", "m"], log_path=log_path)


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return res.stdout


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@click.command()
@click.option("--work", default=str(HERE / "runs" / "main"), show_default=True, help="Where checkpoints and logs go.")
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--eval-tokens", type=int, default=8192, show_default=True)
@click.option("--skip-baseline", is_flag=True, help="Do not serve the FP model for the speed baseline.")
@click.option("--lm-head/--no-lm-head", "lm_head", default=LM_HEAD_DEFAULT, show_default=True,
              help="Quantize the (tied) embedding / output head too (see docs/RESULTS-serving.md for its cost).")
def main(work, nsamples, seqlen, eval_tokens, skip_baseline, lm_head):
    from rcsr_deploy.assets import default_model_dir

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    fp_dir = default_model_dir()
    ckpt = work / f"smollm2-ksnrq-w4g64-n{nsamples}x{seqlen}{'-head' if lm_head else ''}"
    rcsr = [sys.executable, "-m", "rcsr_cli"]
    t0 = time.perf_counter()
    if ckpt.exists():
        print(f"[1/4] reusing {ckpt}")
    else:
        print(f"[1/4] quantizing the default model with K-SNRQ (K=4, W4 g64 sym, {nsamples}x{seqlen} SOTU tokens) ...",
              flush=True)
        subprocess.run(rcsr + ["quantize", "--model", "default", "--out", str(ckpt), "--method", "ksnrq", "--beam", "4",
                               "--bits", "4", "--group-size", "64", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                               "--lm-head" if lm_head else "--no-lm-head"],
                       check=True)
    quant_s = time.perf_counter() - t0

    print("[2/4] serving it with vLLM (rcsr plugin) ...", flush=True)
    with serve(str(ckpt), work / "serve-quantized.log") as srv:
        ready = srv.wait_ready()
        question = "What is the capital of France? Answer in one sentence."
        answer = chat(srv, question)
        print(f"      server healthy after {ready:.0f}s\n      Q: {question}\n      A: {answer}", flush=True)
        q_tps = decode_speed(srv)
    fp_tps = None
    if not skip_baseline:
        print("[3/4] serving the FP model (bf16) for the speed baseline ...", flush=True)
        with serve(str(fp_dir), work / "serve-fp.log") as srv:
            srv.wait_ready()
            fp_tps = decode_speed(srv)

    print(f"[4/4] perplexity on the first {eval_tokens} Moby-Dick tokens (fp32, fake-quant reference) ...", flush=True)
    ppl = {}
    for name, model in (("fp", "default"), ("quantized", str(ckpt))):
        out = _run(rcsr + ["eval", "--model", model, "--max-tokens", str(eval_tokens), "--json", "--no-progress"])
        ppl[name] = json.loads(out.strip().splitlines()[-1])["ppl"]
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    fp_bytes, q_bytes = _size(fp_dir), _size(ckpt)
    summary = {
        "checkpoint": str(ckpt), "method": qcfg["method"]["method"], "bits": qcfg["bits"], "group_size": qcfg["group_size"],
        "ppl_fp": ppl["fp"], "ppl_quantized": ppl["quantized"], "bytes_fp32": fp_bytes, "bytes_bf16_equiv": fp_bytes // 2,
        "bytes_quantized": q_bytes, "decode_tok_s_quantized": q_tps, "decode_tok_s_fp_bf16": fp_tps,
        "answer": answer, "quantize_seconds": quant_s, "lm_head": lm_head,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== rcsr-deploy main job ===")
    print(f"checkpoint            {ckpt}")
    print(f"perplexity (Moby-Dick) FP {ppl['fp']:.2f}  ->  K-SNRQ W4 g64 {ppl['quantized']:.2f}")
    head = "embedding/lm_head quantized too" if lm_head else "embedding/lm_head stay unquantized, in fp32"
    print(f"weights on disk       FP {fp_bytes / 1e6:.0f} MB fp32 ({fp_bytes / 2e6:.0f} MB as bf16)  ->  {q_bytes / 1e6:.0f} MB "
          f"({q_bytes / (fp_bytes / 2):.3f}x of bf16; {head})")
    if fp_tps:
        print(f"decode tokens/s       FP bf16 {fp_tps:.1f}  ->  quantized {q_tps:.1f}  ({q_tps / fp_tps:.2f}x, 128-token "
              f"greedy completion through the OpenAI API, median of 3)")
    else:
        print(f"decode tokens/s       quantized {q_tps:.1f}")
    print(f"summary               {work / 'summary.json'}")


if __name__ == "__main__":
    main()
