#!/usr/bin/env python
"""Perplexity of models *as vLLM serves them* (prompt logprobs), e.g. to price an opt-in kernel.

The windows are ``rcsr eval``'s (``rcsr_deploy.evaluate.perplexity``: ``--max-tokens`` tokens of the
evaluation text cut into ``--seqlen`` windows, BOS prepended, every token after BOS scored); each run is
one fresh ``vllm`` process (``LLM(..., dtype)``, eager) with its own environment, so kernels that
environment variables select (``RCSR_CPU_ISA=avx512_vnni_a8``: int8 activations) are compared on the
same checkpoint:

    python tools/ppl_vllm.py --run fp=MODEL_DIR --run a16=CKPT --run a8=CKPT@RCSR_CPU_ISA=avx512_vnni_a8

Prints one line per run (name, model, environment, perplexity, mean NLL, scored tokens) and, with
``--json``, writes them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
def main():
    from vllm import LLM, SamplingParams
    model, dtype, windows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=len(windows[0]) + 8, seed=0,
              max_num_seqs=8, gpu_memory_utilization=0.5)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    nll, n = 0.0, 0
    for r in llm.generate([{"prompt_token_ids": w} for w in windows], sp, use_tqdm=False):
        for t, lp in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:]):
            nll -= lp[t].logprob
            n += 1
    print("RESULT " + json.dumps({"nll_sum": nll, "tokens": n}), flush=True)
main()
"""


def windows_of(model: str, data: str, seqlen: int, max_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rcsr_deploy.data import eval_tokens

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    tokens = eval_tokens(data, tok, max_tokens)
    n = tokens.numel() // seqlen
    if n == 0:
        raise click.ClickException(f"{data}: {tokens.numel()} tokens, fewer than --seqlen {seqlen}")
    w = tokens[: n * seqlen].view(n, seqlen).tolist()
    bos = tok.bos_token_id
    return [([bos] if bos is not None else []) + row for row in w]


@click.command()
@click.option("--run", "runs", multiple=True, required=True,
              help="NAME=MODEL_DIR[@VAR=VALUE[,VAR=VALUE...]] (repeatable)")
@click.option("--data", default="mobydick", show_default=True)
@click.option("--seqlen", default=512, show_default=True)
@click.option("--max-tokens", default=8192, show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(runs, data, seqlen, max_tokens, dtype, json_path):
    parsed = []
    for r in runs:
        name, sep, rest = r.partition("=")
        if not sep or not rest:
            raise click.ClickException(f"--run {r!r}: expected NAME=MODEL_DIR[@VAR=VALUE,...]")
        model, _, envs = rest.partition("@")
        env = dict(kv.split("=", 1) for kv in envs.split(",") if kv) if envs else {}
        if not (Path(model) / "config.json").is_file():
            raise click.ClickException(f"--run {name}: {model} is not a model folder (no config.json)")
        parsed.append((name, model, env))
    wins = windows_of(parsed[0][1], data, seqlen, max_tokens)
    out = []
    for name, model, env in parsed:
        full = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **env}
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), model, dtype, json.dumps(wins)],
                           capture_output=True, text=True, env=full, timeout=3600)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        # vLLM 0.32 on CPU can abort at interpreter exit ("terminate called without an active exception",
        # rc -6) after the result is printed (rcsr_cli.main._exit_now); the printed result stands
        if not lines or p.returncode not in (0, -6):
            raise click.ClickException(f"run {name} failed (rc {p.returncode}): {(p.stdout + p.stderr)[-2000:]}")
        res = json.loads(lines[-1][7:])
        nll = res["nll_sum"] / res["tokens"]
        row = {"run": name, "model": model, "env": env, "dtype": dtype, "data": data, "seqlen": seqlen,
               "windows": len(wins), "tokens": res["tokens"], "nll": nll, "ppl": math.exp(nll)}
        out.append(row)
        click.echo(f"{name:>8}  ppl {row['ppl']:9.3f}  nll {nll:.5f}  tokens {res['tokens']}  {model}"
                   + (f"  {env}" if env else ""))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
